//! One link to one peer: TLS, WebSocket, handshake, then three loops until it ends.
//!
//! ```text
//!  TcpStream ─► TLS 1.3 (futures-rustls) ─► WebSocket (async-tungstenite) ─► Handshake
//!      then, raced until the first ends:
//!        reader:    WS message ─► FrameReader ─► heartbeat acks / api ring / drop+count
//!        writer:    Outbox batch (many frames) ─► one WS binary message
//!        heartbeat: every interval, send Heartbeat; no traffic for `misses` intervals ─► down
//! ```
//! The thin shell around `handshake` and `frame`: all decisions live there.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::Future,
    mem,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use async_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};
use bytes::Bytes;
use event_listener::{Event, listener};
use futures::StreamExt;
use futures_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use glommio::net::TcpStream;
use meshd_proto::link::Goodbye;
use prost::Message as _;
use rand::RngCore;

use crate::{
    command::{ApiEvent, ControlEvent, DialError},
    frame::{self, FrameReader, FrameType, Header, TrafficClass},
    handshake::{Expectation, Handshake, Outcome, PeerInfo, Role},
    read_budget::ReadBudget,
    shard::{Shard, Wait},
    slice::Slice,
    stats::LinkStats,
    tls,
};

/// The WebSocket of an established link.
pub(crate) type LinkSocket = WebSocketStream<ReadBudget<TlsStream<TcpStream>>>;

/// Why a link ended.
#[derive(Debug)]
pub(crate) enum LinkEnd {
    /// The peer said goodbye.
    Goodbye(String),
    /// This node closed it (drop, shutdown, duplicate).
    Closed(String),
    /// No traffic for `misses` heartbeat intervals.
    Silent(Duration),
    /// The socket failed or closed.
    Broken(String),
    /// A write made no progress for this long: the peer stopped reading.
    Stalled(Duration),
}

impl LinkEnd {
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Goodbye(reason) => format!("peer said goodbye: {reason}"),
            Self::Closed(reason) => format!("closed here: {reason}"),
            Self::Silent(for_) => format!("no heartbeat for {} ms", for_.as_millis()),
            Self::Broken(why) => format!("socket failed: {why}"),
            Self::Stalled(for_) => format!(
                "peer stopped reading: a write made no progress for {} ms",
                for_.as_millis()
            ),
        }
    }
}

/// Largest WebSocket message the writer produces, unless one frame alone is larger: a new
/// batch is started before a frame that would take the current one past this. Keeps every
/// message under the receiver's limit whatever either side's queue bound is.
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Room above the data bound that control frames (heartbeats and their acks, goodbyes,
/// routing, gossip, join) may use, so a link full of data is not declared dead for lack of
/// heartbeats. Past it, control frames are dropped too: a peer that floods heartbeats at a
/// link that cannot drain grows nothing.
pub(crate) const CONTROL_ALLOWANCE_BYTES: usize = 64 * 1024;

/// Join frames a guest link carries each way: the join request and the key proof one way, the
/// challenge and the answer the other (`control::lifecycle::pake` in the appliance).
const MAX_JOIN_FRAMES: u32 = 2;

/// Largest payload a frame may have on a control lane. Served-first frames above it (a Raft
/// append of big entries, a snapshot chunk) go in the data queue instead, so a control lane
/// write never takes long, and a control lane reader refuses anything bigger: a peer cannot
/// make the lane that carries liveness carry bulk.
pub(crate) const CONTROL_LANE_MAX_PAYLOAD: usize = 64 * 1024;

/// Bytes of heartbeats and acks one lane may have waiting (its own, written before anything
/// else on that connection). A lane that cannot write them is about to be declared stalled.
const BEATS_BOUND_BYTES: usize = 4 * 1024;

/// What one WebSocket read asks TLS for (see [`set_up`]).
const READ_BUFFER_BYTES: usize = 32 * 1024;

/// Which connection of a link a writer (or reader) serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The link's first connection: client data and stream frames, goodbyes, and whatever
    /// another lane would carry while that lane is not attached.
    Data = 0,
    /// The control lane: frames served first ([`FrameType::is_served_first`]) up to
    /// [`CONTROL_LANE_MAX_PAYLOAD`], and its own heartbeats.
    Control = 1,
    /// The priority lane: system and internal-DB traffic ([`TrafficClass::System`],
    /// [`TrafficClass::DbUpdate`]) that is not served first, so a DB update never queues
    /// behind client data.
    Priority = 2,
}

impl Lane {
    /// Every lane, indexed by its number.
    pub(crate) const ALL: [Self; 3] = [Self::Data, Self::Control, Self::Priority];

    /// The name in sessions, metrics and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Control => "control",
            Self::Priority => "priority",
        }
    }

    /// The lane `Hello.lane` names, if any.
    pub(crate) fn from_hello(lane: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(lane).ok()?).copied()
    }

    /// Lanes a link runs when its ends say they run `lanes` (`Hello.lanes`) each: a side lane
    /// is dialed only when both ends run it.
    pub(crate) fn runs(self, local_lanes: u32, peer_lanes: u32) -> bool {
        local_lanes.min(peer_lanes) > self as u32
    }

    /// Where a frame waits in an [`Outbox`] (and so which lane carries it when attached):
    /// served first within the control cap, else system and DB traffic, else data.
    pub(crate) fn of(header: &Header, payload_len: usize) -> Self {
        if header.frame_type.is_served_first() && payload_len <= CONTROL_LANE_MAX_PAYLOAD {
            Self::Control
        } else if matches!(
            header.traffic_class,
            TrafficClass::System | TrafficClass::DbUpdate
        ) && header.frame_type != FrameType::Goodbye
        {
            Self::Priority
        } else {
            Self::Data
        }
    }

    /// Whether this lane's reader takes such a frame: the data lane takes anything (it stands
    /// in for a side lane that is down); a side lane only what [`Lane::of`] gives it, its own
    /// heartbeats and a goodbye, so a peer cannot make a side lane carry bulk.
    pub(crate) fn accepts(self, header: &Header, payload_len: usize) -> bool {
        self == Self::Data
            || matches!(
                header.frame_type,
                FrameType::Goodbye | FrameType::Heartbeat | FrameType::HeartbeatAck
            )
            || Self::of(header, payload_len) == self
    }
}

