//! Join keys are checked off the control thread: argon2id costs tens of milliseconds and
//! ~19 MiB per check by design, so a flood of `Join` frames checked on the control thread
//! would stall gossip, routing and every api request behind it.
//!
//! ```text
//!  control ──try_send (JOIN_CHECK_QUEUE)──► join-check thread: argon2id verify
//!     ▲  full: the join is refused "busy, retry" at once, never queued   │
//!     └──────────── verdict (tokio mpsc, selected on by the loop) ◄──────┘
//! ```
//!
//! The control loop never waits on the worker: submitting is `try_send`, and a verdict is one
//! more input of the loop's `select!`. The worker may wait for room in the verdict channel,
//! which only the control loop drains; the loop never waits on the worker, so there is no cycle.

use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    thread,
};

use argon2::{
    Argon2, Params,
    password_hash::{PasswordHash, PasswordVerifier},
};

/// Join checks waiting for the worker, beyond the one it is running. With argon2id's default
/// cost (~20–50 ms a check on one core) four queued checks are at most ~0.2 s of work: a
/// legitimate joiner is answered well within its timeout, and a flood is refused at the cost
/// of one frame each instead of growing a queue of work.
pub const JOIN_CHECK_QUEUE: usize = 4;

/// The largest argon2 memory cost accepted in a stored hash (KiB). The hash comes from the
/// mesh's seed through a join answer; a hostile member must not make every later check
/// allocate gigabytes. The default cost is 19 MiB.
const MAX_MEMORY_KIB: u32 = 256 * 1024;
/// The largest time cost accepted (the default is 2).
const MAX_TIME_COST: u32 = 16;
/// The largest parallelism accepted (the default is 1).
const MAX_LANES: u32 = 8;

/// One join key to check against the mesh's hash.
pub struct JoinCheck {
    /// The joining node (the guest link's peer).
    pub from: u64,
    /// The mesh's argon2id hash of the join key when the join arrived.
    pub hash: String,
    /// The key the joiner sent.
    pub key: String,
}

/// The outcome of a [`JoinCheck`].
#[derive(Debug, PartialEq, Eq)]
pub struct JoinVerdict {
    /// The joining node.
    pub from: u64,
    /// The hash it was checked against (the mesh may have changed meanwhile).
    pub hash: String,
    /// Whether the key matched.
    pub matches: bool,
}

/// What became of a submitted check.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Queued; its verdict will arrive on the verdict channel.
    Queued,
    /// The queue is full: refuse the join now and let the joiner retry.
    Busy,
    /// The worker is gone (the node is stopping).
    Stopped,
}

/// How a key is checked (argon2id in the node; a stand-in in tests).
pub type Verifier = fn(&str, &str) -> bool;

/// The bounded join-check worker.
pub struct JoinChecker {
    jobs: Option<SyncSender<JoinCheck>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl JoinChecker {
    /// Starts the worker thread with room for `capacity` waiting checks; verdicts arrive on
    /// the returned channel.
    pub fn start(
        capacity: usize,
        verify: Verifier,
    ) -> std::io::Result<(Self, tokio::sync::mpsc::Receiver<JoinVerdict>)> {
        let (jobs, queue) = mpsc::sync_channel::<JoinCheck>(capacity);
        // Room for every check that can be queued or running: the worker rarely waits.
        let (verdicts, verdicts_rx) = tokio::sync::mpsc::channel(capacity + 1);
        let thread = thread::Builder::new()
            .name("join-check".into())
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    // The control loop is gone: the queued checks would answer no one.
                    if verdicts.is_closed() {
                        break;
                    }
                    let verdict = JoinVerdict {
                        matches: verify(&job.hash, &job.key),
                        from: job.from,
                        hash: job.hash,
                    };
                    if verdicts.blocking_send(verdict).is_err() {
                        break;
                    }
                }
            })?;
        Ok((
            Self {
                jobs: Some(jobs),
                thread: Some(thread),
            },
            verdicts_rx,
        ))
    }

    /// Queues a check without waiting.
    pub fn submit(&self, check: JoinCheck) -> Submitted {
        let Some(jobs) = &self.jobs else {
            return Submitted::Stopped;
        };
        match jobs.try_send(check) {
            Ok(()) => Submitted::Queued,
            Err(TrySendError::Full(_)) => Submitted::Busy,
            Err(TrySendError::Disconnected(_)) => Submitted::Stopped,
        }
    }
}

