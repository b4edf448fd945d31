//! Data stream groups: one Raft group (openraft) per **participant set** — the nodes a
//! stream runs between, its source and its targets — holding the metadata of every stream
//! between those nodes, each stream's producer epoch and each target's committed offset (the
//! ack set the source releases its outbox by).
//!
//! Why per participant set and not per stream: streams between the same nodes then share one
//! log, one leader election and one heartbeat. A node with thousands of streams to the same
//! three targets runs one group, not thousands; a group's cost is paid per set of nodes that
//! talk, which `streams.max_groups` bounds.
//!
//! What goes through the group and what does not: messages travel on the data path (the
//! source's outbox, the targets' inboxes, each fsynced before it is acknowledged); the group
//! orders the facts every participant must agree on and that outlive one node — that the
//! stream exists and with which policy, which incarnation of the source produces it, and how
//! far each target processed it. The source lets an outbox message go only once the group
//! has committed that every target processed it, so an outbox row is never deleted on the
//! word of a report alone.
//!
//! - [`GroupState`] (here): the replicated state and its rules, pure;
//! - [`store`]: the logs and state machines of every group on one redb database;
//! - [`groups`]: the `stream-groups` thread running the groups' openraft instances, and the
//!   handle the stream workers and the control thread use.

pub mod groups;
pub mod store;

use std::{
    collections::{BTreeMap, VecDeque},
    io::Cursor,
};

use serde::{Deserialize, Serialize};

/// Streams a group forgets are remembered (by id) this long, so a late offset write for one
/// does not bring it back.
pub const FORGOTTEN_KEPT: usize = 4096;

/// Streams one group holds at most (a participant opening more is refused by the group).
pub const MAX_GROUP_STREAMS: usize = 65_536;

/// One fact for the group to order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A stream between these participants exists (written by its source).
    Open {
        /// The stream.
        stream: u128,
        /// Its source (the writer).
        source: u64,
        /// Its targets.
        targets: Vec<u64>,
        /// 0: all targets; k: k of them.
        quorum: u32,
        /// Its tenant.
        tenant: String,
    },
    /// The source serves the stream from this incarnation (its process start, ms): a later
    /// incarnation than the last one recorded starts a new producer epoch.
    Epoch {
        /// The stream.
        stream: u128,
        /// The source's incarnation.
        incarnation: u64,
    },
    /// `target` processed every seq up to `processed` (written by that target).
    Offset {
        /// The stream.
        stream: u128,
        /// The target (the writer).
        target: u64,
        /// Its processed mark.
        processed: u64,
    },
    /// The stream was closed and fully processed: forget it (written by its source).
    Forget {
        /// The stream.
        stream: u128,
    },
}

impl Op {
    /// The stream it is about.
    pub fn stream(&self) -> u128 {
        match self {
            Self::Open { stream, .. }
            | Self::Epoch { stream, .. }
            | Self::Offset { stream, .. }
            | Self::Forget { stream } => *stream,
        }
    }
}

/// One log entry: the ops one participant wrote together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCommand {
    /// The participant that wrote them (checked by the leader against the frame's origin).
    pub writer: u64,
    /// The ops, applied in order.
    pub ops: Vec<Op>,
}

/// What applying an entry answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReply {
    /// Ops the state machine ignored (for a stream it does not hold, or past a limit).
    pub ignored: u32,
}

