//! The api thread: one tokio current-thread runtime serving every gRPC service with tonic.
//!
//! It validates requests and bridges them to the shards (through their rings) and the control
//! thread; it also runs the *local delivery desk*: frames addressed to this node arrive on the
//! api ring ([`ApiEvent`]) and go to the matching `Subscribe` streams, and delivery reports go
//! back to the sender. No protocol logic lives here beyond that fan-out and the bounded
//! [`tracker::MessageTracker`].
//!
//! **Boundary:** gRPC lives only on this thread.

mod auth;
mod control;
mod data;
mod known;
mod mesh;
mod recent;
mod reports;
pub mod tenant;
pub mod tracker;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use meshd_proto::{
    link::{AppAck, Data, DeliveryReports},
    mesh::{
        MessageStatus, Received, mesh_control_server::MeshControlServer,
        mesh_data_server::MeshDataServer,
    },
};
use meshd_shards::{
    command::{ApiEvent, Outgoing, ShardInput},
    congestion::Congestion,
    frame::{FrameType, TrafficClass},
    handle::ShardHandle,
    ownership::owner_shard,
    ring::{Consumer, Producer, PushError},
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use self::{
    auth::TokenCheck,
    known::{DstSeqs, KNOWN_NODES_REFRESH, KnownNodes, WaitingSeqs},
    recent::{Arrival, Decision, RecentDeliveries, Verdict},
    reports::{ReportBatch, ReportSink},
    tracker::{MessageTracker, StatusUpdate},
};
use crate::{
    control::{
        ControlRequest, RoutingSnapshot,
        mesh::{MeshEvent, MeshSnapshot},
    },
    storage::now_ms,
};

/// One `Subscribe` stream.
struct Subscriber {
    partition: u32,
    qos_class: u32,
    src_node: u64,
    tx: mpsc::Sender<Result<Received, Status>>,
    /// Set when the subscriber let a message wait [`SUBSCRIBER_WAIT`] in vain; cleared once
    /// its queue is half empty again. A lagging subscriber is not waited for.
    lagging: Arc<AtomicBool>,
}

/// How long a delivery waits for room in a full subscriber queue. The wait holds the node's
/// inbound pipeline, so TCP pushes back on the senders instead of messages being dropped; a
/// subscriber that stays full this long is marked lagging and misses messages
/// (`PENDING_CLIENT`, "queue full") until it catches up.
pub(crate) const SUBSCRIBER_WAIT: Duration = Duration::from_secs(1);

impl Subscriber {
    fn wants(&self, src: u64, partition: u32, qos_class: u32) -> bool {
        (self.partition == 0 || self.partition == partition)
            && (self.qos_class == 0 || self.qos_class == qos_class)
            && (self.src_node == 0 || self.src_node == src)
    }
}

/// State shared by the services (all on the api thread; the mutexes are never contended).
pub(crate) struct ApiState {
    pub(crate) node_id: u64,
    pub(crate) shards: Arc<[ShardHandle]>,
    /// Bytes the shards hold parked per destination (a destination that stops reading).
    congestion: Arc<Congestion>,
    pub(crate) tenant_keys: SharedTenantKeys,
    /// How long a send to a congested destination waits before it is handed over anyway.
    congestion_wait: Duration,
    pub(crate) control: Producer<ControlRequest>,
    pub(crate) max_payload_bytes: usize,
    pub(crate) subscriber_queue: usize,
    pub(crate) default_timeout_seconds: u32,
    tracker: Mutex<MessageTracker>,
    subscribers: Mutex<Vec<Subscriber>>,
    recent: Mutex<RecentDeliveries>,
    pub(crate) mesh_events: tokio::sync::broadcast::Sender<MeshEvent>,
    known: Mutex<KnownNodes>,
    waiting_seqs: Mutex<WaitingSeqs>,
    /// Set once shut-down begins: no new `Subscribe` stream is opened after the open ones
    /// were ended.
    closing: AtomicBool,
}

impl ApiState {
    /// Opens a waiting send to `dst`: (session, seq, floor), or why not.
    pub(crate) fn open_waiting(&self, dst: u64) -> Result<(u64, u64, u64), Status> {
        let mut seqs = self
            .waiting_seqs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let session = seqs.session;
        let per_dst = seqs.per_dst.entry(dst).or_default();
        if per_dst.open.len() as u64 >= recent::MAX_OPEN_PER_SOURCE {
            return Err(Status::resource_exhausted(format!(
                "{} waiting sends to node {dst} are open; wait for some to finish",
                per_dst.open.len()
            )));
        }
        per_dst.next = per_dst.next.max(1);
        let seq = per_dst.next;
        per_dst.next += 1;
        per_dst.open.insert(seq);
        Ok((session, seq, per_dst.floor()))
    }

    /// The floor of `dst`'s waiting sends now.
    pub(crate) fn waiting_floor(&self, dst: u64) -> u64 {
        self.waiting_seqs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .per_dst
            .get(&dst)
            .map_or(1, DstSeqs::floor)
    }

    /// A waiting send to `dst` settled: its seq no longer holds the floor down.
    pub(crate) fn close_waiting(&self, dst: u64, seq: u64) {
        if let Some(per_dst) = self
            .waiting_seqs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .per_dst
            .get_mut(&dst)
        {
            per_dst.open.remove(&seq);
        }
    }

    /// The generation of `dst` as this node last heard (0 if unknown).
    pub(crate) fn generation_of(&self, dst: u64) -> u32 {
        self.known_nodes()
            .generations
            .get(&dst)
            .copied()
            .unwrap_or(0)
    }

    fn shard_of(&self, peer: u64) -> &ShardHandle {
        &self.shards[owner_shard(peer, self.shards.len())]
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentDeliveries> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn tracker(&self) -> std::sync::MutexGuard<'_, MessageTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands a frame to the shard that owns the link to `dst`, waiting while `dst` is congested
    /// (at most `congestion_wait`: only this destination's callers wait) and while the
    /// shard's ring is full.
    pub(crate) async fn send_frame(
        &self,
        dst: u64,
        frame_type: FrameType,
        traffic_class: TrafficClass,
        msg_id: u64,
        flow: u128,
        payload: Bytes,
    ) -> Result<(), Status> {
        if self.congestion.is_congested(dst) {
            let _ =
                tokio::time::timeout(self.congestion_wait, self.congestion.until_clear(dst)).await;
        }
        self.hand_over(Outgoing {
            dst,
            frame_type,
            traffic_class,
            msg_id,
            flow,
            payload,
        })
        .await
    }

    /// Hands a frame to the shard that owns the link to its destination, waiting only while
    /// that shard's ring is full: a broadcast's copy for a congested node is parked there, not
    /// waited for.
    pub(crate) async fn hand_over(&self, outgoing: Outgoing) -> Result<(), Status> {
        self.shard_of(outgoing.dst)
            .push(ShardInput::Send(outgoing))
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))
    }

    /// The member table and mesh health.
    pub(crate) async fn mesh(&self) -> Result<MeshSnapshot, Status> {
        let (reply, answer) = oneshot::channel();
        self.control
            .push(ControlRequest::Mesh { reply })
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))
    }

    /// The current routing view of the control thread.
    pub(crate) async fn routing(&self) -> Result<Arc<RoutingSnapshot>, Status> {
        let (reply, answer) = oneshot::channel();
        self.control
            .push(ControlRequest::Routing { reply })
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))
    }

    /// Whether `node` is or was part of the mesh as far as this node can tell: it has a route,
    /// is or was a neighbour, has an LSA, is a member (dead ones and those remembered from
    /// earlier runs included) or was evicted. A send to a node that is none of these is
    /// UNDELIVERABLE at once. Known nodes are answered from the api's view; only a miss asks
    /// the control thread, at most once per [`KNOWN_NODES_REFRESH`], so neither a stream of
    /// `Publish` messages nor a burst of sends to an unknown id makes a round trip each.
    pub(crate) async fn is_known(&self, node: u64) -> Result<bool, Status> {
        {
            let known = self.known_nodes();
            if known.nodes.contains(&node) {
                return Ok(true);
            }
            if known
                .refreshed
                .is_some_and(|at| at.elapsed() < KNOWN_NODES_REFRESH)
            {
                return Ok(false);
            }
        }
        let routing = self.routing().await?;
        let mesh = self.mesh().await?;
        let mut known = self.known_nodes();
        known.absorb(&routing, &mesh);
        Ok(known.nodes.contains(&node))
    }

    fn known_nodes(&self) -> std::sync::MutexGuard<'_, KnownNodes> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every node this node can reach now (itself excluded).
    pub(crate) async fn reachable_nodes(&self) -> Result<Vec<u64>, Status> {
        Ok(self
            .routing()
            .await?
            .routes
            .iter()
            .map(|r| r.destination)
            .collect())
    }

    /// Offers a message to the matching local subscribers; returns the resulting status.
    /// Delivers a message from another node, opening it first if it is end-to-end encrypted
    /// (this is the only place its plaintext exists on this node).
    async fn open_and_deliver(&self, src: u64, data: &mut Data) -> Verdict {
        if !data.tenant.is_empty() {
            let Ok(nonce) = <[u8; 24]>::try_from(data.nonce.as_ref()) else {
                return Verdict::NoTenantKey;
            };
            let sealed = tenant::Sealed {
                epoch: data.key_epoch,
                nonce,
                ciphertext: data.payload.to_vec(),
            };
            let opened = self
                .tenant_keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .open(&data.tenant, src, data.msg_id, now_ms(), &sealed);
            match opened {
                Ok(plaintext) => data.payload = plaintext.into(),
                Err(error) => {
                    tracing::debug!(src, msg_id = data.msg_id, %error, "end-to-end message not opened");
                    return Verdict::NoTenantKey;
                }
            }
        }
        self.deliver_locally(src, data).await
    }

    pub(crate) async fn deliver_locally(&self, src: u64, data: &Data) -> Verdict {
        let received = Received {
            src_node: src,
            dst_node: self.node_id,
            msg_id: data.msg_id,
            corr_id: data.corr_id,
            headers: data
                .headers
                .iter()
                .map(|h| meshd_proto::mesh::Header {
                    key: h.key.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            payload: data.payload.clone(),
            require_ack: data.require_ack,
        };
        let mut delivered = 0usize;
        let mut full = 0usize;
        // The common case (room in every queue) is served under the lock without waiting or
        // allocating; only subscribers with a full queue are collected to be waited for.
        let mut waiting = Vec::new();
        {
            let mut subscribers = self
                .subscribers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut closed = false;
            for s in subscribers
                .iter()
                .filter(|s| s.wants(src, data.partition, data.qos_class))
            {
                match s.tx.try_send(Ok(received.clone())) {
                    Ok(()) => {
                        delivered += 1;
                        if s.tx.capacity() * 2 >= s.tx.max_capacity() {
                            s.lagging.store(false, Ordering::Relaxed);
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                    Err(mpsc::error::TrySendError::Full(_))
                        if s.lagging.load(Ordering::Relaxed) =>
                    {
                        full += 1;
                    }
                    Err(mpsc::error::TrySendError::Full(item)) => {
                        waiting.push((s.tx.clone(), Arc::clone(&s.lagging), item));
                    }
                }
            }
            if closed {
                subscribers.retain(|s| !s.tx.is_closed());
            }
        }
        for (tx, lagging, item) in waiting {
            match tokio::time::timeout(SUBSCRIBER_WAIT, tx.send(item)).await {
                Ok(Ok(())) => delivered += 1,
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!(
                        src,
                        "a subscriber stayed full for {SUBSCRIBER_WAIT:?}; it misses messages until it catches up"
                    );
                    lagging.store(true, Ordering::Relaxed);
                    full += 1;
                }
            }
        }
        match (delivered, full) {
            (0, 0) => Verdict::NoSubscriber,
            (0, _) => Verdict::SubscribersFull,
            _ if data.require_ack => Verdict::WaitingForAck,
            _ => Verdict::Delivered,
        }
    }

    pub(crate) fn add_subscriber(
        &self,
        partition: u32,
        qos_class: u32,
        src_node: u64,
    ) -> Result<mpsc::Receiver<Result<Received, Status>>, Status> {
        let (tx, rx) = mpsc::channel(self.subscriber_queue);
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Checked under the lock that `end_streams` takes, so no stream slips in after it.
        if self.closing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("the node is shutting down"));
        }
        // Deliveries prune closed subscribers only when they meet one; this catches the rest.
        subscribers.retain(|s| !s.tx.is_closed());
        subscribers.push(Subscriber {
            partition,
            qos_class,
            src_node,
            tx,
            lagging: Arc::default(),
        });
        Ok(rx)
    }

    /// Ends every `Subscribe` stream (shut-down): a graceful gRPC shut-down waits for open
    /// streams, and `core` always holds one. Each gets a last UNAVAILABLE if its queue has
    /// room; dropping its sender ends it either way.
    fn end_streams(&self) {
        let ended = {
            let mut subscribers = self
                .subscribers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.closing.store(true, Ordering::Relaxed);
            std::mem::take(&mut *subscribers)
        };
        for subscriber in &ended {
            let _ = subscriber
                .tx
                .try_send(Err(Status::unavailable("the node is shutting down")));
        }
        if !ended.is_empty() {
            tracing::info!(streams = ended.len(), "ended the open Subscribe streams");
        }
    }

    /// Verdicts on Data frames go into `reports`, for [`Self::send_reports`].
    async fn handle_event(&self, event: ApiEvent, reports: &mut ReportBatch) {
        match event {
            ApiEvent::Frame {
                src,
                frame_type: FrameType::Data,
                payload,
                traffic_class,
            } => {
                let Ok(mut data) = Data::decode(payload) else {
                    tracing::debug!(src, "dropped an undecodable data frame");
                    return;
                };
                let msg_id = data.msg_id;
                let verdict = if data.seq == 0 {
                    // Fire-and-forget or broadcast: never retransmitted, nothing to remember.
                    self.open_and_deliver(src, &mut data).await
                } else {
                    let arrival = Arrival {
                        source: src,
                        session: data.src_session,
                        seq: data.seq,
                        floor: data.floor,
                        attempt: data.attempt,
                        dst_generation: data.dst_generation,
                    };
                    let decision = self.recent().check(arrival, Instant::now());
                    match decision {
                        Decision::Ignore => return,
                        Decision::Answer(verdict) => verdict,
                        Decision::Deliver => {
                            let verdict = self.open_and_deliver(src, &mut data).await;
                            self.recent().record(arrival, verdict);
                            verdict
                        }
                    }
                };
                reports.push(src, traffic_class, msg_id, verdict);
            }
            ApiEvent::Frame {
                src,
                frame_type: FrameType::DeliveryReport,
                payload,
                ..
            } => {
                let Ok(batch) = DeliveryReports::decode(payload) else {
                    tracing::debug!(src, "dropped an undecodable delivery report");
                    return;
                };
                if batch.generation != 0 {
                    // The destination's own word on its current life: later waiting sends'
                    // first copies are addressed to it (see `recent.rs`). Only for nodes this
                    // node sends to (known), so invented sources cannot grow the map.
                    let mut known = self.known_nodes();
                    if known.nodes.contains(&src) {
                        known.generations.insert(src, batch.generation);
                    }
                }
                let applied = reports::apply_reports(&mut self.tracker(), src, batch, now_ms());
                if applied.skipped > 0 {
                    tracing::debug!(src, ?applied, "skipped report runs outside what is tracked");
                }
            }
            ApiEvent::Frame {
                src,
                frame_type: FrameType::AppAck,
                payload,
                ..
            } => {
                let Ok(ack) = AppAck::decode(payload) else {
                    return;
                };
                let status = if ack.success {
                    MessageStatus::AckSuccess
                } else {
                    MessageStatus::AckFailure
                };
                self.tracker().update(
                    ack.msg_id,
                    Some(src),
                    StatusUpdate {
                        status,
                        detail: reports::cap_detail(ack.message),
                        timestamp_ms: now_ms(),
                    },
                );
            }
            ApiEvent::Frame {
                src, frame_type, ..
            } => {
                tracing::debug!(
                    src,
                    ?frame_type,
                    "api ignored a frame type it does not handle"
                );
            }
            ApiEvent::SendFailed { msg_id, dst, known } => {
                if self.tracker().note_failure(msg_id) {
                    // An open waiting send: tried again until its time is up (another next
                    // hop may come up); its final status is decided then.
                    return;
                }
                let (status, detail) = if known {
                    (
                        MessageStatus::PendingNode,
                        format!("node {dst} is known but not linked"),
                    )
                } else {
                    (
                        MessageStatus::Undeliverable,
                        format!("node {dst} has never been part of this mesh"),
                    )
                };
                self.tracker().update(
                    msg_id,
                    None,
                    StatusUpdate {
                        status,
                        detail: detail.into(),
                        timestamp_ms: now_ms(),
                    },
                );
            }
        }
    }
}

