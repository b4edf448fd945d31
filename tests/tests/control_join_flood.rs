//! Join floods: 50 guest links that each start a join at the same moment and answer the
//! member's key exchange with junk. The member holds at most `MAX_PENDING_EXCHANGES` exchanges
//! open, refuses the excess with a "busy, retry" answer at once and every wrong proof with
//! "wrong join key", and its control loop keeps serving gossip, routing and the api
//! meanwhile: no member is ever suspected, and a right key gets in right after. And an
//! outsider is bounded: one set-up deadline from accept to authenticated, whatever stage it
//! stalls in, and a guest link keeps the handshake's read budget for its life.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use meshd_proto::{
    link::{
        Auth, Hello, JoinAnswer, JoinMeshRequest, JoinPolicy, JoinRefusal, JoinRequest,
        MemberState, MeshHealth, SeedMeshRequest,
    },
    mesh::GetRoutingTableRequest,
};
use meshd_shards::{
    frame::{self, FrameReader, FrameType, Header, TrafficClass},
    handshake::{PROTOCOL_VERSION, Role, sign_transcript, transcript_digest},
};
use meshd_tests::{
    Cluster, Node, NodeSpec, exclusive, mesh_status,
    rogue::{Ws, open_ws},
    wait_for_mesh,
};
use prost::Message as _;
use rand::RngCore;
use tungstenite::Message;

const KEY: &str = "correct horse battery";
const SETTLE: Duration = Duration::from_secs(20);
const FLOOD: usize = 50;

fn meshless(spec: NodeSpec) -> NodeSpec {
    NodeSpec {
        extra: "mesh_id = \"\"".into(),
        ..spec
    }
}

async fn join(node: &Node, via: &Node, key: &str) -> Result<(), tonic::Status> {
    let addr = via.listen.expect("entry point listens").to_string();
    let mut client = node
        .mesh()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    client
        .join_mesh(JoinMeshRequest {
            addr,
            join_key: key.into(),
            timeout_seconds: 10,
            ..JoinMeshRequest::default()
        })
        .await
        .map(|_| ())
}

fn frame_bytes(node_id: u64, frame_type: FrameType, payload: &[u8]) -> Vec<u8> {
    let header = Header::new(frame_type, TrafficClass::Control, node_id, 0);
    let mut out = Vec::new();
    frame::encode_into(&mut out, &header, payload, 1 << 20).expect("small frame");
    out
}

/// What one read brought.
enum Got {
    Frame(FrameType, Vec<u8>),
    /// Nothing within the socket's read timeout.
    Idle,
    /// The node closed the link, or the deadline passed.
    Over,
}

fn read_frame(ws: &mut Ws, deadline: Instant) -> anyhow::Result<Got> {
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Binary(bytes)) => {
                if let Some(Ok(frame)) = FrameReader::new(&bytes, 1 << 20).next() {
                    return Ok(Got::Frame(frame.header.frame_type, frame.payload.to_vec()));
                }
            }
            Ok(Message::Close(_)) => return Ok(Got::Over),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Got::Idle);
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(Got::Over);
            }
            Err(e) => bail!("reading: {e}"),
        }
    }
    Ok(Got::Over)
}

