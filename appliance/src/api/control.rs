//! `MeshControl`: sessions, routing table, topology, message metrics, consensus state (SWIM's
//! counts and the control group's Raft state), SetPolicy (a live setting written through the
//! control group). InjectNeighbor answers UNIMPLEMENTED (the generated default). Also meshd's
//! own `MeshService` (lifecycle, AddLink, DropLink, EstablishFullLinks, GetMeshStatus,
//! WatchMeshEvents, Publish, the control group's updates).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use meshd_proto::{
    link::{
        AddLinkRequest, AddLinkResponse, DropLinkRequest, DropLinkResponse,
        EstablishFullLinksRequest, EstablishFullLinksResponse, EvictNodeRequest,
        GetMeshStatusRequest, JoinMeshRequest, LeaveMeshRequest, LeaveMeshResponse, MeshEvent,
        MeshStatus, PublishAck, PublishBatch, SeedMeshRequest, StartMeshRequest, StopMeshRequest,
        WatchMeshEventsRequest, mesh_service_server::MeshService,
    },
    mesh::{
        AddSessionRequest, AddSessionResponse, DropSessionRequest, DropSessionResponse,
        GetConsensusStateRequest, GetConsensusStateResponse, GetMessageMetricsRequest,
        GetMessageMetricsResponse, GetRoutingTableRequest, GetRoutingTableResponse,
        GetSessionsRequest, GetSessionsResponse, GetTopologyRequest, GetTopologyResponse, LaneInfo,
        MessageStatus, NeighborInfo, RouteEntry, SessionInfo, TopologySnapshot,
        TriggerConsensusCheckRequest, TriggerConsensusCheckResponse,
        mesh_control_server::MeshControl,
    },
};
use meshd_shards::handshake::Role;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{ApiState, mesh};
use crate::control::{
    ControlRequest, RoutingSnapshot,
    lifecycle::{LifecycleError, LifecycleRequest, Reply},
};

/// The `MeshControl` service.
pub(crate) struct ControlService {
    state: Arc<ApiState>,
}

impl ControlService {
    pub(crate) fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }
}

fn route_entries(snapshot: &RoutingSnapshot) -> Vec<RouteEntry> {
    snapshot
        .routes
        .iter()
        .map(|r| RouteEntry {
            dst_node: r.destination,
            next_hops: r.next_hops.iter().map(|(peer, _)| *peer).collect(),
            // The wire field is an integer: cost in thousandths.
            cost: (r.cost * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32,
            epoch: snapshot.epoch as u32,
        })
        .collect()
}

/// Outcome of an add request, shared by AddSession and AddLink.
enum AddOutcome {
    Linked(u64, SocketAddr),
    Failed(String),
    TimedOut(Duration),
}

impl ControlService {
    async fn add(&self, text: &str, timeout_seconds: u32) -> Result<AddOutcome, Status> {
        let addr: SocketAddr = match text.parse() {
            Ok(addr) => addr,
            Err(_) => match tokio::net::lookup_host(text)
                .await
                .ok()
                .and_then(|mut a| a.next())
            {
                Some(addr) => addr,
                None => {
                    return Err(Status::invalid_argument(format!(
                        "addr {text:?} is not IP:port (or host:port that resolves)"
                    )));
                }
            },
        };
        if addr.port() == 0 {
            return Err(Status::invalid_argument("addr needs a non-zero port"));
        }
        let limit = if timeout_seconds == 0 {
            DEFAULT_ADD_SESSION_TIMEOUT
        } else {
            Duration::from_secs(u64::from(timeout_seconds))
        };
        let (reply, answer) = oneshot::channel();
        if self
            .state
            .control
            .push(ControlRequest::AddSession { addr, reply })
            .await
            .is_err()
        {
            return Err(Status::unavailable("the node is shutting down"));
        }
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(Ok((peer, remote)))) => Ok(AddOutcome::Linked(peer, remote)),
            Ok(Ok(Err(error))) => Ok(AddOutcome::Failed(error.to_string())),
            Ok(Err(_)) => Err(Status::unavailable("the node is shutting down")),
            Err(_) => {
                let _ = self
                    .state
                    .control
                    .try_push(ControlRequest::ForgetTarget { addr });
                Ok(AddOutcome::TimedOut(limit))
            }
        }
    }

    async fn drop_peer(&self, peer: u64) -> Result<bool, Status> {
        if peer == 0 {
            return Err(Status::invalid_argument("peer_node_id must be set"));
        }
        if peer == self.state.node_id {
            return Err(Status::invalid_argument("peer_node_id is this node"));
        }
        let (reply, answer) = oneshot::channel();
        if self
            .state
            .control
            .push(ControlRequest::DropSession { peer, reply })
            .await
            .is_err()
        {
            return Err(Status::unavailable("the node is shutting down"));
        }
        Ok(answer.await.unwrap_or(false))
    }
}