openraft::declare_raft_types!(
    /// A data stream group's Raft types (node ids are meshd node ids; RPCs are routed over the
    /// mesh by node id, so nodes need no address).
    pub GroupTypes:
        D = GroupCommand,
        R = GroupReply,
        NodeId = u64,
        Node = openraft::EmptyNode,
        Entry = openraft::Entry<GroupTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The group of a participant set: a hash of the sorted, deduplicated node ids, never 0
/// (0 is the mesh control group on the wire).
pub fn group_id(participants: &[u64]) -> u64 {
    let set = participant_set(participants);
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"meshd stream group");
    for node in &set {
        hasher.update(&node.to_le_bytes());
    }
    let hash = hasher.finalize();
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

/// The sorted, deduplicated participants.
pub fn participant_set(participants: &[u64]) -> Vec<u64> {
    let mut set = participants.to_vec();
    set.sort_unstable();
    set.dedup();
    set
}

/// What the group holds about one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEntry {
    /// Its source (0 until its `Open` is applied).
    pub source: u64,
    /// Its targets (empty until its `Open` is applied).
    pub targets: Vec<u64>,
    /// 0: all targets; k: k of them.
    pub quorum: u32,
    /// Its tenant.
    pub tenant: String,
    /// The producer epoch: how many source incarnations served it.
    pub epoch: u64,
    /// The last incarnation recorded.
    pub incarnation: u64,
    /// Each target's committed processed mark (the ack set).
    pub offsets: BTreeMap<u64, u64>,
}

impl StreamEntry {
    /// Every seq up to here was processed by every one of `targets` (missing: 0).
    pub fn processed_by_all(&self, targets: &[u64]) -> u64 {
        targets
            .iter()
            .map(|t| self.offsets.get(t).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }
}

/// A group's replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The streams it holds.
    pub streams: BTreeMap<u128, StreamEntry>,
    /// Streams forgotten lately (oldest first), at most [`FORGOTTEN_KEPT`].
    pub forgotten: VecDeque<u128>,
}

/// Why the leader refuses to order a write.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The writer is not in the group.
    #[error("node {0} is not a participant of this group")]
    NotParticipant(u64),
    /// The writer wrote for another node.
    #[error("node {writer} may not write {what} for node {other}")]
    NotItsOwn {
        /// The writer.
        writer: u64,
        /// What it wrote.
        what: &'static str,
        /// Whose fact it was.
        other: u64,
    },
    /// An `Open` naming nodes outside the group.
    #[error("the stream's nodes {0:?} are not this group's participants")]
    WrongSet(Vec<u64>),
    /// Too many ops in one write.
    #[error("{0} ops in one write, over {MAX_OPS}")]
    TooMany(usize),
}

/// Ops one write carries at most.
pub const MAX_OPS: usize = 4096;

impl GroupState {
    /// Whether `command` may be ordered in the group of `participants`, coming from `from`
    /// (the node the frame's origin tag proved). Each participant writes only its own facts:
    /// a source its streams' metadata and epochs, a target its own offsets.
    pub fn authorize(
        participants: &[u64],
        from: u64,
        command: &GroupCommand,
    ) -> Result<(), Refusal> {
        if command.writer != from || !participants.contains(&from) {
            return Err(Refusal::NotParticipant(from));
        }
        if command.ops.len() > MAX_OPS {
            return Err(Refusal::TooMany(command.ops.len()));
        }
        for op in &command.ops {
            match op {
                Op::Open {
                    source, targets, ..
                } => {
                    if *source != from {
                        return Err(Refusal::NotItsOwn {
                            writer: from,
                            what: "an open",
                            other: *source,
                        });
                    }
                    let mut nodes = targets.clone();
                    nodes.push(*source);
                    if participant_set(&nodes) != participant_set(participants)
                        || nodes.len() != participants.len()
                    {
                        return Err(Refusal::WrongSet(nodes));
                    }
                }
                Op::Offset { target, .. } if *target != from => {
                    return Err(Refusal::NotItsOwn {
                        writer: from,
                        what: "an offset",
                        other: *target,
                    });
                }
                Op::Offset { .. } | Op::Epoch { .. } | Op::Forget { .. } => {}
            }
        }
        Ok(())
    }

