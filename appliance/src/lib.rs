//! meshd, the mesh network appliance: everything but the data plane.
//!
//! - [`config`]: TOML + environment configuration, validated.
//! - [`storage`]: the redb control database (identity, peers).
//! - [`control`]: the control thread (reconnect policy, sessions).
//! - [`api`]: the tokio thread serving gRPC.
//! - [`node`]: start-up and shut-down order.

pub mod api;
pub mod config;
pub mod control;
pub mod node;
pub mod storage;
