//! The control group's update streams on the api: `SendNodeUpdate` / `SendMeshUpdate` /
//! `SendInternalDBUpdate` (write through the group), `MeshDataService` (subscribe to the
//! applied updates, acknowledge them) and `RequestDatabaseSync` (page through the internal-DB
//! updates of one table).
//!
//! Subscribers read the applied updates from the group's store (`raft.redb`) with read
//! transactions, which never wait on openraft's writer, and wake on its applied index: a slow
//! subscriber holds only its own task, never the group.

use std::sync::Arc;

use meshd_proto::{
    link::{
        AckUpdatesRequest, AckUpdatesResponse, BroadcastResult, DbUpdate, MeshUpdate, NodeUpdate,
        SubscribeUpdatesRequest, UpdateKind, mesh_data_service_server::MeshDataService,
    },
    mesh::{DatabaseRecord, DatabaseSyncRequest, DatabaseSyncResponse},
};
use prost::Message;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::ApiState;
use crate::{
    control::raft::{MeshCommand, Stream, group::WriteError, store},
    storage::now_ms,
};

/// Updates read per store transaction by a subscriber.
const READ_BATCH: usize = 256;
/// Records per `RequestDatabaseSync` page.
pub(crate) const SYNC_PAGE: usize = 1000;
/// Longest subscriber name.
const MAX_SUBSCRIBER: usize = 128;
/// Longest table name, kind, key or operation.
const MAX_NAME: usize = 256;

pub(crate) fn status_of(error: WriteError) -> Status {
    match error {
        WriteError::NoQuorum { .. } | WriteError::NoGroup | WriteError::Refused(_) => {
            Status::failed_precondition(error.to_string())
        }
        WriteError::Timeout(_) | WriteError::LeaderChanged(_) => {
            Status::unavailable(error.to_string())
        }
        WriteError::Failed(_) => Status::internal(error.to_string()),
    }
}

fn check_name(field: &str, value: &str, required: bool) -> Result<(), Status> {
    if required && value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

/// Orders one update through the group.
async fn write(
    state: &ApiState,
    stream: Stream,
    payload: Vec<u8>,
) -> Result<Response<BroadcastResult>, Status> {
    let consensus = &state.consensus;
    // The forwarded write and the log entry carry it whole: one frame's worth at most.
    let limit = state.max_payload_bytes / 2;
    if payload.len() > limit {
        return Err(Status::invalid_argument(format!(
            "the update is {} bytes encoded; at most {limit} (half of network.max_payload_bytes)",
            payload.len()
        )));
    }
    let index = consensus
        .write(MeshCommand::Update { stream, payload })
        .await
        .map_err(status_of)?;
    let group = consensus.state();
    Ok(Response::new(BroadcastResult {
        index,
        term: group.term,
        leader_id: group.leader.unwrap_or(0),
    }))
}

pub(crate) async fn send_node_update(
    state: &ApiState,
    mut update: NodeUpdate,
) -> Result<Response<BroadcastResult>, Status> {
    check_name("kind", &update.kind, true)?;
    update.node_id = state.node_id;
    update.index = 0;
    update.timestamp_ms = now_ms();
    write(state, Stream::Node, update.encode_to_vec()).await
}

pub(crate) async fn send_mesh_update(
    state: &ApiState,
    mut update: MeshUpdate,
) -> Result<Response<BroadcastResult>, Status> {
    check_name("key", &update.key, true)?;
    update.origin_node = state.node_id;
    update.index = 0;
    update.timestamp_ms = now_ms();
    write(state, Stream::Mesh, update.encode_to_vec()).await
}

pub(crate) async fn send_db_update(
    state: &ApiState,
    mut update: DbUpdate,
) -> Result<Response<BroadcastResult>, Status> {
    check_name("table_name", &update.table_name, true)?;
    if !matches!(update.operation.as_str(), "INSERT" | "UPDATE" | "DELETE") {
        return Err(Status::invalid_argument(format!(
            "operation {:?} is not INSERT, UPDATE or DELETE",
            update.operation
        )));
    }
    update.origin_node = state.node_id;
    update.index = 0;
    update.timestamp_ms = now_ms();
    write(state, Stream::InternalDb, update.encode_to_vec()).await
}

/// A decoded update row, its index set.
trait Row: Message + Default + Sized + 'static {
    fn with_index(bytes: &[u8], index: u64) -> Option<Self>;
}

