//! Client data streams across real processes: one-to-three across a relay and nodes behind
//! NAT, kill -9 of a target and of the source under load, a 64 MiB message in chunks, a slow
//! subscriber beside a fast one, and the rpc errors. A checker compares what the producer was
//! told, what subscribers received, and in which order.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_proto::link::{
    ClientDataAck, CloseClientDataStreamRequest, GetStreamGroupsRequest,
    OpenClientDataStreamRequest, PublishClientDataRequest, StreamGroupStream, StreamMessage,
    SubscribeClientDataRequest, mesh_data_service_client::MeshDataServiceClient,
    subscribe_client_data_request::Request as SubRequest,
};
use meshd_tests::{
    Cluster, NodeSpec, exclusive,
    streams_support::{
        SETTLE, Seen, TENANT, channel, check_exact, mesh_client, open, open_acked_on_source,
        publish_all, relay_chain, serving, subscriber, wait_complete,
    },
};
use prost::bytes::Bytes;
use tokio_stream::StreamExt;

/// Waits until every one of `nodes` sees, in the data stream group of `participants`, a
/// leader and `stream` as `want` accepts it (`None`: the group holds no such stream).
async fn wait_group(
    cluster: &Cluster,
    nodes: &[usize],
    participants: &[u64],
    stream: &Bytes,
    want: impl Fn(Option<&StreamGroupStream>) -> bool,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    for &i in nodes {
        loop {
            let groups = mesh_client(&cluster.node(i).api())
                .await?
                .get_stream_groups(GetStreamGroupsRequest {})
                .await?
                .into_inner()
                .groups;
            let group = groups.iter().find(|g| g.participants == participants);
            let held = group.and_then(|g| g.streams.iter().find(|s| s.stream_id == *stream));
            if group.is_some_and(|g| g.leader != 0) && want(held) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {}: the stream group of {participants:?} is not {what}: {groups:?}",
                    cluster.node(i).spec.node_id
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Node 1 streams to nodes 2, 3 and 4: 2 links to 1; 3 and 4 are behind NAT and reach 1 only
/// through 2. Under load, node 3 (a target behind NAT), node 1 (the source) and node 2 (a
/// target and the relay of the others) are killed with SIGKILL and restarted.
#[meshd_tests::test]
async fn a_stream_to_three_targets_survives_kill_9_of_a_target_the_source_and_the_relay()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        serving(NodeSpec::listener(1)),
        serving(NodeSpec::listener(2).dialing(vec![0])),
        serving(NodeSpec::behind_nat(3, vec![1])),
        serving(NodeSpec::behind_nat(4, vec![1])),
    ])?;
    cluster.node(0).wait_for_routes(&[2, 3, 4], SETTLE).await?;
    for i in 1..4 {
        cluster.node(i).wait_for_routes(&[1], SETTLE).await?;
    }
    let stream = open(cluster.node(0), &[2, 3, 4], 0).await?;
    let seen: Vec<Arc<Mutex<Seen>>> = (0..3).map(|_| Arc::default()).collect();
    let subs: Vec<_> = (0..3)
        .map(|i| {
            subscriber(
                cluster.node(i + 1).api(),
                256,
                Arc::clone(&seen[i]),
                Duration::ZERO,
            )
        })
        .collect();

    let total = 3000;
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let publisher = tokio::spawn(publish_all(
        cluster.node(0).api(),
        stream.clone(),
        (1, total),
        50,
        Arc::clone(&acked),
    ));
    let progress = |n: u64| {
        let seen = Arc::clone(&seen[2]);
        let stream = stream.clone();
        async move { wait_complete(&seen, &stream, n, Duration::from_secs(60), "node 4").await }
    };

    progress(500).await?;
    cluster.node_mut(2).kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.node_mut(2).start()?;
    println!("target node 3 killed and restarted at ~500 messages");

    progress(1500).await?;
    cluster.node_mut(0).kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.node_mut(0).start()?;
    let ready = Instant::now();
    let before = seen[2].lock().unwrap().messages[&stream].len() as u64;
    let resumed = progress(before + 1).await?;
    let resumed = ready.elapsed().min(resumed);
    println!(
        "source node 1 killed at {before} delivered; restarted: delivery resumed {resumed:?} after ready"
    );
    // The seeds ask for less than 5 s.
    assert!(
        resumed < Duration::from_secs(5),
        "resumed after {resumed:?}"
    );

    // Node 2 is a target and the relay of nodes 3 and 4.
    progress(2300).await?;
    cluster.node_mut(1).kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.node_mut(1).start()?;
    println!("relay and target node 2 killed and restarted at ~2300 messages");

    publisher.await??;
    for (i, seen) in seen.iter().enumerate() {
        let who = format!("node {}", i + 2);
        wait_complete(seen, &stream, total, Duration::from_secs(60), &who).await?;
    }
    // The data stream group of nodes 1-4, on every one of them, committed every target's
    // offset and a second producer epoch (the source restarted once).
    let participants = [1, 2, 3, 4];
    wait_group(
        &cluster,
        &[0, 1, 2, 3],
        &participants,
        &stream,
        |held| {
            held.is_some_and(|s| {
                s.source == 1
                    && s.targets == [2, 3, 4]
                    && s.producer_epoch == 2
                    && s.offsets.len() == 3
                    && s.offsets.iter().all(|o| o.processed == total)
            })
        },
        "holding every offset at the total and epoch 2",
    )
    .await?;
    // Closed, and once every target processed everything, forgotten by the source.
    let mut source = mesh_client(&cluster.node(0).api()).await?;
    let closed = source
        .close_client_data_stream(CloseClientDataStreamRequest {
            stream_id: stream.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(closed.last_seq, total);
    let deadline = Instant::now() + SETTLE;
    loop {
        let again = source
            .close_client_data_stream(CloseClientDataStreamRequest {
                stream_id: stream.clone(),
            })
            .await;
        match again {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => bail!("the closed stream was never forgotten: {other:?}"),
        }
    }
    // ... and by its group, on every participant.
    wait_group(
        &cluster,
        &[0, 1, 2, 3],
        &participants,
        &stream,
        |held| held.is_none(),
        "rid of the closed stream",
    )
    .await?;
    for s in subs {
        s.abort();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert_eq!(
        acked.len() as u64,
        total,
        "every seq acknowledged to the producer"
    );
    assert!(acked.values().all(|n| *n == 1), "no seq acknowledged twice");
    for (i, seen) in seen.iter().enumerate() {
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let who = format!("node {}", i + 2);
        check_exact(&seen, &stream, total, &who);
        println!(
            "{who}: {total} messages in order, {} redelivered after restarts, {} subscriptions",
            seen.redelivered, seen.subscriptions
        );
        if i < 2 {
            // Delivered but not yet recorded as processed when the node died: at most a window.
            assert!(seen.redelivered <= 256, "{who}: at most a window again");
        } else {
            // Never restarted: restarts elsewhere make no target see a message twice.
            assert_eq!(seen.redelivered, 0, "{who} redelivered");
        }
    }
    Ok(())
}

/// One 64 MiB message from node 1 to node 3, which is behind NAT and reached through node 2:
/// it travels as 1 MiB chunks (CRC32C per frame on every hop), is reassembled and checked
/// with BLAKE3 at node 3, and arrives whole, followed in order by a small message.
#[meshd_tests::test]
async fn a_64_mib_message_crosses_a_relay_in_chunks_and_arrives_whole() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = relay_chain(None).await?;
    let stream = open(cluster.node(0), &[3], 0).await?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sub = subscriber(cluster.node(2).api(), 2, Arc::clone(&seen), Duration::ZERO);

    let mut big = vec![0u8; 64 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let big = Bytes::from(big);
    let digest = blake3::hash(&big);
    let started = Instant::now();
    let mut client = mesh_client(&cluster.node(0).api()).await?;
    let answers = client
        .publish_client_data(tokio_stream::iter(vec![
            PublishClientDataRequest {
                stream_id: stream.clone(),
                messages: vec![StreamMessage {
                    payload: big.clone(),
                }],
                first_seq: 1,
            },
            PublishClientDataRequest {
                stream_id: stream.clone(),
                messages: vec![StreamMessage {
                    payload: Bytes::from_static(b"after the big one"),
                }],
                first_seq: 2,
            },
        ]))
        .await?
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    for answer in &answers {
        let answer = answer.as_ref().map_err(Clone::clone)?;
        assert_eq!(answer.code, 0, "{}", answer.error);
    }
    let acked = started.elapsed();
    let took = wait_complete(&seen, &stream, 2, Duration::from_secs(60), "node 3").await?;
    sub.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let messages = &seen.messages[&stream];
    assert_eq!(
        blake3::hash(&messages[&1]),
        digest,
        "the 64 MiB message arrived intact"
    );
    assert_eq!(messages[&2], Bytes::from_static(b"after the big one"));
    assert!(seen.out_of_order.is_empty());
    println!(
        "64 MiB over two hops in 1 MiB chunks: durable on the target in {acked:?}, delivered {:?} later",
        took
    );
    Ok(())
}

/// Node 1 streams to node 2, whose subscriber takes 20 ms per message with a window of 4,
/// and to node 3, whose subscriber is fast. The slow stream holds back only itself.
#[meshd_tests::test]
async fn a_slow_subscriber_slows_only_its_own_stream() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        serving(NodeSpec::listener(1)),
        serving(NodeSpec::listener(2).dialing(vec![0])),
        serving(NodeSpec::listener(3).dialing(vec![0])),
    ])?;
    cluster.node(0).wait_for_routes(&[2, 3], SETTLE).await?;
    let slow_stream = open(cluster.node(0), &[2], 0).await?;
    let fast_stream = open(cluster.node(0), &[3], 0).await?;
    let slow_seen: Arc<Mutex<Seen>> = Arc::default();
    let fast_seen: Arc<Mutex<Seen>> = Arc::default();
    let slow = subscriber(
        cluster.node(1).api(),
        4,
        Arc::clone(&slow_seen),
        Duration::from_millis(20),
    );
    let fast = subscriber(
        cluster.node(2).api(),
        1024,
        Arc::clone(&fast_seen),
        Duration::ZERO,
    );
    let total = 20_000;
    let slow_publisher = tokio::spawn(publish_all(
        cluster.node(0).api(),
        slow_stream.clone(),
        (1, total),
        100,
        Arc::default(),
    ));
    let started = Instant::now();
    publish_all(
        cluster.node(0).api(),
        fast_stream.clone(),
        (1, total),
        100,
        Arc::default(),
    )
    .await?;
    let took = wait_complete(
        &fast_seen,
        &fast_stream,
        total,
        Duration::from_secs(60),
        "node 3",
    )
    .await?;
    let fast_took = started.elapsed().max(took);
    let slow_had = slow_seen
        .lock()
        .unwrap()
        .messages
        .get(&slow_stream)
        .map_or(0, BTreeMap::len);
    slow_publisher.abort();
    slow.abort();
    fast.abort();
    println!(
        "fast stream: {total} messages in {fast_took:?} ({:.0} msgs/s) while the slow one delivered {slow_had}",
        total as f64 / fast_took.as_secs_f64()
    );
    check_exact(
        &std::mem::take(&mut *fast_seen.lock().unwrap()),
        &fast_stream,
        total,
        "node 3",
    );
    // The slow subscriber processes at most 50 messages a second.
    assert!(
        (slow_had as f64) < 60.0 * fast_took.as_secs_f64() + 10.0,
        "the slow subscriber got {slow_had}"
    );
    assert!(slow_had > 0, "the slow stream moves too");
    Ok(())
}

