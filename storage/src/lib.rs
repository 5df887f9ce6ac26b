//! Tern's durable store: accounts, session tokens, friendships and groups
//! (*who* exists and *who may talk to whom*), and messages: per-conversation
//! history, per-user offline inboxes, receipt cursors and conversation
//! indexes, kept in one fjall database (an LSM tree with a write-ahead
//! journal) under a directory of its own. It hashes passwords with
//! argon2id, keeps only SHA-256 digests of session tokens, and writes every
//! multi-key change in one atomic batch. Message writes go through
//! [`Writer`], a dedicated thread that group-commits the submissions of all
//! shards with one fsync per batch. Every other call blocks on disk I/O and
//! is meant for a blocking thread pool; concurrent durable changes there
//! (registrations, joins, friendships) share their fsyncs too (see
//! [`SyncStats`]). [`Store`] is a cheap `Clone + Send + Sync` handle. The
//! byte layout and the durability promises are documented in
//! `docs/storage.md`.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod accounts;
mod backfill;
mod codec;
mod deleted_bits;
mod departures;
mod error;
mod external;
mod group_deletion;
mod groups;
mod hashing;
mod messages;
mod recency;
mod social;
mod tokens;
mod user_deletion;
mod writer;

use std::fmt::Display;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};

pub use departures::{Departed, Departure};
pub use error::StoreError;
pub use external::{ExternalLogin, ExternalPolicy};
pub use group_deletion::ONLY_THE_OWNER_DELETES;
pub use groups::{JoinOutcome, BANNED, MAX_JOIN_BATCH, TOO_MANY_GROUPS, TOO_MANY_INVITES};
pub use messages::{
    ConvTail, HistoryEntry, InboxTargets, MessageWrite, ReceiptKind, RecentMessage, StoredFrame, WriteOp,
};
pub use recency::{recency_bucket, RecentEntry, RECENCY_BUCKET_MS};
pub use social::{
    Blocks, FriendOutcome, BLOCKED_BY_THEM, FRIEND_LIST_FULL, INCOMING_REQUESTS_FULL, OUTGOING_REQUESTS_FULL,
    YOU_BLOCKED,
};
pub use tern_proto::{ConvId, GroupId, GroupRole, UserId};
pub use tokens::TOKEN_CACHE_MAX;
pub use user_deletion::{NO_PASSWORD_TO_CHECK, USER_PURGE_STEP_KEYS};
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
    /// Most live session tokens one user may hold; issuing one more drops
    /// the oldest (that session's next `LoginToken` fails and it logs in
    /// by password again).
    pub max_tokens_per_user: usize,
    /// Most friends one user may have.
    pub max_friends: usize,
    /// Most users one user may block.
    pub max_blocks_per_user: usize,
    /// Most pending friend requests one user may have sent, and, apart,
    /// most one user may have received.
    pub max_friend_requests: usize,
    /// Most members one group may have (the owner included).
    pub max_group_members: usize,
    /// Most pending (unused) invites one group may have.
    pub max_group_invites: usize,
    /// Most pending invites one user may hold (from different groups):
    /// without it, anyone who can create groups could pile invites on a
    /// user that only the user's joins and the groups' admins remove.
    pub max_invites_per_user: usize,
    /// Most users one group may have banned.
    pub max_group_bans: usize,
    /// Most departure records one user may hold (groups left, or been
    /// kicked or banned from, whose messages from their membership they
    /// have not acknowledged yet): each is streamed by every catch-up of
    /// theirs until acknowledged. A departure past it is not recorded.
    pub max_departures_per_user: usize,
    /// Most groups one user may be a member of (created ones included):
    /// each costs a login's catch-up two store reads.
    pub max_groups_per_user: usize,
    /// Sync account, token-revocation, friend and group writes to disk
    /// before returning (`fdatasync`); see `docs/storage.md`.
    pub fsync: bool,
    /// Threads that run password hashing (`tern-hash-N`); 0 hashes on the
    /// calling thread. At most this many hashes run at once, each holding
    /// `argon2_memory_kib`.
    pub hash_threads: usize,
    /// Run first on each hashing thread (the server lowers their priority
    /// here; this crate has no `unsafe`).
    pub hash_thread_start: Option<fn()>,
}

