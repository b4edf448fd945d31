//! The platform supervisor, both ways, against real meshd processes: a small fake supervisor
//! (a gRPC server in this test) that is away when the node starts, then comes up; the node
//! registers, sends heartbeats with its components' health, answers GetHealth and Configure,
//! and on Stop leaves and unregisters.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_proto::supervisor::{
    ConfigureRequest, GetHealthRequest, HealthStatus, RegisterServiceRequest,
    RegisterServiceResponse, SendHeartbeatRequest, SendHeartbeatResponse, StopRequest,
    UnregisterServiceRequest, UnregisterServiceResponse,
    service_controller_service_client::ServiceControllerServiceClient,
    supervisor_service_server::{SupervisorService, SupervisorServiceServer},
};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tonic::{Request, Response, Status};

/// What the fake supervisor heard.
#[derive(Default)]
struct Heard {
    registered: Vec<RegisterServiceRequest>,
    heartbeats: Vec<SendHeartbeatRequest>,
    unregistered: Vec<UnregisterServiceRequest>,
}

#[derive(Clone, Default)]
struct FakeSupervisor {
    heard: Arc<Mutex<Heard>>,
}

#[tonic::async_trait]
impl SupervisorService for FakeSupervisor {
    async fn register_service(
        &self,
        request: Request<RegisterServiceRequest>,
    ) -> Result<Response<RegisterServiceResponse>, Status> {
        let mut heard = self.heard.lock().unwrap();
        heard.registered.push(request.into_inner());
        Ok(Response::new(RegisterServiceResponse {
            success: true,
            service_id: format!("mesh-{}", heard.registered.len()),
            message: String::new(),
        }))
    }

    async fn send_heartbeat(
        &self,
        request: Request<SendHeartbeatRequest>,
    ) -> Result<Response<SendHeartbeatResponse>, Status> {
        self.heard
            .lock()
            .unwrap()
            .heartbeats
            .push(request.into_inner());
        Ok(Response::new(SendHeartbeatResponse { acknowledged: true }))
    }

    async fn unregister_service(
        &self,
        request: Request<UnregisterServiceRequest>,
    ) -> Result<Response<UnregisterServiceResponse>, Status> {
        self.heard
            .lock()
            .unwrap()
            .unregistered
            .push(request.into_inner());
        Ok(Response::new(UnregisterServiceResponse { success: true }))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

    let fake = FakeSupervisor::default();
    let heard = Arc::clone(&fake.heard);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SupervisorServiceServer::new(fake))
            .serve(address),
    );
    let up = Instant::now();
    wait_until("a registration", Duration::from_secs(40), || {
        !heard.lock().unwrap().registered.is_empty()
    })
    .await?;
    println!("registered {:?} after the supervisor came up", up.elapsed());
    {
        let heard = heard.lock().unwrap();
        let service = heard.registered[0]
            .service
            .as_ref()
            .context("service info")?;
        assert_eq!(service.node_id, 1);
        assert_eq!(service.name, "mesh");
        assert_eq!(service.grpc_address, cluster.node(0).grpc.to_string());
    }
    wait_until("three heartbeats", Duration::from_secs(10), || {
        heard.lock().unwrap().heartbeats.len() >= 3
    })
    .await?;
    {
        let heard = heard.lock().unwrap();
        let beat = heard.heartbeats.last().context("a heartbeat")?;
        assert_eq!(beat.service_id, "mesh-1");
        let names: Vec<&str> = beat.components.iter().map(|c| c.name.as_str()).collect();
        for name in ["transport", "routing", "membership", "consensus", "storage"] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(beat.metrics.contains_key("raft_term"));
    }

    // GetHealth on the node's own port.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", cluster.node(0).grpc))?
            .connect()
            .await?;
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
            heard.lock().unwrap().heartbeats.last().is_some_and(|b| {
                b.components
                    .iter()
                    .any(|c| c.name == "membership" && c.status != HealthStatus::Healthy as i32)
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
    let heard = heard.lock().unwrap();
    assert_eq!(heard.unregistered.len(), 1, "unregistered at stop");
    assert_eq!(heard.unregistered[0].service_id, "mesh-1");
    server.abort();
    Ok(())
}
