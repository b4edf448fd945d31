//! Ring hop cost between threads: pipelined throughput (ns per item crossing one ring) and
//! ping-pong latency (one round trip through two rings, including the consumer's wake-up).

use std::{
    hint::black_box,
    thread,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_lite::future::block_on;
use meshd_shards::ring::ring;

fn rings(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pop_same_thread", |b| {
        let (tx, rx) = ring::<u64>(4096);
        b.iter(|| {
            tx.try_push(black_box(1)).unwrap();
            rx.try_pop().unwrap()
        });
    });
    group.bench_function("hop_across_threads_pipelined", |b| {
        b.iter_custom(|iters| {
            let (tx, rx) = ring::<u64>(4096);
            let consumer = thread::spawn(move || {
                block_on(async {
                    let mut n = 0u64;
                    while rx.pop().await.is_some() {
                        n += 1;
                    }
                    n
                })
            });
            let start = Instant::now();
            block_on(async {
                for i in 0..iters {
                    tx.push(i).await.unwrap();
                }
            });
            drop(tx);
            let received = consumer.join().unwrap();
            assert_eq!(received, iters);
            start.elapsed()
        });
    });
    group.bench_function("round_trip_two_rings", |b| {
        b.iter_custom(|iters| {
            let (to_tx, to_rx) = ring::<u64>(16);
            let (back_tx, back_rx) = ring::<u64>(16);
            let echo = thread::spawn(move || {
                block_on(async {
                    while let Some(v) = to_rx.pop().await {
                        back_tx.push(v).await.unwrap();
                    }
                });
            });
            let start = Instant::now();
            block_on(async {
                for i in 0..iters {
                    to_tx.push(i).await.unwrap();
                    back_rx.pop().await.unwrap();
                }
            });
            let elapsed = start.elapsed();
            drop(to_tx);
            echo.join().unwrap();
            elapsed
        });
    });
    // The queue alone, both sides spinning (no wake-ups): what a ring item costs in the
    // structure meshd uses (crossbeam's bounded MPMC `ArrayQueue`) against the design card's
    // alternative, rtrb's single-producer single-consumer ring.
    group.bench_function("queue_only_array_queue_pipelined", |b| {
        b.iter_custom(|iters| {
            let queue = std::sync::Arc::new(crossbeam_queue::ArrayQueue::<u64>::new(4096));
            let rx = std::sync::Arc::clone(&queue);
            let consumer = thread::spawn(move || {
                let mut n = 0;
                while n < iters {
                    if rx.pop().is_some() {
                        n += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
            let start = Instant::now();
            for i in 0..iters {
                let mut item = i;
                while let Err(back) = queue.push(item) {
                    item = back;
                    std::hint::spin_loop();
                }
            }
            consumer.join().unwrap();
            start.elapsed()
        });
    });
    group.bench_function("queue_only_rtrb_pipelined", |b| {
        b.iter_custom(|iters| {
            let (mut tx, mut rx) = rtrb::RingBuffer::<u64>::new(4096);
            let consumer = thread::spawn(move || {
                let mut n = 0;
                while n < iters {
                    if rx.pop().is_ok() {
                        n += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
            let start = Instant::now();
            for i in 0..iters {
                while tx.push(i).is_err() {
                    std::hint::spin_loop();
                }
            }
            consumer.join().unwrap();
            start.elapsed()
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = rings
}
criterion_main!(benches);
