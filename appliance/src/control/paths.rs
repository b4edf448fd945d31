//! Path computation for meshd: turns the link-state database (a set of
//! [`Lsa`]s) into routes.
//!
//! # Role
//! This module is pure: no I/O, no clock, no async, no shared state. Every
//! node of the mesh feeds the same LSAs into the same functions, so the
//! results must be bit-for-bit deterministic; otherwise two neighbours could
//! disagree about a route and forward packets back and forth.
//!
//! # Cost formula
//! The cost of one directed link u→v, as measured by u, is
//!
//! ```text
//! cost = alpha·latency_ms + beta·(1 Gbit/s / bandwidth) + gamma·utilisation
//!      + delta·loss + epsilon
//! ```
//!
//! with `latency_ms = rtt_us / 2 / 1000` (one way), an unknown bandwidth (0)
//! counted as 1 Gbit/s, and utilisation and loss as fractions in `0..=1`
//! (ppm / 1e6, clamped). `epsilon` is a per-hop charge so that, all else
//! equal, fewer hops win. The result is clamped to
//! `[epsilon, MAX_LINK_COST]`; a NaN (only possible with invalid weights)
//! becomes [`MAX_LINK_COST`].
//!
//! # Invariants
//! - Every link cost is finite and strictly positive, so Dijkstra is valid
//!   and every shortest path is loopless.
//! - A directed edge u→v exists only when u's LSA lists v *and* v's LSA lists
//!   u: a one-sided advert is either stale or a lie, and must not attract
//!   traffic.
//! - Costs within a relative [`TIE_TOLERANCE`] are equal; equal-cost paths are
//!   ordered by their node-id sequence, lexicographically. This makes the
//!   choice independent of hash order, LSA arrival order and floating-point
//!   summation order, and consistent hop by hop (the suffix of a chosen path
//!   is what the next node chooses itself).
//! - No function panics on any input: unknown nodes, node id 0, self-loops,
//!   duplicate or unsorted adjacencies, duplicate LSAs and extreme metrics are
//!   all tolerated.
#![forbid(unsafe_code)]

use super::types::{Adjacency, LinkMetrics, Lsa};
use petgraph::Directed;
use petgraph::graph::{EdgeIndex, Graph, NodeIndex};
use petgraph::visit::EdgeRef;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};

mod cost;
#[cfg(test)]
mod tests;

pub use self::cost::{CostWeights, link_cost};

/// Upper bound of a single link's cost: a link this bad is still usable as a
/// last resort, and sums of many of them stay far from overflow.
pub const MAX_LINK_COST: f64 = 1e9;

/// Lower bound of a link's cost when `epsilon` itself is unusable (not
/// finite or not positive), so that costs stay strictly positive.
pub const MIN_LINK_COST: f64 = 1e-9;

/// Relative difference under which two path costs count as equal. Large
/// enough to absorb rounding from summing a few hundred link costs in
/// different orders, small enough never to merge genuinely different costs.
pub const TIE_TOLERANCE: f64 = 1e-10;

/// What the next-hop weights of one route add up to.
pub const NEXT_HOP_WEIGHT_TOTAL: u32 = 1000;

/// The usable graph: a directed edge u→v exists only if u's LSA lists v AND
/// v's LSA lists u (both ends agree the link is up); its metrics are u's view.
///
/// Nodes are the origins of the LSAs (id 0 excluded). They are inserted in
/// increasing id order, so comparing node indices compares node ids; the
/// searches rely on that for tie-breaking.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    graph: Graph<u64, LinkMetrics, Directed, usize>,
    index: HashMap<u64, NodeIndex<usize>>,
}

/// Orders LSAs of the same origin and seq so that a duplicate pick does not
/// depend on arrival order.
fn adjacency_key(adjacencies: &[Adjacency]) -> Vec<(u64, u64, u32, u32, u64)> {
    adjacencies
        .iter()
        .map(|a| {
            (
                a.neighbor,
                a.metrics.rtt_us,
                a.metrics.loss_ppm,
                a.metrics.utilisation_ppm,
                a.metrics.bandwidth_bps,
            )
        })
        .collect()
}