/// Frames waiting to be written to one link, batched into WebSocket messages.
///
/// Three shared queues, one per [`Lane`] ([`Lane::of`] picks): frames that are served first
/// ([`FrameType::is_served_first`]: heartbeats, routing, gossip, Raft, delivery reports and
/// acks, each up to [`CONTROL_LANE_MAX_PAYLOAD`]), system and DB traffic, and everything
/// else; and per lane a small queue of that connection's own heartbeats and acks. Senders
/// encode straight into a queue's open batch. A side lane (control, priority) that is
/// attached writes its queue, so a heartbeat, a Raft message or a DB update never waits
/// behind client data, not even in the kernel's socket buffers; while one is not attached
/// the data lane's writer takes its queue before any data batch (control, then priority,
/// then data). Data frames are queued while fewer than `max_pending_bytes` wait (the shared
/// queues counted; [`Outbox::push`] waits for room, [`Outbox::try_push`] does not);
/// served-first frames, and control frames pushed with [`Outbox::push_now`], may use
/// [`CONTROL_ALLOWANCE_BYTES`] more. Nothing else ever grows it.
pub(crate) struct Outbox {
    inner: RefCell<OutboxInner>,
    /// Per lane: something to write.
    ready: [Event; 3],
    room: Event,
    max_pending_bytes: usize,
    max_payload_bytes: usize,
}

struct OutboxInner {
    /// The shared queues, indexed by [`Lane`].
    queues: [Queue; 3],
    /// Each lane's own heartbeats and heartbeat acks, indexed by [`Lane`].
    beats: [Queue; 3],
    /// Per side lane: attached, writing its queue (the data lane is always).
    attached: [bool; 3],
    /// Bytes in the shared queues.
    queued: usize,
    closing: Option<String>,
}

impl OutboxInner {
    /// The lane whose writer takes `queue`'s batches now.
    fn writer_of(&self, queue: Lane) -> Lane {
        if self.attached[queue as usize] {
            queue
        } else {
            Lane::Data
        }
    }
}

/// One queue of an [`Outbox`]: sealed batches and the open one.
#[derive(Default)]
struct Queue {
    sealed: VecDeque<(Vec<u8>, u64)>,
    batch: Vec<u8>,
    frames: u64,
    /// Bytes in `sealed` and `batch`.
    bytes: usize,
}

impl Queue {
    /// Encodes a frame into the open batch (sealing it first when the frame would overfill
    /// it); returns the bytes added.
    fn encode(
        &mut self,
        header: &Header,
        payload: &[u8],
        max_payload: usize,
    ) -> Result<usize, OutboxError> {
        let frame_len = frame::HEADER_LEN + payload.len();
        if !self.batch.is_empty() && self.batch.len() + frame_len > MAX_BATCH_BYTES {
            let batch = mem::take(&mut self.batch);
            let frames = mem::take(&mut self.frames);
            self.sealed.push_back((batch, frames));
        }
        if self.batch.capacity() == 0 {
            self.batch
                .reserve(frame_len.clamp(64 * 1024, MAX_BATCH_BYTES));
        }
        let before = self.batch.len();
        frame::encode_into(&mut self.batch, header, payload, max_payload)
            .map_err(|_| OutboxError::Oversized)?;
        self.frames += 1;
        let added = self.batch.len() - before;
        self.bytes += added;
        Ok(added)
    }

    /// The oldest sealed batch, else the open one.
    fn take(&mut self) -> Option<(Vec<u8>, u64)> {
        let taken = self.sealed.pop_front().or_else(|| {
            (!self.batch.is_empty())
                .then(|| (mem::take(&mut self.batch), mem::take(&mut self.frames)))
        });
        if let Some((batch, _)) = &taken {
            self.bytes -= batch.len();
        }
        taken
    }
}

/// What the writer takes from the outbox.
enum Take {
    Batch(Vec<u8>, u64),
    Closed(String),
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OutboxError {
    /// The link is closing or closed.
    Closed,
    /// The payload exceeds the maximum frame payload.
    Oversized,
    /// The outbox is at its bound (and, for a waiting push, stayed there for the whole wait).
    Full,
}

impl Outbox {
    pub(crate) fn new(max_pending_bytes: usize, max_payload_bytes: usize) -> Self {
        Self {
            inner: RefCell::new(OutboxInner {
                queues: Default::default(),
                beats: Default::default(),
                attached: [true, false, false],
                queued: 0,
                closing: None,
            }),
            ready: [Event::new(), Event::new(), Event::new()],
            room: Event::new(),
            max_pending_bytes,
            max_payload_bytes,
        }
    }

