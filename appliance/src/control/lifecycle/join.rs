//! JoinMesh, both sides: the joiner dials a member as a guest and sends `Join`; the member
//! checks policy, CRITICAL and the key and answers `JoinAnswer`; the joiner stores the mesh and
//! links again as a member, or goes back to its previous mesh id with nothing stored.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordVerifier},
};
use meshd_proto::link::{JoinAnswer, JoinPolicy, JoinRefusal, JoinRequest, MemberAddr, MeshRecord};
use meshd_shards::{command::DialError, frame::FrameType};
use prost::Message;

use super::{ACTIVE, JOIN_DIAL_BASE, LifecycleError, PendingJoin, Reply, ShardCommand};
use crate::{
    control::{
        Control,
        membership::{MemberState, Notice, NoticeKind},
    },
    storage::now_ms,
};

impl Control {
    pub(super) fn start_join(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        key: String,
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
        let refuse = |refusal: JoinRefusal, reason: &str| JoinAnswer {
            accepted: false,
            reason: reason.to_owned(),
            refusal: refusal as u32,
            mesh: None,
            members: Vec::new(),
        };
        let answer = match (
            JoinRequest::decode(payload),
            self.lifecycle.config().cloned(),
        ) {
            (Err(_), _) => refuse(JoinRefusal::Unspecified, "malformed join request"),
            (_, None) => refuse(
                JoinRefusal::NoMesh,
                "this node's mesh was configured, not seeded: it admits no joins",
            ),
            (Ok(request), Some(config)) => {
                let policy =
                    JoinPolicy::try_from(config.join_policy as i32).unwrap_or(JoinPolicy::Closed);
                if let Some(reason) = self.critical_reason() {
                    refuse(
                        JoinRefusal::Critical,
                        &format!("the mesh is CRITICAL ({reason})"),
                    )
                } else if self.lifecycle.is_stopped() {
                    refuse(JoinRefusal::Closed, "this member is stopped")
                } else if policy == JoinPolicy::Closed {
                    refuse(JoinRefusal::Closed, "the mesh is CLOSED")
                } else if policy == JoinPolicy::KeyRequired
                    && !key_matches(&config.join_key_hash, &request.join_key)
                {
                    refuse(JoinRefusal::BadKey, "wrong or missing join key")
                } else {
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
                    if self.membership.is_evicted(from) {
                        // Joining again lifts an eviction.
                        if let Err(e) = self.db.set_evicted(from, false) {
                            tracing::error!(node = from, error = %e, "could not record a readmission");
                        }
                        let notice = Notice {
                            node: from,
                            seq: now_ms(),
                            kind: NoticeKind::Admitted,
                        };
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
            }
        };
        tracing::info!(node = from, accepted = answer.accepted, reason = %answer.reason, "join request answered");
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
        let answer = match JoinAnswer::decode(payload) {
            Ok(answer) => answer,
            Err(e) => {
                return self.fail_join(LifecycleError::Refused(format!("malformed answer: {e}")));
            }
        };
        let config = match (answer.accepted, answer.mesh) {
            (true, Some(config)) if !config.mesh_id.is_empty() => config,
            (true, _) => {
                return self.fail_join(LifecycleError::Refused("answer without a mesh".into()));
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
        let saved = self
            .db
            .save_mesh(&record, true)
            .and_then(|()| self.db.add_dial_target(pending.addr));
        if let Err(e) = saved {
            let _ = self.db.clear_mesh();
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

fn key_matches(hash: &str, key: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(key.as_bytes(), &parsed)
            .is_ok()
    })
}
