//! Membership as the rpcs show it: `GetMeshStatus`, `WatchMeshEvents` (meshd.v1) and core's
//! `GetConsensusState` / `TriggerConsensusCheck`, all answered from the control core's SWIM view.

use meshd_proto::{
    link::{
        LinkInfo, MemberInfo, MemberState as WireMemberState, MeshEvent as WireMeshEvent,
        MeshEventKind as WireKind, MeshHealth, MeshStatus,
    },
    mesh::ConsensusState,
};
use tokio::sync::broadcast::error::RecvError;
use tonic::codegen::BoxStream;

use super::ApiState;
use crate::control::raft::group::GroupState;
use crate::control::{
    RoutingSnapshot,
    membership::{Health, MemberState},
    mesh::{MeshEvent, MeshEventKind, MeshSnapshot},
};

/// How split-brain is decided today: the side that sees a strict majority of the known members
/// may accept writes.
pub(crate) const SPLIT_STRATEGY: &str = "majority";

pub(crate) fn mesh_status(mesh: &MeshSnapshot, routing: &RoutingSnapshot) -> MeshStatus {
    let health = match mesh.health {
        Health::Healthy => MeshHealth::Healthy,
        Health::Degraded => MeshHealth::Degraded,
        Health::Critical => MeshHealth::Critical,
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let config = mesh.mesh.clone().unwrap_or_default();
    MeshStatus {
        mesh_id: mesh.mesh_id.clone(),
        mesh_authority: mesh
            .authority
            .map(|key| meshd_shards::credential::format_secret(&key))
            .unwrap_or_default(),
        mesh_name: config.name,
        mesh_description: config.description,
        join_policy: config.join_policy as i32,
        mesh_state: mesh.mesh_state.to_owned(),
        evicted: mesh.evicted.clone(),
        local_node_id: mesh.local,
        health: health as i32,
        total_members: count(mesh.census.total),
        online_members: count(mesh.census.online),
        suspect_members: count(mesh.census.suspect),
        dead_members: count(mesh.census.dead),
        members: mesh
            .members
            .iter()
            .map(|m| {
                let meta = m.meta.clone().unwrap_or_default();
                MemberInfo {
                    node_id: m.node,
                    state: match m.state {
                        MemberState::Alive => WireMemberState::Alive,
                        MemberState::Suspect => WireMemberState::Suspect,
                        MemberState::Dead => WireMemberState::Dead,
                    } as i32,
                    incarnation: u32::from(m.incarnation),
                    generation: m.generation,
                    last_seen_ms: m.last_seen_ms,
                    state_since_ms: m.since_ms,
                    name: meta.name,
                    version: meta.version,
                    capabilities: meta.capabilities,
                    load_permille: meta.load_permille,
                    linked: m.linked,
                }
            })
            .collect(),
        links: routing
            .links
            .iter()
            .map(|(from, to, metrics)| LinkInfo {
                from_node: *from,
                to_node: *to,
                rtt_us: metrics.rtt_us,
                loss_ppm: metrics.loss_ppm,
                utilisation_ppm: metrics.utilisation_ppm,
                bandwidth_bps: metrics.bandwidth_bps,
            })
            .collect(),
        routing_epoch: routing.epoch,
    }
}

/// Core's consensus view: membership counts from SWIM, and the control group's real state
/// (leader, term, voters, lag); `can_accept_writes` is the group's (a leader with a fresh
/// quorum is reachable from here). There is no permanent seed node; `seed_node_id` is the
/// lowest reachable member id, which every node on the same side agrees on.
pub(crate) fn consensus_state(mesh: &MeshSnapshot, group: &GroupState) -> ConsensusState {
    let total = mesh.census.total as u64;
    let online = mesh.census.online as u64;
    let majority = online * 2 > total;
    let seed = mesh
        .members
        .iter()
        .filter(|m| m.state != MemberState::Dead)
        .map(|m| m.node)
        .min()
        .unwrap_or(mesh.local);
    // A follower keeps its leader while the leader's heartbeats arrive, even when that leader
    // lost its quorum; SWIM's view of the voters tells that case apart.
    let voters_up = group
        .voters
        .iter()
        .filter(|v| {
            **v == mesh.local
                || mesh
                    .members
                    .iter()
                    .any(|m| m.node == **v && m.state != MemberState::Dead)
        })
        .count();
    let voters_quorum = voters_up * 2 > group.voters.len();
    let can_accept_writes = group.can_accept_writes && voters_quorum;
    let write_refusal = if group.can_accept_writes && !voters_quorum {
        format!(
            "only {voters_up} of the {} voters {:?} are alive as this node sees them: no quorum",
            group.voters.len(),
            group.voters
        )
    } else {
        group.write_refusal.clone()
    };
    ConsensusState {
        total_nodes: total,
        online_nodes: online,
        split_detected: online < total,
        is_majority_partition: majority,
        split_strategy: SPLIT_STRATEGY.to_owned(),
        seed_node_id: seed,
        can_accept_writes,
        leader_id: group.leader.unwrap_or(0),
        term: group.term,
        commit_index: group.commit_index,
        voters: group.voters.clone(),
        learners: group.learners.clone(),
        role: if group.voters.is_empty() && group.learners.is_empty() {
            "none".to_owned()
        } else {
            group.role.to_owned()
        },
        follower_lag: group.lag.clone().into_iter().collect(),
        last_log_index: group.last_log_index,
        snapshot_index: group.snapshot_index,
        purged_index: group.purged_index,
        write_refusal,
    }
}

fn wire_event(event: &MeshEvent) -> WireMeshEvent {
    let kind = match event.kind {
        MeshEventKind::Joined => WireKind::Joined,
        MeshEventKind::Suspect => WireKind::Suspect,
        MeshEventKind::Dead => WireKind::Dead,
        MeshEventKind::Recovered => WireKind::Recovered,
        MeshEventKind::Left => WireKind::Left,
        MeshEventKind::Evicted => WireKind::Evicted,
        MeshEventKind::LinkUp => WireKind::LinkUp,
        MeshEventKind::LinkDown => WireKind::LinkDown,
    };
    WireMeshEvent {
        kind: kind as i32,
        node_id: event.node,
        timestamp_ms: event.at_ms,
        missed: 0,
    }
}

/// A stream of mesh events for one watcher, filtered by node ids (empty: all).
pub(crate) fn watch(state: &ApiState, node_ids: Vec<u64>) -> BoxStream<WireMeshEvent> {
    let rx = state.mesh_events.subscribe();
    let stream = futures::stream::unfold((rx, node_ids), |(mut rx, node_ids)| async move {
        loop {
            match rx.recv().await {
                Ok(event) if node_ids.is_empty() || node_ids.contains(&event.node) => {
                    return Some((Ok(wire_event(&event)), (rx, node_ids)));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    let lagged = WireMeshEvent {
                        kind: WireKind::Lagged as i32,
                        node_id: 0,
                        timestamp_ms: crate::storage::now_ms(),
                        missed,
                    };
                    return Some((Ok(lagged), (rx, node_ids)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Box::pin(stream)
}
