//! What crosses the rings into and out of a shard.
//!
//! ```text
//!   api thread ──ShardInput──►┐
//!   control    ──ShardInput──►├─► shard i ──ControlEvent──► control thread
//!   shard j    ──ShardInput──►┘           ──ApiEvent─────► api thread
//! ```
//! Each shard has exactly one inbound ring (MPSC); the control thread and the api thread each
//! have one inbound ring that every shard produces into.

use std::{net::SocketAddr, os::fd::OwnedFd};

use bytes::Bytes;
use futures::channel::oneshot;

use std::sync::Arc;

use crate::{
    fib::Fib,
    frame::{FrameType, Header, TrafficClass},
    handshake::{PeerInfo, Role},
    stats::SessionSnapshot,
};

/// A request to a shard.
#[derive(Debug)]
pub enum ShardInput {
    /// Open a link to `addr`; the result comes back as [`ControlEvent::DialDone`].
    Dial {
        /// Where to connect.
        addr: SocketAddr,
        /// Chosen by the requester to match the answer.
        dial_id: u64,
    },
    /// A TCP connection whose preamble named a peer owned by this shard; continue it here.
    Adopt(AdoptedSocket),
    /// Send a frame towards its destination (direct link or next hop from the FIB).
    Send(Outgoing),
    /// A frame routed on another shard whose next hop is a peer of this shard.
    Forward(Forwarded),
    /// Install a new forwarding table.
    Fib(Arc<Fib>),
    /// Switch to another mesh ("" = none): every link closes with a goodbye carrying `reason`.
    SetMesh {
        /// The new mesh id.
        mesh_id: String,
        /// Goodbye reason sent to every peer.
        reason: String,
    },
    /// This node's certificate (issued or renewed) and the authority it checks peers against;
    /// sent before a `SetMesh` that needs them, and whenever the certificate is renewed.
    SetCredential {
        /// An encoded `NodeCertificate`; empty without a mesh.
        certificate: Vec<u8>,
        /// The mesh authority's public key; `None` without a mesh.
        authority: Option<[u8; 32]>,
    },
    /// Close the link to `peer` with a goodbye; answers whether there was one.
    DropPeer {
        /// The peer.
        peer: u64,
        /// Told to the peer in the goodbye.
        reason: String,
        /// Whether the link existed.
        reply: oneshot::Sender<bool>,
    },
    /// Report the figures of every live link of this shard.
    Sessions {
        /// Where to answer.
        reply: oneshot::Sender<Vec<SessionSnapshot>>,
    },
    /// Report this shard's counters since it started (metrics).
    Figures {
        /// Where to answer.
        reply: oneshot::Sender<ShardFigures>,
    },
    /// Remember a peer's public key (trust on first use, from the control database).
    PinKey {
        /// The peer.
        peer: u64,
        /// Its Ed25519 public key.
        public_key: [u8; 32],
    },
    /// Say goodbye to every peer and stop the shard.
    Shutdown,
}

/// A socket in the middle of link set-up, handed from the shard that accepted or dialed it to
/// the shard that owns the peer. Only the preamble has been exchanged, so no bytes are buffered
/// anywhere but in the kernel.
#[derive(Debug)]
pub struct AdoptedSocket {
    /// The connected TCP socket (a `dup` of the original descriptor).
    pub fd: OwnedFd,
    /// Which side opened the connection.
    pub role: Role,
    /// The peer id from the preamble, checked against the authenticated id later.
    pub peer_hint: u64,
    /// The peer's socket address.
    pub remote_addr: SocketAddr,
    /// Set when this socket answers a [`ShardInput::Dial`].
    pub dial_id: Option<u64>,
    /// When its set-up must be done: one deadline from accept (or dial) to authenticated,
    /// whatever stage it stalls in.
    pub deadline: std::time::Instant,
}

