//! The client data stream rpcs: validation here, everything else in the stream workers
//! (`crate::streams`).

use std::{collections::HashSet, sync::Arc};

use bytes::Bytes;
use futures::StreamExt as _;
use meshd_proto::link::{
    ClientData, CloseClientDataStreamRequest, CloseClientDataStreamResponse,
    GetStreamGroupsResponse, OpenClientDataStreamRequest, PublishClientDataRequest,
    PublishClientDataResponse, StreamGroupInfo, StreamGroupStream, StreamHandle,
    SubscribeClientDataRequest, TargetOffset, subscribe_client_data_request::Request as SubRequest,
};
use meshd_shards::streams::{Completion, MAX_TARGETS};
use tokio::sync::{mpsc, oneshot};
use tonic::{Response, Status, Streaming, codegen::BoxStream};

use super::{ApiState, tenant::MAX_TENANT_LEN};
use crate::streams::{
    DEFAULT_WINDOW, MAX_BATCH, MAX_PRIORITY, MAX_SELECTED, MAX_WINDOW, OpenRequest, Published,
    WorkerInput, id_bytes, parse_id,
};

/// Publish batches of one call waiting for their answers at once.
const PUBLISH_IN_FLIGHT: usize = 64;

/// Messages queued for one subscriber (across its streams) at most.
const SUBSCRIBER_QUEUE: usize = 1024;

fn busy() -> Status {
    Status::unavailable("the stream worker is busy; retry")
}

fn stopping() -> Status {
    Status::unavailable("the node is shutting down")
}

fn check_tenant(state: &ApiState, tenant: &str) -> Result<(), Status> {
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN {
        return Err(Status::invalid_argument(format!(
            "tenant: 1..={MAX_TENANT_LEN} bytes"
        )));
    }
    state
        .tenant_keys
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .serves(tenant)
        .map_err(|e| Status::failed_precondition(e.to_string()))
}

/// `OpenClientDataStream`.
pub(crate) async fn open(
    state: &ApiState,
    request: OpenClientDataStreamRequest,
) -> Result<Response<StreamHandle>, Status> {
    check_tenant(state, &request.tenant)?;
    let targets = request.targets;
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(Status::invalid_argument(format!(
            "targets: 1..={MAX_TARGETS} nodes, not {}",
            targets.len()
        )));
    }
    if targets.contains(&state.node_id) || targets.contains(&0) {
        return Err(Status::invalid_argument(
            "targets: this node (or 0) cannot be a target of its own stream",
        ));
    }
    if targets.iter().collect::<HashSet<_>>().len() != targets.len() {
        return Err(Status::invalid_argument("targets: a node is named twice"));
    }
    Completion::from_quorum(request.quorum)
        .check(targets.len())
        .map_err(|e| Status::invalid_argument(format!("quorum: {e}")))?;
    if request.priority > u32::from(MAX_PRIORITY) {
        return Err(Status::invalid_argument(format!(
            "priority: 0..={MAX_PRIORITY}, not {}",
            request.priority
        )));
    }
    for &target in &targets {
        if !state.is_known(target).await? {
            return Err(Status::not_found(format!(
                "node {target} is not in this mesh"
            )));
        }
    }
    let id = ulid::Ulid::new().0;
    let (reply, answer) = oneshot::channel();
    state
        .streams
        .worker_of(id)
        .try_send(WorkerInput::Open {
            request: OpenRequest {
                id,
                tenant: request.tenant.clone(),
                targets: targets.clone(),
                quorum: request.quorum,
                ack_on_source: request.ack_on_source,
                priority: request.priority as u8,
            },
            reply,
        })
        .map_err(|_| busy())?;
    answer.await.map_err(|_| stopping())??;
    Ok(Response::new(StreamHandle {
        stream_id: id_bytes(id),
        tenant: request.tenant,
        targets,
        quorum: request.quorum,
        priority: request.priority,
    }))
}

/// `CloseClientDataStream`.
pub(crate) async fn close(
    state: &ApiState,
    request: CloseClientDataStreamRequest,
) -> Result<Response<CloseClientDataStreamResponse>, Status> {
    let stream = parse_id(&request.stream_id)?;
    let (reply, answer) = oneshot::channel();
    state
        .streams
        .worker_of(stream)
        .try_send(WorkerInput::Close { stream, reply })
        .map_err(|_| busy())?;
    let last_seq = answer.await.map_err(|_| stopping())??;
    Ok(Response::new(CloseClientDataStreamResponse { last_seq }))
}

/// `GetStreamGroups`: the data stream groups as this node sees them.
pub(crate) fn stream_groups(state: &ApiState) -> GetStreamGroupsResponse {
    let groups = state
        .streams
        .groups
        .status()
        .into_iter()
        .map(|g| StreamGroupInfo {
            group: g.group,
            participants: g.participants,
            role: g.role.into(),
            term: g.term,
            leader: g.leader.unwrap_or(0),
            applied_index: g.applied_index,
            streams: g
                .streams
                .into_iter()
                .map(|(id, entry)| StreamGroupStream {
                    stream_id: id_bytes(id),
                    source: entry.source,
                    targets: entry.targets,
                    quorum: entry.quorum,
                    tenant: entry.tenant,
                    producer_epoch: entry.epoch,
                    offsets: entry
                        .offsets
                        .into_iter()
                        .map(|(target, processed)| TargetOffset { target, processed })
                        .collect(),
                })
                .collect(),
            write_retries: g.write_retries,
            dropped_ops: g.dropped_ops,
        })
        .collect();
    GetStreamGroupsResponse { groups }
}

