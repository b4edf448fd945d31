//! Multi-hop routing between real `meshd` processes: link-state convergence, relaying between
//! nodes behind NAT, reroute when a relay dies, broadcast, routing and topology rpcs.
//!
//! ```text
//!            B(2) ─── D(4) ─── F(6, behind NAT)
//!           /           \\
//!  E(5) ── A(1)          (D dials B and C)
//!  (NAT)    \\           /
//!            C(3) ─────
//! ```
//! E and F have no listener and no direct link: E → A → B|C → D → F.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use meshd_proto::{
    link::{EstablishFullLinksRequest, mesh_service_client::MeshServiceClient},
    mesh::{
        GetMessageMetricsRequest, GetTopologyRequest, MessageStatus, QueryMessageStatusRequest,
        SendMode, SendRequest,
    },
};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(15);

fn six_nodes() -> anyhow::Result<Cluster> {
    Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::listener(3).dialing(vec![0]),
        NodeSpec::listener(4).dialing(vec![1, 2]),
        NodeSpec::behind_nat(5, vec![0]),
        NodeSpec::behind_nat(6, vec![3]),
    ])
}

fn request(dst: u64, seq: u64, mode: SendMode) -> SendRequest {
    SendRequest {
        dst_node: dst,
        headers: vec![],
        payload: seq.to_le_bytes().to_vec().into(),
        end_to_end_encrypt: false,
        partition: 0,
        qos_class: 1,
        corr_id: seq,
        require_ack: false,
        mode: mode as i32,
        timeout_seconds: 10,
    }
}

