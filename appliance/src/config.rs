//! Node configuration: TOML file, then `MESHD_…` environment overrides, then validation.
//!
//! Every key can be overridden from the environment: `MESHD_` + the key path in upper case,
//! sections joined by a double underscore (`network.listen` → `MESHD_NETWORK__LISTEN`).
//! `MESH_ROUTING_ID`, the platform's variable, sets `node_id` too and wins over both.
//! [`Config::load`] returns either a config every other module can trust, or an error that names
//! the key and says how to fix it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use meshd_shards::frame::TrafficClass;
use serde::{Deserialize, Serialize};

/// Text that must never reach a log: its `Debug` is redacted.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A validated node configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id (u64, assigned by the platform). 0 or absent: use the id stored in the
    /// data directory, or generate one on first start.
    #[serde(default)]
    pub node_id: u64,
    /// Where the node keeps its control database (identity, peers).
    pub data_dir: PathBuf,
    /// Nodes only link with nodes of the same mesh id. "" = no mesh until `SeedMesh` or
    /// `JoinMesh`; a seeded or joined mesh (kept in the data directory) wins over this key.
    #[serde(default = "default_mesh_id")]
    pub mesh_id: String,
    /// The secret of the configured mesh (64 hex digits): whoever holds it is a member (see
    /// `meshd_shards::credential`). Set it from the environment (`MESHD_MESH_SECRET`) or use
    /// `mesh_secret_file`; it is never printed. Not needed for a seeded or joined mesh.
    #[serde(default, skip_serializing)]
    pub mesh_secret: Option<SecretText>,
    /// A file holding the mesh secret (64 hex digits), readable by meshd only.
    #[serde(default)]
    pub mesh_secret_file: Option<PathBuf>,
    /// Tenants whose end-to-end encrypted messages this node seals and opens.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Peer links.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The gRPC api.
    #[serde(default)]
    pub grpc: GrpcConfig,
    /// Link-state routing.
    #[serde(default)]
    pub routing: RoutingSection,
    /// SWIM membership.
    #[serde(default)]
    pub membership: MembershipSection,
    /// The mesh control group (Raft).
    #[serde(default)]
    pub consensus: ConsensusSection,
    /// Client data streams.
    #[serde(default)]
    pub streams: StreamsSection,
    /// The metrics port (Prometheus).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The platform supervisor.
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// Where streams, state and the platform tables are kept.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Threads and rings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[network]`: peer links.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Address to accept links on (`IP:port`). Leave out for a node behind NAT that only dials.
    pub listen: Option<String>,
    /// Addresses this node dials at start and keeps dialing (`IP:port`).
    pub peers: Vec<String>,
    /// Interval between heartbeats; RTT is measured on them.
    pub heartbeat_ms: u64,
    /// Heartbeat intervals without traffic before a link is declared down (3 × 100 ms by default).
    pub heartbeat_misses: u32,
    /// First reconnect delay; doubles per failure up to `reconnect_max_ms`, with jitter.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Limit on connect + TLS + WebSocket + link handshake.
    pub handshake_timeout_ms: u64,
    /// Longest a write to a link may make no progress before the link is closed (the peer
    /// stopped reading). Relayed frames wait at most half of it for room at their next hop.
    pub write_timeout_ms: u64,
    /// Largest frame payload (a message with its headers). Bigger sends are refused.
    pub max_payload_bytes: usize,
    /// Bytes queued per link before senders wait (backpressure). Size it to one RTT of
    /// bandwidth: 1 MiB covers 10 Gbit/s at 0.8 ms.
    pub link_queue_bytes: usize,
    /// Bytes each connection may have written and its peer not yet confirmed reading: kept
    /// until confirmed (so a broken link reports what may be lost) and the connection's credit.
    /// Size it to bandwidth × RTT (16 MiB: 13 Gbit/s at 10 ms); it is also what a relay absorbs
    /// while its next hop is slow (4 MiB dropped frames past the relay wait under a flood).
    pub lane_window_bytes: usize,
    /// Connections in set-up on the whole node; more are closed at once (a flood guard).
    pub max_pending_handshakes: usize,
    /// `split` (default): each link gets a control lane (heartbeats, routing, gossip, Raft,
    /// reports, acks) and a priority lane (system and internal-DB traffic) beside its data
    /// connection. `collapsed`: one connection (constrained peers, tests). Both ends must agree.
    pub lanes: Lanes,
}

