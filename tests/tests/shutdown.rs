//! Stopping real `meshd` processes, and what a send to a stranger answers.
//!
//! SIGTERM ends a node within seconds even while `core`'s `Subscribe` stream is open (a
//! graceful gRPC shut-down alone waits for it forever), a stream the node cannot end itself
//! (WatchMeshEvents) is cut after the api's grace period, and a second signal during the stop
//! exits at once. A fire-and-forget `Send` to a node that was never in the mesh answers
//! UNDELIVERABLE, not QUEUED.

use std::time::{Duration, Instant};

use meshd_proto::{
    link::{PublishBatch, PublishMessage, WatchMeshEventsRequest},
    mesh::{MessageStatus, QueryMessageStatusRequest, SendMode, SendRequest},
};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(20);

/// Generous for a loaded 2-core machine; an orderly stop takes about one second.
const STOP_LIMIT: Duration = Duration::from_secs(8);

fn pair() -> anyhow::Result<Cluster> {
    Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
    ])
}

fn fire_and_forget(dst: u64) -> SendRequest {
    SendRequest {
        dst_node: dst,
        headers: Vec::new(),
        payload: b"hello".to_vec().into(),
        end_to_end_encrypt: false,
        partition: 0,
        qos_class: 0,
        corr_id: 1,
        require_ack: false,
        mode: SendMode::FireAndForget as i32,
        timeout_seconds: 0,
    }
}

/// Reads `stream` until it ends (cleanly or with an error) or `limit` passes.
async fn ends_within<T>(
    stream: &mut tonic::Streaming<T>,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    tokio::time::timeout(limit, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await
    .map_err(|_| anyhow::anyhow!("the stream stayed open {limit:?} after SIGTERM"))?;
    Ok(start.elapsed())
}

#[meshd_tests::test]
async fn sigterm_stops_a_node_within_seconds_even_with_open_streams() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = pair()?;
    cluster.node(1).wait_for_peers(&[1], SETTLE).await?;

    // Node 2 holds core's usual stream: a subscription.
    let mut inbox = cluster.node(1).inbox().await?;
    let signalled = Instant::now();
    let clean = cluster.node_mut(1).stop();
    let took = signalled.elapsed();
    println!("SIGTERM with a Subscribe stream open: exited after {took:?}, success {clean}");
    assert!(
        clean,
        "exit status success; log:\n{}",
        cluster.log_tails(1, 30)
    );
    assert!(
        took < STOP_LIMIT,
        "took {took:?}; log:\n{}",
        cluster.log_tails(1, 30)
    );
    ends_within(&mut inbox, Duration::from_secs(2)).await?;

    // Node 1 holds a stream only its client ends: cut after the api's grace period.
    let mut events = cluster
        .node(0)
        .mesh()
        .await?
        .watch_mesh_events(WatchMeshEventsRequest { node_ids: vec![] })
        .await?
        .into_inner();
    let mut inbox = cluster.node(0).inbox().await?;
    let signalled = Instant::now();
    let clean = cluster.node_mut(0).stop();
    let took = signalled.elapsed();
    println!("SIGTERM with WatchMeshEvents and Subscribe open: exited after {took:?}");
    assert!(
        clean,
        "exit status success; log:\n{}",
        cluster.log_tails(0, 30)
    );
    assert!(
        took < STOP_LIMIT,
        "took {took:?}; log:\n{}",
        cluster.log_tails(0, 30)
    );
    ends_within(&mut events, Duration::from_secs(2)).await?;
    ends_within(&mut inbox, Duration::from_secs(2)).await?;
    Ok(())
}

#[meshd_tests::test]
async fn a_second_signal_during_the_stop_exits_at_once() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = pair()?;
    cluster.node(1).wait_for_peers(&[1], SETTLE).await?;
    // A stream the node does not end keeps its orderly stop busy for the api's grace period
    // (2 s), so the second signal surely lands during the stop.
    let _events = cluster
        .node(1)
        .mesh()
        .await?
        .watch_mesh_events(WatchMeshEventsRequest { node_ids: vec![] })
        .await?
        .into_inner();
    cluster.node(1).signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Instant::now();
    // `stop` sends the second SIGTERM and waits for the exit.
    let clean = cluster.node_mut(1).stop();
    let took = second.elapsed();
    println!("second SIGTERM during the stop: exited after {took:?}");
    let log = cluster.node(1).log();
    assert!(!clean, "an interrupted stop is not a clean exit");
    assert!(took < Duration::from_secs(1), "took {took:?}; log:\n{log}");
    assert!(
        log.contains("during shutdown: exiting at once"),
        "log:\n{log}"
    );
    Ok(())
}

#[meshd_tests::test]
async fn a_fire_and_forget_send_to_a_node_never_in_the_mesh_is_undeliverable_at_once()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = pair()?;
    cluster.node(0).wait_for_peers(&[2], SETTLE).await?;
    let mut data = cluster.node(0).data().await?;

    let reply = data.send(fire_and_forget(999_999)).await?.into_inner();
    assert_eq!(reply.status(), MessageStatus::Undeliverable, "{reply:?}");
    assert!(reply.status_message.contains("999999"), "{reply:?}");
    // Again at once: answered from the api's view, the same way.
    let reply = data.send(fire_and_forget(999_998)).await?.into_inner();
    assert_eq!(reply.status(), MessageStatus::Undeliverable, "{reply:?}");

    // A linked node is still QUEUED (fire-and-forget does not wait).
    let reply = data.send(fire_and_forget(2)).await?.into_inner();
    assert_eq!(reply.status(), MessageStatus::Queued, "{reply:?}");

    // The batched path says the same through the status it records.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut acks = cluster
        .node(0)
        .mesh()
        .await?
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let message = |dst| PublishMessage {
        dst_node: dst,
        payload: b"hello".to_vec().into(),
        partition: 0,
        qos_class: 0,
        corr_id: 0,
        require_ack: false,
        headers: Vec::new(),
    };
    tx.send(PublishBatch {
        messages: vec![message(999_999), message(2)],
    })
    .await?;
    let ack = tokio::time::timeout(SETTLE, acks.message())
        .await??
        .expect("ack");
    assert_eq!(ack.msg_ids.len(), 2, "{}", ack.error);
    let statuses = data
        .query_message_status(QueryMessageStatusRequest {
            msg_ids: ack.msg_ids.clone(),
        })
        .await?
        .into_inner()
        .message_statuses;
    assert_eq!(statuses[0].status(), MessageStatus::Undeliverable);
    assert_ne!(statuses[1].status(), MessageStatus::Undeliverable);
    Ok(())
}