/// Ring events handled per drain before the collected verdicts are sent (each Data frame
/// adds one).
const MAX_EVENTS_PER_DRAIN: usize = 4096;

/// How soon reports that found no room in a shard's ring are offered again.
const REPORT_RETRY: Duration = Duration::from_millis(5);

/// The shards' rings as a [`ReportSink`]: pushes without waiting, and stops offering to a
/// shard once its ring was full in this flush.
struct ShardSink<'a> {
    state: &'a ApiState,
    full: Vec<bool>,
}

impl ReportSink for ShardSink<'_> {
    fn ready(&mut self, source: u64) -> bool {
        !self.full[owner_shard(source, self.full.len())]
    }

    fn send(&mut self, source: u64, class: TrafficClass, payload: Vec<u8>) -> bool {
        let outgoing = Outgoing {
            dst: source,
            frame_type: FrameType::DeliveryReport,
            traffic_class: class,
            msg_id: 0,
            flow: 0,
            payload: payload.into(),
        };
        match self
            .state
            .shard_of(source)
            .try_push(ShardInput::Send(outgoing))
        {
            Ok(()) => true,
            Err(PushError::Full(_)) => {
                let shard = owner_shard(source, self.full.len());
                self.full[shard] = true;
                false
            }
            // The shard stopped (shut-down): nothing will ever carry it, so it leaves the
            // batch; waiting senders retransmit to the node's next life.
            Err(PushError::Closed(_)) => true,
        }
    }
}

