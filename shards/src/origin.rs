//! Who sent a routed frame, proven end to end (sans-IO).
//!
//! A routed frame (`Data`, `DeliveryReport`, `AppAck`, `Gossip`) crosses relays, and every
//! relay is a member that could rewrite its `src`. So each one ends with a 16-byte **tag**: a
//! keyed BLAKE3 MAC over the payload and the header fields that do not change on the way
//! (type, class, src, dst, stream, seq, tenant), under the **pair key** of its source and
//! destination. The pair key is an X25519 Diffie-Hellman of the two nodes' certified Ed25519 identity keys
//! (converted to Montgomery form), hashed with both ids: only the two ends can compute it, not
//! a relay, not another member, and it needs no exchange beyond the certificates that links
//! and LSAs already carry. The destination checks the tag before the frame reaches the api or
//! the control thread; a frame from a source whose certified key this node does not hold is
//! dropped too (`unknown_source`).
//!
//! Cost: one MAC per frame at each end, none at relays. A replayed copy is caught where
//! replays matter already (the destination's per-source dedupe window for data, foca's
//! incarnations for gossip; a replayed delivery report repeats a verdict the source had).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::frame::Header;

/// Bytes of the tag at the end of a routed frame's payload.
pub const TAG_LEN: usize = 16;

const PAIR_CONTEXT: &str = "meshd pair key v1";

/// The pair key shared by `local` (holding `local_key`) and `peer` (certified to hold
/// `peer_public`). Both ends compute the same key. `None` for a public key that is not a
/// curve point or is of small order (an all-zero shared secret).
pub fn pair_key(
    local_key: &SigningKey,
    local: u64,
    peer: u64,
    peer_public: &[u8; 32],
) -> Option<[u8; 32]> {
    let peer_key = VerifyingKey::from_bytes(peer_public).ok()?;
    let shared = peer_key
        .to_montgomery()
        .mul_clamped(local_key.to_scalar_bytes())
        .to_bytes();
    if shared == [0u8; 32] {
        return None;
    }
    let (low, high) = (local.min(peer), local.max(peer));
    let mut material = [0u8; 48];
    material[..32].copy_from_slice(&shared);
    material[32..40].copy_from_slice(&low.to_le_bytes());
    material[40..].copy_from_slice(&high.to_le_bytes());
    Some(blake3::derive_key(PAIR_CONTEXT, &material))
}

/// The tag of a frame with `header` (its ttl and flags aside) and payload `body`.
pub fn tag(key: &[u8; 32], header: &Header, body: &[u8]) -> [u8; TAG_LEN] {
    let mut fields = [0u8; 50];
    fields[0] = header.frame_type as u8;
    fields[1] = header.traffic_class as u8;
    fields[2..10].copy_from_slice(&header.src.to_le_bytes());
    fields[10..18].copy_from_slice(&header.dst.to_le_bytes());
    fields[18..34].copy_from_slice(&header.stream_id.to_le_bytes());
    fields[34..42].copy_from_slice(&header.seq.to_le_bytes());
    fields[42..50].copy_from_slice(&header.tenant_id.to_le_bytes());
    // The body first: BLAKE3 hashes whole 1 KiB chunks 16 at a time (AVX-512), but finishes
    // a chunk an earlier update began block by block. With the 50 bytes of fields in front,
    // the body's first chunk went that slow way: half the tag's cost for a 16 KiB batch
    // (perf, 256 B messages). The fields have a fixed length, so body || fields is still an
    // unambiguous encoding.
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(body);
    hasher.update(&fields);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
    out
}

/// `body` followed by its tag under `key`.
pub fn sealed(key: &[u8; 32], header: &Header, body: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(body.len() + TAG_LEN);
    sealed.extend_from_slice(body);
    sealed.extend_from_slice(&tag(key, header, body));
    sealed
}

/// Why a routed frame addressed to this node was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// No certified key of the claimed source is held (or it was revoked).
    UnknownSource,
    /// The tag does not match: forged source, or altered on the way.
    Forged,
}

impl OpenError {
    /// Name of the counter this refusal goes to.
    pub const fn kind(self) -> &'static str {
        match self {
            Self::UnknownSource => "unknown_source",
            Self::Forged => "forged_source",
        }
    }
}

/// The pair keys of this node with every node whose certified key it holds.
#[derive(Clone, Debug, Default)]
pub struct PairKeys {
    keys: HashMap<u64, [u8; 32]>,
}

impl PairKeys {
    /// Keys by peer id.
    pub fn new(keys: HashMap<u64, [u8; 32]>) -> Self {
        Self { keys }
    }

    /// The key shared with `peer`.
    pub fn get(&self, peer: u64) -> Option<&[u8; 32]> {
        self.keys.get(&peer)
    }

    /// Peers with a key.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `body` followed by its tag, for a frame this node sends with `header`; `None` when no
    /// key for `header.dst` is held.
    pub fn seal(&self, header: &Header, body: &[u8]) -> Option<Vec<u8>> {
        Some(sealed(self.keys.get(&header.dst)?, header, body))
    }

    /// Appends the tag to `body` in place (no copy).
    pub fn seal_in_place(&self, header: &Header, body: &mut Vec<u8>) -> bool {
        let Some(key) = self.keys.get(&header.dst) else {
            return false;
        };
        let tag = tag(key, header, body);
        body.extend_from_slice(&tag);
        true
    }

