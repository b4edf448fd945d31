//! What a bench measured: per-sink tallies by sequence number, the measured window turned into a
//! [`BenchReport`], and its table.

use anyhow::Context;
use hdrhistogram::Histogram;

/// The measured outcome.
#[derive(Debug, serde::Serialize)]
pub(crate) struct BenchReport {
    /// Workload name.
    pub(crate) workload: String,
    /// Mesh description.
    pub(crate) mesh: String,
    /// Payload bytes.
    pub(crate) size: usize,
    /// Offered rate (0: closed loop).
    pub(crate) rate: u64,
    /// Sends in flight (closed loop) or cap (open loop).
    pub(crate) in_flight: usize,
    /// Messages per Publish batch (0: unary Send).
    pub(crate) batch: usize,
    /// Measured seconds.
    pub(crate) seconds: f64,
    /// Messages sent in the measured window.
    pub(crate) sent: u64,
    /// Deliveries counted at the sinks in the window (broadcast: over all sinks).
    pub(crate) received: u64,
    /// Sent but never received (after a grace period).
    pub(crate) lost: u64,
    /// Received more than once.
    pub(crate) duplicated: u64,
    /// Arrived after a higher sequence number.
    pub(crate) reordered: u64,
    /// Sends that returned an error.
    pub(crate) errors: u64,
    /// Deliveries per second.
    pub(crate) msgs_per_s: f64,
    /// Payload megabytes per second delivered.
    pub(crate) mb_per_s: f64,
    /// Latency percentiles in µs (send scheduled → delivered to the sink's subscriber).
    pub(crate) p50_us: u64,
    /// See `p50_us`.
    pub(crate) p90_us: u64,
    /// See `p50_us`.
    pub(crate) p99_us: u64,
    /// See `p50_us`.
    pub(crate) p999_us: u64,
    /// See `p50_us`.
    pub(crate) max_us: u64,
}

/// What one sink saw, by sequence number.
pub(crate) struct Sink {
    seen: Vec<bool>,
    received: u64,
    duplicated: u64,
    reordered: u64,
    highest: u64,
    latency: Histogram<u64>,
}

impl Sink {
    pub(crate) fn new() -> Self {
        Self {
            seen: Vec::new(),
            received: 0,
            duplicated: 0,
            reordered: 0,
            highest: 0,
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
        }
    }

    /// One arrival of message `seq`, `latency_us` after it was due.
    pub(crate) fn record(&mut self, seq: u64, latency_us: u64) {
        let index = seq as usize;
        if self.seen.len() <= index {
            self.seen.resize(index + 1, false);
        }
        if self.seen[index] {
            self.duplicated += 1;
            return;
        }
        self.seen[index] = true;
        if seq < self.highest {
            self.reordered += 1;
        }
        self.highest = self.highest.max(seq);
        let _ = self.latency.record(latency_us.max(1));
        self.received += 1;
    }
}

/// Measured-window tallies of some sinks, as one report.
pub(crate) struct Window {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) seconds: f64,
    pub(crate) size: usize,
    pub(crate) errors: u64,
}

impl Window {
    pub(crate) fn report(
        &self,
        sinks: Vec<Sink>,
        describe: (String, String, u64, usize, usize),
    ) -> anyhow::Result<BenchReport> {
        let (workload, mesh, rate, in_flight, batch) = describe;
        let (first, last) = (self.first, self.last);
        let sent = if first == u64::MAX {
            0
        } else {
            last - first + 1
        };
        let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
        let (mut received, mut duplicated, mut reordered, mut lost) = (0, 0, 0, 0);
        for sink in sinks {
            if sent > 0 {
                let window = &sink.seen[(first as usize).min(sink.seen.len())
                    ..((last + 1) as usize).min(sink.seen.len())];
                let got = window.iter().filter(|seen| **seen).count() as u64;
                received += got;
                lost += sent - got;
            }
            duplicated += sink.duplicated;
            reordered += sink.reordered;
            latency.add(&sink.latency).context("merging histograms")?;
        }
        Ok(BenchReport {
            workload,
            mesh,
            size: self.size,
            rate,
            in_flight,
            batch,
            seconds: self.seconds,
            sent,
            received,
            lost,
            duplicated,
            reordered,
            errors: self.errors,
            msgs_per_s: received as f64 / self.seconds,
            mb_per_s: received as f64 * self.size as f64 / self.seconds / 1e6,
            p50_us: latency.value_at_quantile(0.5),
            p90_us: latency.value_at_quantile(0.9),
            p99_us: latency.value_at_quantile(0.99),
            p999_us: latency.value_at_quantile(0.999),
            max_us: latency.max(),
        })
    }
}

pub(crate) fn print_table(r: &BenchReport) {
    let via = if r.batch > 0 {
        format!("Publish in batches of {}", r.batch)
    } else {
        "unary Send".to_owned()
    };
    let mode = if r.rate > 0 {
        format!(
            "open loop at {} msgs/s (≤ {} outstanding)",
            r.rate, r.in_flight
        )
    } else {
        format!("closed loop, {} in flight", r.in_flight)
    };
    println!(
        "{}: {} B, {via}, {mode}, {} s measured",
        r.mesh, r.size, r.seconds
    );
    println!(
        "{:<10} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7} {:>6}",
        "workload",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9",
        "max µs",
        "sent",
        "recv",
        "lost",
        "dup",
        "reorder",
        "errors"
    );
    println!(
        "{:<10} {:>10.0} {:>10.2} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7} {:>6}",
        r.workload,
        r.msgs_per_s,
        r.mb_per_s,
        r.p50_us,
        r.p90_us,
        r.p99_us,
        r.p999_us,
        r.max_us,
        r.sent,
        r.received,
        r.lost,
        r.duplicated,
        r.reordered,
        r.errors
    );
}
