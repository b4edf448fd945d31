//! JoinMesh, both sides: the joiner dials a member as a guest and sends `Join`; the member
//! checks policy, CRITICAL and the key and answers `JoinAnswer`; the joiner stores the mesh and
//! links again as a member, or goes back to its previous mesh id with nothing stored.
//!
//! The member checks the key on the join-check worker (`control::join_check`), never on the
//! control thread; while the worker's queue is full a join is refused at once with
//! [`BUSY_REASON`]. The verdict comes back as an input of the control loop, which checks the
//! mesh again (it may have changed meanwhile) before it answers.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use meshd_proto::link::{
    JoinAnswer, JoinPolicy, JoinRefusal, JoinRequest, MemberAddr, MeshConfig, MeshRecord,
};
use meshd_shards::{command::DialError, frame::FrameType};
use prost::Message;

use super::{ACTIVE, JOIN_DIAL_BASE, LifecycleError, PendingJoin, Reply, ShardCommand};
use crate::{
    control::{
        Control,
        join_check::{JoinCheck, JoinVerdict, Submitted},
        membership::{MemberState, Notice, NoticeKind},
    },
    storage::now_ms,
};

/// The refusal of a join that arrives while the member's join-check queue is full. The joiner
/// gets it as a failed JoinMesh and may simply try again.
pub const BUSY_REASON: &str =
    "this member is busy checking other join keys; retry in a moment (or through another member)";

fn refusal(refusal: JoinRefusal, reason: &str) -> JoinAnswer {
    JoinAnswer {
        accepted: false,
        reason: reason.to_owned(),
        refusal: refusal as u32,
        mesh: None,
        members: Vec::new(),
    }
}

impl Control {
    pub(super) fn start_join(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        key: String,
        authority: Option<[u8; 32]>,
        timeout: Duration,
        reply: Reply,
    ) {
        if let Some(config) = self.lifecycle.config() {
            let _ = reply.send(Err(LifecycleError::AlreadyMember(config.mesh_id.clone())));
            return;
        }
        if self.lifecycle.pending_join.is_some() {
            let _ = reply.send(Err(LifecycleError::Busy));
            return;
        }
        self.lifecycle.next_join_dial += 1;
        let dial_id = JOIN_DIAL_BASE + self.lifecycle.next_join_dial;
        let previous_mesh = self.lifecycle.mesh_id.clone();
        // A node joins as a guest: without a mesh id, which only the join exchange accepts.
        self.switch_mesh(String::new(), "joining another mesh");
        self.lifecycle
            .commands
            .push(ShardCommand::Dial { addr, dial_id });
        self.lifecycle.pending_join = Some(PendingJoin {
            addr,
            dial_id,
            key,
            peer: None,
            deadline: now + timeout,
            timeout,
            previous_mesh,
            authority,
            reply,
        });
    }

    /// The outcome of a dial: `true` when it was a join dial (handled here).
    pub(in crate::control) fn handle_join_dial(
        &mut self,
        dial_id: u64,
        result: &Result<u64, DialError>,
    ) -> bool {
        let Some(pending) = self.lifecycle.pending_join.as_mut() else {
            return dial_id >= JOIN_DIAL_BASE;
        };
        if pending.dial_id != dial_id {
            return dial_id >= JOIN_DIAL_BASE;
        }
        match result {
            Ok(peer) => {
                pending.peer = Some(*peer);
                let request = JoinRequest {
                    join_key: pending.key.clone(),
                    name: String::new(),
                };
                let peer = *peer;
                self.lifecycle.commands.push(ShardCommand::Send {
                    dst: peer,
                    frame_type: FrameType::Join,
                    payload: request.encode_to_vec().into(),
                });
            }
            Err(error) => {
                let text = format!("{}: {error}", pending.addr);
                self.fail_join(LifecycleError::Unreachable(text));
            }
        }
        true
    }

    /// Gives up a join whose deadline passed.
    pub(in crate::control) fn handle_join_timeout(&mut self, now: Instant) {
        if let Some(pending) = &self.lifecycle.pending_join
            && pending.deadline <= now
        {
            let waited = pending.timeout;
            self.fail_join(LifecycleError::Timeout(waited));
        }
    }

