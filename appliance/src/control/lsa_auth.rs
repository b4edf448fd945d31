//! Signed LSAs, sans-IO: who may say what about a node's links.
//!
//! Every LSA is signed by its origin (Ed25519, over the LSA without its age) and carries the
//! origin's certificate, so any node can check it against the mesh authority without ever
//! having linked with the origin, and no relay can alter, replay under a higher seq or invent
//! one. This layer sits between the shards and [`super::routing::Routing`]:
//!
//! ```text
//!  routing frame in ──► LsaAuth::check (cert + signature of a copy that would change the LSDB)
//!                   ──► Routing::handle_frame ──► LsaAuth::settle (keep the proof of what was kept)
//!  Routing::poll_transmit ──► LsaAuth::attach (own LSA: signed; others: the origin's proof) ──► out
//! ```
//!
//! Only copies that would change the database are checked (a seq above the one held): an
//! older or equal copy only makes this node send its own or acknowledge, so a flood of stale
//! copies costs no signature checks. A certificate already checked for an origin is not checked
//! again (same bytes). The first key certified for an origin stays until the origin leaves the
//! database by a membership decision ([`LsaAuth::forget`]): a second certificate for the same
//! id with another key is refused as a conflict. Revoked (evicted) origins are refused.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use meshd_proto::link::{LsaMsg, RoutingMessage, routing_message};
use meshd_shards::credential::{self, CredentialError};
use prost::Message;

use super::lsdb::MAX_ORIGINS;

const LSA_CONTEXT: &[u8] = b"meshd lsa v1";

/// What this node signs with and checks against.
#[derive(Clone)]
pub struct LsaCredential {
    /// The mesh this node is a member of.
    pub mesh_id: String,
    /// The mesh authority's public key.
    pub authority: [u8; 32],
    /// This node's encoded certificate.
    pub certificate: Bytes,
    /// This node's identity key.
    pub key: SigningKey,
}

impl std::fmt::Debug for LsaCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LsaCredential")
            .field("mesh_id", &self.mesh_id)
            .finish_non_exhaustive()
    }
}

/// Why an LSA was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LsaRefusal {
    /// This node has no mesh credential (it is not a member).
    #[error("no credential of a mesh")]
    NoCredential,
    /// The certificate does not vouch for the origin.
    #[error("origin certificate: {0}")]
    Certificate(CredentialError),
    /// The origin's signature does not match.
    #[error("bad origin signature")]
    Signature,
    /// A certificate for the origin with another key than the one it is known by.
    #[error("origin certified with another key than the one known")]
    KeyConflict,
    /// The origin was evicted.
    #[error("origin revoked")]
    Revoked,
}

impl LsaRefusal {
    /// Name of the counter.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::NoCredential => "lsa_no_credential",
            Self::Certificate(_) => "lsa_bad_certificate",
            Self::Signature => "lsa_bad_signature",
            Self::KeyConflict => "lsa_key_conflict",
            Self::Revoked => "lsa_revoked",
        }
    }
}

#[derive(Clone, Debug)]
struct Proof {
    seq: u64,
    /// The listen address the origin signed (this node's own table may hold another one for
    /// the origin, learnt from its link handshake).
    listen_addr: String,
    certificate: Bytes,
    signature: Bytes,
}

#[derive(Clone, Debug)]
struct Known {
    /// BLAKE3 of the certificate bytes already checked.
    certificate_digest: [u8; 32],
    public_key: [u8; 32],
    not_after_ms: u64,
}

/// The signing and checking of LSAs for one node.
#[derive(Debug, Default)]
pub struct LsaAuth {
    local: u64,
    credential: Option<LsaCredential>,
    known: HashMap<u64, Known>,
    proofs: HashMap<u64, Proof>,
    /// Proof of the copy being checked, until `settle` says whether the LSDB kept it.
    pending: Option<(u64, Proof)>,
    own: Option<(u64, Bytes)>,
    revoked: HashSet<u64>,
    new_keys: Vec<(u64, [u8; 32])>,
    refused: u64,
}