impl Default for StoreOptions {
    /// OWASP's argon2id baseline (19 MiB, 2 iterations, 1 lane), 30-day
    /// tokens, syncing on, and hashing on the calling thread.
    fn default() -> StoreOptions {
        StoreOptions {
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            token_ttl: Duration::from_secs(30 * 24 * 60 * 60),
            max_tokens_per_user: DEFAULT_MAX_TOKENS_PER_USER,
            max_friends: 1000,
            max_blocks_per_user: DEFAULT_MAX_BLOCKS_PER_USER,
            max_friend_requests: DEFAULT_MAX_FRIEND_REQUESTS,
            max_group_members: 10_000,
            max_group_invites: DEFAULT_MAX_GROUP_INVITES,
            max_invites_per_user: DEFAULT_MAX_INVITES_PER_USER,
            max_groups_per_user: DEFAULT_MAX_GROUPS_PER_USER,
            max_group_bans: DEFAULT_MAX_GROUP_BANS,
            max_departures_per_user: DEFAULT_MAX_DEPARTURES_PER_USER,
            fsync: true,
            hash_threads: 0,
            hash_thread_start: None,
        }
    }
}

/// Default of [`StoreOptions::max_tokens_per_user`]: four times `ternd`'s
/// default sessions per user, so devices that log in by password now and
/// then keep their tokens.
pub const DEFAULT_MAX_TOKENS_PER_USER: usize = 64;

/// Stripes of [`Inner::token_issue_locks`]: logins of different users
/// rarely wait on each other.
const TOKEN_ISSUE_STRIPES: usize = 64;

/// Default of [`StoreOptions::max_blocks_per_user`].
pub const DEFAULT_MAX_BLOCKS_PER_USER: usize = 10_000;

/// Default of [`StoreOptions::max_friend_requests`].
pub const DEFAULT_MAX_FRIEND_REQUESTS: usize = 1000;

/// Default of [`StoreOptions::max_group_bans`].
pub const DEFAULT_MAX_GROUP_BANS: usize = 10_000;

/// Default of [`StoreOptions::max_groups_per_user`].
pub const DEFAULT_MAX_GROUPS_PER_USER: usize = 1000;

/// Default of [`StoreOptions::max_group_invites`].
pub const DEFAULT_MAX_GROUP_INVITES: usize = 1000;

/// Default of [`StoreOptions::max_invites_per_user`]: as many as the
/// groups one user may be in (`DEFAULT_MAX_GROUPS_PER_USER`).
pub const DEFAULT_MAX_INVITES_PER_USER: usize = DEFAULT_MAX_GROUPS_PER_USER;

