//! Tenant end-to-end encryption, sans-IO: a `Send` with `end_to_end_encrypt` is sealed by the
//! source node's api and opened only by the destination node's api; relays carry ciphertext.
//!
//! A tenant's key for one day (`EPOCH_MS`) derives from the mesh secret, the tenant's name and
//! the day (blake3's key derivation). A node serves only the tenants in its config
//! (`tenants = [...]`): it neither seals nor opens for any other, and says so. Keys rotate
//! every day; the day before is still accepted (the overlap), so a message sealed just before
//! midnight opens just after. XChaCha20-Poly1305 with a random 24-byte nonce per message; the
//! associated data binds the source node, the tenant, the day and the message id, so a
//! ciphertext cannot be replayed under another source, tenant or id.
//!
//! Trust: every holder of the mesh secret could derive every tenant's key (see README, "Who is
//! trusted with what"); what this gives is that payloads cross relays, link buffers and
//! queues only as ciphertext, and that a node not configured for a tenant refuses it.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};

/// Key period: a tenant key is one day's.
pub const EPOCH_MS: u64 = 24 * 3600 * 1000;

/// The `Send` header that names the tenant.
pub const TENANT_HEADER: &str = "tenant";

/// Longest tenant name.
pub const MAX_TENANT_LEN: usize = 128;

const KEY_CONTEXT: &str = "meshd tenant key v1";

/// Why a payload was not sealed or opened. Messages go back to callers; none holds a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    /// This node holds no mesh secret (it belongs to no mesh).
    #[error("this node belongs to no mesh, so it holds no tenant keys")]
    NoMesh,
    /// The tenant is not in this node's `tenants`.
    #[error("this node holds no key of tenant {0:?} (config `tenants`)")]
    NotServed(String),
    /// Sealed with a key older than the overlap allows (or from the future).
    #[error("sealed with a key of day {0}, which this node no longer (or not yet) accepts")]
    Epoch(u64),
    /// The ciphertext, nonce or associated data do not check out.
    #[error("the payload does not open with the tenant's key (tampered, or another mesh)")]
    Forged,
}

/// What a sealed payload carries besides its ciphertext (owned when sealed, borrowed from the
/// received frame when opened, so opening copies nothing but the plaintext).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed<C = Vec<u8>> {
    /// The day whose key sealed it.
    pub epoch: u64,
    /// The nonce.
    pub nonce: [u8; 24],
    /// Ciphertext and tag.
    pub ciphertext: C,
}

/// The tenant keys of one node.
#[derive(Clone, Default)]
pub struct TenantKeys {
    secret: Option<[u8; 32]>,
    tenants: HashSet<String>,
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tenants served, never the secret.
        f.debug_struct("TenantKeys")
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

impl TenantKeys {
    /// The keys derived from `secret` for `tenants`.
    pub fn new(secret: Option<[u8; 32]>, tenants: impl IntoIterator<Item = String>) -> Self {
        Self {
            secret,
            tenants: tenants.into_iter().collect(),
        }
    }

    /// The mesh changed (seeded, joined, left): keys derive from its secret from now on.
    pub fn set_secret(&mut self, secret: Option<[u8; 32]>) {
        self.secret = secret;
    }

    /// Whether this node can seal and open for `tenant`.
    pub fn serves(&self, tenant: &str) -> Result<(), TenantError> {
        if self.secret.is_none() {
            return Err(TenantError::NoMesh);
        }
        if !self.tenants.contains(tenant) {
            return Err(TenantError::NotServed(tenant.to_owned()));
        }
        Ok(())
    }

    fn cipher(&self, tenant: &str, epoch: u64) -> Result<XChaCha20Poly1305, TenantError> {
        let secret = self.secret.ok_or(TenantError::NoMesh)?;
        if !self.tenants.contains(tenant) {
            return Err(TenantError::NotServed(tenant.to_owned()));
        }
        let mut hasher = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        hasher.update(&secret);
        hasher.update(&(tenant.len() as u64).to_le_bytes());
        hasher.update(tenant.as_bytes());
        hasher.update(&epoch.to_le_bytes());
        Ok(XChaCha20Poly1305::new(hasher.finalize().as_bytes().into()))
    }

    /// Seals `plaintext` for `tenant` as node `src`'s message `msg_id`, with today's key.
    pub fn seal(
        &self,
        tenant: &str,
        src: u64,
        msg_id: u64,
        now_ms: u64,
        nonce: [u8; 24],
        plaintext: &[u8],
    ) -> Result<Sealed, TenantError> {
        let epoch = now_ms / EPOCH_MS;
        let cipher = self.cipher(tenant, epoch)?;
        let aad = associated_data(src, tenant, epoch, msg_id);
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| TenantError::Forged)?;
        Ok(Sealed {
            epoch,
            nonce,
            ciphertext,
        })
    }

