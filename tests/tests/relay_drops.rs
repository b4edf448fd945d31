//! A relay that has to drop a fire-and-forget message tells its source (issue 23: "never
//! silently lost"), across real processes.
//!
//! A (1) and B (2) sit behind NAT and both dial C (3), so everything A sends B goes through
//! C. B is frozen (SIGSTOP) for longer than C's relay wait but shorter than its write timeout
//! and the heartbeat silence limit, so the C–B link stays up while its outbox stays full:
//! C's reader holds each frame from A for the relay wait and then drops it. Meanwhile A
//! floods B with fire-and-forget sends; then B thaws and its subscriber reads everything.
//!
//! Asserted: every accepted message that B's subscriber never got has a status that says
//! so at A: PENDING_NODE "dropped at relay 3: …" (C's notice, `Shard::relay_failed`) or
//! PENDING_CLIENT; none is left QUEUED, and at least one was dropped at C. Without the
//! notice (`relay_failed` counting only, as before) the dropped ones stay QUEUED and the
//! first assertion fails: that is how a relay drop was silent.

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
    Cluster, NodeSpec, exclusive,
    saturate::{statuses, until_quiet},
};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(20);
/// C waits half of it for room before dropping a relayed frame: 2 s.
const WRITE_TIMEOUT_MS: &str = "4000";
/// 100 ms heartbeats: a link is declared down after 6 s of silence, not 0.3 s.
const HEARTBEAT_MISSES: &str = "60";
const FREEZE: Duration = Duration::from_millis(3_000);

fn spec(mut spec: NodeSpec) -> NodeSpec {
    spec.extra
        .push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    spec.with_env("MESHD_NETWORK__WRITE_TIMEOUT_MS", WRITE_TIMEOUT_MS)
        .with_env("MESHD_NETWORK__HEARTBEAT_MISSES", HEARTBEAT_MISSES)
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

#[meshd_tests::test(limit = 150)]
async fn a_message_a_relay_drops_ends_pending_node_naming_the_relay() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        spec(NodeSpec::listener(3)),
        spec(NodeSpec::behind_nat(1, vec![0])),
        spec(NodeSpec::behind_nat(2, vec![0])),
    ])?;
    let (a, b) = (cluster.node(1), cluster.node(2));
    a.wait_for_routes(&[2], SETTLE).await?;
    b.wait_for_routes(&[1], SETTLE).await?;

    let received = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let mut inbox = b.inbox().await?;
    let subscriber = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbox.next().await {
                received
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(message.msg_id);
            }
        })
    };

    // A floods B while B is frozen, and a little before and after.
    let client = a.data().await?;
    let accepted = Arc::new(Mutex::new(Vec::<u64>::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + FREEZE + Duration::from_millis(1_500);
    let mut senders = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let accepted = Arc::clone(&accepted);
        let refused = Arc::clone(&refused);
        senders.push(tokio::spawn(async move {
            while Instant::now() < end {
                let call = client.send(fire_and_forget(2, vec![0x5a; 16 << 10]));
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
    b.signal(libc::SIGSTOP);
    tokio::time::sleep(FREEZE).await;
    b.signal(libc::SIGCONT);
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
    for s in statuses(a, &missing).await? {
        let key = match s.status() {
            MessageStatus::PendingNode if s.status_message.starts_with("dropped at relay 3") => {
                "PENDING_NODE, dropped at relay 3".to_owned()
            }
            other => format!("{} {}", other.as_str_name(), s.status_message),
        };
        *by_status.entry(key).or_default() += 1;
        if s.status() == MessageStatus::Queued {
            silent.push(s.msg_id);
        }
    }
    println!(
        "accepted {}, refused {}, received {}, not received {} by status at A: {by_status:?}",
        accepted.len(),
        refused.load(Ordering::Relaxed),
        accepted.len() - missing.len(),
        missing.len()
    );
    for i in 0..3 {
        if let Some(addr) = cluster.node(i).metrics {
            let drops = dropped_frames(addr).await.unwrap_or_default();
            println!("node {} drops: {drops}", i);
        }
    }
    assert!(accepted.len() > 50, "the flood hardly ran");
    assert!(
        silent.is_empty(),
        "{} accepted messages neither arrived nor were reported (still QUEUED): {:?}\n{}",
        silent.len(),
        &silent[..silent.len().min(10)],
        cluster.log_tails(0, 10)
    );
    assert!(
        by_status.contains_key("PENDING_NODE, dropped at relay 3"),
        "C dropped nothing: the test no longer exercises a relay drop ({by_status:?})"
    );
    Ok(())
}

async fn dropped_frames(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: meshd\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut raw)).await??;
    Ok(raw
        .lines()
        .filter(|l| l.starts_with("meshd_frames_dropped_total") && !l.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("; "))
}
