//! Exactly-once client data streams, sans-IO.
//!
//! A stream runs from one source node to 1..=[`MAX_TARGETS`] target nodes. The source numbers
//! messages 1, 2, 3… ([`Seq`]), keeps each in its durable outbox until every target has
//! processed it, and sends to each target within the credit that target grants. Each target
//! stores what arrives in order in its durable inbox, hands it to its subscriber in order, and
//! records the subscriber's acknowledgement (its *processed* offset) in the same transaction
//! as the message's delivery record. Reports (`received`, `processed`, `window`) flow back.
//!
//! - [`source::Source`]: sequencing, producer dedupe, credits, go-back-N retransmission, the
//!   producer's ack point and the release point.
//! - [`target::Inbox`]: dedupe, reorder, subscriber credit, offsets.
//! - [`chunk`]: splitting a message larger than a frame, and bounded reassembly with a
//!   BLAKE3 check of the whole.
//!
//! Nothing here does I/O or reads a clock: callers pass `now` (ms) and persist what the
//! cores tell them before acting on it (every `on_*_durable` is called only after fsync).
#![forbid(unsafe_code)]

pub mod chunk;
pub mod source;
pub mod target;

#[cfg(test)]
mod sim;

/// A message's place in its stream: 1 for the first message, never reused.
pub type Seq = u64;

/// Most targets one stream may have.
pub const MAX_TARGETS: usize = 16;

/// The order a worker's turn serves its streams in: higher priority first (strict), and within
/// one priority each stream leads in its turn, so equals share what a turn can take.
/// `by_priority` is sorted by priority, highest first (see [`sort_by_priority`]); `turn`
/// counts the caller's turns; the ids go to `out` (cleared first).
pub fn priority_order(by_priority: &[(u8, u128)], turn: usize, out: &mut Vec<u128>) {
    out.clear();
    let mut start = 0;
    while start < by_priority.len() {
        let priority = by_priority[start].0;
        let n = by_priority[start..]
            .iter()
            .take_while(|(p, _)| *p == priority)
            .count();
        for k in 0..n {
            out.push(by_priority[start + (turn + k) % n].1);
        }
        start += n;
    }
}

/// Sorts (priority, stream) pairs as [`priority_order`] needs them.
pub fn sort_by_priority(streams: &mut [(u8, u128)]) {
    streams.sort_unstable_by_key(|&(priority, id)| (core::cmp::Reverse(priority), id));
}

/// When a message counts as committed (processed by the group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Every target processed it.
    All,
    /// At least this many targets processed it (1..=targets).
    Quorum(u8),
}

impl Completion {
    /// From the wire: 0 means all targets.
    pub const fn from_quorum(quorum: u32) -> Self {
        if quorum == 0 {
            Self::All
        } else if quorum > u8::MAX as u32 {
            Self::Quorum(u8::MAX)
        } else {
            Self::Quorum(quorum as u8)
        }
    }

    /// To the wire: 0 means all targets.
    pub const fn quorum(self) -> u32 {
        match self {
            Self::All => 0,
            Self::Quorum(k) => k as u32,
        }
    }

    /// How many of `targets` targets must have a message.
    pub fn required(self, targets: usize) -> usize {
        match self {
            Self::All => targets,
            Self::Quorum(k) => usize::from(k).min(targets),
        }
    }

    /// Whether the policy makes sense for `targets` targets.
    pub fn check(self, targets: usize) -> Result<(), String> {
        if targets == 0 || targets > MAX_TARGETS {
            return Err(format!(
                "a stream has 1..={MAX_TARGETS} targets, not {targets}"
            ));
        }
        match self {
            Self::Quorum(k) if k == 0 || usize::from(k) > targets => Err(format!(
                "a quorum of {k} is not possible with {targets} targets"
            )),
            _ => Ok(()),
        }
    }

    /// The highest seq that `required` of `marks` reached: the k-th highest mark.
    pub fn reached(self, marks: impl Iterator<Item = Seq>) -> Seq {
        let mut marks: Vec<Seq> = marks.collect();
        let k = self.required(marks.len());
        if k == 0 {
            return 0;
        }
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks[k - 1]
    }
}

/// What a target tells its source about a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Every seq up to here is durable in the target's inbox.
    pub received: Seq,
    /// Every seq up to here was processed by the target's subscriber (durably recorded).
    pub processed: Seq,
    /// How many messages past `processed` the target will take.
    pub window: u32,
}

impl Report {
    /// The highest seq the target will take now.
    pub const fn limit(&self) -> Seq {
        self.processed.saturating_add(self.window as Seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_reaches_the_kth_highest_mark() {
        assert_eq!(Completion::All.reached([5, 3, 9].into_iter()), 3);
        assert_eq!(Completion::Quorum(2).reached([5, 3, 9].into_iter()), 5);
        assert_eq!(Completion::Quorum(1).reached([5, 3, 9].into_iter()), 9);
        assert_eq!(Completion::All.reached(std::iter::empty()), 0);
        assert!(Completion::Quorum(4).check(3).is_err());
        assert!(Completion::Quorum(0).check(3).is_err());
        assert!(Completion::All.check(0).is_err());
        assert!(Completion::All.check(MAX_TARGETS + 1).is_err());
        assert!(Completion::Quorum(2).check(3).is_ok());
    }

    #[test]
    fn higher_priorities_go_first_and_equals_take_turns_leading() {
        let mut streams = vec![(0, 10), (7, 20), (0, 11), (7, 21), (3, 30), (0, 12)];
        sort_by_priority(&mut streams);
        let mut out = Vec::new();
        priority_order(&streams, 0, &mut out);
        assert_eq!(out, vec![20, 21, 30, 10, 11, 12]);
        priority_order(&streams, 1, &mut out);
        assert_eq!(out, vec![21, 20, 30, 11, 12, 10]);
        // Over as many turns as there are equals, each of them leads once.
        let leaders: std::collections::BTreeSet<u128> = (0..3)
            .map(|turn| {
                priority_order(&streams, turn, &mut out);
                out[3]
            })
            .collect();
        assert_eq!(leaders.len(), 3);
        priority_order(&[], 5, &mut out);
        assert!(out.is_empty());
    }
}
