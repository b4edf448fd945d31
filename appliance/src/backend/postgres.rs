//! The PostgreSQL backend, through tokio-postgres.
//!
//! The connections' I/O runs on a small tokio runtime of its own (`postgres-io`); callers block
//! on a call's answer with a deadline (`storage.timeout_ms`), so a stream worker or a
//! `spawn_blocking` on the api thread never hangs on a database that stopped answering. A
//! connection that failed or timed out is dropped and a new one made on the next call (bounded
//! by `storage.connect_timeout_ms`): when the database comes back, meshd carries on by itself.
//!
//! Each stream worker has its own connection (its turns are sequential; a shared pool would
//! only add waits); the [`MeshStore`] calls share `storage.pool_size` connections. Every
//! transaction is `BEGIN … COMMIT` on one connection held for the whole call, and a commit is
//! durable when it returns (the server's `synchronous_commit`, on by default).

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio_postgres::{NoTls, Row, Statement, error::SqlState, types::ToSql};
use uuid::Uuid;

use super::{
    BackendError, BackendKind, ConsensusEntry, Counts, Health, MeshStore, Result, StoredMessage,
    StreamStore, Write,
};
use crate::{
    config::StorageConfig,
    streams::store::{Batch, DELIVERY_LOG_KEEP, Queue, Role, StreamRecord},
};

/// Keys asked for per outbox / inbox read query: a read stops at its byte budget between
/// queries, so what one call holds stays near the budget whatever the message sizes.
const READ_CHUNK: usize = 64;

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct PgSetup {
    /// The node owning the rows.
    pub owner: u64,
    /// Connection URL or key=value string.
    pub url: String,
    /// Connections shared by the [`MeshStore`] calls.
    pub pool_size: usize,
    /// Limit on connecting.
    pub connect_timeout: Duration,
    /// Limit on one call.
    pub timeout: Duration,
}

impl PgSetup {
    /// From `[storage]`.
    pub fn from_config(owner: u64, config: &StorageConfig) -> anyhow::Result<Self> {
        let url = config
            .url
            .as_ref()
            .map(|u| u.0.clone())
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("storage.url is needed for backend = \"postgres\""))?;
        Ok(Self {
            owner,
            url,
            pool_size: config.pool_size.max(1),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }
}

type Slot = Mutex<Option<Arc<Client>>>;

/// Statements asked for often (a stream worker's every turn) are prepared once per
/// connection: a bare query string costs a parse round trip each time.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A connection and its prepared statements (by SQL text; bounded by the few texts meshd
/// uses).
pub(crate) struct Client {
    inner: tokio_postgres::Client,
    prepared: Mutex<HashMap<String, Statement>>,
}

impl Client {
    async fn statement(&self, sql: &str) -> std::result::Result<Statement, tokio_postgres::Error> {
        let cached = self
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.inner.prepare(sql).await?;
        self.prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    async fn execute(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.inner.execute(&statement, params).await
    }

    async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.inner.query(&statement, params).await
    }

    async fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Row, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.inner.query_one(&statement, params).await
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.inner.query_opt(&statement, params).await
    }

    async fn batch_execute(&self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        self.inner.batch_execute(sql).await
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// What every connection of one store shares.
struct Shared {
    /// `Some` until drop (taken there to shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    config: tokio_postgres::Config,
    owner: i64,
    timeout: Duration,
    health: Arc<Health>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics on an async thread (the api's): let its
        // worker finish in the background instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn unavailable(reason: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: "postgres",
        reason: reason.to_string(),
    }
}

fn failed(reason: impl std::fmt::Display) -> BackendError {
    BackendError::Failed {
        backend: "postgres",
        reason: reason.to_string(),
    }
}

/// Whether an error means the connection (or the server) is gone, rather than the statement
/// being refused.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => {
            let class = &code.code()[..2];
            // 08 connection exception, 57 operator intervention (shutdown, crash recovery),
            // 53 insufficient resources (too many connections).
            matches!(class, "08" | "57" | "53") || *code == SqlState::ADMIN_SHUTDOWN
        }
    }
}

/// The error and its causes ("error connecting to server: Connection refused").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn classify(e: &tokio_postgres::Error) -> BackendError {
    let text = describe(e);
    if connection_lost(e) {
        unavailable(text)
    } else {
        failed(text)
    }
}

