//! Status of the messages this node sent: QUEUED → DELIVERED / PENDING_* → ACK_*.
//!
//! The tracker hands out message ids, in order, so its entries sit in a ring indexed by
//! `msg_id - first id`: no hashing and no per-message allocation on the send path, which runs
//! once per message.
//!
//! Bounded: at most `capacity` messages are remembered; the oldest are forgotten first. A
//! waiting `Send` registers a waiter that completes when the status reaches what its mode waits
//! for; `SendWithStatusStream` registers a watcher that sees every change. A broadcast is one
//! entry with one status per target, folded into one status (the worst) once every target
//! has answered. No I/O here; the api feeds it reports and asks it questions.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, VecDeque},
    ops::Range,
    sync::Arc,
};

use futures::channel::{mpsc, oneshot};

use super::recent::UNKNOWN_DETAIL;
use meshd_proto::mesh::{MessageStatus, SendMode};

/// One status change, as `MessageStatusInfo` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The message's status.
    pub status: MessageStatus,
    /// Human-readable detail, shared: one report run sets it on many messages.
    pub detail: Arc<str>,
    /// When the status was set, ms since the Unix epoch.
    pub timestamp_ms: u64,
}

/// Whether `msg_id` is a tracked unicast whose destination is `from`.
fn entry_is_unicast_from(tracker: &MessageTracker, msg_id: u64, from: Option<u64>) -> bool {
    tracker
        .entry(msg_id)
        .is_some_and(|e| e.dst != 0 && from.is_some_and(|f| f == e.dst))
}

/// Capacity of a watcher's queue; a message changes status a handful of times.
const WATCH_QUEUE: usize = 16;

/// A unicast waiting send whose copies are retransmitted until it settles.
#[derive(Clone, Copy, Debug, Default)]
struct Waiting {
    /// Copies handed to a shard.
    attempts: u32,
    /// Copies a shard reported it could not send (no route): they never left this node.
    failed: u32,
    /// Answered, given up on, or timed out: no more copies.
    settled: bool,
}

/// Waiting sends that may be open at once, node-wide: what keeps them out of eviction is
/// bounded by this ([`MessageTracker::can_open_waiting`]).
pub const MAX_OPEN_WAITING: usize = 1 << 16;

struct Entry {
    /// Destination; 0 for a broadcast.
    dst: u64,
    waiting: Option<Waiting>,
    require_ack: bool,
    current: StatusUpdate,
    /// Broadcast only: each target's latest status (None until it answers).
    targets: BTreeMap<u64, Option<MessageStatus>>,
    waiters: Vec<(SendMode, oneshot::Sender<StatusUpdate>)>,
    watchers: Vec<mpsc::Sender<StatusUpdate>>,
}

/// The tracker.
pub struct MessageTracker {
    /// `entries[i]` is message `first_id + i`.
    entries: VecDeque<Entry>,
    first_id: u64,
    capacity: usize,
    total: u64,
    /// Open waiting sends pushed out of `entries` by newer messages: they are remembered
    /// until they settle, whatever the rate of other traffic (at most [`MAX_OPEN_WAITING`]).
    pinned: BTreeMap<u64, Entry>,
    open_waiting: usize,
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

/// The status of a broadcast: the worst of its targets' (lowest rank; a failure beats a
/// success of the same rank), or QUEUED while some target has not answered.
fn fold(targets: &BTreeMap<u64, Option<MessageStatus>>) -> (MessageStatus, Arc<str>) {
    let mut worst: Option<MessageStatus> = None;
    for status in targets.values() {
        let Some(status) = *status else {
            return (MessageStatus::Queued, Arc::from(""));
        };
        worst = Some(match worst {
            None => status,
            Some(w) if rank(status) < rank(w) => status,
            Some(w) if rank(status) == rank(w) && is_failure(status) => status,
            Some(w) => w,
        });
    }
    let answered = targets.len();
    let ok = targets
        .values()
        .filter(|s| {
            matches!(
                s,
                Some(
                    MessageStatus::Delivered
                        | MessageStatus::WaitingForClientAck
                        | MessageStatus::AckSuccess
                )
            )
        })
        .count();
    (
        worst.unwrap_or(MessageStatus::Delivered),
        format!("{ok} of {answered} nodes delivered").into(),
    )
}

fn is_failure(status: MessageStatus) -> bool {
    matches!(
        status,
        MessageStatus::AckFailure
            | MessageStatus::PendingClient
            | MessageStatus::PendingNode
            | MessageStatus::Undeliverable
    )
}

impl MessageTracker {
    /// A tracker remembering at most `capacity` messages, handing out ids from `first_id` on.
    pub fn new(capacity: usize, first_id: u64) -> Self {
        assert!(capacity > 0);
        Self {
            entries: VecDeque::new(),
            first_id,
            capacity,
            total: 0,
            pinned: BTreeMap::new(),
            open_waiting: 0,
        }
    }