impl LsaAuth {
    /// For node `local`, without a credential until [`Self::set_credential`].
    pub fn new(local: u64) -> Self {
        Self {
            local,
            ..Self::default()
        }
    }

    /// This node's credential (issued, renewed, or another mesh's). Another authority or
    /// mesh forgets every origin known under the old one.
    pub fn set_credential(&mut self, credential: Option<LsaCredential>) {
        let same_mesh = match (&self.credential, &credential) {
            (Some(a), Some(b)) => a.authority == b.authority && a.mesh_id == b.mesh_id,
            _ => false,
        };
        if !same_mesh {
            self.known.clear();
            self.proofs.clear();
        }
        self.own = None;
        self.credential = credential;
    }

    /// An evicted node: its LSAs are refused from now on, and its key forgotten.
    pub fn revoke(&mut self, node: u64) {
        self.revoked.insert(node);
        self.forget(node);
    }

    /// A node admitted again after an eviction.
    pub fn unrevoke(&mut self, node: u64) {
        self.revoked.remove(&node);
    }

    /// A node that left the mesh: a later certificate may bind its id to another key.
    pub fn forget(&mut self, node: u64) {
        self.known.remove(&node);
        self.proofs.remove(&node);
    }

    /// Keys certified since the last call: (node, Ed25519 public key).
    pub fn take_new_keys(&mut self) -> Vec<(u64, [u8; 32])> {
        std::mem::take(&mut self.new_keys)
    }

    /// LSAs refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Checks a routing frame before [`super::routing::Routing::handle_frame`] sees it. `held`
    /// gives the seq of the LSA the database holds for an origin. Frames that are not an LSA,
    /// or an LSA no newer than the one held, pass unchecked (they cannot change anything).
    pub fn check(
        &mut self,
        now_ms: u64,
        payload: &[u8],
        held: impl Fn(u64) -> Option<u64>,
    ) -> Result<(), LsaRefusal> {
        self.pending = None;
        let Ok(RoutingMessage {
            body: Some(routing_message::Body::Lsa(lsa)),
        }) = RoutingMessage::decode(payload)
        else {
            return Ok(());
        };
        let origin = lsa.origin;
        let result = self.check_lsa(now_ms, lsa, held);
        if let Err(refusal) = &result {
            self.refused += 1;
            if self.refused.is_power_of_two() {
                tracing::warn!(
                    origin,
                    refused = self.refused,
                    "LSA refused: {} ({refusal}; this warning repeats at every power of two)",
                    refusal.kind()
                );
            }
        }
        result
    }

    fn check_lsa(
        &mut self,
        now_ms: u64,
        mut lsa: LsaMsg,
        held: impl Fn(u64) -> Option<u64>,
    ) -> Result<(), LsaRefusal> {
        let credential = self.credential.as_ref().ok_or(LsaRefusal::NoCredential)?;
        let origin = lsa.origin;
        if origin != self.local && held(origin).is_some_and(|held| held >= lsa.seq) {
            return Ok(());
        }
        if self.revoked.contains(&origin) {
            return Err(LsaRefusal::Revoked);
        }
        let certificate = std::mem::take(&mut lsa.certificate);
        let signature = std::mem::take(&mut lsa.signature);
        let public_key = if origin == self.local {
            // A copy of this node's own LSA (from an earlier life): signed by this key or
            // forged.
            credential.key.verifying_key().to_bytes()
        } else {
            let digest = *blake3::hash(&certificate).as_bytes();
            match self.known.get(&origin) {
                Some(known)
                    if known.certificate_digest == digest && now_ms <= known.not_after_ms =>
                {
                    known.public_key
                }
                known => {
                    let certified = credential::certified_key(
                        &credential.authority,
                        &certificate,
                        &credential.mesh_id,
                        origin,
                        now_ms,
                    )
                    .map_err(LsaRefusal::Certificate)?;
                    if known.is_some_and(|k| k.public_key != certified.public_key) {
                        return Err(LsaRefusal::KeyConflict);
                    }
                    if known.is_none() {
                        self.new_keys.push((origin, certified.public_key));
                    }
                    if self.known.len() < 2 * MAX_ORIGINS || self.known.contains_key(&origin) {
                        self.known.insert(
                            origin,
                            Known {
                                certificate_digest: digest,
                                public_key: certified.public_key,
                                not_after_ms: certified.not_after_ms,
                            },
                        );
                    }
                    certified.public_key
                }
            }
        };
        let signature_bytes =
            <[u8; 64]>::try_from(signature.as_ref()).map_err(|_| LsaRefusal::Signature)?;
        let key = VerifyingKey::from_bytes(&public_key).map_err(|_| LsaRefusal::Signature)?;
        key.verify(
            &signed_bytes(&lsa),
            &Signature::from_bytes(&signature_bytes),
        )
        .map_err(|_| LsaRefusal::Signature)?;
        self.pending = Some((
            origin,
            Proof {
                seq: lsa.seq,
                listen_addr: lsa.listen_addr,
                certificate,
                signature,
            },
        ));
        Ok(())
    }

