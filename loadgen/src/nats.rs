//! The same workload against core NATS (Debian's `nats-server`, no JetStream), shaped like the
//! meshd side: one hop is a 2-server cluster against a 2-node meshd chain (a NATS cluster
//! routes every pair directly, so more servers would still be one hop), two hops are
//! leaf → hub → leaf against a 3-node meshd chain (node 1 → node 2 → node 3).

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

/// How the NATS servers are arranged, to match the hops of the meshd side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A full-mesh cluster of this many servers: publisher on the first, subscriber on the
    /// last, one hop between them (a cluster routes every pair directly).
    Cluster(usize),
    /// leaf → hub → leaf: publisher on one leaf node, subscriber on the other, two hops.
    LeafChain,
}

impl Shape {
    /// The NATS arrangement with `hops` hops between publisher and subscriber.
    pub(crate) fn for_hops(hops: usize) -> Self {
        if hops >= 2 {
            Self::LeafChain
        } else {
            Self::Cluster(2)
        }
    }

    pub(crate) fn describe(self, tls: bool) -> String {
        let security = if tls {
            "routes and leaf connections over TLS 1.3, both ends verified"
        } else {
            "plaintext routes and leaf connections"
        };
        match self {
            Self::Cluster(n) => format!(
                "NATS 2.9 cluster of {n} servers, publish on 1, subscribe on {n} (1 hop), {security}"
            ),
            Self::LeafChain => format!(
                "NATS 2.9 leaf → hub → leaf, publish on one leaf, subscribe on the other (2 hops), {security}"
            ),
        }
    }
}

/// Server-to-server TLS for the NATS side, as meshd's links always have it: one self-signed
/// certificate (127.0.0.1, usable as server and client) that is also the only trusted root,
/// with `verify: true` so both ends of every route and leaf connection present and check it
/// (meshd authenticates both ends of a link too). Client connections stay plaintext on both
/// sides (meshd's api on loopback is plaintext gRPC).
struct Tls {
    cert: String,
    key: String,
}

impl Tls {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let tls = Self {
            cert: dir.join("nats-tls.pem").display().to_string(),
            key: dir.join("nats-tls.key").display().to_string(),
        };
        std::fs::write(&tls.cert, cert.pem())?;
        std::fs::write(&tls.key, key.serialize_pem())?;
        Ok(tls)
    }

    /// A `tls { }` block: this certificate, trusted as the root, peers verified.
    fn block(&self) -> String {
        format!(
            "tls {{\n    cert_file: \"{}\"\n    key_file: \"{}\"\n    ca_file: \"{}\"\n    verify: true\n    timeout: 5\n  }}",
            self.cert, self.key, self.cert
        )
    }
}

fn spawn_server(server: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(server)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting nats-server")
}

