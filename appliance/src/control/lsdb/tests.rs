//! Deterministic tests of flooding: exact outputs for small cases, then a simulated network
//! (virtual clock, seeded loss, delay and reordering) of up to 200 nodes.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;

fn config() -> LsdbConfig {
    LsdbConfig {
        refresh_interval: Duration::from_secs(10),
        max_age: Duration::from_secs(31),
        retransmit_interval: Duration::from_millis(100),
        ..LsdbConfig::default()
    }
}

fn metrics(rtt_us: u64) -> LinkMetrics {
    LinkMetrics {
        rtt_us,
        ..LinkMetrics::default()
    }
}

fn drain(db: &mut Lsdb) -> Vec<(u64, FloodMessage)> {
    std::iter::from_fn(|| db.poll_transmit()).collect()
}

#[test]
fn a_new_link_advertises_it_and_sends_the_whole_database_to_the_neighbour() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    let out = drain(&mut db);
    // Only the own LSA: the database holds nothing else yet, and it is not sent twice.
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out.iter().all(|(to, _)| *to == 2));
    let FloodMessage::Lsa { lsa, age } = &out[0].1 else {
        panic!("{out:?}")
    };
    assert_eq!((lsa.origin, lsa.seq, *age), (1, 2, Duration::ZERO));
    assert_eq!(
        lsa.adjacencies,
        vec![Adjacency {
            neighbor: 2,
            metrics: metrics(100)
        }]
    );
}

#[test]
fn an_unacked_lsa_is_resent_after_the_retransmit_interval_and_an_ack_stops_it() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    drain(&mut db);
    let resend_at = db.poll_timeout().expect("armed");
    assert_eq!(resend_at, t0 + Duration::from_millis(100));
    db.handle_timeout(resend_at);
    let out = drain(&mut db);
    assert_eq!(out.len(), 1);
    assert!(
        matches!(&out[0], (2, FloodMessage::Lsa { lsa, .. }) if lsa.origin == 1 && lsa.seq == 2)
    );
    db.handle_message(resend_at, 2, FloodMessage::Ack { origin: 1, seq: 2 });
    db.handle_timeout(resend_at + Duration::from_secs(1));
    assert!(drain(&mut db).is_empty(), "acked: nothing more to resend");
}

#[test]
fn a_newer_lsa_is_installed_acked_and_flooded_to_the_other_neighbours_only() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    db.handle_link_up(t0, 3, metrics(100));
    drain(&mut db);
    let lsa = Lsa {
        origin: 9,
        seq: 5,
        adjacencies: vec![Adjacency {
            neighbor: 2,
            metrics: metrics(7),
        }],
    };
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: lsa.clone(),
            age: Duration::from_secs(1),
        },
    );
    assert!(db.take_changed());
    let out = drain(&mut db);
    assert_eq!(
        out,
        vec![
            (2, FloodMessage::Ack { origin: 9, seq: 5 }),
            (
                3,
                FloodMessage::Lsa {
                    lsa: lsa.clone(),
                    age: Duration::from_secs(1)
                }
            ),
        ]
    );
    // The same LSA again is only acked.
    db.handle_message(
        t0,
        3,
        FloodMessage::Lsa {
            lsa,
            age: Duration::from_secs(1),
        },
    );
    assert!(!db.take_changed());
    assert_eq!(
        drain(&mut db),
        vec![(3, FloodMessage::Ack { origin: 9, seq: 5 })]
    );
}

#[test]
fn an_older_lsa_gets_the_newer_copy_sent_back() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    let newer = Lsa {
        origin: 9,
        seq: 5,
        adjacencies: vec![],
    };
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: newer.clone(),
            age: Duration::ZERO,
        },
    );
    drain(&mut db);
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: Lsa {
                seq: 3,
                ..newer.clone()
            },
            age: Duration::ZERO,
        },
    );
    assert_eq!(
        drain(&mut db),
        vec![(
            2,
            FloodMessage::Lsa {
                lsa: newer,
                age: Duration::ZERO
            }
        )]
    );
}

