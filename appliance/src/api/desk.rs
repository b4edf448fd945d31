//! The local delivery desk: frames addressed to this node arrive on the api's rings
//! ([`ApiEvent`]), `Data` goes to the matching `Subscribe` streams (opened first if it is
//! end-to-end encrypted), verdicts update the tracker, and delivery reports go back to the
//! senders without ever waiting on a shard.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use meshd_proto::{
    link::{AppAck, Data, DataBatch, DeliveryReports},
    mesh::{MessageStatus, Received},
};
use meshd_shards::{
    command::{ApiEvent, Outgoing, SendFailure, ShardInput},
    frame::{FrameType, TrafficClass},
    ownership::owner_shard,
    ring::{Consumer, PushError},
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use super::{
    ApiState, peer_reports,
    recent::{Arrival, Decision, Verdict},
    reports::{ReportBatch, ReportSink},
    tenant,
    tracker::StatusUpdate,
};
use crate::storage::now_ms;

/// One `Subscribe` stream.
pub(super) struct Subscriber {
    partition: u32,
    qos_class: u32,
    src_node: u64,
    tx: mpsc::Sender<Result<Received, Status>>,
    /// Set when the subscriber used up its wait budget ([`SUBSCRIBER_WAIT`] per
    /// [`WAIT_WINDOW`]); cleared once its queue is half empty again. A lagging subscriber is
    /// not waited for.
    lagging: Arc<AtomicBool>,
    /// How long deliveries waited for this subscriber in the current window.
    waited: Arc<std::sync::Mutex<WaitBudget>>,
}

/// What one subscriber may still make the node's inbound data wait in this window.
#[derive(Debug)]
pub(crate) struct WaitBudget {
    window_start: Instant,
    waited: Duration,
}

impl WaitBudget {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            waited: Duration::ZERO,
        }
    }

    /// How long a delivery may wait now (zero: the budget is spent; turn the message away).
    pub(crate) fn allowance(&mut self, now: Instant) -> Duration {
        if now.duration_since(self.window_start) >= WAIT_WINDOW {
            *self = Self::new(now);
        }
        SUBSCRIBER_WAIT.saturating_sub(self.waited)
    }

    pub(crate) fn spent(&mut self, waited: Duration) {
        self.waited += waited;
    }
}

/// The window a subscriber's wait budget ([`SUBSCRIBER_WAIT`]) is counted over.
pub(crate) const WAIT_WINDOW: Duration = Duration::from_secs(1);

/// How long deliveries may wait for room in one subscriber's full queue, in all, per
/// [`WAIT_WINDOW`]. A subscriber that keeps up, but not at every instant, is waited for, so a
/// closed-loop flood is slowed over TCP instead of turned away; one that uses up the budget is
/// marked lagging and not waited for again until its queue is half empty, so a slow subscriber
/// holds the node's inbound data at most a quarter of each second (a relay cuts a link that
/// makes no progress for `write_timeout_ms`, 3 s); a subscriber that only hiccups (a
/// benchmark's, on a busy host) is waited for and loses nothing (issue 23: it was 1 s per
/// message, and the node's links starved; then 50 ms per message, and a subscriber that freed
/// a slot every 20 ms held every link's data to its pace until a relay cut the link for not
/// reading).
pub(crate) const SUBSCRIBER_WAIT: Duration = Duration::from_millis(250);

impl Subscriber {
    fn wants(&self, src: u64, partition: u32, qos_class: u32) -> bool {
        (self.partition == 0 || self.partition == partition)
            && (self.qos_class == 0 || self.qos_class == qos_class)
            && (self.src_node == 0 || self.src_node == src)
    }
}