/// One frame this node originates.
#[derive(Debug)]
pub struct Outgoing {
    /// The frame's destination node.
    pub dst: u64,
    /// Frame type: `Data`, `DeliveryReport`, `AppAck` or a stream frame.
    pub frame_type: FrameType,
    /// Traffic class of the frame.
    pub traffic_class: TrafficClass,
    /// For `Data`, the message id, so a failure can be reported against it.
    pub msg_id: u64,
    /// Flow key (stream or correlation id): frames with the same non-zero key take one path,
    /// in order. 0: spread over every path.
    pub flow: u128,
    /// Encoded frame payload.
    pub payload: Bytes,
    /// (index, count) of one chunk of a larger stream message; (0, 0) when not chunked. For a
    /// `DataBatch` frame (0, its number of messages), whose ids are `msg_id` on.
    pub chunk: (u16, u16),
}

impl Outgoing {
    /// The header this frame leaves `local` with (ttl aside, what its origin tag covers).
    pub fn header(&self, local: u64) -> Header {
        let mut header = Header::new(self.frame_type, self.traffic_class, local, self.dst);
        header.seq = self.msg_id;
        header.stream_id = self.flow;
        (header.chunk_seq, header.chunk_count) = self.chunk;
        header
    }
}

/// A routed frame handed to the shard that owns its next hop.
#[derive(Debug)]
pub struct Forwarded {
    /// The direct peer chosen as next hop.
    pub next_hop: u64,
    /// The frame header (ttl already decremented for relayed frames).
    pub header: Header,
    /// The payload.
    pub payload: Bytes,
    /// How many more times the frame may be re-routed if `next_hop` turns out to be down.
    pub reroutes_left: u8,
}

impl Forwarded {
    /// The key of this frame's slot in the node-wide gauge of bytes crossing to next hops'
    /// shards ([`Shard::forwards`](crate::shard)): the next hop for client data, the next hop
    /// mixed with a constant for system and internal-DB traffic, so a client flood relayed
    /// to a next hop (its gauge full) never holds back a DB update to the same hop.
    pub fn gauge_key(&self) -> u64 {
        forward_gauge_key(self.next_hop, self.header.traffic_class)
    }
}

/// See [`Forwarded::gauge_key`].
pub fn forward_gauge_key(next_hop: u64, class: TrafficClass) -> u64 {
    match class {
        TrafficClass::System | TrafficClass::DbUpdate => next_hop.rotate_left(32) ^ PRIORITY_GAUGE,
        _ => next_hop,
    }
}

/// Mixed into a next hop's id to give its system and DB traffic a gauge slot of its own.
const PRIORITY_GAUGE: u64 = 0x5bd1_e995_1f12_3bb5;

/// Link life-cycle news for the control thread.
#[derive(Debug)]
pub enum ControlEvent {
    /// A link passed its handshake and carries traffic.
    LinkUp {
        /// The authenticated peer.
        peer: PeerInfo,
        /// The peer's socket address.
        remote_addr: SocketAddr,
        /// Which side dialed.
        role: Role,
        /// The shard that owns it.
        shard: usize,
    },
    /// A link ended.
    LinkDown {
        /// The peer.
        peer: u64,
        /// Why, for logs and operators.
        reason: String,
        /// Set when the peer said goodbye; its reason.
        goodbye: Option<String>,
        /// The link was a guest link (join exchange only).
        guest: bool,
    },
    /// A routing message from a direct neighbour's control core.
    Routing {
        /// The neighbour.
        from: u64,
        /// Encoded `meshd.v1.RoutingMessage`.
        payload: Bytes,
    },
    /// A join exchange frame (`Join` or `JoinAnswer`) from the peer of a guest link.
    Join {
        /// The peer.
        from: u64,
        /// Which of the two.
        frame_type: FrameType,
        /// Encoded `meshd.v1.JoinRequest` or `meshd.v1.JoinAnswer`.
        payload: Bytes,
    },
    /// A membership datagram addressed to this node.
    Gossip {
        /// The member that sent it (the frame's source, possibly several hops away).
        from: u64,
        /// foca's encoding.
        payload: Bytes,
    },
    /// A Raft RPC (request or answer) addressed to this node, its source proven by its tag.
    Raft {
        /// The member that sent it (possibly several hops away).
        from: u64,
        /// Encoded `meshd.v1.RaftEnvelope`.
        payload: Bytes,
    },
    /// The outcome of a [`ShardInput::Dial`].
    DialDone {
        /// The requester's id.
        dial_id: u64,
        /// The address dialed.
        addr: SocketAddr,
        /// The peer that answered, or why the dial failed.
        result: Result<u64, DialError>,
    },
}