impl Topology {
    /// Builds the topology. Of several LSAs from one origin the highest seq
    /// wins; within an LSA the first adjacency to a neighbour wins, and
    /// adjacencies to itself or to node 0 are ignored.
    pub fn from_lsas<'a>(lsas: impl IntoIterator<Item = &'a Lsa>) -> Self {
        let mut newest: BTreeMap<u64, &Lsa> = BTreeMap::new();
        for lsa in lsas {
            if lsa.origin == 0 {
                continue;
            }
            let replace = match newest.get(&lsa.origin) {
                None => true,
                Some(old) => match lsa.seq.cmp(&old.seq) {
                    Ordering::Greater => true,
                    Ordering::Less => false,
                    Ordering::Equal => {
                        adjacency_key(&lsa.adjacencies) > adjacency_key(&old.adjacencies)
                    }
                },
            };
            if replace {
                newest.insert(lsa.origin, lsa);
            }
        }

        let adverts: BTreeMap<u64, BTreeMap<u64, LinkMetrics>> = newest
            .iter()
            .map(|(&origin, lsa)| {
                let mut links = BTreeMap::new();
                for adj in &lsa.adjacencies {
                    if adj.neighbor != 0 && adj.neighbor != origin {
                        links.entry(adj.neighbor).or_insert(adj.metrics);
                    }
                }
                (origin, links)
            })
            .collect();

        let mut graph = Graph::default();
        let mut index = HashMap::with_capacity(adverts.len());
        for &origin in adverts.keys() {
            index.insert(origin, graph.add_node(origin));
        }
        for (origin, links) in &adverts {
            for (neighbor, metrics) in links {
                let agreed = adverts
                    .get(neighbor)
                    .is_some_and(|theirs| theirs.contains_key(origin));
                if let (true, Some(&u), Some(&v)) = (agreed, index.get(origin), index.get(neighbor))
                {
                    graph.add_edge(u, v, *metrics);
                }
            }
        }
        Self { graph, index }
    }

    /// Node ids, sorted.
    pub fn nodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.graph.node_weights().copied()
    }

    /// Whether `node` originated an LSA that made it into the topology.
    pub fn contains(&self, node: u64) -> bool {
        self.index.contains_key(&node)
    }

    /// Number of directed edges (a working link counts twice).
    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// u's metrics for the link u→v, if that edge is usable.
    pub fn link(&self, u: u64, v: u64) -> Option<&LinkMetrics> {
        let (u, v) = (self.index.get(&u)?, self.index.get(&v)?);
        let edge = self.graph.find_edge(*u, *v)?;
        self.graph.edge_weight(edge)
    }

    /// Usable neighbours of `node` (out-edges), sorted by id.
    pub fn neighbors(&self, node: u64) -> Vec<u64> {
        let Some(&ix) = self.index.get(&node) else {
            return Vec::new();
        };
        let mut out: Vec<u64> = self
            .graph
            .edges(ix)
            .map(|e| self.graph[e.target()])
            .collect();
        out.sort_unstable();
        out
    }

    fn ix(&self, node: u64) -> Option<usize> {
        self.index.get(&node).map(|ix| ix.index())
    }

    fn id(&self, ix: usize) -> u64 {
        self.graph
            .node_weight(NodeIndex::new(ix))
            .copied()
            .unwrap_or(0)
    }

    fn edge_costs(&self, weights: &CostWeights) -> Vec<f64> {
        self.graph
            .edge_weights()
            .map(|m| link_cost(m, weights))
            .collect()
    }

    fn find_edge(&self, u: usize, v: usize) -> Option<usize> {
        self.graph
            .find_edge(NodeIndex::new(u), NodeIndex::new(v))
            .map(|e: EdgeIndex<usize>| e.index())
    }

    /// Cost of a node-index sequence, summed from its start so that the same
    /// sequence always gets the same bits.
    fn sequence_cost(&self, costs: &[f64], nodes: &[usize]) -> Option<f64> {
        let mut total = 0.0;
        for pair in nodes.windows(2) {
            let edge = self.find_edge(pair[0], pair[1])?;
            total += costs.get(edge)?;
        }
        Some(total)
    }

    fn to_path(&self, nodes: &[usize], cost: f64) -> Path {
        Path {
            nodes: nodes.iter().map(|&ix| self.id(ix)).collect(),
            cost,
        }
    }
}

/// A loopless path.
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    /// nodes[0] = source, last = destination.
    pub nodes: Vec<u64>,
    /// Sum of the link costs, added from the source onwards.
    pub cost: f64,
}

/// One usable next hop towards a destination.
#[derive(Clone, Debug, PartialEq)]
pub struct NextHop {
    /// The neighbour to forward to.
    pub peer: u64,
    /// Cost of the best of the route's paths through this neighbour.
    pub cost: f64,
    /// Share of traffic, out of [`NEXT_HOP_WEIGHT_TOTAL`].
    pub weight: u32,
}

