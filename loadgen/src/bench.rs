//! `loadgen bench`: one workload from a source node to a sink node (or to every node, for
//! broadcast) over a local mesh in a chosen topology or over a running mesh, with HDR latency
//! (coordinated-omission corrected in open loop), throughput, and the sink's loss, duplicate and
//! reorder counts from sequence numbers.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub(crate) use crate::report::BenchReport;
use crate::{
    publish::{PublishPlan, publish_lane, publish_open_loop},
    report::{Sink, Window, print_table},
};
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use meshd_proto::mesh::{
    Ack, GetRoutingTableRequest, Header, SendMode, SendRequest, SubscribeRequest,
    mesh_control_client::MeshControlClient, mesh_data_client::MeshDataClient,
};
use meshd_tests::{Cluster, NodeSpec};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Mesh shapes `loadgen bench` can start.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Topology {
    /// 1 ← 2 ← … ← N: the source (1) and sink (N) are N − 1 hops apart.
    Chain,
    /// A chain closed by N dialing 1: two paths between any pair.
    Ring,
    /// Everyone dials node 1: every pair but those with 1 is two hops apart.
    Star,
    /// A random tree plus extra links, from `--seed`.
    Random,
}

/// Systems to compare with.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Compare {
    /// Core NATS with plaintext routes and leaf connections (nats-server on the PATH or in
    /// /usr/sbin).
    Nats,
    /// Core NATS whose routes and leaf connections run TLS 1.3 with both ends verified, as
    /// meshd's links always do: the like-for-like comparison.
    NatsTls,
}

/// What is sent.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Workload {
    /// FIRE_AND_FORGET unary sends.
    Fire,
    /// WAIT_FOR_DELIVERY: each send returns when the sink's node reports it delivered.
    Delivery,
    /// WAIT_FOR_ACK: the sink acknowledges every message with AckMessage.
    Ack,
    /// dst_node = 0: every node's subscriber gets every message.
    Broadcast,
}

/// Flags of `loadgen bench`.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Mesh shape (local mesh only).
    #[arg(long, value_enum, default_value = "chain")]
    pub(crate) topology: Topology,
    /// meshd processes to start (local mesh only).
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// How many nodes sit behind NAT (no listener); chain: only the last node can.
    #[arg(long, default_value_t = 0)]
    pub(crate) nat: usize,
    /// Seed of the random topology.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// What to send.
    #[arg(long, value_enum, default_value = "fire")]
    pub(crate) workload: Workload,
    /// Payload bytes (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 256)]
    pub(crate) size: usize,
    /// Closed loop: this many sends in flight. In open loop (--rate) the cap on outstanding
    /// sends; a send that waits for a slot still counts its latency from its scheduled time.
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// Open loop at this many messages per second (0: closed loop).
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// gRPC address of the source node of a running mesh (instead of a local one).
    #[arg(long, requires = "sink")]
    pub(crate) source: Option<String>,
    /// gRPC address of the sink node of a running mesh; its node id is found by a probe.
    #[arg(long, requires = "source")]
    pub(crate) sink: Option<String>,
    /// Node id of the sink in a running mesh.
    #[arg(long, default_value_t = 0)]
    pub(crate) sink_node: u64,
    /// Send through meshd's streaming `Publish` in batches of this many messages (fire and
    /// broadcast workloads) instead of one unary `Send` per message. Closed loop: --in-flight
    /// streams, each waiting for the ack of its batch; open loop: one stream, at most
    /// --in-flight messages unacknowledged.
    #[arg(long, default_value_t = 0)]
    pub batch: usize,
    /// Also run the same workload (fire-and-forget) on a 3-server NATS cluster and print both
    /// with the ratio. Needs Debian's nats-server package.
    #[arg(long, value_enum)]
    pub compare: Option<Compare>,
    /// With --compare: hops between publisher and subscriber on both sides. 1: a 2-node meshd
    /// chain against a 2-server NATS cluster; 2: a 3-node meshd chain (one relay) against
    /// NATS leaf → hub → leaf.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub(crate) hops: u8,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Local mesh only: every link collapsed onto one connection (`network.lanes =
    /// "collapsed"`) instead of data, control and priority lanes.
    #[arg(long)]
    pub(crate) collapsed: bool,
    /// Print nothing (the caller prints).
    #[arg(skip)]
    pub(crate) silent: bool,
}