/// `network.lanes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lanes {
    /// A control lane and a priority lane beside the data connection.
    #[default]
    Split,
    /// One connection per link.
    Collapsed,
}

impl Lanes {
    /// What `Hello.lanes` says.
    pub fn count(self) -> u32 {
        match self {
            Self::Split => 3,
            Self::Collapsed => 1,
        }
    }
}

/// `[grpc]`: the api `core` calls.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// gRPC address (`IP:port`). Plaintext without credentials is allowed on loopback only
    /// (where `core` runs); any other address needs TLS and a token.
    pub listen: String,
    /// PEM certificate chain the api serves TLS with.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key_file: Option<PathBuf>,
    /// File holding the bearer token every call must carry (`authorization: Bearer <token>`),
    /// at least 16 characters. Or `MESHD_GRPC__TOKEN`.
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (from the environment; never printed).
    #[serde(skip_serializing)]
    pub token: Option<SecretText>,
    /// Messages buffered per `Subscribe` stream before deliveries to it fail.
    pub subscriber_queue: usize,
    /// Sent messages whose status is remembered for `QueryMessageStatus` and acks.
    pub tracked_messages: usize,
    /// Wait limit of `Send` in a waiting mode when the request gives none.
    pub default_timeout_seconds: u32,
}

/// `[routing]`: link-state routing and path computation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSection {
    /// Paths computed per destination (Yen's k); traffic spreads over their distinct first hops.
    pub k_paths: usize,
    /// Wait after a topology change before recomputing routes (a burst costs one computation).
    pub recompute_debounce_ms: u64,
    /// Each node re-advertises its links this often even without change.
    pub lsa_refresh_s: u64,
    /// An advertisement not refreshed for this long is dropped (at least 3 × lsa_refresh_s).
    pub lsa_max_age_s: u64,
    /// Unacknowledged advertisements are resent to a neighbour after this long.
    pub lsa_retransmit_ms: u64,
    /// Cost = alpha·latency_ms + beta·(1 Gbit/s ÷ bandwidth) + gamma·utilisation + delta·loss +
    /// epsilon per hop.
    pub alpha: f64,
    /// See `alpha`.
    pub beta: f64,
    /// See `alpha`.
    pub gamma: f64,
    /// See `alpha`.
    pub delta: f64,
    /// See `alpha`; must be positive so every hop costs something.
    pub epsilon: f64,
    /// Coefficients of one traffic class (`system`, `db_update`, `client`) that routes by its
    /// own costs, as `[routing.classes.client]`; a coefficient left out is the one above.
    pub classes: BTreeMap<String, ClassWeights>,
}

/// `[routing.classes.<class>]`: a traffic class's own cost coefficients.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassWeights {
    /// Weight of the one-way latency in milliseconds.
    pub alpha: Option<f64>,
    /// Weight of 1 Gbit/s ÷ bandwidth.
    pub beta: Option<f64>,
    /// Weight of the utilisation fraction.
    pub gamma: Option<f64>,
    /// Weight of the loss fraction.
    pub delta: Option<f64>,
    /// Charge per hop (positive).
    pub epsilon: Option<f64>,
}

/// Traffic classes that may route by their own coefficients, by their config name.
pub const ROUTED_CLASSES: [(&str, TrafficClass); 3] = [
    ("system", TrafficClass::System),
    ("db_update", TrafficClass::DbUpdate),
    ("client", TrafficClass::Client),
];

impl RoutingSection {
    /// The default coefficients as `(alpha, beta, gamma, delta, epsilon)`.
    pub fn default_weights(&self) -> [f64; 5] {
        [self.alpha, self.beta, self.gamma, self.delta, self.epsilon]
    }

