//! Links between real `meshd` processes over real sockets: traffic both ways, session figures,
//! failure detection, reconnects, and refused handshakes.

use std::time::{Duration, Instant};

use meshd_proto::{
    link::RefuseReason,
    mesh::{
        Ack, AddSessionRequest, DatabaseSyncRequest, DropSessionRequest, Header, MessageStatus,
        SendMode, SendRequest,
    },
};
use meshd_shards::credential::MeshAuthority;
use meshd_tests::{
    Cluster, NodeSpec, exclusive,
    rogue::{self, RogueOptions, RogueOutcome},
};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(10);

/// Node 1 and 2 listen (2 dials 1); node 3 is behind NAT and dials both.
fn triangle() -> anyhow::Result<Cluster> {
    Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::behind_nat(3, vec![0, 1]),
    ])
}

fn send(dst: u64, corr_id: u64, mode: SendMode, require_ack: bool, payload: &[u8]) -> SendRequest {
    SendRequest {
        dst_node: dst,
        headers: vec![
            Header {
                key: "message_type".into(),
                value: b"db_update".to_vec().into(),
            },
            Header {
                key: "binary".into(),
                value: vec![0u8, 255, 7].into(),
            },
        ],
        payload: payload.to_vec().into(),
        end_to_end_encrypt: false,
        partition: 1,
        qos_class: 2,
        corr_id,
        require_ack,
        mode: mode as i32,
        timeout_seconds: 5,
    }
}

#[meshd_tests::test]
async fn messages_flow_both_ways_between_linked_nodes_with_payload_headers_and_corr_id_intact()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = triangle()?;
    let (n1, n3) = (cluster.node(0), cluster.node(2));
    n1.wait_for_peers(&[2, 3], SETTLE).await?;
    n3.wait_for_peers(&[1, 2], SETTLE).await?;

    let mut inbox3 = n3.inbox().await?;
    let mut inbox1 = n1.inbox().await?;

    // 1 → 3 travels over a link that node 3 (behind NAT) dialed.
    let reply = n1
        .data()
        .await?
        .send(send(
            3,
            4242,
            SendMode::WaitForDelivery,
            false,
            b"hello nat",
        ))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
    let got = tokio::time::timeout(SETTLE, inbox3.next())
        .await?
        .expect("stream open")?;
    assert_eq!((got.src_node, got.dst_node, got.corr_id), (1, 3, 4242));
    assert_eq!(&got.payload[..], b"hello nat");
    assert_eq!(got.msg_id, reply.msg_id);
    assert_eq!(got.headers.len(), 2);
    assert_eq!(got.headers[0].key, "message_type");
    assert_eq!(&got.headers[1].value[..], &[0u8, 255, 7]);

    // 3 → 1, waiting for the application's ack, as core does for unicasts.
    let mut client3 = n3.data().await?;
    let sender = tokio::spawn(async move {
        client3
            .send(send(1, 7, SendMode::WaitForAck, true, &[9u8; 3000]))
            .await
            .map(tonic::Response::into_inner)
    });
    let got = tokio::time::timeout(SETTLE, inbox1.next())
        .await?
        .expect("stream open")?;
    assert_eq!((got.src_node, got.corr_id, got.require_ack), (3, 7, true));
    assert_eq!(got.payload.len(), 3000);
    n1.data()
        .await?
        .ack_message(Ack {
            src_node: got.src_node,
            msg_id: got.msg_id,
            success: true,
            message: "handled".into(),
        })
        .await?;
    let reply = sender.await??;
    assert_eq!(reply.status(), MessageStatus::AckSuccess, "{reply:?}");
    assert_eq!(reply.status_message, "handled");

    // A failed handler is reported as such.
    let mut client1 = n1.data().await?;
    let sender = tokio::spawn(async move {
        client1
            .send(send(3, 8, SendMode::WaitForAck, true, b"x"))
            .await
            .map(tonic::Response::into_inner)
    });
    let got = tokio::time::timeout(SETTLE, inbox3.next())
        .await?
        .expect("stream open")?;
    n3.data()
        .await?
        .ack_message(Ack {
            src_node: got.src_node,
            msg_id: got.msg_id,
            success: false,
            message: "handler failed".into(),
        })
        .await?;
    assert_eq!(sender.await??.status(), MessageStatus::AckFailure);
    Ok(())
}

