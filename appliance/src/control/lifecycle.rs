//! The mesh lifecycle on the control core: seed, join (over a guest link, with the join key
//! checked against an argon2 hash), stop, start, leave and evict.
//!
//! ```text
//!  JoinMesh(addr, key) on J:          J: SetMesh("")  ─ dial addr ─►  M (member, accepts a guest)
//!                                     J ── Join{key} ─────────────►  M: policy; argon2 verify on
//!                                                                       the join-check worker
//!                                                                       (queue full: "busy")
//!                                     J ◄─ JoinAnswer{mesh, members}  M (then closes the guest link)
//!  accepted: J persists the mesh, SetMesh(id), dials addr as a member (kept as a dial target)
//!  refused / unreachable / timeout: J restores its previous mesh id; nothing is persisted
//! ```
//!
//! Evictions and departures are membership notices (`membership::Notice`), spread by gossip:
//! every member persists an eviction, drops the evicted node's link and refuses its gossip and
//! links until it joins again.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use argon2::{
    Argon2,
    password_hash::{PasswordHasher, SaltString},
};
use bytes::Bytes;
use meshd_proto::link::{JoinPolicy, MeshConfig, MeshRecord};
use meshd_shards::{
    command::ShardInput,
    credential::{MeshAuthority, SECRET_LEN},
    frame::FrameType,
};
use rand::RngCore;
use tokio::sync::oneshot;

use super::{
    Control,
    lsa_auth::LsaCredential,
    membership::{Health, Notice, NoticeKind},
};
use crate::storage::now_ms;

mod join;
pub mod pake;

pub use self::join::{BUSY_REASON, MAX_GUESTS, MAX_PENDING_EXCHANGES};

/// Goodbye reasons that tell a peer not to re-dial.
pub const LEFT_REASON: &str = "left the mesh";
/// See [`LEFT_REASON`].
pub const EVICTED_REASON: &str = "evicted";
/// See [`LEFT_REASON`].
pub const STOPPED_REASON: &str = "mesh stopped";

/// Record states (`MeshRecord::state`).
const ACTIVE: u32 = 1;
const STOPPED: u32 = 2;

/// Dial ids of join dials live far above the dial plan's.
const JOIN_DIAL_BASE: u64 = 1 << 62;

/// Why a lifecycle request failed. Nothing was persisted unless the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The node already belongs to a mesh.
    #[error("this node already belongs to mesh {0}; LeaveMesh first")]
    AlreadyMember(String),
    /// The node belongs to no mesh (seeded or joined).
    #[error("this node belongs to no seeded or joined mesh")]
    NotMember,
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The address could not be reached or the handshake failed.
    #[error("cannot reach {0}")]
    Unreachable(String),
    /// The mesh refused the join key.
    #[error("join refused: {0}")]
    BadKey(String),
    /// The mesh admits no one, or is CRITICAL.
    #[error("join refused: {0}")]
    Refused(String),
    /// Membership and configuration changes wait while half or more of the mesh is down.
    #[error("the mesh is CRITICAL ({0}); only EvictNode is accepted until it recovers")]
    Critical(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Another join is in progress.
    #[error("another JoinMesh is in progress")]
    Busy,
    /// The node to evict is unknown.
    #[error("node {0} is not a member")]
    UnknownNode(u64),
    /// The control database failed.
    #[error("control database: {0}")]
    Storage(String),
    /// The control group did not commit the change.
    #[error("the mesh control group did not commit it: {0}")]
    Consensus(String),
}

/// Where an answer goes.
pub type Reply = oneshot::Sender<Result<(), LifecycleError>>;

/// A lifecycle request from the api. Its `Debug` never shows a join key.
pub enum LifecycleRequest {
    /// SeedMesh.
    Seed {
        /// Mesh name.
        name: String,
        /// Mesh description.
        description: String,
        /// `meshd.v1.JoinPolicy`.
        policy: i32,
        /// Join key (KEY_REQUIRED).
        key: String,
        /// Answer.
        reply: Reply,
    },
    /// JoinMesh.
    Join {
        /// A member's link address.
        addr: SocketAddr,
        /// Join key.
        key: String,
        /// The mesh authority the member must be certified by before the key is sent.
        authority: Option<[u8; 32]>,
        /// Give up after.
        timeout: Duration,
        /// Answer.
        reply: Reply,
    },
    /// StartMesh.
    Start {
        /// Answer.
        reply: Reply,
    },
    /// StopMesh.
    Stop {
        /// Answer.
        reply: Reply,
    },
    /// LeaveMesh.
    Leave {
        /// Answer.
        reply: Reply,
    },
    /// EvictNode.
    Evict {
        /// The node.
        node: u64,
        /// Answer.
        reply: Reply,
    },
}

