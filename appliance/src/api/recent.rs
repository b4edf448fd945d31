//! What this node answered for messages delivered here lately, so a retransmitted copy (same
//! source and message id) gets the first copy's answer instead of a second delivery.
//!
//! A source's message ids only grow (they start from its clock at boot), so each source gets
//! a window of its last `span` ids: one byte per id, indexed by
//! `msg_id - base`. No hashing per message and one allocation per source, not per message.
//! Ids older than the window are forgotten. Pure; the api thread owns it.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};

use meshd_proto::mesh::MessageStatus;

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
    /// Every matching subscriber's queue stayed full.
    SubscribersFull = 4,
}

impl Verdict {
    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Delivered),
            2 => Some(Self::WaitingForAck),
            3 => Some(Self::NoSubscriber),
            4 => Some(Self::SubscribersFull),
            _ => None,
        }
    }

    /// The status it reports.
    pub(crate) fn status(self) -> MessageStatus {
        match self {
            Self::Delivered => MessageStatus::Delivered,
            Self::WaitingForAck => MessageStatus::WaitingForClientAck,
            Self::NoSubscriber | Self::SubscribersFull => MessageStatus::PendingClient,
        }
    }

    /// The detail that goes with it.
    pub(crate) fn detail(self) -> &'static str {
        match self {
            Self::Delivered | Self::WaitingForAck => "",
            Self::NoSubscriber => "no subscriber for this message",
            Self::SubscribersFull => "every matching subscriber's queue is full",
        }
    }
}

struct Window {
    base: u64,
    /// `verdicts[i]` is the verdict code of message `base + i`; 0 = not delivered here.
    verdicts: VecDeque<u8>,
}

/// Recent verdicts, per source.
pub(crate) struct RecentDeliveries {
    sources: HashMap<u64, Window>,
    span: u64,
}

impl RecentDeliveries {
    /// Remembers the last `span` message ids of every source.
    pub(crate) fn new(span: u64) -> Self {
        assert!(span > 0);
        Self {
            sources: HashMap::new(),
            span,
        }
    }

    /// The verdict on an earlier copy of (`source`, `msg_id`).
    pub(crate) fn get(&self, source: u64, msg_id: u64) -> Option<Verdict> {
        let window = self.sources.get(&source)?;
        let index = usize::try_from(msg_id.checked_sub(window.base)?).ok()?;
        Verdict::from_code(*window.verdicts.get(index)?)
    }

    /// Records the verdict on (`source`, `msg_id`).
    pub(crate) fn insert(&mut self, source: u64, msg_id: u64, verdict: Verdict) {
        let span = self.span;
        let window = self.sources.entry(source).or_insert_with(|| Window {
            base: msg_id,
            verdicts: VecDeque::new(),
        });
        if msg_id < window.base {
            if window.base - msg_id < span {
                // A late message within the span's reach but below the window: the window
                // only ever slides forward, so it is not remembered.
                return;
            }
            // Far below: the source restarted with a clock behind its old one.
            window.base = msg_id;
            window.verdicts.clear();
        }
        let last_allowed = window.base.saturating_add(span - 1);
        if msg_id > last_allowed {
            let slide = msg_id - last_allowed;
            let len = window.verdicts.len() as u64;
            if slide >= len {
                window.verdicts.clear();
            } else {
                window
                    .verdicts
                    .drain(..usize::try_from(slide).unwrap_or(usize::MAX));
            }
            window.base += slide;
        }
        let index = usize::try_from(msg_id - window.base).unwrap_or(usize::MAX);
        if index >= window.verdicts.len() {
            window.verdicts.resize(index + 1, 0);
        }
        window.verdicts[index] = verdict as u8;
        debug_assert!(window.verdicts.len() as u64 <= span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_copy_finds_the_first_verdict() {
        let mut recent = RecentDeliveries::new(8);
        recent.insert(7, 100, Verdict::Delivered);
        recent.insert(7, 102, Verdict::NoSubscriber);
        assert_eq!(recent.get(7, 100), Some(Verdict::Delivered));
        assert_eq!(recent.get(7, 101), None, "never delivered");
        assert_eq!(recent.get(7, 102), Some(Verdict::NoSubscriber));
        assert_eq!(recent.get(8, 100), None, "another source");
    }

    #[test]
    fn the_window_slides_and_forgets_the_oldest() {
        let mut recent = RecentDeliveries::new(4);
        for id in 10..20 {
            recent.insert(7, id, Verdict::Delivered);
        }
        assert_eq!(recent.get(7, 15), None);
        for id in 16..20 {
            assert_eq!(recent.get(7, id), Some(Verdict::Delivered));
        }
        // A jump far ahead clears everything before it.
        recent.insert(7, 1_000, Verdict::WaitingForAck);
        assert_eq!(recent.get(7, 19), None);
        assert_eq!(recent.get(7, 1_000), Some(Verdict::WaitingForAck));
    }

    #[test]
    fn a_source_that_restarts_behind_its_old_ids_starts_a_new_window() {
        let mut recent = RecentDeliveries::new(4);
        recent.insert(7, 1_000, Verdict::Delivered);
        recent.insert(7, 998, Verdict::Delivered);
        assert_eq!(recent.get(7, 998), None, "slightly late: not remembered");
        recent.insert(7, 5, Verdict::Delivered);
        assert_eq!(recent.get(7, 5), Some(Verdict::Delivered));
    }

    #[test]
    fn ids_near_the_top_of_the_range_do_not_overflow() {
        let mut recent = RecentDeliveries::new(4);
        recent.insert(7, u64::MAX - 1, Verdict::Delivered);
        recent.insert(7, u64::MAX, Verdict::Delivered);
        assert_eq!(recent.get(7, u64::MAX), Some(Verdict::Delivered));
        assert_eq!(recent.get(7, u64::MAX - 1), Some(Verdict::Delivered));
    }
}
