//! The source side of a stream worker: opening, publishing, reports from targets, sending
//! within credit, answering producers, releasing and forgetting finished streams.

use super::*;
use crate::metrics::RECORDED;

impl Worker {
    pub(super) fn open(
        &mut self,
        request: OpenRequest,
        reply: oneshot::Sender<Result<(), Status>>,
    ) {
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
        let mut nodes = request.targets.clone();
        nodes.push(self.node_id);
        let group = match self.groups.ensure(&nodes) {
            Ok(group) => group,
            Err(e) => {
                let _ = reply.send(Err(Status::resource_exhausted(e.to_string())));
                return;
            }
        };
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
            priority: request.priority,
        };
        self.groups.propose(
            group,
            [
                open_op(request.id, &record),
                Op::Epoch {
                    stream: request.id,
                    incarnation: self.groups.incarnation(),
                },
            ],
        );
        self.order_dirty = true;
        self.sources.insert(
            request.id,
            SourceStream {
                core,
                group,
                record,
                waiting: Vec::new(),
                refused: None,
                dirty: true,
            },
        );
        self.done.push(Done::Opened(reply));
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn publish(
        &mut self,
        stream: u128,
        first_seq: Option<Seq>,
        messages: Vec<Bytes>,
        reply: oneshot::Sender<Result<Published, Status>>,
    ) -> Result<(), (oneshot::Sender<Result<Published, Status>>, Status)> {
        let _span = tracing::debug_span!(
            "stream_publish",
            stream = %format_args!("{stream:032x}"),
            first_seq = first_seq.unwrap_or(0),
            messages = messages.len()
        )
        .entered();
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
                    RECORDED.stream_published.inc();
                }
                Ok(Publish::Duplicate(_)) => RECORDED.stream_duplicate_publishes.inc(),
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
            since: Instant::now(),
            deadline: Instant::now() + timeout,
            reply,
        });
        Ok(())
    }

    pub(super) fn on_report(&mut self, src: u64, id: u128, report: &StreamReport) {
        let _span = tracing::debug_span!(
            "stream_report",
            stream = %format_args!("{id:032x}"),
            target = src,
            received = report.received,
            processed = report.processed
        )
        .entered();
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

    /// Sources: open, retransmit, send within credit, answer producers, release, finish.
    pub(super) fn pump_sources(&mut self, now: u64) {
        let mut opens = Vec::new();
        let mut sends: Vec<(u64, u128, Seq)> = Vec::new();
        let mut finished = Vec::new();
        let instant = Instant::now();
        let can_send = self.unsent.is_empty();
        self.refresh_order();
        let groups = &self.groups;
        let mut order = std::mem::take(&mut self.scratch);
        priority_order(&self.source_order, self.turns, &mut order);
        for &id in &order {
            let Some(s) = self.sources.get_mut(&id) else {
                continue;
            };
            s.core.handle_timeout(now);
            while let Some(node) = s.core.poll_open(now) {
                opens.push((node, id));
            }
            if can_send {
                while sends.len() < TURN_SENDS {
                    let Some((node, seq)) = s.core.poll_transmit(now) else {
                        break;
                    };
                    sends.push((node, id, seq));
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
                    RECORDED
                        .stream_ack_latency
                        .observe(w.since.elapsed().as_secs_f64());
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
            // An outbox row goes once every target processed it by its report and by what
            // the group committed of its offsets.
            // The group is asked (two short locks) only when the reports allow a release.
            let by_reports = s.core.releasable();
            let releasable = if by_reports > s.record.low {
                by_reports.min(groups.processed_by_all(s.group, id, &s.record.targets))
            } else {
                by_reports
            };
            if releasable > s.record.low {
                self.batch.released.push((id, releasable));
                s.record.low = releasable;
                s.dirty = true;
                self.done.push(Done::Released(id, releasable));
            }
            if s.core.is_finished() && s.waiting.is_empty() {
                finished.push(id);
            }
        }
        self.scratch = order;
        for (node, id) in opens {
            let s = &self.sources[&id];
            let open = StreamOpen {
                tenant: s.record.tenant.clone(),
                targets: s.record.targets.clone(),
                quorum: s.record.quorum,
                priority: u32::from(s.record.priority),
                ..StreamOpen::default()
            };
            self.send_control(node, FrameType::StreamOpen, id, open.encode_to_vec());
        }
        for id in finished {
            let Some(s) = self.sources.remove(&id) else {
                continue;
            };
            self.order_dirty = true;
            let open = StreamOpen {
                closed: true,
                last: s.core.last(),
                ..StreamOpen::default()
            };
            for node in s.core.targets() {
                self.send_control(node, FrameType::StreamOpen, id, open.encode_to_vec());
            }
            self.groups.propose(s.group, [Op::Forget { stream: id }]);
            self.batch.records.push((id, None));
        }
        if sends.is_empty() {
            return;
        }
        // Each message is read once, however many targets it goes to.
        let mut keys: Vec<(u128, Seq)> = sends.iter().map(|(_, id, seq)| (*id, *seq)).collect();
        keys.sort_unstable();
        keys.dedup();
        let read = match self.db.read(Queue::Outbox, &keys, 0, TURN_BYTES) {
            Ok(read) => read,
            Err(e) => {
                // The retransmission timer sends them again.
                tracing::error!(error = %e, "reading the outbox failed");
                return;
            }
        };
        let messages: HashMap<(u128, Seq), Option<Vec<u8>>> = keys.into_iter().zip(read).collect();
        let chunk_bytes = self.config.chunk_bytes;
        for (node, id, seq) in sends {
            let Some(message) = messages.get(&(id, seq)) else {
                // Past the turn's byte budget: sent next turn.
                if let Some(s) = self.sources.get_mut(&id) {
                    s.core.resend_from(node, seq);
                }
                self.more = true;
                continue;
            };
            let Some(message) = message else {
                tracing::error!(stream = %format!("{id:032x}"), seq, "outbox row missing");
                continue;
            };
            if message.len() <= chunk_bytes {
                // One copy per target, with room for its origin tag.
                let mut payload = Vec::with_capacity(message.len() + origin::TAG_LEN);
                payload.extend_from_slice(message);
                self.send_data(Frame {
                    dst: node,
                    frame_type: FrameType::StreamData,
                    stream: id,
                    seq,
                    chunk: (0, 0),
                    payload,
                });
                continue;
            }
            let Some(chunks) = chunk::split(message, chunk_bytes, origin::TAG_LEN) else {
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
}
