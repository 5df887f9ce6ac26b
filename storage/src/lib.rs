//! Tern's durable store: accounts, session tokens, friendships and groups
//! (*who* exists and *who may talk to whom*), and messages: per-conversation
//! history, per-user offline inboxes, receipt cursors and conversation
//! indexes, kept in one fjall database (an LSM tree with a write-ahead
//! journal) under a directory of its own. It hashes passwords with
//! argon2id, keeps only SHA-256 digests of session tokens, and writes every
//! multi-key change in one atomic batch. Message writes go through
//! [`Writer`], a dedicated thread that group-commits the submissions of all
//! shards with one fsync per batch. Every other call blocks on disk I/O and
//! is meant for a blocking thread pool; [`Store`] is a cheap
//! `Clone + Send + Sync` handle. The byte layout and the durability
//! promises are documented in `docs/storage.md`.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod accounts;
mod codec;
mod error;
mod groups;
mod messages;
mod social;
mod tokens;
mod writer;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};

pub use error::StoreError;
pub use messages::{ConvTail, InboxTargets, MessageWrite, ReceiptKind, RecentMessage, StoredFrame, WriteOp};
pub use tern_proto::{ConvId, GroupId, GroupRole, UserId};
pub use tokens::TOKEN_CACHE_MAX;
pub use writer::{Durability, SubmitError, Writer, WriterHandle, WriterStats, LATENCY_MICROS_BUCKETS};

/// fjall's flush and compaction threads. The store is small and written
/// rarely; two threads keep flushes from stalling behind a compaction
/// without taking cores from the shards.
const WORKER_THREADS: usize = 2;

/// Tunables of a [`Store`]. Use `..StoreOptions::default()` for the rest.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// argon2id memory cost in KiB for new password hashes.
    pub argon2_memory_kib: u32,
    /// argon2id iterations (time cost) for new password hashes.
    pub argon2_iterations: u32,
    /// How long an issued session token stays valid.
    pub token_ttl: Duration,
    /// Most friends one user may have.
    pub max_friends: usize,
    /// Most members one group may have (the owner included).
    pub max_group_members: usize,
    /// Most pending (unused) invites one group may have.
    pub max_group_invites: usize,
    /// Sync account, token-revocation, friend and group writes to disk
    /// before returning (`fdatasync`); see `docs/storage.md`.
    pub fsync: bool,
}

impl Default for StoreOptions {
    /// OWASP's argon2id baseline (19 MiB, 2 iterations, 1 lane), 30-day
    /// tokens, and syncing on.
    fn default() -> StoreOptions {
        StoreOptions {
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            token_ttl: Duration::from_secs(30 * 24 * 60 * 60),
            max_friends: 1000,
            max_group_members: 10_000,
            max_group_invites: DEFAULT_MAX_GROUP_INVITES,
            fsync: true,
        }
    }
}

/// Default of [`StoreOptions::max_group_invites`].
pub const DEFAULT_MAX_GROUP_INVITES: usize = 1000;

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub id: GroupId,
    pub name: String,
    pub owner: UserId,
}

/// A group with its settings and every member's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRoster {
    pub id: GroupId,
    pub name: String,
    pub owner: UserId,
    /// Anyone may join; otherwise joining needs an invite.
    pub open: bool,
    /// Members ascending by id; the owner's role is always `Owner`.
    pub members: Vec<(UserId, GroupRole)>,
}

/// A handle to an open store. Clones share one database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// A keyspace with the name it was opened under, so decode errors can
/// name it.
struct Ks {
    name: &'static str,
    handle: Keyspace,
}

struct Inner {
    dir: PathBuf,
    db: Database,
    /// username -> account (user id, password hash).
    accounts: Ks,
    /// user id -> username.
    users: Ks,
    /// sha256(token) -> (user, expiry).
    tokens: Ks,
    /// user ++ sha256(token) -> expiry: lets `revoke_tokens` find a user's tokens.
    user_tokens: Ks,
    /// user ++ friend -> (), both directions.
    friends: Ks,
    /// group id -> (owner, member count, invite count, open, name).
    groups: Ks,
    /// group ++ user -> role.
    members: Ks,
    /// group ++ user -> (): pending invites, consumed by the join.
    group_invites: Ks,
    /// user ++ group -> (): the groups of a user, kept with `members`.
    user_groups: Ks,
    /// conv ++ seq -> (from, client msg id, timestamp, frame).
    history: Ks,
    /// user ++ conv ++ seq -> (timestamp, frame): the offline queue.
    inbox: Ks,
    /// user ++ conv -> (delivered, read) cursors.
    receipts: Ks,
    /// user ++ conv -> (): a user's 1:1 conversations.
    user_convs: Ks,
    opts: StoreOptions,
    argon2: argon2::Argon2<'static>,
    /// A hash to verify against for unknown usernames, built on first use.
    dummy_hash: OnceLock<String>,
    /// Serialises registration (name check + insert) and owns the next user id.
    register_lock: Mutex<u64>,
    /// The highest user id assigned, readable without the lock: ids are
    /// dense and never reused, so `1..=highest` is exactly the set of users.
    highest_user: AtomicU64,
    /// Serialises friendship changes so limit checks see a stable count.
    friends_lock: Mutex<()>,
    /// Serialises group changes (member counts) and owns the next group id.
    groups_lock: Mutex<u64>,
    /// Live tokens recently verified (see the `tokens` module).
    token_cache: tokens::TokenCache,
}

