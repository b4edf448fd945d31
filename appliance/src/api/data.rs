//! `MeshData`: Send (unicast over any number of hops, broadcast), SendWithStatusStream,
//! Subscribe, AckMessage and QueryMessageStatus as `core` calls them. The other rpcs answer
//! UNIMPLEMENTED (the generated default) until their issues land.
//!
//! Waiting sends are retransmitted end to end (same message id) every [`RETRANSMIT_INTERVAL`]
//! until the destination reports, so a message caught in a relay that died is sent again over
//! the new path; the destination delivers each message id once.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt;
use meshd_proto::{
    link::{AppAck, Data, DataHeader},
    mesh::{
        Ack, Header, MeshEventType, MeshStateEvent, MessageStatus, MessageStatusInfo,
        QueryMessageStatusRequest, QueryMessageStatusResponse, SendMode, SendRequest, SendResponse,
        SubscribeRequest, mesh_data_server::MeshData,
    },
};
use meshd_shards::{
    command::Outgoing,
    frame::{FrameType, TrafficClass},
};
use prost::Message;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{
    ApiState,
    recent::{MAX_WAIT_SECONDS, Verdict},
    tenant::{MAX_TENANT_LEN, TENANT_HEADER},
    tracker::{MAX_OPEN_WAITING, StatusUpdate, ends_wait},
};
use crate::storage::now_ms;

/// How often a waiting send is sent again while its destination has not answered.
pub(crate) const RETRANSMIT_INTERVAL: Duration = Duration::from_millis(200);

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
pub(super) fn traffic_class(qos_class: u32) -> TrafficClass {
    match qos_class {
        2 => TrafficClass::DbUpdate,
        _ => TrafficClass::Client,
    }
}

fn response(msg_id: u64, update: &StatusUpdate, require_ack: bool) -> Response<SendResponse> {
    Response::new(SendResponse {
        msg_id,
        status: update.status as i32,
        status_message: update.detail.to_string(),
        require_ack,
    })
}

fn status_info(msg_id: u64, update: &StatusUpdate, require_ack: bool) -> MessageStatusInfo {
    MessageStatusInfo {
        msg_id,
        status: update.status as i32,
        status_message: update.detail.to_string(),
        timestamp: update.timestamp_ms,
        require_ack,
    }
}

/// A message accepted and on its way.
pub(crate) struct Submitted {
    pub(crate) msg_id: u64,
    mode: SendMode,
    require_ack: bool,
    timeout: Duration,
}

impl DataService {
    /// Validates, tracks and sends a message; does not wait for its outcome.
    async fn submit(&self, request: SendRequest) -> Result<Submitted, Status> {
        submit(&self.state, request).await
    }
}