/// Dials `addr` as node `node_id` without a mesh, which a member accepts only as a guest, and
/// completes the link handshake.
fn guest_link(addr: SocketAddr, node_id: u64) -> anyhow::Result<Ws> {
    let (mut ws, exporter) = open_ws(addr, node_id)?;
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let key = SigningKey::from_bytes(&secret);
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        mesh_id: String::new(),
        node_id,
        nonce: nonce.to_vec().into(),
        public_key: key.verifying_key().to_bytes().to_vec().into(),
        boot_id: 1,
        listen_addr: String::new(),
        software_version: "join-flood".into(),
        certificate: Default::default(),
        ..Hello::default()
    };
    let hello_bytes = hello.encode_to_vec();
    ws.send(Message::Binary(
        frame_bytes(node_id, FrameType::Hello, &hello_bytes).into(),
    ))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut authenticated = false;
    loop {
        let (frame_type, payload) = match read_frame(&mut ws, deadline)? {
            Got::Frame(frame_type, payload) => (frame_type, payload),
            Got::Idle => continue,
            Got::Over => bail!("node {node_id}: the guest link closed during the handshake"),
        };
        match frame_type {
            FrameType::Refuse => bail!("node {node_id}: refused"),
            FrameType::Hello => {
                let digest = transcript_digest(&exporter, &hello_bytes, &payload);
                let auth = Auth {
                    signature: sign_transcript(&key, Role::Dialer, &digest).to_vec().into(),
                };
                ws.send(Message::Binary(
                    frame_bytes(node_id, FrameType::Auth, &auth.encode_to_vec()).into(),
                ))?;
                authenticated = true;
            }
            // The member's first heartbeat: the link is up.
            FrameType::Heartbeat if authenticated => return Ok(ws),
            _ => {}
        }
    }
}

/// One flooding guest: links, waits for `go` (sending heartbeats so the link stays up),
/// starts a join, holds the member's exchange open for half a second (so the flood's
/// exchanges overlap), answers it with junk and returns the final answer (or the refusal of
/// the start).
fn bad_join(
    addr: SocketAddr,
    node_id: u64,
    ready: &AtomicUsize,
    go: &AtomicBool,
) -> anyhow::Result<Option<JoinAnswer>> {
    let linked = guest_link(addr, node_id);
    ready.fetch_add(1, Ordering::SeqCst);
    let mut ws = linked?;
    let beat = frame_bytes(node_id, FrameType::Heartbeat, &[]);
    while !go.load(Ordering::SeqCst) {
        ws.send(Message::Binary(beat.clone().into()))?;
        std::thread::sleep(Duration::from_millis(30));
    }
    ws.send(Message::Binary(
        frame_bytes(
            node_id,
            FrameType::Join,
            &JoinRequest::default().encode_to_vec(),
        )
        .into(),
    ))?;
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut last_beat = Instant::now();
    let mut proof_due = None;
    loop {
        if last_beat.elapsed() > Duration::from_millis(30) {
            let _ = ws.send(Message::Binary(beat.clone().into()));
            last_beat = Instant::now();
        }
        if proof_due.is_some_and(|at| Instant::now() >= at) {
            proof_due = None;
            let mut junk = [0u8; 33];
            rand::thread_rng().fill_bytes(&mut junk);
            let proof = JoinRequest {
                pake: junk.to_vec().into(),
                confirm: vec![0u8; 32].into(),
                ..JoinRequest::default()
            };
            ws.send(Message::Binary(
                frame_bytes(node_id, FrameType::Join, &proof.encode_to_vec()).into(),
            ))?;
        }
        match read_frame(&mut ws, deadline)? {
            Got::Over => return Ok(None),
            Got::Frame(FrameType::JoinAnswer, payload) => {
                let answer = JoinAnswer::decode(payload.as_slice())?;
                if answer.pake.is_empty() {
                    return Ok(Some(answer));
                }
                // The challenge: it carries the key's parameters and salt, never the hash.
                anyhow::ensure!(
                    answer.key_params.starts_with("$argon2id$")
                        && answer.key_params.matches('$').count() == 4,
                    "challenge parameters {:?}",
                    answer.key_params
                );
                proof_due = Some(Instant::now() + Duration::from_millis(500));
            }
            Got::Frame(..) | Got::Idle => {}
        }
    }
}