    /// Whether one more waiting send may open (see [`MAX_OPEN_WAITING`]).
    pub fn can_open_waiting(&self) -> bool {
        self.open_waiting < MAX_OPEN_WAITING
    }

    /// Marks `msg_id` as a waiting send whose copies are retransmitted until it settles.
    pub fn begin_waiting(&mut self, msg_id: u64) {
        let Some(entry) = self.entry_mut(msg_id) else {
            return;
        };
        if entry.waiting.is_none() {
            entry.waiting = Some(Waiting::default());
            self.open_waiting += 1;
        }
    }

    /// Counts one copy of a waiting send handed to a shard.
    pub fn note_attempt(&mut self, msg_id: u64) {
        if let Some(w) = self.entry_mut(msg_id).and_then(|e| e.waiting.as_mut()) {
            w.attempts += 1;
        }
    }

    /// A shard could not send a copy. Returns true when the message is an open waiting send:
    /// its failure is only counted (it is retried until its time is up, and another next hop
    /// may come up meanwhile), not reported as a final PENDING_NODE.
    pub fn note_failure(&mut self, msg_id: u64) -> bool {
        match self.entry_mut(msg_id).and_then(|e| e.waiting.as_mut()) {
            Some(w) if !w.settled => {
                w.failed += 1;
                true
            }
            _ => false,
        }
    }

    /// Whether more copies of `msg_id` should be sent: an open waiting send still QUEUED.
    pub fn wants_retransmit(&self, msg_id: u64) -> bool {
        self.entry(msg_id).is_some_and(|e| {
            e.current.status == MessageStatus::Queued && e.waiting.is_some_and(|w| !w.settled)
        })
    }

    /// The copies of `msg_id` sent and failed so far.
    pub fn attempts(&self, msg_id: u64) -> Option<(u32, u32)> {
        self.entry(msg_id)
            .and_then(|e| e.waiting)
            .map(|w| (w.attempts, w.failed))
    }

    /// Ends a waiting send's retransmission. If it is still QUEUED, `outcome` (if any) is
    /// what it came to, given to every waiter and watcher (the wait is over). Returns the
    /// current status.
    pub fn settle(&mut self, msg_id: u64, outcome: Option<StatusUpdate>) -> Option<StatusUpdate> {
        let pinned = msg_id < self.first_id;
        let entry = self.entry_mut(msg_id)?;
        let mut opened = false;
        if let Some(w) = entry.waiting.as_mut()
            && !w.settled
        {
            w.settled = true;
            opened = true;
        }
        if opened
            && let Some(outcome) = outcome
            && entry.current.status == MessageStatus::Queued
        {
            entry.current = outcome;
            let current = entry.current.clone();
            entry
                .watchers
                .retain_mut(|w| w.try_send(current.clone()).is_ok());
            for (_, waiter) in std::mem::take(&mut entry.waiters) {
                let _ = waiter.send(current.clone());
            }
        }
        let current = entry.current.clone();
        let idle = entry.waiters.is_empty();
        if opened {
            self.open_waiting = self.open_waiting.saturating_sub(1);
        }
        if pinned && idle {
            self.pinned.remove(&msg_id);
        }
        Some(current)
    }

