//! Start-up and shut-down of one node: the order threads start and stop in.
//!
//! Start: config → memlock → control database and identity → TLS → rings → shards (bind the
//! link listener) → consensus thread (openraft on `raft.redb`) → control thread → api thread
//! (bind gRPC) → "meshd ready" on stdout.
//! Stop (SIGINT/SIGTERM): api stops taking requests → shards say goodbye to every peer and
//! stop → control thread stops, closing the control database → consensus thread stops.
//!
//! The stop is bounded: the api cuts calls still open after its grace period, and a watchdog
//! ends the process if the whole stop takes longer than [`SHUTDOWN_DEADLINE`] or a second
//! signal arrives, so an operator's SIGTERM never leaves a node hanging.

use std::{io::Write, sync::Arc, thread, time::Duration};

use anyhow::Context;
use meshd_shards::{
    command::{ApiEvent, ApiLanes, ControlEvent, EVENT_RING_BYTES},
    handshake::LocalHello,
    ring::{ring, weighed_ring},
    shard::{ShardConfig, Shards},
    tls::{self, TlsIdentity},
};
use rand::RngCore;

use crate::{
    api::supervisor::SupervisorLink,
    api::{ApiSetup, ApiThread},
    config::{Config, Resolved},
    control::{
        ControlSetup, ControlThread, RoutingConfig,
        lifecycle::{issue_credential, mesh_secret_for, start_mesh_id},
        lsdb::LsdbConfig,
        membership::{MembershipConfig, NodeMeta},
        mesh::MESH_EVENT_BACKLOG,
        paths::CostWeights,
        raft::{
            group::{ConsensusThread, RaftSettings},
            network::MeshNetwork,
            policy::Policy,
        },
    },
    storage::ControlDb,
    streams::{
        Streams, StreamsSetup,
        group::groups::{GroupSettings, GroupsThread},
    },
};

