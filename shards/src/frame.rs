//! Link frame codec for meshd.
//!
//! Every WebSocket binary message exchanged between two meshd peers carries
//! one or more frames back to back. A frame is a fixed [`HEADER_LEN`]-byte
//! little-endian header followed by `payload_len` bytes of payload; the byte
//! layout is documented in `FRAMES.md` and pinned by a test in this module.
//!
//! This module is the trust boundary for bytes arriving from the network, so
//! it keeps these invariants:
//!
//! - Decoding never panics, never allocates and never reads past the input;
//!   any malformed input becomes a [`FrameError`].
//! - A decoded [`Frame`] borrows its payload from the input buffer.
//! - A frame is only accepted if its CRC32C matches. The CRC covers every
//!   header byte except the CRC field itself (reserved bytes included) and the
//!   whole payload, so a single flipped bit anywhere is rejected rather than
//!   read as a different frame.
//! - Reserved bytes are written as zero and ignored on decode, so a later
//!   version can give them meaning without breaking version-1 readers.
//! - `flags` is opaque here: the codec carries it but never interprets it.
//! - Encoding refuses payloads above the caller's limit (and above what the
//!   32-bit length field can express) before writing anything, so the output
//!   buffer is left untouched on error.
//! - [`FrameReader`] stops at the first error, because once one length field
//!   is untrustworthy the position of every later frame is too.

#![forbid(unsafe_code)]

use std::iter::FusedIterator;

use bytes::Bytes;

/// Wire format version written by this codec and the only one it accepts.
pub const FRAME_VERSION: u8 = 1;

/// Size in bytes of the fixed frame header that precedes every payload.
pub const HEADER_LEN: usize = 72;

/// Hop budget given to a freshly built [`Header`].
pub const DEFAULT_TTL: u8 = 16;

/// Offset of the CRC field; everything before it is covered by the CRC.
const CRC_OFFSET: usize = 68;

/// Largest payload the 32-bit `payload_len` field can describe, clamped for
/// targets where `usize` is narrower than 32 bits.
const MAX_WIRE_PAYLOAD: usize = if usize::BITS >= u32::BITS {
    u32::MAX as usize
} else {
    usize::MAX
};

/// What a frame is for; selects how its payload is interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Opens the link handshake; payload is a `meshd.v1.Hello` message.
    Hello = 1,
    /// Proves the peer's identity during the handshake; payload is `meshd.v1.Auth`.
    Auth = 2,
    /// Rejects the handshake; payload is `meshd.v1.Refuse`.
    Refuse = 3,
    /// Liveness probe; `seq` carries the sender's send timestamp in µs, no payload.
    Heartbeat = 4,
    /// Answer to a heartbeat, echoing its `seq`; no payload.
    HeartbeatAck = 5,
    /// How many WebSocket messages this connection (lane) has read and handed on so far, in
    /// `seq`; no payload. Lets the peer's writer forget what it keeps until confirmed, and
    /// gives it credit for more (`link::Unconfirmed`).
    LaneAck = 12,
    /// The peer is leaving; payload is `meshd.v1.Goodbye`.
    Goodbye = 6,
    /// Control-plane message between neighbouring control cores (link-state flooding); payload
    /// is `meshd.v1.RoutingMessage`. Never forwarded.
    Routing = 7,
    /// A membership (SWIM) datagram between control cores; payload is foca's encoding. Routed
    /// like data, so it reaches members with no direct link.
    Gossip = 8,
    /// A Raft RPC of the mesh control group (a request or its answer) between control cores;
    /// payload is `meshd.v1.RaftEnvelope`. Routed like gossip, origin-tagged.
    Raft = 11,
    /// A node without a mesh asks to join; payload is `meshd.v1.JoinRequest`. Neighbour-only,
    /// accepted only on a guest link.
    Join = 9,
    /// The answer to a `Join`; payload is `meshd.v1.JoinAnswer`. Neighbour-only.
    JoinAnswer = 10,
    /// Application or replication data; payload is `meshd.v1.Data`.
    Data = 16,
    /// Delivery outcome for earlier data; payload is `meshd.v1.DeliveryReport`.
    DeliveryReport = 17,
    /// End-to-end application acknowledgement; payload is `meshd.v1.AppAck`.
    AppAck = 18,
    /// One message (or one chunk of it) of a client data stream, source to target;
    /// `stream_id`, `seq`, `chunk_seq` / `chunk_count` in the header, the sealed message (or
    /// the chunk with its head) as payload.
    StreamData = 19,
    /// Where a target's inbox stands, target to source; payload is `meshd.v1.StreamReport`.
    StreamReport = 20,
    /// A source tells a target about a stream (opened, or closed); payload is
    /// `meshd.v1.StreamOpen`.
    StreamOpen = 21,
    /// A run of fire-and-forget messages from one `Publish` batch, same source, destination,
    /// class and flow, under one origin tag; payload is `meshd.v1.DataBatch`, `seq` the first
    /// message's id and `chunk_count` how many there are (their ids follow on). One tag, one
    /// header and one ring slot per run instead of per message: the per-frame BLAKE3 tag alone
    /// was 17 % of the CPU on the 256 B path (benches/RESULTS.md, issue 23).
    DataBatch = 22,
}