/// How to reach one destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// The destination node.
    pub destination: u64,
    /// Up to k loopless paths, best first.
    pub paths: Vec<Path>,
    /// Downstream next hops (strictly closer to the destination than this
    /// node), best first; traffic is spread over them, weights sum to
    /// [`NEXT_HOP_WEIGHT_TOTAL`].
    pub next_hops: Vec<NextHop>,
    /// Loop-free alternates that are not downstream, best first (weight 0):
    /// used only while every next hop is down, until routes are recomputed.
    pub backups: Vec<NextHop>,
}

fn approx_eq(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= TIE_TOLERANCE * a.abs().max(b.abs())
}

/// `a` is cheaper than `b` by more than the tie tolerance.
fn clearly_less(a: f64, b: f64) -> bool {
    a < b && !approx_eq(a, b)
}

#[derive(Clone, Copy, Debug)]
struct HeapEntry {
    dist: f64,
    node: usize,
}

impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.dist
            .total_cmp(&other.dist)
            .then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for HeapEntry {}

const NO_PRED: usize = usize::MAX;

/// Writes the path from the tree's root to `to` into `out`.
fn tree_path(pred: &[usize], to: usize, out: &mut Vec<usize>) {
    out.clear();
    let mut at = to;
    // A pred chain never exceeds the node count; the bound guards against a
    // bug turning into an endless loop.
    while at != NO_PRED && out.len() <= pred.len() {
        out.push(at);
        at = pred.get(at).copied().unwrap_or(NO_PRED);
    }
    out.reverse();
}

/// Dijkstra over the topology's petgraph graph with buffers kept between
/// runs: Yen and the routing table run hundreds of searches on one graph,
/// and masking nodes and edges is far cheaper than cloning the graph.
struct Search<'t> {
    topology: &'t Topology,
    costs: &'t [f64],
    dist: Vec<f64>,
    pred: Vec<usize>,
    settled: Vec<bool>,
    removed_node: Vec<bool>,
    removed_edge: Vec<bool>,
    heap: BinaryHeap<Reverse<HeapEntry>>,
    scratch_a: Vec<usize>,
    scratch_b: Vec<usize>,
}

impl<'t> Search<'t> {
    fn new(topology: &'t Topology, costs: &'t [f64]) -> Self {
        let n = topology.graph.node_count();
        Self {
            topology,
            costs,
            dist: vec![f64::INFINITY; n],
            pred: vec![NO_PRED; n],
            settled: vec![false; n],
            removed_node: vec![false; n],
            removed_edge: vec![false; topology.graph.edge_count()],
            heap: BinaryHeap::new(),
            scratch_a: Vec::new(),
            scratch_b: Vec::new(),
        }
    }

    /// Runs from `source` until `target` is settled (or everything, for
    /// `None`). Afterwards `dist`/`pred` describe, for every settled node, the
    /// cheapest path and among equally cheap ones the lexicographically
    /// smallest node sequence. That choice is consistent: the prefix of a
    /// lexicographically smallest shortest path is itself one, so fixing a
    /// node's predecessor once it is settled never loses the optimum.
    fn run(&mut self, source: usize, target: Option<usize>) {
        self.dist.fill(f64::INFINITY);
        self.pred.fill(NO_PRED);
        self.settled.fill(false);
        self.heap.clear();
        if source >= self.dist.len() || self.removed_node[source] {
            return;
        }
        self.dist[source] = 0.0;
        self.heap.push(Reverse(HeapEntry {
            dist: 0.0,
            node: source,
        }));
        let topology = self.topology;
        let graph = &topology.graph;
        while let Some(Reverse(HeapEntry { node: u, .. })) = self.heap.pop() {
            if self.settled[u] {
                continue;
            }
            self.settled[u] = true;
            if target == Some(u) {
                break;
            }
            let du = self.dist[u];
            for edge in graph.edges(NodeIndex::new(u)) {
                let v = edge.target().index();
                let e = edge.id().index();
                if self.settled[v] || self.removed_node[v] || self.removed_edge[e] {
                    continue;
                }
                let candidate = du + self.costs[e];
                let current = self.dist[v];
                let better = if current.is_infinite() || clearly_less(candidate, current) {
                    true
                } else if approx_eq(candidate, current) {
                    self.pred[v] != u && self.sequence_less(u, self.pred[v], v)
                } else {
                    false
                };
                if better {
                    self.dist[v] = candidate;
                    self.pred[v] = u;
                    self.heap.push(Reverse(HeapEntry {
                        dist: candidate,
                        node: v,
                    }));
                }
            }
        }
    }