    /// After the database took the frame [`Self::check`] passed: keeps the origin's proof if
    /// the database now holds that very LSA (`held`), so it can be passed on unchanged.
    pub fn settle(&mut self, held: impl Fn(u64) -> Option<u64>) {
        let Some((origin, proof)) = self.pending.take() else {
            return;
        };
        if origin == self.local || held(origin) != Some(proof.seq) {
            return;
        }
        self.proofs.insert(origin, proof);
        if self.proofs.len() > 2 * MAX_ORIGINS {
            self.proofs
                .retain(|origin, proof| held(*origin) == Some(proof.seq));
        }
    }

    /// Adds the certificate and signature to an outgoing routing frame: this node signs its
    /// own LSA; another origin's goes out with the proof it came with. An LSA without one
    /// (impossible unless the database outlived a credential change) goes out unsigned and
    /// is refused by the neighbour.
    pub fn attach(&mut self, payload: Bytes) -> Bytes {
        let Ok(RoutingMessage {
            body: Some(routing_message::Body::Lsa(mut lsa)),
        }) = RoutingMessage::decode(payload.as_ref())
        else {
            return payload;
        };
        if lsa.origin == self.local {
            let Some(credential) = &self.credential else {
                return payload;
            };
            let signature = match &self.own {
                Some((seq, signature)) if *seq == lsa.seq => signature.clone(),
                _ => {
                    let signature: Bytes = credential.key.sign(&signed_bytes(&lsa)).to_vec().into();
                    self.own = Some((lsa.seq, signature.clone()));
                    signature
                }
            };
            lsa.certificate = credential.certificate.clone();
            lsa.signature = signature;
        } else if let Some(proof) = self.proofs.get(&lsa.origin)
            && proof.seq == lsa.seq
        {
            lsa.listen_addr.clone_from(&proof.listen_addr);
            lsa.certificate = proof.certificate.clone();
            lsa.signature = proof.signature.clone();
        } else {
            return payload;
        }
        RoutingMessage {
            body: Some(routing_message::Body::Lsa(lsa)),
        }
        .encode_to_vec()
        .into()
    }
}

/// What an origin signs: the LSA without its age, certificate and signature.
fn signed_bytes(lsa: &LsaMsg) -> Vec<u8> {
    let body = LsaMsg {
        age_ms: 0,
        certificate: Bytes::new(),
        signature: Bytes::new(),
        ..lsa.clone()
    };
    let mut out = Vec::with_capacity(LSA_CONTEXT.len() + body.encoded_len());
    out.extend_from_slice(LSA_CONTEXT);
    body.encode(&mut out).expect("a Vec grows");
    out
}

#[cfg(test)]
mod tests {
    use meshd_proto::link::AdjacencyMsg;
    use meshd_shards::credential::MeshAuthority;

    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn node_key(id: u64) -> SigningKey {
        SigningKey::from_bytes(&[id as u8; 32])
    }

