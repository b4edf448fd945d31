//! Routing on the control core: the link-state database, path computation and publication of
//! forwarding tables to the shards.
//!
//! ```text
//!  shards ──LinkUp/LinkDown/Routing frames──► Lsdb (flooding) ──changed──► debounce
//!  metrics poll (every period) ──► LinkMeters ──► Lsdb::handle_metrics (hysteresis)
//!  debounce expired ──► Topology::from_lsas ──► routing_table (Dijkstra + Yen, LFA next hops)
//!                   ──► Fib (Arc) ──ShardInput::Fib──► every shard;  RoutingSnapshot ──► api
//! ```
//! Everything here is synchronous; the control loop feeds it inputs and drains its outputs.
//!
//! Bounds: ids and addresses arrive in LSAs that any member writes, so the tables kept beside
//! the LSDB follow it: listen addresses only of origins the LSDB holds (or neighbours), at most
//! [`MAX_LISTEN_ADDRS`]; known ids (what makes a destination `PENDING_NODE` rather than
//! `UNDELIVERABLE`) at most [`MAX_KNOWN_IDS`], past which ids neither remembered from the
//! control database, nor neighbours, nor held in the LSDB are forgotten.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use meshd_proto::link::{
    AdjacencyMsg, LinkMetricsMsg, LsaAck, LsaMsg, RoutingMessage, routing_message,
};
use meshd_shards::{
    fib::{Fib, FibEntry, FibHop},
    frame::TrafficClass,
};
use prost::Message;

use super::{
    lsdb::{FloodMessage, Lsdb, LsdbConfig, MAX_ORIGINS},
    paths::{CostWeights, Route, Topology, routing_table},
    types::{Adjacency, LinkMetrics, Lsa, Refusals},
};

/// The most listen addresses kept: one per origin the LSDB can hold. An address of an origin
/// the LSDB refused is not kept either.
pub const MAX_LISTEN_ADDRS: usize = MAX_ORIGINS;

/// The most ids known as nodes of the mesh. The api's own known-nodes view holds 65 536 ids
/// and rebuilds itself from this set, so a larger set would be cut there anyway; 16 times the
/// LSDB bound keeps recently expired origins known (`PENDING_NODE` while they may come back)
/// through many rounds of an invented-id flood.
pub const MAX_KNOWN_IDS: usize = 65_536;

/// Ids remembered from the control database at start; the rest of [`MAX_KNOWN_IDS`] is left
/// for what the mesh shows at run time.
const MAX_REMEMBERED_IDS: usize = MAX_KNOWN_IDS / 2;

/// What the api shows of routing (GetRoutingTable, GetTopology, broadcast targets).
#[derive(Clone, Debug, Default)]
pub struct RoutingSnapshot {
    /// This node.
    pub local: u64,
    /// Increments with every recomputation.
    pub epoch: u64,
    /// Routes to every reachable node, by destination.
    pub routes: Vec<RouteView>,
    /// Direct neighbours, linked now or in the past.
    pub neighbors: Vec<NeighborView>,
    /// Every node in the link-state database.
    pub nodes: Vec<u64>,
    /// Directed links both ends advertise: (from, to, metrics).
    pub links: Vec<(u64, u64, LinkMetrics)>,
}

/// One destination.
#[derive(Clone, Debug)]
pub struct RouteView {
    /// The destination.
    pub destination: u64,
    /// Next hops and their weights (sum 1000), best first.
    pub next_hops: Vec<(u64, u32)>,
    /// Cost of the best path.
    pub cost: f64,
    /// The k shortest paths, best first.
    pub paths: Vec<Vec<u64>>,
}

/// One direct neighbour.
#[derive(Clone, Debug)]
pub struct NeighborView {
    /// Its node id.
    pub node_id: u64,
    /// Its address on the link (or where it listens).
    pub addr: String,
    /// Whether the link is up.
    pub connected: bool,
}

/// Routing settings.
#[derive(Clone, Debug)]
pub struct RoutingConfig {
    /// Paths computed per destination (Yen's k).
    pub k_paths: usize,
    /// Wait after a database change before recomputing, so a burst costs one computation.
    pub debounce: Duration,
    /// Cost coefficients.
    pub weights: CostWeights,
    /// Traffic classes that route by their own coefficients.
    pub class_weights: Vec<(TrafficClass, CostWeights)>,
    /// Flooding timers and hysteresis.
    pub lsdb: LsdbConfig,
}

