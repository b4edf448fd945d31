//! The control thread's side of the control group: carrying openraft's RPCs over the mesh
//! and running the voter policy on the leader.
//!
//! Outbound: a call from openraft ([`raft::network::RaftCall`]) gets a request id, waits in
//! `pending` and goes out as a `Raft` frame; the answer frame, from the node it was sent to,
//! completes it. Inbound: a request is served by a task of its own (at most
//! [`MAX_INBOUND`] at once, the rest dropped and counted: the caller retries), whose answer
//! comes back through the `answers` queue; the loop never awaits openraft.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use meshd_shards::frame::{FrameType, TrafficClass};
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{storage::now_ms, streams::group::groups::StreamGroups};

use super::{
    Control,
    lifecycle::{LifecycleError, Reply},
    live::{self, LiveSetting, Weight},
    membership::{MemberState, Notice, NoticeKind},
    raft::{
        Decision, MeshCommand,
        group::Consensus,
        group::WriteError,
        network::RaftCall,
        policy::{Liveness, Policy},
    },
};

/// Inbound RPCs served at once; past it a request is dropped (the caller's deadline covers it).
pub const MAX_INBOUND: usize = 64;

/// Calls waiting for an answer; past it a new call fails at once (openraft backs off).
pub const MAX_PENDING: usize = 4096;

/// An answer a serving task produced, to send back.
#[derive(Debug)]
pub struct RaftAnswer {
    group: u64,
    to: u64,
    req_id: u64,
    kind: u32,
    body: Vec<u8>,
}

/// What the control thread does once a change committed (or failed to).
#[derive(Debug)]
pub enum After {
    /// EvictNode: evict here, spread the notice, answer.
    Evict {
        /// The node.
        node: u64,
        /// The api's answer.
        reply: Reply,
    },
    /// LeaveMesh: leave (the group no longer counts on this node's vote), answer.
    Leave {
        /// The api's answer.
        reply: Reply,
    },
}

/// A change's outcome, back on the control loop.
#[derive(Debug)]
pub struct Committed {
    result: Result<u64, WriteError>,
    after: After,
}

/// How long a leaving voter waits for the group to stop counting on it.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// The control thread's control-group state.
pub struct RaftPort {
    consensus: Consensus,
    pending: HashMap<u64, (u64, oneshot::Sender<Vec<u8>>)>,
    next_req_id: u64,
    answers: mpsc::Sender<RaftAnswer>,
    inbound: Arc<Semaphore>,
    changing: Arc<AtomicBool>,
    policy: Policy,
    /// Frames dropped: malformed, unexpected answers, inbound over the bound.
    dropped: u64,
    committed: mpsc::Sender<Committed>,
    /// This node's departure committed: the voter policy counts it gone.
    leaving: bool,
    /// Other nodes whose departure committed: gone for the voter policy.
    departing: std::collections::BTreeSet<u64>,
    /// The data stream groups, whose RPCs travel the same way (absent in unit tests).
    stream_groups: Option<StreamGroups>,
}

impl RaftPort {
    /// The port, the queue serving tasks answer through and the queue of committed changes
    /// (both selected by the loop).
    pub fn new(
        consensus: Consensus,
        policy: Policy,
    ) -> (Self, mpsc::Receiver<RaftAnswer>, mpsc::Receiver<Committed>) {
        let (answers, answers_rx) = mpsc::channel(MAX_INBOUND);
        let (committed, committed_rx) = mpsc::channel(64);
        (
            Self {
                consensus,
                pending: HashMap::new(),
                next_req_id: rand::random(),
                answers,
                inbound: Arc::new(Semaphore::new(MAX_INBOUND)),
                changing: Arc::new(AtomicBool::new(false)),
                policy,
                dropped: 0,
                committed,
                leaving: false,
                departing: std::collections::BTreeSet::new(),
                stream_groups: None,
            },
            answers_rx,
            committed_rx,
        )
    }

    /// The handle.
    pub fn consensus(&self) -> &Consensus {
        &self.consensus
    }

    /// Serves the data stream groups' RPCs too.
    pub fn with_stream_groups(mut self, groups: StreamGroups) -> Self {
        self.stream_groups = Some(groups);
        self
    }
}

fn envelope(group: u64, req_id: u64, kind: u32, answer: bool, body: Vec<u8>) -> Bytes {
    meshd_proto::link::RaftEnvelope {
        req_id,
        kind,
        answer,
        body: body.into(),
        group,
    }
    .encode_to_vec()
    .into()
}

impl Control {
    /// Sends one of openraft's calls.
    pub(super) async fn send_raft_call(&mut self, call: RaftCall) {
        let port = &mut self.raft;
        if port.pending.len() >= MAX_PENDING {
            // Dropping `reply` fails the call now.
            port.dropped += 1;
            return;
        }
        port.next_req_id = port.next_req_id.wrapping_add(1);
        let req_id = port.next_req_id;
        port.pending.insert(req_id, (call.target, call.reply));
        let payload = envelope(call.group, req_id, call.kind, false, call.body);
        self.send_frame(call.target, FrameType::Raft, TrafficClass::System, payload)
            .await;
    }

