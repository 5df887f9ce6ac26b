//! Per-shard counters and their Prometheus text rendering.
//!
//! This module owns every metric the server exports. Each shard has its own
//! [`ShardMetrics`], written only by that shard's thread with `Relaxed`
//! atomics on cache lines no other core writes (the struct is aligned to
//! 128 bytes so neighbouring shards never share a line), so counting on
//! the hot path costs an uncontended add and no cross-core traffic. A
//! scrape ([`Metrics::render`]) reads every shard's values without
//! stopping them (each value is exact; values of one shard are not a
//! single atomic snapshot) and writes the text exposition format: one
//! series per shard (`shard="N"`) and one unlabelled total per family,
//! plus the storage writer's counters and process memory, CPU and fds.
//! `docs/operations.md` lists every metric.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tern_proto::ErrorCode;
use tern_storage::{ReaperBacklog, SyncStats, WriterHandle, WriterStats};

/// The `code` label of an error code. The match is exhaustive, so a new
/// code fails to compile here until it is named (and added to
/// [`ErrorCode::ALL`], which a test checks).
pub fn error_code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::MalformedFrame => "malformed_frame",
        ErrorCode::FrameTooLarge => "frame_too_large",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::InvalidState => "invalid_state",
        ErrorCode::InvalidArgument => "invalid_argument",
        ErrorCode::UsernameTaken => "username_taken",
        ErrorCode::AuthFailed => "auth_failed",
        ErrorCode::NotFound => "not_found",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::LimitExceeded => "limit_exceeded",
        ErrorCode::SlowConsumer => "slow_consumer",
        ErrorCode::IdleTimeout => "idle_timeout",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Internal => "internal",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::ContentRejected => "content_rejected",
        ErrorCode::AccountDeleted => "account_deleted",
    }
}

/// Upper bounds of the store batch-size buckets, in write ops.
pub const BATCH_OPS_BUCKETS: [u64; 13] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Recorded microseconds per exposed second.
const MICROS_PER_SECOND: f64 = 1e6;

/// Upper bounds of the commit-latency buckets, in microseconds: the
/// storage writer's own buckets, so the two commit histograms compare
/// bucket by bucket.
pub const COMMIT_MICROS_BUCKETS: [u64; 15] = tern_storage::LATENCY_MICROS_BUCKETS;

