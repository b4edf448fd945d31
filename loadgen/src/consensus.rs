//! `loadgen consensus`: the mesh control group under load. Starts a local mesh whose nodes all
//! become voters, writes internal-DB updates through the leader from several clients at once
//! (each waits for its commit: a quorum of voters fsync'd it), and reports commit latency and
//! committed updates/s; then kills the leader with SIGKILL and reports how long until a write
//! commits again, and how long a follower that missed many entries takes to catch up from a
//! snapshot.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use hdrhistogram::Histogram;
use meshd_proto::link::DbUpdate;
use meshd_tests::{Cluster, Node, NodeSpec};

/// The workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ConsensusArgs {
    /// Voters (every node of the local mesh is one): 3 or 5.
    #[arg(long, default_value_t = 3)]
    pub(crate) voters: usize,
    /// Updates to commit.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) updates: u64,
    /// Clients writing at once, each waiting for its commit.
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// Bytes of each update's value.
    #[arg(long, default_value_t = 256)]
    pub(crate) size: usize,
    /// Also kill the leader and time the failover, and time a snapshot catch-up.
    #[arg(long)]
    pub(crate) faults: bool,
}

/// What one run measured.
#[derive(Debug)]
pub(crate) struct ConsensusReport {
    /// Voters.
    pub(crate) voters: usize,
    /// Updates committed.
    pub(crate) committed: u64,
    /// Committed updates per second.
    pub(crate) per_second: f64,
    /// Commit latency p50, µs.
    pub p50_us: u64,
    /// p99, µs.
    pub p99_us: u64,
    /// max, µs.
    pub(crate) max_us: u64,
    /// SIGKILL of the leader → first committed write, when measured.
    pub(crate) failover: Option<Duration>,
    /// Restart of a follower that missed the entries → caught up (from a snapshot).
    pub(crate) snapshot_catch_up: Option<(u64, Duration)>,
}

pub(crate) fn update(key: u64, size: usize) -> DbUpdate {
    DbUpdate {
        table_name: "bench".into(),
        operation: "INSERT".into(),
        data: HashMap::from([
            ("id".to_owned(), key.to_string()),
            ("v".to_owned(), "x".repeat(size)),
        ]),
        ..DbUpdate::default()
    }
}

async fn state(node: &Node) -> anyhow::Result<meshd_proto::mesh::ConsensusState> {
    node.consensus().await
}

