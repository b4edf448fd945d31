//! Compiles the .proto files with protox (pure Rust), so no hand-installed `protoc` is needed,
//! and keeps the encoded descriptor set for gRPC reflection.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/mesh/v1/data.proto",
    "proto/mesh/v1/control.proto",
    "proto/meshd/v1/link.proto",
    "proto/meshd/v1/mesh.proto",
    "proto/supervisor/v1/supervisor.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Every RPC without a handler answers UNIMPLEMENTED, as the README promises.
        .generate_default_stubs(true)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
