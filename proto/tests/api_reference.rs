//! `proto/API.md` is generated; this keeps the checked-in copy equal to what the .proto
//! comments render, so `cargo test --workspace` (CI) fails when they drift apart.

#[test]
fn the_checked_in_api_reference_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/API.md");
    let rendered = meshd_proto::reference::render().expect("the descriptor set decodes");
    // A missing file is stale too: the same message tells how to make it.
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    if checked_in != rendered {
        // Where they part, so a reviewer sees what changed without diffing 2000 lines.
        let line = checked_in
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(rendered.lines().count()));
        panic!(
            "proto/API.md is stale: run `{}`\n(first difference at line {})",
            meshd_proto::reference::COMMAND,
            line + 1
        );
    }
}
