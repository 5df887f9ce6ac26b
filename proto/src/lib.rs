//! Tern's wire protocol, with no I/O.
//!
//! This crate owns everything a peer must agree on to talk to `ternd`: the
//! frame layout (an 8-byte header, then an rkyv archive padded to 8 bytes),
//! the message types that travel in frames ([`ClientFrame`], [`ServerFrame`]),
//! the identifiers and the stable hash that maps them to home shards
//! ([`ids`]), the input limits every party enforces ([`limits`]), and the
//! per-connection session state machine ([`session`]). It never touches a
//! socket or a clock: bytes and timestamps are passed in, frames and
//! decisions come out, so the server, the client library, the load
//! generator, the fuzzers and the tests all drive the same code.
//!
//! The byte-level specification is `docs/protocol.md`; its hex test vectors
//! are checked against this crate by `proto/tests/vectors.rs`.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod frame;
pub mod ids;
pub mod limits;
pub mod message;
pub mod session;

pub use frame::{
    decode_client, decode_server, encode_client, encode_server, unknown_push_tag, FrameBuf, FrameError,
    FrameHeader, HEADER_LEN, SERVER_BODY_TAGS,
};
pub use ids::{shard_of, ArchivedConvId, ConvId, GroupId, UserId};
pub use message::*;

/// The protocol version this build speaks. A `Hello` naming any other
/// version is answered with [`ErrorCode::UnsupportedVersion`] listing
/// [`SUPPORTED_VERSIONS`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Every version this build can speak, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[PROTOCOL_VERSION];
