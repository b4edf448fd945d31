//! The shard runtime: one glommio executor per shard thread, owning the links of its peers.
//!
//! A shard runs three kinds of tasks, all on its own thread:
//! - the **input loop**, draining the shard's one inbound ring ([`ShardInput`]) in order;
//! - the **acceptor**, when the node listens: every shard binds the listen address with
//!   `SO_REUSEPORT`, so the kernel spreads incoming connections over the shards;
//! - one **link task** per peer connection (set-up, then `link::run`).
//!
//! The acceptor and the link tasks' set-up live in [`connect`]; this file is the thread, its
//! input loop and the forwarding of frames.
//!
//! **Architecture Invariant:** a shard's state is touched only by its own thread (`Rc`,
//! `RefCell`, `Cell`); other threads reach it only through its ring.
//! **Architecture Invariant:** at most one live link per peer; when two connections to the same
//! peer race, both ends keep the one dialed by the lower node id (or the newer one if the peer
//! restarted, seen by its boot id).

mod connect;
mod parked;
mod relay;
mod salvage;

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    os::fd::{FromRawFd, IntoRawFd},
    rc::Rc,
    sync::{Arc, atomic::AtomicUsize, mpsc},
    thread,
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;
use glommio::{
    LocalExecutorBuilder, Placement,
    net::{TcpListener, TcpStream},
};
use rustls::{ClientConfig, ServerConfig};

use bytes::Bytes;

use crate::{
    command::{ApiEvent, ApiLanes, ControlEvent, Forwarded, Outgoing, SendFailure, ShardInput},
    congestion::Congestion,
    fib::{Fib, Spread, flow_key},
    frame::{FrameType, Header},
    handle::{ShardHandle, ShardRings, shard_rings},
    handshake::{LocalHello, PeerInfo},
    link::{self, Lane, Outbox, OutboxError},
    origin::{KeyBook, KeyCache, OpenError},
    ownership::owner_shard,
    ring::{Producer, PushError},
    stats::LinkStats,
};

/// How long the shards may take to start (executor, rings, listener) before the node gives up.
const SHARD_START_LIMIT: Duration = Duration::from_secs(15);

/// Everything a shard needs to know; shared read-only by every shard.
#[derive(Clone)]
pub struct ShardConfig {
    /// This node's Hello fields.
    pub local: LocalHello,
    /// This node's identity key.
    pub signing_key: SigningKey,
    /// TLS config for accepted links.
    pub tls_server: Arc<ServerConfig>,
    /// TLS config for dialed links.
    pub tls_client: Arc<ClientConfig>,
    /// Where to accept links; `None` for a node behind NAT that only dials out.
    pub listen: Option<SocketAddr>,
    /// Number of shards.
    pub n_shards: usize,
    /// Pin shard `i` to CPU `i`.
    pub pin_cores: bool,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals without any traffic before a link is declared down.
    pub heartbeat_misses: u32,
    /// Largest frame payload accepted or sent.
    pub max_payload_bytes: usize,
    /// Bytes queued per link before data senders wait.
    pub link_queue_bytes: usize,
    /// Bytes a connection may have written unconfirmed by its peer (`link::Unconfirmed`).
    pub lane_window_bytes: usize,
    /// Limit on TCP connect plus TLS, WebSocket and link handshakes.
    pub handshake_timeout: Duration,
    /// Longest a write to a link may make no progress before the link is closed.
    pub write_timeout: Duration,
    /// Connections in set-up on the whole node (all shards together); more are closed at once.
    pub max_pending_handshakes: usize,
    /// Capacity of each shard's inbound ring, in inputs.
    pub ring_capacity: usize,
    /// io_uring buffer memory per shard, in bytes.
    pub io_memory_bytes: usize,
    /// Peers this node has linked with before, and their keys (trust on first use).
    pub known_peers: Vec<(u64, [u8; 32])>,
    /// Pair keys with every certified node, published by the control thread: routed frames
    /// addressed here are opened with them (`origin`).
    pub key_book: Arc<KeyBook>,
}

impl ShardConfig {
    /// Largest WebSocket message accepted: a full batch plus one maximal frame. Batches are
    /// cut at a protocol constant, not at the (per-node) queue bound, so peers with different
    /// queue settings still fit each other's limit.
    pub fn max_message_bytes(&self) -> usize {
        link::MAX_BATCH_BYTES + self.max_payload_bytes + crate::frame::HEADER_LEN
    }