/// A partition between the source and its target (the only link on the path dropped, and
/// not re-dialed), publishes acknowledged by the source alone meanwhile, then the heal; then a
/// silent one (the relay frozen with SIGSTOP, so its links go quiet without closing) and its
/// thaw: everything arrives once, in order.
#[meshd_tests::test]
async fn a_partition_and_heal_lose_and_repeat_nothing() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = relay_chain(None).await?;
    let stream = open_acked_on_source(cluster.node(0), &[3]).await?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sub = subscriber(
        cluster.node(2).api(),
        256,
        Arc::clone(&seen),
        Duration::ZERO,
    );
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    publish_all(
        cluster.node(0).api(),
        stream.clone(),
        (1, 500),
        50,
        Arc::clone(&acked),
    )
    .await?;
    wait_complete(&seen, &stream, 500, SETTLE, "node 3").await?;

    // Split: node 2 drops its link to node 1 (the only way between 1 and 3).
    cluster
        .node(1)
        .mesh()
        .await?
        .drop_link(meshd_proto::link::DropLinkRequest { peer_node_id: 1 })
        .await?;
    publish_all(
        cluster.node(0).api(),
        stream.clone(),
        (501, 2000),
        50,
        Arc::clone(&acked),
    )
    .await?;
    let during = seen.lock().unwrap().messages[&stream].len();
    println!("partition: 1500 more published (acknowledged by the source), {during} delivered");

    // Heal: node 2 dials node 1 again.
    let healed = Instant::now();
    cluster
        .node(1)
        .mesh()
        .await?
        .add_link(meshd_proto::link::AddLinkRequest {
            addr: cluster
                .node(0)
                .listen
                .context("node 1 listens")?
                .to_string(),
            ..Default::default()
        })
        .await?;
    let took = wait_complete(&seen, &stream, 2000, Duration::from_secs(60), "node 3").await?;
    println!(
        "healed: the rest delivered {:?} after the link came back",
        took.min(healed.elapsed())
    );

    // A silent partition: the relay freezes (its links carry nothing, nothing is closed) while
    // 1000 more are published; both sides time it out, then it thaws.
    cluster.node(1).signal(libc::SIGSTOP);
    publish_all(
        cluster.node(0).api(),
        stream.clone(),
        (2001, 3000),
        50,
        Arc::clone(&acked),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = seen.lock().unwrap().messages[&stream].len();
    cluster.node(1).signal(libc::SIGCONT);
    let took = wait_complete(&seen, &stream, 3000, Duration::from_secs(60), "node 3").await?;
    println!("relay frozen with {during} delivered; after it thawed, the rest came in {took:?}");
    sub.abort();
    check_exact(
        &std::mem::take(&mut *seen.lock().unwrap()),
        &stream,
        3000,
        "node 3",
    );
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert_eq!(acked.len(), 3000);
    assert!(acked.values().all(|n| *n == 1));
    Ok(())
}