impl Drop for JoinChecker {
    fn drop(&mut self) {
        // Closing the queue ends the worker after the check it is running, if any.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `key` matches the argon2id `hash`; a malformed hash, or one whose cost exceeds
/// what this node accepts, matches nothing.
pub fn key_matches(hash: &str, key: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let affordable = Params::try_from(&parsed).is_ok_and(|p| {
        p.m_cost() <= MAX_MEMORY_KIB && p.t_cost() <= MAX_TIME_COST && p.p_cost() <= MAX_LANES
    });
    affordable
        && Argon2::default()
            .verify_password(key.as_bytes(), &parsed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Mutex, mpsc::Receiver},
        time::Duration,
    };

    use argon2::password_hash::{PasswordHasher, SaltString};

    use super::*;

    /// The stand-in verifier reports that it started and waits for a go: the test decides
    /// when the worker is busy.
    static GATE: Mutex<Option<(SyncSender<()>, Receiver<()>)>> = Mutex::new(None);

    fn gated(_hash: &str, key: &str) -> bool {
        let gate = GATE.lock().unwrap();
        if let Some((started, go)) = gate.as_ref() {
            let _ = started.send(());
            let _ = go.recv_timeout(Duration::from_secs(10));
        }
        key == "right"
    }

    fn check(from: u64, key: &str) -> JoinCheck {
        JoinCheck {
            from,
            hash: "h".into(),
            key: key.into(),
        }
    }

    #[test]
    fn a_flood_of_checks_is_refused_busy_beyond_the_queue_and_every_queued_one_is_answered() {
        let (started_tx, started) = mpsc::sync_channel(64);
        let (go, go_rx) = mpsc::sync_channel(64);
        *GATE.lock().unwrap() = Some((started_tx, go_rx));
        let (checker, mut verdicts) = JoinChecker::start(JOIN_CHECK_QUEUE, gated).unwrap();
        assert_eq!(checker.submit(check(1, "right")), Submitted::Queued);
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        // The worker is busy with node 1: exactly JOIN_CHECK_QUEUE more fit, the rest of a
        // flood of 50 is refused at once.
        let outcomes: Vec<Submitted> = (2..=51)
            .map(|n| checker.submit(check(n, "wrong")))
            .collect();
        let queued = outcomes.iter().filter(|o| **o == Submitted::Queued).count();
        let busy = outcomes.iter().filter(|o| **o == Submitted::Busy).count();
        assert_eq!((queued, busy), (JOIN_CHECK_QUEUE, 50 - JOIN_CHECK_QUEUE));
        for _ in 0..=JOIN_CHECK_QUEUE {
            go.send(()).unwrap();
        }
        let mut answered = Vec::new();
        for _ in 0..=JOIN_CHECK_QUEUE {
            let verdict = verdicts.blocking_recv().unwrap();
            answered.push((verdict.from, verdict.matches));
        }
        assert_eq!(answered[0], (1, true));
        assert_eq!(
            answered[1..].iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            (2..2 + JOIN_CHECK_QUEUE as u64).collect::<Vec<_>>()
        );
        assert!(answered[1..].iter().all(|(_, matches)| !matches));
        *GATE.lock().unwrap() = None;
        drop(verdicts);
        assert_eq!(checker.submit(check(99, "right")), Submitted::Queued);
        // Dropping the checker ends the worker (the verdict channel is closed).
        drop(checker);
    }

    #[test]
    fn argon2_keys_match_and_hostile_hashes_match_nothing() {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        let hash = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(key_matches(&hash, "correct horse"));
        assert!(!key_matches(&hash, "wrong"));
        assert!(!key_matches("not a hash", "correct horse"));
        assert!(!key_matches("", ""));
        // A hash asking for 4 GiB per check is refused before any memory is allocated.
        let greedy = hash.replacen("m=19456", "m=4194304", 1);
        assert_ne!(greedy, hash);
        assert!(!key_matches(&greedy, "correct horse"));
    }
}
