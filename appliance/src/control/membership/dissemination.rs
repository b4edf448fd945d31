//! What rides on foca's custom broadcasts: node metadata and notices (evicted, admitted,
//! left), each keeping only the newest per node so stale news stops spreading.
#![forbid(unsafe_code)]

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use foca::{BroadcastHandler, Invalidates};
use meshd_shards::credential;
use serde::{Deserialize, Serialize};

use super::{MAX_MEMBERS, MemberId, NodeMeta};
use crate::control::types::Refusals;

/// The most notices remembered. A notice is kept only to recognise a late copy of old news;
/// real meshes issue a handful (an eviction or a departure now and then), so 4096 is far above
/// honest use and bounds what a member inventing notices about invented ids can make every node
/// keep. At the bound a notice about a node that never published metadata (no member ever
/// heard of it) is refused, neither kept nor passed on, so a flood dies out instead of
/// circling between members that each forgot part of it; one about a node that did publish
/// metadata takes the place of the oldest notice.
pub const MAX_NOTICES: usize = 4096;

/// How long a notice is remembered after it arrived. A notice spreads in seconds (each member
/// passes it on at most `max_transmissions` times, piggybacked on gossip every 200 ms); ten
/// minutes is long past the last honest copy, and ageing out keeps the table small between
/// floods. What a notice decided is not forgotten with it: evictions live in the evicted set and
/// the control database.
pub const NOTICE_TTL: Duration = Duration::from_secs(600);

pub(super) type MetaTable = Rc<RefCell<Disseminated>>;

/// A decision about a node's place in the mesh, spread to every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// Removed by an operator: its datagrams and links are refused.
    Evicted,
    /// Joined again after an eviction.
    Admitted,
    /// Left for good.
    Left,
}

/// A notice about `node`; of two notices about one node the higher `seq` wins (callers use
/// the decision's wall-clock time in ms). Signed by the member that decided (`issuer`): a node
/// leaves only by its own word, and an eviction or admission names the member that made it,
/// so no relay or neighbour can invent one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The node concerned.
    pub node: u64,
    /// Order among notices about the node.
    pub seq: u64,
    /// What was decided.
    pub kind: NoticeKind,
    /// The member that decided (for `Left`, the node itself).
    pub issuer: u64,
    /// The issuer's Ed25519 signature (two halves: serde's arrays stop at 32).
    pub signature: [[u8; 32]; 2],
    /// The issuer's certificate, so that a node that never held the issuer's key (one that
    /// restarted after the issuer left) can still check the notice against the authority.
    pub certificate: Vec<u8>,
}

/// What notices are checked against.
#[derive(Clone, Debug, Default)]
pub struct NoticeTrust {
    /// Certified keys held now (see `control::trust`).
    pub keys: Arc<HashMap<u64, [u8; 32]>>,
    /// The mesh id and its authority's public key, for issuers whose key is not held.
    pub authority: Option<(String, [u8; 32])>,
    /// Wall clock in ms (certificate validity).
    pub now_ms: u64,
    /// Evicted nodes: they decide nothing.
    pub revoked: BTreeSet<u64>,
}

const NOTICE_CONTEXT: &[u8] = b"meshd notice v1";

impl Notice {
    /// An unsigned notice (sign it with [`Self::signed`] before it leaves this node).
    pub fn new(node: u64, seq: u64, kind: NoticeKind) -> Self {
        Self {
            node,
            seq,
            kind,
            issuer: 0,
            signature: [[0; 32]; 2],
            certificate: Vec::new(),
        }
    }

    /// This notice, issued and signed by `issuer` holding `key`, vouched for by its
    /// `certificate`.
    pub fn signed(mut self, issuer: u64, key: &SigningKey, certificate: &[u8]) -> Self {
        self.issuer = issuer;
        self.certificate = certificate.to_vec();
        let signature = key.sign(&self.signed_bytes()).to_bytes();
        self.signature[0].copy_from_slice(&signature[..32]);
        self.signature[1].copy_from_slice(&signature[32..]);
        self
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = NOTICE_CONTEXT.to_vec();
        out.extend_from_slice(&self.node.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.issuer.to_le_bytes());
        out
    }