    fn credential(authority: &MeshAuthority, id: u64) -> LsaCredential {
        let key = node_key(id);
        LsaCredential {
            mesh_id: "m".into(),
            authority: authority.public_key(),
            certificate: authority
                .issue("m", id, key.verifying_key().to_bytes(), NOW)
                .into(),
            key,
        }
    }

    fn auth(authority: &MeshAuthority, id: u64) -> LsaAuth {
        let mut auth = LsaAuth::new(id);
        auth.set_credential(Some(credential(authority, id)));
        auth
    }

    fn lsa(origin: u64, seq: u64, neighbours: &[u64]) -> Bytes {
        RoutingMessage {
            body: Some(routing_message::Body::Lsa(LsaMsg {
                origin,
                seq,
                adjacencies: neighbours
                    .iter()
                    .map(|n| AdjacencyMsg {
                        neighbor: *n,
                        metrics: None,
                    })
                    .collect(),
                listen_addr: "127.0.0.1:1".into(),
                age_ms: 5,
                ..LsaMsg::default()
            })),
        }
        .encode_to_vec()
        .into()
    }

    fn edit(payload: &Bytes, f: impl FnOnce(&mut LsaMsg)) -> Bytes {
        let mut message = RoutingMessage::decode(payload.as_ref()).unwrap();
        let Some(routing_message::Body::Lsa(lsa)) = &mut message.body else {
            panic!("not an lsa")
        };
        f(lsa);
        message.encode_to_vec().into()
    }

    fn signature_of(payload: &Bytes) -> Bytes {
        match RoutingMessage::decode(payload.as_ref()).unwrap().body {
            Some(routing_message::Body::Lsa(lsa)) => lsa.signature,
            _ => panic!("not an lsa"),
        }
    }

    const NOTHING: fn(u64) -> Option<u64> = |_| None;