#[meshd_tests::test]
async fn a_member_flooded_with_bad_joins_keeps_its_mesh_healthy_and_refuses_the_excess_busy()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        meshless(NodeSpec::listener(1)),
        meshless(NodeSpec::listener(2)),
        meshless(NodeSpec::listener(3)),
        meshless(NodeSpec::listener(4)),
    ])?;
    cluster
        .node(0)
        .mesh()
        .await?
        .seed_mesh(SeedMeshRequest {
            name: "flood".into(),
            description: String::new(),
            join_policy: JoinPolicy::KeyRequired as i32,
            join_key: KEY.into(),
        })
        .await?;
    join(cluster.node(1), cluster.node(0), KEY).await?;
    join(cluster.node(2), cluster.node(0), KEY).await?;
    let three = [0, 1, 2];
    wait_for_mesh(&cluster, &three, "three alive members", SETTLE, |s| {
        s.online_members == 3 && s.health() == MeshHealth::Healthy
    })
    .await?;

    // 50 guests link to node 1 and, once all are up, send their wrong keys together.
    let entry = cluster.node(0).listen.context("listens")?;
    let ready = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let guests: Vec<_> = (0..FLOOD as u64)
        .map(|i| {
            let (ready, go) = (Arc::clone(&ready), Arc::clone(&go));
            std::thread::spawn(move || bad_join(entry, 1000 + i, &ready, &go))
        })
        .collect();
    let linking = Instant::now();
    while ready.load(Ordering::SeqCst) < FLOOD && linking.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    go.store(true, Ordering::SeqCst);
    let flood_started = Instant::now();
    println!(
        "{} guest links up after {:?}; flood sent",
        ready.load(Ordering::SeqCst),
        linking.elapsed()
    );

    // While the answers come in (and a second after): every node sees every member alive,
    // and node 1's control loop answers the api at once.
    let mut slowest_control = Duration::ZERO;
    let mut control = cluster.node(0).control().await?;
    let mut views = 0;
    while guests.iter().any(|g| !g.is_finished())
        || flood_started.elapsed() < Duration::from_secs(1)
    {
        for &i in &three {
            let asked = Instant::now();
            let status = mesh_status(cluster.node(i)).await?;
            if i == 0 {
                slowest_control = slowest_control.max(asked.elapsed());
            }
            let unwell: Vec<_> = status
                .members
                .iter()
                .filter(|m| m.state() != MemberState::Alive)
                .map(|m| (m.node_id, m.state()))
                .collect();
            anyhow::ensure!(
                status.online_members == 3 && unwell.is_empty(),
                "node {} saw {unwell:?} during the flood:\n{}",
                i + 1,
                cluster.log_tails(0, 30)
            );
            views += 1;
        }
        let asked = Instant::now();
        let table = control
            .get_routing_table(GetRoutingTableRequest {})
            .await?
            .into_inner();
        slowest_control = slowest_control.max(asked.elapsed());
        anyhow::ensure!(!table.routes.is_empty(), "node 1 lost its routes");
        tokio::time::sleep(Duration::from_millis(20)).await;
        anyhow::ensure!(
            flood_started.elapsed() < Duration::from_secs(30),
            "the flood is not answered"
        );
    }
    let (mut bad_key, mut busy, mut unanswered) = (0, 0, 0);
    for guest in guests {
        match guest.join().expect("guest thread")? {
            Some(answer) => {
                assert!(!answer.accepted, "a wrong key got in: {answer:?}");
                if answer.refusal == JoinRefusal::BadKey as u32 {
                    bad_key += 1;
                } else if answer.reason.contains("busy") {
                    busy += 1;
                } else {
                    bail!("unexpected refusal {answer:?}");
                }
            }
            None => unanswered += 1,
        }
    }
    println!(
        "{FLOOD} bad joins: {bad_key} checked and refused, {busy} refused busy, {unanswered} \
         unanswered, in {:?}; {views} status views all healthy; slowest control answer on \
         the flooded node {slowest_control:?}",
        flood_started.elapsed()
    );
    assert_eq!(unanswered, 0, "every join is answered");
    assert!(bad_key >= 1, "keys were checked");
    assert!(busy >= 1, "the excess is refused busy, not queued");
    assert!(
        slowest_control < Duration::from_secs(1),
        "the control loop stalled for {slowest_control:?}"
    );

    // Right after the flood a right key gets in.
    join(cluster.node(3), cluster.node(0), KEY).await?;
    wait_for_mesh(&cluster, &[0, 1, 2, 3], "four alive members", SETTLE, |s| {
        s.online_members == 4 && s.health() == MeshHealth::Healthy
    })
    .await?;
    Ok(())
}

