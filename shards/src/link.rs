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
    cell::RefCell,
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
    shard::Shard,
    stats::LinkStats,
    tls,
};

/// The WebSocket of an established link.
pub(crate) type LinkSocket = WebSocketStream<TlsStream<TcpStream>>;

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
}

impl LinkEnd {
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Goodbye(reason) => format!("peer said goodbye: {reason}"),
            Self::Closed(reason) => format!("closed here: {reason}"),
            Self::Silent(for_) => format!("no heartbeat for {} ms", for_.as_millis()),
            Self::Broken(why) => format!("socket failed: {why}"),
        }
    }
}

/// Frames waiting to be written to one link, batched into one buffer.
///
/// Senders encode straight into the batch buffer; the writer swaps it out and writes it as one
/// WebSocket message. Data frames wait while more than `max_pending_bytes` are queued
/// (backpressure); control frames (heartbeats, goodbyes) never wait, so a busy link is not
/// declared dead for lack of heartbeats.
pub(crate) struct Outbox {
    inner: RefCell<OutboxInner>,
    ready: Event,
    room: Event,
    max_pending_bytes: usize,
    max_payload_bytes: usize,
}

struct OutboxInner {
    batch: Vec<u8>,
    frames: u64,
    closing: Option<String>,
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
}

impl Outbox {
    pub(crate) fn new(max_pending_bytes: usize, max_payload_bytes: usize) -> Self {
        Self {
            inner: RefCell::new(OutboxInner {
                batch: Vec::with_capacity(64 * 1024),
                frames: 0,
                closing: None,
            }),
            ready: Event::new(),
            room: Event::new(),
            max_pending_bytes,
            max_payload_bytes,
        }
    }

    /// Queues a data frame, waiting while the outbox is over its bound.
    pub(crate) async fn push(&self, header: &Header, payload: &[u8]) -> Result<(), OutboxError> {
        loop {
            {
                let inner = self.inner.borrow();
                if inner.closing.is_some() {
                    return Err(OutboxError::Closed);
                }
                if inner.batch.len() < self.max_pending_bytes {
                    drop(inner);
                    return self.push_now(header, payload);
                }
            }
            listener!(self.room => room);
            if self.inner.borrow().batch.len() < self.max_pending_bytes {
                continue;
            }
            room.await;
        }
    }

    /// Queues a frame at once, over the bound if need be (control frames only).
    pub(crate) fn push_now(&self, header: &Header, payload: &[u8]) -> Result<(), OutboxError> {
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_some() {
            return Err(OutboxError::Closed);
        }
        frame::encode_into(&mut inner.batch, header, payload, self.max_payload_bytes)
            .map_err(|_| OutboxError::Oversized)?;
        inner.frames += 1;
        drop(inner);
        self.ready.notify(1);
        Ok(())
    }

    /// Stops accepting frames; the writer flushes what is queued, then ends the link.
    pub(crate) fn close(&self, reason: String) {
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_none() {
            inner.closing = Some(reason);
        }
        drop(inner);
        self.ready.notify(usize::MAX);
        self.room.notify(usize::MAX);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.inner.borrow().closing.is_some()
    }

