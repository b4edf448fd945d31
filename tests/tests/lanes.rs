//! VirtualLink lanes across real processes: a link is its data connection plus a control lane
//! (heartbeats, routing, gossip, Raft, reports) and a priority lane (system and internal-DB
//! traffic), all dialed by the side that dialed the link and bound to the same proven
//! identity; a collapsed node runs one connection; a lost control lane hands control back to
//! the data connection at once and is dialed again; a member cannot use a side lane to carry
//! anything else, nor bind one to a link it did not dial.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use meshd_proto::{
    link::MemberState,
    mesh::{MessageStatus, SendMode, SendRequest, SessionInfo},
};
use meshd_shards::frame::{FrameType, Header, TrafficClass};
use meshd_tests::{
    Cluster, Node, NodeSpec, exclusive, member_state, mesh_status,
    rogue::{self, RogueLink, RogueOptions, RogueOutcome},
};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(10);

/// The session with `peer`, if linked.
async fn session(node: &Node, peer: u64) -> anyhow::Result<Option<SessionInfo>> {
    Ok(node
        .sessions()
        .await?
        .into_iter()
        .find(|s| s.peer_node_id == peer))
}

fn lane_names(session: &SessionInfo) -> Vec<&str> {
    session.lanes.iter().map(|l| l.name.as_str()).collect()
}

/// Waits until `node`'s link with `peer` has exactly the lanes `names`.
async fn wait_for_lanes(node: &Node, peer: u64, names: &[&str]) -> anyhow::Result<SessionInfo> {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(s) = session(node, peer).await?
            && lane_names(&s) == names
        {
            return Ok(s);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {}'s link to {peer} never had lanes {names:?}: {:?}\n{}",
            node.spec.node_id,
            session(node, peer).await?,
            node.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SPLIT: [&str; 3] = ["data", "control", "priority"];

/// A waiting send from `from` to `to`, which must be delivered to `to`'s subscriber.
async fn delivered(from: &Node, to: &Node, body: &[u8]) -> anyhow::Result<()> {
    delivered_as(from, to, body, 0).await
}

/// [`delivered`] in `qos_class` (2: an internal DB update).
async fn delivered_as(from: &Node, to: &Node, body: &[u8], qos_class: u32) -> anyhow::Result<()> {
    let mut inbox = to.inbox().await?;
    let reply = from
        .data()
        .await?
        .send(SendRequest {
            dst_node: to.spec.node_id,
            payload: body.to_vec().into(),
            mode: SendMode::WaitForDelivery as i32,
            timeout_seconds: 5,
            qos_class,
            ..SendRequest::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        reply.status() == MessageStatus::Delivered,
        "{} → {}: {reply:?}",
        from.spec.node_id,
        to.spec.node_id
    );
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("inbox ended"))??;
    anyhow::ensure!(got.payload.as_ref() == body, "{got:?}");
    Ok(())
}

#[meshd_tests::test]
async fn a_link_runs_control_and_priority_lanes_beside_its_data_lane_unless_either_end_is_collapsed()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::behind_nat(2, vec![0]),
        NodeSpec::behind_nat(3, vec![0]).with_env("MESHD_NETWORK__LANES", "collapsed"),
    ])?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    a.wait_for_peers(&[2, 3], SETTLE).await?;

    // A–B split on both ends: the side lanes are dialed by B (behind NAT, the dialer) to the
    // same address as its data lane.
    let at_a = wait_for_lanes(a, 2, &SPLIT).await?;
    let at_b = wait_for_lanes(b, 1, &SPLIT).await?;
    assert_eq!(at_b.lanes[0].remote_addr, at_b.lanes[1].remote_addr);
    assert_eq!(at_b.lanes[0].remote_addr, at_b.lanes[2].remote_addr);
    let remote: std::collections::HashSet<_> =
        at_a.lanes.iter().map(|l| l.remote_addr.clone()).collect();
    assert_eq!(remote.len(), 3, "three connections: {at_a:?}");
    // A–C collapsed: C said so in its Hello, so nobody dials a side lane.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (node, peer) in [(a, 3), (c, 1)] {
        let s = session(node, peer).await?.expect("linked");
        assert_eq!(lane_names(&s), ["data"], "{s:?}");
    }

    // Traffic on both kinds of link; heartbeats and routing on B's control lane, and the
    // session's RTT is the control lane's.
    delivered(a, b, b"split").await?;
    delivered(b, a, b"split back").await?;
    delivered(a, c, b"collapsed").await?;
    delivered(c, a, b"collapsed back").await?;
    // An internal DB update takes the priority lane (the collapsed link carries it on its one
    // connection), and client data never does: 20 kB each, far above what heartbeats add.
    const BIG: usize = 20_000;
    let before = session(a, 2).await?.expect("linked");
    delivered_as(b, a, &[0xdb; BIG], 2).await?;
    delivered_as(a, c, &[0xdb; BIG], 2).await?;
    let middle = session(a, 2).await?.expect("linked");
    delivered(b, a, &[0xc1; BIG]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_a = session(a, 2).await?.expect("linked");
    let got = |s: &SessionInfo, lane: usize| s.lanes[lane].bytes_received;
    anyhow::ensure!(
        got(&middle, 2) >= got(&before, 2) + BIG as u64 && got(&middle, 0) < got(&before, 0) + 4096,
        "the DB update did not come on the priority lane alone: {before:?} → {middle:?}"
    );
    anyhow::ensure!(
        got(&at_a, 0) >= got(&middle, 0) + BIG as u64 && got(&at_a, 2) < got(&middle, 2) + 4096,
        "the client message did not come on the data lane alone: {middle:?} → {at_a:?}"
    );
    let control = &at_a.lanes[1];
    assert!(
        control.frames_sent > 5 && control.frames_received > 5,
        "{at_a:?}"
    );
    assert!(control.rtt_microseconds > 0, "{at_a:?}");
    assert_eq!(at_a.rtt_microseconds, control.rtt_microseconds, "{at_a:?}");
    println!("A's link to B: {at_a:?}");
    Ok(())
}