impl std::fmt::Debug for LifecycleRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Seed {
                name,
                description,
                policy,
                ..
            } => f
                .debug_struct("Seed")
                .field("name", name)
                .field("description", description)
                .field("policy", policy)
                .finish_non_exhaustive(),
            Self::Join {
                addr,
                authority,
                timeout,
                ..
            } => f
                .debug_struct("Join")
                .field("addr", addr)
                .field("authority", &authority.is_some())
                .field("timeout", timeout)
                .finish_non_exhaustive(),
            Self::Start { .. } => f.write_str("Start"),
            Self::Stop { .. } => f.write_str("Stop"),
            Self::Leave { .. } => f.write_str("Leave"),
            Self::Evict { node, .. } => f.debug_struct("Evict").field("node", node).finish(),
        }
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn a_join_key_never_shows_in_debug() {
        let (reply, _) = oneshot::channel();
        let join = LifecycleRequest::Join {
            addr: "127.0.0.1:1".parse().unwrap(),
            key: "correct horse battery".into(),
            authority: None,
            timeout: Duration::from_secs(1),
            reply,
        };
        assert!(!format!("{join:?}").contains("horse"));
        let (reply, _) = oneshot::channel();
        let seed = LifecycleRequest::Seed {
            name: "n".into(),
            description: String::new(),
            policy: 2,
            key: "correct horse battery".into(),
            reply,
        };
        assert!(!format!("{seed:?}").contains("horse"));
    }
}

/// A join in progress.
pub(super) struct PendingJoin {
    addr: SocketAddr,
    dial_id: u64,
    key: String,
    peer: Option<u64>,
    deadline: Instant,
    timeout: Duration,
    previous_mesh: String,
    /// The authority the member must be certified by (JoinMeshRequest.mesh_authority).
    authority: Option<[u8; 32]>,
    /// The key exchange's session, once the joiner answered the member's challenge.
    session: Option<pake::Session>,
    /// The member's SPAKE2 message, kept while the worker derives the password.
    member_message: Vec<u8>,
    reply: Reply,
}

/// What the lifecycle asks of the shards, drained in order by the control loop.
pub(super) enum ShardCommand {
    /// Issue this node's certificate for the current mesh and hand it to every shard.
    Credential,
    SetMesh {
        mesh_id: String,
        reason: String,
    },
    Drop {
        peer: u64,
        reason: String,
    },
    Send {
        dst: u64,
        frame_type: FrameType,
        payload: Bytes,
    },
    Dial {
        addr: SocketAddr,
        dial_id: u64,
    },
}

/// The lifecycle state the control core keeps.
#[derive(Default)]
pub(super) struct Lifecycle {
    /// The mesh record (seeded or joined), if any.
    pub(super) record: Option<MeshRecord>,
    /// The mesh id the shards use now ("" = none).
    pub(super) mesh_id: String,
    pub(super) pending_join: Option<PendingJoin>,
    next_join_dial: u64,
    pub(super) commands: Vec<ShardCommand>,
    /// `mesh_id` and the mesh secret from the config (used when no mesh is stored).
    pub(super) configured_mesh_id: String,
    pub(super) configured_secret: Option<[u8; SECRET_LEN]>,
    /// This node, as its certificates name it.
    pub(super) local: u64,
    pub(super) public_key: [u8; 32],
    /// When this node last issued itself a certificate.
    issued_at: Option<Instant>,
    /// The mesh (id, authority) LSAs are signed and checked for now.
    signing_mesh: Option<(String, [u8; 32])>,
    /// Key exchanges this member started, by joiner.
    pub(super) exchanges: std::collections::HashMap<u64, join::OpenExchange>,
    /// The key each guest proved on its link's handshake, by node: what an admission records
    /// in the control group as the joiner's identity. Bounded by [`MAX_GUESTS`].
    pub(super) guest_keys: std::collections::HashMap<u64, [u8; 32]>,
    /// The api's tenant keys: their secret is the current mesh's.
    tenant_keys: crate::api::SharedTenantKeys,
}

