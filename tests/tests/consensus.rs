//! The mesh control group (openraft over the mesh) between real `meshd` processes: the group
//! forms from one bootstrapping node (learners promoted to three voters), updates written on
//! any node commit in one order that every node's subscribers see, `RequestDatabaseSync`
//! pages through them, and a kill -9 of the leader under a stream of writes loses no
//! acknowledged update and doubles none; the killed node catches up when it returns.
//!
//! ```text
//!  1 (bootstrap) ── 2
//!   \              /
//!    ─── 3 (NAT) ─
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_proto::{
    link::{DbUpdate, MeshUpdate, NodeUpdate, SubscribeUpdatesRequest},
    mesh::{ConsensusState, DatabaseSyncRequest},
};
use meshd_tests::{Cluster, Node, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(30);

const BOOTSTRAP: &str = "[consensus]\nbootstrap = true\n";

/// Waits until every node in `nodes` reports a group state `check` accepts.
async fn wait_group(
    cluster: &Cluster,
    nodes: &[usize],
    what: &str,
    limit: Duration,
    check: impl Fn(&ConsensusState) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let mut failing = None;
        for &i in nodes {
            let state = cluster.node(i).consensus().await?;
            if !check(&state) {
                failing = Some((i, state));
                break;
            }
        }
        let Some((i, state)) = failing else {
            return Ok(start.elapsed());
        };
        if start.elapsed() > limit {
            bail!(
                "node {} never saw {what} in {limit:?}: {state:#?}\n{}",
                cluster.node(i).spec.node_id,
                cluster.log_tails(i, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn write_db(node: &Node, key: u64) -> anyhow::Result<u64> {
    let update = DbUpdate {
        table_name: "accounts".into(),
        operation: "INSERT".into(),
        data: HashMap::from([("id".to_owned(), key.to_string())]),
        ..DbUpdate::default()
    };
    Ok(node
        .mesh()
        .await?
        .send_internal_db_update(update)
        .await?
        .into_inner()
        .index)
}

/// A write as a client of the group makes it: FAILED_PRECONDITION means "not written"
/// (no leader with a quorum right now, e.g. an election), so it is safe to try again;
/// anything else is returned.
async fn write_db_retrying(node: &Node, key: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match write_db(node, key).await {
            Err(e)
                if Instant::now() < deadline
                    && e.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::FailedPrecondition) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// The first `n` internal-DB updates `node` applied after `from`: (index, key).
async fn read_db(node: &Node, from: u64, n: usize) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut stream = node
        .updates()
        .await?
        .subscribe_internal_db_updates(SubscribeUpdatesRequest {
            subscriber: String::new(),
            from_index: from,
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < n {
        let next = tokio::time::timeout(SETTLE, stream.next())
            .await
            .with_context(|| {
                format!(
                    "node {} delivered {} of {n} updates: {seen:?}",
                    node.spec.node_id,
                    seen.len()
                )
            })?
            .context("stream ended")??;
        let key = next.data.get("id").context("an id")?.parse()?;
        seen.push((next.index, key));
    }
    Ok(seen)
}

fn three_nodes() -> anyhow::Result<Cluster> {
    let mut first = NodeSpec::listener(1);
    first.extra = BOOTSTRAP.into();
    Cluster::start(vec![
        first,
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::behind_nat(3, vec![0, 1]),
    ])
}

#[meshd_tests::test]
async fn updates_commit_in_one_order_everywhere_and_survive_a_killed_leader() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    let mut cluster = three_nodes()?;
    let all = [0, 1, 2];
    let took = wait_group(&cluster, &all, "three voters and a leader", SETTLE, |s| {
        s.voters.len() == 3 && s.leader_id != 0 && s.can_accept_writes
    })
    .await?;
    println!("control group of 3 voters formed from one bootstrapping node in {took:?}");

    // Writes on every node (two of three forwarded to the leader) commit in one order.
    let mut written = BTreeMap::new();
    for key in 0..30u64 {
        let node = cluster.node((key % 3) as usize);
        let index = write_db_retrying(node, key).await?;
        assert!(
            written.insert(index, key).is_none(),
            "index {index} given twice"
        );
    }
    let expected: Vec<(u64, u64)> = written.iter().map(|(i, k)| (*i, *k)).collect();
    for &i in &all {
        let seen = read_db(cluster.node(i), 0, 30).await?;
        assert_eq!(seen, expected, "node {} saw another order", i + 1);
    }
    println!("30 updates written on 3 nodes: one order on every node's subscribers");

    // The other streams commit in the same log.
    let mesh_index = cluster
        .node(2)
        .mesh()
        .await?
        .send_mesh_update(MeshUpdate {
            key: "routing.alpha".into(),
            value: b"0.5".to_vec().into(),
            ..MeshUpdate::default()
        })
        .await?
        .into_inner()
        .index;
    let node_index = cluster
        .node(1)
        .mesh()
        .await?
        .send_node_update(NodeUpdate {
            kind: "status".into(),
            payload: b"ready".to_vec().into(),
            ..NodeUpdate::default()
        })
        .await?
        .into_inner()
        .index;
    assert!(mesh_index > *written.keys().last().unwrap_or(&0) && node_index > mesh_index);
    let mesh_update = cluster
        .node(0)
        .updates()
        .await?
        .subscribe_mesh_updates(SubscribeUpdatesRequest::default())
        .await?
        .into_inner()
        .next()
        .await
        .context("a mesh update")??;
    assert_eq!(
        (
            mesh_update.index,
            mesh_update.key.as_str(),
            mesh_update.origin_node
        ),
        (mesh_index, "routing.alpha", 3)
    );

    // RequestDatabaseSync pages by version (log index). Node 2 answers from what it has
    // applied, which may trail the commit of the last update by a moment.
    let mut data = cluster.node(2).data().await?;
    let applied_by = Instant::now() + Duration::from_secs(10);
    let all_rows = loop {
        let rows = data
            .request_database_sync(DatabaseSyncRequest {
                table_name: "accounts".into(),
                last_known_version: 0,
                node_ids: Vec::new(),
            })
            .await?
            .into_inner();
        if rows.current_version >= node_index || Instant::now() > applied_by {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let versions: Vec<u64> = all_rows.records.iter().map(|r| r.version).collect();
    assert_eq!(versions, written.keys().copied().collect::<Vec<_>>());
    assert!(!all_rows.has_more && all_rows.current_version >= node_index);
    let after_ten = data
        .request_database_sync(DatabaseSyncRequest {
            table_name: "accounts".into(),
            last_known_version: versions[9],
            node_ids: vec!["2".into()],
        })
        .await?
        .into_inner();
    let from_two: Vec<u64> = written
        .iter()
        .skip(10)
        .filter(|(_, key)| *key % 3 == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        after_ten
            .records
            .iter()
            .map(|r| r.version)
            .collect::<Vec<_>>(),
        from_two
    );

    // kill -9 the leader while a non-leader takes a stream of writes.
    let leader = cluster.node(0).consensus().await?.leader_id;
    let leader_index = cluster
        .nodes
        .iter()
        .position(|n| n.spec.node_id == leader)
        .context("leader is a node")?;
    let writer_index = (leader_index + 1) % 3;
    let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != leader_index).collect();
    let mut acked = BTreeMap::new();
    let mut failed = Vec::new();
    let mut killed_at = None;
    let mut first_after_kill = None;
    let mut key = 1000u64;
    while acked.len() < 60 || first_after_kill.is_none() {
        if key == 1020 {
            cluster.node_mut(leader_index).kill();
            killed_at = Some(Instant::now());
        }
        match write_db(cluster.node(writer_index), key).await {
            Ok(index) => {
                assert!(acked.insert(index, key).is_none(), "index {index} twice");
                if let Some(at) = killed_at
                    && first_after_kill.is_none()
                {
                    first_after_kill = Some(at.elapsed());
                }
            }
            Err(e) => {
                let code = e.downcast_ref::<tonic::Status>().map(tonic::Status::code);
                failed.push((key, code, e.to_string()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        key += 1;
        if killed_at.is_some_and(|at| at.elapsed() > SETTLE) {
            bail!(
                "no write committed within {SETTLE:?} of the leader's kill: {failed:?}\n{}",
                cluster.log_tails(writer_index, 40)
            );
        }
    }
    let failover = first_after_kill.unwrap_or_default();
    let elected = wait_group(&cluster, &survivors, "a new leader", SETTLE, |s| {
        s.leader_id != 0 && s.leader_id != leader && s.can_accept_writes
    })
    .await?;
    let state = cluster.node(writer_index).consensus().await?;
    println!(
        "kill -9 of leader {leader}: node {} leads (term {}), first write committed {failover:?} \
         after the kill; {} writes refused meanwhile (new leader seen by both survivors \
         {elected:?} after that)",
        state.leader_id,
        state.term,
        failed.len()
    );
    assert!(
        failover < Duration::from_secs(15),
        "failover took {failover:?}"
    );
    assert_ne!(state.leader_id, leader);
    for (key, code, error) in &failed {
        assert!(
            matches!(
                code,
                Some(tonic::Code::FailedPrecondition | tonic::Code::Unavailable)
            ),
            "write {key}: {error}"
        );
    }

    // Every acknowledged write is applied exactly once on the survivors, in index order;
    // a refused one at most once (a timed-out write may still have committed).
    let last = *acked.keys().last().unwrap_or(&0);
    for &i in &survivors {
        let total = last as usize; // at most this many updates of any kind up to `last`
        let mut stream = cluster
            .node(i)
            .updates()
            .await?
            .subscribe_internal_db_updates(SubscribeUpdatesRequest::default())
            .await?
            .into_inner();
        let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
        let mut keys: HashMap<u64, u64> = HashMap::new();
        let mut previous = 0;
        while seen.keys().last().copied().unwrap_or(0) < last && seen.len() < total {
            let update = tokio::time::timeout(SETTLE, stream.next())
                .await
                .context("survivor stalled")?
                .context("stream ended")??;
            assert!(update.index > previous, "out of order");
            previous = update.index;
            let key: u64 = update.data["id"].parse()?;
            *keys.entry(key).or_default() += 1;
            seen.insert(update.index, key);
        }
        for (index, key) in &acked {
            assert_eq!(seen.get(index), Some(key), "node {}: acked {key}", i + 1);
        }
        assert!(keys.values().all(|n| *n == 1), "a key applied twice");
    }

    // The killed node returns and catches up on what it missed.
    cluster.node_mut(leader_index).start()?;
    let caught_up = Instant::now();
    wait_group(
        &cluster,
        &[leader_index],
        "the restarted node caught up",
        SETTLE,
        |s| s.commit_index >= last,
    )
    .await?;
    println!(
        "restarted node {leader} caught up to index {last} in {:?}",
        caught_up.elapsed()
    );
    let mut stream = cluster
        .node(leader_index)
        .updates()
        .await?
        .subscribe_internal_db_updates(SubscribeUpdatesRequest::default())
        .await?
        .into_inner();
    let mut restored = BTreeMap::new();
    while restored.keys().last().copied().unwrap_or(0) < last {
        let update = tokio::time::timeout(SETTLE, stream.next())
            .await
            .context("restarted node stalled")?
            .context("stream ended")??;
        restored.insert(update.index, update.data["id"].parse::<u64>()?);
    }
    for (index, key) in acked.iter().chain(written.iter()) {
        assert_eq!(restored.get(index), Some(key));
    }
    Ok(())
}

/// The writes a node's internal-DB subscriber sees from the start: (index, key), in order,
/// until it has seen index `last`.
async fn log_of(node: &Node, last: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut stream = node
        .updates()
        .await?
        .subscribe_internal_db_updates(SubscribeUpdatesRequest::default())
        .await?
        .into_inner();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    while seen.last().map_or(0, |(i, _)| *i) < last {
        let update = tokio::time::timeout(SETTLE, stream.next())
            .await
            .with_context(|| format!("node {} stalled at {seen:?}", node.spec.node_id))?
            .context("stream ended")??;
        seen.push((update.index, update.data["id"].parse()?));
    }
    Ok(seen)
}

/// Five processes: two behind NAT, 4 and 5 reachable from each other only through three
/// relays. Dropping the 2 – 3 link splits them into {1, 2, 4} and {3, 5}: the minority
/// refuses writes and says why, the majority goes on; after the heal every node holds one
/// log.
///
/// ```text
///  1 (bootstrap) ── 2 ── 3
///  │                     │
///  4 (NAT)               5 (NAT)
/// ```
#[meshd_tests::test]
async fn a_minority_refuses_writes_the_majority_goes_on_and_the_heal_converges()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut first = NodeSpec::listener(1);
    first.extra = BOOTSTRAP.into();
    let cluster = Cluster::start(vec![
        first,
        NodeSpec::listener(2).dialing(vec![0]),
        NodeSpec::listener(3).dialing(vec![1]),
        NodeSpec::behind_nat(4, vec![0]),
        NodeSpec::behind_nat(5, vec![2]),
    ])?;
    let all = [0, 1, 2, 3, 4];
    let took = wait_group(&cluster, &all, "five voters", SETTLE, |s| {
        s.voters.len() == 5 && s.can_accept_writes
    })
    .await?;
    println!("5 processes (2 behind NAT): control group of 5 voters in {took:?}");
    let mut written = BTreeMap::new();
    for key in 0..10u64 {
        let index = write_db_retrying(cluster.node((key % 5) as usize), key).await?;
        written.insert(index, key);
    }

    // Split: 3 drops its link to 2 (and neither re-dials).
    let mut three = cluster.node(2).mesh().await?;
    three
        .drop_link(meshd_proto::link::DropLinkRequest { peer_node_id: 2 })
        .await?;
    let split = Instant::now();
    let minority = [2, 4];
    let majority = [0, 1, 3];
    wait_group(
        &cluster,
        &minority,
        "the minority refusing writes",
        SETTLE,
        |s| !s.can_accept_writes,
    )
    .await?;
    let refused = write_db(cluster.node(4), 500).await;
    let error = refused.expect_err("a minority write commits nowhere");
    let text = error.to_string();
    let status = error
        .downcast_ref::<tonic::Status>()
        .context("a gRPC status")?;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{text}");
    assert!(
        text.contains("quorum") || text.contains("CRITICAL") || text.contains("leader"),
        "the refusal says why: {text}"
    );
    println!("minority {{3, 5}} refuses writes: {text}");
    wait_group(&cluster, &majority, "a majority leader", SETTLE, |s| {
        s.can_accept_writes && [1, 2, 4].contains(&s.leader_id)
    })
    .await?;
    let majority_ready = split.elapsed();
    for key in 10..30u64 {
        let node = cluster.node(majority[(key % 3) as usize]);
        let index = write_db_retrying(node, key).await?;
        written.insert(index, key);
    }
    println!(
        "majority {{1, 2, 4}} commits (a leader with a quorum {majority_ready:?} after the split)"
    );

    // Heal: 3 dials 2 again.
    let two = cluster.node(1).listen.context("2 listens")?;
    three
        .add_link(meshd_proto::link::AddLinkRequest {
            addr: two.to_string(),
            timeout_seconds: 10,
        })
        .await?;
    let healed = Instant::now();
    let last = *written.keys().last().unwrap_or(&0);
    wait_group(&cluster, &all, "one log after the heal", SETTLE, |s| {
        s.commit_index >= last && s.can_accept_writes
    })
    .await?;
    println!(
        "healed: every node applied up to {last} in {:?}",
        healed.elapsed()
    );
    let expected: Vec<(u64, u64)> = written.iter().map(|(i, k)| (*i, *k)).collect();
    for &i in &all {
        let log = log_of(cluster.node(i), last).await?;
        assert_eq!(log, expected, "node {} holds another log", i + 1);
    }
    Ok(())
}

/// A node down while the group moves on past its snapshot interval catches up from a
/// snapshot (the entries it missed were compacted away), and the log stays bounded.
#[meshd_tests::test]
async fn a_node_down_for_many_entries_catches_up_from_a_snapshot() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let small = "[consensus]\nsnapshot_every = 50\nkeep_behind_snapshot = 10\n";
    let mut first = NodeSpec::listener(1);
    first.extra = format!("{small}bootstrap = true\n");
    let mut second = NodeSpec::listener(2).dialing(vec![0]);
    second.extra = small.into();
    let mut third = NodeSpec::listener(3).dialing(vec![0, 1]);
    third.extra = small.into();
    let mut cluster = Cluster::start(vec![first, second, third])?;
    let all = [0, 1, 2];
    wait_group(&cluster, &all, "three voters", SETTLE, |s| {
        s.voters.len() == 3 && s.can_accept_writes
    })
    .await?;
    let mut written = BTreeMap::new();
    for key in 0..5u64 {
        written.insert(write_db_retrying(cluster.node(0), key).await?, key);
    }
    let behind = cluster.node(2).consensus().await?.commit_index;
    cluster.node_mut(2).stop();
    for key in 5..305u64 {
        let node = cluster.node((key % 2) as usize);
        written.insert(write_db_retrying(node, key).await?, key);
    }
    let last = *written.keys().last().unwrap_or(&0);
    // Compaction follows the snapshot asynchronously (openraft purges once no replication
    // still reads the entries): waited for, within a bound.
    let compacted = Instant::now();
    let leader = loop {
        let leader = cluster.node(0).consensus().await?;
        if leader.purged_index > behind || compacted.elapsed() > Duration::from_secs(10) {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "log compacted past node 3's last entry {} ms after the last write",
        compacted.elapsed().as_millis()
    );
    assert!(
        leader.purged_index > behind,
        "the log was compacted past node 3's last entry within 10 s: {leader:?}"
    );
    assert!(
        leader.last_log_index - leader.purged_index < 200,
        "the log stays bounded: {leader:?}"
    );
    cluster.node_mut(2).start()?;
    let restarted = Instant::now();
    wait_group(&cluster, &[2], "caught up", SETTLE, |s| {
        s.commit_index >= last
    })
    .await?;
    let took = restarted.elapsed();
    let state = cluster.node(2).consensus().await?;
    assert!(
        state.snapshot_index > behind,
        "node 3 installed a snapshot: {state:?}"
    );
    println!(
        "node 3, down for {} entries, caught up from a snapshot (index {}) in {took:?} after its restart",
        last - behind,
        state.snapshot_index
    );
    let expected: Vec<(u64, u64)> = written.iter().map(|(i, k)| (*i, *k)).collect();
    assert_eq!(log_of(cluster.node(2), last).await?, expected);
    Ok(())
}

/// SetPolicy writes a live setting through the group and every node applies it (here the
/// per-hop charge, seen in every node's route costs); EvictNode and LeaveMesh commit
/// through the group and the group stops counting on the node.
#[meshd_tests::test]
async fn settings_evictions_and_departures_go_through_the_group() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    // Meshes made by SeedMesh and JoinMesh (LeaveMesh and EvictNode need one).
    let meshless = |id| NodeSpec {
        extra: "mesh_id = \"\"".into(),
        ..NodeSpec::listener(id)
    };
    let cluster = Cluster::start(vec![meshless(1), meshless(2), meshless(3), meshless(4)])?;
    cluster
        .node(0)
        .mesh()
        .await?
        .seed_mesh(meshd_proto::link::SeedMeshRequest {
            name: "group".into(),
            join_policy: meshd_proto::link::JoinPolicy::Open as i32,
            ..Default::default()
        })
        .await?;
    // A chain: each joins through the one before it (and keeps that link).
    for i in 1..4 {
        let addr = cluster.node(i - 1).listen.context("listens")?.to_string();
        cluster
            .node(i)
            .mesh()
            .await?
            .join_mesh(meshd_proto::link::JoinMeshRequest {
                addr,
                timeout_seconds: 10,
                ..Default::default()
            })
            .await?;
    }
    let all = [0, 1, 2, 3];
    wait_group(&cluster, &all, "three voters and a learner", SETTLE, |s| {
        s.voters.len() == 3 && s.learners.len() == 1 && s.can_accept_writes
    })
    .await?;
    // 1 reaches 4 over three hops: the per-hop charge shows in the route's cost.
    let cost_to_four = |node: usize| {
        let node = cluster.node(node);
        async move {
            let table = node
                .control()
                .await?
                .get_routing_table(meshd_proto::mesh::GetRoutingTableRequest {})
                .await?
                .into_inner();
            anyhow::Ok(
                table
                    .routes
                    .iter()
                    .find(|r| r.dst_node == 4)
                    .map(|r| r.cost),
            )
        }
    };
    cluster.node(0).wait_for_routes(&[4], SETTLE).await?;
    let before = cost_to_four(0).await?.context("a route to 4")?;
    let bad = cluster
        .node(1)
        .control()
        .await?
        .set_policy(meshd_proto::mesh::SetPolicyRequest {
            key: "routing.epsilon".into(),
            value: "0".into(),
        })
        .await
        .expect_err("epsilon must be above 0");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    cluster
        .node(3)
        .control()
        .await?
        .set_policy(meshd_proto::mesh::SetPolicyRequest {
            key: "routing.epsilon".into(),
            value: "5".into(),
        })
        .await?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let after = cost_to_four(0).await?.unwrap_or(0);
        if after >= before + 3 * 4900 {
            println!(
                "SetPolicy routing.epsilon = 5 on node 4: node 1's cost to 4 went {before} -> {after}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "cost to 4 stayed {after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // EvictNode(4) on node 2: committed by the group, applied everywhere.
    cluster
        .node(1)
        .mesh()
        .await?
        .evict_node(meshd_proto::link::EvictNodeRequest {
            node_id: 4,
            ..Default::default()
        })
        .await?;
    wait_group(&cluster, &[0, 1, 2], "4 out of the group", SETTLE, |s| {
        !s.voters.contains(&4) && !s.learners.contains(&4)
    })
    .await?;
    meshd_tests::wait_for_mesh(&cluster, &[0, 1, 2], "4 evicted", SETTLE, |s| {
        s.evicted.contains(&4)
    })
    .await?;

    // LeaveMesh on a voter: the group replaces it before it goes, and still commits.
    let leaver = cluster.node(2).consensus().await?;
    assert!(leaver.voters.contains(&3), "{leaver:?}");
    cluster
        .node(2)
        .mesh()
        .await?
        .leave_mesh(meshd_proto::link::LeaveMeshRequest {})
        .await?;
    wait_group(&cluster, &[0, 1], "3 out of the group", SETTLE, |s| {
        !s.voters.contains(&3) && s.can_accept_writes
    })
    .await?;
    write_db_retrying(cluster.node(1), 1).await?;

    // Joining again needs a restart first (the old group's state is dropped then).
    let entry = cluster.node(0).listen.context("listens")?.to_string();
    let refused = cluster
        .node(2)
        .mesh()
        .await?
        .join_mesh(meshd_proto::link::JoinMeshRequest {
            addr: entry,
            timeout_seconds: 10,
            ..Default::default()
        })
        .await
        .expect_err("the old group's state is still held");
    assert!(refused.message().contains("restart"), "{refused:?}");

    // After a restart it joins again: the admission is newer than its departure, so the
    // notice of that departure, still spreading, removes it nowhere; the group records the
    // admission and takes it back (as a voter: two voters left, three is the next odd count).
    let mut cluster = cluster;
    cluster.node_mut(2).stop();
    cluster.node_mut(2).start()?;
    let entry = cluster.node(0).listen.context("listens")?.to_string();
    let joined = Instant::now();
    cluster
        .node(2)
        .mesh()
        .await?
        .join_mesh(meshd_proto::link::JoinMeshRequest {
            addr: entry,
            timeout_seconds: 10,
            ..Default::default()
        })
        .await?;
    let back = wait_group(&cluster, &[0, 1, 2], "3 back in the group", SETTLE, |s| {
        s.voters.contains(&3) && s.can_accept_writes
    })
    .await?;
    println!("node 3 rejoined after leaving: a voter again {back:?} after its JoinMesh");
    let index = write_db_retrying(cluster.node(2), 2).await?;
    for i in [0, 1] {
        let seen = read_db(cluster.node(i), index - 1, 1).await?;
        anyhow::ensure!(seen == vec![(index, 2)], "node {i} read {seen:?}");
    }
    // Still a member everywhere a few seconds on: no late notice undid the admission.
    let alive = |s: &meshd_proto::link::MeshStatus| {
        meshd_tests::member_state(s, 3) == Some(meshd_proto::link::MemberState::Alive)
    };
    meshd_tests::wait_for_mesh(&cluster, &[0, 1, 2], "3 alive", SETTLE, alive).await?;
    while joined.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in [0, 1] {
        let status = meshd_tests::mesh_status(cluster.node(i)).await?;
        anyhow::ensure!(alive(&status), "node {i} lost 3 again: {status:#?}");
    }
    Ok(())
}
