//! `loadgen`: drives a meshd mesh over gRPC and reports what it carried.
//!
//! `loadgen local` starts a local mesh of real `meshd` processes on loopback (node 1 listens,
//! node 2 listens and dials 1, node 3 sits "behind NAT" and dials both, further nodes dial the
//! two listeners), sends numbered messages both ways over every link, and has each receiver
//! check what arrived: lost, duplicated and reordered counts from sequence numbers, latency
//! from send timestamps (HDR histogram). It ends with an acknowledged round trip as `core`
//! does it (WAIT_FOR_ACK, AckMessage).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use meshd_proto::mesh::{Ack, Header, MessageStatus, SendMode, SendRequest, SubscribeRequest};
use meshd_tests::{Cluster, NodeSpec};
use tokio_stream::StreamExt;

mod bench;
mod compare;
mod consensus;
mod nats;
mod publish;
mod report;
mod results;
mod saturate;
mod scale;
mod stream;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Drive a meshd mesh and report what it carried"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local mesh of meshd processes on loopback and run traffic through it.
    Local {
        /// Number of meshd processes (at least 3).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Messages per direction per link.
        #[arg(long, default_value_t = 2000)]
        messages: u64,
        /// Payload size in bytes (at least 16: sequence number and timestamp).
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Sends in flight per direction.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        /// Keep the mesh running after the report until Ctrl-C.
        #[arg(long)]
        hold: bool,
        /// Instead of the checked traffic: the same fire-and-forget load (256 B unless --size,
        /// batches of 64, 10 s) on a 3-node meshd chain and on a 3-server NATS cluster, side by
        /// side. Needs Debian's nats-server package.
        #[arg(long, value_enum)]
        compare: Option<bench::Compare>,
        /// With --compare: 1 (2-node meshd chain against a 2-server NATS cluster) or 2 (3-node
        /// chain against NATS leaf → hub → leaf).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
        hops: u8,
    },
    /// One workload from a source node to a sink (or to every node): throughput, HDR latency,
    /// loss, duplicates and reordering. Starts a local mesh in the chosen topology unless
    /// --source and --sink name a running one.
    Bench(bench::BenchArgs),
    /// The mesh control group under load: commit latency and committed updates/s of
    /// internal-DB updates through the leader, then (with --faults) a snapshot catch-up and
    /// the failover after a SIGKILL of the leader.
    Consensus(consensus::ConsensusArgs),
    /// Durable exactly-once client data streams under load: acknowledged msgs/s, publish and
    /// delivery latency, loss / duplicates / order; with --compare, the same load on a
    /// JetStream R3 stream (Debian's nats-server).
    Stream(stream::StreamArgs),
    /// Liveness under a saturated data path: A floods B, whose subscriber is slow, while C
    /// writes to the control group; members suspected, link RTT, commit latency, links
    /// re-made and messages lost, idle and flooded.
    Saturate(saturate::SaturateArgs),
    /// Run the standard loads on meshd and NATS and the 50-node mesh, and rewrite the
    /// generated section of benches/RESULTS.md with the figures and the machine.
    Results {
        /// The file whose generated section is rewritten.
        #[arg(long, default_value = "benches/RESULTS.md")]
        out: std::path::PathBuf,
    },
    /// Start many meshd processes in a random asymmetric topology and report how long until
    /// every node routes to every other and sees every member alive, and memory per node.
    Scale {
        /// meshd processes.
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        /// Nodes behind NAT.
        #[arg(long, default_value_t = 10)]
        nat: usize,
        /// Seed of the topology.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Figures come from the build users run, not the tests' quicker one.
    meshd_tests::measure_with_release_build();
    match Cli::parse().command {
        Command::Local {
            size,
            compare: Some(compare),
            hops,
            ..
        } => {
            let args = bench::BenchArgs::for_comparison(compare, size, hops);
            compare::run_compared(args).await.map(|_| ())
        }
        Command::Local {
            nodes,
            messages,
            size,
            in_flight,
            hold,
            compare: None,
            ..
        } => local(nodes, messages, size.max(16), in_flight.max(1), hold).await,
        Command::Results { out } => results::run(&out).await,
        Command::Consensus(args) => {
            let report = consensus::run(&args).await?;
            println!(
                "| voters | updates | committed/s | p50 µs | p99 µs | max µs | failover | snapshot catch-up |"
            );
            println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
            println!("{}", consensus::row(&report));
            Ok(())
        }
        Command::Scale { nodes, nat, seed } => scale::run(nodes, nat, seed).await,
        Command::Saturate(args) => {
            let report = saturate::run(&args).await?;
            saturate::print(&args, &report);
            Ok(())
        }
        Command::Stream(args) => stream::run(&args).await.map(|_| ()),
        Command::Bench(args) => {
            let reports = compare::run_compared(args).await?;
            let report = &reports[0];
            if report.lost > 0 || report.duplicated > 0 {
                bail!(
                    "{} messages lost, {} duplicated",
                    report.lost,
                    report.duplicated
                );
            }
            Ok(())
        }
    }
}