impl Lifecycle {
    /// The state at start: the stored record wins over the configured mesh id. The shards
    /// start with a certificate issued by `node.rs`; the first renewal is an hour later.
    pub(super) fn new(
        record: Option<MeshRecord>,
        configured_mesh_id: &str,
        configured_secret: Option<[u8; SECRET_LEN]>,
        local: u64,
        public_key: [u8; 32],
        tenant_keys: crate::api::SharedTenantKeys,
    ) -> Self {
        let mesh_id = start_mesh_id(record.as_ref(), configured_mesh_id);
        Self {
            record,
            mesh_id,
            configured_mesh_id: configured_mesh_id.to_owned(),
            configured_secret,
            local,
            public_key,
            issued_at: Some(Instant::now()),
            tenant_keys,
            ..Self::default()
        }
    }

    /// The public key of the current mesh's authority, if this node holds its secret.
    pub(super) fn authority(&self) -> Option<[u8; 32]> {
        mesh_secret_for(
            &self.mesh_id,
            self.record.as_ref(),
            &self.configured_mesh_id,
            self.configured_secret,
        )
        .map(|secret| MeshAuthority::from_secret(&secret).public_key())
    }

    /// Queues a fresh certificate for the shards once the last one is an hour old.
    pub(super) fn renew_credential_if_due(&mut self, now: Instant) {
        if self
            .issued_at
            .is_none_or(|at| now.duration_since(at) >= CREDENTIAL_RENEWAL)
        {
            self.issued_at = Some(now);
            self.commands.push(ShardCommand::Credential);
        }
    }

    /// Whether StopMesh is in force.
    pub(super) fn is_stopped(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.state == STOPPED)
    }

    /// When the pending join gives up.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.pending_join.as_ref().map(|j| j.deadline)
    }

    pub(super) fn config(&self) -> Option<&MeshConfig> {
        self.record.as_ref().and_then(|r| r.config.as_ref())
    }
}

/// The mesh id a node starts with: its stored mesh's, else the configured one.
pub fn start_mesh_id(record: Option<&MeshRecord>, configured: &str) -> String {
    record
        .and_then(|r| r.config.as_ref())
        .map_or_else(|| configured.to_owned(), |c| c.mesh_id.clone())
}

/// The secret of `mesh_id`: the stored mesh's if it is that one, else the configured one if
/// `mesh_id` is the configured mesh; `None` for no mesh ("").
pub fn mesh_secret_for(
    mesh_id: &str,
    record: Option<&MeshRecord>,
    configured_mesh_id: &str,
    configured_secret: Option<[u8; SECRET_LEN]>,
) -> Option<[u8; SECRET_LEN]> {
    if mesh_id.is_empty() {
        return None;
    }
    if let Some(config) = record.and_then(|r| r.config.as_ref())
        && config.mesh_id == mesh_id
    {
        return <[u8; SECRET_LEN]>::try_from(config.mesh_secret.as_ref()).ok();
    }
    (mesh_id == configured_mesh_id)
        .then_some(configured_secret)
        .flatten()
}

/// This node's certificate in `mesh_id` and the authority it checks peers against, issued now
/// from the mesh secret; nothing without one.
pub fn issue_credential(
    secret: Option<[u8; SECRET_LEN]>,
    mesh_id: &str,
    node_id: u64,
    public_key: [u8; 32],
) -> (Vec<u8>, Option<[u8; 32]>) {
    match secret {
        Some(secret) => {
            let authority = MeshAuthority::from_secret(&secret);
            (
                authority.issue(mesh_id, node_id, public_key, now_ms()),
                Some(authority.public_key()),
            )
        }
        None => (Vec::new(), None),
    }
}

/// How often a node issues itself a fresh certificate (each is valid for a day).
pub(super) const CREDENTIAL_RENEWAL: Duration = Duration::from_secs(3600);

fn hash_key(key: &str) -> Result<String, LifecycleError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(key.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| LifecycleError::Invalid(format!("cannot hash the join key: {e}")))
}

impl Control {
    fn critical_reason(&self) -> Option<String> {
        let census = self.membership.census();
        (census.health() == Health::Critical)
            .then(|| format!("{} of {} members dead", census.dead, census.total))
    }

