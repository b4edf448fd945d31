//! The embedded backend: redb files in the data directory, no external service.
//!
//! `mesh.redb` holds the [`MeshStore`] tables; each stream worker has its own
//! `streams-<i>.redb` (see `streams::store`), so workers never share a write lock.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::Value;

use super::{
    BackendError, BackendKind, ConsensusEntry, Counts, Health, MeshStore, Result, StoredMessage,
    StreamStore, Write,
};
use crate::streams::store::{self, Batch, Queue, StreamRecord};

const MESSAGES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("messages");
const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");
const NODE_STATE: TableDefinition<'_, u64, &str> = TableDefinition::new("node_state");
/// Index → postcard (term, JSON text).
const CONSENSUS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("consensus_log");
const ROUTES: TableDefinition<'_, u64, &str> = TableDefinition::new("routes");
const CONFIG: TableDefinition<'_, &str, &str> = TableDefinition::new("runtime_config");
/// (scope, key) → expiry (ms since the Unix epoch).
const IDEMPOTENCY: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("idempotency");
/// Bucket → (tokens, refreshed at ms).
const CREDITS: TableDefinition<'_, &str, (f64, u64)> = TableDefinition::new("credits");

/// File name of the mesh store inside the data directory.
pub const MESH_DB_FILE: &str = "mesh.redb";

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed {
        backend: "redb",
        reason: e.to_string(),
    }
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(failed)
}

/// [`MeshStore`] on redb.
pub struct RedbStore {
    db: Database,
    data_dir: PathBuf,
    health: Arc<Health>,
}

impl RedbStore {
    /// Opens (creating) `<data_dir>/mesh.redb`.
    pub fn open(data_dir: &Path, _owner: u64) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(failed)?;
        let db = Database::create(data_dir.join(MESH_DB_FILE)).map_err(failed)?;
        let txn = db.begin_write().map_err(failed)?;
        txn.open_table(MESSAGES).map_err(failed)?;
        txn.open_table(STATE).map_err(failed)?;
        txn.open_table(NODE_STATE).map_err(failed)?;
        txn.open_table(CONSENSUS).map_err(failed)?;
        txn.open_table(ROUTES).map_err(failed)?;
        txn.open_table(CONFIG).map_err(failed)?;
        txn.open_table(IDEMPOTENCY).map_err(failed)?;
        txn.open_table(CREDITS).map_err(failed)?;
        txn.commit().map_err(failed)?;
        Ok(Self {
            db,
            data_dir: data_dir.to_path_buf(),
            health: Arc::default(),
        })
    }

    fn observed<T>(&self, result: Result<T>) -> Result<T> {
        self.health.observe(&result);
        result
    }

    fn apply_inner(&self, writes: &[Write]) -> Result<()> {
        let txn = self.db.begin_write().map_err(failed)?;
        {
            let mut messages = txn.open_table(MESSAGES).map_err(failed)?;
            let mut state = txn.open_table(STATE).map_err(failed)?;
            let mut nodes = txn.open_table(NODE_STATE).map_err(failed)?;
            let mut consensus = txn.open_table(CONSENSUS).map_err(failed)?;
            let mut routes = txn.open_table(ROUTES).map_err(failed)?;
            let mut config = txn.open_table(CONFIG).map_err(failed)?;
            for write in writes {
                match write {
                    Write::PutMessage(m) => {
                        let row = m.encode_row();
                        messages
                            .insert(m.id.as_str(), row.as_slice())
                            .map_err(failed)?;
                    }
                    Write::DeleteMessage(id) => {
                        messages.remove(id.as_str()).map_err(failed)?;
                    }
                    Write::PutState(k, v) => {
                        state.insert(k.as_str(), v.as_slice()).map_err(failed)?;
                    }
                    Write::DeleteState(k) => {
                        state.remove(k.as_str()).map_err(failed)?;
                    }
                    Write::PutNodeState(node, v) => {
                        nodes
                            .insert(*node, v.to_string().as_str())
                            .map_err(failed)?;
                    }
                    Write::AppendConsensus(e) => {
                        let row = postcard::to_allocvec(&(e.term, e.entry.to_string()))
                            .map_err(failed)?;
                        consensus.insert(e.index, row.as_slice()).map_err(failed)?;
                    }
                    Write::PurgeConsensus(up_to) => {
                        consensus
                            .retain_in(0..=*up_to, |_, _| false)
                            .map_err(failed)?;
                    }
                    Write::ReplaceRoutes(rows) => {
                        routes.retain(|_, _| false).map_err(failed)?;
                        for (dst, v) in rows {
                            routes
                                .insert(*dst, v.to_string().as_str())
                                .map_err(failed)?;
                        }
                    }
                    Write::PutConfig(k, v) => {
                        config
                            .insert(k.as_str(), v.to_string().as_str())
                            .map_err(failed)?;
                    }
                    Write::DeleteConfig(k) => {
                        config.remove(k.as_str()).map_err(failed)?;
                    }
                }
            }
        }
        txn.commit().map_err(failed)
    }
}

