//! Tests for path computation: data-driven fixtures under `testdata/` plus
//! property tests on seeded random graphs.
//!
//! Fixture format (one directive per line, `#` starts a comment):
//! - `link A B rtt_us=… loss_ppm=… util_ppm=… bw_bps=… [oneway]`: both
//!   nodes advertise the link with these metrics, or only A with `oneway`;
//!   omitted metrics are 0. Every node named gets an LSA.
//! - `node A`: an LSA with no adjacencies.
//! - `k N`: the k for the following queries (default 1).
//! - `from S to D`: followed by `expect A-B-C cost≈X.XX` lines, or
//!   `expect none`.
//! - `table S`: followed by one `expect to D via P(w=W,cost≈X.XX) … [backup
//!   P(cost≈X.XX) …]` line per route of S's routing table, or `expect none`.
//!
//! Run with `UPDATE_EXPECT=1` to rewrite the `expect` lines from the current
//! results (then review the diff).

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, VecDeque};

type Adverts = BTreeMap<u64, BTreeMap<u64, LinkMetrics>>;

fn lsas_from_adverts(adverts: &Adverts) -> Vec<Lsa> {
    adverts
        .iter()
        .map(|(&origin, links)| Lsa {
            origin,
            seq: 1,
            adjacencies: links
                .iter()
                .map(|(&neighbor, &metrics)| Adjacency { neighbor, metrics })
                .collect(),
        })
        .collect()
}

fn testdata_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join("paths")
}

fn parse_metrics(fields: &[&str], context: &str) -> (LinkMetrics, bool) {
    let mut metrics = LinkMetrics::default();
    let mut oneway = false;
    for field in fields {
        if *field == "oneway" {
            oneway = true;
            continue;
        }
        let (key, value) = field
            .split_once('=')
            .unwrap_or_else(|| panic!("{context}: bad field {field:?}"));
        fn number<T: std::str::FromStr>(value: &str, context: &str) -> T {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{context}: bad number {value:?}"))
        }
        match key {
            "rtt_us" => metrics.rtt_us = number(value, context),
            "loss_ppm" => metrics.loss_ppm = number(value, context),
            "util_ppm" => metrics.utilisation_ppm = number(value, context),
            "bw_bps" => metrics.bandwidth_bps = number(value, context),
            _ => panic!("{context}: unknown field {key:?}"),
        }
    }
    (metrics, oneway)
}

fn parse_node(word: Option<&&str>, context: &str) -> u64 {
    word.and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{context}: expected a node id"))
}

fn format_path(path: &Path) -> String {
    let nodes: Vec<String> = path.nodes.iter().map(u64::to_string).collect();
    format!("expect {} cost≈{:.2}", nodes.join("-"), path.cost)
}

fn format_route(route: &Route) -> String {
    let hops: Vec<String> = route
        .next_hops
        .iter()
        .map(|h| format!("{}(w={},cost≈{:.2})", h.peer, h.weight, h.cost))
        .collect();
    let backups: Vec<String> = route
        .backups
        .iter()
        .map(|h| format!(" backup {}(cost≈{:.2})", h.peer, h.cost))
        .collect();
    format!(
        "expect to {} via {}{}",
        route.destination,
        hops.join(" "),
        backups.concat()
    )
}