    /// One lifecycle request.
    pub(super) fn handle_lifecycle(&mut self, request: LifecycleRequest) {
        let now = Instant::now();
        match request {
            LifecycleRequest::Evict { node, reply } => {
                if let Err(e) = self.check_evict(node) {
                    let _ = reply.send(Err(e));
                    return;
                }
                // "Requires consensus": committed through the control group first, then
                // acted on here (and spread by notice); without a group (a mesh configured
                // by file with no bootstrapping node) only the notice carries it.
                if self.raft.consensus().has_group() {
                    self.commit_then(
                        super::raft::MeshCommand::Evict { node },
                        super::consensus::After::Evict { node, reply },
                    );
                } else {
                    let _ = reply.send(self.evict(now, node));
                }
            }
            // A stopped node sees every member dead, so its own view is CRITICAL: starting
            // again is how it recovers, never a change to refuse.
            LifecycleRequest::Start { reply } => {
                let _ = reply.send(self.start_mesh(now));
            }
            other => {
                if let Some(reason) = self.critical_reason() {
                    let reply = match other {
                        LifecycleRequest::Seed { reply, .. }
                        | LifecycleRequest::Join { reply, .. }
                        | LifecycleRequest::Start { reply }
                        | LifecycleRequest::Stop { reply }
                        | LifecycleRequest::Leave { reply }
                        | LifecycleRequest::Evict { reply, .. } => reply,
                    };
                    let _ = reply.send(Err(LifecycleError::Critical(reason)));
                    return;
                }
                // A group left over from a mesh this node left (or one configured by file)
                // must not become the new mesh's: its log, terms and voters belong to another.
                if matches!(
                    other,
                    LifecycleRequest::Seed { .. } | LifecycleRequest::Join { .. }
                ) && self.lifecycle.record.is_none()
                    && self.raft.consensus().has_group()
                {
                    let (LifecycleRequest::Seed { reply, .. }
                    | LifecycleRequest::Join { reply, .. }) = other
                    else {
                        return;
                    };
                    let _ = reply.send(Err(LifecycleError::Invalid(
                        "this node still holds the control group of a mesh it left (or of the \
                         mesh its config file names): restart it with mesh_id = \"\" first, \
                         which drops that state, then seed or join"
                            .into(),
                    )));
                    return;
                }
                match other {
                    LifecycleRequest::Seed {
                        name,
                        description,
                        policy,
                        key,
                        reply,
                    } => {
                        let seeded = self.seed(name, description, policy, &key);
                        if seeded.is_err() {
                            let _ = reply.send(seeded);
                            return;
                        }
                        // The seeding node is the control group's first voter; the answer
                        // waits for that, so a write right after SeedMesh finds a group.
                        let consensus = self.raft.consensus().clone();
                        tokio::spawn(async move {
                            consensus.bootstrap().await;
                            let _ = reply.send(seeded);
                        });
                    }
                    LifecycleRequest::Join {
                        addr,
                        key,
                        authority,
                        timeout,
                        reply,
                    } => self.start_join(now, addr, key, authority, timeout, reply),
                    LifecycleRequest::Stop { reply } => {
                        let _ = reply.send(self.stop_mesh());
                    }
                    LifecycleRequest::Leave { reply } => {
                        if self.lifecycle.record.is_none() {
                            let _ = reply.send(Err(LifecycleError::NotMember));
                        } else if self.raft.consensus().has_group() {
                            let local = self.local();
                            self.commit_then(
                                super::raft::MeshCommand::Leave { node: local },
                                super::consensus::After::Leave { reply },
                            );
                        } else {
                            let _ = reply.send(self.leave(now));
                        }
                    }
                    LifecycleRequest::Evict { .. } | LifecycleRequest::Start { .. } => {}
                }
            }
        }
    }

    fn seed(
        &mut self,
        name: String,
        description: String,
        policy: i32,
        key: &str,
    ) -> Result<(), LifecycleError> {
        if let Some(config) = self.lifecycle.config() {
            return Err(LifecycleError::AlreadyMember(config.mesh_id.clone()));
        }
        let policy = match JoinPolicy::try_from(policy) {
            Ok(JoinPolicy::Unspecified) | Err(_) => {
                return Err(LifecycleError::Invalid(format!(
                    "join_policy {policy} is not OPEN, KEY_REQUIRED or CLOSED"
                )));
            }
            Ok(policy) => policy,
        };
        if name.is_empty() || name.len() > 255 || description.len() > 4096 {
            return Err(LifecycleError::Invalid(
                "name must be 1..=255 bytes and description at most 4096".into(),
            ));
        }
        let join_key_hash = match policy {
            JoinPolicy::KeyRequired if key.len() < 8 => {
                return Err(LifecycleError::Invalid(
                    "KEY_REQUIRED needs a join key of at least 8 bytes".into(),
                ));
            }
            JoinPolicy::KeyRequired => hash_key(key)?,
            _ => String::new(),
        };
        let mut mesh_secret = [0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut mesh_secret);
        let record = MeshRecord {
            config: Some(MeshConfig {
                mesh_id: ulid::Ulid::new().to_string(),
                name,
                description,
                join_policy: policy as u32,
                join_key_hash,
                created_ms: now_ms(),
                mesh_secret: mesh_secret.to_vec().into(),
            }),
            state: ACTIVE,
        };
        self.store
            .commit_now(|batch| batch.save_mesh(record.clone(), true))
            .map_err(|e| LifecycleError::Storage(e.to_string()))?;
        let mesh_id = record
            .config
            .as_ref()
            .map(|c| c.mesh_id.clone())
            .unwrap_or_default();
        tracing::info!(%mesh_id, "seeded a new mesh");
        // The record first: the switch issues this node's certificate from its secret.
        self.lifecycle.record = Some(record);
        self.switch_mesh(mesh_id, "mesh changed");
        Ok(())
    }