/// Validates, tracks and sends a message; does not wait for its outcome. Shared by `Send`,
/// `SendWithStatusStream`, `BroadcastStateEvent` and meshd's batched `Publish`.
pub(crate) async fn submit(
    state: &Arc<ApiState>,
    request: SendRequest,
) -> Result<Submitted, Status> {
    let mode = SendMode::try_from(request.mode).map_err(|_| {
        Status::invalid_argument(format!("mode {} is not a SendMode", request.mode))
    })?;
    let tenant = if request.end_to_end_encrypt {
        Some(e2e_tenant(state, &request)?)
    } else {
        None
    };
    for header in &request.headers {
        if header.key.is_empty() {
            return Err(Status::invalid_argument("a header has an empty key"));
        }
    }
    let require_ack = request.require_ack || mode == SendMode::WaitForAck;
    // The id is given by the tracker once the message is accepted; until then the largest id
    // stands in, so the size check below counts the id's widest encoding.
    let mut data = Data {
        msg_id: u64::MAX,
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
        ..Data::default()
    };
    // Sealing adds the tag, the nonce, the day and the tenant's name.
    let encoded_len = data.encoded_len() + tenant.as_ref().map_or(0, |t| 64 + t.len());
    if encoded_len > state.max_payload_bytes {
        return Err(Status::invalid_argument(format!(
            "message is {encoded_len} bytes with its headers; the limit is {} \
                 (network.max_payload_bytes)",
            state.max_payload_bytes
        )));
    }
    let seconds = if request.timeout_seconds == 0 {
        state.default_timeout_seconds
    } else {
        request.timeout_seconds
    };
    if u64::from(seconds) > MAX_WAIT_SECONDS {
        return Err(Status::invalid_argument(format!(
            "timeout_seconds {seconds} is above {MAX_WAIT_SECONDS}: destinations remember a \
             waiting send's copies only that long"
        )));
    }
    let timeout = Duration::from_secs(u64::from(seconds));
    let queued = StatusUpdate {
        status: MessageStatus::Queued,
        detail: "".into(),
        timestamp_ms: now_ms(),
    };
    let class = traffic_class(request.qos_class);
    // Messages of one correlation id form a flow that stays on one path, in order.
    let flow = u128::from(request.corr_id);
    let local = state.node_id;

    let msg_id = if request.dst_node == 0 {
        let mut targets = state.reachable_nodes().await?;
        targets.push(local);
        targets.sort_unstable();
        targets.dedup();
        let msg_id = state
            .tracker()
            .insert_broadcast(&targets, require_ack, queued);
        data.msg_id = msg_id;
        let payload: Bytes = match &tenant {
            // Local subscribers get the plaintext; every other node the sealed copy.
            Some(tenant) => {
                let mut wire = data.clone();
                if let Err(status) = seal(state, &mut wire, tenant) {
                    state.tracker().settle(msg_id, None);
                    return Err(status);
                }
                super::wire_payload(&wire)
            }
            None => super::wire_payload(&data),
        };
        let verdict = state.deliver_locally(local, &data).await;
        state
            .tracker()
            .update(msg_id, Some(local), verdict_update(verdict));
        for target in targets.into_iter().filter(|t| *t != local) {
            let copy = Outgoing {
                chunk: (0, 0),
                dst: target,
                frame_type: FrameType::Data,
                traffic_class: class,
                msg_id,
                flow,
                payload: payload.clone(),
            };
            state.hand_over(copy).await?;
        }
        msg_id
    } else if request.dst_node == local {
        let msg_id = state.tracker().insert(local, require_ack, queued);
        data.msg_id = msg_id;
        let verdict = state.deliver_locally(local, &data).await;
        state
            .tracker()
            .update(msg_id, None, verdict_update(verdict));
        msg_id
    } else if !state.is_known(request.dst_node).await? {
        // Known at call time, so said at call time: a fire-and-forget caller (core) reads the
        // status of this answer and would otherwise see QUEUED for a message that cannot go.
        let dst = request.dst_node;
        let undeliverable = StatusUpdate {
            status: MessageStatus::Undeliverable,
            detail: format!("node {dst} has never been part of this mesh").into(),
            timestamp_ms: now_ms(),
        };
        state.tracker().insert(dst, require_ack, undeliverable)
    } else if mode == SendMode::FireAndForget {
        let dst = request.dst_node;
        let msg_id = state.tracker().insert(dst, require_ack, queued);
        data.msg_id = msg_id;
        if let Some(tenant) = &tenant
            && let Err(status) = seal(state, &mut data, tenant)
        {
            // The mesh changed since the tenant was checked: nothing was sent.
            state.tracker().settle(msg_id, None);
            return Err(status);
        }
        if let Err(status) = state.hold_if_saturated(dst, class).await {
            state.tracker().settle(msg_id, None);
            return Err(status);
        }
        let payload = super::wire_payload(&data);
        state
            .send_frame(dst, FrameType::Data, class, msg_id, flow, payload)
            .await?;
        msg_id
    } else {
        let dst = request.dst_node;
        if encoded_len + WAITING_FIELDS_LEN > state.max_payload_bytes {
            return Err(Status::invalid_argument(format!(
                "message is {encoded_len} bytes with its headers; a waiting send's limit is {} \
                 (network.max_payload_bytes less {WAITING_FIELDS_LEN} for its sequence fields)",
                state.max_payload_bytes - WAITING_FIELDS_LEN
            )));
        }
        if !state.tracker().can_open_waiting() {
            return Err(Status::resource_exhausted(format!(
                "{MAX_OPEN_WAITING} waiting sends are open on this node; wait for some to finish"
            )));
        }
        let (session, seq, floor) = state.open_waiting(dst)?;
        let msg_id = {
            let mut tracker = state.tracker();
            let msg_id = tracker.insert(dst, require_ack, queued);
            tracker.begin_waiting(msg_id);
            tracker.note_attempt(msg_id);
            msg_id
        };
        data.msg_id = msg_id;
        data.src_session = session;
        data.seq = seq;
        data.floor = floor;
        data.attempt = 1;
        data.dst_generation = state.generation_of(dst);
        // Sealed once: every retransmitted copy carries the same ciphertext.
        if let Some(tenant) = &tenant
            && let Err(status) = seal(state, &mut data, tenant)
        {
            state.tracker().settle(msg_id, None);
            state.close_waiting(dst, seq);
            return Err(status);
        }
        let payload = super::wire_payload(&data);
        let sent = match state.hold_if_saturated(dst, class).await {
            Ok(()) => {
                state
                    .send_frame(dst, FrameType::Data, class, msg_id, flow, payload)
                    .await
            }
            Err(status) => Err(status),
        };
        if let Err(status) = sent {
            state.tracker().settle(msg_id, None);
            state.close_waiting(dst, seq);
            return Err(status);
        }
        let state = Arc::clone(state);
        tokio::spawn(retransmit(state, dst, class, flow, data, timeout));
        msg_id
    };
    Ok(Submitted {
        msg_id,
        mode,
        require_ack,
        timeout,
    })
}

