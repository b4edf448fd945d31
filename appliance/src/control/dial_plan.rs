//! Which addresses to dial, and when: the reconnect policy, sans-IO.
//!
//! A *target* is an address this node keeps a link to: from `network.peers`, or added with
//! `AddSession`. Each target is idle (waiting for its next attempt), dialing, or linked to a
//! peer. Failures and link losses schedule the next attempt with bounded exponential backoff
//! and jitter ([`meshd_shards::backoff`]). Time and randomness come in as arguments.
//!
//! Drain order: after any `handle_*`, call [`DialPlan::poll_dials`] with the same `now`, then
//! sleep until [`DialPlan::next_deadline`].
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use meshd_shards::backoff::Backoff;
use rand::Rng;

/// Why a target exists, which decides what a failure does to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// From `network.peers`: dialed for the life of the process.
    Config,
    /// Added with `AddSession` and linked once: kept across restarts.
    Added,
    /// Added with `AddSession` and not yet linked: forgotten on failure.
    Tentative,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetState {
    Idle { next_attempt: Instant },
    Dialing { dial_id: u64 },
    Linked { peer: u64 },
}

#[derive(Clone, Debug)]
struct Target {
    origin: Origin,
    state: TargetState,
    backoff: Backoff,
    last_peer: Option<u64>,
}

/// What the shell should do after a dial result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialVerdict {
    /// The target linked: persist it if it was tentative.
    Linked {
        /// Whether it just became an `Added` target (persist it).
        newly_added: bool,
    },
    /// The target failed and will be retried.
    Retry(Duration),
    /// The target failed and was forgotten (a tentative `AddSession`).
    Forgotten,
    /// No target matches (a late answer for a removed target).
    Unknown,
}

/// The reconnect policy of one node.
#[derive(Debug)]
pub struct DialPlan {
    targets: BTreeMap<SocketAddr, Target>,
    min: Duration,
    max: Duration,
    next_dial_id: u64,
}