    /// The coefficients of every class configured under `[routing.classes]`, defaults filled in.
    pub fn class_weights(&self) -> Vec<(TrafficClass, [f64; 5])> {
        ROUTED_CLASSES
            .iter()
            .filter_map(|(name, class)| {
                let w = self.classes.get(*name)?;
                Some((
                    *class,
                    [
                        w.alpha.unwrap_or(self.alpha),
                        w.beta.unwrap_or(self.beta),
                        w.gamma.unwrap_or(self.gamma),
                        w.delta.unwrap_or(self.delta),
                        w.epsilon.unwrap_or(self.epsilon),
                    ],
                ))
            })
            .collect()
    }
}

impl Default for RoutingSection {
    fn default() -> Self {
        Self {
            k_paths: 3,
            recompute_debounce_ms: 20,
            lsa_refresh_s: 30,
            lsa_max_age_s: 95,
            lsa_retransmit_ms: 200,
            alpha: 1.0,
            beta: 0.5,
            gamma: 2.0,
            delta: 50.0,
            epsilon: 0.1,
            classes: BTreeMap::new(),
        }
    }
}

/// `[membership]`: SWIM timing and what this node tells the mesh about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipSection {
    /// Operator-facing name ("" = `node-<id>`).
    pub name: String,
    /// One member is probed per period; detection time grows with it.
    pub probe_period_ms: u64,
    /// Wait for a direct ack before asking others to probe (below probe_period_ms).
    pub probe_rtt_ms: u64,
    /// A suspect that does not refute for this long is declared dead. Raise it on lossy
    /// networks: false positives fall, detection slows.
    pub suspect_to_down_ms: u64,
    /// Membership updates are gossiped to a few members this often.
    pub gossip_period_ms: u64,
}

impl Default for MembershipSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            probe_period_ms: 500,
            probe_rtt_ms: 200,
            suspect_to_down_ms: 3000,
            gossip_period_ms: 200,
        }
    }
}

/// `[consensus]`: the mesh control group (openraft).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusSection {
    /// Make this node the group's first voter when it has no group yet. Only for a mesh
    /// configured by file (`mesh_id`), on exactly one node; `SeedMesh` does this by itself.
    pub bootstrap: bool,
    /// At most this many voters (odd); more members are learners.
    pub max_voters: usize,
    /// The leader's heartbeat.
    pub heartbeat_ms: u64,
    /// Election timeout's lower bound (the upper is twice it); at least 3 heartbeats.
    pub election_timeout_ms: u64,
    /// A voter declared dead by SWIM for this long is replaced by a live learner.
    pub dead_voter_grace_ms: u64,
    /// A snapshot is taken after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot for followers that lag a little.
    pub keep_behind_snapshot: u64,
    /// How long a write waits to commit before the caller is told it may still commit.
    pub write_deadline_ms: u64,
    /// Updates kept for subscribers and RequestDatabaseSync, in log indexes: older ones are
    /// dropped (a subscriber further behind is told to resync).
    pub retain_updates: u64,
}

impl Default for ConsensusSection {
    fn default() -> Self {
        Self {
            bootstrap: false,
            max_voters: 5,
            heartbeat_ms: 200,
            election_timeout_ms: 1000,
            dead_voter_grace_ms: 10_000,
            snapshot_every: 5000,
            keep_behind_snapshot: 1000,
            write_deadline_ms: 5000,
            retain_updates: 1_000_000,
        }
    }
}

