//! JoinMesh, both sides: the joiner dials a member as a guest and sends `Join`; the member
//! checks policy and CRITICAL and, for a mesh with a join key, runs a SPAKE2 exchange over the
//! key's argon2id output (`pake`): the key never crosses, an impostor member learns nothing it
//! can attack offline, and the answer (the mesh config, its secret included) is sealed under
//! the exchange's session key. The joiner stores the mesh and links again as a member, or goes
//! back to its previous mesh id with nothing stored.
//!
//! The joiner's argon2id runs on the join-check worker (`control::join_check`), never on the
//! control thread. The member keeps at most [`MAX_PENDING_EXCHANGES`] exchanges open (each
//! lives as long as its guest link); past that a join is refused at once with
//! [`BUSY_REASON`].

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use meshd_proto::link::{
    JoinAnswer, JoinPolicy, JoinRefusal, JoinRequest, MemberAddr, MeshConfig, MeshRecord,
};
use meshd_shards::{command::DialError, frame::FrameType};
use prost::Message;
use rand::rngs::OsRng;

use super::{
    ACTIVE, JOIN_DIAL_BASE, LifecycleError, PendingJoin, Reply, ShardCommand,
    pake::{self, MemberPake, Side},
};
use crate::{
    control::{
        Control,
        join_check::{JoinCheck, JoinVerdict, Submitted},
        membership::{MemberState, Notice, NoticeKind},
    },
    storage::now_ms,
};

/// The refusal of a join that arrives while the member has [`MAX_PENDING_EXCHANGES`] open. The
/// joiner gets it as a failed JoinMesh and may simply try again.
pub const BUSY_REASON: &str =
    "this member is busy checking other join keys; retry in a moment (or through another member)";

/// Key exchanges a member keeps open at once (each until its joiner's proof or its guest
/// link's end). A real mesh sees a join now and then; this bounds what a flood of guest links
/// can make a member hold.
pub const MAX_PENDING_EXCHANGES: usize = 16;

/// Guest links whose proven key a member remembers at once (until the link ends); a joiner
/// past it is refused as busy, like one past [`MAX_PENDING_EXCHANGES`].
pub const MAX_GUESTS: usize = 1024;

/// An exchange the member started and waits to finish.
pub(in crate::control) struct OpenExchange {
    state: MemberPake,
    /// The mesh's key hash it started with (the mesh may change meanwhile).
    hash: String,
    started: Instant,
}

/// How long an open exchange waits for the joiner's proof (a guest link lives shorter).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(30);

