//! Two meshd nodes on the PostgreSQL backend (one database shared by both, as nodes of one
//! site would) with Redis beside it, all real servers started by this test on loopback.
//!
//! A stream runs from node 1 to node 2; the database is killed mid-stream (postmaster and
//! backends, SIGKILL) and brought back: the nodes report storage unhealthy, refuse what they
//! cannot make durable with UNAVAILABLE, and once the database returns the stream completes
//! with every message delivered once, in order, and every publish acknowledged once. The
//! platform tables (node state and health, routing table, consensus commit points, runtime
//! config, stream offsets) show live state, and Redis holds the hot set.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use meshd_proto::link::OpenClientDataStreamRequest;
use meshd_proto::supervisor::{
    GetHealthRequest, GetHealthResponse, HealthStatus, StopRequest,
    service_controller_service_client::ServiceControllerServiceClient,
};
use meshd_tests::{
    Cluster, Node, NodeSpec,
    dbs::{Postgres, Redis},
    exclusive,
    streams_support::{
        Seen, TENANT, check_exact, mesh_client, open, publish_all, serving, subscriber,
        wait_complete,
    },
};

const TOTAL: u64 = 4000;
const OUTAGE: Duration = Duration::from_secs(2);

async fn health(node: &Node) -> anyhow::Result<GetHealthResponse> {
    let channel = node.channel().await?;
    Ok(ServiceControllerServiceClient::new(channel)
        .get_health(GetHealthRequest {})
        .await?
        .into_inner())
}

fn storage_of(health: &GetHealthResponse) -> (i32, String) {
    health
        .components
        .iter()
        .find(|c| c.name == "storage")
        .map(|c| (c.status, c.message.clone()))
        .unwrap_or_default()
}