impl ControlEvent {
    /// The bytes it weighs on the control ring: what a peer chose the size of.
    pub fn weight(&self) -> usize {
        match self {
            Self::Routing { payload, .. }
            | Self::Join { payload, .. }
            | Self::Gossip { payload, .. }
            | Self::Raft { payload, .. } => payload.len(),
            Self::LinkDown {
                reason, goodbye, ..
            } => reason.len() + goodbye.as_ref().map_or(0, String::len),
            Self::LinkUp { .. } | Self::DialDone { .. } => 0,
        }
    }
}

/// Why a dial failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed or timed out.
    #[error("could not connect: {0}")]
    Connect(String),
    /// TLS or WebSocket set-up failed.
    #[error("link set-up failed: {0}")]
    Setup(String),
    /// The handshake refused the peer, or the peer refused this node.
    #[error("handshake refused: {0}")]
    Refused(String),
    /// Set-up took longer than the handshake timeout.
    #[error("link set-up timed out")]
    Timeout,
}

/// Traffic for the api thread.
#[derive(Debug)]
pub enum ApiEvent {
    /// A frame addressed to this node arrived from `src`.
    Frame {
        /// The node that sent it.
        src: u64,
        /// `Data`, `DeliveryReport` or `AppAck`.
        frame_type: FrameType,
        /// Its traffic class.
        traffic_class: TrafficClass,
        /// The payload, sharing the received WebSocket message's buffer.
        payload: Bytes,
    },
    /// A `Data` (or `DataBatch`) frame could not be sent: no route to its destination, or
    /// its next hop stayed congested past the wait.
    SendFailed {
        /// The message (the first of a batch).
        msg_id: u64,
        /// How many messages from `msg_id` on (1 for a `Data` frame).
        count: u32,
        /// The destination.
        dst: u64,
        /// Whether `dst` has ever been part of the mesh, as far as this node knows.
        known: bool,
        /// Why.
        why: SendFailure,
    },
    /// A stream frame (`StreamData`, `StreamReport`, `StreamOpen`) addressed to this node,
    /// its origin checked, for the stream worker that owns `header.stream_id`.
    Stream {
        /// Its header (stream id, seq, chunk index and count).
        header: Header,
        /// The payload without its origin tag.
        payload: Bytes,
    },
}

/// Why a `Data` frame of this node's did not go on (`ApiEvent::SendFailed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFailure {
    /// No live next hop towards the destination.
    NoRoute,
    /// The next hop had no room within the wait.
    Congested,
    /// It was written to a link that broke before the next hop confirmed reading it: it may
    /// or may not have arrived.
    Unconfirmed,
}

impl ApiEvent {
    /// The bytes it weighs on the api ring.
    pub fn weight(&self) -> usize {
        match self {
            Self::Frame { payload, .. } | Self::Stream { payload, .. } => payload.len(),
            Self::SendFailed { .. } => 0,
        }
    }
}

/// Payload bytes the rings from the shards to the control and api threads may hold, whatever
/// their item capacity (see `ring::weighed_ring`).
pub const EVENT_RING_BYTES: usize = 4 << 20;

