//! The server's settings and their defaults.
//!
//! Every limit the engine enforces is a named field here with a default
//! that suits a laptop and a note on what it bounds. `ternd` fills this from
//! its command line; tests build it directly (usually via
//! [`Config::for_tests`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::filter::ContentFilter;
use crate::jwt::JwtVerifier;

use tern_storage::StoreOptions;

/// Default chat port.
pub const DEFAULT_PORT: u16 = 7878;

/// Most [`Config::blocking_threads`] per shard.
pub const MAX_BLOCKING_THREADS: usize = 64;

/// Most password-hashing threads (`store.hash_threads`).
pub const MAX_HASH_THREADS: usize = 1024;

/// Bytes of every frame kept for what the server wraps around a message's
/// content: the frame header and the archived `Message` (or a page entry
/// listing it, with its summary), beside the body, media URL and MIME
/// type (see [`Config::content_limits`]); `engine/tests/bounds.rs` sends
/// a message at that limit and lists it.
pub const FRAME_ENVELOPE_BYTES: usize = 512;

/// Everything `ternd` can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every shard accepts plain TCP on (shared with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// A TLS listener beside the plain one, if configured.
    pub tls: Option<TlsListener>,
    /// A TLS handshake that takes longer than this is dropped.
    pub handshake_timeout: Duration,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// Number of shards (one glommio executor each).
    pub shards: usize,
    /// Pin each shard to its own CPU (off when there are more shards than CPUs).
    pub pin_shards: bool,
    /// With pinned shards and fewer shards than CPUs, pin the storage
    /// writer to the last CPU of the process's set and place no shard
    /// there (other threads may still run there): every durable message of
    /// the node passes that one thread, so it must not wait for a CPU
    /// behind a busy shard.
    pub pin_store_writer: bool,
    /// Threads per shard that run its store calls off the reactor (and
    /// wait there for password hashes, which run on the store's hashing
    /// threads). They float over every CPU `ternd` may use.
    pub blocking_threads: usize,
    /// Run the password-hashing threads (`store.hash_threads`) under
    /// `SCHED_IDLE`: they get only CPU time the shards leave idle, so a
    /// burst of password logins never slows chat.
    pub hash_idle_priority: bool,
    /// Largest frame body accepted from a client, in bytes.
    pub max_frame_bytes: u32,
    /// Largest chat message body (text or caption), in bytes.
    pub max_message_bytes: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A session that sends nothing for this long parks: its tasks,
    /// buffers and pending read are released until it sends, or is sent,
    /// something (see [`crate::park`]). Zero never parks; so does any
    /// value not below `idle_timeout`.
    pub park_after: Duration,
    /// A write that cannot progress for this long closes the connection.
    pub write_timeout: Duration,
    /// Bytes of encoded frames a connection may have queued for sending
    /// before it is disconnected as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Depth of each cross-shard queue (per ordered pair of shards and per
    /// queue kind). A full queue makes the sending connection wait.
    pub cross_shard_queue_depth: usize,
    /// Simultaneous sessions (devices) one user may have.
    pub max_sessions_per_user: usize,
    /// Reconnect hint sent to clients when the server shuts down.
    pub shutdown_retry_after: Duration,
    /// How long shutdown waits for connections to flush before closing them.
    pub shutdown_grace: Duration,
    /// Store settings (password hashing cost, group and friend limits, fsync).
    pub store: StoreOptions,
    /// When an acknowledged message is on disk: `Sync` (before the ack,
    /// fsyncs batched across shards) or `Async` (within `flush_interval`).
    pub durability: Durability,
    /// Batches the storage writer may have queued before shards wait.
    pub writer_queue_depth: usize,
    /// Writes a shard may have staged for its next commit. While its
    /// previous commit is on the way to disk a shard goes on sequencing
    /// and staging; past this many, new messages wait (their connections
    /// stop reading, cross-shard request queues fill), so a slow or
    /// stalled disk pushes back on senders instead of growing memory.
    pub max_staged_writes: usize,
    /// Client message ids remembered per conversation for retry dedup.
    pub dedup_window: usize,
    /// Conversations whose sequence state a shard keeps in memory; idle
    /// ones beyond this are dropped and reloaded from the store on use.
    pub max_cached_conversations: usize,
    /// Members of cached groups a shard keeps in memory, summed over its
    /// groups; past it, the least recently used idle groups are dropped
    /// (and loaded again from the store when next used).
    pub max_cached_group_members: usize,
    /// Groups up to this many members also copy each message into every
    /// member's inbox (write diffusion); larger groups are caught up from
    /// the group's history by member cursor (read diffusion).
    pub write_diffusion_max_members: usize,
    /// A sender may withdraw (`Recall`) a message for this long after
    /// sending it; zero allows no recalls.
    pub recall_window: Duration,
    /// Offline inbox entries older than this are deleted.
    pub inbox_ttl: Duration,
    /// History older than this is deleted (`None`: keep forever). Each
    /// conversation's newest message is always kept, and history is kept
    /// at least `inbox_ttl` (inbox entries read their message from it).
    pub history_retention: Option<Duration>,
    /// How often expired inbox and history entries are swept.
    pub expiry_interval: Duration,
    /// Inbox entries read from the store per step of a sync.
    pub sync_page: usize,
    /// Live messages held for a session while its sync runs; past this the
    /// catch-up makes another pass.
    pub sync_hold_max: usize,
    /// `Hello` and a successful login must complete within this long of
    /// the accept, however slowly the bytes come (slowloris).
    pub login_timeout: Duration,
    /// Abuse limits (rates, login back-off, connections per address).
    pub limits: Limits,
    /// The word list text messages are checked against, if any; shared by
    /// every shard and reloadable ([`ContentFilter::reload`]).
    pub content_filter: Option<Arc<ContentFilter>>,
    /// Accept `Register` (password accounts). Off when every account comes
    /// from the operator's login system (JWT) or is provisioned otherwise.
    pub registration: bool,
    /// JWT logins (`LoginJwt`), when configured: the keys and policy.
    pub jwt: Option<Arc<JwtVerifier>>,
}

