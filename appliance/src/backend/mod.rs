//! The mesh store: one trait, three backends (seed 001's storage package).
//!
//! [`MeshStore`] covers what the platform expects of the mesh's storage — messages, key/value
//! state, node state, the consensus log (as the platform sees it), the routing table, runtime
//! config, atomic write sets (transactions), administrative operations, a health check,
//! idempotency keys and credit tokens — and hands out each stream worker's [`StreamStore`]
//! (stream records, outbox, inbox, delivery log), so streams run on any backend that keeps
//! them with the same guarantees.
//!
//! - [`embedded`]: redb, the default (`<data_dir>/mesh.redb` and `streams-<i>.redb`).
//! - [`postgres`]: PostgreSQL through tokio-postgres; `migrations/` applied at start.
//! - [`redis`]: Redis, optional beside either (seed 002: dedupe / idempotency keys, credit
//!   tokens, the hot set of node state and routes). It holds no streams: a stream's outbox
//!   and offsets must survive what Redis's default persistence does not promise.
//!
//! Every backend is opened for one node (`owner`) and keys every row by it, so several nodes
//! may share one PostgreSQL database or one Redis. The Raft logs themselves stay in redb
//! beside every backend (as the seed keeps them in BoltDB): the consensus log here is what the
//! platform reads, the control group's commit points.
//!
//! Calls block the calling thread (a stream worker's turn, or a `spawn_blocking` on the api
//! thread) and every call has a deadline; a failure marks the backend unhealthy until a call
//! succeeds again ([`Health`]).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use serde_json::Value;

use crate::streams::store::{Batch, Queue, StreamRecord};

pub mod conformance;
pub mod embedded;
mod migrate;
pub mod postgres;
pub mod redis;

pub use migrate::{MIGRATIONS, Migration};

/// Which backend a store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Embedded redb.
    Redb,
    /// PostgreSQL.
    Postgres,
    /// Redis.
    Redis,
}

impl BackendKind {
    /// Its name in config, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Redb => "redb",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }
}

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot be reached or did not answer in time: nothing was written; retry.
    #[error("{backend} unavailable: {reason}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// The call itself is wrong (empty key, oversized value, an operation this backend does
    /// not hold).
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// The backend answered with an error, or stored data is not what this version wrote.
    #[error("{backend}: {reason}")]
    Failed {
        /// Which backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
}

impl BackendError {
    /// Whether the backend was away (worth retrying) rather than the request at fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Longest key (state, config, message id, idempotency scope and key), in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// Largest value (state, message content, JSON documents), in bytes.
pub const MAX_VALUE_BYTES: usize = 16 << 20;

/// A message kept for the platform (`mesh_messages`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its id (unique per owner).
    pub id: String,
    /// Sending node.
    pub from: u64,
    /// Receiving node.
    pub to: u64,
    /// Its bytes.
    pub content: Vec<u8>,
    /// When it was sent, ms since the Unix epoch.
    pub timestamp_ms: u64,
}

/// A message's stored form on the key/value backends (redb, Redis): its fields but the id,
/// which is the key.
#[derive(serde::Serialize, serde::Deserialize)]
struct MessageRow {
    from: u64,
    to: u64,
    content: Vec<u8>,
    timestamp_ms: u64,
}

impl StoredMessage {
    /// Its stored form (without the id).
    pub(crate) fn encode_row(&self) -> Vec<u8> {
        let row = MessageRow {
            from: self.from,
            to: self.to,
            content: self.content.clone(),
            timestamp_ms: self.timestamp_ms,
        };
        // Integers and a byte vector: postcard cannot fail on them.
        postcard::to_allocvec(&row).unwrap_or_default()
    }

    /// The message `id` whose stored form is `bytes`; `None` if they are not one.
    pub(crate) fn decode_row(id: String, bytes: &[u8]) -> Option<Self> {
        let row: MessageRow = postcard::from_bytes(bytes).ok()?;
        Some(Self {
            id,
            from: row.from,
            to: row.to,
            content: row.content,
            timestamp_ms: row.timestamp_ms,
        })
    }
}

/// One entry of the consensus log as the platform sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsensusEntry {
    /// Raft term.
    pub term: u64,
    /// Raft log index.
    pub index: u64,
    /// What it holds.
    pub entry: Value,
}

/// One write of a [`MeshStore::apply`] set.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Stores (or replaces) a message.
    PutMessage(StoredMessage),
    /// Forgets a message.
    DeleteMessage(String),
    /// Sets a state key.
    PutState(String, Vec<u8>),
    /// Forgets a state key.
    DeleteState(String),
    /// Sets a node's runtime state.
    PutNodeState(u64, Value),
    /// Appends to (or overwrites at its index) the consensus log.
    AppendConsensus(ConsensusEntry),
    /// Drops the consensus log's entries up to and including an index (compaction).
    PurgeConsensus(u64),
    /// Replaces the whole routing table: destination → route.
    ReplaceRoutes(Vec<(u64, Value)>),
    /// Sets a runtime config key.
    PutConfig(String, Value),
    /// Forgets a runtime config key.
    DeleteConfig(String),
}

