//! meshd's batched `Publish`: a batch's messages as fire-and-forget sends, in order, the
//! consecutive small ones to one node in `DataBatch` frames (one header and one origin tag per
//! run; see ARCHITECTURE "Batched frames"). Everything else goes through [`submit`].

use std::sync::Arc;

use meshd_proto::{
    link::{Data, DataHeader, PublishAck, PublishBatch, PublishMessage},
    mesh::{Header, MessageStatus, SendMode, SendRequest},
};
use meshd_shards::frame::MAX_DATA_BATCH;
use tonic::Status;

use super::{
    ApiState,
    data::{submit, traffic_class},
    tracker::StatusUpdate,
};
use crate::storage::now_ms;

/// Largest batch `Publish` accepts.
pub(crate) const MAX_PUBLISH_BATCH: usize = 4096;

/// Bytes of messages a `DataBatch` frame is filled to (a run ends before it would pass them):
/// enough to amortise the tag and the per-frame work, small enough that one frame never holds
/// a link's writer long.
const DATA_BATCH_BYTES: usize = 32 * 1024;

/// Messages larger than this (encoded) go in `Data` frames of their own: batching them saves
/// nothing worth the copy.
const BATCHED_MESSAGE_BYTES: usize = 8 * 1024;

/// Submits one `Publish` batch as fire-and-forget sends, in order; stops at the first bad one.
///
/// Consecutive messages to the same other node, class and correlation id travel together in
/// `DataBatch` frames (one origin tag, one header, one ring slot per run); each keeps its own
/// id, status and delivery report. Broadcasts, messages to this node, large messages and any
/// that fail a check take [`submit`]'s path one by one (which also gives the error).
pub(crate) async fn publish_batch(state: &Arc<ApiState>, batch: PublishBatch) -> PublishAck {
    let total = batch.messages.len();
    if total > MAX_PUBLISH_BATCH {
        return PublishAck {
            msg_ids: Vec::new(),
            rejected: u32::try_from(total).unwrap_or(u32::MAX),
            error: format!("{total} messages in one batch; at most {MAX_PUBLISH_BATCH}"),
        };
    }
    let mut ack = PublishAck {
        msg_ids: Vec::with_capacity(total),
        rejected: 0,
        error: String::new(),
    };
    let run_bytes = DATA_BATCH_BYTES.min(state.max_payload_bytes / 2);
    let mut messages = batch.messages.into_iter().peekable();
    while let Some(first) = messages.next() {
        let done = ack.msg_ids.len();
        let remote = first.dst_node != 0 && first.dst_node != state.node_id;
        let known = remote && matches!(state.is_known(first.dst_node).await, Ok(true));
        let sent = match batched_len(state, &first, run_bytes).filter(|_| known) {
            Some(len) => {
                let key = (first.dst_node, first.qos_class, first.corr_id);
                let mut bytes = len;
                let mut run = vec![first];
                while run.len() < MAX_DATA_BATCH {
                    let Some(next) = messages.peek() else { break };
                    if (next.dst_node, next.qos_class, next.corr_id) != key {
                        break;
                    }
                    // Same destination as the first, so known as well.
                    match batched_len(state, next, run_bytes) {
                        Some(len) if bytes + len <= run_bytes => bytes += len,
                        _ => break,
                    }
                    run.extend(messages.next());
                }
                send_run(state, run).await
            }
            None => submit(state, publish_request(first))
                .await
                .map(|submitted| vec![submitted.msg_id]),
        };
        match sent {
            Ok(ids) => ack.msg_ids.extend(ids),
            Err(status) => {
                ack.rejected = u32::try_from(total - done).unwrap_or(u32::MAX);
                ack.error = status.message().to_owned();
                break;
            }
        }
    }
    ack
}

/// A `Publish` message as the `SendRequest` [`submit`] takes.
fn publish_request(m: PublishMessage) -> SendRequest {
    SendRequest {
        dst_node: m.dst_node,
        headers: m
            .headers
            .into_iter()
            .map(|h| Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        payload: m.payload,
        end_to_end_encrypt: false,
        partition: m.partition,
        qos_class: m.qos_class,
        corr_id: m.corr_id,
        require_ack: m.require_ack,
        mode: SendMode::FireAndForget as i32,
        timeout_seconds: 0,
    }
}

/// The message as `Data` (its id still to be given).
fn publish_data(m: PublishMessage) -> Data {
    Data {
        msg_id: 0,
        corr_id: m.corr_id,
        partition: m.partition,
        qos_class: m.qos_class,
        require_ack: m.require_ack,
        headers: m
            .headers
            .into_iter()
            .map(|h| DataHeader {
                key: h.key,
                value: h.value,
            })
            .collect(),
        payload: m.payload,
        ..Data::default()
    }
}

/// The bytes `m` adds to a `DataBatch` frame, if it may travel in one: to another node, small,
/// every header named (the caller checks the node is known; anything else goes through
/// [`submit`], which sends it alone or says what is wrong with it).
fn batched_len(state: &ApiState, m: &PublishMessage, run_bytes: usize) -> Option<usize> {
    if m.dst_node == 0 || m.dst_node == state.node_id {
        return None;
    }
    if m.headers.iter().any(|h| h.key.is_empty()) {
        return None;
    }
    // Its encoding as `Data` with the widest id, plus the field's key and length.
    let headers: usize = m
        .headers
        .iter()
        .map(|h| h.key.len() + h.value.len() + 8)
        .sum();
    let len = m.payload.len() + headers + 48;
    (len <= BATCHED_MESSAGE_BYTES.min(run_bytes)).then_some(len)
}

/// Tracks and sends one run of messages (same destination, class and correlation id) as a
/// `DataBatch` frame; returns their ids, which follow on from the first.
async fn send_run(state: &Arc<ApiState>, run: Vec<PublishMessage>) -> Result<Vec<u64>, Status> {
    let (dst, qos_class, corr_id) = (run[0].dst_node, run[0].qos_class, run[0].corr_id);
    state
        .hold_if_saturated(dst, traffic_class(qos_class))
        .await?;
    let queued = StatusUpdate {
        status: MessageStatus::Queued,
        detail: "".into(),
        timestamp_ms: now_ms(),
    };
    let mut messages: Vec<Data> = run.into_iter().map(publish_data).collect();
    let first = {
        // One lock for the run: the tracker numbers it with consecutive ids.
        let mut tracker = state.tracker();
        let first = tracker.next_id();
        for data in &mut messages {
            data.msg_id = tracker.insert(dst, data.require_ack, queued.clone());
        }
        first
    };
    let ids: Vec<u64> = messages.iter().map(|d| d.msg_id).collect();
    debug_assert!(ids.iter().zip(first..).all(|(id, want)| *id == want));
    let count = u16::try_from(ids.len()).expect("a run is at most MAX_DATA_BATCH");
    let payload = super::wire_payload(&meshd_proto::link::DataBatch { messages });
    let class = traffic_class(qos_class);
    let flow = u128::from(corr_id);
    if let Err(status) = state
        .send_batch_frame(dst, class, (first, count), flow, payload)
        .await
    {
        let mut tracker = state.tracker();
        for id in &ids {
            tracker.settle(*id, None);
        }
        return Err(status);
    }
    Ok(ids)
}
