//! Topology shapes and flag checks of `loadgen bench`.
use clap::Parser;

use super::*;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(line: &[&str]) -> BenchArgs {
    let mut argv = vec!["bench"];
    argv.extend_from_slice(line);
    Wrapper::parse_from(argv).args
}

#[test]
fn every_topology_dials_only_earlier_listeners_and_hides_the_asked_number_of_nodes() {
    for (topology, nat) in [("chain", 1), ("ring", 0), ("star", 3), ("random", 4)] {
        for seed in 0..20 {
            let specs = topology_specs(&args(&[
                "--topology",
                topology,
                "--nodes",
                "9",
                "--nat",
                &nat.to_string(),
                "--seed",
                &seed.to_string(),
            ]))
            .unwrap();
            assert_eq!(specs.len(), 9);
            assert_eq!(
                specs.iter().filter(|s| !s.listens).count(),
                nat,
                "{topology}"
            );
            for (i, spec) in specs.iter().enumerate() {
                for &d in &spec.dials {
                    assert!(d < i && specs[d].listens, "{topology}: {i} dials {d}");
                }
                assert!(
                    i == 0 || !spec.dials.is_empty(),
                    "{topology}: {i} is isolated"
                );
            }
        }
    }
}

#[test]
fn impossible_shapes_are_refused_with_a_reason() {
    let error = topology_specs(&args(&[
        "--topology",
        "chain",
        "--nat",
        "2",
        "--nodes",
        "5",
    ]))
    .unwrap_err();
    assert!(error.to_string().contains("--nat"), "{error}");
    assert!(topology_specs(&args(&["--nodes", "1"])).is_err());
}
