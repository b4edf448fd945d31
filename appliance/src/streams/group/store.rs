//! Every data stream group's log and state machine, on one redb database per node
//! (`stream-groups.redb`), keyed by group.
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `group_log` | (group, log index) | `Entry` |
//! | `group_meta` | (group, `"vote"` / `"committed"` / `"last_purged"` / `"snapshot"`) | postcard |
//! | `group_state` | group | [`Applied`]: last applied id, membership, [`GroupState`] |
//! | `group_sets` | group | its participants |
//!
//! Durability as for the control group: every write is one transaction committed (fsync)
//! before the call returns, so an acknowledged append or vote survives kill -9, and a group's
//! applied state, last applied id and membership commit together. The groups share the
//! database and the `stream-groups` thread, which runs their store calls one at a time.
#![allow(clippy::result_large_err)] // openraft's `StorageError` is large by design.

use std::{
    fmt::Debug,
    io::Cursor,
    ops::{Bound, RangeBounds},
    sync::{Arc, Mutex},
};

use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
    storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot},
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{GroupReply, GroupState, GroupTypes};
use crate::control::raft::store::{any, decode, encode};

const GROUP_LOG: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("group_log");
const GROUP_META: TableDefinition<'_, (u64, &str), &[u8]> = TableDefinition::new("group_meta");
const GROUP_STATE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("group_state");
const GROUP_SETS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("group_sets");

type Result<T> = std::result::Result<T, StorageError<u64>>;
type Membership = StoredMembership<u64, openraft::EmptyNode>;

/// Creates the tables (idempotent).
pub fn create_tables(db: &Database) -> std::result::Result<(), AnyError> {
    let txn = db.begin_write().map_err(any)?;
    txn.open_table(GROUP_LOG).map_err(any)?;
    txn.open_table(GROUP_META).map_err(any)?;
    txn.open_table(GROUP_STATE).map_err(any)?;
    txn.open_table(GROUP_SETS).map_err(any)?;
    txn.commit().map_err(any)
}

/// Every group this node is in, with its participants.
pub fn groups(db: &Database) -> std::result::Result<Vec<(u64, Vec<u64>)>, AnyError> {
    let txn = db.begin_read().map_err(any)?;
    let table = txn.open_table(GROUP_SETS).map_err(any)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(any)? {
        let (group, set) = row.map_err(any)?;
        out.push((group.value(), decode(set.value())?));
    }
    Ok(out)
}

/// Records that this node is in `group` with `participants`.
pub fn save_group(
    db: &Database,
    group: u64,
    participants: &[u64],
) -> std::result::Result<(), AnyError> {
    let bytes = encode(&participants)?;
    let txn = db.begin_write().map_err(any)?;
    txn.open_table(GROUP_SETS)
        .map_err(any)?
        .insert(group, bytes.as_slice())
        .map_err(any)?;
    txn.commit().map_err(any)
}

fn read_meta<T: DeserializeOwned>(
    db: &Database,
    group: u64,
    key: &str,
) -> std::result::Result<Option<T>, AnyError> {
    let txn = db.begin_read().map_err(any)?;
    let table = txn.open_table(GROUP_META).map_err(any)?;
    match table.get((group, key)).map_err(any)? {
        Some(value) => decode(value.value()).map(Some),
        None => Ok(None),
    }
}

fn write_meta<T: Serialize>(
    db: &Database,
    group: u64,
    key: &str,
    value: &T,
) -> std::result::Result<(), AnyError> {
    let bytes = encode(value)?;
    let txn = db.begin_write().map_err(any)?;
    txn.open_table(GROUP_META)
        .map_err(any)?
        .insert((group, key), bytes.as_slice())
        .map_err(any)?;
    txn.commit().map_err(any)
}

/// One group's log, vote and committed id.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    group: u64,
}

impl LogStore {
    /// The log of `group` in `db` (the tables are created if missing).
    pub fn new(db: Arc<Database>, group: u64) -> Result<Self> {
        create_tables(&db).map_err(StorageIOError::write_logs)?;
        Ok(Self { db, group })
    }

    /// The log's key range for an openraft index range.
    fn keys(&self, range: &impl RangeBounds<u64>) -> (Bound<(u64, u64)>, Bound<(u64, u64)>) {
        let g = self.group;
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included((g, *i)),
            Bound::Excluded(i) => Bound::Excluded((g, *i)),
            Bound::Unbounded => Bound::Included((g, 0)),
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included((g, *i)),
            Bound::Excluded(i) => Bound::Excluded((g, *i)),
            Bound::Unbounded => Bound::Included((g, u64::MAX)),
        };
        (start, end)
    }
}

