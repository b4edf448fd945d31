//! Time slices for the data path's busy loops, so a flood cannot keep a shard from its
//! control lanes.
//!
//! glommio only reaps I/O completions (and so only wakes a control lane whose heartbeat
//! arrived) once no task of any queue is runnable, or when its preemption timer fires. The
//! shards keep glommio's default 100 ms timer (a 1 ms one came with shard wedges, see the
//! control queue in `shard.rs`), and a flood keeps the data tasks runnable: a link's reader
//! always finds a message buffered, the send task always finds the ring full. The control
//! lanes' heartbeat round trip then waited out whole sweeps of data work (12-15 ms p99 in
//! `loadgen saturate`; 3-5 ms with a 2 ms preemption timer, which is what this does by hand).
//!
//! A busy loop takes a [`Slice`] and calls [`Slice::check`] once per unit of work; past
//! [`SLICE`] of wall time the task sleeps for a microsecond. A timer that short has expired
//! by the time the reactor looks, so the executor does not idle: it only goes round the
//! reactor once, reaping completions, and picks the control queue (four times the shares)
//! before the data tasks again.

use std::time::{Duration, Instant};

/// How long a data loop runs before it lets the executor reap I/O.
pub(crate) const SLICE: Duration = Duration::from_micros(500);

/// The sleep that ends a slice: a timer the reactor finds expired.
const PAUSE: Duration = Duration::from_micros(1);

/// One busy loop's running slice.
pub(crate) struct Slice {
    started: Instant,
}

impl Slice {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    /// Ends the slice (the task sleeps a moment) when it has run for [`SLICE`].
    pub(crate) async fn check(&mut self) {
        if self.started.elapsed() >= SLICE {
            glommio::timer::sleep(PAUSE).await;
            self.started = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, rc::Rc};

    use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};

    use super::*;

    /// How late a task of another queue, due 1 ms after the start, ends while a busy loop runs
    /// for 150 ms.
    fn lateness(sliced: bool) -> Duration {
        LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                let control = glommio::executor().create_task_queue(
                    Shares::Static(4000),
                    Latency::NotImportant,
                    "control",
                );
                let busy_until = Instant::now() + Duration::from_millis(150);
                let started = Rc::new(Cell::new(false));
                let busy = glommio::spawn_local({
                    let started = Rc::clone(&started);
                    async move {
                        let mut slice = Slice::new();
                        while Instant::now() < busy_until {
                            started.set(true);
                            std::hint::spin_loop();
                            if sliced {
                                slice.check().await;
                            } else {
                                futures_lite::future::yield_now().await;
                            }
                        }
                    }
                });
                let due = Instant::now() + Duration::from_millis(1);
                let timer = glommio::spawn_local_into(
                    async move {
                        glommio::timer::sleep(due.saturating_duration_since(Instant::now())).await;
                        due.elapsed()
                    },
                    control,
                )
                .expect("the control queue exists");
                let late = timer.await;
                busy.await;
                assert!(started.get());
                late
            })
            .expect("an executor starts")
            .join()
            .expect("the executor ends")
    }

    #[test]
    fn a_sliced_busy_loop_lets_another_queues_timer_fire_on_time() {
        // Without slices the timer waits until glommio's own 100 ms preemption timer ends the
        // busy loop's turn (about 99 ms late); sliced, about one slice (40-60 µs measured
        // here, 8-15 ms in some runs where the executor parked between two slices and glommio
        // overslept). The bounds leave room for a loaded machine.
        let sliced = lateness(true);
        assert!(
            sliced < Duration::from_millis(40),
            "sliced: {sliced:?} late"
        );
        let unsliced = lateness(false);
        eprintln!("late by {sliced:?} sliced, {unsliced:?} unsliced");
        assert!(
            unsliced > Duration::from_millis(80),
            "unsliced: only {unsliced:?} late (the test no longer shows the problem)"
        );
    }
}
