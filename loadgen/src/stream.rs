//! `loadgen stream`: durable, exactly-once client data streams under load, and (with
//! `--compare`) the same load on JetStream: an R3 file stream with `Nats-Msg-Id` dedupe on a
//! 3-server cluster of Debian's nats-server.
//!
//! Like for like: meshd runs `replicas` nodes, fully linked (a NATS cluster routes full mesh),
//! and each publisher's stream goes from node 1 to the other `replicas − 1` nodes with the
//! default ack policy, so a batch is answered once it is fsync'd on `replicas` nodes (the
//! source's outbox and every target's inbox); JetStream runs `replicas` servers and an R3
//! stream, answering a publish once a quorum of replicas stored it (JetStream 2.9 does not
//! fsync per write: it writes to the OS and syncs periodically). Both sides have the same
//! publishers, batches in flight per publisher and batch size; each message's latencies are
//! measured from its own due time (when its batch was made): the publish latency to its
//! acknowledgement and the delivery latency to the subscriber on node / server 2, which
//! acknowledges cumulatively every 64 messages.

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use meshd_proto::link::{
    ClientDataAck, OpenClientDataStreamRequest, PublishClientDataRequest, StreamMessage,
    StreamSelector, SubscribeClientDataRequest, mesh_data_service_client::MeshDataServiceClient,
    mesh_service_client::MeshServiceClient, subscribe_client_data_request::Request as SubRequest,
};
use meshd_tests::{Cluster, NodeSpec};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::Channel;

use crate::report::{BenchReport, Sink, Window};

const TENANT: &str = "loadgen";
const SUBJECT: &str = "loadgen.stream";
/// A subscriber acknowledges after this many messages of a stream (or when it goes idle).
const ACK_EVERY: u64 = 64;

/// Flags of `loadgen stream`.
#[derive(Args, Debug, Clone)]
pub(crate) struct StreamArgs {
    /// Payload bytes (at least 16: sequence number and due time).
    #[arg(long, default_value_t = 256)]
    pub(crate) size: usize,
    /// Messages per publish batch.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: usize,
    /// Publishers (meshd: one stream each).
    #[arg(long, default_value_t = 4)]
    pub(crate) publishers: usize,
    /// Batches in flight per publisher.
    #[arg(long, default_value_t = 4)]
    pub(crate) in_flight: usize,
    /// Nodes (servers) holding each message durably before it is acknowledged.
    #[arg(long, default_value_t = 3)]
    pub(crate) replicas: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// Also run the load on JetStream (needs Debian's nats-server).
    #[arg(long)]
    pub(crate) compare: bool,
    /// Where the nodes keep their streams: `redb` (embedded) or `postgres` (a PostgreSQL
    /// started by loadgen in a temporary directory, one database shared by every node).
    #[arg(long, default_value = "redb", value_parser = ["redb", "postgres"])]
    pub(crate) backend: String,
}

/// What one system did.
#[derive(Debug, serde::Serialize)]
pub(crate) struct StreamReport {
    /// Delivery side: throughput, delivery latency, loss and duplicates at the subscriber.
    pub(crate) delivery: BenchReport,
    /// Messages acknowledged to publishers per second (measured window).
    pub(crate) acked_per_s: f64,
    /// Publish → acknowledgement latency percentiles, µs.
    pub(crate) ack_p50_us: u64,
    /// See `ack_p50_us`.
    pub(crate) ack_p99_us: u64,
    /// See `ack_p50_us`.
    pub(crate) ack_max_us: u64,
    /// Messages that arrived out of their stream's order.
    pub(crate) stream_reordered: u64,
}

/// Shared counters of one run.
struct Plan {
    size: usize,
    batch: usize,
    epoch: Instant,
    warmup_end: Instant,
    end: Instant,
    next_seq: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    ack_latency: Mutex<Histogram<u64>>,
}

impl Plan {
    fn new(args: &StreamArgs) -> Arc<Self> {
        let epoch = Instant::now();
        let warmup_end = epoch + Duration::from_secs(args.warmup);
        Arc::new(Self {
            size: args.size.max(16),
            batch: args.batch.clamp(1, 4096),
            epoch,
            warmup_end,
            end: warmup_end + Duration::from_secs(args.duration.max(1)),
            next_seq: AtomicU64::new(0),
            first: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ack_latency: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")),
        })
    }

