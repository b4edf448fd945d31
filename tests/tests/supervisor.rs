//! The platform supervisor, both ways, against real meshd processes: a small fake supervisor
//! (a process of its own, `tests/src/bin/fake-supervisor.rs`) that is away when the node starts, then comes up; the node
//! registers, sends heartbeats with its components' health, answers GetHealth and Configure,
//! and on Stop leaves and unregisters.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_proto::supervisor::{
    ConfigureRequest, GetHealthRequest, HealthStatus, StopRequest,
    service_controller_service_client::ServiceControllerServiceClient,
};
use meshd_tests::{Cluster, NodeSpec, exclusive};

/// The fake supervisor, a process of its own (`tests/src/bin/fake-supervisor.rs`), and the
/// lines it printed: one per call it heard.
struct FakeSupervisor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl FakeSupervisor {
    fn start(address: SocketAddr) -> anyhow::Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake-supervisor"))
            .arg(address.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting fake-supervisor")?;
        let stdout = child.stdout.take().context("its stdout")?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Self { child, lines })
    }

    /// The calls of one kind heard so far, each split into words (the kind dropped).
    fn heard(&self, kind: &str) -> Vec<Vec<String>> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| {
                let mut words = line.split(' ').map(str::to_owned);
                (words.next().as_deref() == Some(kind)).then(|| words.collect())
            })
            .collect()
    }
}

impl Drop for FakeSupervisor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[meshd_tests::test]
async fn a_node_registers_heartbeats_reports_health_and_unregisters_at_stop() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    // A port for the supervisor, free now and not listening while the node starts.
    let address: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let with_supervisor = |mut spec: NodeSpec| {
        // Node 1 bootstraps the control group that Configure writes through.
        spec.extra.push_str(&format!(
            "\n[supervisor]\nenabled = true\naddress = \"{address}\"\nheartbeat_ms = 300\n\
             [consensus]\nbootstrap = true\n"
        ));
        spec
    };
    let mut cluster = Cluster::start(vec![
        with_supervisor(NodeSpec::listener(1)),
        NodeSpec::listener(2).dialing(vec![0]),
    ])?;
    cluster
        .node(0)
        .wait_for_routes(&[2], Duration::from_secs(15))
        .await?;
    // The supervisor is away: the node runs on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        cluster.node_mut(0).is_running(),
        "the node runs without its supervisor"
    );

    let fake = FakeSupervisor::start(address)?;
    let up = Instant::now();
    wait_until("a registration", Duration::from_secs(40), || {
        !fake.heard("register").is_empty()
    })
    .await?;
    println!("registered {:?} after the supervisor came up", up.elapsed());
    let registered = fake.heard("register");
    // service_id, node_id, name, grpc_address
    assert_eq!(
        registered[0],
        ["mesh-1", "1", "mesh", &cluster.node(0).grpc.to_string()]
    );
    wait_until("three heartbeats", Duration::from_secs(10), || {
        fake.heard("heartbeat").len() >= 3
    })
    .await?;
    {
        let beats = fake.heard("heartbeat");
        // service_id, status, name=status,…, metric keys
        let beat = beats.last().context("a heartbeat")?;
        assert_eq!(beat[0], "mesh-1");
        let names: Vec<&str> = beat[2]
            .split(',')
            .filter_map(|c| c.split('=').next())
            .collect();
        for name in ["transport", "routing", "membership", "consensus", "storage"] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(beat[3].split(',').any(|k| k == "raft_term"), "{beat:?}");
    }

    // GetHealth on the node's own port.
    let channel = cluster.node(0).channel().await?;
    let mut controller = ServiceControllerServiceClient::new(channel);
    let started = Instant::now();
    let health = loop {
        let health = controller
            .get_health(GetHealthRequest {})
            .await?
            .into_inner();
        let consensus_ok = health
            .components
            .iter()
            .any(|c| c.name == "consensus" && c.status == HealthStatus::Healthy as i32);
        if consensus_ok || started.elapsed() > Duration::from_secs(15) {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("health: {:?}", health.components);
    assert_eq!(health.status, HealthStatus::Healthy as i32, "{health:?}");
    assert_eq!(health.components.len(), 5);
    let membership = health
        .components
        .iter()
        .find(|c| c.name == "membership")
        .context("membership")?;
    assert_eq!(
        membership.status,
        HealthStatus::Healthy as i32,
        "{membership:?}"
    );

    // Configure: a valid live setting is applied through the control group, a bad one refused.
    let answer = controller
        .configure(ConfigureRequest {
            settings: [
                ("routing.k_paths".to_owned(), "2".to_owned()),
                ("routing.k_paths_typo".to_owned(), "2".to_owned()),
            ]
            .into_iter()
            .collect(),
        })
        .await?
        .into_inner();
    assert_eq!(
        answer.applied,
        vec!["routing.k_paths".to_owned()],
        "{answer:?}"
    );
    assert_eq!(answer.refused.len(), 1, "{answer:?}");
    assert!(!answer.success);

    // Node 2 goes: the heartbeats report it.
    cluster.node_mut(1).kill();
    wait_until(
        "a heartbeat saying the mesh degraded",
        Duration::from_secs(20),
        || {
            let healthy = format!("membership={}", HealthStatus::Healthy as i32);
            fake.heard("heartbeat").last().is_some_and(|b| {
                b[2].split(',')
                    .any(|c| c.starts_with("membership=") && c != healthy)
            })
        },
    )
    .await?;

    // Stop: the node leaves and unregisters.
    controller
        .stop(StopRequest {
            grace_period_seconds: 2,
            save_state: true,
        })
        .await?;
    wait_until("the node exits", Duration::from_secs(15), || {
        !cluster.node_mut(0).is_running()
    })
    .await?;
    wait_until("the unregistration is read", Duration::from_secs(5), || {
        !fake.heard("unregister").is_empty()
    })
    .await?;
    assert_eq!(
        fake.heard("unregister"),
        [["mesh-1"]],
        "unregistered once, at stop"
    );
    Ok(())
}
