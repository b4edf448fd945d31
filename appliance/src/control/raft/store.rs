//! The control group's log and state machine on redb.
//!
//! Tables (in the database the caller opens; postcard values):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `raft_log` | log index | `Entry` |
//! | `raft_meta` | `"vote"`, `"last_purged"`, `"committed"` | `Vote`, `LogId`, `LogId` |
//! | `raft_sm` | `"last_applied"`, `"membership"`, `"snapshot"` | `LogId`, `StoredMembership`, `StoredSnapshot` |
//! | `raft_updates` | log index | `(Stream, payload)` of an applied update |
//!
//! Durability: every write is one redb transaction committed with redb's default (immediate)
//! durability before the call returns, so an acknowledged append or vote survives kill -9.
//! The state machine is persistent too: an applied entry's rows, `last_applied` and the
//! membership commit together, so a restart resumes exactly where it applied.
//!
//! The calls block on the disk for the length of a commit. On the control thread that is a
//! stall of a few milliseconds per append batch; wiring it in moves commits to
//! `spawn_blocking` (the Raft step after this one).

use std::{fmt::Debug, io::Cursor, ops::RangeBounds, sync::Arc};

use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
    storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot},
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{Decision, MeshCommand, MeshReply, Stream, TypeConfig};

const RAFT_LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_meta");
const RAFT_SM: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_sm");
const RAFT_UPDATES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_updates");
const UPDATE_CURSORS: TableDefinition<'_, &str, u64> = TableDefinition::new("update_cursors");
/// Nodes the group removed: node → [`REMOVED_EVICTED`] or [`REMOVED_LEFT`].
const RAFT_REMOVED: TableDefinition<'_, u64, u8> = TableDefinition::new("raft_removed");
/// Live settings (SetPolicy): key → value.
const RAFT_POLICY: TableDefinition<'_, &str, &str> = TableDefinition::new("raft_policy");
/// Admitted members: node → the key it proved when it joined.
const RAFT_MEMBERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_members");

const REMOVED_EVICTED: u8 = 1;
const REMOVED_LEFT: u8 = 2;

type Result<T> = std::result::Result<T, StorageError<u64>>;
type Membership = StoredMembership<u64, openraft::EmptyNode>;

/// A storage error from anything printable (shared with the data stream groups' store).
pub(crate) fn any(error: impl std::fmt::Display) -> AnyError {
    AnyError::error(error.to_string())
}

/// postcard, as every stored value is.
pub(crate) fn encode<T: Serialize>(value: &T) -> std::result::Result<Vec<u8>, AnyError> {
    postcard::to_allocvec(value).map_err(any)
}

/// The inverse of [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, AnyError> {
    postcard::from_bytes(bytes).map_err(any)
}

mod reads;

pub use reads::{
    ack_cursor, cursor, decisions, members, oldest_kept, read_updates, read_updates_where,
};

/// Creates the tables (idempotent).
pub fn create_tables(db: &Database) -> std::result::Result<(), AnyError> {
    let txn = db.begin_write().map_err(any)?;
    txn.open_table(RAFT_LOG).map_err(any)?;
    txn.open_table(RAFT_META).map_err(any)?;
    txn.open_table(RAFT_SM).map_err(any)?;
    txn.open_table(RAFT_UPDATES).map_err(any)?;
    txn.open_table(UPDATE_CURSORS).map_err(any)?;
    txn.open_table(RAFT_REMOVED).map_err(any)?;
    txn.open_table(RAFT_POLICY).map_err(any)?;
    txn.open_table(RAFT_MEMBERS).map_err(any)?;
    txn.commit().map_err(any)
}

/// The removed nodes, the live settings and the admitted members as one read transaction
/// sees them.
#[derive(Default, Serialize, Deserialize)]
struct Standing {
    removed: Vec<(u64, u8)>,
    policy: Vec<(String, String)>,
    members: Vec<(u64, [u8; 32])>,
}

fn standing(txn: &redb::ReadTransaction) -> std::result::Result<Standing, AnyError> {
    let mut out = Standing::default();
    for row in txn
        .open_table(RAFT_REMOVED)
        .map_err(any)?
        .iter()
        .map_err(any)?
    {
        let (node, kind) = row.map_err(any)?;
        out.removed.push((node.value(), kind.value()));
    }
    for row in txn
        .open_table(RAFT_POLICY)
        .map_err(any)?
        .iter()
        .map_err(any)?
    {
        let (key, value) = row.map_err(any)?;
        out.policy
            .push((key.value().to_owned(), value.value().to_owned()));
    }
    for row in txn
        .open_table(RAFT_MEMBERS)
        .map_err(any)?
        .iter()
        .map_err(any)?
    {
        let (node, key) = row.map_err(any)?;
        // Written by this store from a 32-byte key; anything else is a damaged row, skipped.
        if let Ok(key) = <[u8; 32]>::try_from(key.value()) {
            out.members.push((node.value(), key));
        }
    }
    Ok(out)
}