impl ApiState {
    /// Offers every collected verdict to the shards, a frame per source and class, without
    /// waiting: the shard may be waiting for room in the api ring, which this thread drains.
    /// What does not fit stays in `reports` for the next call.
    fn send_reports(&self, reports: &mut ReportBatch) {
        let mut sink = ShardSink {
            state: self,
            full: vec![false; self.shards.len()],
        };
        reports.flush(self.max_payload_bytes, &mut sink);
        let dropped = reports.take_dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                waiting = reports.len(),
                "delivery reports found no room in the shards' rings for too long; dropped the \
                 oldest (waiting senders retransmit and get the remembered verdict)"
            );
        }
    }
}

/// Tenant keys shared by the api (which seals and opens) and the control thread (which
/// knows the mesh secret as it changes).
pub type SharedTenantKeys = Arc<std::sync::RwLock<tenant::TenantKeys>>;

/// What the api thread is started with.
pub struct ApiSetup {
    /// This node's id.
    pub node_id: u64,
    /// Bound gRPC listener (bound before the thread starts, so errors surface at start-up).
    pub listener: std::net::TcpListener,
    /// Every shard's ring.
    pub shards: Arc<[ShardHandle]>,
    /// The shards' parked bytes per destination.
    pub congestion: Arc<Congestion>,
    /// How long a send to a congested destination waits for it to drain (the shards' own
    /// patience with a parked frame).
    pub congestion_wait: Duration,
    /// Requests to the control thread.
    pub control: Producer<ControlRequest>,
    /// `Data` frames for this node, from the shards.
    pub events: Consumer<ApiEvent>,
    /// Delivery reports, application acks and send failures, from the shards.
    pub verdicts: Consumer<ApiEvent>,
    /// Largest frame payload.
    pub max_payload_bytes: usize,
    /// Per-subscriber queue.
    pub subscriber_queue: usize,
    /// Remembered message statuses.
    pub tracked_messages: usize,
    /// Default wait limit of waiting sends.
    pub default_timeout_seconds: u32,
    /// This start's identity generation (what peers' retransmissions are checked against).
    pub generation: u32,
    /// Mesh events from the control thread (each WatchMeshEvents call subscribes).
    pub mesh_events: tokio::sync::broadcast::Sender<MeshEvent>,
    /// Tenant keys (the control thread renews their secret when the mesh changes).
    pub tenant_keys: SharedTenantKeys,
    /// PEM certificate chain and key to serve TLS with.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// The bearer token every call must carry.
    pub token: Option<String>,
}