/// Most messages one `DataBatch` frame may carry: its maker never puts more in one, and a
/// destination drops a frame with more (bounds the work one authenticated frame can cause).
pub const MAX_DATA_BATCH: usize = 1024;

impl FrameType {
    /// Every frame type, handy for pre-registering per-type metrics.
    pub const ALL: [Self; 19] = [
        Self::Hello,
        Self::Auth,
        Self::Refuse,
        Self::Heartbeat,
        Self::HeartbeatAck,
        Self::LaneAck,
        Self::Goodbye,
        Self::Routing,
        Self::Gossip,
        Self::Raft,
        Self::Join,
        Self::JoinAnswer,
        Self::Data,
        Self::DeliveryReport,
        Self::AppAck,
        Self::StreamData,
        Self::StreamReport,
        Self::StreamOpen,
        Self::DataBatch,
    ];

    /// Maps a wire byte to a frame type, or `None` if the byte is not assigned.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Hello),
            2 => Some(Self::Auth),
            3 => Some(Self::Refuse),
            4 => Some(Self::Heartbeat),
            5 => Some(Self::HeartbeatAck),
            6 => Some(Self::Goodbye),
            7 => Some(Self::Routing),
            8 => Some(Self::Gossip),
            9 => Some(Self::Join),
            10 => Some(Self::JoinAnswer),
            11 => Some(Self::Raft),
            12 => Some(Self::LaneAck),
            16 => Some(Self::Data),
            17 => Some(Self::DeliveryReport),
            18 => Some(Self::AppAck),
            19 => Some(Self::StreamData),
            20 => Some(Self::StreamReport),
            21 => Some(Self::StreamOpen),
            22 => Some(Self::DataBatch),
            _ => None,
        }
    }

    /// True for frames a link's writer sends before any data queued on that link: liveness,
    /// routing, membership, consensus and delivery outcomes (seed 002's control class). They
    /// keep their order among themselves and may overtake data queued before them, which no
    /// protocol here depends on. A goodbye keeps its place (it ends what was queued before it),
    /// and stream frames stay with data (a stream's open comes before its data).
    pub const fn is_served_first(self) -> bool {
        matches!(
            self,
            Self::Heartbeat
                | Self::HeartbeatAck
                | Self::LaneAck
                | Self::Routing
                | Self::Gossip
                | Self::Raft
                | Self::DeliveryReport
                | Self::AppAck
        )
    }

    /// True for frames between direct neighbours only (handshake, heartbeats, goodbye,
    /// routing), which are never forwarded.
    pub const fn is_control(self) -> bool {
        matches!(
            self,
            Self::Hello
                | Self::Auth
                | Self::Refuse
                | Self::Heartbeat
                | Self::HeartbeatAck
                | Self::LaneAck
                | Self::Goodbye
                | Self::Routing
                | Self::Join
                | Self::JoinAnswer
        )
    }
}

/// Scheduling class of a frame; decides which send queue it waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum TrafficClass {
    /// Link control traffic (handshake, heartbeats).
    Control = 0,
    /// Mesh-internal system traffic.
    System = 1,
    /// Database replication updates.
    DbUpdate = 2,
    /// Client application traffic.
    Client = 3,
}

impl TrafficClass {
    /// Every traffic class, handy for pre-registering per-class metrics.
    pub const ALL: [Self; 4] = [Self::Control, Self::System, Self::DbUpdate, Self::Client];