/// The routing state of one node.
pub struct Routing {
    config: RoutingConfig,
    lsdb: Lsdb,
    local: u64,
    local_listen: String,
    listen_addrs: HashMap<u64, String>,
    neighbors: BTreeMap<u64, (String, bool)>,
    known: HashSet<u64>,
    /// Peers from the control database: never forgotten while the node runs.
    remembered: HashSet<u64>,
    refused_addrs: Refusals,
    forgotten_ids: Refusals,
    recompute_at: Option<Instant>,
    epoch: u64,
    snapshot: Arc<RoutingSnapshot>,
}

impl Routing {
    /// Routing for `local`, which accepts links at `local_listen` ("" behind NAT).
    pub fn new(local: u64, local_listen: String, config: RoutingConfig, now: Instant) -> Self {
        let lsdb = Lsdb::new(local, config.lsdb.clone(), now);
        Self {
            config,
            lsdb,
            local,
            local_listen,
            listen_addrs: HashMap::new(),
            neighbors: BTreeMap::new(),
            known: HashSet::new(),
            remembered: HashSet::new(),
            refused_addrs: Refusals::default(),
            forgotten_ids: Refusals::default(),
            recompute_at: Some(now),
            epoch: 0,
            snapshot: Arc::new(RoutingSnapshot {
                local,
                ..RoutingSnapshot::default()
            }),
        }
    }

    /// Nodes remembered from earlier runs count as known (PENDING_NODE, not UNDELIVERABLE).
    pub fn remember(&mut self, nodes: impl IntoIterator<Item = u64>) {
        for node in nodes {
            if self.remembered.len() >= MAX_REMEMBERED_IDS {
                self.forgotten_ids.record("remembered ids", node);
                continue;
            }
            self.remembered.insert(node);
            self.known.insert(node);
        }
    }

    /// A direct link came up.
    pub fn handle_link_up(&mut self, now: Instant, peer: u64, addr: SocketAddr, listen_addr: &str) {
        self.neighbors.insert(peer, (addr.to_string(), true));
        if is_listen_addr(listen_addr) {
            // A neighbour's address is always kept (it is bounded by links, not by LSAs).
            self.listen_addrs.insert(peer, listen_addr.to_owned());
        }
        self.known.insert(peer);
        self.lsdb.handle_link_up(now, peer, LinkMetrics::default());
        self.after_input(now);
    }

    /// A direct link went down.
    pub fn handle_link_down(&mut self, now: Instant, peer: u64) {
        if let Some(entry) = self.neighbors.get_mut(&peer) {
            entry.1 = false;
        }
        self.lsdb.handle_link_down(now, peer);
        self.after_input(now);
    }

    /// New measurements of a direct link.
    pub fn handle_metrics(&mut self, now: Instant, peer: u64, metrics: LinkMetrics) {
        self.lsdb.handle_metrics(now, peer, metrics);
        self.after_input(now);
    }

    /// A routing frame from a direct neighbour; malformed ones are dropped.
    pub fn handle_frame(&mut self, now: Instant, from: u64, payload: &Bytes) -> bool {
        let Ok(message) = RoutingMessage::decode(payload.as_ref()) else {
            return false;
        };
        let mut listen = None;
        let flood = match message.body {
            Some(routing_message::Body::Lsa(mut lsa)) => {
                if is_listen_addr(&lsa.listen_addr) && lsa.origin != 0 && lsa.origin != self.local {
                    listen = Some((lsa.origin, lsa.seq, std::mem::take(&mut lsa.listen_addr)));
                }
                let age = Duration::from_millis(lsa.age_ms);
                FloodMessage::Lsa {
                    lsa: lsa_from_msg(lsa),
                    age,
                }
            }
            Some(routing_message::Body::Ack(ack)) => FloodMessage::Ack {
                origin: ack.origin,
                seq: ack.seq,
            },
            None => return false,
        };
        self.lsdb.handle_message(now, from, flood);
        // Only the address of an LSA the database kept: a refused origin leaves no trace.
        if let Some((origin, seq, addr)) = listen
            && self.lsdb.get(origin).is_some_and(|held| held.seq == seq)
        {
            self.note_listen_addr(origin, addr);
        }
        self.after_input(now);
        true
    }

