//! Scheduling priority of the threads that carry the control plane.
//!
//! On a host busy with data (a flood in, a flood out), gossip and Raft must not wait for a CPU
//! behind the data path: the control thread and the consensus threads are given a lower nice
//! value than the rest (`runtime.control_nice`, -5 by default), so the kernel runs them first
//! when they wake. The shards are not: reniced, they preempt the api threads that feed and
//! drain them and cost a quarter of 64 KiB throughput (ARCHITECTURE "Who gets a CPU first").
//! It needs `CAP_SYS_NICE` (root has it); without it the node runs at the default priority and
//! says so once.

use std::sync::{
    Once,
    atomic::{AtomicI32, Ordering},
};

static CONTROL_NICE: AtomicI32 = AtomicI32::new(0);
static REFUSED: Once = Once::new();

/// Sets the nice value [`apply`] gives (0: leave threads alone). Called once at start-up,
/// before the threads start.
pub fn set_control_nice(nice: i32) {
    CONTROL_NICE.store(nice.clamp(-20, 19), Ordering::Relaxed);
}

/// Gives the calling thread the control plane's nice value.
pub fn apply() {
    let nice = CONTROL_NICE.load(Ordering::Relaxed);
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes
    // this thread's scheduling priority.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        REFUSED.call_once(|| {
            tracing::warn!(
                nice,
                %error,
                "could not raise the control plane's scheduling priority (needs CAP_SYS_NICE); \
                 running at the default priority"
            );
        });
    }
}