fn message(id: &str, bytes: &[u8]) -> Result<StoredMessage> {
    StoredMessage::decode_row(id.to_string(), bytes).ok_or_else(|| failed("corrupt message row"))
}

impl MeshStore for RedbStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Redb
    }

    fn health(&self) -> &Arc<Health> {
        &self.health
    }

    fn health_check(&self) -> Result<()> {
        let probe = b"ok";
        let result = self
            .apply_inner(&[Write::PutState("__health_check".into(), probe.to_vec())])
            .and_then(|()| self.get_state("__health_check"))
            .and_then(|read| {
                if read.as_deref() == Some(probe) {
                    self.apply_inner(&[Write::DeleteState("__health_check".into())])
                } else {
                    Err(failed("the probe key read back wrong"))
                }
            });
        self.observed(result)
    }

    fn apply(&self, writes: &[Write]) -> Result<()> {
        writes.iter().try_for_each(Write::validate)?;
        let result = self.apply_inner(writes);
        self.observed(result)
    }

    fn get_message(&self, id: &str) -> Result<Option<StoredMessage>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(MESSAGES).map_err(failed)?;
        let row = table.get(id).map_err(failed)?;
        row.map(|v| message(id, v.value())).transpose()
    }

    fn messages_to(&self, to: u64, limit: usize) -> Result<Vec<StoredMessage>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(MESSAGES).map_err(failed)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(failed)? {
            let (id, bytes) = row.map_err(failed)?;
            let m = message(id.value(), bytes.value())?;
            if m.to == to {
                out.push(m);
            }
        }
        out.sort_by(|a, b| (a.timestamp_ms, &a.id).cmp(&(b.timestamp_ms, &b.id)));
        out.truncate(limit);
        Ok(out)
    }

    fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(STATE).map_err(failed)?;
        Ok(table.get(key).map_err(failed)?.map(|v| v.value().to_vec()))
    }

    fn node_states(&self) -> Result<Vec<(u64, Value)>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(NODE_STATE).map_err(failed)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(failed)? {
            let (node, text) = row.map_err(failed)?;
            out.push((node.value(), json(text.value())?));
        }
        Ok(out)
    }

    fn consensus_entries(&self, from: u64, limit: usize) -> Result<Vec<ConsensusEntry>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(CONSENSUS).map_err(failed)?;
        let mut out = Vec::new();
        for row in table.range(from..).map_err(failed)?.take(limit) {
            let (index, bytes) = row.map_err(failed)?;
            let (term, text): (u64, String) =
                postcard::from_bytes(bytes.value()).map_err(failed)?;
            out.push(ConsensusEntry {
                term,
                index: index.value(),
                entry: json(&text)?,
            });
        }
        Ok(out)
    }

    fn routes(&self) -> Result<Vec<(u64, Value)>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(ROUTES).map_err(failed)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(failed)? {
            let (dst, text) = row.map_err(failed)?;
            out.push((dst.value(), json(text.value())?));
        }
        Ok(out)
    }

    fn config(&self) -> Result<Vec<(String, Value)>> {
        let txn = self.db.begin_read().map_err(failed)?;
        let table = txn.open_table(CONFIG).map_err(failed)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(failed)? {
            let (k, text) = row.map_err(failed)?;
            out.push((k.value().to_string(), json(text.value())?));
        }
        Ok(out)
    }

    fn counts(&self) -> Result<Counts> {
        let txn = self.db.begin_read().map_err(failed)?;
        let n = |len: std::result::Result<u64, redb::StorageError>| len.map_err(failed);
        Ok(Counts {
            messages: n(txn.open_table(MESSAGES).map_err(failed)?.len())?,
            state: n(txn.open_table(STATE).map_err(failed)?.len())?,
            node_states: n(txn.open_table(NODE_STATE).map_err(failed)?.len())?,
            consensus: n(txn.open_table(CONSENSUS).map_err(failed)?.len())?,
            routes: n(txn.open_table(ROUTES).map_err(failed)?.len())?,
            config: n(txn.open_table(CONFIG).map_err(failed)?.len())?,
        })
    }

    fn purge_messages_before(&self, before_ms: u64) -> Result<u64> {
        let txn = self.db.begin_write().map_err(failed)?;
        let mut gone = 0;
        {
            let mut table = txn.open_table(MESSAGES).map_err(failed)?;
            table
                .retain(|_, bytes| {
                    let old = StoredMessage::decode_row(String::new(), bytes)
                        .is_some_and(|m| m.timestamp_ms < before_ms);
                    gone += u64::from(old);
                    !old
                })
                .map_err(failed)?;
        }
        txn.commit().map_err(failed)?;
        Ok(gone)
    }

    fn remember_key(&self, scope: &str, key: &str, ttl_ms: u64) -> Result<bool> {
        Write::DeleteState(scope.into()).validate()?;
        Write::DeleteState(key.into()).validate()?;
        let now = crate::storage::now_ms();
        let txn = self.db.begin_write().map_err(failed)?;
        let first = {
            let mut table = txn.open_table(IDEMPOTENCY).map_err(failed)?;
            let live = table
                .get((scope, key))
                .map_err(failed)?
                .is_some_and(|expires| expires.value() > now);
            if !live {
                table
                    .insert((scope, key), now.saturating_add(ttl_ms))
                    .map_err(failed)?;
                // Expired keys go as new ones come, so the table stays as large as the live set.
                table.retain(|_, expires| expires > now).map_err(failed)?;
            }
            !live
        };
        txn.commit().map_err(failed)?;
        Ok(first)
    }

    fn take_credits(&self, bucket: &str, n: u64, capacity: u64, per_second: u64) -> Result<bool> {
        Write::DeleteState(bucket.into()).validate()?;
        let now = crate::storage::now_ms();
        let txn = self.db.begin_write().map_err(failed)?;
        let granted = {
            let mut table = txn.open_table(CREDITS).map_err(failed)?;
            let (tokens, at) = table
                .get(bucket)
                .map_err(failed)?
                .map_or((capacity as f64, now), |v| v.value());
            let (granted, left) = super::refill(tokens, at, now, n, capacity, per_second);
            table.insert(bucket, (left, now)).map_err(failed)?;
            granted
        };
        txn.commit().map_err(failed)?;
        Ok(granted)
    }

    fn streams(&self, worker: usize) -> Result<Box<dyn StreamStore>> {
        let path = self.data_dir.join(format!("streams-{worker}.redb"));
        let db = store::open(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
        Ok(Box::new(RedbStreams {
            db,
            health: Arc::clone(&self.health),
        }))
    }
}

/// A stream worker's redb database.
pub struct RedbStreams {
    db: Database,
    health: Arc<Health>,
}

impl RedbStreams {
    fn observed<T>(&self, result: std::result::Result<T, store::StoreError>) -> Result<T> {
        let result = result.map_err(failed);
        self.health.observe(&result);
        result
    }
}

impl StreamStore for RedbStreams {
    fn load(&self) -> Result<Vec<(u128, StreamRecord)>> {
        self.observed(store::load(&self.db))
    }

    fn commit(&self, batch: Batch, now_ms: u64) -> Result<()> {
        self.observed(store::commit(&self.db, &batch, now_ms))
    }

    fn read(
        &self,
        which: Queue,
        keys: &[(u128, u64)],
        spare: usize,
        max_bytes: usize,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        self.observed(store::read(&self.db, which, keys, spare, max_bytes))
    }

    fn delivery_log(&self, stream: u128, from: u64) -> Result<Vec<(u64, u64)>> {
        self.observed(store::delivery_log(&self.db, stream, from))
    }
}