    fn note_listen_addr(&mut self, origin: u64, addr: String) {
        let full = self.listen_addrs.len() >= MAX_LISTEN_ADDRS;
        if full && !self.listen_addrs.contains_key(&origin) {
            // Addresses of origins that left the LSDB make room first.
            self.prune_listen_addrs();
            if self.listen_addrs.len() >= MAX_LISTEN_ADDRS {
                self.refused_addrs.record("listen addresses", origin);
                return;
            }
        }
        self.listen_addrs.insert(origin, addr);
    }

    fn prune_listen_addrs(&mut self) {
        let lsdb = &self.lsdb;
        let neighbors = &self.neighbors;
        self.listen_addrs
            .retain(|id, _| neighbors.contains_key(id) || lsdb.get(*id).is_some());
    }

    /// Membership says `node` left or was evicted: its LSA goes now, not at max age, and with
    /// it its address and, unless linked now, its neighbour entry.
    pub fn handle_member_gone(&mut self, now: Instant, node: u64) {
        self.lsdb.purge(node);
        self.listen_addrs.remove(&node);
        if self.neighbors.get(&node).is_some_and(|(_, up)| !*up) {
            self.neighbors.remove(&node);
        }
        self.after_input(now);
    }

    /// A live change of the default class's cost coefficients or of k: the table is
    /// recomputed (debounced) with them.
    pub fn reconfigure(&mut self, now: Instant, change: impl FnOnce(&mut RoutingConfig)) {
        change(&mut self.config);
        if self.recompute_at.is_none() {
            self.recompute_at = Some(now + self.config.debounce);
        }
    }

    /// Timers of the database and the recomputation.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.lsdb.handle_timeout(now);
        self.after_input(now);
    }

    fn after_input(&mut self, now: Instant) {
        if self.lsdb.take_changed() && self.recompute_at.is_none() {
            self.recompute_at = Some(now + self.config.debounce);
        }
    }

    /// Next routing frame to send: (neighbour, encoded `RoutingMessage`).
    pub fn poll_transmit(&mut self) -> Option<(u64, Bytes)> {
        let (to, message) = self.lsdb.poll_transmit()?;
        let body = match message {
            FloodMessage::Lsa { lsa, age } => {
                let listen_addr = if lsa.origin == self.local {
                    self.local_listen.clone()
                } else {
                    self.listen_addrs
                        .get(&lsa.origin)
                        .cloned()
                        .unwrap_or_default()
                };
                routing_message::Body::Lsa(lsa_to_msg(&lsa, age, listen_addr))
            }
            FloodMessage::Ack { origin, seq } => routing_message::Body::Ack(LsaAck { origin, seq }),
        };
        let encoded = RoutingMessage { body: Some(body) }.encode_to_vec();
        Some((to, encoded.into()))
    }

    /// When [`Self::handle_timeout`] or [`Self::poll_fib`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.lsdb.poll_timeout(), self.recompute_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A new forwarding table, when a debounced recomputation is due.
    pub fn poll_fib(&mut self, now: Instant) -> Option<Arc<Fib>> {
        let due = self.recompute_at.is_some_and(|at| at <= now);
        if !due {
            return None;
        }
        self.recompute_at = None;
        Some(self.recompute())
    }

    fn recompute(&mut self) -> Arc<Fib> {
        self.epoch += 1;
        let topology = Topology::from_lsas(self.lsdb.lsas());
        let table = routing_table(
            &topology,
            &self.config.weights,
            self.local,
            self.config.k_paths,
        );
        self.known.extend(self.lsdb.lsas().map(|l| l.origin));
        if self.known.len() > MAX_KNOWN_IDS {
            self.forget_known_ids();
        }
        let entries = fib_entries(&table);
        let mut routes = Vec::with_capacity(table.len());
        for (destination, route) in &table {
            if route.next_hops.is_empty() {
                continue;
            }
            let cost = route.paths.first().map_or(0.0, |p| p.cost);
            routes.push(RouteView {
                destination: *destination,
                next_hops: route.next_hops.iter().map(|h| (h.peer, h.weight)).collect(),
                cost,
                paths: route.paths.iter().map(|p| p.nodes.clone()).collect(),
            });
        }
        let mut links = Vec::new();
        for lsa in self.lsdb.lsas() {
            for adjacency in &lsa.adjacencies {
                let reverse = self.lsdb.get(adjacency.neighbor).is_some_and(|other| {
                    other.adjacencies.iter().any(|a| a.neighbor == lsa.origin)
                });
                if reverse {
                    links.push((lsa.origin, adjacency.neighbor, adjacency.metrics));
                }
            }
        }
        self.snapshot = Arc::new(RoutingSnapshot {
            local: self.local,
            epoch: self.epoch,
            routes,
            neighbors: self
                .neighbors
                .iter()
                .map(|(id, (addr, connected))| NeighborView {
                    node_id: *id,
                    addr: addr.clone(),
                    connected: *connected,
                })
                .collect(),
            nodes: self.lsdb.lsas().map(|l| l.origin).collect(),
            links,
        });
        let mut fib = Fib::new(self.epoch, entries, self.known.clone());
        for (class, weights) in &self.config.class_weights {
            if *weights != self.config.weights {
                let table = routing_table(&topology, weights, self.local, self.config.k_paths);
                fib = fib.with_class(*class, fib_entries(&table));
            }
        }
        Arc::new(fib)
    }

    /// Past [`MAX_KNOWN_IDS`]: keeps remembered ids, neighbours and origins in the LSDB, and
    /// forgets ids only seen in LSAs that have since expired.
    fn forget_known_ids(&mut self) {
        let before = self.known.len();
        let (lsdb, neighbors, remembered) = (&self.lsdb, &self.neighbors, &self.remembered);
        self.known.retain(|id| {
            remembered.contains(id) || neighbors.contains_key(id) || lsdb.get(*id).is_some()
        });
        let forgotten = before - self.known.len();
        self.forgotten_ids
            .record_many("known ids", forgotten as u64);
        self.prune_listen_addrs();
    }

    /// Ids known as nodes of the mesh.
    pub fn known_ids(&self) -> usize {
        self.known.len()
    }

    /// Listen addresses refused at [`MAX_LISTEN_ADDRS`] and ids forgotten at
    /// [`MAX_KNOWN_IDS`].
    pub fn refusals(&self) -> (u64, u64) {
        (self.refused_addrs.count(), self.forgotten_ids.count())
    }

    /// The latest view for the api.
    pub fn snapshot(&self) -> Arc<RoutingSnapshot> {
        Arc::clone(&self.snapshot)
    }

    /// Where nodes of the mesh listen, for EstablishFullLinks.
    pub fn listen_addrs(&self) -> &HashMap<u64, String> {
        &self.listen_addrs
    }

    /// The seq of the LSA of `origin` held in the database.
    pub fn lsa_seq(&self, origin: u64) -> Option<u64> {
        self.lsdb.get(origin).map(|lsa| lsa.seq)
    }

    /// Whether `peer` has a live direct link.
    pub fn is_linked(&self, peer: u64) -> bool {
        self.neighbors.get(&peer).is_some_and(|(_, up)| *up)
    }
}