/// Default of [`StoreOptions::max_departures_per_user`]: as many as the
/// groups one user may be in (`DEFAULT_MAX_GROUPS_PER_USER`).
pub const DEFAULT_MAX_DEPARTURES_PER_USER: usize = DEFAULT_MAX_GROUPS_PER_USER;

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
    /// user id -> when the user's sessions were last revoked (see `external`).
    revocation_times: Ks,
    /// user ++ friend -> (), both directions.
    friends: Ks,
    /// from ++ to -> (): pending friend requests, by sender.
    requests_out: Ks,
    /// to ++ from -> (): the same requests by recipient, kept with
    /// `requests_out` in the same batches.
    requests_in: Ks,
    /// blocker ++ blocked -> (): one direction per block.
    blocks: Ks,
    /// blocked ++ blocker -> (): the same blocks by blocked user, kept
    /// with `blocks` in the same batches (an account's deletion finds the
    /// blocks of it with one prefix scan).
    blocked_by: Ks,
    /// user id -> when the account was deleted (Unix ms): kept forever,
    /// the id is never reused.
    deleted_users: Ks,
    /// user id -> (): deleted accounts whose data is not all purged yet.
    user_purges: Ks,
    /// group id -> (owner, member count, invite count, open, name), or a
    /// deleted group's tombstone.
    groups: Ks,
    /// group id -> (): deleted groups whose data is not all purged yet.
    group_purges: Ks,
    /// group ++ user -> role.
    members: Ks,
    /// group ++ user -> (): pending invites, consumed by the join.
    group_invites: Ks,
    /// user ++ group -> (): the same invites by invited user, kept with
    /// `group_invites` in the same batches.
    user_invites: Ks,
    /// group ++ user -> (): users banned from the group.
    group_bans: Ks,
    /// user ++ group -> (): the groups of a user, kept with `members`.
    user_groups: Ks,
    /// user ++ group ++ start -> until: what a user who left a group is
    /// still owed from it (see `departures`).
    departures: Ks,
    /// conv ++ seq -> (from, client msg id, timestamp, frame).
    history: Ks,
    /// user ++ conv ++ seq -> (timestamp, frame): the offline queue.
    inbox: Ks,
    /// user ++ conv -> (delivered, read) cursors.
    receipts: Ks,
    /// user ++ conv -> (): a user's 1:1 conversations.
    user_convs: Ks,
    /// user ++ !bucket ++ conv -> (): a user's 1:1 conversations by the
    /// recency bucket of their newest message (see `recency`).
    recent: Ks,
    /// name -> value: the store's own records (the backfills' positions).
    meta: Ks,
    opts: StoreOptions,
    argon2: argon2::Argon2<'static>,
    /// Where hashing runs, if not on the caller (see `hashing`).
    hash_pool: Option<hashing::HashPool>,
    /// A hash to verify against for unknown usernames, built on first use.
    dummy_hash: OnceLock<String>,
    /// Serialises registration (name check + insert) and owns the next user id.
    /// Taken before a token stripe ([`Inner::token_lock`]) wherever both
    /// are held (a password change, an account deletion): in the other
    /// order the two deadlock.
    register_lock: Mutex<u64>,
    /// The highest user id assigned, readable without the lock: ids are
    /// dense and never reused, so `1..=highest` is exactly the set of users.
    highest_user: AtomicU64,
    /// The highest group id assigned, likewise (a deleted group's id is
    /// never reused).
    highest_group: AtomicU64,
    /// The ids in `group_purges`: groups deleted, data not all purged yet.
    purging: Mutex<std::collections::HashMap<GroupId, group_deletion::PurgeCursor>>,
    /// The deleted accounts, one bit per id (see `deleted_bits`).
    deleted: deleted_bits::DeletedBits,
    /// Held by the writer from its check of deleted recipients to its
    /// commit, and by a deletion while it marks the account deleted: see
    /// `user_deletion`.
    deletion_gate: Mutex<()>,
    /// The deleted accounts whose purge is not finished, with where each
    /// has got to.
    user_purging: Mutex<std::collections::HashMap<UserId, user_deletion::UserPurgeCursor>>,
    /// Serialises friendship changes so limit checks see a stable count.
    friends_lock: Mutex<()>,
    /// Serialises group changes (member counts) and owns the next group id.
    groups_lock: Mutex<u64>,
    /// Live tokens recently verified (see the `tokens` module).
    token_cache: tokens::TokenCache,
    /// Serialises token issuing per user (striped by id), so concurrent
    /// logins of one user cannot each sweep the same snapshot and leave
    /// more than `max_tokens_per_user` tokens.
    token_issue_locks: Box<[Mutex<()>]>,
    /// Group commit of the durable changes made outside the [`Writer`].
    syncs: SyncTickets,
    /// Counts the revocations of all of a user's tokens (admin revoke,
    /// password change, logging out other devices), any user's: see
    /// [`Store::revocations`].
    revocations: AtomicU64,
}

