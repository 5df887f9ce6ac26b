//! Shared fixtures and harnesses for Tern's criterion benchmarks
//! (`bench/benches/*.rs`).
//!
//! The benches measure the hot paths one at a time: frame encoding and
//! validated access ([`frames`]), the hand-off between two pinned shards
//! through each ring-buffer queue the engine could use ([`queue`]), and
//! message appends to the store, direct and through the group-commit
//! writer ([`store`]). The inputs live here, not in the bench files, so
//! the unit tests below can check that every harness moves exactly the
//! messages it claims to time: a benchmark that silently drops or skips
//! work reports a flattering number.

pub mod frames;
pub mod queue;
pub mod store;