impl ApiState {
    /// Delivers a message from another node, opening it first if it is end-to-end encrypted
    /// (this is the only place its plaintext exists on this node); also says whether a
    /// matching subscriber's queue is near full (see `saturation`).
    async fn open_and_deliver(&self, src: u64, data: &mut Data) -> (Verdict, bool) {
        if !data.tenant.is_empty() {
            let Ok(nonce) = <[u8; 24]>::try_from(data.nonce.as_ref()) else {
                return (Verdict::NoTenantKey, false);
            };
            let sealed = tenant::Sealed {
                epoch: data.key_epoch,
                nonce,
                ciphertext: &data.payload[..],
            };
            let opened = self
                .tenant_keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .open(&data.tenant, src, data.msg_id, now_ms(), &sealed);
            match opened {
                Ok(plaintext) => data.payload = plaintext.into(),
                Err(error) => {
                    tracing::debug!(src, msg_id = data.msg_id, %error, "end-to-end message not opened");
                    return (Verdict::NoTenantKey, false);
                }
            }
        }
        self.offer(src, data).await
    }

    /// Offers a message to the matching local subscribers; returns the resulting status.
    pub(crate) async fn deliver_locally(&self, src: u64, data: &Data) -> Verdict {
        self.offer(src, data).await.0
    }

