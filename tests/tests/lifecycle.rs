//! The mesh lifecycle between real `meshd` processes that start without a mesh: seed, joins
//! through different members (one behind NAT) with a join key, a refused wrong key, crash and
//! restart, eviction, and the CRITICAL gate.

use std::time::{Duration, Instant};

use meshd_proto::link::{
    EvictNodeRequest, JoinMeshRequest, JoinPolicy, MemberState, MeshHealth, MeshStatus,
    SeedMeshRequest, StopMeshRequest,
};
use meshd_tests::{Cluster, Node, NodeSpec, exclusive, member_state, mesh_status, wait_for_mesh};

const SETTLE: Duration = Duration::from_secs(20);
const KEY: &str = "correct horse battery";

fn meshless(spec: NodeSpec) -> NodeSpec {
    NodeSpec {
        extra: "mesh_id = \"\"".into(),
        ..spec
    }
}

async fn join(node: &Node, via: &Node, key: &str) -> Result<MeshStatus, tonic::Status> {
    join_pinned(node, via, key, "").await
}

/// A join that sends the key only to a member certified by `authority` (hex; "" = any).
async fn join_pinned(
    node: &Node,
    via: &Node,
    key: &str,
    authority: &str,
) -> Result<MeshStatus, tonic::Status> {
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
            mesh_authority: authority.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[meshd_tests::test]
async fn seed_join_crash_restart_evict_and_the_critical_gate() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        meshless(NodeSpec::listener(1)),
        meshless(NodeSpec::listener(2)),
        meshless(NodeSpec::listener(3)),
        meshless(NodeSpec::behind_nat(4, vec![])),
        meshless(NodeSpec::listener(5)),
    ])?;
    assert_eq!(mesh_status(cluster.node(0)).await?.mesh_state, "none");

    let seeded = cluster
        .node(0)
        .mesh()
        .await?
        .seed_mesh(SeedMeshRequest {
            name: "prod".into(),
            description: "test mesh".into(),
            join_policy: JoinPolicy::KeyRequired as i32,
            join_key: KEY.into(),
        })
        .await?
        .into_inner();
    assert_eq!(seeded.mesh_id.len(), 26, "a ULID: {seeded:?}");
    assert_eq!(
        (seeded.mesh_name.as_str(), seeded.mesh_state.as_str()),
        ("prod", "active")
    );
    let again = cluster
        .node(0)
        .mesh()
        .await?
        .seed_mesh(SeedMeshRequest::default())
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");

    // A joiner that pins the mesh authority sends its key only to a member it certified: a
    // wrong authority fails the join before any key leaves, and nothing is kept.
    assert_eq!(seeded.mesh_authority.len(), 64, "{seeded:?}");
    let impostor = join_pinned(cluster.node(1), cluster.node(0), KEY, &"ab".repeat(32))
        .await
        .unwrap_err();
    println!("join pinned to another authority: {impostor:?}");
    assert!(impostor.message().contains("vouched"), "{impostor:?}");
    assert_eq!(mesh_status(cluster.node(1)).await?.mesh_id, "");

    // Joins through three different entry points (the first pinned to the right authority);
    // 4 is behind NAT.
    let started = Instant::now();
    join_pinned(
        cluster.node(1),
        cluster.node(0),
        KEY,
        &seeded.mesh_authority,
    )
    .await?;
    join(cluster.node(2), cluster.node(1), KEY).await?;
    let joined = join(cluster.node(3), cluster.node(2), KEY).await?;
    assert_eq!(joined.mesh_id, seeded.mesh_id);
    assert_eq!(joined.mesh_name, "prod");
    // A wrong key is refused and nothing is kept.
    let refused = join(cluster.node(4), cluster.node(0), "wrong key")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        mesh_status(cluster.node(4)).await?.mesh_id,
        "",
        "nothing half-persisted"
    );
    let unknown = cluster
        .node(4)
        .mesh()
        .await?
        .join_mesh(JoinMeshRequest {
            addr: "127.0.0.1:1".into(),
            join_key: KEY.into(),
            timeout_seconds: 5,
            ..JoinMeshRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unavailable, "{unknown:?}");
    println!("joins and refusals done after {:?}", started.elapsed());
    join(cluster.node(4), cluster.node(1), KEY).await?;
    let everyone = [0, 1, 2, 3, 4];
    wait_for_mesh(&cluster, &everyone, "five alive members", SETTLE, |s| {
        s.mesh_id == seeded.mesh_id && s.online_members == 5 && s.health() == MeshHealth::Healthy
    })
    .await?;
    println!(
        "seed + 4 joins: every node sees 5 alive members {:?} after the first join",
        started.elapsed()
    );

    // kill -9 of node 5: dead everywhere, DEGRADED; a restart resumes the stored membership.
    cluster.node_mut(4).kill();
    wait_for_mesh(&cluster, &[0, 1, 2, 3], "node 5 dead", SETTLE, |s| {
        member_state(s, 5) == Some(MemberState::Dead) && s.health() == MeshHealth::Degraded
    })
    .await?;
    cluster.node_mut(4).start()?;
    let restarted = Instant::now();
    wait_for_mesh(&cluster, &everyone, "node 5 back", SETTLE, |s| {
        member_state(s, 5) == Some(MemberState::Alive) && s.online_members == 5
    })
    .await?;
    println!(
        "restart of node 5: back in the mesh on every node after {:?}",
        restarted.elapsed()
    );
    assert_eq!(
        mesh_status(cluster.node(4)).await?.mesh_id,
        seeded.mesh_id,
        "mesh resumed from the data directory"
    );

    // Evict 5: every member drops it and refuses it from then on. Node 5's restart may have
    // set off an election (openraft 0.9 has no pre-vote; issue 25), and a write then waits
    // out its 5 s deadline with "may still commit": an operator retries, and so does this.
    let mut tries = 0;
    let after = loop {
        let answer = cluster
            .node(2)
            .mesh()
            .await?
            .evict_node(EvictNodeRequest {
                node_id: 5,
                reason: "test".into(),
            })
            .await;
        match answer {
            Err(status) if tries < 3 && status.message().contains("may still commit") => {
                tries += 1;
                println!("evict: {status:?}");
            }
            other => break other?.into_inner(),
        }
    };
    assert!(after.evicted.contains(&5));
    wait_for_mesh(&cluster, &[0, 1, 2, 3], "node 5 evicted", SETTLE, |s| {
        s.evicted.contains(&5) && member_state(s, 5).is_none() && s.members.len() == 4
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("eviction seen by all after {:?}", started.elapsed());
    let five = cluster.node(4).sessions().await?;
    assert!(
        five.is_empty(),
        "an evicted node cannot reconnect: {five:?}"
    );
    // The revocation list travels with the mesh: a node joining now refuses node 5 from the
    // start.
    let six = cluster.add(meshless(NodeSpec::listener(6)))?;
    let status = join(cluster.node(six), cluster.node(1), KEY).await?;
    assert!(
        status.evicted.contains(&5),
        "the joiner was not told: {status:?}"
    );
    wait_for_mesh(
        &cluster,
        &[six],
        "the revocation list stored",
        SETTLE,
        |s| s.evicted.contains(&5) && s.online_members >= 2,
    )
    .await?;
    assert!(cluster.node_mut(six).stop(), "clean stop");

    // Two of the four remaining down, and 4 (behind NAT, linked through 3) cut off: CRITICAL.
    cluster.node_mut(1).kill();
    cluster.node_mut(2).kill();
    let took = wait_for_mesh(&cluster, &[0], "critical", SETTLE, |s| {
        s.health() == MeshHealth::Critical
    })
    .await?;
    println!("two of four killed: CRITICAL on node 1 after {took:?}");
    let gated = cluster
        .node(0)
        .mesh()
        .await?
        .stop_mesh(StopMeshRequest {})
        .await
        .unwrap_err();
    assert_eq!(gated.code(), tonic::Code::FailedPrecondition);
    assert!(gated.message().contains("CRITICAL"), "{gated:?}");
    let evicted = cluster
        .node(0)
        .mesh()
        .await?
        .evict_node(EvictNodeRequest {
            node_id: 3,
            reason: String::new(),
        })
        .await?;
    assert!(
        evicted.into_inner().evicted.contains(&3),
        "EvictNode is still accepted"
    );
    Ok(())
}

#[meshd_tests::test]
async fn stop_start_and_leave_and_the_operator_cli() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        meshless(NodeSpec::listener(1)),
        meshless(NodeSpec::listener(2)),
        meshless(NodeSpec::behind_nat(3, vec![])),
    ])?;
    let t0 = Instant::now();
    // Seed and join with the operator CLI, as the README shows.
    let cli = |node: &Node, args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(meshd_tests::meshd_binary()?)
            .args(["mesh", "--grpc", &node.grpc.to_string()])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "meshd mesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let seeded = cli(
        cluster.node(0),
        &["seed", "--name", "lab", "--policy", "open"],
    )?;
    assert!(seeded.contains("\"lab\" (active)"), "{seeded}");
    let entry = cluster.node(0).listen.expect("listens").to_string();
    cli(cluster.node(1), &["join", &entry])?;
    cli(cluster.node(2), &["join", &entry])?;
    wait_for_mesh(&cluster, &[0, 1, 2], "three alive", SETTLE, |s| {
        s.online_members == 3
    })
    .await?;
    println!("seeded and joined after {:?}", t0.elapsed());
    let shown = cli(cluster.node(2), &["status"])?;
    assert!(shown.contains("HEALTHY, 3/3 members online"), "{shown}");

    // StopMesh: links close, the others see it dead; its membership stays on disk.
    let stopped = cluster
        .node(1)
        .mesh()
        .await?
        .stop_mesh(StopMeshRequest {})
        .await?
        .into_inner();
    assert_eq!(stopped.mesh_state, "stopped");
    wait_for_mesh(&cluster, &[0, 2], "node 2 dead", SETTLE, |s| {
        member_state(s, 2) == Some(MemberState::Dead)
    })
    .await?;
    assert!(
        cluster.node(1).sessions().await?.is_empty(),
        "a stopped node keeps no links"
    );
    // Alone, the stopped node sees the others dead: CRITICAL in its own view. StartMesh is
    // still accepted (it is how the node recovers); it dials the members it knows.
    wait_for_mesh(&cluster, &[1], "critical while stopped", SETTLE, |s| {
        s.health() == MeshHealth::Critical
    })
    .await?;
    let started = Instant::now();
    cli(cluster.node(1), &["start"])?;
    wait_for_mesh(&cluster, &[0, 1, 2], "node 2 back", SETTLE, |s| {
        s.online_members == 3
    })
    .await?;
    println!(
        "StartMesh: back on every node after {:?}",
        started.elapsed()
    );

    // LeaveMesh: the members forget it; it belongs to no mesh.
    // Right after StartMesh the control group may still be electing: the node answers "retry"
    // (FAILED_PRECONDITION, nothing committed), and an operator retries.
    let mut tries = 0;
    let left = loop {
        match cli(cluster.node(2), &["leave"]) {
            Err(e) if tries < 10 && format!("{e:#}").contains("retry") => {
                tries += 1;
                println!("leave: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other?,
        }
    };
    assert!(left.contains("left the mesh"), "{left}");
    wait_for_mesh(&cluster, &[0, 1], "node 3 gone", SETTLE, |s| {
        member_state(s, 3).is_none() && s.total_members == 2
    })
    .await?;
    println!("left node forgotten after {:?}", t0.elapsed());
    let after = mesh_status(cluster.node(2)).await?;
    assert_eq!(
        (after.mesh_id.as_str(), after.mesh_state.as_str()),
        ("", "none")
    );
    Ok(())
}