impl RaftLogReader<GroupTypes> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<GroupTypes>>> {
        let read = || -> std::result::Result<Vec<Entry<GroupTypes>>, AnyError> {
            let txn = self.db.begin_read().map_err(any)?;
            let table = txn.open_table(GROUP_LOG).map_err(any)?;
            let mut entries = Vec::new();
            for row in table.range(self.keys(&range)).map_err(any)? {
                let (_, value) = row.map_err(any)?;
                entries.push(decode(value.value())?);
            }
            Ok(entries)
        };
        Ok(read().map_err(StorageIOError::read_logs)?)
    }
}

impl RaftLogStorage<GroupTypes> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<GroupTypes>> {
        let read = || -> std::result::Result<LogState<GroupTypes>, AnyError> {
            let last_purged_log_id: Option<LogId<u64>> =
                read_meta(&self.db, self.group, "last_purged")?;
            let txn = self.db.begin_read().map_err(any)?;
            let table = txn.open_table(GROUP_LOG).map_err(any)?;
            let last = match table.range(self.keys(&(..))).map_err(any)?.next_back() {
                Some(row) => {
                    let (_, value) = row.map_err(any)?;
                    Some(decode::<Entry<GroupTypes>>(value.value())?.log_id)
                }
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
        Ok(write_meta(&self.db, self.group, "vote", vote).map_err(StorageIOError::write_vote)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>> {
        Ok(read_meta(&self.db, self.group, "vote").map_err(StorageIOError::read_vote)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<()> {
        Ok(write_meta(&self.db, self.group, "committed", &committed)
            .map_err(|e| StorageIOError::write(any(e)))?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>> {
        let committed: Option<Option<LogId<u64>>> =
            read_meta(&self.db, self.group, "committed").map_err(StorageIOError::read)?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<GroupTypes>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<GroupTypes>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = || -> std::result::Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(any)?;
            {
                let mut table = txn.open_table(GROUP_LOG).map_err(any)?;
                for entry in entries {
                    let bytes = encode(&entry)?;
                    table
                        .insert((self.group, entry.log_id.index), bytes.as_slice())
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
            txn.open_table(GROUP_LOG)
                .map_err(any)?
                .retain_in(self.keys(&(log_id.index..)), |_, _| false)
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
            txn.open_table(GROUP_META)
                .map_err(any)?
                .insert((self.group, "last_purged"), bytes.as_slice())
                .map_err(any)?;
            txn.open_table(GROUP_LOG)
                .map_err(any)?
                .retain_in(self.keys(&(..=log_id.index)), |_, _| false)
                .map_err(any)?;
            txn.commit().map_err(any)
        };
        Ok(write().map_err(StorageIOError::write_logs)?)
    }
}

/// A group's applied state as stored (and as its snapshots carry it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    /// The last applied log id.
    pub last_applied: Option<LogId<u64>>,
    /// The membership in force.
    pub membership: Membership,
    /// The replicated state.
    pub state: GroupState,
}

/// A snapshot as stored: its meta and the encoded [`Applied`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::EmptyNode>,
    data: Vec<u8>,
}

/// One group's state machine. `view` is the applied state readers see: it is replaced (never
/// held locked across a disk write) once each apply is durable.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    group: u64,
    view: Arc<Mutex<Applied>>,
}

impl StateMachine {
    /// The state machine of `group` in `db`, its view loaded from what is stored.
    pub fn new(db: Arc<Database>, group: u64) -> Result<Self> {
        create_tables(&db).map_err(StorageIOError::write_state_machine)?;
        let stored = load_applied(&db, group).map_err(StorageIOError::read_state_machine)?;
        Ok(Self {
            db,
            group,
            view: Arc::new(Mutex::new(stored)),
        })
    }

    /// The applied state, shared with readers.
    pub fn view(&self) -> Arc<Mutex<Applied>> {
        Arc::clone(&self.view)
    }

    fn current(&self) -> Applied {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn publish(&self, applied: Applied) {
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = applied;
    }

    fn store(&self, applied: &Applied) -> std::result::Result<(), AnyError> {
        let bytes = encode(applied)?;
        let txn = self.db.begin_write().map_err(any)?;
        txn.open_table(GROUP_STATE)
            .map_err(any)?
            .insert(self.group, bytes.as_slice())
            .map_err(any)?;
        txn.commit().map_err(any)
    }
}

fn load_applied(db: &Database, group: u64) -> std::result::Result<Applied, AnyError> {
    let txn = db.begin_read().map_err(any)?;
    let table = txn.open_table(GROUP_STATE).map_err(any)?;
    match table.get(group).map_err(any)? {
        Some(value) => decode(value.value()),
        None => Ok(Applied::default()),
    }
}

impl RaftSnapshotBuilder<GroupTypes> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<GroupTypes>> {
        let applied = self.current();
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id: applied.last_applied.map_or_else(
                || "empty".to_owned(),
                |id| format!("{}-{}", id.leader_id, id.index),
            ),
        };
        let bytes = encode(&applied).map_err(|e| StorageIOError::write_snapshot(None, e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes.clone(),
        };
        write_meta(&self.db, self.group, "snapshot", &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<GroupTypes> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership)> {
        let applied = self.current();
        Ok((applied.last_applied, applied.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<GroupReply>>
    where
        I: IntoIterator<Item = Entry<GroupTypes>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Applied on a copy, stored, then shown: readers never see a state the disk lacks.
        let mut applied = self.current();
        let mut replies = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(GroupReply { ignored: 0 }),
                EntryPayload::Membership(membership) => {
                    applied.membership = Membership::new(Some(entry.log_id), membership);
                    replies.push(GroupReply { ignored: 0 });
                }
                EntryPayload::Normal(command) => replies.push(applied.state.apply(&command)),
            }
        }
        self.store(&applied)
            .map_err(StorageIOError::write_state_machine)?;
        self.publish(applied);
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
        let install = || -> std::result::Result<Applied, AnyError> {
            let mut applied: Applied = decode(&bytes)?;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            let stored = encode(&StoredSnapshot {
                meta: meta.clone(),
                data: bytes.clone(),
            })?;
            let state = encode(&applied)?;
            // The state and the snapshot are replaced together.
            let txn = self.db.begin_write().map_err(any)?;
            txn.open_table(GROUP_STATE)
                .map_err(any)?
                .insert(self.group, state.as_slice())
                .map_err(any)?;
            txn.open_table(GROUP_META)
                .map_err(any)?
                .insert((self.group, "snapshot"), stored.as_slice())
                .map_err(any)?;
            txn.commit().map_err(any)?;
            Ok(applied)
        };
        let applied =
            install().map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        self.publish(applied);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<GroupTypes>>> {
        let stored: Option<StoredSnapshot> = read_meta(&self.db, self.group, "snapshot")
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

    use super::{
        super::{GroupCommand, Op},
        *,
    };

    struct RedbBuilder;

    impl StoreBuilder<GroupTypes, LogStore, StateMachine, TempDir> for RedbBuilder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachine)> {
            let dir = TempDir::new().map_err(|e| StorageIOError::write(any(e)))?;
            let db = Database::create(dir.path().join("groups.redb"))
                .map_err(|e| StorageIOError::write(any(e)))?;
            let db = Arc::new(db);
            // Another group's rows beside it: the suite must never see them.
            let mut other = LogStore::new(Arc::clone(&db), 6)?;
            other.save_vote(&Vote::new(9, 9)).await?;
            Ok((
                dir,
                LogStore::new(Arc::clone(&db), 7)?,
                StateMachine::new(db, 7)?,
            ))
        }
    }

    /// openraft's own storage suite (logs, votes, purge, truncate, apply, snapshots), with a
    /// second group in the same database.
    #[test]
    fn openraft_storage_suite_passes_on_the_shared_database() -> Result<()> {
        Suite::test_all(RedbBuilder)
    }

    #[test]
    fn groups_sharing_a_database_keep_their_logs_and_states_apart() -> Result<()> {
        let dir = TempDir::new().map_err(|e| StorageIOError::write(any(e)))?;
        let path = dir.path().join("groups.redb");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| StorageIOError::write(any(e)))?;
        let entry = |index, stream| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(GroupCommand {
                writer: 1,
                ops: vec![Op::Open {
                    stream,
                    source: 1,
                    targets: vec![2],
                    quorum: 0,
                    tenant: "t".into(),
                }],
            }),
        };
        runtime.block_on(async {
            let db = Arc::new(Database::create(&path).map_err(|e| StorageIOError::write(any(e)))?);
            for (group, stream) in [(1u64, 10u128), (2, 20)] {
                let mut sm = StateMachine::new(Arc::clone(&db), group)?;
                sm.apply(vec![entry(1, stream)]).await?;
                let mut log = LogStore::new(Arc::clone(&db), group)?;
                log.save_vote(&Vote::new(group, 1)).await?;
            }
            save_group(&db, 1, &[1, 2]).map_err(StorageIOError::write)?;
            Ok::<_, StorageError<u64>>(())
        })?;
        // Reopened, as after kill -9.
        runtime.block_on(async {
            let db = Arc::new(Database::create(&path).map_err(|e| StorageIOError::write(any(e)))?);
            for (group, stream) in [(1u64, 10u128), (2, 20)] {
                let mut sm = StateMachine::new(Arc::clone(&db), group)?;
                let (applied, _) = sm.applied_state().await?;
                assert_eq!(applied.map(|id| id.index), Some(1));
                let held: Vec<u128> = sm
                    .view()
                    .lock()
                    .unwrap()
                    .state
                    .streams
                    .keys()
                    .copied()
                    .collect();
                assert_eq!(held, vec![stream]);
                let mut log = LogStore::new(Arc::clone(&db), group)?;
                assert_eq!(log.read_vote().await?, Some(Vote::new(group, 1)));
            }
            assert_eq!(
                groups(&db).map_err(StorageIOError::read)?,
                vec![(1, vec![1, 2])]
            );
            Ok(())
        })
    }
}