    /// Longest a relayed frame waits for room at its next hop before it is dropped and
    /// counted. Half the write deadline: the upstream peer's write to this node (whose reader
    /// is the one waiting) must not reach its own deadline because of a stall further on.
    pub fn relay_wait(&self) -> Duration {
        self.write_timeout / 2
    }
}

/// Why the shards could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A shard could not bind the listen address.
    #[error("shard {shard} could not listen on {addr}: {source}")]
    Listen {
        /// The shard.
        shard: usize,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The executor thread could not be created.
    #[error("shard {shard} could not start its executor: {reason}")]
    Executor {
        /// The shard.
        shard: usize,
        /// glommio's error.
        reason: String,
    },
}

/// Running shards: their inbound rings and threads.
pub struct Shards {
    inputs: Vec<ShardHandle>,
    congestion: Arc<Congestion>,
    threads: Vec<thread::JoinHandle<()>>,
    listen_addr: Option<SocketAddr>,
    watchdog: crate::watchdog::Watchdog,
}

impl Shards {
    /// Starts `config.n_shards` shard threads; returns once every shard listens (if it should).
    pub fn start(
        config: ShardConfig,
        control_tx: Producer<ControlEvent>,
        api_tx: ApiLanes,
    ) -> Result<Self, StartError> {
        let n = config.n_shards.max(1);
        let congestion = Arc::new(Congestion::default());
        let forwards = Arc::new(Congestion::default());
        let (inputs, consumers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| {
                shard_rings(
                    config.ring_capacity,
                    Arc::clone(&congestion),
                    Arc::clone(&forwards),
                )
            })
            .unzip();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let watchdog = crate::watchdog::Watchdog::new(n);
        let config = Arc::new(config);
        let (ready_tx, ready_rx) =
            mpsc::channel::<(usize, Result<Option<SocketAddr>, StartError>)>();
        let mut threads = Vec::with_capacity(n);
        for (shard_id, consumer) in consumers.into_iter().enumerate() {
            let config = Arc::clone(&config);
            let control_tx = control_tx.clone();
            let api_tx = api_tx.clone();
            let peers = inputs.clone();
            let ready_tx = ready_tx.clone();
            let handshakes = Arc::clone(&handshakes);
            let congestion = Arc::clone(&congestion);
            let forwards = Arc::clone(&forwards);
            let beat = watchdog.beat(shard_id);
            let placement = if config.pin_cores {
                Placement::Fixed(shard_id % num_cpus())
            } else {
                Placement::Unbound
            };
            let builder = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{shard_id}"))
                .io_memory(config.io_memory_bytes);
            let handle = builder
                .spawn(move || async move {
                    let wiring = Wiring {
                        inbound: consumer,
                        peers,
                        control_tx,
                        api_tx,
                        handshakes,
                        congestion,
                        forwards,
                        beat,
                    };
                    shard_main(shard_id, config, wiring, ready_tx).await;
                })
                .map_err(|e| StartError::Executor {
                    shard: shard_id,
                    reason: e.to_string(),
                })?;
            threads.push(thread::spawn(move || {
                if let Err(e) = handle.join() {
                    tracing::error!(shard_id, error = %e, "shard executor failed");
                }
            }));
        }
        drop(ready_tx);
        let mut listen_addr = None;
        let mut started = vec![false; n];
        let deadline = Instant::now() + SHARD_START_LIMIT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok((shard, Ok(addr))) => {
                    started[shard] = true;
                    listen_addr = listen_addr.or(addr);
                }
                Ok((_, Err(e))) => return Err(e),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // A node that hangs in start-up is worse than one that fails: say which.
                    let shard = started.iter().position(|s| !s).unwrap_or(0);
                    return Err(StartError::Executor {
                        shard,
                        reason: format!("did not start within {SHARD_START_LIMIT:?}"),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(StartError::Executor {
                        shard: 0,
                        reason: "a shard thread exited during start-up".into(),
                    });
                }
            }
        }
        tracing::debug!(shards = n, "shards started");
        watchdog.start();
        Ok(Self {
            inputs,
            congestion,
            threads,
            listen_addr,
            watchdog,
        })
    }

    /// The inbound ring of every shard, indexed by shard id.
    pub fn inputs(&self) -> &[ShardHandle] {
        &self.inputs
    }

    /// Bytes on their way out per destination on every shard: the api holds back a congested
    /// destination's callers (see `congestion`).
    pub fn congestion(&self) -> Arc<Congestion> {
        Arc::clone(&self.congestion)
    }

    /// The ring of the shard that owns `peer`.
    pub fn owner_of(&self, peer: u64) -> &ShardHandle {
        &self.inputs[owner_shard(peer, self.inputs.len())]
    }

    /// The address the shards accept links on, if any (resolves port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// Tells every shard to say goodbye to its peers, then waits for the shard threads.
    pub fn shutdown(self) {
        self.watchdog.stop();
        for input in &self.inputs {
            let _ = input.try_push(ShardInput::Shutdown);
        }
        drop(self.inputs);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn num_cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// One live link as the shard sees it.
struct LinkEntry {
    conn_id: u64,
    peer: PeerInfo,
    dialer: u64,
    outbox: Rc<Outbox>,
    /// The data lane's figures (the link's first connection).
    stats: Rc<LinkStats>,
    /// Each side lane's figures while it is attached, indexed by [`Lane`] (the data slot
    /// stays empty: `stats` is the data lane's).
    side: [Option<Rc<LinkStats>>; 3],
}

/// State and rings of one shard; shared by its tasks through `Rc`.
pub(crate) struct Shard {
    pub(crate) shard_id: usize,
    pub(crate) config: Arc<ShardConfig>,
    pub(crate) api_tx: ApiLanes,
    pub(crate) epoch: Instant,
    control_tx: Producer<ControlEvent>,
    peers: Vec<ShardHandle>,
    links: RefCell<HashMap<u64, LinkEntry>>,
    known: RefCell<HashSet<u64>>,
    pinned: RefCell<HashMap<u64, [u8; 32]>>,
    next_conn_id: Cell<u64>,
    /// Connections in set-up on every shard of the node: the bound is per node, so a flood
    /// cannot take `max_pending_handshakes` on each shard.
    handshakes: Arc<AtomicUsize>,
    drops: RefCell<BTreeMap<&'static str, u64>>,
    /// Frames routed again because their next hop went down on the way.
    reroutes: Cell<u64>,
    stopping: Cell<bool>,
    fib: RefCell<Arc<Fib>>,
    /// This thread's copy of the pair keys (`config.key_book`).
    pub(crate) keys: RefCell<KeyCache>,
    /// Where this shard's listener is bound, told to peers in the Hello.
    bound_listen: Cell<Option<SocketAddr>>,
    round_robin: Cell<u64>,
    /// The mesh this node belongs to now ("" = none yet); starts as `config.local.mesh_id`.
    mesh_id: RefCell<String>,
    /// This node's certificate and its mesh authority's public key (see `credential`).
    credential: RefCell<(Vec<u8>, Option<[u8; 32]>)>,
    /// Bytes of the send lane per destination (released once a frame leaves the send task).
    congestion: Arc<Congestion>,
    /// Bytes of the fwd lanes per next hop (released once a frame leaves its fwd task).
    forwards: Arc<Congestion>,
    /// Frames of the send task waiting for a congested destination.
    parked_sends: parked::Parked<Outgoing>,
    /// Frames of the fwd task waiting for a congested next hop.
    parked_forwards: parked::Parked<Forwarded>,
    /// The task queue control lanes, the ctl loop and the watchdog pulse run in: four times the
    /// default shares, so the executor picks it first whenever it picks a queue.
    pub(crate) control_queue: glommio::TaskQueueHandle,
}

/// Why a frame could not be handed on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// No live next hop towards the destination.
    NoRoute,
    /// The chosen link closed under us.
    LinkClosed,
    /// The next hop had no room within the allowed wait.
    Congested,
    /// Written to a link that broke before its peer confirmed reading it (`Shard::salvage`):
    /// it may or may not have arrived.
    Unconfirmed,
}

