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
        source::{AckPolicy, Publish, Source, SourceConfig},
        target::{AckError, Arrival, Inbox, InboxConfig},
    },
};
use prost::Message as _;
use redb::Database;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::{
    MAX_BATCH, MAX_WINDOW, OpenRequest, Published, WorkerInput,
    store::{self, Batch, Queue, Role, StreamRecord},
};
use crate::{
    api::{
        SharedTenantKeys,
        tenant::{MAX_TENANT_LEN, Sealed},
    },
    config::StreamsSection,
    storage::now_ms,
};

/// How often timers (retransmission, keepalive reports, open retries, publish deadlines)
/// are looked at when nothing else wakes the worker.
const TICK: Duration = Duration::from_millis(20);

/// Inputs and frames taken in one turn before its commit.
const TURN_INPUTS: usize = 4096;

/// Data frames sent per turn (more wait for the next turn).
const TURN_SENDS: usize = 4096;

/// Messages delivered to subscribers per turn.
const TURN_DELIVERIES: usize = 4096;

/// Bytes of out-of-order messages all streams of a worker hold in memory (past it they are
/// dropped; the source sends them again after the gap).
const HELD_BYTES: usize = 64 << 20;

/// Bytes of the sealed message's epoch and nonce before its ciphertext.
const SEALED_HEAD: usize = 8 + 24;

/// What the worker is built from.
pub(super) struct WorkerSetup {
    pub node_id: u64,
    pub config: StreamsSection,
    pub db: Database,
    pub shards: Arc<[ShardHandle]>,
    pub key_book: Arc<KeyBook>,
    pub tenant_keys: SharedTenantKeys,
}

struct Waiting {
    first: Seq,
    last: Seq,
    deadline: Instant,
    reply: oneshot::Sender<Result<Published, Status>>,
}

struct SourceStream {
    core: Source,
    record: StreamRecord,
    waiting: Vec<Waiting>,
    /// A target refused the stream: why.
    refused: Option<String>,
    dirty: bool,
}

struct TargetStream {
    inbox: Inbox<Vec<u8>>,
    record: StreamRecord,
    sub: Option<u64>,
    dirty: bool,
}

struct Sub {
    tenant: String,
    streams: HashSet<u128>,
    window: u32,
    tx: mpsc::Sender<Result<ClientData, Status>>,
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
    db: Database,
    shards: Arc<[ShardHandle]>,
    key_book: Arc<KeyBook>,
    keys: KeyCache,
    tenant_keys: SharedTenantKeys,
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
}

