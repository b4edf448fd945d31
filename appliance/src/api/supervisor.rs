//! The platform supervisor, both ways: meshd serves `ServiceControllerService` (Start, Stop,
//! GetHealth, Configure) on its gRPC port, and with `[supervisor] enabled` it registers with
//! the supervisor at start, sends a heartbeat with its health every `heartbeat_ms` and
//! unregisters at stop. A supervisor that is away is retried (with backoff) and never holds up
//! the node: every call has a deadline, and the task runs beside the api.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use meshd_proto::{
    link::MeshHealth,
    supervisor::{
        ComponentHealth, ConfigureRequest, ConfigureResponse, GetHealthRequest, GetHealthResponse,
        HealthStatus, RegisterServiceRequest, SendHeartbeatRequest, ServiceInfo, StartRequest,
        StartResponse, StopRequest, StopResponse, UnregisterServiceRequest,
        service_controller_service_server::ServiceControllerService,
        supervisor_service_client::SupervisorServiceClient,
    },
};
use redb::ReadableDatabase as _;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::ApiState;
use crate::control::{ControlRequest, lifecycle::LifecycleRequest};

/// How long one call to the supervisor may take.
const CALL_DEADLINE: Duration = Duration::from_secs(3);

/// The `ServiceControllerService` handlers.
pub(super) struct Controller {
    state: Arc<ApiState>,
}

impl Controller {
    pub(super) fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }
}