    /// The next batch's payloads: (first global seq, due time, payloads).
    fn make_batch(&self) -> (u64, Instant, Vec<Bytes>) {
        let seq = self
            .next_seq
            .fetch_add(self.batch as u64, Ordering::Relaxed);
        let due = Instant::now();
        let due_ns = due.duration_since(self.epoch).as_nanos() as u64;
        if due >= self.warmup_end && due < self.end {
            self.first.fetch_min(seq, Ordering::Relaxed);
            self.last
                .fetch_max(seq + self.batch as u64 - 1, Ordering::Relaxed);
        }
        let payloads = (seq..seq + self.batch as u64)
            .map(|s| {
                let mut payload = vec![0u8; self.size];
                payload[..8].copy_from_slice(&s.to_le_bytes());
                payload[8..16].copy_from_slice(&due_ns.to_le_bytes());
                Bytes::from(payload)
            })
            .collect();
        (seq, due, payloads)
    }

    /// A batch made at `due` was acknowledged.
    fn acked(&self, due: Instant, n: usize) {
        if due >= self.warmup_end && due < self.end {
            self.acked.fetch_add(n as u64, Ordering::Relaxed);
            let us = due.elapsed().as_micros() as u64;
            let _ = self
                .ack_latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .record_n(us.max(1), n as u64);
        }
    }

    fn finish(
        &self,
        args: &StreamArgs,
        sink: Sink,
        reordered: u64,
        mesh: String,
    ) -> anyhow::Result<StreamReport> {
        let window = Window {
            first: self.first.load(Ordering::Relaxed),
            last: self.last.load(Ordering::Relaxed),
            seconds: args.duration.max(1) as f64,
            size: self.size,
            errors: self.errors.load(Ordering::Relaxed),
        };
        let delivery = window.report(
            vec![sink],
            (
                "stream".into(),
                mesh,
                0,
                args.publishers * args.in_flight,
                self.batch,
            ),
        )?;
        let latency = self
            .ack_latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(StreamReport {
            delivery,
            acked_per_s: self.acked.load(Ordering::Relaxed) as f64 / args.duration.max(1) as f64,
            ack_p50_us: latency.value_at_quantile(0.5),
            ack_p99_us: latency.value_at_quantile(0.99),
            ack_max_us: latency.max(),
            stream_reordered: reordered,
        })
    }
}

fn record(plan: &Plan, sink: &mut Sink, payload: &[u8]) {
    if payload.len() < 16 {
        return;
    }
    let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
    let due_ns = u64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
    let now_ns = plan.epoch.elapsed().as_nanos() as u64;
    sink.record(seq, now_ns.saturating_sub(due_ns) / 1000);
}

async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