/// What one receiver saw from one sender.
#[derive(Default)]
struct Flow {
    received: u64,
    duplicated: u64,
    reordered: u64,
    highest: Option<u64>,
    seen: Vec<bool>,
}

struct FlowReport {
    src: u64,
    dst: u64,
    sent: u64,
    flow: Flow,
    latency: Histogram<u64>,
    elapsed: Duration,
}

async fn local(
    n_nodes: usize,
    messages: u64,
    size: usize,
    in_flight: usize,
    hold: bool,
) -> anyhow::Result<()> {
    if n_nodes < 3 {
        bail!("--nodes must be at least 3 (two listeners and one node behind NAT)");
    }
    let mut specs = vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
    ];
    for i in 3..=n_nodes as u64 {
        specs.push(NodeSpec::behind_nat(i, vec![0, 1]));
    }
    println!("starting {n_nodes} meshd processes on loopback (building meshd first if needed)…");
    let cluster = Cluster::start(specs)?;
    for node in &cluster.nodes {
        println!(
            "  node {:>2}: gRPC {}  links {}",
            node.spec.node_id,
            node.grpc,
            node.listen
                .map_or_else(|| "dial-only (behind NAT)".to_owned(), |a| a.to_string())
        );
    }
    // Every node links with the two listeners; the listeners with each other.
    let mut links = vec![(1u64, 2u64)];
    for i in 3..=n_nodes as u64 {
        links.push((1, i));
        links.push((2, i));
    }
    for node in &cluster.nodes {
        let id = node.spec.node_id;
        let peers: Vec<u64> = links
            .iter()
            .filter_map(|&(a, b)| {
                if a == id {
                    Some(b)
                } else if b == id {
                    Some(a)
                } else {
                    None
                }
            })
            .collect();
        node.wait_for_peers(&peers, Duration::from_secs(15)).await?;
    }
    println!("all {} links up (WebSocket over TLS 1.3)\n", links.len());

    let epoch = Arc::new(Instant::now());
    let mut receivers = HashMap::new();
    for node in &cluster.nodes {
        let stream = node
            .data()
            .await?
            .subscribe(SubscribeRequest::default())
            .await?
            .into_inner();
        receivers.insert(node.spec.node_id, stream);
    }
    let flows: Vec<(u64, u64)> = links.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect();

    // Receivers: one task per node, counting per source.
    let mut sinks = Vec::new();
    for (id, mut stream) in receivers {
        let epoch = Arc::clone(&epoch);
        let expected: u64 = flows.iter().filter(|(_, dst)| *dst == id).count() as u64 * messages;
        sinks.push(tokio::spawn(async move {
            let mut flows: HashMap<u64, (Flow, Histogram<u64>)> = HashMap::new();
            let mut total = 0u64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while total < expected {
                let Ok(Some(item)) = tokio::time::timeout_at(deadline, stream.next()).await else {
                    break;
                };
                let Ok(received) = item else { break };
                let seq = u64::from_le_bytes(received.payload[..8].try_into().unwrap_or_default());
                let sent_ns =
                    u64::from_le_bytes(received.payload[8..16].try_into().unwrap_or_default());
                let now_ns = epoch.elapsed().as_nanos() as u64;
                let (flow, hist) = flows.entry(received.src_node).or_insert_with(|| {
                    (
                        Flow::default(),
                        Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds"),
                    )
                });
                let _ = hist.record(now_ns.saturating_sub(sent_ns).max(1));
                if flow.seen.len() <= seq as usize {
                    flow.seen.resize(seq as usize + 1, false);
                }
                if flow.seen[seq as usize] {
                    flow.duplicated += 1;
                    continue;
                }
                flow.seen[seq as usize] = true;
                flow.received += 1;
                if flow.highest.is_some_and(|h| seq < h) {
                    flow.reordered += 1;
                }
                flow.highest = Some(flow.highest.map_or(seq, |h| h.max(seq)));
                total += 1;
            }
            (id, flows)
        }));
    }

    // Senders: `in_flight` concurrent unary sends per direction, fire-and-forget.
    let started = Instant::now();
    let mut senders = Vec::new();
    for &(src, dst) in &flows {
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.spec.node_id == src)
            .context("node")?;
        let client = node.data().await?;
        let epoch = Arc::clone(&epoch);
        senders.push(tokio::spawn(async move {
            let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut lanes = Vec::new();
            for _ in 0..in_flight {
                let mut client = client.clone();
                let next = Arc::clone(&next);
                let epoch = Arc::clone(&epoch);
                lanes.push(tokio::spawn(async move {
                    loop {
                        let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seq >= messages {
                            return Ok::<_, anyhow::Error>(());
                        }
                        let mut payload = vec![0u8; size];
                        payload[..8].copy_from_slice(&seq.to_le_bytes());
                        let now_ns = epoch.elapsed().as_nanos() as u64;
                        payload[8..16].copy_from_slice(&now_ns.to_le_bytes());
                        client
                            .send(request(dst, seq, payload, SendMode::FireAndForget, false))
                            .await?;
                    }
                }));
            }
            for lane in lanes {
                lane.await??;
            }
            let _ = epoch;
            Ok::<_, anyhow::Error>((src, dst))
        }));
    }
    for sender in senders {
        sender.await??;
    }
    let mut reports = Vec::new();
    for sink in sinks {
        let (dst, flows) = sink.await?;
        for (src, (flow, latency)) in flows {
            reports.push(FlowReport {
                src,
                dst,
                sent: messages,
                flow,
                latency,
                elapsed: started.elapsed(),
            });
        }
    }
    reports.sort_by_key(|r| (r.src, r.dst));
    print_report(&reports, size, flows.len(), messages);

    // One acknowledged request/response as core does it: WAIT_FOR_ACK, then AckMessage.
    let (first, nat) = (&cluster.nodes[0], &cluster.nodes[2]);
    let mut inbox = nat
        .data()
        .await?
        .subscribe(SubscribeRequest::default())
        .await?
        .into_inner();
    let mut client = first.data().await?;
    let ack_started = Instant::now();
    let pending = tokio::spawn(async move {
        client
            .send(request(
                3,
                u64::MAX,
                b"ack me".to_vec(),
                SendMode::WaitForAck,
                true,
            ))
            .await
            .map(tonic::Response::into_inner)
    });
    let received = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await?
        .context("subscription ended")??;
    nat.data()
        .await?
        .ack_message(Ack {
            src_node: received.src_node,
            msg_id: received.msg_id,
            success: true,
            message: "handled by loadgen".into(),
        })
        .await?;
    let reply = pending.await??;
    println!(
        "\nacknowledged send 1 → 3 (behind NAT): status {:?} \"{}\" in {:?}",
        reply.status(),
        reply.status_message,
        ack_started.elapsed()
    );
    if reply.status() != MessageStatus::AckSuccess {
        bail!("the acknowledged send ended as {:?}", reply.status());
    }

    println!("\nsessions as GetSessions reports them:");
    for node in &cluster.nodes {
        for s in node.sessions().await? {
            println!(
                "  {:>2} ↔ {:>2}  {:<16} rtt {:>5} µs  sent {:>9} B / {:>6} frames  received {:>9} B / {:>6} frames  tls {}",
                node.spec.node_id,
                s.peer_node_id,
                s.state,
                s.rtt_microseconds,
                s.bytes_sent,
                s.frames_sent,
                s.bytes_received,
                s.frames_received,
                s.is_tls
            );
        }
    }
    let lost: u64 = reports.iter().map(|r| r.sent - r.flow.received).sum();
    let duplicated: u64 = reports.iter().map(|r| r.flow.duplicated).sum();
    if hold {
        println!(
            "\nmesh is up; configs and logs in {}. Ctrl-C to stop.",
            cluster.dir().display()
        );
        tokio::signal::ctrl_c().await?;
    }
    drop(cluster);
    if lost > 0 || duplicated > 0 || reports.len() != flows.len() {
        bail!("{lost} messages lost, {duplicated} duplicated");
    }
    Ok(())
}