    /// Maps a wire byte to a traffic class, or `None` if the byte is not assigned.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Control),
            1 => Some(Self::System),
            2 => Some(Self::DbUpdate),
            3 => Some(Self::Client),
            _ => None,
        }
    }
}

/// The decoded, validated fields of a frame header.
///
/// Version, reserved bytes, `payload_len` and the CRC are not stored here:
/// they are derived by the codec and cannot be set inconsistently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame is for.
    pub frame_type: FrameType,
    /// Which send queue the frame belongs to.
    pub traffic_class: TrafficClass,
    /// Bit set owned by higher layers; carried verbatim.
    pub flags: u8,
    /// Hops left before the frame must be dropped.
    pub ttl: u8,
    /// Index of this chunk within a chunked message.
    pub chunk_seq: u16,
    /// Number of chunks in the message; 0 or 1 means not chunked.
    pub chunk_count: u16,
    /// Node id of the sender.
    pub src: u64,
    /// Node id of the destination; 0 means broadcast.
    pub dst: u64,
    /// Stream the frame belongs to.
    pub stream_id: u128,
    /// Tenant the frame is accounted to.
    pub tenant_id: u64,
    /// Per-stream sequence number (heartbeats: send timestamp in µs).
    pub seq: u64,
    /// Route the frame is travelling along.
    pub path_id: u32,
}

impl Header {
    /// Builds a header with [`DEFAULT_TTL`] and every other field zero.
    pub const fn new(
        frame_type: FrameType,
        traffic_class: TrafficClass,
        src: u64,
        dst: u64,
    ) -> Self {
        Self {
            frame_type,
            traffic_class,
            flags: 0,
            ttl: DEFAULT_TTL,
            chunk_seq: 0,
            chunk_count: 0,
            src,
            dst,
            stream_id: 0,
            tenant_id: 0,
            seq: 0,
            path_id: 0,
        }
    }

    /// True when the frame is one chunk of a larger message.
    pub const fn is_chunked(&self) -> bool {
        self.chunk_count > 1
    }
}

/// A decoded frame borrowing its payload from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The validated header.
    pub header: Header,
    /// The payload bytes, exactly `payload_len` long.
    pub payload: &'a [u8],
}

/// Why a frame could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The buffer ends before the header or before the announced payload.
    #[error("truncated frame: have {have} bytes, need {need}")]
    Short {
        /// Bytes available.
        have: usize,
        /// Bytes the frame requires.
        need: usize,
    },
    /// The payload is larger than the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Payload length given or announced.
        len: usize,
        /// Largest payload allowed.
        max: usize,
    },
    /// The frame was written by a codec version this build does not speak.
    #[error("unsupported frame version {version} (expected {})", FRAME_VERSION)]
    BadVersion {
        /// Version byte found in the frame.
        version: u8,
    },
    /// The frame type byte is not assigned.
    #[error("unknown frame type {frame_type}")]
    UnknownType {
        /// Frame type byte found in the frame.
        frame_type: u8,
    },
    /// The traffic class byte is not assigned.
    #[error("unknown traffic class {class}")]
    UnknownClass {
        /// Traffic class byte found in the frame.
        class: u8,
    },
    /// The frame's bytes do not match its checksum.
    #[error("CRC mismatch: frame carries {expected:#010x}, bytes hash to {actual:#010x}")]
    BadCrc {
        /// CRC carried in the frame header.
        expected: u32,
        /// CRC computed over the bytes received.
        actual: u32,
    },
}

impl FrameError {
    /// Short, stable label for metrics; never changes once published.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Short { .. } => "short",
            Self::Oversized { .. } => "oversized",
            Self::BadVersion { .. } => "bad_version",
            Self::UnknownType { .. } => "unknown_type",
            Self::UnknownClass { .. } => "unknown_class",
            Self::BadCrc { .. } => "bad_crc",
        }
    }
}

/// Total encoded size of a frame carrying `payload_len` payload bytes,
/// saturating rather than wrapping on absurd inputs.
pub const fn encoded_len(payload_len: usize) -> usize {
    HEADER_LEN.saturating_add(payload_len)
}