    /// Whether the issuer may make this decision and signed it with its certified key (held,
    /// or vouched for by the certificate the notice carries).
    pub fn is_authentic(&self, trust: &NoticeTrust) -> bool {
        let issuer_may = match self.kind {
            NoticeKind::Left => self.issuer == self.node,
            NoticeKind::Evicted | NoticeKind::Admitted => {
                self.issuer != self.node && self.issuer != 0
            }
        };
        // Sized before anything else: an authentic notice is kept and passed on with its
        // certificate, so an oversized one must not ride along on a held key.
        if !issuer_may
            || trust.revoked.contains(&self.issuer)
            || self.certificate.len() > credential::MAX_CERTIFICATE_BYTES
        {
            return false;
        }
        let held = trust.keys.get(&self.issuer).copied();
        let certified = || {
            let (mesh_id, authority) = trust.authority.as_ref()?;
            credential::certified_key(
                authority,
                &self.certificate,
                mesh_id,
                self.issuer,
                trust.now_ms,
            )
            .ok()
            .map(|c| c.public_key)
        };
        let Some(key) = held
            .or_else(certified)
            .and_then(|k| VerifyingKey::from_bytes(&k).ok())
        else {
            return false;
        };
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&self.signature[0]);
        signature[32..].copy_from_slice(&self.signature[1]);
        key.verify(&self.signed_bytes(), &Signature::from_bytes(&signature))
            .is_ok()
    }
}

/// What rides on foca's custom broadcasts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Gossiped {
    Meta(NodeMeta),
    Notice(Notice),
}

/// The newest of everything disseminated, shared by the handler and [`Membership`].
#[derive(Default)]
pub(super) struct Disseminated {
    pub(super) meta: BTreeMap<u64, NodeMeta>,
    /// The newest notice about each node and when it arrived (`None` until the membership
    /// core, which knows the time, takes it as fresh).
    pub(super) notices: BTreeMap<u64, (Notice, Option<Instant>)>,
    /// Notices not yet applied to the member table.
    fresh: Vec<Notice>,
    pub(super) refused_meta: Refusals,
    pub(super) dropped_notices: Refusals,
    /// What notices are checked against; `None` only in simulations of the protocol (the
    /// control thread sets it before its first datagram).
    pub(super) trust: Option<NoticeTrust>,
    pub(super) forged_notices: u64,
}

impl Disseminated {
    /// The notices that arrived since the last call, stamped with their arrival time.
    pub(super) fn take_fresh(&mut self, now: Instant) -> Vec<Notice> {
        for notice in &self.fresh {
            if let Some((_, arrived)) = self.notices.get_mut(&notice.node) {
                arrived.get_or_insert(now);
            }
        }
        std::mem::take(&mut self.fresh)
    }

    /// Forgets notices older than [`NOTICE_TTL`].
    pub(super) fn age_notices(&mut self, now: Instant) {
        self.notices.retain(|_, (_, arrived)| {
            arrived.is_none_or(|at| now.saturating_duration_since(at) < NOTICE_TTL)
        });
    }

    /// Whether a notice about `node` may be kept; at [`MAX_NOTICES`] only one about a node
    /// with metadata, in place of the oldest notice.
    fn make_room_for_notice(&mut self, node: u64) -> bool {
        if self.notices.len() < MAX_NOTICES || self.notices.contains_key(&node) {
            return true;
        }
        if !self.meta.contains_key(&node) {
            self.dropped_notices.record("notices", node);
            return false;
        }
        // Unstamped ones arrived in this very call: newest of all.
        let oldest = self
            .notices
            .iter()
            .min_by_key(|(node, (_, arrived))| (arrived.is_none(), *arrived, **node))
            .map(|(node, _)| *node);
        if let Some(oldest) = oldest {
            self.notices.remove(&oldest);
            self.dropped_notices.record("notices", oldest);
        }
        true
    }
}

/// Keeps the newest metadata and notices of every node and tells foca what is worth spreading.
pub(super) struct MetaHandler {
    pub(super) table: MetaTable,
}

/// Key of a broadcast: a newer seq about the same node (and kind of news) replaces older.
#[derive(Clone, Copy, Debug)]
pub(super) struct MetaKey {
    node: u64,
    seq: u64,
    notice: bool,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.notice == other.notice && self.seq >= other.seq
    }
}

/// A metadata broadcast that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("undecodable node metadata: {0}")]
pub(super) struct BadMeta(String);