#[meshd_tests::test]
async fn send_statuses_tell_unknown_unreachable_and_unsubscribed_destinations_apart()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = triangle()?;
    cluster.node(0).wait_for_peers(&[2, 3], SETTLE).await?;
    let mut data1 = cluster.node(0).data().await?;

    let reply = data1
        .send(send(999, 1, SendMode::WaitForDelivery, false, b"?"))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Undeliverable, "{reply:?}");

    // Nobody subscribes on node 2.
    let reply = data1
        .send(send(2, 1, SendMode::WaitForDelivery, false, b"?"))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::PendingClient, "{reply:?}");

    // Fire-and-forget returns at once; its final status is visible to a later waiting send.
    let reply = data1
        .send(send(2, 1, SendMode::FireAndForget, true, b"?"))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Queued);
    assert!(reply.require_ack);

    cluster.node_mut(1).kill();
    cluster.node(0).wait_for_peers(&[3], SETTLE).await?;
    // Once no route to node 2 is left anywhere, no copy can leave node 1: PENDING_NODE. (While
    // routes still point through node 3, a copy leaves and the answer is "outcome unknown".)
    let mut control1 = cluster.node(0).control().await?;
    let deadline = Instant::now() + SETTLE;
    while control1
        .get_routing_table(meshd_proto::mesh::GetRoutingTableRequest {})
        .await?
        .into_inner()
        .routes
        .iter()
        .any(|r| r.dst_node == 2)
    {
        anyhow::ensure!(Instant::now() < deadline, "route to 2 never withdrawn");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = data1
        .send(send(2, 1, SendMode::WaitForDelivery, false, b"?"))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::PendingNode, "{reply:?}");

    // Bad arguments are refused with a reason.
    let error = data1
        .send(SendRequest {
            mode: 9,
            ..send(3, 1, SendMode::FireAndForget, false, b"")
        })
        .await;
    assert_eq!(error.unwrap_err().code(), tonic::Code::InvalidArgument);
    let error = data1
        .send(send(
            3,
            1,
            SendMode::FireAndForget,
            false,
            &vec![0u8; 5 << 20],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.code(),
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{error:?}"
    );
    let error = data1.ack_message(Ack::default()).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    // A sync names its table.
    let error = data1
        .request_database_sync(DatabaseSyncRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    Ok(())
}

#[meshd_tests::test]
async fn session_figures_move_with_traffic_and_heartbeats() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = triangle()?;
    let n1 = cluster.node(0);
    let before = n1.wait_for_peers(&[2, 3], SETTLE).await?;
    let mut inbox = cluster.node(1).inbox().await?;
    let mut data = n1.data().await?;
    for i in 0..50 {
        data.send(send(2, i, SendMode::FireAndForget, false, &[1u8; 1000]))
            .await?;
    }
    for _ in 0..50 {
        tokio::time::timeout(SETTLE, inbox.next())
            .await?
            .expect("stream open")?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = n1.sessions().await?;
    let find = |list: &[meshd_proto::mesh::SessionInfo], peer| {
        list.iter()
            .find(|s| s.peer_node_id == peer)
            .cloned()
            .unwrap()
    };
    let (b, a) = (find(&before, 2), find(&after, 2));
    println!("session 1→2 after 50 messages: {a:?}");
    assert!(a.bytes_sent >= b.bytes_sent + 50_000, "{b:?} → {a:?}");
    assert!(a.frames_sent >= b.frames_sent + 50);
    assert!(
        a.frames_received > b.frames_received,
        "heartbeat acks and reports arrive"
    );
    assert!(a.rtt_microseconds > 0, "RTT is measured on heartbeats");
    assert!(a.is_tls);
    assert!(!a.remote_addr.is_empty());
    Ok(())
}

#[meshd_tests::test]
async fn a_killed_node_is_seen_down_within_500_ms_and_relinks_when_it_restarts()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = triangle()?;
    cluster.node(0).wait_for_peers(&[2, 3], SETTLE).await?;
    cluster.node(2).wait_for_peers(&[1, 2], SETTLE).await?;

    // kill -9 of a listener: the kernel closes its sockets, peers see it at once.
    let killed_at = Instant::now();
    cluster.node_mut(1).kill();
    cluster
        .node(0)
        .wait_for_peers(&[3], Duration::from_millis(500))
        .await?;
    cluster
        .node(2)
        .wait_for_peers(&[1], Duration::from_millis(500))
        .await?;
    println!(
        "kill -9 of node 2 seen by nodes 1 and 3 after {:?}",
        killed_at.elapsed()
    );

    let restarted_at = Instant::now();
    cluster.node_mut(1).start()?;
    cluster.node(0).wait_for_peers(&[2, 3], SETTLE).await?;
    cluster.node(2).wait_for_peers(&[1, 2], SETTLE).await?;
    println!(
        "node 2 relinked with both peers {:?} after its restart",
        restarted_at.elapsed()
    );

    // kill -9 of the NAT node: it dials again when it comes back.
    cluster.node_mut(2).kill();
    cluster
        .node(0)
        .wait_for_peers(&[2], Duration::from_millis(500))
        .await?;
    cluster.node_mut(2).start()?;
    cluster.node(0).wait_for_peers(&[2, 3], SETTLE).await?;
    Ok(())
}

