//! The metrics port: Prometheus text at `/metrics`, served on the api thread (axum) when
//! `[metrics] listen` is set.
//!
//! A scrape reads each figure where it lives — links and drops from the shards, members and
//! routes from the control thread, Raft from the groups' handles, streams from the recorded
//! counters (`crate::metrics`) — into a registry built for that scrape. Every read has a
//! deadline: a scrape never holds up the node, and a node busy past it answers 503.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use meshd_proto::{link::MemberState, mesh::MessageStatus};
use meshd_shards::command::{ShardFigures, ShardInput};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tonic::Status;

use super::ApiState;
use crate::metrics::RECORDED;

/// How long one scrape may take.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(3);

/// Serves the metrics port until the api thread's runtime stops.
pub(super) async fn serve(state: Arc<ApiState>, listener: std::net::TcpListener) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "metrics listener unusable");
            return;
        }
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics))
        .with_state(state);
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "metrics port stopped");
    }
}

/// The status page: health, members, links, routes, Raft, and the mesh drawn as a graph,
/// refreshed every second from `/status.json` (no external resources).
async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("static/status.html"),
    )
        .into_response()
}

/// The mesh as this node sees it, for the status page (and scripts).
async fn status_json(State(state): State<Arc<ApiState>>) -> Response {
    match status_view(&state).await {
        Ok(body) => (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// The status page's view: health, members, links, this node's lanes, routes, Raft (also what the platform
/// sync writes to `mesh_node_state` and `mesh_routing_table`).
pub(super) async fn status_view(state: &ApiState) -> Result<serde_json::Value, String> {
    let view = tokio::time::timeout(SCRAPE_DEADLINE, async {
        let mesh = state.mesh().await?;
        let routing = state.routing().await?;
        let sessions = state.sessions().await?;
        Ok::<_, Status>((mesh, routing, sessions))
    })
    .await;
    let (mesh, routing, sessions) = match view {
        Ok(Ok(view)) => view,
        Ok(Err(status)) => return Err(status.message().to_owned()),
        Err(_) => {
            return Err(format!(
                "the node did not answer within {SCRAPE_DEADLINE:?}"
            ));
        }
    };
    let status = super::mesh::mesh_status(&mesh, &routing);
    let group = state.consensus.state();
    let health = meshd_proto::link::MeshHealth::try_from(status.health).map_or_else(
        |_| "none".to_owned(),
        |h| short(h.as_str_name(), "MESH_HEALTH_"),
    );
    Ok(serde_json::json!({
        "node_id": status.local_node_id,
        "mesh_id": status.mesh_id,
        "health": health,
        "updated_ms": crate::storage::now_ms(),
        "members": status.members.iter().map(|m| serde_json::json!({
            "node_id": m.node_id,
            "state": MemberState::try_from(m.state)
                .map_or_else(|_| "unknown".to_owned(), |s| short(s.as_str_name(), "MEMBER_STATE_")),
            "linked": m.linked,
        })).collect::<Vec<_>>(),
        "links": status.links.iter().map(|l| serde_json::json!({
            "from": l.from_node,
            "to": l.to_node,
            "rtt_us": l.rtt_us,
            "loss_ppm": l.loss_ppm,
        })).collect::<Vec<_>>(),
        "lanes": sessions.iter().flat_map(|s| s.lanes.iter().map(|l| serde_json::json!({
            "peer": s.peer,
            "lane": l.name,
            "remote_addr": l.remote_addr.to_string(),
            "rtt_us": l.srtt_us,
            "bytes_sent": l.bytes_sent,
            "bytes_received": l.bytes_received,
            "frames_sent": l.frames_sent,
            "frames_received": l.frames_received,
            "queued_bytes": l.queued_bytes,
        }))).collect::<Vec<_>>(),
        "routes": routing.routes.iter().map(|r| serde_json::json!({
            "destination": r.destination,
            "next_hops": r.next_hops,
            "cost": r.cost,
        })).collect::<Vec<_>>(),
        "raft": {
            "role": group.role,
            "term": group.term,
            "leader": group.leader,
            "applied_index": group.applied_index,
            "commit_index": group.commit_index,
            "last_log_index": group.last_log_index,
            "voters": group.voters,
        },
        "storage": state.stores.health().into_iter().map(|(backend, health)| serde_json::json!({
            "backend": backend,
            "healthy": health.is_ok(),
            "error": health.err(),
        })).collect::<Vec<_>>(),
    }))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match tokio::time::timeout(SCRAPE_DEADLINE, gather(&state)).await {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(status)) => {
            (StatusCode::SERVICE_UNAVAILABLE, status.message().to_owned()).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the node did not answer within {SCRAPE_DEADLINE:?}"),
        )
            .into_response(),
    }
}

/// A registry built for one scrape.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    fn gauge(&self, name: &str, help: &str, value: f64) {
        if let Ok(gauge) = Gauge::new(name, help) {
            gauge.set(value);
            let _ = self.registry.register(Box::new(gauge));
        }
    }

    fn int(&self, name: &str, help: &str, value: i64) {
        if let Ok(gauge) = IntGauge::new(name, help) {
            gauge.set(value);
            let _ = self.registry.register(Box::new(gauge));
        }
    }

    /// A counter read from a thread's own tally (monotonic for the life of what it counts).
    fn count(&self, name: &str, help: &str, value: u64) {
        if let Ok(counter) = IntCounter::new(name, help) {
            counter.inc_by(value);
            let _ = self.registry.register(Box::new(counter));
        }
    }

    fn counts(&self, name: &str, help: &str, labels: &[&str]) -> Option<IntCounterVec> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels).ok()?;
        self.registry.register(Box::new(vec.clone())).ok()?;
        Some(vec)
    }

    fn ints(&self, name: &str, help: &str, labels: &[&str]) -> Option<IntGaugeVec> {
        let vec = IntGaugeVec::new(Opts::new(name, help), labels).ok()?;
        self.registry.register(Box::new(vec.clone())).ok()?;
        Some(vec)
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> Option<GaugeVec> {
        let vec = GaugeVec::new(Opts::new(name, help), labels).ok()?;
        self.registry.register(Box::new(vec.clone())).ok()?;
        Some(vec)
    }
}

