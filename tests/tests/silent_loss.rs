//! A fire-and-forget message that does not arrive is never silently lost (issue 23), across
//! real processes: every accepted message the destination's subscriber never got has a
//! status at its source that says so.
//!
//! 1. A relay that has to drop it tells the source. A (1) and B (2) sit behind NAT and both
//!    dial C (3), so everything A sends B goes through C. B is frozen (SIGSTOP) for longer
//!    than C's relay wait but shorter than its write timeout and the heartbeat silence limit,
//!    so the C–B link stays up while its outbox stays full: C's reader holds each frame from
//!    A for the relay wait and then drops it. Without the notice (`relay_failed` counting
//!    only) the dropped ones stay QUEUED.
//! 2. A link that breaks under it reports it. A (1, behind NAT) dials B (2) and floods it; B
//!    is frozen for longer than A's write timeout, so A cuts the link with its outbox full
//!    and megabytes in the sockets' buffers. What A never wrote is routed again (here: no
//!    other way, so PENDING_NODE), what it wrote and B never confirmed reading (`LaneAck`) is
//!    PENDING_NODE "may have been lost" (`Shard::salvage`), and B, thawed, delivers whatever
//!    it still reads, whose reports win. Before link confirmations, everything in the outbox
//!    and in the kernels' buffers stayed QUEUED.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use meshd_proto::mesh::{MessageStatus, SendMode, SendRequest};
use meshd_tests::{
    Cluster, Node, NodeSpec, exclusive,
    saturate::{record_ids, statuses, until_quiet},
};

const SETTLE: Duration = Duration::from_secs(20);

fn spec(mut spec: NodeSpec, write_timeout_ms: &str) -> NodeSpec {
    spec.extra
        .push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    // 100 ms heartbeats: a link is declared down after 6 s of silence, not 0.3 s, so the
    // write timeout decides.
    spec.with_env("MESHD_NETWORK__WRITE_TIMEOUT_MS", write_timeout_ms)
        .with_env("MESHD_NETWORK__HEARTBEAT_MISSES", "60")
}

fn fire_and_forget(dst: u64, payload: Vec<u8>) -> SendRequest {
    SendRequest {
        dst_node: dst,
        payload: payload.into(),
        qos_class: 1,
        mode: SendMode::FireAndForget as i32,
        ..SendRequest::default()
    }
}

/// What one run came to at the source.
struct Outcome {
    accepted: usize,
    refused: u64,
    received: usize,
    /// Messages not received, by status (and the detail's gist).
    by_status: BTreeMap<String, u64>,
    /// Accepted, not received, still QUEUED: silently lost.
    silent: Vec<u64>,
}