fn request(
    dst: u64,
    corr_id: u64,
    payload: Vec<u8>,
    mode: SendMode,
    require_ack: bool,
) -> SendRequest {
    SendRequest {
        dst_node: dst,
        headers: vec![Header {
            key: "message_type".into(),
            value: b"loadgen".to_vec().into(),
        }],
        payload: payload.into(),
        end_to_end_encrypt: false,
        partition: 0,
        qos_class: 1,
        corr_id,
        require_ack,
        mode: mode as i32,
        timeout_seconds: 10,
    }
}

fn print_report(reports: &[FlowReport], size: usize, n_flows: usize, messages: u64) {
    println!(
        "{} flows × {messages} messages of {size} B, fire-and-forget, unary Send per message",
        n_flows
    );
    println!(
        "{:>4} → {:<4} {:>8} {:>8} {:>5} {:>5} {:>9} {:>10} {:>10} {:>10}",
        "src", "dst", "sent", "recv", "lost", "dup", "reorder", "p50 µs", "p99 µs", "max µs"
    );
    let mut total = 0u64;
    let mut elapsed = Duration::ZERO;
    for r in reports {
        total += r.flow.received;
        elapsed = elapsed.max(r.elapsed);
        println!(
            "{:>4} → {:<4} {:>8} {:>8} {:>5} {:>5} {:>9} {:>10} {:>10} {:>10}",
            r.src,
            r.dst,
            r.sent,
            r.flow.received,
            r.sent - r.flow.received,
            r.flow.duplicated,
            r.flow.reordered,
            r.latency.value_at_quantile(0.5) / 1000,
            r.latency.value_at_quantile(0.99) / 1000,
            r.latency.max() / 1000
        );
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "total: {total} messages in {:.2} s = {:.0} msgs/s, {:.1} MB/s of payload\n\
         (reorder: arrivals below an earlier sequence number; concurrent unary sends of one flow \
         race each other before they reach meshd, so this is not a mesh reordering)",
        secs,
        total as f64 / secs,
        total as f64 * size as f64 / secs / 1e6
    );
}