/// The node's health and each component's, as `GetHealth` and the heartbeats report it.
pub(super) async fn health(state: &ApiState) -> GetHealthResponse {
    let mut components = Vec::new();
    let mut add = |name: &str, status: HealthStatus, message: String| {
        components.push(ComponentHealth {
            name: name.into(),
            status: status as i32,
            message,
        });
    };
    let snapshots = tokio::time::timeout(CALL_DEADLINE, async {
        Ok::<_, Status>((state.mesh().await?, state.routing().await?))
    })
    .await;
    match snapshots {
        Ok(Ok((mesh, routing))) => {
            let status = super::mesh::mesh_status(&mesh, &routing);
            let alive: Vec<u64> = status
                .members
                .iter()
                .filter(|m| m.state == meshd_proto::link::MemberState::Alive as i32)
                .map(|m| m.node_id)
                .filter(|n| *n != status.local_node_id)
                .collect();
            let linked = status.members.iter().filter(|m| m.linked).count();
            if status.mesh_id.is_empty() {
                add(
                    "transport",
                    HealthStatus::Degraded,
                    "in no mesh yet (SeedMesh or JoinMesh)".into(),
                );
            } else if linked == 0 && status.members.len() > 1 {
                add(
                    "transport",
                    HealthStatus::Unhealthy,
                    "no link to any member: check the network and the peers' addresses".into(),
                );
            } else {
                add(
                    "transport",
                    HealthStatus::Healthy,
                    format!("{linked} members linked directly"),
                );
            }
            let unrouted: Vec<u64> = alive
                .iter()
                .copied()
                .filter(|n| !routing.routes.iter().any(|r| r.destination == *n))
                .collect();
            if unrouted.is_empty() {
                add(
                    "routing",
                    HealthStatus::Healthy,
                    format!("routes to {} nodes", routing.routes.len()),
                );
            } else {
                add(
                    "routing",
                    HealthStatus::Degraded,
                    format!("alive members without a route: {unrouted:?}"),
                );
            }
            let (membership, why) = match MeshHealth::try_from(status.health) {
                Ok(MeshHealth::Healthy) => (HealthStatus::Healthy, "every member reachable"),
                Ok(MeshHealth::Degraded) => (
                    HealthStatus::Degraded,
                    "some members unreachable (DEGRADED)",
                ),
                Ok(MeshHealth::Critical) => (
                    HealthStatus::Unhealthy,
                    "half or more of the members unreachable (CRITICAL): evict the dead",
                ),
                _ => (HealthStatus::Degraded, "no mesh"),
            };
            add("membership", membership, why.into());
        }
        Ok(Err(status)) => add(
            "membership",
            HealthStatus::Unhealthy,
            status.message().into(),
        ),
        Err(_) => add(
            "membership",
            HealthStatus::Unhealthy,
            format!("the control thread did not answer within {CALL_DEADLINE:?}"),
        ),
    }
    let group = state.consensus.state();
    if group.can_accept_writes {
        add(
            "consensus",
            HealthStatus::Healthy,
            format!(
                "control group term {}, leader {:?}, {} voters",
                group.term,
                group.leader,
                group.voters.len()
            ),
        );
    } else {
        add("consensus", HealthStatus::Degraded, group.write_refusal);
    }
    let control_db = state
        .consensus
        .db()
        .begin_read()
        .map(|_| ())
        .map_err(|e| e.to_string());
    let leaderless: Vec<String> = state
        .streams
        .groups
        .status()
        .into_iter()
        .filter(|g| g.leader.is_none())
        .map(|g| format!("{:016x}", g.group))
        .collect();
    let backends = state.stores.health();
    let failing: Vec<String> = backends
        .iter()
        .filter_map(|(name, health)| health.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect();
    let names: Vec<&str> = backends.iter().map(|(name, _)| *name).collect();
    if let Err(e) = control_db {
        add(
            "storage",
            HealthStatus::Unhealthy,
            format!("the control group's database cannot be read: {e}"),
        );
    } else if !failing.is_empty() {
        add(
            "storage",
            HealthStatus::Unhealthy,
            format!(
                "storage backend failing, streams refused until it answers: {}",
                failing.join("; ")
            ),
        );
    } else if !leaderless.is_empty() {
        add(
            "storage",
            HealthStatus::Degraded,
            format!("data stream groups without a leader: {leaderless:?}"),
        );
    } else {
        add(
            "storage",
            HealthStatus::Healthy,
            format!(
                "{} answering; every data stream group has a leader",
                names.join(" and ")
            ),
        );
    }
    let worst = components
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(HealthStatus::Healthy as i32);
    GetHealthResponse {
        status: worst,
        components,
        checked_at_unix_ms: crate::storage::now_ms(),
    }
}

#[tonic::async_trait]
impl ServiceControllerService for Controller {
    async fn start(
        &self,
        _request: Request<StartRequest>,
    ) -> Result<Response<StartResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.state
            .control
            .push(ControlRequest::Lifecycle(LifecycleRequest::Start { reply }))
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        let outcome = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .map_err(|_| Status::deadline_exceeded("the mesh did not start within 10 s"))?
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        Ok(Response::new(match outcome {
            Ok(()) => StartResponse {
                success: true,
                message: "the mesh is active".into(),
            },
            Err(e) => StartResponse {
                success: false,
                message: e.to_string(),
            },
        }))
    }

    async fn stop(&self, request: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        let request = request.into_inner();
        if request.grace_period_seconds > 300 {
            return Err(Status::invalid_argument(
                "grace_period_seconds is at most 300",
            ));
        }
        let grace = Duration::from_secs(request.grace_period_seconds.into());
        let save_state = request.save_state;
        tracing::info!(
            grace = request.grace_period_seconds,
            save_state,
            "stop asked by the supervisor"
        );
        // The workers answer after their turn; a turn waits on the store at most its timeout.
        let unreleased = tokio::time::timeout(CALL_DEADLINE, self.state.streams.unreleased())
            .await
            .ok()
            .flatten();
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            // Let the answer leave first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            // The grace: messages already published on this node's streams reach their
            // targets (and are released) before it goes, for up to the grace period.
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline {
                match state.streams.unreleased().await {
                    Some(0) => break,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            if save_state && !super::platform::save_final(&state, Duration::from_secs(3)).await {
                tracing::warn!("the final state could not be written to the storage backend");
            }
            // Then the same way out as SIGTERM: goodbyes to the peers, the stream workers
            // commit, the api ends its calls (each stage bounded), and the process exits.
            // SAFETY: kill(2) on our own pid with a valid signal has no memory effects.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
        });
        let waiting = match unreleased {
            Some(0) => String::new(),
            Some(n) => format!(
                "; waiting up to {} s for {n} published stream messages to reach their targets",
                grace.as_secs()
            ),
            None => "; the stream store is failing: nothing to wait for".into(),
        };
        Ok(Response::new(StopResponse {
            success: true,
            message: format!(
                "stopping{waiting}{}: peers are told goodbye and the process exits",
                if save_state {
                    "; this node's final state is written to the platform tables"
                } else {
                    ""
                }
            ),
        }))
    }

    async fn get_health(
        &self,
        _request: Request<GetHealthRequest>,
    ) -> Result<Response<GetHealthResponse>, Status> {
        Ok(Response::new(health(&self.state).await))
    }

    async fn configure(
        &self,
        request: Request<ConfigureRequest>,
    ) -> Result<Response<ConfigureResponse>, Status> {
        let settings = request.into_inner().settings;
        if settings.len() > 64 {
            return Err(Status::invalid_argument("at most 64 settings at once"));
        }
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        for (key, value) in settings {
            if let Err(e) = crate::control::live::parse(&key, &value) {
                refused.push(format!("{key}: {e}"));
                continue;
            }
            let written = self
                .state
                .consensus
                .write(crate::control::raft::MeshCommand::SetPolicy {
                    key: key.clone(),
                    value: value.trim().to_owned(),
                })
                .await;
            match written {
                Ok(_) => applied.push(key),
                Err(e) => refused.push(format!("{key}: {e}")),
            }
        }
        Ok(Response::new(ConfigureResponse {
            success: refused.is_empty(),
            applied,
            refused,
        }))
    }
}

