//! The api's view of the mesh's nodes (UNDELIVERABLE at call time, destinations' lives) and
//! this session's numbering of waiting sends per destination.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::control::{RoutingSnapshot, mesh::MeshSnapshot};

/// How old the api's view of the mesh's nodes may be before a send to a node missing from it
/// asks the control thread again. Sends to known nodes never ask.
pub(super) const KNOWN_NODES_REFRESH: Duration = Duration::from_millis(100);

/// Nodes the view keeps across refreshes; past this it restarts from the control thread's
/// current view, so ids that come and go cannot grow it without limit.
const KNOWN_NODES_LIMIT: usize = 1 << 16;

/// Every node this node has seen belong to the mesh, as of `refreshed`.
#[derive(Default)]
pub(super) struct KnownNodes {
    pub(super) nodes: HashSet<u64>,
    /// Members' generations (their current life), as of `refreshed`.
    pub(super) generations: HashMap<u64, u32>,
    pub(super) refreshed: Option<Instant>,
}

impl KnownNodes {
    /// Adds what the control thread knows now. Nodes seen before are kept (a member that left
    /// is still "known", as the shards' forwarding table counts it: PENDING_NODE, not
    /// UNDELIVERABLE), up to the limit.
    pub(super) fn absorb(&mut self, routing: &RoutingSnapshot, mesh: &MeshSnapshot) {
        let fresh: Vec<u64> = routing
            .routes
            .iter()
            .map(|r| r.destination)
            .chain(routing.neighbors.iter().map(|n| n.node_id))
            .chain(routing.nodes.iter().copied())
            .chain(mesh.members.iter().map(|m| m.node))
            .chain(mesh.evicted.iter().copied())
            .collect();
        if self.nodes.len() + fresh.len() > KNOWN_NODES_LIMIT {
            self.nodes.clear();
        }
        // Membership's view refreshes what reports taught; past the bound the map restarts.
        if self.generations.len() > KNOWN_NODES_LIMIT {
            self.generations.clear();
        }
        self.generations
            .extend(mesh.members.iter().map(|m| (m.node, m.generation)));
        self.nodes.extend(fresh);
        self.refreshed = Some(Instant::now());
    }
}

/// This session's numbering of waiting sends per destination (see `recent.rs`): the next seq
/// and the open ones, whose lowest is the floor every copy carries.
pub(super) struct WaitingSeqs {
    /// Random per start of the api: a restarted sender is a new session.
    pub(super) session: u64,
    pub(super) per_dst: HashMap<u64, DstSeqs>,
}

#[derive(Default)]
pub(super) struct DstSeqs {
    pub(super) next: u64,
    pub(super) open: std::collections::BTreeSet<u64>,
}

impl DstSeqs {
    pub(super) fn floor(&self) -> u64 {
        self.open.first().copied().unwrap_or(self.next.max(1))
    }
}
