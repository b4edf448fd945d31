//! `loadgen bench --batch`: sending through meshd's streaming `Publish`, closed or open loop.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use meshd_proto::link::{
    PublishAck, PublishBatch, PublishMessage, mesh_service_client::MeshServiceClient,
};
use tonic::transport::Channel;

/// What every publishing task needs.
#[derive(Clone)]
pub(crate) struct PublishPlan {
    pub(crate) source: Channel,
    pub(crate) dst: u64,
    pub(crate) size: usize,
    pub(crate) batch: usize,
    pub(crate) epoch: Instant,
    pub(crate) warmup_end: Instant,
    pub(crate) end: Instant,
    pub(crate) next_seq: Arc<AtomicU64>,
    pub(crate) first: Arc<AtomicU64>,
    pub(crate) last: Arc<AtomicU64>,
    pub(crate) errors: Arc<AtomicU64>,
}

impl PublishPlan {
    /// A batch of `batch` messages starting at `seq`; message i is due at `due(i)`.
    fn make_batch(&self, seq: u64, due: impl Fn(u64) -> Instant) -> PublishBatch {
        let messages = (seq..seq + self.batch as u64)
            .map(|s| {
                let at = due(s);
                if at >= self.warmup_end {
                    self.first.fetch_min(s, Ordering::Relaxed);
                    self.last.fetch_max(s, Ordering::Relaxed);
                }
                let mut payload = vec![0u8; self.size];
                payload[..8].copy_from_slice(&s.to_le_bytes());
                let due_ns = at.duration_since(self.epoch).as_nanos() as u64;
                payload[8..16].copy_from_slice(&due_ns.to_le_bytes());
                PublishMessage {
                    dst_node: self.dst,
                    payload: payload.into(),
                    partition: 0,
                    qos_class: 1,
                    corr_id: 0,
                    require_ack: false,
                    headers: Vec::new(),
                }
            })
            .collect();
        PublishBatch { messages }
    }

    fn count(&self, ack: &PublishAck) {
        if ack.rejected > 0 {
            self.errors
                .fetch_add(u64::from(ack.rejected), Ordering::Relaxed);
        }
    }
}

/// Closed loop: one stream, one batch at a time.
pub(crate) async fn publish_lane(plan: PublishPlan) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut client = MeshServiceClient::new(plan.source.clone());
    let mut acks = client
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while Instant::now() < plan.end {
        let seq = plan
            .next_seq
            .fetch_add(plan.batch as u64, Ordering::Relaxed);
        let now = Instant::now();
        tx.send(plan.make_batch(seq, |_| now)).await?;
        let ack = acks.message().await?.context("publish stream ended")?;
        plan.count(&ack);
    }
    Ok(())
}

/// Open loop: batches leave when their first message is due; each message keeps its own due
/// time, so queueing anywhere shows in the latency.
pub(crate) async fn publish_open_loop(
    plan: PublishPlan,
    rate: u64,
    in_flight: usize,
) -> anyhow::Result<()> {
    let interval_ns = 1_000_000_000 / rate.max(1);
    let window = (in_flight / plan.batch).max(1);
    let (tx, rx) = tokio::sync::mpsc::channel(window);
    let mut client = MeshServiceClient::new(plan.source.clone());
    let mut acks = client
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let outstanding = Arc::new(tokio::sync::Semaphore::new(window));
    let reader = {
        let plan = plan.clone();
        let outstanding = Arc::clone(&outstanding);
        tokio::spawn(async move {
            while let Ok(Some(ack)) = acks.message().await {
                plan.count(&ack);
                outstanding.add_permits(1);
            }
        })
    };
    loop {
        let seq = plan.next_seq.load(Ordering::Relaxed);
        let due = |s: u64| plan.epoch + Duration::from_nanos(s * interval_ns);
        if due(seq) >= plan.end {
            break;
        }
        tokio::time::sleep_until(due(seq).into()).await;
        outstanding.acquire().await?.forget();
        plan.next_seq
            .fetch_add(plan.batch as u64, Ordering::Relaxed);
        tx.send(plan.make_batch(seq, due)).await?;
    }
    drop(tx);
    let _ = outstanding.acquire_many(window as u32).await;
    reader.abort();
    Ok(())
}