    /// Whether path(a)+[v] < path(b)+[v] lexicographically. Appending `v`
    /// matters: when path(a) is a prefix of path(b), the next element of
    /// path(b) is compared with `v`, not with "end of sequence".
    fn sequence_less(&mut self, a: usize, b: usize, v: usize) -> bool {
        let mut pa = std::mem::take(&mut self.scratch_a);
        let mut pb = std::mem::take(&mut self.scratch_b);
        self.fill_path(a, &mut pa);
        self.fill_path(b, &mut pb);
        pa.push(v);
        pb.push(v);
        let less = pa < pb;
        self.scratch_a = pa;
        self.scratch_b = pb;
        less
    }

    fn fill_path(&self, to: usize, out: &mut Vec<usize>) {
        tree_path(&self.pred, to, out);
    }

    /// The path to `target` after a run, if it was reached.
    fn path_to(&self, target: usize) -> Option<Vec<usize>> {
        if !self.settled.get(target).copied().unwrap_or(false) {
            return None;
        }
        let mut out = Vec::new();
        self.fill_path(target, &mut out);
        Some(out)
    }

    fn shortest(&mut self, source: usize, target: usize) -> Option<Vec<usize>> {
        self.run(source, Some(target));
        self.path_to(target)
    }
}

/// Yen's algorithm over node indices; paths come with their costs, best
/// first, ties by node sequence.
fn yen(search: &mut Search<'_>, source: usize, target: usize, k: usize) -> Vec<(Vec<usize>, f64)> {
    if k == 0 {
        return Vec::new();
    }
    match search.shortest(source, target) {
        Some(first) => yen_from(search, first, k),
        None => Vec::new(),
    }
}

/// Yen's algorithm continued from the shortest path `first`, which the
/// routing table takes from one full Dijkstra instead of one per destination.
///
/// Uses Lawler's refinement: a path only spurs from its deviation index
/// onwards. For a shorter root the set of removed edges is unchanged (the
/// path leaves that root along its parent's edge, already removed), so the
/// spur search would only find the candidate that is already in the pool.
fn yen_from(search: &mut Search<'_>, first: Vec<usize>, k: usize) -> Vec<(Vec<usize>, f64)> {
    let topology = search.topology;
    let costs = search.costs;
    let mut accepted: Vec<(Vec<usize>, f64)> = Vec::new();
    let Some(&target) = first.last() else {
        return accepted;
    };
    if k == 0 {
        return accepted;
    }
    let Some(first_cost) = topology.sequence_cost(costs, &first) else {
        return accepted;
    };
    accepted.push((first, first_cost));
    let mut deviation = 0;

    // Keyed by sequence so duplicates collapse and iteration is in
    // lexicographic order, which settles cost ties. Values: cost and the
    // index of the spur node the path was found from.
    let mut candidates: BTreeMap<Vec<usize>, (f64, usize)> = BTreeMap::new();
    let mut removed_edges: Vec<usize> = Vec::new();
    while accepted.len() < k {
        let Some((last, _)) = accepted.last() else {
            break;
        };
        let last = last.clone();
        for i in deviation..last.len().saturating_sub(1) {
            let spur = last[i];
            let root = &last[..=i];
            removed_edges.clear();
            for (path, _) in &accepted {
                if path.len() > i + 1
                    && &path[..=i] == root
                    && let Some(e) = topology.find_edge(path[i], path[i + 1])
                {
                    removed_edges.push(e);
                }
            }
            for &e in &removed_edges {
                search.removed_edge[e] = true;
            }
            for &n in &root[..i] {
                search.removed_node[n] = true;
            }

            if let Some(spur_path) = search.shortest(spur, target) {
                let mut full = root[..i].to_vec();
                full.extend_from_slice(&spur_path);
                let known = candidates.contains_key(&full)
                    || accepted.iter().any(|(path, _)| *path == full);
                if !known && let Some(cost) = topology.sequence_cost(costs, &full) {
                    candidates.insert(full, (cost, i));
                }
            }

            for &e in &removed_edges {
                search.removed_edge[e] = false;
            }
            for &n in &root[..i] {
                search.removed_node[n] = false;
            }
        }

        let mut best: Option<(&Vec<usize>, f64, usize)> = None;
        for (path, &(cost, spur_index)) in &candidates {
            match best {
                Some((_, best_cost, _)) if !clearly_less(cost, best_cost) => {}
                _ => best = Some((path, cost, spur_index)),
            }
        }
        let Some((path, cost, spur_index)) = best.map(|(p, c, i)| (p.clone(), c, i)) else {
            break;
        };
        candidates.remove(&path);
        accepted.push((path, cost));
        deviation = spur_index;
    }
    accepted
}

