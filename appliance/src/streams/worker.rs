//! One stream worker: the I/O shell around `meshd_shards::streams` for the streams that hash
//! to it. See the module docs of `streams` for the turn structure and the boundary.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use meshd_proto::link::{ClientData, StreamOpen, StreamReport};
use meshd_shards::{
    command::{ApiEvent, Outgoing, ShardInput},
    frame::{FrameType, Header, TrafficClass},
    handle::ShardHandle,
    origin::{self, KeyBook, KeyCache},
    ownership::owner_shard,
    ring::Consumer,
    streams::{
        Completion, MAX_TARGETS, Report, Seq,
        chunk::{self, Piece, Reassembler, ReassemblyLimits},
        priority_order, sort_by_priority,
        source::{AckPolicy, Publish, Source, SourceConfig},
        target::{AckError, Arrival, Inbox, InboxConfig},
    },
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::{
    MAX_BATCH, MAX_WINDOW, OpenRequest, Published, WorkerInput,
    group::{Op, groups::StreamGroups},
    store::{Batch, Queue, Role, StreamRecord},
};
use crate::{
    api::{
        SharedTenantKeys, append_tag,
        tenant::{MAX_TENANT_LEN, Sealed},
    },
    backend::{BackendError, StreamStore},
    config::StreamsSection,
    storage::now_ms,
};

mod recovery;
mod source;
mod target;

/// How often timers (retransmission, keepalive reports, open retries, publish deadlines)
/// are looked at when nothing else wakes the worker.
const TICK: Duration = Duration::from_millis(20);

/// Inputs and frames taken in one turn before its commit.
const TURN_INPUTS: usize = 4096;

/// Data frames sent per turn (more wait for the next turn).
const TURN_SENDS: usize = 4096;

/// Bytes read from the outbox (to send) and from the inboxes (to deliver) per turn, each at
/// least one message: what a turn holds in memory, whatever the message sizes.
const TURN_BYTES: usize = 16 << 20;

/// Messages delivered to subscribers per turn.
const TURN_DELIVERIES: usize = 4096;

/// Bytes one subscriber may have received from a worker and not acknowledged (one message
/// always goes, however large): the window counts messages, this bounds memory when they are
/// large.
const SUBSCRIBER_BYTES: usize = 256 << 20;

/// Bytes of out-of-order messages all streams of a worker hold in memory (past it they are
/// dropped; the source sends them again after the gap).
const HELD_BYTES: usize = 64 << 20;

/// How long after a failed reload from the store the worker tries again.
const RELOAD_RETRY: Duration = Duration::from_millis(250);

/// Bytes of the sealed message's epoch and nonce before its ciphertext.
const SEALED_HEAD: usize = 8 + 24;

/// What the worker is built from.
pub(super) struct WorkerSetup {
    pub node_id: u64,
    pub config: StreamsSection,
    pub db: Box<dyn StreamStore>,
    pub shards: Arc<[ShardHandle]>,
    pub key_book: Arc<KeyBook>,
    pub tenant_keys: SharedTenantKeys,
    pub groups: StreamGroups,
}

struct Waiting {
    first: Seq,
    last: Seq,
    /// When the batch arrived (its answer's latency).
    since: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Published, Status>>,
}

struct SourceStream {
    core: Source,
    /// Its data stream group.
    group: u64,
    record: StreamRecord,
    waiting: Vec<Waiting>,
    /// A target refused the stream: why.
    refused: Option<String>,
    dirty: bool,
}

struct TargetStream {
    inbox: Inbox<Vec<u8>>,
    /// Its data stream group.
    group: u64,
    record: StreamRecord,
    sub: Option<u64>,
    /// (seq, bytes) handed to the subscriber and not yet acknowledged.
    unacked: VecDeque<(Seq, usize)>,
    dirty: bool,
}

struct Sub {
    tenant: String,
    streams: HashSet<u128>,
    window: u32,
    tx: mpsc::Sender<Result<ClientData, Status>>,
    /// Bytes handed to it and not yet acknowledged, over its streams of this worker.
    unacked_bytes: usize,
}

/// What to do once the turn's transaction is durable.
enum Done {
    Opened(oneshot::Sender<Result<(), Status>>),
    Closed(oneshot::Sender<Result<u64, Status>>, Seq),
    Durable(u128),
    Stored(u128, Seq),
    Processed(u128, Seq),
    Released(u128, Seq),
}

struct Frame {
    dst: u64,
    frame_type: FrameType,
    stream: u128,
    seq: Seq,
    chunk: (u16, u16),
    payload: Vec<u8>,
}

/// The message id a stream message is sealed under (the tenant cipher's associated data).
fn message_key(stream: u128, seq: Seq) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"meshd stream message");
    hasher.update(&stream.to_be_bytes());
    hasher.update(&seq.to_le_bytes());
    let hash = hasher.finalize();
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

