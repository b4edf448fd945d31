//! Exact de-duplication of retransmitted waiting sends at their destination.
//!
//! A waiting send is retransmitted (same message) until its destination answers, so the
//! destination must deliver each one once and answer every copy alike. Each sender session
//! (one life of the sender's api, `Data.src_session`) numbers its waiting sends to each
//! destination 1, 2, 3… (`Data.seq`), and every copy carries the sender's *floor*: every seq
//! below it is answered or given up and will never be sent again. So a destination keeps, per
//! (source, session), exactly the verdicts of seqs in `[floor, highest seen]`: no time guess, no
//! window that wraps at speed, nothing forgotten that could still come back.
//!
//! Bounds: a window holds at most [`MAX_OPEN_PER_SOURCE`] seqs (a sender never has more waiting
//! sends open to one destination; a copy beyond that is refused, not delivered, and sent again
//! later); at most [`MAX_SESSIONS`] windows exist, and only a window idle for longer than any
//! waiting send may live ([`IDLE_EVICTION`]) is ever evicted to make room. A new session with no
//! room is refused the same way.
//!
//! A destination that restarted has lost its windows. A first copy is always safe to deliver;
//! a retransmitted copy (attempt > 1) is delivered only if the sender's first copy was
//! addressed to this same life of the destination (`Data.dst_generation`), since otherwise an
//! earlier life may have delivered it: the answer is then [`Verdict::Unknown`], never a second
//! delivery.
//!
//! Fire-and-forget messages (seq 0) are never retransmitted and need no record. Pure; the api
//! thread owns it.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use meshd_proto::mesh::MessageStatus;

/// Waiting sends one sender session may have open towards one destination.
pub(crate) const MAX_OPEN_PER_SOURCE: u64 = 1 << 16;

/// Windows kept at once (sender sessions seen lately).
pub(crate) const MAX_SESSIONS: usize = 1 << 14;

/// Verdict bytes held by all windows together. Sessions × open seqs alone would allow 1 GiB
/// (a peer can name sessions and seqs freely); past this, copies that would grow a window are
/// answered busy (not delivered, sent again later).
pub(crate) const MAX_TOTAL_VERDICTS: usize = 16 << 20;

/// A window idle this long can be dropped: the longest a waiting send retransmits is its
/// timeout, capped at [`MAX_WAIT_SECONDS`], so no copy of its session can still come.
pub(crate) const IDLE_EVICTION: Duration = Duration::from_secs(MAX_WAIT_SECONDS + 60);

/// Longest wait a send may ask for (`timeout_seconds`).
pub(crate) const MAX_WAIT_SECONDS: u64 = 3600;

/// What a delivery attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Verdict {
    /// Handed to at least one subscriber.
    Delivered = 1,
    /// Handed over; the application acknowledges it later.
    WaitingForAck = 2,
    /// No subscriber wants it.
    NoSubscriber = 3,
    /// Every matching subscriber's queue was full (fire-and-forget: final).
    SubscribersFull = 4,
    /// A retransmitted copy reached a later life of this node than the first copy did: an
    /// earlier life may have delivered it, so it is not delivered again and the outcome is
    /// unknown. Reported as QUEUED with a detail that says so; the sender stops retrying.
    Unknown = 5,
    /// No room to remember it (see the module bounds): not delivered; the sender tries again.
    Busy = 6,
    /// End-to-end encrypted for a tenant this node does not serve, or not opening: not
    /// delivered, and never will be here.
    NoTenantKey = 7,
    /// Every matching subscriber's queue was full when a waiting send's copy came: not
    /// delivered and not remembered, so the sender's next copy is offered again.
    SubscribersBusy = 8,
}