#[meshd_tests::test]
async fn a_frozen_peer_is_declared_down_by_missed_heartbeats_and_relinks_when_it_thaws()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = triangle()?;
    cluster.node(0).wait_for_peers(&[2, 3], SETTLE).await?;
    // SIGSTOP keeps the sockets open: only the heartbeats can tell.
    let frozen_at = Instant::now();
    cluster.node(1).signal(libc::SIGSTOP);
    let result = cluster
        .node(0)
        .wait_for_peers(&[3], Duration::from_millis(500))
        .await;
    let seen_after = frozen_at.elapsed();
    cluster.node(1).signal(libc::SIGCONT);
    result?;
    println!("frozen node 2 declared down after {seen_after:?} (3 missed 100 ms heartbeats)");
    assert!(
        seen_after >= Duration::from_millis(250),
        "down before heartbeats could be missed"
    );
    cluster.node(0).wait_for_peers(&[2, 3], SETTLE).await?;
    Ok(())
}

#[meshd_tests::test]
async fn handshakes_without_the_mesh_credential_or_with_a_wrong_mesh_a_bad_signature_or_an_old_version_are_refused()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![NodeSpec::listener(1), NodeSpec::listener(2)])?;
    let node = cluster.node(0);
    let addr = node.listen.expect("listens");
    let secret = cluster.mesh_secret();

    let outcome = tokio::task::spawn_blocking(move || {
        rogue::handshake(addr, &RogueOptions::member(50, "default", secret))
    })
    .await??;
    assert_eq!(
        outcome,
        RogueOutcome::Accepted,
        "the rogue client itself speaks the protocol, and holds the mesh secret here"
    );

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let elsewhere = MeshAuthority::from_secret(&[0x5a; 32]);
    let stranger_key = [9u8; 32];
    let cases = [
        // The right mesh id is no longer enough: this used to be accepted.
        (
            RogueOptions::honest(55, "default"),
            RefuseReason::RefuseNoCredential,
        ),
        // A certificate from another authority (a mesh of the same name elsewhere).
        (
            RogueOptions {
                certificate: Some(elsewhere.issue("default", 56, stranger_key, now_ms)),
                ..RogueOptions::honest(56, "default")
            },
            RefuseReason::RefuseNoCredential,
        ),
        // Node 2's id with a genuine certificate of node 2 (as if captured): the rogue does
        // not hold the key it certifies.
        (
            RogueOptions {
                certificate: Some(MeshAuthority::from_secret(&secret).issue(
                    "default",
                    2,
                    stranger_key,
                    now_ms,
                )),
                ..RogueOptions::honest(2, "default")
            },
            RefuseReason::RefuseNoCredential,
        ),
        // Another mesh id, without and with a certificate of this mesh's authority (for the
        // other mesh id): refused like a missing credential, so guessing mesh ids tells a
        // stranger nothing.
        (
            RogueOptions::honest(51, "another-mesh"),
            RefuseReason::RefuseNoCredential,
        ),
        (
            RogueOptions::member(57, "another-mesh", secret),
            RefuseReason::RefuseNoCredential,
        ),
        (
            RogueOptions {
                bad_signature: true,
                ..RogueOptions::member(52, "default", secret)
            },
            RefuseReason::RefuseBadSignature,
        ),
        (
            RogueOptions {
                protocol_version: 0,
                ..RogueOptions::honest(53, "default")
            },
            RefuseReason::RefuseVersion,
        ),
        (
            RogueOptions {
                frame_version: 2,
                ..RogueOptions::honest(54, "default")
            },
            RefuseReason::RefuseVersion,
        ),
        (RogueOptions::honest(1, "default"), RefuseReason::RefuseSelf),
    ];
    for (options, expected) in cases {
        let sent = options.clone();
        let outcome = tokio::task::spawn_blocking(move || rogue::handshake(addr, &sent)).await??;
        match outcome {
            RogueOutcome::Refused(reason, detail) => {
                println!("{:?} refused: {reason:?}: {detail}", sent_summary(&options));
                assert_eq!(reason, expected, "{detail}");
            }
            other => panic!("{options:?}: {other:?}"),
        }
    }
    // Not meshd at all: the connection is closed.
    let closed =
        tokio::task::spawn_blocking(move || rogue::send_garbage(addr, b"GET / HTTP/1.1\r\n\r\n"))
            .await??;
    assert!(closed);

    // The node logged each refusal and still serves its api.
    let log = node.log();
    assert!(
        log.contains("RefuseBadSignature") && log.contains("RefuseNoCredential"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    node.sessions().await?;
    Ok(())
}

fn sent_summary(options: &RogueOptions) -> String {
    format!(
        "rogue node {} (mesh {:?}, protocol {}, frames v{}, bad signature {})",
        options.node_id,
        options.mesh_id,
        options.protocol_version,
        options.frame_version,
        options.bad_signature
    )
}

#[meshd_tests::test]
async fn add_session_dials_and_returns_the_peer_and_drop_session_ends_it_for_good()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![NodeSpec::listener(1), NodeSpec::behind_nat(4, vec![])])?;
    let (n1, n4) = (cluster.node(0), cluster.node(1));
    let mut control = n4.control().await?;

    let reply = control
        .add_session(AddSessionRequest {
            addr: n1.listen.expect("listens").to_string(),
            timeout_seconds: 5,
        })
        .await?
        .into_inner();
    assert!(reply.success, "{reply:?}");
    assert_eq!(reply.peer_node_id, 1);
    n1.wait_for_peers(&[4], SETTLE).await?;

    let reply = control
        .drop_session(DropSessionRequest { peer_node_id: 1 })
        .await?
        .into_inner();
    assert!(reply.success, "{reply:?}");
    n4.wait_for_peers(&[], SETTLE).await?;
    n1.wait_for_peers(&[], SETTLE).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        n4.sessions().await?.is_empty(),
        "a dropped session is not re-dialed"
    );

    let reply = control
        .drop_session(DropSessionRequest { peer_node_id: 1 })
        .await?
        .into_inner();
    assert_eq!(
        (reply.success, reply.error_code.as_str()),
        (false, "SESSION_NOT_FOUND")
    );

    // Nothing listens there.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let reply = control
        .add_session(AddSessionRequest {
            addr: closed_port.to_string(),
            timeout_seconds: 5,
        })
        .await?
        .into_inner();
    assert_eq!(
        (reply.success, reply.error_code.as_str()),
        (false, "CONNECTION_FAILED"),
        "{reply:?}"
    );

    let error = control
        .add_session(AddSessionRequest {
            addr: "not an address".into(),
            timeout_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    Ok(())
}

#[meshd_tests::test]
async fn two_nodes_dialing_each_other_keep_exactly_one_link() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
    ])?;
    // Node 1 now also dials node 2: restart it with node 2 in its peers.
    let n2_addr = cluster.node(1).listen.expect("listens");
    cluster.node_mut(0).stop();
    cluster.node_mut(0).spec.dials = vec![];
    cluster.node_mut(0).set_peers(vec![n2_addr]);
    cluster.node_mut(0).start()?;
    for _ in 0..3 {
        let sessions = cluster.node(0).wait_for_peers(&[2], SETTLE).await?;
        assert_eq!(sessions.len(), 1);
        let sessions = cluster.node(1).wait_for_peers(&[1], SETTLE).await?;
        assert_eq!(sessions.len(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And the one link carries traffic.
    let mut inbox = cluster.node(1).inbox().await?;
    let reply = cluster
        .node(0)
        .data()
        .await?
        .send(send(2, 1, SendMode::WaitForDelivery, false, b"one link"))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered);
    tokio::time::timeout(SETTLE, inbox.next())
        .await?
        .expect("stream open")?;
    Ok(())
}

#[test]
fn a_bad_config_is_refused_at_start_with_the_key_and_a_fix() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[network]\nheartbeat_ms = 1\n",
            dir.path().join("d").display()
        ),
    )?;
    let output = std::process::Command::new(meshd_tests::meshd_binary()?)
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("network.heartbeat_ms") && stderr.contains("fix:"),
        "{stderr}"
    );

    // An environment override is validated the same way.
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n", dir.path().join("d").display()),
    )?;
    let output = std::process::Command::new(meshd_tests::meshd_binary()?)
        .args(["run", "--config"])
        .arg(&config)
        .env("MESHD_RUNTIME__SHARDS", "lots")
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("runtime.shards"), "{stderr}");
    Ok(())
}