/// Starts the servers of `shape` on loopback and waits until a message published on the
/// first reaches a subscriber on the last.
/// With `tls`, routes and leaf connections run TLS 1.3 with both ends verified.
pub(crate) async fn start_cluster(
    log_dir: &Path,
    shape: Shape,
    tls: bool,
) -> anyhow::Result<NatsCluster> {
    let server = find_server()?;
    let tls = if tls {
        Some(Tls::create(log_dir)?)
    } else {
        None
    };
    let tls_block = tls
        .as_ref()
        .map_or(String::new(), |t| format!("  {}\n", t.block()));
    let mut cluster = NatsCluster {
        children: Vec::new(),
        urls: Vec::new(),
    };
    match shape {
        Shape::Cluster(n) => {
            let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
            let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
            for i in 0..n {
                let routes: Vec<String> = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| format!("\"nats://127.0.0.1:{}\"", cluster_ports[j]))
                    .collect();
                let config = log_dir.join(format!("nats-{}.conf", i + 1));
                std::fs::write(
                    &config,
                    format!(
                        "listen: 127.0.0.1:{}\nserver_name: loadgen-{}\ncluster {{\n  name: loadgen\n  listen: 127.0.0.1:{}\n  routes: [{}]\n{tls_block}}}\n",
                        client_ports[i],
                        i + 1,
                        cluster_ports[i],
                        routes.join(", ")
                    ),
                )?;
                let log = log_dir.join(format!("nats-{}.log", i + 1));
                cluster.children.push(spawn_server(&server, &config, &log)?);
                cluster
                    .urls
                    .push(format!("nats://127.0.0.1:{}", client_ports[i]));
            }
        }
        Shape::LeafChain => {
            let (leaf_a, hub, leaf_b, hub_leaf) =
                (free_port()?, free_port()?, free_port()?, free_port()?);
            let hub_config = log_dir.join("nats-hub.conf");
            std::fs::write(
                &hub_config,
                format!(
                    "listen: 127.0.0.1:{hub}\nserver_name: hub\nleafnodes {{\n  listen: 127.0.0.1:{hub_leaf}\n{tls_block}}}\n"
                ),
            )?;
            cluster.children.push(spawn_server(
                &server,
                &hub_config,
                &log_dir.join("nats-hub.log"),
            )?);
            let remote = match &tls {
                None => format!("{{ url: \"nats-leaf://127.0.0.1:{hub_leaf}\" }}"),
                Some(t) => format!(
                    "{{ url: \"tls://127.0.0.1:{hub_leaf}\"\n    {} }}",
                    t.block()
                ),
            };
            for (name, port) in [("leaf-a", leaf_a), ("leaf-b", leaf_b)] {
                let config = log_dir.join(format!("nats-{name}.conf"));
                std::fs::write(
                    &config,
                    format!(
                        "listen: 127.0.0.1:{port}\nserver_name: {name}\nleafnodes {{\n  remotes: [ {remote} ]\n}}\n"
                    ),
                )?;
                cluster.children.push(spawn_server(
                    &server,
                    &config,
                    &log_dir.join(format!("nats-{name}.log")),
                )?);
            }
            cluster.urls = vec![
                format!("nats://127.0.0.1:{leaf_a}"),
                format!("nats://127.0.0.1:{hub}"),
                format!("nats://127.0.0.1:{leaf_b}"),
            ];
        }
    }
    // Ready when a message published on the first server reaches a subscriber on the last.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (first, last) = (
        cluster.urls[0].clone(),
        cluster.urls[cluster.urls.len() - 1].clone(),
    );
    loop {
        if Instant::now() > deadline {
            bail!(
                "the NATS servers did not connect in 15 s; logs in {}",
                log_dir.display()
            );
        }
        let attempt = async {
            let subscriber = async_nats::connect(&last).await?;
            let publisher = async_nats::connect(&first).await?;
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

/// Messages a subscriber may have queued, as meshd's `grpc.subscriber_queue` (4096): both
/// sides' subscribers are bounded alike (async-nats drops past it, as a slow consumer).
const SUBSCRIBER_QUEUE: usize = 4096;

/// Runs the fire-and-forget workload of `args` (size, rate or closed loop, batch, in flight,
/// duration) through `cluster` of `shape`: the same publishers and batches in flight as the
/// meshd side (closed loop: `in_flight` lanes, each publishing a batch and flushing before the
/// next; open loop: at most `in_flight / batch` batches unflushed), each message's latency from
/// its own due time.
pub(crate) async fn run(
    cluster: &NatsCluster,
    shape: Shape,
    args: &BenchArgs,
) -> anyhow::Result<BenchReport> {
    let size = args.size.max(16);
    let publisher = async_nats::ConnectOptions::new()
        .client_capacity(1 << 16)
        .connect(&cluster.urls[0])
        .await?;
    let subscriber = async_nats::ConnectOptions::new()
        .subscription_capacity(SUBSCRIBER_QUEUE)
        .connect(&cluster.urls[cluster.urls.len() - 1])
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

    let first = Arc::new(AtomicU64::new(u64::MAX));
    let last = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let next_seq = Arc::new(AtomicU64::new(0));
    let batch = args.batch.max(1) as u64;
    let make_batch = {
        let (first, last) = (Arc::clone(&first), Arc::clone(&last));
        move |seq: u64, due: &dyn Fn(u64) -> Instant| -> Vec<bytes::Bytes> {
            (seq..seq + batch)
                .map(|s| {
                    let at = due(s);
                    if at >= warmup_end && at < end {
                        first.fetch_min(s, Ordering::Relaxed);
                        last.fetch_max(s, Ordering::Relaxed);
                    }
                    let mut payload = vec![0u8; size];
                    payload[..8].copy_from_slice(&s.to_le_bytes());
                    payload[8..16].copy_from_slice(
                        &(at.duration_since(epoch).as_nanos() as u64).to_le_bytes(),
                    );
                    payload.into()
                })
                .collect()
        }
    };
    let send = {
        let errors = Arc::clone(&errors);
        move |publisher: async_nats::Client, payloads: Vec<bytes::Bytes>| {
            let errors = Arc::clone(&errors);
            async move {
                for payload in payloads {
                    if publisher.publish(SUBJECT, payload).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if publisher.flush().await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    if args.rate > 0 {
        let interval_ns = 1_000_000_000 / args.rate.max(1);
        let window = (args.in_flight / batch as usize).max(1);
        let outstanding = Arc::new(tokio::sync::Semaphore::new(window));
        let due = |s: u64| epoch + Duration::from_nanos(s * interval_ns);
        let mut seq = 0u64;
        while due(seq) < end {
            tokio::time::sleep_until(due(seq).into()).await;
            let permit = Arc::clone(&outstanding).acquire_owned().await?;
            let payloads = make_batch(seq, &due);
            let sending = send(publisher.clone(), payloads);
            tokio::spawn(async move {
                sending.await;
                drop(permit);
            });
            seq += batch;
        }
        let _ = outstanding.acquire_many(window as u32).await?;
    } else {
        let mut lanes = Vec::new();
        for _ in 0..args.in_flight.max(1) {
            let (publisher, next_seq) = (publisher.clone(), Arc::clone(&next_seq));
            let (make_batch, send) = (make_batch.clone(), send.clone());
            lanes.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let seq = next_seq.fetch_add(batch, Ordering::Relaxed);
                    let now = Instant::now();
                    send(publisher.clone(), make_batch(seq, &|_| now)).await;
                }
            }));
        }
        for lane in lanes {
            lane.await?;
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
        shape.describe(args.compare == Some(crate::bench::Compare::NatsTls)),
        args.rate,
        args.in_flight,
        args.batch,
    );
    window.report(vec![sink], describe)
}
