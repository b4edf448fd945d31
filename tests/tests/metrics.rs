//! The metrics port across real processes: Prometheus text scraped from running nodes shows the
//! members, links, Raft and stream traffic as they are, and follows a link going down.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_tests::{
    Cluster, NodeSpec, exclusive, http_get,
    streams_support::{SETTLE, Seen, open, publish_all, serving, subscriber, wait_complete},
};

fn with_metrics(mut spec: NodeSpec) -> NodeSpec {
    spec.extra
        .push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    spec
}

/// The samples of a scrape: `name{labels}` → value. Every line that is not a comment must
/// parse, as Prometheus would require.
fn samples(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        out.insert(key.to_owned(), value);
    }
    out
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let (code, body) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "scrape answered {code}: {body}");
    Ok(samples(&body))
}

/// Scrapes `addr` until `want` holds of the samples.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    want: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let samples = scrape(addr).await?;
        if want(&samples) {
            return Ok(samples);
        }
        if Instant::now() > deadline {
            bail!("{what}: not seen in the scrape of {addr}: {samples:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A per-lane sample (labels in whichever order the exposition writes them); -1 when absent.
fn lane_value(samples: &BTreeMap<String, f64>, name: &str, peer: &str, lane: &str) -> f64 {
    let (peer, lane) = (format!("peer=\"{peer}\""), format!("lane=\"{lane}\""));
    samples
        .iter()
        .find(|(k, _)| {
            k.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && k.contains(&peer)
                && k.contains(&lane)
        })
        .map_or(-1.0, |(_, v)| *v)
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(-1.0)
}

#[meshd_tests::test]
async fn a_scrape_shows_members_links_raft_and_streams_and_follows_a_link_going_down()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut first = with_metrics(serving(NodeSpec::listener(1)));
    // A control group to report on: node 1 bootstraps it, the others join as they come.
    first.extra.push_str("\n[consensus]\nbootstrap = true\n");
    let mut cluster = Cluster::start(vec![
        first,
        with_metrics(serving(NodeSpec::listener(2).dialing(vec![0]))),
        with_metrics(serving(NodeSpec::behind_nat(3, vec![1]))),
    ])?;
    cluster.node(0).wait_for_routes(&[2, 3], SETTLE).await?;
    cluster.node(2).wait_for_routes(&[1], SETTLE).await?;
    let m1 = cluster
        .node(0)
        .metrics
        .context("node 1 has a metrics port")?;
    let m3 = cluster
        .node(2)
        .metrics
        .context("node 3 has a metrics port")?;

    let samples = scrape_until(
        m1,
        "three alive members, a link to node 2 with its three lanes, a control group",
        |s| {
            value(s, "meshd_members{state=\"alive\"}") == 3.0
                && value(s, "meshd_links") == 1.0
                && value(s, "meshd_raft_voters") >= 1.0
                && value(s, "meshd_raft_term") >= 1.0
                && lane_value(s, "meshd_lane_received_frames_total", "2", "control") > 0.0
                && lane_value(s, "meshd_lane_received_frames_total", "2", "priority") > 0.0
        },
    )
    .await?;
    // Each lane of the link: its own connection, its own figures.
    for lane in ["data", "control", "priority"] {
        assert!(lane_value(&samples, "meshd_lane_sent_bytes_total", "2", lane) > 0.0);
        assert!(lane_value(&samples, "meshd_lane_rtt_seconds", "2", lane) >= 0.0);
        assert!(lane_value(&samples, "meshd_lane_queued_bytes", "2", lane) >= 0.0);
    }
    assert!(value(&samples, "meshd_link_rtt_seconds{peer=\"2\"}") >= 0.0);
    assert!(value(&samples, "meshd_link_sent_bytes_total{peer=\"2\"}") > 0.0);
    assert_eq!(value(&samples, "meshd_routes"), 2.0);
    assert_eq!(value(&samples, "meshd_mesh_health"), 1.0, "healthy");
    assert!(
        samples
            .keys()
            .any(|k| k.starts_with("meshd_lsdb_link_rtt_seconds{from=\"1\",to=\"2\"}")),
        "the link-state database's links"
    );
    // Queue depths and the storage backend.
    assert_eq!(value(&samples, "meshd_storage_up{backend=\"redb\"}"), 1.0);
    for gauge in ["meshd_shard_ring_items{", "meshd_shard_ring_bytes{"] {
        let rings = samples.keys().filter(|k| k.starts_with(gauge)).count();
        assert!(
            rings >= 3,
            "{gauge}: three rings per shard, {rings} samples"
        );
    }
    assert!(
        value(
            &samples,
            "meshd_destination_in_flight_bytes{destination=\"3\"}"
        ) >= 0.0
    );
    assert_eq!(value(&samples, "meshd_stream_unreleased_messages"), 0.0);
    println!("node 1 scrape: {} samples", samples.len());

    // Stream traffic: 200 messages from node 1 to node 3 (through node 2).
    let stream = open(cluster.node(0), &[3], 0).await?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sub = subscriber(
        cluster.node(2).api(),
        256,
        Arc::clone(&seen),
        Duration::ZERO,
    );
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    publish_all(cluster.node(0).api(), stream.clone(), (1, 200), 50, acked).await?;
    wait_complete(&seen, &stream, 200, SETTLE, "node 3").await?;
    let source = scrape_until(m1, "200 published and answered", |s| {
        value(s, "meshd_stream_published_total") == 200.0
            && value(s, "meshd_stream_ack_latency_seconds_count") >= 4.0
            && value(s, "meshd_stream_groups") == 1.0
    })
    .await?;
    assert!(value(&source, "meshd_storage_commit_latency_seconds_count") >= 1.0);
    let target = scrape_until(m3, "200 delivered and processed", |s| {
        value(s, "meshd_stream_delivered_total") >= 200.0
            && value(s, "meshd_stream_processed_total") == 200.0
    })
    .await?;
    println!(
        "stream: source ack latency sum {:.4} s over {} batches; target delivered {}",
        value(&source, "meshd_stream_ack_latency_seconds_sum"),
        value(&source, "meshd_stream_ack_latency_seconds_count"),
        value(&target, "meshd_stream_delivered_total"),
    );
    sub.abort();

    // Node 2 goes: node 1 loses its only link, then sees node 2 and node 3 leave "alive".
    cluster.node_mut(1).kill();
    let went = Instant::now();
    scrape_until(m1, "the link to node 2 gone", |s| {
        value(s, "meshd_links") == 0.0 && !s.contains_key("meshd_link_rtt_seconds{peer=\"2\"}")
    })
    .await?;
    println!("link down seen in the scrape after {:?}", went.elapsed());
    scrape_until(m1, "node 2 no longer alive", |s| {
        value(s, "meshd_members{state=\"alive\"}") < 3.0
    })
    .await?;

    // Anything but /metrics is not there.
    let (code, _) = http_get(m1, "/nope").await?;
    assert_eq!(code, 404);
    Ok(())
}

/// The page as Debian's chromium renders it, headless, after its scripts ran for a while.
fn render(url: &str) -> anyhow::Result<String> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("this test needs Debian's chromium (apt-get install chromium; .ci/run does)")?;
    let profile = tempfile::tempdir()?;
    let output = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Renders `url` until `want` holds of the DOM.
async fn render_until(
    url: &str,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let url = url.to_owned();
        let dom = tokio::task::spawn_blocking(move || render(&url)).await??;
        if want(&dom) {
            return Ok(dom);
        }
        if Instant::now() > deadline {
            bail!("the page never showed {what}; last DOM:\n{dom}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[meshd_tests::test]
async fn the_status_page_renders_every_member_in_a_browser_and_follows_a_link_going_down()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    let mut cluster = Cluster::start(vec![
        with_metrics(NodeSpec::listener(1)),
        with_metrics(NodeSpec::listener(2).dialing(vec![0])),
        with_metrics(NodeSpec::behind_nat(3, vec![1])),
    ])?;
    cluster.node(0).wait_for_routes(&[2, 3], SETTLE).await?;
    let url = format!(
        "http://{}/",
        cluster.node(0).metrics.context("metrics port")?
    );
    let started = Instant::now();
    let dom = render_until(
        &url,
        "every member, both links and both lanes to node 2",
        |dom| {
            [
                "member-1",
                "member-2",
                "member-3",
                "vertex-3",
                "edge-1-2",
                "edge-2-3",
                "route-3",
                "lane-2-data",
                "lane-2-control",
            ]
            .iter()
            .all(|id| dom.contains(&format!("id=\"{id}\"")))
        },
    )
    .await?;
    assert!(dom.contains("data-state=\"alive\""));
    println!(
        "page rendered with the whole mesh in {:?}",
        started.elapsed()
    );

    // The operator's command draws the same mesh.
    let grpc = cluster.node(0).grpc.to_string();
    let topology = |format: &str| -> anyhow::Result<String> {
        let output = std::process::Command::new(meshd_tests::meshd_binary()?)
            .args(["mesh", "--grpc", &grpc, "topology", "--format", format])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "meshd mesh topology failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };
    let dot = topology("dot")?;
    for needle in ["graph mesh {", "n1 -- n2", "n2 -- n3"] {
        assert!(dot.contains(needle), "{needle} in {dot}");
    }
    let svg = topology("svg")?;
    assert!(svg.contains("id=\"edge-2-3\"") && svg.contains("id=\"vertex-3\""));
    let text = topology("text")?;
    assert!(text.contains("node 1 sees the mesh HEALTHY"), "{text}");
    println!("{text}");

    // Node 3's only link goes: the page drops the edge and shows node 3 no longer alive.
    cluster.node_mut(2).kill();
    let went = Instant::now();
    render_until(
        &url,
        "the link to node 3 gone and node 3 not alive",
        |dom| {
            !dom.contains("id=\"edge-2-3\"")
                && dom.contains("id=\"member-3\"")
                && !dom.contains("id=\"member-3\" data-state=\"alive\"")
                && dom.contains("id=\"edge-1-2\"")
        },
    )
    .await?;
    println!(
        "the page followed the link going down within {:?}",
        went.elapsed()
    );
    Ok(())
}
