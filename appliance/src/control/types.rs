//! Types shared by the link-state database (lsdb.rs) and path computation (paths.rs).
//! Node ids are u64 (0 is never a node).
#![forbid(unsafe_code)]

/// What a node measures on one of its links; advertised in its LSA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LinkMetrics {
    /// Smoothed round-trip time in microseconds (0 = not measured yet).
    pub rtt_us: u64,
    /// Loss in parts per million (0..=1_000_000).
    pub loss_ppm: u32,
    /// Utilisation in parts per million of the estimated bandwidth (0..=1_000_000).
    pub utilisation_ppm: u32,
    /// Estimated bandwidth in bits per second (0 = unknown).
    pub bandwidth_bps: u64,
}

/// One link of the LSA's origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Adjacency {
    /// The node at the other end.
    pub neighbor: u64,
    /// Metrics as the origin measures them.
    pub metrics: LinkMetrics,
}

/// A link-state advertisement: everything `origin` says about its links.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lsa {
    /// The node that originated it.
    pub origin: u64,
    /// Higher is newer; the origin bumps it on every change or refresh.
    pub seq: u64,
    /// Adjacencies sorted by neighbor id, no duplicates, never `origin` itself.
    pub adjacencies: Vec<Adjacency>,
}

/// Counts what a bounded table refused (or pushed out) and warns at the 1st, 2nd, 4th, 8th …
/// refusal: an operator learns that a bound is being hit and how often, and a flood of invented
/// ids costs a logarithmic number of log lines, not one each. No clock needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    count: u64,
}

impl Refusals {
    /// One refusal of `id` by the table `what`.
    pub fn record(&mut self, what: &'static str, id: u64) {
        self.count += 1;
        if self.count.is_power_of_two() {
            tracing::warn!(
                table = what,
                id,
                refused = self.count,
                "table full: entry dropped (this warning repeats at every power of two)"
            );
        }
    }

    /// `n` refusals at once (a table pruned in one go).
    pub fn record_many(&mut self, what: &'static str, n: u64) {
        let before = self.count;
        self.count = self.count.saturating_add(n);
        // A power of two lies in (before, count] exactly when the bit length grew.
        let bits = |x: u64| u64::BITS - x.leading_zeros();
        if bits(self.count) > bits(before) {
            tracing::warn!(
                table = what,
                refused = self.count,
                "table full: entries dropped (this warning repeats at every power of two)"
            );
        }
    }

    /// Refusals so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}
