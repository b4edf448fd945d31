//! The control core: one thread (a tokio current-thread runtime) that owns the node's view of
//! its peers and the control database.
//!
//! It runs the reconnect policy ([`dial_plan`]), link-state routing ([`routing`]) and SWIM
//! membership ([`membership`]), answers `AddSession` / `DropSession`, and records peers
//! (trust-on-first-use keys, addresses) in redb. It carries the control group's Raft RPCs over the mesh and runs its voter policy
//! ([`consensus`]); openraft itself runs on the `consensus` thread ([`raft::group`]).
//!
//! One closed [`ControlInput`] enum in, one `match`, then a fixed drain: dials due
//! ([`dial_plan::DialPlan::poll_dials`]) go to shards, then routing frames and a new forwarding
//! table, then membership datagrams and events; then the loop sleeps until the next deadline or
//! input.
//!
//! The loop does no disk write per event: writes are staged and committed together at most
//! [`persist::FLUSH_INTERVAL`] later ([`persist`]), and only answers that promise durability
//! flush first. A joiner's argon2id runs on a bounded worker thread ([`join_check`]), never here.

pub mod consensus;
pub mod dial_plan;
pub mod join_check;
pub mod lifecycle;
pub mod live;
pub mod lsa_auth;
pub mod lsdb;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod paths;
pub mod persist;
pub mod raft;
pub mod routing;
pub mod trust;
pub mod types;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use meshd_shards::{
    command::{ControlEvent, DialError, ShardInput},
    frame::{FrameType, TrafficClass},
    handle::ShardHandle,
    ownership::owner_shard,
    ring::Consumer,
};
use rand::{SeedableRng, rngs::StdRng};
use tokio::sync::oneshot;

pub use self::routing::{RoutingConfig, RoutingSnapshot};
use self::{
    dial_plan::{DialPlan, DialVerdict, Origin},
    join_check::{JOIN_CHECK_QUEUE, JoinChecker, JoinVerdict},
    lifecycle::{EVICTED_REASON, LEFT_REASON, Lifecycle, LifecycleRequest, STOPPED_REASON},
    lsa_auth::LsaAuth,
    membership::{Membership, MembershipConfig, NodeMeta},
    mesh::{MeshEvent, MeshEventKind, MeshSnapshot},
    metrics::{LinkCounters, LinkMeters},
    persist::Store,
    routing::Routing,
    trust::Trust,
};
use crate::storage::{ControlDb, PeerRecord, now_ms};

/// How often link counters are read and turned into metrics.
const METRICS_PERIOD: Duration = Duration::from_secs(1);

/// Goodbye reason that tells the peer not to re-dial.
pub const DROP_REASON: &str = "session dropped";

/// Requests from the api thread.
#[derive(Debug)]
pub enum ControlRequest {
    /// Link to `addr`; answer once the link is up or the dial failed.
    AddSession {
        /// Where.
        addr: SocketAddr,
        /// The peer's id and address, or why not.
        reply: oneshot::Sender<Result<(u64, SocketAddr), DialError>>,
    },
    /// Stop dialing `addr` (an `AddSession` that timed out).
    ForgetTarget {
        /// Which.
        addr: SocketAddr,
    },
    /// Close the link to `peer` and stop re-dialing it; answers whether a link existed.
    DropSession {
        /// Which.
        peer: u64,
        /// Whether there was a link.
        reply: oneshot::Sender<bool>,
    },
    /// The current routing view.
    Routing {
        /// Where to answer.
        reply: oneshot::Sender<Arc<RoutingSnapshot>>,
    },
    /// SeedMesh, JoinMesh, StartMesh, StopMesh, LeaveMesh, EvictNode.
    Lifecycle(LifecycleRequest),
    /// The member table and mesh health.
    Mesh {
        /// Where to answer.
        reply: oneshot::Sender<MeshSnapshot>,
    },
    /// Dial every node of the mesh that listens and has no direct link yet.
    EstablishFullLinks {
        /// The addresses now being dialed.
        reply: oneshot::Sender<Vec<SocketAddr>>,
    },
}