const DEFAULT_ADD_SESSION_TIMEOUT: Duration = Duration::from_secs(30);

fn add_failure(code: &str, message: String, addr: &str) -> Response<AddSessionResponse> {
    Response::new(AddSessionResponse {
        success: false,
        message,
        error_code: code.into(),
        peer_node_id: 0,
        remote_addr: addr.into(),
    })
}

#[tonic::async_trait]
impl MeshControl for ControlService {
    async fn set_policy(
        &self,
        request: Request<meshd_proto::mesh::SetPolicyRequest>,
    ) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        crate::control::live::parse(&request.key, &request.value)
            .map_err(Status::invalid_argument)?;
        self.state
            .consensus
            .write(crate::control::raft::MeshCommand::SetPolicy {
                key: request.key,
                value: request.value.trim().to_owned(),
            })
            .await
            .map_err(super::updates::status_of)?;
        Ok(Response::new(()))
    }

    async fn get_sessions(
        &self,
        _request: Request<GetSessionsRequest>,
    ) -> Result<Response<GetSessionsResponse>, Status> {
        let mut sessions: Vec<SessionInfo> = self
            .state
            .sessions()
            .await?
            .into_iter()
            .map(|s| SessionInfo {
                peer_node_id: s.peer,
                remote_addr: s.remote_addr.to_string(),
                state: match s.role {
                    Role::Dialer => format!("{} (outbound)", s.state),
                    Role::Acceptor => format!("{} (inbound)", s.state),
                },
                rtt_microseconds: s.srtt_us,
                bytes_sent: s.bytes_sent,
                bytes_received: s.bytes_received,
                frames_sent: s.frames_sent,
                frames_received: s.frames_received,
                is_tls: true,
                lanes: s
                    .lanes
                    .iter()
                    .map(|l| LaneInfo {
                        name: l.name.into(),
                        remote_addr: l.remote_addr.to_string(),
                        rtt_microseconds: l.srtt_us,
                        bytes_sent: l.bytes_sent,
                        bytes_received: l.bytes_received,
                        frames_sent: l.frames_sent,
                        frames_received: l.frames_received,
                        queued_bytes: l.queued_bytes,
                        uptime_ms: l.uptime_ms,
                    })
                    .collect(),
            })
            .collect();
        sessions.sort_by_key(|s| s.peer_node_id);
        Ok(Response::new(GetSessionsResponse { sessions }))
    }

    async fn add_session(
        &self,
        request: Request<AddSessionRequest>,
    ) -> Result<Response<AddSessionResponse>, Status> {
        let request = request.into_inner();
        let text = request.addr.trim().to_owned();
        Ok(match self.add(&text, request.timeout_seconds).await? {
            AddOutcome::Linked(peer, remote) => Response::new(AddSessionResponse {
                success: true,
                message: format!("session with node {peer} is up"),
                error_code: String::new(),
                peer_node_id: peer,
                remote_addr: remote.to_string(),
            }),
            AddOutcome::Failed(error) => add_failure("CONNECTION_FAILED", error, &text),
            AddOutcome::TimedOut(limit) => add_failure(
                "TIMEOUT",
                format!("no session with {text} within {} s", limit.as_secs()),
                &text,
            ),
        })
    }

    async fn drop_session(
        &self,
        request: Request<DropSessionRequest>,
    ) -> Result<Response<DropSessionResponse>, Status> {
        let peer = request.into_inner().peer_node_id;
        let existed = self.drop_peer(peer).await?;
        Ok(Response::new(if existed {
            DropSessionResponse {
                success: true,
                message: format!("session with node {peer} dropped"),
                error_code: String::new(),
            }
        } else {
            DropSessionResponse {
                success: false,
                message: format!("no session with node {peer}"),
                error_code: "SESSION_NOT_FOUND".into(),
            }
        }))
    }

    async fn get_routing_table(
        &self,
        _request: Request<GetRoutingTableRequest>,
    ) -> Result<Response<GetRoutingTableResponse>, Status> {
        let snapshot = self.state.routing().await?;
        Ok(Response::new(GetRoutingTableResponse {
            routes: route_entries(&snapshot),
            current_epoch: snapshot.epoch as u32,
        }))
    }

    async fn get_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<GetTopologyResponse>, Status> {
        let snapshot = self.state.routing().await?;
        let epoch = snapshot.epoch as u32;
        Ok(Response::new(GetTopologyResponse {
            topology: Some(TopologySnapshot {
                local_node_id: snapshot.local,
                current_epoch: epoch,
                neighbors: snapshot
                    .neighbors
                    .iter()
                    .map(|n| NeighborInfo {
                        node_id: n.node_id,
                        addr: n.addr.clone(),
                        connected: n.connected,
                        epoch,
                    })
                    .collect(),
                routes: route_entries(&snapshot),
            }),
        }))
    }

    async fn get_message_metrics(
        &self,
        _request: Request<GetMessageMetricsRequest>,
    ) -> Result<Response<GetMessageMetricsResponse>, Status> {
        let tracker = self.state.tracker();
        let counts = tracker.counts();
        let count = |s: MessageStatus| counts.get(&(s as i32)).copied().unwrap_or(0);
        let remembered: u64 = counts.values().sum();
        let success = count(MessageStatus::Delivered) + count(MessageStatus::AckSuccess);
        let failure = count(MessageStatus::Undeliverable) + count(MessageStatus::AckFailure);
        let pending = count(MessageStatus::Queued)
            + count(MessageStatus::PendingNode)
            + count(MessageStatus::PendingClient)
            + count(MessageStatus::WaitingForClientAck);
        let percent = |n: u64| {
            if remembered == 0 {
                0.0
            } else {
                n as f64 * 100.0 / remembered as f64
            }
        };
        Ok(Response::new(GetMessageMetricsResponse {
            total_messages: tracker.total(),
            undeliverable: count(MessageStatus::Undeliverable),
            queued: count(MessageStatus::Queued),
            pending_node: count(MessageStatus::PendingNode),
            pending_client: count(MessageStatus::PendingClient),
            delivered: count(MessageStatus::Delivered),
            waiting_for_ack: count(MessageStatus::WaitingForClientAck),
            ack_success: count(MessageStatus::AckSuccess),
            ack_failure: count(MessageStatus::AckFailure),
            success_rate: percent(success),
            failure_rate: percent(failure),
            pending_rate: percent(pending),
        }))
    }

    async fn get_consensus_state(
        &self,
        _request: Request<GetConsensusStateRequest>,
    ) -> Result<Response<GetConsensusStateResponse>, Status> {
        let snapshot = self.state.mesh().await?;
        let group = self.state.consensus.state();
        Ok(Response::new(GetConsensusStateResponse {
            consensus_state: Some(mesh::consensus_state(&snapshot, &group)),
        }))
    }

    async fn trigger_consensus_check(
        &self,
        _request: Request<TriggerConsensusCheckRequest>,
    ) -> Result<Response<TriggerConsensusCheckResponse>, Status> {
        // SWIM and Raft keep their views current on their own; a check reads both fresh.
        let snapshot = self.state.mesh().await?;
        let group = self.state.consensus.state();
        let state = mesh::consensus_state(&snapshot, &group);
        let message = format!(
            "{} of {} members reachable; control group: {} in term {}, leader {}, voters {:?}; {}",
            state.online_nodes,
            state.total_nodes,
            group.role,
            group.term,
            group
                .leader
                .map_or_else(|| "none".to_owned(), |l| l.to_string()),
            group.voters,
            if state.can_accept_writes {
                "writes are accepted".to_owned()
            } else {
                format!("writes are refused: {}", state.write_refusal)
            }
        );
        Ok(Response::new(TriggerConsensusCheckResponse {
            success: true,
            message,
            consensus_state: Some(state),
        }))
    }
}