/// Hands one batch to its worker (in call order) and gives the future of its answer.
fn publish_one(
    state: &ApiState,
    request: PublishClientDataRequest,
) -> impl Future<Output = PublishClientDataResponse> + use<> {
    let stream_id = request.stream_id.clone();
    let refused = |status: Status| PublishClientDataResponse {
        stream_id: request.stream_id.clone(),
        code: status.code() as i32,
        error: status.message().to_owned(),
        ..PublishClientDataResponse::default()
    };
    let handed = (|| {
        let stream = parse_id(&request.stream_id)?;
        if request.messages.is_empty() || request.messages.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch has 1..={MAX_BATCH} messages, not {}",
                request.messages.len()
            )));
        }
        let messages: Vec<Bytes> = request.messages.iter().map(|m| m.payload.clone()).collect();
        let (reply, answer) = oneshot::channel();
        state
            .streams
            .worker_of(stream)
            .try_send(WorkerInput::Publish {
                stream,
                first_seq: (request.first_seq != 0).then_some(request.first_seq),
                messages,
                reply,
            })
            .map_err(|_| busy())?;
        Ok(answer)
    })();
    let early = handed.as_ref().err().map(|status| refused(status.clone()));
    async move {
        let Ok(answer) = handed else {
            return early.expect("an error has its answer");
        };
        let outcome: Result<Published, Status> = answer.await.unwrap_or_else(|_| Err(stopping()));
        match outcome {
            Ok(published) => PublishClientDataResponse {
                stream_id,
                first_seq: published.first,
                last_seq: published.last,
                committed: published.committed,
                code: 0,
                error: String::new(),
            },
            Err(status) => PublishClientDataResponse {
                stream_id,
                code: status.code() as i32,
                error: status.message().to_owned(),
                ..PublishClientDataResponse::default()
            },
        }
    }
}

/// `PublishClientData`: batches answered in order, up to [`PUBLISH_IN_FLIGHT`] at once.
pub(crate) fn publish(
    state: Arc<ApiState>,
    requests: Streaming<PublishClientDataRequest>,
) -> BoxStream<PublishClientDataResponse> {
    let responses = requests
        .map(move |request| {
            // Handed to the worker here, as each request arrives: the worker sees the
            // batches in the order the client sent them.
            let answer = request.map(|request| publish_one(&state, request));
            async move {
                match answer {
                    Ok(answer) => Ok(answer.await),
                    Err(status) => Err(status),
                }
            }
        })
        .buffered(PUBLISH_IN_FLIGHT);
    Box::pin(responses)
}

/// `SubscribeClientData`.
pub(crate) async fn subscribe(
    state: Arc<ApiState>,
    mut requests: Streaming<SubscribeClientDataRequest>,
) -> Result<Response<BoxStream<ClientData>>, Status> {
    let first = requests
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("no selection: the first request selects"))?;
    let Some(SubRequest::Select(select)) = first.request else {
        return Err(Status::invalid_argument(
            "the first request must be a selection (select)",
        ));
    };
    check_tenant(&state, &select.tenant)?;
    if select.stream_ids.len() > MAX_SELECTED {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_SELECTED} stream ids"
        )));
    }
    let streams = select
        .stream_ids
        .iter()
        .map(|id| parse_id(id))
        .collect::<Result<Vec<_>, _>>()?;
    let window = match select.window {
        0 => DEFAULT_WINDOW,
        w => w.min(MAX_WINDOW),
    };
    let sub = state.streams.next_sub();
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE.min(window as usize * 4).max(16));
    for worker in state.streams.workers() {
        let input = WorkerInput::Subscribe {
            sub,
            tenant: select.tenant.clone(),
            streams: streams.clone(),
            window,
            tx: tx.clone(),
        };
        if worker.send(input).await.is_err() {
            return Err(stopping());
        }
    }
    drop(tx);
    // Acks and window updates: this call's own task, so waiting for room in a worker's queue
    // holds up only this subscriber.
    let workers = Arc::clone(&state.streams);
    tokio::spawn(async move {
        loop {
            let Ok(Some(request)) = requests.message().await else {
                break;
            };
            match request.request {
                Some(SubRequest::Ack(ack)) => {
                    let Ok(stream) = parse_id(&ack.stream_id) else {
                        break;
                    };
                    let input = WorkerInput::Ack {
                        sub,
                        stream,
                        seq: ack.seq,
                    };
                    if workers.worker_of(stream).send(input).await.is_err() {
                        break;
                    }
                }
                Some(SubRequest::Window(update)) => {
                    let stream = if update.stream_id.is_empty() {
                        None
                    } else {
                        match parse_id(&update.stream_id) {
                            Ok(stream) => Some(stream),
                            Err(_) => break,
                        }
                    };
                    for worker in workers.workers() {
                        let input = WorkerInput::Window {
                            sub,
                            stream,
                            window: update.window,
                        };
                        if worker.send(input).await.is_err() {
                            break;
                        }
                    }
                }
                Some(SubRequest::Select(_)) | None => {}
            }
        }
        for worker in workers.workers() {
            let _ = worker.send(WorkerInput::Unsubscribe { sub }).await;
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
