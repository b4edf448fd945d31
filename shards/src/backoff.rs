//! Reconnect delays: bounded exponential backoff with full jitter, sans-IO.
#![forbid(unsafe_code)]

use std::time::Duration;

use rand::Rng;

/// Delay policy for re-dialing one address.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A policy whose delays grow from `min` to at most `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        debug_assert!(min <= max);
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt: uniform in [ceiling/2, ceiling], where the ceiling
    /// doubles per failed attempt up to `max`. Half the ceiling is kept as a floor so a
    /// restarted peer is not hammered; the other half spreads simultaneous reconnects.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ns = rng.gen_range(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter_ns)
    }

    /// Forget failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn delays_grow_then_stay_within_the_bound() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay(&mut rng)).collect();
        assert!(delays[0] >= Duration::from_millis(25) && delays[0] <= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(
            delays[11] >= Duration::from_secs(1),
            "ceiling reached: {delays:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(50));
    }
}