impl Row for NodeUpdate {
    fn with_index(bytes: &[u8], index: u64) -> Option<Self> {
        let mut update = Self::decode(bytes).ok()?;
        update.index = index;
        Some(update)
    }
}

impl Row for MeshUpdate {
    fn with_index(bytes: &[u8], index: u64) -> Option<Self> {
        let mut update = Self::decode(bytes).ok()?;
        update.index = index;
        Some(update)
    }
}

impl Row for DbUpdate {
    fn with_index(bytes: &[u8], index: u64) -> Option<Self> {
        let mut update = Self::decode(bytes).ok()?;
        update.index = index;
        Some(update)
    }
}

/// A resume point older than the retained updates cannot be served in full: the caller is
/// told where history starts instead of silently missing updates.
fn check_retained(
    consensus: &crate::control::raft::group::Consensus,
    after: u64,
) -> Result<(), Status> {
    let oldest = store::oldest_kept(consensus.db())
        .map_err(|e| Status::internal(format!("reading the retained range: {e}")))?;
    if oldest > 0 && after.saturating_add(1) < oldest {
        return Err(Status::failed_precondition(format!(
            "updates before index {oldest} were dropped (consensus.retain_updates); resume from \
             {} or later after a resync",
            oldest - 1
        )));
    }
    Ok(())
}

fn check_subscriber(name: &str) -> Result<(), Status> {
    if name.len() > MAX_SUBSCRIBER {
        return Err(Status::invalid_argument(format!(
            "subscriber is longer than {MAX_SUBSCRIBER} bytes"
        )));
    }
    Ok(())
}