/// Group commit for the durable changes made on blocking threads
/// (accounts, friendships, groups, token revocations). Each change is
/// written through to the OS under whatever lock keeps its invariants,
/// takes a ticket, lets go of the lock, and then waits for an fdatasync
/// that began after the ticket: callers that arrive while one is running
/// share the next instead of each queueing its own behind a lock. One
/// fdatasync covers every earlier write, whoever made it, because fjall
/// keeps a single journal for all keyspaces (and syncs a journal before
/// rotating away from it). The same order means a change that others saw
/// before its sync (a new member, a new user id) can be lost in a crash
/// only together with everything written after it.
#[derive(Default)]
struct SyncTickets {
    /// Tickets handed out: ticket `n` is the `n`th durable change, already
    /// in the OS when it was handed out.
    written: AtomicU64,
    /// Every ticket up to this one is on disk.
    synced: AtomicU64,
    /// Held for the length of one fdatasync, so at most one runs and the
    /// callers behind it find their ticket covered when they get the lock.
    sync_turn: Mutex<()>,
    /// fdatasyncs run.
    syncs: AtomicU64,
}

/// A durable change written through to the OS, not yet known to be on
/// disk: pass it to [`Inner::sync`] (after releasing any lock) before
/// telling anyone it is durable. `None`: nothing to wait for (a change that
/// needs no sync, or syncing is off).
#[must_use = "a durable change is not on disk until `Inner::sync` returns"]
struct Pending(Option<u64>);

/// Counters of [`Store`]'s group commit for changes made outside the
/// [`Writer`]: `durable_writes - syncs` fdatasyncs were saved by sharing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Changes that had to reach the disk before their caller returned.
    pub durable_writes: u64,
    /// fdatasyncs run for them.
    pub syncs: u64,
}

/// The backlog of the vendored lsm-tree's `lsm-reaper` thread, which frees
/// flushed memtables and deletes compacted tables' files off the lock
/// every memtable insert takes (vendor/README.md). Process-wide: one
/// reaper serves every store the process opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaperBacklog {
    /// Batches of retired versions (each may hold whole memtables) handed
    /// to the reaper and not yet freed; at most 16.
    pub pending_batches: usize,
    /// GC passes that found those 16 queued and freed theirs in place,
    /// stalling their keyspace's writes meanwhile, since start.
    pub freed_in_place: u64,
}

impl ReaperBacklog {
    /// Reads it now.
    pub fn now() -> ReaperBacklog {
        let (pending_batches, freed_in_place) = lsm_tree::reaper_backlog();
        ReaperBacklog {
            pending_batches,
            freed_in_place,
        }
    }
}

