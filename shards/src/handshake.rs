//! The link handshake, sans-IO: who is on the other end, and can it prove it?
//!
//! Runs inside the WebSocket, after TLS. Both sides run the same machine:
//!
//! ```text
//!   send Hello ──► recv peer Hello ──check──► send Auth ──► recv peer Auth ──verify──► Established
//!                        │ version, mesh id,                       │ Ed25519 over the transcript
//!                        │ self, hint, pinned key                  │
//!                        └────────── any failure: send Refuse{reason}, Refused ◄──┘
//! ```
//!
//! The signed transcript binds both Hellos (so both nonces: no replay) and the TLS exporter value
//! of this very session (so a man in the middle who terminates TLS twice cannot relay the
//! proofs). Each side signs with its role as a prefix, so a proof cannot be reflected back.
//!
//! Drain order: after every `handle_frame`, call [`Handshake::poll_transmit`] until `None`, then
//! check [`Handshake::outcome`].
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use meshd_proto::link::{Auth, Hello, Refuse, RefuseReason};
use prost::Message;

use crate::{
    credential,
    frame::{self, FrameType, Header, TrafficClass},
};

/// The link protocol version this build speaks. 2: DeliveryReport frames carry batched runs
/// (`meshd.v1.DeliveryReports`). 3: the origin tag covers the body before the header fields
/// (`origin::tag`), and a relay may send a `DeliveryReports` notice (`relay_for`): a node of
/// version 2 would drop every routed frame of a version-3 node as forged, so the handshake
/// refuses the pair with a clear reason instead. 4: every lane confirms what it read
/// (`LaneAck`), and a writer stops at `network.lane_window_bytes` unconfirmed: a version-3
/// peer never confirms, so its links would stall.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest handshake payload accepted; Hellos are a few hundred bytes.
pub const MAX_HANDSHAKE_PAYLOAD: usize = 4096;

/// Longest refusal detail sent: it quotes peer-supplied strings.
const MAX_REFUSE_DETAIL: usize = 512;

const TRANSCRIPT_CONTEXT: &str = "meshd link handshake v1";

/// Which side opened the TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This node dialed.
    Dialer,
    /// This node accepted.
    Acceptor,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Dialer => b"dialer",
            Self::Acceptor => b"acceptor",
        }
    }

    fn peer(self) -> Self {
        match self {
            Self::Dialer => Self::Acceptor,
            Self::Acceptor => Self::Dialer,
        }
    }
}

/// What this node says about itself in its Hello.
#[derive(Clone, Debug)]
pub struct LocalHello {
    /// The mesh this node belongs to; peers of other meshes are refused.
    pub mesh_id: String,
    /// This node's id.
    pub node_id: u64,
    /// Random per process start.
    pub boot_id: u64,
    /// Where this node accepts links; empty when it only dials out.
    pub listen_addr: String,
    /// `CARGO_PKG_VERSION` of the running binary.
    pub software_version: String,
    /// This node's certificate from its mesh's authority (empty without a mesh).
    pub certificate: Vec<u8>,
    /// The public key of this node's mesh authority: peers' certificates are checked against
    /// it. `None` only without a mesh (a joiner, whose links are guest links).
    pub authority: Option<[u8; 32]>,
    /// Which lane of a link this connection is (`Hello.lane`): 0 the first, 1 a control lane,
    /// 2 a priority lane.
    pub lane: u32,
    /// Lanes this node runs per link (`Hello.lanes`): 1 collapsed, 2 with a control lane, 3
    /// with a priority lane too.
    pub lanes: u32,
}

/// What the shell knows about the peer before the handshake starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expectation {
    /// Node id the peer announced in the pre-TLS preamble; its Hello must agree.
    pub node_id_hint: Option<u64>,
    /// Public key this node has seen for that id before.
    pub pinned_key: Option<[u8; 32]>,
    /// This node's clock (Unix milliseconds), for certificate validity.
    pub now_ms: u64,
}