#[test]
fn a_restarted_node_jumps_past_the_seq_of_its_previous_life() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    drain(&mut db);
    let old_life = Lsa {
        origin: 1,
        seq: 40,
        adjacencies: vec![],
    };
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: old_life,
            age: Duration::from_secs(3),
        },
    );
    assert_eq!(db.get(1).map(|l| l.seq), Some(41));
    let out = drain(&mut db);
    assert!(out.contains(&(2, FloodMessage::Ack { origin: 1, seq: 40 })));
    assert!(
        out.iter()
            .any(|(to, m)| *to == 2 && matches!(m, FloodMessage::Lsa { lsa, .. } if lsa.seq == 41))
    );
}

#[test]
fn an_lsa_seq_beyond_the_maximum_is_dropped_and_never_wraps_the_own_seq() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    drain(&mut db);
    for origin in [1, 3] {
        let forged = Lsa {
            origin,
            seq: u64::MAX,
            adjacencies: vec![],
        };
        db.handle_message(
            t0,
            2,
            FloodMessage::Lsa {
                lsa: forged,
                age: Duration::ZERO,
            },
        );
    }
    assert_eq!(db.get(3), None, "a forged maximal copy is not stored");
    assert_eq!(db.get(1).map(|l| l.seq), Some(2), "own seq unmoved");
    assert!(drain(&mut db).is_empty(), "nothing acked or flooded");

    // An own copy at the very top is too far ahead to be an earlier life's: ignored, and the
    // own LSA keeps moving.
    let top = Lsa {
        origin: 1,
        seq: MAX_LSA_SEQ,
        adjacencies: vec![],
    };
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: top,
            age: Duration::ZERO,
        },
    );
    assert_eq!(db.get(1).map(|l| l.seq), Some(2));
    db.handle_link_down(t0, 2);
    assert_eq!(db.get(1).map(|l| l.seq), Some(3));
}

#[test]
fn small_metric_changes_are_not_advertised_and_large_ones_are() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(1_000));
    drain(&mut db);
    let seq = db.get(1).map(|l| l.seq);
    db.handle_metrics(t0, 2, metrics(1_150));
    db.handle_metrics(
        t0,
        2,
        LinkMetrics {
            rtt_us: 1_100,
            loss_ppm: 10_000,
            ..LinkMetrics::default()
        },
    );
    assert_eq!(db.get(1).map(|l| l.seq), seq, "within hysteresis");
    assert!(drain(&mut db).is_empty());
    db.handle_metrics(t0, 2, metrics(2_000));
    assert_eq!(db.get(1).map(|l| l.seq), seq.map(|s| s + 1));
    assert_eq!(db.get(1).unwrap().adjacencies[0].metrics.rtt_us, 2_000);
}

#[test]
fn an_lsa_not_refreshed_expires_after_max_age_and_own_lsa_is_refreshed() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: Lsa {
                origin: 9,
                seq: 1,
                adjacencies: vec![],
            },
            age: Duration::from_secs(30),
        },
    );
    db.handle_message(t0, 2, FloodMessage::Ack { origin: 1, seq: 2 });
    db.handle_timeout(t0 + Duration::from_millis(999));
    assert!(db.get(9).is_some());
    db.handle_timeout(t0 + Duration::from_secs(1));
    assert!(db.get(9).is_none(), "31 s max age, 30 s old on arrival");
    db.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(db.get(1).map(|l| l.seq), Some(3), "refreshed");
}

#[test]
fn a_purged_lsa_is_gone_at_once_and_the_own_lsa_cannot_be_purged() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    db.handle_message(
        t0,
        2,
        FloodMessage::Lsa {
            lsa: Lsa {
                origin: 9,
                seq: 4,
                adjacencies: vec![],
            },
            age: Duration::ZERO,
        },
    );
    db.take_changed();
    db.purge(9);
    assert!(db.get(9).is_none() && db.take_changed());
    db.purge(1);
    assert!(db.get(1).is_some());
}

