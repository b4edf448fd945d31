//! `--compare nats`: the same workload on meshd and on a NATS cluster, one table with the
//! ratio.

use anyhow::bail;

use crate::bench::{BenchArgs, BenchReport, Compare, Workload};

/// Runs `args` on meshd and, with `--compare nats` or `nats-tls`, on NATS; prints one table.
pub(crate) async fn run_compared(args: BenchArgs) -> anyhow::Result<Vec<BenchReport>> {
    let Some(Compare::Nats | Compare::NatsTls) = args.compare else {
        return Ok(vec![crate::bench::run(args).await?]);
    };
    let (meshd, nats) = compare(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&[&meshd, &nats])?);
    } else {
        print_comparison(&meshd, &nats);
    }
    Ok(vec![meshd, nats])
}

/// The same fire-and-forget workload on meshd, then on NATS (TLS between its servers with
/// `--compare nats-tls`); prints nothing.
pub(crate) async fn compare(args: &BenchArgs) -> anyhow::Result<(BenchReport, BenchReport)> {
    let meshd = meshd_side(args).await?;
    let nats = nats_side(args, args.compare == Some(Compare::NatsTls)).await?;
    Ok((meshd, nats))
}

/// The meshd side of a comparison: a chain with the same hops.
pub(crate) async fn meshd_side(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if !matches!(args.workload, Workload::Fire) {
        bail!("--compare nats runs the fire workload (core NATS has no delivery or ack statuses)");
    }
    // Fail before the meshd run when the comparison cannot happen.
    crate::nats::find_server()?;
    // Like for like: the same hops on both sides.
    let quiet = BenchArgs {
        silent: true,
        topology: crate::bench::Topology::Chain,
        nodes: usize::from(args.hops) + 1,
        nat: 0,
        ..args.clone()
    };
    eprintln!(
        "meshd: {} nodes in a chain ({} hop(s))…",
        quiet.nodes, args.hops
    );
    run_quiet(quiet).await
}

/// The NATS side of a comparison, plaintext or with TLS between its servers.
pub(crate) async fn nats_side(args: &BenchArgs, tls: bool) -> anyhow::Result<BenchReport> {
    let log_dir = std::env::temp_dir().join(format!("loadgen-nats-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir)?;
    let args = BenchArgs {
        compare: Some(if tls { Compare::NatsTls } else { Compare::Nats }),
        ..args.clone()
    };
    let shape = crate::nats::Shape::for_hops(usize::from(args.hops));
    eprintln!("NATS: {}…", shape.describe(tls));
    let cluster = crate::nats::start_cluster(&log_dir, shape, tls).await?;
    let nats = crate::nats::run(&cluster, shape, &args).await?;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&log_dir);
    Ok(nats)
}

async fn run_quiet(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let report = Box::pin(crate::bench::run(BenchArgs {
        compare: None,
        ..args
    }))
    .await?;
    Ok(report)
}

fn print_comparison(meshd: &BenchReport, nats: &BenchReport) {
    let mode = if meshd.rate > 0 {
        format!("open loop at {} msgs/s", meshd.rate)
    } else {
        "closed loop".to_owned()
    };
    println!(
        "{} B fire-and-forget, {mode}, batches of {}, {} in flight, {} s measured",
        meshd.size,
        meshd.batch.max(1),
        meshd.in_flight,
        meshd.seconds
    );
    println!("  meshd: {}\n  nats:  {}", meshd.mesh, nats.mesh);
    println!(
        "{:<8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5}",
        "system", "msgs/s", "MB/s", "p50 µs", "p90 µs", "p99 µs", "p99.9", "max µs", "lost", "dup"
    );
    for (name, r) in [("meshd", meshd), ("nats", nats)] {
        println!(
            "{:<8} {:>10.0} {:>9.2} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5}",
            name,
            r.msgs_per_s,
            r.mb_per_s,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.lost,
            r.duplicated
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "{:<8} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}   (meshd ÷ nats)",
        "ratio",
        ratio(meshd.msgs_per_s, nats.msgs_per_s),
        ratio(meshd.mb_per_s, nats.mb_per_s),
        ratio(meshd.p50_us as f64, nats.p50_us as f64),
        ratio(meshd.p90_us as f64, nats.p90_us as f64),
        ratio(meshd.p99_us as f64, nats.p99_us as f64),
        ratio(meshd.p999_us as f64, nats.p999_us as f64),
        ratio(meshd.max_us as f64, nats.max_us as f64)
    );
}