impl Shared {
    /// Runs `op` on the connection in `slot` (made first if there is none), within the
    /// deadline; the calling thread waits for the answer.
    fn run<T, F, Fut>(&self, slot: &Slot, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return Err(unavailable("the store is shutting down"));
        };
        let mut guard = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let existing = guard.take().filter(|c| !c.is_closed());
        let config = self.config.clone();
        let timeout = self.timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let outcome = tokio::time::timeout(timeout, async move {
                let client = match existing {
                    Some(client) => client,
                    None => Arc::new(
                        connect(&config)
                            .await
                            .map_err(|e| unavailable(classify(&e)))?,
                    ),
                };
                let result = op(Arc::clone(&client)).await;
                Ok::<_, BackendError>((client, result))
            })
            .await;
            let _ = tx.send(outcome);
        });
        // The runtime enforces the deadline; this margin only guards against a runtime gone.
        let outcome = rx
            .recv_timeout(timeout + Duration::from_secs(1))
            .map_err(|_| unavailable("no answer from the postgres-io runtime"))?;
        let result = match outcome {
            Err(_) => Err(unavailable(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
            Ok(Err(e)) => Err(e),
            Ok(Ok((client, Ok(value)))) => {
                *guard = Some(client);
                Ok(value)
            }
            Ok(Ok((client, Err(e)))) => {
                let error = classify(&e);
                if !error.is_unavailable() {
                    // The statement was refused; the connection is fine (rolled back).
                    *guard = Some(client);
                }
                Err(error)
            }
        };
        self.health.observe(&result);
        result
    }
}

async fn connect(
    config: &tokio_postgres::Config,
) -> std::result::Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(Client {
        inner: client,
        prepared: Mutex::default(),
    })
}