    async fn take(&self) -> Take {
        loop {
            {
                let mut inner = self.inner.borrow_mut();
                if !inner.batch.is_empty() {
                    let batch = mem::replace(&mut inner.batch, Vec::with_capacity(64 * 1024));
                    let frames = mem::take(&mut inner.frames);
                    drop(inner);
                    self.room.notify(usize::MAX);
                    return Take::Batch(batch, frames);
                }
                if let Some(reason) = &inner.closing {
                    return Take::Closed(reason.clone());
                }
            }
            listener!(self.ready => ready);
            {
                let inner = self.inner.borrow();
                if !inner.batch.is_empty() || inner.closing.is_some() {
                    continue;
                }
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
) -> Result<(LinkSocket, PeerInfo), DialError> {
    let config = &shard.config;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(config.max_message_bytes()))
        .max_frame_size(Some(config.max_message_bytes()));
    let (socket, exporter) = match role {
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
            let (socket, _) = async_tungstenite::client_async_with_config(
                url,
                TlsStream::Client(tls),
                Some(ws_config),
            )
            .await
            .map_err(|e| DialError::Setup(format!("WebSocket: {e}")))?;
            (socket, exporter)
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
            let socket = async_tungstenite::accept_async_with_config(
                TlsStream::Server(tls),
                Some(ws_config),
            )
            .await
            .map_err(|e| DialError::Setup(format!("WebSocket: {e}")))?;
            (socket, exporter)
        }
    };
    handshake(shard, socket, role, peer_hint, exporter).await
}

async fn handshake(
    shard: &Shard,
    mut socket: LinkSocket,
    role: Role,
    peer_hint: u64,
    exporter: [u8; 32],
) -> Result<(LinkSocket, PeerInfo), DialError> {
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let expectation = Expectation {
        node_id_hint: Some(peer_hint),
        pinned_key: shard.pinned_key(peer_hint),
    };
    let local_hello = shard.local_hello();
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

/// Carries traffic on an established link until it ends.
pub(crate) async fn run(
    shard: Rc<Shard>,
    socket: LinkSocket,
    peer: u64,
    guest: bool,
    outbox: Rc<Outbox>,
    stats: Rc<LinkStats>,
) -> LinkEnd {
    let (mut sink, mut stream) = socket.split();
    let config = &shard.config;
    let local = config.local.node_id;
    let epoch = shard.epoch;
    let max_payload = config.max_payload_bytes;

    let reader = async {
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
                match header.frame_type {
                    FrameType::Heartbeat => {
                        let mut ack = Header::new(
                            FrameType::HeartbeatAck,
                            TrafficClass::Control,
                            local,
                            peer,
                        );
                        ack.seq = header.seq;
                        let _ = outbox.push_now(&ack, &[]);
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
                        shard
                            .emit(ControlEvent::Join {
                                from: peer,
                                frame_type: header.frame_type,
                                payload: message.slice_ref(frame.payload),
                            })
                            .await;
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
                        shard
                            .emit_routing(peer, message.slice_ref(frame.payload))
                            .await;
                    }
                    FrameType::Data
                    | FrameType::DeliveryReport
                    | FrameType::AppAck
                    | FrameType::Gossip => {
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
                            if shard
                                .route(relayed, message.slice_ref(frame.payload), 1)
                                .await
                                .is_err()
                            {
                                shard.count_drop("no_route");
                            }
                            continue;
                        }
                        if header.frame_type == FrameType::Gossip {
                            shard
                                .emit_gossip(header.src, message.slice_ref(frame.payload))
                                .await;
                            continue;
                        }
                        let event = ApiEvent::Frame {
                            src: header.src,
                            frame_type: header.frame_type,
                            traffic_class: header.traffic_class,
                            payload: message.slice_ref(frame.payload),
                        };
                        if shard.api_tx.push(event).await.is_err() {
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

    let writer = async {
        loop {
            match outbox.take().await {
                Take::Batch(batch, frames) => {
                    let len = batch.len();
                    if let Err(e) = sink.send(Message::Binary(Bytes::from(batch))).await {
                        return LinkEnd::Broken(e.to_string());
                    }
                    stats.on_sent(len, frames);
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
            let silent_for = stats.last_received().elapsed();
            if silent_for > silence_limit {
                return LinkEnd::Silent(silent_for);
            }
            let mut beat = Header::new(FrameType::Heartbeat, TrafficClass::Control, local, peer);
            beat.seq = epoch.elapsed().as_micros() as u64;
            stats.on_heartbeat_sent();
            if outbox.push_now(&beat, &[]).is_err() {
                // Closing: the writer decides when the link ends.
                futures::future::pending::<()>().await;
            }
        }
    };

    futures_lite::future::or(reader, futures_lite::future::or(writer, heartbeat)).await
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