    #[test]
    fn an_origin_signed_lsa_passes_from_hop_to_hop_with_its_age_changed() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let mut one = auth(&authority, 1);
        let mut two = auth(&authority, 2);
        let mut three = auth(&authority, 3);
        let signed = one.attach(lsa(1, 4, &[2]));
        assert_eq!(two.check(NOW, &signed, NOTHING), Ok(()));
        assert_eq!(
            two.take_new_keys(),
            vec![(1, node_key(1).verifying_key().to_bytes())]
        );
        two.settle(|origin| (origin == 1).then_some(4));
        // Two re-encodes it from its database (another age, and the listen address it learnt
        // from its own link with one) and attaches the proof.
        let passed_on = two.attach(edit(&signed, |l| {
            l.age_ms = 900;
            l.listen_addr = "10.9.9.9:9".into();
            l.certificate = Bytes::new();
            l.signature = Bytes::new();
        }));
        assert_eq!(three.check(NOW, &passed_on, NOTHING), Ok(()));
    }

    #[test]
    fn forged_altered_unsigned_and_foreign_lsas_are_refused() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let mut one = auth(&authority, 1);
        let mut two = auth(&authority, 2);
        let mut rogue = auth(&authority, 9);
        // Unsigned.
        assert_eq!(
            two.check(NOW, &lsa(1, 4, &[2]), NOTHING),
            Err(LsaRefusal::Certificate(CredentialError::Missing))
        );
        // Signed by a member, claiming another origin, with the member's own certificate.
        let by_rogue = rogue.attach(lsa(9, 4, &[]));
        let claimed = edit(&by_rogue, |l| l.origin = 1);
        assert_eq!(
            two.check(NOW, &claimed, NOTHING),
            Err(LsaRefusal::Certificate(CredentialError::Mismatch))
        );
        // The real origin's certificate, the rogue's signature.
        let real = one.attach(lsa(1, 4, &[2]));
        let rogue_signature = signature_of(&rogue.attach(lsa(1, 1 << 40, &[2])));
        let resigned = edit(&real, |l| {
            l.seq = 1 << 40;
            l.signature = rogue_signature;
        });
        assert_eq!(
            two.check(NOW, &resigned, NOTHING),
            Err(LsaRefusal::Signature)
        );
        // Adjacencies or seq altered by a relay.
        let altered = edit(&real, |l| l.adjacencies.clear());
        assert_eq!(
            two.check(NOW, &altered, NOTHING),
            Err(LsaRefusal::Signature)
        );
        let bumped = edit(&real, |l| l.seq = u64::MAX >> 3);
        assert_eq!(two.check(NOW, &bumped, NOTHING), Err(LsaRefusal::Signature));
        // Another mesh's authority.
        let mut stranger = auth(&MeshAuthority::from_secret(&[2; 32]), 1);
        let foreign = stranger.attach(lsa(1, 5, &[2]));
        assert_eq!(
            two.check(NOW, &foreign, NOTHING),
            Err(LsaRefusal::Certificate(CredentialError::WrongAuthority))
        );
        // Expired certificate.
        assert!(matches!(
            two.check(NOW + 10 * 24 * 3600 * 1000, &real, NOTHING),
            Err(LsaRefusal::Certificate(CredentialError::Expired))
        ));
        // Without a credential, nothing.
        let mut outsider = LsaAuth::new(5);
        assert_eq!(
            outsider.check(NOW, &real, NOTHING),
            Err(LsaRefusal::NoCredential)
        );
        assert!(two.refused() >= 7);
        // The real one passes.
        assert_eq!(two.check(NOW, &real, NOTHING), Ok(()));
    }

    #[test]
    fn a_second_key_for_a_known_origin_and_revoked_origins_are_refused() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let mut one = auth(&authority, 1);
        let mut two = auth(&authority, 2);
        assert_eq!(two.check(NOW, &one.attach(lsa(1, 1, &[])), NOTHING), Ok(()));
        // A secret holder certifies id 1 with another key.
        let mut impostor = LsaAuth::new(1);
        let other_key = SigningKey::from_bytes(&[77; 32]);
        impostor.set_credential(Some(LsaCredential {
            certificate: authority
                .issue("m", 1, other_key.verifying_key().to_bytes(), NOW)
                .into(),
            key: other_key,
            ..credential(&authority, 1)
        }));
        let second = impostor.attach(lsa(1, 2, &[]));
        assert_eq!(
            two.check(NOW, &second, NOTHING),
            Err(LsaRefusal::KeyConflict)
        );
        two.revoke(1);
        assert_eq!(
            two.check(NOW, &one.attach(lsa(1, 3, &[])), NOTHING),
            Err(LsaRefusal::Revoked)
        );
        two.unrevoke(1);
        assert_eq!(two.check(NOW, &one.attach(lsa(1, 4, &[])), NOTHING), Ok(()));
    }

    #[test]
    fn stale_copies_are_not_checked_and_own_copies_must_be_own() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let mut two = auth(&authority, 2);
        // No newer than held: passes unchecked (it only triggers an ack or a resend).
        assert_eq!(two.check(NOW, &lsa(1, 3, &[]), |_| Some(3)), Ok(()));
        // A copy of two's own LSA signed by somebody else is refused.
        let mut rogue = auth(&authority, 9);
        let forged_own = edit(&rogue.attach(lsa(9, 50, &[])), |l| l.origin = 2);
        assert_eq!(
            two.check(NOW, &forged_own, NOTHING),
            Err(LsaRefusal::Signature)
        );
        let own = two.attach(lsa(2, 50, &[]));
        assert_eq!(two.check(NOW, &own, NOTHING), Ok(()));
    }

    #[test]
    fn acks_and_garbage_pass_to_routing_untouched() {
        let authority = MeshAuthority::from_secret(&[1; 32]);
        let mut two = auth(&authority, 2);
        assert_eq!(two.check(NOW, b"\xff\xff", NOTHING), Ok(()));
        let garbage = Bytes::from_static(b"\x01\x02");
        assert_eq!(two.attach(garbage.clone()), garbage);
    }
}