#[test]
fn a_flood_of_invented_origins_stops_at_the_bound_and_never_pushes_out_own_or_neighbours() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.handle_link_up(t0, 2, metrics(100));
    db.handle_link_up(t0, 3, metrics(100));
    let adjacency = |neighbor| Adjacency {
        neighbor,
        metrics: metrics(100),
    };
    let lsa = |origin, seq, adjacencies| FloodMessage::Lsa {
        lsa: Lsa {
            origin,
            seq,
            adjacencies,
        },
        age: Duration::ZERO,
    };
    db.handle_message(t0, 3, lsa(3, 1, vec![adjacency(1)]));
    // Neighbour 2 floods origins it invented, each with a link back to itself.
    let flood = MAX_ORIGINS as u64 + 1000;
    let mut last = t0;
    for i in 0..flood {
        last = t0 + Duration::from_micros(i);
        db.handle_message(last, 2, lsa(1_000_000 + i, 1, vec![adjacency(2)]));
        let out = drain(&mut db);
        // Kept or refused, every copy is acknowledged: the sender stops retransmitting.
        assert!(out.contains(&(
            2,
            FloodMessage::Ack {
                origin: 1_000_000 + i,
                seq: 1
            }
        )));
    }
    assert_eq!(db.lsas().count(), MAX_ORIGINS);
    assert!(db.get(1).is_some() && db.get(3).is_some());
    let kept = MAX_ORIGINS as u64 - 2;
    assert_eq!(db.refused_origins(), flood - kept);
    assert!(db.get(1_000_000 + kept).is_none(), "refused once full");
    // The neighbour's own LSA still gets in, in place of the invented origin closest to expiry.
    db.handle_message(last, 2, lsa(2, 1, vec![adjacency(1)]));
    assert!(db.get(2).is_some());
    assert!(
        db.get(1_000_000).is_none(),
        "the oldest invented origin made room"
    );
    assert_eq!(db.lsas().count(), MAX_ORIGINS);
    // A neighbour's LSA naming more neighbours than anyone has is cut to the bound.
    let many = (10..10 + 3 * MAX_ADJACENCIES as u64)
        .map(adjacency)
        .collect();
    db.handle_message(last, 3, lsa(3, 2, many));
    let kept_adjacencies = &db.get(3).unwrap().adjacencies;
    assert_eq!(kept_adjacencies.len(), MAX_ADJACENCIES);
    assert_eq!(
        kept_adjacencies[0].neighbor, 10,
        "the lowest ids, as on every node"
    );
    db.check_invariants();
}

#[test]
fn messages_from_a_node_that_is_not_a_neighbour_are_ignored() {
    let t0 = Instant::now();
    let mut db = Lsdb::new(1, config(), t0);
    db.take_changed();
    db.handle_message(
        t0,
        7,
        FloodMessage::Lsa {
            lsa: Lsa {
                origin: 7,
                seq: 1,
                adjacencies: vec![],
            },
            age: Duration::ZERO,
        },
    );
    assert!(db.get(7).is_none());
    assert!(!db.take_changed());
    assert!(drain(&mut db).is_empty());
}

// ---- simulation --------------------------------------------------------------------------

/// N databases over an in-memory network with a virtual clock.
struct Sim {
    rng: StdRng,
    now: Instant,
    nodes: BTreeMap<u64, Lsdb>,
    links: BTreeSet<(u64, u64)>,
    in_flight: BinaryHeap<Reverse<(Instant, u64, u64, u64)>>,
    messages: BTreeMap<u64, FloodMessage>,
    next_id: u64,
    loss: f64,
    max_delay_ms: u64,
    delivered: u64,
    /// Each node's next timer, refreshed whenever it handles an input.
    timers: BTreeSet<(Instant, u64)>,
    timer_of: BTreeMap<u64, Instant>,
}