/// Polls until node's storage component has `status`.
async fn wait_storage(
    node: &Node,
    status: HealthStatus,
    limit: Duration,
) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let (got, message) = storage_of(&health(node).await?);
        if got == status as i32 {
            println!(
                "node {}: storage {:?} after {:?}: {message}",
                node.spec.node_id,
                status,
                start.elapsed()
            );
            return Ok(message);
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "node {} storage still {got} ({message}) after {limit:?}",
            node.spec.node_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[meshd_tests::test]
async fn streams_on_postgres_survive_the_database_dying_mid_stream() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut pg = Postgres::start()?;
    let redis = Redis::start()?;
    let url = pg.create_database("mesh")?;
    let storage = format!(
        "\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\nredis_url = \"{}\"\n\
         sync_ms = 200\ntimeout_ms = 2000\nconnect_timeout_ms = 1000\n",
        redis.url()
    );
    let mut first = serving(NodeSpec::listener(1));
    first.extra.push_str(&storage);
    first.extra.push_str("\n[consensus]\nbootstrap = true\n");
    let mut second = serving(NodeSpec::listener(2).dialing(vec![0]));
    second.extra.push_str(&storage);
    let cluster = Cluster::start(vec![first, second])?;
    cluster
        .node(0)
        .wait_for_routes(&[2], Duration::from_secs(15))
        .await?;

    let stream = open(cluster.node(0), &[2], 0).await?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sub = subscriber(
        cluster.node(1).api(),
        256,
        Arc::clone(&seen),
        Duration::ZERO,
    );
    let acked: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let publisher = tokio::spawn(publish_all(
        cluster.node(0).api(),
        stream.clone(),
        (1, TOTAL),
        20,
        Arc::clone(&acked),
    ));

    // Mid-stream: the database dies.
    wait_complete(&seen, &stream, TOTAL / 4, Duration::from_secs(30), "node 2").await?;
    pg.kill();
    let killed = Instant::now();
    println!(
        "database killed after {} deliveries",
        seen.lock()
            .unwrap()
            .messages
            .get(&stream)
            .map_or(0, BTreeMap::len)
    );
    for node in [cluster.node(0), cluster.node(1)] {
        let message = wait_storage(node, HealthStatus::Unhealthy, Duration::from_secs(10)).await?;
        assert!(message.contains("postgres"), "{message}");
    }
    let overall = health(cluster.node(0)).await?;
    assert_eq!(overall.status, HealthStatus::Unhealthy as i32);
    // What cannot be made durable is refused, clearly.
    let refused = mesh_client(&cluster.node(0).api())
        .await?
        .open_client_data_stream(OpenClientDataStreamRequest {
            tenant: TENANT.into(),
            targets: vec![2],
            quorum: 0,
            ack_on_source: false,
            priority: 0,
        })
        .await
        .expect_err("no stream opens without its store");
    println!(
        "open while down: {:?} {}",
        refused.code(),
        refused.message()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    tokio::time::sleep(OUTAGE.saturating_sub(killed.elapsed())).await;
    pg.restart()?;
    println!("database back after {:?}", killed.elapsed());
    for node in [cluster.node(0), cluster.node(1)] {
        wait_storage(node, HealthStatus::Healthy, Duration::from_secs(15)).await?;
    }
    let resumed = Instant::now();
    wait_complete(&seen, &stream, TOTAL, Duration::from_secs(60), "node 2").await?;
    println!(
        "stream complete {:?} after the database came back",
        resumed.elapsed()
    );
    publisher.await??;
    sub.abort();
    {
        let seen = seen.lock().unwrap();
        check_exact(&seen, &stream, TOTAL, "node 2");
        println!(
            "redelivered after the outage: {} (deliveries whose ack was not yet stored)",
            seen.redelivered
        );
    }
    {
        let acked = acked.lock().unwrap();
        assert_eq!(acked.len() as u64, TOTAL);
        assert!(
            acked.values().all(|n| *n == 1),
            "every publish acknowledged once"
        );
    }

    // The platform tables show live state.
    let q = |sql: &str| pg.query("mesh", sql);
    assert_eq!(
        q("SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations")?,
        "1,2"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let states = q(
            "SELECT owner, state->>'status', state->>'mesh_health' FROM mesh_node_state \
             WHERE owner = node_id ORDER BY owner",
        )?;
        let routes = q("SELECT destination FROM mesh_routing_table WHERE owner = 1")?;
        let offsets = q("SELECT role, high, low FROM mesh_stream_records WHERE owner = 2")?;
        println!(
            "node states: {states:?}; node 1 routes to: {routes:?}; node 2 stream: {offsets:?}"
        );
        if states == "1|HEALTH_STATUS_HEALTHY|healthy\n2|HEALTH_STATUS_HEALTHY|healthy"
            && routes == "2"
            && offsets == format!("target|{TOTAL}|{TOTAL}")
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "platform tables not current");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let config: u64 = q("SELECT count(*) FROM mesh_runtime_config WHERE owner = 1")?.parse()?;
    assert!(config >= 5, "runtime config keys: {config}");
    assert_eq!(
        q("SELECT value->>'backend' FROM mesh_runtime_config WHERE owner = 1 AND key = 'storage'")?,
        "postgres"
    );
    assert!(
        !q("SELECT value::text FROM mesh_runtime_config WHERE key = 'storage'")?
            .contains("postgres://"),
        "the connection URL (a secret) is never written"
    );
    let commits: u64 = q("SELECT count(*) FROM mesh_consensus_log WHERE owner = 1")?.parse()?;
    assert!(commits >= 1, "control group commit points recorded");

    // Redis holds the hot set.
    let redis_cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .context("redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(redis_cli(&["HEXISTS", "meshd:1:node_state", "1"])?, "1");
    assert_eq!(redis_cli(&["HEXISTS", "meshd:1:routes", "2"])?, "1");

    // The supervisor's Stop with a grace and save_state: nothing published is left behind,
    // and the platform reads a deliberate stop in node 1's final row.
    let channel = cluster.node(0).channel().await?;
    let answer = ServiceControllerServiceClient::new(channel)
        .stop(StopRequest {
            grace_period_seconds: 5,
            save_state: true,
        })
        .await?
        .into_inner();
    println!("stop: {}", answer.message);
    assert!(answer.success);
    assert!(answer.message.contains("final state"), "{}", answer.message);
    let mut cluster = cluster;
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.node_mut(0).is_running() {
        anyhow::ensure!(Instant::now() < deadline, "node 1 did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        q("SELECT state->>'status' FROM mesh_node_state WHERE owner = 1 AND node_id = 1")?,
        "STOPPING"
    );
    Ok(())
}
