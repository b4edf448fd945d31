//! Client data streams (exactly-once, durable, ordered): the stream workers.
//!
//! Streams hash onto `streams.workers` worker threads (`stream-<i>`), each owning its redb
//! database `streams-<i>.redb` and every stream whose id hashes to it, whether this node is
//! the stream's source or one of its targets. A worker runs the pure cores of
//! `meshd_shards::streams` and does the I/O around them in turns: take what arrived (gRPC
//! calls from the api thread, stream frames from the shards), commit the turn's writes in one
//! transaction, then act on what is now durable (answer producers, report to sources, send
//! data within credit, deliver to subscribers).
//!
//! **Boundary:** workers never await a queue another thread or a peer drains: frames go to
//! the shards with `try_push` (a full ring keeps them for the next turn), deliveries to
//! subscribers with `try_send` (a full subscriber is offered the message again later), and
//! the shards hand frames to the worker with `try_push` (a full worker loses the frame; the
//! protocol sends it again).

pub mod group;
pub mod store;
mod worker;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use bytes::Bytes;
use meshd_proto::link::ClientData;
use meshd_shards::{
    command::{ApiEvent, stream_worker},
    handle::ShardHandle,
    origin::KeyBook,
    ring::Consumer,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::{api::SharedTenantKeys, config::StreamsSection};

/// Requests one worker queues at most; past that, callers get UNAVAILABLE (busy).
pub const WORKER_QUEUE: usize = 8192;

/// Most messages in one publish batch.
pub const MAX_BATCH: usize = 4096;

/// Default and largest per-stream subscriber window.
pub const DEFAULT_WINDOW: u32 = 256;
/// The largest window a subscriber may grant.
pub const MAX_WINDOW: u32 = 65_536;

/// Most stream ids one subscription may name.
pub const MAX_SELECTED: usize = 1024;

/// What a publish batch got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// Seq of its first message.
    pub first: u64,
    /// Seq of its last message.
    pub last: u64,
    /// Every seq up to here is committed.
    pub committed: u64,
}

/// A stream to open at this node (its source).
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// The new stream's id.
    pub id: u128,
    /// Its tenant.
    pub tenant: String,
    /// Its targets (checked: 1..=16, distinct, not this node).
    pub targets: Vec<u64>,
    /// 0: all targets; k: k of them.
    pub quorum: u32,
    /// Answer publishes on the source's fsync alone.
    pub ack_on_source: bool,
    /// 0..=[`MAX_PRIORITY`], higher first.
    pub priority: u8,
}

/// The highest stream priority.
pub const MAX_PRIORITY: u8 = 7;

/// What the api asks a worker.
#[derive(Debug)]
pub enum WorkerInput {
    /// Open a stream with this node as its source.
    Open {
        /// What to open.
        request: OpenRequest,
        /// Answered once the stream is durable.
        reply: oneshot::Sender<Result<(), Status>>,
    },
    /// Publish a batch.
    Publish {
        /// The stream.
        stream: u128,
        /// The seq the first message must get (a retry), or none for the next ones.
        first_seq: Option<u64>,
        /// The payloads.
        messages: Vec<Bytes>,
        /// Answered once the batch is acknowledged per the stream's policy.
        reply: oneshot::Sender<Result<Published, Status>>,
    },
    /// Close a stream for publishing.
    Close {
        /// The stream.
        stream: u128,
        /// Answered with the last seq once the close is durable.
        reply: oneshot::Sender<Result<u64, Status>>,
    },
    /// A subscriber attaches.
    Subscribe {
        /// Its id (unique in this process).
        sub: u64,
        /// The tenant it takes.
        tenant: String,
        /// The streams it takes (empty: every stream of the tenant).
        streams: Vec<u128>,
        /// Per-stream window.
        window: u32,
        /// Where its messages go.
        tx: mpsc::Sender<Result<ClientData, Status>>,
    },
    /// A subscriber processed every seq up to `seq` of `stream`.
    Ack {
        /// The subscriber.
        sub: u64,
        /// The stream.
        stream: u128,
        /// Cumulative: every seq up to here.
        seq: u64,
    },
    /// A subscriber changes its window (of one stream, or all).
    Window {
        /// The subscriber.
        sub: u64,
        /// The stream, or none for all of its streams.
        stream: Option<u128>,
        /// The new window.
        window: u32,
    },
    /// A subscriber went away.
    Unsubscribe {
        /// The subscriber.
        sub: u64,
    },
    /// How many published messages of this worker's source streams are not yet released
    /// (stored and processed where they must be); `None` while its store is failing.
    Unreleased {
        /// The answer.
        reply: oneshot::Sender<Option<u64>>,
    },
}

