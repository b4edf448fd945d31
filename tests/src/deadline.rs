//! Overall limits for multi-process tests: `#[meshd_tests::test]` runs a test's body under
//! [`run`]. Past the limit the test fails with the log tails of every node it started (their
//! processes killed first, so dropping them does not wait on a frozen one), instead of a wedged
//! node hanging the whole run until CI's own limit.
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

/// Forgets a node (it was dropped).
pub(crate) fn unregister(log: &Path) {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|e| e.log != log);
}

/// Runs a test body with an overall limit; past it, kills the test's nodes and panics with their
/// log tails.
pub async fn run<T>(test: &str, limit: Duration, body: impl Future<Output = T>) -> T {
    let mut body = std::pin::pin!(body);
    tokio::select! {
        out = &mut body => out,
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
        let text = std::fs::read_to_string(&entry.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        report.push_str(&format!(
            "\n--- node {} ({}) ---\n{}",
            entry.node_id,
            entry.log.display(),
            lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
        ));
    }
    report
}