/// Admission across real processes: a `meshd` configured with the right mesh id but another
/// secret dials a member and is refused every time; a node with the secret links at once; a
/// node with no secret at all does not start.
#[meshd_tests::test]
async fn a_node_without_the_mesh_secret_cannot_link_whatever_mesh_id_it_claims()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let other_secret = meshd_shards::credential::format_secret(&[0x42; 32]);
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2)
            .dialing(vec![0])
            .with_env("MESHD_MESH_SECRET", &other_secret),
    ])?;
    let outsider_dials = Instant::now();
    cluster.add(NodeSpec::listener(3).dialing(vec![0, 1]))?;
    cluster.node(0).wait_for_peers(&[3], SETTLE).await?;
    let member_linked = outsider_dials.elapsed();
    // Give the outsider many re-dials (backoff 50 ms .. 1 s) in both directions.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, node) in [(0, 1), (2, 3)] {
        let peers: Vec<u64> = cluster
            .node(i)
            .sessions()
            .await?
            .iter()
            .map(|s| s.peer_node_id)
            .collect();
        assert!(
            !peers.contains(&2),
            "node {node} linked the outsider: {peers:?}"
        );
    }
    let outsider: Vec<u64> = cluster
        .node(1)
        .sessions()
        .await?
        .iter()
        .map(|s| s.peer_node_id)
        .collect();
    assert!(outsider.is_empty(), "the outsider has links: {outsider:?}");
    let log = cluster.node(0).log();
    let refusals = log.matches("RefuseNoCredential").count();
    println!(
        "member 3 linked in {} ms; node 1 refused the outsider {refusals} times in 3 s",
        member_linked.as_millis()
    );
    assert!(refusals >= 2, "{}", cluster.log_tails(0, 20));
    // The refusal the outsider got names nothing of the member's.
    let outsider_log = cluster.node(1).log();
    assert!(outsider_log.contains("no certificate") || outsider_log.contains("certificate"));

    // No secret at all: the node does not start, and says what to do.
    let mut without = NodeSpec::listener(4).with_env("MESHD_MESH_SECRET", "");
    without.extra = "mesh_id = \"default\"".into();
    match cluster.add(without) {
        Ok(_) => panic!("a node with a mesh id and no secret started"),
        Err(e) => {
            let message = format!("{e:#}");
            println!("a node without a secret: {message}");
            assert!(message.contains("no mesh secret"), "{message}");
        }
    }
    Ok(())
}

