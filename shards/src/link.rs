//! One link to one peer: TLS, WebSocket, handshake, then three loops until it ends.
//!
//! ```text
//!  TcpStream ─► TLS 1.3 (futures-rustls) ─► WebSocket (async-tungstenite) ─► Handshake
//!      then, raced until the first ends:
//!        reader:    WS message ─► FrameReader ─► heartbeat acks / api ring / drop+count
//!        writer:    Outbox batch (many frames) ─► one WS binary message
//!        heartbeat: every interval, send Heartbeat; no traffic for `misses` intervals ─► down
//! ```
//! The thin shell around `handshake` and `frame`: all decisions live there. What waits to be
//! written, and on which lane, is `outbox`.

mod outbox;
mod unconfirmed;

use std::{
    cell::{Cell, RefCell},
    future::Future,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use async_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};
use bytes::Bytes;
use futures::StreamExt;
use futures_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use glommio::net::TcpStream;
use meshd_proto::link::Goodbye;
use prost::Message as _;
use rand::RngCore;

use crate::{
    command::{ApiEvent, ControlEvent, DialError},
    frame::{FrameReader, FrameType, Header, TrafficClass},
    handshake::{Expectation, Handshake, Outcome, PeerInfo, Role},
    read_budget::ReadBudget,
    shard::{Shard, Wait},
    slice::Slice,
    stats::LinkStats,
    tls,
};

use outbox::Take;
pub(crate) use outbox::{Lane, MAX_BATCH_BYTES, Outbox, OutboxError};
use unconfirmed::{Confirming, Unconfirmed};

/// The WebSocket of an established link.
pub(crate) type LinkSocket = WebSocketStream<ReadBudget<TlsStream<TcpStream>>>;

/// How one connection of a link ended, and what it leaves behind.
pub(crate) struct Ended {
    pub(crate) end: LinkEnd,
    /// WebSocket messages it wrote that the peer never confirmed reading: they may or may not
    /// have arrived (`Shard::salvage`).
    pub(crate) unconfirmed: Vec<Bytes>,
}

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

/// Join frames a guest link carries each way: the join request and the key proof one way, the
/// challenge and the answer the other (`control::lifecycle::pake` in the appliance).
const MAX_JOIN_FRAMES: u32 = 2;

/// What one WebSocket read asks TLS for (see [`set_up`]).
const READ_BUFFER_BYTES: usize = 32 * 1024;

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
    // Proven: from here on the WebSocket's own (data) limit applies. Not for a guest (no
    // credential, only a join to make): it keeps what is left of the handshake budget for
    // the link's life, so a guest cannot make this node buffer a data-sized message.
    if !established.1.guest {
        budget.set(None);
    }
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
/// [`outbox::CONTROL_LANE_MAX_PAYLOAD`], and never waits on anything data can fill: a relayed frame
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
) -> Ended {
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
    let sent = RefCell::new(Unconfirmed::new(config.lane_window_bytes));
    // Four confirmations per window: the writer never waits a round trip for credit while
    // the peer keeps reading.
    let confirming = RefCell::new(Confirming::new(config.lane_window_bytes / 4));
    let confirm = |read: u64| {
        let mut ack = Header::new(FrameType::LaneAck, TrafficClass::Control, local, peer);
        ack.seq = read;
        if outbox.push_beat(lane, &ack) == Err(OutboxError::Full) {
            // Cumulative: the next one says it all.
            shard.count_drop("lane_ack_outbox_full");
        }
    };

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
            // Whether the peer keeps this message until confirmed: anything but its beats.
            let mut kept_by_peer = false;
            for decoded in FrameReader::new(&message, max_payload) {
                let frame = match decoded {
                    Ok(frame) => frame,
                    Err(error) => {
                        stats.on_frame_dropped();
                        shard.count_drop(error.kind());
                        tracing::debug!(peer, %error, "dropped a malformed frame");
                        kept_by_peer = true;
                        continue;
                    }
                };
                stats.on_frame_received();
                let header = frame.header;
                kept_by_peer |= !matches!(
                    header.frame_type,
                    FrameType::Heartbeat | FrameType::HeartbeatAck | FrameType::LaneAck
                );
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
                    FrameType::LaneAck => {
                        if sent.borrow_mut().confirm(header.seq, Instant::now()) {
                            outbox.wake(lane);
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
            // Every frame of it handed on (or dropped and counted): confirmed.
            let due = confirming.borrow_mut().on_read(message.len(), kept_by_peer);
            if let Some(read) = due {
                confirm(read);
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
            let taken = outbox.take(lane, || sent.borrow().has_credit()).await;
            let (batch, frames, keep) = match taken {
                Take::Batch(batch, frames) => (Bytes::from(batch), frames, true),
                Take::Beats(batch, frames) => (Bytes::from(batch), frames, false),
                Take::Closed(reason) => {
                    let _ = timeout(Duration::from_millis(200), sink.close(None)).await;
                    return LinkEnd::Closed(reason);
                }
            };
            let len = batch.len();
            let now = Instant::now();
            // Kept before the write: a write cut short may still have reached the peer.
            sent.borrow_mut().on_write(keep.then(|| batch.clone()), now);
            writing_since.set(Some(now));
            let written = sink.send(Message::Binary(batch)).await;
            writing_since.set(None);
            match written {
                Ok(()) => stats.on_sent(len, frames),
                Err(e) => return LinkEnd::Broken(e.to_string()),
            }
        }
    };

    let heartbeat = async {
        let interval = config.heartbeat_interval;
        let silence_limit = interval * config.heartbeat_misses;
        loop {
            glommio::timer::sleep(interval).await;
            let waiting_for_credit = sent.borrow().stalled(write_timeout, Instant::now());
            if waiting_for_credit
                || writing_since
                    .get()
                    .is_some_and(|since| since.elapsed() > write_timeout)
            {
                return LinkEnd::Stalled(write_timeout);
            }
            // Whatever was read since the last confirmation: an idle link keeps nothing for
            // longer than a heartbeat interval.
            let due = confirming.borrow_mut().due();
            if let Some(read) = due {
                confirm(read);
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

    let end = futures_lite::future::or(
        reader,
        futures_lite::future::or(writer, futures_lite::future::or(heartbeat, lifetime)),
    )
    .await;
    let unconfirmed = sent.borrow_mut().take_all();
    Ended { end, unconfirmed }
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
