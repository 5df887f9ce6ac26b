//! Shared helpers for the integration tests: a real fjall store in a
//! temporary directory with argon2 costs low enough for debug builds.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use tern_storage::{Store, StoreOptions};

/// Cheap argon2 (64 KiB, 1 pass) and no fsync: the tests check behaviour,
/// not durability against power loss.
pub fn fast_opts() -> StoreOptions {
    StoreOptions {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        fsync: false,
        ..StoreOptions::default()
    }
}

pub fn open(dir: &Path) -> Store {
    Store::open(dir, fast_opts()).unwrap()
}

pub fn open_with(dir: &Path, f: impl FnOnce(&mut StoreOptions)) -> Store {
    let mut opts = fast_opts();
    f(&mut opts);
    Store::open(dir, opts).unwrap()
}

pub fn tiny_ttl() -> Duration {
    Duration::from_millis(250)
}
