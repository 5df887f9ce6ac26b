//! The Tern server engine: shards, routing, sessions and chat features.
//!
//! A server is `N` shards, one glommio executor pinned per core
//! ([`server`]). Every user and group has a home shard (a stable hash of its
//! id, [`tern_proto::shard_of`]); a connection moves to its user's home
//! shard once logged in ([`conn`]), and a shard owns its users' sessions,
//! its conversations' sequence counters and its groups' member lists
//! outright ([`shard`]), so the message path takes no lock. Shards exchange
//! work only through bounded queues ([`mesh`]); each connection has a
//! bounded outbound queue ([`outbox`]). Messages are sequenced and
//! committed in batches by their conversation's home shard and read back
//! on sync ([`catchup`]). Durable state lives in
//! [`tern_storage`]; limits and defaults are in [`config`].
//!
//! `docs/architecture.md` draws the picture.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod catchup;
pub mod config;
pub mod config_file;
pub mod conn;
pub mod filter;
pub mod http;
pub mod jwt;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod outbox;
pub mod park;
pub mod server;
pub mod shard;
mod stop;

pub use config::Config;
pub use server::Server;