/// Runs a node until SIGINT or SIGTERM.
pub fn run(config: Config, resolved: Resolved) -> anyhow::Result<()> {
    // Before anything starts: a signal during start-up must not kill the node mid-write by
    // the default action, and is acted on once the node is up.
    let signals = Signals::install()?;
    check_io_uring()?;
    raise_memlock_limit();
    keep_large_buffers_in_the_heap();
    crate::storage::private_dir(&config.data_dir)?;
    let db = ControlDb::open(&config.data_dir)?;
    let (identity, created) = db.load_or_create_identity(config.node_id)?;
    if created {
        tracing::info!(node_id = identity.node_id, "created a new node identity");
    }
    let known_peers: Vec<(u64, [u8; 32])> = db
        .peers()?
        .into_iter()
        .map(|(id, record)| (id, record.public_key))
        .collect();
    let (tls_server, tls_client) = tls::configs(&TlsIdentity {
        cert_der: identity.tls_cert_der.clone(),
        key_der: identity.tls_key_der.clone(),
    })
    .context("building TLS configuration")?;

    // A seeded or joined mesh, stored in the control database, wins over `mesh_id` in the config.
    let mesh_record = db.mesh().context("reading the stored mesh")?;
    let mesh_id = start_mesh_id(mesh_record.as_ref(), &config.mesh_id);
    // Membership needs the mesh's credential, never only its name.
    let mesh_secret = mesh_secret_for(
        &mesh_id,
        mesh_record.as_ref(),
        &config.mesh_id,
        resolved.mesh_secret,
    );
    if !mesh_id.is_empty() && mesh_secret.is_none() {
        anyhow::bail!(
            "mesh_id = {mesh_id:?} is configured but no mesh secret is: set mesh_secret_file (or \
             MESHD_MESH_SECRET) to the mesh's secret, 64 hex digits (`meshd init --mesh-secret-file PATH` \
             writes a new one), or set mesh_id = \"\" to seed or join a mesh"
        );
    }
    let public_key = identity.signing_key.verifying_key().to_bytes();
    let tenant_keys: crate::api::SharedTenantKeys = Arc::new(std::sync::RwLock::new(
        crate::api::tenant::TenantKeys::new(mesh_secret, config.tenants.iter().cloned()),
    ));
    let (certificate, authority) =
        issue_credential(mesh_secret, &mesh_id, identity.node_id, public_key);

    // Pair keys for origin tags on routed frames: control publishes, shards open, the api
    // and control seal.
    let key_book = Arc::new(meshd_shards::origin::KeyBook::default());
    let capacity = config.runtime.ring_capacity;
    // Before any thread that applies it starts.
    meshd_shards::priority::set_control_nice(config.runtime.control_nice);
    let (control_events_tx, control_events_rx) =
        weighed_ring(capacity, EVENT_RING_BYTES, ControlEvent::weight);
    let (api_events_tx, api_events_rx) = weighed_ring(capacity, EVENT_RING_BYTES, ApiEvent::weight);
    let (api_verdicts_tx, api_verdicts_rx) =
        weighed_ring(capacity, EVENT_RING_BYTES, ApiEvent::weight);
    let (api_priority_tx, api_priority_rx) =
        weighed_ring(capacity, EVENT_RING_BYTES, ApiEvent::weight);
    let (control_requests_tx, control_requests_rx) = ring(capacity);

    let shard_config = ShardConfig {
        local: LocalHello {
            mesh_id: mesh_id.clone(),
            node_id: identity.node_id,
            boot_id: rand::thread_rng().next_u64(),
            listen_addr: resolved.listen.map(|a| a.to_string()).unwrap_or_default(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            certificate,
            authority,
            lane: 0,
            lanes: config.network.lanes.count(),
        },
        signing_key: identity.signing_key.clone(),
        tls_server,
        tls_client,
        listen: resolved.listen,
        n_shards: resolved.n_shards,
        pin_cores: config.runtime.pin_cores,
        heartbeat_interval: config.heartbeat(),
        heartbeat_misses: config.network.heartbeat_misses,
        max_payload_bytes: config.network.max_payload_bytes,
        link_queue_bytes: config.network.link_queue_bytes,
        lane_window_bytes: config.network.lane_window_bytes,
        handshake_timeout: Duration::from_millis(config.network.handshake_timeout_ms),
        write_timeout: Duration::from_millis(config.network.write_timeout_ms),
        max_pending_handshakes: config.network.max_pending_handshakes,
        ring_capacity: capacity,
        io_memory_bytes: config.runtime.io_memory_bytes,
        known_peers,
        key_book: Arc::clone(&key_book),
    };
    // One ring per stream worker; room for a burst of a large message's chunks, so a worker
    // busy with one fsync does not make the link drop what follows.
    let stream_workers = if config.streams.workers == 0 {
        resolved.n_shards
    } else {
        config.streams.workers
    };
    let (stream_frames_tx, stream_frames_rx): (Vec<_>, Vec<_>) = (0..stream_workers)
        .map(|_| {
            weighed_ring(
                capacity,
                EVENT_RING_BYTES.max(16 * config.streams.chunk_bytes),
                ApiEvent::weight,
            )
        })
        .unzip();
    let api_lanes = ApiLanes {
        data: api_events_tx,
        priority: api_priority_tx,
        verdicts: api_verdicts_tx,
        streams: stream_frames_tx.into(),
    };
    let shards = Shards::start(shard_config, control_events_tx, api_lanes)?;
    let shard_inputs: Arc<[_]> = shards.inputs().to_vec().into();

    let grpc_listener = std::net::TcpListener::bind(resolved.grpc_listen).with_context(|| {
        format!(
            "cannot listen for gRPC on {}; fix: free the port or change grpc.listen",
            resolved.grpc_listen
        )
    })?;
    let metrics_listener = match resolved.metrics_listen {
        Some(addr) => Some(std::net::TcpListener::bind(addr).with_context(|| {
            format!(
                "cannot listen for metrics on {addr}; fix: free the port or change metrics.listen"
            )
        })?),
        None => None,
    };
    let grpc_addr = grpc_listener.local_addr()?.to_string();
    let metrics_addr = match &metrics_listener {
        Some(listener) => listener.local_addr()?.to_string(),
        None => "none".to_owned(),
    };
    let generation = db
        .next_generation()
        .context("reading the identity generation")?;
    let (mesh_events, _) = tokio::sync::broadcast::channel(MESH_EVENT_BACKLOG);
    let mut capabilities = vec!["relay".to_owned()];
    if resolved.listen.is_some() {
        capabilities.push("listener".to_owned());
    }
    let node_meta = NodeMeta {
        node: identity.node_id,
        seq: 0,
        name: if config.membership.name.is_empty() {
            format!("node-{}", identity.node_id)
        } else {
            config.membership.name.clone()
        },
        version: env!("CARGO_PKG_VERSION").into(),
        capabilities,
        load_permille: 0,
    };
    // The control group's store: its own file, so its fsyncs never wait on the control
    // database's writer (redb has one writer per database).
    let raft_path = config.data_dir.join("raft.redb");
    if mesh_record.is_none() && config.mesh_id.is_empty() && raft_path.exists() {
        // No mesh: what is there is the group of a mesh this node left.
        tracing::info!("no mesh: dropping the control group state of the mesh this node left");
        std::fs::remove_file(&raft_path).context("removing the old control group's database")?;
    }
    let raft_db = Arc::new(
        redb::Database::create(&raft_path)
            .context("opening the control group's database (raft.redb)")?,
    );
    let (raft_calls_tx, raft_calls) = tokio::sync::mpsc::channel(config.runtime.ring_capacity);
    let (decided_tx, raft_decisions) = tokio::sync::mpsc::channel(config.runtime.ring_capacity);
    let consensus_section = &config.consensus;
    let consensus = ConsensusThread::start(
        identity.node_id,
        RaftSettings {
            heartbeat: Duration::from_millis(consensus_section.heartbeat_ms),
            election_timeout: Duration::from_millis(consensus_section.election_timeout_ms),
            snapshot_every: consensus_section.snapshot_every,
            keep_behind_snapshot: consensus_section.keep_behind_snapshot,
            write_deadline: Duration::from_millis(consensus_section.write_deadline_ms),
            retain_updates: consensus_section.retain_updates,
        },
        raft_db,
        raft_calls_tx.clone(),
        decided_tx,
        config.network.max_payload_bytes,
    )?;
    // The data stream groups: their own file and thread, so their fsyncs wait on nobody's.
    let groups_db = Arc::new(
        redb::Database::create(config.data_dir.join("stream-groups.redb"))
            .context("opening the stream groups' database (stream-groups.redb)")?,
    );
    let stream_groups = GroupsThread::start(
        identity.node_id,
        GroupSettings {
            max_groups: config.streams.max_groups,
            heartbeat: Duration::from_millis(consensus_section.heartbeat_ms),
            election_timeout: Duration::from_millis(consensus_section.election_timeout_ms),
            flush: Duration::from_millis(config.streams.group_flush_ms),
            write_deadline: Duration::from_millis(consensus_section.write_deadline_ms),
        },
        groups_db,
        MeshNetwork::new(raft_calls_tx.clone(), config.network.max_payload_bytes),
    )
    .context("starting the stream groups")?;
    let control = ControlThread::start(ControlSetup {
        db,
        shards: Arc::clone(&shard_inputs),
        events: control_events_rx,
        requests: control_requests_rx,
        config_peers: resolved.peers.clone(),
        reconnect_min: Duration::from_millis(config.network.reconnect_min_ms),
        reconnect_max: Duration::from_millis(config.network.reconnect_max_ms),
        local: identity.node_id,
        local_listen: shards
            .listen_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        routing: routing_config(&config),
        membership: MembershipConfig {
            probe_period: Duration::from_millis(config.membership.probe_period_ms),
            probe_rtt: Duration::from_millis(config.membership.probe_rtt_ms),
            suspect_to_down: Duration::from_millis(config.membership.suspect_to_down_ms),
            gossip_period: Duration::from_millis(config.membership.gossip_period_ms),
            ..MembershipConfig::default()
        },
        generation,
        node_meta,
        mesh_events: mesh_events.clone(),
        mesh_record,
        configured_mesh_id: config.mesh_id.clone(),
        configured_secret: resolved.mesh_secret,
        public_key,
        signing_key: identity.signing_key.clone(),
        key_book: Arc::clone(&key_book),
        tenant_keys: Arc::clone(&tenant_keys),
        consensus: consensus.handle(),
        raft_calls,
        raft_decisions,
        raft_policy: Policy {
            max_voters: consensus_section.max_voters,
            dead_grace: Duration::from_millis(consensus_section.dead_voter_grace_ms),
        },
        raft_bootstrap: consensus_section.bootstrap,
        stream_groups: stream_groups.handle(),
    })?;
    let stores = crate::backend::Stores::open(&crate::backend::BackendSetup {
        owner: identity.node_id,
        data_dir: config.data_dir.clone(),
        config: config.storage.clone(),
    })
    .context("opening the storage backend")?;
    tracing::info!(
        backend = stores.primary.kind().name(),
        redis = stores.redis.is_some(),
        "storage ready"
    );
    let streams = Streams::start(StreamsSetup {
        node_id: identity.node_id,
        store: Arc::clone(&stores.primary),
        config: config.streams.clone(),
        shards: Arc::clone(&shard_inputs),
        key_book: Arc::clone(&key_book),
        tenant_keys: Arc::clone(&tenant_keys),
        frames: stream_frames_rx,
        groups: stream_groups.handle(),
    })
    .context("starting the stream workers")?;
    let api = ApiThread::start(ApiSetup {
        node_id: identity.node_id,
        listener: grpc_listener,
        metrics_listener,
        supervisor: config.supervisor.enabled.then(|| SupervisorLink {
            address: config.supervisor.address.clone(),
            heartbeat: Duration::from_millis(config.supervisor.heartbeat_ms),
            info: meshd_proto::supervisor::ServiceInfo {
                name: "mesh".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                node_id: identity.node_id,
                grpc_address: grpc_addr.clone(),
                metrics_address: if metrics_addr == "none" {
                    String::new()
                } else {
                    metrics_addr.clone()
                },
                capabilities: vec![
                    "links".into(),
                    "routing".into(),
                    "membership".into(),
                    "consensus".into(),
                    "streams".into(),
                ],
            },
        }),
        shards: shard_inputs,
        congestion: shards.congestion(),
        congestion_wait: Duration::from_millis(
            config.network.write_timeout_ms + 2 * config.network.heartbeat_ms,
        ),
        control: control_requests_tx,
        events: api_events_rx,
        priority_events: api_priority_rx,
        verdicts: api_verdicts_rx,
        max_payload_bytes: config.network.max_payload_bytes,
        subscriber_queue: config.grpc.subscriber_queue,
        tracked_messages: config.grpc.tracked_messages,
        default_timeout_seconds: config.grpc.default_timeout_seconds,
        generation,
        mesh_events,
        tenant_keys,
        key_book,
        tls: resolved.grpc_tls.clone(),
        token: resolved.grpc_token.clone(),
        consensus: consensus.handle(),
        streams: Arc::clone(&streams),
        stores,
        platform: crate::api::platform::PlatformSync {
            every: Duration::from_millis(config.storage.sync_ms),
            runtime_config: runtime_config(&config),
        },
    })?;

    let listen = shards
        .listen_addr()
        .map_or_else(|| "none".to_owned(), |a| a.to_string());
    // One machine-readable line: scripts and the test harness wait for it.
    println!(
        "meshd ready node_id={} grpc={} listen={} shards={} mesh_id={} metrics={}",
        identity.node_id, api.local_addr, listen, resolved.n_shards, mesh_id, metrics_addr
    );
    let _ = std::io::stdout().flush();
    // Every database is open by now: each file in the data directory only for this user,
    // whatever the umask was.
    if let Err(e) = crate::storage::private_files(&config.data_dir) {
        tracing::warn!(error = %e, "could not make the data directory's files private");
    }
    tracing::info!(node_id = identity.node_id, grpc = %api.local_addr, %listen, "meshd running");

    let watchdog = signals.wait()?;
    api.stop();
    streams.stop();
    stream_groups.stop();
    shards.shutdown();
    control.stop();
    consensus.stop();
    watchdog.finished();
    tracing::info!("meshd stopped");
    Ok(())
}

/// The config in force by top-level key, for `mesh_runtime_config` (secrets are never
/// serialized: see `config`).
fn runtime_config(config: &Config) -> Vec<(String, serde_json::Value)> {
    match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "the config could not be written out for the platform");
            Vec::new()
        }
    }
}