/// The cheapest path from `source` to `target` (Dijkstra), ties broken by
/// node sequence; `None` if either is unknown or `target` is unreachable.
pub fn shortest_path(
    topology: &Topology,
    weights: &CostWeights,
    source: u64,
    target: u64,
) -> Option<Path> {
    let (s, t) = (topology.ix(source)?, topology.ix(target)?);
    let costs = topology.edge_costs(weights);
    let mut search = Search::new(topology, &costs);
    let nodes = search.shortest(s, t)?;
    let cost = topology.sequence_cost(&costs, &nodes)?;
    Some(topology.to_path(&nodes, cost))
}

/// Dijkstra (over the petgraph graph) + Yen's algorithm: up to k loopless
/// paths in increasing cost, ties by node sequence lexicographically.
///
/// Unknown endpoints or an unreachable target give no paths; `source ==
/// target` gives the single zero-cost path `[source]`.
pub fn k_shortest_paths(
    topology: &Topology,
    weights: &CostWeights,
    source: u64,
    target: u64,
    k: usize,
) -> Vec<Path> {
    let (Some(s), Some(t)) = (topology.ix(source), topology.ix(target)) else {
        return Vec::new();
    };
    let costs = topology.edge_costs(weights);
    let mut search = Search::new(topology, &costs);
    yen(&mut search, s, t, k)
        .into_iter()
        .map(|(nodes, cost)| topology.to_path(&nodes, cost))
        .collect()
}

