//! Mesh credentials, sans-IO: who may be a member, proven inside the link handshake.
//!
//! A mesh has an **authority**: an Ed25519 key derived from the mesh secret (32 random bytes,
//! from the config for a configured mesh, made by SeedMesh for a seeded one and handed to a
//! joiner once its join key checked out). The authority signs **node certificates**: "node
//! `node_id` holds `public_key` in mesh `mesh_id`, from `not_before` to `not_after`". Every
//! member link's Hello carries one, and the peer checks it against the authority's public key
//! before anything is registered, pinned or stored (`handshake`): without the mesh secret no
//! process can claim any id, whatever mesh id it says.
//!
//! Each holder of the secret issues its own certificate at start and again well before expiry
//! ([`CERTIFICATE_LIFETIME`]); links are checked when they are set up. A certificate is not an
//! X.509 one: the check happens inside the signed handshake (over the TLS exporter), which is
//! where node ids and keys already were, so one compact signature is all it needs.
#![forbid(unsafe_code)]

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use meshd_proto::link::{CertificateBody, NodeCertificate};
use prost::Message;

/// How long an issued certificate is valid.
pub const CERTIFICATE_LIFETIME_MS: u64 = 24 * 3600 * 1000;

/// Clock difference between two nodes a certificate check tolerates.
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// Largest encoded certificate accepted (one is ~190 bytes).
pub const MAX_CERTIFICATE_BYTES: usize = 1024;

const AUTHORITY_CONTEXT: &str = "meshd mesh authority v1";
const SIGNATURE_CONTEXT: &[u8] = b"meshd node certificate v1";

/// Bytes of a mesh secret.
pub const SECRET_LEN: usize = 32;

/// A mesh's authority: holds the signing key derived from the mesh secret.
#[derive(Clone)]
pub struct MeshAuthority {
    key: SigningKey,
}

impl std::fmt::Debug for MeshAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "MeshAuthority({})", hex_prefix(&self.public_key()))
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

impl MeshAuthority {
    /// The authority of the mesh whose secret this is.
    pub fn from_secret(secret: &[u8; SECRET_LEN]) -> Self {
        Self {
            key: SigningKey::from_bytes(&blake3::derive_key(AUTHORITY_CONTEXT, secret)),
        }
    }

    /// What members check certificates against.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// An encoded [`NodeCertificate`] for `node_id` holding `public_key` in `mesh_id`, valid
    /// from `now_ms` (less the tolerated skew) for [`CERTIFICATE_LIFETIME_MS`].
    pub fn issue(&self, mesh_id: &str, node_id: u64, public_key: [u8; 32], now_ms: u64) -> Vec<u8> {
        let body = CertificateBody {
            mesh_id: mesh_id.to_owned(),
            node_id,
            public_key: public_key.to_vec().into(),
            not_before_ms: now_ms.saturating_sub(CLOCK_SKEW_MS),
            not_after_ms: now_ms.saturating_add(CERTIFICATE_LIFETIME_MS),
        }
        .encode_to_vec();
        let signature = self.key.sign(&signed_bytes(&body));
        NodeCertificate {
            body: body.into(),
            signature: signature.to_bytes().to_vec().into(),
        }
        .encode_to_vec()
    }
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(SIGNATURE_CONTEXT.len() + body.len());
    signed.extend_from_slice(SIGNATURE_CONTEXT);
    signed.extend_from_slice(body);
    signed
}

/// Why a certificate was not accepted. The messages name nothing secret and nothing of this
/// node's: they go back to the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// No certificate at all.
    #[error("no certificate of this mesh's authority")]
    Missing,
    /// Not decodable, or too large.
    #[error("certificate malformed")]
    Malformed,
    /// Not signed by this mesh's authority.
    #[error("certificate not signed by this mesh's authority")]
    WrongAuthority,
    /// Signed, but for another mesh, id or key than the Hello claims.
    #[error("certificate is for another mesh, node id or key than claimed")]
    Mismatch,
    /// Outside its validity (with the tolerated skew).
    #[error("certificate expired or not yet valid")]
    Expired,
}

/// What a certificate must say to be accepted.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// The mesh of the checking node.
    pub mesh_id: &'a str,
    /// The id the peer claims.
    pub node_id: u64,
    /// The key the peer proves it holds.
    pub public_key: &'a [u8; 32],
    /// The checking node's clock.
    pub now_ms: u64,
}

/// Checks an encoded certificate against the mesh authority's public key and the claim.
pub fn verify(
    authority: &[u8; 32],
    certificate: &[u8],
    claim: Claim<'_>,
) -> Result<(), CredentialError> {
    let certified = certified_key(
        authority,
        certificate,
        claim.mesh_id,
        claim.node_id,
        claim.now_ms,
    )?;
    if certified.public_key != *claim.public_key {
        return Err(CredentialError::Mismatch);
    }
    Ok(())
}

/// What a valid certificate says about its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Certified {
    /// The node's Ed25519 public key.
    pub public_key: [u8; 32],
    /// The end of the certificate's validity.
    pub not_after_ms: u64,
}

