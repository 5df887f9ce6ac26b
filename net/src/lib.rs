//! Moving Tern frames over sockets on glommio's io_uring reactor.
//!
//! This crate owns the I/O edge of the server and of glommio-based clients
//! (the load generator): binding a port that every shard accepts on
//! ([`listen`]), splitting a stream into a reader and a writer that live in
//! separate tasks of the same executor ([`split`]), reading frames into a
//! [`tern_proto::FrameBuf`] and writing batches of encoded frames
//! ([`frame_io`]), moving an accepted socket to another shard ([`handoff`]),
//! sizing glommio's registered I/O memory to the process's locked-memory
//! limit ([`memlock`]), TLS on those sockets ([`tls`]), and one stream type
//! for both ([`transport`]), closing a connection without resetting
//! it ([`linger`]), and reading the files an operator names with a bound
//! on their size ([`files`]). It knows
//! nothing of users or messages: that is the engine's business.
// Bytes from peers and errors from the kernel reach every function here.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod files;
pub mod frame_io;
pub mod handoff;
pub mod linger;
pub mod listen;
pub mod memlock;
pub mod split;
pub mod tls;
pub mod transport;