impl Store {
    /// Opens the store in `dir`, creating the directory and keyspaces if
    /// needed. A directory fjall cannot read as a database (damaged files,
    /// another process holding its lock) is an error naming `dir`.
    ///
    /// The process's `lsm-reaper` thread (see [`ReaperBacklog`]) starts
    /// here, if it has not yet, and inherits the opening thread's priority
    /// and CPU set: started on demand, it could be spawned by the storage
    /// writer, pinned to a CPU of its own, and free every flushed memtable
    /// on that CPU.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        // A reaper that cannot start is logged by lsm-tree and is not
        // fatal: retired versions are then freed in place, as upstream.
        let _ = lsm_tree::start_reaper();
        let argon2 = accounts::hasher(&opts)?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        let open_err = |e: fjall::Error| fjall_error(dir, None, e);
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
        // A deleted account's `users` key is gone but its id is not free:
        // `deleted_users` keeps it.
        let deleted_users = ks("deleted_users")?;
        let next_user = next_id(&users)?.max(next_id(&deleted_users)?);
        let next_group = next_id(&groups)?;
        let meta = ks("meta")?;
        let members = ks("members")?;
        let user_groups = ks("user_groups")?;
        backfill_reverse_index(&db, &meta, &members, &user_groups)?;
        let group_invites = ks("group_invites")?;
        let user_invites = ks("user_invites")?;
        backfill_reverse_index(&db, &meta, &group_invites, &user_invites)?;
        let group_purges = ks("group_purges")?;
        let purging = group_deletion::load_purges(&group_purges)?;
        let blocks = ks("blocks")?;
        let blocked_by = ks("blocked_by")?;
        backfill_reverse_index(&db, &meta, &blocks, &blocked_by)?;
        let deleted = user_deletion::load_deleted(&deleted_users)?;
        let user_purges = ks("user_purges")?;
        let user_purging = user_deletion::load_purges(&user_purges)?;
        let inner = Inner {
            dir: dir.to_path_buf(),
            accounts: ks("accounts")?,
            users,
            tokens: ks("tokens")?,
            user_tokens: ks("user_tokens")?,
            revocation_times: ks("revocations")?,
            friends: ks("friends")?,
            requests_out: ks("friend_requests_out")?,
            requests_in: ks("friend_requests_in")?,
            blocks,
            blocked_by,
            deleted_users,
            user_purges,
            groups,
            group_purges,
            members,
            group_invites,
            user_invites,
            group_bans: ks("group_bans")?,
            user_groups,
            departures: ks("departures")?,
            history: ks("history")?,
            inbox: ks("inbox")?,
            receipts: ks("receipts")?,
            user_convs: ks("user_convs")?,
            recent: ks("recent_convs")?,
            meta,
            db,
            hash_pool: hashing::HashPool::start(&opts)?,
            opts,
            argon2,
            dummy_hash: OnceLock::new(),
            register_lock: Mutex::new(next_user),
            highest_user: AtomicU64::new(next_user.saturating_sub(1)),
            highest_group: AtomicU64::new(next_group.saturating_sub(1)),
            purging: Mutex::new(purging),
            deleted,
            deletion_gate: Mutex::new(()),
            user_purging: Mutex::new(user_purging),
            friends_lock: Mutex::new(()),
            groups_lock: Mutex::new(next_group),
            token_cache: tokens::TokenCache::new(),
            token_issue_locks: (0..TOKEN_ISSUE_STRIPES).map(|_| Mutex::new(())).collect(),
            syncs: SyncTickets::default(),
            revocations: AtomicU64::new(0),
        };
        inner.backfill_recency()?;
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Whether `user` is a registered id, without touching the disk (the
    /// message path checks every recipient with this).
    pub fn user_exists(&self, user: UserId) -> bool {
        user >= 1 && user <= self.inner.highest_user.load(Ordering::Acquire)
    }

    /// Whether `group` is an assigned group id, without touching the disk
    /// (ids are dense and never reused): true also for a group deleted
    /// since, once its purge is done (only the tombstone, on disk, knows).
    pub fn group_exists(&self, group: GroupId) -> bool {
        group >= 1 && group <= self.inner.highest_group.load(Ordering::Acquire) && !self.inner.purging(group)
    }

    /// How many times all of some user's tokens were revoked since the
    /// store opened. A login reads it before checking its credentials and
    /// the session compares it once registered: if it moved, a revocation
    /// may have removed the token the login just checked or was issued,
    /// after the check, and the session must check the token again (a
    /// kick sent with the revocation can reach the home shard before the
    /// session does). Single logouts do not count: they close their own
    /// session.
    pub fn revocations(&self) -> u64 {
        self.inner.revocations.load(Ordering::Acquire)
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How the durable changes made outside the [`Writer`] shared their
    /// fdatasyncs so far.
    pub fn sync_stats(&self) -> SyncStats {
        let syncs = &self.inner.syncs;
        SyncStats {
            durable_writes: syncs.written.load(Ordering::Relaxed),
            syncs: syncs.syncs.load(Ordering::Relaxed),
        }
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
    /// Commits `batch` and, when it carries state the caller was promised
    /// is durable and the options ask for syncing, waits until it is on
    /// disk. For a batch written under a lock, use [`Inner::write`] under
    /// the lock and [`Inner::sync`] after it, so the fdatasync is shared.
    fn commit(&self, batch: OwnedWriteBatch, durable: bool) -> Result<(), StoreError> {
        let pending = self.write(batch, durable)?;
        self.sync(pending)
    }

    /// Commits a durable `batch` built under `guard`, releases `guard`,
    /// then waits for the sync: the usual end of a locked check-then-write,
    /// so that callers queued on the lock share the fdatasync.
    fn commit_unlocked<G>(&self, batch: OwnedWriteBatch, guard: G) -> Result<(), StoreError> {
        let pending = self.write(batch, true)?;
        drop(guard);
        self.sync(pending)
    }

    /// Commits `batch`, written through to the OS (`Buffer`): fjall's
    /// journal sits behind an 8 KiB `BufWriter`, and a commit with no
    /// persist mode at all may leave the batch in that buffer, where a
    /// crash of this process would lose it. Readers see the change from
    /// here on. A `durable` batch (with syncing on) gets a ticket to wait
    /// on with [`Inner::sync`].
    fn write(&self, batch: OwnedWriteBatch, durable: bool) -> Result<Pending, StoreError> {
        batch.durability(Some(PersistMode::Buffer)).commit()?;
        if !(durable && self.opts.fsync) {
            return Ok(Pending(None));
        }
        // Taken after the write returned: any fdatasync that starts after
        // this ticket is visible covers the write.
        let ticket = self.syncs.written.fetch_add(1, Ordering::AcqRel) + 1;
        Ok(Pending(Some(ticket)))
    }

    /// Returns once `pending` is on disk: at once if an fdatasync that
    /// began after it was written has finished, otherwise after running
    /// one, which also covers every change written before it started.
    /// Call it holding no lock that other writers need.
    fn sync(&self, pending: Pending) -> Result<(), StoreError> {
        let Some(ticket) = pending.0 else {
            return Ok(());
        };
        let syncs = &self.syncs;
        if syncs.synced.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _turn = lock(&syncs.sync_turn);
        if syncs.synced.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // Every ticket up to here was handed out after its write: this
        // sync, which starts later, covers them all.
        let covers = syncs.written.load(Ordering::Acquire);
        debug_assert!(covers >= ticket);
        // A failed fdatasync poisons fjall, so no caller behind this one
        // is ever told its change is durable.
        self.db.persist(PersistMode::SyncData)?;
        syncs.syncs.fetch_add(1, Ordering::Relaxed);
        syncs.synced.fetch_max(covers, Ordering::AcqRel);
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

    /// A read of this keyspace failed inside fjall: a damaged table file
    /// is found only when a read reaches it, so the error names the
    /// keyspace and its directory (fjall does not say which file).
    fn read_failed(&self, e: fjall::Error) -> StoreError {
        let context = format!("reading keyspace `{}`", self.name);
        fjall_error(self.handle.path(), Some(&context), e)
    }

    fn get(&self, key: &[u8]) -> Result<Option<fjall::Slice>, StoreError> {
        self.handle.get(key).map_err(|e| self.read_failed(e))
    }

    fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        self.handle.contains_key(key).map_err(|e| self.read_failed(e))
    }

    /// The key and value an iterator of this keyspace reached.
    fn entry(&self, guard: fjall::Guard) -> Result<(fjall::Slice, fjall::Slice), StoreError> {
        guard.into_inner().map_err(|e| self.read_failed(e))
    }

    /// The key an iterator of this keyspace reached.
    fn key_of(&self, guard: fjall::Guard) -> Result<fjall::Slice, StoreError> {
        guard.key().map_err(|e| self.read_failed(e))
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        self.handle.is_empty().map_err(|e| self.read_failed(e))
    }

    /// Whether at least `max` keys start with `first`: a prefix scan that
    /// stops at `max`, for limits on small lists (friends, groups per
    /// user, bans per group) that keeps no separate counter to drift.
    fn prefix_reaches(&self, first: u64, max: usize) -> Result<bool, StoreError> {
        let mut seen = 0usize;
        for guard in self.handle.prefix(codec::id_key(first)).take(max) {
            self.key_of(guard)?;
            seen += 1;
        }
        Ok(seen >= max)
    }

    /// The second ids of the `first ++ id` keys with ids above `after`,
    /// ascending, at most `limit`, and whether more follow.
    fn pairs_after(&self, first: u64, after: u64, limit: usize) -> Result<(Vec<u64>, bool), StoreError> {
        self.pairs_after_where(first, after, limit, |_| true)
    }

    /// [`Ks::pairs_after`] listing only the ids `keep` accepts: the others
    /// (a deleted account awaiting its purge, a group being purged) are
    /// passed over without counting, so a page is never short of `limit`
    /// while more follow, and never empty with `more` set, which would
    /// leave a client paging from its last item nowhere to go on from;
    /// nor is `more` set when only passed-over ids follow.
    fn pairs_after_where(
        &self,
        first: u64,
        after: u64,
        limit: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        let Some(from) = after.checked_add(1) else {
            return Ok((Vec::new(), false));
        };
        let mut out = Vec::new();
        for guard in self
            .handle
            .range(codec::pair_key(first, from)..=codec::pair_key(first, u64::MAX))
        {
            let (key, value) = self.entry(guard)?;
            codec::check_empty(&value).map_err(|d| self.corrupt(&key, d))?;
            let second = codec::decode_pair_second(&key).map_err(|d| self.corrupt(&key, d))?;
            if !keep(second) {
                continue;
            }
            // `more` only for an id the next page would list: when only
            // passed-over ids follow, it would be an empty page.
            if out.len() >= limit {
                return Ok((out, true));
            }
            out.push(second);
        }
        Ok((out, false))
    }

    /// The second ids of every `prefix ++ id` key, ascending.
    fn scan_pairs(&self, first: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for guard in self.handle.prefix(codec::id_key(first)) {
            let (key, value) = self.entry(guard)?;
            codec::check_empty(&value).map_err(|d| self.corrupt(&key, d))?;
            out.push(codec::decode_pair_second(&key).map_err(|d| self.corrupt(&key, d))?);
        }
        Ok(out)
    }
}

/// The length of a `first ++ second` pair key.
const PAIR_KEY_LEN: usize = 16;

/// Builds a reverse index (`second ++ first` keys, as `user_groups` is to
/// `members` and `user_invites` to `group_invites`) from its `first ++
/// second` keyspace in a store written before the index existed (an empty
/// index next to a non-empty source), in chunks recorded in `meta` under
/// `<index>_backfill` (see [`backfill`]): a crash resumes after the last
/// chunk, where the index is no longer empty but the record says it is
/// unfinished.
fn backfill_reverse_index(db: &Database, meta: &Ks, source: &Ks, index: &Ks) -> Result<(), StoreError> {
    let record = format!("{}_backfill", index.name);
    let record = record.as_bytes();
    let start = match backfill::progress(meta, record, PAIR_KEY_LEN)? {
        backfill::Progress::Done => return Ok(()),
        backfill::Progress::After(after) => Bound::Excluded(after),
        // No record: an index that has keys was kept by every write since
        // it existed (or filled in one batch by an older version), and an
        // empty source needs nothing.
        backfill::Progress::Unrecorded if !index.is_empty()? || source.is_empty()? => return Ok(()),
        backfill::Progress::Unrecorded => Bound::Unbounded,
    };
    let mut chunks = backfill::Chunks::new(db, meta, record);
    for guard in source.handle.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
        let key = source.key_of(guard)?;
        let first =
            codec::decode_id_key(key.get(..8).unwrap_or_default()).map_err(|d| source.corrupt(&key, d))?;
        let second = codec::decode_pair_second(&key).map_err(|d| source.corrupt(&key, d))?;
        chunks
            .batch()
            .insert(&index.handle, codec::pair_key(second, first), []);
        chunks.indexed(&key)?;
    }
    chunks.finish()
}

/// The id after the largest key in `ks` (1 for an empty keyspace).
fn next_id(ks: &Ks) -> Result<u64, StoreError> {
    let Some(guard) = ks.handle.last_key_value() else {
        return Ok(1);
    };
    let key = ks.key_of(guard)?;
    let last = codec::decode_id_key(&key).map_err(|d| ks.corrupt(&key, d))?;
    last.checked_add(1)
        .ok_or_else(|| ks.corrupt(&key, "id space exhausted"))
}

/// A fjall error as the store reports it, naming `path` (and, with
/// `context`, what was being done): an I/O error or a store locked
/// elsewhere as `Io`; a store poisoned by a failed fsync, or a deleted
/// keyspace, as `Fjall`; anything else (bytes that do not parse) as
/// `Corrupt`.
fn fjall_error(path: &Path, context: Option<&str>, e: fjall::Error) -> StoreError {
    let path = path.to_path_buf();
    let detail = |what: String| context.map_or_else(|| what.clone(), |context| format!("{context}: {what}"));
    match e {
        fjall::Error::Io(io) | fjall::Error::Storage(fjall::LsmError::Io(io)) => StoreError::Io {
            path,
            detail: detail(io.to_string()),
        },
        fjall::Error::Locked => StoreError::Io {
            path,
            detail: detail("the store is locked by another process or handle".to_owned()),
        },
        e @ (fjall::Error::Poisoned | fjall::Error::KeyspaceDeleted) => {
            StoreError::Fjall(detail(e.to_string()))
        }
        other => StoreError::Corrupt {
            path,
            detail: detail(other.to_string()),
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

/// Options for the crate's unit tests: cheap hashing, no fsync.
#[cfg(test)]
pub(crate) fn test_options() -> StoreOptions {
    StoreOptions {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        fsync: false,
        ..StoreOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_store(fsync: bool) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            fsync,
            ..test_options()
        };
        let store = Store::open(dir.path(), opts).unwrap();
        (dir, store)
    }

    fn friend_batch(inner: &Inner, a: u64, b: u64) -> OwnedWriteBatch {
        let mut batch = inner.db.batch();
        batch.insert(&inner.friends.handle, codec::pair_key(a, b), []);
        batch
    }

    #[test]
    fn one_sync_covers_every_change_written_before_it() {
        let (_dir, store) = open_store(true);
        let inner = &*store.inner;
        let first = inner.write(friend_batch(inner, 1, 2), true).unwrap();
        let second = inner.write(friend_batch(inner, 3, 4), true).unwrap();
        assert_eq!((first.0, second.0), (Some(1), Some(2)));
        // Both changes are readable before either is synced.
        assert!(inner.friends.handle.contains_key(codec::pair_key(1, 2)).unwrap());

        inner.sync(second).unwrap();
        assert_eq!(
            store.sync_stats(),
            SyncStats {
                durable_writes: 2,
                syncs: 1
            }
        );
        // The first was written before that sync began: nothing left to do.
        inner.sync(first).unwrap();
        assert_eq!(
            store.sync_stats(),
            SyncStats {
                durable_writes: 2,
                syncs: 1
            }
        );

        // A change written after the sync needs a sync of its own.
        let third = inner.write(friend_batch(inner, 5, 6), true).unwrap();
        inner.sync(third).unwrap();
        assert_eq!(
            store.sync_stats(),
            SyncStats {
                durable_writes: 3,
                syncs: 2
            }
        );
    }

    #[test]
    fn changes_that_need_no_sync_take_no_ticket() {
        let (_dir, store) = open_store(true);
        let inner = &*store.inner;
        let pending = inner.write(friend_batch(inner, 1, 2), false).unwrap();
        assert_eq!(pending.0, None);
        inner.sync(pending).unwrap();
        assert_eq!(store.sync_stats(), SyncStats::default());

        let (_dir2, unsynced) = open_store(false);
        let inner = &*unsynced.inner;
        let pending = inner.write(friend_batch(inner, 1, 2), true).unwrap();
        assert_eq!(pending.0, None, "syncing is off");
        inner.sync(pending).unwrap();
        assert_eq!(unsynced.sync_stats(), SyncStats::default());
    }
}
