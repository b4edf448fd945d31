//! The forwarding table a shard consults for every frame not addressed to this node.
//!
//! The control core computes routes (k shortest paths, loop-free alternates) and publishes an
//! immutable `Fib` to every shard as an `Arc`; a shard swaps its pointer, never mutates it.
//!
//! Next-hop choice: a destination has one or more next hops with weights ∝ 1/cost. A frame of a
//! *flow* (stream, or source + destination + correlation id) hashes onto one hop so the flow
//! stays on one path and in order; other frames are spread by weighted round robin. Hops the
//! caller knows to be down are skipped, and when all are down the first live loop-free
//! alternate (backup) takes the traffic: that is the fast reroute, taken before the control
//! core has even heard of the failure.
//!
//! Only downstream hops (strictly closer to the destination) share traffic, so frames spread
//! hop by hop can never loop; backups are not downstream and carry traffic only during a
//! failure, with the frame's ttl as the last guard.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use crate::frame::TrafficClass;

/// One next hop of a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FibHop {
    /// The direct peer to hand the frame to.
    pub peer: u64,
    /// Share of traffic, relative to the other hops of the destination (≥ 1).
    pub weight: u32,
}

/// Routes of one destination, best hop first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FibEntry {
    /// Downstream next hops, best first; traffic spreads over the live ones.
    pub hops: Vec<FibHop>,
    /// Loop-free alternates, best first, taken only while every hop in `hops` is down.
    pub backups: Vec<u64>,
    /// Cost of the best path, in the path computation's units × 1000 (for operators).
    pub cost_milli: u64,
}

/// An immutable forwarding table.
#[derive(Clone, Debug, Default)]
pub struct Fib {
    epoch: u64,
    entries: HashMap<u64, FibEntry>,
    /// Traffic classes routed with their own cost coefficients; the others use `entries`.
    by_class: Vec<(TrafficClass, HashMap<u64, FibEntry>)>,
    known: HashSet<u64>,
}

/// How a frame picks among a destination's hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// Same key, same hop (while it is up): for ordered flows.
    Flow(u64),
    /// Weighted round robin; the counter is the caller's per-shard sequence number.
    RoundRobin(u64),
}

impl Fib {
    /// A table; `known` holds every node ever seen in the mesh, reachable or not.
    pub fn new(epoch: u64, entries: HashMap<u64, FibEntry>, known: HashSet<u64>) -> Self {
        let mut known = known;
        known.extend(entries.keys().copied());
        let fib = Self {
            epoch,
            entries,
            by_class: Vec::new(),
            known,
        };
        fib.check_invariants();
        fib
    }

    /// Adds the routes of a traffic class that has its own cost coefficients.
    pub fn with_class(mut self, class: TrafficClass, entries: HashMap<u64, FibEntry>) -> Self {
        self.known.extend(entries.keys().copied());
        self.by_class.retain(|(c, _)| *c != class);
        self.by_class.push((class, entries));
        self.check_invariants();
        self
    }

    /// The empty table a shard starts with.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Version of the routing computation that produced this table.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The entry of `dst` by the default coefficients, if it is reachable.
    pub fn entry(&self, dst: u64) -> Option<&FibEntry> {
        self.entries.get(&dst)
    }

    /// Every reachable destination.
    pub fn destinations(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.keys().copied()
    }

    /// Whether `node` has ever been part of the mesh (as far as this node knows).
    pub fn is_known(&self, node: u64) -> bool {
        self.known.contains(&node)
    }

    /// The next hop for a frame of `class` to `dst`, skipping hops for which `is_down` holds.
    pub fn next_hop_for(
        &self,
        class: TrafficClass,
        dst: u64,
        spread: Spread,
        is_down: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        let entries = self
            .by_class
            .iter()
            .find(|(c, _)| *c == class)
            .map_or(&self.entries, |(_, entries)| entries);
        pick(entries.get(&dst)?, spread, is_down)
    }

    /// The next hop for a frame to `dst` by the default coefficients, skipping hops for which
    /// `is_down` holds.
    pub fn next_hop(&self, dst: u64, spread: Spread, is_down: impl Fn(u64) -> bool) -> Option<u64> {
        pick(self.entries.get(&dst)?, spread, is_down)
    }