impl RouteError {
    /// The drop counter this failure counts under.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::NoRoute | Self::LinkClosed => "no_route",
            Self::Congested => "next_hop_congested",
            Self::Unconfirmed => "unconfirmed_at_link_loss",
        }
    }
}

/// How long a frame may wait for room on its way out of this shard.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// Not at all: the caller must never block (re-routes from the fwd task).
    Never,
    /// Not at all, and the frame may use the outbox's control allowance: control-plane
    /// frames from the ctl task (gossip), which must not be starved by data.
    Control,
    /// Up to this long for an outbox or another shard's fwd ring.
    Upto(Duration),
}

fn outbox_error(error: OutboxError) -> RouteError {
    match error {
        OutboxError::Full => RouteError::Congested,
        OutboxError::Closed | OutboxError::Oversized => RouteError::LinkClosed,
    }
}

impl Shard {
    pub(crate) fn pinned_key(&self, peer: u64) -> Option<[u8; 32]> {
        self.pinned.borrow().get(&peer).copied()
    }

    pub(crate) fn count_drop(&self, kind: &'static str) {
        *self.drops.borrow_mut().entry(kind).or_insert(0) += 1;
    }

    /// A routed frame whose source was not proven: counted, and logged at the 1st, 2nd, 4th …
    /// of its kind (a forger gets a logarithmic number of lines).
    pub(crate) fn count_refused_source(&self, src: u64, error: OpenError) {
        let kind = error.kind();
        let mut drops = self.drops.borrow_mut();
        let count = drops.entry(kind).or_insert(0);
        *count += 1;
        if count.is_power_of_two() {
            tracing::warn!(
                shard = self.shard_id,
                claimed_src = src,
                refused = *count,
                "routed frame refused: {kind} (this warning repeats at every power of two)"
            );
        }
    }

