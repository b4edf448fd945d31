//! `loadgen saturate`: the liveness of a mesh whose data path is saturated (issue 23's scenario).
//!
//! Three nodes A, B, C, fully linked, one control group. On B a subscriber reads one message
//! every `--slow-ms` (a busy `core`; 0 is a fast one). After an idle baseline, A floods B with
//! fire-and-forget messages of `--size` bytes from `--in-flight` concurrent senders for
//! `--duration` seconds. Throughout, C (which sends no data) writes to the control group at
//! `--writes` per second, and every node's membership view and links are polled every 100 ms.
//! Each phase reports: members seen SUSPECT or DEAD (and whether C was among them), link RTT
//! p99 as `GetSessions` reports it (the smoothed heartbeat round trip), links re-made, control
//! group commit latency and refused writes; the flood reports its sends by answer and, after B's
//! subscriber has drained at full speed, how many accepted sends never arrived.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use meshd_proto::mesh::{MessageStatus, SendMode};
use meshd_tests::{Cluster, NodeSpec};
use tokio_stream::StreamExt;

/// Flags of `loadgen saturate`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SaturateArgs {
    /// Milliseconds B's subscriber waits between two messages (0: a fast subscriber).
    #[arg(long, default_value_t = 20)]
    pub(crate) slow_ms: u64,
    /// Payload bytes of A's messages to B.
    #[arg(long, default_value_t = 65536)]
    pub(crate) size: usize,
    /// A's concurrent senders.
    #[arg(long, default_value_t = 16)]
    pub(crate) in_flight: usize,
    /// Seconds of the idle baseline.
    #[arg(long, default_value_t = 3)]
    pub(crate) idle: u64,
    /// Seconds of the flood.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Control-group writes per second from C, in both phases.
    #[arg(long, default_value_t = 20)]
    pub(crate) writes: u64,
}

/// What one phase (idle, flood) showed.
#[derive(Debug)]
pub(crate) struct Phase {
    pub(crate) name: &'static str,
    /// (observer, member) pairs seen SUSPECT.
    pub(crate) suspected: BTreeSet<(u64, u64)>,
    /// (observer, member) pairs seen DEAD.
    pub(crate) dead: BTreeSet<(u64, u64)>,
    /// Smoothed RTT samples per (observer, peer), µs.
    rtt: BTreeMap<(u64, u64), Histogram<u64>>,
    /// Links that went away or came back with another remote address, per (observer, peer).
    pub(crate) remade: BTreeSet<(u64, u64)>,
    /// Status polls a node did not answer within a second.
    pub(crate) unanswered_polls: u64,
    commit: Histogram<u64>,
    pub(crate) writes_ok: u64,
    /// Refused writes by gRPC code.
    pub(crate) writes_refused: BTreeMap<String, u64>,
}

impl Phase {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            suspected: BTreeSet::new(),
            dead: BTreeSet::new(),
            rtt: BTreeMap::new(),
            remade: BTreeSet::new(),
            unanswered_polls: 0,
            commit: Histogram::new(3).expect("3 significant digits"),
            writes_ok: 0,
            writes_refused: BTreeMap::new(),
        }
    }

    /// The largest per-link RTT p99, µs, and the link it belongs to.
    pub(crate) fn worst_rtt_p99(&self) -> (u64, Option<(u64, u64)>) {
        self.rtt
            .iter()
            .map(|(link, h)| (h.value_at_quantile(0.99), Some(*link)))
            .max()
            .unwrap_or((0, None))
    }

    /// Commit latency p50 and p99, µs.
    pub(crate) fn commit_us(&self) -> (u64, u64) {
        (
            self.commit.value_at_quantile(0.5),
            self.commit.value_at_quantile(0.99),
        )
    }
}

/// What the flood did.
#[derive(Debug, Default)]
pub(crate) struct Flood {
    /// Sends answered by status name.
    pub(crate) answers: BTreeMap<String, u64>,
    /// Sends the call itself refused, by gRPC code.
    pub(crate) refused: BTreeMap<String, u64>,
    /// Accepted (QUEUED, DELIVERED) sends.
    pub(crate) accepted: u64,
    /// Distinct messages B's subscriber received.
    pub(crate) delivered: u64,
}

/// The whole run.
pub(crate) struct SaturateReport {
    pub(crate) phases: Vec<Phase>,
    pub(crate) flood: Flood,
}

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;
const POLL: Duration = Duration::from_millis(100);