impl Worker {
    pub(super) fn new(setup: WorkerSetup) -> Result<Self, store::StoreError> {
        let limits = ReassemblyLimits {
            max_message: (setup.config.max_message_bytes + SEALED_HEAD + 64) as u64,
            max_open: 64,
            max_bytes: setup.config.reassembly_bytes,
        };
        let mut worker = Self {
            node_id: setup.node_id,
            config: setup.config,
            db: setup.db,
            shards: setup.shards,
            key_book: setup.key_book,
            keys: KeyCache::default(),
            tenant_keys: setup.tenant_keys,
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

    /// (Re)builds every stream from the database.
    fn load(&mut self) -> Result<(), store::StoreError> {
        self.sources.clear();
        self.targets.clear();
        self.unsent.clear();
        self.held_bytes = 0;
        self.reassembler = Reassembler::new(ReassemblyLimits {
            max_message: (self.config.max_message_bytes + SEALED_HEAD + 64) as u64,
            max_open: 64,
            max_bytes: self.config.reassembly_bytes,
        });
        for (id, record) in store::load(&self.db)? {
            match record.role {
                Role::Source => {
                    let core = Source::restore(
                        &record.targets,
                        Completion::from_quorum(record.quorum),
                        ack_policy(record.ack_on_source),
                        self.source_config(),
                        record.high,
                        record.low,
                        record.closed.is_some(),
                    );
                    self.sources.insert(
                        id,
                        SourceStream {
                            core,
                            record,
                            waiting: Vec::new(),
                            refused: None,
                            dirty: false,
                        },
                    );
                }
                Role::Target => {
                    let mut inbox = Inbox::restore(self.inbox_config(), record.high, record.low);
                    if let Some(last) = record.closed {
                        inbox.on_closed(last);
                    }
                    self.targets.insert(
                        id,
                        TargetStream {
                            inbox,
                            record,
                            sub: None,
                            dirty: false,
                        },
                    );
                }
            }
        }
        let ids: Vec<u128> = self.targets.keys().copied().collect();
        for id in ids {
            self.attach(id);
        }
        tracing::info!(
            sources = self.sources.len(),
            targets = self.targets.len(),
            "stream worker loaded"
        );
        Ok(())
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
                let timers = !self.sources.is_empty() || !self.targets.is_empty();
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
            store::commit(&self.db, &batch, now_ms())
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
            if let Err(e) = self.load() {
                tracing::error!(error = %e, "reloading the streams failed");
            }
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
        }
    }

    fn open(&mut self, request: OpenRequest, reply: oneshot::Sender<Result<(), Status>>) {
        if self.sources.contains_key(&request.id) || self.targets.contains_key(&request.id) {
            let _ = reply.send(Err(Status::already_exists("stream id in use")));
            return;
        }
        if self.sources.len() + self.targets.len() >= self.config.max_streams {
            let _ = reply.send(Err(Status::resource_exhausted(format!(
                "{} streams open on this worker (streams.max_streams); close some",
                self.config.max_streams
            ))));
            return;
        }
        let completion = Completion::from_quorum(request.quorum);
        let core = Source::new(
            &request.targets,
            completion,
            ack_policy(request.ack_on_source),
            self.source_config(),
        );
        let record = StreamRecord {
            role: Role::Source,
            tenant: request.tenant,
            source: self.node_id,
            targets: request.targets,
            quorum: request.quorum,
            ack_on_source: request.ack_on_source,
            high: 0,
            low: 0,
            closed: None,
        };
        self.sources.insert(
            request.id,
            SourceStream {
                core,
                record,
                waiting: Vec::new(),
                refused: None,
                dirty: true,
            },
        );
        self.done.push(Done::Opened(reply));
    }

    #[allow(clippy::type_complexity)]
    fn publish(
        &mut self,
        stream: u128,
        first_seq: Option<Seq>,
        messages: Vec<Bytes>,
        reply: oneshot::Sender<Result<Published, Status>>,
    ) -> Result<(), (oneshot::Sender<Result<Published, Status>>, Status)> {
        let max_message = self.config.max_message_bytes;
        let timeout = Duration::from_millis(self.config.publish_timeout_ms);
        let Some(s) = self.sources.get_mut(&stream) else {
            return Err((reply, Status::not_found("no such stream at this node")));
        };
        let n = messages.len() as u64;
        if messages.is_empty() || messages.len() > MAX_BATCH {
            return Err((
                reply,
                Status::invalid_argument(format!("a batch has 1..={MAX_BATCH} messages")),
            ));
        }
        if let Some(i) = messages
            .iter()
            .position(|m| m.is_empty() || m.len() > max_message)
        {
            return Err((
                reply,
                Status::invalid_argument(format!(
                    "message {i} has {} bytes: a message has 1..={max_message} (streams.max_message_bytes)",
                    messages[i].len()
                )),
            ));
        }
        if let Some(why) = &s.refused {
            return Err((
                reply,
                Status::failed_precondition(format!("a target refused the stream: {why}")),
            ));
        }
        let last = s.core.last();
        let new = match first_seq {
            None => n,
            Some(0) => {
                return Err((
                    reply,
                    Status::invalid_argument("first_seq 0: seqs start at 1"),
                ));
            }
            Some(first) if first > last + 1 => {
                return Err((
                    reply,
                    Status::invalid_argument(format!(
                        "first_seq {first} claimed but the next seq is {}",
                        last + 1
                    )),
                ));
            }
            Some(first) => (first + n - 1).saturating_sub(last),
        };
        if new > 0 && s.core.is_closed() {
            return Err((reply, Status::failed_precondition("the stream is closed")));
        }
        if new > s.core.room() {
            return Err((
                reply,
                Status::resource_exhausted(format!(
                    "{} messages outstanding (streams.max_outstanding {}): wait for the targets",
                    s.core.last() - s.core.released(),
                    self.config.max_outstanding
                )),
            ));
        }
        let keys = self
            .tenant_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if new > 0
            && let Err(e) = keys.serves(&s.record.tenant)
        {
            return Err((reply, Status::failed_precondition(e.to_string())));
        }
        let now = now_ms();
        for (i, message) in messages.iter().enumerate() {
            let claimed = first_seq.map(|f| f + i as u64);
            match s.core.publish(claimed) {
                Ok(Publish::New(seq)) => {
                    let sealed = keys.seal(
                        &s.record.tenant,
                        self.node_id,
                        message_key(stream, seq),
                        now,
                        rand::random(),
                        message,
                    );
                    let sealed = match sealed {
                        Ok(sealed) => sealed,
                        Err(e) => {
                            // Checked above: only a bug gets here.
                            tracing::error!(error = %e, "sealing a stream message failed");
                            return Err((reply, Status::internal(e.to_string())));
                        }
                    };
                    let mut bytes = Vec::with_capacity(SEALED_HEAD + sealed.ciphertext.len());
                    bytes.extend_from_slice(&sealed.epoch.to_le_bytes());
                    bytes.extend_from_slice(&sealed.nonce);
                    bytes.extend_from_slice(&sealed.ciphertext);
                    self.batch.outbox.push((stream, seq, bytes));
                }
                Ok(Publish::Duplicate(_)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "a checked publish was refused");
                    return Err((reply, Status::internal(e.to_string())));
                }
            }
        }
        drop(keys);
        let first = first_seq.unwrap_or(last + 1);
        if new > 0 {
            s.record.high = s.core.last();
            s.dirty = true;
            self.done.push(Done::Durable(stream));
        }
        s.waiting.push(Waiting {
            first,
            last: first + n - 1,
            deadline: Instant::now() + timeout,
            reply,
        });
        Ok(())
    }

