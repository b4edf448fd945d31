//! What one connection of a link has written and its peer has not yet confirmed reading
//! (sans-IO).
//!
//! A write that returned only means the bytes reached this kernel: a link that breaks then
//! takes everything in both hosts' socket buffers with it (megabytes on a fast link), and a
//! fire-and-forget message there was gone without a word. So each connection numbers the
//! WebSocket messages it writes, the peer's reader confirms how many it has read and handed
//! on (`LaneAck`, cumulative), and the writer keeps every message of shared frames until
//! confirmed: when the link ends, what is still kept is exactly what may not have arrived,
//! and its sources are told (`Shard::salvage`). The same count is the connection's credit: past
//! `window` unconfirmed bytes the writer writes only its own beats, and a peer that confirms
//! nothing for the write timeout has stopped reading.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use bytes::Bytes;

/// The writer's side: messages written, those kept, the credit left.
pub(crate) struct Unconfirmed {
    /// WebSocket messages written on this connection so far (beats too: the peer counts
    /// every message it reads).
    written: u64,
    /// Messages of shared frames not yet confirmed, by number (1-based), oldest first.
    kept: VecDeque<(u64, Bytes)>,
    /// Bytes in `kept`.
    bytes: usize,
    window: usize,
    /// Since when the window has been full without the peer confirming anything.
    full_since: Option<Instant>,
}

impl Unconfirmed {
    pub(crate) fn new(window: usize) -> Self {
        Self {
            written: 0,
            kept: VecDeque::new(),
            bytes: 0,
            window,
            full_since: None,
        }
    }

    /// Whether the writer may write another message of shared frames: under the window (one
    /// message may take it past, so any message fits an empty window).
    pub(crate) fn has_credit(&self) -> bool {
        self.bytes < self.window
    }

    /// A message is about to be written; `keep` holds its bytes if they are shared frames
    /// (kept until confirmed), `None` for the connection's own beats.
    pub(crate) fn on_write(&mut self, keep: Option<Bytes>, now: Instant) {
        self.written += 1;
        if let Some(message) = keep {
            self.bytes += message.len();
            self.kept.push_back((self.written, message));
            if !self.has_credit() && self.full_since.is_none() {
                self.full_since = Some(now);
            }
        }
    }

    /// The peer has read `read` messages: forgets those. A count above what was written (a
    /// peer may claim anything) confirms only what was written. Returns whether anything was
    /// confirmed.
    pub(crate) fn confirm(&mut self, read: u64, now: Instant) -> bool {
        let read = read.min(self.written);
        let mut confirmed = false;
        while let Some((number, message)) = self.kept.front() {
            if *number > read {
                break;
            }
            self.bytes -= message.len();
            self.kept.pop_front();
            confirmed = true;
        }
        if self.has_credit() {
            self.full_since = None;
        } else if confirmed {
            self.full_since = Some(now);
        }
        confirmed
    }

    /// The window has been full for longer than `limit` with nothing confirmed: the peer
    /// stopped reading.
    pub(crate) fn stalled(&self, limit: Duration, now: Instant) -> bool {
        self.full_since
            .is_some_and(|since| now.saturating_duration_since(since) > limit)
    }

    /// Everything not confirmed, oldest first: for a connection that ended.
    pub(crate) fn take_all(&mut self) -> Vec<Bytes> {
        self.bytes = 0;
        self.full_since = None;
        self.kept.drain(..).map(|(_, message)| message).collect()
    }
}

/// The reader's side: how much it has read, and when to say so.
pub(crate) struct Confirming {
    read: u64,
    told: u64,
    /// Read since the last confirmation: a message the peer keeps until confirmed.
    owed: bool,
    bytes_since: usize,
    every: usize,
}

impl Confirming {
    /// Confirms at least every `every` bytes read (and whenever [`Confirming::due`] is asked
    /// by the heartbeat loop).
    pub(crate) fn new(every: usize) -> Self {
        Self {
            read: 0,
            told: 0,
            owed: false,
            bytes_since: 0,
            every: every.max(1),
        }
    }