#[meshd_tests::test]
async fn a_lost_control_lane_hands_control_to_the_data_lane_at_once_and_is_dialed_again()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::behind_nat(2, vec![0]),
    ])?;
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.wait_for_peers(&[2], SETTLE).await?;
    let before = wait_for_lanes(a, 2, &SPLIT).await?;
    let data_addr = before.lanes[0].remote_addr.clone();
    let control_addr = before.lanes[1].remote_addr.clone();
    let port = control_addr.rsplit(':').next().expect("a port").to_owned();

    // Destroy the control lane's socket at A (the kernel aborts it; B sees it reset).
    let killed = Command::new("ss")
        .args(["-K", "dst", "127.0.0.1", "dport", "=", &port])
        .output()?;
    anyhow::ensure!(
        killed.status.success(),
        "ss -K: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let cut = Instant::now();

    // Control goes on over the data lane meanwhile: sends and membership unaffected.
    delivered(a, b, b"during").await?;
    delivered(b, a, b"during, back").await?;

    // A new control lane (a new connection), the same data lane: the link was never re-made.
    let deadline = Instant::now() + SETTLE;
    let after = loop {
        let s = session(a, 2).await?;
        if let Some(s) = &s
            && lane_names(s) == SPLIT
            && s.lanes[1].remote_addr != control_addr
        {
            break s.clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new control lane: {s:?}\n{}\n{}",
            a.log_tail(20),
            b.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "control lane {control_addr} cut; a new one ({}) after {} ms",
        after.lanes[1].remote_addr,
        cut.elapsed().as_millis()
    );
    assert_eq!(
        after.lanes[0].remote_addr, data_addr,
        "the data lane stayed"
    );
    for (node, peer) in [(a, 2), (b, 1)] {
        let status = mesh_status(node).await?;
        assert_eq!(member_state(&status, peer), Some(MemberState::Alive));
    }
    assert!(
        !a.log().contains("link down"),
        "the link went down:\n{}",
        a.log_tail(20)
    );
    delivered(a, b, b"after").await?;
    Ok(())
}

#[meshd_tests::test]
async fn a_member_cannot_bind_a_side_lane_to_a_link_it_did_not_dial_nor_carry_data_on_one()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        NodeSpec::listener(1),
        NodeSpec::behind_nat(2, vec![0]),
    ])?;
    let a = cluster.node(0);
    a.wait_for_peers(&[2], SETTLE).await?;
    let addr = a.listen.expect("listens");
    let secret = cluster.mesh_secret();
    const ROGUE: u64 = 66;

    // A certified member (it holds the mesh secret, so it is one) dials a side lane with no
    // link of its own, or a lane that does not exist: refused and closed.
    for (lane, why) in [
        (1, "no link to bind the lane to"),
        (2, "no link to bind the lane to"),
        (7, "lane 7 is not a lane"),
    ] {
        let lone = RogueOptions {
            lane,
            ..RogueOptions::member(ROGUE, "default", secret)
        };
        let outcome = tokio::task::spawn_blocking(move || rogue::handshake(addr, &lone)).await??;
        assert_eq!(outcome, RogueOutcome::Goodbye(why.into()), "lane {lane}");
    }

    // With its own link: it may bind a control lane (it acts as itself), but a data frame on
    // it ends the lane, and the link stays.
    let member = RogueOptions {
        key: Some([0x66; 32]),
        ..RogueOptions::member(ROGUE, "default", secret)
    };
    let control_options = RogueOptions {
        lane: 1,
        ..member.clone()
    };
    let priority_options = RogueOptions {
        lane: 2,
        ..member.clone()
    };
    let (closed, link_open) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut link = RogueLink::connect(addr, &member)?;
        link.beat()?;
        let mut closed = Vec::new();
        for options in [control_options, priority_options] {
            let mut lane = RogueLink::connect(addr, &options)?;
            lane.beat()?;
            let mut data = Header::new(FrameType::Data, TrafficClass::Client, ROGUE, 1);
            data.ttl = 8;
            lane.send_frame(&data, b"client bulk on a side lane")?;
            closed.push(!lane.drain(Duration::from_secs(2)));
        }
        link.beat()?;
        let link_open = link.drain(Duration::from_millis(200));
        Ok((closed, link_open))
    })
    .await??;
    assert_eq!(
        closed,
        [true, true],
        "a side lane carrying client data was kept"
    );
    assert!(link_open, "the rogue's own link went down with its lanes");
    let log = a.log();
    assert!(log.contains("side lane refused"), "{}", a.log_tail(20));
    assert!(log.contains("on the control lane"), "{}", a.log_tail(20));
    assert!(log.contains("on the priority lane"), "{}", a.log_tail(20));
    Ok(())
}
