//! The store's error type. It owns the mapping from the backends' errors
//! (fjall, argon2, the OS random source, the filesystem) onto the few cases
//! the engine distinguishes: a caller mistake it can report to the client
//! (`UsernameTaken`, `AuthFailed`, `NotFound`, `InvalidArgument`,
//! `Forbidden`, `LimitExceeded`), and a server fault it must log (`Corrupt`, `Io`,
//! `Fjall`, `Crypto`). Backend errors are carried as text so that fjall's
//! types never leak into the engine's API.

use std::path::PathBuf;

/// Everything that can go wrong in a [`crate::Store`] call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// `register` found the username already in use.
    #[error("username is already taken")]
    UsernameTaken,
    /// Unknown user, wrong password, or an unknown, expired or malformed
    /// token. Deliberately one case, so callers cannot tell which.
    #[error("authentication failed")]
    AuthFailed,
    /// The user or group named in the call does not exist.
    #[error("no such user or group")]
    NotFound,
    /// The call's input breaks a rule (names, lengths, befriending oneself).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The other party does not allow it (a block between two users).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// A configured bound (friends per user, members per group) is reached.
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    /// Bytes on disk do not decode, or the store cannot be opened as one.
    /// `path` is the store directory or the keyspace's directory.
    #[error("corrupt store at {}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// A filesystem operation of our own (creating the directory) failed.
    #[error("I/O error at {}: {detail}", path.display())]
    Io { path: PathBuf, detail: String },
    /// fjall failed an operation on an open store (I/O error, poisoned
    /// after a failed fsync, ...).
    #[error("storage engine error: {0}")]
    Fjall(String),
    /// Password hashing or the OS random source failed.
    #[error("crypto error: {0}")]
    Crypto(String),
}

impl From<fjall::Error> for StoreError {
    fn from(e: fjall::Error) -> StoreError {
        StoreError::Fjall(e.to_string())
    }
}