    /// Visits at most `budget` pinned messages, and takes what it visits off it.
    pub fn update_pinned(
        &mut self,
        ids: Range<u64>,
        from: Option<u64>,
        update: &StatusUpdate,
        budget: &mut u64,
    ) -> usize {
        let hit: Vec<u64> = self
            .pinned
            .range(ids)
            .map(|(id, _)| *id)
            .take(usize::try_from(*budget).unwrap_or(usize::MAX))
            .collect();
        *budget -= hit.len() as u64;
        hit.into_iter()
            .filter(|&id| self.apply(id, from, update))
            .count()
    }

    /// The id the next message gets.
    pub fn next_id(&self) -> u64 {
        self.first_id + self.entries.len() as u64
    }

    /// The ids remembered now: a report about any other id is ignored without work.
    pub fn tracked_ids(&self) -> Range<u64> {
        self.first_id..self.next_id()
    }

    /// Starts tracking a message sent to `dst`; returns its id.
    pub fn insert(&mut self, dst: u64, require_ack: bool, status: StatusUpdate) -> u64 {
        self.insert_entry(dst, require_ack, status, BTreeMap::new())
    }

    /// Starts tracking a broadcast to `targets` (this node included if it is one); returns
    /// its id.
    pub fn insert_broadcast(
        &mut self,
        targets: &[u64],
        require_ack: bool,
        status: StatusUpdate,
    ) -> u64 {
        let targets = targets.iter().map(|t| (*t, None)).collect();
        self.insert_entry(0, require_ack, status, targets)
    }

    fn insert_entry(
        &mut self,
        dst: u64,
        require_ack: bool,
        status: StatusUpdate,
        targets: BTreeMap<u64, Option<MessageStatus>>,
    ) -> u64 {
        if self.entries.len() >= self.capacity {
            if let Some(oldest) = self.entries.pop_front()
                && (oldest.waiting.is_some_and(|w| !w.settled) || !oldest.waiters.is_empty())
            {
                self.pinned.insert(self.first_id, oldest);
                // Waits whose caller gave up leave entries behind; past twice the open bound
                // the oldest go (their waiters, if any are left, see the channel close).
                while self.pinned.len() > 2 * MAX_OPEN_WAITING {
                    if let Some((_, gone)) = self.pinned.pop_first()
                        && gone.waiting.is_some_and(|w| !w.settled)
                    {
                        self.open_waiting = self.open_waiting.saturating_sub(1);
                    }
                }
            }
            self.first_id += 1;
        }
        let msg_id = self.next_id();
        self.entries.push_back(Entry {
            dst,
            waiting: None,
            require_ack,
            current: status,
            targets,
            waiters: Vec::new(),
            watchers: Vec::new(),
        });
        self.total += 1;
        debug_assert!(self.entries.len() <= self.capacity);
        msg_id
    }

    fn entry(&self, msg_id: u64) -> Option<&Entry> {
        match msg_id.checked_sub(self.first_id) {
            Some(index) => self.entries.get(usize::try_from(index).ok()?),
            None => self.pinned.get(&msg_id),
        }
    }

    fn entry_mut(&mut self, msg_id: u64) -> Option<&mut Entry> {
        match msg_id.checked_sub(self.first_id) {
            Some(index) => self.entries.get_mut(usize::try_from(index).ok()?),
            None => self.pinned.get_mut(&msg_id),
        }
    }

    /// A relay's word that it dropped `ids` on their way to `dst`: each of them that is a
    /// fire-and-forget message to `dst` still QUEUED takes `update` (PENDING_NODE, saying
    /// which relay). Waiting sends are left alone (they are sent again), and so is anything
    /// already answered; a later report of the destination still moves the message on, so a
    /// relay that lies about a message it never dropped misleads only until the destination
    /// answers. Ids outside what is remembered are not walked. Returns how many changed.
    pub fn relay_dropped(&mut self, ids: Range<u64>, dst: u64, update: &StatusUpdate) -> usize {
        let start = ids.start.max(self.first_id);
        let end = ids.end.min(self.next_id());
        let mut changed = 0;
        for id in start..end {
            let dropped = self.entry_mut(id).is_some_and(|entry| {
                entry.dst == dst
                    && dst != 0
                    && entry.waiting.is_none()
                    && entry.current.status == MessageStatus::Queued
            });
            if dropped && self.apply(id, None, update) {
                changed += 1;
            }
        }
        changed
    }

