//! A watchdog over the shard threads: each shard's control queue records a tick every
//! [`TICK`]; a plain thread checks them every second and logs, once per episode, a shard that
//! has not ticked for [`STALL`], with what the kernel says its thread is doing (running: a task
//! that does not yield; sleeping: a wake-up that never came). A stalled shard answers nothing:
//! no link, no `GetSessions`, no shut-down; this says so instead of leaving a silent wedge.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// How often a shard ticks.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// How long without a tick counts as a stall.
const STALL: Duration = Duration::from_secs(3);

/// One shard's side: its thread id and its last tick (ms since the watchdog started).
#[derive(Default)]
pub(crate) struct Pulse {
    tid: AtomicI32,
    last_ms: AtomicU64,
}

/// The shards' pulses and the watchdog thread's stop flag.
pub(crate) struct Watchdog {
    pulses: Arc<[Pulse]>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            pulses: (0..shards).map(|_| Pulse::default()).collect(),
            epoch: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The handle a shard ticks through.
    pub(crate) fn beat(&self, shard: usize) -> Beat {
        Beat {
            pulses: Arc::clone(&self.pulses),
            shard,
            epoch: self.epoch,
        }
    }

    /// Starts the checking thread; it ends when [`Self::stop`] is called.
    pub(crate) fn start(&self) {
        let pulses = Arc::clone(&self.pulses);
        let stop = Arc::clone(&self.stop);
        let epoch = self.epoch;
        let spawned = thread::Builder::new()
            .name("shard-watchdog".into())
            .spawn(move || watch(&pulses, &stop, epoch));
        if let Err(error) = spawned {
            tracing::warn!(%error, "no shard watchdog");
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A shard's handle on its pulse.
pub(crate) struct Beat {
    pulses: Arc<[Pulse]>,
    shard: usize,
    epoch: Instant,
}

impl Beat {
    /// Records the calling thread as the shard's (once, from the shard thread).
    pub(crate) fn register(&self) {
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.pulses[self.shard].tid.store(tid, Ordering::Relaxed);
        self.tick();
    }

    pub(crate) fn tick(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.pulses[self.shard].last_ms.store(ms, Ordering::Relaxed);
    }
}

fn watch(pulses: &[Pulse], stop: &AtomicBool, epoch: Instant) {
    let mut stalled = vec![None::<u64>; pulses.len()];
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_secs(1));
        let now = epoch.elapsed().as_millis() as u64;
        for (shard, pulse) in pulses.iter().enumerate() {
            let last = pulse.last_ms.load(Ordering::Relaxed);
            let tid = pulse.tid.load(Ordering::Relaxed);
            if tid == 0 {
                continue;
            }
            let silent = now.saturating_sub(last);
            match stalled[shard] {
                None if silent >= STALL.as_millis() as u64 => {
                    stalled[shard] = Some(last);
                    let (state, cpu_ticks) = thread_state(tid);
                    if state == "?" {
                        // The shard's thread has ended (the node is stopping): not a stall.
                        continue;
                    }
                    tracing::error!(
                        shard,
                        silent_ms = silent,
                        thread_state = %state,
                        cpu_ticks,
                        "shard stalled: its control queue has not run (R: a task that does not \
                         yield; S: a wake-up that never came)"
                    );
                }
                Some(since) if last != since => {
                    stalled[shard] = None;
                    tracing::warn!(shard, "stalled shard runs again");
                }
                _ => {}
            }
        }
    }
}

/// The kernel's state letter and user + system CPU ticks of thread `tid` of this process.
fn thread_state(tid: i32) -> (String, u64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return ("?".into(), 0);
    };
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return ("?".into(), 0);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("?").to_owned();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state (field 3).
    (state, ticks(11) + ticks(12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_threads_state_from_proc() {
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() };
        let (state, _) = thread_state(tid);
        assert_eq!(state, "R", "the calling thread is running");
        assert_eq!(thread_state(i32::MAX).0, "?");
    }
}
