//! Link metrics from the shards' counters: RTT, loss, utilisation, a bandwidth estimate.
//!
//! Every metrics period the control thread reads each link's counters (`SessionSnapshot`) and
//! turns the deltas into [`LinkMetrics`]:
//! - RTT: the shard's smoothed heartbeat RTT (RFC 6298 weights);
//! - loss: heartbeats sent in the period that were never acknowledged, smoothed (EWMA 1/4);
//! - bandwidth estimate: the highest send rate seen on the link so far (a floor the link has
//!   proven it can carry; 0 until traffic shows one);
//! - utilisation: this period's send rate over that estimate.
#![forbid(unsafe_code)]

use std::{collections::HashMap, time::Duration};

use super::types::LinkMetrics;

/// Counters of one link at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Smoothed RTT in µs.
    pub srtt_us: u64,
    /// Bytes written so far.
    pub bytes_sent: u64,
    /// Heartbeats sent so far.
    pub heartbeats_sent: u64,
    /// Heartbeat acks received so far.
    pub heartbeat_acks: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Meter {
    last: LinkCounters,
    loss_ppm: u32,
    peak_bps: u64,
}

/// Metrics of every link, from successive counter readings.
#[derive(Debug, Default)]
pub struct LinkMeters {
    meters: HashMap<u64, Meter>,
}

impl LinkMeters {
    /// Folds one reading of `peer`'s counters taken `period` after the previous one.
    pub fn handle_reading(
        &mut self,
        peer: u64,
        counters: LinkCounters,
        period: Duration,
    ) -> LinkMetrics {
        let meter = self.meters.entry(peer).or_insert_with(|| Meter {
            last: counters,
            ..Meter::default()
        });
        let secs = period.as_secs_f64().max(1e-3);
        let sent = counters.bytes_sent.saturating_sub(meter.last.bytes_sent);
        let rate_bps = (sent as f64 * 8.0 / secs) as u64;
        meter.peak_bps = meter.peak_bps.max(rate_bps);
        let beats = counters
            .heartbeats_sent
            .saturating_sub(meter.last.heartbeats_sent);
        let acks = counters
            .heartbeat_acks
            .saturating_sub(meter.last.heartbeat_acks);
        // The last heartbeat of a period may be answered in the next one; one missing ack is
        // not loss.
        let lost = beats.saturating_sub(acks).saturating_sub(1);
        let sample_ppm = (lost * 1_000_000)
            .checked_div(beats)
            .unwrap_or(0)
            .min(1_000_000) as u32;
        meter.loss_ppm = ((u64::from(meter.loss_ppm) * 3 + u64::from(sample_ppm)) / 4) as u32;
        meter.last = counters;
        let utilisation_ppm = if meter.peak_bps == 0 {
            0
        } else {
            ((rate_bps as f64 / meter.peak_bps as f64) * 1e6).min(1e6) as u32
        };
        LinkMetrics {
            rtt_us: counters.srtt_us,
            loss_ppm: meter.loss_ppm,
            utilisation_ppm,
            bandwidth_bps: meter.peak_bps,
        }
    }

    /// Forgets a link that went down (a new link starts from fresh counters).
    pub fn remove(&mut self, peer: u64) {
        self.meters.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_heartbeat_acks_become_loss_and_traffic_becomes_utilisation() {
        let mut meters = LinkMeters::default();
        let second = Duration::from_secs(1);
        let mut c = LinkCounters {
            srtt_us: 500,
            ..LinkCounters::default()
        };
        meters.handle_reading(1, c, second);
        c.heartbeats_sent += 10;
        c.heartbeat_acks += 9;
        c.bytes_sent += 1_000_000;
        let m = meters.handle_reading(1, c, second);
        assert_eq!(m.loss_ppm, 0, "one ack in flight is not loss");
        assert_eq!(m.bandwidth_bps, 8_000_000);
        assert_eq!(m.utilisation_ppm, 1_000_000);
        c.heartbeats_sent += 10;
        c.heartbeat_acks += 5;
        c.bytes_sent += 250_000;
        let m = meters.handle_reading(1, c, second);
        assert_eq!(m.loss_ppm, 100_000, "4 of 10 lost, smoothed by 1/4");
        assert_eq!(m.utilisation_ppm, 250_000);
        assert_eq!(m.rtt_us, 500);
    }
}