impl Verdict {
    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Delivered),
            2 => Some(Self::WaitingForAck),
            3 => Some(Self::NoSubscriber),
            4 => Some(Self::SubscribersFull),
            5 => Some(Self::Unknown),
            6 => Some(Self::Busy),
            7 => Some(Self::NoTenantKey),
            8 => Some(Self::SubscribersBusy),
            _ => None,
        }
    }

    /// The status it reports.
    pub(crate) fn status(self) -> MessageStatus {
        match self {
            Self::Delivered => MessageStatus::Delivered,
            Self::WaitingForAck => MessageStatus::WaitingForClientAck,
            Self::NoSubscriber | Self::SubscribersFull | Self::NoTenantKey => {
                MessageStatus::PendingClient
            }
            Self::Unknown | Self::Busy | Self::SubscribersBusy => MessageStatus::Queued,
        }
    }

    /// The detail that goes with it.
    pub(crate) fn detail(self) -> &'static str {
        match self {
            Self::Delivered | Self::WaitingForAck => "",
            Self::NoSubscriber => "no subscriber for this message",
            Self::SubscribersFull => "every matching subscriber's queue is full",
            Self::Unknown => UNKNOWN_DETAIL,
            Self::Busy => BUSY_DETAIL,
            Self::SubscribersBusy => SUBSCRIBERS_BUSY_DETAIL,
            Self::NoTenantKey => {
                "end-to-end encrypted for a tenant the destination does not serve (its config \
                 `tenants`), or the payload did not open"
            }
        }
    }
}

/// The detail of [`Verdict::Unknown`]; the sender recognises it and stops retransmitting.
pub(crate) const UNKNOWN_DETAIL: &str = "outcome unknown: the destination restarted since the first copy \
     was sent and an earlier life of it may have delivered it; not sent again, so it is never \
     delivered twice";

/// The detail of [`Verdict::Busy`]; the sender keeps retransmitting.
pub(crate) const BUSY_DETAIL: &str = "destination busy: too many open waiting sends";

/// The detail of [`Verdict::SubscribersBusy`]; the sender keeps retransmitting.
pub(crate) const SUBSCRIBERS_BUSY_DETAIL: &str =
    "destination busy: every matching subscriber's queue is full; sent again";

/// What a copy of a waiting send says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// The sending node.
    pub(crate) source: u64,
    /// The sender's session (one life of its api).
    pub(crate) session: u64,
    /// The message's number among the session's waiting sends to this node (≥ 1).
    pub(crate) seq: u64,
    /// Every seq below this is settled at the sender.
    pub(crate) floor: u64,
    /// 1 for the first copy.
    pub(crate) attempt: u32,
    /// The life of this node the sender believed in when it sent the first copy.
    pub(crate) dst_generation: u32,
}

/// What to do with a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Deliver it, then [`RecentDeliveries::record`] the verdict.
    Deliver,
    /// Do not deliver; answer this.
    Answer(Verdict),
    /// Do not deliver and do not answer: the sender has settled it already.
    Ignore,
}

struct Window {
    /// Seq of `verdicts[0]`; every seq below is settled at the sender.
    floor: u64,
    /// 0 = not delivered here.
    verdicts: VecDeque<u8>,
    last_used: Instant,
}

/// Open windows, per (source, session).
pub(crate) struct RecentDeliveries {
    windows: HashMap<(u64, u64), Window>,
    /// Sum of the windows' `verdicts` lengths.
    total: usize,
    /// This node's life, as the mesh knows it.
    generation: u32,
}

impl RecentDeliveries {
    pub(crate) fn new(generation: u32) -> Self {
        Self {
            windows: HashMap::new(),
            total: 0,
            generation,
        }
    }

