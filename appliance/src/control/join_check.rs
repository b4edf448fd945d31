//! A joiner's argon2id runs off the control thread: it costs tens of milliseconds and ~19 MiB
//! by design (more if the member's parameters say so, up to `pake`'s caps), and the control
//! loop keeps serving the api meanwhile. The member never runs argon2 for a join (it keeps the
//! hash output and runs SPAKE2 with it, `lifecycle::pake`).
//!
//! ```text
//!  control ──try_send (JOIN_CHECK_QUEUE)──► join-check thread: argon2id(key, member's params)
//!     ▲  full: the join fails "busy, retry" at once, never queued        │
//!     └──────────── derived password (tokio mpsc, selected on by the loop) ◄┘
//! ```
//!
//! The control loop never waits on the worker: submitting is `try_send`, and a result is one
//! more input of the loop's `select!`. The worker may wait for room in the result channel,
//! which only the control loop drains; the loop never waits on the worker, so there is no cycle.

use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    thread,
};

/// Derivations waiting for the worker, beyond the one it runs. A node runs one JoinMesh at a
/// time, so this is never reached in practice; it bounds the queue all the same.
pub const JOIN_CHECK_QUEUE: usize = 4;

/// One join key to turn into the exchange's password.
pub struct JoinCheck {
    /// The member answering the join (the guest link's peer).
    pub from: u64,
    /// The member's argon2id parameters and salt.
    pub params: String,
    /// The key the operator gave JoinMesh.
    pub key: String,
}

/// The outcome of a [`JoinCheck`].
#[derive(Debug, PartialEq, Eq)]
pub struct JoinVerdict {
    /// The member.
    pub from: u64,
    /// The password, or `None` when the parameters were unusable.
    pub password: Option<Vec<u8>>,
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

/// How a password is derived from (parameters, key): argon2id in the node; a stand-in in
/// tests.
pub type Deriver = fn(&str, &str) -> Option<Vec<u8>>;

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
        derive: Deriver,
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
                        password: derive(&job.params, &job.key),
                        from: job.from,
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

/// The exchange's password for `key` under the member's `params` (see `pake`).
pub fn derive_password(params: &str, key: &str) -> Option<Vec<u8>> {
    super::lifecycle::pake::derive_password(key, params).ok()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Mutex, mpsc::Receiver},
        time::Duration,
    };

    use super::*;

    /// The stand-in verifier reports that it started and waits for a go: the test decides
    /// when the worker is busy.
    static GATE: Mutex<Option<(SyncSender<()>, Receiver<()>)>> = Mutex::new(None);

    fn gated(_params: &str, key: &str) -> Option<Vec<u8>> {
        let gate = GATE.lock().unwrap();
        if let Some((started, go)) = gate.as_ref() {
            let _ = started.send(());
            let _ = go.recv_timeout(Duration::from_secs(10));
        }
        (key == "right").then(|| b"password".to_vec())
    }

    fn check(from: u64, key: &str) -> JoinCheck {
        JoinCheck {
            from,
            params: "p".into(),
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
            answered.push((verdict.from, verdict.password.is_some()));
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
}
