//! Messages larger than a frame: split into chunks, reassembled within bounds, checked whole.
//!
//! Every chunk carries a [`ChunkHead`] (the message's length, the chunk size and the BLAKE3
//! digest of the whole message) before its bytes; the frame header carries the chunk's index
//! and count, and the frame CRC32C guards each chunk on the way. A chunk that disagrees with
//! the head of the same message already open, or a message whose digest does not match, is
//! dropped whole: nothing corrupt is delivered, and the source's retransmission brings it again.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use super::Seq;

/// Bytes of the head before each chunk's data.
pub const HEAD_LEN: usize = 44;

/// Most chunks in one message (the frame header's 16-bit count).
pub const MAX_CHUNKS: usize = u16::MAX as usize;

/// What every chunk of a message says about the whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHead {
    /// The whole message's length.
    pub total_len: u64,
    /// Every chunk but the last is this long.
    pub chunk_size: u32,
    /// BLAKE3 of the whole message.
    pub digest: [u8; 32],
}

impl ChunkHead {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.total_len.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.digest);
    }

    /// The head and the chunk's bytes, or `None` if too short.
    pub fn decode(bytes: &[u8]) -> Option<(Self, &[u8])> {
        if bytes.len() < HEAD_LEN {
            return None;
        }
        let total_len = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
        let chunk_size = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
        let digest = bytes[12..44].try_into().ok()?;
        Some((
            Self {
                total_len,
                chunk_size,
                digest,
            },
            &bytes[HEAD_LEN..],
        ))
    }

    /// How many chunks the message has.
    pub fn count(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.total_len.div_ceil(u64::from(self.chunk_size))
    }
}

/// Splits `message` into chunk payloads (head + bytes) of at most `chunk_size` data bytes:
/// `(index, count, payload)`, each payload with `spare` bytes of room after it (for what the
/// sender appends). `None` when it would take more than [`MAX_CHUNKS`].
pub fn split(message: &[u8], chunk_size: usize, spare: usize) -> Option<Vec<(u16, u16, Vec<u8>)>> {
    assert!(chunk_size > 0 && chunk_size <= u32::MAX as usize);
    let count = message.len().div_ceil(chunk_size).max(1);
    if count > MAX_CHUNKS {
        return None;
    }
    let head = ChunkHead {
        total_len: message.len() as u64,
        chunk_size: chunk_size as u32,
        digest: *blake3::hash(message).as_bytes(),
    };
    let chunks = (0..count)
        .map(|i| {
            let data = &message[i * chunk_size..message.len().min((i + 1) * chunk_size)];
            let mut payload = Vec::with_capacity(HEAD_LEN + data.len() + spare);
            head.encode(&mut payload);
            payload.extend_from_slice(data);
            (i as u16, count as u16, payload)
        })
        .collect();
    Some(chunks)
}

/// Bounds of a reassembler.
#[derive(Clone, Copy, Debug)]
pub struct ReassemblyLimits {
    /// Largest message.
    pub max_message: u64,
    /// Most messages open at once.
    pub max_open: usize,
    /// Most bytes held by open messages together.
    pub max_bytes: u64,
}

