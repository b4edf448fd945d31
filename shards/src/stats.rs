//! Per-link and per-shard figures.
//!
//! Link figures live in `Cell`s owned by the shard thread (no atomics on the packet path); the
//! api thread gets copies ([`SessionSnapshot`]) through the shard's ring when it asks.

use std::{cell::Cell, net::SocketAddr, time::Instant};

use crate::handshake::Role;

/// Weight of a new RTT sample in the smoothed RTT (RFC 6298 §2: 1/8).
const RTT_SAMPLE_WEIGHT_INV: u64 = 8;

/// Live counters of one link.
#[derive(Debug)]
pub struct LinkStats {
    /// The peer's socket address.
    pub remote_addr: SocketAddr,
    /// Which side dialed.
    pub role: Role,
    /// When the handshake completed.
    pub established_at: Instant,
    bytes_sent: Cell<u64>,
    bytes_received: Cell<u64>,
    frames_sent: Cell<u64>,
    frames_received: Cell<u64>,
    frames_dropped: Cell<u64>,
    srtt_us: Cell<u64>,
    last_received: Cell<Instant>,
    heartbeats_sent: Cell<u64>,
    heartbeat_acks: Cell<u64>,
}

impl LinkStats {
    /// Fresh figures for a link that just came up.
    pub fn new(remote_addr: SocketAddr, role: Role, now: Instant) -> Self {
        Self {
            remote_addr,
            role,
            established_at: now,
            bytes_sent: Cell::new(0),
            bytes_received: Cell::new(0),
            frames_sent: Cell::new(0),
            frames_received: Cell::new(0),
            frames_dropped: Cell::new(0),
            srtt_us: Cell::new(0),
            last_received: Cell::new(now),
            heartbeats_sent: Cell::new(0),
            heartbeat_acks: Cell::new(0),
        }
    }

    /// Counts one WebSocket message written.
    pub fn on_sent(&self, bytes: usize, frames: u64) {
        self.bytes_sent.set(self.bytes_sent.get() + bytes as u64);
        self.frames_sent.set(self.frames_sent.get() + frames);
    }

    /// Counts one WebSocket message read; any traffic proves the peer alive.
    pub fn on_received(&self, bytes: usize, now: Instant) {
        self.bytes_received
            .set(self.bytes_received.get() + bytes as u64);
        self.last_received.set(now);
    }

    /// Counts one well-formed frame read.
    pub fn on_frame_received(&self) {
        self.frames_received.set(self.frames_received.get() + 1);
    }

    /// Counts one frame dropped for failing a check.
    pub fn on_frame_dropped(&self) {
        self.frames_dropped.set(self.frames_dropped.get() + 1);
    }

    /// Counts one heartbeat sent.
    pub fn on_heartbeat_sent(&self) {
        self.heartbeats_sent.set(self.heartbeats_sent.get() + 1);
    }

    /// Folds one heartbeat round trip into the smoothed RTT.
    pub fn on_rtt_sample(&self, sample_us: u64) {
        self.heartbeat_acks.set(self.heartbeat_acks.get() + 1);
        let srtt = self.srtt_us.get();
        let next = if srtt == 0 {
            sample_us.max(1)
        } else {
            (srtt * (RTT_SAMPLE_WEIGHT_INV - 1) + sample_us) / RTT_SAMPLE_WEIGHT_INV
        };
        self.srtt_us.set(next.max(1));
    }

    /// When the last byte arrived from the peer.
    pub fn last_received(&self) -> Instant {
        self.last_received.get()
    }

    /// Copies the figures out for another thread.
    pub fn snapshot(&self, peer: u64, state: &'static str) -> SessionSnapshot {
        SessionSnapshot {
            peer,
            remote_addr: self.remote_addr,
            role: self.role,
            state,
            srtt_us: self.srtt_us.get(),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
            frames_sent: self.frames_sent.get(),
            frames_received: self.frames_received.get(),
            frames_dropped: self.frames_dropped.get(),
            heartbeats_sent: self.heartbeats_sent.get(),
            heartbeat_acks: self.heartbeat_acks.get(),
            uptime_ms: self.established_at.elapsed().as_millis() as u64,
            lanes: Vec::new(),
        }
    }

    /// This connection's figures as one lane of its link, with `queued_bytes` waiting for it.
    pub fn lane(&self, name: &'static str, queued_bytes: usize) -> LaneSnapshot {
        LaneSnapshot {
            name,
            remote_addr: self.remote_addr,
            srtt_us: self.srtt_us.get(),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
            frames_sent: self.frames_sent.get(),
            frames_received: self.frames_received.get(),
            queued_bytes: queued_bytes as u64,
            uptime_ms: self.established_at.elapsed().as_millis() as u64,
        }
    }
}

/// A copy of one lane's (connection's) figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneSnapshot {
    /// "data", "control" or "priority".
    pub name: &'static str,
    /// Peer socket address of this connection.
    pub remote_addr: SocketAddr,
    /// Smoothed heartbeat RTT on this connection, µs (0 until the first sample).
    pub srtt_us: u64,
    /// WebSocket payload bytes written.
    pub bytes_sent: u64,
    /// WebSocket payload bytes read.
    pub bytes_received: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Well-formed frames read.
    pub frames_received: u64,
    /// Bytes waiting to be written on it.
    pub queued_bytes: u64,
    /// Time since its handshake completed.
    pub uptime_ms: u64,
}

/// A copy of one link's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// Peer node id.
    pub peer: u64,
    /// Peer socket address.
    pub remote_addr: SocketAddr,
    /// Which side dialed.
    pub role: Role,
    /// Link state name ("up").
    pub state: &'static str,
    /// Smoothed heartbeat RTT in µs (0 until the first sample).
    pub srtt_us: u64,
    /// WebSocket payload bytes written.
    pub bytes_sent: u64,
    /// WebSocket payload bytes read.
    pub bytes_received: u64,
    /// Frames written (heartbeats included).
    pub frames_sent: u64,
    /// Well-formed frames read.
    pub frames_received: u64,
    /// Frames read and dropped for failing a check.
    pub frames_dropped: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeat acks received (each one an RTT sample).
    pub heartbeat_acks: u64,
    /// Time since the handshake completed.
    pub uptime_ms: u64,
    /// Its connections: the data lane, then the control lane when one is attached.
    pub lanes: Vec<LaneSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothed_rtt_follows_rfc_6298_weights() {
        let stats = LinkStats::new("127.0.0.1:1".parse().unwrap(), Role::Dialer, Instant::now());
        stats.on_rtt_sample(800);
        assert_eq!(stats.snapshot(1, "up").srtt_us, 800);
        stats.on_rtt_sample(0);
        assert_eq!(stats.snapshot(1, "up").srtt_us, 700);
    }
}
