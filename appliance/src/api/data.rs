//! `MeshData`: Send, Subscribe and AckMessage as `core` calls them. The other rpcs answer
//! UNIMPLEMENTED (the generated default) until their issues land.

use std::{sync::Arc, time::Duration};

use meshd_proto::{
    link::{AppAck, Data, DataHeader},
    mesh::{
        Ack, MessageStatus, SendMode, SendRequest, SendResponse, SubscribeRequest,
        mesh_data_server::MeshData,
    },
};
use meshd_shards::frame::{FrameType, HEADER_LEN, TrafficClass};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{
    ApiState,
    tracker::{StatusUpdate, ends_wait},
};
use crate::storage::now_ms;

/// The `MeshData` service.
pub(crate) struct DataService {
    state: Arc<ApiState>,
}

impl DataService {
    pub(crate) fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }
}

/// The traffic class a `core` message travels in: its db updates (qos 2) are internal DB
/// traffic, everything else is client traffic.
fn traffic_class(qos_class: u32) -> TrafficClass {
    match qos_class {
        2 => TrafficClass::DbUpdate,
        _ => TrafficClass::Client,
    }
}

fn response(msg_id: u64, update: &StatusUpdate, require_ack: bool) -> Response<SendResponse> {
    Response::new(SendResponse {
        msg_id,
        status: update.status as i32,
        status_message: update.detail.clone(),
        require_ack,
    })
}

#[tonic::async_trait]
impl MeshData for DataService {
    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let request = request.into_inner();
        let state = &self.state;
        let mode = SendMode::try_from(request.mode).map_err(|_| {
            Status::invalid_argument(format!("mode {} is not a SendMode", request.mode))
        })?;
        if request.dst_node == 0 {
            return Err(Status::unimplemented(
                "broadcast (dst_node = 0) arrives with multi-hop routing; send to a node id",
            ));
        }
        if request.end_to_end_encrypt {
            return Err(Status::unimplemented(
                "end_to_end_encrypt arrives with tenant keys; send with it unset",
            ));
        }
        for header in &request.headers {
            if header.key.is_empty() {
                return Err(Status::invalid_argument("a header has an empty key"));
            }
        }
        let require_ack = request.require_ack || mode == SendMode::WaitForAck;
        let msg_id = state.new_msg_id();
        let data = Data {
            msg_id,
            corr_id: request.corr_id,
            partition: request.partition,
            qos_class: request.qos_class,
            require_ack,
            headers: request
                .headers
                .into_iter()
                .map(|h| DataHeader {
                    key: h.key,
                    value: h.value,
                })
                .collect(),
            payload: request.payload,
        };
        let encoded_len = data.encoded_len();
        if encoded_len > state.max_payload_bytes {
            return Err(Status::invalid_argument(format!(
                "message is {encoded_len} bytes with its headers; the limit is {} \
                 (network.max_payload_bytes)",
                state.max_payload_bytes
            )));
        }
        let queued = StatusUpdate {
            status: MessageStatus::Queued,
            detail: String::new(),
            timestamp_ms: now_ms(),
        };
        state
            .tracker()
            .insert(msg_id, request.dst_node, require_ack, queued.clone());
        let waiter = if mode == SendMode::FireAndForget {
            None
        } else {
            state.tracker().wait(msg_id, mode)
        };

        if request.dst_node == state.node_id {
            let (status, detail) = state.deliver_locally(state.node_id, &data);
            state.tracker().update(
                msg_id,
                None,
                StatusUpdate {
                    status,
                    detail,
                    timestamp_ms: now_ms(),
                },
            );
        } else {
            let mut payload = Vec::with_capacity(HEADER_LEN + encoded_len);
            data.encode(&mut payload)
                .map_err(|e| Status::internal(format!("encoding: {e}")))?;
            state
                .send_frame(
                    request.dst_node,
                    FrameType::Data,
                    traffic_class(request.qos_class),
                    msg_id,
                    payload.into(),
                )
                .await?;
        }

        let Some(waiter) = waiter else {
            let (current, _) = state.tracker().get(msg_id).unwrap_or((queued, require_ack));
            return Ok(response(msg_id, &current, require_ack));
        };
        let seconds = if request.timeout_seconds == 0 {
            state.default_timeout_seconds
        } else {
            request.timeout_seconds
        };
        match tokio::time::timeout(Duration::from_secs(u64::from(seconds)), waiter).await {
            Ok(Ok(update)) => Ok(response(msg_id, &update, require_ack)),
            Ok(Err(_)) | Err(_) => {
                let (mut current, _) = state.tracker().get(msg_id).unwrap_or((queued, require_ack));
                if !ends_wait(mode, require_ack, current.status) {
                    current.detail = format!("timed out after {seconds} s waiting for {mode:?}");
                }
                Ok(response(msg_id, &current, require_ack))
            }
        }
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<meshd_proto::mesh::Received>>, Status> {
        let request = request.into_inner();
        let rx = self
            .state
            .add_subscriber(request.partition, request.qos_class, request.src_node);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack_message(&self, request: Request<Ack>) -> Result<Response<()>, Status> {
        let ack = request.into_inner();
        if ack.src_node == 0 || ack.msg_id == 0 {
            return Err(Status::invalid_argument("src_node and msg_id must be set"));
        }
        let state = &self.state;
        if ack.src_node == state.node_id {
            let status = if ack.success {
                MessageStatus::AckSuccess
            } else {
                MessageStatus::AckFailure
            };
            state.tracker().update(
                ack.msg_id,
                None,
                StatusUpdate {
                    status,
                    detail: ack.message,
                    timestamp_ms: now_ms(),
                },
            );
            return Ok(Response::new(()));
        }
        let payload = AppAck {
            msg_id: ack.msg_id,
            success: ack.success,
            message: ack.message,
        }
        .encode_to_vec();
        state
            .send_frame(
                ack.src_node,
                FrameType::AppAck,
                TrafficClass::Client,
                ack.msg_id,
                payload.into(),
            )
            .await?;
        Ok(Response::new(()))
    }
}