    fn owner(&self, peer: u64) -> usize {
        owner_shard(peer, self.config.n_shards.max(1))
    }

    /// This node's Hello fields with the current mesh id and credential.
    pub(crate) fn local_hello(&self) -> LocalHello {
        let mut hello = self.config.local.clone();
        hello.mesh_id = self.mesh_id.borrow().clone();
        if let Some(bound) = self.bound_listen.get() {
            // What the socket really listens on (`listen` may say port 0).
            hello.listen_addr = bound.to_string();
        }
        let (certificate, authority) = self.credential.borrow().clone();
        hello.certificate = certificate;
        hello.authority = authority;
        hello
    }

    /// A peer counts as down here when this shard owns it and has no open link to it; links of
    /// other shards are presumed up (their owner re-routes if not).
    fn is_down(&self, peer: u64) -> bool {
        self.owner(peer) == self.shard_id
            && self
                .links
                .borrow()
                .get(&peer)
                .is_none_or(|l| l.outbox.is_closing())
    }

    pub(crate) async fn emit_routing(&self, from: u64, payload: Bytes) {
        self.emit(ControlEvent::Routing { from, payload }).await;
    }

    pub(crate) async fn emit_gossip(&self, from: u64, payload: Bytes) {
        self.emit(ControlEvent::Gossip { from, payload }).await;
    }

    /// Hands a frame towards `header.dst`: the FIB's next hop (skipping hops known down here),
    /// else a direct link. A next hop owned by another shard crosses one ring (its fwd ring).
    pub(crate) async fn route(
        &self,
        header: Header,
        payload: Bytes,
        reroutes_left: u8,
        wait: Wait,
    ) -> Result<(), RouteError> {
        let dst = header.dst;
        if header.frame_type.is_control() {
            // Neighbour-only frames never take a detour, and never wait.
            let outbox = self.links.borrow().get(&dst).map(|l| Rc::clone(&l.outbox));
            return match outbox {
                Some(outbox) => outbox.push_now(&header, &payload).map_err(outbox_error),
                None => Err(RouteError::NoRoute),
            };
        }
        let spread = if header.stream_id != 0 {
            Spread::Flow(flow_key(header.src, dst, header.stream_id))
        } else {
            let n = self.round_robin.get();
            self.round_robin.set(n.wrapping_add(1));
            Spread::RoundRobin(n)
        };
        // Borrowed, not cloned: no reference-count traffic per frame.
        let next = self
            .fib
            .borrow()
            .next_hop_for(header.traffic_class, dst, spread, |peer| self.is_down(peer))
            .or_else(|| {
                // A guest's id is only a claim: never a destination for mesh traffic.
                let direct = self.links.borrow().get(&dst).is_some_and(|l| !l.peer.guest);
                (!self.is_down(dst) && direct).then_some(dst)
            })
            .ok_or(RouteError::NoRoute)?;
        let owner = self.owner(next);
        if owner != self.shard_id {
            let gauge = crate::command::forward_gauge_key(next, header.traffic_class);
            let forwarded = ShardInput::Forward(Forwarded {
                next_hop: next,
                header,
                payload,
                reroutes_left,
            });
            let ring = &self.peers[owner];
            let refused = |e: PushError<ShardInput>| match e {
                PushError::Full(_) => RouteError::Congested,
                PushError::Closed(_) => RouteError::LinkClosed,
            };
            return match wait {
                // Control-plane frames cross on the owner's ctl ring, which carries no data:
                // a data flood relayed towards the same next hop (its fwd ring full, its
                // congestion gauge high) must not refuse a Raft answer or a heartbeat. Under
                // issue 23's flood, relays dropped Raft frames here and control-group writes
                // waited out their 5 s deadline.
                Wait::Control => ring.try_push_ctl(forwarded).map_err(refused),
                Wait::Never => {
                    if self.forwards.is_congested(gauge) {
                        return Err(RouteError::Congested);
                    }
                    ring.try_push(forwarded).map_err(refused)
                }
                // A timer only when the ring is actually full or the next hop congested:
                // arming one per frame costs more than the hand-over itself.
                Wait::Upto(limit) => {
                    let deadline = Instant::now() + limit;
                    if self.forwards.is_congested(gauge) {
                        // Hop-by-hop backpressure per next hop and class group: this waits
                        // for that hop's own frames of its kind to leave its shard, never
                        // behind another hop's, nor a DB update behind client data.
                        let clear = self.forwards.until_clear(gauge);
                        if link::timeout(limit, clear).await.is_none() {
                            return Err(RouteError::Congested);
                        }
                    }
                    match ring.try_push(forwarded) {
                        Ok(()) => Ok(()),
                        Err(PushError::Closed(_)) => Err(RouteError::LinkClosed),
                        Err(PushError::Full(forwarded)) => {
                            let left = deadline.saturating_duration_since(Instant::now());
                            match link::timeout(left, ring.push(forwarded)).await {
                                Some(Ok(())) => Ok(()),
                                Some(Err(_)) => Err(RouteError::LinkClosed),
                                None => Err(RouteError::Congested),
                            }
                        }
                    }
                }
            };
        }
        let outbox = self.links.borrow().get(&next).map(|l| Rc::clone(&l.outbox));
        let Some(outbox) = outbox else {
            return Err(RouteError::NoRoute);
        };
        match wait {
            Wait::Never => outbox.try_push(&header, &payload),
            Wait::Control => outbox.push_now(&header, &payload),
            Wait::Upto(limit) => outbox.push(&header, &payload, limit).await,
        }
        .map_err(outbox_error)
    }

