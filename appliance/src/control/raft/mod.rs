//! The mesh control group's Raft (openraft 0.9, storage v2): its types and its redb store.
//!
//! Step one of issue 11: the log store and the state machine on redb ([`store`]), checked by
//! openraft's own storage suite. Not wired into the control thread yet: no `Raft` runs, no
//! frame carries its RPCs (the next steps, see ARCHITECTURE.md).
#![allow(clippy::result_large_err)] // openraft's `StorageError` is large by design.

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
        /// The update, opaque to the group.
        payload: Vec<u8>,
    },
}

/// The replicated update streams of the seeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// Mesh-wide system updates.
    System,
    /// Internal database updates (one-to-all, ordered, durable).
    InternalDb,
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
