//! Bounds on what a peer's Raft RPC may make this node do, checked before openraft sees it
//! (pure; shared by the mesh control group and the data stream groups).
//!
//! openraft trusts its peers, and any certified member can send these frames (the origin tag
//! proves who sent one, not that the sender may): a snapshot chunk is written where the
//! sender says (a seek and a write into a `Cursor<Vec<u8>>`: offset 2^40 made the process
//! abort on allocation), and a term is taken as given (`u64::MAX` leaves no term to elect
//! with). Who may speak in a group at all is issue 24's (the membership chain).

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

/// Largest step a request may take the term above this node's. A partitioned node without
/// pre-vote raises its term once per election timeout: 2^32 elections are decades, so an
/// honest node never nears it, while a forged jump gains at most this much per frame.
pub(crate) const MAX_TERM_STEP: u64 = 1 << 32;

/// No term at or past this is accepted, so terms never come near overflow.
pub(crate) const MAX_TERM: u64 = 1 << 62;

/// Why a request was dropped before openraft saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its term jumps too far ahead of ours, or is absurd.
    Term { theirs: u64, ours: u64 },
    /// A snapshot chunk past the cap, or leaving a gap, or not starting a new snapshot at 0.
    Snapshot(&'static str),
}

impl Refusal {
    /// The counter it is counted under.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Term { .. } => "raft_term_jump",
            Self::Snapshot(_) => "raft_snapshot_chunk",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Term { theirs, ours } => write!(
                f,
                "term {theirs} jumps more than {MAX_TERM_STEP} past ours ({ours}) or past {MAX_TERM}"
            ),
            Self::Snapshot(why) => write!(f, "snapshot chunk refused: {why}"),
        }
    }
}

/// Requests refused here so far, process-wide.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Counts a refusal and logs it at the 1st, 2nd, 4th … (a member that floods them gets a
/// logarithmic number of lines). `group` 0 is the mesh control group.
pub(crate) fn note(refusal: &Refusal, from: u64, group: u64) {
    let count = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    if count.is_power_of_two() {
        tracing::warn!(
            from,
            group = %format_args!("{group:016x}"),
            kind = refusal.kind(),
            refused = count,
            "raft request refused: {refusal} (this warning repeats at every power of two)"
        );
    }
}

/// Raft requests refused by these checks since the process started.
pub(crate) fn refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Checks a request's term against this node's current term.
pub(crate) fn check_term(theirs: u64, ours: u64) -> Result<(), Refusal> {
    if theirs >= MAX_TERM || theirs > ours.saturating_add(MAX_TERM_STEP) {
        return Err(Refusal::Term { theirs, ours });
    }
    Ok(())
}

/// The snapshot a group is receiving, as far as the chunks admitted so far go: each chunk
/// must start within what was written (no gap: a resent chunk may overwrite) and end within
/// `max_bytes`, so the buffer openraft writes into never holds more than the sender really
/// sent, nor more than the cap.
#[derive(Debug)]
pub(crate) struct SnapshotGate {
    max_bytes: u64,
    /// The snapshot id being received and the end of what was admitted of it.
    current: Option<(String, u64)>,
}

impl SnapshotGate {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            current: None,
        }
    }

    /// Admits (or refuses) a chunk of `len` bytes at `offset` of snapshot `id`; `done` ends
    /// the snapshot.
    pub(crate) fn admit(
        &mut self,
        id: &str,
        offset: u64,
        len: usize,
        done: bool,
    ) -> Result<(), Refusal> {
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len))
            .ok_or(Refusal::Snapshot("offset and length overflow"))?;
        if end > self.max_bytes {
            return Err(Refusal::Snapshot("larger than this node accepts"));
        }
        let written = match &self.current {
            Some((current, written)) if current == id => *written,
            // A new snapshot starts at its beginning (openraft requires it too).
            _ if offset == 0 => 0,
            _ => return Err(Refusal::Snapshot("a new snapshot must start at offset 0")),
        };
        if offset > written {
            return Err(Refusal::Snapshot("leaves a gap after what was received"));
        }
        self.current = (!done).then(|| (id.to_owned(), written.max(end)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_may_rise_by_elections_but_not_jump_or_near_overflow() {
        assert!(check_term(5, 5).is_ok());
        assert!(
            check_term(4, 5).is_ok(),
            "an older term is openraft's to refuse"
        );
        assert!(check_term(5 + MAX_TERM_STEP, 5).is_ok());
        assert!(check_term(6 + MAX_TERM_STEP, 5).is_err());
        assert!(check_term(u64::MAX, u64::MAX).is_err());
        assert!(check_term(MAX_TERM, MAX_TERM - 1).is_err());
    }

    #[test]
    fn snapshot_chunks_come_in_order_from_zero_within_the_cap() {
        let mut gate = SnapshotGate::new(100);
        // The attack: a chunk far past anything received.
        assert!(gate.admit("s1", 1 << 40, 1, false).is_err());
        assert!(
            gate.admit("s1", 10, 1, false).is_err(),
            "a new snapshot starts at 0"
        );
        gate.admit("s1", 0, 40, false).unwrap();
        gate.admit("s1", 40, 40, false).unwrap();
        // A resent chunk overwrites; a gap is refused; so is anything past the cap.
        gate.admit("s1", 40, 40, false).unwrap();
        assert!(gate.admit("s1", 81, 1, false).is_err());
        assert!(gate.admit("s1", 80, 21, false).is_err());
        assert!(gate.admit("s1", u64::MAX, 2, false).is_err());
        gate.admit("s1", 80, 20, true).unwrap();
        // Done: the next snapshot (or the same one sent again) starts over at 0.
        assert!(gate.admit("s1", 40, 1, false).is_err());
        gate.admit("s2", 0, 1, false).unwrap();
        // A new snapshot replaces one left unfinished.
        gate.admit("s3", 0, 1, false).unwrap();
        assert!(gate.admit("s2", 1, 1, false).is_err());
    }
}