    fn start_mesh(&mut self, now: Instant) -> Result<(), LifecycleError> {
        let Some(record) = self.lifecycle.record.as_mut() else {
            return Err(LifecycleError::NotMember);
        };
        record.state = ACTIVE;
        let record = record.clone();
        // Also commits what was staged, so the peers read below are complete.
        self.store
            .commit_now(|batch| batch.save_mesh(record, false))
            .map_err(|e| LifecycleError::Storage(e.to_string()))?;
        // Reconnect: every known member that listens is dialed once more.
        if let Ok(peers) = self.store.db().peers() {
            for (node, peer) in peers {
                if self.membership.is_evicted(node) {
                    continue;
                }
                if let Ok(addr) = peer.listen_addr.parse::<SocketAddr>() {
                    self.plan
                        .add(addr, super::dial_plan::Origin::Tentative, now);
                }
            }
        }
        Ok(())
    }

    fn stop_mesh(&mut self) -> Result<(), LifecycleError> {
        let Some(record) = self.lifecycle.record.as_mut() else {
            return Err(LifecycleError::NotMember);
        };
        record.state = STOPPED;
        let record = record.clone();
        self.store
            .commit_now(|batch| batch.save_mesh(record, false))
            .map_err(|e| LifecycleError::Storage(e.to_string()))?;
        let mesh_id = self.lifecycle.mesh_id.clone();
        self.switch_mesh(mesh_id, STOPPED_REASON);
        Ok(())
    }

    pub(super) fn leave(&mut self, now: Instant) -> Result<(), LifecycleError> {
        if self.lifecycle.record.is_none() {
            return Err(LifecycleError::NotMember);
        }
        self.store
            .commit_now(|batch| batch.clear_mesh())
            .map_err(|e| LifecycleError::Storage(e.to_string()))?;
        let local = self.membership.local().node;
        // Tell the members before the links close: the notice goes out in this drain, ahead
        // of the goodbyes.
        let notice = self
            .trust
            .sign(Notice::new(local, now_ms(), NoticeKind::Left));
        self.membership.publish_notice(now, notice);
        self.membership.leave(now);
        self.lifecycle.record = None;
        // The stored dial targets went with the mesh record; without this the links closing
        // below would be re-dialed as guest links that carry nothing.
        self.plan.clear();
        self.switch_mesh(String::new(), LEFT_REASON);
        Ok(())
    }

    fn check_evict(&self, node: u64) -> Result<(), LifecycleError> {
        if self.lifecycle.record.is_none() {
            return Err(LifecycleError::NotMember);
        }
        if node == 0 || node == self.membership.local().node {
            return Err(LifecycleError::Invalid(format!(
                "node {node} cannot be evicted by itself; use LeaveMesh"
            )));
        }
        if self.membership.member(node).is_none() && !self.membership.is_evicted(node) {
            return Err(LifecycleError::UnknownNode(node));
        }
        Ok(())
    }

    pub(super) fn evict(&mut self, now: Instant, node: u64) -> Result<(), LifecycleError> {
        self.check_evict(node)?;
        self.store
            .commit_now(|batch| {
                batch.set_evicted(node, true);
                batch.remove_peer(node);
            })
            .map_err(|e| LifecycleError::Storage(e.to_string()))?;
        let notice = self
            .trust
            .sign(Notice::new(node, now_ms(), NoticeKind::Evicted));
        self.membership.publish_notice(now, notice);
        self.cut_off(node);
        Ok(())
    }

