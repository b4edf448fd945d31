//! The target side of a stream: dedupe, reorder, subscriber credit and offsets.
//!
//! Drain order for a caller's turn: feed `on_data` / subscriber calls, persist what they ask
//! (`Arrival::Store`, an accepted ack) in one transaction, then `on_stored` /
//! `on_processed`, then `poll_deliver` until `None`, then `poll_report`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use super::{Report, Seq};

/// Limits of one target stream.
#[derive(Clone, Copy, Debug)]
pub struct InboxConfig {
    /// Most messages held (stored, not processed): the credit granted to the source when
    /// the subscriber grants more or none is attached.
    pub max_backlog: u32,
    /// Most out-of-order messages kept in memory waiting for the gap before them.
    pub max_held: usize,
    /// A report goes to the source at least this often while the stream lives.
    pub keepalive_ms: u64,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            max_backlog: 4096,
            max_held: 256,
            keepalive_ms: 1000,
        }
    }
}

/// What became of an arriving message.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival<P> {
    /// Store these, in order, then call [`Inbox::on_stored`] with the last seq.
    Store(Vec<(Seq, P)>),
    /// Kept in memory until the gap before it is filled.
    Held,
    /// Already stored or held: dropped (the source will hear where the inbox stands).
    Duplicate,
    /// Outside the credit granted, or no room to hold it: dropped, the source resends.
    Refused,
}

/// Why a subscriber's acknowledgement was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The seq was never delivered to this subscriber.
    #[error("seq {seq} was not delivered (delivered up to {delivered})")]
    NotDelivered {
        /// What was acknowledged.
        seq: Seq,
        /// The highest seq delivered.
        delivered: Seq,
    },
}

/// One stream at one target.
#[derive(Debug)]
pub struct Inbox<P> {
    config: InboxConfig,
    /// Every seq up to here is durable in the inbox.
    received: Seq,
    /// Every seq up to here was handed to the store (≥ `received`).
    storing: Seq,
    /// Every seq up to here is recorded as processed.
    processed: Seq,
    /// Every seq up to here was acknowledged and handed to the store (≥ `processed`).
    acking: Seq,
    /// Every seq up to here went to the current subscriber.
    delivered: Seq,
    /// Out-of-order arrivals past `storing + 1`.
    held: BTreeMap<Seq, P>,
    /// The subscriber's window, while one is attached.
    subscriber: Option<u32>,
    report_due: bool,
    reported_at: Option<u64>,
    /// The source closed the stream at this seq.
    closed_at: Option<Seq>,
}

impl<P> Inbox<P> {
    /// A new stream, or one restored from its inbox after a restart.
    pub fn restore(config: InboxConfig, received: Seq, processed: Seq) -> Self {
        assert!(
            processed <= received,
            "processed {processed} past received {received}"
        );
        Self {
            config,
            received,
            storing: received,
            processed,
            acking: processed,
            delivered: processed,
            held: BTreeMap::new(),
            subscriber: None,
            report_due: true,
            reported_at: None,
            closed_at: None,
        }
    }

    /// The credit the source may use past `processed`.
    pub fn window(&self) -> u32 {
        self.subscriber
            .map_or(self.config.max_backlog, |w| w.min(self.config.max_backlog))
    }

    /// The highest seq taken now.
    pub fn limit(&self) -> Seq {
        self.processed + Seq::from(self.window())
    }

    /// Every seq up to here is durable here.
    pub const fn received(&self) -> Seq {
        self.received
    }

    /// Every seq up to here is recorded as processed.
    pub const fn processed(&self) -> Seq {
        self.processed
    }

    /// Every seq up to here was acknowledged by the subscriber (recorded or being recorded).
    pub const fn acking(&self) -> Seq {
        self.acking
    }

    /// The next `poll_report` sends a report (the source asked about the stream).
    pub fn report_now(&mut self) {
        self.report_due = true;
    }

    /// The seq that would be stored next (anything past it is held).
    pub const fn next_expected(&self) -> Seq {
        self.storing + 1
    }

    /// Whether `seq` is one this inbox still wants (not stored, held or storing).
    pub fn wants(&self, seq: Seq) -> bool {
        seq > self.storing && seq <= self.limit() && !self.held.contains_key(&seq)
    }