    /// Sends an answer a serving task produced.
    pub(super) async fn send_raft_answer(&mut self, answer: RaftAnswer) {
        let payload = envelope(answer.group, answer.req_id, answer.kind, true, answer.body);
        self.send_frame(answer.to, FrameType::Raft, TrafficClass::System, payload)
            .await;
    }

    /// A `Raft` frame from `from` (its origin tag checked by the shard).
    pub(super) fn handle_raft_frame(&mut self, from: u64, payload: &[u8]) {
        let port = &mut self.raft;
        let Ok(envelope) = meshd_proto::link::RaftEnvelope::decode(payload) else {
            port.dropped += 1;
            return;
        };
        if envelope.answer {
            // Only the node asked may answer.
            match port.pending.remove(&envelope.req_id) {
                Some((target, reply)) if target == from => {
                    let _ = reply.send(envelope.body.to_vec());
                }
                Some(entry) => {
                    port.pending.insert(envelope.req_id, entry);
                    port.dropped += 1;
                }
                None => port.dropped += 1,
            }
            return;
        }
        let Ok(permit) = Arc::clone(&port.inbound).try_acquire_owned() else {
            port.dropped += 1;
            return;
        };
        let consensus = port.consensus.clone();
        let groups = port.stream_groups.clone();
        let answers = port.answers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let group = envelope.group;
            let served = if group == 0 {
                consensus.serve(from, envelope.kind, &envelope.body).await
            } else {
                match groups {
                    Some(groups) => {
                        groups
                            .serve(from, group, envelope.kind, envelope.body.to_vec())
                            .await
                    }
                    None => None,
                }
            };
            if let Some(body) = served {
                let answer = RaftAnswer {
                    group,
                    to: from,
                    req_id: envelope.req_id,
                    kind: envelope.kind,
                    body,
                };
                let _ = answers.send(answer).await;
            }
        });
    }

    /// Once per tick: forget calls whose caller gave up, and on the leader let the voter
    /// policy make its next change.
    pub(super) fn tick_consensus(&mut self, now: Instant) {
        self.raft.pending.retain(|_, (_, reply)| !reply.is_closed());
        if self.raft.changing.load(Ordering::Acquire) {
            return;
        }
        let Some((voters, learners)) = self.raft.consensus.policy_inputs() else {
            return;
        };
        let local = self.local();
        let mut members: BTreeMap<u64, Liveness> = self
            .membership
            .members()
            .map(|m| {
                let liveness = match m.state {
                    MemberState::Alive | MemberState::Suspect => Liveness::Live,
                    MemberState::Dead => Liveness::Dead(now.saturating_duration_since(m.since)),
                };
                (m.node, liveness)
            })
            .collect();
        for node in self
            .membership
            .removed()
            .chain(self.raft.departing.iter().copied())
        {
            members.insert(node, Liveness::Gone);
        }
        members.insert(
            local,
            if self.raft.leaving {
                Liveness::Gone
            } else {
                Liveness::Live
            },
        );
        // A member joins the group only once its certified key is known here (the group
        // speaks to it over origin-tagged frames).
        members.retain(|node, liveness| {
            *liveness != Liveness::Live
                || voters.contains(node)
                || learners.contains(node)
                || self.trust.knows(*node)
        });
        let Some(change) = self.raft.policy.decide(&voters, &learners, &members) else {
            return;
        };
        tracing::info!(?change, "control group membership change");
        let changing = Arc::clone(&self.raft.changing);
        changing.store(true, Ordering::Release);
        let consensus = self.raft.consensus.clone();
        tokio::spawn(async move {
            if let Err(e) = consensus.change(change).await {
                tracing::warn!(error = %e, "control group membership change failed");
            }
            changing.store(false, Ordering::Release);
        });
    }

    /// Commits `command` through the group off the loop; `after` runs on the loop with the
    /// outcome. A departure also waits (bounded) until the group stops counting on this
    /// node's vote, so leaving never takes the group's quorum with it.
    pub(super) fn commit_then(&mut self, command: MeshCommand, after: After) {
        let consensus = self.raft.consensus.clone();
        let committed = self.raft.committed.clone();
        let local = self.local();
        tokio::spawn(async move {
            let result = consensus.write(command).await;
            if result.is_ok() && matches!(after, After::Leave { .. }) {
                let started = Instant::now();
                while consensus.counts_on(local) && started.elapsed() < HANDOVER_WAIT {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if consensus.counts_on(local) {
                    tracing::warn!(
                        "leaving while the control group still counts this node as a voter"
                    );
                }
            }
            let _ = committed.send(Committed { result, after }).await;
        });
    }

    /// A change committed (or not): act on it and answer.
    pub(super) fn handle_committed(&mut self, committed: Committed) {
        let now = Instant::now();
        let critical = self.membership.census().health() == super::membership::Health::Critical;
        match (committed.result, committed.after) {
            // The seeds' way out of CRITICAL is evicting the dead; when they took the group's
            // quorum with them nothing can commit, so the eviction is decided here and spread
            // by notice, as without a group. The group itself stays without a quorum until
            // enough of its voters return (recovering it without them is not built).
            (Err(WriteError::NoQuorum { term, voters }), After::Evict { node, reply })
                if critical =>
            {
                tracing::warn!(
                    node,
                    term,
                    ?voters,
                    "mesh CRITICAL and the control group without a quorum: evicting by notice only"
                );
                let _ = reply.send(self.evict(now, node));
            }
            (Err(e), After::Evict { reply, .. } | After::Leave { reply }) => {
                let _ = reply.send(Err(LifecycleError::Consensus(e.to_string())));
            }
            (Ok(_), After::Evict { node, reply }) => {
                // The decision may have been applied already (it came through the log too).
                let result = if self.membership.is_evicted(node) {
                    let notice = self
                        .trust
                        .sign(Notice::new(node, now_ms(), NoticeKind::Evicted));
                    self.membership.publish_notice(now, notice);
                    Ok(())
                } else {
                    self.evict(now, node)
                };
                let _ = reply.send(result);
            }
            (Ok(_), After::Leave { reply }) => {
                let _ = reply.send(self.leave(now));
            }
        }
    }

    /// A decision the group committed (or held at start): acted on here, idempotently.
    pub(super) fn handle_decision(&mut self, decision: Decision, replay: bool) {
        let local = self.local();
        match decision {
            Decision::Evict(node) if node != local => {
                self.membership.decided(node, NoticeKind::Evicted);
            }
            // Live, a departure only makes the group stop counting on the node: the node
            // itself says it left (a notice) once the group handed its vote over, and until
            // then it must still be reachable (its key kept) to hear that its Leave committed.
            // Replayed at start, the node is long gone.
            Decision::Leave(node) if node != local => {
                if replay {
                    self.membership.decided(node, NoticeKind::Left);
                } else {
                    self.raft.departing.insert(node);
                }
            }
            Decision::Admit(node, public_key) if node != local => {
                self.membership.decided(node, NoticeKind::Admitted);
                self.raft.departing.remove(&node);
                // The group's record is the node's identity: live, it replaces a key held
                // from an earlier life (a rejoin may bring a new key); at start it only fills
                // in keys not yet learned, so frames to members can be sealed before their
                // first LSA arrives.
                if !replay && self.trust.key_of(node).is_some_and(|k| k != public_key) {
                    self.trust.forget(node);
                    self.lsa_auth.forget(node);
                }
                self.trust.learn(node, public_key);
            }
            Decision::SetPolicy(key, value) => self.apply_setting(&key, &value),
            Decision::Leave(_) => self.raft.leaving = true,
            Decision::Evict(_) | Decision::Admit(..) => {}
        }
    }

    fn apply_setting(&mut self, key: &str, value: &str) {
        let setting = match live::parse(key, value) {
            Ok(setting) => setting,
            Err(e) => {
                // Checked before the write; a node of another version may disagree.
                tracing::warn!(key, value, error = %e, "committed setting not applied");
                return;
            }
        };
        let now = Instant::now();
        match setting {
            LiveSetting::RoutingWeight(which, v) => self.routing.reconfigure(now, |config| {
                let weights = &mut config.weights;
                match which {
                    Weight::Alpha => weights.alpha = v,
                    Weight::Beta => weights.beta = v,
                    Weight::Gamma => weights.gamma = v,
                    Weight::Delta => weights.delta = v,
                    Weight::Epsilon => weights.epsilon = v,
                }
            }),
            LiveSetting::KPaths(k) => self.routing.reconfigure(now, |config| config.k_paths = k),
            LiveSetting::LogLevel(filter) => {
                if let Err(e) = live::set_log_level(&filter) {
                    tracing::warn!(error = %e, "log level not changed");
                }
            }
            LiveSetting::ProbePeriod(period) => {
                if let Err(e) = self.membership.set_timing(|c| c.probe_period = period) {
                    tracing::warn!(error = %e, "SWIM timing not changed");
                    return;
                }
            }
            LiveSetting::SuspectToDown(after) => {
                if let Err(e) = self.membership.set_timing(|c| c.suspect_to_down = after) {
                    tracing::warn!(error = %e, "SWIM timing not changed");
                    return;
                }
            }
            LiveSetting::JoinPolicy(policy) => {
                if let Some(record) = self.lifecycle.record.as_mut()
                    && let Some(config) = record.config.as_mut()
                    && config.join_policy != policy as u32
                {
                    config.join_policy = policy as u32;
                    let record = record.clone();
                    self.store
                        .stage(now, |batch| batch.save_mesh(record, false));
                }
            }
        }
        tracing::info!(key, value, "live setting applied");
    }

    /// Raft frames dropped (malformed, unexpected, over the inbound bound).
    pub(super) fn raft_dropped(&self) -> u64 {
        self.raft.dropped
    }
}
