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
    lsdb::{FloodMessage, Lsdb, LsdbConfig},
    paths::{CostWeights, Route, Topology, routing_table},
    types::{Adjacency, LinkMetrics, Lsa},
};

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
        self.known.extend(nodes);
    }

    /// A direct link came up.
    pub fn handle_link_up(&mut self, now: Instant, peer: u64, addr: SocketAddr, listen_addr: &str) {
        self.neighbors.insert(peer, (addr.to_string(), true));
        if !listen_addr.is_empty() {
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
        let flood = match message.body {
            Some(routing_message::Body::Lsa(lsa)) => {
                if !lsa.listen_addr.is_empty() && lsa.origin != 0 && lsa.origin != self.local {
                    self.listen_addrs
                        .insert(lsa.origin, lsa.listen_addr.clone());
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
        self.after_input(now);
        true
    }

    /// Membership says `node` left or was evicted: its LSA goes now, not at max age.
    pub fn handle_member_gone(&mut self, now: Instant, node: u64) {
        self.lsdb.purge(node);
        self.after_input(now);
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

    /// The latest view for the api.
    pub fn snapshot(&self) -> Arc<RoutingSnapshot> {
        Arc::clone(&self.snapshot)
    }

    /// Where nodes of the mesh listen, for EstablishFullLinks.
    pub fn listen_addrs(&self) -> &HashMap<u64, String> {
        &self.listen_addrs
    }

    /// Whether `peer` has a live direct link.
    pub fn is_linked(&self, peer: u64) -> bool {
        self.neighbors.get(&peer).is_some_and(|(_, up)| *up)
    }
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