impl BroadcastHandler<MemberId> for MetaHandler {
    type Key = MetaKey;
    type Error = BadMeta;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&MemberId>,
    ) -> Result<Option<MetaKey>, BadMeta> {
        let item: Gossiped = postcard::from_bytes(data).map_err(|e| BadMeta(e.to_string()))?;
        let mut table = self.table.borrow_mut();
        match item {
            Gossiped::Meta(meta) => {
                if table
                    .meta
                    .get(&meta.node)
                    .is_some_and(|known| known.seq >= meta.seq)
                {
                    return Ok(None);
                }
                if table.meta.len() >= MAX_MEMBERS && !table.meta.contains_key(&meta.node) {
                    // Not kept, not spread; the membership core prunes metadata of nodes that
                    // left the table, and a member republishes its own.
                    table.refused_meta.record("metadata", meta.node);
                    return Ok(None);
                }
                let key = MetaKey {
                    node: meta.node,
                    seq: meta.seq,
                    notice: false,
                };
                table.meta.insert(meta.node, meta);
                Ok(Some(key))
            }
            Gossiped::Notice(notice) => {
                if let Some(trust) = &table.trust
                    && !notice.is_authentic(trust)
                {
                    // Neither kept nor passed on: a forged decision dies at the first hop.
                    table.forged_notices += 1;
                    if table.forged_notices.is_power_of_two() {
                        tracing::warn!(
                            node = notice.node,
                            issuer = notice.issuer,
                            kind = ?notice.kind,
                            refused = table.forged_notices,
                            "notice refused: not authentic (this warning repeats at every power of two)"
                        );
                    }
                    return Ok(None);
                }
                if table
                    .notices
                    .get(&notice.node)
                    .is_some_and(|(known, _)| known.seq >= notice.seq)
                {
                    return Ok(None);
                }
                if !table.make_room_for_notice(notice.node) {
                    return Ok(None);
                }
                let key = MetaKey {
                    node: notice.node,
                    seq: notice.seq,
                    notice: true,
                };
                table.notices.insert(notice.node, (notice.clone(), None));
                table.fresh.push(notice);
                Ok(Some(key))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use meshd_shards::credential::MeshAuthority;

    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key(id: u64) -> SigningKey {
        SigningKey::from_bytes(&[id as u8; 32])
    }

    fn trust(authority: &MeshAuthority, held: &[u64]) -> NoticeTrust {
        NoticeTrust {
            keys: Arc::new(
                held.iter()
                    .map(|id| (*id, key(*id).verifying_key().to_bytes()))
                    .collect(),
            ),
            authority: Some(("m".into(), authority.public_key())),
            now_ms: NOW,
            revoked: BTreeSet::new(),
        }
    }

    fn certificate(authority: &MeshAuthority, id: u64) -> Vec<u8> {
        authority.issue("m", id, key(id).verifying_key().to_bytes(), NOW)
    }

    #[test]
    fn a_notice_is_checked_against_a_held_key_or_the_certificate_it_carries() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let left =
            Notice::new(3, 1, NoticeKind::Left).signed(3, &key(3), &certificate(&authority, 3));
        // Key held.
        assert!(left.is_authentic(&trust(&authority, &[3])));
        // Key not held (the node left before this one started): the certificate vouches.
        assert!(left.is_authentic(&trust(&authority, &[])));
        // Certificate of another mesh's authority, or none, and no key held: refused.
        let stranger = MeshAuthority::from_secret(&[2; 32]);
        assert!(!left.is_authentic(&trust(&stranger, &[])));
        let bare = Notice::new(3, 1, NoticeKind::Left).signed(3, &key(3), &[]);
        assert!(!bare.is_authentic(&trust(&authority, &[])));
        // Expired certificate.
        let mut late = trust(&authority, &[]);
        late.now_ms = NOW + 30 * 24 * 3600 * 1000;
        assert!(!left.is_authentic(&late));
        // A certificate for the issuer, a signature by somebody else.
        let mut forged = left.clone();
        forged.signature = Notice::new(3, 1, NoticeKind::Left)
            .signed(3, &key(9), &[])
            .signature;
        assert!(!forged.is_authentic(&trust(&authority, &[])));
        // A held key does not let an oversized certificate ride along.
        let mut padded = left.clone();
        padded.certificate = vec![0; credential::MAX_CERTIFICATE_BYTES + 1];
        assert!(!padded.is_authentic(&trust(&authority, &[3])));
        // Altered after signing.
        let mut bumped = left.clone();
        bumped.seq = u64::MAX;
        assert!(!bumped.is_authentic(&trust(&authority, &[3])));
    }

    #[test]
    fn only_a_node_says_it_left_and_nobody_evicts_itself_or_decides_once_revoked() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let all = trust(&authority, &[3, 4]);
        let left_for_another = Notice::new(3, 1, NoticeKind::Left).signed(4, &key(4), &[]);
        assert!(!left_for_another.is_authentic(&all));
        let self_eviction = Notice::new(4, 1, NoticeKind::Evicted).signed(4, &key(4), &[]);
        assert!(!self_eviction.is_authentic(&all));
        let eviction = Notice::new(3, 1, NoticeKind::Evicted).signed(4, &key(4), &[]);
        assert!(eviction.is_authentic(&all));
        let mut revoked = all.clone();
        revoked.revoked.insert(4);
        assert!(
            !eviction.is_authentic(&revoked),
            "an evicted node evicts nobody"
        );
    }
}
