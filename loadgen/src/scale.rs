//! `loadgen scale`: many meshd processes on one host in a random asymmetric topology; time to
//! full convergence (routes to every node and every member alive, on every node) and memory per
//! node.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use meshd_proto::{link::GetMeshStatusRequest, mesh::GetRoutingTableRequest};
use meshd_tests::Cluster;

use crate::bench::{BenchArgs, topology_specs};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: BenchArgs,
}

/// What `loadgen scale` measured.
pub(crate) struct ScaleReport {
    pub(crate) nodes: usize,
    pub(crate) nat: usize,
    pub(crate) links: usize,
    pub(crate) seed: u64,
    pub(crate) ready: Duration,
    pub(crate) routed: Duration,
    pub(crate) converged: Duration,
    pub(crate) rss_mean_mib: f64,
    pub(crate) rss_max_mib: f64,
}

/// Starts the mesh, waits for convergence, prints the figures.
pub(crate) async fn run(nodes: usize, nat: usize, seed: u64) -> anyhow::Result<()> {
    let r = measure(nodes, nat, seed).await?;
    println!(
        "{} meshd processes, {} behind NAT, {} links (random, seed {}), one host",
        r.nodes, r.nat, r.links, r.seed
    );
    println!(
        "  all processes ready:               {:>8.2} s after the first start",
        r.ready.as_secs_f64()
    );
    println!(
        "  every node routes to every other:  {:>8.2} s",
        r.routed.as_secs_f64()
    );
    println!(
        "  every node sees every member alive: {:>7.2} s",
        r.converged.as_secs_f64()
    );
    println!(
        "  resident memory per node:          {:>8.1} MiB mean, {:.1} MiB max",
        r.rss_mean_mib, r.rss_max_mib
    );
    Ok(())
}

/// Starts the mesh and waits for convergence; prints progress only.
pub(crate) async fn measure(nodes: usize, nat: usize, seed: u64) -> anyhow::Result<ScaleReport> {
    let argv = [
        "scale".to_owned(),
        "--topology".into(),
        "random".into(),
        "--nodes".into(),
        nodes.to_string(),
        "--nat".into(),
        nat.to_string(),
        "--seed".into(),
        seed.to_string(),
    ];
    let args = Wrapper::try_parse_from(argv)?.args;
    let specs = topology_specs(&args)?;
    let links: usize = specs.iter().map(|s| s.dials.len()).sum();
    eprintln!("starting {nodes} meshd processes ({nat} behind NAT, {links} links, seed {seed})…");
    // Built before the clock starts: a build is not start-up time.
    meshd_tests::meshd_binary()?;
    let started = Instant::now();
    let cluster = Cluster::start(specs)?;
    let all_up = started.elapsed();
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.spec.node_id).collect();
    let mut routed_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut routed = 0;
        let mut members = 0;
        for node in &cluster.nodes {
            let mut control = node.control().await?;
            let routes = control
                .get_routing_table(GetRoutingTableRequest {})
                .await?
                .into_inner()
                .routes;
            if routes.len() == ids.len() - 1 {
                routed += 1;
            }
            let mut mesh = node.mesh().await?;
            let status = mesh
                .get_mesh_status(GetMeshStatusRequest {})
                .await?
                .into_inner();
            if status.online_members as usize == ids.len() {
                members += 1;
            }
        }
        if routed == ids.len() && routed_at.is_none() {
            routed_at = Some(started.elapsed());
        }
        eprint!(
            "\r{:>6.1} s: {routed}/{} nodes route to all, {members}/{} see all members alive   ",
            started.elapsed().as_secs_f64(),
            ids.len(),
            ids.len()
        );
        if routed == ids.len() && members == ids.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("no full convergence after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let converged = started.elapsed();
    eprintln!();
    let rss: Vec<u64> = cluster.nodes.iter().filter_map(|n| n.rss_bytes()).collect();
    let mean = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64;
    let max = rss.iter().copied().max().unwrap_or(0);
    Ok(ScaleReport {
        nodes,
        nat,
        links,
        seed,
        ready: all_up,
        routed: routed_at.unwrap_or(converged),
        converged,
        rss_mean_mib: mean / 1_048_576.0,
        rss_max_mib: max as f64 / 1_048_576.0,
    })
}