    /// Decides on a copy of a waiting send arriving at `now`.
    pub(crate) fn check(&mut self, copy: Arrival, now: Instant) -> Decision {
        if copy.seq == 0 || copy.floor == 0 || copy.floor > copy.seq {
            // Not a waiting send, or a malformed one: an open message holds its sender's
            // floor at or below its own seq.
            return Decision::Answer(Verdict::Busy);
        }
        let key = (copy.source, copy.session);
        if !self.windows.contains_key(&key) && !self.make_room(now) {
            return Decision::Answer(Verdict::Busy);
        }
        let window = self.windows.entry(key).or_insert_with(|| Window {
            floor: copy.floor,
            verdicts: VecDeque::new(),
            last_used: now,
        });
        window.last_used = now;
        if copy.floor > window.floor {
            let settled = copy.floor - window.floor;
            let len = window.verdicts.len() as u64;
            let gone = usize::try_from(settled.min(len)).unwrap_or(usize::MAX);
            window.verdicts.drain(..gone);
            self.total -= gone;
            window.floor = copy.floor;
        }
        if copy.seq < window.floor {
            return Decision::Ignore;
        }
        let index = copy.seq - window.floor;
        if index >= MAX_OPEN_PER_SOURCE {
            return Decision::Answer(Verdict::Busy);
        }
        let index = index as usize;
        if let Some(earlier) = window
            .verdicts
            .get(index)
            .copied()
            .and_then(Verdict::from_code)
        {
            return Decision::Answer(earlier);
        }
        if index >= window.verdicts.len()
            && self.total + (index + 1 - window.verdicts.len()) > MAX_TOTAL_VERDICTS
        {
            return Decision::Answer(Verdict::Busy);
        }
        if copy.attempt > 1 && copy.dst_generation != self.generation {
            self.set(key, index, Verdict::Unknown);
            return Decision::Answer(Verdict::Unknown);
        }
        Decision::Deliver
    }

    /// Records the verdict on a copy [`Self::check`] said to deliver.
    pub(crate) fn record(&mut self, copy: Arrival, verdict: Verdict) {
        let key = (copy.source, copy.session);
        let Some(window) = self.windows.get(&key) else {
            return;
        };
        let Some(index) = copy.seq.checked_sub(window.floor) else {
            return;
        };
        if index < MAX_OPEN_PER_SOURCE {
            self.set(key, index as usize, verdict);
        }
    }

    fn set(&mut self, key: (u64, u64), index: usize, verdict: Verdict) {
        if let Some(window) = self.windows.get_mut(&key) {
            if index >= window.verdicts.len() {
                if self.total + (index + 1 - window.verdicts.len()) > MAX_TOTAL_VERDICTS {
                    return;
                }
                self.total += index + 1 - window.verdicts.len();
                window.verdicts.resize(index + 1, 0);
            }
            window.verdicts[index] = verdict as u8;
        }
    }