impl DialPlan {
    /// An empty plan whose delays grow from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            targets: BTreeMap::new(),
            min,
            max,
            next_dial_id: 1,
        }
    }

    /// Adds a target to dial as soon as possible; an existing target keeps its state but is
    /// promoted to the stronger origin.
    pub fn add(&mut self, addr: SocketAddr, origin: Origin, now: Instant) {
        if let Some(target) = self.targets.get_mut(&addr) {
            if target.origin == Origin::Tentative && origin != Origin::Tentative {
                target.origin = origin;
            }
            if let TargetState::Idle { next_attempt } = &mut target.state {
                *next_attempt = now;
            }
            return;
        }
        self.targets.insert(
            addr,
            Target {
                origin,
                state: TargetState::Idle { next_attempt: now },
                backoff: Backoff::new(self.min, self.max),
                last_peer: None,
            },
        );
        self.check_invariants();
    }

    /// Removes a target; returns whether it was `Added` (so persisted).
    pub fn remove(&mut self, addr: SocketAddr) -> bool {
        self.targets
            .remove(&addr)
            .is_some_and(|t| t.origin == Origin::Added)
    }

    /// Forgets every target (this node left its mesh: nothing of it is worth dialing).
    pub fn clear(&mut self) {
        self.targets.clear();
    }

    /// Removes every target that last linked to `peer`; returns their addresses and whether each
    /// was persisted.
    pub fn remove_peer(&mut self, peer: u64) -> Vec<(SocketAddr, bool)> {
        let addrs: Vec<SocketAddr> = self
            .targets
            .iter()
            .filter(|(_, t)| t.last_peer == Some(peer))
            .map(|(addr, _)| *addr)
            .collect();
        addrs
            .into_iter()
            .map(|addr| (addr, self.remove(addr)))
            .collect()
    }

    /// The peer a target is linked to.
    pub fn linked_peer(&self, addr: SocketAddr) -> Option<u64> {
        match self.targets.get(&addr)?.state {
            TargetState::Linked { peer } => Some(peer),
            _ => None,
        }
    }

    /// A dial finished.
    pub fn handle_dial_done(
        &mut self,
        dial_id: u64,
        addr: SocketAddr,
        result: Result<u64, ()>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> DialVerdict {
        let Some(target) = self.targets.get_mut(&addr) else {
            return DialVerdict::Unknown;
        };
        if target.state != (TargetState::Dialing { dial_id }) {
            return DialVerdict::Unknown;
        }
        let verdict = match result {
            Ok(peer) => {
                target.backoff.reset();
                target.state = TargetState::Linked { peer };
                target.last_peer = Some(peer);
                let newly_added = target.origin == Origin::Tentative;
                if newly_added {
                    target.origin = Origin::Added;
                }
                DialVerdict::Linked { newly_added }
            }
            Err(()) if target.origin == Origin::Tentative => {
                self.targets.remove(&addr);
                DialVerdict::Forgotten
            }
            Err(()) => {
                let delay = target.backoff.next_delay(rng);
                target.state = TargetState::Idle {
                    next_attempt: now + delay,
                };
                DialVerdict::Retry(delay)
            }
        };
        self.check_invariants();
        verdict
    }

    /// The link to `peer` went down; its targets are re-dialed after a backoff delay.
    pub fn handle_link_down(&mut self, peer: u64, now: Instant, rng: &mut impl Rng) {
        for target in self.targets.values_mut() {
            if target.last_peer == Some(peer) && matches!(target.state, TargetState::Linked { .. })
            {
                let delay = target.backoff.next_delay(rng);
                target.state = TargetState::Idle {
                    next_attempt: now + delay,
                };
            }
        }
        self.check_invariants();
    }

    /// A link to `peer` came up, whoever dialed: targets that point at it count as linked.
    pub fn handle_link_up(&mut self, peer: u64) {
        for target in self.targets.values_mut() {
            if target.last_peer == Some(peer) && matches!(target.state, TargetState::Idle { .. }) {
                target.backoff.reset();
                target.state = TargetState::Linked { peer };
            }
        }
    }

    /// Targets due now, each with a fresh dial id; they move to dialing.
    pub fn poll_dials(&mut self, now: Instant) -> Vec<(SocketAddr, u64)> {
        let mut due = Vec::new();
        for (addr, target) in &mut self.targets {
            if let TargetState::Idle { next_attempt } = target.state
                && next_attempt <= now
            {
                let dial_id = self.next_dial_id;
                self.next_dial_id += 1;
                target.state = TargetState::Dialing { dial_id };
                due.push((*addr, dial_id));
            }
        }
        due
    }

    /// When the next idle target is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.targets
            .values()
            .filter_map(|t| match t.state {
                TargetState::Idle { next_attempt } => Some(next_attempt),
                _ => None,
            })
            .min()
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there are no targets.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn check_invariants(&self) {
        for target in self.targets.values() {
            if let TargetState::Linked { peer } = target.state {
                debug_assert_eq!(target.last_peer, Some(peer));
                debug_assert_ne!(target.origin, Origin::Tentative);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn plan() -> DialPlan {
        DialPlan::new(Duration::from_millis(50), Duration::from_secs(5))
    }

    #[test]
    fn a_config_peer_is_dialed_at_once_and_retried_with_growing_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut plan = plan();
        plan.add(addr(1), Origin::Config, t0);
        let dials = plan.poll_dials(t0);
        assert_eq!(dials.len(), 1);
        assert!(
            plan.poll_dials(t0).is_empty(),
            "a dialing target is not dialed twice"
        );
        let mut delays = Vec::new();
        let mut now = t0;
        let mut dial_id = dials[0].1;
        for _ in 0..6 {
            let DialVerdict::Retry(delay) =
                plan.handle_dial_done(dial_id, addr(1), Err(()), now, &mut rng)
            else {
                panic!("config targets are retried");
            };
            delays.push(delay);
            assert!(plan.poll_dials(now).is_empty());
            now += delay;
            assert_eq!(plan.next_deadline(), Some(now));
            dial_id = plan.poll_dials(now)[0].1;
        }
        assert!(delays[5] > delays[0], "{delays:?}");
    }

    #[test]
    fn a_failed_add_session_is_forgotten_and_a_linked_one_is_kept() {
        let mut rng = StdRng::seed_from_u64(2);
        let now = Instant::now();
        let mut plan = plan();
        plan.add(addr(1), Origin::Tentative, now);
        let (_, id) = plan.poll_dials(now)[0];
        assert_eq!(
            plan.handle_dial_done(id, addr(1), Err(()), now, &mut rng),
            DialVerdict::Forgotten
        );
        assert!(plan.is_empty());

        plan.add(addr(2), Origin::Tentative, now);
        let (_, id) = plan.poll_dials(now)[0];
        assert_eq!(
            plan.handle_dial_done(id, addr(2), Ok(9), now, &mut rng),
            DialVerdict::Linked { newly_added: true }
        );
        assert_eq!(plan.linked_peer(addr(2)), Some(9));
    }

    #[test]
    fn a_lost_link_is_redialed_after_a_short_delay_and_a_dropped_peer_is_not() {
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        let mut plan = plan();
        plan.add(addr(1), Origin::Config, now);
        let (_, id) = plan.poll_dials(now)[0];
        plan.handle_dial_done(id, addr(1), Ok(5), now, &mut rng);
        assert_eq!(
            plan.next_deadline(),
            None,
            "a linked target waits for nothing"
        );
        plan.handle_link_down(5, now, &mut rng);
        let due = plan.next_deadline().unwrap();
        assert!(due - now <= Duration::from_millis(50));
        assert_eq!(plan.poll_dials(due).len(), 1);
        assert_eq!(plan.remove_peer(5), vec![(addr(1), false)]);
        assert!(plan.is_empty());
    }

    #[test]
    fn a_stale_dial_answer_is_ignored() {
        let mut rng = StdRng::seed_from_u64(4);
        let now = Instant::now();
        let mut plan = plan();
        plan.add(addr(1), Origin::Config, now);
        let (_, id) = plan.poll_dials(now)[0];
        assert_eq!(
            plan.handle_dial_done(id + 100, addr(1), Ok(1), now, &mut rng),
            DialVerdict::Unknown
        );
        assert_eq!(
            plan.handle_dial_done(id, addr(2), Ok(1), now, &mut rng),
            DialVerdict::Unknown
        );
    }
}