impl BenchArgs {
    /// The workload of `loadgen local --compare`: a chain of `hops` + 1 nodes, fire-and-forget
    /// through `Publish` in batches of 64, closed loop with 4 streams, 2 s warm-up, 10 s
    /// measured.
    pub(crate) fn for_comparison(compare: Compare, size: usize, hops: u8) -> Self {
        Self {
            topology: Topology::Chain,
            nodes: usize::from(hops) + 1,
            hops,
            nat: 0,
            seed: 1,
            workload: Workload::Fire,
            size,
            in_flight: 4,
            rate: 0,
            duration: 10,
            warmup: 2,
            source: None,
            sink: None,
            sink_node: 0,
            batch: 64,
            compare: Some(compare),
            json: false,
            collapsed: false,
            silent: false,
        }
    }
}

/// The node specs of a local mesh of `args.topology`.
pub(crate) fn topology_specs(args: &BenchArgs) -> anyhow::Result<Vec<NodeSpec>> {
    let n = args.nodes;
    if n < 2 {
        bail!("--nodes must be at least 2");
    }
    if args.nat >= n {
        bail!("--nat must leave at least one listener");
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    // Which nodes (indexes) are behind NAT.
    let nat: Vec<bool> = match args.topology {
        Topology::Chain | Topology::Ring => {
            if args.nat > 1 {
                bail!("--nat: a chain or ring can hide only its last node behind NAT");
            }
            (0..n).map(|i| args.nat == 1 && i == n - 1).collect()
        }
        Topology::Star => (0..n).map(|i| i > 0 && i >= n - args.nat).collect(),
        Topology::Random => {
            let mut nat = vec![false; n];
            let mut hidden = 0;
            while hidden < args.nat {
                let i = rng.gen_range(1..n);
                if !nat[i] {
                    nat[i] = true;
                    hidden += 1;
                }
            }
            nat
        }
    };
    let mut dials: Vec<Vec<usize>> = vec![Vec::new(); n];
    match args.topology {
        Topology::Chain | Topology::Ring => {
            for (i, d) in dials.iter_mut().enumerate().skip(1) {
                d.push(i - 1);
            }
            if args.topology == Topology::Ring && n > 2 {
                dials[n - 1].push(0);
            }
        }
        Topology::Star => {
            for d in dials.iter_mut().skip(1) {
                d.push(0);
            }
        }
        Topology::Random => {
            let listeners: Vec<usize> = (0..n).filter(|i| !nat[*i]).collect();
            for (i, node_dials) in dials.iter_mut().enumerate().skip(1) {
                // A random earlier listener keeps the mesh connected.
                let earlier: Vec<usize> = listeners.iter().copied().filter(|l| *l < i).collect();
                let parent = earlier[rng.gen_range(0..earlier.len())];
                node_dials.push(parent);
            }
            // Extra links; a node can only dial a listener started before it.
            for _ in 0..n / 2 {
                let a = rng.gen_range(1..n);
                let b = listeners[rng.gen_range(0..listeners.len())];
                if b < a && !dials[a].contains(&b) {
                    dials[a].push(b);
                }
            }
        }
    }
    let lanes = if args.collapsed { "collapsed" } else { "split" };
    Ok((0..n)
        .map(|i| {
            let id = i as u64 + 1;
            let spec = if nat[i] {
                NodeSpec::behind_nat(id, dials[i].clone())
            } else {
                NodeSpec::listener(id).dialing(dials[i].clone())
            };
            spec.with_env("MESHD_NETWORK__LANES", lanes)
        })
        .collect())
}

/// Runs the bench; prints the report (table or JSON) and returns it.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let size = args.size.max(16);
    let (_cluster, source, sinks, mesh) = match (&args.source, &args.sink) {
        (Some(source), Some(sink)) => {
            let source = connect(source).await?;
            let sink_channel = connect(sink).await?;
            if args.sink_node == 0 {
                bail!("--sink-node: the sink's node id is needed to address it");
            }
            let sinks = vec![(args.sink_node, sink_channel)];
            (
                None,
                source,
                sinks,
                format!("running mesh, sink node {}", args.sink_node),
            )
        }
        _ => {
            let specs = topology_specs(&args)?;
            eprintln!(
                "starting {} meshd processes ({:?})…",
                specs.len(),
                args.topology
            );
            let cluster = Cluster::start(specs)?;
            let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.spec.node_id).collect();
            let source = connect(&cluster.nodes[0].grpc.to_string()).await?;
            wait_for_routes(&source, &ids[1..]).await?;
            let sink_ids: Vec<usize> = if args.workload == Workload::Broadcast {
                (0..ids.len()).collect()
            } else {
                vec![ids.len() - 1]
            };
            let mut sinks = Vec::new();
            for i in sink_ids {
                sinks.push((ids[i], connect(&cluster.nodes[i].grpc.to_string()).await?));
            }
            let mesh = format!(
                "local {:?} of {} nodes ({} behind NAT), source 1, sink {}",
                args.topology,
                ids.len(),
                args.nat,
                ids[ids.len() - 1]
            );
            (Some(cluster), source, sinks, mesh)
        }
    };
    let dst = if args.workload == Workload::Broadcast {
        0
    } else {
        sinks[0].0
    };

    let epoch = Instant::now();
    let warmup_end = epoch + Duration::from_secs(args.warmup);
    let end = warmup_end + Duration::from_secs(args.duration.max(1));
    // Sequence numbers below this one were sent during warm-up and are not counted.
    let first_measured = Arc::new(AtomicU64::new(u64::MAX));
    let last_measured = Arc::new(AtomicU64::new(0));

    let mut sink_tasks = Vec::new();
    for (node, channel) in &sinks {
        let mut data = MeshDataClient::new(channel.clone());
        let mut stream = data
            .subscribe(SubscribeRequest::default())
            .await?
            .into_inner();
        let ack = args.workload == Workload::Ack;
        let node = *node;
        sink_tasks.push(tokio::spawn(async move {
            let mut sink = Sink::new();
            let grace = end + Duration::from_secs(5);
            while let Ok(Some(Ok(item))) =
                tokio::time::timeout_at(grace.into(), stream.next()).await
            {
                if item.payload.len() < 16 || item.src_node == node && dst != 0 {
                    continue;
                }
                let seq = u64::from_le_bytes(item.payload[..8].try_into().unwrap_or_default());
                let due_ns = u64::from_le_bytes(item.payload[8..16].try_into().unwrap_or_default());
                if ack {
                    let ack = Ack {
                        src_node: item.src_node,
                        msg_id: item.msg_id,
                        success: true,
                        message: String::new(),
                    };
                    let mut data = data.clone();
                    tokio::spawn(async move { data.ack_message(ack).await });
                }
                let now_ns = epoch.elapsed().as_nanos() as u64;
                sink.record(seq, now_ns.saturating_sub(due_ns) / 1000);
            }
            sink
        }));
    }

    // Senders.
    let next_seq = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(args.in_flight.max(1)));
    let mode = match args.workload {
        Workload::Fire | Workload::Broadcast => SendMode::FireAndForget,
        Workload::Delivery => SendMode::WaitForDelivery,
        Workload::Ack => SendMode::WaitForAck,
    };
    let require_ack = args.workload == Workload::Ack;
    let send_one = {
        let data = MeshDataClient::new(source.clone());
        let errors = Arc::clone(&errors);
        let first = Arc::clone(&first_measured);
        let last = Arc::clone(&last_measured);
        move |seq: u64, due: Instant| {
            let mut data = data.clone();
            let errors = Arc::clone(&errors);
            let first = Arc::clone(&first);
            let last = Arc::clone(&last);
            async move {
                if due >= warmup_end {
                    first.fetch_min(seq, Ordering::Relaxed);
                    last.fetch_max(seq, Ordering::Relaxed);
                }
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                let due_ns = due.duration_since(epoch).as_nanos() as u64;
                payload[8..16].copy_from_slice(&due_ns.to_le_bytes());
                let request = SendRequest {
                    dst_node: dst,
                    headers: vec![Header {
                        key: "message_type".into(),
                        value: b"loadgen".to_vec().into(),
                    }],
                    payload: payload.into(),
                    end_to_end_encrypt: false,
                    partition: 0,
                    qos_class: 1,
                    corr_id: 0,
                    require_ack,
                    mode: mode as i32,
                    timeout_seconds: 10,
                };
                if data.send(request).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let progress = {
        let next_seq = Arc::clone(&next_seq);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut before = 0;
            loop {
                tick.tick().await;
                let sent = next_seq.load(Ordering::Relaxed);
                let phase = if Instant::now() < warmup_end {
                    "warm-up"
                } else {
                    "measuring"
                };
                eprint!(
                    "\r{phase:<9} {:>5.1} s  sent {sent:>10}  {:>9} msgs/s   ",
                    epoch.elapsed().as_secs_f64(),
                    sent - before
                );
                before = sent;
            }
        })
    };
    if args.batch > 0 {
        let plan = PublishPlan {
            source: source.clone(),
            dst,
            size,
            batch: args.batch.min(4096),
            epoch,
            warmup_end,
            end,
            next_seq: Arc::clone(&next_seq),
            first: Arc::clone(&first_measured),
            last: Arc::clone(&last_measured),
            errors: Arc::clone(&errors),
        };
        if args.rate > 0 {
            publish_open_loop(plan, args.rate, args.in_flight).await?;
        } else {
            let mut lanes = Vec::new();
            for _ in 0..args.in_flight.max(1) {
                lanes.push(tokio::spawn(publish_lane(plan.clone())));
            }
            for lane in lanes {
                lane.await??;
            }
        }
    } else if args.rate > 0 {
        // Open loop: message i is due at epoch + i/rate whatever happened before it.
        let interval_ns = 1_000_000_000 / args.rate.max(1);
        loop {
            let seq = next_seq.load(Ordering::Relaxed);
            let due = epoch + Duration::from_nanos(seq * interval_ns);
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let permit = Arc::clone(&slots).acquire_owned().await?;
            next_seq.fetch_add(1, Ordering::Relaxed);
            let send = send_one(seq, due);
            tokio::spawn(async move {
                send.await;
                drop(permit);
            });
        }
    } else {
        let mut lanes = Vec::new();
        for _ in 0..args.in_flight.max(1) {
            let next_seq = Arc::clone(&next_seq);
            let send_one = send_one.clone();
            lanes.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                    send_one(seq, Instant::now()).await;
                }
            }));
        }
        for lane in lanes {
            lane.await?;
        }
    }
    // Let the outstanding open-loop sends finish.
    let _ = slots.acquire_many(args.in_flight.max(1) as u32).await?;
    progress.abort();
    eprintln!();

    let mut sink_results = Vec::new();
    for task in sink_tasks {
        sink_results.push(task.await?);
    }
    let window = Window {
        first: first_measured.load(Ordering::Relaxed),
        last: last_measured.load(Ordering::Relaxed),
        seconds: args.duration.max(1) as f64,
        size,
        errors: errors.load(Ordering::Relaxed),
    };
    let workload = format!("{:?}", args.workload).to_lowercase();
    let report = window.report(
        sink_results,
        (workload, mesh, args.rate, args.in_flight, args.batch),
    )?;
    if args.silent {
    } else if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(report)
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach meshd's gRPC at {addr}"))
}

async fn wait_for_routes(source: &Channel, destinations: &[u64]) -> anyhow::Result<()> {
    let mut control = MeshControlClient::new(source.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let table = control
            .get_routing_table(GetRoutingTableRequest {})
            .await?
            .into_inner();
        let routes: BTreeMap<u64, _> = table.routes.into_iter().map(|r| (r.dst_node, r)).collect();
        if destinations.iter().all(|d| routes.contains_key(d)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the source has no route to every node after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests;