impl Write {
    /// Refuses what no backend should store: empty or oversized keys and values.
    pub fn validate(&self) -> Result<()> {
        let key = |k: &str| {
            if k.is_empty() || k.len() > MAX_KEY_BYTES {
                Err(BackendError::Invalid(format!(
                    "a key has 1..={MAX_KEY_BYTES} bytes, not {}",
                    k.len()
                )))
            } else {
                Ok(())
            }
        };
        let value = |n: usize| {
            if n > MAX_VALUE_BYTES {
                Err(BackendError::Invalid(format!(
                    "a value has at most {MAX_VALUE_BYTES} bytes, not {n}"
                )))
            } else {
                Ok(())
            }
        };
        let json = |v: &Value| value(v.to_string().len());
        match self {
            Self::PutMessage(m) => {
                key(&m.id)?;
                value(m.content.len())
            }
            Self::DeleteMessage(k) | Self::DeleteState(k) | Self::DeleteConfig(k) => key(k),
            Self::PutState(k, v) => {
                key(k)?;
                value(v.len())
            }
            Self::PutNodeState(_, v) => json(v),
            Self::AppendConsensus(e) => json(&e.entry),
            Self::PurgeConsensus(_) => Ok(()),
            Self::ReplaceRoutes(routes) => routes.iter().try_for_each(|(_, v)| json(v)),
            Self::PutConfig(k, v) => {
                key(k)?;
                json(v)
            }
        }
    }
}

/// Row counts per table of this owner (an administrative view).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages.
    pub messages: u64,
    /// State keys.
    pub state: u64,
    /// Node states.
    pub node_states: u64,
    /// Consensus log entries.
    pub consensus: u64,
    /// Routes.
    pub routes: u64,
    /// Runtime config keys.
    pub config: u64,
}

/// Whether the backend answered its last call, shared by every handle to it.
#[derive(Debug, Default)]
pub struct Health {
    failing: AtomicBool,
    last_error: Mutex<String>,
}

impl Health {
    /// Notes a call's outcome.
    pub fn observe<T>(&self, result: &Result<T>) {
        match result {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("storage backend answers again");
                }
            }
            Err(e @ BackendError::Unavailable { .. }) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "storage backend unavailable");
                }
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = e.to_string();
            }
            // A refused request says nothing about the backend.
            Err(_) => {}
        }
    }

    /// `Ok` while the last call got through; the last failure otherwise.
    pub fn status(&self) -> std::result::Result<(), String> {
        if self.failing.load(Ordering::Relaxed) {
            Err(self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone())
        } else {
            Ok(())
        }
    }
}

/// The mesh's storage (seed 001's interface), scoped to one owner node.
pub trait MeshStore: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The backend's health as its calls found it.
    fn health(&self) -> &Arc<Health>;

    /// Writes and reads back a probe key: `Ok` when the backend is usable now.
    fn health_check(&self) -> Result<()>;

    /// Applies every write or none (the transaction): a failure leaves the store as it was.
    fn apply(&self, writes: &[Write]) -> Result<()>;

    /// A message by id.
    fn get_message(&self, id: &str) -> Result<Option<StoredMessage>>;

    /// Messages to a node, oldest first, at most `limit`.
    fn messages_to(&self, to: u64, limit: usize) -> Result<Vec<StoredMessage>>;

    /// A state value.
    fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Every node state, by node.
    fn node_states(&self) -> Result<Vec<(u64, Value)>>;

    /// Consensus log entries from `from` on, in index order, at most `limit`.
    fn consensus_entries(&self, from: u64, limit: usize) -> Result<Vec<ConsensusEntry>>;

    /// The routing table, by destination.
    fn routes(&self) -> Result<Vec<(u64, Value)>>;

    /// Every runtime config key, in key order.
    fn config(&self) -> Result<Vec<(String, Value)>>;

    /// Row counts (administrative).
    fn counts(&self) -> Result<Counts>;

    /// Forgets messages sent before `before_ms` (administrative retention); how many went.
    fn purge_messages_before(&self, before_ms: u64) -> Result<u64>;

    /// Records `key` in `scope` for `ttl_ms`: `true` the first time, `false` while it is
    /// remembered (a duplicate).
    fn remember_key(&self, scope: &str, key: &str, ttl_ms: u64) -> Result<bool>;

    /// Takes `n` tokens from a bucket of `capacity` refilled at `per_second`: `true` if
    /// there were enough (and they are gone), `false` if not (none taken).
    fn take_credits(&self, bucket: &str, n: u64, capacity: u64, per_second: u64) -> Result<bool>;

    /// Stream worker `worker`'s store.
    fn streams(&self, worker: usize) -> Result<Box<dyn StreamStore>>;
}