#[meshd_tests::test]
async fn nodes_behind_nat_talk_through_relays_and_traffic_moves_when_a_relay_dies()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = six_nodes()?;
    let started = Instant::now();
    for node in &cluster.nodes {
        let others: Vec<u64> = (1..=6).filter(|id| *id != node.spec.node_id).collect();
        node.wait_for_routes(&others, SETTLE).await?;
    }
    println!(
        "6 processes: every node routes to every other after {:?}",
        started.elapsed()
    );

    let routes_e = cluster.node(4).wait_for_routes(&[6], SETTLE).await?;
    assert_eq!(routes_e[&6], vec![1], "E reaches F only through A");
    let mut inbox = cluster.node(5).inbox().await?;
    let mut data_e = cluster.node(4).data().await?;
    let reply = data_e
        .clone()
        .send(request(6, 0, SendMode::WaitForDelivery))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
    let got = tokio::time::timeout(SETTLE, inbox.next())
        .await?
        .expect("open")?;
    assert_eq!((got.src_node, got.dst_node, got.corr_id), (5, 6, 0));

    // Which of B and C does A use towards F? That relay dies mid-stream.
    let routes_a = cluster.node(0).wait_for_routes(&[6], SETTLE).await?;
    let relay = routes_a[&6][0];
    assert!(relay == 2 || relay == 3, "A's next hop to F is {relay}");
    let relay_index = (relay - 1) as usize;

    let total = 200u64;
    let mut sender = data_e.clone();
    let send_task = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for seq in 1..=total {
            let reply = sender
                .send(request(6, seq, SendMode::WaitForDelivery))
                .await?
                .into_inner();
            statuses.push((seq, reply.status(), reply.status_message));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<_, anyhow::Error>(statuses)
    });
    let mut arrivals: Vec<(u64, Instant)> = Vec::new();
    let mut killed_at = None;
    while arrivals.len() < total as usize {
        let item = tokio::time::timeout(SETTLE, inbox.next())
            .await?
            .expect("open")?;
        let seq = u64::from_le_bytes(item.payload[..8].try_into()?);
        arrivals.push((seq, Instant::now()));
        if arrivals.len() == 60 && killed_at.is_none() {
            cluster.node_mut(relay_index).kill();
            killed_at = Some(Instant::now());
        }
    }
    let statuses = send_task.await??;
    let killed_at = killed_at.expect("relay killed");

    let undelivered: Vec<_> = statuses
        .iter()
        .filter(|(_, s, _)| *s != MessageStatus::Delivered)
        .collect();
    assert!(
        undelivered.is_empty(),
        "sends not delivered: {undelivered:?}"
    );
    let seqs: Vec<u64> = arrivals.iter().map(|(s, _)| *s).collect();
    let unique: HashSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), total as usize, "every message arrives");
    assert_eq!(seqs.len(), unique.len(), "and exactly once");
    // Reroute time: the longest silence at F after the kill.
    let mut worst_gap = Duration::ZERO;
    let mut previous = killed_at;
    for (_, at) in arrivals.iter().filter(|(_, at)| *at >= killed_at) {
        worst_gap = worst_gap.max(at.duration_since(previous));
        previous = *at;
    }
    println!(
        "relay {relay} killed: longest gap in deliveries afterwards {worst_gap:?} (reroute time)"
    );
    let routes_a = cluster.node(0).wait_for_routes(&[6], SETTLE).await?;
    assert_eq!(
        routes_a[&6],
        vec![if relay == 2 { 3 } else { 2 }],
        "A now routes through the other relay"
    );

    // Known but unreachable vs never seen.
    let reply = data_e
        .send(request(999, 0, SendMode::WaitForDelivery))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Undeliverable);
    cluster.node_mut(5).kill();
    let deadline = Instant::now() + SETTLE;
    loop {
        let reply = data_e
            .send(request(6, 0, SendMode::WaitForDelivery))
            .await?
            .into_inner();
        if reply.status() == MessageStatus::PendingNode {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "F never became PENDING_NODE: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[meshd_tests::test]
async fn a_broadcast_reaches_every_subscriber_once_the_senders_own_included() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    let cluster = six_nodes()?;
    for node in &cluster.nodes {
        let others: Vec<u64> = (1..=6).filter(|id| *id != node.spec.node_id).collect();
        node.wait_for_routes(&others, SETTLE).await?;
    }
    let mut inboxes = Vec::new();
    for node in &cluster.nodes {
        inboxes.push(node.inbox().await?);
    }
    let e = cluster.node(4);
    let reply = e
        .data()
        .await?
        .send(request(0, 77, SendMode::WaitForDelivery))
        .await?
        .into_inner();
    assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
    for (i, inbox) in inboxes.iter_mut().enumerate() {
        let got = tokio::time::timeout(SETTLE, inbox.next())
            .await?
            .expect("open")?;
        assert_eq!((got.src_node, got.corr_id), (5, 77), "node {}", i + 1);
        let extra = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await;
        assert!(extra.is_err(), "node {} got a second copy", i + 1);
    }
    // The status is queryable afterwards, and counted.
    let status = e
        .data()
        .await?
        .query_message_status(QueryMessageStatusRequest {
            msg_ids: vec![reply.msg_id, 12345],
        })
        .await?
        .into_inner();
    assert_eq!(
        status.message_statuses[0].status(),
        MessageStatus::Delivered
    );
    assert_eq!(
        status.message_statuses[1].status(),
        MessageStatus::Unspecified
    );
    let metrics = e
        .control()
        .await?
        .get_message_metrics(GetMessageMetricsRequest {})
        .await?
        .into_inner();
    assert!(
        metrics.total_messages >= 1 && metrics.delivered >= 1,
        "{metrics:?}"
    );

    // A status stream follows a message to its end.
    let mut stream = e
        .data()
        .await?
        .send_with_status_stream(request(6, 78, SendMode::WaitForDelivery))
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(info) = tokio::time::timeout(SETTLE, stream.next()).await? {
        seen.push(info?.status());
    }
    assert_eq!(seen.first(), Some(&MessageStatus::Queued));
    assert_eq!(seen.last(), Some(&MessageStatus::Delivered), "{seen:?}");
    Ok(())
}

#[meshd_tests::test]
async fn topology_lists_neighbours_and_establish_full_links_dials_every_listener()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = six_nodes()?;
    let e = cluster.node(4);
    e.wait_for_routes(&[1, 2, 3, 4, 6], SETTLE).await?;
    let topology = e
        .control()
        .await?
        .get_topology(GetTopologyRequest {})
        .await?
        .into_inner()
        .topology
        .expect("topology");
    assert_eq!(topology.local_node_id, 5);
    assert_eq!(topology.neighbors.len(), 1);
    assert!(topology.neighbors[0].connected && topology.neighbors[0].node_id == 1);
    assert_eq!(topology.routes.len(), 5);
    assert!(topology.routes.iter().all(|r| r.next_hops == vec![1]));

    let mut mesh = MeshServiceClient::new(e.channel().await?);
    let dialing = mesh
        .establish_full_links(EstablishFullLinksRequest {})
        .await?
        .into_inner()
        .dialing;
    assert_eq!(
        dialing.len(),
        3,
        "B, C and D listen and are not linked to E: {dialing:?}"
    );
    e.wait_for_peers(&[1, 2, 3, 4], SETTLE).await?;
    // The best next hop moves to D once its link is advertised; B and C may stay as
    // loop-free alternates.
    let deadline = Instant::now() + SETTLE;
    loop {
        let routes = e.wait_for_routes(&[6], SETTLE).await?;
        if routes[&6].first() == Some(&4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "E still reaches F through {:?}",
            routes[&6]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