    /// An evicted node: its link closes with a goodbye that tells it why, and it is not dialed.
    pub(super) fn cut_off(&mut self, node: u64) {
        self.forget_peer(node);
        self.lifecycle.commands.push(ShardCommand::Drop {
            peer: node,
            reason: EVICTED_REASON.into(),
        });
    }

    fn switch_mesh(&mut self, mesh_id: String, reason: &str) {
        self.lifecycle.mesh_id = mesh_id.clone();
        self.lifecycle.commands.push(ShardCommand::Credential);
        self.lifecycle.commands.push(ShardCommand::SetMesh {
            mesh_id,
            reason: reason.to_owned(),
        });
    }

    /// This node's credential for the mesh it is in now (see [`issue_credential`]). While a
    /// join pinned to an authority is pending: no certificate, and that authority, so the
    /// guest handshake checks the member's certificate before the key goes out.
    fn current_credential(&mut self, now: Instant) -> (Vec<u8>, Option<[u8; 32]>) {
        let lifecycle = &mut self.lifecycle;
        lifecycle.issued_at = Some(now);
        if lifecycle.mesh_id.is_empty()
            && let Some(pending) = &lifecycle.pending_join
        {
            // A guest holds no mesh's keys, not even those of the mesh it left to join.
            lifecycle
                .tenant_keys
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .set_secret(None);
            return (Vec::new(), pending.authority);
        }
        let secret = mesh_secret_for(
            &lifecycle.mesh_id,
            lifecycle.record.as_ref(),
            &lifecycle.configured_mesh_id,
            lifecycle.configured_secret,
        );
        lifecycle
            .tenant_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_secret(secret);
        issue_credential(
            secret,
            &lifecycle.mesh_id,
            lifecycle.local,
            lifecycle.public_key,
        )
    }

    /// LSAs are signed with the node's certificate and checked against the mesh's authority;
    /// keys learned under another mesh are forgotten when the mesh changes.
    fn set_signing_credential(&mut self, certificate: &[u8], authority: Option<[u8; 32]>) {
        let credential = authority
            .filter(|_| !certificate.is_empty())
            .map(|authority| LsaCredential {
                mesh_id: self.lifecycle.mesh_id.clone(),
                authority,
                certificate: certificate.to_vec().into(),
                key: self.signing_key.clone(),
            });
        let mesh = credential
            .as_ref()
            .map(|c| (c.mesh_id.clone(), c.authority));
        if mesh != self.lifecycle.signing_mesh {
            self.trust.reset();
            self.membership.set_authority(mesh.clone());
            self.lifecycle.signing_mesh = mesh;
        }
        self.trust.set_certificate(certificate);
        self.lsa_auth.set_credential(credential);
    }

    /// Sends what the lifecycle queued to the shards, in order.
    pub(super) async fn drain_lifecycle(&mut self) {
        let commands = std::mem::take(&mut self.lifecycle.commands);
        for command in commands {
            let (shard, input) = match command {
                ShardCommand::Credential => {
                    let (certificate, authority) = self.current_credential(Instant::now());
                    self.set_signing_credential(&certificate, authority);
                    for shard in self.shards.iter() {
                        let input = ShardInput::SetCredential {
                            certificate: certificate.clone(),
                            authority,
                        };
                        let _ = shard.push(input).await;
                    }
                    continue;
                }
                ShardCommand::SetMesh { mesh_id, reason } => {
                    for shard in self.shards.iter() {
                        let input = ShardInput::SetMesh {
                            mesh_id: mesh_id.clone(),
                            reason: reason.clone(),
                        };
                        let _ = shard.push(input).await;
                    }
                    continue;
                }
                ShardCommand::Drop { peer, reason } => {
                    let (reply, _) = futures::channel::oneshot::channel();
                    let input = ShardInput::DropPeer {
                        peer,
                        reason,
                        reply,
                    };
                    (super::owner_shard(peer, self.shards.len()), input)
                }
                ShardCommand::Send {
                    dst,
                    frame_type,
                    payload,
                } => {
                    let class = meshd_shards::frame::TrafficClass::Control;
                    if !self.send_frame(dst, frame_type, class, payload).await {
                        tracing::warn!("shard stopped; lifecycle command dropped");
                    }
                    continue;
                }
                ShardCommand::Dial { addr, dial_id } => {
                    let shard = super::owner_shard(super::addr_hash(addr), self.shards.len());
                    (shard, ShardInput::Dial { addr, dial_id })
                }
            };
            if self.shards[shard].push(input).await.is_err() {
                tracing::warn!("shard stopped; lifecycle command dropped");
            }
        }
    }
}