    /// Opens what node `src` sealed for `tenant` as its message `msg_id`.
    pub fn open(
        &self,
        tenant: &str,
        src: u64,
        msg_id: u64,
        now_ms: u64,
        sealed: &Sealed<impl AsRef<[u8]>>,
    ) -> Result<Vec<u8>, TenantError> {
        let today = now_ms / EPOCH_MS;
        // Today's key, and yesterday's during the overlap; tomorrow's for a sender whose
        // clock is ahead across midnight.
        // The day is the peer's word: compared without arithmetic that could overflow.
        if sealed.epoch.abs_diff(today) > 1 {
            return Err(TenantError::Epoch(sealed.epoch));
        }
        let cipher = self.cipher(tenant, sealed.epoch)?;
        let aad = associated_data(src, tenant, sealed.epoch, msg_id);
        cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: sealed.ciphertext.as_ref(),
                    aad: &aad,
                },
            )
            .map_err(|_| TenantError::Forged)
    }
}

fn associated_data(src: u64, tenant: &str, epoch: u64, msg_id: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + tenant.len());
    aad.extend_from_slice(b"meshd e2e v1");
    aad.extend_from_slice(&src.to_le_bytes());
    aad.extend_from_slice(&epoch.to_le_bytes());
    aad.extend_from_slice(&msg_id.to_le_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn keys(tenants: &[&str]) -> TenantKeys {
        TenantKeys::new(Some([7; 32]), tenants.iter().map(|t| (*t).to_owned()))
    }

    #[test]
    fn a_sealed_payload_opens_only_for_its_tenant_source_and_id() {
        let sender = keys(&["acme"]);
        let sealed = sender.seal("acme", 1, 42, NOW, [9; 24], b"hello").unwrap();
        assert_ne!(sealed.ciphertext.as_slice(), b"hello");
        let receiver = keys(&["acme", "globex"]);
        assert_eq!(
            receiver.open("acme", 1, 42, NOW, &sealed).unwrap(),
            b"hello"
        );
        assert_eq!(
            receiver.open("acme", 2, 42, NOW, &sealed),
            Err(TenantError::Forged)
        );
        assert_eq!(
            receiver.open("acme", 1, 43, NOW, &sealed),
            Err(TenantError::Forged)
        );
        assert_eq!(
            receiver.open("globex", 1, 42, NOW, &sealed),
            Err(TenantError::Forged)
        );
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(
            receiver.open("acme", 1, 42, NOW, &tampered),
            Err(TenantError::Forged)
        );
        let other_mesh = TenantKeys::new(Some([8; 32]), ["acme".to_owned()]);
        assert_eq!(
            other_mesh.open("acme", 1, 42, NOW, &sealed),
            Err(TenantError::Forged)
        );
    }

    #[test]
    fn a_node_without_the_tenant_or_a_mesh_says_so() {
        let error = keys(&["acme"]).seal("globex", 1, 1, NOW, [0; 24], b"x");
        assert_eq!(error, Err(TenantError::NotServed("globex".into())));
        let meshless = TenantKeys::new(None, ["acme".to_owned()]);
        assert_eq!(
            meshless.seal("acme", 1, 1, NOW, [0; 24], b"x"),
            Err(TenantError::NoMesh)
        );
    }

    #[test]
    fn keys_rotate_daily_and_yesterdays_still_opens() {
        let keys = keys(&["acme"]);
        let sealed = keys.seal("acme", 1, 1, NOW, [1; 24], b"x").unwrap();
        let tomorrow = keys
            .seal("acme", 1, 1, NOW + EPOCH_MS, [1; 24], b"x")
            .unwrap();
        assert_ne!(
            sealed.ciphertext, tomorrow.ciphertext,
            "another day, another key"
        );
        assert_eq!(
            keys.open("acme", 1, 1, NOW + EPOCH_MS, &sealed).unwrap(),
            b"x"
        );
        assert_eq!(
            keys.open("acme", 1, 1, NOW + 2 * EPOCH_MS, &sealed),
            Err(TenantError::Epoch(sealed.epoch))
        );
        // The day comes from the wire: any value is refused, never overflowed on.
        let hostile = Sealed {
            epoch: u64::MAX,
            ..sealed
        };
        assert_eq!(
            keys.open("acme", 1, 1, NOW, &hostile),
            Err(TenantError::Epoch(u64::MAX))
        );
    }
}