/// A fixed-bucket histogram: per-bucket (not cumulative) counts, the last
/// slot counting values above every bound, plus the sum of all values.
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    /// `N + 1` slots; stable Rust cannot write `[_; N + 1]` in a const generic.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [u64; N]) -> Histogram<N> {
        Histogram {
            bounds,
            counts: (0..=N).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Counts one value.
    #[inline]
    pub fn observe(&self, value: u64) {
        let slot = self.bounds.partition_point(|&bound| bound < value);
        if let Some(count) = self.counts.get(slot) {
            count.fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(value, Relaxed);
    }

    /// (per-slot counts, sum) right now.
    fn snapshot(&self) -> (Vec<u64>, u64) {
        (
            self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            self.sum.load(Relaxed),
        )
    }
}

/// One shard's counters and gauges. Write them only from the shard's own
/// thread (through the methods below); any thread may read them.
#[repr(align(128))]
pub struct ShardMetrics {
    /// Open TCP connections whose socket this shard owns (pre-login ones on
    /// the accepting shard, sessions on their home shard).
    pub connections_open: AtomicI64,
    /// Logged-in sessions served by this shard.
    pub sessions_open: AtomicI64,
    /// Of those, sessions parked while idle (no task, see `crate::park`).
    pub sessions_parked: AtomicI64,
    /// Pings answered for parked sessions without resuming them.
    pub parked_pings: AtomicU64,
    /// Catch-ups whose held live messages passed their bound, so that
    /// the store was scanned again instead.
    pub sync_hold_overflows: AtomicU64,
    /// Groups homed here whose members are cached, and their members.
    pub groups_cached: AtomicI64,
    pub group_members_cached: AtomicI64,
    /// Deleted groups homed here whose data is being purged.
    pub group_purges_running: AtomicI64,
    /// Deleted accounts homed here whose data is being purged.
    pub user_purges_running: AtomicI64,
    pub connections_accepted: AtomicU64,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Chat messages accepted and acknowledged to their sender.
    pub messages_sent: AtomicU64,
    /// Message pushes queued to a live session.
    pub messages_delivered: AtomicU64,
    /// Messages committed to the store by this (their home) shard.
    pub messages_stored: AtomicU64,
    /// Requests and events sent to another shard's queue.
    pub cross_shard_sends: AtomicU64,
    /// Cross-shard sends that found the queue full and had to wait.
    pub cross_shard_waits: AtomicU64,
    /// Requests and events taken from other shards' queues.
    pub cross_shard_received: AtomicU64,
    /// Bytes queued in this shard's connections' outboxes right now.
    pub outbound_queued_bytes: AtomicI64,
    /// Largest number of bytes one outbox has held.
    pub outbound_queue_high_water_bytes: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Sessions replaced at the session limit by a `LoginToken` with
    /// their token (the same device reconnecting).
    pub sessions_replaced: AtomicU64,
    /// Server-side closes whose peer was still sending at the end of the
    /// linger, or sent past its byte bound: the close became a reset.
    pub lingers_cut_short: AtomicU64,
    /// Submissions the storage writer refused because its queue was full.
    pub store_waits: AtomicU64,
    /// Messages that waited because `max_staged_writes` were staged.
    pub staged_waits: AtomicU64,
    /// Most writes this shard has had staged at once (one commit's worth).
    pub staged_high_water: AtomicU64,
    /// Error frames sent, by [`ErrorCode`] (`code as usize`).
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Write ops per commit this shard submitted.
    pub store_batch_ops: Histogram<{ BATCH_OPS_BUCKETS.len() }>,
    /// Time from submitting a commit to its completion, in µs.
    pub store_commit_micros: Histogram<{ COMMIT_MICROS_BUCKETS.len() }>,
}

impl Default for ShardMetrics {
    fn default() -> ShardMetrics {
        ShardMetrics {
            connections_open: AtomicI64::new(0),
            sessions_open: AtomicI64::new(0),
            sessions_parked: AtomicI64::new(0),
            parked_pings: AtomicU64::new(0),
            sync_hold_overflows: AtomicU64::new(0),
            groups_cached: AtomicI64::new(0),
            group_members_cached: AtomicI64::new(0),
            group_purges_running: AtomicI64::new(0),
            user_purges_running: AtomicI64::new(0),
            connections_accepted: AtomicU64::new(0),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            messages_delivered: AtomicU64::new(0),
            messages_stored: AtomicU64::new(0),
            cross_shard_sends: AtomicU64::new(0),
            cross_shard_waits: AtomicU64::new(0),
            cross_shard_received: AtomicU64::new(0),
            outbound_queued_bytes: AtomicI64::new(0),
            outbound_queue_high_water_bytes: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            sessions_replaced: AtomicU64::new(0),
            lingers_cut_short: AtomicU64::new(0),
            store_waits: AtomicU64::new(0),
            staged_waits: AtomicU64::new(0),
            staged_high_water: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            store_batch_ops: Histogram::new(&BATCH_OPS_BUCKETS),
            store_commit_micros: Histogram::new(&COMMIT_MICROS_BUCKETS),
        }
    }
}

impl ShardMetrics {
    /// A connection was accepted on this shard.
    #[inline]
    pub fn connection_accepted(&self) {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_open.fetch_add(1, Relaxed);
    }

    /// A connection's socket arrived from another shard (handoff to home).
    #[inline]
    pub fn connection_adopted(&self) {
        self.connections_open.fetch_add(1, Relaxed);
    }

    /// A connection's socket left this shard: closed, or handed to another.
    #[inline]
    pub fn connection_gone(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    #[inline]
    pub fn session_opened(&self) {
        self.sessions_open.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn session_closed(&self) {
        self.sessions_open.fetch_sub(1, Relaxed);
    }

    /// The group cache now holds `groups` groups of `members` members.
    pub fn groups_cached(&self, groups: usize, members: usize) {
        self.groups_cached
            .store(i64::try_from(groups).unwrap_or(i64::MAX), Relaxed);
        self.group_members_cached
            .store(i64::try_from(members).unwrap_or(i64::MAX), Relaxed);
    }

    /// A deleted group's purge started (`true`) or ended (`false`).
    pub fn group_purge(&self, started: bool) {
        self.group_purges_running
            .fetch_add(if started { 1 } else { -1 }, Relaxed);
    }

    /// A deleted account's purge started (`true`) or ended (`false`).
    pub fn user_purge(&self, started: bool) {
        self.user_purges_running
            .fetch_add(if started { 1 } else { -1 }, Relaxed);
    }

    /// An idle session parked.
    #[inline]
    pub fn session_parked(&self) {
        self.sessions_parked.fetch_add(1, Relaxed);
    }

    /// A parked session resumed.
    #[inline]
    pub fn session_resumed(&self) {
        self.sessions_parked.fetch_sub(1, Relaxed);
    }

    /// A catch-up's hold buffer overflowed (it rescans the store).
    #[inline]
    pub fn sync_hold_overflowed(&self) {
        self.sync_hold_overflows.fetch_add(1, Relaxed);
    }

    /// Pings answered while their session stayed parked.
    #[inline]
    pub fn parked_pings_answered(&self, pings: u64) {
        self.parked_pings.fetch_add(pings, Relaxed);
    }

    /// A `Login` or `LoginToken` answered: accepted or not.
    #[inline]
    pub fn login(&self, ok: bool) {
        if ok {
            self.logins_ok.fetch_add(1, Relaxed);
        } else {
            self.logins_failed.fetch_add(1, Relaxed);
        }
    }

    /// One frame of `bytes` (header included) read from a client.
    #[inline]
    pub fn frame_in(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    /// `frames` frames totalling `bytes` read from a client at once.
    #[inline]
    pub fn frames_in(&self, frames: u64, bytes: usize) {
        self.frames_in.fetch_add(frames, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    /// `frames` frames totalling `bytes` queued for a client.
    #[inline]
    pub fn frames_out(&self, frames: u64, bytes: usize) {
        self.frames_out.fetch_add(frames, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }

    #[inline]
    pub fn message_sent(&self) {
        self.messages_sent.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn message_delivered(&self) {
        self.messages_delivered.fetch_add(1, Relaxed);
    }

    /// A cross-shard send; `waited`: the queue was full at first.
    #[inline]
    pub fn cross_shard_send(&self, waited: bool) {
        self.cross_shard_sends.fetch_add(1, Relaxed);
        if waited {
            self.cross_shard_waits.fetch_add(1, Relaxed);
        }
    }

    #[inline]
    pub fn cross_shard_receive(&self) {
        self.cross_shard_received.fetch_add(1, Relaxed);
    }

    /// `bytes` were queued to an outbox that now holds `queued_after`.
    #[inline]
    pub fn outbound_enqueued(&self, bytes: usize, queued_after: usize) {
        self.outbound_queued_bytes.fetch_add(bytes as i64, Relaxed);
        self.outbound_queue_high_water_bytes
            .fetch_max(queued_after as u64, Relaxed);
    }

    /// `bytes` left an outbox (taken by its writer, or dropped on close).
    #[inline]
    pub fn outbound_dequeued(&self, bytes: usize) {
        self.outbound_queued_bytes.fetch_sub(bytes as i64, Relaxed);
    }

    #[inline]
    pub fn slow_consumer(&self) {
        self.slow_consumer_disconnects.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn idle_timeout(&self) {
        self.idle_timeouts.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn session_replaced(&self) {
        self.sessions_replaced.fetch_add(1, Relaxed);
    }

    /// A closing connection's linger ended as `lingered`.
    pub fn lingered(&self, lingered: tern_net::linger::Lingered) {
        use tern_net::linger::Lingered;
        if matches!(lingered, Lingered::SendingTimeout | Lingered::TooMuch) {
            self.lingers_cut_short.fetch_add(1, Relaxed);
        }
    }

    /// An error frame with `code` was sent.
    #[inline]
    pub fn error(&self, code: ErrorCode) {
        if let Some(counter) = self.errors.get(code as usize) {
            counter.fetch_add(1, Relaxed);
        }
    }

    /// The storage writer's queue was full; the commit will be retried.
    #[inline]
    pub fn store_wait(&self) {
        self.store_waits.fetch_add(1, Relaxed);
    }

    /// A message waits: `max_staged_writes` writes are staged already.
    #[inline]
    pub fn staged_wait(&self) {
        self.staged_waits.fetch_add(1, Relaxed);
    }

    /// The committer took `ops` staged writes (all that were staged).
    #[inline]
    pub fn staged_taken(&self, ops: usize) {
        self.staged_high_water.fetch_max(ops as u64, Relaxed);
    }

    /// A commit of `ops` write ops, `messages` of them chat messages,
    /// finished `latency` after it was submitted.
    #[inline]
    pub fn store_commit(&self, ops: usize, messages: usize, latency: Duration) {
        self.store_batch_ops.observe(ops as u64);
        self.store_commit_micros
            .observe(latency.as_micros().min(u128::from(u64::MAX)) as u64);
        self.messages_stored.fetch_add(messages as u64, Relaxed);
    }
}

/// Every shard's metrics. Shared as `Arc<Metrics>` by the shards and the
/// HTTP endpoint.
pub struct Metrics {
    shards: Vec<ShardMetrics>,
}

/// The storage writer's state at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreSnapshot {
    pub stats: WriterStats,
    /// Submissions waiting in the writer's queue.
    pub queued: usize,
    /// The group commit of durable changes made outside the writer.
    pub syncs: SyncStats,
    /// Retired memtables waiting for the store's reaper thread.
    pub reaper: ReaperBacklog,
}

impl StoreSnapshot {
    /// Reads the writer's counters and queue length.
    pub fn of(writer: &WriterHandle) -> StoreSnapshot {
        StoreSnapshot {
            stats: writer.stats(),
            queued: writer.queued(),
            syncs: writer.store_sync_stats(),
            reaper: ReaperBacklog::now(),
        }
    }
}

/// Process-wide figures from `/proc/self`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub cpu_seconds: f64,
}

/// On kernels before 6.2 counting open fds means listing `/proc/self/fd`;
/// past this many entries the count stops (a scrape must stay cheap even
/// with a million sockets, and the gauge then reads as "at least this
/// many").
const MAX_FDS_COUNTED: u64 = 2_000_000;

impl ProcessStats {
    /// Reads this process's figures; any that cannot be read are 0.
    pub fn collect() -> ProcessStats {
        let mut stats = ProcessStats::default();
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            stats.resident_memory_bytes = status_kib(&status, "VmRSS:") * 1024;
            stats.virtual_memory_bytes = status_kib(&status, "VmSize:") * 1024;
            stats.threads = status_kib(&status, "Threads:");
        }
        stats.open_fds = open_fds();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only into the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            stats.max_fds = limit.rlim_cur;
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            stats.cpu_seconds = stat_cpu_seconds(&stat);
        }
        stats
    }
}

/// How many file descriptors this process has open.
///
/// Since Linux 6.2 the size `stat` reports for `/proc/self/fd` is that
/// count, read from the fd table's bitmap: no directory listing, which at
/// tens of thousands of sockets cost a scrape milliseconds of CPU. Older
/// kernels report 0 there, and the directory is listed instead.
fn open_fds() -> u64 {
    match std::fs::metadata("/proc/self/fd") {
        Ok(meta) if meta.len() > 0 => meta.len(),
        _ => listed_fds(),
    }
}

/// `open_fds` for kernels before 6.2: lists `/proc/self/fd`.
fn listed_fds() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries.
        Ok(entries) => (entries.take(MAX_FDS_COUNTED as usize).count() as u64).saturating_sub(1),
        Err(_) => 0,
    }
}

/// The number after `field` in `/proc/self/status` (kB for memory lines).
fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// utime + stime from `/proc/self/stat`, in seconds.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // The command name (field 2) may contain spaces; fields after its
    // closing parenthesis start at field 3 (state), utime is field 14.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    (ticks(11) + ticks(12)) as f64 / hz
}

/// What a scrape reports besides the shards' own counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scrape {
    /// The storage writer, once the server has one.
    pub store: Option<StoreSnapshot>,
    pub process: ProcessStats,
    /// Whether the server is ready (`/readyz`).
    pub ready: bool,
}

type Getter = fn(&ShardMetrics) -> i64;

/// Per-shard counter families: (name, help, value).
const COUNTERS: &[(&str, &str, Getter)] = &[
    (
        "tern_connections_accepted_total",
        "TCP connections accepted.",
        |m| m.connections_accepted.load(Relaxed) as i64,
    ),
    (
        "tern_logins_total",
        "Successful logins (password or token).",
        |m| m.logins_ok.load(Relaxed) as i64,
    ),
    (
        "tern_login_failures_total",
        "Refused logins (wrong credentials or limits).",
        |m| m.logins_failed.load(Relaxed) as i64,
    ),
    ("tern_frames_in_total", "Frames read from clients.", |m| {
        m.frames_in.load(Relaxed) as i64
    }),
    ("tern_bytes_in_total", "Bytes of frames read from clients.", |m| {
        m.bytes_in.load(Relaxed) as i64
    }),
    ("tern_frames_out_total", "Frames queued for clients.", |m| {
        m.frames_out.load(Relaxed) as i64
    }),
    (
        "tern_bytes_out_total",
        "Bytes of frames queued for clients.",
        |m| m.bytes_out.load(Relaxed) as i64,
    ),
    (
        "tern_messages_sent_total",
        "Chat messages accepted and acknowledged to their sender.",
        |m| m.messages_sent.load(Relaxed) as i64,
    ),
    (
        "tern_messages_delivered_total",
        "Chat message pushes queued to live sessions.",
        |m| m.messages_delivered.load(Relaxed) as i64,
    ),
    (
        "tern_messages_stored_total",
        "Chat messages committed to the store by their home shard.",
        |m| m.messages_stored.load(Relaxed) as i64,
    ),
    (
        "tern_cross_shard_sends_total",
        "Requests and events sent to another shard's queue.",
        |m| m.cross_shard_sends.load(Relaxed) as i64,
    ),
    (
        "tern_cross_shard_backpressure_waits_total",
        "Cross-shard sends that found the queue full and waited.",
        |m| m.cross_shard_waits.load(Relaxed) as i64,
    ),
    (
        "tern_cross_shard_received_total",
        "Requests and events taken from other shards' queues.",
        |m| m.cross_shard_received.load(Relaxed) as i64,
    ),
    (
        "tern_slow_consumer_disconnects_total",
        "Connections closed because their outbound queue overflowed.",
        |m| m.slow_consumer_disconnects.load(Relaxed) as i64,
    ),
    (
        "tern_parked_pings_total",
        "Pings answered for parked sessions without resuming them.",
        |m| m.parked_pings.load(Relaxed) as i64,
    ),
    (
        "tern_sync_hold_overflows_total",
        "Catch-ups whose held live messages passed sync_hold_max or outbound_queue_bytes, so the store was scanned again.",
        |m| m.sync_hold_overflows.load(Relaxed) as i64,
    ),
    (
        "tern_idle_timeouts_total",
        "Connections closed for sending nothing within the idle timeout.",
        |m| m.idle_timeouts.load(Relaxed) as i64,
    ),
    (
        "tern_sessions_replaced_total",
        "Sessions ended at max_sessions_per_user by a LoginToken with their own token (the same device reconnecting).",
        |m| m.sessions_replaced.load(Relaxed) as i64,
    ),
    (
        "tern_lingers_cut_short_total",
        "Connections the server closed whose peer, instead of closing, was still sending at the end of the linger (2 s) or sent over 1 MiB, so the close became a reset.",
        |m| m.lingers_cut_short.load(Relaxed) as i64,
    ),
    (
        "tern_store_backpressure_waits_total",
        "Commits the storage writer refused because its queue was full (retried).",
        |m| m.store_waits.load(Relaxed) as i64,
    ),
    (
        "tern_staged_writes_waits_total",
        "Messages that waited because max_staged_writes writes were already staged for the shard's next commit (a slow disk pushing back on senders).",
        |m| m.staged_waits.load(Relaxed) as i64,
    ),
];

/// Per-shard gauge families: (name, help, value).
const GAUGES: &[(&str, &str, Getter)] = &[
    ("tern_connections_open", "Open client connections.", |m| {
        m.connections_open.load(Relaxed)
    }),
    ("tern_sessions_open", "Logged-in sessions.", |m| {
        m.sessions_open.load(Relaxed)
    }),
    (
        "tern_sessions_parked",
        "Logged-in sessions parked while idle (no task; woken by a frame or a delivery).",
        |m| m.sessions_parked.load(Relaxed),
    ),
    (
        "tern_groups_cached",
        "Groups whose members and roles are cached on their home shard.",
        |m| m.groups_cached.load(Relaxed),
    ),
    (
        "tern_group_members_cached",
        "Members of the cached groups, summed (bounded by max_cached_group_members per shard).",
        |m| m.group_members_cached.load(Relaxed),
    ),
    (
        "tern_group_purges_running",
        "Deleted groups whose history, members and cursors are being removed in the background.",
        |m| m.group_purges_running.load(Relaxed),
    ),
    (
        "tern_user_purges_running",
        "Deleted accounts whose friendships, requests, blocks, groups, inbox and cursors are being removed in the background.",
        |m| m.user_purges_running.load(Relaxed),
    ),
    (
        "tern_outbound_queued_bytes",
        "Bytes queued in connections' outbound queues.",
        |m| m.outbound_queued_bytes.load(Relaxed),
    ),
    (
        "tern_outbound_queue_high_water_bytes",
        "Most bytes one outbound queue has held since start (the total is the maximum over shards).",
        |m| m.outbound_queue_high_water_bytes.load(Relaxed) as i64,
    ),
    (
        "tern_staged_writes_high_water",
        "Most writes one shard has had staged for a commit at once, since start (bounded by max_staged_writes; the total is the maximum over shards).",
        |m| m.staged_high_water.load(Relaxed) as i64,
    ),
];

impl Metrics {
    /// Zeroed metrics for `shards` shards.
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
        }
    }

    /// Shard `index`'s metrics. Out-of-range indexes get a spare that is
    /// never rendered, so a wiring mistake cannot panic a shard.
    pub fn shard(&self, index: usize) -> &ShardMetrics {
        static SPARE: std::sync::OnceLock<ShardMetrics> = std::sync::OnceLock::new();
        self.shards
            .get(index)
            .unwrap_or_else(|| SPARE.get_or_init(ShardMetrics::default))
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Every metric in the Prometheus text exposition format (0.0.4).
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut out = String::with_capacity(8192 + self.shards.len() * 6144);
        family(
            &mut out,
            "tern_build_info",
            "Version of the running ternd.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "tern_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        family(
            &mut out,
            "tern_ready",
            "1 once the store is open and every shard accepts.",
            "gauge",
        );
        let _ = writeln!(out, "tern_ready {}", u8::from(scrape.ready));
        family(&mut out, "tern_shards", "Number of shards.", "gauge");
        let _ = writeln!(out, "tern_shards {}", self.shards.len());
        // Unknown (no sample) until the first shard has made its rings.
        if let Some(coop) = glommio::coop_taskrun_rings() {
            family(
                &mut out,
                "tern_io_uring_coop_taskrun",
                "1 if every shard's io_uring rings take completions at the shard's next system call \
                 instead of interrupting it (IORING_SETUP_COOP_TASKRUN, Linux 5.19+), 0 if any ring interrupts.",
                "gauge",
            );
            let _ = writeln!(out, "tern_io_uring_coop_taskrun {}", u8::from(coop));
        }

        for (name, help, get) in COUNTERS {
            self.per_shard(&mut out, name, help, "counter", *get, false);
        }
        for (name, help, get) in GAUGES {
            let max = matches!(
                *name,
                "tern_outbound_queue_high_water_bytes" | "tern_staged_writes_high_water"
            );
            self.per_shard(&mut out, name, help, "gauge", *get, max);
        }
        self.render_derived(&mut out);
        self.render_errors(&mut out);
        self.render_histogram(
            &mut out,
            "tern_store_batch_ops",
            "Write ops per commit a shard submitted to the storage writer.",
            |m| m.store_batch_ops.snapshot(),
            &BATCH_OPS_BUCKETS,
            1.0,
        );
        self.render_histogram(
            &mut out,
            "tern_store_commit_seconds",
            "Time from a shard submitting a commit to its completion (fsync included in sync durability).",
            |m| m.store_commit_micros.snapshot(),
            &COMMIT_MICROS_BUCKETS,
            MICROS_PER_SECOND,
        );
        if let Some(store) = scrape.store {
            render_store(&mut out, &store);
        }
        render_process(&mut out, &scrape.process);
        out
    }

    fn per_shard(&self, out: &mut String, name: &str, help: &str, kind: &str, get: Getter, max: bool) {
        family(out, name, help, kind);
        let mut total: i64 = 0;
        for (i, shard) in self.shards.iter().enumerate() {
            let value = get(shard);
            total = if max {
                total.max(value)
            } else {
                total.saturating_add(value)
            };
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {value}");
        }
        let _ = writeln!(out, "{name} {total}");
    }

    /// Figures only the totals make exact: a cross-shard message is
    /// counted as sent by one shard and as received by another.
    fn render_derived(&self, out: &mut String) {
        let (mut sent, mut received) = (0u64, 0u64);
        for shard in &self.shards {
            sent = sent.wrapping_add(shard.cross_shard_sends.load(Relaxed));
            received = received.wrapping_add(shard.cross_shard_received.load(Relaxed));
        }
        family(
            out,
            "tern_cross_shard_queue_depth",
            "Requests and events sent between shards and not yet taken, over all queues.",
            "gauge",
        );
        // Read without a snapshot, a receive may be counted before its
        // send: clamp the transient negative to 0.
        let _ = writeln!(
            out,
            "tern_cross_shard_queue_depth {}",
            sent.saturating_sub(received)
        );
    }

    fn render_errors(&self, out: &mut String) {
        let name = "tern_errors_total";
        family(
            out,
            name,
            "Error frames sent to clients, by error code.",
            "counter",
        );
        let mut totals = [0u64; ErrorCode::ALL.len()];
        for (i, shard) in self.shards.iter().enumerate() {
            for (c, code) in ErrorCode::ALL.iter().enumerate() {
                let value = shard.errors[c].load(Relaxed);
                totals[c] += value;
                let label = error_code_label(*code);
                let _ = writeln!(out, "{name}{{shard=\"{i}\",code=\"{label}\"}} {value}");
            }
        }
        for (c, code) in ErrorCode::ALL.iter().enumerate() {
            let label = error_code_label(*code);
            let _ = writeln!(out, "{name}{{code=\"{label}\"}} {}", totals[c]);
        }
    }

    fn render_histogram(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        snapshot: fn(&ShardMetrics) -> (Vec<u64>, u64),
        bounds: &[u64],
        per_unit: f64,
    ) {
        family(out, name, help, "histogram");
        let mut total_counts = vec![0u64; bounds.len() + 1];
        let mut total_sum = 0u64;
        for (i, shard) in self.shards.iter().enumerate() {
            let (counts, sum) = snapshot(shard);
            for (t, c) in total_counts.iter_mut().zip(&counts) {
                *t += c;
            }
            total_sum = total_sum.wrapping_add(sum);
            histogram_lines(
                out,
                name,
                &format!("shard=\"{i}\","),
                bounds,
                &counts,
                sum,
                per_unit,
            );
        }
        histogram_lines(out, name, "", bounds, &total_counts, total_sum, per_unit);
    }
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One histogram series: `bounds` and `sum` in recorded units, exposed
/// divided by `per_unit`. `labels` is empty or ends with a comma.
fn histogram_lines(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[u64],
    counts: &[u64],
    sum: u64,
    per_unit: f64,
) {
    let mut cumulative = 0u64;
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count;
        // Dividing (not multiplying by 1e-6) keeps bounds like 50 µs
        // printing as 0.00005 rather than 0.000049999999999999996.
        let le = *bound as f64 / per_unit;
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
    }
    cumulative += counts.get(bounds.len()).copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
    let labels = labels.trim_end_matches(',');
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", sum as f64 / per_unit);
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

fn render_store(out: &mut String, store: &StoreSnapshot) {
    let s = &store.stats;
    let rows: [(&str, &str, &str, u64); 11] = [
        (
            "tern_store_writer_batches_total",
            "counter",
            "Group commits (fjall batches) the storage writer applied.",
            s.batches,
        ),
        (
            "tern_store_writer_submissions_total",
            "counter",
            "Submissions the storage writer completed.",
            s.submissions,
        ),
        (
            "tern_store_writer_ops_total",
            "counter",
            "Write ops the storage writer committed.",
            s.ops,
        ),
        (
            "tern_store_writer_fsyncs_total",
            "counter",
            "fsyncs the storage writer issued.",
            s.fsyncs,
        ),
        (
            "tern_store_writer_errors_total",
            "counter",
            "Submissions the storage writer completed with an error.",
            s.errors,
        ),
        (
            "tern_store_writer_max_group",
            "gauge",
            "Most submissions in one group commit since start.",
            s.max_group,
        ),
        (
            "tern_store_writer_queued",
            "gauge",
            "Submissions waiting in the storage writer's queue.",
            store.queued as u64,
        ),
        (
            "tern_store_meta_durable_writes_total",
            "counter",
            "Durable changes outside the storage writer (accounts, friendships, groups, token revocations).",
            store.syncs.durable_writes,
        ),
        (
            "tern_store_meta_syncs_total",
            "counter",
            "fdatasyncs run for those changes; concurrent ones share one.",
            store.syncs.syncs,
        ),
        (
            "tern_store_reaper_pending_batches",
            "gauge",
            "Batches of flushed memtables and compacted tables queued for the store's reaper thread to free (at most 16).",
            store.reaper.pending_batches as u64,
        ),
        (
            "tern_store_reaper_freed_in_place_total",
            "counter",
            "Times the reaper's queue was full and a batch (flushed memtables, compacted tables) was freed in place, stalling that keyspace's writes meanwhile.",
            store.reaper.freed_in_place,
        ),
    ];
    for (name, kind, help, value) in rows {
        family(out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "tern_store_writer_commit_seconds";
    family(
        out,
        name,
        "Time the storage writer took per group commit: the batch write plus, in sync durability, its fdatasync.",
        "histogram",
    );
    histogram_lines(
        out,
        name,
        "",
        &tern_storage::LATENCY_MICROS_BUCKETS,
        &s.commit_micros_counts,
        s.commit_micros_sum,
        MICROS_PER_SECOND,
    );
}

fn render_process(out: &mut String, p: &ProcessStats) {
    let rows: [(&str, &str, &str, f64); 6] = [
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_memory_bytes as f64,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.virtual_memory_bytes as f64,
        ),
        (
            "process_threads",
            "gauge",
            "OS threads in the process.",
            p.threads as f64,
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            p.open_fds as f64,
        ),
        (
            "process_max_fds",
            "gauge",
            "Limit on open file descriptors (RLIMIT_NOFILE, soft).",
            p.max_fds as f64,
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            p.cpu_seconds,
        ),
    ];
    for (name, kind, help, value) in rows {
        family(out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }
}

/// Checks that `text` is well-formed exposition format as this module
/// writes it, and returns every sample's metric name. Used by tests here
/// and in `engine/tests/ops.rs`.
pub fn parse_exposition(text: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (Some(kw), Some(name), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("comment needs keyword, name and text"));
            };
            if !valid_name(name) {
                return Err(bad("bad metric name"));
            }
            match kw {
                "HELP" if !tail.is_empty() => {}
                "TYPE" if ["counter", "gauge", "histogram"].contains(&tail) => {}
                _ => return Err(bad("unknown comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        if value != "+Inf" && value.parse::<f64>().is_err() {
            return Err(bad("value is not a number"));
        }
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').ok_or_else(|| bad("unclosed labels"))?;
                for pair in labels.split(',') {
                    let (key, val) = pair.split_once('=').ok_or_else(|| bad("label without ="))?;
                    let quoted = val.len() >= 2 && val.starts_with('"') && val.ends_with('"');
                    if !valid_name(key) || !quoted {
                        return Err(bad("bad label"));
                    }
                }
                name
            }
        };
        if !valid_name(name) {
            return Err(bad("bad metric name"));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_listed_in_declaration_order() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code:?}");
        }
        assert_eq!(ErrorCode::AccountDeleted as usize + 1, ErrorCode::ALL.len());
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let h = Histogram::new(&BATCH_OPS_BUCKETS);
        for v in [0, 1, 2, 3, 4096, 4097, 1_000_000] {
            h.observe(v);
        }
        let (counts, sum) = h.snapshot();
        assert_eq!(counts[0], 2, "0 and 1 fall in le=1");
        assert_eq!(counts[1], 1, "2 in le=2");
        assert_eq!(counts[2], 1, "3 in le=4");
        assert_eq!(counts[12], 1, "4096 in le=4096");
        assert_eq!(counts[13], 2, "above every bound");
        assert_eq!(sum, 1_008_199);
    }

    #[test]
    fn render_shows_each_shard_and_the_total() {
        let metrics = Metrics::new(2);
        metrics.shard(0).frame_in(100);
        metrics.shard(1).frame_in(50);
        metrics.shard(1).frame_in(50);
        metrics.shard(0).connection_accepted();
        metrics.shard(0).connection_gone();
        metrics.shard(1).connection_adopted();
        metrics.shard(0).outbound_enqueued(10, 700);
        metrics.shard(1).outbound_enqueued(10, 300);
        metrics.shard(1).error(ErrorCode::AuthFailed);
        metrics.shard(0).store_commit(3, 2, Duration::from_micros(300));
        metrics.shard(1).store_commit(3, 3, Duration::from_secs(10));
        metrics.shard(0).cross_shard_send(true);
        metrics.shard(99).frame_in(1); // the spare: never rendered
        let text = metrics.render(&Scrape {
            ready: true,
            ..Scrape::default()
        });
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        has("tern_frames_in_total{shard=\"0\"} 1");
        has("tern_frames_in_total{shard=\"1\"} 2");
        has("tern_frames_in_total 3");
        has("tern_bytes_in_total 200");
        has("tern_connections_open{shard=\"0\"} 0");
        has("tern_connections_open 1");
        has("tern_outbound_queue_high_water_bytes 700");
        has("tern_errors_total{shard=\"1\",code=\"auth_failed\"} 1");
        has("tern_errors_total{code=\"auth_failed\"} 1");
        has("tern_messages_stored_total 5");
        has("tern_store_commit_seconds_bucket{shard=\"0\",le=\"0.0005\"} 1");
        has("tern_store_commit_seconds_bucket{le=\"2.5\"} 1");
        has("tern_store_commit_seconds_bucket{le=\"+Inf\"} 2");
        has("tern_store_commit_seconds_count 2");
        has("tern_store_batch_ops_sum 6");
        has("tern_cross_shard_backpressure_waits_total 1");
        has("tern_cross_shard_queue_depth 1");
        has("tern_ready 1");
        assert!(!text.contains("shard=\"99\""));
        assert!(!text.contains("tern_store_writer"), "no writer, no writer series");
        parse_exposition(&text).unwrap();
    }

    #[test]
    fn the_writer_commit_histogram_is_rendered_cumulatively() {
        let mut stats = tern_storage::WriterStats::default();
        stats.commit_micros_counts[3] = 2; // le 500 µs
        stats.commit_micros_counts[8] = 1; // le 25 ms
        stats.commit_micros_sum = 30_000;
        let text = Metrics::new(1).render(&Scrape {
            store: Some(StoreSnapshot {
                stats,
                queued: 0,
                syncs: SyncStats {
                    durable_writes: 5,
                    syncs: 2,
                },
                reaper: ReaperBacklog {
                    pending_batches: 3,
                    freed_in_place: 7,
                },
            }),
            ..Scrape::default()
        });
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        has("tern_store_writer_commit_seconds_bucket{le=\"0.00025\"} 0");
        has("tern_store_writer_commit_seconds_bucket{le=\"0.0005\"} 2");
        has("tern_store_writer_commit_seconds_bucket{le=\"0.025\"} 3");
        has("tern_store_writer_commit_seconds_bucket{le=\"+Inf\"} 3");
        has("tern_store_writer_commit_seconds_sum 0.03");
        has("tern_store_writer_commit_seconds_count 3");
        has("tern_store_meta_durable_writes_total 5");
        has("tern_store_meta_syncs_total 2");
        has("tern_store_reaper_pending_batches 3");
        has("tern_store_reaper_freed_in_place_total 7");
        parse_exposition(&text).unwrap();
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let text = Metrics::new(3).render(&Scrape {
            store: Some(StoreSnapshot::default()),
            process: ProcessStats::collect(),
            ready: false,
        });
        let names = parse_exposition(&text).unwrap();
        let mut families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let count = families.len();
        families.dedup();
        assert_eq!(families.len(), count, "a family is declared twice");
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(f)))
                .unwrap_or(&name);
            assert!(families.contains(&family), "{name} has no TYPE line");
        }
    }

    #[test]
    fn process_stats_read_this_process() {
        let p = ProcessStats::collect();
        assert!(p.resident_memory_bytes > 1 << 20, "{p:?}");
        assert!(p.open_fds >= 3 && p.open_fds <= p.max_fds, "{p:?}");
        assert!(p.threads >= 1, "{p:?}");
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "1 (a b) c) S 1 1 1 0 -1 0 0 0 0 0 200 100 0";
        assert_eq!(stat_cpu_seconds(stat), 300.0 / hz);
    }

    #[test]
    fn both_ways_of_counting_fds_see_files_this_test_holds() {
        // Other tests in this process open and close fds meanwhile, so only
        // a lower bound is exact.
        let held: Vec<std::fs::File> = (0..64)
            .filter_map(|_| std::fs::File::open("/proc/self/status").ok())
            .collect();
        assert_eq!(held.len(), 64);
        assert!(open_fds() >= 64 + 3, "{}", open_fds());
        assert!(listed_fds() >= 64 + 3, "{}", listed_fds());
    }

    #[test]
    fn the_parser_rejects_malformed_lines() {
        for bad in [
            "tern_x",
            "tern_x{a=1} 2",
            "tern x 1",
            "# TYPE tern_x summary",
            "tern_x{a=\"1\" 2",
            "tern_x abc",
        ] {
            assert!(parse_exposition(bad).is_err(), "{bad}");
        }
    }
}