/// A log file reads as plain text (no colour codes when stderr is not a terminal), and
/// `[log] format = "json"` (here through the environment) writes one JSON object per line that
/// a shipper can parse: level, target, thread and the event's fields.
#[meshd_tests::test]
async fn logs_are_plain_text_in_a_file_and_one_json_object_per_line_when_asked()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2)
            .dialing(vec![0])
            .with_env("MESHD_LOG__FORMAT", "json"),
    ])?;
    cluster
        .node(0)
        .wait_for_peers(&[2], Duration::from_secs(10))
        .await?;
    cluster
        .node(1)
        .wait_for_peers(&[1], Duration::from_secs(10))
        .await?;
    assert!(cluster.node_mut(1).stop(), "node 2 stops cleanly");

    let text = cluster.node(0).log();
    assert!(text.lines().count() > 5, "node 1 logged: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "node 1's log file holds escape codes:\n{text}"
    );

    let json = cluster.node(1).log();
    let mut levels = std::collections::BTreeSet::new();
    for line in json.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("not one JSON object per line ({e}): {line}"))?;
        for key in ["timestamp", "level", "target", "fields", "threadName"] {
            assert!(event.get(key).is_some(), "no {key} in {line}");
        }
        levels.insert(event["level"].as_str().unwrap_or_default().to_owned());
    }
    assert!(json.lines().count() > 5, "node 2 logged: {json}");
    assert!(levels.contains("INFO"), "levels {levels:?}");
    Ok(())
}

