//! Who votes in the control group: a pure decision the leader takes once per tick.
//!
//! Inputs are the group's membership (voters, learners) and what SWIM says of every member;
//! the output is at most one change, so each change commits (and is seen in the next tick's
//! inputs) before the next is decided. The rules, in order:
//!
//! 1. A node gone for good (left or evicted) leaves the group: a learner is removed; a voter
//!    is replaced by the healthiest learner when there is one (the count stays odd).
//! 2. A live member outside the group joins it as a learner (the joint-consensus way in:
//!    it catches up before it can vote).
//! 3. A voter declared dead for longer than the grace period is replaced by a live learner.
//! 4. Live learners are promoted until the group has the largest odd number of voters not
//!    above `max_voters` that the live members allow.
//!
//! Odd, because an even group tolerates no more failures than the odd group one smaller and
//! needs a larger quorum. A dead voter with no live learner to take its place stays: removing
//! it would shrink the group to an even size or below the failures it is meant to survive,
//! and it may come back.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

/// What SWIM says of a member, for the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Alive (or suspect: not yet declared dead).
    Live,
    /// Declared dead, for this long.
    Dead(Duration),
    /// Left or evicted: never coming back under this identity.
    Gone,
}

/// The one change the leader makes next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add a learner (it replicates, does not vote).
    AddLearner(u64),
    /// Remove these learners.
    RemoveLearners(BTreeSet<u64>),
    /// Make these the voters (joint consensus; learners promoted, dropped voters kept as
    /// learners).
    SetVoters(BTreeSet<u64>),
}

/// The policy's settings.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// At most this many voters (odd; the seeds' default is 5).
    pub max_voters: usize,
    /// How long a voter may be dead before it is replaced.
    pub dead_grace: Duration,
}

impl Policy {
    /// The next change, if any. `members` is every member SWIM knows, this node included; a
    /// node of the group that SWIM does not know counts as live (it may be one this node has
    /// not heard of yet, and the group, not SWIM, is the authority on it).
    pub fn decide(
        &self,
        voters: &BTreeSet<u64>,
        learners: &BTreeSet<u64>,
        members: &BTreeMap<u64, Liveness>,
    ) -> Option<Change> {
        let liveness = |node: &u64| members.get(node).copied().unwrap_or(Liveness::Live);
        let live_learners: Vec<u64> = learners
            .iter()
            .copied()
            .filter(|n| liveness(n) == Liveness::Live)
            .collect();

        // 1. Gone for good.
        let gone_learners: BTreeSet<u64> = learners
            .iter()
            .copied()
            .filter(|n| liveness(n) == Liveness::Gone)
            .collect();
        if !gone_learners.is_empty() {
            return Some(Change::RemoveLearners(gone_learners));
        }
        let gone_voters: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|n| liveness(n) == Liveness::Gone)
            .collect();
        if !gone_voters.is_empty() {
            let mut next: BTreeSet<u64> = voters
                .iter()
                .copied()
                .filter(|n| !gone_voters.contains(n))
                .collect();
            let mut candidates = live_learners.iter().copied();
            while next.len() < voters.len() {
                match candidates.next() {
                    Some(learner) => {
                        next.insert(learner);
                    }
                    None => break,
                }
            }
            // Keep the count odd: an even group is no safer and needs a larger quorum.
            if next.len().is_multiple_of(2) && next.len() > 1 {
                let extra = *next.iter().next_back().unwrap_or(&0);
                // Drop a voter that is not live first, else the highest id.
                let drop = next
                    .iter()
                    .copied()
                    .find(|n| liveness(n) != Liveness::Live)
                    .unwrap_or(extra);
                next.remove(&drop);
            }
            if !next.is_empty() {
                return Some(Change::SetVoters(next));
            }
        }

        // 2. Live members outside the group.
        if let Some(node) = members
            .iter()
            .filter(|(_, l)| **l == Liveness::Live)
            .map(|(n, _)| *n)
            .find(|n| !voters.contains(n) && !learners.contains(n))
        {
            return Some(Change::AddLearner(node));
        }