/// What the stream workers are started with.
pub struct StreamsSetup {
    /// This node.
    pub node_id: u64,
    /// Where the workers keep their streams (redb files or PostgreSQL).
    pub store: Arc<dyn crate::backend::MeshStore>,
    /// The `[streams]` section.
    pub config: StreamsSection,
    /// Every shard's ring.
    pub shards: Arc<[ShardHandle]>,
    /// Pair keys for origin tags.
    pub key_book: Arc<KeyBook>,
    /// Tenant keys.
    pub tenant_keys: SharedTenantKeys,
    /// One ring of stream frames per worker, from the shards.
    pub frames: Vec<Consumer<ApiEvent>>,
    /// The data stream groups.
    pub groups: group::groups::StreamGroups,
}

/// The running stream workers.
pub struct Streams {
    inputs: Vec<mpsc::Sender<WorkerInput>>,
    stops: std::sync::Mutex<Vec<oneshot::Sender<()>>>,
    threads: std::sync::Mutex<Vec<thread::JoinHandle<()>>>,
    next_sub: AtomicU64,
    /// The `[streams]` section.
    pub config: StreamsSection,
    /// The data stream groups.
    pub groups: group::groups::StreamGroups,
}

impl Streams {
    /// Opens every worker's database and starts its thread.
    pub fn start(setup: StreamsSetup) -> anyhow::Result<Arc<Self>> {
        let mut inputs = Vec::new();
        let mut stops = Vec::new();
        let mut threads = Vec::new();
        for (index, frames) in setup.frames.into_iter().enumerate() {
            let db = setup
                .store
                .streams(index)
                .map_err(|e| anyhow::anyhow!("opening stream worker {index}'s store: {e}"))?;
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            let (stop_tx, stop_rx) = oneshot::channel();
            let worker = worker::Worker::new(worker::WorkerSetup {
                node_id: setup.node_id,
                config: setup.config.clone(),
                db,
                shards: Arc::clone(&setup.shards),
                key_book: Arc::clone(&setup.key_book),
                tenant_keys: Arc::clone(&setup.tenant_keys),
                groups: setup.groups.clone(),
            })
            .map_err(|e| anyhow::anyhow!("loading stream worker {index}'s streams: {e}"))?;
            let thread = thread::Builder::new()
                .name(format!("stream-{index}"))
                .spawn(move || worker.run(rx, frames, stop_rx))?;
            inputs.push(tx);
            stops.push(stop_tx);
            threads.push(thread);
        }
        Ok(Arc::new(Self {
            inputs,
            stops: std::sync::Mutex::new(stops),
            threads: std::sync::Mutex::new(threads),
            next_sub: AtomicU64::new(1),
            config: setup.config,
            groups: setup.groups,
        }))
    }

    /// The worker owning `stream`.
    pub fn worker_of(&self, stream: u128) -> &mpsc::Sender<WorkerInput> {
        &self.inputs[stream_worker(stream, self.inputs.len())]
    }

    /// Every worker.
    pub fn workers(&self) -> &[mpsc::Sender<WorkerInput>] {
        &self.inputs
    }

    /// Published messages of this node's source streams not yet released, over every
    /// worker; `None` when a worker could not say (its store is failing, or it is stopping).
    pub async fn unreleased(&self) -> Option<u64> {
        let mut total = 0;
        for worker in &self.inputs {
            let (reply, answer) = oneshot::channel();
            worker.send(WorkerInput::Unreleased { reply }).await.ok()?;
            total += answer.await.ok()??;
        }
        Some(total)
    }

    /// A fresh subscriber id.
    pub fn next_sub(&self) -> u64 {
        self.next_sub.fetch_add(1, Ordering::Relaxed)
    }

    /// Stops every worker after its turn in progress (what it committed stays) and waits.
    pub fn stop(&self) {
        for stop in self
            .stops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = stop.send(());
        }
        for thread in self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = thread.join();
        }
    }
}

/// A stream id from its 16 wire bytes.
pub fn parse_id(bytes: &[u8]) -> Result<u128, Status> {
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| {
        Status::invalid_argument(format!("a stream id has 16 bytes, not {}", bytes.len()))
    })?;
    Ok(u128::from_be_bytes(bytes))
}

/// A stream id's 16 wire bytes.
pub fn id_bytes(id: u128) -> Bytes {
    Bytes::copy_from_slice(&id.to_be_bytes())
}
