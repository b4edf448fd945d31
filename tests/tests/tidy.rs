//! Repository hygiene that CI enforces through `cargo test`: protocol cores stay pure, code is
//! formatted, and nothing shipped is a stub.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The sans-IO protocol cores: time and randomness come in as arguments, no runtime, socket or
/// storage crate is imported (ARCHITECTURE.md, "Architecture Invariant").
const PURE_CORES: &[&str] = &[
    "shards/src/frame.rs",
    "shards/src/handshake.rs",
    "shards/src/credential.rs",
    "shards/src/origin.rs",
    "shards/src/ownership.rs",
    "shards/src/backoff.rs",
    "shards/src/fib.rs",
    "shards/src/streams/mod.rs",
    "shards/src/streams/source.rs",
    "shards/src/streams/target.rs",
    "shards/src/streams/chunk.rs",
    "appliance/src/control/dial_plan.rs",
    "appliance/src/control/lsdb.rs",
    "appliance/src/control/lsa_auth.rs",
    "appliance/src/control/lifecycle/pake.rs",
    "appliance/src/control/trust.rs",
    "appliance/src/control/membership.rs",
    "appliance/src/control/membership/dissemination.rs",
    "appliance/src/control/paths.rs",
    "appliance/src/control/paths/cost.rs",
    "appliance/src/control/metrics.rs",
    "appliance/src/control/routing.rs",
    "appliance/src/control/types.rs",
    "appliance/src/control/raft/policy.rs",
    "appliance/src/control/live.rs",
    "appliance/src/api/tracker.rs",
    "appliance/src/api/recent.rs",
    "appliance/src/api/reports.rs",
    "appliance/src/api/tenant.rs",
    "appliance/src/topology.rs",
];

const FORBIDDEN_IN_CORES: &[&str] = &[
    "glommio",
    "tokio",
    "tonic",
    "redb",
    "std::net::TcpStream",
    "Instant::now",
    "SystemTime::now",
    "thread_rng",
    "async fn",
];

#[test]
fn protocol_cores_import_no_runtime_socket_or_storage_crate_and_read_no_clock() {
    let root = workspace();
    let mut problems = Vec::new();
    for core in PURE_CORES {
        let text = fs::read_to_string(root.join(core)).unwrap_or_else(|e| panic!("{core}: {e}"));
        // Only the code before the unit tests counts; tests may use whatever they like.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for word in FORBIDDEN_IN_CORES {
            if code.contains(word) {
                problems.push(format!("{core} uses `{word}`"));
            }
        }
        if !code.contains("#![forbid(unsafe_code)]") {
            problems.push(format!("{core} does not forbid unsafe code"));
        }
    }
    assert!(
        problems.is_empty(),
        "impure protocol cores:\n{}",
        problems.join("\n")
    );
}

/// Runs cargo (the one running this test) in the workspace.
fn cargo(args: &[&str]) -> std::process::Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    Command::new(cargo)
        .current_dir(workspace())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cargo {args:?}: {e}"))
}

#[test]
fn the_code_is_formatted() {
    let output = cargo(&["fmt", "--all", "--", "--check"]);
    assert!(
        output.status.success(),
        "run `cargo fmt --all`:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn shipped_code_has_no_todo_or_unimplemented_macros() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in ["appliance", "shards", "proto", "loadgen"] {
        rust_files(&root.join(dir), &mut files);
    }
    let stubs: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = fs::read_to_string(f).unwrap_or_default();
            text.contains(concat!("todo", "!(")) || text.contains(concat!("unimplemented", "!("))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(stubs.is_empty(), "stubs in shipped code: {stubs:?}");
}

/// Every multi-process test has an overall deadline: one wedged node fails its test, with the
/// nodes' log tails, instead of hanging the run. A plain tokio test attribute here has none.
#[test]
fn every_multi_process_test_has_an_overall_deadline() {
    let mut files = Vec::new();
    rust_files(&workspace().join("tests/tests"), &mut files);
    let plain: Vec<String> = files
        .iter()
        .filter(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .contains(concat!("#[tokio", "::test"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        plain.is_empty(),
        "use #[meshd_tests::test] (an overall limit) instead of a plain tokio test in {plain:?}"
    );
}

/// The features each crate meshd uses is built with, as `cargo tree` resolves them for `sel`.
fn resolved_features(sel: &[&str]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut args = vec!["tree"];
    args.extend(sel);
    args.extend(["-e", "normal,build", "--prefix", "none", "-f", "{p}|{f}"]);
    let output = cargo(&args);
    assert!(
        output.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut crates: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((package, features)) = line.trim_end_matches(" (*)").split_once('|') else {
            continue;
        };
        let package = package.replace(" (proc-macro)", "");
        let entry = crates.entry(package).or_default();
        entry.extend(
            features
                .split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_owned),
        );
        entry.sort();
        entry.dedup();
    }
    crates
}

/// `cargo build -p meshd` (what loadgen and the harness run) and `cargo build --workspace`
/// build one and the same meshd: every crate in meshd's tree gets the same features from both
/// (appliance/Cargo.toml's "feature alignment" block).
#[test]
fn meshd_alone_and_the_workspace_resolve_the_same_features() {
    let alone = resolved_features(&["-p", "meshd"]);
    let whole = resolved_features(&["--workspace"]);
    let drift: Vec<String> = alone
        .iter()
        .filter(|(package, _)| !package.starts_with("meshd"))
        .filter_map(|(package, features)| {
            let wanted = whole.get(package)?;
            (wanted != features).then(|| {
                let missing: Vec<&String> =
                    wanted.iter().filter(|f| !features.contains(f)).collect();
                format!("{package}: add features {missing:?}")
            })
        })
        .collect();
    assert!(
        drift.is_empty(),
        "meshd alone resolves other features than the workspace; add these to the feature \
         alignment block of appliance/Cargo.toml:\n{}",
        drift.join("\n")
    );
}