        // 3. Voters dead past the grace period, replaced one for one.
        let dead: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|n| matches!(liveness(n), Liveness::Dead(d) if d >= self.dead_grace))
            .collect();
        if !dead.is_empty() && !live_learners.is_empty() {
            let mut next = voters.clone();
            for (dead, learner) in dead.iter().zip(&live_learners) {
                next.remove(dead);
                next.insert(*learner);
            }
            return Some(Change::SetVoters(next));
        }

        // 4. Grow to the largest odd size the live members allow.
        let live_voters = voters
            .iter()
            .filter(|n| liveness(n) == Liveness::Live)
            .count();
        let live = live_voters + live_learners.len();
        let mut target = live.min(self.max_voters.max(1));
        if target.is_multiple_of(2) {
            target -= 1;
        }
        if voters.len() < target {
            let mut next = voters.clone();
            for learner in &live_learners {
                if next.len() >= target {
                    break;
                }
                next.insert(*learner);
            }
            if next.len().is_multiple_of(2) {
                return None;
            }
            return Some(Change::SetVoters(next));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    const POLICY: Policy = Policy {
        max_voters: 5,
        dead_grace: Duration::from_secs(10),
    };

    fn set(nodes: &[u64]) -> BTreeSet<u64> {
        nodes.iter().copied().collect()
    }

    fn live(nodes: &[u64]) -> BTreeMap<u64, Liveness> {
        nodes.iter().map(|n| (*n, Liveness::Live)).collect()
    }

    /// Applies changes until the policy has nothing more to say (as the leader would, one
    /// committed change per tick).
    fn settle(
        voters: &mut BTreeSet<u64>,
        learners: &mut BTreeSet<u64>,
        members: &BTreeMap<u64, Liveness>,
    ) -> usize {
        for steps in 0..64 {
            match POLICY.decide(voters, learners, members) {
                None => return steps,
                Some(Change::AddLearner(n)) => {
                    learners.insert(n);
                }
                Some(Change::RemoveLearners(gone)) => learners.retain(|n| !gone.contains(n)),
                Some(Change::SetVoters(next)) => {
                    // meshd passes retain = true: dropped voters stay as learners.
                    learners.extend(voters.iter().filter(|v| !next.contains(v)));
                    learners.retain(|n| !next.contains(n));
                    *voters = next;
                }
            }
        }
        panic!("the policy did not settle");
    }

    #[test]
    fn a_growing_mesh_promotes_to_odd_sizes_up_to_five() {
        let mut voters = set(&[1]);
        let mut learners = BTreeSet::new();
        settle(&mut voters, &mut learners, &live(&[1]));
        assert_eq!(voters, set(&[1]));
        settle(&mut voters, &mut learners, &live(&[1, 2]));
        assert_eq!(
            (voters.len(), learners.len()),
            (1, 1),
            "two members: one voter"
        );
        settle(&mut voters, &mut learners, &live(&[1, 2, 3]));
        assert_eq!((voters.len(), learners.len()), (3, 0));
        settle(&mut voters, &mut learners, &live(&[1, 2, 3, 4]));
        assert_eq!((voters.len(), learners.len()), (3, 1));
        settle(&mut voters, &mut learners, &live(&[1, 2, 3, 4, 5, 6, 7]));
        assert_eq!((voters.len(), learners.len()), (5, 2));
    }

    #[test]
    fn a_voter_dead_past_the_grace_is_replaced_by_a_live_learner() {
        let mut voters = set(&[1, 2, 3]);
        let mut learners = set(&[4]);
        let mut members = live(&[1, 2, 3, 4]);
        members.insert(3, Liveness::Dead(Duration::from_secs(5)));
        assert_eq!(
            POLICY.decide(&voters, &learners, &members),
            None,
            "in grace"
        );
        members.insert(3, Liveness::Dead(Duration::from_secs(11)));
        settle(&mut voters, &mut learners, &members);
        assert_eq!(voters, set(&[1, 2, 4]));
    }

    #[test]
    fn a_dead_voter_without_a_replacement_stays() {
        let voters = set(&[1, 2, 3]);
        let mut members = live(&[1, 2]);
        members.insert(3, Liveness::Dead(Duration::from_secs(60)));
        assert_eq!(POLICY.decide(&voters, &BTreeSet::new(), &members), None);
    }

    #[test]
    fn gone_nodes_leave_and_the_count_stays_odd() {
        let mut voters = set(&[1, 2, 3]);
        let mut learners = set(&[4, 5]);
        let mut members = live(&[1, 2, 3, 4, 5]);
        members.insert(5, Liveness::Gone);
        members.insert(2, Liveness::Gone);
        settle(&mut voters, &mut learners, &members);
        assert_eq!(voters, set(&[1, 3, 4]));
        assert!(learners.is_empty());

        // A gone voter with nobody to replace it: three become one, not two.
        let mut voters = set(&[1, 2, 3]);
        let mut learners = BTreeSet::new();
        let mut members = live(&[1, 2, 3]);
        members.insert(3, Liveness::Gone);
        settle(&mut voters, &mut learners, &members);
        assert_eq!(voters.len() % 2, 1);
        assert!(!voters.contains(&3));
    }

    /// Random meshes and random failures: after settling, the voters are always an odd,
    /// non-empty set of at most `max_voters`, never a gone node, and as large as the live
    /// members allow.
    #[test]
    fn random_histories_keep_the_invariants() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..500 {
            let n = rng.gen_range(1..10u64);
            let mut voters = set(&[1]);
            let mut learners = BTreeSet::new();
            let mut members = live(&(1..=n).collect::<Vec<_>>());
            settle(&mut voters, &mut learners, &members);
            for _ in 0..5 {
                let node = rng.gen_range(2..=n.max(2));
                let state = match rng.gen_range(0..3) {
                    0 => Liveness::Live,
                    1 => Liveness::Dead(Duration::from_secs(rng.gen_range(0..30))),
                    _ => Liveness::Gone,
                };
                if members.contains_key(&node) {
                    members.insert(node, state);
                }
                settle(&mut voters, &mut learners, &members);
                assert!(!voters.is_empty());
                assert_eq!(voters.len() % 2, 1, "{voters:?}");
                assert!(voters.len() <= POLICY.max_voters);
                assert!(
                    voters
                        .iter()
                        .all(|v| members.get(v) != Some(&Liveness::Gone))
                );
                assert!(
                    learners
                        .iter()
                        .all(|v| members.get(v) != Some(&Liveness::Gone))
                );
                let live_count = members.values().filter(|l| **l == Liveness::Live).count();
                let all_live_voters = voters
                    .iter()
                    .all(|v| members.get(v) == Some(&Liveness::Live));
                if all_live_voters {
                    let mut want = live_count.min(POLICY.max_voters);
                    if want % 2 == 0 {
                        want -= 1;
                    }
                    assert_eq!(voters.len(), want, "{voters:?} {learners:?} {members:?}");
                }
            }
        }
    }
}
