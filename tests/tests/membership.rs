//! SWIM membership between real `meshd` processes: every node learns every member through
//! gossip (multi-hop where there is no direct link), a killed node is declared dead everywhere
//! and the mesh DEGRADED, a restart recovers it, three of five down is CRITICAL.
//!
//! ```text
//!  1 ── 2 ── 3          4 (NAT) dials 1; 5 (NAT) dials 3 and 2: 4 and 5 are three hops apart.
//!  │     \   │
//!  4       ─ 5
//! ```

use std::time::{Duration, Instant};

use meshd_proto::{
    link::{MemberState, MeshEventKind, MeshHealth, WatchMeshEventsRequest},
    mesh::{GetConsensusStateRequest, MeshEventType, MeshStateEvent, TriggerConsensusCheckRequest},
};
use meshd_tests::{Cluster, NodeSpec, exclusive, member_state, mesh_status, wait_for_mesh};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(20);

fn five_nodes() -> anyhow::Result<Cluster> {
    let mut first = NodeSpec::listener(1);
    // The control group's first voter (the others join it as they are seen).
    first.extra = "[consensus]\nbootstrap = true\n".into();
    Cluster::start(vec![
        first,
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::listener(3).dialing(vec![1]),
        NodeSpec::behind_nat(4, vec![0]),
        NodeSpec::behind_nat(5, vec![2, 1]),
    ])
}

#[meshd_tests::test]
async fn members_learn_each_other_detect_a_crash_recover_a_restart_and_go_critical()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = five_nodes()?;
    let everyone = [0, 1, 2, 3, 4];
    let took = wait_for_mesh(&cluster, &everyone, "five alive members", SETTLE, |s| {
        s.total_members == 5 && s.online_members == 5 && s.health() == MeshHealth::Healthy
    })
    .await?;
    println!("5 processes: every node sees 5 alive members after {took:?}");
    let view = mesh_status(cluster.node(3)).await?;
    let five = view
        .members
        .iter()
        .find(|m| m.node_id == 5)
        .expect("4 knows 5");
    assert!(
        !five.linked,
        "4 and 5 have no direct link: membership came over the overlay"
    );
    assert!(
        five.capabilities.contains(&"relay".to_owned()) && five.name == "node-5",
        "{five:?}"
    );
    assert!(
        view.members
            .iter()
            .any(|m| m.node_id == 1 && m.capabilities.contains(&"listener".to_owned()))
    );

    let mut events = cluster
        .node(0)
        .mesh()
        .await?
        .watch_mesh_events(WatchMeshEventsRequest { node_ids: vec![3] })
        .await?
        .into_inner();

    // kill -9 of node 3: the others declare it dead and the mesh DEGRADED.
    cluster.node_mut(2).kill();
    let killed = Instant::now();
    let others = [0, 1, 3, 4];
    wait_for_mesh(
        &cluster,
        &others,
        "node 3 dead, mesh degraded",
        SETTLE,
        |s| member_state(s, 3) == Some(MemberState::Dead) && s.health() == MeshHealth::Degraded,
    )
    .await?;
    println!(
        "kill -9 of node 3: dead on all four others after {:?}",
        killed.elapsed()
    );
    // The control group re-elects if node 3 led it; four of five voters are a quorum.
    let deadline = Instant::now() + SETTLE;
    let consensus = loop {
        let consensus = cluster
            .node(0)
            .control()
            .await?
            .get_consensus_state(GetConsensusStateRequest {})
            .await?
            .into_inner()
            .consensus_state
            .expect("state");
        if consensus.can_accept_writes || Instant::now() > deadline {
            break consensus;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((consensus.total_nodes, consensus.online_nodes), (5, 4));
    assert!(
        consensus.is_majority_partition && consensus.can_accept_writes && consensus.split_detected
    );

    // Restart: the new generation wins; everyone sees it alive again.
    cluster.node_mut(2).start()?;
    let restarted = Instant::now();
    wait_for_mesh(&cluster, &everyone, "node 3 back", SETTLE, |s| {
        member_state(s, 3) == Some(MemberState::Alive) && s.health() == MeshHealth::Healthy
    })
    .await?;
    println!(
        "restart of node 3: alive on all after {:?}",
        restarted.elapsed()
    );
    let mut kinds = Vec::new();
    while !kinds.contains(&MeshEventKind::Recovered) {
        let event = tokio::time::timeout(SETTLE, events.next())
            .await?
            .expect("open")?;
        assert_eq!(event.node_id, 3, "filtered to node 3");
        kinds.push(event.kind());
    }
    assert!(kinds.contains(&MeshEventKind::Dead), "{kinds:?}");

    // Three of five down: the two left see CRITICAL and no majority.
    for i in [1, 2, 4] {
        cluster.node_mut(i).kill();
    }
    wait_for_mesh(&cluster, &[0, 3], "critical", SETTLE, |s| {
        s.health() == MeshHealth::Critical && s.dead_members == 3
    })
    .await?;
    let check = cluster
        .node(3)
        .control()
        .await?
        .trigger_consensus_check(TriggerConsensusCheckRequest {})
        .await?
        .into_inner();
    let state = check.consensus_state.clone().expect("state");
    assert!(
        check.success && !state.can_accept_writes && !state.is_majority_partition,
        "{check:?}"
    );
    assert_eq!(state.online_nodes, 2);
    Ok(())
}

#[meshd_tests::test]
async fn a_state_event_reaches_every_subscriber_once() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = five_nodes()?;
    wait_for_mesh(
        &cluster,
        &[0, 1, 2, 3, 4],
        "five alive members",
        SETTLE,
        |s| s.online_members == 5,
    )
    .await?;
    // Routes too: a broadcast goes to every node in the routing table.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut inboxes = Vec::new();
    for node in &cluster.nodes {
        inboxes.push(node.inbox().await?);
    }
    let event = MeshStateEvent {
        event_type: MeshEventType::MeshEventNodeJoined as i32,
        originator_node: 0,
        affected_node: 4,
        sequence_number: 7,
        ..MeshStateEvent::default()
    };
    cluster
        .node(3)
        .data()
        .await?
        .broadcast_state_event(event)
        .await?;
    for (i, inbox) in inboxes.iter_mut().enumerate() {
        let got = tokio::time::timeout(SETTLE, inbox.next())
            .await?
            .expect("open")?;
        let header = |k: &str| {
            got.headers
                .iter()
                .find(|h| h.key == k)
                .map(|h| h.value.to_vec())
        };
        assert_eq!(
            header("message_type"),
            Some(b"mesh_state_event".to_vec()),
            "node {}",
            i + 1
        );
        let decoded: MeshStateEvent = prost::Message::decode(got.payload.as_ref())?;
        assert_eq!(
            (
                decoded.originator_node,
                decoded.affected_node,
                decoded.sequence_number
            ),
            (4, 4, 7)
        );
        let extra = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await;
        assert!(extra.is_err(), "node {} got a second copy", i + 1);
    }
    let error = cluster
        .node(0)
        .data()
        .await?
        .broadcast_state_event(MeshStateEvent::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    Ok(())
}
