//! Keeps the platform's tables current from live state (issue: platform integration):
//! every `storage.sync_ms` this node writes its own row of `mesh_node_state` (health and each
//! component's, mesh health, members, links, Raft), its `mesh_routing_table`, the control
//! group's commit point in `mesh_consensus_log` (the newest `CONSENSUS_KEEP` kept) and, until
//! written once, its `mesh_runtime_config`, as one write set on the primary backend; the hot
//! set (node state, routes) also goes to Redis when configured.
//!
//! A write that fails is not retried by itself: the next round writes the then-current state.
//! The backend's health (what GetHealth and `meshd_storage_up` report) follows each round, so
//! a database that goes away is noticed within `storage.sync_ms` even when no stream writes.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::ApiState;
use crate::backend::{ConsensusEntry, MeshStore, Write};

/// Commit points kept in `mesh_consensus_log`.
const CONSENSUS_KEEP: u64 = 1000;

/// What the sync task needs beside the api state.
pub struct PlatformSync {
    /// Time between rounds.
    pub every: Duration,
    /// The node's config in force, by top-level key (secrets are never serialized).
    pub runtime_config: Vec<(String, Value)>,
}

/// Runs rounds until `stop`.
pub(super) async fn run(state: Arc<ApiState>, sync: PlatformSync, mut stop: oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(sync.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut config_written = false;
    let mut last_commit: Option<(u64, u64)> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let Ok(view) = super::metrics::status_view(&state).await else {
            // The node itself did not answer (stopping, or the control thread is busy).
            continue;
        };
        let health = super::supervisor::health(&state).await;
        let group = state.consensus.state();
        let components: Vec<Value> = health
            .components
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "status": status_name(c.status),
                    "message": c.message,
                })
            })
            .collect();
        let node_state = node_state(
            &view,
            status_name(health.status),
            components,
            health.checked_at_unix_ms,
        );
        let routes = routes_of(&view);
        let mut writes = vec![
            Write::PutNodeState(state.node_id, node_state.clone()),
            Write::ReplaceRoutes(routes.clone()),
        ];
        let commit = (group.term, group.commit_index);
        if group.commit_index > 0 && last_commit != Some(commit) {
            writes.push(Write::AppendConsensus(ConsensusEntry {
                term: group.term,
                index: group.commit_index,
                entry: json!({
                    "leader": group.leader,
                    "role": group.role,
                    "applied_index": group.applied_index,
                    "last_log_index": group.last_log_index,
                    "voters": group.voters,
                }),
            }));
            if group.commit_index > CONSENSUS_KEEP {
                writes.push(Write::PurgeConsensus(group.commit_index - CONSENSUS_KEEP));
            }
        }
        if !config_written {
            writes.extend(
                sync.runtime_config
                    .iter()
                    .map(|(k, v)| Write::PutConfig(k.clone(), v.clone())),
            );
        }
        let primary = Arc::clone(&state.stores.primary);
        if write(primary, writes).await {
            config_written = true;
            last_commit = Some(commit);
        }
        if let Some(redis) = &state.stores.redis {
            let hot = vec![
                Write::PutNodeState(state.node_id, node_state),
                Write::ReplaceRoutes(routes),
            ];
            write(Arc::clone(redis), hot).await;
        }
    }
}

/// Writes this node's row one last time before a stop asked with `save_state`: status
/// `STOPPING`, its last view and routes, so the platform tells a deliberate stop from a crash.
/// Whether it landed (within `deadline`).
pub(super) async fn save_final(state: &Arc<ApiState>, deadline: Duration) -> bool {
    let work = async {
        let view = super::metrics::status_view(state).await.ok()?;
        let routes = routes_of(&view);
        let node_state = node_state(&view, "STOPPING", Vec::new(), crate::storage::now_ms());
        let writes = vec![
            Write::PutNodeState(state.node_id, node_state),
            Write::ReplaceRoutes(routes),
        ];
        Some(write(Arc::clone(&state.stores.primary), writes).await)
    };
    matches!(tokio::time::timeout(deadline, work).await, Ok(Some(true)))
}

/// The routing table of a status view, by destination.
fn routes_of(view: &Value) -> Vec<(u64, Value)> {
    view["routes"]
        .as_array()
        .map(|routes| {
            routes
                .iter()
                .filter_map(|r| Some((r["destination"].as_u64()?, r.clone())))
                .collect()
        })
        .unwrap_or_default()
}

/// This node's `mesh_node_state` row.
fn node_state(view: &Value, status: &str, components: Vec<Value>, at_ms: u64) -> Value {
    json!({
        "status": status,
        "components": components,
        "mesh_id": view["mesh_id"],
        "mesh_health": view["health"],
        "members": view["members"],
        "links": view["links"],
        "raft": view["raft"],
        "storage": view["storage"],
        "checked_at_ms": at_ms,
    })
}

/// Applies one write set off the api thread; whether it landed.
async fn write(store: Arc<dyn MeshStore>, writes: Vec<Write>) -> bool {
    let backend = store.kind().name();
    match tokio::task::spawn_blocking(move || store.apply(&writes)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(backend, error = %e, "platform tables not refreshed");
            false
        }
        Err(e) => {
            tracing::error!(backend, error = %e, "platform sync task failed");
            false
        }
    }
}

fn status_name(status: i32) -> &'static str {
    meshd_proto::supervisor::HealthStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name())
}