/// Splits [`NEXT_HOP_WEIGHT_TOTAL`] in proportion to 1/cost, each share at
/// least 1, by largest remainder so the total is exact. At most
/// [`NEXT_HOP_WEIGHT_TOTAL`] costs get a share (the rest get none).
pub fn next_hop_weights(costs: &[f64]) -> Vec<u32> {
    let total = NEXT_HOP_WEIGHT_TOTAL as usize;
    let n = costs.len().min(total);
    if n == 0 {
        return Vec::new();
    }
    let costs = &costs[..n];
    // Scaling by the smallest cost keeps shares in (0, 1] so tiny costs
    // cannot overflow 1/cost to infinity.
    let min = costs
        .iter()
        .copied()
        .filter(|c| c.is_finite() && *c > 0.0)
        .fold(f64::INFINITY, f64::min);
    let shares: Vec<f64> = costs
        .iter()
        .map(|&c| {
            if min.is_finite() && c.is_finite() && c > 0.0 {
                min / c
            } else if min.is_finite() {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let share_sum: f64 = shares.iter().sum();
    // n <= total, so this cannot underflow.
    let spare = (total - n) as f64;
    let quotas: Vec<f64> = shares
        .iter()
        .map(|s| {
            if share_sum > 0.0 {
                s * spare / share_sum
            } else {
                spare / n as f64
            }
        })
        .collect();
    let mut out: Vec<u32> = quotas.iter().map(|q| 1 + q.floor() as u32).collect();
    let assigned: u32 = out.iter().sum();
    let mut leftover = NEXT_HOP_WEIGHT_TOTAL.saturating_sub(assigned);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = quotas[a] - quotas[a].floor();
        let fb = quotas[b] - quotas[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    while leftover > 0 {
        for &i in &order {
            if leftover == 0 {
                break;
            }
            out[i] += 1;
            leftover -= 1;
        }
    }
    out
}

/// Edge relaxations Yen's spur searches may cost in one routing table computation (a few
/// milliseconds per traffic class); see [`routing_table`].
pub const YEN_WORK_BUDGET: usize = 1_000_000;

/// Routes from `local` to every other reachable node: the k shortest paths;
/// next hops = the distinct first hops of those paths that are downstream
/// (RFC 5286 §3.6: dist(N, D) < dist(local, D)), best first, the first hop of
/// the best path always included; backups = the other first hops that are
/// loop-free alternates (§3.5: dist(N, D) < dist(N, local) + dist(local, D)).
/// Distances come from Dijkstra run from each neighbour N.
///
/// An unknown `local` or `k == 0` gives an empty table. The inequality must
/// hold by more than [`TIE_TOLERANCE`]: a neighbour that is only "equal" after
/// rounding might route back through us. Yen's work is capped by [`YEN_WORK_BUDGET`]:
/// past it, the remaining (farthest) destinations get their shortest path only.
pub fn routing_table(
    topology: &Topology,
    weights: &CostWeights,
    local: u64,
    k: usize,
) -> BTreeMap<u64, Route> {
    let mut table = BTreeMap::new();
    let Some(l) = topology.ix(local) else {
        return table;
    };
    if k == 0 {
        return table;
    }
    let costs = topology.edge_costs(weights);
    let mut search = Search::new(topology, &costs);

    search.run(l, None);
    let from_local = search.dist.clone();
    // The early-exit search Yen would start with settles the same nodes in
    // the same order up to the destination, so this tree's paths are
    // identical to it.
    let local_tree = search.pred.clone();
    let mut from_neighbor: HashMap<usize, Vec<f64>> = HashMap::new();
    for edge in topology.graph.edges(NodeIndex::new(l)) {
        let n = edge.target().index();
        search.run(n, None);
        from_neighbor.insert(n, search.dist.clone());
    }

    // Yen's spur searches cost about (k − 1) × path length Dijkstras per destination. A member
    // can advertise a dense graph of invented nodes that makes that take seconds on the
    // control thread, so the work is budgeted: destinations nearest first get k paths while
    // the budget lasts, the rest their shortest path only. Same database, same order, same
    // table on every node.
    let edges = topology.graph.edge_count().max(1);
    let mut budget = YEN_WORK_BUDGET;
    let mut destinations: Vec<usize> = (0..topology.graph.node_count())
        .filter(|&d| d != l && from_local[d].is_finite())
        .collect();
    destinations.sort_by(|&a, &b| {
        from_local[a]
            .total_cmp(&from_local[b])
            .then_with(|| topology.id(a).cmp(&topology.id(b)))
    });
    for d in destinations {
        let mut first = Vec::new();
        tree_path(&local_tree, d, &mut first);
        if first.first() != Some(&l) {
            continue;
        }
        let work = (k.saturating_sub(1) * first.len()).saturating_mul(edges);
        let paths = if work <= budget {
            budget -= work;
            yen_from(&mut search, first, k)
        } else {
            yen_from(&mut search, first, 1)
        };
        let mut hops: Vec<(usize, f64)> = Vec::new();
        let mut backups: Vec<(usize, f64)> = Vec::new();
        for (index, (nodes, cost)) in paths.iter().enumerate() {
            let Some(&peer) = nodes.get(1) else {
                continue;
            };
            if hops.iter().chain(&backups).any(|&(p, _)| p == peer) {
                continue;
            }
            let dist_n = from_neighbor.get(&peer);
            // Downstream (RFC 5286 §3.6): the neighbour is strictly closer to the destination.
            // If every node spreads only over downstream neighbours, distance falls at each hop,
            // so multipath can never loop.
            let downstream =
                index == 0 || dist_n.is_some_and(|dist_n| clearly_less(dist_n[d], from_local[d]));
            // Loop-free alternate (§3.5): the neighbour's own shortest path avoids us. Safe as a
            // backup when the primary hops fail, not for spreading traffic.
            let loop_free =
                dist_n.is_some_and(|dist_n| clearly_less(dist_n[d], dist_n[l] + from_local[d]));
            if downstream {
                hops.push((peer, *cost));
            } else if loop_free {
                backups.push((peer, *cost));
            }
        }
        let hop_costs: Vec<f64> = hops.iter().map(|&(_, c)| c).collect();
        let next_hops = hops
            .iter()
            .zip(next_hop_weights(&hop_costs))
            .map(|(&(peer, cost), weight)| NextHop {
                peer: topology.id(peer),
                cost,
                weight,
            })
            .collect();
        let destination = topology.id(d);
        table.insert(
            destination,
            Route {
                destination,
                paths: paths
                    .iter()
                    .map(|(nodes, cost)| topology.to_path(nodes, *cost))
                    .collect(),
                next_hops,
                backups: backups
                    .iter()
                    .map(|&(peer, cost)| NextHop {
                        peer: topology.id(peer),
                        cost,
                        weight: 0,
                    })
                    .collect(),
            },
        );
    }
    table
}