impl Store {
    /// Opens the store in `dir`, creating the directory and keyspaces if
    /// needed. A directory fjall cannot read as a database (damaged files,
    /// another process holding its lock) is an error naming `dir`.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let argon2 = accounts::hasher(&opts)?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        let open_err = |e: fjall::Error| open_error(dir, e);
        // fjall asserts on some states it cannot recover from; a damaged
        // store must surface as an error the operator can act on, not
        // take down the process that opened it.
        let db = catch_panic(dir, || {
            Database::builder(dir)
                .worker_threads(WORKER_THREADS)
                .open()
                .map_err(open_err)
        })?;
        let ks = |name: &'static str| -> Result<Ks, StoreError> {
            let handle = catch_panic(dir, || {
                db.keyspace(name, KeyspaceCreateOptions::default)
                    .map_err(open_err)
            })?;
            Ok(Ks { name, handle })
        };
        let users = ks("users")?;
        let groups = ks("groups")?;
        let next_user = next_id(&users)?;
        let next_group = next_id(&groups)?;
        let members = ks("members")?;
        let user_groups = ks("user_groups")?;
        backfill_user_groups(&db, &members, &user_groups)?;
        let inner = Inner {
            dir: dir.to_path_buf(),
            accounts: ks("accounts")?,
            users,
            tokens: ks("tokens")?,
            user_tokens: ks("user_tokens")?,
            friends: ks("friends")?,
            groups,
            members,
            group_invites: ks("group_invites")?,
            user_groups,
            history: ks("history")?,
            inbox: ks("inbox")?,
            receipts: ks("receipts")?,
            user_convs: ks("user_convs")?,
            db,
            opts,
            argon2,
            dummy_hash: OnceLock::new(),
            register_lock: Mutex::new(next_user),
            highest_user: AtomicU64::new(next_user.saturating_sub(1)),
            friends_lock: Mutex::new(()),
            groups_lock: Mutex::new(next_group),
            token_cache: tokens::TokenCache::new(),
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Whether `user` is a registered id, without touching the disk (the
    /// message path checks every recipient with this).
    pub fn user_exists(&self, user: UserId) -> bool {
        user >= 1 && user <= self.inner.highest_user.load(Ordering::Acquire)
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Syncs everything written so far to disk (`fsync` of the journal).
    /// Call on clean shutdown, so that writes made without `fsync` (tokens,
    /// or everything when [`StoreOptions::fsync`] is off) survive a crash
    /// of the machine that follows.
    pub fn persist(&self) -> Result<(), StoreError> {
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

impl Inner {
    /// Commits `batch`, syncing it first when it carries state the caller
    /// was promised is durable and the options ask for syncing. Otherwise
    /// the batch is still written through to the OS (`Buffer`): fjall's
    /// journal sits behind an 8 KiB `BufWriter`, and a commit with no
    /// persist mode at all may leave the batch in that buffer, where a
    /// crash of this process would lose it.
    fn commit(&self, batch: OwnedWriteBatch, durable: bool) -> Result<(), StoreError> {
        let mode = if durable && self.opts.fsync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        batch.durability(Some(mode)).commit()?;
        Ok(())
    }
}

impl Ks {
    fn corrupt(&self, key: &[u8], detail: impl Display) -> StoreError {
        StoreError::Corrupt {
            path: self.handle.path().to_path_buf(),
            detail: format!("keyspace `{}`, key {}: {detail}", self.name, hex(key)),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<fjall::Slice>, StoreError> {
        Ok(self.handle.get(key)?)
    }

    /// The second ids of every `prefix ++ id` key, ascending.
    fn scan_pairs(&self, first: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for guard in self.handle.prefix(codec::id_key(first)) {
            let (key, value) = guard.into_inner()?;
            codec::check_empty(&value).map_err(|d| self.corrupt(&key, d))?;
            out.push(codec::decode_pair_second(&key).map_err(|d| self.corrupt(&key, d))?);
        }
        Ok(out)
    }
}

/// Builds the `user_groups` index from `members` in a store written before
/// the index existed (an empty index next to a non-empty `members`).
fn backfill_user_groups(db: &Database, members: &Ks, user_groups: &Ks) -> Result<(), StoreError> {
    if !user_groups.handle.is_empty()? || members.handle.is_empty()? {
        return Ok(());
    }
    let mut batch = db.batch();
    for guard in members.handle.iter() {
        let key = guard.key()?;
        let group =
            codec::decode_id_key(key.get(..8).unwrap_or_default()).map_err(|d| members.corrupt(&key, d))?;
        let user = codec::decode_pair_second(&key).map_err(|d| members.corrupt(&key, d))?;
        batch.insert(&user_groups.handle, codec::pair_key(user, group), []);
    }
    batch.durability(Some(PersistMode::SyncData)).commit()?;
    Ok(())
}

/// The id after the largest key in `ks` (1 for an empty keyspace).
fn next_id(ks: &Ks) -> Result<u64, StoreError> {
    let Some(guard) = ks.handle.last_key_value() else {
        return Ok(1);
    };
    let key = guard.key()?;
    let last = codec::decode_id_key(&key).map_err(|d| ks.corrupt(&key, d))?;
    last.checked_add(1)
        .ok_or_else(|| ks.corrupt(&key, "id space exhausted"))
}

fn open_error(dir: &Path, e: fjall::Error) -> StoreError {
    let path = dir.to_path_buf();
    match e {
        fjall::Error::Io(io) => StoreError::Io {
            path,
            detail: io.to_string(),
        },
        fjall::Error::Locked => StoreError::Io {
            path,
            detail: "the store is locked by another process or handle".to_owned(),
        },
        other => StoreError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

fn catch_panic<T>(dir: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(StoreError::Corrupt {
            path: dir.to_path_buf(),
            detail: format!("storage engine panicked while opening: {msg}"),
        })
    })
}

/// Locks a mutex whose data stays consistent even if a holder panicked:
/// the counters are only advanced after a successful commit.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch; a clock before 1970 reads as 0.
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