    /// Gives stream `id` to the first subscriber whose selection covers it.
    fn attach(&mut self, id: u128) {
        let Some(t) = self.targets.get_mut(&id) else {
            return;
        };
        if t.sub.is_some() {
            return;
        }
        let chosen = self.subs.iter().find(|(_, s)| {
            s.tenant == t.record.tenant && (s.streams.is_empty() || s.streams.contains(&id))
        });
        if let Some((sub, s)) = chosen {
            t.sub = Some(*sub);
            t.inbox.subscribe(s.window);
        }
    }

    fn unsubscribe(&mut self, sub: u64) {
        self.subs.remove(&sub);
        let held: Vec<u128> = self
            .targets
            .iter_mut()
            .filter(|(_, t)| t.sub == Some(sub))
            .map(|(id, t)| {
                t.sub = None;
                t.inbox.unsubscribe();
                *id
            })
            .collect();
        for id in held {
            self.attach(id);
        }
    }

    fn ack(&mut self, sub: u64, stream: u128, seq: Seq) {
        let Some(t) = self.targets.get_mut(&stream) else {
            return;
        };
        if t.sub != Some(sub) {
            // An ack from a subscriber that lost the stream meanwhile: the new one gets
            // the messages again.
            return;
        }
        let from = t.inbox.acking() + 1;
        match t.inbox.on_subscriber_ack(seq) {
            Ok(Some(seq)) => {
                self.batch.processed.push((stream, from, seq));
                t.record.low = seq;
                t.dirty = true;
                self.done.push(Done::Processed(stream, seq));
            }
            Ok(None) => {}
            Err(AckError::NotDelivered { seq, delivered }) => {
                if let Some(s) = self.subs.get(&sub) {
                    let _ = s.tx.try_send(Err(Status::invalid_argument(format!(
                        "ack of seq {seq} of stream {stream:032x}: delivered only up to {delivered}"
                    ))));
                }
                self.unsubscribe(sub);
            }
        }
    }

