//! Frame codec cost: one iteration is one frame, so the time criterion prints is ns per frame.
//! `origin/*`: the origin tag every routed frame gets at its source (seal) and its destination
//! (open), the cost of an unforgeable `src`; relays pay nothing.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshd_shards::{
    frame::{self, FrameReader, FrameType, Header, TrafficClass},
    origin::{PairKeys, pair_key},
};

const MAX: usize = 4 << 20;

fn header() -> Header {
    let mut header = Header::new(FrameType::Data, TrafficClass::Client, 1, 2);
    header.stream_id = 0xfeed;
    header.seq = 42;
    header
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in [0usize, 256, 4096, 65536] {
        let payload = vec![0xabu8; size];
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, payload| {
            let mut out = Vec::with_capacity(frame::HEADER_LEN + size);
            b.iter(|| {
                out.clear();
                frame::encode_into(&mut out, black_box(&header()), black_box(payload), MAX)
                    .unwrap();
            });
        });
        let mut encoded = Vec::new();
        frame::encode_into(&mut encoded, &header(), &payload, MAX).unwrap();
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            b.iter(|| frame::decode(black_box(encoded), MAX).unwrap());
        });
    }
    // A batch of 64 small frames in one WebSocket message, per frame.
    let mut batch = Vec::new();
    for _ in 0..64 {
        frame::encode_into(&mut batch, &header(), &[7u8; 256], MAX).unwrap();
    }
    group.throughput(Throughput::Elements(64));
    group.bench_function("decode_batch_64x256", |b| {
        b.iter(|| {
            FrameReader::new(black_box(&batch), MAX)
                .filter(Result::is_ok)
                .count()
        });
    });
    group.finish();
}

fn origin(c: &mut Criterion) {
    let local = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let peer = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
    let to_peer = pair_key(&local, 1, 2, &peer.verifying_key().to_bytes()).unwrap();
    let from_peer = pair_key(&peer, 2, 1, &local.verifying_key().to_bytes()).unwrap();
    let sender = PairKeys::new([(2, to_peer)].into_iter().collect());
    let receiver = PairKeys::new([(1, from_peer)].into_iter().collect());
    let mut group = c.benchmark_group("origin");
    for size in [256usize, 4096, 65536] {
        let body = vec![0xabu8; size];
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("seal", size), &body, |b, body| {
            let mut out = Vec::with_capacity(size + 16);
            b.iter(|| {
                out.clear();
                out.extend_from_slice(body);
                sender.seal_in_place(black_box(&header()), &mut out)
            });
        });
        let sealed = sender.seal(&header(), &body).unwrap();
        group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, sealed| {
            b.iter(|| {
                receiver
                    .open(black_box(&header()), black_box(sealed))
                    .unwrap()
                    .len()
            });
        });
    }
    group.bench_function("pair_key", |b| {
        b.iter(|| pair_key(&local, 1, 2, black_box(&peer.verifying_key().to_bytes())));
    });
    group.finish();
}

criterion_group!(benches, codec, origin);
criterion_main!(benches);