/// Limits against abusive clients; `docs/security.md` explains each. A
/// rate of 0 (or a count of 0) switches that limit off. Limits per address
/// are enforced per shard (see [`crate::limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Messages per second per connection, and the burst: `SendDirect`,
    /// `SendGroup`, `Typing`, 1:1 `Receipt`s, the rare requests that are
    /// each a synced write or a read of many keys, and a `Sync`'s cursors
    /// (`docs/security.md`, "Limits against abuse").
    pub message_rate_per_sec: u32,
    pub message_burst: u32,
    /// Frames of any kind per second per connection, and the burst.
    pub frame_rate_per_sec: u32,
    pub frame_burst: u32,
    /// Refused frames in a row after which a connection is disconnected.
    pub rate_limit_disconnect_after: u32,
    /// New connections per second from one address (per shard), and the burst.
    pub connection_rate_per_ip: u32,
    pub connection_burst_per_ip: u32,
    /// Open sockets from one address (per shard).
    pub max_connections_per_ip: u32,
    /// `Register` requests per hour from one address (per shard), and the
    /// burst: each costs a password hash and a new account.
    pub registration_rate_per_ip_per_hour: u32,
    pub registration_burst_per_ip: u32,
    /// Failed logins of one account before attempts back off.
    pub login_failures_per_account: u32,
    /// Failed logins from one address before attempts back off.
    pub login_failures_per_ip: u32,
    /// The first back-off; each further failure doubles it, up to the max.
    pub login_backoff_base: Duration,
    pub login_backoff_max: Duration,
    /// Failures are forgotten after this long without a new one.
    pub login_failure_window: Duration,
    /// Addresses and accounts each shard remembers for rates and back-off.
    pub max_tracked_addresses: usize,
    /// Networks exempt from per-address and per-connection limits (local
    /// tools, load generators). Not exempt from the login deadline, the
    /// per-account back-off or the content filter.
    pub limits_exempt: Vec<IpNet>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            message_rate_per_sec: 50,
            message_burst: 100,
            frame_rate_per_sec: 1000,
            frame_burst: 2000,
            rate_limit_disconnect_after: 1000,
            connection_rate_per_ip: 50,
            connection_burst_per_ip: 100,
            max_connections_per_ip: 1000,
            registration_rate_per_ip_per_hour: 30,
            registration_burst_per_ip: 10,
            login_failures_per_account: 5,
            login_failures_per_ip: 20,
            login_backoff_base: Duration::from_secs(1),
            login_backoff_max: Duration::from_secs(300),
            login_failure_window: Duration::from_secs(900),
            max_tracked_addresses: 100_000,
            limits_exempt: vec![
                IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
                IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
            ],
        }
    }
}

impl Limits {
    /// Whether `ip` is in an exempt network.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.limits_exempt.iter().any(|net| net.contains(ip))
    }
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network of `addr` with `prefix` leading bits (clamped to the
    /// address's width).
    pub fn new(addr: IpAddr, prefix: u8) -> IpNet {
        let width = if addr.is_ipv4() { 32 } else { 128 };
        IpNet {
            addr,
            prefix: prefix.min(width),
        }
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network such as 10.0.0.0/8"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={width}"))?,
        };
        Ok(IpNet::new(addr, prefix))
    }
}

pub use tern_storage::Durability;

/// A TLS listener: address, certificate chain and key (PEM files), and
/// whether TLS 1.2 is accepted besides 1.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub allow_tls12: bool,
}

impl Default for Config {
    fn default() -> Config {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            data_dir: PathBuf::from("tern-data"),
            shards: default_shards(cpus),
            pin_shards: true,
            pin_store_writer: true,
            blocking_threads: 4,
            hash_idle_priority: true,
            max_frame_bytes: tern_proto::limits::DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            park_after: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            outbound_queue_bytes: 1 << 20,
            cross_shard_queue_depth: 4096,
            max_sessions_per_user: 16,
            shutdown_retry_after: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(2),
            store: StoreOptions {
                hash_threads: cpus,
                ..StoreOptions::default()
            },
            durability: Durability::Sync,
            writer_queue_depth: 1024,
            max_staged_writes: 16_384,
            dedup_window: 128,
            max_cached_conversations: 100_000,
            max_cached_group_members: 1_000_000,
            write_diffusion_max_members: 200,
            recall_window: Duration::from_secs(48 * 3600),
            inbox_ttl: Duration::from_secs(7 * 24 * 3600),
            history_retention: None,
            expiry_interval: Duration::from_secs(3600),
            sync_page: 256,
            sync_hold_max: 4096,
            login_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            content_filter: None,
            registration: true,
            jwt: None,
        }
    }
}

