//! Generated protobuf and gRPC code for meshd, and its API reference.
//!
//! - [`mesh`]: `redbco.redbopen.mesh.v1`, the services reDB's `core` already calls (field
//!   numbers fixed by that client).
//! - [`link`]: `meshd.v1`, the payloads of meshd's own link frames (layout in `FRAMES.md`).
//! - [`supervisor`]: `redbco.redbopen.supervisor.v1`, the platform supervisor's services.
//! - [`reference`]: `API.md`, rendered from the schemas' comments.

/// `redbco.redbopen.mesh.v1`: MeshData and MeshControl, as `core` calls them.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    elided_lifetimes_in_paths,
    clippy::all,
    clippy::pedantic
)]
pub mod mesh {
    tonic::include_proto!("redbco.redbopen.mesh.v1");
}

/// `meshd.v1`: messages carried in link frames between meshd processes.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    elided_lifetimes_in_paths,
    clippy::all,
    clippy::pedantic
)]
pub mod link {
    tonic::include_proto!("meshd.v1");
}

/// `redbco.redbopen.supervisor.v1`: what the platform's supervisor asks of meshd
/// (ServiceControllerService) and what meshd tells it (SupervisorService).
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    elided_lifetimes_in_paths,
    clippy::all,
    clippy::pedantic
)]
pub mod supervisor {
    tonic::include_proto!("redbco.redbopen.supervisor.v1");
}

pub mod reference;

/// Encoded `FileDescriptorSet` of every schema here, for gRPC server reflection and the API
/// reference (source code info included: the comments).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