async fn wait_for(
    cluster: &Cluster,
    nodes: &[usize],
    limit: Duration,
    check: impl Fn(&meshd_proto::mesh::ConsensusState) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    'outer: loop {
        for &i in nodes {
            if !check(&state(cluster.node(i)).await?) {
                if Instant::now() > deadline {
                    bail!(
                        "node {} never got there: {:?}",
                        i + 1,
                        state(cluster.node(i)).await?
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'outer;
            }
        }
        return Ok(());
    }
}

/// Runs the workload on a fresh local mesh.
pub(crate) async fn run(args: &ConsensusArgs) -> anyhow::Result<ConsensusReport> {
    let voters = args.voters.clamp(1, 9);
    let tuning = "[consensus]\nsnapshot_every = 5000\nkeep_behind_snapshot = 1000\n";
    let mut specs = Vec::new();
    for i in 0..voters {
        let mut spec = NodeSpec::listener(i as u64 + 1).dialing((0..i).collect());
        spec.extra = if i == 0 {
            format!("{tuning}bootstrap = true\n")
        } else {
            tuning.to_owned()
        };
        specs.push(spec);
    }
    let mut cluster = Cluster::start(specs)?;
    let all: Vec<usize> = (0..voters).collect();
    let odd = if voters.is_multiple_of(2) {
        voters - 1
    } else {
        voters
    };
    wait_for(&cluster, &all, Duration::from_secs(60), |s| {
        s.voters.len() == odd.min(5) && s.can_accept_writes
    })
    .await?;
    let leader_id = state(cluster.node(0)).await?.leader_id;
    let leader = (leader_id - 1) as usize;
    println!(
        "control group: {} voters, leader node {leader_id}; {} updates of {} B from {} clients through the leader",
        odd.min(5),
        args.updates,
        args.size,
        args.in_flight
    );

    // Warm-up: connections and the first entries.
    let client = cluster.node(leader).mesh().await?;
    for key in 0..100 {
        client
            .clone()
            .send_internal_db_update(update(key, args.size))
            .await?;
    }
    let next = Arc::new(std::sync::atomic::AtomicU64::new(100));
    let end = 100 + args.updates;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.in_flight.max(1) {
        let mut client = client.clone();
        let next = Arc::clone(&next);
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            loop {
                let key = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if key >= end {
                    break;
                }
                let sent = Instant::now();
                client.send_internal_db_update(update(key, size)).await?;
                histogram.record(sent.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    for task in tasks {
        histogram.add(task.await??)?;
    }
    let elapsed = started.elapsed();
    let mut report = ConsensusReport {
        voters: odd.min(5),
        committed: args.updates,
        per_second: args.updates as f64 / elapsed.as_secs_f64(),
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
        failover: None,
        snapshot_catch_up: None,
    };
    println!(
        "committed {} updates in {elapsed:.2?}: {:.0} updates/s; commit latency p50 {} µs, p99 {} µs, max {} µs",
        args.updates, report.per_second, report.p50_us, report.p99_us, report.max_us
    );

    if args.faults && voters >= 3 {
        // A follower misses more than a snapshot's worth of entries.
        let follower = (leader + 1) % voters;
        let behind = state(cluster.node(follower)).await?.commit_index;
        cluster.node_mut(follower).stop();
        let mut client = cluster.node(leader).mesh().await?;
        for key in 0..6000 {
            client
                .send_internal_db_update(update(1_000_000 + key, args.size))
                .await?;
        }
        let target = state(cluster.node(leader)).await?.commit_index;
        cluster.node_mut(follower).start()?;
        let restarted = Instant::now();
        wait_for(&cluster, &[follower], Duration::from_secs(60), |s| {
            s.commit_index >= target
        })
        .await?;
        let caught_up = restarted.elapsed();
        let installed = state(cluster.node(follower)).await?.snapshot_index;
        println!(
            "follower down for {} entries caught up in {caught_up:?} after its restart (snapshot at index {installed})",
            target - behind
        );
        report.snapshot_catch_up = Some((target - behind, caught_up));

        // SIGKILL of the leader; a survivor takes writes.
        let survivor = (leader + 1) % voters;
        let mut client = cluster.node(survivor).mesh().await?;
        cluster.node_mut(leader).kill();
        let killed = Instant::now();
        let mut key = 2_000_000;
        loop {
            key += 1;
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                client.send_internal_db_update(update(key, 16)),
            )
            .await;
            if matches!(attempt, Ok(Ok(_))) {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no write committed within 60 s of the leader's kill");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failover = killed.elapsed();
        let new_leader = state(cluster.node(survivor)).await?.leader_id;
        println!(
            "SIGKILL of leader {leader_id}: node {new_leader} leads; first write committed {failover:?} after the kill"
        );
        report.failover = Some(failover);
    }
    drop(cluster);
    Ok(report)
}

/// The figures as a markdown row.
pub(crate) fn row(report: &ConsensusReport) -> String {
    format!(
        "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
        report.voters,
        report.committed,
        report.per_second,
        report.p50_us,
        report.p99_us,
        report.max_us,
        report
            .failover
            .map_or_else(|| "–".to_owned(), |f| format!("{:.2} s", f.as_secs_f64())),
        report.snapshot_catch_up.map_or_else(
            || "–".to_owned(),
            |(n, d)| format!("{n} entries in {:.2} s", d.as_secs_f64())
        ),
    )
}