    fn fail_join(&mut self, error: LifecycleError) {
        let Some(pending) = self.lifecycle.pending_join.take() else {
            return;
        };
        tracing::warn!(addr = %pending.addr, %error, "join failed; back to the previous mesh");
        self.switch_mesh(pending.previous_mesh, "join failed");
        let _ = pending.reply.send(Err(error));
    }

    /// A `Join` or `JoinAnswer` frame from the peer of a guest link.
    pub(in crate::control) fn handle_join_frame(
        &mut self,
        now: Instant,
        from: u64,
        frame_type: FrameType,
        payload: &[u8],
    ) {
        match frame_type {
            FrameType::Join => self.answer_join(now, from, payload),
            FrameType::JoinAnswer => self.take_join_answer(from, payload),
            _ => {}
        }
    }

    fn answer_join(&mut self, now: Instant, from: u64, payload: &[u8]) {
        let Ok(request) = JoinRequest::decode(payload) else {
            let answer = refusal(JoinRefusal::Unspecified, "malformed join request");
            return self.send_join_answer(from, answer);
        };
        let config = match self.join_gate() {
            Ok(config) => config,
            Err((kind, reason)) => return self.send_join_answer(from, refusal(kind, &reason)),
        };
        let policy = JoinPolicy::try_from(config.join_policy as i32).unwrap_or(JoinPolicy::Closed);
        if policy != JoinPolicy::KeyRequired {
            let answer = self.admit(now, from, config);
            return self.send_join_answer(from, answer);
        }
        let check = JoinCheck {
            from,
            hash: config.join_key_hash,
            key: request.join_key,
        };
        match self.join_checks.submit(check) {
            Submitted::Queued => {}
            Submitted::Busy => {
                self.joins_refused_busy += 1;
                let answer = refusal(JoinRefusal::Unspecified, BUSY_REASON);
                self.send_join_answer(from, answer);
            }
            Submitted::Stopped => {
                let answer = refusal(JoinRefusal::Unspecified, "this member is stopping");
                self.send_join_answer(from, answer);
            }
        }
    }

    /// The key of `verdict.from`'s join was checked: answer it, unless the mesh changed while
    /// the key was being checked.
    pub(in crate::control) fn handle_join_verdict(&mut self, now: Instant, verdict: JoinVerdict) {
        let from = verdict.from;
        let answer = match self.join_gate() {
            Err((kind, reason)) => refusal(kind, &reason),
            Ok(config) if config.join_key_hash != verdict.hash => refusal(
                JoinRefusal::Unspecified,
                "the mesh changed while the key was checked; retry",
            ),
            Ok(_) if !verdict.matches => refusal(JoinRefusal::BadKey, "wrong or missing join key"),
            Ok(config) => self.admit(now, from, config),
        };
        self.send_join_answer(from, answer);
    }

    /// Whether this member admits joins at all now: its mesh config, or why not.
    fn join_gate(&self) -> Result<MeshConfig, (JoinRefusal, String)> {
        let Some(config) = self.lifecycle.config().cloned() else {
            return Err((
                JoinRefusal::NoMesh,
                "this node's mesh was configured, not seeded: it admits no joins".into(),
            ));
        };
        let policy = JoinPolicy::try_from(config.join_policy as i32).unwrap_or(JoinPolicy::Closed);
        if let Some(reason) = self.critical_reason() {
            Err((
                JoinRefusal::Critical,
                format!("the mesh is CRITICAL ({reason})"),
            ))
        } else if self.lifecycle.is_stopped() {
            Err((JoinRefusal::Closed, "this member is stopped".into()))
        } else if policy == JoinPolicy::Closed {
            Err((JoinRefusal::Closed, "the mesh is CLOSED".into()))
        } else {
            Ok(config)
        }
    }

