//! Generated protobuf and gRPC code for meshd.
//!
//! - [`mesh`]: `redbco.redbopen.mesh.v1`, the services reDB's `core` already calls (field
//!   numbers fixed by that client).
//! - [`link`]: `meshd.v1`, the payloads of meshd's own link frames (layout in `FRAMES.md`).
//! - [`supervisor`]: `redbco.redbopen.supervisor.v1`, the platform supervisor's services.
#![allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    elided_lifetimes_in_paths,
    clippy::all,
    clippy::pedantic
)]

/// `redbco.redbopen.mesh.v1`: MeshData and MeshControl, as `core` calls them.
pub mod mesh {
    tonic::include_proto!("redbco.redbopen.mesh.v1");
}

/// `meshd.v1`: messages carried in link frames between meshd processes.
pub mod link {
    tonic::include_proto!("meshd.v1");
}

/// `redbco.redbopen.supervisor.v1`: what the platform's supervisor asks of meshd
/// (ServiceControllerService) and what meshd tells it (SupervisorService).
pub mod supervisor {
    tonic::include_proto!("redbco.redbopen.supervisor.v1");
}

/// Encoded `FileDescriptorSet` of every schema here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
