//! Rewrites `proto/API.md` from the .proto comments: `cargo run -p meshd-proto --bin
//! api-reference`. The drift test (`tests/api_reference.rs`) fails until this has run after
//! a schema or comment change.

use std::{path::Path, process::ExitCode};

fn main() -> ExitCode {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("API.md");
    let text = match meshd_proto::reference::render() {
        Ok(text) => text,
        Err(e) => {
            eprintln!("the compiled descriptor set does not decode ({e}); rebuild meshd-proto");
            return ExitCode::FAILURE;
        }
    };
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        println!("{} is up to date", path.display());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = std::fs::write(&path, &text) {
        eprintln!("cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {} ({} bytes)", path.display(), text.len());
    ExitCode::SUCCESS
}