fn refusal(refusal: JoinRefusal, reason: &str) -> JoinAnswer {
    JoinAnswer {
        accepted: false,
        reason: reason.to_owned(),
        refusal: refusal as u32,
        ..JoinAnswer::default()
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
            session: None,
            member_message: Vec::new(),
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
                // Asks for the member's challenge; the key stays here.
                let request = JoinRequest::default();
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
        self.lifecycle
            .exchanges
            .retain(|_, open| now.duration_since(open.started) < EXCHANGE_LIFETIME);
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
        if !request.pake.is_empty() {
            return self.finish_exchange(now, from, &request);
        }
        let config = match self.join_gate() {
            Ok(config) => config,
            Err((kind, reason)) => return self.send_join_answer(from, refusal(kind, &reason)),
        };
        let policy = JoinPolicy::try_from(config.join_policy as i32).unwrap_or(JoinPolicy::Closed);
        if policy != JoinPolicy::KeyRequired {
            let answer = self.admit(now, from, config);
            return self.send_join_answer(from, answer);
        }
        let Ok((params, password)) = pake::split_verifier(&config.join_key_hash) else {
            tracing::error!("the mesh's join key hash does not parse; joins are refused");
            let answer = refusal(
                JoinRefusal::Unspecified,
                "this member cannot check join keys",
            );
            return self.send_join_answer(from, answer);
        };
        let exchanges = &mut self.lifecycle.exchanges;
        if exchanges.len() >= MAX_PENDING_EXCHANGES && !exchanges.contains_key(&from) {
            self.joins_refused_busy += 1;
            return self.send_join_answer(from, refusal(JoinRefusal::Unspecified, BUSY_REASON));
        }
        let (state, message) = pake::member_start(&password, &mut OsRng);
        exchanges.insert(
            from,
            OpenExchange {
                state,
                hash: config.join_key_hash,
                started: now,
            },
        );
        let challenge = JoinAnswer {
            key_params: params,
            pake: message.into(),
            ..JoinAnswer::default()
        };
        // Not an answer yet: the guest link stays open for the proof.
        self.lifecycle.commands.push(ShardCommand::Send {
            dst: from,
            frame_type: FrameType::JoinAnswer,
            payload: challenge.encode_to_vec().into(),
        });
    }

    /// The joiner's proof: a wrong key is refused; the right one gets the answer sealed under
    /// the session key, with the member's own proof.
    fn finish_exchange(&mut self, now: Instant, from: u64, request: &JoinRequest) {
        let Some(open) = self.lifecycle.exchanges.remove(&from) else {
            let answer = refusal(JoinRefusal::Unspecified, "no join in progress; start again");
            return self.send_join_answer(from, answer);
        };
        let config = match self.join_gate() {
            Ok(config) if config.join_key_hash == open.hash => config,
            Ok(_) => {
                let answer = refusal(
                    JoinRefusal::Unspecified,
                    "the mesh changed while the key was checked; retry",
                );
                return self.send_join_answer(from, answer);
            }
            Err((kind, reason)) => return self.send_join_answer(from, refusal(kind, &reason)),
        };
        let Ok(session) = pake::member_finish(open.state, &request.pake, &request.confirm) else {
            let answer = refusal(JoinRefusal::BadKey, "wrong or missing join key");
            return self.send_join_answer(from, answer);
        };
        let answer = self.admit(now, from, config);
        let sealed = if answer.accepted {
            JoinAnswer {
                accepted: true,
                confirm: session.confirmation(Side::Member).to_vec().into(),
                sealed: session.seal(&answer.encode_to_vec(), &mut OsRng).into(),
                ..JoinAnswer::default()
            }
        } else {
            answer
        };
        self.send_join_answer(from, sealed);
    }

    /// The joiner's argon2id came back from the worker: answer the member's challenge.
    pub(in crate::control) fn handle_join_verdict(&mut self, _now: Instant, verdict: JoinVerdict) {
        let Some(pending) = self.lifecycle.pending_join.as_mut() else {
            return;
        };
        if pending.peer != Some(verdict.from) || pending.member_message.is_empty() {
            return;
        }
        let Some(password) = verdict.password else {
            return self.fail_join(LifecycleError::Refused(
                "the member's join key parameters are unusable (not argon2id, or too costly)"
                    .into(),
            ));
        };
        let member_message = std::mem::take(&mut pending.member_message);
        let (message, session) = match pake::joiner_respond(&password, &member_message, &mut OsRng)
        {
            Ok(answer) => answer,
            Err(error) => {
                return self.fail_join(LifecycleError::Refused(format!("member: {error}")));
            }
        };
        let proof = JoinRequest {
            pake: message.into(),
            confirm: session.confirmation(Side::Joiner).to_vec().into(),
            ..JoinRequest::default()
        };
        pending.session = Some(session);
        self.lifecycle.commands.push(ShardCommand::Send {
            dst: verdict.from,
            frame_type: FrameType::Join,
            payload: proof.encode_to_vec().into(),
        });
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
        let Some(public_key) = self.lifecycle.guest_keys.get(&from).copied() else {
            // Past MAX_GUESTS at its link-up: no identity to record.
            self.joins_refused_busy += 1;
            return refusal(JoinRefusal::Unspecified, BUSY_REASON);
        };
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
        if self.raft.consensus().has_group() {
            // The group records every admission with the key the joiner proved; for a node
            // that left or was evicted it also lifts the removal, or a node starting later
            // (or catching up from a snapshot) would apply the removal again. Best effort:
            // the join does not wait on the group.
            let consensus = self.raft.consensus().clone();
            tokio::spawn(async move {
                let admit = crate::control::raft::MeshCommand::Admit {
                    node: from,
                    public_key,
                };
                if let Err(e) = consensus.write(admit).await {
                    tracing::warn!(node = from, error = %e, "the control group did not record an admission");
                }
            });
        }
        // Every admission is announced, newer than anything said about the node before: a
        // notice of its earlier departure or eviction still spreading (or arriving late at a
        // member that missed it) is then older than the admission and ignored everywhere,
        // instead of removing the node again. Seqs are wall-clock milliseconds, and one above
        // the newest notice this member holds about the node.
        let seq = now_ms().max(self.membership.notice_seq(from).map_or(0, |s| s + 1));
        let notice = self
            .trust
            .sign(Notice::new(from, seq, NoticeKind::Admitted));
        self.membership.publish_notice(now, notice);
        self.membership.readmit(from);
        JoinAnswer {
            accepted: true,
            mesh: Some(config),
            members,
            evicted: self.membership.evicted().filter(|n| *n != from).collect(),
            ..JoinAnswer::default()
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

    /// The member's challenge: the key's argon2id goes to the worker (its result continues
    /// in [`Self::handle_join_verdict`]).
    fn take_challenge(&mut self, from: u64, challenge: JoinAnswer) {
        let Some(pending) = self.lifecycle.pending_join.as_mut() else {
            return;
        };
        if pending.session.is_some() || !pending.member_message.is_empty() {
            return self.fail_join(LifecycleError::Refused(
                "the member sent a second challenge".into(),
            ));
        }
        if pending.key.is_empty() {
            return self.fail_join(LifecycleError::BadKey(
                "the mesh requires a join key and none was given".into(),
            ));
        }
        pending.member_message = challenge.pake.to_vec();
        let check = JoinCheck {
            from,
            params: challenge.key_params,
            key: pending.key.clone(),
        };
        match self.join_checks.submit(check) {
            Submitted::Queued => {}
            Submitted::Busy => {
                self.fail_join(LifecycleError::Refused(BUSY_REASON.into()));
            }
            Submitted::Stopped => {
                self.fail_join(LifecycleError::Refused("this node is stopping".into()));
            }
        }
    }

    /// A final answer as the joiner may trust it: after a key exchange, the member proved it
    /// knows the key and the answer opens under the session; without one (an OPEN mesh) only
    /// when no key was given, so an impostor cannot skip the exchange to hand out its own mesh.
    fn unseal(&self, answer: JoinAnswer) -> Result<JoinAnswer, LifecycleError> {
        let Some(pending) = &self.lifecycle.pending_join else {
            return Err(LifecycleError::Refused("no join in progress".into()));
        };
        if !answer.accepted {
            return Ok(answer);
        }
        match &pending.session {
            Some(session) => {
                if !session.confirms(Side::Member, &answer.confirm) {
                    return Err(LifecycleError::Refused(
                        "the member could not prove it knows the join key".into(),
                    ));
                }
                let opened = session
                    .open(&answer.sealed)
                    .map_err(|e| LifecycleError::Refused(format!("member: {e}")))?;
                JoinAnswer::decode(opened.as_slice())
                    .map_err(|e| LifecycleError::Refused(format!("malformed answer: {e}")))
            }
            None if pending.key.is_empty() => Ok(answer),
            // An impostor would skip the exchange to hand out its own mesh; a real OPEN mesh
            // checks no key, and the operator says so by giving none.
            None => Err(LifecycleError::Refused(
                "the member accepted without checking the join key (an OPEN mesh? join without \
                 a key to accept that)"
                    .into(),
            )),
        }
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
        if !answer.pake.is_empty() {
            return self.take_challenge(from, answer);
        }
        let answer = match self.unseal(answer) {
            Ok(answer) => answer,
            Err(error) => return self.fail_join(error),
        };
        let local = self.local();
        // Bounded like the member's own list (a hostile member cannot make it grow the table).
        let evicted: Vec<u64> = answer
            .evicted
            .iter()
            .copied()
            .filter(|n| *n != 0 && *n != local)
            .take(crate::control::membership::MAX_NOTICES)
            .collect();
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
            for node in &evicted {
                batch.set_evicted(*node, true);
            }
        });
        if let Err(e) = saved {
            // Nothing was written: the batch is one transaction.
            self.switch_mesh(pending.previous_mesh, "join failed");
            let _ = pending
                .reply
                .send(Err(LifecycleError::Storage(e.to_string())));
            return;
        }
        tracing::info!(mesh_id = %config.mesh_id, via = %pending.addr, evicted = evicted.len(), "joined the mesh");
        for node in &evicted {
            self.trust.revoke(*node);
            self.lsa_auth.revoke(*node);
        }
        self.membership.set_evicted(evicted);
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
