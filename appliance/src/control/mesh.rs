//! What the api sees of membership: a snapshot of the member table and a stream of mesh events.

use std::time::Instant;

use super::membership::{Census, Health, MemberState, Membership, MembershipEvent, NodeMeta};
use crate::storage::now_ms;

/// Bound of the mesh event channel; a watcher that falls further behind is told how many it
/// missed.
pub const MESH_EVENT_BACKLOG: usize = 1024;

/// One mesh event as watchers receive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshEvent {
    /// What happened.
    pub kind: MeshEventKind,
    /// The node it concerns.
    pub node: u64,
    /// Unix time in ms.
    pub at_ms: u64,
}

/// Kinds of [`MeshEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshEventKind {
    /// A node joined (first seen).
    Joined,
    /// A member missed probes.
    Suspect,
    /// A member was declared dead.
    Dead,
    /// A suspect or dead member is alive again.
    Recovered,
    /// A member left.
    Left,
    /// A member was evicted.
    Evicted,
    /// A direct link came up.
    LinkUp,
    /// A direct link went down.
    LinkDown,
}

impl MeshEvent {
    /// The event of a membership change.
    pub fn from_membership(event: MembershipEvent) -> Self {
        let (kind, node) = match event {
            MembershipEvent::Joined(n) => (MeshEventKind::Joined, n),
            MembershipEvent::Suspect(n) => (MeshEventKind::Suspect, n),
            MembershipEvent::Dead(n) => (MeshEventKind::Dead, n),
            MembershipEvent::Recovered(n) => (MeshEventKind::Recovered, n),
            MembershipEvent::Left(n) => (MeshEventKind::Left, n),
            MembershipEvent::Evicted(n) => (MeshEventKind::Evicted, n),
            MembershipEvent::Admitted(n) => (MeshEventKind::Joined, n),
        };
        Self::new(kind, node)
    }

    /// An event now.
    pub fn new(kind: MeshEventKind, node: u64) -> Self {
        Self {
            kind,
            node,
            at_ms: now_ms(),
        }
    }
}

/// One member for the api.
#[derive(Clone, Debug)]
pub struct MemberSnapshot {
    /// The node.
    pub node: u64,
    /// Its state.
    pub state: MemberState,
    /// SWIM incarnation.
    pub incarnation: u16,
    /// Identity generation.
    pub generation: u32,
    /// Unix ms of the last datagram heard from it (0: never directly).
    pub last_seen_ms: u64,
    /// Unix ms of its last state change.
    pub since_ms: u64,
    /// What it said about itself.
    pub meta: Option<NodeMeta>,
    /// Whether this node has a direct link to it.
    pub linked: bool,
}

/// The member table and health, as of one moment.
#[derive(Clone, Debug)]
pub struct MeshSnapshot {
    /// This node.
    pub local: u64,
    /// This node's identity generation.
    pub generation: u32,
    /// Counts by state.
    pub census: Census,
    /// HEALTHY / DEGRADED / CRITICAL.
    pub health: Health,
    /// Every member, this node included.
    pub members: Vec<MemberSnapshot>,
    /// The mesh id the node uses now ("" = none).
    pub mesh_id: String,
    /// The seeded or joined mesh's configuration.
    pub mesh: Option<meshd_proto::link::MeshConfig>,
    /// "active", "stopped", "configured" (mesh id from the config file) or "none".
    pub mesh_state: &'static str,
    /// Evicted nodes.
    pub evicted: Vec<u64>,
    /// The mesh authority's public key, when the node holds its mesh's secret.
    pub authority: Option<[u8; 32]>,
}

impl MeshSnapshot {
    /// A snapshot of `membership`; `linked` says which nodes have a direct link.
    pub fn of(membership: &Membership, linked: impl Fn(u64) -> bool, now: Instant) -> Self {
        let wall = now_ms();
        let ago =
            |at: Instant| wall.saturating_sub(now.saturating_duration_since(at).as_millis() as u64);
        let census = membership.census();
        Self {
            local: membership.local().node,
            generation: membership.local().generation,
            census,
            health: census.health(),
            members: membership
                .members()
                .map(|m| MemberSnapshot {
                    node: m.node,
                    state: m.state,
                    incarnation: m.incarnation,
                    generation: m.generation,
                    last_seen_ms: m.last_seen.map_or(0, ago),
                    since_ms: ago(m.since),
                    meta: m.meta.clone(),
                    linked: linked(m.node),
                })
                .collect(),
            mesh_id: String::new(),
            mesh: None,
            mesh_state: "none",
            evicted: membership.evicted().collect(),
            authority: None,
        }
    }
}