impl ControlService {
    /// Hands a lifecycle request to the control core and waits for its answer.
    async fn lifecycle(
        &self,
        make: impl FnOnce(Reply) -> LifecycleRequest,
        wait: Duration,
    ) -> Result<(), Status> {
        let (reply, answer) = oneshot::channel();
        self.state
            .control
            .push(ControlRequest::Lifecycle(make(reply)))
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        let outcome = tokio::time::timeout(wait, answer)
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no answer within {wait:?}")))?
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        outcome.map_err(|error| {
            let text = error.to_string();
            match error {
                LifecycleError::AlreadyMember(_)
                | LifecycleError::NotMember
                | LifecycleError::Refused(_)
                | LifecycleError::Critical(_)
                | LifecycleError::Consensus(_)
                | LifecycleError::Busy => Status::failed_precondition(text),
                LifecycleError::Invalid(_) => Status::invalid_argument(text),
                LifecycleError::Unreachable(_) => Status::unavailable(text),
                LifecycleError::BadKey(_) => Status::permission_denied(text),
                LifecycleError::Timeout(_) => Status::deadline_exceeded(text),
                LifecycleError::UnknownNode(_) => Status::not_found(text),
                LifecycleError::Storage(_) => Status::internal(text),
            }
        })
    }

    async fn status(&self) -> Result<Response<MeshStatus>, Status> {
        let snapshot = self.state.mesh().await?;
        let routing = self.state.routing().await?;
        Ok(Response::new(mesh::mesh_status(&snapshot, &routing)))
    }
}