/// Appends header + payload to `out`, computing `payload_len` and the CRC.
///
/// Errors with [`FrameError::Oversized`] if `payload.len() > max_payload`
/// (or exceeds what the 32-bit length field can hold); `out` is unchanged on
/// error. Never panics.
pub fn encode_into(
    out: &mut Vec<u8>,
    header: &Header,
    payload: &[u8],
    max_payload: usize,
) -> Result<(), FrameError> {
    let max = max_payload.min(MAX_WIRE_PAYLOAD);
    let oversized = FrameError::Oversized {
        len: payload.len(),
        max,
    };
    if payload.len() > max {
        return Err(oversized);
    }
    let payload_len = u32::try_from(payload.len()).map_err(|_| oversized)?;

    let prefix = crc_covered_prefix(header, payload_len);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&prefix), payload);

    out.reserve(encoded_len(payload.len()));
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Encodes one frame into a fresh [`Bytes`], ready to hand to a WebSocket
/// sink without another copy.
pub fn encode_to_bytes(
    header: &Header,
    payload: &[u8],
    max_payload: usize,
) -> Result<Bytes, FrameError> {
    let mut out = Vec::new();
    encode_into(&mut out, header, payload, max_payload)?;
    Ok(Bytes::from(out))
}

/// Builds header bytes `0..CRC_OFFSET` in a fixed array so the CRC can be
/// computed over exactly those bytes without slicing `out` by offset.
fn crc_covered_prefix(header: &Header, payload_len: u32) -> [u8; CRC_OFFSET] {
    let mut prefix = [0u8; CRC_OFFSET];
    let mut w = FieldWriter { rest: &mut prefix };
    w.put([FRAME_VERSION]);
    w.put([header.frame_type as u8]);
    w.put([header.traffic_class as u8]);
    w.put([header.flags]);
    w.put([header.ttl]);
    // Reserved bytes go out as zero so a later version can give them meaning.
    w.put([0]);
    w.put(header.chunk_seq.to_le_bytes());
    w.put(header.chunk_count.to_le_bytes());
    w.put([0, 0]);
    w.put(payload_len.to_le_bytes());
    w.put(header.src.to_le_bytes());
    w.put(header.dst.to_le_bytes());
    w.put(header.stream_id.to_le_bytes());
    w.put(header.tenant_id.to_le_bytes());
    w.put(header.seq.to_le_bytes());
    w.put(header.path_id.to_le_bytes());
    prefix
}

/// Sequential writer over a fixed buffer; fixed-size chunks keep every write
/// free of runtime bounds panics.
struct FieldWriter<'a> {
    rest: &'a mut [u8],
}

impl FieldWriter<'_> {
    fn put<const N: usize>(&mut self, bytes: [u8; N]) {
        let rest = std::mem::take(&mut self.rest);
        // Cannot happen with the fixed layout (the layout test would notice a
        // field that no longer fits); dropping the write beats panicking.
        if rest.len() < N {
            self.rest = rest;
            return;
        }
        if let Some((field, tail)) = rest.split_first_chunk_mut::<N>() {
            *field = bytes;
            self.rest = tail;
        }
    }
}

/// Sequential little-endian reader; returns `None` instead of panicking when
/// the input runs out.
struct FieldReader<'a> {
    rest: &'a [u8],
}

impl FieldReader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (field, tail) = self.rest.split_first_chunk::<N>()?;
        self.rest = tail;
        Some(*field)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn u128(&mut self) -> Option<u128> {
        self.take().map(u128::from_le_bytes)
    }
}

/// Header fields exactly as found on the wire, before any validation, so the
/// checks can run in the documented order.
struct RawHeader {
    version: u8,
    frame_type: u8,
    traffic_class: u8,
    flags: u8,
    ttl: u8,
    chunk_seq: u16,
    chunk_count: u16,
    payload_len: u32,
    src: u64,
    dst: u64,
    stream_id: u128,
    tenant_id: u64,
    seq: u64,
    path_id: u32,
    crc: u32,
}