    /// A message from the source.
    pub fn on_data(&mut self, seq: Seq, payload: P) -> Arrival<P> {
        if seq == 0 || seq <= self.storing || self.held.contains_key(&seq) {
            self.report_due = true;
            return Arrival::Duplicate;
        }
        if seq > self.limit() {
            return Arrival::Refused;
        }
        if seq != self.storing + 1 {
            if self.held.len() >= self.config.max_held {
                return Arrival::Refused;
            }
            self.held.insert(seq, payload);
            return Arrival::Held;
        }
        let mut store = vec![(seq, payload)];
        self.storing = seq;
        while let Some(next) = self.held.remove(&(self.storing + 1)) {
            self.storing += 1;
            store.push((self.storing, next));
        }
        Arrival::Store(store)
    }

    /// Every seq up to `seq` is durable.
    pub fn on_stored(&mut self, seq: Seq) {
        assert!(
            seq <= self.storing,
            "stored {seq} past storing {}",
            self.storing
        );
        if seq > self.received {
            self.received = seq;
            self.report_due = true;
        }
    }

    /// The storing of everything past `received` failed: it is wanted again.
    pub fn on_store_failed(&mut self) {
        self.storing = self.received;
        self.held.clear();
    }

    /// A subscriber attached with `window` messages of credit; delivery restarts after
    /// `processed` (what an earlier subscriber got but did not acknowledge comes again).
    pub fn subscribe(&mut self, window: u32) {
        self.subscriber = Some(window);
        self.delivered = self.acking;
        self.report_due = true;
    }

    /// The subscriber changed its window.
    pub fn set_window(&mut self, window: u32) {
        if self.subscriber.is_some() {
            self.subscriber = Some(window);
            self.report_due = true;
        }
    }

    /// The subscriber went away.
    pub fn unsubscribe(&mut self) {
        self.subscriber = None;
        self.delivered = self.acking;
        self.report_due = true;
    }

    /// Whether a subscriber is attached.
    pub const fn is_subscribed(&self) -> bool {
        self.subscriber.is_some()
    }

    /// The next seq to hand to the subscriber (read it from the inbox).
    pub fn poll_deliver(&mut self) -> Option<Seq> {
        let window = Seq::from(self.subscriber?);
        let next = self.delivered + 1;
        if next <= self.received && next <= self.acking + window {
            self.delivered = next;
            return Some(next);
        }
        None
    }

    /// The subscriber could not take `seq` now (its queue is full): offer it again later.
    pub fn undeliver(&mut self, seq: Seq) {
        if self.delivered >= seq && seq > self.acking {
            self.delivered = seq - 1;
        }
    }

    /// The subscriber processed every seq up to `seq`: `Ok(Some(seq))` to record (with the
    /// delivery record, in one transaction), then [`Inbox::on_processed`]; `Ok(None)` for an
    /// acknowledgement already taken.
    pub fn on_subscriber_ack(&mut self, seq: Seq) -> Result<Option<Seq>, AckError> {
        if seq <= self.acking {
            return Ok(None);
        }
        if seq > self.delivered {
            return Err(AckError::NotDelivered {
                seq,
                delivered: self.delivered,
            });
        }
        self.acking = seq;
        Ok(Some(seq))
    }

    /// Recording the acknowledgements past `processed` failed: the subscriber gets them again.
    pub fn on_ack_failed(&mut self) {
        self.acking = self.processed;
        self.delivered = self.processed;
    }

    /// Every seq up to `seq` is durably recorded as processed.
    pub fn on_processed(&mut self, seq: Seq) {
        assert!(
            seq <= self.acking,
            "processed {seq} past acking {}",
            self.acking
        );
        if seq > self.processed {
            self.processed = seq;
            self.report_due = true;
        }
    }

    /// The source closed the stream after `last`.
    pub fn on_closed(&mut self, last: Seq) {
        self.closed_at = Some(last);
    }

    /// Closed, and every message was processed: the inbox may forget the stream.
    pub fn is_finished(&self) -> bool {
        self.closed_at.is_some_and(|last| self.processed >= last)
    }

    /// The report to send now, if one is due (a change, or the keepalive).
    pub fn poll_report(&mut self, now: u64) -> Option<Report> {
        let keepalive = self
            .reported_at
            .is_none_or(|at| now.saturating_sub(at) >= self.config.keepalive_ms);
        if !self.report_due && !keepalive {
            return None;
        }
        self.report_due = false;
        self.reported_at = Some(now);
        Some(Report {
            received: self.received,
            processed: self.processed,
            window: self.window(),
        })
    }

