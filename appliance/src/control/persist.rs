//! Write-behind for the control database: hot events (a link up pins a key, an eviction heard
//! in gossip, a dial target learnt) only stage their write; the staged writes are committed in
//! one transaction at most [`FLUSH_INTERVAL`] after the first of them, so a burst of events
//! costs one fsync instead of one each and the control loop never waits on the disk per event.
//!
//! What a caller promises to someone else is made durable before the promise: lifecycle
//! answers, AddSession / DropSession answers, an accepted join and a renewed identity
//! generation go through [`Store::flush`] or [`Store::commit_now`], which commit everything
//! staged so far together with the new write (so the order of writes is kept).
//!
//! Time comes in as an argument, so the policy is tested with virtual time.

use std::time::{Duration, Instant};

use crate::storage::{ControlDb, StorageError, WriteBatch};

/// Staged writes wait at most this long. 100 ms bounds the fsync rate of the control thread
/// to ten a second under any flood of events, and what a crash can lose to the last 100 ms of
/// peer sightings and gossip-learnt evictions: both are learnt again from the mesh.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The control database and the writes staged for it.
pub struct Store {
    db: ControlDb,
    pending: WriteBatch,
    due: Option<Instant>,
    failed_commits: u64,
}

impl Store {
    /// Nothing staged yet.
    pub fn new(db: ControlDb) -> Self {
        Self {
            db,
            pending: WriteBatch::default(),
            due: None,
            failed_commits: 0,
        }
    }

    /// The database, for reads. Staged writes are not visible in it until they are committed.
    pub fn db(&self) -> &ControlDb {
        &self.db
    }

    /// Stages a write; it is committed at the latest [`FLUSH_INTERVAL`] after the oldest
    /// staged write.
    pub fn stage(&mut self, now: Instant, write: impl FnOnce(&mut WriteBatch)) {
        write(&mut self.pending);
        if self.due.is_none() && !self.pending.is_empty() {
            self.due = Some(now + FLUSH_INTERVAL);
        }
    }

    /// When [`Self::flush_if_due`] must next run.
    pub fn deadline(&self) -> Option<Instant> {
        self.due
    }

    /// Commits the staged writes if their time has come. A failed commit keeps them staged
    /// and tries again one interval later.
    pub fn flush_if_due(&mut self, now: Instant) {
        if self.due.is_some_and(|due| due <= now)
            && let Err(e) = self.flush()
        {
            self.due = Some(now + FLUSH_INTERVAL);
            tracing::error!(error = %e, staged = self.pending.len(), "control database write failed; retrying");
        }
    }

    /// Commits every staged write now (before an answer that promises durability).
    pub fn flush(&mut self) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            self.due = None;
            return Ok(());
        }
        match self.db.commit(&self.pending) {
            Ok(()) => {
                self.pending = WriteBatch::default();
                self.due = None;
                Ok(())
            }
            Err(e) => {
                self.failed_commits += 1;
                Err(e)
            }
        }
    }

    /// Commits the staged writes and `write` together, now. On error nothing is written,
    /// `write` is forgotten (the caller reports the failure) and the staged writes stay
    /// staged.
    pub fn commit_now(&mut self, write: impl FnOnce(&mut WriteBatch)) -> Result<(), StorageError> {
        let mut batch = self.pending.clone();
        write(&mut batch);
        match self.db.commit(&batch) {
            Ok(()) => {
                self.pending = WriteBatch::default();
                self.due = None;
                Ok(())
            }
            Err(e) => {
                self.failed_commits += 1;
                Err(e)
            }
        }
    }

    /// Writes staged and not yet committed (rows).
    pub fn staged(&self) -> usize {
        self.pending.len()
    }

    /// Commits that failed (each was retried or reported).
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::PeerRecord;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = ControlDb::open(dir.path()).unwrap();
        (dir, Store::new(db))
    }

    fn record(n: u64) -> PeerRecord {
        PeerRecord {
            public_key: [n as u8; 32],
            listen_addr: String::new(),
            last_seen_ms: n,
        }
    }

    #[test]
    fn a_flood_of_link_ups_costs_one_commit_per_interval_not_one_each() {
        let (_dir, mut store) = store();
        let start = Instant::now();
        let base = store.db().commits();
        // 10 000 link-up pins over one second of virtual time, the loop polling after each.
        for i in 0..10_000u64 {
            let now = start + Duration::from_micros(i * 100);
            store.stage(now, |b| b.upsert_peer(i % 500, record(i)));
            store.flush_if_due(now);
        }
        let end = start + Duration::from_secs(1) + FLUSH_INTERVAL;
        store.flush_if_due(end);
        let commits = store.db().commits() - base;
        assert!(commits <= 11, "{commits} commits for 10 000 events in 1 s");
        assert_eq!(store.staged(), 0);
        assert_eq!(store.db().peers().unwrap().len(), 500);
    }

    #[test]
    fn nothing_is_written_before_the_interval_and_everything_after_it() {
        let (_dir, mut store) = store();
        let now = Instant::now();
        let base = store.db().commits();
        assert_eq!(store.deadline(), None);
        store.stage(now, |b| b.upsert_peer(1, record(1)));
        store.stage(now + Duration::from_millis(60), |b| {
            b.upsert_peer(2, record(2))
        });
        assert_eq!(store.deadline(), Some(now + FLUSH_INTERVAL));
        store.flush_if_due(now + FLUSH_INTERVAL - Duration::from_millis(1));
        assert_eq!(store.db().commits(), base);
        assert!(store.db().peers().unwrap().is_empty());
        store.flush_if_due(now + FLUSH_INTERVAL);
        assert_eq!(store.db().commits(), base + 1);
        assert_eq!(store.db().peers().unwrap().len(), 2);
        assert_eq!(store.deadline(), None);
    }

    #[test]
    fn a_durable_write_commits_what_was_staged_before_it_in_the_same_transaction() {
        let (_dir, mut store) = store();
        let now = Instant::now();
        let base = store.db().commits();
        let addr = "127.0.0.1:9".parse().unwrap();
        store.stage(now, |b| b.add_dial_target(addr));
        store.commit_now(|b| b.clear_mesh()).unwrap();
        assert_eq!(store.db().commits(), base + 1);
        assert!(
            store.db().dial_targets().unwrap().is_empty(),
            "the staged target was written before LeaveMesh forgot it, not after"
        );
        assert_eq!(store.deadline(), None);
    }
}
