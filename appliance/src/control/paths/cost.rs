//! The cost of one link from what its origin measures (latency, bandwidth, utilisation, loss,
//! the hop itself), per traffic class.
#![forbid(unsafe_code)]

use super::{MAX_LINK_COST, MIN_LINK_COST};
use crate::control::types::LinkMetrics;

/// Bandwidth assumed for links whose bandwidth is unknown, and the reference
/// of the bandwidth term.
const REFERENCE_BANDWIDTH_BPS: f64 = 1e9;

/// Cost coefficients for one traffic class: cost = alpha·latency_ms +
/// beta·(1 Gbit/s / bandwidth) + gamma·utilisation + delta·loss + epsilon·1
/// (per hop).
///
/// latency_ms = rtt_us/2/1000 (one way); unknown bandwidth (0) counts as
/// 1 Gbit/s; utilisation and loss as fractions 0..=1 (ppm/1e6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostWeights {
    /// Weight of the one-way latency in milliseconds.
    pub alpha: f64,
    /// Weight of the inverse bandwidth, relative to 1 Gbit/s.
    pub beta: f64,
    /// Weight of the utilisation fraction.
    pub gamma: f64,
    /// Weight of the loss fraction.
    pub delta: f64,
    /// Constant charge per hop; must be > 0.
    pub epsilon: f64,
}

impl Default for CostWeights {
    /// alpha 1.0, beta 0.5, gamma 2.0, delta 50.0, epsilon 0.1: 1 ms of latency
    /// is worth as much as 2 % loss or half a link's capacity in use.
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: 0.5,
            gamma: 2.0,
            delta: 50.0,
            epsilon: 0.1,
        }
    }
}

impl CostWeights {
    /// Checks that every coefficient is finite and at least 0 and that
    /// epsilon is strictly positive. Invalid weights are still tolerated by [`link_cost`] (it clamps),
    /// but the resulting routes are not meaningful.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("alpha", self.alpha),
            ("beta", self.beta),
            ("gamma", self.gamma),
            ("delta", self.delta),
            ("epsilon", self.epsilon),
        ];
        for (name, value) in fields {
            if !value.is_finite() || value < 0.0 {
                return Err(format!("{name} must be finite and >= 0, got {value}"));
            }
        }
        if self.epsilon <= 0.0 {
            return Err(format!(
                "epsilon must be > 0 so that every hop costs something, got {}",
                self.epsilon
            ));
        }
        Ok(())
    }
}

fn ppm_fraction(ppm: u32) -> f64 {
    f64::from(ppm.min(1_000_000)) / 1e6
}

/// Cost of one directed link; always finite and > 0 (clamp: at least
/// epsilon, at most 1e9).
///
/// With valid weights the cost is non-decreasing in rtt, loss and
/// utilisation, and non-increasing in a known bandwidth.
pub fn link_cost(metrics: &LinkMetrics, weights: &CostWeights) -> f64 {
    // u64 → f64 rounds for huge values, which is fine: they clamp anyway.
    let latency_ms = metrics.rtt_us as f64 / 2.0 / 1000.0;
    let bandwidth = if metrics.bandwidth_bps == 0 {
        REFERENCE_BANDWIDTH_BPS
    } else {
        metrics.bandwidth_bps as f64
    };
    let raw = weights.alpha * latency_ms
        + weights.beta * (REFERENCE_BANDWIDTH_BPS / bandwidth)
        + weights.gamma * ppm_fraction(metrics.utilisation_ppm)
        + weights.delta * ppm_fraction(metrics.loss_ppm)
        + weights.epsilon;
    let floor = if weights.epsilon.is_finite() && weights.epsilon > 0.0 {
        weights.epsilon.min(MAX_LINK_COST)
    } else {
        MIN_LINK_COST
    };
    if raw.is_nan() {
        // Only invalid weights (inf·0, inf−inf) get here; treat the link as
        // the worst usable one rather than guessing it is good.
        return MAX_LINK_COST;
    }
    raw.clamp(floor, MAX_LINK_COST)
}
