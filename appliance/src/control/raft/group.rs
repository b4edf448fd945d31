//! The running control group: its thread, and the handle the control and api threads use.
//!
//! openraft runs on a thread of its own (`consensus`, a tokio current-thread runtime): its
//! store commits block on fsync, and they must not stall the control loop (SWIM probes,
//! LSA flooding) for the length of each one. The control thread carries its RPCs over the
//! mesh ([`super::network`]) and serves the ones that arrive; the api thread writes through
//! [`Consensus::write`]. Every call into openraft from those threads is a channel send to
//! this runtime, so neither waits on a disk.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    thread,
    time::Duration,
};

use openraft::{
    ChangeMembers, Config, EmptyNode, Raft, RaftMetrics, ServerState, SnapshotPolicy,
    error::{ClientWriteError, RaftError},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    MeshCommand, MeshReply, TypeConfig,
    guard::{Refusal, check_term, note},
    network::{KIND_APPEND, KIND_SNAPSHOT, KIND_VOTE, KIND_WRITE, MeshNetwork, RaftCall},
    policy::Change,
    store::{LogStore, StateMachine},
};

/// The control group's timing and sizes.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    /// Leader heartbeat.
    pub heartbeat: Duration,
    /// Election timeout, lower bound (a random value up to twice this is used).
    pub election_timeout: Duration,
    /// A snapshot is taken once this many entries were applied since the last.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (a follower that lags less catches up from
    /// the log, not a snapshot).
    pub keep_behind_snapshot: u64,
    /// How long a write waits to be committed.
    pub write_deadline: Duration,
    /// Updates kept (by log index) for subscribers and `RequestDatabaseSync`.
    pub retain_updates: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(200),
            election_timeout: Duration::from_millis(1000),
            snapshot_every: 5000,
            keep_behind_snapshot: 1000,
            write_deadline: Duration::from_secs(5),
            retain_updates: 1_000_000,
        }
    }
}

/// Why a write was not committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WriteError {
    /// No leader with a quorum can be reached from here (a minority partition, or an
    /// election in progress).
    #[error(
        "the control group has no leader reachable from this node (term {term}, voters {voters:?}): \
         this side of the mesh does not hold a quorum, or an election is under way"
    )]
    NoQuorum {
        /// This node's term.
        term: u64,
        /// The voters as this node knows them.
        voters: Vec<u64>,
    },
    /// This node is not in a control group (no mesh seeded or joined yet).
    #[error("this node is in no mesh control group yet (seed or join a mesh first)")]
    NoGroup,
    /// The deadline passed; the entry may still commit.
    #[error("not committed within {0:?}; the write may still commit")]
    Timeout(Duration),
    /// The leader it was forwarded to lost its place meanwhile; the entry may have committed.
    #[error("the leader (node {0}) changed while the write was in flight; it may have committed")]
    LeaderChanged(u64),
    /// Refused by policy (e.g. CRITICAL mesh) or by the leader.
    #[error("{0}")]
    Refused(String),
    /// openraft failed (storage, shutdown).
    #[error("control group failure: {0}")]
    Failed(String),
}

/// The answer to a forwarded write: the committed entry's index, or why not.
type WriteAnswer = Result<u64, WriteError>;

/// The control group's state as one node sees it.
#[derive(Clone, Debug, Default)]
pub struct GroupState {
    /// This node.
    pub local: u64,
    /// Leader, follower, candidate or learner.
    pub role: &'static str,
    /// The current term.
    pub term: u64,
    /// The known leader.
    pub leader: Option<u64>,
    /// Last log index written here.
    pub last_log_index: u64,
    /// Last index applied here.
    pub applied_index: u64,
    /// The leader's committed index (on the leader; elsewhere the applied index).
    pub commit_index: u64,
    /// The voters.
    pub voters: Vec<u64>,
    /// The learners.
    pub learners: Vec<u64>,
    /// Per follower: how many entries it is behind the leader (leader only).
    pub lag: BTreeMap<u64, u64>,
    /// Whether a write from here would be accepted now.
    pub can_accept_writes: bool,
    /// Why not, when not.
    pub write_refusal: String,
    /// The last snapshot's index.
    pub snapshot_index: u64,
    /// The last purged index.
    pub purged_index: u64,
}

