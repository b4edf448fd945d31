//! Which shard owns what, and the pre-TLS preamble that lets a socket reach its owner.
//!
//! A peer link lives on shard `owner_shard(peer, n_shards)`. The kernel spreads accepted
//! sockets over the shards' listeners (`SO_REUSEPORT`), and a dial starts on the shard that owns
//! the *address*; neither knows the peer's id yet. So, before TLS, both sides send a 16-byte
//! preamble: `b"MESHDv1\0"` then their node id (u64 LE). Each side now knows the claimed peer id,
//! and the shard holding the socket passes its file descriptor over a ring to the owner if that
//! is another shard. Nothing but the preamble has been read, so nothing is lost in the move.
//! The claimed id is only a hint: the authenticated handshake must agree with it.
#![forbid(unsafe_code)]

/// Size of the preamble each side sends first.
pub const PREAMBLE_LEN: usize = 16;

const PREAMBLE_MAGIC: [u8; 8] = *b"MESHDv1\0";

/// The shard that owns the link to `peer` (and, later, streams hashed the same way).
pub fn owner_shard(peer: u64, n_shards: usize) -> usize {
    debug_assert!(n_shards > 0);
    // splitmix64 finaliser: the platform hands out sequential ids, which must still spread.
    let mut z = peer.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % n_shards.max(1) as u64) as usize
}

/// The preamble of `node_id`.
pub fn encode_preamble(node_id: u64) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..8].copy_from_slice(&PREAMBLE_MAGIC);
    out[8..].copy_from_slice(&node_id.to_le_bytes());
    out
}

/// The node id a peer's preamble claims, or `None` if it is not a meshd preamble.
pub fn decode_preamble(bytes: &[u8; PREAMBLE_LEN]) -> Option<u64> {
    if bytes[..8] != PREAMBLE_MAGIC {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[8..]);
    Some(u64::from_le_bytes(id)).filter(|&id| id != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_node_ids_spread_over_shards() {
        let mut counts = [0usize; 4];
        for id in 1..=4000u64 {
            counts[owner_shard(id, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "uneven spread: {counts:?}");
    }

    #[test]
    fn one_shard_owns_everything() {
        assert!((0..100).all(|id| owner_shard(id, 1) == 0));
    }

    #[test]
    fn a_preamble_round_trips_and_garbage_is_rejected() {
        assert_eq!(decode_preamble(&encode_preamble(42)), Some(42));
        assert_eq!(decode_preamble(&[0u8; PREAMBLE_LEN]), None);
        assert_eq!(decode_preamble(&encode_preamble(0)), None);
        let mut http = [0u8; PREAMBLE_LEN];
        http.copy_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(decode_preamble(&http), None);
    }
}
