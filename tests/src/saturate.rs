//! The saturation scenario of issue 23, shared by its multi-process test
//! (`tests/tests/saturation.rs`, which asserts) and `loadgen saturate` (which prints).
//!
//! Three nodes A, B, C, fully linked, one control group. On B a subscriber reads one message
//! every `slow_ms` (a busy `core`; 0 is a fast one). After an idle baseline, A floods B with
//! fire-and-forget messages of `size` bytes from `in_flight` concurrent senders for
//! `duration` seconds. Throughout, C (which sends no data) writes to the control group at
//! `writes` per second, and every node's membership view and links are polled every 100 ms.
//! Each phase reports: members seen SUSPECT or DEAD (and whether C was among them), link RTT
//! p99 as `GetSessions` reports it (the smoothed heartbeat round trip of the link's control
//! lane when it has one), links re-made, control group commit latency and refused writes, and
//! the latency of internal DB updates A sends B (`qos_class = 2`, waiting for delivery to a
//! second subscriber on B, every 50 ms: the priority lane's traffic); the flood reports its sends by answer and, after B's subscriber has drained at full speed, how
//! many accepted sends never arrived and what A's tracker says of those.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use meshd_proto::{
    link::DbUpdate,
    mesh::{
        Header, MessageStatus, QueryMessageStatusRequest, SendMode, SendRequest, SubscribeRequest,
    },
};
use tokio_stream::StreamExt;

use crate::{Cluster, NodeSpec};

/// The scenario's knobs (`loadgen saturate`'s flags).
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Milliseconds B's subscriber waits between two messages (0: a fast subscriber).
    pub slow_ms: u64,
    /// Payload bytes of A's messages to B.
    pub size: usize,
    /// A's concurrent senders.
    pub in_flight: usize,
    /// Seconds of the idle baseline.
    pub idle: u64,
    /// Seconds of the flood.
    pub duration: u64,
    /// Control-group writes per second from C, in both phases.
    pub writes: u64,
    /// Every link collapsed (`network.lanes = "collapsed"`): no control lanes.
    pub collapsed: bool,
}

/// What one phase (idle, flood) showed.
#[derive(Debug)]
pub struct Phase {
    pub name: &'static str,
    /// (observer, member) pairs seen SUSPECT.
    pub suspected: BTreeSet<(u64, u64)>,
    /// (observer, member) pairs seen DEAD.
    pub dead: BTreeSet<(u64, u64)>,
    /// Smoothed RTT samples per (observer, peer), µs.
    rtt: BTreeMap<(u64, u64), Histogram<u64>>,
    /// Links that went away or came back with another remote address, per (observer, peer).
    pub remade: BTreeSet<(u64, u64)>,
    /// Status polls a node did not answer within a second.
    pub unanswered_polls: u64,
    commit: Histogram<u64>,
    pub writes_ok: u64,
    /// Refused writes by gRPC code.
    pub writes_refused: BTreeMap<String, u64>,
    /// A → B internal DB updates: delivery latency.
    db: Histogram<u64>,
    /// A → B internal DB updates not answered DELIVERED within their 5 s.
    pub db_failed: u64,
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
            db: Histogram::new(3).expect("3 significant digits"),
            db_failed: 0,
        }
    }

    /// The largest per-link RTT p99, µs, and the link it belongs to.
    pub fn worst_rtt_p99(&self) -> (u64, Option<(u64, u64)>) {
        self.rtt
            .iter()
            .map(|(link, h)| (h.value_at_quantile(0.99), Some(*link)))
            .max()
            .unwrap_or((0, None))
    }

    /// A → B DB updates delivered, and their latency p50 and p99, µs.
    pub fn db_us(&self) -> (u64, u64, u64) {
        (
            self.db.len(),
            self.db.value_at_quantile(0.5),
            self.db.value_at_quantile(0.99),
        )
    }

    /// Commit latency p50 and p99, µs.
    pub fn commit_us(&self) -> (u64, u64) {
        (
            self.commit.value_at_quantile(0.5),
            self.commit.value_at_quantile(0.99),
        )
    }
}

/// What the flood did.
#[derive(Debug, Default)]
pub struct Flood {
    /// A's message ids of the accepted sends.
    pub ids: Vec<u64>,
    /// Accepted sends not delivered, by their status at A in the end: `PENDING_CLIENT` is B
    /// saying it turned them away (a full subscriber queue), `PENDING_NODE` a relay (or A's
    /// own shard) saying it dropped them at a congested next hop; anything else was lost
    /// silently.
    pub undelivered: BTreeMap<String, u64>,
    /// Sends answered by status name.
    pub answers: BTreeMap<String, u64>,
    /// Sends the call itself refused, by gRPC code.
    pub refused: BTreeMap<String, u64>,
    /// Accepted (QUEUED, DELIVERED) sends.
    pub accepted: u64,
    /// Distinct messages B's subscriber received.
    pub delivered: u64,
}