    /// [`Self::deliver_locally`], and whether a matching subscriber turned it away (the
    /// sender is then told this node is saturated, see `saturation`).
    async fn offer(&self, src: u64, data: &Data) -> (Verdict, bool) {
        let received = Received {
            src_node: src,
            dst_node: self.node_id,
            msg_id: data.msg_id,
            corr_id: data.corr_id,
            headers: data
                .headers
                .iter()
                .map(|h| meshd_proto::mesh::Header {
                    key: h.key.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            payload: data.payload.clone(),
            require_ack: data.require_ack,
        };
        let mut delivered = 0usize;
        let mut full = 0usize;
        // The common case (room in every queue) is served under the lock without waiting or
        // allocating; only subscribers with a full queue are collected to be waited for.
        let mut waiting = Vec::new();
        {
            let mut subscribers = self
                .subscribers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut closed = false;
            for s in subscribers
                .iter()
                .filter(|s| s.wants(src, data.partition, data.qos_class))
            {
                match s.tx.try_send(Ok(received.clone())) {
                    Ok(()) => {
                        delivered += 1;
                        if s.tx.capacity() * 2 >= s.tx.max_capacity() {
                            s.lagging.store(false, Ordering::Relaxed);
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                    // A lagging subscriber's own traffic is turned away at once: waiting on
                    // it would hold every link's data behind one slow reader.
                    Err(mpsc::error::TrySendError::Full(_))
                        if s.lagging.load(Ordering::Relaxed) =>
                    {
                        full += 1;
                    }
                    Err(mpsc::error::TrySendError::Full(item)) => {
                        waiting.push((
                            s.tx.clone(),
                            Arc::clone(&s.lagging),
                            Arc::clone(&s.waited),
                            item,
                        ));
                    }
                }
            }
            if closed {
                subscribers.retain(|s| !s.tx.is_closed());
            }
        }
        for (tx, lagging, waited, item) in waiting {
            let allowance = waited
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .allowance(Instant::now());
            let started = Instant::now();
            let sent = if allowance.is_zero() {
                None
            } else {
                tokio::time::timeout(allowance, tx.send(item)).await.ok()
            };
            waited
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .spent(started.elapsed());
            match sent {
                Some(Ok(())) => delivered += 1,
                Some(Err(_)) => {}
                None => {
                    tracing::debug!(
                        src,
                        "a subscriber's queue kept deliveries waiting {SUBSCRIBER_WAIT:?} within {WAIT_WINDOW:?}; its messages are turned away until its queue is half empty"
                    );
                    lagging.store(true, Ordering::Relaxed);
                    full += 1;
                }
            }
        }
        let verdict = match (delivered, full) {
            (0, 0) => Verdict::NoSubscriber,
            (0, _) => Verdict::SubscribersFull,
            _ if data.require_ack => Verdict::WaitingForAck,
            _ => Verdict::Delivered,
        };
        (verdict, full > 0)
    }

    pub(crate) fn add_subscriber(
        &self,
        partition: u32,
        qos_class: u32,
        src_node: u64,
    ) -> Result<mpsc::Receiver<Result<Received, Status>>, Status> {
        let (tx, rx) = mpsc::channel(self.subscriber_queue);
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Checked under the lock that `end_streams` takes, so no stream slips in after it.
        if self.closing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("the node is shutting down"));
        }
        // Deliveries prune closed subscribers only when they meet one; this catches the rest.
        subscribers.retain(|s| !s.tx.is_closed());
        subscribers.push(Subscriber {
            partition,
            qos_class,
            src_node,
            tx,
            lagging: Arc::default(),
            waited: Arc::new(std::sync::Mutex::new(WaitBudget::new(Instant::now()))),
        });
        Ok(rx)
    }

    /// Ends every `Subscribe` stream (shut-down): a graceful gRPC shut-down waits for open
    /// streams, and `core` always holds one. Each gets a last UNAVAILABLE if its queue has
    /// room; dropping its sender ends it either way.
    pub(super) fn end_streams(&self) {
        let ended = {
            let mut subscribers = self
                .subscribers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.closing.store(true, Ordering::Relaxed);
            std::mem::take(&mut *subscribers)
        };
        for subscriber in &ended {
            let _ = subscriber
                .tx
                .try_send(Err(Status::unavailable("the node is shutting down")));
        }
        if !ended.is_empty() {
            tracing::info!(streams = ended.len(), "ended the open Subscribe streams");
        }
    }

    /// One message from `src` (a `Data` frame, or one of a `DataBatch`): delivered (at most
    /// once for a waiting send), its verdict into `reports`.
    async fn handle_data(
        &self,
        src: u64,
        traffic_class: TrafficClass,
        mut data: Data,
        reports: &mut ReportBatch,
    ) {
        let msg_id = data.msg_id;
        let mut saturated = false;
        let verdict = if data.seq == 0 {
            // Fire-and-forget or broadcast: never retransmitted, nothing to remember.
            let (verdict, near_full) = self.open_and_deliver(src, &mut data).await;
            saturated = near_full;
            verdict
        } else {
            let arrival = Arrival {
                source: src,
                session: data.src_session,
                seq: data.seq,
                floor: data.floor,
                attempt: data.attempt,
                dst_generation: data.dst_generation,
            };
            let decision = self.recent().check(arrival, Instant::now());
            match decision {
                Decision::Ignore => return,
                Decision::Answer(verdict) => verdict,
                Decision::Deliver => {
                    let (verdict, near_full) = self.open_and_deliver(src, &mut data).await;
                    saturated = near_full;
                    match verdict {
                        // Not remembered: the sender's next copy (200 ms on) is
                        // offered again, so a subscriber that catches up gets it.
                        Verdict::SubscribersFull => Verdict::SubscribersBusy,
                        verdict => {
                            self.recent().record(arrival, verdict);
                            verdict
                        }
                    }
                }
            }
        };
        reports.push(src, traffic_class, msg_id, verdict);
        if saturated {
            reports.mark_saturated(src);
        }
    }

    /// Verdicts on Data frames go into `reports`, for [`Self::send_reports`].
    pub(super) async fn handle_event(&self, event: ApiEvent, reports: &mut ReportBatch) {
        match event {
            ApiEvent::Frame {
                src,
                frame_type: FrameType::Data,
                payload,
                traffic_class,
            } => {
                let Ok(data) = Data::decode(payload) else {
                    tracing::debug!(src, "dropped an undecodable data frame");
                    return;
                };
                self.handle_data(src, traffic_class, data, reports).await;
            }
            ApiEvent::Frame {
                src,
                frame_type: FrameType::DataBatch,
                payload,
                traffic_class,
            } => {
                let Ok(batch) = DataBatch::decode(payload) else {
                    tracing::debug!(src, "dropped an undecodable data batch");
                    return;
                };
                if batch.messages.len() > meshd_shards::frame::MAX_DATA_BATCH {
                    tracing::debug!(
                        src,
                        messages = batch.messages.len(),
                        "dropped a data batch over the bound"
                    );
                    return;
                }
                for data in batch.messages {
                    self.handle_data(src, traffic_class, data, reports).await;
                }
            }
            ApiEvent::Frame {
                src,
                frame_type: FrameType::DeliveryReport,
                traffic_class,
                payload,
            } => {
                let Ok(batch) = DeliveryReports::decode(payload) else {
                    tracing::debug!(src, "dropped an undecodable delivery report");
                    return;
                };
                if batch.relay_for != 0 {
                    // A relay's notice, not the destination's word: no generation, no hold.
                    let applied =
                        peer_reports::apply_relay_drops(&mut self.tracker(), src, batch, now_ms());
                    tracing::debug!(src, ?applied, "a relay dropped messages of ours");
                    return;
                }
                if batch.generation != 0 {
                    // The destination's own word on its current life: later waiting sends'
                    // first copies are addressed to it (see `recent.rs`). Only for nodes this
                    // node sends to (known), so invented sources cannot grow the map.
                    let mut known = self.known_nodes();
                    if known.nodes.contains(&src) {
                        known.generations.insert(src, batch.generation);
                    }
                }
                // A report frame answers messages of one class (see `ReportBatch::push`).
                self.saturation().on_report(
                    super::saturation::held(src, traffic_class),
                    batch.saturated,
                    Instant::now(),
                );
                let applied =
                    peer_reports::apply_reports(&mut self.tracker(), src, batch, now_ms());
                if applied.skipped > 0 {
                    tracing::debug!(src, ?applied, "skipped report runs outside what is tracked");
                }
            }
            ApiEvent::Frame {
                src,
                frame_type: FrameType::AppAck,
                payload,
                ..
            } => {
                let Ok(ack) = AppAck::decode(payload) else {
                    return;
                };
                let status = if ack.success {
                    MessageStatus::AckSuccess
                } else {
                    MessageStatus::AckFailure
                };
                self.tracker().update(
                    ack.msg_id,
                    Some(src),
                    StatusUpdate {
                        status,
                        detail: peer_reports::cap_detail(ack.message),
                        timestamp_ms: now_ms(),
                    },
                );
            }
            ApiEvent::Frame {
                src, frame_type, ..
            } => {
                tracing::debug!(
                    src,
                    ?frame_type,
                    "api ignored a frame type it does not handle"
                );
            }
            ApiEvent::Stream { header, .. } => {
                // Stream frames go to the stream workers' own rings, never here.
                tracing::debug!(src = header.src, "api ignored a stream frame");
            }
            ApiEvent::SendFailed {
                msg_id,
                count,
                dst,
                known,
                why,
            } => {
                let (status, detail) = if why == SendFailure::Congested {
                    (
                        MessageStatus::PendingNode,
                        format!("the next hop towards node {dst} stayed congested past the wait"),
                    )
                } else if why == SendFailure::Unconfirmed {
                    (
                        MessageStatus::PendingNode,
                        format!(
                            "the link towards node {dst} broke before its next hop confirmed \
                             reading it; it may have been lost"
                        ),
                    )
                } else if known {
                    (
                        MessageStatus::PendingNode,
                        format!("node {dst} is known but not linked"),
                    )
                } else {
                    (
                        MessageStatus::Undeliverable,
                        format!("node {dst} has never been part of this mesh"),
                    )
                };
                let update = StatusUpdate {
                    status,
                    detail: detail.into(),
                    timestamp_ms: now_ms(),
                };
                let mut tracker = self.tracker();
                // A batch's ids follow on from its first; the shard says how many (bounded by
                // the batch bound, since this node made the frame).
                let count = u64::from(count.clamp(1, meshd_shards::frame::MAX_DATA_BATCH as u32));
                let ids = msg_id..msg_id.saturating_add(count);
                if why == SendFailure::Unconfirmed {
                    // It may have arrived: only what no report has answered yet takes the
                    // doubt, and waiting sends are sent again anyway.
                    tracker.relay_dropped(ids, dst, &update);
                    return;
                }
                for id in ids {
                    if tracker.note_failure(id) {
                        // An open waiting send: tried again until its time is up (another
                        // next hop may come up); its final status is decided then.
                        continue;
                    }
                    tracker.update(id, None, update.clone());
                }
            }
        }
    }
}

/// Ring events handled per drain before the collected verdicts are sent (each Data frame
/// adds one).
pub(super) const MAX_EVENTS_PER_DRAIN: usize = 4096;

/// How soon reports that found no room in a shard's ring are offered again.
pub(super) const REPORT_RETRY: Duration = Duration::from_millis(5);

/// The shards' rings as a [`ReportSink`]: pushes without waiting, and stops offering to a
/// shard once its ring was full in this flush.
struct ShardSink<'a> {
    state: &'a ApiState,
    full: Vec<bool>,
}

impl ReportSink for ShardSink<'_> {
    fn ready(&mut self, source: u64) -> bool {
        !self.full[owner_shard(source, self.full.len())]
    }

