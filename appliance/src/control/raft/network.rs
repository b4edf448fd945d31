//! openraft's network, over the mesh: every RPC is a `Raft` frame routed by node id through
//! the control thread, which matches answers to callers by request id.
//!
//! The caller side never waits without a deadline: a call gives up after openraft's
//! `hard_ttl` (or the write deadline), whether the control ring was full, the frame was lost
//! or the peer never answered. A lost answer and a lost request look the same, and openraft
//! retries both.

use std::{error::Error, fmt, time::Duration};

use openraft::{
    EmptyNode,
    error::{
        InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
        Unreachable,
    },
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

use super::TypeConfig;

/// `RaftEnvelope.kind` of an AppendEntries RPC.
pub const KIND_APPEND: u32 = 1;
/// `RaftEnvelope.kind` of a Vote RPC.
pub const KIND_VOTE: u32 = 2;
/// `RaftEnvelope.kind` of an InstallSnapshot RPC (one chunk).
pub const KIND_SNAPSHOT: u32 = 3;
/// `RaftEnvelope.kind` of a write forwarded to the leader.
pub const KIND_WRITE: u32 = 4;

/// One RPC for the control thread to send; the answer's body (or why none came) goes back
/// through `reply`.
#[derive(Debug)]
pub struct RaftCall {
    /// The group it is for (0: the mesh control group; else a data stream group).
    pub group: u64,
    /// The node it is for.
    pub target: u64,
    /// One of the `KIND_*`.
    pub kind: u32,
    /// The request, postcard.
    pub body: Vec<u8>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// Why a call got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// No answer within the deadline (lost request, lost answer, no route, slow peer).
    Timeout,
    /// The control thread is gone (the node is stopping).
    Closed,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("no answer in time"),
            Self::Closed => f.write_str("the node is stopping"),
        }
    }
}

impl Error for CallError {}

/// The calls' way out to the control thread; cheap to clone.
#[derive(Clone, Debug)]
pub struct MeshNetwork {
    calls: mpsc::Sender<RaftCall>,
    /// The group the calls are for (0: the control group).
    group: u64,
    /// The largest body a frame carries (`network.max_payload_bytes` less the envelope and
    /// the origin tag).
    max_body: usize,
}

/// Room left in a frame for the envelope's other fields and the origin tag.
const ENVELOPE_OVERHEAD: usize = 64;

impl MeshNetwork {
    /// A network sending through `calls`, frames of at most `max_payload` bytes.
    pub fn new(calls: mpsc::Sender<RaftCall>, max_payload: usize) -> Self {
        Self {
            calls,
            group: 0,
            max_body: max_payload.saturating_sub(ENVELOPE_OVERHEAD),
        }
    }

    /// The same way out, for the calls of data stream group `group`.
    pub fn for_group(&self, group: u64) -> Self {
        Self {
            group,
            ..self.clone()
        }
    }

    /// The largest request body a call can carry.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Sends one request and waits at most `deadline` for its answer's body.
    pub async fn call(
        &self,
        target: u64,
        kind: u32,
        body: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let (reply, answer) = oneshot::channel();
        let call = RaftCall {
            group: self.group,
            target,
            kind,
            body,
            reply,
        };
        let exchange = async {
            self.calls.send(call).await.map_err(|_| CallError::Closed)?;
            // A dropped sender: the control thread gave up on it (stopping, or swept).
            answer.await.map_err(|_| CallError::Timeout)
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| CallError::Timeout)?
    }
}

/// The client for one target node.
pub struct MeshClient {
    target: u64,
    net: MeshNetwork,
}

type RpcResult<T, E> = Result<T, RPCError<u64, EmptyNode, RaftError<u64, E>>>;

impl MeshClient {
    async fn rpc<Resp, E>(&self, kind: u32, body: Vec<u8>, ttl: Duration) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
    {
        let answer = match self.net.call(self.target, kind, body, ttl).await {
            Ok(answer) => answer,
            // Unreachable makes openraft back off before the next try, rather than spin.
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
        };
        match postcard::from_bytes::<Result<Resp, RaftError<u64, E>>>(&answer) {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

fn encode<T: Serialize, E: Error>(value: &T) -> RpcResult<Vec<u8>, E> {
    postcard::to_allocvec(value).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

/// openraft's network traits for a group's types (the control group's and the data stream
/// groups' differ only in their types).
macro_rules! mesh_network {
    ($types:ty) => {
        impl RaftNetworkFactory<$types> for MeshNetwork {
            type Network = MeshClient;

            async fn new_client(&mut self, target: u64, _node: &EmptyNode) -> Self::Network {
                MeshClient {
                    target,
                    net: self.clone(),
                }
            }
        }

        impl RaftNetwork<$types> for MeshClient {
            async fn append_entries(
                &mut self,
                rpc: AppendEntriesRequest<$types>,
                option: RPCOption,
            ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
                let body = encode(&rpc)?;
                if body.len() > self.net.max_body && rpc.entries.len() > 1 {
                    // openraft retries with fewer entries.
                    let hint = (rpc.entries.len() as u64 / 2).max(1);
                    return Err(RPCError::PayloadTooLarge(
                        PayloadTooLarge::new_entries_hint(hint),
                    ));
                }
                self.rpc(KIND_APPEND, body, option.hard_ttl()).await
            }

            async fn install_snapshot(
                &mut self,
                rpc: InstallSnapshotRequest<$types>,
                option: RPCOption,
            ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
                self.rpc(KIND_SNAPSHOT, encode(&rpc)?, option.hard_ttl())
                    .await
            }

            async fn vote(
                &mut self,
                rpc: VoteRequest<u64>,
                option: RPCOption,
            ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
                self.rpc(KIND_VOTE, encode(&rpc)?, option.hard_ttl()).await
            }
        }
    };
}

mesh_network!(TypeConfig);
mesh_network!(crate::streams::group::GroupTypes);