    /// Queues a data frame, waiting while the outbox is at its bound: until there is room,
    /// the link closes, or `limit` passes (then [`OutboxError::Full`]).
    ///
    /// The wait is on this link's writer, whose every write has a deadline, so it ends.
    pub(crate) async fn push(
        &self,
        header: &Header,
        payload: &[u8],
        limit: Duration,
    ) -> Result<(), OutboxError> {
        match self.try_push(header, payload) {
            Err(OutboxError::Full) => {}
            other => return other,
        }
        let waited = timeout(limit, async {
            loop {
                listener!(self.room => room);
                match self.try_push(header, payload) {
                    Err(OutboxError::Full) => {}
                    other => return other,
                }
                room.await;
                match self.try_push(header, payload) {
                    Err(OutboxError::Full) => {}
                    other => return other,
                }
            }
        })
        .await;
        waited.unwrap_or(Err(OutboxError::Full))
    }

    /// Queues a data frame if the outbox is under its bound.
    pub(crate) fn try_push(&self, header: &Header, payload: &[u8]) -> Result<(), OutboxError> {
        self.queue(header, payload, self.max_pending_bytes)
    }

    /// Queues a control frame at once, past the data bound by up to
    /// [`CONTROL_ALLOWANCE_BYTES`].
    pub(crate) fn push_now(&self, header: &Header, payload: &[u8]) -> Result<(), OutboxError> {
        self.queue(
            header,
            payload,
            self.max_pending_bytes + CONTROL_ALLOWANCE_BYTES,
        )
    }

    /// Queues a heartbeat or heartbeat ack of `lane`, written on that connection before
    /// anything else (its round trip measures that connection).
    pub(crate) fn push_beat(&self, lane: Lane, header: &Header) -> Result<(), OutboxError> {
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_some() {
            return Err(OutboxError::Closed);
        }
        let queue = &mut inner.beats[lane as usize];
        if queue.bytes >= BEATS_BOUND_BYTES {
            return Err(OutboxError::Full);
        }
        queue.encode(header, &[], self.max_payload_bytes)?;
        drop(inner);
        self.ready[lane as usize].notify(1);
        Ok(())
    }

    fn queue(&self, header: &Header, payload: &[u8], bound: usize) -> Result<(), OutboxError> {
        let queue = Lane::of(header, payload.len());
        let bound = if queue == Lane::Control {
            bound.max(self.max_pending_bytes + CONTROL_ALLOWANCE_BYTES)
        } else {
            bound
        };
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_some() {
            return Err(OutboxError::Closed);
        }
        // System and DB traffic has a bound of its own, so a data flood cannot refuse it; the
        // served-first and data queues share theirs as before.
        let priority = inner.queues[Lane::Priority as usize].bytes;
        let held = match queue {
            Lane::Priority => priority,
            Lane::Control | Lane::Data => inner.queued - priority,
        };
        if held >= bound {
            return Err(OutboxError::Full);
        }
        let lane = inner.writer_of(queue);
        let added = inner.queues[queue as usize].encode(header, payload, self.max_payload_bytes)?;
        inner.queued += added;
        drop(inner);
        self.ready[lane as usize].notify(1);
        Ok(())
    }

    /// A side lane now writes its queue (`true`), or no longer does and the data lane takes
    /// it back at once (`false`; what the lost connection had taken is gone with it, as on
    /// any broken connection). The data lane is always attached.
    pub(crate) fn set_attached(&self, lane: Lane, attached: bool) {
        if lane == Lane::Data {
            return;
        }
        self.inner.borrow_mut().attached[lane as usize] = attached;
        for ready in &self.ready {
            ready.notify(usize::MAX);
        }
    }

    /// Bytes waiting for `lane` now (its own heartbeats included).
    pub(crate) fn queued_for(&self, lane: Lane) -> usize {
        let inner = self.inner.borrow();
        let shared: usize = Lane::ALL
            .iter()
            .filter(|&&queue| inner.writer_of(queue) == lane)
            .map(|&queue| inner.queues[queue as usize].bytes)
            .sum();
        inner.beats[lane as usize].bytes + shared
    }

    /// Stops accepting frames; the writers flush what is queued, then end the link.
    pub(crate) fn close(&self, reason: String) {
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_none() {
            inner.closing = Some(reason);
        }
        drop(inner);
        for ready in &self.ready {
            ready.notify(usize::MAX);
        }
        self.room.notify(usize::MAX);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.inner.borrow().closing.is_some()
    }

    fn try_take(&self, lane: Lane) -> Option<Take> {
        let mut inner = self.inner.borrow_mut();
        if let Some((batch, frames)) = inner.beats[lane as usize].take() {
            return Some(Take::Batch(batch, frames));
        }
        // Served first, then system and DB traffic, then data: the order the data lane takes
        // what it stands in for.
        let mut taken = None;
        for queue in [Lane::Control, Lane::Priority, Lane::Data] {
            if inner.writer_of(queue) == lane {
                taken = inner.queues[queue as usize].take();
                if taken.is_some() {
                    break;
                }
            }
        }
        if let Some((batch, frames)) = taken {
            inner.queued -= batch.len();
            drop(inner);
            self.room.notify(usize::MAX);
            return Some(Take::Batch(batch, frames));
        }
        inner
            .closing
            .as_ref()
            .map(|reason| Take::Closed(reason.clone()))
    }