/// `[streams]`: exactly-once client data streams.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsSection {
    /// Stream worker threads (each with its own `streams-<i>.redb`); 0 = one per shard.
    pub workers: usize,
    /// Largest message (bytes); larger than a frame is sent in chunks.
    pub max_message_bytes: usize,
    /// Data bytes per chunk of a large message (below `network.max_payload_bytes`).
    pub chunk_bytes: usize,
    /// Streams (as source or target) one worker keeps.
    pub max_streams: usize,
    /// Messages published and not yet processed by every target, per stream.
    pub max_outstanding: u64,
    /// Messages a target holds unprocessed per stream: the most credit it grants.
    pub max_backlog: u32,
    /// Bytes of large messages being reassembled, per worker.
    pub reassembly_bytes: u64,
    /// A publish not acknowledged in this time is answered DEADLINE_EXCEEDED (the retry with
    /// the same seqs is safe).
    pub publish_timeout_ms: u64,
    /// Go-back-N retransmission timeout.
    pub retransmit_ms: u64,
    /// Data stream groups (one per set of nodes streams run between) this node takes part
    /// in at most; a stream between a new set is refused past it.
    pub max_groups: usize,
    /// How often a node writes what it queued for a group (its offsets, stream metadata):
    /// the delay between a target processing a message and the source releasing it.
    pub group_flush_ms: u64,
}

impl Default for StreamsSection {
    fn default() -> Self {
        Self {
            workers: 0,
            max_message_bytes: 64 << 20,
            chunk_bytes: 1 << 20,
            max_streams: 10_000,
            max_outstanding: 65_536,
            max_backlog: 8192,
            reassembly_bytes: 256 << 20,
            publish_timeout_ms: 10_000,
            retransmit_ms: 400,
            max_groups: 256,
            group_flush_ms: 20,
        }
    }
}

/// `[metrics]`: the metrics port (Prometheus text at `/metrics`). Off unless `listen` is set.
/// It has no authentication, as Prometheus expects: bind it to loopback or a management
/// network.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `IP:port` to serve on; empty: no metrics port.
    pub listen: String,
}

/// `[supervisor]`: the reDB supervisor meshd registers with and sends heartbeats to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Register with the supervisor (off: a standalone node).
    pub enabled: bool,
    /// Its gRPC address (`host:port` or `http://host:port`).
    pub address: String,
    /// Time between heartbeats.
    pub heartbeat_ms: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: "localhost:50000".into(),
            heartbeat_ms: 5000,
        }
    }
}

/// `[storage] backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Embedded redb in the data directory (no external service).
    Redb,
    /// PostgreSQL at `url`.
    Postgres,
}

/// `[storage]`: the backend streams, state and the platform tables live in. The Raft logs and
/// the node's identity stay in redb in the data directory whatever the backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `"redb"` (default) or `"postgres"`.
    pub backend: BackendChoice,
    /// PostgreSQL connection URL (`postgres://user:password@host:port/db` or key=value
    /// form); it may hold a password, so it is never printed (`MESHD_STORAGE__URL`).
    #[serde(skip_serializing)]
    pub url: Option<SecretText>,
    /// PostgreSQL connections shared by the api side (each stream worker has its own).
    pub pool_size: usize,
    /// Limit on connecting to a backend.
    pub connect_timeout_ms: u64,
    /// Limit on one call (a query, a transaction's commit).
    pub timeout_ms: u64,
    /// Redis beside the backend (idempotency keys, credits, the hot set of node state and
    /// routes): `redis://host:port/db`; absent: no Redis.
    #[serde(skip_serializing)]
    pub redis_url: Option<SecretText>,
    /// How often the platform tables (node state, routing table, consensus commit point,
    /// runtime config) are refreshed from live state.
    pub sync_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Redb,
            url: None,
            pool_size: 4,
            connect_timeout_ms: 3000,
            timeout_ms: 5000,
            redis_url: None,
            sync_ms: 1000,
        }
    }
}

/// `[runtime]`: threads and rings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Shard threads: `"auto"` (one per core, leaving one for control and api when there are
    /// more than two cores) or a count.
    pub shards: ShardCount,
    /// Pin shard `i` to CPU `i` (a dedicated host; see `tuning/`).
    pub pin_cores: bool,
    /// Capacity of every inter-thread ring, in items.
    pub ring_capacity: usize,
    /// io_uring buffer memory per shard.
    pub io_memory_bytes: usize,
    /// Nice value of the control plane's threads (control, consensus, stream groups),
    /// -20..=19: below everything else's 0, so under a data flood gossip and Raft get a CPU
    /// first. Needs `CAP_SYS_NICE`; 0 leaves them.
    pub control_nice: i32,
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `meshd=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` for people (colours only when stderr is a terminal), `json` (one object per
    /// line) for log shippers; `meshd run --log-format` wins when given.
    pub format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, thread, fields, span.
    Json,
}

