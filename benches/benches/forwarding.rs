//! Cost of one forwarding decision on a shard: `Fib::next_hop` for a 200-destination table with
//! three weighted next hops each. One iteration is one frame, so criterion prints ns per frame.

use std::{
    collections::{HashMap, HashSet},
    hint::black_box,
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshd_shards::fib::{Fib, FibEntry, FibHop, Spread, flow_key};

fn table() -> Fib {
    let entries: HashMap<u64, FibEntry> = (1..=200u64)
        .map(|dst| {
            let hops = (0..3u64)
                .map(|i| FibHop {
                    peer: 1000 + (dst + i) % 7,
                    weight: [500, 300, 200][i as usize],
                })
                .collect();
            (
                dst,
                FibEntry {
                    hops,
                    backups: vec![2000 + dst % 5],
                    cost_milli: 1000,
                },
            )
        })
        .collect();
    Fib::new(1, entries, HashSet::new())
}

fn forwarding(c: &mut Criterion) {
    let fib = table();
    let mut group = c.benchmark_group("forwarding");
    group.throughput(Throughput::Elements(1));
    group.bench_function("next_hop_flow", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n = n.wrapping_add(1);
            let dst = 1 + n % 200;
            let key = flow_key(7, dst, u128::from(n & 0xff));
            black_box(fib.next_hop(black_box(dst), Spread::Flow(key), |_| false))
        });
    });
    group.bench_function("next_hop_round_robin", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(fib.next_hop(black_box(1 + n % 200), Spread::RoundRobin(n), |_| false))
        });
    });
    group.bench_function("next_hop_with_best_hop_down", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n = n.wrapping_add(1);
            let dst = 1 + n % 200;
            let down = 1000 + dst % 7;
            black_box(fib.next_hop(black_box(dst), Spread::RoundRobin(n), |p| p == down))
        });
    });
    group.finish();
}

criterion_group!(benches, forwarding);
criterion_main!(benches);
