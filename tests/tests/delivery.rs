//! What a waiting send's final status promises, across a destination's crash and restart
//! (real processes): never a second delivery, and never a status that claims less than what
//! may have happened.

use std::time::{Duration, Instant};

use meshd_proto::mesh::{MessageStatus, SendMode, SendRequest};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(10);

fn waiting(dst: u64, payload: &[u8], timeout_seconds: u32) -> SendRequest {
    SendRequest {
        dst_node: dst,
        payload: payload.to_vec().into(),
        mode: SendMode::WaitForDelivery as i32,
        timeout_seconds,
        ..SendRequest::default()
    }
}

/// Node 2 is frozen while node 1's waiting send reaches its socket, then killed and
/// restarted. Node 1 keeps retransmitting; the copies that reach the new life of node 2 were
/// first addressed to the old one, which may have delivered it, so node 2 answers "outcome
/// unknown" and delivers nothing, and node 1's caller gets QUEUED with that detail — not
/// DELIVERED (never delivered), not PENDING_NODE (a copy did leave), not a duplicate.
#[meshd_tests::test]
async fn a_retransmission_to_a_restarted_destination_is_never_delivered_twice() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
    ])?;
    cluster.node(0).wait_for_peers(&[2], SETTLE).await?;
    // A first send teaches node 1 node 2's generation.
    let reply = cluster
        .node(0)
        .data()
        .await?
        .send(waiting(2, b"warm-up", 5))
        .await?
        .into_inner();
    assert_ne!(reply.status(), MessageStatus::Undeliverable, "{reply:?}");

    cluster.node(1).signal(libc::SIGSTOP);
    let mut client = cluster.node(0).data().await?;
    let sender = tokio::spawn(async move { client.send(waiting(2, b"exactly once", 8)).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.node_mut(1).kill();
    cluster.node_mut(1).start()?;
    let mut inbox = cluster.node(1).inbox().await?;

    let started = Instant::now();
    let reply = sender.await??.into_inner();
    println!(
        "waiting send across the restart: {:?} \"{}\" after {} ms more",
        reply.status(),
        reply.status_message,
        started.elapsed().as_millis()
    );
    assert_eq!(reply.status(), MessageStatus::Queued, "{reply:?}");
    assert!(
        reply.status_message.starts_with("outcome unknown"),
        "{reply:?}; node 2 log:\n{}",
        cluster.node(1).log_tail(20)
    );
    let extra = tokio::time::timeout(Duration::from_secs(1), inbox.next()).await;
    assert!(
        extra.is_err(),
        "the new life of node 2 must not deliver it: {extra:?}"
    );

    // A new message to the new life is delivered as usual.
    let reply = cluster
        .node(0)
        .data()
        .await?
        .send(waiting(2, b"after", 5))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
    let got = tokio::time::timeout(SETTLE, inbox.next())
        .await?
        .expect("stream open")?;
    assert_eq!(&got.payload[..], b"after");
    Ok(())
}