/// The running api thread.
pub struct ApiThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The gRPC address actually bound.
    pub local_addr: SocketAddr,
}

impl ApiThread {
    /// Starts serving.
    pub fn start(setup: ApiSetup) -> std::io::Result<Self> {
        let local_addr = setup.listener.local_addr()?;
        setup.listener.set_nonblocking(true)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = thread::Builder::new().name("api".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "api runtime failed to start");
                    return;
                }
            };
            runtime.block_on(serve(setup, stop_rx));
        })?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            local_addr,
        })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(setup: ApiSetup, stop: oneshot::Receiver<()>) {
    let state = Arc::new(ApiState {
        node_id: setup.node_id,
        shards: setup.shards,
        congestion: setup.congestion,
        tenant_keys: setup.tenant_keys,
        congestion_wait: setup.congestion_wait,
        control: setup.control,
        max_payload_bytes: setup.max_payload_bytes,
        subscriber_queue: setup.subscriber_queue,
        default_timeout_seconds: setup.default_timeout_seconds,
        mesh_events: setup.mesh_events,
        // Ids start from the clock so they stay unique across restarts of this node.
        tracker: Mutex::new(MessageTracker::new(setup.tracked_messages, now_ms() << 20)),
        subscribers: Mutex::new(Vec::new()),
        recent: Mutex::new(RecentDeliveries::new(setup.generation)),
        known: Mutex::default(),
        waiting_seqs: Mutex::new(WaitingSeqs {
            session: rand::random::<u64>() | 1,
            per_dst: HashMap::new(),
        }),
        closing: AtomicBool::new(false),
    });
    let events = setup.events;
    let (tls, token) = (setup.tls, setup.token);
    let verdicts = setup.verdicts;
    let setup_generation = setup.generation;
    // Verdicts on this node's sends never wait behind data for subscribers: handling one
    // never awaits, so this task drains its ring at CPU speed.
    let verdict_state = Arc::clone(&state);
    let verdict_pump = tokio::spawn(async move {
        let mut unused = ReportBatch::default();
        while let Some(event) = verdicts.pop().await {
            verdict_state.handle_event(event, &mut unused).await;
        }
    });
    let pump_state = Arc::clone(&state);
    let pump = tokio::spawn(async move {
        let mut reports = ReportBatch::default();
        reports.generation = setup_generation;
        loop {
            let event = if reports.is_empty() {
                events.pop().await
            } else {
                // Reports wait for room in a shard's ring: retry soon even if nothing arrives.
                tokio::select! {
                    event = events.pop() => event,
                    () = tokio::time::sleep(REPORT_RETRY) => {
                        pump_state.send_reports(&mut reports);
                        continue;
                    }
                }
            };
            let Some(event) = event else { break };
            pump_state.handle_event(event, &mut reports).await;
            // Drain what already waits, so a burst's verdicts go back in one frame per source.
            for _ in 1..MAX_EVENTS_PER_DRAIN {
                let Some(event) = events.try_pop() else { break };
                pump_state.handle_event(event, &mut reports).await;
            }
            pump_state.send_reports(&mut reports);
        }
    });

    let listener = match tokio::net::TcpListener::from_std(setup.listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "gRPC listener unusable");
            return;
        }
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<MeshDataServer<data::DataService>>()
        .await;
    health_reporter
        .set_serving::<MeshControlServer<control::ControlService>>()
        .await;
    let reflection = match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshd_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(reflection) => reflection,
        Err(e) => {
            tracing::error!(error = %e, "gRPC reflection unusable");
            return;
        }
    };
    // Room for the largest payload plus headers and protobuf overhead.
    let max_message = state.max_payload_bytes + (64 << 10);
    let data = MeshDataServer::new(data::DataService::new(Arc::clone(&state)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let control = MeshControlServer::new(control::ControlService::new(Arc::clone(&state)));
    let mesh_service = meshd_proto::link::mesh_service_server::MeshServiceServer::new(
        control::ControlService::new(Arc::clone(&state)),
    );
    // core keeps one long-lived connection; small unary calls must not wait for Nagle.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            if let Ok(stream) = &s {
                let _ = stream.set_nodelay(true);
            }
            s
        },
    );
    let (stopping_tx, stopping) = oneshot::channel::<()>();
    let shutdown_state = Arc::clone(&state);
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &tls {
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        builder = match builder.tls_config(config) {
            Ok(builder) => builder,
            Err(e) => {
                tracing::error!(error = %e, "gRPC TLS configuration unusable; api not served");
                return;
            }
        };
    }
    let server = builder
        .layer(tonic::service::InterceptorLayer::new(TokenCheck(
            token.map(Arc::from),
        )))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(data)
        .add_service(control)
        .add_service(mesh_service)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.await;
            shutdown_state.end_streams();
            let _ = stopping_tx.send(());
        });
    // A graceful shut-down waits for every open call; streams other than `Subscribe`
    // (WatchMeshEvents, Publish, status streams) end when their client says so, which may be
    // never. After the grace period the server future is dropped, and with it (when the
    // runtime goes) every connection still open.
    let deadline = async {
        if stopping.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }
        () = deadline => {
            tracing::warn!(
                "gRPC calls still open {SHUTDOWN_GRACE:?} after shut-down began; cutting them"
            );
        }
    }
    pump.abort();
    verdict_pump.abort();
}

/// How long open gRPC calls may take to finish once shut-down begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
