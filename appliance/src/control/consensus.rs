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
    time::Instant,
};

use bytes::Bytes;
use meshd_shards::frame::{FrameType, TrafficClass};
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    Control,
    membership::MemberState,
    raft::{
        group::Consensus,
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
    to: u64,
    req_id: u64,
    kind: u32,
    body: Vec<u8>,
}

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
}

impl RaftPort {
    /// The port, and the queue serving tasks answer through (selected by the loop).
    pub fn new(consensus: Consensus, policy: Policy) -> (Self, mpsc::Receiver<RaftAnswer>) {
        let (answers, answers_rx) = mpsc::channel(MAX_INBOUND);
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
            },
            answers_rx,
        )
    }

    /// The handle.
    pub fn consensus(&self) -> &Consensus {
        &self.consensus
    }
}

fn envelope(req_id: u64, kind: u32, answer: bool, body: Vec<u8>) -> Bytes {
    meshd_proto::link::RaftEnvelope {
        req_id,
        kind,
        answer,
        body: body.into(),
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
        let payload = envelope(req_id, call.kind, false, call.body);
        self.send_frame(call.target, FrameType::Raft, TrafficClass::System, payload)
            .await;
    }

    /// Sends an answer a serving task produced.
    pub(super) async fn send_raft_answer(&mut self, answer: RaftAnswer) {
        let payload = envelope(answer.req_id, answer.kind, true, answer.body);
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
        let answers = port.answers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(body) = consensus.serve(from, envelope.kind, &envelope.body).await {
                let answer = RaftAnswer {
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
        for node in self.membership.removed() {
            members.insert(node, Liveness::Gone);
        }
        members.insert(local, Liveness::Live);
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

    /// Raft frames dropped (malformed, unexpected, over the inbound bound).
    pub(super) fn raft_dropped(&self) -> u64 {
        self.raft.dropped
    }
}
