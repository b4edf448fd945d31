//! The link-state database and its reliable flooding (OSPF-style, RFC 2328 §13 in spirit).
//!
//! Pure: events and the current time in, frames out. No clock, no I/O, no randomness.
//!
//! ```text
//!  handle_link_up / handle_link_down / handle_metrics ──► originate own LSA (seq + 1)
//!  handle_message(from, Lsa)  ── newer ──► install, ack `from`, flood to every other neighbour
//!                             ── same  ──► ack (and count it as the neighbour's ack)
//!                             ── older ──► send our newer copy back to `from`
//!  handle_message(from, Ack)  ──► stop retransmitting that LSA to `from`
//!  handle_timeout(now)        ──► retransmit unacked LSAs, refresh own LSA, expire old ones
//!  poll_transmit()            ──► (neighbour, FloodMessage), in the order they were queued
//! ```
//!
//! **Invariants** (checked by [`Lsdb::check_invariants`]):
//! - the database holds at most one LSA per origin, and the local node's own LSA is always there;
//! - retransmission state exists only for neighbours with a live link;
//! - own adjacencies never name the local node;
//! - at most [`MAX_ORIGINS`] origins and [`MAX_ADJACENCIES`] adjacencies per LSA are held.
//!
//! Bounds: an origin is any id a member writes into an LSA, so a member inventing ids could
//! grow the database without limit. Past [`MAX_ORIGINS`] a new origin is acknowledged (so the
//! sender stops retransmitting it) but neither kept nor flooded, and counted; the own LSA and a
//! direct neighbour's are always kept (a neighbour's pushes out the non-neighbour origin
//! closest to expiry).
//!
//! Ages: an LSA carries its age (time since its origin issued it). A receiver stores it with
//! `expires_at = now + max_age - age`, so every node drops a dead origin's LSA at about the same
//! moment. A node that goes away is withdrawn at once in practice: its neighbours re-originate
//! without it, and path computation only uses links both ends advertise.
//!
//! Restart: a node starts at seq 1. If the mesh still holds a newer LSA of its previous life, it
//! receives that copy back and jumps past its seq (RFC 2328 §13.4).
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use super::types::{Adjacency, LinkMetrics, Lsa, Refusals};

/// The highest sequence number an LSA may carry (RFC 2328 §12.1.6 bounds it the same way).
/// Copies above it are dropped as invalid, so neither an honest origin's `+ 1` nor a forged
/// `u64::MAX` can wrap the space.
pub const MAX_LSA_SEQ: u64 = 1 << 62;

/// The furthest a copy of this node's own LSA may be ahead of it and still be taken for an
/// earlier life's (RFC 2328 §13.4 jumps past any; with unsigned LSAs that lets one forged copy
/// freeze the own LSA at [`MAX_LSA_SEQ`]).
pub const MAX_OWN_SEQ_JUMP: u64 = 1 << 32;

/// The most origins the database holds. meshd's scale target is a few hundred nodes (the
/// simulator runs 200, `loadgen scale` 50); 4096 leaves an order of magnitude of headroom while
/// keeping Dijkstra + Yen over the database in the low milliseconds and the database itself
/// (with [`MAX_ADJACENCIES`]) at a few MiB even when a member floods invented origins.
pub const MAX_ORIGINS: usize = 4096;

/// The most adjacencies kept of one LSA (the lowest neighbour ids, so every node keeps the
/// same ones). A node has at most one link per peer and real nodes have tens; 1024 bounds what
/// one forged LSA can make every node store and compute over.
pub const MAX_ADJACENCIES: usize = 1024;

/// Flooding timers and thresholds.
#[derive(Clone, Debug)]
pub struct LsdbConfig {
    /// Each node re-originates its LSA this often even without a change.
    pub refresh_interval: Duration,
    /// An LSA older than this is dropped.
    pub max_age: Duration,
    /// An LSA not acknowledged by a neighbour is resent after this long.
    pub retransmit_interval: Duration,
    /// A metric change is advertised only when the RTT moves by more than this fraction…
    pub rtt_hysteresis: f64,
    /// …and by more than this many microseconds (small RTTs jitter by a large fraction).
    pub rtt_hysteresis_us: u64,
    /// Loss or utilisation must move by more than this many parts per million.
    pub ppm_hysteresis: u32,
    /// Bandwidth must move by more than this fraction.
    pub bandwidth_hysteresis: f64,
    /// Upper bound on the frames queued for sending; past it the oldest are dropped and left to
    /// retransmission.
    pub max_queued_frames: usize,
}