    fn check_invariants(&self) {
        let tables = std::iter::once(&self.entries).chain(self.by_class.iter().map(|(_, e)| e));
        for entries in tables {
            for (dst, entry) in entries {
                debug_assert!(!entry.hops.is_empty(), "destination {dst} without hops");
                debug_assert!(self.known.contains(dst));
            }
        }
    }
}

fn pick(entry: &FibEntry, spread: Spread, is_down: impl Fn(u64) -> bool) -> Option<u64> {
    let total: u64 = entry
        .hops
        .iter()
        .filter(|h| !is_down(h.peer))
        .map(|h| u64::from(h.weight.max(1)))
        .sum();
    if total == 0 {
        return entry.backups.iter().copied().find(|peer| !is_down(*peer));
    }
    let point = match spread {
        Spread::Flow(key) => mix(key) % total,
        // Multiplying by an odd constant visits every residue, interleaving hops by weight.
        Spread::RoundRobin(counter) => counter.wrapping_mul(0x9E37_79B9_7F4A_7C15) % total,
    };
    let mut acc = 0u64;
    for hop in entry.hops.iter().filter(|h| !is_down(h.peer)) {
        acc += u64::from(hop.weight.max(1));
        if point < acc {
            return Some(hop.peer);
        }
    }
    None
}

/// The flow key of a frame: frames with the same key take the same path.
pub fn flow_key(src: u64, dst: u64, stream_or_corr: u128) -> u64 {
    mix(src
        ^ dst.rotate_left(21)
        ^ (stream_or_corr as u64)
        ^ ((stream_or_corr >> 64) as u64).rotate_left(42))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fib() -> Fib {
        let mut entries = HashMap::new();
        entries.insert(
            9,
            FibEntry {
                hops: vec![
                    FibHop {
                        peer: 2,
                        weight: 750,
                    },
                    FibHop {
                        peer: 3,
                        weight: 250,
                    },
                ],
                backups: vec![4, 5],
                cost_milli: 1000,
            },
        );
        Fib::new(1, entries, HashSet::from([7]))
    }

    #[test]
    fn a_flow_stays_on_one_hop_while_it_is_up() {
        let fib = fib();
        for key in 0..100u64 {
            let first = fib.next_hop(9, Spread::Flow(key), |_| false);
            assert!(first.is_some());
            assert_eq!(first, fib.next_hop(9, Spread::Flow(key), |_| false));
        }
    }

    #[test]
    fn round_robin_follows_the_weights() {
        let fib = fib();
        let via_2 = (0..10_000u64)
            .filter(|&i| fib.next_hop(9, Spread::RoundRobin(i), |_| false) == Some(2))
            .count();
        assert!((7000..8000).contains(&via_2), "{via_2}");
    }

    #[test]
    fn a_down_hop_is_skipped_at_once_and_all_down_means_no_route() {
        let fib = fib();
        for key in 0..100u64 {
            assert_eq!(fib.next_hop(9, Spread::Flow(key), |p| p == 2), Some(3));
        }
        assert_eq!(
            fib.next_hop(9, Spread::Flow(1), |p| p == 2 || p == 3),
            Some(4),
            "backup"
        );
        assert_eq!(
            fib.next_hop(9, Spread::Flow(1), |p| p != 5),
            Some(5),
            "second backup"
        );
        assert_eq!(fib.next_hop(9, Spread::Flow(1), |_| true), None);
        assert_eq!(fib.next_hop(8, Spread::Flow(1), |_| false), None);
    }

    #[test]
    fn known_nodes_include_unreachable_ones_and_every_destination() {
        let fib = fib();
        assert!(fib.is_known(7) && fib.is_known(9));
        assert!(!fib.is_known(8));
    }

    #[test]
    fn a_class_with_its_own_coefficients_uses_its_own_routes() {
        let mut client = HashMap::new();
        client.insert(
            9,
            FibEntry {
                hops: vec![FibHop {
                    peer: 3,
                    weight: 1000,
                }],
                backups: vec![],
                cost_milli: 5,
            },
        );
        let fib = fib().with_class(TrafficClass::Client, client);
        for key in 0..50u64 {
            assert_eq!(
                fib.next_hop_for(TrafficClass::Client, 9, Spread::Flow(key), |_| false),
                Some(3)
            );
        }
        let via_2 = (0..100u64)
            .filter(|&k| {
                fib.next_hop_for(TrafficClass::DbUpdate, 9, Spread::Flow(k), |_| false) == Some(2)
            })
            .count();
        assert!(via_2 > 50, "other classes keep the default routes");
    }
}