impl RawHeader {
    fn parse(buf: &[u8]) -> Option<Self> {
        let mut r = FieldReader { rest: buf };
        let version = r.u8()?;
        let frame_type = r.u8()?;
        let traffic_class = r.u8()?;
        let flags = r.u8()?;
        let ttl = r.u8()?;
        let _reserved = r.u8()?;
        let chunk_seq = r.u16()?;
        let chunk_count = r.u16()?;
        let _reserved = r.u16()?;
        Some(Self {
            version,
            frame_type,
            traffic_class,
            flags,
            ttl,
            chunk_seq,
            chunk_count,
            payload_len: r.u32()?,
            src: r.u64()?,
            dst: r.u64()?,
            stream_id: r.u128()?,
            tenant_id: r.u64()?,
            seq: r.u64()?,
            path_id: r.u32()?,
            crc: r.u32()?,
        })
    }
}

/// Decodes one frame from the start of `buf`; returns the frame and the
/// number of bytes it used.
///
/// Checks, in this order: length >= [`HEADER_LEN`], version,
/// `payload_len <= max_payload`, enough bytes for the payload, CRC, frame
/// type, traffic class. The CRC is checked before the enum bytes so that a
/// corrupted type byte is reported as corruption, not as an unknown type.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<(Frame<'_>, usize), FrameError> {
    let short_header = FrameError::Short {
        have: buf.len(),
        need: HEADER_LEN,
    };
    if buf.len() < HEADER_LEN {
        return Err(short_header);
    }
    let raw = RawHeader::parse(buf).ok_or(short_header)?;

    if raw.version != FRAME_VERSION {
        return Err(FrameError::BadVersion {
            version: raw.version,
        });
    }

    // A length that does not fit usize is certainly over any limit.
    let len = usize::try_from(raw.payload_len).unwrap_or(usize::MAX);
    if len > max_payload {
        return Err(FrameError::Oversized {
            len,
            max: max_payload,
        });
    }

    // Saturating is safe: no buffer can hold usize::MAX bytes, so a saturated
    // `need` still ends in Short rather than wrapping to a small, valid slice.
    let need = encoded_len(len);
    let short_payload = FrameError::Short {
        have: buf.len(),
        need,
    };
    let payload = buf.get(HEADER_LEN..need).ok_or(short_payload.clone())?;
    let prefix = buf.get(..CRC_OFFSET).ok_or(short_payload)?;

    let actual = crc32c::crc32c_append(crc32c::crc32c(prefix), payload);
    if actual != raw.crc {
        return Err(FrameError::BadCrc {
            expected: raw.crc,
            actual,
        });
    }

    let frame_type = FrameType::from_u8(raw.frame_type).ok_or(FrameError::UnknownType {
        frame_type: raw.frame_type,
    })?;
    let traffic_class =
        TrafficClass::from_u8(raw.traffic_class).ok_or(FrameError::UnknownClass {
            class: raw.traffic_class,
        })?;

    let header = Header {
        frame_type,
        traffic_class,
        flags: raw.flags,
        ttl: raw.ttl,
        chunk_seq: raw.chunk_seq,
        chunk_count: raw.chunk_count,
        src: raw.src,
        dst: raw.dst,
        stream_id: raw.stream_id,
        tenant_id: raw.tenant_id,
        seq: raw.seq,
        path_id: raw.path_id,
    };
    Ok((Frame { header, payload }, need))
}

/// Iterates the frames of one WebSocket message (several frames back to
/// back).
///
/// After the first error it yields that error once and then stops: a
/// corrupt length makes the rest of the message unparseable.
#[derive(Clone, Debug)]
pub struct FrameReader<'a> {
    rest: &'a [u8],
    max_payload: usize,
    failed: bool,
}

impl<'a> FrameReader<'a> {
    /// Starts reading frames at the beginning of `buf`, refusing any payload
    /// larger than `max_payload`.
    pub fn new(buf: &'a [u8], max_payload: usize) -> Self {
        FrameReader {
            rest: buf,
            max_payload,
            failed: false,
        }
    }

    /// Bytes not yet consumed; after an error these are the bytes that were
    /// abandoned, which is useful for logging how much was dropped.
    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for FrameReader<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match decode(self.rest, self.max_payload) {
            Ok((frame, used)) => {
                self.rest = self.rest.get(used..).unwrap_or_default();
                Some(Ok(frame))
            }
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

impl FusedIterator for FrameReader<'_> {}

/// Peeks the version byte so a handshake can answer "wrong version"
/// politely: returns `Some(version)` if `buf` is non-empty.
pub fn peek_version(buf: &[u8]) -> Option<u8> {
    buf.first().copied()
}

#[cfg(test)]
mod tests;
