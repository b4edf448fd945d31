//! The mesh control group's Raft (openraft 0.9, storage v2).
//!
//! - [`store`]: the log and the state machine on redb (`raft.redb`), checked by openraft's
//!   own storage suite;
//! - [`network`]: openraft's RPCs as `Raft` frames routed over the mesh by the control thread;
//! - [`group`]: the `consensus` thread openraft runs on, and the handle (writes with
//!   forwarding to the leader, state, serving inbound RPCs, membership changes);
//! - [`policy`]: who votes (pure; the leader applies one change per tick).
#![allow(clippy::result_large_err)] // openraft's `StorageError` is large by design.

pub mod group;
pub(crate) mod guard;
pub mod network;
pub mod policy;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// One command the control group orders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshCommand {
    /// An update of a replicated stream, applied by every member in log order.
    Update {
        /// Which stream (system updates, internal-DB updates).
        stream: Stream,
        /// The update, opaque to the group (the api's encoded `NodeUpdate`, `MeshUpdate` or
        /// `DBUpdate`).
        payload: Vec<u8>,
    },
    /// `node` is evicted: every member revokes it, cuts its links and refuses it until it
    /// joins again (EvictNode).
    Evict {
        /// The node.
        node: u64,
    },
    /// `node` left the mesh for good (LeaveMesh).
    Leave {
        /// The node.
        node: u64,
    },
    /// `node` was admitted (a join checked by a member), with the key it proved on the
    /// join: it is a member of the group's list, and no longer removed if it left or was
    /// evicted before.
    Admit {
        /// The node.
        node: u64,
        /// Its Ed25519 public key.
        public_key: [u8; 32],
    },
    /// A live setting for the whole mesh (SetPolicy; see `control::live`).
    SetPolicy {
        /// The key.
        key: String,
        /// The value, checked before the write and again when applied.
        value: String,
    },
}

/// A membership or configuration decision the group committed, for the control thread to
/// act on (updates go to subscribers instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Evict this node.
    Evict(u64),
    /// This node left.
    Leave(u64),
    /// This node was admitted with this key.
    Admit(u64, [u8; 32]),
    /// Apply this setting.
    SetPolicy(String, String),
}

/// The replicated update streams of the seeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// Mesh-wide system updates (`SendMeshUpdate`): a key and a value.
    Mesh,
    /// Internal database updates (one-to-all, ordered, durable; `SendInternalDBUpdate`).
    InternalDb,
    /// Node-authored updates (`SendNodeUpdate`: status, capabilities).
    Node,
}

impl Stream {
    /// The name used in stored subscriber positions.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::InternalDb => "internal_db",
            Self::Node => "node",
        }
    }
}

/// What applying a command answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshReply {
    /// A blank or membership entry.
    Nothing,
    /// The update is in the stream at this log index.
    Applied {
        /// Its log index (the version `RequestDatabaseSync` pages by).
        index: u64,
    },
}

openraft::declare_raft_types!(
    /// The control group's Raft types: node ids are meshd node ids; nodes need no address
    /// (Raft RPCs are routed by node id over the mesh).
    pub TypeConfig:
        D = MeshCommand,
        R = MeshReply,
        NodeId = u64,
        Node = openraft::EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