impl Default for LsdbConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(30),
            max_age: Duration::from_secs(95),
            retransmit_interval: Duration::from_millis(200),
            rtt_hysteresis: 0.25,
            rtt_hysteresis_us: 200,
            ppm_hysteresis: 20_000,
            bandwidth_hysteresis: 0.5,
            max_queued_frames: 65_536,
        }
    }
}

/// What travels between neighbouring databases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FloodMessage {
    /// An advertisement, with its age as the sender knows it.
    Lsa {
        /// The advertisement.
        lsa: Lsa,
        /// Time since its origin issued it.
        age: Duration,
    },
    /// "I hold `origin`'s LSA at `seq` (or newer)."
    Ack {
        /// Origin of the acknowledged LSA.
        origin: u64,
        /// Its sequence number.
        seq: u64,
    },
}

#[derive(Clone, Debug)]
struct Entry {
    lsa: Lsa,
    /// When this node would consider the LSA's age zero.
    issued_at: Instant,
}

#[derive(Debug, Default)]
struct Neighbor {
    /// Origin → (seq sent, when to resend).
    unacked: BTreeMap<u64, (u64, Instant)>,
}

/// One node's link-state database.
#[derive(Debug)]
pub struct Lsdb {
    config: LsdbConfig,
    local: u64,
    /// Current measurements of own links.
    links: BTreeMap<u64, LinkMetrics>,
    db: BTreeMap<u64, Entry>,
    neighbors: BTreeMap<u64, Neighbor>,
    outbox: VecDeque<(u64, FloodMessage)>,
    changed: bool,
    dropped_frames: u64,
    /// New origins refused (or pushed out) at [`MAX_ORIGINS`].
    refused_origins: Refusals,
}

impl Lsdb {
    /// An empty database holding only `local`'s LSA (no adjacencies yet).
    pub fn new(local: u64, config: LsdbConfig, now: Instant) -> Self {
        assert_ne!(local, 0, "0 is never a node id");
        let own = Lsa {
            origin: local,
            seq: 1,
            adjacencies: Vec::new(),
        };
        let mut db = BTreeMap::new();
        db.insert(
            local,
            Entry {
                lsa: own,
                issued_at: now,
            },
        );
        let lsdb = Self {
            config,
            local,
            links: BTreeMap::new(),
            db,
            neighbors: BTreeMap::new(),
            outbox: VecDeque::new(),
            changed: true,
            dropped_frames: 0,
            refused_origins: Refusals::default(),
        };
        lsdb.check_invariants();
        lsdb
    }

    /// A link to `peer` came up: advertise it and hand the neighbour the whole database.
    pub fn handle_link_up(&mut self, now: Instant, peer: u64, metrics: LinkMetrics) {
        if peer == self.local || peer == 0 {
            return;
        }
        self.links.insert(peer, metrics);
        // A fresh link starts a fresh exchange: whatever was unacked on an old one is resent.
        self.neighbors.insert(peer, Neighbor::default());
        self.originate(now);
        // Our own LSA went out with the origination above; the rest of the database follows.
        let origins: Vec<u64> = self
            .db
            .keys()
            .copied()
            .filter(|o| *o != self.local)
            .collect();
        for origin in origins {
            self.send_lsa(now, peer, origin);
        }
        self.check_invariants();
    }

    /// The link to `peer` went down: withdraw it.
    pub fn handle_link_down(&mut self, now: Instant, peer: u64) {
        self.neighbors.remove(&peer);
        if self.links.remove(&peer).is_some() {
            self.originate(now);
        }
        self.check_invariants();
    }