/// Where and how to reach the supervisor.
#[derive(Clone, Debug)]
pub struct SupervisorLink {
    /// Its gRPC address (`host:port` or a URL).
    pub address: String,
    /// Time between heartbeats.
    pub heartbeat: Duration,
    /// What meshd registers as.
    pub info: ServiceInfo,
}

fn endpoint(address: &str) -> Result<tonic::transport::Endpoint, String> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    tonic::transport::Endpoint::from_shared(url)
        .map(|e| e.connect_timeout(CALL_DEADLINE).timeout(CALL_DEADLINE))
        .map_err(|e| e.to_string())
}

/// Registers, heartbeats and (when `stop` fires) unregisters, retrying a supervisor that is
/// away; never returns an error (the node runs without a supervisor).
pub(super) async fn run_link(
    state: Arc<ApiState>,
    link: SupervisorLink,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let endpoint = match endpoint(&link.address) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            tracing::error!(address = %link.address, error = %e, "supervisor address unusable");
            return;
        }
    };
    let client = SupervisorServiceClient::new(endpoint.connect_lazy());
    let mut service_id: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    // The first registration goes at once.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            done = &mut stop => {
                if let Some(id) = service_id.take() {
                    let mut client = client.clone();
                    let request = UnregisterServiceRequest {
                        service_id: id,
                        reason: "meshd is stopping".into(),
                    };
                    match tokio::time::timeout(CALL_DEADLINE, client.unregister_service(request)).await {
                        Ok(Ok(_)) => tracing::info!("unregistered from the supervisor"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "unregistering from the supervisor failed"),
                        Err(_) => tracing::warn!("the supervisor did not answer the unregistering in time"),
                    }
                }
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
        let mut client = client.clone();
        match &service_id {
            None => {
                let request = RegisterServiceRequest {
                    service: Some(link.info.clone()),
                };
                match tokio::time::timeout(CALL_DEADLINE, client.register_service(request)).await {
                    Ok(Ok(answer)) if answer.get_ref().success => {
                        let id = answer.into_inner().service_id;
                        tracing::info!(service_id = %id, address = %link.address, "registered with the supervisor");
                        service_id = Some(id);
                        backoff = Duration::from_millis(500);
                    }
                    Ok(Ok(answer)) => {
                        tracing::warn!(message = %answer.get_ref().message, "the supervisor refused the registration");
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "supervisor away; registering again later");
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Err(_) => backoff = (backoff * 2).min(Duration::from_secs(30)),
                }
            }
            Some(id) => {
                let health = health(&state).await;
                let request = SendHeartbeatRequest {
                    service_id: id.clone(),
                    status: health.status,
                    components: health.components,
                    metrics: heartbeat_metrics(&state),
                    sent_at_unix_ms: crate::storage::now_ms(),
                };
                match tokio::time::timeout(CALL_DEADLINE, client.send_heartbeat(request)).await {
                    Ok(Ok(answer)) if answer.get_ref().acknowledged => {}
                    Ok(Ok(_)) => {
                        // The supervisor forgot us (it restarted): register again.
                        tracing::info!(
                            "the supervisor did not know this registration; registering again"
                        );
                        service_id = None;
                    }
                    Ok(Err(e)) if e.code() == tonic::Code::NotFound => service_id = None,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "heartbeat not delivered; next one in its time")
                    }
                    Err(_) => tracing::debug!("heartbeat not answered in time"),
                }
            }
        }
        wait = if service_id.is_some() {
            link.heartbeat
        } else {
            backoff
        };
    }
}

fn heartbeat_metrics(state: &ApiState) -> std::collections::HashMap<String, i64> {
    let recorded = &crate::metrics::RECORDED;
    let groups = state.streams.groups.status();
    let mut out = BTreeMap::new();
    out.insert(
        "stream_published_total",
        recorded.stream_published.get() as i64,
    );
    out.insert(
        "stream_delivered_total",
        recorded.stream_delivered.get() as i64,
    );
    out.insert("stream_groups", groups.len() as i64);
    out.insert("raft_term", state.consensus.state().term as i64);
    out.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}