/// The key an encoded certificate of the mesh authority vouches for, for node `node_id` of
/// mesh `mesh_id` at `now_ms` (how LSAs and notices, signed by their origin, are checked by
/// nodes that never linked with it).
pub fn certified_key(
    authority: &[u8; 32],
    certificate: &[u8],
    mesh_id: &str,
    node_id: u64,
    now_ms: u64,
) -> Result<Certified, CredentialError> {
    if certificate.is_empty() {
        return Err(CredentialError::Missing);
    }
    if certificate.len() > MAX_CERTIFICATE_BYTES {
        return Err(CredentialError::Malformed);
    }
    let cert = NodeCertificate::decode(certificate).map_err(|_| CredentialError::Malformed)?;
    let signature =
        <[u8; 64]>::try_from(cert.signature.as_ref()).map_err(|_| CredentialError::Malformed)?;
    let authority =
        VerifyingKey::from_bytes(authority).map_err(|_| CredentialError::WrongAuthority)?;
    authority
        .verify(
            &signed_bytes(&cert.body),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| CredentialError::WrongAuthority)?;
    let body =
        CertificateBody::decode(cert.body.as_ref()).map_err(|_| CredentialError::Malformed)?;
    let public_key =
        <[u8; 32]>::try_from(body.public_key.as_ref()).map_err(|_| CredentialError::Malformed)?;
    if body.mesh_id != mesh_id || body.node_id != node_id {
        return Err(CredentialError::Mismatch);
    }
    let early = now_ms.saturating_add(CLOCK_SKEW_MS) < body.not_before_ms;
    let late = now_ms > body.not_after_ms.saturating_add(CLOCK_SKEW_MS);
    if early || late {
        return Err(CredentialError::Expired);
    }
    Ok(Certified {
        public_key,
        not_after_ms: body.not_after_ms,
    })
}

/// Parses a mesh secret written as 64 hex digits.
pub fn parse_secret(text: &str) -> Option<[u8; SECRET_LEN]> {
    let text = text.trim();
    if text.len() != SECRET_LEN * 2 {
        return None;
    }
    let mut secret = [0u8; SECRET_LEN];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(secret)
}

/// A mesh secret as 64 hex digits.
pub fn format_secret(secret: &[u8; SECRET_LEN]) -> String {
    secret.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn claim<'a>(key: &'a [u8; 32], node_id: u64) -> Claim<'a> {
        Claim {
            mesh_id: "m",
            node_id,
            public_key: key,
            now_ms: NOW,
        }
    }

    #[test]
    fn a_certificate_binds_mesh_id_and_key_and_nothing_else_passes() {
        let authority = MeshAuthority::from_secret(&[7; 32]);
        let key = [1u8; 32];
        let cert = authority.issue("m", 5, key, NOW);
        let public = authority.public_key();
        assert_eq!(verify(&public, &cert, claim(&key, 5)), Ok(()));
        assert_eq!(
            verify(&public, &cert, claim(&key, 6)),
            Err(CredentialError::Mismatch)
        );
        assert_eq!(
            verify(&public, &cert, claim(&[2; 32], 5)),
            Err(CredentialError::Mismatch)
        );
        let other_mesh = Claim {
            mesh_id: "n",
            ..claim(&key, 5)
        };
        assert_eq!(
            verify(&public, &cert, other_mesh),
            Err(CredentialError::Mismatch)
        );
        let other = MeshAuthority::from_secret(&[8; 32]).public_key();
        assert_eq!(
            verify(&other, &cert, claim(&key, 5)),
            Err(CredentialError::WrongAuthority)
        );
        assert_eq!(
            verify(&public, &[], claim(&key, 5)),
            Err(CredentialError::Missing)
        );
        assert_eq!(
            verify(&public, &[1, 2, 3], claim(&key, 5)),
            Err(CredentialError::Malformed)
        );
        let late = Claim {
            now_ms: NOW + CERTIFICATE_LIFETIME_MS + 2 * CLOCK_SKEW_MS,
            ..claim(&key, 5)
        };
        assert_eq!(verify(&public, &cert, late), Err(CredentialError::Expired));
        let early = Claim {
            now_ms: NOW - 3 * CLOCK_SKEW_MS,
            ..claim(&key, 5)
        };
        assert_eq!(verify(&public, &cert, early), Err(CredentialError::Expired));
    }

    #[test]
    fn a_tampered_body_fails_the_signature() {
        let authority = MeshAuthority::from_secret(&[7; 32]);
        let key = [1u8; 32];
        let mut cert =
            NodeCertificate::decode(authority.issue("m", 5, key, NOW).as_slice()).unwrap();
        let mut body = CertificateBody::decode(cert.body.as_ref()).unwrap();
        body.node_id = 6;
        cert.body = body.encode_to_vec().into();
        let forged = cert.encode_to_vec();
        assert_eq!(
            verify(&authority.public_key(), &forged, claim(&key, 6)),
            Err(CredentialError::WrongAuthority)
        );
    }

    #[test]
    fn secrets_round_trip_as_hex_and_bad_text_is_refused() {
        let secret = [0xabu8; 32];
        assert_eq!(parse_secret(&format_secret(&secret)), Some(secret));
        assert_eq!(parse_secret("abc"), None);
        assert_eq!(parse_secret(&"zz".repeat(32)), None);
        assert_eq!(parse_secret(&"é".repeat(32)), None);
    }
}
