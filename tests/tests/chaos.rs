//! Chaos across real processes (issue 9 item 8): waiting sends flow from a source to a sink
//! over two redundant relays while relays are killed, restarted and frozen and the sink itself
//! is killed and restarted. Every send's final status is checked against what the sink's
//! subscribers saw: nothing reported DELIVERED was never received, nothing is received twice,
//! and the longest gap in deliveries after each fault is printed (and bounded).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use meshd_proto::mesh::{MessageStatus, SendMode, SendRequest};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(15);

/// Receipts at the sink, by message id, with when each came (test clock).
type Receipts = Arc<Mutex<HashMap<u64, Vec<Instant>>>>;

async fn collect(node: &meshd_tests::Node, receipts: Receipts) -> anyhow::Result<()> {
    let mut inbox = node.inbox().await?;
    tokio::spawn(async move {
        while let Some(Ok(message)) = inbox.next().await {
            receipts
                .lock()
                .unwrap()
                .entry(message.msg_id)
                .or_default()
                .push(Instant::now());
        }
    });
    Ok(())
}

#[meshd_tests::test]
async fn waiting_sends_keep_their_promises_while_relays_and_the_sink_crash() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    // 1 = source; 2, 3 = relays (both dial the source); 4 = sink behind NAT, dialing both
    // relays: every message crosses a relay.
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::listener(3).dialing(vec![0]),
        NodeSpec::behind_nat(4, vec![1, 2]),
    ])?;
    cluster.node(3).wait_for_peers(&[2, 3], SETTLE).await?;
    let receipts: Receipts = Arc::default();
    collect(cluster.node(3), Arc::clone(&receipts)).await?;
    // Routes to 4 exist once the LSAs are in; a send before that is PENDING_NODE by design.
    let deadline = Instant::now() + SETTLE;
    loop {
        let reply = cluster
            .node(0)
            .data()
            .await?
            .send(SendRequest {
                dst_node: 4,
                mode: SendMode::WaitForDelivery as i32,
                timeout_seconds: 2,
                ..SendRequest::default()
            })
            .await?
            .into_inner();
        if reply.status() == MessageStatus::Delivered {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no route to the sink: {reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<(u64, MessageStatus, String)>>> = Arc::default();
    let mut senders = Vec::new();
    for lane in 0..4u64 {
        let mut client = cluster.node(0).data().await?;
        let stop = Arc::clone(&stop);
        let outcomes = Arc::clone(&outcomes);
        senders.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = client
                    .send(SendRequest {
                        dst_node: 4,
                        payload: format!("{lane}-{n}").into_bytes().into(),
                        mode: SendMode::WaitForDelivery as i32,
                        timeout_seconds: 6,
                        ..SendRequest::default()
                    })
                    .await;
                if let Ok(reply) = reply {
                    let reply = reply.into_inner();
                    outcomes.lock().unwrap().push((
                        reply.msg_id,
                        reply.status(),
                        reply.status_message,
                    ));
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    let mut faults: Vec<(&str, Instant)> = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    faults.push(("kill -9 relay 2", Instant::now()));
    cluster.node_mut(1).kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    faults.push(("restart relay 2", Instant::now()));
    cluster.node_mut(1).start()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    faults.push(("SIGSTOP relay 3", Instant::now()));
    cluster.node(2).signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(2)).await;
    faults.push(("SIGCONT relay 3", Instant::now()));
    cluster.node(2).signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    faults.push(("kill -9 and restart the sink", Instant::now()));
    cluster.node_mut(3).kill();
    cluster.node_mut(3).start()?;
    collect(cluster.node(3), Arc::clone(&receipts)).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for sender in senders {
        sender.await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let receipts = receipts.lock().unwrap().clone();
    let outcomes = outcomes.lock().unwrap().clone();
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for (msg_id, status, detail) in &outcomes {
        *by_status.entry(format!("{status:?}")).or_default() += 1;
        let received = receipts.get(msg_id).map_or(0, Vec::len);
        assert!(
            received <= 1,
            "message {msg_id} received {received} times ({status:?} {detail})"
        );
        match status {
            MessageStatus::Delivered => assert_eq!(
                received, 1,
                "message {msg_id} reported DELIVERED but never received"
            ),
            MessageStatus::PendingNode => assert_eq!(
                received, 0,
                "message {msg_id} reported PENDING_NODE (no copy left) but received: {detail}"
            ),
            MessageStatus::Queued => assert!(
                detail.starts_with("outcome unknown"),
                "a final QUEUED must say the outcome is unknown: {msg_id} {detail}"
            ),
            // No subscriber while the sink restarted.
            MessageStatus::PendingClient => {}
            other => panic!("unexpected final status {other:?} for {msg_id}: {detail}"),
        }
    }
    let mut times: Vec<Instant> = receipts.values().flatten().copied().collect();
    times.sort();
    println!(
        "{} waiting sends, {} received; statuses {by_status:?}",
        outcomes.len(),
        times.len()
    );
    for (i, (fault, at)) in faults.iter().enumerate() {
        let until = faults.get(i + 1).map(|(_, t)| *t);
        let mut last = *at;
        let mut longest = Duration::ZERO;
        for t in times
            .iter()
            .filter(|t| **t >= *at && until.is_none_or(|u| **t < u))
        {
            longest = longest.max(t.duration_since(last));
            last = *t;
        }
        println!(
            "after {fault}: longest gap between deliveries {} ms",
            longest.as_millis()
        );
        // Generous: a sink restart takes a process start, a link and routes (seconds).
        assert!(
            longest < Duration::from_secs(6),
            "deliveries stopped for {longest:?} after {fault}"
        );
    }
    let delivered = by_status.get("Delivered").copied().unwrap_or(0);
    assert!(
        delivered * 2 > outcomes.len(),
        "most sends should be delivered: {by_status:?}"
    );
    Ok(())
}