    /// A frame another shard routed to a peer of this shard, without waiting. Hands it back
    /// when the next hop's outbox is full or gone (the fwd task parks it); says why it failed
    /// otherwise (the caller counts it and tells the source, [`Shard::relay_failed`]).
    fn forward_now(&self, forwarded: Forwarded) -> Result<(), Result<Forwarded, RouteError>> {
        let outbox = self.open_outbox(forwarded.next_hop);
        let Some(outbox) = outbox else {
            return Err(Ok(forwarded));
        };
        match outbox.try_push(&forwarded.header, &forwarded.payload) {
            Ok(()) => Ok(()),
            Err(OutboxError::Full) => Err(Ok(forwarded)),
            Err(error) => Err(Err(outbox_error(error))),
        }
    }

    fn open_outbox(&self, peer: u64) -> Option<Rc<Outbox>> {
        self.links
            .borrow()
            .get(&peer)
            .filter(|l| !l.outbox.is_closing())
            .map(|l| Rc::clone(&l.outbox))
    }

    /// A frame another shard routed to a peer of this shard (the fwd task's drainer). Waits at
    /// most `limit` for room; a re-route never waits, so two fwd tasks never wait on each other.
    async fn forward(&self, forwarded: Forwarded, limit: Duration) {
        let header = forwarded.header;
        let outbox = self.open_outbox(forwarded.next_hop);
        let result = match outbox {
            Some(outbox) => outbox
                .push(&forwarded.header, &forwarded.payload, limit)
                .await
                .map_err(outbox_error),
            // The next hop went down after the other shard chose it: re-route once more.
            None if forwarded.reroutes_left > 0 => {
                self.reroutes.set(self.reroutes.get() + 1);
                Box::pin(self.route(
                    forwarded.header,
                    forwarded.payload,
                    forwarded.reroutes_left - 1,
                    Wait::Never,
                ))
                .await
            }
            None => Err(RouteError::NoRoute),
        };
        if let Err(error) = result {
            self.relay_failed(&header, &error).await;
        }
    }

    pub(crate) async fn emit(&self, event: ControlEvent) {
        if self.control_tx.push(event).await.is_err() {
            tracing::debug!(shard = self.shard_id, "control thread gone; event dropped");
        }
    }
}

/// The rings a shard thread starts with.
struct Wiring {
    inbound: ShardRings,
    peers: Vec<ShardHandle>,
    control_tx: Producer<ControlEvent>,
    api_tx: ApiLanes,
    handshakes: Arc<AtomicUsize>,
    congestion: Arc<Congestion>,
    forwards: Arc<Congestion>,
    beat: crate::watchdog::Beat,
}