/// Convenience writes of one row each.
pub trait MeshStoreExt: MeshStore {
    /// Stores a message.
    fn store_message(&self, message: StoredMessage) -> Result<()> {
        self.apply(&[Write::PutMessage(message)])
    }
    /// Sets a state key.
    fn put_state(&self, key: &str, value: &[u8]) -> Result<()> {
        self.apply(&[Write::PutState(key.into(), value.to_vec())])
    }
    /// Forgets a state key.
    fn delete_state(&self, key: &str) -> Result<()> {
        self.apply(&[Write::DeleteState(key.into())])
    }
}

impl<T: MeshStore + ?Sized> MeshStoreExt for T {}

/// A stream worker's durable state: its stream records, the source's outbox, the target's
/// inbox and delivery log. Every backend gives the same guarantees: [`StreamStore::commit`]
/// writes a turn's batch whole or not at all and is durable when it returns.
pub trait StreamStore: Send {
    /// Every stream record of this worker.
    fn load(&self) -> Result<Vec<(u128, StreamRecord)>>;

    /// Writes a batch in one transaction, durable when this returns.
    fn commit(&self, batch: Batch, now_ms: u64) -> Result<()>;

    /// The messages at `keys` (`None` for one not there), each in a buffer with `spare`
    /// bytes of room after it. Stops once `max_bytes` were read (at least one message is).
    fn read(
        &self,
        which: Queue,
        keys: &[(u128, u64)],
        spare: usize,
        max_bytes: usize,
    ) -> Result<Vec<Option<Vec<u8>>>>;

    /// The delivery records of `stream` from `from` on: (seq, ms).
    fn delivery_log(&self, stream: u128, from: u64) -> Result<Vec<(u64, u64)>>;
}

/// Where stored state lives, from `[storage]`.
#[derive(Clone, Debug)]
pub struct BackendSetup {
    /// The node that owns the rows.
    pub owner: u64,
    /// The data directory (redb files).
    pub data_dir: std::path::PathBuf,
    /// The `[storage]` section.
    pub config: crate::config::StorageConfig,
}

/// The node's stores: the primary (redb or PostgreSQL) and Redis beside it when configured.
#[derive(Clone)]
pub struct Stores {
    /// Streams, state, platform tables.
    pub primary: Arc<dyn MeshStore>,
    /// Idempotency keys, credits and the hot set, when `[storage] redis_url` is set.
    pub redis: Option<Arc<dyn MeshStore>>,
}

impl Stores {
    /// Opens the configured backends (PostgreSQL: connects and migrates first).
    pub fn open(setup: &BackendSetup) -> anyhow::Result<Self> {
        let config = &setup.config;
        let primary: Arc<dyn MeshStore> = match config.backend {
            crate::config::BackendChoice::Redb => {
                Arc::new(embedded::RedbStore::open(&setup.data_dir, setup.owner)?)
            }
            crate::config::BackendChoice::Postgres => Arc::new(postgres::PgStore::connect(
                &postgres::PgSetup::from_config(setup.owner, config)?,
            )?),
        };
        let redis: Option<Arc<dyn MeshStore>> = match &config.redis_url {
            Some(url) if !url.0.is_empty() => Some(Arc::new(redis::RedisStore::connect(
                &url.0,
                setup.owner,
                std::time::Duration::from_millis(config.timeout_ms),
            )?)),
            _ => None,
        };
        Ok(Self { primary, redis })
    }

    /// Every backend's health: `(name, Ok | last failure)`.
    pub fn health(&self) -> Vec<(&'static str, std::result::Result<(), String>)> {
        let mut out = vec![(self.primary.kind().name(), self.primary.health().status())];
        if let Some(redis) = &self.redis {
            out.push((redis.kind().name(), redis.health().status()));
        }
        out
    }
}

/// A token bucket's refill, then a take of `n`: (granted, tokens left). Pure, shared by the
/// backends that keep the bucket themselves (Redis runs the same arithmetic in Lua).
pub(crate) fn refill(
    tokens: f64,
    at_ms: u64,
    now_ms: u64,
    n: u64,
    capacity: u64,
    per_second: u64,
) -> (bool, f64) {
    let elapsed = now_ms.saturating_sub(at_ms) as f64 / 1000.0;
    let tokens = (tokens + elapsed * per_second as f64).min(capacity as f64);
    if tokens >= n as f64 {
        (true, tokens - n as f64)
    } else {
        (false, tokens)
    }
}
