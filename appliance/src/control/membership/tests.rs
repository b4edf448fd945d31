//! Deterministic SWIM simulations: many members over an in-memory network with a virtual clock
//! and seeded loss and delay (SWIM paper, Das et al. 2002, §4–5: suspicion and refutation).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap},
};

use rand::{Rng, SeedableRng, rngs::StdRng as SimRng};

use super::*;

fn meta(node: u64) -> NodeMeta {
    NodeMeta {
        node,
        name: format!("node-{node}"),
        version: "test".into(),
        capabilities: vec!["relay".into()],
        ..NodeMeta::default()
    }
}

struct Sim {
    rng: SimRng,
    now: Instant,
    config: MembershipConfig,
    nodes: BTreeMap<u64, Membership>,
    in_flight: BinaryHeap<Reverse<(Instant, u64, u64, u64)>>,
    payloads: BTreeMap<u64, Bytes>,
    next_id: u64,
    loss: f64,
    timers: BTreeSet<(Instant, u64)>,
    timer_of: BTreeMap<u64, Instant>,
    /// Every (observer, event) seen, in order.
    events: Vec<(u64, MembershipEvent, Instant)>,
}

impl Sim {
    fn new(seed: u64, loss: f64, config: MembershipConfig) -> Self {
        Self {
            rng: SimRng::seed_from_u64(seed),
            now: Instant::now(),
            config,
            nodes: BTreeMap::new(),
            in_flight: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            next_id: 0,
            loss,
            timers: BTreeSet::new(),
            timer_of: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn start(&mut self, node: u64, generation: u32) {
        let seed = self.rng.r#gen();
        let m = Membership::new(node, generation, &self.config, seed, meta(node), self.now);
        self.nodes.insert(node, m);
        self.settle(node);
    }

    fn link_up(&mut self, a: u64, b: u64) {
        let now = self.now;
        self.nodes.get_mut(&a).unwrap().handle_link_up(now, b);
        self.settle(a);
    }

    fn crash(&mut self, node: u64) {
        self.nodes.remove(&node);
        if let Some(at) = self.timer_of.remove(&node) {
            self.timers.remove(&(at, node));
        }
    }

    /// Collects a node's output after it handled an input.
    fn settle(&mut self, id: u64) {
        if let Some(old) = self.timer_of.remove(&id) {
            self.timers.remove(&(old, id));
        }
        let Some(m) = self.nodes.get_mut(&id) else {
            return;
        };
        m.check_invariants();
        let mut out = Vec::new();
        while let Some((to, data)) = m.poll_transmit() {
            out.push((to, data));
        }
        while let Some(event) = m.poll_event() {
            self.events.push((id, event, self.now));
        }
        if let Some(at) = m.poll_timeout() {
            self.timer_of.insert(id, at);
            self.timers.insert((at, id));
        }
        for (to, data) in out {
            if self.rng.gen_bool(self.loss) {
                continue;
            }
            let delay = Duration::from_micros(self.rng.gen_range(200..=5_000));
            self.next_id += 1;
            self.payloads.insert(self.next_id, data);
            self.in_flight
                .push(Reverse((self.now + delay, self.next_id, id, to)));
        }
    }

    fn run_for(&mut self, span: Duration) {
        let until = self.now + span;
        loop {
            let next_message = self.in_flight.peek().map(|Reverse((at, ..))| *at);
            let next_timer = self.timers.first().map(|(at, _)| *at);
            let Some(next) = [next_message, next_timer]
                .into_iter()
                .flatten()
                .min()
                .filter(|at| *at <= until)
            else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            let now = self.now;
            if next_message == Some(next) {
                let Reverse((_, id, from, to)) = self.in_flight.pop().unwrap();
                let data = self.payloads.remove(&id).unwrap();
                if let Some(m) = self.nodes.get_mut(&to) {
                    m.handle_data(now, from, &data);
                    self.settle(to);
                }
            } else {
                let (_, id) = self.timers.pop_first().unwrap();
                self.timer_of.remove(&id);
                if let Some(m) = self.nodes.get_mut(&id) {
                    m.handle_timeout(now);
                }
                self.settle(id);
            }
        }
    }

    fn everyone_sees(&self, node: u64, state: MemberState) -> bool {
        self.nodes
            .iter()
            .filter(|(id, _)| **id != node)
            .all(|(_, m)| m.member(node).is_some_and(|v| v.state == state))
    }

    /// Every member knows every other as reachable (suspects included: under loss some member
    /// is always being suspected and refuting).
    fn all_alive(&self) -> bool {
        let n = self.nodes.len();
        self.nodes.values().all(|m| {
            let c = m.census();
            c.total == n && c.online == n
        })
    }

    /// Starts `n` members; each announces itself to a random earlier one.
    fn bootstrap(&mut self, n: u64) -> Duration {
        for node in 1..=n {
            self.start(node, 1);
            if node > 1 {
                let to = self.rng.gen_range(1..node);
                self.link_up(node, to);
            }
        }
        let start = self.now;
        while !self.all_alive() {
            self.run_for(Duration::from_millis(100));
            if self.now - start > Duration::from_secs(120) {
                let worst = self
                    .nodes
                    .values()
                    .map(Membership::census)
                    .min_by_key(|c| c.online);
                panic!("{n} members did not converge: worst view {worst:?}");
            }
        }
        self.now - start
    }
}

#[test]
fn a_member_announced_to_a_neighbour_learns_the_whole_mesh_and_its_metadata() {
    let mut sim = Sim::new(1, 0.0, MembershipConfig::default());
    let took = sim.bootstrap(8);
    assert!(took < Duration::from_secs(10), "{took:?}");
    let view = sim.nodes[&3].member(7).expect("7 known to 3");
    assert_eq!(view.state, MemberState::Alive);
    sim.run_for(Duration::from_secs(5));
    let view = sim.nodes[&3].member(7).unwrap();
    assert_eq!(view.meta.as_ref().map(|m| m.name.as_str()), Some("node-7"));
    let joined: BTreeSet<u64> = sim
        .events
        .iter()
        .filter(|(observer, e, _)| *observer == 1 && matches!(e, MembershipEvent::Joined(_)))
        .map(|(_, e, _)| match e {
            MembershipEvent::Joined(n) => *n,
            _ => 0,
        })
        .collect();
    assert_eq!(joined, (2..=8).collect());
}

#[test]
fn a_crashed_member_is_declared_dead_by_all_and_a_restart_recovers_it() {
    let config = MembershipConfig::default();
    let mut sim = Sim::new(2, 0.0, config.clone());
    sim.bootstrap(10);
    sim.crash(4);
    let crashed_at = sim.now;
    while !sim.everyone_sees(4, MemberState::Dead) {
        sim.run_for(Duration::from_millis(100));
        assert!(
            sim.now - crashed_at < Duration::from_secs(30),
            "not declared dead in 30 s"
        );
    }
    let took = sim.now - crashed_at;
    println!("10 members: crash declared dead by all after {took:?}");
    assert!(
        sim.nodes
            .values()
            .all(|m| m.census().health() == Health::Degraded)
    );
    // A restart has a higher generation and wins over the dead identity.
    sim.start(4, 2);
    sim.link_up(4, 1);
    let restarted_at = sim.now;
    while !sim.everyone_sees(4, MemberState::Alive) {
        sim.run_for(Duration::from_millis(100));
        assert!(
            sim.now - restarted_at < Duration::from_secs(30),
            "restart not seen"
        );
    }
    assert!(
        sim.events.iter().any(|(o, e, at)| *o == 9
            && *e == MembershipEvent::Recovered(4)
            && *at >= restarted_at)
    );
    assert!(sim.all_alive());
}

#[test]
fn two_hundred_members_under_ten_percent_loss_have_no_false_positives_and_detect_a_crash() {
    let config = MembershipConfig {
        probe_period: Duration::from_secs(1),
        probe_rtt: Duration::from_millis(300),
        suspect_to_down: Duration::from_secs(6),
        ..MembershipConfig::default()
    };
    let seed = 3;
    let mut sim = Sim::new(seed, 0.10, config);
    let took = sim.bootstrap(200);
    println!(
        "seed {seed}: 200 members, 10% loss: everyone sees everyone alive after {took:?} (virtual)"
    );
    let quiet_from = sim.now;
    sim.run_for(Duration::from_secs(60));
    let false_dead: Vec<_> = sim
        .events
        .iter()
        .filter(|(_, e, at)| *at >= quiet_from && matches!(e, MembershipEvent::Dead(_)))
        .collect();
    assert!(
        false_dead.is_empty(),
        "seed {seed}: false positives: {false_dead:?}"
    );
    let suspicions = sim
        .events
        .iter()
        .filter(|(_, e, at)| *at >= quiet_from && matches!(e, MembershipEvent::Suspect(_)))
        .count();
    println!(
        "seed {seed}: 60 s under 10% loss: {suspicions} suspicions, all refuted, 0 false deaths"
    );

    sim.crash(77);
    let crashed_at = sim.now;
    while !sim.everyone_sees(77, MemberState::Dead) {
        sim.run_for(Duration::from_millis(250));
        assert!(
            sim.now - crashed_at < Duration::from_secs(60),
            "seed {seed}: crash not detected by all in 60 s"
        );
    }
    println!(
        "seed {seed}: crash declared dead by all 199 after {:?} (virtual)",
        sim.now - crashed_at
    );
}

#[test]
fn health_follows_the_share_of_dead_members() {
    let census = |total, dead| Census {
        total,
        online: total - dead,
        suspect: 0,
        dead,
    };
    assert_eq!(census(5, 0).health(), Health::Healthy);
    assert_eq!(census(5, 2).health(), Health::Degraded);
    assert_eq!(census(5, 3).health(), Health::Critical);
    assert_eq!(census(4, 2).health(), Health::Critical, "50% is critical");
}

#[test]
fn garbage_datagrams_are_counted_not_fatal() {
    let now = Instant::now();
    let mut m = Membership::new(1, 1, &MembershipConfig::default(), 7, meta(1), now);
    for junk in [&b""[..], b"\xff\xff\xff", &[0u8; 2000]] {
        m.handle_data(now, 9, junk);
    }
    assert!(m.errors() >= 2);
    m.check_invariants();
    assert_eq!(m.census().total, 1);
}

#[test]
fn three_of_five_crashing_at_once_are_all_declared_dead_by_the_two_left() {
    let mut sim = Sim::new(5, 0.0, MembershipConfig::default());
    sim.bootstrap(5);
    sim.run_for(Duration::from_secs(3));
    for node in [2, 3, 5] {
        sim.crash(node);
    }
    let crashed_at = sim.now;
    while ![2, 3, 5]
        .iter()
        .all(|n| sim.everyone_sees(*n, MemberState::Dead))
    {
        sim.run_for(Duration::from_millis(100));
        if sim.now - crashed_at > Duration::from_secs(30) {
            let views: Vec<_> = sim.nodes[&1].members().map(|m| (m.node, m.state)).collect();
            panic!(
                "not detected; node 1 sees {views:?}, errors {}",
                sim.nodes[&1].errors()
            );
        }
    }
    assert!(
        sim.nodes
            .values()
            .all(|m| m.census().health() == Health::Critical)
    );
}

#[test]
fn an_eviction_reaches_every_member_and_the_evicted_node_is_kept_out() {
    let mut sim = Sim::new(6, 0.05, MembershipConfig::default());
    sim.bootstrap(12);
    sign_everything(&mut sim);
    let now = sim.now;
    // A forged eviction of 2 (unsigned, and one signed by 4 in 3's name) spreads nowhere.
    let forged = Notice::new(2, 1, NoticeKind::Evicted).signed(3, &keys(4), &[]);
    sim.nodes.get_mut(&4).unwrap().publish_notice(now, forged);
    sim.nodes
        .get_mut(&4)
        .unwrap()
        .publish_notice(now, Notice::new(2, 2, NoticeKind::Evicted));
    // Nobody may say another node left.
    let left = Notice::new(5, 1, NoticeKind::Left).signed(4, &keys(4), &[]);
    sim.nodes.get_mut(&4).unwrap().publish_notice(now, left);
    sim.settle(4);
    sim.run_for(Duration::from_secs(5));
    for (id, node) in &sim.nodes {
        assert!(!node.is_evicted(2), "node {id} took a forged eviction");
        assert!(
            node.member(5).is_some(),
            "node {id} took a forged departure of 5"
        );
    }
    // They died where they were made: node 4's own handler refused all three.
    assert_eq!(sim.nodes[&4].forged_notices(), 3);
    let now = sim.now;
    sim.nodes.get_mut(&3).unwrap().publish_notice(
        now,
        Notice::new(9, 1, NoticeKind::Evicted).signed(3, &keys(3), &[]),
    );
    sim.settle(3);
    let start = sim.now;
    while !sim
        .nodes
        .iter()
        .filter(|(id, _)| **id != 9)
        .all(|(_, m)| m.is_evicted(9) && m.member(9).is_none())
    {
        sim.run_for(Duration::from_millis(100));
        assert!(
            sim.now - start < Duration::from_secs(20),
            "eviction did not spread"
        );
    }
    println!(
        "eviction known to all 11 members after {:?}",
        sim.now - start
    );
    // The evicted node keeps gossiping; nobody lets it back in.
    sim.run_for(Duration::from_secs(10));
    assert!(
        sim.nodes
            .iter()
            .filter(|(id, _)| **id != 9)
            .all(|(_, m)| m.member(9).is_none())
    );
}

#[test]
fn an_admission_outranks_a_departure_notice_still_spreading_whichever_arrives_first() {
    let mut sim = Sim::new(6, 0.05, MembershipConfig::default());
    sim.bootstrap(13);
    sign_everything(&mut sim);
    let now = sim.now;
    // 5 left (its own notice, seq 100) and was admitted again by 3 (seq 200); 2 holds the
    // departure, 3 the admission, and each spreads its news at once.
    let left = Notice::new(5, 100, NoticeKind::Left).signed(5, &keys(5), &[]);
    sim.nodes
        .get_mut(&2)
        .unwrap()
        .publish_notice(now, left.clone());
    let admitted = Notice::new(5, 200, NoticeKind::Admitted).signed(3, &keys(3), &[]);
    sim.nodes.get_mut(&3).unwrap().publish_notice(now, admitted);
    assert!(sim.nodes[&2].removed().any(|n| n == 5));
    sim.settle(2);
    sim.settle(3);
    sim.run_for(Duration::from_secs(10));
    for (id, node) in &sim.nodes {
        assert!(
            !node.removed().any(|n| n == 5),
            "node {id} still counts 5 as gone"
        );
        assert_eq!(node.notice_seq(5), Some(200), "node {id}");
    }
    // The departure arriving again, late, changes nothing.
    let now = sim.now;
    sim.nodes.get_mut(&4).unwrap().publish_notice(now, left);
    sim.run_for(Duration::from_secs(5));
    assert!(sim.nodes.values().all(|m| !m.removed().any(|n| n == 5)));
}

/// Drains a membership's output, returning its datagrams.
fn datagrams(m: &mut Membership) -> Vec<(u64, Bytes)> {
    while m.poll_event().is_some() {}
    std::iter::from_fn(|| m.poll_transmit()).collect()
}

#[test]
fn a_flood_of_invented_members_stops_at_the_bound_and_never_pushes_out_own_or_neighbours() {
    let now = Instant::now();
    let config = MembershipConfig::default();
    let mut m = Membership::new(1, 1, &config, 7, meta(1), now);
    let mut neighbour = Membership::new(2, 1, &config, 8, meta(2), now);
    m.handle_link_up(now, 2);
    neighbour.handle_link_up(now, 1);
    for (_, data) in datagrams(&mut neighbour) {
        m.handle_data(now, 2, &data);
    }
    datagrams(&mut m);
    assert_eq!(m.member(2).map(|v| v.state), Some(MemberState::Alive));
    // Ids nobody runs announce themselves: each costs node 1 a member row.
    let flood = MAX_MEMBERS as u64 + 500;
    for id in 10_000..10_000 + flood {
        let mut rogue = Membership::new(id, 1, &config, id, meta(id), now);
        rogue.handle_link_up(now, 1);
        for (_, data) in datagrams(&mut rogue) {
            m.handle_data(now, id, &data);
        }
        datagrams(&mut m);
    }
    m.check_invariants();
    assert_eq!(m.census().total, MAX_MEMBERS);
    assert!(m.member(1).is_some() && m.member(2).is_some());
    let (refused, _, _) = m.refusals();
    assert!(refused >= 500, "{refused}");
    // A new direct neighbour still gets in, in place of an invented member.
    let mut late = Membership::new(3, 1, &config, 9, meta(3), now);
    m.handle_link_up(now, 3);
    late.handle_link_up(now, 1);
    for (_, data) in datagrams(&mut late) {
        m.handle_data(now, 3, &data);
    }
    assert!(m.member(3).is_some(), "a neighbour is never refused");
    assert!(m.member(2).is_some());
    assert_eq!(m.census().total, MAX_MEMBERS);
    m.check_invariants();
}

#[test]
fn a_flood_of_invented_notices_is_capped_and_aged_out_and_real_news_still_applies() {
    let mut sim = Sim::new(8, 0.0, MembershipConfig::default());
    sim.bootstrap(3);
    // Nodes 2 and 3 spread evictions of ids nobody ever saw, more than either may keep.
    let flood = MAX_NOTICES as u64 * 3 / 4;
    for i in 0..flood {
        for source in [2, 3] {
            let now = sim.now;
            let notice = Notice::new(source * 1_000_000 + i, 1, NoticeKind::Evicted);
            sim.nodes
                .get_mut(&source)
                .unwrap()
                .publish_notice(now, notice);
            sim.settle(source);
        }
        sim.run_for(Duration::from_millis(2));
    }
    sim.run_for(Duration::from_secs(5));
    let one = &sim.nodes[&1];
    one.check_invariants();
    assert!(one.meta.borrow().notices.len() <= MAX_NOTICES);
    assert!(one.evicted().count() <= MAX_NOTICES);
    let (_, _, refused) = one.refusals();
    assert!(refused > 0, "the bound was reached");
    // News about a real member is never refused.
    let now = sim.now;
    let real = Notice::new(3, 2, NoticeKind::Evicted);
    sim.nodes.get_mut(&2).unwrap().publish_notice(now, real);
    sim.settle(2);
    let start = sim.now;
    while !sim.nodes[&1].is_evicted(3) {
        sim.run_for(Duration::from_millis(100));
        assert!(
            sim.now - start < Duration::from_secs(10),
            "eviction of 3 lost"
        );
    }
    assert!(sim.nodes[&1].member(3).is_none());
    // Notices age out; the decisions they carried stay.
    // Once no member passes the flood on any more (a notice forgotten at the bound may come
    // round again until then), every notice ages out.
    let start = sim.now;
    while sim
        .nodes
        .values()
        .any(|m| m.foca.custom_broadcast_backlog() > 0)
    {
        sim.run_for(Duration::from_secs(1));
        assert!(
            sim.now - start < Duration::from_secs(1800),
            "gossip never settles"
        );
    }
    sim.run_for(NOTICE_TTL + Duration::from_secs(5));
    assert!(sim.nodes[&1].meta.borrow().notices.is_empty());
    assert!(sim.nodes[&1].is_evicted(3));
}

#[test]
fn a_member_declared_down_while_alive_renews_its_generation_and_reports_it() {
    let mut sim = Sim::new(9, 0.0, MembershipConfig::default());
    sim.bootstrap(4);
    // Freeze node 4: it hears nothing and says nothing until the others declare it dead.
    let frozen = sim.nodes.remove(&4).unwrap();
    let frozen_at = sim.now;
    while !sim.everyone_sees(4, MemberState::Dead) {
        sim.run_for(Duration::from_millis(100));
        assert!(
            sim.now - frozen_at < Duration::from_secs(30),
            "not declared dead"
        );
    }
    assert_eq!(frozen.local().generation, 1);
    sim.nodes.insert(4, frozen);
    sim.settle(4);
    let thawed_at = sim.now;
    while sim.nodes[&4].local().generation == 1 || !sim.everyone_sees(4, MemberState::Alive) {
        sim.run_for(Duration::from_millis(100));
        assert!(sim.now - thawed_at < Duration::from_secs(60), "no renewal");
    }
    let renewed = sim.nodes[&4].local().generation;
    assert!(renewed > 1);
    assert_eq!(sim.nodes[&4].member(4).map(|v| v.generation), Some(renewed));
    assert!(
        sim.nodes
            .iter()
            .filter(|(id, _)| **id != 4)
            .all(|(_, m)| m.member(4).is_some_and(|v| v.generation == renewed))
    );
}

/// Gives every simulated node the certified keys of all (node i holds key [i; 32]), so notices
/// are checked as on a real node.
fn sign_everything(sim: &mut Sim) {
    let public: HashMap<u64, [u8; 32]> = sim
        .nodes
        .keys()
        .map(|id| (*id, keys(*id).verifying_key().to_bytes()))
        .collect();
    let public = Arc::new(public);
    for node in sim.nodes.values_mut() {
        node.set_keys(Arc::clone(&public));
    }
}

/// The identity key of simulated node `id`.
fn keys(id: u64) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[id as u8; 32])
}