/// Every stream rpc refuses bad arguments with a clear status.
#[meshd_tests::test]
async fn stream_rpcs_refuse_bad_arguments_clearly() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut first = serving(NodeSpec::listener(1));
    first
        .extra
        .push_str("[streams]\nmax_message_bytes = 100000\n");
    let cluster = Cluster::start(vec![
        first,
        // Node 2 does not serve the tenant: it refuses streams of it.
        NodeSpec::listener(2).dialing(vec![0]),
    ])?;
    cluster.node(0).wait_for_routes(&[2], SETTLE).await?;
    let mut client = mesh_client(&cluster.node(0).api()).await?;
    let open_with = |tenant: &str, targets: Vec<u64>, quorum: u32| OpenClientDataStreamRequest {
        tenant: tenant.into(),
        targets,
        quorum,
        ack_on_source: false,
        priority: 0,
    };
    let too_high = OpenClientDataStreamRequest {
        priority: 8,
        ..open_with(TENANT, vec![2], 0)
    };
    for (request, code, why) in [
        (too_high, tonic::Code::InvalidArgument, "priority over 7"),
        (
            open_with(TENANT, vec![], 0),
            tonic::Code::InvalidArgument,
            "no targets",
        ),
        (
            open_with(TENANT, vec![1], 0),
            tonic::Code::InvalidArgument,
            "itself",
        ),
        (
            open_with(TENANT, vec![2, 2], 0),
            tonic::Code::InvalidArgument,
            "twice",
        ),
        (
            open_with(TENANT, vec![2], 2),
            tonic::Code::InvalidArgument,
            "quorum",
        ),
        (
            open_with(TENANT, vec![99], 0),
            tonic::Code::NotFound,
            "unknown node",
        ),
        (
            open_with("other", vec![2], 0),
            tonic::Code::FailedPrecondition,
            "tenant without a key",
        ),
        (
            open_with("", vec![2], 0),
            tonic::Code::InvalidArgument,
            "empty tenant",
        ),
    ] {
        let status = client
            .open_client_data_stream(request)
            .await
            .expect_err(why);
        assert_eq!(status.code(), code, "{why}: {}", status.message());
        println!("open, {why}: {:?} {}", status.code(), status.message());
    }
    let handle = client
        .open_client_data_stream(OpenClientDataStreamRequest {
            priority: 7,
            ..open_with(TENANT, vec![2], 0)
        })
        .await?
        .into_inner();
    assert_eq!(handle.priority, 7, "the handle carries the priority");
    let status = client
        .close_client_data_stream(CloseClientDataStreamRequest {
            stream_id: Bytes::from_static(&[7; 16]),
        })
        .await
        .expect_err("unknown stream");
    assert_eq!(status.code(), tonic::Code::NotFound);

    let refused = open(cluster.node(0), &[2], 0).await?;
    let batch = |stream: &Bytes, payload: Bytes| PublishClientDataRequest {
        stream_id: stream.clone(),
        messages: vec![StreamMessage { payload }],
        first_seq: 0,
    };
    let answers: Vec<_> = client
        .publish_client_data(tokio_stream::iter(vec![
            batch(&Bytes::from_static(&[1; 16]), Bytes::from_static(b"x")),
            batch(&Bytes::from_static(&[1; 3]), Bytes::from_static(b"x")),
            batch(&refused, Bytes::from(vec![0u8; 100_001])),
            batch(&refused, Bytes::new()),
        ]))
        .await?
        .into_inner()
        .collect::<Result<_, _>>()
        .await?;
    let codes: Vec<i32> = answers.iter().map(|a| a.code).collect();
    assert_eq!(
        codes,
        vec![
            tonic::Code::NotFound as i32,
            tonic::Code::InvalidArgument as i32,
            tonic::Code::InvalidArgument as i32,
            tonic::Code::InvalidArgument as i32,
        ],
        "{answers:?}"
    );
    // Node 2 refuses the tenant's stream: a publish says so once the refusal is back.
    let deadline = Instant::now() + SETTLE;
    loop {
        let answer = client
            .publish_client_data(tokio_stream::iter(vec![batch(
                &refused,
                Bytes::from_static(b"to a node without the key"),
            )]))
            .await?
            .into_inner()
            .next()
            .await
            .context("an answer")??;
        if answer.code == tonic::Code::FailedPrecondition as i32 {
            assert!(answer.error.contains("refused"), "{}", answer.error);
            println!("publish to a target without the tenant: {}", answer.error);
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never refused: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut data = MeshDataServiceClient::new(channel(&cluster.node(0).api()).await?);
    let status = data
        .subscribe_client_data(tokio_stream::iter(vec![SubscribeClientDataRequest {
            request: Some(SubRequest::Ack(ClientDataAck {
                stream_id: refused.clone(),
                seq: 1,
            })),
        }]))
        .await
        .expect_err("no selection first");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    Ok(())
}