    fn send(&mut self, source: u64, class: TrafficClass, payload: Vec<u8>) -> bool {
        let mut outgoing = Outgoing {
            chunk: (0, 0),
            dst: source,
            frame_type: FrameType::DeliveryReport,
            traffic_class: class,
            msg_id: 0,
            flow: 0,
            payload: payload.into(),
        };
        if !self.state.seal(&mut outgoing) {
            // The source's key is gone (it left or was evicted): nobody to report to.
            return true;
        }
        match self
            .state
            .shard_of(source)
            .try_push(ShardInput::Send(outgoing))
        {
            Ok(()) => true,
            Err(PushError::Full(_)) => {
                let shard = owner_shard(source, self.full.len());
                self.full[shard] = true;
                false
            }
            // The shard stopped (shut-down): nothing will ever carry it, so it leaves the
            // batch; waiting senders retransmit to the node's next life.
            Err(PushError::Closed(_)) => true,
        }
    }
}

impl ApiState {
    /// Offers every collected verdict to the shards, a frame per source and class, without
    /// waiting: the shard may be waiting for room in the api ring, which this thread drains.
    /// What does not fit stays in `reports` for the next call.
    pub(super) fn send_reports(&self, reports: &mut ReportBatch) {
        let mut sink = ShardSink {
            state: self,
            full: vec![false; self.shards.len()],
        };
        reports.flush(self.max_payload_bytes, &mut sink);
        let dropped = reports.take_dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                waiting = reports.len(),
                "delivery reports found no room in the shards' rings for too long; dropped the \
                 oldest (waiting senders retransmit and get the remembered verdict)"
            );
        }
    }
}

