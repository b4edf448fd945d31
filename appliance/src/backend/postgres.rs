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

mod mesh;
mod streams;

pub use streams::PgStreams;

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio_postgres::{NoTls, Row, Statement, error::SqlState, types::ToSql};

use super::{BackendError, Health, MeshStore, Result};
use crate::config::StorageConfig;

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