/// A stream of `stream`'s applied updates after the resume point, then live ones.
fn subscribe<T: Row + Send>(
    state: &ApiState,
    stream: Stream,
    request: SubscribeUpdatesRequest,
) -> Result<Response<BoxStream<T>>, Status> {
    check_subscriber(&request.subscriber)?;
    let consensus = state.consensus.clone();
    let mut after = if request.from_index > 0 {
        request.from_index
    } else if request.subscriber.is_empty() {
        0
    } else {
        store::cursor(consensus.db(), stream, &request.subscriber)
            .map_err(|e| Status::internal(format!("reading the subscriber's position: {e}")))?
    };
    check_retained(&consensus, after)?;
    let (tx, rx) = tokio::sync::mpsc::channel(state.subscriber_queue.clamp(16, 4096));
    tokio::spawn(async move {
        let mut applied = consensus.applied();
        loop {
            // Seen before the read: an apply after it wakes the wait below.
            applied.borrow_and_update();
            let read = store::read_updates(consensus.db(), stream, after, READ_BATCH);
            let (rows, more) = match read {
                Ok(read) => read,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("reading updates: {e}"))))
                        .await;
                    return;
                }
            };
            for (index, bytes) in rows {
                after = index;
                // A row that does not decode was written by no api of this version; skipped.
                let Some(update) = T::with_index(&bytes, index) else {
                    continue;
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
            if more {
                continue;
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// `MeshDataService`.
pub(crate) struct UpdatesService {
    state: Arc<ApiState>,
}

impl UpdatesService {
    pub(crate) fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl MeshDataService for UpdatesService {
    async fn subscribe_client_data(
        &self,
        request: Request<tonic::Streaming<meshd_proto::link::SubscribeClientDataRequest>>,
    ) -> Result<Response<BoxStream<meshd_proto::link::ClientData>>, Status> {
        super::streams::subscribe(Arc::clone(&self.state), request.into_inner()).await
    }

    async fn subscribe_node_updates(
        &self,
        request: Request<SubscribeUpdatesRequest>,
    ) -> Result<Response<BoxStream<NodeUpdate>>, Status> {
        subscribe(&self.state, Stream::Node, request.into_inner())
    }

    async fn subscribe_mesh_updates(
        &self,
        request: Request<SubscribeUpdatesRequest>,
    ) -> Result<Response<BoxStream<MeshUpdate>>, Status> {
        subscribe(&self.state, Stream::Mesh, request.into_inner())
    }

    async fn subscribe_internal_db_updates(
        &self,
        request: Request<SubscribeUpdatesRequest>,
    ) -> Result<Response<BoxStream<DbUpdate>>, Status> {
        subscribe(&self.state, Stream::InternalDb, request.into_inner())
    }

    async fn ack_updates(
        &self,
        request: Request<AckUpdatesRequest>,
    ) -> Result<Response<AckUpdatesResponse>, Status> {
        let request = request.into_inner();
        check_subscriber(&request.subscriber)?;
        if request.subscriber.is_empty() {
            return Err(Status::invalid_argument("subscriber is required"));
        }
        let stream = match UpdateKind::try_from(request.kind) {
            Ok(UpdateKind::Node) => Stream::Node,
            Ok(UpdateKind::Mesh) => Stream::Mesh,
            Ok(UpdateKind::InternalDb) => Stream::InternalDb,
            _ => {
                return Err(Status::invalid_argument(
                    "kind must be NODE, MESH or INTERNAL_DB",
                ));
            }
        };
        let consensus = self.state.consensus.clone();
        let applied = *consensus.applied().borrow();
        if request.index > applied {
            return Err(Status::invalid_argument(format!(
                "index {} is beyond what this node applied ({applied})",
                request.index
            )));
        }
        // A write transaction waits for openraft's commit in progress: off the api thread.
        let subscriber = request.subscriber;
        let index = tokio::task::spawn_blocking(move || {
            store::ack_cursor(consensus.db(), stream, &subscriber, request.index)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("storing the position: {e}")))?;
        Ok(Response::new(AckUpdatesResponse { index }))
    }
}

/// `RequestDatabaseSync`: the internal-DB updates of one table after a version, paged.
pub(crate) async fn database_sync(
    state: &ApiState,
    request: DatabaseSyncRequest,
) -> Result<Response<DatabaseSyncResponse>, Status> {
    check_name("table_name", &request.table_name, true)?;
    if request.node_ids.len() > 10_000 {
        return Err(Status::invalid_argument("at most 10000 node_ids"));
    }
    let mut origins = Vec::with_capacity(request.node_ids.len());
    for id in &request.node_ids {
        origins.push(
            id.parse::<u64>().map_err(|_| {
                Status::invalid_argument(format!("node_ids: {id:?} is not a node id"))
            })?,
        );
    }
    let consensus = state.consensus.clone();
    check_retained(&consensus, request.last_known_version)?;
    let table = request.table_name.clone();
    let keep = |bytes: &[u8]| {
        DbUpdate::decode(bytes).is_ok_and(|u| {
            u.table_name == table && (origins.is_empty() || origins.contains(&u.origin_node))
        })
    };
    let (rows, has_more) = store::read_updates_where(
        consensus.db(),
        Stream::InternalDb,
        request.last_known_version,
        SYNC_PAGE,
        keep,
    )
    .map_err(|e| Status::internal(format!("reading updates: {e}")))?;
    let records: Vec<DatabaseRecord> = rows
        .iter()
        .filter_map(|(index, bytes)| {
            let update = DbUpdate::decode(bytes.as_slice()).ok()?;
            Some(DatabaseRecord {
                operation: update.operation,
                data: update.data,
                version: *index,
                timestamp: update.timestamp_ms,
            })
        })
        .collect();
    let current_version = if has_more {
        records
            .last()
            .map_or(request.last_known_version, |r| r.version)
    } else {
        (*consensus.applied().borrow()).max(request.last_known_version)
    };
    Ok(Response::new(DatabaseSyncResponse {
        table_name: request.table_name,
        current_version,
        records,
        has_more,
    }))
}
