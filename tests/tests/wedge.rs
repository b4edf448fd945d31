//! No peer can wedge a node: a peer that stops reading is cut off after the write deadline,
//! and while it is, every other peer's traffic keeps flowing (real processes, real sockets).

use std::time::{Duration, Instant};

use meshd_proto::mesh::{MessageStatus, SendMode, SendRequest, SubscribeRequest};
use meshd_tests::{
    Cluster, NodeSpec, exclusive,
    rogue::{RogueLink, RogueOptions},
};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(10);

fn request(dst: u64, mode: SendMode, payload: Vec<u8>) -> SendRequest {
    SendRequest {
        dst_node: dst,
        payload: payload.into(),
        mode: mode as i32,
        timeout_seconds: 5,
        ..SendRequest::default()
    }
}

/// Node 1 runs one shard (so the rogue's link and node 2's share every queue there is) and a
/// 1 s write deadline. A rogue completes the handshake, then sends heartbeats and never reads,
/// while node 1 is asked to send it 64 KiB messages. Node 1 → node 2 waiting sends must keep
/// being delivered throughout, and the rogue's link must be cut for not reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_off_while_other_traffic_keeps_flowing() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        NodeSpec::listener(1)
            .with_env("MESHD_RUNTIME__SHARDS", "1")
            .with_env("MESHD_NETWORK__WRITE_TIMEOUT_MS", "1000"),
        NodeSpec::listener(2).dialing(vec![0]),
    ])?;
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.wait_for_peers(&[2], SETTLE).await?;
    let addr = n1.listen.expect("node 1 listens");

    let rogue = tokio::task::spawn_blocking(move || {
        let mut link = RogueLink::connect(addr, &RogueOptions::honest(50, "default"))?;
        anyhow::Ok(link.heartbeat_without_reading(Duration::from_millis(50), SETTLE * 2))
    });
    n1.wait_for_peers(&[2, 50], SETTLE).await?;

    // 64 MiB towards the rogue: far more than the socket buffers and the outbox hold.
    let mut flood_client = n1.data().await?;
    let flood = tokio::spawn(async move {
        let started = Instant::now();
        let mut statuses = Vec::new();
        for _ in 0..1024 {
            let reply = flood_client
                .send(request(50, SendMode::FireAndForget, vec![7u8; 64 << 10]))
                .await;
            statuses.push(reply.map(|r| r.into_inner().status()));
            if started.elapsed() > SETTLE * 2 {
                break;
            }
        }
        statuses
    });

    let mut inbox2 = n2
        .data()
        .await?
        .subscribe(SubscribeRequest::default())
        .await?
        .into_inner();
    let mut client = n1.data().await?;
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    let started = Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < Duration::from_secs(4) {
        let reply = tokio::time::timeout(
            SETTLE,
            client.send(request(
                2,
                SendMode::WaitForDelivery,
                sent.to_le_bytes().to_vec(),
            )),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "a send to node 2 hung while the rogue held node 1; log:\n{}",
                n1.log_tail(30)
            )
        })??
        .into_inner();
        assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
        let got = tokio::time::timeout(SETTLE, inbox2.next())
            .await?
            .expect("stream open")?;
        assert_eq!(&got.payload[..], &sent.to_le_bytes());
        longest = longest.max(last.elapsed());
        last = Instant::now();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{sent} sends to node 2 delivered while the rogue stopped reading; longest gap {} ms",
        longest.as_millis()
    );
    // Sends behind a frame waiting for the rogue's outbox wait at most the write deadline.
    assert!(
        longest < Duration::from_millis(2500),
        "node 2's traffic stalled for {longest:?}; log:\n{}",
        n1.log_tail(30)
    );

    let held = rogue.await??;
    let held = held.ok_or_else(|| {
        anyhow::anyhow!(
            "node 1 never cut off the peer that stopped reading; log:\n{}",
            n1.log_tail(30)
        )
    })?;
    println!("node 1 cut the rogue's link after {} ms", held.as_millis());
    assert!(
        n1.log().contains("peer stopped reading"),
        "the link should end for not reading; log:\n{}",
        n1.log_tail(30)
    );
    let sessions = n1.wait_for_peers(&[2], SETTLE).await?;
    assert_eq!(sessions.len(), 1);
    let statuses = flood.await?;
    assert!(!statuses.is_empty());
    Ok(())
}