impl Sim {
    fn new(seed: u64, loss: f64, max_delay_ms: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            now: Instant::now(),
            nodes: BTreeMap::new(),
            links: BTreeSet::new(),
            in_flight: BinaryHeap::new(),
            messages: BTreeMap::new(),
            next_id: 0,
            loss,
            max_delay_ms,
            delivered: 0,
            timers: BTreeSet::new(),
            timer_of: BTreeMap::new(),
        }
    }

    /// Random asymmetric topology: a random tree (so everything is connected) plus extra links.
    fn random_topology(&mut self, n: u64, extra: usize) -> Vec<(u64, u64)> {
        let mut edges = BTreeSet::new();
        for id in 2..=n {
            let parent = self.rng.gen_range(1..id);
            edges.insert((parent.min(id), parent.max(id)));
        }
        while edges.len() < (n as usize - 1) + extra {
            let a = self.rng.gen_range(1..=n);
            let b = self.rng.gen_range(1..=n);
            if a != b {
                edges.insert((a.min(b), a.max(b)));
            }
        }
        edges.into_iter().collect()
    }

    /// Starts `n` nodes linked in a random topology (a tree plus `extra` links); its edges.
    fn start_random_mesh(&mut self, n: u64, extra: usize) -> Vec<(u64, u64)> {
        let edges = self.random_topology(n, extra);
        for id in 1..=n {
            self.add_node(id);
        }
        for (a, b) in &edges {
            self.link_up(*a, *b);
        }
        edges
    }

    fn add_node(&mut self, id: u64) {
        self.nodes.insert(id, Lsdb::new(id, config(), self.now));
        self.rearm(id);
    }

    fn rearm(&mut self, id: u64) {
        if let Some(old) = self.timer_of.remove(&id) {
            self.timers.remove(&(old, id));
        }
        if let Some(at) = self.nodes.get(&id).and_then(Lsdb::poll_timeout) {
            self.timer_of.insert(id, at);
            self.timers.insert((at, id));
        }
    }

    fn link_up(&mut self, a: u64, b: u64) {
        self.links.insert((a.min(b), a.max(b)));
        let metric_ab = metrics(self.rng.gen_range(100..10_000));
        let metric_ba = metrics(self.rng.gen_range(100..10_000));
        self.nodes
            .get_mut(&a)
            .unwrap()
            .handle_link_up(self.now, b, metric_ab);
        self.nodes
            .get_mut(&b)
            .unwrap()
            .handle_link_up(self.now, a, metric_ba);
        self.rearm(a);
        self.rearm(b);
        self.collect();
    }

    fn crash(&mut self, node: u64) {
        self.nodes.remove(&node);
        let gone: Vec<(u64, u64)> = self
            .links
            .iter()
            .copied()
            .filter(|(a, b)| *a == node || *b == node)
            .collect();
        for (a, b) in gone {
            self.links.remove(&(a, b));
            let other = if a == node { b } else { a };
            self.nodes
                .get_mut(&other)
                .unwrap()
                .handle_link_down(self.now, node);
            self.rearm(other);
        }
        self.rearm(node);
        self.collect();
    }

    fn collect(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.collect_from(id);
        }
    }

    fn collect_from(&mut self, id: u64) {
        let Some(db) = self.nodes.get_mut(&id) else {
            return;
        };
        let mut out = Vec::new();
        while let Some((to, message)) = db.poll_transmit() {
            out.push((id, to, message));
        }
        db.check_invariants();
        for (from, to, message) in out {
            if self.rng.gen_bool(self.loss) {
                continue;
            }
            let delay = Duration::from_micros(self.rng.gen_range(100..=self.max_delay_ms * 1000));
            self.next_id += 1;
            self.messages.insert(self.next_id, message);
            self.in_flight
                .push(Reverse((self.now + delay, self.next_id, from, to)));
        }
    }

    /// Runs until `until`, delivering messages (those on links that went down are lost) and
    /// firing timers.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next_message = self.in_flight.peek().map(|Reverse((at, ..))| *at);
            let next_timer = self.timers.first().map(|(at, _)| *at);
            let next = [next_message, next_timer].into_iter().flatten().min();
            let Some(next) = next.filter(|at| *at <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            if next_message == Some(next) {
                let Reverse((_, id, from, to)) = self.in_flight.pop().unwrap();
                let message = self.messages.remove(&id).unwrap();
                let linked = self.links.contains(&(from.min(to), from.max(to)));
                if let (true, Some(db)) = (linked, self.nodes.get_mut(&to)) {
                    db.handle_message(self.now, from, message);
                    self.delivered += 1;
                    self.rearm(to);
                    self.collect_from(to);
                }
            } else {
                let (_, id) = self.timers.pop_first().unwrap();
                self.timer_of.remove(&id);
                if let Some(db) = self.nodes.get_mut(&id) {
                    db.handle_timeout(self.now);
                }
                self.rearm(id);
                self.collect_from(id);
            }
        }
    }

    fn digest(db: &Lsdb) -> Vec<Lsa> {
        db.lsas().cloned().collect()
    }

    fn converged(&self) -> bool {
        let mut digests = self.nodes.values().map(Self::digest);
        let Some(first) = digests.next() else {
            return true;
        };
        first.len() == self.nodes.len() && digests.all(|d| d == first)
    }

    /// Time until every database is identical, checked every 10 ms of virtual time.
    fn time_to_converge(&mut self, limit: Duration) -> Option<Duration> {
        let start = self.now;
        while self.now < start + limit {
            let step = self.now + Duration::from_millis(10);
            self.run_until(step);
            if self.converged() {
                return Some(self.now - start);
            }
        }
        None
    }
}