/// The rings from the shards to the api thread. Data waits for subscribers (backpressure
/// that a flooding peer can hold for as long as it floods); system and DB data has a ring and
/// a delivery pump of its own, so it never waits behind client data held up by a slow
/// subscriber (the priority lane's other half); verdicts on this node's own sends (delivery
/// reports, application acks, send failures) are handled at once and never wait behind data,
/// so one peer's flood cannot stall another peer's link reader on its way to the api, nor
/// hide a send failure.
#[derive(Clone)]
pub struct ApiLanes {
    /// Client `Data` frames for this node's subscribers.
    pub data: crate::ring::Producer<ApiEvent>,
    /// System and DB-update `Data` frames for this node's subscribers.
    pub priority: crate::ring::Producer<ApiEvent>,
    /// Everything else.
    pub verdicts: crate::ring::Producer<ApiEvent>,
    /// Stream frames: one ring per stream worker, picked by [`stream_worker`].
    pub streams: Arc<[crate::ring::Producer<ApiEvent>]>,
}

/// The stream worker that owns `stream_id` among `workers` (at least one).
pub fn stream_worker(stream_id: u128, workers: usize) -> usize {
    debug_assert!(workers > 0);
    let folded = (stream_id as u64) ^ ((stream_id >> 64) as u64);
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % workers.max(1)
}

impl ApiLanes {
    pub fn stream_lane(&self, stream_id: u128) -> &crate::ring::Producer<ApiEvent> {
        &self.streams[stream_worker(stream_id, self.streams.len())]
    }

    /// The lane an event travels on.
    pub fn lane(&self, event: &ApiEvent) -> &crate::ring::Producer<ApiEvent> {
        match event {
            ApiEvent::Frame {
                frame_type: FrameType::Data | FrameType::DataBatch,
                traffic_class: TrafficClass::System | TrafficClass::DbUpdate,
                ..
            } => &self.priority,
            ApiEvent::Frame {
                frame_type: FrameType::Data | FrameType::DataBatch,
                ..
            } => &self.data,
            _ => &self.verdicts,
        }
    }
}

/// A shard's counters since it started.
#[derive(Clone, Debug, Default)]
pub struct ShardFigures {
    /// Frames dropped, by reason.
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    /// Frames whose next hop went down between routing and sending, routed again.
    pub reroutes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ring;

    #[test]
    fn a_db_update_crossing_shards_has_a_gauge_apart_from_client_data_to_the_same_hop() {
        let gauge = crate::congestion::Congestion::default();
        let client = forward_gauge_key(7, TrafficClass::Client);
        let db = forward_gauge_key(7, TrafficClass::DbUpdate);
        assert_eq!(client, 7);
        assert_eq!(db, forward_gauge_key(7, TrafficClass::System));
        gauge.add(client, crate::congestion::PER_DESTINATION_BYTES);
        assert!(gauge.is_congested(client));
        assert!(
            !gauge.is_congested(db),
            "a client flood must not hold a DB update"
        );
    }

    fn frame(frame_type: FrameType, traffic_class: TrafficClass) -> ApiEvent {
        ApiEvent::Frame {
            src: 1,
            frame_type,
            traffic_class,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn system_and_db_data_take_a_ring_of_their_own_to_the_api() {
        let lanes = ApiLanes {
            data: ring(4).0,
            priority: ring(4).0,
            verdicts: ring(4).0,
            streams: Arc::from(Vec::new()),
        };
        let is = |a: &crate::ring::Producer<ApiEvent>, b: &crate::ring::Producer<ApiEvent>| {
            std::ptr::eq(a, b)
        };
        for frame_type in [FrameType::Data, FrameType::DataBatch] {
            let client = frame(frame_type, TrafficClass::Client);
            assert!(is(lanes.lane(&client), &lanes.data));
            for class in [TrafficClass::System, TrafficClass::DbUpdate] {
                assert!(is(lanes.lane(&frame(frame_type, class)), &lanes.priority));
            }
        }
        // A verdict never waits behind data of either kind, whatever class it answers.
        let report = frame(FrameType::DeliveryReport, TrafficClass::DbUpdate);
        assert!(is(lanes.lane(&report), &lanes.verdicts));
        let failed = ApiEvent::SendFailed {
            why: SendFailure::NoRoute,
            msg_id: 1,
            count: 1,
            dst: 2,
            known: true,
        };
        assert!(is(lanes.lane(&failed), &lanes.verdicts));
    }
}