async fn shard_main(
    shard_id: usize,
    config: Arc<ShardConfig>,
    wiring: Wiring,
    ready_tx: mpsc::Sender<(usize, Result<Option<SocketAddr>, StartError>)>,
) {
    let Wiring {
        inbound,
        peers,
        control_tx,
        api_tx,
        handshakes,
        congestion,
        forwards,
        beat,
    } = wiring;
    beat.register();
    let n = config.n_shards.max(1);
    let known: HashSet<u64> = config
        .known_peers
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| owner_shard(*id, n) == shard_id)
        .collect();
    let pinned: HashMap<u64, [u8; 32]> = config
        .known_peers
        .iter()
        .filter(|(id, _)| owner_shard(*id, n) == shard_id)
        .copied()
        .collect();
    let shard = Rc::new(Shard {
        shard_id,
        config: Arc::clone(&config),
        api_tx,
        epoch: Instant::now(),
        control_tx,
        peers,
        links: RefCell::new(HashMap::new()),
        known: RefCell::new(known),
        pinned: RefCell::new(pinned),
        next_conn_id: Cell::new(1),
        handshakes,
        drops: RefCell::new(BTreeMap::new()),
        reroutes: Cell::new(0),
        stopping: Cell::new(false),
        fib: RefCell::new(Arc::new(Fib::empty())),
        keys: RefCell::new(KeyCache::default()),
        bound_listen: Cell::new(None),
        round_robin: Cell::new(0),
        mesh_id: RefCell::new(config.local.mesh_id.clone()),
        credential: RefCell::new((config.local.certificate.clone(), config.local.authority)),
        congestion,
        forwards,
        parked_sends: parked::Parked::new(),
        parked_forwards: parked::Parked::new(),
        control_queue: glommio::executor().create_task_queue(
            glommio::Shares::Static(4000),
            // Not `Latency::Matters`, and the executor keeps glommio's default preemption
            // timer: both arm 1 ms latency-ring timers, and since they were on, shards wedged
            // now and then (a shard that never started, one that answered nothing for a
            // minute; CI and here, 2026-12-07); glommio has reported hangs on that path
            // (DataDog/glommio#434, #459, #494). The share still puts control first whenever
            // the executor picks a queue, and the data loops' time slices (`slice`) make it
            // pick often. `watchdog` reports a wedge if one comes back.
            glommio::Latency::NotImportant,
            "control-lanes",
        ),
    });

    let listener = match config.listen {
        Some(addr) => match TcpListener::bind(addr) {
            Ok(listener) => {
                let bound = listener.local_addr().ok();
                shard.bound_listen.set(bound);
                let _ = ready_tx.send((shard_id, Ok(bound)));
                Some(listener)
            }
            Err(e) => {
                let source = std::io::Error::other(e.to_string());
                let _ = ready_tx.send((
                    shard_id,
                    Err(StartError::Listen {
                        shard: shard_id,
                        addr,
                        source,
                    }),
                ));
                return;
            }
        },
        None => {
            let _ = ready_tx.send((shard_id, Ok(None)));
            None
        }
    };
    drop(ready_tx);

    if let Some(listener) = listener {
        let shard = Rc::clone(&shard);
        glommio::spawn_local(connect::accept_loop(shard, listener)).detach();
    }

    // The watchdog's pulse, from the control queue: a shard whose control queue stops running
    // is reported (`watchdog`).
    let pulse = {
        let shard = Rc::clone(&shard);
        async move {
            while !shard.stopping.get() {
                glommio::timer::sleep(crate::watchdog::TICK).await;
                beat.tick();
            }
        }
    };
    match glommio::spawn_local_into(pulse, shard.control_queue) {
        Ok(task) => {
            task.detach();
        }
        Err(error) => tracing::warn!(shard = shard_id, %error, "no watchdog pulse"),
    }

    // The send and fwd tasks may wait (on outboxes, whose writers have deadlines); the ctl
    // loop below never waits on anything but its ring (see `handle`).
    let ShardRings { ctl, send, fwd } = inbound;
    glommio::spawn_local(parked::send_task(Rc::clone(&shard), send)).detach();
    glommio::spawn_local(parked::fwd_task(Rc::clone(&shard), fwd)).detach();

    // The ctl loop carries Raft, gossip and routing frames to the outboxes: it runs in the
    // control lanes' task queue, picked before a flood's data tasks.
    let ctl_loop = {
        let shard = Rc::clone(&shard);
        async move {
            while let Some(input) = ctl.pop().await {
                match input {
                    ShardInput::Dial { addr, dial_id } => {
                        glommio::spawn_local(connect::dial(Rc::clone(&shard), addr, dial_id))
                            .detach();
                    }
                    ShardInput::Adopt(adopted) => {
                        // SAFETY: the descriptor is a connected TCP socket that the sending shard
                        // duplicated for us and no longer uses; ownership moves into the stream.
                        let stream = unsafe { TcpStream::from_raw_fd(adopted.fd.into_raw_fd()) };
                        glommio::spawn_local(connect::establish(
                            Rc::clone(&shard),
                            stream,
                            adopted.role,
                            adopted.peer_hint,
                            adopted.remote_addr,
                            adopted.dial_id,
                            adopted.deadline,
                        ))
                        .detach();
                    }
                    ShardInput::Send(outgoing) => send_control_frame(&shard, outgoing).await,
                    ShardInput::Forward(forwarded) => {
                        // A control-plane frame another shard routed here (`Wait::Control`):
                        // served without waiting, with the outbox's control allowance.
                        let wait = if forwarded.header.frame_type.is_served_first() {
                            Wait::Control
                        } else {
                            Wait::Never
                        };
                        let result = shard
                            .route(forwarded.header, forwarded.payload, 0, wait)
                            .await;
                        if let Err(error) = result {
                            shard.count_drop(error.kind());
                        }
                    }
                    ShardInput::Fib(fib) => *shard.fib.borrow_mut() = fib,
                    ShardInput::SetMesh { mesh_id, reason } => {
                        // Links of the old mesh (or guest links) end; new handshakes use the new id.
                        *shard.mesh_id.borrow_mut() = mesh_id;
                        let links: Vec<(u64, Rc<Outbox>)> = shard
                            .links
                            .borrow()
                            .iter()
                            .map(|(peer, l)| (*peer, Rc::clone(&l.outbox)))
                            .collect();
                        for (peer, outbox) in links {
                            let (header, payload) =
                                link::goodbye(config.local.node_id, peer, &reason);
                            let _ = outbox.push_now(&header, &payload);
                            outbox.close(reason.clone());
                        }
                    }
                    ShardInput::SetCredential {
                        certificate,
                        authority,
                    } => {
                        // New handshakes present and check these; links already up stay (they were
                        // checked when they were set up).
                        *shard.credential.borrow_mut() = (certificate, authority);
                    }
                    ShardInput::DropPeer {
                        peer,
                        reason,
                        reply,
                    } => {
                        let outbox = shard
                            .links
                            .borrow()
                            .get(&peer)
                            .map(|l| Rc::clone(&l.outbox));
                        if let Some(outbox) = &outbox {
                            let (header, payload) =
                                link::goodbye(config.local.node_id, peer, &reason);
                            let _ = outbox.push_now(&header, &payload);
                            outbox.close(reason);
                        }
                        let _ = reply.send(outbox.is_some());
                    }
                    ShardInput::Sessions { reply } => {
                        let snapshots = shard
                            .links
                            .borrow()
                            .iter()
                            .map(|(peer, link)| {
                                let state = if link.outbox.is_closing() {
                                    "closing"
                                } else {
                                    "up"
                                };
                                let mut snapshot = link.stats.snapshot(*peer, state);
                                snapshot.lanes.push(
                                    link.stats.lane(
                                        Lane::Data.name(),
                                        link.outbox.queued_for(Lane::Data),
                                    ),
                                );
                                for side in [Lane::Control, Lane::Priority] {
                                    let Some(stats) = &link.side[side as usize] else {
                                        continue;
                                    };
                                    let lane =
                                        stats.lane(side.name(), link.outbox.queued_for(side));
                                    if side == Lane::Control {
                                        // The network's round trip, not the data queued
                                        // ahead of a beat.
                                        snapshot.srtt_us = lane.srtt_us;
                                    }
                                    snapshot.lanes.push(lane);
                                }
                                // The link's figures are its lanes' together (the data
                                // lane's alone would miss what the side lanes carry).
                                let lanes = &snapshot.lanes;
                                snapshot.bytes_sent = lanes.iter().map(|l| l.bytes_sent).sum();
                                snapshot.bytes_received =
                                    lanes.iter().map(|l| l.bytes_received).sum();
                                snapshot.frames_sent = lanes.iter().map(|l| l.frames_sent).sum();
                                snapshot.frames_received =
                                    lanes.iter().map(|l| l.frames_received).sum();
                                snapshot
                            })
                            .collect();
                        let _ = reply.send(snapshots);
                    }
                    ShardInput::Figures { reply } => {
                        let _ = reply.send(crate::command::ShardFigures {
                            drops: shard.drops.borrow().clone(),
                            reroutes: shard.reroutes.get(),
                        });
                    }
                    ShardInput::PinKey { peer, public_key } => {
                        shard.pinned.borrow_mut().insert(peer, public_key);
                        shard.known.borrow_mut().insert(peer);
                    }
                    ShardInput::Shutdown => break,
                }
            }
        }
    };
    match glommio::spawn_local_into(ctl_loop, shard.control_queue) {
        Ok(task) => task.await,
        Err(error) => tracing::error!(shard = shard_id, %error, "could not start the ctl loop"),
    }
    shut_down(&shard).await;
}