/// One shard per CPU but one, which the storage writer gets to itself
/// (`pin_store_writer`): every durable message of the node passes that one
/// thread. On a 16-vCPU box with 8 CPUs for the server, 8 shards with the
/// writer floating among them were the slowest setting in every run
/// (docs/benchmarks.md, "A 16-core box").
pub fn default_shards(cpus: usize) -> usize {
    cpus.saturating_sub(1).max(1)
}

impl Config {
    /// A config for tests: an ephemeral port, the given data directory, two
    /// unpinned shards and cheap password hashing.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            shards: 2,
            pin_shards: false,
            // Tests share two cores with each other: under SCHED_IDLE a
            // test's logins would wait for every other test's busy threads.
            // engine/tests/ops.rs checks the default through `ternd`.
            hash_idle_priority: false,
            store: StoreOptions {
                hash_threads: 2,
                argon2_memory_kib: 64,
                argon2_iterations: 1,
                ..StoreOptions::default()
            },
            ..Config::default()
        }
    }

    /// What a message may carry: a body of `max_message_bytes`, and body,
    /// media URL and MIME type together no more than a frame holds with
    /// [`FRAME_ENVELOPE_BYTES`] to spare, so that the server's copy of any
    /// message it accepts (and a page listing it) fits in a frame.
    pub fn content_limits(&self) -> tern_proto::session::ContentLimits {
        tern_proto::session::ContentLimits {
            body: self.max_message_bytes,
            total: (self.max_frame_bytes as usize).saturating_sub(FRAME_ENVELOPE_BYTES),
        }
    }

    /// Whether idle sessions park, and after how long.
    pub fn parks_after(&self) -> Option<Duration> {
        (!self.park_after.is_zero() && self.park_after < self.idle_timeout).then_some(self.park_after)
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!("shards must be 1..=1024, got {}", self.shards));
        }
        if self.store.hash_threads > MAX_HASH_THREADS {
            return Err(format!(
                "hash_threads must be 0..={MAX_HASH_THREADS}, got {}",
                self.store.hash_threads
            ));
        }
        if self.blocking_threads == 0 || self.blocking_threads > MAX_BLOCKING_THREADS {
            return Err(format!(
                "blocking_threads must be 1..={MAX_BLOCKING_THREADS}, got {}",
                self.blocking_threads
            ));
        }
        let max = tern_proto::limits::ABSOLUTE_MAX_FRAME_BYTES;
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > max {
            return Err(format!(
                "max_frame_bytes must be 1024..={max}, got {}",
                self.max_frame_bytes
            ));
        }
        let frame = self.max_frame_bytes as usize;
        if self.max_message_bytes + FRAME_ENVELOPE_BYTES > frame {
            return Err(format!(
                "max_message_bytes ({}) must leave {FRAME_ENVELOPE_BYTES} bytes of frame overhead below \
                 max_frame_bytes ({frame}): at most {}",
                self.max_message_bytes,
                frame.saturating_sub(FRAME_ENVELOPE_BYTES)
            ));
        }
        if self.outbound_queue_bytes < 2 * frame {
            return Err(format!(
                "outbound_queue_bytes ({}) must hold at least two maximal frames (2 × max_frame_bytes = {})",
                self.outbound_queue_bytes,
                2 * frame
            ));
        }
        if self.cross_shard_queue_depth == 0 || self.max_sessions_per_user == 0 {
            return Err("queue depths and session limits must be at least 1".into());
        }
        if self.dedup_window == 0
            || self.sync_page == 0
            || self.sync_hold_max == 0
            || self.writer_queue_depth == 0
            || self.max_staged_writes == 0
        {
            return Err(
                "dedup_window, sync_page, sync_hold_max, writer_queue_depth and max_staged_writes must be at least 1"
                    .into(),
            );
        }
        if self.max_cached_conversations < 16 {
            return Err("max_cached_conversations must be at least 16".into());
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err("idle_timeout must be at least 100 ms".into());
        }
        if self.login_timeout < Duration::from_millis(100) {
            return Err("login_timeout must be at least 100 ms".into());
        }
        let limits = &self.limits;
        if limits.login_backoff_base > limits.login_backoff_max {
            return Err(format!(
                "login_backoff_base_ms ({}) must not exceed login_backoff_max_ms ({})",
                limits.login_backoff_base.as_millis(),
                limits.login_backoff_max.as_millis()
            ));
        }
        if limits.max_tracked_addresses == 0 {
            return Err("max_tracked_addresses must be at least 1".into());
        }
        Ok(())
    }
}