    /// New measurements of the link to `peer`; advertised only past the hysteresis thresholds.
    pub fn handle_metrics(&mut self, now: Instant, peer: u64, metrics: LinkMetrics) {
        let Some(current) = self.links.get_mut(&peer) else {
            return;
        };
        *current = metrics;
        let advertised = self.db[&self.local]
            .lsa
            .adjacencies
            .iter()
            .find(|a| a.neighbor == peer)
            .map(|a| a.metrics);
        if advertised.is_none_or(|old| self.significant(&old, &metrics)) {
            self.originate(now);
        }
        self.check_invariants();
    }

    /// A flooding message from neighbour `from`. Messages from non-neighbours are ignored.
    pub fn handle_message(&mut self, now: Instant, from: u64, message: FloodMessage) {
        if !self.neighbors.contains_key(&from) {
            return;
        }
        match message {
            FloodMessage::Ack { origin, seq } => {
                self.handle_ack(from, origin, seq);
            }
            FloodMessage::Lsa { lsa, age } => self.handle_lsa(now, from, lsa, age),
        }
        self.check_invariants();
    }

    fn handle_lsa(&mut self, now: Instant, from: u64, lsa: Lsa, age: Duration) {
        if lsa.origin == 0 || lsa.seq == 0 || lsa.seq > MAX_LSA_SEQ {
            // Past MAX_LSA_SEQ no honest origin ever gets (2^62 changes); accepting it would
            // let one forged copy pin an origin's sequence at the top of the space.
            return;
        }
        let origin = lsa.origin;
        let seq = lsa.seq;
        if origin == self.local {
            self.push(from, FloodMessage::Ack { origin, seq });
            let own_seq = self.db[&self.local].lsa.seq;
            // No earlier life of this node got 2^32 changes past this one; a copy that far
            // ahead is forged, and following it would pin the own LSA near the maximum.
            if seq >= own_seq && seq - own_seq <= MAX_OWN_SEQ_JUMP {
                // A copy from an earlier life of this node: jump past it so ours wins.
                self.db.get_mut(&self.local).expect("own LSA").lsa.seq = seq;
                self.originate(now);
            }
            return;
        }
        let held = self.db.get(&origin).map(|e| e.lsa.seq);
        match held {
            Some(held) if held > seq => {
                // The neighbour is behind: hand it ours (it will ack it).
                self.send_lsa(now, from, origin);
            }
            Some(held) if held == seq => {
                self.push(from, FloodMessage::Ack { origin, seq });
                self.handle_ack(from, origin, seq);
            }
            _ => {
                if age >= self.config.max_age {
                    // Already dead on arrival: acknowledge, but neither keep nor spread it.
                    self.push(from, FloodMessage::Ack { origin, seq });
                    return;
                }
                if held.is_none() && !self.make_room(origin) {
                    // Acknowledged so the sender stops retransmitting it; not kept, not spread.
                    self.refused_origins.record("lsdb origins", origin);
                    self.push(from, FloodMessage::Ack { origin, seq });
                    return;
                }
                let adjacencies = normalise(origin, lsa.adjacencies);
                let issued_at = now.checked_sub(age).unwrap_or(now);
                self.db.insert(
                    origin,
                    Entry {
                        lsa: Lsa {
                            origin,
                            seq,
                            adjacencies,
                        },
                        issued_at,
                    },
                );
                self.changed = true;
                self.push(from, FloodMessage::Ack { origin, seq });
                if let Some(neighbor) = self.neighbors.get_mut(&from) {
                    neighbor.unacked.remove(&origin);
                }
                let others: Vec<u64> = self
                    .neighbors
                    .keys()
                    .copied()
                    .filter(|n| *n != from)
                    .collect();
                for neighbor in others {
                    self.send_lsa(now, neighbor, origin);
                }
            }
        }
    }

