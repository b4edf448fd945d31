//! No peer can wedge a node: a peer that stops reading is cut off after the write deadline,
//! and while it is, every other peer's traffic keeps flowing (real processes, real sockets).

use std::time::{Duration, Instant};

use meshd_proto::mesh::{MessageStatus, SendMode, SendRequest};
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
/// being delivered throughout, without waiting behind the rogue's frames, and the rogue's link
/// must be cut for not reading.
#[meshd_tests::test]
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
    let secret = cluster.mesh_secret();

    let rogue = tokio::task::spawn_blocking(move || {
        let mut link = RogueLink::connect(addr, &RogueOptions::member(50, "default", secret))?;
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

    let mut inbox2 = n2.inbox().await?;
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
    // Frames for the rogue are parked per destination, so sends to node 2 never queue behind
    // them: the gap stays well under the 1 s write deadline (with head-of-line blocking on the
    // shard's send ring it was the deadline plus a heartbeat tick, ~1.25 s).
    assert!(
        longest < Duration::from_millis(600),
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

fn publish_message(dst: u64, seq: u64, size: usize) -> meshd_proto::link::PublishMessage {
    let mut payload = vec![0u8; size.max(8)];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    meshd_proto::link::PublishMessage {
        dst_node: dst,
        payload: payload.into(),
        ..meshd_proto::link::PublishMessage::default()
    }
}

/// Two nodes behind NAT whose links live on different shards of the relay between them push
/// batches at each other as fast as Publish goes: every frame crosses the relay's shards in
/// both directions at once (each shard's readers feed the other shard's fwd ring). Before the
/// rings were split, the two input loops could each wait on the other's full ring for ever.
/// Every message must arrive once and in order, and no link may drop.
#[meshd_tests::test]
async fn two_shards_cross_forwarding_at_saturation_keep_flowing() -> anyhow::Result<()> {
    use meshd_shards::ownership::owner_shard;
    let _serial = exclusive().await;
    let x = 2u64;
    let y = (3..100u64)
        .find(|id| owner_shard(*id, 2) != owner_shard(x, 2))
        .expect("ids spread over two shards");
    // What this test is about is the rings between the relay's shards, not failure detection:
    // three processes at saturation on two cores can miss 300 ms of heartbeats for want of
    // CPU, and a link declared down loses fire-and-forget messages. A second of silence is
    // tolerated here (10 misses), so a drop would still fail the test.
    let patient = |spec: NodeSpec| spec.with_env("MESHD_NETWORK__HEARTBEAT_MISSES", "10");
    let cluster = Cluster::start(vec![
        patient(NodeSpec::listener(1).with_env("MESHD_RUNTIME__SHARDS", "2")),
        patient(NodeSpec::behind_nat(x, vec![0])),
        patient(NodeSpec::behind_nat(y, vec![0])),
    ])?;
    cluster.node(0).wait_for_peers(&[x, y], SETTLE).await?;
    for (from, to) in [(1, y), (2, x)] {
        let mut control = cluster.node(from).control().await?;
        let deadline = Instant::now() + SETTLE;
        while !control
            .get_routing_table(meshd_proto::mesh::GetRoutingTableRequest {})
            .await?
            .into_inner()
            .routes
            .iter()
            .any(|r| r.dst_node == to)
        {
            anyhow::ensure!(Instant::now() < deadline, "no route to {to}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    const BATCHES: u64 = 40;
    const PER_BATCH: u64 = 500;
    const SIZE: usize = 4096;
    // Subscribers first (a message with none is PENDING_CLIENT, not queued), each read on its
    // own task so neither lets its queue fill while the other is read.
    let mut readers = Vec::new();
    for i in [1usize, 2] {
        let mut inbox = cluster.node(i).inbox().await?;
        readers.push(tokio::spawn(async move {
            let mut next = 0u64;
            while next < BATCHES * PER_BATCH {
                let got = tokio::time::timeout(SETTLE, inbox.next())
                    .await
                    .map_err(|_| anyhow::anyhow!("subscriber {i} stalled at {next}"))?
                    .ok_or_else(|| anyhow::anyhow!("stream {i} ended"))??;
                let seq = u64::from_le_bytes(got.payload[..8].try_into()?);
                anyhow::ensure!(seq == next, "subscriber {i}: got {seq}, wanted {next}");
                next += 1;
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (src, dst) in [(1usize, y), (2usize, x)] {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut acks = cluster
            .node(src)
            .mesh()
            .await?
            .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        tasks.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let messages = (0..PER_BATCH)
                    .map(|i| publish_message(dst, b * PER_BATCH + i, SIZE))
                    .collect();
                tx.send(meshd_proto::link::PublishBatch { messages })
                    .await?;
            }
            drop(tx);
            let mut acked = 0;
            while let Some(ack) = acks.message().await? {
                anyhow::ensure!(ack.rejected == 0, "{}", ack.error);
                acked += ack.msg_ids.len() as u64;
            }
            anyhow::ensure!(acked == BATCHES * PER_BATCH, "acked {acked}");
            Ok(())
        }));
    }
    for reader in readers {
        reader
            .await?
            .map_err(|e| anyhow::anyhow!("{e}; relay log:\n{}", cluster.node(0).log_tail(30)))?;
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let bytes = 2 * BATCHES * PER_BATCH * SIZE as u64;
    println!(
        "{} MB crossed the relay's two shards both ways in {} ms",
        bytes >> 20,
        elapsed.as_millis()
    );
    assert!(
        !cluster.node(0).log().contains("link down"),
        "no link may drop under saturation; relay log:\n{}",
        cluster.node(0).log_tail(30)
    );
    Ok(())
}

/// Before its handshake a peer has proven nothing, so it must not make the node buffer a
/// data-sized WebSocket message (megabytes). 48 connections each start a message claiming
/// 4 MiB and send 2 MiB of it: the node stops reading each one at the handshake's read budget
/// (64 KiB) and closes it, so its memory grows by a few MiB, not by 96.
#[meshd_tests::test]
async fn unauthenticated_peers_cannot_make_a_node_buffer_megabytes() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![NodeSpec::listener(1)])?;
    let node = cluster.node(0);
    let addr = node.listen.expect("listens");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = node.rss_bytes().unwrap_or(0);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
    let mut threads = Vec::new();
    for i in 0..48u64 {
        let done_rx = std::sync::Arc::clone(&done_rx);
        threads.push(std::thread::spawn(move || {
            let held = meshd_tests::rogue::unfinished_message(addr, 100 + i, 4 << 20, 2 << 20);
            // Hold the connection until the memory has been measured.
            let _ = done_rx
                .lock()
                .map(|rx| rx.recv_timeout(Duration::from_secs(10)));
            held.map(|held| match held {
                // The node closed it while it was still being written.
                None => true,
                Some(mut socket) => socket.closed_by_node_within(Duration::from_secs(4)),
            })
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = node.rss_bytes().unwrap_or(0);
    drop(done_tx);
    let mut closed = 0;
    for thread in threads {
        if thread.join().expect("rogue thread")? {
            closed += 1;
        }
    }
    let grown = after.saturating_sub(before);
    println!(
        "48 unfinished 4 MiB messages before any handshake: node grew {} KiB, closed {closed} of 48",
        grown >> 10
    );
    assert!(
        grown < 32 << 20,
        "the node buffered {} MiB for unauthenticated peers",
        grown >> 20
    );
    assert_eq!(
        closed, 48,
        "every over-budget connection is closed by the node"
    );
    Ok(())
}