fn status((status, detail): (MessageStatus, String)) -> StatusUpdate {
    StatusUpdate {
        status,
        detail: detail.into(),
        timestamp_ms: now_ms(),
    }
}

/// The tenant of an end-to-end encrypted send (its `tenant` header), once this node is known
/// to hold that tenant's key; checked before the message is tracked.
fn e2e_tenant(state: &ApiState, request: &SendRequest) -> Result<String, Status> {
    let tenant = request
        .headers
        .iter()
        .find(|h| h.key == TENANT_HEADER)
        .and_then(|h| std::str::from_utf8(&h.value).ok())
        .filter(|t| !t.is_empty() && t.len() <= MAX_TENANT_LEN)
        .ok_or_else(|| {
            Status::invalid_argument(
                "end_to_end_encrypt needs a `tenant` header naming the tenant (1 to 128 bytes)",
            )
        })?;
    state
        .tenant_keys
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .serves(tenant)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    Ok(tenant.to_owned())
}

/// Seals `data.payload` for `tenant` (its message id must be set).
fn seal(state: &ApiState, data: &mut Data, tenant: &str) -> Result<(), Status> {
    let sealed = state
        .tenant_keys
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .seal(
            tenant,
            state.node_id,
            data.msg_id,
            now_ms(),
            rand::random(),
            &data.payload,
        )
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    data.payload = sealed.ciphertext.into();
    data.tenant = tenant.to_owned();
    data.key_epoch = sealed.epoch;
    data.nonce = sealed.nonce.to_vec().into();
    Ok(())
}

fn verdict_update(verdict: Verdict) -> StatusUpdate {
    status((verdict.status(), verdict.detail().to_owned()))
}

/// How long past its timeout a waiting `Send` waits for the settled answer.
const SETTLE_GRACE: Duration = Duration::from_millis(500);

/// Room the sequence fields of a waiting send take in its encoding, at most (five varint
/// fields with their tags).
const WAITING_FIELDS_LEN: usize = 48;

/// Sends a waiting message again until its destination answers or its time is up, then
/// settles it.
///
/// Each copy carries the current floor and its attempt number, so the destination de-dupes
/// exactly (`recent.rs`). At the deadline a message still QUEUED gets a final answer that
/// never claims less than what may have happened: PENDING_NODE only when no copy ever left
/// this node (every attempt came back from a shard as unsendable), otherwise QUEUED with
/// "outcome unknown" — a copy left, and may have been delivered with its report lost.
async fn retransmit(
    state: Arc<ApiState>,
    dst: u64,
    class: TrafficClass,
    flow: u128,
    mut data: Data,
    timeout: Duration,
) {
    let msg_id = data.msg_id;
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(RETRANSMIT_INTERVAL.min(deadline - now)).await;
        if Instant::now() >= deadline || !state.tracker().wants_retransmit(msg_id) {
            break;
        }
        data.attempt += 1;
        data.floor = state.waiting_floor(dst);
        state.tracker().note_attempt(msg_id);
        let payload = super::wire_payload(&data);
        if state
            .send_frame(dst, FrameType::Data, class, msg_id, flow, payload)
            .await
            .is_err()
        {
            break;
        }
    }
    // Let the last copy's failure report (if any) come back before judging.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (attempts, failed) = state.tracker().attempts(msg_id).unwrap_or((1, 0));
    let seconds = timeout.as_secs();
    let outcome = if failed >= attempts {
        status((
            MessageStatus::PendingNode,
            format!("node {dst} unreachable for {seconds} s: no copy left this node"),
        ))
    } else {
        status((
            MessageStatus::Queued,
            format!(
                "outcome unknown: no answer from node {dst} within {seconds} s; a copy left \
                 this node and may have been delivered"
            ),
        ))
    };
    state.tracker().settle(msg_id, Some(outcome));
    state.close_waiting(dst, data.seq);
}