    /// Whether a new window fits, evicting one idle past [`IDLE_EVICTION`] if need be.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.windows.len() < MAX_SESSIONS {
            return true;
        }
        let idle = self
            .windows
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_used) > IDLE_EVICTION)
            .min_by_key(|(_, w)| w.last_used)
            .map(|(key, _)| *key);
        match idle {
            Some(key) => {
                if let Some(gone) = self.windows.remove(&key) {
                    self.total -= gone.verdicts.len();
                }
                true
            }
            None => false,
        }
    }

    /// Windows held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(seq: u64, floor: u64, attempt: u32) -> Arrival {
        Arrival {
            source: 7,
            session: 1,
            seq,
            floor,
            attempt,
            dst_generation: 3,
        }
    }

    fn deliver(recent: &mut RecentDeliveries, c: Arrival, now: Instant) -> Decision {
        let decision = recent.check(c, now);
        if decision == Decision::Deliver {
            recent.record(c, Verdict::Delivered);
        }
        decision
    }

    #[test]
    fn every_copy_of_a_delivered_message_gets_the_first_answer_however_many_come_between() {
        let t = Instant::now();
        let mut recent = RecentDeliveries::new(3);
        assert_eq!(deliver(&mut recent, copy(1, 1, 1), t), Decision::Deliver);
        // A million later sends while message 1 stays open: no window wraps past it.
        for seq in 2..1_000 {
            assert_eq!(deliver(&mut recent, copy(seq, 1, 1), t), Decision::Deliver);
        }
        assert_eq!(
            recent.check(copy(1, 1, 9), t),
            Decision::Answer(Verdict::Delivered)
        );
        // Once the sender's floor passes it, late copies are ignored and memory is freed.
        assert_eq!(recent.check(copy(1_000, 999, 1), t), Decision::Deliver);
        assert_eq!(
            recent.check(copy(1, 1, 2), t),
            Decision::Ignore,
            "a late copy carries its old floor; the window's is higher"
        );
    }

    #[test]
    fn a_retransmission_to_a_later_life_is_unknown_never_a_second_delivery() {
        let t = Instant::now();
        // This node is generation 4; the sender's first copy went to generation 3.
        let mut restarted = RecentDeliveries::new(4);
        assert_eq!(
            restarted.check(copy(5, 5, 2), t),
            Decision::Answer(Verdict::Unknown)
        );
        assert_eq!(
            restarted.check(copy(5, 5, 3), t),
            Decision::Answer(Verdict::Unknown),
            "and it stays unknown"
        );
        // A first copy is safe whatever the sender believed.
        assert_eq!(restarted.check(copy(6, 5, 1), t), Decision::Deliver);
        // The same life: a retransmission of something never seen is delivered.
        let mut same = RecentDeliveries::new(3);
        assert_eq!(same.check(copy(5, 5, 2), t), Decision::Deliver);
    }

    #[test]
    fn hostile_seqs_and_floors_are_bounded() {
        let t = Instant::now();
        let mut recent = RecentDeliveries::new(3);
        assert_eq!(
            recent.check(copy(0, 0, 1), t),
            Decision::Answer(Verdict::Busy)
        );
        assert_eq!(
            recent.check(copy(5, 9, 1), t),
            Decision::Answer(Verdict::Busy),
            "seq below its own floor + 1"
        );
        assert_eq!(
            recent.check(copy(u64::MAX, 1, 1), t),
            Decision::Answer(Verdict::Busy),
            "too far above the floor to remember"
        );
        assert_eq!(
            deliver(&mut recent, copy(u64::MAX, u64::MAX, 1), t),
            Decision::Deliver
        );
        assert!(recent.windows.values().all(|w| w.verdicts.len() <= 1));
    }

    #[test]
    fn verdict_memory_is_bounded_across_all_windows() {
        let t = Instant::now();
        let mut recent = RecentDeliveries::new(3);
        // Each session opens the farthest seq it may: without the total bound 16 384 of them
        // would hold 1 GiB.
        let far = MAX_OPEN_PER_SOURCE - 1;
        let mut busy = 0;
        for session in 0..1_000u64 {
            let c = Arrival {
                session,
                ..copy(1 + far, 1, 1)
            };
            match recent.check(c, t) {
                Decision::Deliver => recent.record(c, Verdict::Delivered),
                Decision::Answer(Verdict::Busy) => busy += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(recent.total <= MAX_TOTAL_VERDICTS);
        assert!(busy > 0, "the bound was reached and held");
    }

    #[test]
    fn sessions_are_bounded_and_only_idle_ones_are_evicted() {
        let t = Instant::now();
        let mut recent = RecentDeliveries::new(3);
        for session in 0..MAX_SESSIONS as u64 {
            let c = Arrival {
                session,
                ..copy(1, 1, 1)
            };
            assert_eq!(recent.check(c, t), Decision::Deliver);
        }
        let newcomer = Arrival {
            session: u64::MAX,
            ..copy(1, 1, 1)
        };
        assert_eq!(
            recent.check(newcomer, t + Duration::from_secs(1)),
            Decision::Answer(Verdict::Busy),
            "no idle window to evict"
        );
        let later = t + IDLE_EVICTION + Duration::from_secs(1);
        assert_eq!(recent.check(newcomer, later), Decision::Deliver);
        assert_eq!(recent.len(), MAX_SESSIONS);
    }
}