/// Runs `body` inside `BEGIN … COMMIT`, rolling back when it fails.
async fn transaction<T, Fut>(
    client: &Client,
    body: Fut,
) -> std::result::Result<T, tokio_postgres::Error>
where
    Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    client.batch_execute("BEGIN").await?;
    match body.await {
        Ok(value) => {
            client.batch_execute("COMMIT").await?;
            Ok(value)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// u64 as PostgreSQL BIGINT (two's complement, migrations/0001_init.sql).
fn big(v: u64) -> i64 {
    v as i64
}

/// A seq bound for `seq <= $n` (seqs stay far below 2^63; past it, every seq matches).
fn seq_bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// [`MeshStore`] on PostgreSQL.
pub struct PgStore {
    shared: Arc<Shared>,
    pool: Vec<Slot>,
    next: AtomicUsize,
}

impl PgStore {
    /// Connects, applies the missing migrations and checks the database answers.
    pub fn connect(setup: &PgSetup) -> anyhow::Result<Self> {
        let mut config = tokio_postgres::Config::from_str(&setup.url).map_err(|e| {
            anyhow::anyhow!("storage.url is not a PostgreSQL connection string: {e}")
        })?;
        config
            .connect_timeout(setup.connect_timeout)
            .application_name("meshd")
            // A database host that vanished (no RST) is noticed by the OS, not only by deadlines.
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(setup.timeout);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres-io")
            .enable_all()
            .build()?;
        let store = Self {
            shared: Arc::new(Shared {
                runtime: Some(runtime),
                config,
                owner: big(setup.owner),
                timeout: setup.timeout.max(setup.connect_timeout),
                health: Arc::default(),
            }),
            pool: (0..setup.pool_size).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        };
        let applied = store
            .shared
            .run(&store.pool[0], |client| async move {
                Ok(super::migrate::migrate(&client.inner).await)
            })
            .map_err(|e| anyhow::anyhow!("connecting to PostgreSQL: {e}"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !applied.is_empty() {
            tracing::info!(?applied, "PostgreSQL migrations applied");
        }
        store
            .health_check()
            .map_err(|e| anyhow::anyhow!("PostgreSQL health check: {e}"))?;
        Ok(store)
    }

    fn slot(&self) -> &Slot {
        // Prefer an idle connection; when all are busy, queue on one in turn.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.pool.len())
            .map(|i| &self.pool[(start + i) % self.pool.len()])
            .find(|slot| slot.try_lock().is_ok())
            .unwrap_or(&self.pool[start % self.pool.len()])
    }

    fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>, i64) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'static,
    {
        let owner = self.shared.owner;
        self.shared
            .run(self.slot(), move |client| op(client, owner))
    }
}

fn message_row(row: &Row) -> StoredMessage {
    StoredMessage {
        id: row.get(0),
        from: row.get::<_, i64>(1) as u64,
        to: row.get::<_, i64>(2) as u64,
        content: row.get(3),
        timestamp_ms: row.get::<_, i64>(4) as u64,
    }
}

async fn apply_write(
    client: &Client,
    owner: i64,
    write: &Write,
) -> std::result::Result<(), tokio_postgres::Error> {
    match write {
        Write::PutMessage(m) => {
            client
                .execute(
                    "INSERT INTO mesh_messages (owner, id, from_node, to_node, content, ts_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, id) DO UPDATE SET \
                     from_node = EXCLUDED.from_node, to_node = EXCLUDED.to_node, \
                     content = EXCLUDED.content, ts_ms = EXCLUDED.ts_ms",
                    &[
                        &owner,
                        &m.id,
                        &big(m.from),
                        &big(m.to),
                        &m.content,
                        &big(m.timestamp_ms),
                    ],
                )
                .await?;
        }
        Write::DeleteMessage(id) => {
            client
                .execute(
                    "DELETE FROM mesh_messages WHERE owner = $1 AND id = $2",
                    &[&owner, id],
                )
                .await?;
        }
        Write::PutState(key, value) => {
            client
                .execute(
                    "INSERT INTO mesh_state (owner, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (owner, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                    &[&owner, key, value],
                )
                .await?;
        }
        Write::DeleteState(key) => {
            client
                .execute(
                    "DELETE FROM mesh_state WHERE owner = $1 AND key = $2",
                    &[&owner, key],
                )
                .await?;
        }
        Write::PutNodeState(node, state) => {
            client
                .execute(
                    "INSERT INTO mesh_node_state (owner, node_id, state) VALUES ($1, $2, $3) \
                     ON CONFLICT (owner, node_id) DO UPDATE SET state = EXCLUDED.state, updated = now()",
                    &[&owner, &big(*node), state],
                )
                .await?;
        }
        Write::AppendConsensus(e) => {
            client
                .execute(
                    "INSERT INTO mesh_consensus_log (owner, log_index, term, entry) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner, log_index) DO UPDATE SET \
                     term = EXCLUDED.term, entry = EXCLUDED.entry",
                    &[&owner, &big(e.index), &big(e.term), &e.entry],
                )
                .await?;
        }
        Write::PurgeConsensus(up_to) => {
            client
                .execute(
                    "DELETE FROM mesh_consensus_log WHERE owner = $1 AND log_index <= $2",
                    &[&owner, &seq_bound(*up_to)],
                )
                .await?;
        }
        Write::ReplaceRoutes(routes) => {
            client
                .execute("DELETE FROM mesh_routing_table WHERE owner = $1", &[&owner])
                .await?;
            let destinations: Vec<i64> = routes.iter().map(|(d, _)| big(*d)).collect();
            let values: Vec<Value> = routes.iter().map(|(_, v)| v.clone()).collect();
            client
                .execute(
                    "INSERT INTO mesh_routing_table (owner, destination, route) \
                     SELECT $1, * FROM UNNEST($2::int8[], $3::jsonb[])",
                    &[&owner, &destinations, &values],
                )
                .await?;
        }
        Write::PutConfig(key, value) => {
            client
                .execute(
                    "INSERT INTO mesh_runtime_config (owner, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (owner, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                    &[&owner, key, value],
                )
                .await?;
        }
        Write::DeleteConfig(key) => {
            client
                .execute(
                    "DELETE FROM mesh_runtime_config WHERE owner = $1 AND key = $2",
                    &[&owner, key],
                )
                .await?;
        }
    }
    Ok(())
}

impl MeshStore for PgStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }

    fn health(&self) -> &Arc<Health> {
        &self.shared.health
    }

    fn health_check(&self) -> Result<()> {
        let read = self.run(|client, owner| async move {
            transaction(&client, async {
                client
                    .execute(
                        "INSERT INTO mesh_state (owner, key, value) VALUES ($1, '__health_check', 'ok') \
                         ON CONFLICT (owner, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                        &[&owner],
                    )
                    .await?;
                let row = client
                    .query_one(
                        "SELECT value FROM mesh_state WHERE owner = $1 AND key = '__health_check'",
                        &[&owner],
                    )
                    .await?;
                client
                    .execute(
                        "DELETE FROM mesh_state WHERE owner = $1 AND key = '__health_check'",
                        &[&owner],
                    )
                    .await?;
                Ok(row.get::<_, Vec<u8>>(0))
            })
            .await
        })?;
        if read == b"ok" {
            Ok(())
        } else {
            Err(failed("the probe key read back wrong"))
        }
    }

    fn apply(&self, writes: &[Write]) -> Result<()> {
        writes.iter().try_for_each(Write::validate)?;
        if writes.is_empty() {
            return Ok(());
        }
        let writes = writes.to_vec();
        self.run(|client, owner| async move {
            transaction(&client, async {
                for write in &writes {
                    apply_write(&client, owner, write).await?;
                }
                Ok(())
            })
            .await
        })
    }

    fn get_message(&self, id: &str) -> Result<Option<StoredMessage>> {
        let id = id.to_string();
        self.run(|client, owner| async move {
            let row = client
                .query_opt(
                    "SELECT id, from_node, to_node, content, ts_ms FROM mesh_messages \
                     WHERE owner = $1 AND id = $2",
                    &[&owner, &id],
                )
                .await?;
            Ok(row.as_ref().map(message_row))
        })
    }

    fn messages_to(&self, to: u64, limit: usize) -> Result<Vec<StoredMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |client, owner| async move {
            let rows = client
                .query(
                    "SELECT id, from_node, to_node, content, ts_ms FROM mesh_messages \
                     WHERE owner = $1 AND to_node = $2 ORDER BY ts_ms, id LIMIT $3",
                    &[&owner, &big(to), &limit],
                )
                .await?;
            Ok(rows.iter().map(message_row).collect())
        })
    }

    fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.run(|client, owner| async move {
            let row = client
                .query_opt(
                    "SELECT value FROM mesh_state WHERE owner = $1 AND key = $2",
                    &[&owner, &key],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn node_states(&self) -> Result<Vec<(u64, Value)>> {
        self.run(|client, owner| async move {
            let rows = client
                .query(
                    "SELECT node_id, state FROM mesh_node_state WHERE owner = $1 ORDER BY node_id",
                    &[&owner],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }

    fn consensus_entries(&self, from: u64, limit: usize) -> Result<Vec<ConsensusEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let from = seq_bound(from);
        self.run(move |client, owner| async move {
            let rows = client
                .query(
                    "SELECT term, log_index, entry FROM mesh_consensus_log \
                     WHERE owner = $1 AND log_index >= $2 ORDER BY log_index LIMIT $3",
                    &[&owner, &from, &limit],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| ConsensusEntry {
                    term: r.get::<_, i64>(0) as u64,
                    index: r.get::<_, i64>(1) as u64,
                    entry: r.get(2),
                })
                .collect())
        })
    }

    fn routes(&self) -> Result<Vec<(u64, Value)>> {
        self.run(|client, owner| async move {
            let rows = client
                .query(
                    "SELECT destination, route FROM mesh_routing_table WHERE owner = $1 \
                     ORDER BY destination",
                    &[&owner],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }

    fn config(&self) -> Result<Vec<(String, Value)>> {
        self.run(|client, owner| async move {
            let rows = client
                .query(
                    "SELECT key, value FROM mesh_runtime_config WHERE owner = $1 ORDER BY key",
                    &[&owner],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn counts(&self) -> Result<Counts> {
        self.run(|client, owner| async move {
            let row = client
                .query_one(
                    "SELECT \
                     (SELECT count(*) FROM mesh_messages WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_state WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_node_state WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_consensus_log WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_routing_table WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_runtime_config WHERE owner = $1)",
                    &[&owner],
                )
                .await?;
            let n = |i: usize| row.get::<_, i64>(i) as u64;
            Ok(Counts {
                messages: n(0),
                state: n(1),
                node_states: n(2),
                consensus: n(3),
                routes: n(4),
                config: n(5),
            })
        })
    }

    fn purge_messages_before(&self, before_ms: u64) -> Result<u64> {
        let before = seq_bound(before_ms);
        self.run(move |client, owner| async move {
            client
                .execute(
                    "DELETE FROM mesh_messages WHERE owner = $1 AND ts_ms < $2",
                    &[&owner, &before],
                )
                .await
        })
    }

    fn remember_key(&self, scope: &str, key: &str, ttl_ms: u64) -> Result<bool> {
        Write::DeleteState(scope.into()).validate()?;
        Write::DeleteState(key.into()).validate()?;
        let (scope, key) = (scope.to_string(), key.to_string());
        let now = big(crate::storage::now_ms());
        let expires = now.saturating_add(seq_bound(ttl_ms));
        self.run(move |client, owner| async move {
            // One statement: inserted, or taken over from an expired row; a live row stays
            // and nothing is returned. Expired rows are swept as new ones come.
            let row = client
                .query_opt(
                    "INSERT INTO mesh_idempotency_keys (owner, scope, key, expires_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner, scope, key) DO UPDATE \
                     SET expires_ms = EXCLUDED.expires_ms \
                     WHERE mesh_idempotency_keys.expires_ms <= $5 RETURNING 1",
                    &[&owner, &scope, &key, &expires, &now],
                )
                .await?;
            client
                .execute(
                    "DELETE FROM mesh_idempotency_keys WHERE owner = $1 AND expires_ms <= $2",
                    &[&owner, &now],
                )
                .await?;
            Ok(row.is_some())
        })
    }

    fn take_credits(&self, bucket: &str, n: u64, capacity: u64, per_second: u64) -> Result<bool> {
        Write::DeleteState(bucket.into()).validate()?;
        let bucket = bucket.to_string();
        let now = crate::storage::now_ms();
        self.run(move |client, owner| async move {
            transaction(&client, async {
                client
                    .execute(
                        "INSERT INTO mesh_credits (owner, bucket, tokens, refreshed_ms) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (owner, bucket) DO NOTHING",
                        &[&owner, &bucket, &(capacity as f64), &big(now)],
                    )
                    .await?;
                let row = client
                    .query_one(
                        "SELECT tokens, refreshed_ms FROM mesh_credits \
                         WHERE owner = $1 AND bucket = $2 FOR UPDATE",
                        &[&owner, &bucket],
                    )
                    .await?;
                let (granted, left) = super::refill(
                    row.get(0),
                    row.get::<_, i64>(1) as u64,
                    now,
                    n,
                    capacity,
                    per_second,
                );
                client
                    .execute(
                        "UPDATE mesh_credits SET tokens = $3, refreshed_ms = $4 \
                         WHERE owner = $1 AND bucket = $2",
                        &[&owner, &bucket, &left, &big(now)],
                    )
                    .await?;
                Ok(granted)
            })
            .await
        })
    }

    fn streams(&self, worker: usize) -> Result<Box<dyn StreamStore>> {
        let worker =
            i32::try_from(worker).map_err(|_| BackendError::Invalid("worker index".into()))?;
        Ok(Box::new(PgStreams {
            shared: Arc::clone(&self.shared),
            worker,
            slot: Mutex::new(None),
        }))
    }
}

/// A stream worker's tables on PostgreSQL, on a connection of its own.
pub struct PgStreams {
    shared: Arc<Shared>,
    worker: i32,
    slot: Slot,
}

impl PgStreams {
    fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>, i64, i32) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'static,
    {
        let (owner, worker) = (self.shared.owner, self.worker);
        self.shared
            .run(&self.slot, move |client| op(client, owner, worker))
    }
}

fn record_row(row: &Row) -> std::result::Result<(u128, StreamRecord), String> {
    let id: Uuid = row.get(0);
    let role = match row.get::<_, &str>(1) {
        "source" => Role::Source,
        "target" => Role::Target,
        other => return Err(format!("stream record with role {other:?}")),
    };
    let targets: Vec<i64> = row.get(4);
    let record = StreamRecord {
        role,
        tenant: row.get(2),
        source: row.get::<_, i64>(3) as u64,
        targets: targets.into_iter().map(|t| t as u64).collect(),
        quorum: u32::try_from(row.get::<_, i32>(5)).map_err(|_| "negative quorum")?,
        ack_on_source: row.get(6),
        high: row.get::<_, i64>(7) as u64,
        low: row.get::<_, i64>(8) as u64,
        closed: row.get::<_, Option<i64>>(9).map(|c| c as u64),
        priority: u8::try_from(row.get::<_, i32>(10)).map_err(|_| "priority out of range")?,
    };
    if record.low > record.high {
        return Err("stream record with low past high".into());
    }
    Ok((id.as_u128(), record))
}

/// Inserts (or overwrites) `rows` into a queue table in one statement.
async fn insert_queue(
    client: &Client,
    table: &str,
    owner: i64,
    worker: i32,
    rows: &[(u128, u64, Vec<u8>)],
) -> std::result::Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|(s, _, _)| Uuid::from_u128(*s)).collect();
    let seqs: Vec<i64> = rows.iter().map(|(_, q, _)| big(*q)).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|(_, _, m)| m.as_slice()).collect();
    client
        .execute(
            &format!(
                "INSERT INTO {table} (owner, worker, stream_id, seq, message) \
                 SELECT $1, $2, * FROM UNNEST($3::uuid[], $4::int8[], $5::bytea[]) \
                 ON CONFLICT (owner, worker, stream_id, seq) DO UPDATE SET message = EXCLUDED.message"
            ),
            &[&owner, &worker, &ids, &seqs, &bodies],
        )
        .await?;
    Ok(())
}

async fn commit_batch(
    client: &Client,
    owner: i64,
    worker: i32,
    batch: &Batch,
    now_ms: u64,
) -> std::result::Result<(), tokio_postgres::Error> {
    insert_queue(client, "mesh_stream_outbox", owner, worker, &batch.outbox).await?;
    for (stream, up_to) in &batch.released {
        client
            .execute(
                "DELETE FROM mesh_stream_outbox WHERE owner = $1 AND worker = $2 \
                 AND stream_id = $3 AND seq <= $4",
                &[
                    &owner,
                    &worker,
                    &Uuid::from_u128(*stream),
                    &seq_bound(*up_to),
                ],
            )
            .await?;
    }
    insert_queue(client, "mesh_stream_inbox", owner, worker, &batch.inbox).await?;
    for &(stream, from, to) in &batch.processed {
        let id = Uuid::from_u128(stream);
        client
            .execute(
                "DELETE FROM mesh_stream_inbox WHERE owner = $1 AND worker = $2 \
                 AND stream_id = $3 AND seq <= $4",
                &[&owner, &worker, &id, &seq_bound(to)],
            )
            .await?;
        let first = from.max(to.saturating_sub(DELIVERY_LOG_KEEP) + 1);
        client
            .execute(
                "INSERT INTO mesh_stream_delivery_log (owner, worker, stream_id, seq, delivered_ms) \
                 SELECT $1, $2, $3, s, $6 FROM generate_series($4::int8, $5::int8) AS s \
                 ON CONFLICT (owner, worker, stream_id, seq) DO UPDATE SET delivered_ms = EXCLUDED.delivered_ms",
                &[
                    &owner,
                    &worker,
                    &id,
                    &seq_bound(first),
                    &seq_bound(to),
                    &big(now_ms),
                ],
            )
            .await?;
        if to > DELIVERY_LOG_KEEP {
            client
                .execute(
                    "DELETE FROM mesh_stream_delivery_log WHERE owner = $1 AND worker = $2 \
                     AND stream_id = $3 AND seq <= $4",
                    &[&owner, &worker, &id, &seq_bound(to - DELIVERY_LOG_KEEP)],
                )
                .await?;
        }
    }
    for (stream, record) in &batch.records {
        let id = Uuid::from_u128(*stream);
        match record {
            Some(r) => {
                let role = match r.role {
                    Role::Source => "source",
                    Role::Target => "target",
                };
                let targets: Vec<i64> = r.targets.iter().map(|t| big(*t)).collect();
                client
                    .execute(
                        "INSERT INTO mesh_stream_records (owner, worker, stream_id, role, tenant, \
                         source, targets, quorum, ack_on_source, high, low, closed, priority) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                         ON CONFLICT (owner, worker, stream_id) DO UPDATE SET role = EXCLUDED.role, \
                         tenant = EXCLUDED.tenant, source = EXCLUDED.source, \
                         targets = EXCLUDED.targets, quorum = EXCLUDED.quorum, \
                         ack_on_source = EXCLUDED.ack_on_source, high = EXCLUDED.high, \
                         low = EXCLUDED.low, closed = EXCLUDED.closed, \
                         priority = EXCLUDED.priority, updated = now()",
                        &[
                            &owner,
                            &worker,
                            &id,
                            &role,
                            &r.tenant,
                            &big(r.source),
                            &targets,
                            &(r.quorum as i32),
                            &r.ack_on_source,
                            &big(r.high),
                            &big(r.low),
                            &r.closed.map(big),
                            &i32::from(r.priority),
                        ],
                    )
                    .await?;
            }
            None => {
                for table in [
                    "mesh_stream_records",
                    "mesh_stream_outbox",
                    "mesh_stream_inbox",
                    "mesh_stream_delivery_log",
                ] {
                    client
                        .execute(
                            &format!(
                                "DELETE FROM {table} WHERE owner = $1 AND worker = $2 AND stream_id = $3"
                            ),
                            &[&owner, &worker, &id],
                        )
                        .await?;
                }
            }
        }
    }
    Ok(())
}

impl StreamStore for PgStreams {
    fn load(&self) -> Result<Vec<(u128, StreamRecord)>> {
        let rows = self.run(|client, owner, worker| async move {
            client
                .query(
                    "SELECT stream_id, role, tenant, source, targets, quorum, ack_on_source, \
                     high, low, closed, priority FROM mesh_stream_records \
                     WHERE owner = $1 AND worker = $2",
                    &[&owner, &worker],
                )
                .await
        })?;
        rows.iter()
            .map(|row| record_row(row).map_err(failed))
            .collect()
    }

    fn commit(&self, batch: Batch, now_ms: u64) -> Result<()> {
        self.run(move |client, owner, worker| async move {
            transaction(
                &client,
                commit_batch(&client, owner, worker, &batch, now_ms),
            )
            .await
        })
    }

    fn read(
        &self,
        which: Queue,
        keys: &[(u128, u64)],
        spare: usize,
        max_bytes: usize,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let table = match which {
            Queue::Outbox => "mesh_stream_outbox",
            Queue::Inbox => "mesh_stream_inbox",
        };
        let mut out = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for chunk in keys.chunks(READ_CHUNK) {
            if bytes >= max_bytes {
                break;
            }
            let ids: Vec<Uuid> = chunk.iter().map(|(s, _)| Uuid::from_u128(*s)).collect();
            let seqs: Vec<i64> = chunk.iter().map(|(_, q)| big(*q)).collect();
            let rows = self.run(move |client, owner, worker| async move {
                client
                    .query(
                        &format!(
                            "SELECT stream_id, seq, message FROM {table} WHERE owner = $1 \
                             AND worker = $2 AND (stream_id, seq) IN \
                             (SELECT * FROM UNNEST($3::uuid[], $4::int8[]))"
                        ),
                        &[&owner, &worker, &ids, &seqs],
                    )
                    .await
            })?;
            let mut found: HashMap<(u128, u64), &[u8]> = rows
                .iter()
                .map(|r| {
                    let id: Uuid = r.get(0);
                    ((id.as_u128(), r.get::<_, i64>(1) as u64), r.get(2))
                })
                .collect();
            for key in chunk {
                if bytes >= max_bytes {
                    break;
                }
                let message = found.remove(key).map(|value| {
                    let mut message = Vec::with_capacity(value.len() + spare);
                    message.extend_from_slice(value);
                    message
                });
                bytes += message.as_ref().map_or(0, Vec::len);
                out.push(message);
            }
        }
        Ok(out)
    }

    fn delivery_log(&self, stream: u128, from: u64) -> Result<Vec<(u64, u64)>> {
        let id = Uuid::from_u128(stream);
        let from = seq_bound(from);
        self.run(move |client, owner, worker| async move {
            let rows = client
                .query(
                    "SELECT seq, delivered_ms FROM mesh_stream_delivery_log WHERE owner = $1 \
                     AND worker = $2 AND stream_id = $3 AND seq >= $4 ORDER BY seq",
                    &[&owner, &worker, &id, &from],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
                .collect())
        })
    }
}
