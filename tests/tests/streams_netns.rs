//! Client data streams across a partition made in the network, not asked of meshd: three
//! nodes in three network namespaces, their links on one bridge and their apis on another, so
//! cutting a node off the mesh leaves the test's subscriber and publisher connected.
//!
//! Needs root and iproute2:
//! `cargo test -p meshd-tests --test streams_netns -- --nocapture`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use meshd_tests::{
    Cluster, exclusive,
    netns::Netns,
    streams_support::{
        Seen, check_exact, open_acked_on_source, publish_all, relay_chain, subscriber,
        wait_complete,
    },
};
use prost::bytes::Bytes;

/// Long enough for the heartbeats (3 × 100 ms) to give up on the links and for a few
/// redials to fail against the partition before it heals.
const HOLD: Duration = Duration::from_secs(3);
/// One node's link loss is seen well within this.
const NOTICE: Duration = Duration::from_secs(10);
const DELIVER: Duration = Duration::from_secs(30);

/// Node 1 (source) ← node 2 (relay) ← node 3 (target, dials only). Node 2 is silently cut off
/// the mesh (its bridge port stops forwarding; every interface stays up) while 1500 messages
/// are published, then healed; then node 3's mesh link is pulled (down on both ends) while
/// 1000 more are published, then healed. Every message arrives once, in order, and every
/// publish is acknowledged once.
#[meshd_tests::test]
async fn a_silent_and_a_hard_network_partition_lose_and_repeat_nothing() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    // Declared before the cluster, so the nodes stop before their namespaces go.
    let net = Netns::new(3)?;
    let cluster = relay_chain(Some(&net)).await?;
    for i in 0..3 {
        let node = cluster.node(i);
        println!(
            "node {}: namespace {}, api {}, links {}",
            node.spec.node_id,
            net.place(i).ns,
            node.grpc,
            node.listen.map_or_else(
                || format!("dialed from {}", net.place(i).mesh),
                |a| a.to_string()
            )
        );
    }
    let stream = open_acked_on_source(cluster.node(0), &[3]).await?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sub = subscriber(
        cluster.node(2).api(),
        256,
        Arc::clone(&seen),
        Duration::ZERO,
    );
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let publish = |from: u64, to: u64| {
        publish_all(
            cluster.node(0).api(),
            stream.clone(),
            (from, to),
            50,
            Arc::clone(&acked),
        )
    };
    publish(1, 500).await?;
    wait_complete(&seen, &stream, 500, DELIVER, "node 3").await?;

    // Silent: node 2, the only way between 1 and 3, stops hearing and being heard.
    net.silence(1)?;
    let (published, noticed) = tokio::join!(
        timed(publish(501, 2000)),
        timed(async {
            alone(&cluster, 0, &[]).await?;
            alone(&cluster, 2, &[]).await
        })
    );
    let (published, noticed) = (published?, noticed?);
    tokio::time::sleep(HOLD).await;
    let during = delivered(&seen, &stream);
    println!(
        "node 2 silenced: 1500 published in {published:?} (acknowledged by the source); \
         nodes 1 and 3 lost their links {noticed:?} after the cut; {during} delivered"
    );
    let healed = Instant::now();
    net.heal(1)?;
    let took = wait_complete(&seen, &stream, 2000, DELIVER, "node 3")
        .await
        .map_err(|e| e.context(cluster.log_tails(1, 40)))?;
    println!(
        "node 2 healed: all 2000 delivered {:?} after the heal",
        took.min(healed.elapsed())
    );
    check(&seen, &acked, &stream, 2000);

    // Hard: node 3's mesh link goes down on both ends, as if its cable were pulled.
    net.cut(2)?;
    let (published, noticed) =
        tokio::join!(timed(publish(2001, 3000)), timed(alone(&cluster, 1, &[1])));
    let (published, noticed) = (published?, noticed?);
    tokio::time::sleep(HOLD).await;
    let during = delivered(&seen, &stream);
    println!(
        "node 3 cut: 1000 published in {published:?}; node 2 lost its link to it {noticed:?} \
         after the cut; {during} delivered"
    );
    let healed = Instant::now();
    net.heal(2)?;
    let took = wait_complete(&seen, &stream, 3000, DELIVER, "node 3")
        .await
        .map_err(|e| e.context(cluster.log_tails(2, 40)))?;
    println!(
        "node 3 healed: all 3000 delivered {:?} after the heal",
        took.min(healed.elapsed())
    );
    check(&seen, &acked, &stream, 3000);
    sub.abort();
    let seen = seen.lock().unwrap();
    println!(
        "node 3's subscriber: {} subscription(s), {} redelivered",
        seen.subscriptions, seen.redelivered
    );
    Ok(())
}

fn delivered(seen: &Mutex<Seen>, stream: &Bytes) -> usize {
    seen.lock()
        .unwrap()
        .messages
        .get(stream)
        .map_or(0, BTreeMap::len)
}

/// Exactly once: seqs 1..=`total` delivered in order with none twice, and each acknowledged
/// to the producer once.
fn check(seen: &Mutex<Seen>, acked: &Mutex<BTreeMap<u64, u64>>, stream: &Bytes, total: u64) {
    let seen = seen.lock().unwrap();
    check_exact(&seen, stream, total, "node 3");
    // The api was never cut, so the subscription never broke: nothing had to come again.
    assert_eq!(seen.redelivered, 0, "node 3: redelivered");
    let acked = acked.lock().unwrap();
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "every seq acknowledged to the producer"
    );
    assert!(acked.values().all(|n| *n == 1), "no seq acknowledged twice");
}

/// How long `work` took.
async fn timed(work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    work.await?;
    Ok(start.elapsed())
}

/// Waits until node `i`'s links are to `peers` only.
async fn alone(cluster: &Cluster, i: usize, peers: &[u64]) -> anyhow::Result<()> {
    cluster.node(i).wait_for_peers(peers, NOTICE).await?;
    Ok(())
}
