//! A rogue *insider*: a process holding a valid certificate for its own id (a member of the
//! mesh) that tries to speak for other nodes. Four meshd processes in a chain D – A – B – C;
//! the rogue R links to A. Each forgery is refused, the refusal is counted in A's or C's log, and
//! honest traffic keeps flowing. R's own frames, tagged with its real pair key, are accepted:
//! the refusals are about the forged source, not about malformed frames. And R, speaking as
//! itself, cannot crash a node or use up its terms with Raft requests.

use std::time::Duration;

use ed25519_dalek::Signer as _;
use meshd_proto::{
    link::{Data, DeliveryReport, DeliveryReports, LsaMsg, RoutingMessage, routing_message},
    mesh::{MessageStatus, SendMode, SendRequest},
};
use meshd_shards::{
    frame::{FrameType, Header, TrafficClass},
    origin,
};
use meshd_tests::{
    Cluster, NodeSpec, exclusive,
    rogue::{RogueLink, RogueOptions},
};
use prost::Message as _;
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(10);
const ROGUE: u64 = 66;
const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;
const D: u64 = 4;

fn send(dst: u64, payload: &[u8], mode: SendMode, timeout_seconds: u32) -> SendRequest {
    SendRequest {
        dst_node: dst,
        payload: payload.to_vec().into(),
        mode: mode as i32,
        timeout_seconds,
        ..SendRequest::default()
    }
}

/// A routed frame from `src` to `dst` with `body`, tagged with `key` (the rogue's real pair key
/// with A, whatever `src` says) or with junk.
fn routed(
    frame_type: FrameType,
    src: u64,
    dst: u64,
    body: &[u8],
    key: Option<&[u8; 32]>,
) -> (Header, Vec<u8>) {
    let header = Header::new(frame_type, TrafficClass::Client, src, dst);
    let mut payload = body.to_vec();
    match key {
        Some(key) => payload.extend_from_slice(&origin::tag(key, &header, body)),
        None => payload.extend_from_slice(&[0x5a; origin::TAG_LEN]),
    }
    (header, payload)
}

fn data(marker: &[u8]) -> Vec<u8> {
    Data {
        msg_id: 7,
        payload: marker.to_vec().into(),
        ..Data::default()
    }
    .encode_to_vec()
}