/// A listen address worth keeping: a socket address (which also bounds its length). Anything
/// else ("" behind NAT, or junk) is not dialable.
fn is_listen_addr(addr: &str) -> bool {
    addr.len() <= 64 && addr.parse::<SocketAddr>().is_ok()
}

fn fib_entries(table: &BTreeMap<u64, Route>) -> HashMap<u64, FibEntry> {
    table
        .iter()
        .filter(|(_, route)| !route.next_hops.is_empty())
        .map(|(destination, route)| {
            let cost = route.paths.first().map_or(0.0, |p| p.cost);
            let entry = FibEntry {
                hops: route
                    .next_hops
                    .iter()
                    .map(|h| FibHop {
                        peer: h.peer,
                        weight: h.weight,
                    })
                    .collect(),
                backups: route.backups.iter().map(|h| h.peer).collect(),
                cost_milli: (cost * 1000.0) as u64,
            };
            (*destination, entry)
        })
        .collect()
}

fn lsa_to_msg(lsa: &Lsa, age: Duration, listen_addr: String) -> LsaMsg {
    LsaMsg {
        age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        origin: lsa.origin,
        seq: lsa.seq,
        adjacencies: lsa
            .adjacencies
            .iter()
            .map(|a| AdjacencyMsg {
                neighbor: a.neighbor,
                metrics: Some(LinkMetricsMsg {
                    rtt_us: a.metrics.rtt_us,
                    loss_ppm: a.metrics.loss_ppm,
                    utilisation_ppm: a.metrics.utilisation_ppm,
                    bandwidth_bps: a.metrics.bandwidth_bps,
                }),
            })
            .collect(),
        listen_addr,
        ..LsaMsg::default()
    }
}