    /// Applies one committed entry (deterministic: every member reaches the same state).
    /// Ops that do not fit what is held are ignored and counted: a source's epoch or
    /// forget only counts for a stream it opened; offsets only move forward, only for a
    /// target of the stream (or before its `Open`, from any participant but the source).
    pub fn apply(&mut self, command: &GroupCommand) -> GroupReply {
        let mut ignored = 0;
        for op in &command.ops {
            let stream = op.stream();
            if self.forgotten.contains(&stream) {
                ignored += 1;
                continue;
            }
            if !self.streams.contains_key(&stream) && self.streams.len() >= MAX_GROUP_STREAMS {
                ignored += 1;
                continue;
            }
            let ok = match op {
                Op::Open {
                    source,
                    targets,
                    quorum,
                    tenant,
                    ..
                } => {
                    let entry = self.streams.entry(stream).or_default();
                    if entry.source == 0 || entry.source == *source {
                        entry.source = *source;
                        entry.targets.clone_from(targets);
                        entry.quorum = *quorum;
                        entry.tenant.clone_from(tenant);
                        // Offsets recorded before the open, by nodes that are not targets,
                        // are dropped now that the targets are known.
                        entry.offsets.retain(|t, _| targets.contains(t));
                        true
                    } else {
                        false
                    }
                }
                Op::Epoch { incarnation, .. } => match self.streams.get_mut(&stream) {
                    Some(entry) if entry.source == command.writer => {
                        if *incarnation > entry.incarnation {
                            entry.incarnation = *incarnation;
                            entry.epoch += 1;
                        }
                        true
                    }
                    _ => false,
                },
                Op::Offset {
                    target, processed, ..
                } => {
                    let entry = self.streams.entry(stream).or_default();
                    // Before its open the targets are unknown: kept, and sorted out by it.
                    if entry.source != 0 && !entry.targets.contains(target) {
                        false
                    } else {
                        let mark = entry.offsets.entry(*target).or_insert(0);
                        *mark = (*mark).max(*processed);
                        true
                    }
                }
                Op::Forget { .. } => match self.streams.get(&stream) {
                    Some(entry) if entry.source == command.writer => {
                        self.streams.remove(&stream);
                        self.forgotten.push_back(stream);
                        if self.forgotten.len() > FORGOTTEN_KEPT {
                            self.forgotten.pop_front();
                        }
                        true
                    }
                    _ => false,
                },
            };
            if !ok {
                ignored += 1;
            }
        }
        GroupReply { ignored }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(stream: u128, source: u64, targets: &[u64]) -> Op {
        Op::Open {
            stream,
            source,
            targets: targets.to_vec(),
            quorum: 0,
            tenant: "t".into(),
        }
    }

    fn by(writer: u64, ops: Vec<Op>) -> GroupCommand {
        GroupCommand { writer, ops }
    }

    #[test]
    fn the_group_of_a_set_does_not_depend_on_order_or_repeats() {
        assert_eq!(group_id(&[3, 1, 2]), group_id(&[1, 2, 3, 3]));
        assert_ne!(group_id(&[1, 2]), group_id(&[1, 3]));
        assert_ne!(group_id(&[1, 2]), 0);
    }

    #[test]
    fn each_participant_writes_only_its_own_facts() {
        let set = [1, 2, 3];
        let ok = by(1, vec![open(9, 1, &[2, 3]), Op::Forget { stream: 9 }]);
        assert_eq!(GroupState::authorize(&set, 1, &ok), Ok(()));
        // Claiming to be another writer, or not a participant at all.
        assert!(GroupState::authorize(&set, 2, &ok).is_err());
        let outsider = by(4, vec![Op::Forget { stream: 9 }]);
        assert!(GroupState::authorize(&set, 4, &outsider).is_err());
        // A target writing another target's offset, or opening as someone else.
        let forged = by(
            2,
            vec![Op::Offset {
                stream: 9,
                target: 3,
                processed: 10,
            }],
        );
        assert!(GroupState::authorize(&set, 2, &forged).is_err());
        let forged_open = by(2, vec![open(9, 1, &[2, 3])]);
        assert!(GroupState::authorize(&set, 2, &forged_open).is_err());
        // An open naming nodes outside the set.
        let wrong = by(1, vec![open(9, 1, &[2, 4])]);
        assert!(GroupState::authorize(&set, 1, &wrong).is_err());
        let too_many = by(1, vec![Op::Forget { stream: 1 }; MAX_OPS + 1]);
        assert!(GroupState::authorize(&set, 1, &too_many).is_err());
    }

    #[test]
    fn offsets_only_move_forward_and_the_ack_set_is_their_minimum() {
        let mut state = GroupState::default();
        state.apply(&by(1, vec![open(9, 1, &[2, 3])]));
        let offset = |target, processed| {
            by(
                target,
                vec![Op::Offset {
                    stream: 9,
                    target,
                    processed,
                }],
            )
        };
        state.apply(&offset(2, 10));
        state.apply(&offset(3, 7));
        state.apply(&offset(2, 4));
        let entry = &state.streams[&9];
        assert_eq!(entry.offsets[&2], 10);
        assert_eq!(entry.processed_by_all(&[2, 3]), 7);
        assert_eq!(entry.processed_by_all(&[2, 3, 5]), 0);
    }

    #[test]
    fn offsets_before_the_open_are_kept_for_targets_only() {
        let mut state = GroupState::default();
        for target in [2, 4] {
            state.apply(&by(
                target,
                vec![Op::Offset {
                    stream: 9,
                    target,
                    processed: 5,
                }],
            ));
        }
        state.apply(&by(1, vec![open(9, 1, &[2, 3])]));
        let entry = &state.streams[&9];
        assert_eq!(entry.offsets.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(entry.source, 1);
    }

    #[test]
    fn a_new_incarnation_starts_a_new_epoch_and_a_repeat_does_not() {
        let mut state = GroupState::default();
        state.apply(&by(1, vec![open(9, 1, &[2])]));
        let epoch = |incarnation| {
            by(
                1,
                vec![Op::Epoch {
                    stream: 9,
                    incarnation,
                }],
            )
        };
        state.apply(&epoch(100));
        state.apply(&epoch(100));
        state.apply(&epoch(50));
        assert_eq!(state.streams[&9].epoch, 1);
        state.apply(&epoch(200));
        assert_eq!(state.streams[&9].epoch, 2);
        // Only the source moves it.
        let reply = state.apply(&by(
            2,
            vec![Op::Epoch {
                stream: 9,
                incarnation: 300,
            }],
        ));
        assert_eq!(reply.ignored, 1);
        assert_eq!(state.streams[&9].epoch, 2);
    }

    #[test]
    fn a_forgotten_stream_stays_forgotten_and_the_memory_of_it_is_bounded() {
        let mut state = GroupState::default();
        state.apply(&by(1, vec![open(9, 1, &[2])]));
        state.apply(&by(1, vec![Op::Forget { stream: 9 }]));
        let late = state.apply(&by(
            2,
            vec![Op::Offset {
                stream: 9,
                target: 2,
                processed: 3,
            }],
        ));
        assert_eq!(late.ignored, 1);
        assert!(state.streams.is_empty());
        for stream in 100..100 + FORGOTTEN_KEPT as u128 + 10 {
            state.apply(&by(1, vec![open(stream, 1, &[2])]));
            state.apply(&by(1, vec![Op::Forget { stream }]));
        }
        assert_eq!(state.forgotten.len(), FORGOTTEN_KEPT);
        assert!(state.streams.is_empty());
    }

    #[test]
    fn only_the_source_forgets_and_a_second_source_cannot_take_a_stream_over() {
        let mut state = GroupState::default();
        state.apply(&by(1, vec![open(9, 1, &[2])]));
        assert_eq!(
            state.apply(&by(2, vec![Op::Forget { stream: 9 }])).ignored,
            1
        );
        assert_eq!(state.apply(&by(2, vec![open(9, 2, &[1])])).ignored, 1);
        assert_eq!(state.streams[&9].source, 1);
    }
}