    /// Retransmissions, the periodic refresh and expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.db[&self.local].issued_at + self.config.refresh_interval {
            self.originate(now);
        }
        let max_age = self.config.max_age;
        let expired: Vec<u64> = self
            .db
            .iter()
            .filter(|(origin, e)| **origin != self.local && now >= e.issued_at + max_age)
            .map(|(origin, _)| *origin)
            .collect();
        for origin in &expired {
            self.db.remove(origin);
            for neighbor in self.neighbors.values_mut() {
                neighbor.unacked.remove(origin);
            }
            self.changed = true;
        }
        let mut due = Vec::new();
        for (peer, neighbor) in &self.neighbors {
            for (origin, (_, at)) in &neighbor.unacked {
                if *at <= now {
                    due.push((*peer, *origin));
                }
            }
        }
        for (peer, origin) in due {
            self.send_lsa(now, peer, origin);
        }
        self.check_invariants();
    }

    /// Drops `origin`'s LSA at once (it left the mesh or was evicted), without
    /// waiting for it to age out. A copy still in flight elsewhere may come back; it carries no
    /// links anyone else still advertises, so it attracts no traffic, and it ages out.
    pub fn purge(&mut self, origin: u64) {
        if origin == self.local || self.db.remove(&origin).is_none() {
            return;
        }
        for neighbor in self.neighbors.values_mut() {
            neighbor.unacked.remove(&origin);
        }
        self.changed = true;
        self.check_invariants();
    }

    /// The next message to send, oldest first.
    pub fn poll_transmit(&mut self) -> Option<(u64, FloodMessage)> {
        self.outbox.pop_front()
    }

    /// When [`Self::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let refresh = self.db[&self.local].issued_at + self.config.refresh_interval;
        let expiry = self
            .db
            .iter()
            .filter(|(origin, _)| **origin != self.local)
            .map(|(_, e)| e.issued_at + self.config.max_age)
            .min();
        let retransmit = self
            .neighbors
            .values()
            .flat_map(|n| n.unacked.values().map(|(_, at)| *at))
            .min();
        [Some(refresh), expiry, retransmit]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the database changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Every LSA held, own included, by origin.
    pub fn lsas(&self) -> impl Iterator<Item = &Lsa> + '_ {
        self.db.values().map(|e| &e.lsa)
    }

    /// `origin`'s LSA, if held.
    pub fn get(&self, origin: u64) -> Option<&Lsa> {
        self.db.get(&origin).map(|e| &e.lsa)
    }

    /// Frames dropped because the send queue was full (each is left to retransmission).
    pub fn dropped_frames(&self) -> u64 {
        self.dropped_frames
    }

    /// New origins refused, or pushed out by a neighbour's, at [`MAX_ORIGINS`].
    pub fn refused_origins(&self) -> u64 {
        self.refused_origins.count()
    }

    /// Whether a new origin may be installed: below the bound always; at it only a direct
    /// neighbour, which takes the place of the non-neighbour origin closest to expiry.
    fn make_room(&mut self, origin: u64) -> bool {
        if self.db.len() < MAX_ORIGINS {
            return true;
        }
        if !self.links.contains_key(&origin) {
            return false;
        }
        let victim = self
            .db
            .iter()
            .filter(|(o, _)| **o != self.local && !self.links.contains_key(o))
            .min_by_key(|(o, e)| (e.issued_at, **o))
            .map(|(o, _)| *o);
        let Some(victim) = victim else {
            return false;
        };
        self.refused_origins.record("lsdb origins", victim);
        self.db.remove(&victim);
        for neighbor in self.neighbors.values_mut() {
            neighbor.unacked.remove(&victim);
        }
        self.changed = true;
        true
    }

    /// Panics if an invariant of the module doc is broken.
    pub fn check_invariants(&self) {
        let own = self.db.get(&self.local);
        assert!(own.is_some(), "own LSA missing");
        if let Some(own) = own {
            assert!(own.lsa.adjacencies.iter().all(|a| a.neighbor != self.local));
        }
        for (origin, entry) in &self.db {
            assert_eq!(*origin, entry.lsa.origin);
            assert!(entry.lsa.adjacencies.len() <= MAX_ADJACENCIES);
        }
        assert!(self.db.len() <= MAX_ORIGINS, "more origins than the bound");
        for peer in self.neighbors.keys() {
            assert!(
                self.links.contains_key(peer),
                "neighbour {peer} without a link"
            );
        }
        assert!(self.outbox.len() <= self.config.max_queued_frames);
    }

    /// `from` holds `origin`'s LSA at `seq`: no need to resend an older or equal copy.
    fn handle_ack(&mut self, from: u64, origin: u64, seq: u64) {
        if let Some(neighbor) = self.neighbors.get_mut(&from)
            && neighbor
                .unacked
                .get(&origin)
                .is_some_and(|(sent, _)| *sent <= seq)
        {
            neighbor.unacked.remove(&origin);
        }
    }

    fn significant(&self, old: &LinkMetrics, new: &LinkMetrics) -> bool {
        let c = &self.config;
        let rtt_delta = old.rtt_us.abs_diff(new.rtt_us);
        let rtt_moved = rtt_delta > c.rtt_hysteresis_us
            && (old.rtt_us == 0 || rtt_delta as f64 > c.rtt_hysteresis * old.rtt_us as f64);
        let loss_moved = old.loss_ppm.abs_diff(new.loss_ppm) > c.ppm_hysteresis;
        let utilisation_moved =
            old.utilisation_ppm.abs_diff(new.utilisation_ppm) > c.ppm_hysteresis;
        let bandwidth_moved = (old.bandwidth_bps == 0) != (new.bandwidth_bps == 0)
            || old.bandwidth_bps.abs_diff(new.bandwidth_bps) as f64
                > c.bandwidth_hysteresis * old.bandwidth_bps as f64;
        rtt_moved || loss_moved || utilisation_moved || bandwidth_moved
    }

    /// Issues a new own LSA from the current links and floods it to every neighbour.
    fn originate(&mut self, now: Instant) {
        let entry = self.db.get_mut(&self.local).expect("own LSA");
        // Never past MAX_LSA_SEQ (accepted copies are capped there), so this cannot wrap.
        entry.lsa.seq = (entry.lsa.seq + 1).min(MAX_LSA_SEQ);
        entry.lsa.adjacencies = self
            .links
            .iter()
            .take(MAX_ADJACENCIES)
            .map(|(neighbor, metrics)| Adjacency {
                neighbor: *neighbor,
                metrics: *metrics,
            })
            .collect();
        entry.issued_at = now;
        self.changed = true;
        let neighbors: Vec<u64> = self.neighbors.keys().copied().collect();
        for neighbor in neighbors {
            self.send_lsa(now, neighbor, self.local);
        }
    }

    /// Queues the held copy of `origin`'s LSA for `peer` and arms its retransmission.
    fn send_lsa(&mut self, now: Instant, peer: u64, origin: u64) {
        let Some(entry) = self.db.get(&origin) else {
            return;
        };
        let Some(neighbor) = self.neighbors.get_mut(&peer) else {
            return;
        };
        neighbor.unacked.insert(
            origin,
            (entry.lsa.seq, now + self.config.retransmit_interval),
        );
        let message = FloodMessage::Lsa {
            lsa: entry.lsa.clone(),
            age: now.saturating_duration_since(entry.issued_at),
        };
        self.push(peer, message);
    }

    fn push(&mut self, to: u64, message: FloodMessage) {
        if self.outbox.len() >= self.config.max_queued_frames {
            self.outbox.pop_front();
            self.dropped_frames += 1;
        }
        self.outbox.push_back((to, message));
    }
}

/// Sorted by neighbour, no duplicates, no self-adjacency, at most [`MAX_ADJACENCIES`]: a
/// peer's sloppy or forged LSA cannot break path computation's assumptions or its bounds.
fn normalise(origin: u64, adjacencies: Vec<Adjacency>) -> Vec<Adjacency> {
    let mut by_neighbor = BTreeMap::new();
    for adjacency in adjacencies {
        if adjacency.neighbor != origin && adjacency.neighbor != 0 {
            by_neighbor.entry(adjacency.neighbor).or_insert(adjacency);
        }
    }
    by_neighbor.into_values().take(MAX_ADJACENCIES).collect()
}

#[cfg(test)]
mod tests;