pub(super) struct Worker {
    node_id: u64,
    config: StreamsSection,
    db: Box<dyn StreamStore>,
    shards: Arc<[ShardHandle]>,
    key_book: Arc<KeyBook>,
    keys: KeyCache,
    tenant_keys: SharedTenantKeys,
    groups: StreamGroups,
    sources: HashMap<u128, SourceStream>,
    targets: HashMap<u128, TargetStream>,
    reassembler: Reassembler,
    subs: BTreeMap<u64, Sub>,
    batch: Batch,
    done: Vec<Done>,
    unsent: VecDeque<Outgoing>,
    started: Instant,
    /// Work left over from the last turn (sends or deliveries past the budget).
    more: bool,
    /// Bytes held out of order (approximate: a forgotten stream's are not given back until
    /// the next reload, which errs on the side of holding less).
    held_bytes: usize,
    /// Sources and targets by priority, highest first (rebuilt when `order_dirty`).
    source_order: Vec<(u8, u128)>,
    target_order: Vec<(u8, u128)>,
    order_dirty: bool,
    /// Turns taken (equal priorities take turns leading).
    turns: usize,
    /// The order of this turn (kept to reuse its allocation).
    scratch: Vec<u128>,
    /// The store failed and the streams are not loaded: when to try again, and why. Until
    /// then the worker holds no stream state (what it had may be ahead of the store), refuses
    /// opens, publishes and closes with UNAVAILABLE and drops stream frames (their senders
    /// send them again).
    unloaded: Option<(Instant, String)>,
    /// Subscribers ended by a store failure whose ending has not reached them yet (their
    /// queue was full): tried again every turn.
    farewells: Vec<mpsc::Sender<Result<ClientData, Status>>>,
}

impl Worker {
    pub(super) fn new(setup: WorkerSetup) -> Result<Self, BackendError> {
        let limits = reassembly_limits(&setup.config);
        let mut worker = Self {
            node_id: setup.node_id,
            config: setup.config,
            db: setup.db,
            shards: setup.shards,
            key_book: setup.key_book,
            keys: KeyCache::default(),
            tenant_keys: setup.tenant_keys,
            groups: setup.groups,
            sources: HashMap::new(),
            targets: HashMap::new(),
            reassembler: Reassembler::new(limits),
            subs: BTreeMap::new(),
            batch: Batch::default(),
            done: Vec::new(),
            unsent: VecDeque::new(),
            started: Instant::now(),
            more: false,
            held_bytes: 0,
            source_order: Vec::new(),
            target_order: Vec::new(),
            order_dirty: true,
            turns: 0,
            scratch: Vec::new(),
            unloaded: None,
            farewells: Vec::new(),
        };
        worker.load()?;
        Ok(worker)
    }

    fn source_config(&self) -> SourceConfig {
        SourceConfig {
            max_outstanding: self.config.max_outstanding,
            retransmit_ms: self.config.retransmit_ms,
            open_retry_ms: 250,
        }
    }

    fn inbox_config(&self) -> InboxConfig {
        InboxConfig {
            max_backlog: self.config.max_backlog,
            max_held: 256,
            keepalive_ms: 1000,
        }
    }