/// The deadline every test here runs under (`#[meshd_tests::test]`): a test wedged on a frozen
/// node fails at its limit with the node's log tail in its message, and the node is killed (not
/// left to a 10 s clean stop that a frozen process never finishes).
#[meshd_tests::test]
async fn a_test_past_its_limit_fails_with_its_nodes_log_tails_and_kills_them() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    const LIMIT: Duration = Duration::from_secs(4);
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let started = Instant::now();
    let wedged = tokio::spawn(meshd_tests::deadline::run("wedged", LIMIT, async move {
        let cluster = Cluster::start(vec![NodeSpec::listener(1)])?;
        let _ = pid_tx.send(cluster.node(0).pid());
        cluster.node(0).signal(libc::SIGSTOP);
        // Frozen: the call gets no answer (its own timeout is far past the limit).
        let _ = cluster.node(0).sessions().await;
        anyhow::Ok(())
    }));
    let panic = wedged
        .await
        .expect_err("a test past its limit fails")
        .into_panic();
    let elapsed = started.elapsed();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("test `wedged` exceeded its overall limit of 4s"),
        "{message}"
    );
    assert!(message.contains("--- node 1 ("), "{message}");
    assert!(message.contains("INFO"), "no log lines in {message}");
    let pid = pid_rx.await?.expect("the node ran");
    // SAFETY: signal 0 only asks whether the process exists.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "the frozen node {pid} was left running");
    assert!(
        elapsed < LIMIT + Duration::from_secs(8),
        "failing took {elapsed:?}"
    );
    Ok(())
}