/// The rogue on a thread of its own: it beats every 50 ms and reads what A sends (so A keeps
/// the link however long the test's other steps take), and sends frames when told.
struct Driver {
    orders: std::sync::mpsc::Sender<(Vec<(Header, Vec<u8>)>, std::sync::mpsc::Sender<bool>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Driver {
    fn start(mut rogue: RogueLink) -> Self {
        let (orders, inbox) =
            std::sync::mpsc::channel::<(Vec<(Header, Vec<u8>)>, std::sync::mpsc::Sender<bool>)>();
        let thread = std::thread::spawn(move || {
            loop {
                match inbox.recv_timeout(Duration::from_millis(50)) {
                    Ok((frames, done)) => {
                        let mut sent = true;
                        for (header, payload) in &frames {
                            sent &= rogue.send_frame(header, payload).is_ok()
                                && rogue.beat().is_ok()
                                && rogue.drain(Duration::from_millis(10));
                        }
                        let _ = done.send(sent);
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if rogue.beat().is_err() || !rogue.drain(Duration::from_millis(10)) {
                            return;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Self {
            orders,
            thread: Some(thread),
        }
    }

    /// Sends the frames; fails if A closed the rogue's link.
    async fn send(&self, frames: Vec<(Header, Vec<u8>)>) -> anyhow::Result<()> {
        let (done, finished) = std::sync::mpsc::channel();
        self.orders.send((frames, done))?;
        let sent = tokio::task::spawn_blocking(move || finished.recv()).await??;
        anyhow::ensure!(sent, "A closed the rogue's link");
        Ok(())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let (orders, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.orders, orders));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[meshd_tests::test]
async fn a_member_cannot_speak_for_another_node() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(A),
        NodeSpec::listener(B).dialing(vec![0]),
        NodeSpec::behind_nat(C, vec![1]),
        NodeSpec::listener(D).dialing(vec![0]),
    ])?;
    let a_addr = cluster.node(0).listen.expect("A listens");
    cluster.node(0).wait_for_routes(&[B, C, D], SETTLE).await?;
    cluster.node(2).wait_for_routes(&[A, B, D], SETTLE).await?;
    let mesh_id = "default";
    let secret = cluster.mesh_secret();

    let mut inbox_a = cluster.node(0).inbox().await?;
    let mut inbox_c = cluster.node(2).inbox().await?;

    // The rogue is a certified member (the harness plays the authority for it).
    let rogue = tokio::task::spawn_blocking(move || {
        RogueLink::connect(a_addr, &RogueOptions::member(ROGUE, mesh_id, secret))
    })
    .await??;
    let key = rogue.pair_key_with_peer()?;
    let (rogue_key, rogue_certificate) = (rogue.identity().0.clone(), rogue.identity().1.to_vec());
    let rogue = Driver::start(rogue);
    // A publishes the rogue's pair key once its link is up.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. Data in another node's name: to A directly (src B, junk tag and the rogue's own
    //    key), and through A and B to C (src D, which is not on the way: a frame claiming a
    //    relay's own id dies at that relay as looped). Then the rogue's own frame, honestly
    //    tagged.
    rogue
        .send(vec![
            routed(FrameType::Data, B, A, &data(b"FORGED-B-JUNK"), None),
            routed(
                FrameType::Data,
                B,
                A,
                &data(b"FORGED-B-ROGUE-KEY"),
                Some(&key),
            ),
            routed(FrameType::Data, D, C, &data(b"FORGED-D-TO-C"), Some(&key)),
            routed(FrameType::Gossip, B, A, b"not even foca", Some(&key)),
            routed(
                FrameType::Data,
                ROGUE,
                A,
                &data(b"HONEST-ROGUE"),
                Some(&key),
            ),
        ])
        .await?;
    let got = tokio::time::timeout(SETTLE, inbox_a.next())
        .await?
        .expect("stream open")?;
    assert_eq!(
        got.payload.as_ref(),
        b"HONEST-ROGUE",
        "the first message A delivers is the rogue's own; the forged ones before it were refused"
    );
    assert_eq!(got.src_node, ROGUE);

    // 2. A delivery report in C's name for a message A waits on. C is frozen, so only the
    //    forgery could settle it; A's message ids are learned from a send just before.
    let mut client = cluster.node(0).data().await?;
    let probe = client
        .send(send(B, b"probe", SendMode::FireAndForget, 0))
        .await?
        .into_inner();
    cluster.node(2).signal(libc::SIGSTOP);
    let forged_reports = DeliveryReports {
        reports: vec![DeliveryReport {
            msg_id: probe.msg_id,
            status: MessageStatus::Delivered as i32,
            detail: "forged".into(),
            count: 1000,
        }],
        generation: 0,
        saturated: false,
        relay_for: 0,
    }
    .encode_to_vec();
    let waiting = tokio::spawn(async move {
        client
            .send(send(C, b"waits for C", SendMode::WaitForDelivery, 3))
            .await
            .map(tonic::Response::into_inner)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frames: Vec<_> = (0..20)
        .map(|_| routed(FrameType::DeliveryReport, C, A, &forged_reports, Some(&key)))
        .collect();
    rogue.send(frames).await?;
    let reply = waiting.await??;
    assert_ne!(
        reply.status(),
        MessageStatus::Delivered,
        "a forged report settled a send to a frozen node: {reply:?}"
    );
    cluster.node(2).signal(libc::SIGCONT);

    // 3. LSAs in C's name that withdraw every link of C: unsigned; signed by the rogue with
    //    its own (real) certificate; and C's id with a seq near the top. A keeps its route to
    //    C. The rogue's LSA for itself, honestly signed, is taken (A then routes to it).
    let sign = |lsa: LsaMsg| {
        let mut signed = b"meshd lsa v1".to_vec();
        lsa.encode(&mut signed).expect("a Vec grows");
        LsaMsg {
            certificate: rogue_certificate.clone().into(),
            signature: rogue_key.sign(&signed).to_bytes().to_vec().into(),
            ..lsa
        }
    };
    let lsa = |origin: u64, seq: u64, neighbours: &[u64]| LsaMsg {
        origin,
        seq,
        adjacencies: neighbours
            .iter()
            .map(|n| meshd_proto::link::AdjacencyMsg {
                neighbor: *n,
                metrics: Some(meshd_proto::link::LinkMetricsMsg::default()),
            })
            .collect(),
        ..LsaMsg::default()
    };
    let routing = |lsa: LsaMsg| {
        (
            Header::new(FrameType::Routing, TrafficClass::Control, ROGUE, A),
            RoutingMessage {
                body: Some(routing_message::Body::Lsa(lsa)),
            }
            .encode_to_vec(),
        )
    };
    let frames = vec![
        routing(lsa(C, 1 << 40, &[])),
        routing(sign(lsa(C, 1 << 40, &[]))),
        routing(sign(lsa(C, 1 << 61, &[]))),
        routing(sign(lsa(ROGUE, 1, &[A]))),
    ];
    rogue.send(frames).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let routes = cluster.node(0).wait_for_routes(&[C, ROGUE], SETTLE).await?;
    assert!(routes.contains_key(&C), "A lost its route to C: {routes:?}");

    // Honest traffic never stopped: A → C and C → A, and nothing forged reached C.
    let mut client = cluster.node(0).data().await?;
    let reply = client
        .send(send(C, b"honest to C", SendMode::WaitForDelivery, 5))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
    // C may first get a late copy of the send that waited while it was frozen; never a
    // forged one.
    loop {
        let got = tokio::time::timeout(SETTLE, inbox_c.next())
            .await?
            .expect("stream open")?;
        assert!(
            !got.payload.starts_with(b"FORGED"),
            "C delivered a forged message: {got:?}"
        );
        assert_eq!(got.src_node, A);
        if got.payload.as_ref() == b"honest to C" {
            break;
        }
        assert_eq!(got.payload.as_ref(), b"waits for C");
    }
    let reply = cluster
        .node(2)
        .data()
        .await?
        .send(send(A, b"honest to A", SendMode::WaitForDelivery, 5))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
    rogue.send(Vec::new()).await?;
    drop(rogue);

    // Each refusal was counted where it happened.
    assert!(cluster.node_mut(0).stop(), "A stops cleanly");
    assert!(cluster.node_mut(2).stop(), "C stops cleanly");
    let (log_a, log_c) = (cluster.node(0).log(), cluster.node(2).log());
    assert!(
        log_a.contains("forged_source"),
        "A counted no forged source:\n{}",
        cluster.node(0).log_tail(40)
    );
    assert!(
        log_a.contains("LSA refused"),
        "A counted no refused LSA:\n{}",
        cluster.node(0).log_tail(40)
    );
    assert!(
        log_c.contains("forged_source"),
        "C counted no forged source:\n{}",
        cluster.node(2).log_tail(40)
    );
    Ok(())
}

/// A Raft request of the mesh control group from the rogue to A, honestly tagged.
fn raft_request(kind: u32, body: Vec<u8>, key: &[u8; 32]) -> (Header, Vec<u8>) {
    let envelope = meshd_proto::link::RaftEnvelope {
        req_id: 1,
        kind,
        answer: false,
        body: body.into(),
        group: 0,
    }
    .encode_to_vec();
    let header = Header::new(FrameType::Raft, TrafficClass::System, ROGUE, A);
    let mut payload = envelope.clone();
    payload.extend_from_slice(&origin::tag(key, &header, &envelope));
    (header, payload)
}

/// A's control-group term and whether its process still answers.
async fn term_of(node: &meshd_tests::Node) -> anyhow::Result<u64> {
    let metrics = node.metrics.expect("metrics configured");
    let text = meshd_tests::scrape(metrics).await?;
    let term = text
        .lines()
        .find_map(|l| l.strip_prefix("meshd_raft_term "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no meshd_raft_term in A's metrics"))?;
    Ok(term)
}

#[meshd_tests::test]
async fn a_member_cannot_crash_a_node_or_use_up_its_terms_with_raft_requests() -> anyhow::Result<()>
{
    use meshd::control::raft::TypeConfig;
    use openraft::{
        SnapshotMeta, Vote,
        raft::{InstallSnapshotRequest, VoteRequest},
    };
    let _serial = exclusive().await;
    let with_metrics = |mut spec: NodeSpec| {
        spec.extra
            .push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        spec
    };
    let cluster = Cluster::start(vec![
        with_metrics(NodeSpec::listener(A)),
        NodeSpec::behind_nat(B, vec![0]),
    ])?;
    let a_addr = cluster.node(0).listen.expect("A listens");
    cluster.node(0).wait_for_routes(&[B], SETTLE).await?;
    let secret = cluster.mesh_secret();
    let rogue = tokio::task::spawn_blocking(move || {
        RogueLink::connect(a_addr, &RogueOptions::member(ROGUE, "default", secret))
    })
    .await??;
    let key = rogue.pair_key_with_peer()?;
    let rogue = Driver::start(rogue);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = term_of(cluster.node(0)).await?;

    // 1. A snapshot whose second chunk lands 1 TiB in: openraft seeks there and writes, and
    //    the allocation aborted the process. The first chunk (offset 0) is fine.
    let chunk = |offset: u64| {
        let request: InstallSnapshotRequest<TypeConfig> = InstallSnapshotRequest {
            vote: Vote::new(before + 1, ROGUE),
            meta: SnapshotMeta {
                snapshot_id: "rogue".into(),
                ..SnapshotMeta::default()
            },
            offset,
            data: vec![0x5a; 16],
            done: false,
        };
        postcard::to_allocvec(&request).expect("encodes")
    };
    // 2. A vote request at the top of the term space: no election could follow it.
    let vote: VoteRequest<u64> = VoteRequest::new(Vote::new(u64::MAX - 1, ROGUE), None);
    let vote = postcard::to_allocvec(&vote).expect("encodes");
    rogue
        .send(vec![
            raft_request(3, chunk(0), &key),
            raft_request(3, chunk(1 << 40), &key),
            raft_request(2, vote, &key),
        ])
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A lives, its term did not jump, and it counted the refusals; honest traffic flows.
    let after = term_of(cluster.node(0)).await?;
    assert!(
        after < before + 1000,
        "A's term jumped from {before} to {after}"
    );
    let text = meshd_tests::scrape(cluster.node(0).metrics.expect("metrics")).await?;
    let refused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("meshd_raft_requests_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 2, "A refused {refused} Raft requests, not 2");
    let reply = cluster
        .node(1)
        .data()
        .await?
        .send(send(A, b"still here", SendMode::WaitForDelivery, 5))
        .await?
        .into_inner();
    // A has no subscriber: its answer is PENDING_CLIENT, which only a live A gives.
    assert_eq!(reply.status(), MessageStatus::PendingClient, "{reply:?}");
    rogue.send(Vec::new()).await?;
    Ok(())
}