/// The handle on the control group; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Consensus {
    raft: Raft<TypeConfig>,
    net: MeshNetwork,
    local: u64,
    settings: RaftSettings,
    applied: watch::Receiver<u64>,
    db: Arc<redb::Database>,
    critical: Arc<std::sync::atomic::AtomicBool>,
    /// The snapshot being received, chunk by chunk (`guard::SnapshotGate`).
    snapshot_gate: Arc<std::sync::Mutex<super::guard::SnapshotGate>>,
}

/// Largest control-group snapshot this node takes in: openraft receives it into memory, so
/// past this a peer could make the node allocate what it likes.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// The running `consensus` thread.
pub struct ConsensusThread {
    handle: Consensus,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ConsensusThread {
    /// Opens the group's store in `db` and starts openraft on its own thread. RPCs go out
    /// through `calls` (the control thread sends them over the mesh).
    pub fn start(
        local: u64,
        settings: RaftSettings,
        db: Arc<redb::Database>,
        calls: mpsc::Sender<RaftCall>,
        decided: mpsc::Sender<super::Decision>,
        max_payload: usize,
    ) -> anyhow::Result<Self> {
        let (applied_tx, applied) = watch::channel(0u64);
        let log = LogStore::new(Arc::clone(&db))?;
        let sm = StateMachine::new(Arc::clone(&db))?
            .with_applied(applied_tx)
            .with_decisions(decided)
            .with_retention(settings.retain_updates);
        let net = MeshNetwork::new(calls, max_payload);
        let config = openraft_config(&settings, net.max_body())?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread_net = net.clone();
        let thread = thread::Builder::new()
            .name("consensus".into())
            .spawn(move || {
                meshd_shards::priority::apply();
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    // Its blocking pool writes the log (fsync): the same priority.
                    .on_thread_start(meshd_shards::priority::apply)
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(anyhow::anyhow!("consensus runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let raft = match Raft::new(local, config, thread_net, log, sm).await {
                        Ok(raft) => raft,
                        Err(e) => {
                            let _ = handle_tx.send(Err(anyhow::anyhow!("openraft: {e}")));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(raft.clone()));
                    let _ = stop_rx.await;
                    if let Err(e) = raft.shutdown().await {
                        tracing::warn!(error = %e, "control group did not stop cleanly");
                    }
                });
            })?;
        let raft = handle_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the consensus thread died at start"))??;
        Ok(Self {
            handle: Consensus {
                raft,
                net,
                local,
                settings,
                applied,
                db,
                critical: Arc::default(),
                snapshot_gate: Arc::new(std::sync::Mutex::new(super::guard::SnapshotGate::new(
                    MAX_SNAPSHOT_BYTES,
                ))),
            },
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The handle.
    pub fn handle(&self) -> Consensus {
        self.handle.clone()
    }

    /// Stops openraft and waits for the thread.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn openraft_config(settings: &RaftSettings, max_body: usize) -> anyhow::Result<Arc<Config>> {
    raft_config(
        "meshd-control",
        settings.heartbeat,
        settings.election_timeout,
        (settings.snapshot_every, settings.keep_behind_snapshot),
        max_body,
    )
}

/// openraft's settings for a group whose RPCs travel in mesh frames of at most `max_body`
/// bytes: elections after `election`..2×`election` of silence, a snapshot every
/// `snapshot.0` applied entries keeping `snapshot.1` behind it (shared by the control group and
/// the data stream groups).
pub(crate) fn raft_config(
    name: &str,
    heartbeat: Duration,
    election: Duration,
    snapshot: (u64, u64),
    max_body: usize,
) -> anyhow::Result<Arc<Config>> {
    let election = election.as_millis() as u64;
    let config = Config {
        cluster_name: name.into(),
        heartbeat_interval: heartbeat.as_millis() as u64,
        election_timeout_min: election,
        election_timeout_max: election * 2,
        install_snapshot_timeout: 5000,
        // Entries are at most a frame each; 64 of them stay well under a frame's worth in the
        // common case, and an oversized batch is split (PayloadTooLarge).
        max_payload_entries: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot.0),
        max_in_snapshot_log_to_keep: snapshot.1,
        snapshot_max_chunk_size: (max_body as u64 / 2).max(1024),
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

impl Consensus {
    /// This node's id.
    pub fn local(&self) -> u64 {
        self.local
    }

    /// The highest applied index, watched (subscribers wake on it).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The store (read-only use: subscribers and sync read applied updates).
    pub fn db(&self) -> &Arc<redb::Database> {
        &self.db
    }

    /// The settings in force.
    pub fn settings(&self) -> &RaftSettings {
        &self.settings
    }

    /// Whether the group still counts on `node`'s vote: it is a voter of a group that has
    /// other members to hand over to.
    pub fn counts_on(&self, node: u64) -> bool {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == node);
        let others = membership.nodes().any(|(id, _)| *id != node);
        voter && others
    }

    /// Tells the group whether the mesh is CRITICAL (half or more of it dead): then only
    /// evictions are written.
    pub fn set_critical(&self, critical: bool) {
        self.critical
            .store(critical, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this node belongs to a control group (it bootstrapped one or was added).
    pub fn has_group(&self) -> bool {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        membership.voter_ids().next().is_some()
    }

    /// Makes this node the group's only voter (the node that seeds a mesh). A group that
    /// already exists here is left alone.
    pub async fn bootstrap(&self) {
        let members = BTreeMap::from([(self.local, EmptyNode {})]);
        match self.raft.initialize(members).await {
            Ok(()) => tracing::info!(node = self.local, "control group bootstrapped"),
            Err(RaftError::APIError(e)) => {
                tracing::debug!(error = %e, "control group exists already")
            }
            Err(e) => tracing::error!(error = %e, "could not bootstrap the control group"),
        }
    }

    fn metrics(&self) -> RaftMetrics<u64, EmptyNode> {
        self.raft.metrics().borrow().clone()
    }

    /// The group as this node sees it.
    pub fn state(&self) -> GroupState {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let applied_index = m.last_applied.map_or(0, |id| id.index);
        let last_log_index = m.last_log_index.unwrap_or(0);
        let mut lag = BTreeMap::new();
        if let Some(replication) = &m.replication {
            for (node, matched) in replication.iter() {
                let matched = matched.map_or(0, |id| id.index);
                lag.insert(*node, last_log_index.saturating_sub(matched));
            }
        }
        GroupState {
            local: self.local,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader: m.current_leader,
            last_log_index,
            applied_index,
            commit_index: applied_index,
            voters,
            learners,
            lag,
            can_accept_writes: self.quorum_check(&m).is_ok(),
            write_refusal: self
                .quorum_check(&m)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            snapshot_index: m.snapshot.map_or(0, |id| id.index),
            purged_index: m.purged.map_or(0, |id| id.index),
        }
    }

    /// Whether a write from here can commit now, as far as this node can tell: a leader
    /// must have heard from a quorum within an election timeout; a follower must know a
    /// leader.
    fn quorum_check(&self, m: &RaftMetrics<u64, EmptyNode>) -> Result<u64, WriteError> {
        let no_quorum = || WriteError::NoQuorum {
            term: m.current_term,
            voters: m.membership_config.membership().voter_ids().collect(),
        };
        if m.membership_config
            .membership()
            .voter_ids()
            .next()
            .is_none()
        {
            return Err(WriteError::NoGroup);
        }
        match m.current_leader {
            Some(leader) if leader == self.local => {
                let fresh = self.settings.election_timeout.as_millis() as u64 * 2;
                match m.millis_since_quorum_ack {
                    Some(ms) if ms <= fresh => Ok(leader),
                    _ => Err(no_quorum()),
                }
            }
            Some(leader) => Ok(leader),
            None => Err(no_quorum()),
        }
    }

    /// Orders `command` through the group and answers the committed entry's index: on the
    /// leader directly, elsewhere by forwarding it to the leader over the mesh.
    pub async fn write(&self, command: MeshCommand) -> Result<u64, WriteError> {
        use tracing::Instrument as _;
        let kind = match &command {
            MeshCommand::Update { .. } => "update",
            MeshCommand::Evict { .. } => "evict",
            MeshCommand::Leave { .. } => "leave",
            MeshCommand::Admit { .. } => "admit",
            MeshCommand::SetPolicy { .. } => "set_policy",
        };
        // Group 0 is the control group (data stream groups name theirs in `group_write`).
        let span = tracing::debug_span!(
            "group_write",
            group = 0,
            kind,
            index = tracing::field::Empty
        );
        let written = self.write_traced(command).instrument(span.clone()).await;
        if let Ok(index) = &written {
            span.record("index", index);
        }
        written
    }

    async fn write_traced(&self, command: MeshCommand) -> Result<u64, WriteError> {
        if self.critical.load(std::sync::atomic::Ordering::Relaxed)
            && !matches!(command, MeshCommand::Evict { .. })
        {
            return Err(WriteError::Refused(
                "the mesh is CRITICAL (half or more of its members are dead): only evictions \
                 are accepted until it recovers"
                    .into(),
            ));
        }
        let leader = self.quorum_check(&self.metrics())?;
        if leader == self.local {
            return self.write_here(command).await;
        }
        let body =
            postcard::to_allocvec(&command).map_err(|e| WriteError::Failed(e.to_string()))?;
        if body.len() > self.net.max_body() {
            return Err(WriteError::Refused(format!(
                "the update is {} bytes, over the {} a forwarded write can carry",
                body.len(),
                self.net.max_body()
            )));
        }
        let deadline = self.settings.write_deadline;
        // A leader that dies with the write in flight would hold the caller for the whole
        // deadline; a new leader (or none) ends the wait as soon as this node sees it.
        let mut metrics = self.raft.metrics();
        let leader_gone = async move {
            loop {
                if metrics.borrow_and_update().current_leader != Some(leader) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            answer = self.net.call(leader, KIND_WRITE, body, deadline) => match answer {
                Ok(answer) => postcard::from_bytes::<WriteAnswer>(&answer)
                    .map_err(|e| WriteError::Failed(format!("leader's answer unreadable: {e}")))?,
                Err(_) => Err(WriteError::Timeout(deadline)),
            },
            () = leader_gone => Err(WriteError::LeaderChanged(leader)),
        }
    }

    /// Writes on this node, which must be the leader (no further forwarding: a write is
    /// forwarded at most once).
    async fn write_here(&self, command: MeshCommand) -> Result<u64, WriteError> {
        let deadline = self.settings.write_deadline;
        let written = tokio::time::timeout(deadline, self.raft.client_write(command)).await;
        match written {
            Err(_) => Err(WriteError::Timeout(deadline)),
            Ok(Ok(response)) => match response.data {
                MeshReply::Applied { index } => Ok(index),
                MeshReply::Nothing => Ok(response.log_id.index),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                let m = self.metrics();
                Err(WriteError::NoQuorum {
                    term: m.current_term,
                    voters: m.membership_config.membership().voter_ids().collect(),
                })
            }
            Ok(Err(e)) => Err(WriteError::Failed(e.to_string())),
        }
    }

    fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// `Some` when the check passed; else the refusal is counted and logged (`guard::note`).
    fn guard(&self, from: u64, checked: Result<(), Refusal>) -> Option<()> {
        checked.map_err(|refusal| note(&refusal, from, 0)).ok()
    }

    /// Answers one inbound RPC from `from` (already proven by its origin tag); None when the
    /// request is malformed or claims to come from another node (dropped; the caller times
    /// out).
    pub async fn serve(&self, from: u64, kind: u32, body: &[u8]) -> Option<Vec<u8>> {
        let encoded = match kind {
            KIND_APPEND => {
                let rpc: openraft::raft::AppendEntriesRequest<TypeConfig> =
                    postcard::from_bytes(body).ok()?;
                // Only the leader itself sends its entries.
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return None;
                }
                self.guard(from, check_term(rpc.vote.leader_id().term, self.term()))?;
                postcard::to_allocvec(&self.raft.append_entries(rpc).await)
            }
            KIND_VOTE => {
                let rpc: openraft::raft::VoteRequest<u64> = postcard::from_bytes(body).ok()?;
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return None;
                }
                self.guard(from, check_term(rpc.vote.leader_id().term, self.term()))?;
                postcard::to_allocvec(&self.raft.vote(rpc).await)
            }
            KIND_SNAPSHOT => {
                let rpc: openraft::raft::InstallSnapshotRequest<TypeConfig> =
                    postcard::from_bytes(body).ok()?;
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return None;
                }
                self.guard(from, check_term(rpc.vote.leader_id().term, self.term()))?;
                let admitted = self
                    .snapshot_gate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .admit(&rpc.meta.snapshot_id, rpc.offset, rpc.data.len(), rpc.done);
                self.guard(from, admitted)?;
                postcard::to_allocvec(&self.raft.install_snapshot(rpc).await)
            }
            KIND_WRITE => {
                let command: MeshCommand = postcard::from_bytes(body).ok()?;
                // Only a node says it left (as with SWIM notices): a member forwarding another
                // node's departure would make the group stop counting on that node.
                if matches!(command, MeshCommand::Leave { node } if node != from) {
                    return None;
                }
                let answer: WriteAnswer = match self.quorum_check(&self.metrics()) {
                    Ok(leader) if leader == self.local => self.write_here(command).await,
                    Ok(_) | Err(_) => Err(WriteError::Refused(
                        "forwarded to a node that is not the leader (any more); retry".into(),
                    )),
                };
                postcard::to_allocvec(&answer)
            }
            _ => return None,
        };
        encoded.ok()
    }

    /// The inputs of the voter policy, if this node leads the group now (only the leader
    /// changes the membership).
    pub fn policy_inputs(&self) -> Option<(BTreeSet<u64>, BTreeSet<u64>)> {
        let m = self.metrics();
        if m.current_leader != Some(self.local) || m.state != ServerState::Leader {
            return None;
        }
        let membership = m.membership_config.membership();
        Some((
            membership.voter_ids().collect(),
            membership.learner_ids().collect(),
        ))
    }

    /// Carries out one change the policy decided.
    pub async fn change(&self, change: Change) -> Result<(), String> {
        let result = match change {
            // Not blocking: the learner catches up while the leader goes on; the policy
            // promotes it later, and openraft's change_membership waits for it to catch up.
            Change::AddLearner(node) => self.raft.add_learner(node, EmptyNode {}, false).await,
            Change::RemoveLearners(nodes) => {
                self.raft
                    .change_membership(ChangeMembers::RemoveNodes(nodes), false)
                    .await
            }
            // Voters dropped stay as learners (retain): a gone one is removed next, a dead one
            // catches up and may vote again later.
            Change::SetVoters(voters) => self.raft.change_membership(voters, true).await,
        };
        result.map(|_| ()).map_err(|e| e.to_string())
    }
}