    /// The payload of a routed frame addressed to this node without its tag, once the tag
    /// proved `header.src` sent it.
    pub fn open<'a>(&self, header: &Header, payload: &'a [u8]) -> Result<&'a [u8], OpenError> {
        let key = self.keys.get(&header.src).ok_or(OpenError::UnknownSource)?;
        let Some(split) = payload.len().checked_sub(TAG_LEN) else {
            return Err(OpenError::Forged);
        };
        let (body, received) = payload.split_at(split);
        let expected = tag(key, header, body);
        // Constant time: how much of a guessed tag matched must not show in the timing.
        let diff = expected
            .iter()
            .zip(received)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(body)
        } else {
            Err(OpenError::Forged)
        }
    }
}

/// The current [`PairKeys`], published by the control thread and read by the shards (to open)
/// and the api and control threads (to seal). A read-mostly snapshot: readers keep a
/// [`KeyCache`] and take the lock only when the version moved.
#[derive(Debug, Default)]
pub struct KeyBook {
    version: AtomicU64,
    current: RwLock<Arc<PairKeys>>,
}

impl KeyBook {
    /// Replaces the keys.
    pub fn publish(&self, keys: PairKeys) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(keys);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The keys now.
    pub fn load(&self) -> Arc<PairKeys> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// One thread's copy of the [`KeyBook`], refreshed when the book's version moved.
#[derive(Debug, Default)]
pub struct KeyCache {
    version: u64,
    keys: Arc<PairKeys>,
}

impl KeyCache {
    /// The book's current keys (one atomic load when unchanged).
    pub fn get(&mut self, book: &KeyBook) -> &PairKeys {
        let version = book.version.load(Ordering::Acquire);
        if version != self.version {
            self.keys = book.load();
            self.version = version;
        }
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameType, TrafficClass};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(seed: u8) -> [u8; 32] {
        key(seed).verifying_key().to_bytes()
    }

    fn keys_of(local: (u64, u8), peers: &[(u64, u8)]) -> PairKeys {
        PairKeys::new(
            peers
                .iter()
                .map(|(id, seed)| {
                    let k = pair_key(&key(local.1), local.0, *id, &public(*seed)).unwrap();
                    (*id, k)
                })
                .collect(),
        )
    }

    fn header(src: u64, dst: u64) -> Header {
        let mut header = Header::new(FrameType::Data, TrafficClass::Client, src, dst);
        header.seq = 77;
        header.stream_id = 5;
        header
    }

    #[test]
    fn both_ends_derive_the_same_key_and_nobody_else_does() {
        let ab = pair_key(&key(1), 10, 20, &public(2)).unwrap();
        let ba = pair_key(&key(2), 20, 10, &public(1)).unwrap();
        assert_eq!(ab, ba);
        let cb = pair_key(&key(3), 10, 20, &public(2)).unwrap();
        assert_ne!(
            ab, cb,
            "another key under the same id derives another pair key"
        );
        let other_ids = pair_key(&key(1), 11, 20, &public(2)).unwrap();
        assert_ne!(ab, other_ids, "the ids are bound into the key");
    }

    #[test]
    fn a_sealed_frame_opens_at_its_destination_only_with_its_real_source() {
        let a = keys_of((10, 1), &[(20, 2), (30, 3)]);
        let b = keys_of((20, 2), &[(10, 1), (30, 3)]);
        let c = keys_of((30, 3), &[(10, 1), (20, 2)]);
        let sealed = a.seal(&header(10, 20), b"hello").unwrap();
        assert_eq!(b.open(&header(10, 20), &sealed), Ok(&b"hello"[..]));

        // C (a member, a relay) claims to be A: its key with B is not A's.
        let forged = c.seal(&header(30, 20), b"hello").unwrap();
        assert_eq!(
            b.open(&header(10, 20), &forged),
            Err(OpenError::Forged),
            "a tag made with another pair key fails"
        );
        // Altered payload, altered header fields, truncated.
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(b.open(&header(10, 20), &flipped), Err(OpenError::Forged));
        let mut other_seq = header(10, 20);
        other_seq.seq = 78;
        assert_eq!(b.open(&other_seq, &sealed), Err(OpenError::Forged));
        assert_eq!(
            b.open(&header(10, 20), &sealed[..10]),
            Err(OpenError::Forged)
        );
        assert_eq!(b.open(&header(10, 20), &[]), Err(OpenError::Forged));
        // The ttl is not covered: relays decrement it.
        let mut relayed = header(10, 20);
        relayed.ttl -= 3;
        assert!(b.open(&relayed, &sealed).is_ok());
        // Unknown source.
        assert_eq!(
            b.open(&header(99, 20), &sealed),
            Err(OpenError::UnknownSource)
        );
        assert!(a.seal(&header(10, 99), b"x").is_none());
    }

    #[test]
    fn seal_in_place_equals_seal() {
        let a = keys_of((10, 1), &[(20, 2)]);
        let mut body = b"payload".to_vec();
        assert!(a.seal_in_place(&header(10, 20), &mut body));
        assert_eq!(body, a.seal(&header(10, 20), b"payload").unwrap());
    }

    #[test]
    fn a_small_order_key_gives_no_pair_key() {
        // The identity point (encoded y = 1) has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(pair_key(&key(1), 1, 2, &identity), None);
    }

    #[test]
    fn the_cache_follows_the_book() {
        let book = KeyBook::default();
        let mut cache = KeyCache::default();
        assert!(cache.get(&book).is_empty());
        book.publish(keys_of((10, 1), &[(20, 2)]));
        assert_eq!(cache.get(&book).len(), 1);
    }
}
