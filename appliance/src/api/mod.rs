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
mod desk;
mod known;
mod mesh;
mod metrics;
mod peer_reports;
pub mod platform;
mod publish;
mod recent;
mod reports;
mod saturation;
mod send;

pub(crate) use self::send::{append_tag, wire_payload};
mod streams;
pub mod supervisor;
pub mod tenant;
pub mod tracker;
mod updates;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicBool},
    thread,
    time::Duration,
};

use meshd_proto::mesh::{mesh_control_server::MeshControlServer, mesh_data_server::MeshDataServer};
use meshd_shards::{
    command::{ApiEvent, ShardInput},
    congestion::Congestion,
    handle::ShardHandle,
    origin::{KeyBook, KeyCache},
    ownership::owner_shard,
    ring::{Consumer, Producer},
};
use tokio::sync::oneshot;
use tonic::Status;

use self::{
    auth::TokenCheck,
    desk::{Subscriber, delivery_pump},
    known::{DstSeqs, KNOWN_NODES_REFRESH, KnownNodes, WaitingSeqs},
    recent::RecentDeliveries,
    reports::ReportBatch,
    tracker::MessageTracker,
};
use crate::{
    control::{
        ControlRequest, RoutingSnapshot,
        mesh::{MeshEvent, MeshSnapshot},
    },
    storage::now_ms,
};

/// State shared by the services (all on the api thread; the mutexes are never contended).
pub(crate) struct ApiState {
    pub(crate) node_id: u64,
    pub(crate) shards: Arc<[ShardHandle]>,
    /// Bytes the shards hold parked per destination (a destination that stops reading).
    congestion: Arc<Congestion>,
    pub(crate) tenant_keys: SharedTenantKeys,
    /// Pair keys for the origin tags of frames this node sends (`meshd_shards::origin`).
    key_book: Arc<KeyBook>,
    key_cache: Mutex<KeyCache>,
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
    /// Destinations whose subscribers said they are near full: sends to them are held.
    saturation: Mutex<saturation::Saturation>,
    /// Set once shut-down begins: no new `Subscribe` stream is opened after the open ones
    /// were ended.
    closing: AtomicBool,
    /// The mesh control group.
    pub(crate) consensus: crate::control::raft::group::Consensus,
    /// The stream workers.
    pub(crate) streams: Arc<crate::streams::Streams>,
    /// The storage backends (health, platform tables).
    pub(crate) stores: crate::backend::Stores,
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

    pub(crate) fn saturation(&self) -> std::sync::MutexGuard<'_, saturation::Saturation> {
        self.saturation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    /// Every link of this node as its shard sees it (each shard asked in turn).
    pub(crate) async fn sessions(
        &self,
    ) -> Result<Vec<meshd_shards::stats::SessionSnapshot>, Status> {
        let mut sessions = Vec::new();
        for shard in self.shards.iter() {
            let (reply, answer) = futures::channel::oneshot::channel();
            if shard.push(ShardInput::Sessions { reply }).await.is_err() {
                return Err(Status::unavailable("the node is shutting down"));
            }
            sessions.extend(
                answer
                    .await
                    .map_err(|_| Status::unavailable("a shard stopped while answering"))?,
            );
        }
        Ok(sessions)
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
    /// Bound metrics listener, when a metrics port is configured.
    pub metrics_listener: Option<std::net::TcpListener>,
    /// The supervisor to register with, when `[supervisor] enabled`.
    pub supervisor: Option<supervisor::SupervisorLink>,
    /// Every shard's ring.
    pub shards: Arc<[ShardHandle]>,
    /// The shards' parked bytes per destination.
    pub congestion: Arc<Congestion>,
    /// How long a send to a congested destination waits for it to drain (the shards' own
    /// patience with a parked frame).
    pub congestion_wait: Duration,
    /// Requests to the control thread.
    pub control: Producer<ControlRequest>,
    /// Client `Data` frames for this node, from the shards.
    pub events: Consumer<ApiEvent>,
    /// System and DB-update `Data` frames for this node, from the shards.
    pub priority_events: Consumer<ApiEvent>,
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
    /// Pair keys published by the control thread.
    pub key_book: Arc<KeyBook>,
    /// PEM certificate chain and key to serve TLS with.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// The bearer token every call must carry.
    pub token: Option<String>,
    /// The mesh control group.
    pub consensus: crate::control::raft::group::Consensus,
    /// The stream workers.
    pub streams: Arc<crate::streams::Streams>,
    /// The storage backends.
    pub stores: crate::backend::Stores,
    /// The platform tables' refresh.
    pub platform: platform::PlatformSync,
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
        key_book: setup.key_book,
        key_cache: Mutex::new(KeyCache::default()),
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
        saturation: Mutex::default(),
        waiting_seqs: Mutex::new(WaitingSeqs {
            session: rand::random::<u64>() | 1,
            per_dst: HashMap::new(),
        }),
        closing: AtomicBool::new(false),
        consensus: setup.consensus,
        streams: setup.streams,
        stores: setup.stores,
    });
    let events = setup.events;
    if let Some(listener) = setup.metrics_listener {
        tokio::spawn(metrics::serve(Arc::clone(&state), listener));
    }
    let supervisor_stop = setup.supervisor.map(|link| {
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(supervisor::run_link(Arc::clone(&state), link, stopped));
        stop
    });
    let (platform_stop, platform_stopped) = oneshot::channel();
    let platform = tokio::spawn(platform::run(
        Arc::clone(&state),
        setup.platform,
        platform_stopped,
    ));
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
    // Client data, and system and DB data, each with a pump of its own: a slow subscriber's
    // budgeted waits hold back only the client pump.
    let pump = tokio::spawn(delivery_pump(Arc::clone(&state), events, setup_generation));
    let priority_pump = tokio::spawn(delivery_pump(
        Arc::clone(&state),
        setup.priority_events,
        setup_generation,
    ));

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
    let updates = meshd_proto::link::mesh_data_service_server::MeshDataServiceServer::new(
        updates::UpdatesService::new(Arc::clone(&state)),
    );
    // Stream messages are up to streams.max_message_bytes each.
    let stream_message = state.streams.config.max_message_bytes + (64 << 10);
    let mesh_service = meshd_proto::link::mesh_service_server::MeshServiceServer::new(
        control::ControlService::new(Arc::clone(&state)),
    )
    .max_decoding_message_size(stream_message.max(max_message))
    .max_encoding_message_size(max_message);
    let updates = updates
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(stream_message.max(max_message));
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
        .add_service(updates)
        .add_service(
            meshd_proto::supervisor::service_controller_service_server::ServiceControllerServiceServer::new(
                supervisor::Controller::new(Arc::clone(&state)),
            ),
        )
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
    // The supervisor hears that this node goes (bounded: it may be away).
    let _ = platform_stop.send(());
    let _ = platform.await;
    if let Some(stop) = supervisor_stop {
        let (done, unregistered) = oneshot::channel();
        if stop.send(done).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(4), unregistered).await;
        }
    }
    pump.abort();
    priority_pump.abort();
    verdict_pump.abort();
}

/// How long open gRPC calls may take to finish once shut-down begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