fn weights([alpha, beta, gamma, delta, epsilon]: [f64; 5]) -> CostWeights {
    CostWeights {
        alpha,
        beta,
        gamma,
        delta,
        epsilon,
    }
}

fn routing_config(config: &Config) -> RoutingConfig {
    let routing = &config.routing;
    RoutingConfig {
        k_paths: routing.k_paths,
        debounce: Duration::from_millis(routing.recompute_debounce_ms),
        weights: weights(routing.default_weights()),
        class_weights: routing
            .class_weights()
            .into_iter()
            .map(|(class, w)| (class, weights(w)))
            .collect(),
        lsdb: LsdbConfig {
            refresh_interval: Duration::from_secs(routing.lsa_refresh_s),
            max_age: Duration::from_secs(routing.lsa_max_age_s),
            retransmit_interval: Duration::from_millis(routing.lsa_retransmit_ms),
            ..LsdbConfig::default()
        },
    }
}

/// Longest an orderly stop may take once a signal asked for it; then the process exits.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// SIGINT / SIGTERM, served by a thread of their own ("signals") for the whole life of the
/// process: once the handlers are installed the kernel's default action no longer applies,
/// so somebody must still be listening while the node stops, or a second signal would be
/// ignored as well.
struct Signals {
    first: std::sync::mpsc::Receiver<&'static str>,
    finished: tokio::sync::oneshot::Sender<()>,
}