/// `src` floods node `dst` (16 KiB fire-and-forget messages, 8 senders) while `dst_node` is
/// frozen for `freeze`, and a little before and after; then drains `dst`'s subscriber and
/// asks `src` for the status of every accepted message it did not get. `gist` names a
/// status's detail (or `None` to show it whole).
async fn flood_through_a_freeze(
    src: &Node,
    dst_node: &Node,
    dst: u64,
    freeze: Duration,
    gist: impl Fn(MessageStatus, &str) -> Option<String>,
) -> anyhow::Result<Outcome> {
    let received = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let subscriber = record_ids(dst_node.inbox().await?, Arc::clone(&received), || None);

    let client = src.data().await?;
    let accepted = Arc::new(Mutex::new(Vec::<u64>::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + freeze + Duration::from_millis(1_500);
    let mut senders = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let accepted = Arc::clone(&accepted);
        let refused = Arc::clone(&refused);
        senders.push(tokio::spawn(async move {
            while Instant::now() < end {
                let call = client.send(fire_and_forget(dst, vec![0x5a; 16 << 10]));
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(answer)) if answer.get_ref().status() == MessageStatus::Queued => {
                        accepted
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(answer.into_inner().msg_id);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    dst_node.signal(libc::SIGSTOP);
    tokio::time::sleep(freeze).await;
    dst_node.signal(libc::SIGCONT);
    for sender in senders {
        sender.await?;
    }

    // Drain: until nothing more arrives for 3 s (every wait bounded).
    until_quiet(&received, Duration::from_secs(3), Duration::from_secs(60)).await;
    subscriber.abort();

    let accepted = accepted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let missing: Vec<u64> = {
        let received = received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        accepted
            .iter()
            .copied()
            .filter(|id| !received.contains(id))
            .collect()
    };
    let mut by_status = BTreeMap::<String, u64>::new();
    let mut silent = Vec::new();
    for s in statuses(src, &missing).await? {
        let key = gist(s.status(), &s.status_message)
            .unwrap_or_else(|| format!("{} {}", s.status().as_str_name(), s.status_message));
        *by_status.entry(key).or_default() += 1;
        if s.status() == MessageStatus::Queued {
            silent.push(s.msg_id);
        }
    }
    let outcome = Outcome {
        accepted: accepted.len(),
        refused: refused.load(Ordering::Relaxed),
        received: accepted.len() - missing.len(),
        by_status,
        silent,
    };
    println!(
        "accepted {}, refused {}, received {}, not received {} by status at the source: {:?}",
        outcome.accepted,
        outcome.refused,
        outcome.received,
        missing.len(),
        outcome.by_status
    );
    Ok(outcome)
}

async fn print_drops(cluster: &Cluster, nodes: usize) {
    for i in 0..nodes {
        if let Some(addr) = cluster.node(i).metrics {
            let drops = dropped_frames(addr).await.unwrap_or_default();
            println!("node {} drops: {drops}", cluster.node(i).spec.node_id);
        }
    }
}

fn assert_none_silent(outcome: &Outcome, cluster: &Cluster) {
    assert!(outcome.accepted > 50, "the flood hardly ran");
    assert!(
        outcome.silent.is_empty(),
        "{} accepted messages neither arrived nor were reported (still QUEUED): {:?}\n{}",
        outcome.silent.len(),
        &outcome.silent[..outcome.silent.len().min(10)],
        cluster.log_tails(0, 10)
    );
}

#[meshd_tests::test(limit = 150)]
async fn a_message_a_relay_drops_ends_pending_node_naming_the_relay() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    // C waits half its write timeout (2 s) for room before dropping a relayed frame.
    let cluster = Cluster::start(vec![
        spec(NodeSpec::listener(3), "4000"),
        spec(NodeSpec::behind_nat(1, vec![0]), "4000"),
        spec(NodeSpec::behind_nat(2, vec![0]), "4000"),
    ])?;
    let (a, b) = (cluster.node(1), cluster.node(2));
    a.wait_for_routes(&[2], SETTLE).await?;
    b.wait_for_routes(&[1], SETTLE).await?;

    let outcome =
        flood_through_a_freeze(a, b, 2, Duration::from_millis(3_000), |status, detail| {
            (status == MessageStatus::PendingNode && detail.starts_with("dropped at relay 3"))
                .then(|| "PENDING_NODE, dropped at relay 3".to_owned())
        })
        .await?;
    print_drops(&cluster, 3).await;
    assert_none_silent(&outcome, &cluster);
    assert!(
        outcome
            .by_status
            .contains_key("PENDING_NODE, dropped at relay 3"),
        "C dropped nothing: the test no longer exercises a relay drop ({:?})",
        outcome.by_status
    );
    Ok(())
}

#[meshd_tests::test(limit = 150)]
async fn a_message_on_a_link_that_breaks_is_delivered_or_reported() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    // A cuts the link 1 s after B stops confirming; B stays frozen 3 s.
    let cluster = Cluster::start(vec![
        spec(NodeSpec::listener(2), "1000"),
        spec(NodeSpec::behind_nat(1, vec![0]), "1000"),
    ])?;
    let (b, a) = (cluster.node(0), cluster.node(1));
    a.wait_for_routes(&[2], SETTLE).await?;

    let outcome =
        flood_through_a_freeze(a, b, 2, Duration::from_millis(3_000), |status, detail| {
            (status == MessageStatus::PendingNode).then(|| {
                if detail.contains("may have been lost") {
                    "PENDING_NODE, unconfirmed when the link broke".to_owned()
                } else {
                    format!("PENDING_NODE {detail}")
                }
            })
        })
        .await?;
    print_drops(&cluster, 2).await;
    assert_none_silent(&outcome, &cluster);
    assert!(
        outcome
            .by_status
            .contains_key("PENDING_NODE, unconfirmed when the link broke"),
        "nothing was left unconfirmed on the broken link: the test no longer breaks a busy \
         link ({:?})",
        outcome.by_status
    );
    Ok(())
}

async fn dropped_frames(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    Ok(meshd_tests::scrape(addr)
        .await?
        .lines()
        .filter(|l| l.starts_with("meshd_frames_dropped_total") && !l.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("; "))
}