/// The lower-case name of a proto enum value without its prefix (`MEMBER_STATE_ALIVE` → `alive`).
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

async fn gather(state: &ApiState) -> Result<String, Status> {
    let scrape = Scrape {
        registry: Registry::new(),
    };
    let mesh = state.mesh().await?;
    let routing = state.routing().await?;
    let status = super::mesh::mesh_status(&mesh, &routing);

    // The node and its mesh.
    if let Some(info) = scrape.ints(
        "meshd_info",
        "This node: its id, mesh and version (the value is 1).",
        &["node_id", "mesh_id", "version"],
    ) {
        info.with_label_values(&[
            &status.local_node_id.to_string(),
            &status.mesh_id,
            env!("CARGO_PKG_VERSION"),
        ])
        .set(1);
    }
    if let Some(up) = scrape.ints(
        "meshd_storage_up",
        "Whether the storage backend answered its last call (1) or failed (0).",
        &["backend"],
    ) {
        for (backend, health) in state.stores.health() {
            up.with_label_values(&[backend])
                .set(i64::from(health.is_ok()));
        }
    }
    scrape.int(
        "meshd_mesh_health",
        "Mesh health as this node sees it: 1 healthy, 2 degraded, 3 critical (0: no mesh).",
        i64::from(status.health),
    );
    if let Some(members) = scrape.ints(
        "meshd_members",
        "Members by SWIM state (this node included).",
        &["state"],
    ) {
        let mut by_state: BTreeMap<String, i64> = ["alive", "suspect", "dead"]
            .into_iter()
            .map(|s| (s.to_owned(), 0))
            .collect();
        for member in &status.members {
            let state = MemberState::try_from(member.state).map_or_else(
                |_| "unknown".to_owned(),
                |s| short(s.as_str_name(), "MEMBER_STATE_"),
            );
            *by_state.entry(state).or_insert(0) += 1;
        }
        for (state, n) in by_state {
            members.with_label_values(&[&state]).set(n);
        }
    }

    // Links as the link-state database advertises them (both ends agree on them).
    let lsdb = (
        scrape.gauges(
            "meshd_lsdb_link_rtt_seconds",
            "Advertised round-trip time of each link in the link-state database.",
            &["from", "to"],
        ),
        scrape.gauges(
            "meshd_lsdb_link_loss_ratio",
            "Advertised loss of each link in the link-state database (0..1).",
            &["from", "to"],
        ),
        scrape.gauges(
            "meshd_lsdb_link_utilisation_ratio",
            "Advertised utilisation of each link in the link-state database (0..1).",
            &["from", "to"],
        ),
        scrape.gauges(
            "meshd_lsdb_link_bandwidth_bytes_per_second",
            "Advertised bandwidth estimate of each link in the link-state database.",
            &["from", "to"],
        ),
    );
    if let (Some(rtt), Some(loss), Some(utilisation), Some(bandwidth)) = lsdb {
        for link in &status.links {
            let labels = [link.from_node.to_string(), link.to_node.to_string()];
            let labels = [labels[0].as_str(), labels[1].as_str()];
            rtt.with_label_values(&labels).set(link.rtt_us as f64 / 1e6);
            loss.with_label_values(&labels)
                .set(f64::from(link.loss_ppm) / 1e6);
            utilisation
                .with_label_values(&labels)
                .set(f64::from(link.utilisation_ppm) / 1e6);
            bandwidth
                .with_label_values(&labels)
                .set(link.bandwidth_bps as f64 / 8.0);
        }
    }
    scrape.count(
        "meshd_routing_recomputations_total",
        "Route recomputations since start.",
        routing.epoch,
    );
    scrape.int(
        "meshd_routes",
        "Destinations this node has a route to.",
        routing.routes.len() as i64,
    );

    // This node's own links and drops, from every shard.
    let sessions = state.sessions().await?;
    let mut figures = ShardFigures::default();
    for shard in state.shards.iter() {
        let (reply, answer) = futures::channel::oneshot::channel();
        if shard.push(ShardInput::Figures { reply }).await.is_err() {
            return Err(Status::unavailable("the node is shutting down"));
        }
        let shard_figures = answer
            .await
            .map_err(|_| Status::unavailable("a shard stopped"))?;
        for (reason, n) in shard_figures.drops {
            *figures.drops.entry(reason).or_insert(0) += n;
        }
        figures.reroutes += shard_figures.reroutes;
    }
    let links = (
        scrape.gauges(
            "meshd_link_rtt_seconds",
            "Smoothed heartbeat round-trip time of each of this node's links.",
            &["peer"],
        ),
        scrape.counts(
            "meshd_link_sent_bytes_total",
            "Bytes written on each of this node's links since it came up.",
            &["peer"],
        ),
        scrape.counts(
            "meshd_link_received_bytes_total",
            "Bytes read on each of this node's links since it came up.",
            &["peer"],
        ),
        scrape.counts(
            "meshd_link_dropped_frames_total",
            "Frames read on each link and dropped for failing a check, since it came up.",
            &["peer"],
        ),
    );
    if let (Some(rtt), Some(sent), Some(received), Some(dropped)) = links {
        for s in &sessions {
            let peer = s.peer.to_string();
            rtt.with_label_values(&[&peer]).set(s.srtt_us as f64 / 1e6);
            sent.with_label_values(&[&peer]).inc_by(s.bytes_sent);
            received
                .with_label_values(&[&peer])
                .inc_by(s.bytes_received);
            dropped.with_label_values(&[&peer]).inc_by(s.frames_dropped);
        }
    }
    lane_metrics(&scrape, &sessions);
    scrape.int(
        "meshd_links",
        "Links up on this node.",
        sessions.len() as i64,
    );
    if let Some(drops) = scrape.counts(
        "meshd_frames_dropped_total",
        "Frames the shards dropped since start, by reason.",
        &["reason"],
    ) {
        for (reason, n) in &figures.drops {
            drops.with_label_values(&[reason]).inc_by(*n);
        }
    }
    scrape.count(
        "meshd_fast_reroutes_total",
        "Frames routed again on a shard because their next hop went down on the way.",
        figures.reroutes,
    );

    // The mesh control group.
    let group = state.consensus.state();
    scrape.int(
        "meshd_raft_term",
        "The control group's current term here.",
        group.term as i64,
    );
    scrape.int(
        "meshd_raft_leader",
        "1 if this node leads the control group.",
        i64::from(group.leader == Some(group.local)),
    );
    scrape.int(
        "meshd_raft_last_log_index",
        "The control group's last log index written here.",
        group.last_log_index as i64,
    );
    scrape.int(
        "meshd_raft_applied_index",
        "The control group's last index applied here.",
        group.applied_index as i64,
    );
    scrape.int(
        "meshd_raft_voters",
        "Voters of the control group.",
        group.voters.len() as i64,
    );
    scrape.int(
        "meshd_raft_accepts_writes",
        "1 if a write from this node would be accepted now (a leader with a quorum).",
        i64::from(group.can_accept_writes),
    );
    scrape.count(
        "meshd_raft_requests_refused_total",
        "Raft requests (control and stream groups) dropped before openraft saw them: a term \
         jump or a snapshot chunk out of bounds (control::raft::guard).",
        crate::control::raft::guard::refused(),
    );
    if let Some(lag) = scrape.ints(
        "meshd_raft_follower_lag_entries",
        "Entries each follower is behind the leader (on the leader only).",
        &["node"],
    ) {
        for (node, behind) in &group.lag {
            lag.with_label_values(&[&node.to_string()])
                .set(*behind as i64);
        }
    }

    // Queue depths: each shard's rings, bytes in flight per linked member, stream messages
    // waiting for their targets.
    if let (Some(items), Some(bytes)) = (
        scrape.ints(
            "meshd_shard_ring_items",
            "Inputs waiting in a shard's ring (ctl: control, send: this node's data, fwd: relayed).",
            &["shard", "ring"],
        ),
        scrape.ints(
            "meshd_shard_ring_bytes",
            "Payload bytes waiting in a shard's ring.",
            &["shard", "ring"],
        ),
    ) {
        for (i, shard) in state.shards.iter().enumerate() {
            let i = i.to_string();
            for (ring, n, b) in shard.depths() {
                items.with_label_values(&[&i, ring]).set(n as i64);
                bytes.with_label_values(&[&i, ring]).set(b as i64);
            }
        }
    }
    if let Some(in_flight) = scrape.ints(
        "meshd_destination_in_flight_bytes",
        "Bytes this node originated for a destination that have not left its shards yet \
         (callers wait past 1 MiB).",
        &["destination"],
    ) {
        for member in status
            .members
            .iter()
            .filter(|m| m.node_id != status.local_node_id)
        {
            in_flight
                .with_label_values(&[&member.node_id.to_string()])
                .set(state.congestion.in_flight(member.node_id) as i64);
        }
    }
    if let Some(unreleased) = tokio::time::timeout(SCRAPE_DEADLINE, state.streams.unreleased())
        .await
        .ok()
        .flatten()
    {
        scrape.int(
            "meshd_stream_unreleased_messages",
            "Messages published on this node's streams not yet stored and processed where they \
             must be (still in the outbox).",
            unreleased as i64,
        );
    }

    // Data stream groups.
    let groups = state.streams.groups.status();
    scrape.int(
        "meshd_stream_groups",
        "Data stream groups this node takes part in.",
        groups.len() as i64,
    );
    let streams: usize = groups.iter().map(|g| g.streams.len()).sum();
    scrape.int(
        "meshd_stream_group_streams",
        "Streams the data stream groups of this node hold.",
        streams as i64,
    );
    if let (Some(term), Some(leader), Some(retries)) = (
        scrape.ints(
            "meshd_stream_group_term",
            "Each data stream group's term here.",
            &["group"],
        ),
        scrape.ints(
            "meshd_stream_group_leader",
            "1 if this node leads the data stream group.",
            &["group"],
        ),
        scrape.ints(
            "meshd_stream_group_write_retries",
            "Writes to each data stream group from this node that failed and were retried.",
            &["group"],
        ),
    ) {
        for g in &groups {
            let id = format!("{:016x}", g.group);
            term.with_label_values(&[&id]).set(g.term as i64);
            leader
                .with_label_values(&[&id])
                .set(i64::from(g.role == "leader"));
            retries
                .with_label_values(&[&id])
                .set(g.write_retries as i64);
        }
    }

    // core's messages as the tracker holds them.
    if let Some(messages) = scrape.ints(
        "meshd_tracked_messages",
        "Messages sent through the data service that this node remembers, by status.",
        &["status"],
    ) {
        for (status, n) in state.tracker().counts() {
            let name = MessageStatus::try_from(status).map_or_else(
                |_| "unknown".to_owned(),
                |s| short(s.as_str_name(), "MESSAGE_STATUS_"),
            );
            messages.with_label_values(&[&name]).set(n as i64);
        }
    }
    scrape.gauge(
        "meshd_scrape_unix_seconds",
        "When this scrape was taken.",
        crate::storage::now_ms() as f64 / 1e3,
    );

    let mut families = scrape.registry.gather();
    families.extend(RECORDED.registry.gather());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(|e| Status::internal(e.to_string()))?;
    String::from_utf8(out).map_err(|e| Status::internal(e.to_string()))
}