/// The authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node id, proven by its signature.
    pub node_id: u64,
    /// The peer's Ed25519 public key.
    pub public_key: [u8; 32],
    /// Changes each time the peer process starts.
    pub boot_id: u64,
    /// Where the peer listens; empty if it only dials out.
    pub listen_addr: String,
    /// The peer's software version.
    pub software_version: String,
    /// One side belongs to no mesh yet: the link carries only the join exchange.
    pub guest: bool,
    /// Which lane the peer says this connection is (`Hello.lane`).
    pub lane: u32,
    /// Lanes the peer runs per link (`Hello.lanes`).
    pub lanes: u32,
}

/// How a handshake ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides proved who they are; the link can carry traffic.
    Established(PeerInfo),
    /// One side refused the other; `by_peer` says which.
    Refused {
        /// Why.
        reason: RefuseReason,
        /// Human-readable detail, logged by both sides.
        detail: String,
        /// True when the peer sent the refusal, false when this node refused.
        by_peer: bool,
    },
}

#[derive(Debug)]
enum State {
    AwaitHello,
    AwaitAuth { peer: PeerInfo },
    Done,
}

/// One side of one link handshake.
pub struct Handshake {
    role: Role,
    signing_key: SigningKey,
    exporter: [u8; 32],
    expectation: Expectation,
    node_id: u64,
    mesh_id: String,
    authority: Option<[u8; 32]>,
    local_hello_bytes: Vec<u8>,
    peer_hello_bytes: Vec<u8>,
    state: State,
    transmit: VecDeque<Vec<u8>>,
    outcome: Option<Outcome>,
}