/// Hands the shards' `Data` frames on one ring to the subscribers, and sends their senders
/// the verdicts, a drain's worth in one report frame per source.
pub(super) async fn delivery_pump(
    state: Arc<ApiState>,
    events: Consumer<ApiEvent>,
    generation: u32,
) {
    let mut reports = ReportBatch::default();
    reports.generation = generation;
    loop {
        let event = if reports.is_empty() {
            events.pop().await
        } else {
            // Reports wait for room in a shard's ring: retry soon even if nothing arrives.
            tokio::select! {
                event = events.pop() => event,
                () = tokio::time::sleep(REPORT_RETRY) => {
                    state.send_reports(&mut reports);
                    continue;
                }
            }
        };
        let Some(event) = event else { break };
        state.handle_event(event, &mut reports).await;
        // Drain what already waits, so a burst's verdicts go back in one frame per source.
        for _ in 1..MAX_EVENTS_PER_DRAIN {
            let Some(event) = events.try_pop() else { break };
            state.handle_event(event, &mut reports).await;
        }
        state.send_reports(&mut reports);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn a_subscriber_may_hold_deliveries_its_budget_per_window_and_no_more() {
        let start = Instant::now();
        let mut budget = WaitBudget::new(start);
        assert_eq!(budget.allowance(start), SUBSCRIBER_WAIT);
        // A slot freed every 20 ms: each wait is short, but together they use the budget up.
        for _ in 0..12 {
            budget.spent(Duration::from_millis(20));
        }
        assert_eq!(budget.allowance(start), Duration::from_millis(10));
        budget.spent(Duration::from_millis(20));
        assert!(
            budget
                .allowance(start + Duration::from_millis(900))
                .is_zero()
        );
        // The next window starts afresh.
        assert_eq!(budget.allowance(start + WAIT_WINDOW), SUBSCRIBER_WAIT);
    }
}