fn lsa_from_msg(msg: LsaMsg) -> Lsa {
    Lsa {
        origin: msg.origin,
        seq: msg.seq,
        adjacencies: msg
            .adjacencies
            .into_iter()
            .map(|a| {
                let m = a.metrics.unwrap_or_default();
                Adjacency {
                    neighbor: a.neighbor,
                    metrics: LinkMetrics {
                        rtt_us: m.rtt_us,
                        loss_ppm: m.loss_ppm.min(1_000_000),
                        utilisation_ppm: m.utilisation_ppm.min(1_000_000),
                        bandwidth_bps: m.bandwidth_bps,
                    },
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoutingConfig {
        RoutingConfig {
            k_paths: 1,
            debounce: Duration::from_millis(20),
            weights: CostWeights::default(),
            class_weights: Vec::new(),
            lsdb: LsdbConfig {
                max_age: Duration::from_secs(10),
                ..LsdbConfig::default()
            },
        }
    }

    fn lsa_frame(origin: u64, listen_addr: String) -> Bytes {
        let lsa = LsaMsg {
            age_ms: 0,
            origin,
            seq: 1,
            adjacencies: Vec::new(),
            listen_addr,
            ..LsaMsg::default()
        };
        RoutingMessage {
            body: Some(routing_message::Body::Lsa(lsa)),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn invented_ids_never_grow_known_ids_or_listen_addresses_past_their_bounds() {
        let t0 = Instant::now();
        let mut routing = Routing::new(1, "127.0.0.1:7001".into(), config(), t0);
        routing.remember([50, 51]);
        let link: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        routing.handle_link_up(t0, 2, link, "127.0.0.1:7002");
        let mut now = t0;
        let mut next = 1_000_000u64;
        // Neighbour 2 floods rounds of invented origins with addresses; each round ages out
        // before the next, so over the rounds far more ids pass than either bound.
        let rounds = MAX_KNOWN_IDS / MAX_ORIGINS + 4;
        for _ in 0..rounds {
            for _ in 0..MAX_ORIGINS {
                let addr = format!(
                    "10.{}.{}.{}:7000",
                    (next >> 16) & 255,
                    (next >> 8) & 255,
                    next & 255
                );
                assert!(routing.handle_frame(now, 2, &lsa_frame(next, addr)));
                next += 1;
            }
            // An address that is no address is not kept, however long.
            routing.handle_frame(now, 2, &lsa_frame(next, "x".repeat(10_000)));
            next += 1;
            while routing.poll_transmit().is_some() {}
            now += Duration::from_millis(30);
            routing.handle_timeout(now);
            assert!(routing.poll_fib(now).is_some());
            assert!(
                routing.known_ids() <= MAX_KNOWN_IDS,
                "{}",
                routing.known_ids()
            );
            assert!(routing.listen_addrs().len() <= MAX_LISTEN_ADDRS);
            now += Duration::from_secs(11);
            routing.handle_timeout(now);
        }
        assert!(next - 1_000_000 > MAX_KNOWN_IDS as u64);
        let (_, forgotten) = routing.refusals();
        assert!(forgotten > 0, "the known-id bound was reached");
        for kept in [2, 50, 51] {
            assert!(routing.known.contains(&kept), "{kept} forgotten");
        }
        assert_eq!(
            routing.listen_addrs().get(&2).map(String::as_str),
            Some("127.0.0.1:7002"),
            "the neighbour's address is kept"
        );
        assert!(
            routing.listen_addrs().values().all(|a| a.len() <= 64),
            "only socket addresses"
        );
    }

    #[test]
    fn a_departed_member_leaves_no_address_or_stale_neighbour_behind() {
        let t0 = Instant::now();
        let mut routing = Routing::new(1, String::new(), config(), t0);
        let link: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        routing.handle_link_up(t0, 2, link, "127.0.0.1:7002");
        routing.handle_link_up(t0, 3, link, "127.0.0.1:7003");
        routing.handle_frame(t0, 2, &lsa_frame(9, "127.0.0.1:7009".into()));
        routing.handle_link_down(t0, 3);
        for gone in [3, 9] {
            routing.handle_member_gone(t0, gone);
        }
        let mut addrs: Vec<u64> = routing.listen_addrs().keys().copied().collect();
        addrs.sort_unstable();
        assert_eq!(addrs, vec![2]);
        assert!(!routing.neighbors.contains_key(&3));
        assert!(routing.is_linked(2));
    }
}