impl Handshake {
    /// Starts a handshake; the local Hello is queued for [`Self::poll_transmit`] at once.
    ///
    /// `exporter` is the TLS keying-material export of this connection (same on both ends);
    /// `nonce` must be fresh random bytes.
    pub fn new(
        role: Role,
        local: &LocalHello,
        signing_key: SigningKey,
        exporter: [u8; 32],
        nonce: [u8; 32],
        expectation: Expectation,
    ) -> Self {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            mesh_id: local.mesh_id.clone(),
            node_id: local.node_id,
            nonce: nonce.to_vec().into(),
            public_key: signing_key.verifying_key().to_bytes().to_vec().into(),
            boot_id: local.boot_id,
            listen_addr: local.listen_addr.clone(),
            software_version: local.software_version.clone(),
            certificate: local.certificate.clone().into(),
            lane: local.lane,
            lanes: local.lanes,
        };
        let local_hello_bytes = hello.encode_to_vec();
        let mut this = Self {
            role,
            signing_key,
            exporter,
            expectation,
            node_id: local.node_id,
            mesh_id: local.mesh_id.clone(),
            authority: local.authority,
            local_hello_bytes: local_hello_bytes.clone(),
            peer_hello_bytes: Vec::new(),
            state: State::AwaitHello,
            transmit: VecDeque::new(),
            outcome: None,
        };
        this.queue(FrameType::Hello, &local_hello_bytes);
        this
    }

    /// Next encoded frame to send to the peer, each one WebSocket message.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The result, once the handshake is over.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Whether the handshake is over (established or refused).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feeds one WebSocket binary message from the peer.
    pub fn handle_message(&mut self, message: &[u8]) {
        if self.is_done() {
            return;
        }
        if let Some(version) = frame::peek_version(message)
            && version != frame::FRAME_VERSION
        {
            let detail = format!(
                "peer frames are version {version}, this node speaks version {}",
                frame::FRAME_VERSION
            );
            return self.refuse(RefuseReason::RefuseVersion, detail);
        }
        let (frame, _) = match frame::decode(message, MAX_HANDSHAKE_PAYLOAD) {
            Ok(decoded) => decoded,
            Err(error) => {
                return self.refuse(RefuseReason::RefuseMalformed, format!("bad frame: {error}"));
            }
        };
        match (frame.header.frame_type, &self.state) {
            (FrameType::Refuse, _) => {
                let refuse = Refuse::decode(frame.payload).unwrap_or_default();
                let reason = RefuseReason::try_from(refuse.reason)
                    .unwrap_or(RefuseReason::RefuseUnspecified);
                self.finish(Outcome::Refused {
                    reason,
                    detail: refuse.detail,
                    by_peer: true,
                });
            }
            (FrameType::Hello, State::AwaitHello) => self.handle_hello(frame.payload),
            (FrameType::Auth, State::AwaitAuth { .. }) => self.handle_auth(frame.payload),
            (frame_type, state) => {
                let detail = format!("unexpected {frame_type:?} frame while in {state:?}");
                self.refuse(RefuseReason::RefuseMalformed, detail);
            }
        }
        self.check_invariants();
    }

    fn handle_hello(&mut self, payload: &[u8]) {
        let hello = match Hello::decode(payload) {
            Ok(hello) => hello,
            Err(error) => {
                return self.refuse(RefuseReason::RefuseMalformed, format!("bad hello: {error}"));
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            let detail = format!(
                "peer speaks link protocol {}, this node speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            );
            return self.refuse(RefuseReason::RefuseVersion, detail);
        }
        // A guest link joins a node without a mesh ("") to a member, only when the node
        // without a mesh dialed: it is how JoinMesh reaches the mesh, and nothing but the join
        // exchange crosses it.
        let guest = match (self.mesh_id.is_empty(), hello.mesh_id.is_empty(), self.role) {
            (true, true, _) => {
                let detail = "neither side belongs to a mesh".to_owned();
                return self.refuse(RefuseReason::RefuseMeshId, detail);
            }
            (true, false, Role::Dialer) | (false, true, Role::Acceptor) => true,
            (true, false, Role::Acceptor) => {
                let detail =
                    "this node belongs to no mesh yet: it joins by dialing (JoinMesh)".to_owned();
                return self.refuse(RefuseReason::RefuseMeshId, detail);
            }
            (false, true, Role::Dialer) => {
                let detail = "the peer belongs to no mesh yet: it must dial to join".to_owned();
                return self.refuse(RefuseReason::RefuseMeshId, detail);
            }
            (false, false, _) => false,
        };
        if hello.node_id == self.node_id || hello.node_id == 0 {
            let detail = format!(
                "peer claims node id {}, which is not a peer id",
                hello.node_id
            );
            return self.refuse(RefuseReason::RefuseSelf, detail);
        }
        if let Some(hint) = self.expectation.node_id_hint
            && hint != hello.node_id
        {
            let detail = format!(
                "peer announced node {hint} before TLS but node {} in its hello",
                hello.node_id
            );
            return self.refuse(RefuseReason::RefuseWrongShardHint, detail);
        }
        let Ok(public_key) = <[u8; 32]>::try_from(hello.public_key.as_ref()) else {
            return self.refuse(
                RefuseReason::RefuseMalformed,
                "public key is not 32 bytes".into(),
            );
        };
        // Before anything about the peer is kept, the mesh authority must vouch for this id
        // holding this key (the Auth that follows proves the peer holds it now): on a member
        // link always, on a guest link when this node is a joiner told the mesh's authority
        // (the member must be certified before the join key goes out). Checked against this
        // node's own mesh id first, so that a stranger guessing mesh ids, or ids this node
        // knows, gets the same refusal whatever it guessed: no oracle.
        let check = if !guest {
            let Some(authority) = self.authority else {
                let detail = "this node holds no credential of its mesh".to_owned();
                return self.refuse(RefuseReason::RefuseNoCredential, detail);
            };
            Some((authority, self.mesh_id.as_str(), ""))
        } else if self.mesh_id.is_empty() {
            self.authority.map(|authority| {
                let context = "the member is not vouched for by the expected mesh authority: ";
                (authority, hello.mesh_id.as_str(), context)
            })
        } else {
            None
        };
        if let Some((authority, mesh_id, context)) = check {
            let claim = credential::Claim {
                mesh_id,
                node_id: hello.node_id,
                public_key: &public_key,
                now_ms: self.expectation.now_ms,
            };
            if let Err(error) = credential::verify(&authority, &hello.certificate, claim) {
                let detail = format!("{context}{error}");
                return self.refuse(RefuseReason::RefuseNoCredential, detail);
            }
        }
        if !guest && hello.mesh_id != self.mesh_id {
            // Certified for this mesh, yet claims another: a confused member, not a stranger.
            let detail = format!(
                "peer claims mesh {:?}, which is not this node's",
                hello.mesh_id
            );
            return self.refuse(RefuseReason::RefuseMeshId, detail);
        }
        if let Some(pinned) = self.expectation.pinned_key
            && pinned != public_key
        {
            let detail = format!(
                "node {} presented a key other than the one on record",
                hello.node_id
            );
            return self.refuse(RefuseReason::RefuseKeyMismatch, detail);
        }
        if hello.nonce.len() != 32 {
            return self.refuse(
                RefuseReason::RefuseMalformed,
                "nonce is not 32 bytes".into(),
            );
        }
        self.peer_hello_bytes = payload.to_vec();
        let digest = self.transcript_digest();
        let signature = sign_transcript(&self.signing_key, self.role, &digest);
        let auth = Auth {
            signature: signature.to_vec().into(),
        };
        self.queue(FrameType::Auth, &auth.encode_to_vec());
        self.state = State::AwaitAuth {
            peer: PeerInfo {
                node_id: hello.node_id,
                public_key,
                boot_id: hello.boot_id,
                listen_addr: hello.listen_addr,
                software_version: hello.software_version,
                guest,
                lane: hello.lane,
                lanes: hello.lanes,
            },
        };
    }

    fn handle_auth(&mut self, payload: &[u8]) {
        let State::AwaitAuth { peer } = &self.state else {
            return;
        };
        let peer = peer.clone();
        let auth = match Auth::decode(payload) {
            Ok(auth) => auth,
            Err(error) => {
                return self.refuse(RefuseReason::RefuseMalformed, format!("bad auth: {error}"));
            }
        };
        let digest = self.transcript_digest();
        if !verify_transcript(&peer.public_key, self.role.peer(), &digest, &auth.signature) {
            let detail = format!("node {} failed to prove it holds its key", peer.node_id);
            return self.refuse(RefuseReason::RefuseBadSignature, detail);
        }
        self.finish(Outcome::Established(peer));
    }

    fn transcript_digest(&self) -> [u8; 32] {
        let (dialer, acceptor) = match self.role {
            Role::Dialer => (&self.local_hello_bytes, &self.peer_hello_bytes),
            Role::Acceptor => (&self.peer_hello_bytes, &self.local_hello_bytes),
        };
        transcript_digest(&self.exporter, dialer, acceptor)
    }

    fn refuse(&mut self, reason: RefuseReason, mut detail: String) {
        // Details quote what the peer sent (its mesh id, escaped); uncapped, a long one made
        // the refusal too big to send, and the peer never learned why.
        if detail.len() > MAX_REFUSE_DETAIL {
            let cut = (0..=MAX_REFUSE_DETAIL)
                .rev()
                .find(|&i| detail.is_char_boundary(i))
                .unwrap_or(0);
            detail.truncate(cut);
            detail.push('…');
        }
        let refuse = Refuse {
            reason: reason as i32,
            detail: detail.clone(),
        };
        self.queue(FrameType::Refuse, &refuse.encode_to_vec());
        self.finish(Outcome::Refused {
            reason,
            detail,
            by_peer: false,
        });
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Done;
        self.outcome = Some(outcome);
    }

    fn queue(&mut self, frame_type: FrameType, payload: &[u8]) {
        let header = Header::new(frame_type, TrafficClass::Control, self.node_id, 0);
        let mut out = Vec::with_capacity(frame::HEADER_LEN + payload.len());
        // Handshake payloads are built here and are far below the limit.
        if frame::encode_into(&mut out, &header, payload, MAX_HANDSHAKE_PAYLOAD).is_ok() {
            self.transmit.push_back(out);
        }
    }

    fn check_invariants(&self) {
        debug_assert_eq!(self.outcome.is_some(), self.is_done());
        debug_assert!(!self.local_hello_bytes.is_empty());
    }
}

/// The digest both sides sign: context, TLS exporter, then both Hellos, dialer's first.
pub fn transcript_digest(
    exporter: &[u8; 32],
    dialer_hello: &[u8],
    acceptor_hello: &[u8],
) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(TRANSCRIPT_CONTEXT);
    hasher.update(exporter);
    hasher.update(&(dialer_hello.len() as u64).to_le_bytes());
    hasher.update(dialer_hello);
    hasher.update(&(acceptor_hello.len() as u64).to_le_bytes());
    hasher.update(acceptor_hello);
    *hasher.finalize().as_bytes()
}