/// Lifecycle requests that do no network round trip answer at once; this bounds the wait.
const LIFECYCLE_WAIT: Duration = Duration::from_secs(10);
/// LeaveMesh and EvictNode commit through the control group first (its write deadline), and a
/// leaving voter waits for the group to stop counting on it.
const CONSENSUS_CHANGE_WAIT: Duration = Duration::from_secs(30);

#[tonic::async_trait]
impl MeshService for ControlService {
    async fn seed_mesh(
        &self,
        request: Request<SeedMeshRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        let r = request.into_inner();
        self.lifecycle(
            |reply| LifecycleRequest::Seed {
                name: r.name,
                description: r.description,
                policy: r.join_policy,
                key: r.join_key,
                reply,
            },
            LIFECYCLE_WAIT,
        )
        .await?;
        self.status().await
    }

    async fn join_mesh(
        &self,
        request: Request<JoinMeshRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        let r = request.into_inner();
        let addr = r.addr.trim().parse::<SocketAddr>().map_err(|e| {
            Status::invalid_argument(format!("addr {:?} is not IP:port: {e}", r.addr))
        })?;
        let timeout = Duration::from_secs(u64::from(if r.timeout_seconds == 0 {
            30
        } else {
            r.timeout_seconds
        }));
        let authority = match r.mesh_authority.trim() {
            "" => None,
            text => Some(meshd_shards::credential::parse_secret(text).ok_or_else(|| {
                Status::invalid_argument(
                    "mesh_authority is not 64 hex digits (MeshStatus.mesh_authority of a member)",
                )
            })?),
        };
        self.lifecycle(
            |reply| LifecycleRequest::Join {
                addr,
                key: r.join_key,
                authority,
                timeout,
                reply,
            },
            timeout + Duration::from_secs(5),
        )
        .await?;
        self.status().await
    }

    async fn start_mesh(
        &self,
        _request: Request<StartMeshRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        self.lifecycle(|reply| LifecycleRequest::Start { reply }, LIFECYCLE_WAIT)
            .await?;
        self.status().await
    }

    async fn stop_mesh(
        &self,
        _request: Request<StopMeshRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        self.lifecycle(|reply| LifecycleRequest::Stop { reply }, LIFECYCLE_WAIT)
            .await?;
        self.status().await
    }

    async fn leave_mesh(
        &self,
        _request: Request<LeaveMeshRequest>,
    ) -> Result<Response<LeaveMeshResponse>, Status> {
        self.lifecycle(
            |reply| LifecycleRequest::Leave { reply },
            CONSENSUS_CHANGE_WAIT,
        )
        .await?;
        Ok(Response::new(LeaveMeshResponse {
            success: true,
            message: "left the mesh; members were told".into(),
        }))
    }

    async fn evict_node(
        &self,
        request: Request<EvictNodeRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        let node = request.into_inner().node_id;
        self.lifecycle(
            |reply| LifecycleRequest::Evict { node, reply },
            CONSENSUS_CHANGE_WAIT,
        )
        .await?;
        self.status().await
    }