    /// Applies one status to every tracked message of `ids` (a report run); ids outside what
    /// is remembered are skipped without being walked, so even a run of 2^64 ids costs at
    /// most one step per remembered message. Returns how many changed.
    pub fn update_range(
        &mut self,
        ids: Range<u64>,
        from: Option<u64>,
        update: &StatusUpdate,
    ) -> usize {
        let start = ids.start.max(self.first_id);
        let end = ids.end.min(self.next_id());
        (start..end)
            .filter(|&id| self.apply(id, from, update))
            .count()
    }

    /// Applies a status reported by `from` (`None` = this node's own verdict); ignored when
    /// `from` is not the message's destination (or a broadcast target), when the message is
    /// unknown, or when it would move backwards.
    pub fn update(&mut self, msg_id: u64, from: Option<u64>, update: StatusUpdate) -> bool {
        self.apply(msg_id, from, &update)
    }

    /// [`Self::update`] by reference: nothing is cloned for a message the update does not
    /// change, which is most of a hostile run's ids.
    fn apply(&mut self, msg_id: u64, from: Option<u64>, update: &StatusUpdate) -> bool {
        if update.status == MessageStatus::Queued && entry_is_unicast_from(self, msg_id, from) {
            // A destination's QUEUED answer: "busy, send again" changes nothing; "outcome
            // unknown" settles the message (no more copies), keeping QUEUED with that detail.
            if &*update.detail == UNKNOWN_DETAIL {
                return self.settle(msg_id, Some(update.clone())).is_some();
            }
            return false;
        }
        let Some(entry) = self.entry_mut(msg_id) else {
            return false;
        };
        let folded;
        let update = if entry.dst == 0 && !entry.targets.is_empty() {
            let Some(from) = from else {
                return false;
            };
            let Some(slot) = entry.targets.get_mut(&from) else {
                return false;
            };
            if slot.is_some_and(|s| rank(update.status) < rank(s)) {
                return false;
            }
            *slot = Some(update.status);
            let (status, detail) = fold(&entry.targets);
            folded = StatusUpdate {
                status,
                detail,
                timestamp_ms: update.timestamp_ms,
            };
            &folded
        } else {
            if from.is_some_and(|from| from != entry.dst) {
                return false;
            }
            update
        };
        if rank(update.status) < rank(entry.current.status) || *update == entry.current {
            return false;
        }
        entry.current = update.clone();
        let require_ack = entry.require_ack;
        let current = &entry.current;
        let waiters = std::mem::take(&mut entry.waiters);
        for (mode, waiter) in waiters {
            if ends_wait(mode, require_ack, current.status) {
                let _ = waiter.send(current.clone());
            } else {
                entry.waiters.push((mode, waiter));
            }
        }
        entry
            .watchers
            .retain_mut(|w| w.try_send(current.clone()).is_ok());
        let done = entry.waiters.is_empty() && entry.waiting.is_none_or(|w| w.settled);
        if done && msg_id < self.first_id {
            self.pinned.remove(&msg_id);
        }
        true
    }

    /// Waits for the status that ends `mode`; completes at once if it is already there.
    pub fn wait(&mut self, msg_id: u64, mode: SendMode) -> Option<oneshot::Receiver<StatusUpdate>> {
        let entry = self.entry_mut(msg_id)?;
        let (tx, rx) = oneshot::channel();
        if ends_wait(mode, entry.require_ack, entry.current.status) {
            let _ = tx.send(entry.current.clone());
        } else {
            entry.waiters.push((mode, tx));
        }
        Some(rx)
    }