async fn shut_down(shard: &Rc<Shard>) {
    shard.stopping.set(true);
    let outboxes: Vec<(u64, Rc<Outbox>)> = shard
        .links
        .borrow()
        .iter()
        .map(|(peer, link)| (*peer, Rc::clone(&link.outbox)))
        .collect();
    for (peer, outbox) in &outboxes {
        let (header, payload) = link::goodbye(shard.config.local.node_id, *peer, "shutdown");
        let _ = outbox.push_now(&header, &payload);
        outbox.close("shutdown".into());
    }
    // Give writers a moment to flush the goodbyes; a peer that misses one notices by heartbeat.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !shard.links.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let drops = shard.drops.borrow();
    if !drops.is_empty() {
        tracing::info!(
            shard = shard.shard_id,
            ?drops,
            "frames dropped during this run"
        );
    }
}

/// An input that arrived on a ring not meant for it (`ShardHandle` never does this): counted
/// and dropped rather than served on a task whose waiting rules it would break.
fn handle_misrouted(shard: &Shard, input: ShardInput) {
    tracing::error!(
        shard = shard.shard_id,
        ?input,
        "input on the wrong ring; dropped"
    );
    shard.count_drop("misrouted_input");
}

/// The header of a frame this node originates.
fn send_header(shard: &Shard, outgoing: &Outgoing) -> Header {
    outgoing.header(shard.config.local.node_id)
}

