//! `MeshControl`: GetSessions, AddSession and DropSession. The other rpcs answer UNIMPLEMENTED
//! (the generated default) until their issues land.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use meshd_proto::mesh::{
    AddSessionRequest, AddSessionResponse, DropSessionRequest, DropSessionResponse,
    GetSessionsRequest, GetSessionsResponse, SessionInfo, mesh_control_server::MeshControl,
};
use meshd_shards::{command::ShardInput, handshake::Role};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::ApiState;
use crate::control::ControlRequest;

/// The `MeshControl` service.
pub(crate) struct ControlService {
    state: Arc<ApiState>,
}

impl ControlService {
    pub(crate) fn new(state: Arc<ApiState>) -> Self {
        Self { state }
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
    async fn get_sessions(
        &self,
        _request: Request<GetSessionsRequest>,
    ) -> Result<Response<GetSessionsResponse>, Status> {
        let mut sessions = Vec::new();
        for shard in self.state.shards.iter() {
            let (reply, answer) = futures::channel::oneshot::channel();
            if shard.push(ShardInput::Sessions { reply }).await.is_err() {
                return Err(Status::unavailable("the node is shutting down"));
            }
            let snapshots = answer
                .await
                .map_err(|_| Status::unavailable("a shard stopped while answering"))?;
            sessions.extend(snapshots.into_iter().map(|s| SessionInfo {
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
            }));
        }
        sessions.sort_by_key(|s| s.peer_node_id);
        Ok(Response::new(GetSessionsResponse { sessions }))
    }

    async fn add_session(
        &self,
        request: Request<AddSessionRequest>,
    ) -> Result<Response<AddSessionResponse>, Status> {
        let request = request.into_inner();
        let text = request.addr.trim().to_owned();
        let addr: SocketAddr = match text.parse() {
            Ok(addr) => addr,
            Err(_) => match tokio::net::lookup_host(&text)
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
        let limit = if request.timeout_seconds == 0 {
            DEFAULT_ADD_SESSION_TIMEOUT
        } else {
            Duration::from_secs(u64::from(request.timeout_seconds))
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
            Ok(Ok(Ok((peer, remote)))) => Ok(Response::new(AddSessionResponse {
                success: true,
                message: format!("session with node {peer} is up"),
                error_code: String::new(),
                peer_node_id: peer,
                remote_addr: remote.to_string(),
            })),
            Ok(Ok(Err(error))) => Ok(add_failure("CONNECTION_FAILED", error.to_string(), &text)),
            Ok(Err(_)) => Err(Status::unavailable("the node is shutting down")),
            Err(_) => {
                let _ = self
                    .state
                    .control
                    .try_push(ControlRequest::ForgetTarget { addr });
                Ok(add_failure(
                    "TIMEOUT",
                    format!("no session with {text} within {} s", limit.as_secs()),
                    &text,
                ))
            }
        }
    }

    async fn drop_session(
        &self,
        request: Request<DropSessionRequest>,
    ) -> Result<Response<DropSessionResponse>, Status> {
        let peer = request.into_inner().peer_node_id;
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
        let existed = answer.await.unwrap_or(false);
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
}
