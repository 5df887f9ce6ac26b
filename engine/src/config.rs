//! The server's settings and their defaults.
//!
//! Every limit the engine enforces is a named field here with a default
//! that suits a laptop and a note on what it bounds. `ternd` fills this from
//! its command line; tests build it directly (usually via
//! [`Config::for_tests`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tern_storage::StoreOptions;

/// Default chat port.
pub const DEFAULT_PORT: u16 = 7878;

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
    /// Largest frame body accepted from a client, in bytes.
    pub max_frame_bytes: u32,
    /// Largest chat message body (text or caption), in bytes.
    pub max_message_bytes: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
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
    /// Client message ids remembered per conversation for retry dedup.
    pub dedup_window: usize,
    /// Conversations whose sequence state a shard keeps in memory; idle
    /// ones beyond this are dropped and reloaded from the store on use.
    pub max_cached_conversations: usize,
    /// Groups up to this many members also copy each message into every
    /// member's inbox (write diffusion); larger groups are caught up from
    /// the group's history by member cursor (read diffusion).
    pub write_diffusion_max_members: usize,
    /// Offline inbox entries older than this are deleted.
    pub inbox_ttl: Duration,
    /// History older than this is deleted (`None`: keep forever). Each
    /// conversation's newest message is always kept.
    pub history_retention: Option<Duration>,
    /// How often expired inbox and history entries are swept.
    pub expiry_interval: Duration,
    /// Inbox entries read from the store per step of a sync.
    pub sync_page: usize,
    /// Live messages held for a session while its sync runs; past this the
    /// catch-up makes another pass.
    pub sync_hold_max: usize,
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
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            data_dir: PathBuf::from("tern-data"),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_shards: true,
            max_frame_bytes: tern_proto::limits::DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            outbound_queue_bytes: 1 << 20,
            cross_shard_queue_depth: 4096,
            max_sessions_per_user: 16,
            shutdown_retry_after: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(2),
            store: StoreOptions::default(),
            durability: Durability::Sync,
            writer_queue_depth: 1024,
            dedup_window: 128,
            max_cached_conversations: 100_000,
            write_diffusion_max_members: 200,
            inbox_ttl: Duration::from_secs(7 * 24 * 3600),
            history_retention: None,
            expiry_interval: Duration::from_secs(3600),
            sync_page: 256,
            sync_hold_max: 4096,
        }
    }
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
            store: StoreOptions {
                argon2_memory_kib: 64,
                argon2_iterations: 1,
                ..StoreOptions::default()
            },
            ..Config::default()
        }
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!("shards must be 1..=1024, got {}", self.shards));
        }
        let max = tern_proto::limits::ABSOLUTE_MAX_FRAME_BYTES;
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > max {
            return Err(format!(
                "max_frame_bytes must be 1024..={max}, got {}",
                self.max_frame_bytes
            ));
        }
        if self.max_message_bytes + 512 > self.max_frame_bytes as usize {
            return Err(
                "max_message_bytes must leave 512 bytes of frame overhead below max_frame_bytes".into(),
            );
        }
        if self.outbound_queue_bytes < 2 * self.max_frame_bytes as usize {
            return Err("outbound_queue_bytes must hold at least two maximal frames".into());
        }
        if self.cross_shard_queue_depth == 0 || self.max_sessions_per_user == 0 {
            return Err("queue depths and session limits must be at least 1".into());
        }
        if self.dedup_window == 0
            || self.sync_page == 0
            || self.sync_hold_max == 0
            || self.writer_queue_depth == 0
        {
            return Err(
                "dedup_window, sync_page, sync_hold_max and writer_queue_depth must be at least 1".into(),
            );
        }
        if self.max_cached_conversations < 16 {
            return Err("max_cached_conversations must be at least 16".into());
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err("idle_timeout must be at least 100 ms".into());
        }
        Ok(())
    }
}