    /// Admits `from`: readmits it if it was evicted, forgets the peer row of its earlier life
    /// (it may come back with a new key), and lists the members it can link with.
    fn admit(&mut self, now: Instant, from: u64, config: MeshConfig) -> JoinAnswer {
        let members = self
            .membership
            .members()
            .filter(|m| m.state != MemberState::Dead)
            .map(|m| MemberAddr {
                node_id: m.node,
                listen_addr: self
                    .routing
                    .listen_addrs()
                    .get(&m.node)
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        let readmitted = self.membership.is_evicted(from);
        // A joiner is a guest, not a linked member: its peer row is of an earlier life, and
        // the link it makes as a member pins whatever key it has now.
        if readmitted {
            // Lifting an eviction is promised to the joiner: durable before the answer.
            let durable = self.store.commit_now(|batch| {
                batch.remove_peer(from);
                batch.set_evicted(from, false);
            });
            if let Err(e) = durable {
                tracing::error!(node = from, error = %e, "could not record a readmission");
                return refusal(
                    JoinRefusal::Unspecified,
                    "this member cannot write its database; try another member",
                );
            }
        } else {
            self.store.stage(now, |batch| batch.remove_peer(from));
        }
        if readmitted {
            // Joining again lifts an eviction.
            let notice = self
                .trust
                .sign(Notice::new(from, now_ms(), NoticeKind::Admitted));
            self.membership.publish_notice(now, notice);
        } else {
            self.membership.readmit(from);
        }
        JoinAnswer {
            accepted: true,
            reason: String::new(),
            refusal: 0,
            mesh: Some(config),
            members,
        }
    }

    fn send_join_answer(&mut self, from: u64, answer: JoinAnswer) {
        // A flood of refusals is logged at debug level; admissions always are.
        if answer.accepted {
            tracing::info!(node = from, "join request accepted");
        } else {
            tracing::debug!(node = from, reason = %answer.reason, "join request refused");
        }
        self.lifecycle.commands.push(ShardCommand::Send {
            dst: from,
            frame_type: FrameType::JoinAnswer,
            payload: answer.encode_to_vec().into(),
        });
        self.lifecycle.commands.push(ShardCommand::Drop {
            peer: from,
            reason: "join answered".into(),
        });
    }

    fn take_join_answer(&mut self, from: u64, payload: &[u8]) {
        let Some(pending) = &self.lifecycle.pending_join else {
            return;
        };
        if pending.peer != Some(from) {
            return;
        }
        let pinned = pending.authority;
        let answer = match JoinAnswer::decode(payload) {
            Ok(answer) => answer,
            Err(e) => {
                return self.fail_join(LifecycleError::Refused(format!("malformed answer: {e}")));
            }
        };
        let config = match (answer.accepted, answer.mesh) {
            (true, Some(config))
                if !config.mesh_id.is_empty() && config.mesh_secret.len() == 32 =>
            {
                // A join pinned to an authority takes only that authority's mesh.
                let secret = <[u8; 32]>::try_from(config.mesh_secret.as_ref()).unwrap_or_default();
                let authority = meshd_shards::credential::MeshAuthority::from_secret(&secret);
                if pinned.is_some_and(|pinned| pinned != authority.public_key()) {
                    return self.fail_join(LifecycleError::Refused(
                        "the answer's mesh is not the one of the pinned authority".into(),
                    ));
                }
                config
            }
            (true, _) => {
                return self.fail_join(LifecycleError::Refused(
                    "answer without a mesh and its credential".into(),
                ));
            }
            (false, _) => {
                let error = if answer.refusal == JoinRefusal::BadKey as u32 {
                    LifecycleError::BadKey(answer.reason)
                } else {
                    LifecycleError::Refused(answer.reason)
                };
                return self.fail_join(error);
            }
        };
        let record = MeshRecord {
            config: Some(config.clone()),
            state: ACTIVE,
        };
        let Some(pending) = self.lifecycle.pending_join.take() else {
            return;
        };
        let addr = pending.addr;
        let saved = self.store.commit_now(|batch| {
            batch.save_mesh(record.clone(), true);
            batch.add_dial_target(addr);
        });
        if let Err(e) = saved {
            // Nothing was written: the batch is one transaction.
            self.switch_mesh(pending.previous_mesh, "join failed");
            let _ = pending
                .reply
                .send(Err(LifecycleError::Storage(e.to_string())));
            return;
        }
        tracing::info!(mesh_id = %config.mesh_id, via = %pending.addr, "joined the mesh");
        self.lifecycle.record = Some(record);
        self.switch_mesh(config.mesh_id, "joined another mesh");
        self.plan.add(
            pending.addr,
            crate::control::dial_plan::Origin::Added,
            Instant::now(),
        );
        let _ = pending.reply.send(Ok(()));
    }
}
