//! The target side of a stream worker: streams told by sources, arrivals (reassembly, opening,
//! in-order storing), subscribers (attachment, deliveries, acknowledgements) and reports.

use super::*;
use crate::metrics::RECORDED;

impl Worker {
    /// Gives stream `id` to the first subscriber whose selection covers it.
    pub(super) fn attach(&mut self, id: u128) {
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

    pub(super) fn unsubscribe(&mut self, sub: u64) {
        self.subs.remove(&sub);
        let held: Vec<u128> = self
            .targets
            .iter_mut()
            .filter(|(_, t)| t.sub == Some(sub))
            .map(|(id, t)| {
                t.sub = None;
                t.unacked.clear();
                t.inbox.unsubscribe();
                *id
            })
            .collect();
        for id in held {
            self.attach(id);
        }
    }

    pub(super) fn ack(&mut self, sub: u64, stream: u128, seq: Seq) {
        let _span =
            tracing::debug_span!("stream_ack", stream = %format_args!("{stream:032x}"), seq)
                .entered();
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
                let mut freed = 0;
                while let Some(&(delivered, bytes)) = t.unacked.front()
                    && delivered <= seq
                {
                    freed += bytes;
                    t.unacked.pop_front();
                }
                if let Some(s) = self.subs.get_mut(&sub) {
                    s.unacked_bytes = s.unacked_bytes.saturating_sub(freed);
                }
                self.batch.processed.push((stream, from, seq));
                RECORDED.stream_processed.inc_by(seq + 1 - from);
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

    pub(super) fn on_open(&mut self, src: u64, id: u128, open: StreamOpen) {
        let _span = tracing::debug_span!(
            "stream_open",
            stream = %format_args!("{id:032x}"),
            source = src
        )
        .entered();
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
        let mut nodes = open.targets.clone();
        nodes.push(src);
        // A group is started only for a stream this node accepts: a refused open must not
        // take one of the `streams.max_groups` slots.
        let (group, refusal) = match refusal {
            Some(refused) => (0, Some(refused)),
            None => match self.groups.ensure(&nodes) {
                Ok(group) => (group, None),
                Err(e) => (0, Some(e.to_string())),
            },
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
            // An impossible priority from a peer is clamped, not trusted.
            priority: open.priority.min(u32::from(super::super::MAX_PRIORITY)) as u8,
        };
        self.order_dirty = true;
        self.targets.insert(
            id,
            TargetStream {
                inbox: Inbox::restore(self.inbox_config(), 0, 0),
                group,
                record,
                sub: None,
                unacked: VecDeque::new(),
                dirty: true,
            },
        );
        self.attach(id);
    }

    pub(super) fn on_data(&mut self, header: &Header, payload: &[u8]) {
        let id = header.stream_id;
        // A message's id is (stream, seq).
        let _span = tracing::trace_span!(
            "stream_data",
            stream = %format_args!("{id:032x}"),
            seq = header.seq,
            chunk = header.chunk_seq
        )
        .entered();
        let Some(t) = self.targets.get_mut(&id) else {
            return;
        };
        if header.src != t.record.source {
            return;
        }
        let seq = header.seq;
        if !t.inbox.wants(seq) {
            if seq < t.inbox.next_expected() {
                RECORDED.stream_duplicate_arrivals.inc();
            }
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
    pub(super) fn pump_targets(&mut self, now: u64) {
        let mut deliveries: Vec<(u128, Seq)> = Vec::new();
        let mut reports = Vec::new();
        let mut finished = Vec::new();
        self.refresh_order();
        let mut order = std::mem::take(&mut self.scratch);
        priority_order(&self.target_order, self.turns, &mut order);
        for &id in &order {
            let Some(t) = self.targets.get_mut(&id) else {
                continue;
            };
            if t.sub.is_some() {
                while deliveries.len() < TURN_DELIVERIES {
                    let Some(seq) = t.inbox.poll_deliver() else {
                        break;
                    };
                    deliveries.push((id, seq));
                }
                if deliveries.len() >= TURN_DELIVERIES {
                    self.more = true;
                }
            }
            if let Some(report) = t.inbox.poll_report(now) {
                reports.push((t.record.source, id, report));
            }
            if t.inbox.is_finished() {
                finished.push(id);
            }
        }
        self.scratch = order;
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
            self.order_dirty = true;
            if let Some(t) = self.targets.remove(&id)
                && let Some(s) = t.sub.and_then(|sub| self.subs.get_mut(&sub))
            {
                let held: usize = t.unacked.iter().map(|(_, bytes)| bytes).sum();
                s.unacked_bytes = s.unacked_bytes.saturating_sub(held);
            }
            self.reassembler.forget(id, Seq::MAX);
            self.batch.records.push((id, None));
        }
        if deliveries.is_empty() {
            return;
        }
        let messages = match self.db.read(Queue::Inbox, &deliveries, 0, TURN_BYTES) {
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
        // Past the turn's byte budget: offered again next turn.
        for &(id, seq) in &deliveries[messages.len()..] {
            if let Some(t) = self.targets.get_mut(&id) {
                t.inbox.undeliver(seq);
            }
            self.more = true;
        }
        let mut stalled: HashSet<u128> = HashSet::new();
        let mut gone: Vec<u64> = Vec::new();
        for ((id, seq), message) in deliveries.into_iter().zip(messages) {
            let Some(t) = self.targets.get_mut(&id) else {
                continue;
            };
            if stalled.contains(&id) {
                continue;
            }
            let Some(sub) = t
                .sub
                .and_then(|sub| self.subs.get_mut(&sub).map(|s| (sub, s)))
            else {
                continue;
            };
            let Some(payload) = message else {
                tracing::error!(stream = %format!("{id:032x}"), seq, "inbox row missing");
                t.inbox.undeliver(seq);
                stalled.insert(id);
                continue;
            };
            let len = payload.len();
            if sub.1.unacked_bytes > 0 && sub.1.unacked_bytes + len > SUBSCRIBER_BYTES {
                // Offered again once the subscriber acknowledges some of what it holds.
                t.inbox.undeliver(seq);
                stalled.insert(id);
                continue;
            }
            let data = ClientData {
                stream_id: crate::streams::id_bytes(id),
                seq,
                payload: payload.into(),
                source_node: t.record.source,
                tenant: t.record.tenant.clone(),
            };
            match sub.1.tx.try_send(Ok(data)) {
                Ok(()) => {
                    t.unacked.push_back((seq, len));
                    sub.1.unacked_bytes += len;
                    RECORDED.stream_delivered.inc();
                }
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
}
