//! Overall limits for multi-process tests: `#[meshd_tests::test]` runs a test's body under
//! [`run`]. Past the limit the test fails with the log tails of every node it started (their
//! processes killed first, so dropping them does not wait on a frozen one), instead of a wedged
//! node hanging the whole run until CI's own limit. A test that fails sooner (an `Err` or a
//! panic) prints the log tails of the nodes it had started, kept when they were dropped.
//!
//! Nodes register their logs here when they start ([`register`]) and leave when dropped; each
//! entry records the thread that started it, so a timeout prints its own test's nodes even when
//! other tests of the same binary run beside it.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

/// One started node, as a timeout reports it.
struct Entry {
    log: PathBuf,
    node_id: u64,
    pid: Option<u32>,
    /// The name of the thread that started it (libtest names a test's thread after the test).
    owner: Option<String>,
}

static LIVE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The log tails of nodes already dropped, kept (per starting thread) until their test ends: a
/// test that fails with an error or a panic prints them, after its clusters (and their
/// temporary directories) are gone.
static DROPPED: Mutex<Vec<(Option<String>, String)>> = Mutex::new(Vec::new());

/// Log tails kept per thread; the oldest go first past it.
const DROPPED_KEPT: usize = 12;

/// Lines of each node's log a timeout prints.
const TAIL_LINES: usize = 40;

/// Records (or updates) a node's log and process for a timeout report.
pub(crate) fn register(log: &Path, node_id: u64, pid: Option<u32>) {
    let owner = std::thread::current().name().map(str::to_owned);
    let mut live = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match live.iter_mut().find(|e| e.log == log) {
        Some(entry) => entry.pid = pid,
        None => live.push(Entry {
            log: log.to_path_buf(),
            node_id,
            pid,
            owner,
        }),
    }
}

/// Forgets a node (it was dropped), keeping its log tail in case its test fails.
pub(crate) fn unregister(log: &Path) {
    let gone: Vec<Entry> = {
        let mut live = LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (gone, kept) = std::mem::take(&mut *live)
            .into_iter()
            .partition(|e| e.log == log);
        *live = kept;
        gone
    };
    let mut dropped = DROPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for entry in gone {
        let tail = tail_of(&entry);
        let mine = dropped.iter().filter(|(o, _)| *o == entry.owner).count();
        if mine >= DROPPED_KEPT
            && let Some(oldest) = dropped.iter().position(|(o, _)| *o == entry.owner)
        {
            dropped.remove(oldest);
        }
        dropped.push((entry.owner, tail));
    }
}

/// The node's last [`TAIL_LINES`] log lines, headed by its id and path.
fn tail_of(entry: &Entry) -> String {
    let text = std::fs::read_to_string(&entry.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "\n--- node {} ({}) ---\n{}",
        entry.node_id,
        entry.log.display(),
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    )
}

/// Whether a test body's outcome is a failure (an `Err`).
pub trait Outcome {
    fn failed(&self) -> bool;
}

impl Outcome for () {
    fn failed(&self) -> bool {
        false
    }
}

impl<T, E> Outcome for Result<T, E> {
    fn failed(&self) -> bool {
        self.is_err()
    }
}

/// Prints the kept log tails of this thread's dropped nodes when the test fails (an `Err` or a
/// panic), and forgets them either way.
struct Reporter {
    test: String,
    failed: bool,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        let me = std::thread::current().name().map(str::to_owned);
        let tails: Vec<String> = {
            let mut dropped = DROPPED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (mine, others) = std::mem::take(&mut *dropped)
                .into_iter()
                .partition(|(o, _)| *o == me);
            *dropped = others;
            mine.into_iter().map(|(_, t)| t).collect()
        };
        if (self.failed || std::thread::panicking()) && !tails.is_empty() {
            eprintln!(
                "test `{}` failed; the last {TAIL_LINES} lines of each of its nodes' logs:{}",
                self.test,
                tails.concat()
            );
        }
    }
}

/// Runs a test body with an overall limit; past it, kills the test's nodes and panics with their
/// log tails.
pub async fn run<T: Outcome>(test: &str, limit: Duration, body: impl Future<Output = T>) -> T {
    let mut reporter = Reporter {
        test: test.to_owned(),
        failed: false,
    };
    let mut body = std::pin::pin!(body);
    tokio::select! {
        out = &mut body => {
            reporter.failed = out.failed();
            out
        }
        () = tokio::time::sleep(limit) => {
            let report = expire();
            // `body` (and the clusters in it) is dropped while this unwinds.
            panic!("test `{test}` exceeded its overall limit of {limit:?}; {report}");
        }
    }
}

/// Kills this test's nodes and returns their log tails.
fn expire() -> String {
    let me = std::thread::current().name().map(str::to_owned);
    let live = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mine: Vec<&Entry> = live.iter().filter(|e| e.owner == me).collect();
    // Nodes started from a spawned task carry a worker thread's name: show everything then.
    let shown: Vec<&Entry> = if mine.is_empty() {
        live.iter().collect()
    } else {
        mine
    };
    let mut report = format!(
        "{} node(s) killed; the last {TAIL_LINES} lines of each log:",
        shown.len()
    );
    for entry in shown {
        if let Some(pid) = entry.pid {
            // SAFETY: kill(2) on a pid the harness spawned; at worst it has exited already.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        report.push_str(&tail_of(entry));
    }
    report
}
