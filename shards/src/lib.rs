//! meshd's data plane.
//!
//! Peer links and (later) streams are hashed onto shared-nothing shards, one glommio io_uring
//! executor per shard thread. Other threads talk to a shard only through its bounded ring.
//!
//! Pure protocol cores (no I/O, no runtime): [`frame`], [`handshake`], [`ownership`], [`fib`],
//! [`backoff`]. I/O shells: [`shard`] and the private `link` module. Thread plumbing: [`ring`].

pub mod backoff;
pub mod command;
pub mod congestion;
pub mod credential;
pub mod fib;
pub mod frame;
pub mod handle;
pub mod handshake;
mod link;
pub mod origin;
pub mod ownership;
pub mod priority;
mod read_budget;
pub mod ring;
pub mod shard;
mod slice;
pub mod stats;
pub mod streams;
pub mod tls;
mod watchdog;

pub use meshd_proto as proto;