    /// Every later status change of a message, starting with the current one.
    pub fn watch(&mut self, msg_id: u64) -> Option<mpsc::Receiver<StatusUpdate>> {
        let entry = self.entry_mut(msg_id)?;
        let (mut tx, rx) = mpsc::channel(WATCH_QUEUE);
        let _ = tx.try_send(entry.current.clone());
        entry.watchers.push(tx);
        Some(rx)
    }

    /// The current status of a message, with whether it needs an ack.
    pub fn get(&self, msg_id: u64) -> Option<(StatusUpdate, bool)> {
        self.entry(msg_id)
            .map(|e| (e.current.clone(), e.require_ack))
    }

    /// Messages tracked since start, forgotten ones included.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many remembered messages are in each status.
    pub fn counts(&self) -> BTreeMap<i32, u64> {
        let mut counts = BTreeMap::new();
        for entry in &self.entries {
            *counts.entry(entry.current.status as i32).or_insert(0) += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(status: MessageStatus) -> StatusUpdate {
        StatusUpdate {
            status,
            detail: "".into(),
            timestamp_ms: 0,
        }
    }

    #[test]
    fn an_open_waiting_send_outlives_any_number_of_newer_messages() {
        let mut tracker = MessageTracker::new(4, 100);
        let waiting = tracker.insert(9, false, update(MessageStatus::Queued));
        tracker.begin_waiting(waiting);
        let mut wait = tracker.wait(waiting, SendMode::WaitForDelivery).unwrap();
        for _ in 0..1_000 {
            tracker.insert(9, false, update(MessageStatus::Queued));
        }
        assert!(!tracker.tracked_ids().contains(&waiting), "out of the ring");
        assert!(tracker.wants_retransmit(waiting), "but still open");
        // A report run from its destination still finds it.
        let mut budget = 10;
        let changed = tracker.update_pinned(
            waiting..waiting + 1,
            Some(9),
            &update(MessageStatus::Delivered),
            &mut budget,
        );
        assert_eq!(changed, 1);
        assert_eq!(
            wait.try_recv().unwrap().map(|u| u.status),
            Some(MessageStatus::Delivered)
        );
        tracker.settle(waiting, None);
        assert!(
            tracker.get(waiting).is_none(),
            "settled and answered: unpinned"
        );
        assert!(tracker.can_open_waiting());
    }

    #[test]
    fn settling_a_queued_waiting_send_gives_its_outcome_to_the_waiter_once() {
        let mut tracker = MessageTracker::new(8, 1);
        let id = tracker.insert(9, false, update(MessageStatus::Queued));
        tracker.begin_waiting(id);
        tracker.note_attempt(id);
        assert!(
            tracker.note_failure(id),
            "a failed copy of an open send is only counted"
        );
        assert_eq!(tracker.attempts(id), Some((1, 1)));
        let mut wait = tracker.wait(id, SendMode::WaitForDelivery).unwrap();
        let unknown = StatusUpdate {
            status: MessageStatus::Queued,
            detail: UNKNOWN_DETAIL.into(),
            timestamp_ms: 1,
        };
        assert!(tracker.update(id, Some(9), unknown.clone()));
        assert_eq!(wait.try_recv().unwrap(), Some(unknown.clone()));
        assert!(!tracker.wants_retransmit(id));
        // A later timeout outcome does not overwrite what the destination said.
        let late = tracker.settle(id, Some(update(MessageStatus::PendingNode)));
        assert_eq!(late, Some(unknown));
        assert!(!tracker.note_failure(id));
        // A busy answer changes nothing.
        let other = tracker.insert(9, false, update(MessageStatus::Queued));
        tracker.begin_waiting(other);
        let busy = StatusUpdate {
            status: MessageStatus::Queued,
            detail: super::super::recent::BUSY_DETAIL.into(),
            timestamp_ms: 2,
        };
        assert!(!tracker.update(other, Some(9), busy));
        assert!(tracker.wants_retransmit(other));
    }

    #[test]
    fn a_wait_for_delivery_ends_on_delivered_and_a_wait_for_ack_on_the_ack() {
        let mut tracker = MessageTracker::new(8, 1);
        tracker.insert(7, true, update(MessageStatus::Queued));
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
        let mut tracker = MessageTracker::new(8, 1);
        tracker.insert(7, false, update(MessageStatus::Queued));
        assert!(!tracker.update(1, Some(8), update(MessageStatus::Delivered)));
        assert_eq!(tracker.get(1).unwrap().0.status, MessageStatus::Queued);
    }

    #[test]
    fn a_status_never_moves_backwards() {
        let mut tracker = MessageTracker::new(8, 1);
        tracker.insert(7, true, update(MessageStatus::Queued));
        tracker.update(1, Some(7), update(MessageStatus::AckFailure));
        assert!(!tracker.update(1, Some(7), update(MessageStatus::WaitingForClientAck)));
        assert_eq!(tracker.get(1).unwrap().0.status, MessageStatus::AckFailure);
    }

    #[test]
    fn the_oldest_messages_are_forgotten_past_capacity() {
        let mut tracker = MessageTracker::new(2, 1);
        for id in 1..=3 {
            assert_eq!(tracker.insert(7, false, update(MessageStatus::Queued)), id);
        }
        assert!(tracker.get(1).is_none());
        assert!(tracker.get(3).is_some());
        assert_eq!(tracker.total(), 3);
        assert_eq!(
            tracker.counts().get(&(MessageStatus::Queued as i32)),
            Some(&2)
        );
    }

    #[test]
    fn a_report_run_updates_only_what_is_remembered() {
        let mut tracker = MessageTracker::new(4, 10);
        for _ in 0..6 {
            tracker.insert(7, false, update(MessageStatus::Queued));
        }
        // 10 and 11 are forgotten; 12..=15 remain.
        let delivered = update(MessageStatus::Delivered);
        assert_eq!(tracker.update_range(0..u64::MAX, Some(7), &delivered), 4);
        assert_eq!(tracker.update_range(13..14, Some(7), &delivered), 0);
        assert_eq!(tracker.update_range(12..20, Some(8), &delivered), 0);
        assert!(tracker.get(11).is_none());
        assert_eq!(tracker.get(15).unwrap().0.status, MessageStatus::Delivered);
    }

    #[test]
    fn a_broadcast_is_queued_until_every_target_answers_then_takes_the_worst_status() {
        let mut tracker = MessageTracker::new(8, 1);
        tracker.insert_broadcast(&[1, 2, 3], false, update(MessageStatus::Queued));
        let mut wait = tracker.wait(1, SendMode::WaitForDelivery).unwrap();
        assert!(
            !tracker.update(1, Some(9), update(MessageStatus::Delivered)),
            "not a target"
        );
        tracker.update(1, Some(1), update(MessageStatus::Delivered));
        tracker.update(1, Some(2), update(MessageStatus::Delivered));
        assert!(matches!(wait.try_recv(), Ok(None)));
        tracker.update(1, Some(3), update(MessageStatus::PendingClient));
        let done = wait.try_recv().unwrap().unwrap();
        assert_eq!(done.status, MessageStatus::PendingClient);
        assert_eq!(&*done.detail, "2 of 3 nodes delivered");
    }

    #[test]
    fn a_watcher_sees_every_change_from_the_current_status_on() {
        let mut tracker = MessageTracker::new(8, 1);
        tracker.insert(7, true, update(MessageStatus::Queued));
        let mut watch = tracker.watch(1).unwrap();
        tracker.update(1, Some(7), update(MessageStatus::WaitingForClientAck));
        tracker.update(1, Some(7), update(MessageStatus::AckSuccess));
        let seen: Vec<_> = std::iter::from_fn(|| watch.try_recv().ok().map(|u| u.status)).collect();
        assert_eq!(
            seen,
            vec![
                MessageStatus::Queued,
                MessageStatus::WaitingForClientAck,
                MessageStatus::AckSuccess
            ]
        );
    }
}