/// What a chunk did.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The message is whole and its digest matches.
    Complete(Vec<u8>),
    /// More chunks are missing.
    Partial,
    /// This chunk was here already.
    Duplicate,
    /// The chunk or the whole did not check out: the message was dropped.
    Corrupt(&'static str),
    /// No room (too many or too large open messages): the chunk was dropped.
    Refused(&'static str),
}

#[derive(Debug)]
struct Partial {
    head: ChunkHead,
    have: Vec<bool>,
    missing: usize,
    buf: Vec<u8>,
}

/// Open messages of many streams, keyed by (stream, seq).
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    open: BTreeMap<(u128, Seq), Partial>,
    bytes: u64,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            open: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Bytes held by open messages.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Chunk `index` of `count` of message `seq` of `stream`.
    pub fn on_chunk(
        &mut self,
        stream: u128,
        seq: Seq,
        index: u16,
        count: u16,
        payload: &[u8],
    ) -> Piece {
        let Some((head, data)) = ChunkHead::decode(payload) else {
            return Piece::Corrupt("chunk shorter than its head");
        };
        let (index, count) = (usize::from(index), usize::from(count));
        if count < 2 || index >= count || head.count() != count as u64 {
            return Piece::Corrupt("chunk index or count disagrees with the head");
        }
        if head.total_len > self.limits.max_message {
            return Piece::Refused("message larger than the limit");
        }
        let size = head.chunk_size as usize;
        let expected = if index + 1 == count {
            head.total_len as usize - size * (count - 1)
        } else {
            size
        };
        if data.len() != expected {
            return Piece::Corrupt("chunk length disagrees with the head");
        }
        let key = (stream, seq);
        if let Some(open) = self.open.get(&key) {
            if open.head != head {
                self.drop_open(key);
                return Piece::Corrupt("chunks of one message disagree");
            }
        } else {
            if self.open.len() >= self.limits.max_open {
                return Piece::Refused("too many messages being reassembled");
            }
            if self.bytes + head.total_len > self.limits.max_bytes {
                return Piece::Refused("reassembly memory full");
            }
            self.bytes += head.total_len;
            self.open.insert(
                key,
                Partial {
                    head,
                    have: vec![false; count],
                    missing: count,
                    buf: vec![0; head.total_len as usize],
                },
            );
        }
        let open = self.open.get_mut(&key).expect("inserted above");
        if open.have[index] {
            return Piece::Duplicate;
        }
        open.have[index] = true;
        open.missing -= 1;
        open.buf[index * size..index * size + data.len()].copy_from_slice(data);
        if open.missing > 0 {
            return Piece::Partial;
        }
        let whole = self.drop_open(key).expect("open");
        if blake3::hash(&whole.buf).as_bytes() != &whole.head.digest {
            return Piece::Corrupt("message digest mismatch");
        }
        Piece::Complete(whole.buf)
    }

    fn drop_open(&mut self, key: (u128, Seq)) -> Option<Partial> {
        let open = self.open.remove(&key)?;
        self.bytes -= open.head.total_len;
        Some(open)
    }

    /// Drops the open messages of `stream` up to `seq` (stored already, or the stream is gone).
    pub fn forget(&mut self, stream: u128, up_to: Seq) {
        let keys: Vec<_> = self
            .open
            .range((stream, 0)..=(stream, up_to))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.drop_open(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ReassemblyLimits = ReassemblyLimits {
        max_message: 1 << 20,
        max_open: 2,
        max_bytes: 1 << 20,
    };

    fn message(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn chunks_in_any_order_with_duplicates_make_the_message_once() {
        let m = message(10_000);
        let mut chunks = split(&m, 3000, 0).unwrap();
        assert_eq!(chunks.len(), 4);
        chunks.reverse();
        let mut r = Reassembler::new(LIMITS);
        let mut done = Vec::new();
        for (i, n, p) in chunks.iter().take(1).chain(chunks.iter()) {
            match r.on_chunk(1, 5, *i, *n, p) {
                Piece::Complete(whole) => done.push(whole),
                Piece::Partial | Piece::Duplicate => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(done, vec![m]);
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn a_flipped_byte_drops_the_message_and_a_resend_completes_it() {
        let m = message(5000);
        let chunks = split(&m, 2000, 0).unwrap();
        let mut r = Reassembler::new(LIMITS);
        let mut bad = chunks[1].2.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(r.on_chunk(1, 1, 0, 3, &chunks[0].2), Piece::Partial);
        assert_eq!(r.on_chunk(1, 1, 1, 3, &bad), Piece::Partial);
        assert_eq!(
            r.on_chunk(1, 1, 2, 3, &chunks[2].2),
            Piece::Corrupt("message digest mismatch")
        );
        for (i, n, p) in &chunks {
            if let Piece::Complete(whole) = r.on_chunk(1, 1, *i, *n, p) {
                assert_eq!(whole, m);
                return;
            }
        }
        panic!("never completed");
    }

    #[test]
    fn hostile_chunks_are_refused_without_allocating_past_the_limits() {
        let mut r = Reassembler::new(LIMITS);
        assert_eq!(
            r.on_chunk(1, 1, 0, 2, b"short"),
            Piece::Corrupt("chunk shorter than its head")
        );
        let mut huge = Vec::new();
        ChunkHead {
            total_len: 1 << 40,
            chunk_size: 1 << 24,
            digest: [0; 32],
        }
        .encode(&mut huge);
        huge.extend_from_slice(&[0; 16]);
        assert_eq!(
            r.on_chunk(1, 1, 0, 65_536u32 as u16, &huge),
            Piece::Corrupt("chunk index or count disagrees with the head")
        );
        let big = split(&message(600_000), 200_000, 0).unwrap();
        assert_eq!(r.on_chunk(1, 1, 0, 3, &big[0].2), Piece::Partial);
        assert_eq!(
            r.on_chunk(1, 2, 0, 3, &big[0].2),
            Piece::Refused("reassembly memory full")
        );
        let small = split(&message(100), 60, 0).unwrap();
        assert_eq!(r.on_chunk(2, 1, 0, 2, &small[0].2), Piece::Partial);
        assert_eq!(
            r.on_chunk(3, 1, 0, 2, &small[0].2),
            Piece::Refused("too many messages being reassembled")
        );
        assert_eq!(
            r.on_chunk(2, 1, 0, 2, &big[1].2),
            Piece::Corrupt("chunk index or count disagrees with the head")
        );
        r.forget(1, 1);
        r.forget(2, 9);
        assert_eq!(r.bytes(), 0);
    }
}