/// Held while the node stops; [`Self::finished`] disarms the watchdog.
struct Watchdog(tokio::sync::oneshot::Sender<()>);

impl Watchdog {
    fn finished(self) {
        let _ = self.0.send(());
    }
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("signal runtime")?;
        let (mut term, mut int) = {
            let _context = runtime.enter();
            (
                signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            )
        };
        let (first_tx, first) = std::sync::mpsc::channel();
        let (finished, mut finished_rx) = tokio::sync::oneshot::channel::<()>();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let name = tokio::select! {
                        Some(()) = term.recv() => "SIGTERM",
                        Some(()) = int.recv() => "SIGINT",
                        // The node stopped without a signal (a start-up error): nothing to do.
                        _ = &mut finished_rx => return,
                    };
                    if first_tx.send(name).is_err() {
                        return;
                    }
                    let again = tokio::select! {
                        Some(()) = term.recv() => "SIGTERM",
                        Some(()) = int.recv() => "SIGINT",
                        _ = finished_rx => return,
                        () = tokio::time::sleep(SHUTDOWN_DEADLINE) => {
                            tracing::error!(
                                "shutdown did not finish within {SHUTDOWN_DEADLINE:?} of {name}; \
                                 exiting without waiting any longer"
                            );
                            std::process::exit(1);
                        }
                    };
                    tracing::error!("{again} during shutdown: exiting at once");
                    std::process::exit(1);
                });
            })
            .context("starting the signal thread")?;
        Ok(Self { first, finished })
    }

    /// Waits for the first SIGINT or SIGTERM; from then on the watchdog runs.
    fn wait(self) -> anyhow::Result<Watchdog> {
        let name = self
            .first
            .recv()
            .context("the signal thread stopped before any signal")?;
        tracing::info!(
            "{name}: shutting down, telling peers goodbye (at most {SHUTDOWN_DEADLINE:?}; \
             a second signal exits at once)"
        );
        Ok(Watchdog(self.finished))
    }
}

