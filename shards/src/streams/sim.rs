//! Whole-protocol simulation: one source, three targets, a lossy network and crashes, in
//! virtual time with a seeded generator. Checks that every target's subscriber records each
//! message exactly once, in order, and that every message the producer saw acknowledged
//! arrives even when the source crashed after acknowledging it.

use std::collections::{BTreeMap, VecDeque};

use super::{
    Completion, Report, Seq,
    source::{AckPolicy, Publish, Source, SourceConfig},
    target::{Arrival, Inbox, InboxConfig},
};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Clone, Debug)]
enum Msg {
    Open,
    Data(Seq, u64),
    Report(Report),
}

const SOURCE: u64 = 1;
const TARGETS: [u64; 3] = [2, 3, 4];

/// What survives a crash of a target: its inbox and offsets (its redb).
#[derive(Default)]
struct TargetDisk {
    inbox: BTreeMap<Seq, u64>,
    received: Seq,
    processed: Seq,
    /// The subscriber's record of what it processed, written with the offset.
    log: Vec<u64>,
}

struct TargetNode {
    disk: TargetDisk,
    inbox: Option<Inbox<u64>>,
}

struct Faults {
    loss: u64,
    dup: u64,
    crash: u64,
}

fn run(seed: u64, completion: Completion, ack: AckPolicy, faults: &Faults) {
    let total: Seq = 300;
    let mut rng = Rng(seed | 1);
    let config = SourceConfig {
        max_outstanding: 64,
        ..SourceConfig::default()
    };
    let inbox_config = InboxConfig {
        max_backlog: 32,
        max_held: 8,
        keepalive_ms: 200,
    };
    // Source disk: outbox (seq -> payload), last, released.
    let mut outbox: BTreeMap<Seq, u64> = BTreeMap::new();
    let mut disk_last: Seq = 0;
    let mut disk_released: Seq = 0;
    let mut source = Some(Source::new(&TARGETS, completion, ack, config));
    let mut targets: Vec<TargetNode> = TARGETS
        .iter()
        .map(|_| TargetNode {
            disk: TargetDisk::default(),
            inbox: Some(Inbox::restore(inbox_config, 0, 0)),
        })
        .collect();
    let mut net: VecDeque<(u64, u64, u64, Msg)> = VecDeque::new();
    let mut producer_acked: Seq = 0;
    let mut now = 0u64;
    let payload_of = |seq: Seq| seq.wrapping_mul(0x9E37_79B9) ^ 0xABCD;
    let mut crashes = 0;

    for _round in 0..200_000 {
        now += 1;
        // Crashes: a down node loses its memory, and comes back a little later.
        if rng.chance(1) && rng.next() % 1000 < faults.crash {
            crashes += 1;
            if source.is_some() && rng.chance(25) {
                source = None;
            } else {
                let t = (rng.next() % 3) as usize;
                targets[t].inbox = None;
            }
        }
        if source.is_none() && rng.chance(5) {
            source = Some(Source::restore(
                &TARGETS,
                completion,
                ack,
                config,
                disk_last,
                disk_released,
                false,
            ));
        }
        for t in &mut targets {
            if t.inbox.is_none() && rng.chance(5) {
                let mut inbox = Inbox::restore(inbox_config, t.disk.received, t.disk.processed);
                inbox.subscribe(4);
                t.inbox = Some(inbox);
            }
        }

        // The producer publishes in order, claiming seqs; after a source crash it retries
        // from its first unacknowledged message.
        if let Some(s) = source.as_mut() {
            let next = (s.last() + 1).min(producer_acked + 1 + 16);
            for seq in (producer_acked + 1)..=next.min(total) {
                match s.publish(Some(seq)) {
                    Ok(Publish::New(seq)) => {
                        outbox.insert(seq, payload_of(seq));
                        disk_last = seq;
                    }
                    Ok(Publish::Duplicate(_)) | Err(_) => {}
                }
            }
            s.on_durable(disk_last);
            producer_acked = producer_acked.max(s.acked());
        }

        // The network: one step delivers a few messages, with loss, duplication, reordering.
        for _ in 0..8 {
            let Some((at, from, to, msg)) = net.pop_front() else {
                break;
            };
            if at > now {
                net.push_front((at, from, to, msg));
                break;
            }
            if rng.chance(faults.loss) {
                continue;
            }
            if rng.chance(faults.dup) {
                net.push_back((now + 1 + rng.next() % 5, from, to, msg.clone()));
            }
            if to == SOURCE {
                if let (Some(s), Msg::Report(r)) = (source.as_mut(), &msg) {
                    s.on_report(from, *r, now)
                        .expect("targets report the truth");
                }
                continue;
            }
            let t = &mut targets[(to - 2) as usize];
            let Some(inbox) = t.inbox.as_mut() else {
                continue;
            };
            match msg {
                Msg::Open => {}
                Msg::Data(seq, payload) => {
                    assert_eq!(payload, payload_of(seq), "payload of {seq}");
                    if let Arrival::Store(batch) = inbox.on_data(seq, payload) {
                        let last = batch.last().expect("non-empty").0;
                        for (seq, p) in batch {
                            t.disk.inbox.insert(seq, p);
                        }
                        t.disk.received = last;
                        inbox.on_stored(last);
                    }
                }
                Msg::Report(_) => unreachable!("targets get no reports"),
            }
        }
        // Targets deliver to their subscribers, which process and acknowledge each message
        // with the record of it in the same transaction.
        for (i, t) in targets.iter_mut().enumerate() {
            let Some(inbox) = t.inbox.as_mut() else {
                continue;
            };
            if !inbox.is_subscribed() {
                inbox.subscribe(4);
            }
            while let Some(seq) = inbox.poll_deliver() {
                let payload = t.disk.inbox[&seq];
                if rng.chance(30) {
                    inbox.undeliver(seq);
                    break;
                }
                if let Some(seq) = inbox.on_subscriber_ack(seq).expect("delivered") {
                    t.disk.log.push(payload);
                    t.disk.processed = seq;
                    t.disk.inbox.remove(&seq);
                    inbox.on_processed(seq);
                }
            }
            inbox.check_invariants();
            if let Some(report) = inbox.poll_report(now) {
                net.push_back((
                    now + 1 + rng.next() % 3,
                    TARGETS[i],
                    SOURCE,
                    Msg::Report(report),
                ));
            }
        }
        // The source opens, retransmits and sends within credit, then releases.
        if let Some(s) = source.as_mut() {
            s.handle_timeout(now);
            while let Some(to) = s.poll_open(now) {
                net.push_back((now + 1, SOURCE, to, Msg::Open));
            }
            while let Some((to, seq)) = s.poll_transmit(now) {
                let delay = 1 + rng.next() % 4;
                net.push_back((now + delay, SOURCE, to, Msg::Data(seq, outbox[&seq])));
            }
            let release = s.releasable();
            if release > s.released() {
                outbox.retain(|&seq, _| seq > release);
                disk_released = release;
                s.on_released(release);
            }
            s.check_invariants();
            assert!(s.committed() <= s.acked().max(s.committed()));
        }
        // Keep the queue sorted by due time: reordering comes from the random delays.
        net.make_contiguous().sort_by_key(|(at, ..)| *at);

        if targets.iter().all(|t| t.disk.processed == total)
            && producer_acked == total
            && disk_released == total
        {
            break;
        }
    }
    for (i, t) in targets.iter().enumerate() {
        let expected: Vec<u64> = (1..=total).map(payload_of).collect();
        assert_eq!(
            t.disk.log, expected,
            "seed {seed}: target {} processed every message once, in order",
            TARGETS[i]
        );
        assert!(t.disk.inbox.is_empty());
    }
    assert_eq!(
        producer_acked, total,
        "seed {seed}: every message acknowledged"
    );
    assert_eq!(disk_released, total, "seed {seed}: the outbox emptied");
    assert!(outbox.is_empty());
    if faults.crash > 0 {
        assert!(crashes > 0, "seed {seed}: no crash happened");
    }
}

#[test]
fn every_target_processes_every_message_once_in_order_over_a_lossy_network() {
    for seed in 1..=20 {
        run(
            seed,
            Completion::All,
            AckPolicy::Targets,
            &Faults {
                loss: 10,
                dup: 5,
                crash: 0,
            },
        );
    }
}

#[test]
fn crashes_of_the_source_and_targets_lose_and_repeat_nothing() {
    for seed in 1..=20 {
        run(
            seed,
            Completion::Quorum(2),
            AckPolicy::Targets,
            &Faults {
                loss: 10,
                dup: 5,
                crash: 500,
            },
        );
        run(
            seed + 1000,
            Completion::All,
            AckPolicy::Source,
            &Faults {
                loss: 5,
                dup: 5,
                crash: 500,
            },
        );
    }
}