/// Shard count setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ShardCount {
    /// A fixed number.
    Count(usize),
    /// `"auto"`, or a number given as a string (environment variables).
    Named(String),
}

fn default_mesh_id() -> String {
    "default".into()
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: None,
            peers: Vec::new(),
            heartbeat_ms: 100,
            heartbeat_misses: 3,
            reconnect_min_ms: 50,
            reconnect_max_ms: 5_000,
            handshake_timeout_ms: 5_000,
            write_timeout_ms: 3_000,
            max_payload_bytes: 4 << 20,
            link_queue_bytes: 1 << 20,
            lane_window_bytes: 16 << 20,
            max_pending_handshakes: 256,
            lanes: Lanes::Split,
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50056".into(),
            tls_cert_file: None,
            tls_key_file: None,
            token_file: None,
            token: None,
            subscriber_queue: 4096,
            tracked_messages: 100_000,
            default_timeout_seconds: 30,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shards: ShardCount::Named("auto".into()),
            pin_cores: false,
            ring_capacity: 4096,
            io_memory_bytes: 2 << 20,
            control_nice: -5,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration problem, naming the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value had the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {problem}; fix: {fix}")]
    Invalid {
        /// Dotted key path, as in the TOML file.
        key: &'static str,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The resolved settings other modules use (addresses parsed, counts decided). Its `Debug`
/// leaves out the secrets (the api's TLS key, its token, the mesh secret).
#[derive(Clone)]
pub struct Resolved {
    /// Parsed `network.listen`.
    pub listen: Option<SocketAddr>,
    /// Parsed `network.peers`.
    pub peers: Vec<SocketAddr>,
    /// Parsed `grpc.listen`.
    pub grpc_listen: SocketAddr,
    /// The metrics port's address, if one is configured.
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain and key for the api's TLS.
    pub grpc_tls: Option<(Vec<u8>, Vec<u8>)>,
    /// The api's bearer token.
    pub grpc_token: Option<String>,
    /// Shard threads.
    pub n_shards: usize,
    /// The configured mesh's secret, from `mesh_secret` or `mesh_secret_file`.
    pub mesh_secret: Option<[u8; meshd_shards::credential::SECRET_LEN]>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("grpc_listen", &self.grpc_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("grpc_tls", &self.grpc_tls.as_ref().map(|_| "<redacted>"))
            .field(
                "grpc_token",
                &self.grpc_token.as_ref().map(|_| "<redacted>"),
            )
            .field("n_shards", &self.n_shards)
            .field("mesh_secret", &self.mesh_secret.map(|_| "<redacted>"))
            .finish()
    }
}

impl Config {
    /// Reads `path` (if given), applies environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<(Self, Resolved), ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Parse(format!(
                    "config file {} does not exist; fix: pass an existing file to --config",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("MESHD_").split("__"));
        if let Ok(id) = std::env::var("MESH_ROUTING_ID") {
            let id: u64 = id.trim().parse().map_err(|_| {
                invalid(
                    "node_id",
                    format!("MESH_ROUTING_ID={id:?} is not a u64"),
                    "set MESH_ROUTING_ID to a decimal node id",
                )
            })?;
            figment = figment.merge(Serialized::default("node_id", id));
        }
        let config: Self = figment.extract().map_err(|e| {
            let mut text = e.to_string();
            if text.contains("missing field `data_dir`") {
                text.push_str("; fix: set data_dir in the config file or MESHD_DATA_DIR");
            }
            ConfigError::Parse(text)
        })?;
        let resolved = config.validate()?;
        Ok((config, resolved))
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.network.heartbeat_ms)
    }
}

mod validate;

#[cfg(test)]
mod tests;