/// Shards need io_uring; a kernel that disables it gets a clear error instead of a panic deep
/// inside the executor.
fn check_io_uring() -> anyhow::Result<()> {
    let setting = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    match setting.trim() {
        "2" => anyhow::bail!(
            "io_uring is disabled on this host (kernel.io_uring_disabled = 2); \
             fix: sysctl -w kernel.io_uring_disabled=0 (see tuning/99-meshd.sysctl.conf)"
        ),
        "1" => tracing::warn!(
            "kernel.io_uring_disabled = 1: only members of kernel.io_uring_group may use io_uring; \
             set it to 0 if shards fail to start (see tuning/)"
        ),
        _ => {}
    }
    Ok(())
}

/// Large buffers (a link's frame batches, TLS records' plaintext, a 64 KiB message's frame)
/// are made and freed thousands of times a second. glibc serves every one past its mmap
/// threshold with a fresh mapping: page faults, zeroed pages and an munmap per buffer, which
/// cost 5-10 % of the 64 KiB throughput (perf, `loadgen bench --size 65536`). Keeping them in
/// the heap lets the allocator reuse them; the trim threshold bounds what an idle node keeps.
fn keep_large_buffers_in_the_heap() {
    const MMAP_THRESHOLD: libc::c_int = 4 << 20;
    const TRIM_THRESHOLD: libc::c_int = 32 << 20;
    // SAFETY: mallopt only sets allocator parameters (it takes the arenas' own locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// io_uring registers buffer memory, which counts against RLIMIT_MEMLOCK. Raise the soft
/// limit to the hard limit (root may raise both); warn when it stays low.
fn raise_memlock_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) != 0 {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) == 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        let _ = libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised);
        if limit.rlim_max != libc::RLIM_INFINITY && limit.rlim_max < (64 << 20) {
            tracing::warn!(
                memlock_bytes = limit.rlim_max,
                "RLIMIT_MEMLOCK is low for io_uring; recommended at least 64 MiB (see tuning/)"
            );
        }
    }
}
