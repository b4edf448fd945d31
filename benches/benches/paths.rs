//! Benchmarks on a seeded random 200-node mesh: every node originates about
//! three links (≈600 links, ≈1200 directed edges), connected by a random
//! spanning tree so that every pair is reachable.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use meshd::control::paths::{CostWeights, Topology, k_shortest_paths, routing_table};
use meshd::control::types::{Adjacency, LinkMetrics, Lsa};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};

const NODES: u64 = 200;
const LINKS: usize = 600;

fn random_metrics(rng: &mut StdRng) -> LinkMetrics {
    LinkMetrics {
        rtt_us: rng.gen_range(500..60_000),
        loss_ppm: rng.gen_range(0..20_000),
        utilisation_ppm: rng.gen_range(0..900_000),
        bandwidth_bps: [0, 10_000_000, 100_000_000, 1_000_000_000][rng.gen_range(0..4)],
    }
}

fn mesh(seed: u64) -> Vec<Lsa> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut adverts: BTreeMap<u64, BTreeMap<u64, LinkMetrics>> = BTreeMap::new();
    let mut links = 0;
    let mut link = |rng: &mut StdRng, a: u64, b: u64| {
        if a == b || adverts.get(&a).is_some_and(|l| l.contains_key(&b)) {
            return false;
        }
        let (ab, ba) = (random_metrics(rng), random_metrics(rng));
        adverts.entry(a).or_default().insert(b, ab);
        adverts.entry(b).or_default().insert(a, ba);
        true
    };
    for id in 2..=NODES {
        let parent = rng.gen_range(1..id);
        links += usize::from(link(&mut rng, id, parent));
    }
    while links < LINKS {
        let (a, b) = (rng.gen_range(1..=NODES), rng.gen_range(1..=NODES));
        links += usize::from(link(&mut rng, a, b));
    }
    adverts
        .into_iter()
        .map(|(origin, links)| Lsa {
            origin,
            seq: 1,
            adjacencies: links
                .into_iter()
                .map(|(neighbor, metrics)| Adjacency { neighbor, metrics })
                .collect(),
        })
        .collect()
}

fn hops_from(topology: &Topology, from: u64) -> BTreeMap<u64, usize> {
    let mut hops = BTreeMap::from([(from, 0)]);
    let mut queue = VecDeque::from([from]);
    while let Some(u) = queue.pop_front() {
        let next = hops[&u] + 1;
        for v in topology.neighbors(u) {
            if let std::collections::btree_map::Entry::Vacant(e) = hops.entry(v) {
                e.insert(next);
                queue.push_back(v);
            }
        }
    }
    hops
}

/// The first pair (by id) at the largest hop distance.
fn farthest_pair(topology: &Topology) -> (u64, u64, usize) {
    let mut best = (0, 0, 0);
    for from in topology.nodes() {
        for (to, hops) in hops_from(topology, from) {
            if hops > best.2 {
                best = (from, to, hops);
            }
        }
    }
    best
}

fn benches(c: &mut Criterion) {
    let lsas = mesh(0x6d65_7368);
    let topology = Topology::from_lsas(&lsas);
    let weights = CostWeights::default();
    let (from, to, hops) = farthest_pair(&topology);
    eprintln!(
        "mesh: {} nodes, {} directed edges; yen pair {from}→{to} at {hops} hops",
        topology.node_count(),
        topology.edge_count()
    );

    c.bench_function("yen_k3_200_nodes", |b| {
        b.iter(|| k_shortest_paths(black_box(&topology), &weights, from, to, 3))
    });
    c.bench_function("routing_table_k3_200_nodes", |b| {
        b.iter(|| routing_table(black_box(&topology), &weights, 1, 3))
    });
}

criterion_group!(yen, benches);
criterion_main!(yen);