/// Signs the transcript as `role`.
pub fn sign_transcript(key: &SigningKey, role: Role, digest: &[u8; 32]) -> [u8; 64] {
    let mut message = Vec::with_capacity(8 + 32);
    message.extend_from_slice(role.tag());
    message.extend_from_slice(digest);
    key.sign(&message).to_bytes()
}

fn verify_transcript(
    public_key: &[u8; 32],
    role: Role,
    digest: &[u8; 32],
    signature: &[u8],
) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(signature) else {
        return false;
    };
    let mut message = Vec::with_capacity(8 + 32);
    message.extend_from_slice(role.tag());
    message.extend_from_slice(digest);
    key.verify_strict(&message, &signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    const NOW: u64 = 1_800_000_000_000;

    fn authority() -> credential::MeshAuthority {
        credential::MeshAuthority::from_secret(&[9; 32])
    }

    /// Node `node_id` of `mesh`, certified by the test mesh authority (none for mesh "").
    fn local(node_id: u64, mesh: &str) -> LocalHello {
        let (certificate, authority) = if mesh.is_empty() {
            (Vec::new(), None)
        } else {
            let public = key(node_id as u8).verifying_key().to_bytes();
            let authority = authority();
            (
                authority.issue(mesh, node_id, public, NOW),
                Some(authority.public_key()),
            )
        };
        LocalHello {
            mesh_id: mesh.into(),
            node_id,
            boot_id: node_id * 100,
            listen_addr: String::new(),
            software_version: "test".into(),
            certificate,
            authority,
            lane: 0,
            lanes: 2,
        }
    }

    fn expect_nothing() -> Expectation {
        Expectation {
            now_ms: NOW,
            ..Expectation::default()
        }
    }

    /// A handshake of node `id` of mesh `mesh`, expecting nothing of its peer.
    fn machine(role: Role, id: u64, mesh: &str) -> Handshake {
        let nonce = [id as u8 * 11; 32];
        Handshake::new(
            role,
            &local(id, mesh),
            key(id as u8),
            [7; 32],
            nonce,
            expect_nothing(),
        )
    }

    /// Runs two machines against each other until neither has anything to send.
    fn exchange(a: &mut Handshake, b: &mut Handshake) {
        for _ in 0..8 {
            let mut moved = false;
            while let Some(message) = a.poll_transmit() {
                b.handle_message(&message);
                moved = true;
            }
            while let Some(message) = b.poll_transmit() {
                a.handle_message(&message);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn pair(exporter_a: [u8; 32], exporter_b: [u8; 32], mesh_b: &str) -> (Handshake, Handshake) {
        let a = Handshake::new(
            Role::Dialer,
            &local(1, "m"),
            key(1),
            exporter_a,
            [11; 32],
            Expectation {
                now_ms: NOW,
                node_id_hint: Some(2),
                pinned_key: None,
            },
        );
        let b = Handshake::new(
            Role::Acceptor,
            &local(2, mesh_b),
            key(2),
            exporter_b,
            [22; 32],
            expect_nothing(),
        );
        (a, b)
    }

    #[test]
    fn two_honest_nodes_of_one_mesh_establish_a_link() {
        let (mut a, mut b) = pair([7; 32], [7; 32], "m");
        exchange(&mut a, &mut b);
        match (a.outcome(), b.outcome()) {
            (Some(Outcome::Established(pa)), Some(Outcome::Established(pb))) => {
                assert_eq!(pa.node_id, 2);
                assert_eq!(pb.node_id, 1);
                assert_eq!(pb.public_key, key(1).verifying_key().to_bytes());
                assert_eq!(pa.boot_id, 200);
            }
            other => panic!("expected both established, got {other:?}"),
        }
    }

    #[test]
    fn a_member_accepts_a_guest_that_dials_it_but_never_dials_a_guest() {
        // The acceptor (2) has no mesh: a member dialing it is refused.
        let (mut a, mut b) = pair([7; 32], [7; 32], "");
        exchange(&mut a, &mut b);
        assert!(matches!(
            a.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseMeshId,
                ..
            })
        ));
        // A node without a mesh dials a member: a guest link on both sides.
        let mut joiner = machine(Role::Dialer, 1, "");
        let mut member = machine(Role::Acceptor, 2, "m");
        exchange(&mut joiner, &mut member);
        match (joiner.outcome(), member.outcome()) {
            (Some(Outcome::Established(pj)), Some(Outcome::Established(pm))) => {
                assert!(pj.guest && pm.guest);
                assert_eq!((pj.node_id, pm.node_id), (2, 1));
            }
            other => panic!("expected a guest link, got {other:?}"),
        }
        // Two nodes without a mesh never link.
        let mut x = machine(Role::Dialer, 1, "");
        let mut y = machine(Role::Acceptor, 2, "");
        exchange(&mut x, &mut y);
        assert!(matches!(x.outcome(), Some(Outcome::Refused { .. })));
    }

    /// Runs `intruder` (dialing) against an honest member of mesh "m"; returns the member's
    /// outcome.
    fn against_member(intruder: LocalHello, intruder_key: SigningKey) -> Outcome {
        let mut intruder = Handshake::new(
            Role::Dialer,
            &intruder,
            intruder_key,
            [7; 32],
            [3; 32],
            expect_nothing(),
        );
        let mut member = machine(Role::Acceptor, 2, "m");
        exchange(&mut intruder, &mut member);
        member.outcome().cloned().expect("the member decided")
    }

    #[test]
    fn the_right_mesh_id_without_the_mesh_credential_is_refused() {
        let refused_for_credential = |outcome: Outcome| match outcome {
            Outcome::Refused {
                reason: RefuseReason::RefuseNoCredential,
                detail,
                by_peer: false,
            } => assert!(!detail.contains("m\""), "{detail}"),
            other => panic!("expected a credential refusal, got {other:?}"),
        };
        // No certificate at all.
        let mut bare = local(5, "m");
        bare.certificate.clear();
        refused_for_credential(against_member(bare, key(5)));
        // A certificate from another authority (a mesh of the same name elsewhere).
        let mut foreign = local(5, "m");
        let public = key(5).verifying_key().to_bytes();
        foreign.certificate =
            credential::MeshAuthority::from_secret(&[1; 32]).issue("m", 5, public, NOW);
        refused_for_credential(against_member(foreign, key(5)));
        // Another node's genuine certificate, claimed with the intruder's own key.
        let mut squatter = local(5, "m");
        squatter.certificate = local(3, "m").certificate;
        squatter.node_id = 3;
        refused_for_credential(against_member(squatter, key(5)));
        // Genuine id and certificate, but without the key it certifies: the Auth fails.
        let mut thief = local(3, "m");
        thief.node_id = 3;
        match against_member(thief, key(5)) {
            Outcome::Refused { reason, .. } => assert!(
                matches!(
                    reason,
                    RefuseReason::RefuseNoCredential | RefuseReason::RefuseBadSignature
                ),
                "{reason:?}"
            ),
            other @ Outcome::Established(_) => {
                panic!("a stolen certificate must not link: {other:?}")
            }
        }
    }

    #[test]
    fn a_joiner_pinned_to_an_authority_links_only_to_a_member_it_certified() {
        let joiner_pinned_to = |authority: [u8; 32]| {
            let mut joiner = local(1, "");
            joiner.authority = Some(authority);
            let mut joiner = Handshake::new(
                Role::Dialer,
                &joiner,
                key(1),
                [7; 32],
                [3; 32],
                expect_nothing(),
            );
            let mut member = machine(Role::Acceptor, 2, "m");
            exchange(&mut joiner, &mut member);
            joiner.outcome().cloned().expect("the joiner decided")
        };
        match joiner_pinned_to(authority().public_key()) {
            Outcome::Established(peer) => assert!(peer.guest && peer.node_id == 2),
            other @ Outcome::Refused { .. } => panic!("the right authority must link: {other:?}"),
        }
        let elsewhere = credential::MeshAuthority::from_secret(&[1; 32]).public_key();
        match joiner_pinned_to(elsewhere) {
            Outcome::Refused {
                reason: RefuseReason::RefuseNoCredential,
                by_peer: false,
                ..
            } => {}
            other => panic!("an impostor member must be refused: {other:?}"),
        }
    }

    #[test]
    fn a_stranger_learns_nothing_from_a_refusal_whatever_mesh_it_guesses() {
        let stranger = |mesh: &str| LocalHello {
            certificate: Vec::new(),
            authority: None,
            ..local(5, mesh)
        };
        let refusal = |outcome: Outcome| match outcome {
            Outcome::Refused {
                reason: RefuseReason::RefuseNoCredential,
                detail,
                ..
            } => {
                assert!(!detail.contains("\"m\""), "{detail}");
                detail
            }
            other => panic!("expected a credential refusal, got {other:?}"),
        };
        let wrong_guess = refusal(against_member(stranger("guess"), key(5)));
        let right_guess = refusal(against_member(stranger("m"), key(5)));
        assert_eq!(
            wrong_guess, right_guess,
            "the refusal tells the guesses apart"
        );
    }

    #[test]
    fn a_node_of_another_mesh_is_refused_and_both_sides_know_why() {
        // Certified by the same authority for another mesh id: its certificate does not
        // vouch for it here.
        let (mut a, mut b) = pair([7; 32], [7; 32], "other");
        exchange(&mut a, &mut b);
        let Some(Outcome::Refused { reason, .. }) = a.outcome() else {
            panic!("dialer should be refused, got {:?}", a.outcome());
        };
        assert_eq!(*reason, RefuseReason::RefuseNoCredential);
        // Both refuse each other; each also records that it refused.
        assert!(matches!(
            b.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseNoCredential,
                ..
            })
        ));
    }

    #[test]
    fn a_relayed_handshake_fails_because_tls_exporters_differ() {
        // A man in the middle terminating TLS on both sides sees two different exporters.
        let (mut a, mut b) = pair([7; 32], [8; 32], "m");
        exchange(&mut a, &mut b);
        assert!(matches!(
            a.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseBadSignature,
                ..
            })
        ));
        assert!(matches!(
            b.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseBadSignature,
                ..
            })
        ));
    }

    #[test]
    fn a_peer_whose_hello_disagrees_with_its_preamble_is_refused() {
        let mut a = Handshake::new(
            Role::Dialer,
            &local(1, "m"),
            key(1),
            [0; 32],
            [1; 32],
            Expectation {
                now_ms: NOW,
                node_id_hint: Some(99),
                pinned_key: None,
            },
        );
        let mut b = Handshake::new(
            Role::Acceptor,
            &local(2, "m"),
            key(2),
            [0; 32],
            [2; 32],
            expect_nothing(),
        );
        exchange(&mut a, &mut b);
        assert!(matches!(
            a.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseWrongShardHint,
                by_peer: false,
                ..
            })
        ));
    }

    #[test]
    fn a_changed_key_for_a_known_node_is_refused() {
        let mut a = Handshake::new(
            Role::Dialer,
            &local(1, "m"),
            key(1),
            [0; 32],
            [1; 32],
            Expectation {
                now_ms: NOW,
                node_id_hint: Some(2),
                pinned_key: Some(key(9).verifying_key().to_bytes()),
            },
        );
        let mut b = Handshake::new(
            Role::Acceptor,
            &local(2, "m"),
            key(2),
            [0; 32],
            [2; 32],
            expect_nothing(),
        );
        exchange(&mut a, &mut b);
        assert!(matches!(
            a.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseKeyMismatch,
                ..
            })
        ));
    }

    #[test]
    fn frames_of_another_version_are_refused_with_a_version_reason() {
        let (mut a, _) = pair([0; 32], [0; 32], "m");
        let mut message = vec![0u8; frame::HEADER_LEN];
        message[0] = 9;
        a.handle_message(&message);
        assert!(matches!(
            a.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseVersion,
                ..
            })
        ));
    }

    #[test]
    fn garbage_instead_of_a_hello_is_refused_as_malformed() {
        let (mut a, _) = pair([0; 32], [0; 32], "m");
        a.handle_message(&[frame::FRAME_VERSION, 0xff, 0xff]);
        assert!(matches!(
            a.outcome(),
            Some(Outcome::Refused {
                reason: RefuseReason::RefuseMalformed,
                ..
            })
        ));
    }
}