    /// Rebuilds the priority orders after streams came or went.
    fn refresh_order(&mut self) {
        if !std::mem::take(&mut self.order_dirty) {
            return;
        }
        self.source_order = self
            .sources
            .iter()
            .map(|(id, s)| (s.record.priority, *id))
            .collect();
        sort_by_priority(&mut self.source_order);
        self.target_order = self
            .targets
            .iter()
            .map(|(id, t)| (t.record.priority, *id))
            .collect();
        sort_by_priority(&mut self.target_order);
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(super) fn run(
        mut self,
        mut inputs: mpsc::Receiver<WorkerInput>,
        frames: Consumer<ApiEvent>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "stream worker runtime failed to start");
                return;
            }
        };
        runtime.block_on(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut frames_open = true;
            let mut inputs_open = true;
            loop {
                let busy = self.more || !self.unsent.is_empty();
                // Timers matter only while there are streams: an idle worker sleeps until asked.
                let timers =
                    !self.sources.is_empty() || !self.targets.is_empty() || self.unloaded.is_some();
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    input = inputs.recv(), if inputs_open => match input {
                        Some(input) => self.on_input(input),
                        None => inputs_open = false,
                    },
                    event = frames.pop(), if frames_open => match event {
                        Some(event) => self.on_event(event),
                        None => frames_open = false,
                    },
                    () = tokio::time::sleep(Duration::from_millis(1)), if busy => {}
                    _ = tick.tick(), if timers => {}
                }
                for _ in 0..TURN_INPUTS {
                    let mut took = false;
                    if let Ok(input) = inputs.try_recv() {
                        self.on_input(input);
                        took = true;
                    }
                    if let Some(event) = frames.try_pop() {
                        self.on_event(event);
                        took = true;
                    }
                    if !took {
                        break;
                    }
                }
                self.turn();
            }
            // What is committed stays; answers still waiting are dropped (their callers
            // hear UNAVAILABLE and retry with the same seqs after the restart).
            self.commit();
        });
    }

    fn turn(&mut self) {
        self.turns = self.turns.wrapping_add(1);
        if !self.farewells.is_empty() {
            self.say_farewells();
        }
        if let Some((at, _)) = &self.unloaded {
            if Instant::now() >= *at {
                self.reload();
            }
            if self.unloaded.is_some() {
                return;
            }
        }
        self.commit();
        let now = self.now();
        self.flush_unsent();
        self.more = false;
        self.pump_targets(now);
        self.pump_sources(now);
    }

    /// Commits the turn's writes in one transaction, then acts on what became durable.
    fn commit(&mut self) {
        for (id, s) in &mut self.sources {
            if std::mem::take(&mut s.dirty) {
                self.batch.records.push((*id, Some(s.record.clone())));
            }
        }
        for (id, t) in &mut self.targets {
            if std::mem::take(&mut t.dirty) {
                self.batch.records.push((*id, Some(t.record.clone())));
            }
        }
        if self.batch.is_empty() && self.done.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let result = if batch.is_empty() {
            Ok(())
        } else {
            let started = Instant::now();
            let result = self.db.commit(batch, now_ms());
            crate::metrics::RECORDED
                .stream_commit_latency
                .observe(started.elapsed().as_secs_f64());
            result
        };
        let done = std::mem::take(&mut self.done);
        if let Err(e) = result {
            tracing::error!(error = %e, "stream commit failed; reloading the streams from disk");
            let status = || Status::unavailable(format!("not stored: {e}; retry"));
            for d in done {
                match d {
                    Done::Opened(reply) => {
                        let _ = reply.send(Err(status()));
                    }
                    Done::Closed(reply, _) => {
                        let _ = reply.send(Err(status()));
                    }
                    _ => {}
                }
            }
            for s in self.sources.values_mut() {
                for w in s.waiting.drain(..) {
                    let _ = w.reply.send(Err(status()));
                }
            }
            // The streams go back to what the store holds, so deliveries whose acks were not
            // stored come again: end the subscriptions first, so that within one
            // subscription a stream's seqs stay consecutive (the subscriber subscribes again
            // and dedupes by seq, as after a restart).
            self.farewells
                .extend(std::mem::take(&mut self.subs).into_values().map(|s| s.tx));
            self.say_farewells();
            self.reload();
            return;
        }
        for d in done {
            match d {
                Done::Opened(reply) => {
                    let _ = reply.send(Ok(()));
                }
                Done::Closed(reply, last) => {
                    let _ = reply.send(Ok(last));
                }
                Done::Durable(id) => {
                    if let Some(s) = self.sources.get_mut(&id) {
                        let last = s.core.last();
                        s.core.on_durable(last);
                    }
                }
                Done::Stored(id, seq) => {
                    if let Some(t) = self.targets.get_mut(&id) {
                        t.inbox.on_stored(seq);
                        self.reassembler.forget(id, seq);
                    }
                }
                Done::Processed(id, seq) => {
                    if let Some(t) = self.targets.get_mut(&id) {
                        t.inbox.on_processed(seq);
                        // The group records it (the source releases by the group's word).
                        self.groups.offer_offset(t.group, id, seq);
                    }
                }
                Done::Released(id, seq) => {
                    if let Some(s) = self.sources.get_mut(&id) {
                        s.core.on_released(seq);
                    }
                }
            }
        }
    }

    fn on_input(&mut self, input: WorkerInput) {
        if let Some((_, why)) = &self.unloaded {
            let status = Status::unavailable(format!(
                "stream storage unavailable ({why}); nothing was stored: retry"
            ));
            match input {
                WorkerInput::Open { reply, .. } => {
                    let _ = reply.send(Err(status));
                    return;
                }
                WorkerInput::Publish { reply, .. } => {
                    let _ = reply.send(Err(status));
                    return;
                }
                WorkerInput::Close { reply, .. } => {
                    let _ = reply.send(Err(status));
                    return;
                }
                // Subscriptions are kept (attached once the streams are back); acks of
                // deliveries from before the failure are moot (they are delivered again).
                WorkerInput::Ack { .. } => return,
                WorkerInput::Unreleased { reply } => {
                    let _ = reply.send(None);
                    return;
                }
                input => return self.on_input_loaded(input),
            }
        }
        self.on_input_loaded(input);
    }

    fn on_input_loaded(&mut self, input: WorkerInput) {
        match input {
            WorkerInput::Open { request, reply } => self.open(request, reply),
            WorkerInput::Publish {
                stream,
                first_seq,
                messages,
                reply,
            } => {
                if let Err(status) = self.publish(stream, first_seq, messages, reply) {
                    // `publish` hands the reply back only with an error to send.
                    let (reply, status) = status;
                    let _ = reply.send(Err(status));
                }
            }
            WorkerInput::Close { stream, reply } => {
                let Some(s) = self.sources.get_mut(&stream) else {
                    let _ = reply.send(Err(Status::not_found("no such stream at this node")));
                    return;
                };
                s.core.close();
                let last = s.core.last();
                s.record.closed = Some(last);
                s.dirty = true;
                self.done.push(Done::Closed(reply, last));
            }
            WorkerInput::Subscribe {
                sub,
                tenant,
                streams,
                window,
                tx,
            } => {
                self.subs.insert(
                    sub,
                    Sub {
                        tenant,
                        streams: streams.into_iter().collect(),
                        window,
                        tx,
                        unacked_bytes: 0,
                    },
                );
                let free: Vec<u128> = self
                    .targets
                    .iter()
                    .filter(|(_, t)| t.sub.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                for id in free {
                    self.attach(id);
                }
            }
            WorkerInput::Ack { sub, stream, seq } => self.ack(sub, stream, seq),
            WorkerInput::Window {
                sub,
                stream,
                window,
            } => {
                let window = window.clamp(1, MAX_WINDOW);
                if stream.is_none()
                    && let Some(s) = self.subs.get_mut(&sub)
                {
                    s.window = window;
                }
                for (id, t) in &mut self.targets {
                    if t.sub == Some(sub) && stream.is_none_or(|s| s == *id) {
                        t.inbox.set_window(window);
                    }
                }
            }
            WorkerInput::Unsubscribe { sub } => self.unsubscribe(sub),
            WorkerInput::Unreleased { reply } => {
                let unreleased = self
                    .sources
                    .values()
                    .map(|s| s.core.last().saturating_sub(s.record.low))
                    .sum();
                let _ = reply.send(Some(unreleased));
            }
        }
    }

    fn on_event(&mut self, event: ApiEvent) {
        let ApiEvent::Stream { header, payload } = event else {
            return;
        };
        if self.unloaded.is_some() {
            // No state to judge it by; its sender sends it again.
            return;
        }
        match header.frame_type {
            FrameType::StreamOpen => match StreamOpen::decode(payload) {
                Ok(open) => self.on_open(header.src, header.stream_id, open),
                Err(e) => tracing::debug!(src = header.src, error = %e, "bad StreamOpen"),
            },
            FrameType::StreamReport => match StreamReport::decode(payload) {
                Ok(report) => self.on_report(header.src, header.stream_id, &report),
                Err(e) => tracing::debug!(src = header.src, error = %e, "bad StreamReport"),
            },
            FrameType::StreamData => self.on_data(&header, &payload),
            _ => {}
        }
    }

    /// The frame with its origin tag, or `None` without a pair key for its destination.
    fn outgoing(&mut self, frame: Frame) -> Option<Outgoing> {
        let mut outgoing = Outgoing {
            dst: frame.dst,
            frame_type: frame.frame_type,
            traffic_class: TrafficClass::Client,
            msg_id: frame.seq,
            flow: frame.stream,
            payload: frame.payload.into(),
            chunk: frame.chunk,
        };
        append_tag(self.keys.get(&self.key_book), self.node_id, &mut outgoing).then_some(outgoing)
    }

    fn shard_of(&self, dst: u64) -> &ShardHandle {
        &self.shards[owner_shard(dst, self.shards.len())]
    }

    /// Reports and opens: lost when the ring is full (both are sent again).
    fn send_control(&mut self, dst: u64, frame_type: FrameType, stream: u128, payload: Vec<u8>) {
        let frame = Frame {
            dst,
            frame_type,
            stream,
            seq: 0,
            chunk: (0, 0),
            payload,
        };
        if let Some(outgoing) = self.outgoing(frame) {
            let _ = self.shard_of(dst).try_push(ShardInput::Send(outgoing));
        }
    }

    /// Data: kept in order for the next turn when the ring is full.
    fn send_data(&mut self, frame: Frame) {
        let dst = frame.dst;
        let Some(outgoing) = self.outgoing(frame) else {
            return;
        };
        if !self.unsent.is_empty() {
            self.unsent.push_back(outgoing);
            return;
        }
        if let Err(e) = self.shard_of(dst).try_push(ShardInput::Send(outgoing))
            && let ShardInput::Send(outgoing) = e.into_inner()
        {
            self.unsent.push_back(outgoing);
        }
    }

    fn flush_unsent(&mut self) {
        while let Some(outgoing) = self.unsent.pop_front() {
            let shard = &self.shards[owner_shard(outgoing.dst, self.shards.len())];
            if let Err(e) = shard.try_push(ShardInput::Send(outgoing)) {
                if let ShardInput::Send(outgoing) = e.into_inner() {
                    self.unsent.push_front(outgoing);
                }
                return;
            }
        }
    }
}

/// What a worker reassembles at most: a sealed message of the largest size, 64 at once.
fn reassembly_limits(config: &StreamsSection) -> ReassemblyLimits {
    ReassemblyLimits {
        max_message: (config.max_message_bytes + SEALED_HEAD + 64) as u64,
        max_open: 64,
        max_bytes: config.reassembly_bytes,
    }
}

/// The group fact that a stream exists, from its record.
fn open_op(id: u128, record: &StreamRecord) -> Op {
    Op::Open {
        stream: id,
        source: record.source,
        targets: record.targets.clone(),
        quorum: record.quorum,
        tenant: record.tenant.clone(),
    }
}

fn ack_policy(on_source: bool) -> AckPolicy {
    if on_source {
        AckPolicy::Source
    } else {
        AckPolicy::Targets
    }
}