/// Each connection (lane) of each link: a link runs a data lane and, split, a control lane
/// and a priority lane.
fn lane_metrics(scrape: &Scrape, sessions: &[meshd_shards::stats::SessionSnapshot]) {
    const LABELS: &[&str] = &["peer", "lane"];
    let lanes = (
        scrape.gauges(
            "meshd_lane_rtt_seconds",
            "Smoothed heartbeat round-trip time of each lane (connection) of each link.",
            LABELS,
        ),
        scrape.counts(
            "meshd_lane_sent_bytes_total",
            "Bytes written on each lane of each link since the lane came up.",
            LABELS,
        ),
        scrape.counts(
            "meshd_lane_received_bytes_total",
            "Bytes read on each lane of each link since the lane came up.",
            LABELS,
        ),
        scrape.counts(
            "meshd_lane_sent_frames_total",
            "Frames written on each lane of each link since the lane came up.",
            LABELS,
        ),
        scrape.counts(
            "meshd_lane_received_frames_total",
            "Well-formed frames read on each lane of each link since the lane came up.",
            LABELS,
        ),
        scrape.gauges(
            "meshd_lane_queued_bytes",
            "Bytes waiting to be written on each lane of each link.",
            LABELS,
        ),
    );
    let (Some(rtt), Some(sent), Some(received), Some(frames_out), Some(frames_in), Some(queued)) =
        lanes
    else {
        return;
    };
    for s in sessions {
        let peer = s.peer.to_string();
        for lane in &s.lanes {
            let labels = [peer.as_str(), lane.name];
            rtt.with_label_values(&labels)
                .set(lane.srtt_us as f64 / 1e6);
            sent.with_label_values(&labels).inc_by(lane.bytes_sent);
            received
                .with_label_values(&labels)
                .inc_by(lane.bytes_received);
            frames_out
                .with_label_values(&labels)
                .inc_by(lane.frames_sent);
            frames_in
                .with_label_values(&labels)
                .inc_by(lane.frames_received);
            queued
                .with_label_values(&labels)
                .set(lane.queued_bytes as f64);
        }
    }
}
