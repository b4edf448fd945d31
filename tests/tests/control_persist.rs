//! What the control thread writes to its database, seen through restarts: a node that left is
//! pruned from the peers table (a restarted member does not count it as a dead member), and an
//! identity generation renewed at run time (after a false "dead") is persisted, so the next
//! start comes back with a higher one.

use std::time::{Duration, Instant};

use meshd_proto::link::{
    JoinMeshRequest, JoinPolicy, LeaveMeshRequest, MemberState, MeshHealth, MeshStatus,
    SeedMeshRequest,
};
use meshd_tests::{Cluster, Node, NodeSpec, exclusive, member_state, mesh_status, wait_for_mesh};

const SETTLE: Duration = Duration::from_secs(20);

fn meshless(spec: NodeSpec) -> NodeSpec {
    NodeSpec {
        extra: "mesh_id = \"\"".into(),
        ..spec
    }
}

async fn seed_and_join(cluster: &Cluster, n: usize) -> anyhow::Result<()> {
    cluster
        .node(0)
        .mesh()
        .await?
        .seed_mesh(SeedMeshRequest {
            name: "persist".into(),
            description: String::new(),
            join_policy: JoinPolicy::Open as i32,
            join_key: String::new(),
        })
        .await?;
    let entry = cluster.node(0).listen.expect("listens").to_string();
    for i in 1..n {
        cluster
            .node(i)
            .mesh()
            .await?
            .join_mesh(JoinMeshRequest {
                addr: entry.clone(),
                join_key: String::new(),
                timeout_seconds: 10,
                ..JoinMeshRequest::default()
            })
            .await?;
    }
    let all: Vec<usize> = (0..n).collect();
    wait_for_mesh(cluster, &all, "every member alive", SETTLE, |s| {
        s.online_members as usize == n && s.health() == MeshHealth::Healthy
    })
    .await?;
    Ok(())
}

fn generation_of(status: &MeshStatus, node: u64) -> Option<u32> {
    status
        .members
        .iter()
        .find(|m| m.node_id == node)
        .map(|m| m.generation)
}

#[meshd_tests::test]
async fn a_member_that_left_is_not_remembered_as_dead_after_a_restart() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        meshless(NodeSpec::listener(1)),
        meshless(NodeSpec::listener(2)),
        meshless(NodeSpec::listener(3)),
    ])?;
    seed_and_join(&cluster, 3).await?;
    cluster
        .node(2)
        .mesh()
        .await?
        .leave_mesh(LeaveMeshRequest {})
        .await?;
    wait_for_mesh(&cluster, &[0, 1], "node 3 gone", SETTLE, |s| {
        member_state(s, 3).is_none() && s.total_members == 2
    })
    .await?;
    // Node 1 linked with node 3 (its entry point); it restarts and reads its peers table.
    assert!(cluster.node_mut(0).stop(), "clean stop");
    cluster.node_mut(0).start()?;
    wait_for_mesh(&cluster, &[0, 1], "two alive members", SETTLE, |s| {
        s.online_members == 2
    })
    .await?;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let status = mesh_status(cluster.node(0)).await?;
        assert!(
            member_state(&status, 3).is_none() && status.health() == MeshHealth::Healthy,
            "the departed node came back from the peers table: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn wait_generation(
    cluster: &Cluster,
    observers: &[usize],
    node: u64,
    what: &str,
    check: impl Fn(u32) -> bool,
) -> anyhow::Result<u32> {
    wait_for_mesh(cluster, observers, what, Duration::from_secs(30), |s| {
        member_state(s, node) == Some(MemberState::Alive)
            && generation_of(s, node).is_some_and(&check)
    })
    .await?;
    let status = mesh_status(cluster.node(observers[0])).await?;
    Ok(generation_of(&status, node).unwrap_or_default())
}

async fn own_generation(node: &Node) -> anyhow::Result<u32> {
    let status = mesh_status(node).await?;
    Ok(generation_of(&status, node.spec.node_id).unwrap_or_default())
}

#[meshd_tests::test]
async fn a_generation_renewed_after_a_false_death_is_never_handed_out_again() -> anyhow::Result<()>
{
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        meshless(NodeSpec::listener(1)),
        meshless(NodeSpec::listener(2)),
        meshless(NodeSpec::listener(3)),
    ])?;
    seed_and_join(&cluster, 3).await?;
    let first = wait_generation(&cluster, &[0, 1], 3, "node 3 alive", |_| true).await?;

    // Frozen long enough to be declared dead, node 3 wakes up, learns it and renews its
    // identity.
    cluster.node(2).signal(libc::SIGSTOP);
    wait_for_mesh(&cluster, &[0, 1], "node 3 dead", SETTLE, |s| {
        member_state(s, 3) == Some(MemberState::Dead)
    })
    .await?;
    cluster.node(2).signal(libc::SIGCONT);
    let renewed = wait_generation(&cluster, &[0, 1], 3, "node 3 renewed", |g| g > first).await?;
    assert_eq!(
        own_generation(cluster.node(2)).await?,
        renewed,
        "node 3 reports the generation it renewed to"
    );
    println!("node 3: generation {first} renewed to {renewed} after a false death");

    // A restart must come back above every generation used before.
    assert!(cluster.node_mut(2).stop(), "clean stop");
    cluster.node_mut(2).start()?;
    let restarted =
        wait_generation(&cluster, &[0, 1], 3, "node 3 restarted", |g| g > renewed).await?;
    assert_eq!(own_generation(cluster.node(2)).await?, restarted);
    println!("node 3: restarted at generation {restarted}");
    Ok(())
}
