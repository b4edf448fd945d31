//! The same workload against a 3-server NATS cluster (Debian's `nats-server`, core NATS, no
//! JetStream): the publisher talks to server 1, the subscriber to server 3, so every message
//! crosses the cluster once, as a meshd message crosses one relay from node 1 to node 3.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio_stream::StreamExt;

use crate::{
    bench::BenchArgs,
    report::{BenchReport, Sink, Window},
};

/// Where Debian's package puts the server.
const NATS_SERVER: &str = "nats-server";
const SUBJECT: &str = "loadgen.bench";

/// A running cluster; killed on drop.
pub(crate) struct NatsCluster {
    children: Vec<Child>,
    /// Client URLs, server 1 first.
    pub(crate) urls: Vec<String>,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn find_server() -> anyhow::Result<String> {
    for candidate in [NATS_SERVER, "/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate.to_owned());
        }
    }
    bail!(
        "nats-server is not installed; install it with `sudo apt-get install -y nats-server` (Debian's package, 2.9)"
    )
}

/// Starts three clustered servers on loopback and waits until a message crosses them.
pub(crate) async fn start_cluster(log_dir: &Path) -> anyhow::Result<NatsCluster> {
    let server = find_server()?;
    let client_ports = [free_port()?, free_port()?, free_port()?];
    let cluster_ports = [free_port()?, free_port()?, free_port()?];
    let mut cluster = NatsCluster {
        children: Vec::new(),
        urls: client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect(),
    };
    for i in 0..3 {
        let routes: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("nats://127.0.0.1:{}", cluster_ports[j]))
            .collect();
        let log = std::fs::File::create(log_dir.join(format!("nats-{}.log", i + 1)))?;
        let child = Command::new(&server)
            .args(["-a", "127.0.0.1", "-p", &client_ports[i].to_string()])
            .args(["--name", &format!("loadgen-{}", i + 1)])
            .args(["--cluster_name", "loadgen"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster_ports[i]),
            ])
            .args(["--routes", &routes.join(",")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        cluster.children.push(child);
    }
    // Ready when a message published on server 1 reaches a subscriber on server 3.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if Instant::now() > deadline {
            bail!(
                "the NATS cluster did not form in 15 s; logs in {}",
                log_dir.display()
            );
        }
        let attempt = async {
            let subscriber = async_nats::connect(&cluster.urls[2]).await?;
            let publisher = async_nats::connect(&cluster.urls[0]).await?;
            let mut probe = subscriber.subscribe("loadgen.probe").await?;
            subscriber.flush().await?;
            for _ in 0..20 {
                publisher.publish("loadgen.probe", "x".into()).await?;
                publisher.flush().await?;
                if let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(100), probe.next()).await
                {
                    return Ok::<_, anyhow::Error>(true);
                }
            }
            Ok(false)
        };
        if let Ok(true) = attempt.await {
            return Ok(cluster);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the fire-and-forget workload of `args` (size, rate or closed loop, batch, duration)
/// through the cluster.
pub(crate) async fn run(cluster: &NatsCluster, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let size = args.size.max(16);
    let publisher = async_nats::ConnectOptions::new()
        .client_capacity(1 << 16)
        .connect(&cluster.urls[0])
        .await?;
    let subscriber = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(&cluster.urls[2])
        .await?;
    let mut stream = subscriber.subscribe(SUBJECT).await?;
    subscriber.flush().await?;

    let epoch = Instant::now();
    let warmup_end = epoch + Duration::from_secs(args.warmup);
    let end = warmup_end + Duration::from_secs(args.duration.max(1));
    let sink = tokio::spawn(async move {
        let mut sink = Sink::new();
        let grace = end + Duration::from_secs(5);
        while let Ok(Some(message)) = tokio::time::timeout_at(grace.into(), stream.next()).await {
            if message.payload.len() < 16 {
                continue;
            }
            let seq = u64::from_le_bytes(message.payload[..8].try_into().unwrap_or_default());
            let due_ns = u64::from_le_bytes(message.payload[8..16].try_into().unwrap_or_default());
            let now_ns = epoch.elapsed().as_nanos() as u64;
            sink.record(seq, now_ns.saturating_sub(due_ns) / 1000);
        }
        sink
    });

    let first = AtomicU64::new(u64::MAX);
    let last = AtomicU64::new(0);
    let errors = Arc::new(AtomicU64::new(0));
    let batch = args.batch.max(1) as u64;
    let publish_batch = |seq: u64, due: &dyn Fn(u64) -> Instant| {
        let messages: Vec<(u64, bytes::Bytes)> = (seq..seq + batch)
            .map(|s| {
                let at = due(s);
                if at >= warmup_end {
                    first.fetch_min(s, Ordering::Relaxed);
                    last.fetch_max(s, Ordering::Relaxed);
                }
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&s.to_le_bytes());
                payload[8..16]
                    .copy_from_slice(&(at.duration_since(epoch).as_nanos() as u64).to_le_bytes());
                (s, payload.into())
            })
            .collect();
        let publisher = publisher.clone();
        let errors = Arc::clone(&errors);
        async move {
            for (_, payload) in messages {
                if publisher.publish(SUBJECT, payload).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if publisher.flush().await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let mut seq = 0u64;
    if args.rate > 0 {
        let interval_ns = 1_000_000_000 / args.rate.max(1);
        let due = |s: u64| epoch + Duration::from_nanos(s * interval_ns);
        while due(seq) < end {
            tokio::time::sleep_until(due(seq).into()).await;
            publish_batch(seq, &due).await;
            seq += batch;
        }
    } else {
        while Instant::now() < end {
            let now = Instant::now();
            publish_batch(seq, &|_| now).await;
            seq += batch;
        }
    }
    let sink = sink.await?;
    let window = Window {
        first: first.load(Ordering::Relaxed),
        last: last.load(Ordering::Relaxed),
        seconds: args.duration.max(1) as f64,
        size,
        errors: errors.load(Ordering::Relaxed),
    };
    let describe = (
        "fire".to_owned(),
        "NATS 2.9 cluster of 3 servers, publish on 1, subscribe on 3".to_owned(),
        args.rate,
        0,
        args.batch,
    );
    window.report(vec![sink], describe)
}
