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