/// Counts a frame this node could not send, and tells the api of a lost `Data` frame.
fn report_send_failure(shard: &Shard, outgoing: &Outgoing, error: &RouteError) {
    report_data_failure(
        shard,
        outgoing.frame_type,
        outgoing.dst,
        outgoing.msg_id,
        outgoing.chunk.1,
        error,
    );
}

/// Counts a frame of this node's own that could not be sent; for `Data` / `DataBatch`
/// (`count` messages from `msg_id` on) the api is told.
fn report_data_failure(
    shard: &Shard,
    frame_type: FrameType,
    dst: u64,
    msg_id: u64,
    count: u16,
    error: &RouteError,
) {
    shard.count_drop(error.kind());
    if matches!(frame_type, FrameType::Data | FrameType::DataBatch) {
        let known = shard.known.borrow().contains(&dst) || shard.fib.borrow().is_known(dst);
        let count = match frame_type {
            FrameType::DataBatch => u32::from(count),
            _ => 1,
        };
        let event = ApiEvent::SendFailed {
            msg_id,
            count,
            dst,
            known,
            why: match error {
                RouteError::NoRoute | RouteError::LinkClosed => SendFailure::NoRoute,
                RouteError::Congested => SendFailure::Congested,
                RouteError::Unconfirmed => SendFailure::Unconfirmed,
            },
        };
        // Never waits on the api thread (which may be waiting on this shard's send ring). The
        // verdicts ring is drained by a task that never waits, so it is full only under a
        // storm of reports; a lost failure report leaves the status at QUEUED, and waiting
        // sends settle "outcome unknown".
        if shard.api_tx.verdicts.try_push(event).is_err() {
            shard.count_drop("send_failure_report_lost");
        }
    }
}

/// A control-plane frame from the ctl loop: never waits.
async fn send_control_frame(shard: &Rc<Shard>, mut outgoing: Outgoing) {
    let header = send_header(shard, &outgoing);
    let payload = std::mem::take(&mut outgoing.payload);
    if let Err(error) = shard.route(header, payload, 1, Wait::Control).await {
        report_send_failure(shard, &outgoing, &error);
    }
}