/// The load on meshd.
pub(crate) async fn run_meshd(args: &StreamArgs) -> anyhow::Result<StreamReport> {
    let replicas = args.replicas.max(2);
    // Declared before the cluster, so the nodes stop before their database.
    let postgres = if args.backend == "postgres" {
        let pg = meshd_tests::dbs::Postgres::start()?;
        let url = pg.create_database("loadgen")?;
        Some((pg, url))
    } else {
        None
    };
    let storage = postgres.as_ref().map_or_else(String::new, |(_, url)| {
        format!("\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n")
    });
    let specs: Vec<NodeSpec> = (0..replicas)
        .map(|i| {
            let mut spec = NodeSpec::listener(i as u64 + 1).dialing((0..i).collect());
            spec.extra = format!("tenants = [\"{TENANT}\"]\n{storage}");
            spec
        })
        .collect();
    eprintln!(
        "meshd: {replicas} nodes, fully linked, streams on {}; streams from node 1 to the others…",
        args.backend
    );
    let cluster = Cluster::start(specs)?;
    let targets: Vec<u64> = (2..=replicas as u64).collect();
    cluster
        .node(0)
        .wait_for_routes(&targets, Duration::from_secs(30))
        .await?;
    for i in 1..replicas {
        cluster
            .node(i)
            .wait_for_routes(&[1], Duration::from_secs(30))
            .await?;
    }
    let plan = Plan::new(args);

    // Subscribers on every target (each must process for the stream to move); node 2's
    // deliveries are the ones measured.
    let mut subscribers = Vec::new();
    for i in 1..replicas {
        let grpc = cluster.node(i).grpc;
        let plan = Arc::clone(&plan);
        let measured = i == 1;
        subscribers.push(tokio::spawn(async move {
            meshd_subscriber(grpc, plan, measured).await
        }));
    }
    let source = channel(cluster.node(0).grpc).await?;
    let mut publishers = Vec::new();
    for _ in 0..args.publishers.max(1) {
        let stream = MeshServiceClient::new(source.clone())
            .open_client_data_stream(OpenClientDataStreamRequest {
                tenant: TENANT.into(),
                targets: targets.clone(),
                quorum: 0,
                ack_on_source: false,
                priority: 0,
            })
            .await?
            .into_inner()
            .stream_id;
        let plan = Arc::clone(&plan);
        let source = source.clone();
        let in_flight = args.in_flight.max(1);
        publishers.push(tokio::spawn(async move {
            meshd_publisher(source, stream, plan, in_flight).await
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    let mut measured = None;
    for subscriber in subscribers {
        if let Some(result) = subscriber.await?? {
            measured = Some(result);
        }
    }
    let (sink, reordered) = measured.context("node 2's subscriber")?;
    let mesh = format!(
        "meshd ({} backend), {replicas} nodes fully linked, {} streams node 1 → {targets:?}, durable on every node before the ack",
        args.backend, args.publishers
    );
    plan.finish(args, sink, reordered, mesh)
}

async fn meshd_publisher(
    source: Channel,
    stream_id: Bytes,
    plan: Arc<Plan>,
    in_flight: usize,
) -> anyhow::Result<()> {
    let mut client = MeshServiceClient::new(source);
    let (tx, rx) = mpsc::channel(in_flight + 1);
    let mut answers = client
        .publish_client_data(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut pending = std::collections::VecDeque::new();
    loop {
        while pending.len() < in_flight && Instant::now() < plan.end {
            let (_, due, payloads) = plan.make_batch();
            let n = payloads.len();
            tx.send(PublishClientDataRequest {
                stream_id: stream_id.clone(),
                messages: payloads
                    .into_iter()
                    .map(|payload| StreamMessage { payload })
                    .collect(),
                first_seq: 0,
            })
            .await?;
            pending.push_back((due, n));
        }
        let Some((due, n)) = pending.pop_front() else {
            return Ok(());
        };
        let answer = answers.next().await.context("publish answers ended")??;
        if answer.code != 0 {
            plan.errors.fetch_add(n as u64, Ordering::Relaxed);
            bail!("publish refused: {} ({})", answer.error, answer.code);
        }
        plan.acked(due, n);
    }
}

/// Subscribes, acknowledges every [`ACK_EVERY`] messages of a stream (and whatever is left
/// when deliveries pause), and, when `measured`, records what arrived until the grace period
/// after the end.
async fn meshd_subscriber(
    grpc: std::net::SocketAddr,
    plan: Arc<Plan>,
    measured: bool,
) -> anyhow::Result<Option<(Sink, u64)>> {
    let mut client = MeshDataServiceClient::new(channel(grpc).await?);
    let (tx, rx) = mpsc::channel(4096);
    tx.send(SubscribeClientDataRequest {
        request: Some(SubRequest::Select(StreamSelector {
            tenant: TENANT.into(),
            stream_ids: Vec::new(),
            window: 8192,
        })),
    })
    .await?;
    let mut deliveries = client
        .subscribe_client_data(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut sink = Sink::new();
    let mut reordered = 0;
    // Stream → (last seq seen, last seq acknowledged).
    let mut streams: HashMap<Bytes, (u64, u64)> = HashMap::new();
    let grace = plan.end + Duration::from_secs(5);
    loop {
        let next = tokio::time::timeout(Duration::from_millis(2), deliveries.next());
        let data = match tokio::time::timeout_at(grace.into(), next).await {
            Err(_) => break,
            Ok(Ok(Some(data))) => Some(data?),
            Ok(Ok(None)) => break,
            Ok(Err(_idle)) => None,
        };
        let Some(data) = data else {
            // Idle: acknowledge what is left.
            for (stream, (seen, acked)) in &mut streams {
                if *seen > *acked {
                    *acked = *seen;
                    let ack = ClientDataAck {
                        stream_id: stream.clone(),
                        seq: *seen,
                    };
                    tx.send(SubscribeClientDataRequest {
                        request: Some(SubRequest::Ack(ack)),
                    })
                    .await?;
                }
            }
            continue;
        };
        if measured {
            record(&plan, &mut sink, &data.payload);
        }
        let entry = streams.entry(data.stream_id.clone()).or_default();
        if data.seq != entry.0 + 1 {
            reordered += 1;
        }
        entry.0 = data.seq;
        if entry.0 - entry.1 >= ACK_EVERY {
            entry.1 = entry.0;
            tx.send(SubscribeClientDataRequest {
                request: Some(SubRequest::Ack(ClientDataAck {
                    stream_id: data.stream_id,
                    seq: data.seq,
                })),
            })
            .await?;
        }
    }
    Ok(measured.then_some((sink, reordered)))
}

/// A JetStream-enabled cluster of `n` servers; killed on drop.
struct JetStreamCluster {
    children: Vec<std::process::Child>,
    urls: Vec<String>,
}

impl Drop for JetStreamCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_jetstream(dir: &Path, n: usize) -> anyhow::Result<JetStreamCluster> {
    let server = crate::nats::find_server()?;
    let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut cluster = JetStreamCluster {
        children: Vec::new(),
        urls: client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect(),
    };
    for i in 0..n {
        let routes: Vec<String> = (0..n)
            .filter(|j| *j != i)
            .map(|j| format!("nats://127.0.0.1:{}", cluster_ports[j]))
            .collect();
        let store = dir.join(format!("js-{}", i + 1));
        std::fs::create_dir_all(&store)?;
        let log = std::fs::File::create(dir.join(format!("js-{}.log", i + 1)))?;
        let child = Command::new(&server)
            .args(["-a", "127.0.0.1", "-p", &client_ports[i].to_string()])
            .args(["--name", &format!("js-{}", i + 1)])
            .args(["--cluster_name", "loadgen-js"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster_ports[i]),
            ])
            .args(["--routes", &routes.join(",")])
            .arg("--jetstream")
            .args(["--store_dir", &store.display().to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        cluster.children.push(child);
    }
    Ok(cluster)
}

/// The load on JetStream.
pub(crate) async fn run_jetstream(args: &StreamArgs) -> anyhow::Result<StreamReport> {
    use async_nats::jetstream::{self, consumer, stream};
    let replicas = args.replicas.clamp(1, 5);
    let dir = std::env::temp_dir().join(format!("loadgen-js-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("JetStream: {replicas} nats-server processes, an R{replicas} file stream…");
    let cluster = start_jetstream(&dir, replicas)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let publisher_client = loop {
        match async_nats::ConnectOptions::new()
            .client_capacity(1 << 16)
            .connect(&cluster.urls[0])
            .await
        {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("connecting to server 1: {e}; logs in {}", dir.display()),
        }
    };
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(1 << 20)
        .timeout(Duration::from_secs(10))
        .build(publisher_client);
    // The meta group needs a leader before a stream can be made.
    let stream = loop {
        match js
            .get_or_create_stream(stream::Config {
                name: "LOADGEN".into(),
                subjects: vec![SUBJECT.into()],
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                tracing_quiet(&e);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => bail!(
                "creating the JetStream stream: {e}; logs in {}",
                dir.display()
            ),
        }
    };
    let plan = Plan::new(args);
    let subscriber_client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(&cluster.urls[1.min(replicas - 1)])
        .await?;
    let consumer_js = jetstream::new(subscriber_client);
    let consumer: consumer::PullConsumer = consumer_js
        .get_stream("LOADGEN")
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some("loadgen".into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 1 << 20,
            ..Default::default()
        })
        .await?;
    drop(stream);
    let subscriber = {
        let plan = Arc::clone(&plan);
        tokio::spawn(async move {
            let mut messages = consumer.messages().await?;
            let mut sink = Sink::new();
            let mut reordered = 0;
            let mut last_stream_seq = 0;
            let mut unacked = 0;
            let grace = plan.end + Duration::from_secs(5);
            while let Ok(Some(message)) =
                tokio::time::timeout_at(grace.into(), messages.next()).await
            {
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                record(&plan, &mut sink, &message.payload);
                if let Ok(info) = message.info() {
                    if info.stream_sequence != last_stream_seq + 1 {
                        reordered += 1;
                    }
                    last_stream_seq = info.stream_sequence;
                }
                unacked += 1;
                if unacked >= ACK_EVERY {
                    unacked = 0;
                    message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
            Ok::<_, anyhow::Error>((sink, reordered))
        })
    };
    let mut lanes = Vec::new();
    for _ in 0..args.publishers.max(1) * args.in_flight.max(1) {
        let js = js.clone();
        let plan = Arc::clone(&plan);
        lanes.push(tokio::spawn(async move {
            while Instant::now() < plan.end {
                let (seq, due, payloads) = plan.make_batch();
                let n = payloads.len();
                let mut acks = Vec::with_capacity(n);
                for (i, payload) in payloads.into_iter().enumerate() {
                    let publish = jetstream::message::PublishMessage::build()
                        .payload(payload)
                        .message_id((seq + i as u64).to_string());
                    acks.push(js.send_publish(SUBJECT, publish).await?);
                }
                for ack in acks {
                    ack.await?;
                }
                plan.acked(due, n);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for lane in lanes {
        if let Err(e) = lane.await? {
            plan.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("JetStream publisher: {e:#}");
        }
    }
    let (sink, reordered) = subscriber.await??;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    let mesh = format!(
        "JetStream (nats-server 2.9), {replicas} servers, R{replicas} file stream, Nats-Msg-Id dedupe, publish on 1, pull consumer on 2 (no fsync per write)"
    );
    plan.finish(args, sink, reordered, mesh)
}

fn tracing_quiet(_e: &impl std::fmt::Display) {}

/// Runs the load on meshd (and JetStream); prints the table.
pub(crate) async fn run(args: &StreamArgs) -> anyhow::Result<Vec<StreamReport>> {
    let mut reports = vec![run_meshd(args).await?];
    if args.compare {
        reports.push(run_jetstream(args).await?);
    }
    print_table(args, &reports);
    for r in &reports {
        if r.delivery.lost > 0 || r.delivery.duplicated > 0 || r.stream_reordered > 0 {
            bail!(
                "{}: {} lost, {} duplicated, {} out of stream order",
                r.delivery.mesh,
                r.delivery.lost,
                r.delivery.duplicated,
                r.stream_reordered
            );
        }
    }
    Ok(reports)
}

/// One markdown row per system.
pub(crate) fn rows(reports: &[StreamReport]) -> Vec<String> {
    reports
        .iter()
        .map(|r| {
            let name = if r.delivery.mesh.starts_with("meshd") {
                "meshd"
            } else {
                "JetStream"
            };
            format!(
                "| {name} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} / {} / {} |",
                r.acked_per_s,
                r.acked_per_s * r.delivery.size as f64 / 1e6,
                r.ack_p50_us,
                r.ack_p99_us,
                r.delivery.p50_us,
                r.delivery.p99_us,
                r.delivery.max_us,
                r.delivery.lost,
                r.delivery.duplicated,
                r.stream_reordered
            )
        })
        .collect()
}

fn print_table(args: &StreamArgs, reports: &[StreamReport]) {
    println!(
        "{} B messages, {} publishers × {} batches of {} in flight, {} s measured",
        args.size.max(16),
        args.publishers,
        args.in_flight,
        args.batch,
        args.duration
    );
    for r in reports {
        println!("  {}", r.delivery.mesh);
    }
    println!(
        "| system | acked msgs/s | MB/s | ack p50 µs | ack p99 µs | delivery p50 µs | delivery p99 µs | max µs | lost / dup / reordered |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in rows(reports) {
        println!("{row}");
    }
}