/// Recomputes a fixture's text: every `expect` line is replaced by what the
/// code produces now.
fn render_fixture(name: &str, text: &str) -> String {
    let mut adverts: Adverts = BTreeMap::new();
    for (line_no, line) in text.lines().enumerate() {
        let context = format!("{name}:{}", line_no + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("link") => {
                let a = parse_node(words.get(1), &context);
                let b = parse_node(words.get(2), &context);
                let (metrics, oneway) = parse_metrics(&words[3..], &context);
                adverts.entry(a).or_default().insert(b, metrics);
                let back = adverts.entry(b).or_default();
                if !oneway {
                    back.insert(a, metrics);
                }
            }
            Some("node") => {
                adverts
                    .entry(parse_node(words.get(1), &context))
                    .or_default();
            }
            _ => {}
        }
    }
    let topology = Topology::from_lsas(&lsas_from_adverts(&adverts));
    let weights = CostWeights::default();

    let mut out = String::new();
    let mut k = 1;
    for (line_no, line) in text.lines().enumerate() {
        let context = format!("{name}:{}", line_no + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut expectations = Vec::new();
        match words.first().copied() {
            Some("expect") => continue,
            Some("k") => k = parse_node(words.get(1), &context) as usize,
            Some("from") => {
                assert_eq!(words.get(2), Some(&"to"), "{context}: from S to D");
                let from = parse_node(words.get(1), &context);
                let to = parse_node(words.get(3), &context);
                let paths = k_shortest_paths(&topology, &weights, from, to, k);
                expectations.extend(paths.iter().map(format_path));
            }
            Some("table") => {
                let local = parse_node(words.get(1), &context);
                let table = routing_table(&topology, &weights, local, k);
                expectations.extend(table.values().map(format_route));
            }
            Some("link" | "node" | "#") | None => {}
            Some(other) if other.starts_with('#') => {}
            Some(other) => panic!("{context}: unknown directive {other:?}"),
        }
        out.push_str(line);
        out.push('\n');
        if matches!(words.first().copied(), Some("from" | "table")) {
            if expectations.is_empty() {
                expectations.push("expect none".to_string());
            }
            for e in expectations {
                out.push_str(&e);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn fixtures_match_expectations() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some_and(|v| v == "1");
    let mut files: Vec<_> = std::fs::read_dir(testdata_dir())
        .expect("testdata directory")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "expected the fixture files, found {files:?}"
    );
    let mut mismatched = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(file).expect("read fixture");
        let rendered = render_fixture(&name, &text);
        if rendered != text {
            if update {
                std::fs::write(file, &rendered).expect("write fixture");
            } else {
                mismatched.push(format!(
                    "--- {name} (expected)\n{text}+++ {name} (actual)\n{rendered}"
                ));
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "fixtures differ (rerun with UPDATE_EXPECT=1 to accept):\n{}",
        mismatched.join("\n")
    );
}

fn metrics(rtt_us: u64, loss_ppm: u32, utilisation_ppm: u32, bandwidth_bps: u64) -> LinkMetrics {
    LinkMetrics {
        rtt_us,
        loss_ppm,
        utilisation_ppm,
        bandwidth_bps,
    }
}

#[test]
fn cost_weights_default_and_validate() {
    let w = CostWeights::default();
    assert_eq!(
        w,
        CostWeights {
            alpha: 1.0,
            beta: 0.5,
            gamma: 2.0,
            delta: 50.0,
            epsilon: 0.1
        }
    );
    assert!(w.validate().is_ok());
    let zeros = CostWeights {
        alpha: 0.0,
        beta: 0.0,
        gamma: 0.0,
        delta: 0.0,
        epsilon: 1.0,
    };
    assert!(zeros.validate().is_ok());
    for bad in [
        CostWeights { alpha: -1.0, ..w },
        CostWeights {
            beta: f64::NAN,
            ..w
        },
        CostWeights {
            gamma: f64::INFINITY,
            ..w
        },
        CostWeights {
            delta: -0.0001,
            ..w
        },
        CostWeights { epsilon: 0.0, ..w },
        CostWeights {
            epsilon: f64::NAN,
            ..w
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn link_cost_matches_formula() {
    let w = CostWeights::default();
    // 10 ms rtt → 5 ms one way; 100 Mbit/s → 10; 50 % util; 1 % loss.
    let m = metrics(10_000, 10_000, 500_000, 100_000_000);
    let expected = 1.0 * 5.0 + 0.5 * 10.0 + 2.0 * 0.5 + 50.0 * 0.01 + 0.1;
    assert!((link_cost(&m, &w) - expected).abs() < 1e-12);
    // Unknown bandwidth counts as 1 Gbit/s; all-zero metrics cost beta + epsilon.
    assert!((link_cost(&LinkMetrics::default(), &w) - 0.6).abs() < 1e-12);
}

#[test]
fn link_cost_is_monotone_in_each_metric() {
    let w = CostWeights::default();
    let base = metrics(5_000, 1_000, 100_000, 100_000_000);
    let rtts = [0, 1, 999, 1_000, 20_000, 1 << 40, u64::MAX];
    let ppms = [0, 1, 500, 999_999, 1_000_000, 2_000_000, u32::MAX];
    let bws = [
        1,
        1_000,
        1_000_000,
        1_000_000_000,
        100_000_000_000,
        u64::MAX,
    ];
    let check = |values: &[f64], what: &str, increasing: bool| {
        for pair in values.windows(2) {
            let ok = if increasing {
                pair[0] <= pair[1]
            } else {
                pair[0] >= pair[1]
            };
            assert!(ok, "{what} not monotone: {values:?}");
        }
    };
    let by_rtt: Vec<f64> = rtts
        .iter()
        .map(|&rtt_us| link_cost(&LinkMetrics { rtt_us, ..base }, &w))
        .collect();
    check(&by_rtt, "rtt", true);
    let by_loss: Vec<f64> = ppms
        .iter()
        .map(|&loss_ppm| link_cost(&LinkMetrics { loss_ppm, ..base }, &w))
        .collect();
    check(&by_loss, "loss", true);
    let by_util: Vec<f64> = ppms
        .iter()
        .map(|&utilisation_ppm| {
            link_cost(
                &LinkMetrics {
                    utilisation_ppm,
                    ..base
                },
                &w,
            )
        })
        .collect();
    check(&by_util, "utilisation", true);
    let by_bw: Vec<f64> = bws
        .iter()
        .map(|&bandwidth_bps| {
            link_cost(
                &LinkMetrics {
                    bandwidth_bps,
                    ..base
                },
                &w,
            )
        })
        .collect();
    check(&by_bw, "bandwidth", false);
    // Strictly monotone where nothing clamps.
    assert!(by_rtt[3] < by_rtt[4] && by_loss[1] < by_loss[3] && by_util[1] < by_util[3]);
    assert!(by_bw[2] > by_bw[3]);
}

#[test]
fn link_cost_is_finite_and_positive_for_extreme_inputs() {
    let extremes = [
        metrics(u64::MAX, u32::MAX, u32::MAX, 0),
        metrics(u64::MAX, 0, 0, 1),
        metrics(0, 0, 0, 0),
        metrics(0, 0, 0, u64::MAX),
        metrics(u64::MAX, u32::MAX, u32::MAX, u64::MAX),
    ];
    let d = CostWeights::default();
    let weight_sets = [
        d,
        CostWeights {
            alpha: 0.0,
            beta: 0.0,
            gamma: 0.0,
            delta: 0.0,
            epsilon: 1e-300,
        },
        CostWeights {
            alpha: f64::MAX,
            beta: f64::MAX,
            ..d
        },
        // Invalid weights must still produce usable costs.
        CostWeights {
            alpha: f64::NAN,
            ..d
        },
        CostWeights {
            alpha: f64::INFINITY,
            beta: f64::NEG_INFINITY,
            ..d
        },
        CostWeights {
            alpha: -5.0,
            epsilon: -1.0,
            ..d
        },
        CostWeights {
            epsilon: 0.0,
            alpha: 0.0,
            beta: 0.0,
            gamma: 0.0,
            delta: 0.0,
        },
        CostWeights {
            epsilon: f64::INFINITY,
            ..d
        },
    ];
    for w in &weight_sets {
        for m in &extremes {
            let c = link_cost(m, w);
            assert!(
                c.is_finite() && c > 0.0 && c <= MAX_LINK_COST,
                "{m:?} {w:?} → {c}"
            );
            if w.validate().is_ok() {
                assert!(c >= w.epsilon);
            }
        }
    }
    assert_eq!(link_cost(&metrics(u64::MAX, 0, 0, 0), &d), MAX_LINK_COST);
}

fn lsa(origin: u64, seq: u64, neighbors: &[(u64, LinkMetrics)]) -> Lsa {
    Lsa {
        origin,
        seq,
        adjacencies: neighbors
            .iter()
            .map(|&(neighbor, metrics)| Adjacency { neighbor, metrics })
            .collect(),
    }
}

#[test]
fn topology_requires_both_ends_and_tolerates_garbage() {
    let m = metrics(1_000, 0, 0, 0);
    let slow = metrics(9_000, 0, 0, 0);
    let lsas = vec![
        // Unsorted, duplicate neighbour, self-loop, node 0 and an unknown node.
        lsa(1, 1, &[(3, m), (2, m), (2, slow), (1, m), (0, m), (77, m)]),
        lsa(2, 1, &[(1, slow)]),
        // 3 does not list 1: no edge either way.
        lsa(3, 1, &[(2, m)]),
        lsa(0, 1, &[(1, m)]),
    ];
    let t = Topology::from_lsas(&lsas);
    assert_eq!(t.nodes().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(t.contains(1) && !t.contains(0) && !t.contains(77));
    // Only 1↔2; 3 lists 2 but 2 does not list 3.
    assert_eq!(t.edge_count(), 2);
    assert_eq!(t.link(1, 2), Some(&m), "first adjacency wins, u's view");
    assert_eq!(t.link(2, 1), Some(&slow));
    assert_eq!(t.link(1, 3), None);
    assert_eq!(t.neighbors(1), vec![2]);
    assert!(t.neighbors(42).is_empty());
    let empty = Topology::from_lsas(&[]);
    assert_eq!(empty.nodes().count(), 0);
    assert!(routing_table(&empty, &CostWeights::default(), 1, 3).is_empty());
}

#[test]
fn topology_keeps_newest_lsa_regardless_of_order() {
    let m = metrics(1_000, 0, 0, 0);
    let old = lsa(1, 5, &[(2, m)]);
    let new = lsa(1, 6, &[(3, m)]);
    let tie_a = lsa(1, 6, &[(2, m)]);
    let others = [lsa(2, 1, &[(1, m)]), lsa(3, 1, &[(1, m)])];
    let build = |order: &[&Lsa]| {
        let t = Topology::from_lsas(order.iter().copied().chain(others.iter()));
        (t.neighbors(1), t.edge_count())
    };
    assert_eq!(build(&[&old, &new]), (vec![3], 2));
    assert_eq!(build(&[&new, &old]), (vec![3], 2));
    // Same seq: the choice must not depend on arrival order.
    assert_eq!(build(&[&new, &tie_a]), build(&[&tie_a, &new]));
}

#[test]
fn k_zero_unknown_and_trivial_queries() {
    let m = LinkMetrics::default();
    let t = Topology::from_lsas(&[lsa(1, 1, &[(2, m)]), lsa(2, 1, &[(1, m)])]);
    let w = CostWeights::default();
    assert!(k_shortest_paths(&t, &w, 1, 2, 0).is_empty());
    assert!(k_shortest_paths(&t, &w, 1, 9, 3).is_empty());
    assert!(k_shortest_paths(&t, &w, 9, 1, 3).is_empty());
    assert_eq!(
        k_shortest_paths(&t, &w, 1, 1, 3),
        vec![Path {
            nodes: vec![1],
            cost: 0.0
        }]
    );
    assert!(routing_table(&t, &w, 1, 0).is_empty());
    assert!(routing_table(&t, &w, 9, 3).is_empty());
    assert_eq!(shortest_path(&t, &w, 1, 9), None);
    // An absurd k only returns what exists and does not pre-allocate.
    assert_eq!(k_shortest_paths(&t, &w, 1, 2, usize::MAX).len(), 1);
}

#[test]
fn next_hop_weights_are_proportional_and_sum_to_total() {
    assert!(next_hop_weights(&[]).is_empty());
    assert_eq!(next_hop_weights(&[3.0]), vec![1000]);
    assert_eq!(next_hop_weights(&[1.0, 1.0]), vec![500, 500]);
    assert_eq!(next_hop_weights(&[1.0, 1.0, 1.0]), vec![334, 333, 333]);
    assert_eq!(next_hop_weights(&[1.0, 3.0]), vec![750, 250]);
    let w = next_hop_weights(&[1.0, 1e12, f64::MIN_POSITIVE, 2.0]);
    assert_eq!(w.iter().sum::<u32>(), 1000);
    assert!(w.iter().all(|&x| x >= 1));
    let many = next_hop_weights(&vec![1.0; 1500]);
    assert_eq!(many.len(), 1000);
    assert!(many.iter().all(|&x| x == 1));
    for costs in [vec![f64::NAN, 1.0], vec![0.0, -1.0], vec![f64::INFINITY; 3]] {
        let w = next_hop_weights(&costs);
        assert_eq!(w.iter().sum::<u32>(), 1000, "{costs:?}");
        assert!(w.iter().all(|&x| x >= 1));
    }
}

fn random_metrics(rng: &mut StdRng) -> LinkMetrics {
    // Some all-zero metrics so that exact cost ties occur too.
    if rng.gen_bool(0.1) {
        return LinkMetrics::default();
    }
    metrics(
        rng.gen_range(0..60_000),
        rng.gen_range(0..50_000),
        rng.gen_range(0..1_000_000),
        [0, 10_000_000, 100_000_000, 1_000_000_000][rng.gen_range(0..4)],
    )
}

/// Random adverts on nodes 1..=n: `links` random pairs, each direction with
/// its own metrics, and a fraction of them advertised by one side only.
fn random_adverts(rng: &mut StdRng, n: u64, links: usize, oneway: f64) -> Adverts {
    let mut adverts: Adverts = (1..=n).map(|id| (id, BTreeMap::new())).collect();
    for _ in 0..links {
        let a = rng.gen_range(1..=n);
        let b = rng.gen_range(1..=n);
        if a == b {
            continue;
        }
        let forward = random_metrics(rng);
        adverts.entry(a).or_default().insert(b, forward);
        if !rng.gen_bool(oneway) {
            let back = random_metrics(rng);
            adverts.entry(b).or_default().insert(a, back);
        }
    }
    adverts
}

/// Cost of u→v computed straight from the adverts, independent of Topology.
fn advert_cost(adverts: &Adverts, u: u64, v: u64, w: &CostWeights) -> Option<f64> {
    let m = adverts.get(&u)?.get(&v)?;
    adverts.get(&v)?.get(&u)?;
    Some(link_cost(m, w))
}

fn assert_valid_path(adverts: &Adverts, path: &Path, from: u64, to: u64, w: &CostWeights) {
    assert_eq!(path.nodes.first(), Some(&from));
    assert_eq!(path.nodes.last(), Some(&to));
    let distinct: BTreeSet<u64> = path.nodes.iter().copied().collect();
    assert_eq!(distinct.len(), path.nodes.len(), "loop in {path:?}");
    let mut cost = 0.0;
    for pair in path.nodes.windows(2) {
        cost += advert_cost(adverts, pair[0], pair[1], w)
            .unwrap_or_else(|| panic!("{path:?} uses a missing edge {pair:?}"));
    }
    assert!(
        (cost - path.cost).abs() <= 1e-9 * cost.max(1.0),
        "{path:?} vs {cost}"
    );
}

#[test]
fn yen_on_random_graphs_is_loopless_distinct_sorted_and_starts_with_dijkstra() {
    let w = CostWeights::default();
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for _round in 0..20 {
        let n = rng.gen_range(5..40);
        let links = rng.gen_range(n as usize..(n as usize * 3));
        let adverts = random_adverts(&mut rng, n, links, 0.1);
        let topology = Topology::from_lsas(&lsas_from_adverts(&adverts));

        // Reference Dijkstra: petgraph's own, on a graph built independently.
        let mut reference = petgraph::graphmap::DiGraphMap::<u64, f64>::new();
        for &u in adverts.keys() {
            reference.add_node(u);
            for &v in adverts[&u].keys() {
                if let Some(c) = advert_cost(&adverts, u, v, &w) {
                    reference.add_edge(u, v, c);
                }
            }
        }
        for _query in 0..5 {
            let from = rng.gen_range(1..=n);
            let to = rng.gen_range(1..=n);
            let k = rng.gen_range(1..8);
            let paths = k_shortest_paths(&topology, &w, from, to, k);
            let reference_dist = petgraph::algo::dijkstra(&reference, from, Some(to), |e| *e.2);
            match reference_dist.get(&to) {
                None => assert!(paths.is_empty()),
                Some(&best) => {
                    let first = paths.first().expect("reachable → a path");
                    assert!((first.cost - best).abs() <= 1e-9 * best.max(1.0));
                    assert_eq!(Some(first), shortest_path(&topology, &w, from, to).as_ref());
                }
            }
            assert!(paths.len() <= k);
            let distinct: BTreeSet<&Vec<u64>> = paths.iter().map(|p| &p.nodes).collect();
            assert_eq!(distinct.len(), paths.len(), "duplicate paths {paths:?}");
            for p in &paths {
                assert_valid_path(&adverts, p, from, to, &w);
            }
            for pair in paths.windows(2) {
                let (a, b) = (pair[0].cost, pair[1].cost);
                assert!(a <= b || approx_eq(a, b), "costs decrease: {paths:?}");
            }
        }
    }
}

fn all_simple_paths(adverts: &Adverts, from: u64, to: u64, w: &CostWeights) -> Vec<Path> {
    fn walk(
        adverts: &Adverts,
        to: u64,
        w: &CostWeights,
        stack: &mut Vec<u64>,
        cost: f64,
        out: &mut Vec<Path>,
    ) {
        let Some(&at) = stack.last() else { return };
        if at == to {
            out.push(Path {
                nodes: stack.clone(),
                cost,
            });
            return;
        }
        for &next in adverts[&at].keys() {
            if stack.contains(&next) {
                continue;
            }
            if let Some(c) = advert_cost(adverts, at, next, w) {
                stack.push(next);
                walk(adverts, to, w, stack, cost + c, out);
                stack.pop();
            }
        }
    }
    let mut out = Vec::new();
    walk(adverts, to, w, &mut vec![from], 0.0, &mut out);
    out.sort_by(|a, b| a.cost.total_cmp(&b.cost).then(a.nodes.cmp(&b.nodes)));
    out
}

#[test]
fn yen_matches_brute_force_on_small_graphs() {
    let w = CostWeights::default();
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    for _round in 0..40 {
        let n = rng.gen_range(3..8);
        let links = rng.gen_range(3..16);
        let adverts = random_adverts(&mut rng, n, links, 0.05);
        let topology = Topology::from_lsas(&lsas_from_adverts(&adverts));
        for from in 1..=n {
            for to in 1..=n {
                let k = 6;
                let got = k_shortest_paths(&topology, &w, from, to, k);
                let all = all_simple_paths(&adverts, from, to, &w);
                assert_eq!(
                    got.len(),
                    all.len().min(k),
                    "{from}→{to}: {got:?} vs {all:?}"
                );
                for (g, e) in got.iter().zip(&all) {
                    assert!(approx_eq(g.cost, e.cost), "{from}→{to}: {got:?} vs {all:?}");
                    assert!(all.iter().any(|p| p.nodes == g.nodes));
                }
            }
        }
    }
}

#[test]
fn equal_cost_paths_are_ordered_by_node_sequence() {
    // Four equal two-hop paths 1→{5,3,9,4}→2, all metrics zero.
    let m = LinkMetrics::default();
    let mut lsas = vec![lsa(1, 1, &[(3, m), (4, m), (5, m), (9, m)])];
    lsas.push(lsa(2, 1, &[(3, m), (4, m), (5, m), (9, m)]));
    for mid in [3, 4, 5, 9] {
        lsas.push(lsa(mid, 1, &[(1, m), (2, m)]));
    }
    let t = Topology::from_lsas(&lsas);
    let w = CostWeights::default();
    let paths = k_shortest_paths(&t, &w, 1, 2, 10);
    let seqs: Vec<Vec<u64>> = paths.iter().map(|p| p.nodes.clone()).collect();
    assert_eq!(
        seqs,
        vec![vec![1, 3, 2], vec![1, 4, 2], vec![1, 5, 2], vec![1, 9, 2]]
    );
    // Shuffled LSA order yields identical results.
    lsas.reverse();
    assert_eq!(
        k_shortest_paths(&Topology::from_lsas(&lsas), &w, 1, 2, 10),
        paths
    );
    let table = routing_table(&t, &w, 1, 4);
    let hops: Vec<(u64, u32)> = table[&2]
        .next_hops
        .iter()
        .map(|h| (h.peer, h.weight))
        .collect();
    assert_eq!(hops, vec![(3, 250), (4, 250), (5, 250), (9, 250)]);
}

fn bfs_reachable(adverts: &Adverts, from: u64) -> BTreeSet<u64> {
    let mut seen = BTreeSet::from([from]);
    let mut queue = VecDeque::from([from]);
    while let Some(u) = queue.pop_front() {
        for &v in adverts[&u].keys() {
            let agreed = adverts.get(&v).is_some_and(|l| l.contains_key(&u));
            if agreed && seen.insert(v) {
                queue.push_back(v);
            }
        }
    }
    seen.remove(&from);
    seen
}

#[test]
fn routing_table_weights_sum_and_alternates_are_loop_free() {
    let w = CostWeights::default();
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut alternates_seen = 0;
    for _round in 0..8 {
        let n = rng.gen_range(10..40);
        let adverts = random_adverts(&mut rng, n, n as usize * 2, 0.05);
        let topology = Topology::from_lsas(&lsas_from_adverts(&adverts));
        let local = rng.gen_range(1..=n);
        let k = rng.gen_range(1..5);
        let table = routing_table(&topology, &w, local, k);
        for (&dest, route) in &table {
            assert_eq!(route.destination, dest);
            assert!(!route.paths.is_empty() && route.paths.len() <= k);
            assert_eq!(route.paths, k_shortest_paths(&topology, &w, local, dest, k));
            let hops = &route.next_hops;
            assert_eq!(hops.first().map(|h| h.peer), Some(route.paths[0].nodes[1]));
            assert_eq!(hops.iter().map(|h| h.weight).sum::<u32>(), 1000);
            assert!(hops.iter().all(|h| h.weight >= 1));
            let peers: BTreeSet<u64> = hops.iter().map(|h| h.peer).collect();
            assert_eq!(peers.len(), hops.len(), "duplicate next hops");
            let dist_local_dest = route.paths[0].cost;
            let dist = |a, b| shortest_path(&topology, &w, a, b).map(|p| p.cost);
            for hop in &hops[1..] {
                alternates_seen += 1;
                let n_d = dist(hop.peer, dest).expect("alternate reaches dest");
                assert!(
                    n_d < dist_local_dest,
                    "{local}→{dest} via {} is not downstream",
                    hop.peer
                );
                assert!(route.paths.iter().any(|p| p.nodes[1] == hop.peer));
            }
            for backup in &route.backups {
                alternates_seen += 1;
                let n_d = dist(backup.peer, dest).expect("backup reaches dest");
                let n_local = dist(backup.peer, local).expect("neighbour reaches local");
                assert!(n_d >= dist_local_dest, "a downstream hop is not a backup");
                assert!(
                    n_d < n_local + dist_local_dest,
                    "{local}→{dest} backup {} is not loop-free",
                    backup.peer
                );
                assert!(!peers.contains(&backup.peer));
            }
            // Cheaper next hops get at least as much traffic.
            for pair in hops.windows(2) {
                if pair[0].cost < pair[1].cost {
                    assert!(pair[0].weight >= pair[1].weight);
                }
            }
        }
    }
    assert!(
        alternates_seen > 20,
        "test graphs too poor: {alternates_seen}"
    );
}

#[test]
fn routing_table_200_nodes_covers_exactly_bfs_reachable() {
    let w = CostWeights::default();
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    // Sparse enough to leave several components and isolated nodes.
    let adverts = random_adverts(&mut rng, 200, 180, 0.1);
    let topology = Topology::from_lsas(&lsas_from_adverts(&adverts));
    for local in [1, 50, 199] {
        let table = routing_table(&topology, &w, local, 3);
        let reachable = bfs_reachable(&adverts, local);
        let covered: BTreeSet<u64> = table.keys().copied().collect();
        assert_eq!(covered, reachable, "local {local}");
    }
    // And on a connected one, every other node is covered.
    let mut connected = random_adverts(&mut rng, 200, 600, 0.0);
    for id in 2..=200u64 {
        let m = random_metrics(&mut rng);
        connected.entry(id - 1).or_default().insert(id, m);
        connected.entry(id).or_default().insert(id - 1, m);
    }
    let topology = Topology::from_lsas(&lsas_from_adverts(&connected));
    let table = routing_table(&topology, &w, 7, 3);
    assert_eq!(table.len(), 199);
    assert_eq!(bfs_reachable(&connected, 7).len(), 199);
}