    /// Invariants, for tests and the simulator.
    pub fn check_invariants(&self) {
        assert!(self.processed <= self.acking);
        assert!(self.acking <= self.delivered);
        assert!(self.processed <= self.received && self.received <= self.storing);
        assert!(self.delivered <= self.received);
        assert!(self.held.len() <= self.config.max_held);
        assert!(self.held.keys().all(|&s| s > self.storing + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox() -> Inbox<&'static str> {
        Inbox::restore(
            InboxConfig {
                max_backlog: 8,
                max_held: 2,
                keepalive_ms: 1000,
            },
            0,
            0,
        )
    }

    #[test]
    fn arrivals_are_stored_in_order_once() {
        let mut i = inbox();
        assert_eq!(i.on_data(2, "b"), Arrival::Held);
        assert_eq!(i.on_data(2, "b"), Arrival::Duplicate);
        assert_eq!(i.on_data(3, "c"), Arrival::Held);
        assert_eq!(i.on_data(5, "e"), Arrival::Refused, "no room to hold more");
        assert_eq!(
            i.on_data(1, "a"),
            Arrival::Store(vec![(1, "a"), (2, "b"), (3, "c")])
        );
        assert_eq!(i.on_data(1, "a"), Arrival::Duplicate);
        assert_eq!(i.on_data(9, "i"), Arrival::Refused, "past the credit");
        i.on_stored(3);
        assert_eq!(i.received(), 3);
        i.check_invariants();
    }

    #[test]
    fn delivery_follows_the_subscribers_window_and_acks_record_processed() {
        let mut i = inbox();
        let Arrival::Store(batch) = i.on_data(1, "a") else {
            panic!()
        };
        assert_eq!(batch.len(), 1);
        for (seq, p) in [(2, "b"), (3, "c")] {
            assert!(matches!(i.on_data(seq, p), Arrival::Store(_)));
        }
        assert_eq!(i.poll_deliver(), None, "no subscriber");
        i.on_stored(3);
        i.subscribe(2);
        assert_eq!(i.window(), 2);
        assert_eq!(i.poll_deliver(), Some(1));
        assert_eq!(i.poll_deliver(), Some(2));
        assert_eq!(i.poll_deliver(), None, "window of 2 unacknowledged");
        assert_eq!(
            i.on_subscriber_ack(3),
            Err(AckError::NotDelivered {
                seq: 3,
                delivered: 2
            })
        );
        assert_eq!(i.on_subscriber_ack(1), Ok(Some(1)));
        assert_eq!(i.on_subscriber_ack(1), Ok(None));
        assert_eq!(i.poll_deliver(), Some(3));
        i.on_processed(1);
        assert_eq!(
            i.poll_report(0),
            Some(Report {
                received: 3,
                processed: 1,
                window: 2
            })
        );
        assert_eq!(i.poll_report(1), None);
        assert!(i.poll_report(1000).is_some(), "keepalive");
        i.check_invariants();
    }

    #[test]
    fn a_new_subscriber_gets_what_the_last_one_did_not_acknowledge() {
        let mut i = inbox();
        for (seq, p) in [(1, "a"), (2, "b")] {
            assert!(matches!(i.on_data(seq, p), Arrival::Store(_)));
        }
        i.on_stored(2);
        i.subscribe(8);
        assert_eq!(i.poll_deliver(), Some(1));
        assert_eq!(i.poll_deliver(), Some(2));
        assert_eq!(i.on_subscriber_ack(1), Ok(Some(1)));
        i.on_processed(1);
        i.unsubscribe();
        i.subscribe(8);
        assert_eq!(i.poll_deliver(), Some(2));
        i.undeliver(2);
        assert_eq!(
            i.poll_deliver(),
            Some(2),
            "offered again after a full queue"
        );
        i.check_invariants();
    }

    #[test]
    fn a_restored_inbox_redelivers_from_processed_and_finishes_when_closed() {
        let mut i: Inbox<&str> = Inbox::restore(InboxConfig::default(), 5, 3);
        assert_eq!(i.on_data(4, "d"), Arrival::Duplicate);
        i.subscribe(10);
        assert_eq!(i.poll_deliver(), Some(4));
        i.on_closed(5);
        assert!(!i.is_finished());
        assert_eq!(i.poll_deliver(), Some(5));
        assert_eq!(i.on_subscriber_ack(5), Ok(Some(5)));
        i.on_processed(5);
        assert!(i.is_finished());
        i.check_invariants();
    }
}