#[tonic::async_trait]
impl MeshData for DataService {
    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let submitted = self.submit(request.into_inner()).await?;
        let state = &self.state;
        let (msg_id, require_ack) = (submitted.msg_id, submitted.require_ack);
        let current = || {
            state
                .tracker()
                .get(msg_id)
                .map(|(u, _)| u)
                .unwrap_or_else(|| status((MessageStatus::Unspecified, "forgotten".into())))
        };
        if submitted.mode == SendMode::FireAndForget {
            return Ok(response(msg_id, &current(), require_ack));
        }
        let Some(waiter) = state.tracker().wait(msg_id, submitted.mode) else {
            return Ok(response(msg_id, &current(), require_ack));
        };
        // The retransmission task settles the message at its deadline; the grace lets that
        // final answer (PENDING_NODE or "outcome unknown") be the one returned.
        match tokio::time::timeout(submitted.timeout + SETTLE_GRACE, waiter).await {
            Ok(Ok(update)) => Ok(response(msg_id, &update, require_ack)),
            Ok(Err(_)) | Err(_) => {
                let mut now = current();
                if !ends_wait(submitted.mode, require_ack, now.status) {
                    now.detail = format!(
                        "timed out after {} s waiting for {:?}",
                        submitted.timeout.as_secs(),
                        submitted.mode
                    )
                    .into();
                }
                Ok(response(msg_id, &now, require_ack))
            }
        }
    }

    async fn send_with_status_stream(
        &self,
        request: Request<SendRequest>,
    ) -> Result<Response<BoxStream<MessageStatusInfo>>, Status> {
        let submitted = self.submit(request.into_inner()).await?;
        let (msg_id, require_ack) = (submitted.msg_id, submitted.require_ack);
        let watch = self
            .state
            .tracker()
            .watch(msg_id)
            .ok_or_else(|| Status::internal("message forgotten before it could be watched"))?;
        // The stream ends with the status that ends an ack wait (if the message needs one) or a
        // delivery wait, or when the send's timeout passes.
        let final_mode = if require_ack {
            SendMode::WaitForAck
        } else {
            SendMode::WaitForDelivery
        };
        let deadline = tokio::time::Instant::now() + submitted.timeout;
        let stream = futures::stream::unfold((watch, false), move |(mut watch, done)| async move {
            if done {
                return None;
            }
            let next = tokio::time::timeout_at(deadline, watch.next())
                .await
                .ok()
                .flatten()?;
            let done = ends_wait(final_mode, require_ack, next.status);
            Some((Ok(status_info(msg_id, &next, require_ack)), (watch, done)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<BoxStream<meshd_proto::mesh::Received>>, Status> {
        let request = request.into_inner();
        let rx =
            self.state
                .add_subscriber(request.partition, request.qos_class, request.src_node)?;
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
                Some(state.node_id),
                self::status((status, ack.message)),
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
                0,
                payload.into(),
            )
            .await?;
        Ok(Response::new(()))
    }

    async fn broadcast_state_event(
        &self,
        request: Request<MeshStateEvent>,
    ) -> Result<Response<()>, Status> {
        let mut event = request.into_inner();
        let kind = MeshEventType::try_from(event.event_type).map_err(|_| {
            Status::invalid_argument(format!(
                "event_type {} is not a MeshEventType",
                event.event_type
            ))
        })?;
        if kind == MeshEventType::MeshEventUnspecified {
            return Err(Status::invalid_argument("event_type must be set"));
        }
        if event.originator_node == 0 {
            event.originator_node = self.state.node_id;
        }
        if event.timestamp == 0 {
            event.timestamp = now_ms();
        }
        // Every node's subscribers, this node's included, get it as a broadcast message that
        // says what it is; the payload is the event itself.
        let send = SendRequest {
            dst_node: 0,
            headers: vec![
                Header {
                    key: "message_type".into(),
                    value: b"mesh_state_event".to_vec().into(),
                },
                Header {
                    key: "event_type".into(),
                    value: kind.as_str_name().as_bytes().to_vec().into(),
                },
                Header {
                    key: "source_node".into(),
                    value: event.originator_node.to_string().into_bytes().into(),
                },
            ],
            payload: event.encode_to_vec().into(),
            end_to_end_encrypt: false,
            partition: 0,
            qos_class: 0,
            corr_id: event.sequence_number,
            require_ack: false,
            mode: SendMode::FireAndForget as i32,
            timeout_seconds: 0,
        };
        self.submit(send).await?;
        Ok(Response::new(()))
    }

    async fn query_message_status(
        &self,
        request: Request<QueryMessageStatusRequest>,
    ) -> Result<Response<QueryMessageStatusResponse>, Status> {
        let ids = request.into_inner().msg_ids;
        if ids.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 msg_ids per query"));
        }
        let tracker = self.state.tracker();
        let message_statuses = ids
            .into_iter()
            .map(|id| match tracker.get(id) {
                Some((update, require_ack)) => status_info(id, &update, require_ack),
                None => MessageStatusInfo {
                    msg_id: id,
                    status: MessageStatus::Unspecified as i32,
                    status_message: "unknown message id (never sent here, or forgotten)".into(),
                    timestamp: 0,
                    require_ack: false,
                },
            })
            .collect();
        Ok(Response::new(QueryMessageStatusResponse {
            message_statuses,
        }))
    }

    async fn request_database_sync(
        &self,
        request: Request<meshd_proto::mesh::DatabaseSyncRequest>,
    ) -> Result<Response<meshd_proto::mesh::DatabaseSyncResponse>, Status> {
        super::updates::database_sync(&self.state, request.into_inner()).await
    }
}
