//! The `stream-groups` thread and its handle.
//!
//! Every data stream group this node is in runs an openraft instance on one thread of its own
//! (a tokio current-thread runtime), so the groups' fsyncs never stall the stream workers or
//! the control loop. Their RPCs go over the mesh as `Raft` frames tagged with the group, carried
//! by the control thread like the control group's.
//!
//! **Boundary:** the stream workers never wait on a group. They queue facts
//! ([`StreamGroups::propose`], [`StreamGroups::offer_offset`]) under a short lock and read
//! the applied state ([`StreamGroups::processed_by_all`]) the same way; a flusher task per
//! group writes what is queued every `flush` (one log entry for everything queued), forwarding
//! it to the group's leader over the mesh, and puts it back to try again when the write fails.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use openraft::{Config, Raft, ServerState, error::RaftError};
use redb::Database;
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::{
    GroupCommand, GroupState, GroupTypes, MAX_OPS, Op, StreamEntry, group_id, participant_set,
    store::{self, Applied, LogStore, StateMachine},
};
use crate::control::raft::{
    guard::{Refusal, SnapshotGate, check_term, note},
    network::{KIND_APPEND, KIND_SNAPSHOT, KIND_VOTE, KIND_WRITE, MeshNetwork},
};

/// Facts one group keeps queued at most; past it new metadata facts are dropped and counted
/// (offsets are one mark per stream and never pile up).
pub const MAX_PENDING_OPS: usize = 65_536;

/// The groups' timing and bounds.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    /// Groups this node takes part in at most.
    pub max_groups: usize,
    /// Leader heartbeat.
    pub heartbeat: Duration,
    /// Election timeout, lower bound.
    pub election_timeout: Duration,
    /// How often queued facts are written.
    pub flush: Duration,
    /// How long one write may take.
    pub write_deadline: Duration,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            max_groups: 256,
            heartbeat: Duration::from_millis(200),
            election_timeout: Duration::from_millis(1000),
            flush: Duration::from_millis(20),
            write_deadline: Duration::from_secs(5),
        }
    }
}

/// Why a group cannot be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// `streams.max_groups` reached.
    #[error(
        "this node already takes part in {0} data stream groups (streams.max_groups): a stream \
         between a new set of nodes cannot be opened"
    )]
    Full(usize),
    /// The thread is gone (the node is stopping).
    #[error("the node is stopping")]
    Stopped,
}

/// One group as this node sees it.
#[derive(Clone, Debug)]
pub struct GroupStatus {
    /// The group id.
    pub group: u64,
    /// Its participants.
    pub participants: Vec<u64>,
    /// Leader, follower, candidate, learner, or starting.
    pub role: &'static str,
    /// The current term.
    pub term: u64,
    /// The known leader.
    pub leader: Option<u64>,
    /// The last applied index.
    pub applied_index: u64,
    /// The streams it holds.
    pub streams: Vec<(u128, StreamEntry)>,
    /// Writes that failed and were retried.
    pub write_retries: u64,
    /// Metadata facts dropped (the queue was full).
    pub dropped_ops: u64,
}

struct Slot {
    participants: Vec<u64>,
    raft: Option<Raft<GroupTypes>>,
    view: Option<Arc<Mutex<Applied>>>,
    ops: Vec<Op>,
    offsets: BTreeMap<u128, u64>,
    write_retries: u64,
    dropped_ops: u64,
    /// The snapshot being received, chunk by chunk.
    snapshot_gate: SnapshotGate,
}

/// Largest snapshot of one stream group this node takes in (its streams' metadata and
/// offsets: kilobytes in practice); openraft receives it into memory.
const MAX_GROUP_SNAPSHOT_BYTES: u64 = 64 << 20;

/// What `status` copies out of a slot under the lock.
struct Peek {
    group: u64,
    participants: Vec<u64>,
    raft: Option<Raft<GroupTypes>>,
    view: Option<Arc<Mutex<Applied>>>,
    write_retries: u64,
    dropped_ops: u64,
}