impl Flood {
    /// Accepted sends not delivered whose status at A says so: turned away by B
    /// (`PENDING_CLIENT`) or dropped on the way (`PENDING_NODE`).
    pub fn reported_undelivered(&self) -> u64 {
        [
            "MESSAGE_STATUS_PENDING_CLIENT",
            "MESSAGE_STATUS_PENDING_NODE",
        ]
        .iter()
        .filter_map(|status| self.undelivered.get(*status))
        .sum()
    }

    /// Accepted sends neither delivered nor reported undelivered.
    pub fn lost_silently(&self) -> u64 {
        self.accepted
            .saturating_sub(self.delivered)
            .saturating_sub(self.reported_undelivered())
    }
}

/// The whole run.
pub struct SaturateReport {
    pub phases: Vec<Phase>,
    pub flood: Flood,
}

/// Node A.
pub const A: u64 = 1;
/// Node B.
pub const B: u64 = 2;
/// Node C.
pub const C: u64 = 3;
const POLL: Duration = Duration::from_millis(100);

/// Polls every node's members and links into `phase` until `stop`.
async fn watch(cluster: Arc<Cluster>, phase: Arc<Mutex<Phase>>, stop: Arc<AtomicBool>) {
    let mut links: BTreeMap<(u64, u64), String> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        for node in &cluster.nodes {
            let me = node.spec.node_id;
            let status =
                tokio::time::timeout(Duration::from_secs(1), crate::mesh_status(node)).await;
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
        let answer = client.send_internal_db_update(update(key, 64)).await;
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

/// Sends B an internal DB update from A every 50 ms, each waiting for its delivery, until
/// `stop`.
async fn db_updates(
    cluster: Arc<Cluster>,
    phase: Arc<Mutex<Phase>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut client = cluster.node(0).data().await?;
    let gap = Duration::from_millis(50);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let request = SendRequest {
            qos_class: 2,
            mode: SendMode::WaitForDelivery as i32,
            timeout_seconds: 5,
            ..request(B, 0, vec![0xdb; 256])
        };
        let answer = client.send(request).await;
        let took = started.elapsed();
        {
            let mut phase = phase
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match answer {
                Ok(answer) if answer.get_ref().status() == MessageStatus::Delivered => {
                    let _ = phase.db.record(took.as_micros() as u64);
                }
                _ => phase.db_failed += 1,
            }
        }
        tokio::time::sleep(gap.saturating_sub(took)).await;
    }
    Ok(())
}

/// Runs the scenario on a fresh local mesh.
pub async fn run(args: &Scenario) -> anyhow::Result<SaturateReport> {
    let lanes = if args.collapsed { "collapsed" } else { "split" };
    let specs = vec![
        NodeSpec {
            extra: "[consensus]\nbootstrap = true\n".into(),
            ..NodeSpec::listener(A)
        },
        NodeSpec::listener(B).dialing(vec![0]),
        NodeSpec::listener(C).dialing(vec![0, 1]),
    ]
    .into_iter()
    .map(|spec| spec.with_env("MESHD_NETWORK__LANES", lanes))
    .collect();
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

    // B's subscriber: slow until the drain, noting distinct messages by A's message id.
    let slow = Arc::new(AtomicBool::new(args.slow_ms > 0));
    let received = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let b_data = cluster.node(1).data().await?;
    let subscribe = |qos_class| {
        let mut client = b_data.clone();
        async move {
            let request = SubscribeRequest {
                qos_class,
                ..SubscribeRequest::default()
            };
            anyhow::Ok(client.subscribe(request).await?.into_inner())
        }
    };
    let inbox = subscribe(1).await?;
    // B's DB-update subscriber, fast.
    let mut db_inbox = subscribe(2).await?;
    let db_subscriber =
        tokio::spawn(async move { while let Some(Ok(_)) = db_inbox.next().await {} });
    let subscriber = {
        let slow = Arc::clone(&slow);
        let pause = Duration::from_millis(args.slow_ms);
        record_ids(inbox, Arc::clone(&received), move || {
            slow.load(Ordering::Relaxed).then_some(pause)
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
        let db = tokio::spawn(db_updates(
            Arc::clone(&cluster),
            Arc::clone(&phase),
            Arc::clone(&stop),
        ));
        if name == "idle" {
            tokio::time::sleep(Duration::from_secs(args.idle)).await;
        } else {
            flood = send_flood(&cluster, args).await?;
        }
        stop.store(true, Ordering::Relaxed);
        watcher.await?;
        writer.await??;
        db.await??;
        phases.push(
            Arc::try_unwrap(phase)
                .map_err(|_| anyhow::anyhow!("phase still shared"))?
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    // Drain: the subscriber reads at full speed until nothing more arrives for 3 s.
    slow.store(false, Ordering::Relaxed);
    let last = until_quiet(&received, Duration::from_secs(3), Duration::from_secs(120)).await;
    flood.delivered = last as u64;
    subscriber.abort();
    db_subscriber.abort();
    let missing: Vec<u64> = {
        let received = received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        flood
            .ids
            .iter()
            .copied()
            .filter(|id| !received.contains(id))
            .collect()
    };
    for s in statuses(cluster.node(0), &missing).await? {
        *flood
            .undelivered
            .entry(s.status().as_str_name().to_owned())
            .or_default() += 1;
    }
    Ok(SaturateReport { phases, flood })
}

/// Reads `inbox` to its end on a task, noting each message id in `received`; after each
/// message it sleeps for `pause()` (a slow subscriber), or reads on at once (`None`).
pub fn record_ids(
    mut inbox: tonic::Streaming<meshd_proto::mesh::Received>,
    received: Arc<Mutex<HashSet<u64>>>,
    pause: impl Fn() -> Option<Duration> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(message)) = inbox.next().await {
            received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(message.msg_id);
            if let Some(pause) = pause() {
                tokio::time::sleep(pause).await;
            }
        }
    })
}

/// Waits until `received` has not grown for `quiet`, or `limit` passed; returns its size.
pub async fn until_quiet(
    received: &Mutex<HashSet<u64>>,
    quiet: Duration,
    limit: Duration,
) -> usize {
    let size = || {
        received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    };
    let deadline = Instant::now() + limit;
    let mut last = size();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = size();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    last
}

/// The statuses at `node` of messages `ids` (in chunks the api accepts).
pub async fn statuses(
    node: &crate::Node,
    ids: &[u64],
) -> anyhow::Result<Vec<meshd_proto::mesh::MessageStatusInfo>> {
    let mut client = node.data().await?;
    let mut all = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(10_000) {
        let statuses = client
            .query_message_status(QueryMessageStatusRequest {
                msg_ids: chunk.to_vec(),
            })
            .await?
            .into_inner()
            .message_statuses;
        all.extend(statuses);
    }
    Ok(all)
}

/// A's senders, for `args.duration`.
async fn send_flood(cluster: &Cluster, args: &Scenario) -> anyhow::Result<Flood> {
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
                let request = request(B, seq, vec![0x5a; size]);
                match client.send(request).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        let status = answer.status();
                        if matches!(status, MessageStatus::Queued | MessageStatus::Delivered) {
                            flood.accepted += 1;
                            flood.ids.push(answer.msg_id);
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
        total.ids.extend(flood.ids);
        for (k, v) in flood.answers {
            *total.answers.entry(k).or_default() += v;
        }
        for (k, v) in flood.refused {
            *total.refused.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

/// A control-group update of `size` bytes under `key`.
pub fn update(key: u64, size: usize) -> DbUpdate {
    DbUpdate {
        table_name: "bench".into(),
        operation: "INSERT".into(),
        data: std::collections::HashMap::from([
            ("id".to_owned(), key.to_string()),
            ("v".to_owned(), "x".repeat(size)),
        ]),
        ..DbUpdate::default()
    }
}

fn request(dst: u64, corr_id: u64, payload: Vec<u8>) -> SendRequest {
    SendRequest {
        dst_node: dst,
        headers: vec![Header {
            key: "message_type".into(),
            value: b"loadgen".to_vec().into(),
        }],
        payload: payload.into(),
        partition: 0,
        qos_class: 1,
        corr_id,
        mode: SendMode::FireAndForget as i32,
        timeout_seconds: 10,
        ..SendRequest::default()
    }
}

impl Phase {
    /// Whether C (which sends no data) was seen suspect or dead, or had a link re-made.
    pub fn c_touched(&self) -> bool {
        self.suspected
            .iter()
            .chain(&self.dead)
            .any(|&(_, member)| member == C)
            || self.remade.iter().any(|&(a, b)| a == C || b == C)
    }
}