    fn on_event(&mut self, event: ApiEvent) {
        let ApiEvent::Stream { header, payload } = event else {
            return;
        };
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

    fn on_open(&mut self, src: u64, id: u128, open: StreamOpen) {
        if let Some(t) = self.targets.get_mut(&id) {
            if t.record.source != src {
                return;
            }
            if open.closed {
                let last = if open.unknown {
                    t.inbox.received()
                } else {
                    open.last
                };
                t.inbox.on_closed(last);
                if t.record.closed != Some(last) {
                    t.record.closed = Some(last);
                    t.dirty = true;
                }
            } else {
                t.inbox.report_now();
            }
            return;
        }
        if open.closed || self.sources.contains_key(&id) {
            return;
        }
        let targets = &open.targets;
        let valid = !targets.is_empty()
            && targets.len() <= MAX_TARGETS
            && targets.contains(&self.node_id)
            && !targets.contains(&src)
            && targets.iter().collect::<HashSet<_>>().len() == targets.len()
            && Completion::from_quorum(open.quorum)
                .check(targets.len())
                .is_ok()
            && !open.tenant.is_empty()
            && open.tenant.len() <= MAX_TENANT_LEN;
        if !valid {
            tracing::debug!(src, "StreamOpen with impossible targets, quorum or tenant");
            return;
        }
        let refusal = if let Err(e) = self
            .tenant_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .serves(&open.tenant)
        {
            Some(e.to_string())
        } else if self.sources.len() + self.targets.len() >= self.config.max_streams {
            Some(format!("node {} holds too many streams", self.node_id))
        } else if self
            .targets
            .values()
            .filter(|t| t.record.source == src)
            .count()
            >= self.config.max_streams / 2
        {
            // One source may not take every slot.
            Some(format!(
                "node {src} has too many streams to node {}",
                self.node_id
            ))
        } else {
            None
        };
        if let Some(refused) = refusal {
            let report = StreamReport {
                refused,
                ..StreamReport::default()
            };
            self.send_control(src, FrameType::StreamReport, id, report.encode_to_vec());
            return;
        }
        let record = StreamRecord {
            role: Role::Target,
            tenant: open.tenant,
            source: src,
            targets: open.targets,
            quorum: open.quorum,
            ack_on_source: false,
            high: 0,
            low: 0,
            closed: None,
        };
        self.targets.insert(
            id,
            TargetStream {
                inbox: Inbox::restore(self.inbox_config(), 0, 0),
                record,
                sub: None,
                dirty: true,
            },
        );
        self.attach(id);
    }

    fn on_report(&mut self, src: u64, id: u128, report: &StreamReport) {
        let now = self.now();
        let Some(s) = self.sources.get_mut(&id) else {
            if !self.targets.contains_key(&id) {
                // A stream this node ended and forgot (or never had): the target may let
                // it go once it delivered what it holds. One answer per report.
                let open = StreamOpen {
                    closed: true,
                    unknown: true,
                    ..StreamOpen::default()
                };
                self.send_control(src, FrameType::StreamOpen, id, open.encode_to_vec());
            }
            return;
        };
        if !report.refused.is_empty() {
            if s.core.targets().any(|t| t == src) {
                let why = format!(
                    "node {src}: {}",
                    report.refused.chars().take(256).collect::<String>()
                );
                tracing::warn!(stream = %format!("{id:032x}"), %why, "a target refused a stream");
                s.refused = Some(why);
            }
            return;
        }
        let report = Report {
            received: report.received,
            processed: report.processed,
            window: report.window,
        };
        if let Err(e) = s.core.on_report(src, report, now) {
            tracing::debug!(error = %e, "stream report ignored");
        }
    }

    fn on_data(&mut self, header: &Header, payload: &[u8]) {
        let id = header.stream_id;
        let Some(t) = self.targets.get_mut(&id) else {
            return;
        };
        if header.src != t.record.source {
            return;
        }
        let seq = header.seq;
        if !t.inbox.wants(seq) {
            // A duplicate (the source learns where the inbox stands) or past the credit.
            let _ = t.inbox.on_data(seq, Vec::new());
            return;
        }
        let sealed = if header.is_chunked() {
            match self
                .reassembler
                .on_chunk(id, seq, header.chunk_seq, header.chunk_count, payload)
            {
                Piece::Complete(message) => message,
                Piece::Partial | Piece::Duplicate => return,
                Piece::Corrupt(why) | Piece::Refused(why) => {
                    tracing::debug!(stream = %format!("{id:032x}"), seq, why, "chunk dropped");
                    return;
                }
            }
        } else {
            payload.to_vec()
        };
        if sealed.len() < SEALED_HEAD {
            return;
        }
        let sealed = Sealed {
            epoch: u64::from_le_bytes(sealed[..8].try_into().expect("8 bytes")),
            nonce: sealed[8..SEALED_HEAD].try_into().expect("24 bytes"),
            ciphertext: &sealed[SEALED_HEAD..],
        };
        let opened = self
            .tenant_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open(
                &t.record.tenant,
                t.record.source,
                message_key(id, seq),
                now_ms(),
                &sealed,
            );
        let plaintext = match opened {
            Ok(plaintext) => plaintext,
            Err(e) => {
                tracing::warn!(stream = %format!("{id:032x}"), seq, error = %e, "stream message does not open");
                return;
            }
        };
        let len = plaintext.len();
        if seq != t.inbox.next_expected() && self.held_bytes + len > HELD_BYTES {
            return;
        }
        let arrival = t.inbox.on_data(seq, plaintext);
        if arrival == Arrival::Held {
            self.held_bytes += len;
        }
        if let Arrival::Store(stored) = arrival {
            let last = stored.last().map_or(seq, |(s, _)| *s);
            for (i, (seq, message)) in stored.into_iter().enumerate() {
                if i > 0 {
                    self.held_bytes = self.held_bytes.saturating_sub(message.len());
                }
                self.batch.inbox.push((id, seq, message));
            }
            t.record.high = last;
            t.dirty = true;
            self.done.push(Done::Stored(id, last));
        }
    }

    /// Targets: deliver to subscribers, report to sources, forget finished streams.
    fn pump_targets(&mut self, now: u64) {
        let mut deliveries: Vec<(u128, Seq)> = Vec::new();
        let mut reports = Vec::new();
        let mut finished = Vec::new();
        for (id, t) in &mut self.targets {
            if t.sub.is_some() {
                while deliveries.len() < TURN_DELIVERIES {
                    let Some(seq) = t.inbox.poll_deliver() else {
                        break;
                    };
                    deliveries.push((*id, seq));
                }
                if deliveries.len() >= TURN_DELIVERIES {
                    self.more = true;
                }
            }
            if let Some(report) = t.inbox.poll_report(now) {
                reports.push((t.record.source, *id, report));
            }
            if t.inbox.is_finished() {
                finished.push(*id);
            }
        }
        for (source, id, report) in reports {
            let report = StreamReport {
                received: report.received,
                processed: report.processed,
                window: report.window,
                refused: String::new(),
            };
            self.send_control(source, FrameType::StreamReport, id, report.encode_to_vec());
        }
        for id in finished {
            self.targets.remove(&id);
            self.reassembler.forget(id, Seq::MAX);
            self.batch.records.push((id, None));
        }
        if deliveries.is_empty() {
            return;
        }
        let messages = match store::read(&self.db, Queue::Inbox, &deliveries) {
            Ok(messages) => messages,
            Err(e) => {
                tracing::error!(error = %e, "reading the inbox failed");
                for (id, seq) in deliveries {
                    if let Some(t) = self.targets.get_mut(&id) {
                        t.inbox.undeliver(seq);
                    }
                }
                return;
            }
        };
        let mut stalled: HashSet<u128> = HashSet::new();
        let mut gone: Vec<u64> = Vec::new();
        for ((id, seq), message) in deliveries.into_iter().zip(messages) {
            let Some(t) = self.targets.get_mut(&id) else {
                continue;
            };
            if stalled.contains(&id) {
                continue;
            }
            let Some(sub) = t.sub.and_then(|sub| self.subs.get(&sub).map(|s| (sub, s))) else {
                continue;
            };
            let Some(payload) = message else {
                tracing::error!(stream = %format!("{id:032x}"), seq, "inbox row missing");
                t.inbox.undeliver(seq);
                stalled.insert(id);
                continue;
            };
            let data = ClientData {
                stream_id: super::id_bytes(id),
                seq,
                payload: payload.into(),
                source_node: t.record.source,
                tenant: t.record.tenant.clone(),
            };
            match sub.1.tx.try_send(Ok(data)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    t.inbox.undeliver(seq);
                    stalled.insert(id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    t.inbox.undeliver(seq);
                    stalled.insert(id);
                    gone.push(sub.0);
                }
            }
        }
        for sub in gone {
            self.unsubscribe(sub);
        }
    }

    /// Sources: open, retransmit, send within credit, answer producers, release, finish.
    fn pump_sources(&mut self, now: u64) {
        let mut opens = Vec::new();
        let mut sends: Vec<(u64, u128, Seq)> = Vec::new();
        let mut finished = Vec::new();
        let instant = Instant::now();
        let can_send = self.unsent.is_empty();
        for (id, s) in &mut self.sources {
            s.core.handle_timeout(now);
            while let Some(node) = s.core.poll_open(now) {
                opens.push((node, *id));
            }
            if can_send {
                while sends.len() < TURN_SENDS {
                    let Some((node, seq)) = s.core.poll_transmit(now) else {
                        break;
                    };
                    sends.push((node, *id, seq));
                }
                if sends.len() >= TURN_SENDS {
                    self.more = true;
                }
            }
            let acked = s.core.acked();
            let committed = s.core.committed();
            let mut i = 0;
            while i < s.waiting.len() {
                let w = &s.waiting[i];
                if w.last <= acked {
                    let w = s.waiting.swap_remove(i);
                    let _ = w.reply.send(Ok(Published {
                        first: w.first,
                        last: w.last,
                        committed,
                    }));
                } else if instant >= w.deadline || s.refused.is_some() {
                    let w = s.waiting.swap_remove(i);
                    let status = match &s.refused {
                        Some(why) => Status::failed_precondition(format!(
                            "a target refused the stream: {why}"
                        )),
                        None => Status::deadline_exceeded(format!(
                            "seqs {}..={} are stored at the source but the targets have not \
                             acknowledged them yet (acknowledged up to {acked}); retry with \
                             first_seq {} (nothing is stored twice)",
                            w.first, w.last, w.first
                        )),
                    };
                    let _ = w.reply.send(Err(status));
                } else {
                    i += 1;
                }
            }
            let releasable = s.core.releasable();
            if releasable > s.record.low {
                self.batch.released.push((*id, releasable));
                s.record.low = releasable;
                s.dirty = true;
                self.done.push(Done::Released(*id, releasable));
            }
            if s.core.is_finished() && s.waiting.is_empty() {
                finished.push(*id);
            }
        }
        for (node, id) in opens {
            let s = &self.sources[&id];
            let open = StreamOpen {
                tenant: s.record.tenant.clone(),
                targets: s.record.targets.clone(),
                quorum: s.record.quorum,
                ..StreamOpen::default()
            };
            self.send_control(node, FrameType::StreamOpen, id, open.encode_to_vec());
        }
        for id in finished {
            let Some(s) = self.sources.remove(&id) else {
                continue;
            };
            let open = StreamOpen {
                closed: true,
                last: s.core.last(),
                ..StreamOpen::default()
            };
            for node in s.core.targets() {
                self.send_control(node, FrameType::StreamOpen, id, open.encode_to_vec());
            }
            self.batch.records.push((id, None));
        }
        if sends.is_empty() {
            return;
        }
        let keys: Vec<(u128, Seq)> = sends.iter().map(|(_, id, seq)| (*id, *seq)).collect();
        let messages = match store::read(&self.db, Queue::Outbox, &keys) {
            Ok(messages) => messages,
            Err(e) => {
                // The retransmission timer sends them again.
                tracing::error!(error = %e, "reading the outbox failed");
                return;
            }
        };
        let chunk_bytes = self.config.chunk_bytes;
        for ((node, id, seq), message) in sends.into_iter().zip(messages) {
            let Some(message) = message else {
                tracing::error!(stream = %format!("{id:032x}"), seq, "outbox row missing");
                continue;
            };
            if message.len() <= chunk_bytes {
                self.send_data(Frame {
                    dst: node,
                    frame_type: FrameType::StreamData,
                    stream: id,
                    seq,
                    chunk: (0, 0),
                    payload: message,
                });
                continue;
            }
            let Some(chunks) = chunk::split(&message, chunk_bytes) else {
                tracing::error!("a stored message needs more chunks than a frame can count");
                continue;
            };
            for (index, count, payload) in chunks {
                self.send_data(Frame {
                    dst: node,
                    frame_type: FrameType::StreamData,
                    stream: id,
                    seq,
                    chunk: (index, count),
                    payload,
                });
            }
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
            payload: Bytes::new(),
            chunk: frame.chunk,
        };
        let header = outgoing.header(self.node_id);
        let key = self.keys.get(&self.key_book).get(frame.dst)?;
        let tag = origin::tag(key, &header, &frame.payload);
        let mut payload = frame.payload;
        payload.extend_from_slice(&tag);
        outgoing.payload = payload.into();
        Some(outgoing)
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

fn ack_policy(on_source: bool) -> AckPolicy {
    if on_source {
        AckPolicy::Source
    } else {
        AckPolicy::Targets
    }
}