struct Inner {
    local: u64,
    incarnation: u64,
    db: Arc<Database>,
    net: MeshNetwork,
    config: Arc<Config>,
    settings: GroupSettings,
    runtime: tokio::runtime::Handle,
    slots: Mutex<HashMap<u64, Slot>>,
}

/// The handle on this node's data stream groups; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct StreamGroups {
    inner: Arc<Inner>,
}

/// The running `stream-groups` thread.
pub struct GroupsThread {
    handle: StreamGroups,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl GroupsThread {
    /// Opens the groups' store in `db`, starts the thread and every group this node was in.
    pub fn start(
        local: u64,
        settings: GroupSettings,
        db: Arc<Database>,
        net: MeshNetwork,
    ) -> anyhow::Result<Self> {
        store::create_tables(&db).map_err(|e| anyhow::anyhow!("stream groups' store: {e}"))?;
        let known =
            store::groups(&db).map_err(|e| anyhow::anyhow!("reading the stream groups: {e}"))?;
        let config = group_config(&settings, net.max_body())?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("stream-groups".into())
            .spawn(move || {
                meshd_shards::priority::apply();
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_start(meshd_shards::priority::apply)
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(anyhow::anyhow!("stream groups' runtime: {e}")));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async move {
                    let _ = stop_rx.await;
                });
            })?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the stream groups' thread died at start"))??;
        let handle = StreamGroups {
            inner: Arc::new(Inner {
                local,
                incarnation: crate::storage::now_ms(),
                db,
                net,
                config,
                settings,
                runtime,
                slots: Mutex::new(HashMap::new()),
            }),
        };
        for (group, participants) in known {
            if let Err(e) = handle.ensure(&participants) {
                tracing::warn!(group, error = %e, "stream group not restarted");
            }
        }
        Ok(Self {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The handle.
    pub fn handle(&self) -> StreamGroups {
        self.handle.clone()
    }

    /// Stops every group and the thread.
    pub fn stop(mut self) {
        let rafts: Vec<Raft<GroupTypes>> = self
            .handle
            .inner
            .lock()
            .values()
            .filter_map(|slot| slot.raft.clone())
            .collect();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.handle.inner.runtime.spawn(async move {
            for raft in rafts {
                let _ = raft.shutdown().await;
            }
            let _ = done_tx.send(());
        });
        let _ = done_rx.recv_timeout(Duration::from_secs(5));
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn group_config(settings: &GroupSettings, max_body: usize) -> anyhow::Result<Arc<Config>> {
    // The state is small (metadata and one mark per target and stream): snapshots are cheap,
    // and a short log keeps the database small.
    crate::control::raft::group::raft_config(
        "meshd-stream-group",
        settings.heartbeat,
        settings.election_timeout,
        (1000, 200),
        max_body,
    )
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StreamGroups {
    /// This process's incarnation (its start, ms): what a source records as the producer
    /// epoch's writer.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The group of `participants`, started here if it is not running yet (non-blocking: the
    /// group starts on its thread). Every participant initialises the group with the same
    /// voters (openraft allows it), so whichever learns of it first makes it exist.
    pub fn ensure(&self, participants: &[u64]) -> Result<u64, GroupError> {
        let set = participant_set(participants);
        let group = group_id(&set);
        {
            let mut slots = self.inner.lock();
            if slots.contains_key(&group) {
                return Ok(group);
            }
            if slots.len() >= self.inner.settings.max_groups {
                return Err(GroupError::Full(slots.len()));
            }
            slots.insert(
                group,
                Slot {
                    participants: set.clone(),
                    raft: None,
                    view: None,
                    ops: Vec::new(),
                    offsets: BTreeMap::new(),
                    write_retries: 0,
                    dropped_ops: 0,
                    snapshot_gate: SnapshotGate::new(MAX_GROUP_SNAPSHOT_BYTES),
                },
            );
        }
        let groups = self.clone();
        self.inner.runtime.spawn(async move {
            if let Err(e) = groups.start_group(group, set).await {
                tracing::error!(group, error = %e, "stream group failed to start");
                groups.inner.lock().remove(&group);
            }
        });
        Ok(group)
    }

    async fn start_group(&self, group: u64, set: Vec<u64>) -> anyhow::Result<()> {
        let inner = &self.inner;
        store::save_group(&inner.db, group, &set)
            .map_err(|e| anyhow::anyhow!("saving the group: {e}"))?;
        let log = LogStore::new(Arc::clone(&inner.db), group)?;
        let sm = StateMachine::new(Arc::clone(&inner.db), group)?;
        let view = sm.view();
        let raft = Raft::new(
            inner.local,
            Arc::clone(&inner.config),
            inner.net.for_group(group),
            log,
            sm,
        )
        .await?;
        if !raft.is_initialized().await? {
            let voters: BTreeSet<u64> = set.iter().copied().collect();
            if let Err(e) = raft.initialize(voters).await {
                // Another participant's entries arrived first: it is initialised.
                tracing::debug!(group, error = %e, "stream group not initialised here");
            }
        }
        {
            let mut slots = inner.lock();
            let Some(slot) = slots.get_mut(&group) else {
                return Ok(());
            };
            slot.raft = Some(raft.clone());
            slot.view = Some(view);
        }
        tracing::info!(group, participants = ?set, "stream group started");
        let groups = self.clone();
        tokio::spawn(async move { groups.flush_loop(group, raft).await });
        Ok(())
    }

    /// Queues metadata facts (`Open`, `Epoch`, `Forget`) for `group`, written by this node.
    pub fn propose(&self, group: u64, ops: impl IntoIterator<Item = Op>) {
        let mut slots = self.inner.lock();
        let Some(slot) = slots.get_mut(&group) else {
            return;
        };
        for op in ops {
            if slot.ops.len() >= MAX_PENDING_OPS {
                slot.dropped_ops += 1;
                continue;
            }
            slot.ops.push(op);
        }
    }

    /// Queues this node's processed mark of `stream` (a target's offset).
    pub fn offer_offset(&self, group: u64, stream: u128, processed: u64) {
        let mut slots = self.inner.lock();
        if let Some(slot) = slots.get_mut(&group) {
            let mark = slot.offsets.entry(stream).or_insert(0);
            *mark = (*mark).max(processed);
        }
    }

    /// Every seq of `stream` up to here was processed by each of `targets`, as the group
    /// committed it (0 while the group holds nothing for it).
    pub fn processed_by_all(&self, group: u64, stream: u128, targets: &[u64]) -> u64 {
        let view = {
            let slots = self.inner.lock();
            match slots.get(&group).and_then(|s| s.view.clone()) {
                Some(view) => view,
                None => return 0,
            }
        };
        let view = view.lock().unwrap_or_else(|e| e.into_inner());
        view.state
            .streams
            .get(&stream)
            .map_or(0, |entry| entry.processed_by_all(targets))
    }

    /// Every group as this node sees it.
    pub fn status(&self) -> Vec<GroupStatus> {
        let slots: Vec<Peek> = self
            .inner
            .lock()
            .iter()
            .map(|(group, slot)| Peek {
                group: *group,
                participants: slot.participants.clone(),
                raft: slot.raft.clone(),
                view: slot.view.clone(),
                write_retries: slot.write_retries,
                dropped_ops: slot.dropped_ops,
            })
            .collect();
        let mut out: Vec<GroupStatus> = slots
            .into_iter()
            .map(|peek| {
                let Peek {
                    group,
                    participants,
                    raft,
                    view,
                    write_retries,
                    dropped_ops,
                } = peek;
                let (role, term, leader) = match &raft {
                    Some(raft) => {
                        let m = raft.metrics().borrow().clone();
                        (role_name(m.state), m.current_term, m.current_leader)
                    }
                    None => ("starting", 0, None),
                };
                let (applied_index, streams) = match view {
                    Some(view) => {
                        let view = view.lock().unwrap_or_else(|e| e.into_inner());
                        (
                            view.last_applied.map_or(0, |id| id.index),
                            view.state
                                .streams
                                .iter()
                                .map(|(id, entry)| (*id, entry.clone()))
                                .collect(),
                        )
                    }
                    None => (0, Vec::new()),
                };
                GroupStatus {
                    group,
                    participants,
                    role,
                    term,
                    leader,
                    applied_index,
                    streams,
                    write_retries,
                    dropped_ops,
                }
            })
            .collect();
        out.sort_by_key(|g| g.group);
        out
    }

    /// Writes what is queued for `group`, every `flush`, one entry at a time.
    async fn flush_loop(&self, group: u64, raft: Raft<GroupTypes>) {
        let mut tick = tokio::time::interval(self.inner.settings.flush);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (ops, offsets) = {
                let mut slots = self.inner.lock();
                let Some(slot) = slots.get_mut(&group) else {
                    return;
                };
                // One write stays within what the leader accepts (`MAX_OPS`); the rest
                // goes at the next flush.
                let mut offsets = std::mem::take(&mut slot.offsets);
                if let Some(cut) = offsets.keys().nth(MAX_OPS / 2).copied() {
                    slot.offsets = offsets.split_off(&cut);
                }
                let take = slot.ops.len().min(MAX_OPS - offsets.len());
                let ops: Vec<Op> = slot.ops.drain(..take).collect();
                (ops, offsets)
            };
            if ops.is_empty() && offsets.is_empty() {
                continue;
            }
            let local = self.inner.local;
            let mut all = ops.clone();
            all.extend(offsets.iter().map(|(stream, processed)| Op::Offset {
                stream: *stream,
                target: local,
                processed: *processed,
            }));
            let command = GroupCommand {
                writer: local,
                ops: all,
            };
            let span = tracing::debug_span!(
                "group_write",
                group = %format_args!("{group:016x}"),
                ops = command.ops.len()
            );
            if let Err(e) = self.write(group, &raft, command).instrument(span).await {
                tracing::debug!(group, error = %e, "stream group write failed; retrying");
                // Every fact is idempotent (an open or a forget again, an epoch of the same
                // incarnation, a mark that only moves forward): writing it twice is harmless.
                let gone = {
                    let mut slots = self.inner.lock();
                    match slots.get_mut(&group) {
                        None => true,
                        Some(slot) => {
                            slot.write_retries += 1;
                            let later = std::mem::replace(&mut slot.ops, ops);
                            slot.ops.extend(later);
                            for (stream, processed) in offsets {
                                let mark = slot.offsets.entry(stream).or_insert(0);
                                *mark = (*mark).max(processed);
                            }
                            false
                        }
                    }
                };
                if gone {
                    return;
                }
                // The leader may be changing: give it an election's time.
                tokio::time::sleep(self.inner.settings.heartbeat).await;
            }
        }
    }

    /// Orders `command` in `group`: on the leader directly, elsewhere through the leader.
    async fn write(
        &self,
        group: u64,
        raft: &Raft<GroupTypes>,
        command: GroupCommand,
    ) -> Result<(), String> {
        let leader = raft.metrics().borrow().current_leader;
        let deadline = self.inner.settings.write_deadline;
        match leader {
            None => Err("no leader".into()),
            Some(leader) if leader == self.inner.local => write_here(raft, command, deadline).await,
            Some(leader) => {
                let body = postcard::to_allocvec(&command).map_err(|e| e.to_string())?;
                if body.len() > self.inner.net.max_body() {
                    return Err(format!(
                        "a write of {} bytes does not fit a frame",
                        body.len()
                    ));
                }
                let answer = self
                    .inner
                    .net
                    .for_group(group)
                    .call(leader, KIND_WRITE, body, deadline)
                    .await
                    .map_err(|e| e.to_string())?;
                postcard::from_bytes::<Result<(), String>>(&answer)
                    .map_err(|e| format!("the leader's answer is unreadable: {e}"))?
            }
        }
    }

    /// Answers one inbound RPC of `group` from `from` (proven by its origin tag); None when
    /// the group is not running here, `from` is not in it, or the request is malformed or
    /// claims another sender (dropped: the caller times out and retries).
    pub async fn serve(&self, from: u64, group: u64, kind: u32, body: Vec<u8>) -> Option<Vec<u8>> {
        let span =
            tracing::trace_span!("group_rpc", group = %format_args!("{group:016x}"), from, kind);
        self.serve_rpc(from, group, kind, body)
            .instrument(span)
            .await
    }

    async fn serve_rpc(&self, from: u64, group: u64, kind: u32, body: Vec<u8>) -> Option<Vec<u8>> {
        let (raft, participants) = {
            let slots = self.inner.lock();
            let slot = slots.get(&group)?;
            (slot.raft.clone()?, slot.participants.clone())
        };
        if !participants.contains(&from) {
            return None;
        }
        let encoded = match kind {
            KIND_APPEND => {
                let rpc: openraft::raft::AppendEntriesRequest<GroupTypes> =
                    postcard::from_bytes(&body).ok()?;
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return None;
                }
                guard(
                    from,
                    group,
                    check_term(rpc.vote.leader_id().term, term(&raft)),
                )?;
                postcard::to_allocvec(&raft.append_entries(rpc).await)
            }
            KIND_VOTE => {
                let rpc: openraft::raft::VoteRequest<u64> = postcard::from_bytes(&body).ok()?;
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return None;
                }
                guard(
                    from,
                    group,
                    check_term(rpc.vote.leader_id().term, term(&raft)),
                )?;
                postcard::to_allocvec(&raft.vote(rpc).await)
            }
            KIND_SNAPSHOT => {
                let rpc: openraft::raft::InstallSnapshotRequest<GroupTypes> =
                    postcard::from_bytes(&body).ok()?;
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return None;
                }
                guard(
                    from,
                    group,
                    check_term(rpc.vote.leader_id().term, term(&raft)),
                )?;
                let admitted = {
                    let mut slots = self.inner.lock();
                    let slot = slots.get_mut(&group)?;
                    slot.snapshot_gate.admit(
                        &rpc.meta.snapshot_id,
                        rpc.offset,
                        rpc.data.len(),
                        rpc.done,
                    )
                };
                guard(from, group, admitted)?;
                postcard::to_allocvec(&raft.install_snapshot(rpc).await)
            }
            KIND_WRITE => {
                let command: GroupCommand = postcard::from_bytes(&body).ok()?;
                let answer = match GroupState::authorize(&participants, from, &command) {
                    Err(refusal) => Err(refusal.to_string()),
                    Ok(()) => {
                        let leader = raft.metrics().borrow().current_leader;
                        if leader == Some(self.inner.local) {
                            write_here(&raft, command, self.inner.settings.write_deadline).await
                        } else {
                            Err("not the leader (any more); retry".into())
                        }
                    }
                };
                postcard::to_allocvec(&answer)
            }
            _ => return None,
        };
        encoded.ok()
    }
}

async fn write_here(
    raft: &Raft<GroupTypes>,
    command: GroupCommand,
    deadline: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(deadline, raft.client_write(command)).await {
        Err(_) => Err(format!("not committed within {deadline:?}")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

fn term(raft: &Raft<GroupTypes>) -> u64 {
    raft.metrics().borrow().current_term
}

/// `Some` when the check passed; else the refusal is counted and logged.
fn guard(from: u64, group: u64, checked: Result<(), Refusal>) -> Option<()> {
    checked.map_err(|refusal| note(&refusal, from, group)).ok()
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}