fn converge_random_mesh(seed: u64, n: u64, extra: usize, loss: f64) -> Duration {
    let mut sim = Sim::new(seed, loss, 20);
    let edges = sim.start_random_mesh(n, extra);
    let took = sim.time_to_converge(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!("seed {seed}: {n} nodes, loss {loss}: not converged in 30 s (--reproduce with this seed)")
    });
    // Every database describes exactly the links of the simulated network.
    let db = &sim.nodes[&1];
    for (a, b) in &edges {
        assert!(
            db.get(*a)
                .unwrap()
                .adjacencies
                .iter()
                .any(|x| x.neighbor == *b)
        );
        assert!(
            db.get(*b)
                .unwrap()
                .adjacencies
                .iter()
                .any(|x| x.neighbor == *a)
        );
    }
    took
}

#[test]
fn random_asymmetric_meshes_converge_to_identical_databases_without_loss() {
    for seed in 0..5 {
        let took = converge_random_mesh(seed, 30, 20, 0.0);
        assert!(took < Duration::from_secs(2), "seed {seed}: {took:?}");
    }
}

#[test]
fn two_hundred_nodes_converge_under_ten_percent_loss_and_reordering() {
    for seed in [7, 8] {
        let took = converge_random_mesh(seed, 200, 150, 0.10);
        println!(
            "seed {seed}: 200 nodes, 10% loss, reordering: converged after {took:?} (virtual)"
        );
    }
}

#[test]
fn a_crashed_node_is_withdrawn_everywhere_and_its_lsa_ages_out() {
    let seed = 11;
    let mut sim = Sim::new(seed, 0.05, 20);
    let edges = sim.start_random_mesh(60, 40);
    sim.time_to_converge(Duration::from_secs(30))
        .expect("converged");
    // The victim must not be a cut vertex of the rest, or the survivors split; pick one whose
    // removal keeps the others connected.
    let victim = (2..=60)
        .find(|v| {
            let mut seen = BTreeSet::from([1u64]);
            let mut stack = vec![1u64];
            while let Some(x) = stack.pop() {
                for (a, b) in &edges {
                    let y = if *a == x {
                        *b
                    } else if *b == x {
                        *a
                    } else {
                        continue;
                    };
                    if y != *v && seen.insert(y) {
                        stack.push(y);
                    }
                }
            }
            seen.len() == 59
        })
        .expect("a non-cut vertex");
    sim.crash(victim);
    let start = sim.now;
    loop {
        sim.run_until(sim.now + Duration::from_millis(10));
        let withdrawn = sim.nodes.values().all(|db| {
            db.lsas()
                .filter(|l| l.origin != victim)
                .all(|l| l.adjacencies.iter().all(|a| a.neighbor != victim))
        });
        if withdrawn {
            break;
        }
        assert!(
            sim.now < start + Duration::from_secs(10),
            "seed {seed}: withdrawal did not spread"
        );
    }
    println!(
        "seed {seed}: withdrawal of node {victim} reached all 59 nodes after {:?}",
        sim.now - start
    );
    sim.run_until(sim.now + config().max_age + Duration::from_secs(1));
    for (id, db) in &sim.nodes {
        assert!(
            db.get(victim).is_none(),
            "node {id} still holds the dead node's LSA"
        );
    }
    assert!(
        sim.time_to_converge(Duration::from_secs(5)).is_some(),
        "survivors agree after the victim aged out"
    );
}

#[test]
fn refreshes_keep_a_quiet_mesh_alive_past_max_age() {
    let mut sim = Sim::new(3, 0.02, 5);
    sim.start_random_mesh(20, 10);
    sim.time_to_converge(Duration::from_secs(10))
        .expect("converged");
    sim.run_until(sim.now + Duration::from_secs(100));
    for db in sim.nodes.values() {
        assert_eq!(db.lsas().count(), 20);
    }
    assert!(sim.delivered > 0);
}