    async fn publish(
        &self,
        request: Request<tonic::Streaming<PublishBatch>>,
    ) -> Result<Response<BoxStream<PublishAck>>, Status> {
        let state = Arc::clone(&self.state);
        let batches = request.into_inner();
        // (state, batches, ended): after a broken client stream one error is sent, then the end.
        let stream = futures::stream::unfold(
            (state, batches, false),
            |(state, mut batches, ended)| async move {
                if ended {
                    return None;
                }
                match batches.message().await {
                    Ok(Some(batch)) => {
                        let ack = super::publish::publish_batch(&state, batch).await;
                        Some((Ok(ack), (state, batches, false)))
                    }
                    Ok(None) => None,
                    Err(status) => Some((Err(status), (state, batches, true))),
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn open_client_data_stream(
        &self,
        request: Request<meshd_proto::link::OpenClientDataStreamRequest>,
    ) -> Result<Response<meshd_proto::link::StreamHandle>, Status> {
        super::streams::open(&self.state, request.into_inner()).await
    }

    async fn publish_client_data(
        &self,
        request: Request<tonic::Streaming<meshd_proto::link::PublishClientDataRequest>>,
    ) -> Result<Response<BoxStream<meshd_proto::link::PublishClientDataResponse>>, Status> {
        Ok(Response::new(super::streams::publish(
            Arc::clone(&self.state),
            request.into_inner(),
        )))
    }

    async fn close_client_data_stream(
        &self,
        request: Request<meshd_proto::link::CloseClientDataStreamRequest>,
    ) -> Result<Response<meshd_proto::link::CloseClientDataStreamResponse>, Status> {
        super::streams::close(&self.state, request.into_inner()).await
    }

    async fn get_stream_groups(
        &self,
        _request: Request<meshd_proto::link::GetStreamGroupsRequest>,
    ) -> Result<Response<meshd_proto::link::GetStreamGroupsResponse>, Status> {
        Ok(Response::new(super::streams::stream_groups(&self.state)))
    }

    async fn get_mesh_status(
        &self,
        _request: Request<GetMeshStatusRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        self.status().await
    }

    async fn send_node_update(
        &self,
        request: Request<meshd_proto::link::NodeUpdate>,
    ) -> Result<Response<meshd_proto::link::BroadcastResult>, Status> {
        super::updates::send_node_update(&self.state, request.into_inner()).await
    }

    async fn send_mesh_update(
        &self,
        request: Request<meshd_proto::link::MeshUpdate>,
    ) -> Result<Response<meshd_proto::link::BroadcastResult>, Status> {
        super::updates::send_mesh_update(&self.state, request.into_inner()).await
    }

    async fn send_internal_db_update(
        &self,
        request: Request<meshd_proto::link::DbUpdate>,
    ) -> Result<Response<meshd_proto::link::BroadcastResult>, Status> {
        super::updates::send_db_update(&self.state, request.into_inner()).await
    }

    async fn watch_mesh_events(
        &self,
        request: Request<WatchMeshEventsRequest>,
    ) -> Result<Response<BoxStream<MeshEvent>>, Status> {
        let node_ids = request.into_inner().node_ids;
        if node_ids.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 node_ids"));
        }
        Ok(Response::new(mesh::watch(&self.state, node_ids)))
    }

    async fn add_link(
        &self,
        request: Request<AddLinkRequest>,
    ) -> Result<Response<AddLinkResponse>, Status> {
        let request = request.into_inner();
        let text = request.addr.trim().to_owned();
        match self.add(&text, request.timeout_seconds).await? {
            AddOutcome::Linked(peer, remote) => Ok(Response::new(AddLinkResponse {
                peer_node_id: peer,
                remote_addr: remote.to_string(),
            })),
            AddOutcome::Failed(error) => Err(Status::unavailable(error)),
            AddOutcome::TimedOut(limit) => Err(Status::deadline_exceeded(format!(
                "no link with {text} within {} s",
                limit.as_secs()
            ))),
        }
    }

    async fn drop_link(
        &self,
        request: Request<DropLinkRequest>,
    ) -> Result<Response<DropLinkResponse>, Status> {
        let peer = request.into_inner().peer_node_id;
        if self.drop_peer(peer).await? {
            Ok(Response::new(DropLinkResponse {}))
        } else {
            Err(Status::not_found(format!("no link with node {peer}")))
        }
    }

    async fn establish_full_links(
        &self,
        _request: Request<EstablishFullLinksRequest>,
    ) -> Result<Response<EstablishFullLinksResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.state
            .control
            .push(ControlRequest::EstablishFullLinks { reply })
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        let dialing = answer
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        Ok(Response::new(EstablishFullLinksResponse {
            dialing: dialing.iter().map(ToString::to_string).collect(),
        }))
    }
}