    /// One message of `len` bytes read and handed on; `kept` when the peer keeps it until
    /// confirmed (anything but its beats). The count to confirm now, if it is time. Every
    /// message counts (the peer numbers them all), but only kept ones make a confirmation
    /// due: an idle link would otherwise answer every heartbeat, and every confirmation, with
    /// one more message each way.
    pub(crate) fn on_read(&mut self, len: usize, kept: bool) -> Option<u64> {
        self.read += 1;
        if !kept {
            return None;
        }
        self.owed = true;
        self.bytes_since += len;
        (self.bytes_since >= self.every).then(|| self.tell())
    }

    /// The count to confirm if a kept message was read since the last confirmation.
    pub(crate) fn due(&mut self) -> Option<u64> {
        self.owed.then(|| self.tell())
    }

    fn tell(&mut self) -> u64 {
        self.told = self.read;
        self.owed = false;
        self.bytes_since = 0;
        self.read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Option<Bytes> {
        Some(Bytes::from(vec![0; len]))
    }

    #[test]
    fn kept_messages_leave_in_order_as_the_peer_confirms_them_and_beats_are_counted_not_kept() {
        let t = Instant::now();
        let mut sent = Unconfirmed::new(100);
        sent.on_write(message(10), t); // 1
        sent.on_write(None, t); // 2: a heartbeat
        sent.on_write(message(20), t); // 3
        assert!(sent.confirm(2, t));
        assert!(!sent.confirm(2, t), "nothing more to confirm");
        assert_eq!(sent.take_all(), [Bytes::from(vec![0; 20])]);
    }

    #[test]
    fn a_full_window_stops_shared_messages_until_confirmed_and_stalls_past_the_limit() {
        let t = Instant::now();
        let limit = Duration::from_secs(3);
        let mut sent = Unconfirmed::new(100);
        sent.on_write(message(60), t);
        assert!(sent.has_credit());
        // One message may take it past the window: any message fits an empty one.
        sent.on_write(message(60), t);
        assert!(!sent.has_credit());
        assert!(!sent.stalled(limit, t + Duration::from_secs(2)));
        // Progress restarts the clock even while still full.
        sent.on_write(message(60), t);
        assert!(sent.confirm(1, t + Duration::from_secs(2)));
        assert!(!sent.has_credit());
        assert!(!sent.stalled(limit, t + Duration::from_secs(4)));
        assert!(sent.stalled(limit, t + Duration::from_secs(6)));
        assert!(sent.confirm(3, t + Duration::from_secs(6)));
        assert!(sent.has_credit());
        assert!(!sent.stalled(limit, t + Duration::from_secs(60)));
    }

    #[test]
    fn a_peer_confirming_more_than_was_written_confirms_only_what_was_written() {
        let t = Instant::now();
        let mut sent = Unconfirmed::new(100);
        sent.on_write(message(10), t);
        assert!(sent.confirm(u64::MAX, t));
        sent.on_write(message(10), t);
        // Message 2 was written after the lie: still kept.
        assert_eq!(sent.take_all().len(), 1);
    }

    #[test]
    fn the_reader_confirms_every_so_many_bytes_and_on_the_heartbeat_when_anything_was_read() {
        let mut reading = Confirming::new(100);
        assert_eq!(reading.due(), None);
        assert_eq!(reading.on_read(60, true), None);
        assert_eq!(reading.on_read(60, true), Some(2));
        assert_eq!(reading.due(), None);
        assert_eq!(reading.on_read(10, true), None);
        assert_eq!(reading.due(), Some(3));
        assert_eq!(reading.due(), None);
    }

    #[test]
    fn beats_are_counted_but_never_confirmed_on_their_own() {
        let mut reading = Confirming::new(100);
        // Heartbeats and confirmations back and forth: nothing owed, nothing sent.
        assert_eq!(reading.on_read(500, false), None);
        assert_eq!(reading.on_read(72, false), None);
        assert_eq!(reading.due(), None);
        // A kept message after them: the count covers the beats too (the peer numbers all).
        assert_eq!(reading.on_read(10, true), None);
        assert_eq!(reading.due(), Some(3));
    }
}