    async fn take(&self, lane: Lane) -> Take {
        loop {
            if let Some(take) = self.try_take(lane) {
                return take;
            }
            listener!(self.ready[lane as usize] => ready);
            if let Some(take) = self.try_take(lane) {
                return take;
            }
            ready.await;
        }
    }
}

/// Runs `future` for at most `limit`.
pub(crate) async fn timeout<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    futures_lite::future::or(async { Some(future.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}

/// TLS, WebSocket and handshake on a socket whose preamble has been exchanged.
pub(crate) async fn set_up(
    shard: &Shard,
    stream: TcpStream,
    role: Role,
    peer_hint: u64,
    lane: Lane,
) -> Result<(LinkSocket, PeerInfo), DialError> {
    let config = &shard.config;
    // tungstenite zeroes `read_buffer_size` bytes before every read, and a read from TLS
    // returns at most a few 16 KiB records: its 128 KiB default was 2-3 % of all CPU in the
    // 256 B profile (memset in `read_in`).
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(config.max_message_bytes()))
        .max_frame_size(Some(config.max_message_bytes()));
    let (socket, exporter, budget) = match role {
        Role::Dialer => {
            let connector = TlsConnector::from(std::sync::Arc::clone(&config.tls_client));
            let tls = connector
                .connect(tls::server_name(), stream)
                .await
                .map_err(|e| DialError::Setup(format!("TLS: {e}")))?;
            let exporter = tls
                .get_ref()
                .1
                .export_keying_material([0u8; 32], tls::EXPORTER_LABEL, None)
                .map_err(|e| DialError::Setup(format!("TLS exporter: {e}")))?;
            let url = format!("wss://{}/mesh/v1", tls::SERVER_NAME);
            let (budgeted, budget) = ReadBudget::new(TlsStream::Client(tls));
            let (socket, _) =
                async_tungstenite::client_async_with_config(url, budgeted, Some(ws_config))
                    .await
                    .map_err(|e| DialError::Setup(format!("WebSocket: {e}")))?;
            (socket, exporter, budget)
        }
        Role::Acceptor => {
            let acceptor = TlsAcceptor::from(std::sync::Arc::clone(&config.tls_server));
            let tls = acceptor
                .accept(stream)
                .await
                .map_err(|e| DialError::Setup(format!("TLS: {e}")))?;
            let exporter = tls
                .get_ref()
                .1
                .export_keying_material([0u8; 32], tls::EXPORTER_LABEL, None)
                .map_err(|e| DialError::Setup(format!("TLS exporter: {e}")))?;
            let (budgeted, budget) = ReadBudget::new(TlsStream::Server(tls));
            let socket = async_tungstenite::accept_async_with_config(budgeted, Some(ws_config))
                .await
                .map_err(|e| DialError::Setup(format!("WebSocket: {e}")))?;
            (socket, exporter, budget)
        }
    };
    let established = handshake(shard, socket, role, peer_hint, exporter, lane).await?;
    // Proven: from here on the WebSocket's own (data) limit applies.
    budget.set(None);
    Ok(established)
}

async fn handshake(
    shard: &Shard,
    mut socket: LinkSocket,
    role: Role,
    peer_hint: u64,
    exporter: [u8; 32],
    lane: Lane,
) -> Result<(LinkSocket, PeerInfo), DialError> {
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let expectation = Expectation {
        node_id_hint: Some(peer_hint),
        pinned_key: shard.pinned_key(peer_hint),
        now_ms,
    };
    let mut local_hello = shard.local_hello();
    local_hello.lane = lane as u32;
    let mut machine = Handshake::new(
        role,
        &local_hello,
        shard.config.signing_key.clone(),
        exporter,
        nonce,
        expectation,
    );
    loop {
        while let Some(message) = machine.poll_transmit() {
            socket
                .send(Message::Binary(message.into()))
                .await
                .map_err(|e| DialError::Setup(format!("handshake write: {e}")))?;
        }
        if machine.is_done() {
            break;
        }
        match socket.next().await {
            Some(Ok(Message::Binary(message))) => machine.handle_message(&message),
            Some(Ok(Message::Close(_))) | None => {
                return Err(DialError::Setup(
                    "peer closed the connection during the handshake".into(),
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(DialError::Setup(format!("handshake read: {e}"))),
        }
    }
    match machine.outcome() {
        Some(Outcome::Established(peer)) => Ok((socket, peer.clone())),
        Some(Outcome::Refused {
            reason,
            detail,
            by_peer,
        }) => {
            let who = if *by_peer {
                "peer refused this node"
            } else {
                "this node refused the peer"
            };
            tracing::warn!(peer_hint, ?reason, %detail, "link handshake failed: {who}");
            // Let the refusal reach the peer before the socket goes away.
            let _ = timeout(Duration::from_millis(200), socket.close(None)).await;
            Err(DialError::Refused(format!("{who}: {reason:?}: {detail}")))
        }
        None => Err(DialError::Setup(
            "handshake ended without an outcome".into(),
        )),
    }
}

/// Tells the heartbeat loop when the reader is held up by backpressure from this node (a
/// full ring towards the api or control thread, or a full outbox of the next hop): unread
/// frames then say nothing about the peer, so the silence clock stops while the reader waits
/// and restarts when it resumes.
struct ReadGate {
    waiting: Cell<bool>,
    resumed: Cell<Instant>,
}

impl ReadGate {
    async fn hold<F: Future>(&self, future: F) -> F::Output {
        self.waiting.set(true);
        let output = future.await;
        self.waiting.set(false);
        self.resumed.set(Instant::now());
        output
    }

    /// How long the peer has been silent, not counting time the reader spent held up here.
    fn silent_for(&self, stats: &LinkStats) -> Option<Duration> {
        if self.waiting.get() {
            return None;
        }
        Some(
            stats
                .last_received()
                .elapsed()
                .min(self.resumed.get().elapsed()),
        )
    }
}

/// A payload handed to another thread, where it may wait (a subscriber's queue, the control
/// loop). A small payload is copied out so it does not pin the whole WebSocket message it
/// arrived in (up to [`MAX_BATCH_BYTES`] per 200-byte message otherwise).
fn detach(message: &Bytes, payload: &[u8]) -> Bytes {
    if payload.len() * 4 < message.len() {
        Bytes::copy_from_slice(payload)
    } else {
        message.slice_ref(payload)
    }
}

/// Carries traffic on one established connection (`lane`) of a link until it ends.
///
/// A control lane's reader takes only frames served first, each within
/// [`CONTROL_LANE_MAX_PAYLOAD`], and never waits on anything data can fill: a relayed frame
/// that finds no room at its next hop is dropped and counted (gossip tolerates loss; LSAs,
/// Raft and waiting sends retransmit). Anything else on it is a protocol violation that ends
/// the lane.
pub(crate) async fn run(
    shard: Rc<Shard>,
    socket: LinkSocket,
    peer: u64,
    guest: bool,
    outbox: Rc<Outbox>,
    stats: Rc<LinkStats>,
    lane: Lane,
) -> LinkEnd {
    let (mut sink, mut stream) = socket.split();
    let config = &shard.config;
    let local = config.local.node_id;
    let epoch = shard.epoch;
    let max_payload = config.max_payload_bytes;
    let relay_wait = config.relay_wait();
    let gate = ReadGate {
        waiting: Cell::new(false),
        resumed: Cell::new(Instant::now()),
    };
    let mut join_frames_seen = 0u32;

    let reader = async {
        let mut slice = Slice::new();
        loop {
            let message = match stream.next().await {
                Some(Ok(Message::Binary(message))) => message,
                Some(Ok(Message::Close(_))) | None => {
                    return LinkEnd::Broken("peer closed the socket".into());
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return LinkEnd::Broken(e.to_string()),
            };
            stats.on_received(message.len(), Instant::now());
            if lane != Lane::Control {
                // A flood keeps this loop busy without ever waiting: let the executor reap
                // the control lanes' I/O now and then.
                slice.check().await;
            }
            for decoded in FrameReader::new(&message, max_payload) {
                let frame = match decoded {
                    Ok(frame) => frame,
                    Err(error) => {
                        stats.on_frame_dropped();
                        shard.count_drop(error.kind());
                        tracing::debug!(peer, %error, "dropped a malformed frame");
                        continue;
                    }
                };
                stats.on_frame_received();
                let header = frame.header;
                if !lane.accepts(&header, frame.payload.len()) {
                    stats.on_frame_dropped();
                    shard.count_drop(match lane {
                        Lane::Priority => "not_for_priority_lane",
                        _ => "not_for_control_lane",
                    });
                    return LinkEnd::Closed(format!(
                        "the peer sent a {:?} frame ({:?}) of {} bytes on the {} lane",
                        header.frame_type,
                        header.traffic_class,
                        frame.payload.len(),
                        lane.name()
                    ));
                }
                match header.frame_type {
                    FrameType::Heartbeat => {
                        let mut ack = Header::new(
                            FrameType::HeartbeatAck,
                            TrafficClass::Control,
                            local,
                            peer,
                        );
                        ack.seq = header.seq;
                        if outbox.push_beat(lane, &ack) == Err(OutboxError::Full) {
                            shard.count_drop("heartbeat_ack_outbox_full");
                        }
                    }
                    FrameType::HeartbeatAck => {
                        let now_us = epoch.elapsed().as_micros() as u64;
                        if header.seq <= now_us {
                            stats.on_rtt_sample(now_us - header.seq);
                        }
                    }
                    FrameType::Goodbye => {
                        let goodbye = Goodbye::decode(frame.payload).unwrap_or_default();
                        return LinkEnd::Goodbye(goodbye.reason);
                    }
                    FrameType::Join | FrameType::JoinAnswer => {
                        if header.src != peer || !guest {
                            stats.on_frame_dropped();
                            shard.count_drop("join_off_guest_link");
                            continue;
                        }
                        // One exchange per guest link (a request and a proof, a challenge
                        // and an answer): a joiner that wants to try again dials again, and
                        // pays for a handshake each time.
                        join_frames_seen += 1;
                        if join_frames_seen > MAX_JOIN_FRAMES {
                            shard.count_drop("join_repeated");
                            return LinkEnd::Closed("more than one join on a guest link".into());
                        }
                        let event = ControlEvent::Join {
                            from: peer,
                            frame_type: header.frame_type,
                            payload: detach(&message, frame.payload),
                        };
                        gate.hold(shard.emit(event)).await;
                    }
                    _ if guest => {
                        // A guest link carries the join exchange and nothing else.
                        stats.on_frame_dropped();
                        shard.count_drop("guest_link");
                    }
                    FrameType::Routing => {
                        // Neighbour-only: the sender must be the authenticated peer.
                        if header.src != peer {
                            stats.on_frame_dropped();
                            shard.count_drop("misaddressed");
                            continue;
                        }
                        let payload = detach(&message, frame.payload);
                        gate.hold(shard.emit_routing(peer, payload)).await;
                    }
                    FrameType::Data
                    | FrameType::DataBatch
                    | FrameType::DeliveryReport
                    | FrameType::AppAck
                    | FrameType::StreamData
                    | FrameType::StreamReport
                    | FrameType::StreamOpen
                    | FrameType::Gossip
                    | FrameType::Raft => {
                        if header.dst != local {
                            // A relay: pass it on with one hop less to live.
                            if header.ttl <= 1 || header.src == local {
                                stats.on_frame_dropped();
                                shard.count_drop(if header.ttl <= 1 {
                                    "ttl_expired"
                                } else {
                                    "looped"
                                });
                                continue;
                            }
                            let mut relayed = header;
                            relayed.ttl -= 1;
                            // Hop-by-hop backpressure, but bounded: a next hop that cannot
                            // take the frame within `relay_wait` loses it (counted), so a
                            // stuck peer downstream never holds this link's reader long
                            // enough for the sender upstream to give up on this link.
                            // Control-plane frames (on a collapsed link they come on the data
                            // lane) never wait behind data, here or on the next shard.
                            let wait =
                                if lane == Lane::Control || relayed.frame_type.is_served_first() {
                                    Wait::Control
                                } else {
                                    Wait::Upto(relay_wait)
                                };
                            let routed = gate
                                .hold(shard.route(
                                    relayed,
                                    message.slice_ref(frame.payload),
                                    1,
                                    wait,
                                ))
                                .await;
                            if let Err(error) = routed {
                                shard.relay_failed(&relayed, &error).await;
                            }
                            continue;
                        }
                        // Addressed here: its tag must prove its source before anything
                        // else reads it (a relay or neighbour could have written any src).
                        let opened = shard
                            .keys
                            .borrow_mut()
                            .get(&shard.config.key_book)
                            .open(&header, frame.payload)
                            .map(|body| body.len());
                        let body = match opened {
                            Ok(len) => &frame.payload[..len],
                            Err(error) => {
                                stats.on_frame_dropped();
                                shard.count_refused_source(header.src, error);
                                continue;
                            }
                        };
                        let payload = detach(&message, body);
                        if header.frame_type == FrameType::Gossip {
                            gate.hold(shard.emit_gossip(header.src, payload)).await;
                            continue;
                        }
                        if header.frame_type == FrameType::Raft {
                            gate.hold(shard.emit(ControlEvent::Raft {
                                from: header.src,
                                payload,
                            }))
                            .await;
                            continue;
                        }
                        if matches!(
                            header.frame_type,
                            FrameType::StreamData | FrameType::StreamReport | FrameType::StreamOpen
                        ) {
                            // Never waited for: a full stream worker loses the frame (counted)
                            // and the stream protocol sends it again.
                            let lane = shard.api_tx.stream_lane(header.stream_id);
                            if lane.try_push(ApiEvent::Stream { header, payload }).is_err() {
                                stats.on_frame_dropped();
                                shard.count_drop("stream_queue_full");
                            }
                            continue;
                        }
                        let event = ApiEvent::Frame {
                            src: header.src,
                            frame_type: header.frame_type,
                            traffic_class: header.traffic_class,
                            payload,
                        };
                        let lane = shard.api_tx.lane(&event);
                        if gate.hold(lane.push(event)).await.is_err() {
                            return LinkEnd::Closed("api thread stopped".into());
                        }
                    }
                    FrameType::Hello | FrameType::Auth | FrameType::Refuse => {
                        stats.on_frame_dropped();
                        shard.count_drop("handshake_after_established");
                    }
                }
            }
        }
    };

    let write_timeout = config.write_timeout;
    // When the write in progress started. A peer that stops reading fills its TCP window and
    // the write never completes; the heartbeat loop (already awake every interval) ends the
    // link past the deadline, which frees every sender waiting on this outbox. No timer is
    // armed per write.
    let writing_since: Cell<Option<Instant>> = Cell::new(None);
    let writer = async {
        let mut slice = Slice::new();
        loop {
            if lane != Lane::Control {
                slice.check().await;
            }
            match outbox.take(lane).await {
                Take::Batch(batch, frames) => {
                    let len = batch.len();
                    writing_since.set(Some(Instant::now()));
                    let sent = sink.send(Message::Binary(Bytes::from(batch))).await;
                    writing_since.set(None);
                    match sent {
                        Ok(()) => stats.on_sent(len, frames),
                        Err(e) => return LinkEnd::Broken(e.to_string()),
                    }
                }
                Take::Closed(reason) => {
                    let _ = timeout(Duration::from_millis(200), sink.close(None)).await;
                    return LinkEnd::Closed(reason);
                }
            }
        }
    };

    let heartbeat = async {
        let interval = config.heartbeat_interval;
        let silence_limit = interval * config.heartbeat_misses;
        loop {
            glommio::timer::sleep(interval).await;
            if writing_since
                .get()
                .is_some_and(|since| since.elapsed() > write_timeout)
            {
                return LinkEnd::Stalled(write_timeout);
            }
            if let Some(silent_for) = gate.silent_for(&stats)
                && silent_for > silence_limit
            {
                return LinkEnd::Silent(silent_for);
            }
            let mut beat = Header::new(FrameType::Heartbeat, TrafficClass::Control, local, peer);
            beat.seq = epoch.elapsed().as_micros() as u64;
            stats.on_heartbeat_sent();
            match outbox.push_beat(lane, &beat) {
                Ok(()) | Err(OutboxError::Full | OutboxError::Oversized) => {}
                Err(OutboxError::Closed) => {
                    // Closing: the writer decides when the link ends.
                    futures::future::pending::<()>().await;
                }
            }
        }
    };

    // A guest link exists for one join exchange; it never outlives a handshake's time.
    let lifetime = async {
        if !guest {
            return futures::future::pending::<LinkEnd>().await;
        }
        glommio::timer::sleep(config.handshake_timeout).await;
        LinkEnd::Closed("guest link lifetime over".into())
    };

    futures_lite::future::or(
        reader,
        futures_lite::future::or(writer, futures_lite::future::or(heartbeat, lifetime)),
    )
    .await
}

/// Encodes a goodbye for `peer`.
pub(crate) fn goodbye(local: u64, peer: u64, reason: &str) -> (Header, Vec<u8>) {
    let header = Header::new(FrameType::Goodbye, TrafficClass::Control, local, peer);
    let payload = Goodbye {
        reason: reason.to_owned(),
    }
    .encode_to_vec();
    (header, payload)
}

/// The socket address of a glommio stream, for logs and session figures.
pub(crate) fn peer_addr(stream: &TcpStream) -> SocketAddr {
    stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameType, TrafficClass};

    fn header(frame_type: FrameType) -> Header {
        Header::new(frame_type, TrafficClass::Client, 1, 2)
    }

    /// What the data lane's writer would send next: the frame types of one WebSocket message.
    fn next_message(outbox: &Outbox) -> Vec<FrameType> {
        next_on(outbox, Lane::Data)
    }

    /// What `lane`'s writer would send next.
    fn next_on(outbox: &Outbox, lane: Lane) -> Vec<FrameType> {
        let Some(Take::Batch(batch, frames)) = outbox.try_take(lane) else {
            return Vec::new();
        };
        let mut types = Vec::new();
        let mut rest = &batch[..];
        while !rest.is_empty() {
            let (frame, used) = frame::decode(rest, 4 << 20).expect("a frame the outbox encoded");
            types.push(frame.header.frame_type);
            rest = &rest[used..];
        }
        assert_eq!(types.len() as u64, frames);
        types
    }

    #[test]
    fn heartbeats_raft_and_reports_overtake_queued_data_in_their_own_order() {
        use FrameType::{AppAck, Data, DeliveryReport, Goodbye, Heartbeat, Raft};
        let outbox = Outbox::new(1 << 20, 4 << 20);
        // 600 KiB of data first: three WebSocket messages' worth.
        for _ in 0..3 {
            outbox.try_push(&header(Data), &[0; 200 << 10]).unwrap();
        }
        outbox.push_beat(Lane::Data, &header(Heartbeat)).unwrap();
        outbox.try_push(&header(Raft), b"append").unwrap();
        outbox.try_push(&header(Data), b"late").unwrap();
        outbox.try_push(&header(DeliveryReport), b"run").unwrap();
        outbox.push_now(&header(Goodbye), b"bye").unwrap();
        outbox.try_push(&header(AppAck), b"ack").unwrap();

        // The lane's own heartbeat alone (it measures this connection), then the rest.
        assert_eq!(next_message(&outbox), [Heartbeat]);
        assert_eq!(next_message(&outbox), [Raft, DeliveryReport, AppAck]);
        // Then the data, in order, the goodbye after everything queued before it.
        let mut rest = Vec::new();
        loop {
            let message = next_message(&outbox);
            if message.is_empty() {
                break;
            }
            rest.extend(message);
        }
        assert_eq!(rest, [Data, Data, Data, Data, Goodbye]);
    }

    #[test]
    fn served_first_frames_get_the_control_allowance_when_data_fills_the_outbox() {
        use FrameType::{Data, Gossip, Raft};
        let outbox = Outbox::new(64 << 10, 4 << 20);
        while outbox.try_push(&header(Data), &[0; 8 << 10]).is_ok() {}
        assert_eq!(
            outbox.try_push(&header(Data), b"more"),
            Err(OutboxError::Full)
        );
        outbox.try_push(&header(Raft), &[0; 1024]).unwrap();
        outbox.try_push(&header(Gossip), &[0; 1024]).unwrap();
        // The allowance is a bound too: a flood of them stops at it.
        let mut queued = 0;
        while outbox.try_push(&header(Raft), &[0; 1024]).is_ok() {
            queued += 1;
            assert!(
                queued < 100,
                "served-first frames grew the outbox unbounded"
            );
        }
        assert_eq!(next_message(&outbox)[0], Raft);
    }

    #[test]
    fn with_a_control_lane_attached_served_first_frames_leave_by_it_and_come_back_when_it_goes() {
        use FrameType::{Data, DeliveryReport, Goodbye, Heartbeat, HeartbeatAck, Raft};
        let outbox = Outbox::new(1 << 20, 4 << 20);
        outbox.set_attached(Lane::Control, true);
        outbox.try_push(&header(Data), &[0; 1000]).unwrap();
        outbox.try_push(&header(Raft), b"vote").unwrap();
        outbox.push_beat(Lane::Control, &header(Heartbeat)).unwrap();
        outbox.push_beat(Lane::Data, &header(HeartbeatAck)).unwrap();
        // A served-first frame too big for the control lane rides with the data.
        outbox
            .try_push(&header(Raft), &[0; CONTROL_LANE_MAX_PAYLOAD + 1])
            .unwrap();
        assert_eq!(outbox.queued_for(Lane::Control), 2 * frame::HEADER_LEN + 4);
        // Each lane's own beats first, then its queue; neither writer sees the other's.
        assert_eq!(next_on(&outbox, Lane::Control), [Heartbeat]);
        assert_eq!(next_on(&outbox, Lane::Control), [Raft]);
        assert!(next_on(&outbox, Lane::Control).is_empty());
        assert_eq!(next_on(&outbox, Lane::Data), [HeartbeatAck]);
        assert_eq!(next_on(&outbox, Lane::Data), [Data, Raft]);
        // The control lane goes: what is queued for it is the data lane's again.
        outbox.try_push(&header(DeliveryReport), b"run").unwrap();
        outbox.set_attached(Lane::Control, false);
        assert_eq!(next_on(&outbox, Lane::Data), [DeliveryReport]);
        // Closing: each lane flushes its queue, then sees the end.
        outbox.set_attached(Lane::Control, true);
        outbox.try_push(&header(Raft), b"last").unwrap();
        outbox.push_now(&header(Goodbye), b"bye").unwrap();
        outbox.close("shutdown".into());
        assert_eq!(next_on(&outbox, Lane::Data), [Goodbye]);
        assert_eq!(next_on(&outbox, Lane::Control), [Raft]);
        assert!(matches!(
            outbox.try_take(Lane::Control),
            Some(Take::Closed(_))
        ));
        assert!(matches!(outbox.try_take(Lane::Data), Some(Take::Closed(_))));
    }

    #[test]
    fn system_and_db_traffic_takes_the_priority_lane_and_never_waits_behind_client_data() {
        use FrameType::{Data, DataBatch, Heartbeat, Raft};
        let of = |class| Header::new(Data, class, 1, 2);
        let outbox = Outbox::new(64 * 1024, 4 << 20);
        // Client data fills the data bound; a DB update still finds room.
        while outbox.try_push(&header(Data), &[0; 4096]).is_ok() {}
        outbox.try_push(&of(TrafficClass::DbUpdate), b"db").unwrap();
        // Without a priority lane, the data lane writes it before any client data.
        assert_eq!(next_on(&outbox, Lane::Data), [Data]);
        outbox.set_attached(Lane::Priority, true);
        outbox
            .try_push(&Header::new(DataBatch, TrafficClass::System, 1, 2), b"sys")
            .unwrap();
        // A big Raft message (over the control cap) of the system class rides priority too.
        outbox
            .try_push(
                &Header::new(Raft, TrafficClass::System, 1, 2),
                &[0; CONTROL_LANE_MAX_PAYLOAD + 1],
            )
            .unwrap();
        outbox
            .push_beat(Lane::Priority, &header(Heartbeat))
            .unwrap();
        assert_eq!(next_on(&outbox, Lane::Priority), [Heartbeat]);
        assert_eq!(next_on(&outbox, Lane::Priority), [DataBatch, Raft]);
        assert!(next_on(&outbox, Lane::Priority).is_empty());
        // Client data never leaves on the priority lane.
        while let Some(Take::Batch(..)) = outbox.try_take(Lane::Data) {}
        outbox.try_push(&header(Data), b"client").unwrap();
        assert!(next_on(&outbox, Lane::Priority).is_empty());
        assert_eq!(next_on(&outbox, Lane::Data), [Data]);
        // The priority lane goes: the data lane takes its queue back, ahead of client data.
        outbox.try_push(&header(Data), b"client").unwrap();
        outbox.try_push(&of(TrafficClass::DbUpdate), b"db").unwrap();
        outbox.set_attached(Lane::Priority, false);
        assert_eq!(next_on(&outbox, Lane::Data), [Data]);
        assert_eq!(outbox.queued_for(Lane::Priority), 0);
    }

    #[test]
    fn a_side_lane_reader_takes_only_its_own_traffic() {
        use FrameType::{Data, Goodbye, Gossip, Heartbeat, Raft};
        let frame = |t, class| Header::new(t, class, 1, 2);
        let client = frame(Data, TrafficClass::Client);
        let db = frame(Data, TrafficClass::DbUpdate);
        let gossip = frame(Gossip, TrafficClass::System);
        assert!(Lane::Data.accepts(&client, 100) && Lane::Data.accepts(&gossip, 100));
        assert!(!Lane::Priority.accepts(&client, 100));
        assert!(Lane::Priority.accepts(&db, 100));
        assert!(
            !Lane::Priority.accepts(&gossip, 100),
            "served first: control"
        );
        assert!(Lane::Priority.accepts(&frame(Raft, TrafficClass::System), 1 << 20));
        assert!(!Lane::Control.accepts(&frame(Raft, TrafficClass::System), 1 << 20));
        assert!(!Lane::Control.accepts(&db, 100));
        for lane in Lane::ALL {
            assert!(lane.accepts(&frame(Heartbeat, TrafficClass::Control), 0));
            assert!(lane.accepts(&frame(Goodbye, TrafficClass::Control), 10));
        }
        assert_eq!(Lane::from_hello(2), Some(Lane::Priority));
        assert_eq!(Lane::from_hello(3), None);
        assert!(Lane::Priority.runs(3, 3) && !Lane::Priority.runs(3, 2));
        assert!(Lane::Control.runs(2, 3) && !Lane::Control.runs(1, 3));
    }

    #[test]
    fn a_lanes_own_beats_are_bounded() {
        let outbox = Outbox::new(1 << 20, 4 << 20);
        let mut queued = 0;
        while outbox
            .push_beat(Lane::Control, &header(FrameType::Heartbeat))
            .is_ok()
        {
            queued += 1;
            assert!(queued < 1000, "beats grew unbounded");
        }
        assert!(queued * frame::HEADER_LEN >= BEATS_BOUND_BYTES);
    }
}
