//! meshd's batched `Publish` stream between real processes: every message of every batch
//! arrives once and in order through a relay, a bad message refuses the rest of its batch with a
//! reason, a subscriber that pauses makes the mesh wait instead of dropping, and a batch that
//! cannot leave gives every one of its messages the status PENDING_NODE.

use std::{collections::HashSet, time::Duration};

use meshd_proto::link::{PublishBatch, PublishMessage};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(20);

fn message(dst: u64, seq: u64, size: usize) -> PublishMessage {
    let mut payload = vec![0u8; size.max(8)];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    PublishMessage {
        dst_node: dst,
        payload: payload.into(),
        partition: 0,
        qos_class: 1,
        corr_id: 0,
        require_ack: false,
        headers: Vec::new(),
    }
}

/// Waits until node `i`'s routing table has (`present`) or no longer has a route to `dst`.
async fn until_route(cluster: &Cluster, i: usize, dst: u64, present: bool) -> anyhow::Result<()> {
    let mut control = cluster.node(i).control().await?;
    let deadline = std::time::Instant::now() + SETTLE;
    while control
        .get_routing_table(meshd_proto::mesh::GetRoutingTableRequest {})
        .await?
        .into_inner()
        .routes
        .iter()
        .any(|r| r.dst_node == dst)
        != present
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node {}: a route to {dst} never {}",
            cluster.node(i).spec.node_id,
            if present { "came" } else { "went" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[meshd_tests::test]
async fn batches_arrive_once_in_order_through_a_relay_and_a_paused_subscriber_loses_nothing()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::behind_nat(3, vec![1]),
    ])?;
    cluster.node(1).wait_for_peers(&[1, 3], SETTLE).await?;
    // Node 1 reaches 3 only through 2; wait for the route.
    until_route(&cluster, 0, 3, true).await?;

    let mut inbox = cluster.node(2).inbox().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = cluster
        .node(0)
        .mesh()
        .await?
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // 12 batches of 1000: three times the subscriber queue (4096), sent while the subscriber
    // does not read for a while.
    let total = 12_000u64;
    let sender = tokio::spawn(async move {
        for b in 0..12u64 {
            let messages = (0..1000).map(|i| message(3, b * 1000 + i, 64)).collect();
            tx.send(PublishBatch { messages }).await?;
        }
        // A batch with a bad message (a header without a key): the rest of it is refused with
        // a reason.
        let mut bad = message(3, total + 1, 64);
        bad.headers.push(meshd_proto::link::PublishHeader {
            key: String::new(),
            value: Vec::new().into(),
        });
        let messages = vec![message(3, total, 64), bad, message(3, total + 2, 64)];
        tx.send(PublishBatch { messages }).await?;
        Ok::<_, anyhow::Error>(())
    });
    let mut ids = HashSet::new();
    for _ in 0..12 {
        let ack = tokio::time::timeout(SETTLE, acks.message())
            .await??
            .expect("ack");
        assert_eq!(
            (ack.msg_ids.len(), ack.rejected),
            (1000, 0),
            "{}",
            ack.error
        );
        ids.extend(ack.msg_ids);
    }
    assert_eq!(ids.len(), 12_000, "every message got its own id");
    let bad = tokio::time::timeout(SETTLE, acks.message())
        .await??
        .expect("ack");
    assert_eq!((bad.msg_ids.len(), bad.rejected), (1, 2));
    assert!(bad.error.contains("header"), "{}", bad.error);
    sender.await??;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut next = 0u64;
    while next <= total {
        let got = tokio::time::timeout(SETTLE, inbox.next())
            .await?
            .expect("open")?;
        let seq = u64::from_le_bytes(got.payload[..8].try_into()?);
        assert_eq!(seq, next, "in order, once, nothing lost");
        next += 1;
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await;
    assert!(
        extra.is_err(),
        "nothing after the refused rest of the last batch: {extra:?}"
    );
    Ok(())
}

/// A run of messages to a node that is known but has no route left travels as one
/// `DataBatch` frame; the frame cannot leave (no route, or no key to sign it) and that is said
/// once for the whole run: every message of it (not only the first) gets PENDING_NODE.
#[meshd_tests::test]
async fn every_message_of_a_batch_that_cannot_leave_is_pending_node() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
    ])?;
    cluster.node(0).wait_for_routes(&[2], SETTLE).await?;
    cluster.node_mut(1).kill();
    cluster.node(0).wait_for_peers(&[], SETTLE).await?;
    until_route(&cluster, 0, 2, false).await?;

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut acks = cluster
        .node(0)
        .mesh()
        .await?
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(PublishBatch {
        messages: (0..100).map(|i| message(2, i, 64)).collect(),
    })
    .await?;
    let ack = tokio::time::timeout(SETTLE, acks.message())
        .await??
        .expect("ack");
    assert_eq!((ack.msg_ids.len(), ack.rejected), (100, 0), "{}", ack.error);

    let mut data = cluster.node(0).data().await?;
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let statuses = data
            .query_message_status(meshd_proto::mesh::QueryMessageStatusRequest {
                msg_ids: ack.msg_ids.clone(),
            })
            .await?
            .into_inner()
            .message_statuses;
        let pending = statuses
            .iter()
            .filter(|s| s.status() == meshd_proto::mesh::MessageStatus::PendingNode)
            .count();
        if pending == 100 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{pending} of 100 PENDING_NODE: {:?}",
            statuses.iter().map(|s| s.status()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