/// Whether the node closes `ws` within `limit` while the guest `node_id` keeps it alive with
/// heartbeats (else the member would end it after three silent intervals anyway).
fn closed_while_beating(ws: &mut Ws, node_id: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let beat = frame_bytes(node_id, FrameType::Heartbeat, &[]);
        if ws.send(Message::Binary(beat.into())).is_err() {
            return true;
        }
        // Up to the socket's read timeout (100 ms) per round.
        match ws.read() {
            Ok(Message::Close(_)) => return true,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[meshd_tests::test]
async fn an_outsider_gets_one_set_up_deadline_and_a_guest_link_no_data_sized_buffer()
-> anyhow::Result<()> {
    use meshd_shards::ownership::{PREAMBLE_LEN, encode_preamble};
    use std::io::{Read, Write};
    let _serial = exclusive().await;
    // handshake_timeout_ms: 5 s (the default), also a guest link's lifetime.
    let cluster = Cluster::start(vec![meshless(NodeSpec::listener(1))])?;
    cluster
        .node(0)
        .mesh()
        .await?
        .seed_mesh(SeedMeshRequest {
            name: "outsiders".into(),
            description: String::new(),
            join_policy: JoinPolicy::KeyRequired as i32,
            join_key: KEY.into(),
        })
        .await?;
    let entry = cluster.node(0).listen.context("listens")?;

    // 1. The preamble just before its stage's timeout, then nothing: the deadline does not
    //    start again for TLS (each stage had its own, so such a peer lived ~10 s).
    let stalled = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let accepted = Instant::now();
        let mut tcp = std::net::TcpStream::connect_timeout(&entry, Duration::from_secs(3))?;
        tcp.set_read_timeout(Some(Duration::from_secs(15)))?;
        std::thread::sleep(Duration::from_millis(4_500));
        tcp.write_all(&encode_preamble(4242))?;
        let mut theirs = [0u8; PREAMBLE_LEN];
        tcp.read_exact(&mut theirs)?;
        let mut rest = [0u8; 64];
        // Blocks until the node closes (0 or an error) or the read timeout.
        let _ = tcp.read(&mut rest);
        Ok(accepted.elapsed())
    })
    .await??;
    println!("a set-up stalled after its preamble lived {stalled:?}");
    assert!(
        stalled < Duration::from_millis(6_500),
        "a connection that never authenticated lived {stalled:?}, past the 5 s set-up deadline"
    );

    // 2. A guest (no credential: a joiner) sends a 1 MiB message: the member stops reading
    //    at the handshake's budget (64 KiB) and closes the link at once, instead of
    //    buffering it (with the data limit, 4 MiB per guest link).
    let closed = tokio::task::spawn_blocking(move || -> anyhow::Result<(bool, Duration)> {
        let mut ws = guest_link(entry, 4343)?;
        let sent = Instant::now();
        let _ = ws.send(Message::Binary(vec![0x5a; 1 << 20].into()));
        let closed = closed_while_beating(&mut ws, 4343, Duration::from_millis(2_500));
        Ok((closed, sent.elapsed()))
    })
    .await??;
    println!("the guest's 1 MiB message: link closed {closed:?}");
    assert!(
        closed.0,
        "the member kept a guest link that sent a 1 MiB message for 2.5 s (its lifetime is 5 s)"
    );

    // The member is fine and still alone in its mesh.
    let status = mesh_status(cluster.node(0)).await?;
    assert_eq!(status.online_members, 1, "{status:?}");
    Ok(())
}