/// Everything that wakes the control loop.
#[derive(Debug)]
enum ControlInput {
    Shard(ControlEvent),
    Request(ControlRequest),
    Metrics(Vec<meshd_shards::stats::SessionSnapshot>),
    JoinVerdict(JoinVerdict),
    RaftCall(raft::network::RaftCall),
    RaftAnswer(consensus::RaftAnswer),
    Decision(raft::Decision),
    Committed(consensus::Committed),
    Timer,
    Stop,
}

/// What the control thread is started with.
pub struct ControlSetup {
    /// The control database (moved into the thread).
    pub db: ControlDb,
    /// Every shard's inbound ring.
    pub shards: Arc<[ShardHandle]>,
    /// Link events from the shards.
    pub events: Consumer<ControlEvent>,
    /// Requests from the api thread.
    pub requests: Consumer<ControlRequest>,
    /// Addresses from `network.peers`.
    pub config_peers: Vec<SocketAddr>,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// This node's id.
    pub local: u64,
    /// Where this node accepts links ("" behind NAT).
    pub local_listen: String,
    /// Routing settings.
    pub routing: RoutingConfig,
    /// SWIM timing.
    pub membership: MembershipConfig,
    /// This start's identity generation (grows with every start).
    pub generation: u32,
    /// What this node tells the mesh about itself.
    pub node_meta: NodeMeta,
    /// Where mesh events go (WatchMeshEvents).
    pub mesh_events: tokio::sync::broadcast::Sender<MeshEvent>,
    /// The stored mesh (seeded or joined), read at start.
    pub mesh_record: Option<meshd_proto::link::MeshRecord>,
    /// `mesh_id` from the config, used when there is no stored mesh.
    pub configured_mesh_id: String,
    /// The configured mesh's secret.
    pub configured_secret: Option<[u8; 32]>,
    /// This node's Ed25519 public key (what its certificates certify).
    pub public_key: [u8; 32],
    /// This node's identity key: signs its LSAs and notices, derives pair keys.
    pub signing_key: ed25519_dalek::SigningKey,
    /// Where pair keys are published for the shards and the api.
    pub key_book: Arc<meshd_shards::origin::KeyBook>,
    /// The api's tenant keys, whose secret follows the mesh.
    pub tenant_keys: crate::api::SharedTenantKeys,
    /// The control group (openraft runs on its own thread).
    pub consensus: raft::group::Consensus,
    /// openraft's outgoing RPCs, carried over the mesh by this thread.
    pub raft_calls: tokio::sync::mpsc::Receiver<raft::network::RaftCall>,
    /// The data stream groups (their RPCs travel with the control group's).
    pub stream_groups: crate::streams::group::groups::StreamGroups,
    /// Membership and configuration decisions the group applied.
    pub raft_decisions: tokio::sync::mpsc::Receiver<raft::Decision>,
    /// Who votes.
    pub raft_policy: raft::policy::Policy,
    /// Make this node the group's first voter at start when there is no group here yet
    /// (`consensus.bootstrap`: the seeding node of a mesh configured by file).
    pub raft_bootstrap: bool,
}

/// The running control thread.
pub struct ControlThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ControlThread {
    /// Starts the thread (and its join-check worker).
    pub fn start(setup: ControlSetup) -> std::io::Result<Self> {
        let (stop_tx, stop_rx) = oneshot::channel();
        let join_checks = JoinChecker::start(JOIN_CHECK_QUEUE, join_check::derive_password)?;
        let thread = thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                meshd_shards::priority::apply();
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "control runtime failed to start");
                        return;
                    }
                };
                runtime.block_on(run(setup, stop_rx, join_checks));
            })?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for the thread (closing the control database).
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Control {
    store: Store,
    /// The highest identity generation known to be durable; a renewal above it is written
    /// before any datagram carries it.
    durable_generation: u32,
    join_checks: JoinChecker,
    /// Joins refused because the join-check queue was full.
    joins_refused_busy: u64,
    shards: Arc<[ShardHandle]>,
    plan: DialPlan,
    rng: StdRng,
    waiting_adds: HashMap<SocketAddr, Vec<oneshot::Sender<Result<(u64, SocketAddr), DialError>>>>,
    linked: HashMap<u64, SocketAddr>,
    routing: Routing,
    meters: LinkMeters,
    last_metrics: Instant,
    membership: Membership,
    mesh_events: tokio::sync::broadcast::Sender<MeshEvent>,
    lifecycle: Lifecycle,
    lsa_auth: LsaAuth,
    trust: Trust,
    /// This node's identity key (LSAs, notices).
    signing_key: ed25519_dalek::SigningKey,
    /// The control group's RPCs and voter policy.
    raft: consensus::RaftPort,
}

