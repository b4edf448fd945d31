//! Status of the messages this node sent: QUEUED → DELIVERED / PENDING_* → ACK_*.
//!
//! Bounded: at most `capacity` messages are remembered; the oldest are forgotten first. A
//! waiting `Send` registers a waiter that completes when the status reaches what its mode waits
//! for. No I/O here; the api feeds it reports and asks it questions.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};

use futures::channel::oneshot;
use meshd_proto::mesh::{MessageStatus, SendMode};

/// One status change, as `MessageStatusInfo` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The message's status.
    pub status: MessageStatus,
    /// Human-readable detail.
    pub detail: String,
    /// When the status was set, ms since the Unix epoch.
    pub timestamp_ms: u64,
}

struct Entry {
    dst: u64,
    require_ack: bool,
    current: StatusUpdate,
    waiters: Vec<(SendMode, oneshot::Sender<StatusUpdate>)>,
}

/// Counts per status, for `GetMessageMetrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Messages tracked since start (including forgotten ones).
    pub total: u64,
}

/// The tracker.
pub struct MessageTracker {
    entries: HashMap<u64, Entry>,
    order: VecDeque<u64>,
    capacity: usize,
    counts: StatusCounts,
}

/// Whether `status` ends a wait in `mode`.
pub fn ends_wait(mode: SendMode, require_ack: bool, status: MessageStatus) -> bool {
    use MessageStatus as S;
    let failed = matches!(
        status,
        S::Undeliverable | S::PendingNode | S::PendingClient | S::AckSuccess | S::AckFailure
    );
    match mode {
        SendMode::FireAndForget => true,
        SendMode::WaitForDelivery => {
            failed || matches!(status, S::Delivered | S::WaitingForClientAck)
        }
        SendMode::WaitForAck if require_ack => failed,
        SendMode::WaitForAck => failed || status == S::Delivered,
    }
}

/// Rank of a status: a report never moves a message backwards (a late DELIVERED after
/// ACK_SUCCESS is ignored).
fn rank(status: MessageStatus) -> u8 {
    use MessageStatus as S;
    match status {
        S::Unspecified => 0,
        S::Queued => 1,
        S::PendingNode | S::PendingClient | S::Undeliverable => 2,
        S::Delivered | S::WaitingForClientAck => 3,
        S::AckSuccess | S::AckFailure => 4,
    }
}

impl MessageTracker {
    /// A tracker remembering at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0);
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            counts: StatusCounts::default(),
        }
    }

    /// Starts tracking a message sent to `dst`.
    pub fn insert(&mut self, msg_id: u64, dst: u64, require_ack: bool, status: StatusUpdate) {
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        self.order.push_back(msg_id);
        self.entries.insert(
            msg_id,
            Entry {
                dst,
                require_ack,
                current: status,
                waiters: Vec::new(),
            },
        );
        self.counts.total += 1;
        debug_assert!(self.entries.len() <= self.capacity);
    }

    /// Applies a status reported by `from` (`None` = this node); ignored when `from` is not the
    /// message's destination, when the message is unknown, or when it would move backwards.
    pub fn update(&mut self, msg_id: u64, from: Option<u64>, update: StatusUpdate) -> bool {
        let Some(entry) = self.entries.get_mut(&msg_id) else {
            return false;
        };
        if from.is_some_and(|from| from != entry.dst) {
            return false;
        }
        if rank(update.status) < rank(entry.current.status) {
            return false;
        }
        entry.current = update;
        let require_ack = entry.require_ack;
        let current = entry.current.clone();
        let waiters = std::mem::take(&mut entry.waiters);
        for (mode, waiter) in waiters {
            if ends_wait(mode, require_ack, current.status) {
                let _ = waiter.send(current.clone());
            } else {
                entry.waiters.push((mode, waiter));
            }
        }
        true
    }

    /// Waits for the status that ends `mode`; completes at once if it is already there.
    pub fn wait(&mut self, msg_id: u64, mode: SendMode) -> Option<oneshot::Receiver<StatusUpdate>> {
        let entry = self.entries.get_mut(&msg_id)?;
        let (tx, rx) = oneshot::channel();
        if ends_wait(mode, entry.require_ack, entry.current.status) {
            let _ = tx.send(entry.current.clone());
        } else {
            entry.waiters.push((mode, tx));
        }
        Some(rx)
    }

    /// The current status of a message, with whether it needs an ack.
    pub fn get(&self, msg_id: u64) -> Option<(StatusUpdate, bool)> {
        self.entries
            .get(&msg_id)
            .map(|e| (e.current.clone(), e.require_ack))
    }

    /// Counts.
    pub fn counts(&self) -> StatusCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(status: MessageStatus) -> StatusUpdate {
        StatusUpdate {
            status,
            detail: String::new(),
            timestamp_ms: 0,
        }
    }

    #[test]
    fn a_wait_for_delivery_ends_on_delivered_and_a_wait_for_ack_on_the_ack() {
        let mut tracker = MessageTracker::new(8);
        tracker.insert(1, 7, true, update(MessageStatus::Queued));
        let mut delivery = tracker.wait(1, SendMode::WaitForDelivery).unwrap();
        let mut ack = tracker.wait(1, SendMode::WaitForAck).unwrap();
        assert!(tracker.update(1, Some(7), update(MessageStatus::WaitingForClientAck)));
        assert_eq!(
            delivery.try_recv().unwrap().unwrap().status,
            MessageStatus::WaitingForClientAck
        );
        assert!(matches!(ack.try_recv(), Ok(None)));
        assert!(tracker.update(1, Some(7), update(MessageStatus::AckSuccess)));
        assert_eq!(
            ack.try_recv().unwrap().unwrap().status,
            MessageStatus::AckSuccess
        );
    }

    #[test]
    fn reports_from_a_node_other_than_the_destination_are_ignored() {
        let mut tracker = MessageTracker::new(8);
        tracker.insert(1, 7, false, update(MessageStatus::Queued));
        assert!(!tracker.update(1, Some(8), update(MessageStatus::Delivered)));
        assert_eq!(tracker.get(1).unwrap().0.status, MessageStatus::Queued);
    }

    #[test]
    fn a_status_never_moves_backwards() {
        let mut tracker = MessageTracker::new(8);
        tracker.insert(1, 7, true, update(MessageStatus::Queued));
        tracker.update(1, Some(7), update(MessageStatus::AckFailure));
        assert!(!tracker.update(1, Some(7), update(MessageStatus::WaitingForClientAck)));
        assert_eq!(tracker.get(1).unwrap().0.status, MessageStatus::AckFailure);
    }

    #[test]
    fn the_oldest_messages_are_forgotten_past_capacity() {
        let mut tracker = MessageTracker::new(2);
        for id in 1..=3 {
            tracker.insert(id, 7, false, update(MessageStatus::Queued));
        }
        assert!(tracker.get(1).is_none());
        assert!(tracker.get(3).is_some());
        assert_eq!(tracker.counts().total, 3);
    }
}