/// Polls every node's members and links into `phase` until `stop`.
async fn watch(cluster: Arc<Cluster>, phase: Arc<Mutex<Phase>>, stop: Arc<AtomicBool>) {
    let mut links: BTreeMap<(u64, u64), String> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        for node in &cluster.nodes {
            let me = node.spec.node_id;
            let status =
                tokio::time::timeout(Duration::from_secs(1), meshd_tests::mesh_status(node)).await;
            let sessions = tokio::time::timeout(Duration::from_secs(1), node.sessions()).await;
            let mut phase = phase
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match status {
                Ok(Ok(status)) => {
                    for member in &status.members {
                        use meshd_proto::link::MemberState;
                        match member.state() {
                            MemberState::Suspect => {
                                phase.suspected.insert((me, member.node_id));
                            }
                            MemberState::Dead => {
                                phase.dead.insert((me, member.node_id));
                            }
                            _ => {}
                        }
                    }
                }
                _ => phase.unanswered_polls += 1,
            }
            match sessions {
                Ok(Ok(sessions)) => {
                    let mut seen = BTreeSet::new();
                    for s in sessions {
                        let link = (me, s.peer_node_id);
                        seen.insert(link);
                        if s.rtt_microseconds > 0 {
                            let _ = phase
                                .rtt
                                .entry(link)
                                .or_insert_with(|| Histogram::new(3).expect("3 digits"))
                                .record(s.rtt_microseconds);
                        }
                        if let Some(before) = links.insert(link, s.remote_addr.clone())
                            && before != s.remote_addr
                        {
                            phase.remade.insert(link);
                        }
                    }
                    for link in links.keys().filter(|l| l.0 == me) {
                        if !seen.contains(link) {
                            phase.remade.insert(*link);
                        }
                    }
                }
                _ => phase.unanswered_polls += 1,
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Writes to the control group through C at `per_second` until `stop`.
async fn write(
    cluster: Arc<Cluster>,
    phase: Arc<Mutex<Phase>>,
    stop: Arc<AtomicBool>,
    per_second: u64,
) -> anyhow::Result<()> {
    let mut client = cluster.node(2).mesh().await?;
    let gap = Duration::from_micros(1_000_000 / per_second.max(1));
    let mut key = 1_000_000u64;
    while !stop.load(Ordering::Relaxed) {
        key += 1;
        let started = Instant::now();
        let answer = client
            .send_internal_db_update(crate::consensus::update(key, 64))
            .await;
        let took = started.elapsed();
        {
            let mut phase = phase
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match answer {
                Ok(_) => {
                    phase.writes_ok += 1;
                    let _ = phase.commit.record(took.as_micros() as u64);
                }
                Err(status) => {
                    *phase
                        .writes_refused
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                }
            }
        }
        tokio::time::sleep(gap.saturating_sub(took)).await;
    }
    Ok(())
}

/// Runs the scenario on a fresh local mesh.
pub(crate) async fn run(args: &SaturateArgs) -> anyhow::Result<SaturateReport> {
    let specs = vec![
        NodeSpec {
            extra: "[consensus]\nbootstrap = true\n".into(),
            ..NodeSpec::listener(A)
        },
        NodeSpec::listener(B).dialing(vec![0]),
        NodeSpec::listener(C).dialing(vec![0, 1]),
    ];
    let cluster = Arc::new(Cluster::start(specs)?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ready = true;
        for node in &cluster.nodes {
            let state = node.consensus().await?;
            ready &= state.voters.len() == 3 && state.can_accept_writes;
        }
        if ready {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the control group did not form in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "3 nodes fully linked, one control group; B's subscriber reads {}; A floods B with {} B \
         fire-and-forget messages from {} senders for {} s after a {} s idle baseline; C writes \
         {} control-group updates/s throughout",
        if args.slow_ms == 0 {
            "as fast as it can".to_owned()
        } else {
            format!("one message every {} ms", args.slow_ms)
        },
        args.size,
        args.in_flight,
        args.duration,
        args.idle,
        args.writes
    );

    // B's subscriber: slow until the drain, counting distinct messages by corr_id.
    let slow = Arc::new(AtomicBool::new(args.slow_ms > 0));
    let received = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let mut inbox = cluster.node(1).inbox().await?;
    let subscriber = {
        let slow = Arc::clone(&slow);
        let received = Arc::clone(&received);
        let pause = Duration::from_millis(args.slow_ms);
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbox.next().await {
                received
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(message.corr_id);
                if slow.load(Ordering::Relaxed) {
                    tokio::time::sleep(pause).await;
                }
            }
        })
    };

    let mut phases = Vec::new();
    let mut flood = Flood::default();
    for name in ["idle", "flood"] {
        let phase = Arc::new(Mutex::new(Phase::new(name)));
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch(
            Arc::clone(&cluster),
            Arc::clone(&phase),
            Arc::clone(&stop),
        ));
        let writer = tokio::spawn(write(
            Arc::clone(&cluster),
            Arc::clone(&phase),
            Arc::clone(&stop),
            args.writes,
        ));
        if name == "idle" {
            tokio::time::sleep(Duration::from_secs(args.idle)).await;
        } else {
            flood = send_flood(&cluster, args).await?;
        }
        stop.store(true, Ordering::Relaxed);
        watcher.await?;
        writer.await??;
        phases.push(
            Arc::try_unwrap(phase)
                .map_err(|_| anyhow::anyhow!("phase still shared"))?
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    // Drain: the subscriber reads at full speed until nothing more arrives for 3 s.
    slow.store(false, Ordering::Relaxed);
    let mut last = 0;
    let mut quiet_since = Instant::now();
    let drain_limit = Instant::now() + Duration::from_secs(120);
    while Instant::now() < drain_limit && quiet_since.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    flood.delivered = last as u64;
    subscriber.abort();
    Ok(SaturateReport { phases, flood })
}

/// A's senders, for `args.duration`.
async fn send_flood(cluster: &Cluster, args: &SaturateArgs) -> anyhow::Result<Flood> {
    let client = cluster.node(0).data().await?;
    let next = Arc::new(AtomicU64::new(1));
    let end = Instant::now() + Duration::from_secs(args.duration);
    let mut senders = Vec::new();
    for _ in 0..args.in_flight.max(1) {
        let mut client = client.clone();
        let next = Arc::clone(&next);
        let size = args.size;
        senders.push(tokio::spawn(async move {
            let mut flood = Flood::default();
            while Instant::now() < end {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let request =
                    crate::request(B, seq, vec![0x5a; size], SendMode::FireAndForget, false);
                match client.send(request).await {
                    Ok(answer) => {
                        let status = answer.into_inner().status();
                        if matches!(status, MessageStatus::Queued | MessageStatus::Delivered) {
                            flood.accepted += 1;
                        }
                        *flood
                            .answers
                            .entry(status.as_str_name().to_owned())
                            .or_default() += 1;
                    }
                    Err(refused) => {
                        *flood
                            .refused
                            .entry(format!("{:?}", refused.code()))
                            .or_default() += 1;
                    }
                }
            }
            flood
        }));
    }
    let mut total = Flood::default();
    for sender in senders {
        let flood = sender.await?;
        total.accepted += flood.accepted;
        for (k, v) in flood.answers {
            *total.answers.entry(k).or_default() += v;
        }
        for (k, v) in flood.refused {
            *total.refused.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

fn pairs(set: &BTreeSet<(u64, u64)>) -> String {
    if set.is_empty() {
        return "none".into();
    }
    set.iter()
        .map(|(observer, member)| format!("{}→{}", name(*observer), name(*member)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn name(id: u64) -> &'static str {
    match id {
        A => "A",
        B => "B",
        C => "C",
        _ => "?",
    }
}

/// The table's head.
pub(crate) const HEAD: &str = "| subscriber | phase | seen SUSPECT (observer→member) | seen DEAD | C touched | links re-made | worst link RTT p99 | commit p50 / p99 | writes ok / refused | polls unanswered | flood: accepted / delivered / lost |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |";

/// One table row per phase.
pub(crate) fn rows(args: &SaturateArgs, report: &SaturateReport) -> Vec<String> {
    let subscriber = if args.slow_ms == 0 {
        "fast".to_owned()
    } else {
        format!("1 per {} ms", args.slow_ms)
    };
    let f = &report.flood;
    let mut rows = Vec::new();
    for phase in &report.phases {
        let (rtt, link) = phase.worst_rtt_p99();
        let (p50, p99) = phase.commit_us();
        let c_touched = phase
            .suspected
            .iter()
            .chain(&phase.dead)
            .any(|&(_, member)| member == C)
            || phase.remade.iter().any(|&(a, b)| a == C || b == C);
        let refused: u64 = phase.writes_refused.values().sum();
        let flood = if phase.name == "flood" {
            format!(
                "{} / {} / {}",
                f.accepted,
                f.delivered,
                f.accepted.saturating_sub(f.delivered)
            )
        } else {
            "-".into()
        };
        rows.push(format!(
            "| {subscriber} | {} | {} | {} | {} | {} | {:.1} ms ({}) | {:.1} / {:.1} ms | {} / {}{} | {} | {flood} |",
            phase.name,
            pairs(&phase.suspected),
            pairs(&phase.dead),
            if c_touched { "yes" } else { "no" },
            pairs(&phase.remade),
            rtt as f64 / 1000.0,
            link.map_or("-".into(), |(a, b)| format!("{}–{}", name(a), name(b))),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            phase.writes_ok,
            refused,
            if phase.writes_refused.is_empty() {
                String::new()
            } else {
                format!(" {:?}", phase.writes_refused)
            },
            phase.unanswered_polls
        ));
    }
    rows
}

/// Prints the report as a table and the flood's answers.
pub(crate) fn print(args: &SaturateArgs, report: &SaturateReport) {
    println!("\n{HEAD}");
    for row in rows(args, report) {
        println!("{row}");
    }
    let f = &report.flood;
    println!(
        "\nflood A → B: answers {:?}, refused calls {:?}; accepted {}, delivered {}, lost {} (accepted and never delivered)",
        f.answers,
        f.refused,
        f.accepted,
        f.delivered,
        f.accepted.saturating_sub(f.delivered)
    );
}