async fn run(
    setup: ControlSetup,
    mut stop: oneshot::Receiver<()>,
    (join_checks, mut join_verdicts): (JoinChecker, tokio::sync::mpsc::Receiver<JoinVerdict>),
) {
    let now = Instant::now();
    let mut plan = DialPlan::new(setup.reconnect_min, setup.reconnect_max);
    for addr in &setup.config_peers {
        plan.add(*addr, Origin::Config, now);
    }
    match setup.db.dial_targets() {
        Ok(targets) => {
            for addr in targets {
                plan.add(addr, Origin::Added, now);
            }
        }
        Err(e) => tracing::error!(error = %e, "could not read saved dial targets"),
    }
    let mut routing = Routing::new(setup.local, setup.local_listen, setup.routing, now);
    let mut membership = Membership::new(
        setup.local,
        setup.generation,
        &setup.membership,
        rand::random(),
        setup.node_meta,
        now,
    );
    match setup.db.peers() {
        Ok(peers) => {
            let ids: Vec<u64> = peers.into_iter().map(|(id, _)| id).collect();
            routing.remember(ids.iter().copied());
            membership.remember(now, ids);
        }
        Err(e) => tracing::error!(error = %e, "could not read known peers"),
    }
    let (raft_port, mut raft_answers, mut raft_committed) =
        consensus::RaftPort::new(setup.consensus, setup.raft_policy);
    let raft_port = raft_port.with_stream_groups(setup.stream_groups);
    let mut raft_calls = setup.raft_calls;
    let mut raft_decisions = setup.raft_decisions;
    if setup.raft_bootstrap {
        let consensus = raft_port.consensus().clone();
        tokio::spawn(async move { consensus.bootstrap().await });
    }
    let mut control = Control {
        raft: raft_port,
        store: Store::new(setup.db),
        durable_generation: setup.generation,
        join_checks,
        joins_refused_busy: 0,
        shards: setup.shards,
        plan,
        rng: StdRng::from_entropy(),
        waiting_adds: HashMap::new(),
        linked: HashMap::new(),
        routing,
        meters: LinkMeters::default(),
        last_metrics: now,
        membership,
        mesh_events: setup.mesh_events,
        lifecycle: Lifecycle::new(
            setup.mesh_record,
            &setup.configured_mesh_id,
            setup.configured_secret,
            setup.local,
            setup.public_key,
            setup.tenant_keys,
        ),
        lsa_auth: LsaAuth::new(setup.local),
        trust: Trust::new(setup.local, setup.signing_key.clone(), setup.key_book),
        signing_key: setup.signing_key,
    };
    // The keys are in place before the first frame: notices are checked from the start.
    if let Some(public) = control.trust.publish() {
        control.membership.set_keys(public);
    }
    control
        .lifecycle
        .commands
        .push(lifecycle::ShardCommand::Credential);
    match control.store.db().evicted() {
        Ok(evicted) => {
            // Revoked: nothing signed by them is accepted.
            for node in &evicted {
                control.trust.revoke(*node);
                control.lsa_auth.revoke(*node);
            }
            control.membership.set_evicted(evicted);
        }
        Err(e) => tracing::error!(error = %e, "could not read evicted nodes"),
    }
    // The group's standing decisions (removed nodes, live settings) hold from the start.
    match raft::store::decisions(control.raft.consensus().db()) {
        Ok(decisions) => {
            for decision in decisions {
                control.handle_decision(decision, true);
            }
        }
        Err(e) => tracing::error!(error = %e, "could not read the control group's decisions"),
    }
    let events = setup.events;
    let requests = setup.requests;
    let (metrics_tx, mut metrics_rx) = tokio::sync::mpsc::channel(1);
    let mut metrics_tick = tokio::time::interval(METRICS_PERIOD);
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Order matters. Gossip before lifecycle: a leaving node's notice must be queued on
        // the shards ahead of the SetMesh that closes its links. Lifecycle before dials: a
        // join queues SetMesh and makes its entry point a due dial, and every shard must hold
        // the new mesh id before that dial, or its handshake still carries the old one.
        control.drain_routing().await;
        control.drain_membership().await;
        control.drain_lifecycle().await;
        control.start_due_dials().await;
        // Here, not only on the timer: a steady stream of inputs must not starve the flush.
        control.store.flush_if_due(Instant::now());
        let deadline = [
            control.store.deadline(),
            control.lifecycle.deadline(),
            control.plan.next_deadline(),
            control.routing.poll_timeout(),
            control.membership.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let input = tokio::select! {
            event = events.pop() => event.map_or(ControlInput::Stop, ControlInput::Shard),
            request = requests.pop() => request.map_or(ControlInput::Stop, ControlInput::Request),
            Some(snapshots) = metrics_rx.recv() => ControlInput::Metrics(snapshots),
            Some(verdict) = join_verdicts.recv() => ControlInput::JoinVerdict(verdict),
            Some(call) = raft_calls.recv() => ControlInput::RaftCall(call),
            Some(answer) = raft_answers.recv() => ControlInput::RaftAnswer(answer),
            Some(decision) = raft_decisions.recv() => ControlInput::Decision(decision),
            Some(committed) = raft_committed.recv() => ControlInput::Committed(committed),
            _ = metrics_tick.tick() => {
                control.request_metrics(metrics_tx.clone());
                ControlInput::Timer
            }
            () = sleep_until(deadline) => ControlInput::Timer,
            _ = &mut stop => ControlInput::Stop,
        };
        match input {
            ControlInput::Shard(event) => control.handle_event(event),
            ControlInput::Request(request) => control.handle_request(request).await,
            ControlInput::Metrics(snapshots) => control.handle_metrics(snapshots),
            ControlInput::JoinVerdict(verdict) => {
                control.handle_join_verdict(Instant::now(), verdict);
            }
            ControlInput::RaftCall(call) => control.send_raft_call(call).await,
            ControlInput::RaftAnswer(answer) => control.send_raft_answer(answer).await,
            ControlInput::Decision(decision) => control.handle_decision(decision, false),
            ControlInput::Committed(committed) => control.handle_committed(committed),
            ControlInput::Timer => {
                let now = Instant::now();
                control.lifecycle.renew_credential_if_due(now);
                control.routing.handle_timeout(now);
                control.membership.handle_timeout(now);
                control.handle_join_timeout(now);
                control.tick_consensus(now);
            }
            ControlInput::Stop => break,
        }
    }
    if let Err(e) = control.store.flush() {
        tracing::error!(error = %e, staged = control.store.staged(), "control database: staged writes lost at stop");
    }
    tracing::debug!(
        joins_refused_busy = control.joins_refused_busy,
        raft_frames_dropped = control.raft_dropped(),
        failed_commits = control.store.failed_commits(),
        "control loop stopped"
    );
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

impl Control {
    /// Hands a control-core frame to the shard owning `dst` (which routes it); false when the
    /// shards are gone.
    async fn send_frame(
        &self,
        dst: u64,
        frame_type: FrameType,
        class: TrafficClass,
        payload: bytes::Bytes,
    ) -> bool {
        let mut outgoing = meshd_shards::command::Outgoing {
            chunk: (0, 0),
            dst,
            frame_type,
            traffic_class: class,
            msg_id: 0,
            flow: 0,
            payload,
        };
        if !frame_type.is_control() {
            // A routed frame: its destination checks who sent it.
            let header = outgoing.header(self.local());
            match self.trust.seal(&header, &outgoing.payload) {
                Some(sealed) => outgoing.payload = sealed.into(),
                None => {
                    tracing::debug!(
                        dst,
                        "no certified key of the destination yet; frame dropped"
                    );
                    return true;
                }
            }
        }
        let shard = owner_shard(dst, self.shards.len());
        self.shards[shard]
            .push(ShardInput::Send(outgoing))
            .await
            .is_ok()
    }

    /// Sends membership datagrams (routed like data) and publishes membership events.
    async fn drain_membership(&mut self) {
        self.persist_generation();
        let critical = self.membership.census().health() == membership::Health::Critical;
        self.raft
            .consensus()
            .set_critical(critical && !self.lifecycle.is_stopped());
        while let Some((to, payload)) = self.membership.poll_transmit() {
            if !self
                .send_frame(to, FrameType::Gossip, TrafficClass::System, payload)
                .await
            {
                return;
            }
        }
        while let Some(membership_event) = self.membership.poll_event() {
            let now = Instant::now();
            match membership_event {
                membership::MembershipEvent::Evicted(node) => {
                    self.trust.revoke(node);
                    self.lsa_auth.revoke(node);
                    self.store.stage(now, |batch| {
                        batch.set_evicted(node, true);
                        batch.remove_peer(node);
                    });
                    self.cut_off(node);
                }
                membership::MembershipEvent::Admitted(node) => {
                    self.trust.unrevoke(node);
                    self.lsa_auth.unrevoke(node);
                    let linked = self.linked.contains_key(&node);
                    self.store.stage(now, |batch| {
                        batch.set_evicted(node, false);
                        // It joined again, perhaps with a new key; a link already up pinned
                        // the key it has now.
                        if !linked {
                            batch.remove_peer(node);
                        }
                    });
                }
                membership::MembershipEvent::Left(node) => {
                    self.trust.forget(node);
                    self.lsa_auth.forget(node);
                    self.store.stage(now, |batch| batch.remove_peer(node));
                }
                _ => {}
            }
            // Membership feeds routing: a node gone for good leaves the LSDB now. A dead one
            // stays (its neighbours already withdrew their links to it), so a false "dead"
            // costs no routes when it refutes.
            if let membership::MembershipEvent::Left(node)
            | membership::MembershipEvent::Evicted(node) = membership_event
            {
                self.routing.handle_member_gone(Instant::now(), node);
            }
            let event = MeshEvent::from_membership(membership_event);
            match event.kind {
                MeshEventKind::Dead | MeshEventKind::Left => {
                    tracing::warn!(node = event.node, kind = ?event.kind, "membership")
                }
                _ => tracing::info!(node = event.node, kind = ?event.kind, "membership"),
            }
            // No watcher is not an error.
            let _ = self.mesh_events.send(event);
        }
    }

    /// Sends queued routing frames to neighbours and publishes a new forwarding table when one
    /// is due.
    async fn drain_routing(&mut self) {
        self.learn_keys();
        while let Some((to, payload)) = self.routing.poll_transmit() {
            let payload = self.lsa_auth.attach(payload);
            if !self
                .send_frame(to, FrameType::Routing, TrafficClass::Control, payload)
                .await
            {
                return;
            }
        }
        if let Some(fib) = self.routing.poll_fib(Instant::now()) {
            tracing::debug!(epoch = fib.epoch(), "publishing forwarding table");
            for shard in self.shards.iter() {
                let _ = shard.push(ShardInput::Fib(Arc::clone(&fib))).await;
            }
        }
    }

    /// Keys certified by LSAs since the last call go to the trusted keys, and changed keys
    /// are published (shards, api, membership) before any frame that needs them.
    fn learn_keys(&mut self) {
        for (node, key) in self.lsa_auth.take_new_keys() {
            self.trust.learn(node, key);
        }
        if let Some(public) = self.trust.publish() {
            self.membership.set_keys(public);
        }
    }

    fn local(&self) -> u64 {
        self.membership.local().node
    }

    /// Asks every shard for its links' counters; the answer comes back as `Metrics`.
    fn request_metrics(
        &self,
        tx: tokio::sync::mpsc::Sender<Vec<meshd_shards::stats::SessionSnapshot>>,
    ) {
        let shards = Arc::clone(&self.shards);
        tokio::spawn(async move {
            let mut all = Vec::new();
            for shard in shards.iter() {
                let (reply, answer) = futures::channel::oneshot::channel();
                if shard.push(ShardInput::Sessions { reply }).await.is_err() {
                    return;
                }
                if let Ok(snapshots) = answer.await {
                    all.extend(snapshots);
                }
            }
            let _ = tx.send(all).await;
        });
    }

    fn handle_metrics(&mut self, snapshots: Vec<meshd_shards::stats::SessionSnapshot>) {
        let now = Instant::now();
        let period = now.duration_since(self.last_metrics);
        self.last_metrics = now;
        for snapshot in snapshots {
            let counters = LinkCounters {
                srtt_us: snapshot.srtt_us,
                bytes_sent: snapshot.bytes_sent,
                heartbeats_sent: snapshot.heartbeats_sent,
                heartbeat_acks: snapshot.heartbeat_acks,
            };
            let metrics = self.meters.handle_reading(snapshot.peer, counters, period);
            self.routing.handle_metrics(now, snapshot.peer, metrics);
        }
    }

    async fn start_due_dials(&mut self) {
        if self.lifecycle.is_stopped() {
            return;
        }
        for (addr, dial_id) in self.plan.poll_dials(Instant::now()) {
            // The shard that dials is chosen by address; the socket moves to the peer's owner
            // shard once the preamble names the peer.
            let shard = owner_shard(addr_hash(addr), self.shards.len());
            if self.shards[shard]
                .push(ShardInput::Dial { addr, dial_id })
                .await
                .is_err()
            {
                tracing::warn!(%addr, "shard stopped; dial dropped");
            }
        }
    }

    fn handle_event(&mut self, event: ControlEvent) {
        let now = Instant::now();
        match event {
            ControlEvent::LinkUp {
                peer, remote_addr, ..
            } => {
                if peer.guest {
                    // Only the join exchange crosses a guest link; it is not part of the mesh.
                    // The key it proved is what an admission will record.
                    let guests = &mut self.lifecycle.guest_keys;
                    if guests.len() < lifecycle::MAX_GUESTS || guests.contains_key(&peer.node_id) {
                        guests.insert(peer.node_id, peer.public_key);
                    }
                    return;
                }
                if self.membership.is_evicted(peer.node_id) {
                    tracing::info!(peer = peer.node_id, "refusing a link from an evicted node");
                    self.cut_off(peer.node_id);
                    return;
                }
                if self.lifecycle.is_stopped() {
                    self.lifecycle.commands.push(lifecycle::ShardCommand::Drop {
                        peer: peer.node_id,
                        reason: STOPPED_REASON.into(),
                    });
                    return;
                }
                // The handshake checked its certificate.
                self.trust.learn(peer.node_id, peer.public_key);
                self.linked.insert(peer.node_id, remote_addr);
                self.plan.handle_link_up(peer.node_id);
                self.routing
                    .handle_link_up(now, peer.node_id, remote_addr, &peer.listen_addr);
                self.membership.handle_link_up(now, peer.node_id);
                let _ = self
                    .mesh_events
                    .send(MeshEvent::new(MeshEventKind::LinkUp, peer.node_id));
                let record = PeerRecord {
                    public_key: peer.public_key,
                    listen_addr: peer.listen_addr.clone(),
                    last_seen_ms: now_ms(),
                };
                self.store
                    .stage(now, |batch| batch.upsert_peer(peer.node_id, record));
            }
            ControlEvent::LinkDown {
                guest: true, peer, ..
            } => {
                // Its LinkUp was ignored too; the peer's member link (if any) is separate. A
                // key exchange it left open ends with it.
                self.lifecycle.exchanges.remove(&peer);
                self.lifecycle.guest_keys.remove(&peer);
            }
            ControlEvent::LinkDown {
                peer,
                reason,
                goodbye,
                guest: false,
            } => {
                self.linked.remove(&peer);
                self.meters.remove(peer);
                self.routing.handle_link_down(now, peer);
                self.membership.handle_link_down(peer);
                let _ = self
                    .mesh_events
                    .send(MeshEvent::new(MeshEventKind::LinkDown, peer));
                let final_goodbye = [DROP_REASON, LEFT_REASON, EVICTED_REASON, STOPPED_REASON];
                if goodbye
                    .as_deref()
                    .is_some_and(|g| final_goodbye.contains(&g))
                {
                    tracing::info!(peer, "peer dropped the session; not re-dialing it");
                    self.forget_peer(peer);
                } else {
                    tracing::debug!(peer, %reason, "scheduling re-dial");
                    self.plan.handle_link_down(peer, now, &mut self.rng);
                }
            }
            ControlEvent::Join {
                from,
                frame_type,
                payload,
            } => self.handle_join_frame(now, from, frame_type, &payload),
            ControlEvent::Raft { from, payload } => self.handle_raft_frame(from, &payload),
            ControlEvent::Gossip { from, payload } => {
                self.membership.set_wall_clock(now_ms());
                self.membership.handle_data(now, from, &payload);
            }
            ControlEvent::Routing { from, payload } => {
                let routing = &self.routing;
                let checked = self
                    .lsa_auth
                    .check(now_ms(), &payload, |origin| routing.lsa_seq(origin));
                if let Err(refusal) = checked {
                    tracing::debug!(peer = from, %refusal, "refused an LSA");
                    return;
                }
                if !self.routing.handle_frame(now, from, &payload) {
                    tracing::debug!(peer = from, "dropped a malformed routing frame");
                }
                let routing = &self.routing;
                self.lsa_auth.settle(|origin| routing.lsa_seq(origin));
            }
            ControlEvent::DialDone {
                dial_id,
                addr,
                result,
            } => {
                if self.handle_join_dial(dial_id, &result) {
                    return;
                }
                let verdict = self.plan.handle_dial_done(
                    dial_id,
                    addr,
                    result.as_ref().map(|p| *p).map_err(|_| ()),
                    now,
                    &mut self.rng,
                );
                match (&verdict, &result) {
                    (DialVerdict::Linked { newly_added: true }, _) => {
                        self.store.stage(now, |batch| batch.add_dial_target(addr));
                    }
                    (DialVerdict::Retry(delay), Err(error)) => {
                        tracing::debug!(%addr, %error, ?delay, "dial failed; retrying");
                    }
                    _ => {}
                }
                if let Some(waiters) = self.waiting_adds.remove(&addr) {
                    // AddSession's answer promises the target survives a restart.
                    if let Err(e) = self.store.flush() {
                        tracing::error!(%addr, error = %e, "could not save dial target");
                    }
                    for waiter in waiters {
                        let _ = waiter.send(result.clone().map(|peer| (peer, addr)));
                    }
                }
            }
        }
    }

    async fn handle_request(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::AddSession { addr, reply } => {
                if let Some(peer) = self
                    .plan
                    .linked_peer(addr)
                    .filter(|p| self.linked.contains_key(p))
                {
                    let _ = reply.send(Ok((peer, addr)));
                    return;
                }
                self.plan.add(addr, Origin::Tentative, Instant::now());
                self.waiting_adds.entry(addr).or_default().push(reply);
            }
            ControlRequest::ForgetTarget { addr } => {
                self.waiting_adds.remove(&addr);
                if self.plan.linked_peer(addr).is_none() && self.plan.remove(addr) {
                    let now = Instant::now();
                    self.store
                        .stage(now, |batch| batch.remove_dial_target(addr));
                }
            }
            ControlRequest::Mesh { reply } => {
                let linked = |node| self.linked.contains_key(&node);
                let mut snapshot = MeshSnapshot::of(&self.membership, linked, Instant::now());
                snapshot.mesh_id = self.lifecycle.mesh_id.clone();
                // Without the secret and the key's hash: a snapshot leaves the control thread.
                snapshot.mesh = self.lifecycle.config().cloned().map(|mut config| {
                    config.mesh_secret = Default::default();
                    config.join_key_hash.clear();
                    config
                });
                snapshot.authority = self.lifecycle.authority();
                snapshot.mesh_state = match (&self.lifecycle.record, self.lifecycle.is_stopped()) {
                    (None, _) if self.lifecycle.mesh_id.is_empty() => "none",
                    (None, _) => "configured",
                    (Some(_), true) => "stopped",
                    (Some(_), false) => "active",
                };
                let _ = reply.send(snapshot);
            }
            ControlRequest::Lifecycle(request) => self.handle_lifecycle(request),
            ControlRequest::Routing { reply } => {
                let _ = reply.send(self.routing.snapshot());
            }
            ControlRequest::EstablishFullLinks { reply } => {
                let now = Instant::now();
                let mut dialed = Vec::new();
                let targets: Vec<(u64, String)> = self
                    .routing
                    .listen_addrs()
                    .iter()
                    .map(|(id, addr)| (*id, addr.clone()))
                    .collect();
                for (node, addr) in targets {
                    if self.routing.is_linked(node) {
                        continue;
                    }
                    if let Ok(addr) = addr.parse::<SocketAddr>() {
                        self.plan.add(addr, Origin::Tentative, now);
                        dialed.push(addr);
                    }
                }
                let _ = reply.send(dialed);
            }
            ControlRequest::DropSession { peer, reply } => {
                self.forget_peer(peer);
                // The answer promises the peer is not re-dialed, after a restart too.
                if let Err(e) = self.store.flush() {
                    tracing::error!(peer, error = %e, "could not forget the peer's dial targets");
                }
                let shard = owner_shard(peer, self.shards.len());
                let (tx, rx) = futures::channel::oneshot::channel();
                let input = ShardInput::DropPeer {
                    peer,
                    reason: DROP_REASON.into(),
                    reply: tx,
                };
                if self.shards[shard].push(input).await.is_err() {
                    let _ = reply.send(false);
                    return;
                }
                // Answer off the loop so a slow shard does not stall control.
                tokio::spawn(async move {
                    let _ = reply.send(rx.await.unwrap_or(false));
                });
            }
        }
    }

    fn forget_peer(&mut self, peer: u64) {
        let now = Instant::now();
        for (addr, persisted) in self.plan.remove_peer(peer) {
            if persisted {
                self.store
                    .stage(now, |batch| batch.remove_dial_target(addr));
            }
        }
    }

    /// Membership renewed this node's identity (it refuted a false "down"): the new
    /// generation is made durable before any datagram carries it, so a restart always takes a
    /// higher one. Renewals are rare (one per false "down"), so this one write is synchronous.
    fn persist_generation(&mut self) {
        let generation = self.membership.local().generation;
        if generation <= self.durable_generation {
            return;
        }
        match self
            .store
            .commit_now(|batch| batch.raise_generation(generation))
        {
            Ok(()) => {
                tracing::info!(generation, "identity renewed; generation recorded");
                self.durable_generation = generation;
            }
            // Left to the staged writes' retry (every flush interval): the datagrams go out
            // meanwhile, as membership must answer to stay alive.
            Err(e) => {
                tracing::error!(generation, error = %e, "could not record a renewed generation");
                self.store
                    .stage(Instant::now(), |batch| batch.raise_generation(generation));
                self.durable_generation = generation;
            }
        }
    }
}

fn addr_hash(addr: SocketAddr) -> u64 {
    let mut bytes = Vec::with_capacity(18);
    match addr.ip() {
        std::net::IpAddr::V4(ip) => bytes.extend_from_slice(&ip.octets()),
        std::net::IpAddr::V6(ip) => bytes.extend_from_slice(&ip.octets()),
    }
    bytes.extend_from_slice(&addr.port().to_le_bytes());
    crc32c::crc32c(&bytes) as u64
}
