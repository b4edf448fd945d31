//! meshd, the mesh network appliance: everything but the data plane.
//!
//! - [`config`]: TOML + environment configuration, validated.
//! - [`storage`]: the redb control database (identity, peers, mesh, evictions).
//! - [`backend`]: the mesh store trait and its backends (redb, PostgreSQL, Redis).
//! - [`control`]: the control thread (reconnect policy, routing, membership, lifecycle).
//! - [`api`]: the tokio thread serving gRPC.
//! - [`node`]: start-up and shut-down order.
//! - [`cli`]: `meshd mesh …`, the operator's lifecycle commands.

pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod metrics;
pub mod node;
pub mod storage;
pub mod streams;
pub mod topology;