fn read_value<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<'_, &str, &[u8]>,
    key: &str,
) -> std::result::Result<Option<T>, AnyError> {
    let txn = db.begin_read().map_err(any)?;
    let table = txn.open_table(table).map_err(any)?;
    match table.get(key).map_err(any)? {
        Some(value) => decode(value.value()).map(Some),
        None => Ok(None),
    }
}

fn write_value<T: Serialize>(
    db: &Database,
    table: TableDefinition<'_, &str, &[u8]>,
    key: &str,
    value: &T,
) -> std::result::Result<(), AnyError> {
    let bytes = encode(value)?;
    let txn = db.begin_write().map_err(any)?;
    txn.open_table(table)
        .map_err(any)?
        .insert(key, bytes.as_slice())
        .map_err(any)?;
    txn.commit().map_err(any)
}

/// The Raft log, the vote and the committed id.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// A log store in `db` (the tables are created if missing).
    pub fn new(db: Arc<Database>) -> Result<Self> {
        create_tables(&db).map_err(StorageIOError::write_logs)?;
        Ok(Self { db })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let read = || -> std::result::Result<Vec<Entry<TypeConfig>>, AnyError> {
            let txn = self.db.begin_read().map_err(any)?;
            let table = txn.open_table(RAFT_LOG).map_err(any)?;
            let mut entries = Vec::new();
            for row in table.range(range.clone()).map_err(any)? {
                let (_, value) = row.map_err(any)?;
                entries.push(decode(value.value())?);
            }
            Ok(entries)
        };
        Ok(read().map_err(StorageIOError::read_logs)?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let read = || -> std::result::Result<LogState<TypeConfig>, AnyError> {
            let last_purged_log_id: Option<LogId<u64>> =
                read_value(&self.db, RAFT_META, "last_purged")?;
            let txn = self.db.begin_read().map_err(any)?;
            let table = txn.open_table(RAFT_LOG).map_err(any)?;
            let last = match table.last().map_err(any)? {
                Some((_, value)) => Some(decode::<Entry<TypeConfig>>(value.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        };
        Ok(read().map_err(StorageIOError::read_logs)?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<()> {
        Ok(write_value(&self.db, RAFT_META, "vote", vote).map_err(StorageIOError::write_vote)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>> {
        Ok(read_value(&self.db, RAFT_META, "vote").map_err(StorageIOError::read_vote)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<()> {
        Ok(write_value(&self.db, RAFT_META, "committed", &committed)
            .map_err(|e| StorageIOError::write(any(e)))?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>> {
        let committed: Option<Option<LogId<u64>>> =
            read_value(&self.db, RAFT_META, "committed").map_err(StorageIOError::read)?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = || -> std::result::Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(any)?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(any)?;
                for entry in entries {
                    let bytes = encode(&entry)?;
                    table
                        .insert(entry.log_id.index, bytes.as_slice())
                        .map_err(any)?;
                }
            }
            txn.commit().map_err(any)
        };
        write().map_err(StorageIOError::write_logs)?;
        // Only now: the entries are on disk.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<()> {
        let write = || -> std::result::Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(any)?;
            txn.open_table(RAFT_LOG)
                .map_err(any)?
                .retain_in(log_id.index.., |_, _| false)
                .map_err(any)?;
            txn.commit().map_err(any)
        };
        Ok(write().map_err(StorageIOError::write_logs)?)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<()> {
        // The purge mark and the removal commit together: the log never has a hole.
        let write = || -> std::result::Result<(), AnyError> {
            let bytes = encode(&log_id)?;
            let txn = self.db.begin_write().map_err(any)?;
            txn.open_table(RAFT_META)
                .map_err(any)?
                .insert("last_purged", bytes.as_slice())
                .map_err(any)?;
            txn.open_table(RAFT_LOG)
                .map_err(any)?
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(any)?;
            txn.commit().map_err(any)
        };
        Ok(write().map_err(StorageIOError::write_logs)?)
    }
}

/// A snapshot as stored: its meta and the state machine's rows.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::EmptyNode>,
    data: Vec<u8>,
}

/// The replicated state: the applied updates of every stream, removed nodes, settings.
#[derive(Serialize, Deserialize, Default)]
struct SnapshotData {
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    updates: Vec<(u64, Vec<u8>)>,
    standing: Standing,
    oldest_kept: u64,
}

/// The state machine: the applied updates, the last applied id and the membership.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    /// Told the last applied index after each commit (stream subscribers wait on it).
    applied: Option<Arc<tokio::sync::watch::Sender<u64>>>,
    /// Told every membership or configuration decision once it is applied.
    decided: Option<tokio::sync::mpsc::Sender<Decision>>,
    /// Updates kept: older ones are dropped as new ones are applied.
    retain: u64,
}

impl StateMachine {
    /// A state machine in `db` (the tables are created if missing).
    pub fn new(db: Arc<Database>) -> Result<Self> {
        create_tables(&db).map_err(StorageIOError::write_state_machine)?;
        Ok(Self {
            db,
            applied: None,
            decided: None,
            retain: u64::MAX,
        })
    }

    /// Tells `decided` every decision once applied (the control thread acts on them). The
    /// state machine waits for room: the control thread never waits on the group.
    pub fn with_decisions(mut self, decided: tokio::sync::mpsc::Sender<Decision>) -> Self {
        self.decided = Some(decided);
        self
    }

    /// Keeps at most the last `retain` log indexes' worth of updates.
    pub fn with_retention(mut self, retain: u64) -> Self {
        self.retain = retain.max(1);
        self
    }

    async fn tell_decided(&self, decisions: Vec<Decision>) {
        if let Some(decided) = &self.decided {
            for decision in decisions {
                // Closed: the control thread stopped; the decision is in the store anyway.
                let _ = decided.send(decision).await;
            }
        }
    }

    /// Tells `applied` the last applied index, now and after every apply.
    pub fn with_applied(mut self, applied: tokio::sync::watch::Sender<u64>) -> Self {
        if let Ok(Some(Some(id))) =
            read_value::<Option<LogId<u64>>>(&self.db, RAFT_SM, "last_applied")
        {
            applied.send_replace(id.index);
        }
        self.applied = Some(Arc::new(applied));
        self
    }

    fn tell_applied(&self, index: u64) {
        if let Some(applied) = &self.applied {
            applied.send_replace(index);
        }
    }

    /// The applied update at `index`, if any (what stream subscribers read).
    pub fn update(&self, index: u64) -> Result<Option<(Stream, Vec<u8>)>> {
        let read = || -> std::result::Result<Option<(Stream, Vec<u8>)>, AnyError> {
            let txn = self.db.begin_read().map_err(any)?;
            let table = txn.open_table(RAFT_UPDATES).map_err(any)?;
            match table.get(index).map_err(any)? {
                Some(value) => decode(value.value()).map(Some),
                None => Ok(None),
            }
        };
        Ok(read().map_err(StorageIOError::read_state_machine)?)
    }

    fn snapshot_data(&self) -> std::result::Result<SnapshotData, AnyError> {
        // One read transaction: rows and meta of one and the same moment.
        let txn = self.db.begin_read().map_err(any)?;
        let sm = txn.open_table(RAFT_SM).map_err(any)?;
        let get = |key: &str| -> std::result::Result<Option<Vec<u8>>, AnyError> {
            Ok(sm.get(key).map_err(any)?.map(|v| v.value().to_vec()))
        };
        let last_applied = match get("last_applied")? {
            Some(bytes) => decode(&bytes)?,
            None => None,
        };
        let membership = match get("membership")? {
            Some(bytes) => decode(&bytes)?,
            None => Membership::default(),
        };
        let table = txn.open_table(RAFT_UPDATES).map_err(any)?;
        let mut updates = Vec::new();
        for row in table.iter().map_err(any)? {
            let (index, value) = row.map_err(any)?;
            updates.push((index.value(), value.value().to_vec()));
        }
        let standing = standing(&txn)?;
        let oldest_kept = match get("oldest_kept")? {
            Some(bytes) => decode(&bytes)?,
            None => 0,
        };
        Ok(SnapshotData {
            last_applied,
            membership,
            updates,
            standing,
            oldest_kept,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let data = self
            .snapshot_data()
            .map_err(StorageIOError::read_state_machine)?;
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id: data.last_applied.map_or_else(
                || "empty".to_owned(),
                |id| format!("{}-{}", id.leader_id, id.index),
            ),
        };
        let bytes = encode(&data).map_err(|e| StorageIOError::write_snapshot(None, e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes.clone(),
        };
        write_value(&self.db, RAFT_SM, "snapshot", &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership)> {
        let read = || -> std::result::Result<(Option<LogId<u64>>, Membership), AnyError> {
            let last_applied: Option<Option<LogId<u64>>> =
                read_value(&self.db, RAFT_SM, "last_applied")?;
            let membership: Option<Membership> = read_value(&self.db, RAFT_SM, "membership")?;
            Ok((last_applied.flatten(), membership.unwrap_or_default()))
        };
        Ok(read().map_err(StorageIOError::read_state_machine)?)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MeshReply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write_with =
            |out: &mut Vec<Decision>| -> std::result::Result<Vec<MeshReply>, AnyError> {
                let txn = self.db.begin_write().map_err(any)?;
                let mut replies = Vec::new();
                let mut last = None;
                {
                    let mut sm = txn.open_table(RAFT_SM).map_err(any)?;
                    let mut updates = txn.open_table(RAFT_UPDATES).map_err(any)?;
                    let mut removed = txn.open_table(RAFT_REMOVED).map_err(any)?;
                    let mut policy = txn.open_table(RAFT_POLICY).map_err(any)?;
                    let mut members = txn.open_table(RAFT_MEMBERS).map_err(any)?;
                    for entry in entries {
                        let log_id = entry.log_id;
                        last = Some(log_id.index);
                        sm.insert("last_applied", encode(&Some(log_id))?.as_slice())
                            .map_err(any)?;
                        match entry.payload {
                            EntryPayload::Blank => replies.push(MeshReply::Nothing),
                            EntryPayload::Membership(membership) => {
                                let stored = Membership::new(Some(log_id), membership);
                                sm.insert("membership", encode(&stored)?.as_slice())
                                    .map_err(any)?;
                                replies.push(MeshReply::Nothing);
                            }
                            EntryPayload::Normal(MeshCommand::Update { stream, payload }) => {
                                let row = encode(&(stream, payload))?;
                                updates.insert(log_id.index, row.as_slice()).map_err(any)?;
                                replies.push(MeshReply::Applied {
                                    index: log_id.index,
                                });
                            }
                            EntryPayload::Normal(MeshCommand::Evict { node }) => {
                                removed.insert(node, REMOVED_EVICTED).map_err(any)?;
                                members.remove(node).map_err(any)?;
                                out.push(Decision::Evict(node));
                                replies.push(MeshReply::Applied {
                                    index: log_id.index,
                                });
                            }
                            EntryPayload::Normal(MeshCommand::Leave { node }) => {
                                removed.insert(node, REMOVED_LEFT).map_err(any)?;
                                members.remove(node).map_err(any)?;
                                out.push(Decision::Leave(node));
                                replies.push(MeshReply::Applied {
                                    index: log_id.index,
                                });
                            }
                            EntryPayload::Normal(MeshCommand::Admit { node, public_key }) => {
                                removed.remove(node).map_err(any)?;
                                members.insert(node, public_key.as_slice()).map_err(any)?;
                                out.push(Decision::Admit(node, public_key));
                                replies.push(MeshReply::Applied {
                                    index: log_id.index,
                                });
                            }
                            EntryPayload::Normal(MeshCommand::SetPolicy { key, value }) => {
                                policy.insert(key.as_str(), value.as_str()).map_err(any)?;
                                out.push(Decision::SetPolicy(key, value));
                                replies.push(MeshReply::Applied {
                                    index: log_id.index,
                                });
                            }
                        }
                    }
                    // Retention: the oldest updates go once more than `retain` indexes are held.
                    if let Some(last) = last
                        && last > self.retain
                    {
                        let cut = last - self.retain;
                        let oldest: u64 = match sm.get("oldest_kept").map_err(any)? {
                            Some(v) => decode(v.value())?,
                            None => 0,
                        };
                        if cut > oldest {
                            updates.retain_in(..cut, |_, _| false).map_err(any)?;
                            sm.insert("oldest_kept", encode(&cut)?.as_slice())
                                .map_err(any)?;
                        }
                    }
                }
                txn.commit().map_err(any)?;
                if let Some(last) = last {
                    self.tell_applied(last);
                }
                Ok(replies)
            };
        let (replies, decisions) = {
            let mut decisions = Vec::new();
            let replies =
                write_with(&mut decisions).map_err(StorageIOError::write_state_machine)?;
            (replies, decisions)
        };
        self.tell_decided(decisions).await;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::EmptyNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let bytes = snapshot.into_inner();
        let install = || -> std::result::Result<(), AnyError> {
            let data: SnapshotData = decode(&bytes)?;
            let stored = encode(&StoredSnapshot {
                meta: meta.clone(),
                data: bytes.clone(),
            })?;
            // Everything is replaced in one transaction: a crash leaves the old state or the new.
            let txn = self.db.begin_write().map_err(any)?;
            {
                let mut updates = txn.open_table(RAFT_UPDATES).map_err(any)?;
                updates.retain(|_, _| false).map_err(any)?;
                for (index, row) in &data.updates {
                    updates.insert(*index, row.as_slice()).map_err(any)?;
                }
                let mut removed = txn.open_table(RAFT_REMOVED).map_err(any)?;
                removed.retain(|_, _| false).map_err(any)?;
                for (node, kind) in &data.standing.removed {
                    removed.insert(*node, *kind).map_err(any)?;
                }
                let mut policy = txn.open_table(RAFT_POLICY).map_err(any)?;
                policy.retain(|_, _| false).map_err(any)?;
                for (key, value) in &data.standing.policy {
                    policy.insert(key.as_str(), value.as_str()).map_err(any)?;
                }
                let mut members = txn.open_table(RAFT_MEMBERS).map_err(any)?;
                members.retain(|_, _| false).map_err(any)?;
                for (node, key) in &data.standing.members {
                    members.insert(*node, key.as_slice()).map_err(any)?;
                }
                let mut sm = txn.open_table(RAFT_SM).map_err(any)?;
                sm.insert("oldest_kept", encode(&data.oldest_kept)?.as_slice())
                    .map_err(any)?;
                sm.insert("last_applied", encode(&meta.last_log_id)?.as_slice())
                    .map_err(any)?;
                sm.insert("membership", encode(&meta.last_membership)?.as_slice())
                    .map_err(any)?;
                sm.insert("snapshot", stored.as_slice()).map_err(any)?;
            }
            txn.commit().map_err(any)
        };
        install().map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        self.tell_applied(meta.last_log_id.map_or(0, |id| id.index));
        // A node that caught up from a snapshot acts on every decision it holds (acting
        // twice on one is harmless: each is idempotent).
        let held = decisions(&self.db).map_err(StorageIOError::read_state_machine)?;
        self.tell_decided(held).await;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> = read_value(&self.db, RAFT_SM, "snapshot")
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use tempfile::TempDir;

    use super::*;

    struct RedbBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RedbBuilder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachine)> {
            let dir = TempDir::new().map_err(|e| StorageIOError::write(any(e)))?;
            let db = Database::create(dir.path().join("raft.redb"))
                .map_err(|e| StorageIOError::write(any(e)))?;
            let db = Arc::new(db);
            Ok((dir, LogStore::new(Arc::clone(&db))?, StateMachine::new(db)?))
        }
    }

    /// openraft's own storage suite (logs, votes, purge, truncate, apply, snapshots).
    #[test]
    fn openraft_storage_suite_passes_on_redb() -> Result<()> {
        Suite::test_all(RedbBuilder)
    }

    #[test]
    fn votes_logs_and_applied_state_survive_a_reopen() -> Result<()> {
        let dir = TempDir::new().map_err(|e| StorageIOError::write(any(e)))?;
        let path = dir.path().join("raft.redb");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| StorageIOError::write(any(e)))?;
        runtime.block_on(async {
            let db = Arc::new(Database::create(&path).map_err(|e| StorageIOError::write(any(e)))?);
            let mut log = LogStore::new(Arc::clone(&db))?;
            let mut sm = StateMachine::new(db)?;
            let vote = Vote::new(3, 7);
            log.save_vote(&vote).await?;
            let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 7), 1);
            let entry = Entry {
                log_id,
                payload: EntryPayload::Normal(MeshCommand::Update {
                    stream: Stream::InternalDb,
                    payload: b"row".to_vec(),
                }),
            };
            let replies = sm.apply(vec![entry]).await?;
            assert_eq!(replies, vec![MeshReply::Applied { index: 1 }]);
            Ok::<_, StorageError<u64>>(())
        })?;
        // Reopened, as after kill -9.
        runtime.block_on(async {
            let db = Arc::new(Database::create(&path).map_err(|e| StorageIOError::write(any(e)))?);
            let mut log = LogStore::new(Arc::clone(&db))?;
            let mut sm = StateMachine::new(db)?;
            assert_eq!(log.read_vote().await?, Some(Vote::new(3, 7)));
            let (applied, _) = sm.applied_state().await?;
            assert_eq!(applied.map(|id| id.index), Some(1));
            assert_eq!(sm.update(1)?, Some((Stream::InternalDb, b"row".to_vec())));
            Ok(())
        })
    }
}
