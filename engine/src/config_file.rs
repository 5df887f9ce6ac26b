//! `ternd`'s settings from a TOML file, the environment and flags.
//!
//! This module owns the one table of configuration keys ([`KEYS`]): every
//! field of [`Config`] (its [`StoreOptions`](tern_storage::StoreOptions)
//! and [`Durability`] included, flattened) plus `ternd`'s own settings
//! (`metrics_listen`, `log`), each with a parser that checks its range and
//! a printer that writes it back as TOML. All three sources go through the
//! same table, layered defaults < file < environment (`TERN_<KEY>`) <
//! flags, so a bad value is reported the same way wherever it came from:
//! the key, what is allowed, what was given and where. The file is parsed
//! into a plain TOML table and walked key by key (rather than derived with
//! serde) so that an unknown key or a wrong value names the key and the
//! allowed values, not a serde type name. `docs/configuration.md` documents
//! every key; a test keeps the two in step.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Durability, IpNet};
use crate::filter::{ContentFilter, FilterMode};
use crate::jwt::{self, JwtSettings, JwtVerifier};
use tern_net::tls::{TlsConfig, TlsError};
use tern_storage::ExternalPolicy;

/// Default for `flush_interval_ms` when `durability = "async"`.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// Largest config file read, so a wrong path (a device, a huge log) fails
/// fast instead of filling memory.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// The `log` key's default: the server at `info`, the storage engine's
/// own crates at `warn`.
pub const DEFAULT_LOG: &str = "info,fjall=warn,lsm_tree=warn";

/// The effective settings of a `ternd` process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The engine's configuration.
    pub config: Config,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// `tracing` filter directives (e.g. `info` or `info,tern_engine=debug`).
    pub log: String,
    /// Kept apart from `config.durability` so that `flush_interval_ms`
    /// may be given before or after `durability` (or in another layer).
    flush_interval: Duration,
    /// The TLS listener's parts, kept apart for the same reason and put
    /// together into `config.tls` by [`Settings::finish`].
    tls_listen: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_allow_tls12: bool,
    /// The content filter's parts, loaded into `config.content_filter`
    /// by [`Settings::finish`].
    content_filter_file: Option<PathBuf>,
    content_filter_mode: FilterMode,
    /// JWT logins' parts, put together into `config.jwt` by
    /// [`Settings::finish`].
    jwt: JwtParts,
}

/// The `jwt_*` keys as given.
#[derive(Debug, Clone)]
struct JwtParts {
    hs256_secret_file: Option<PathBuf>,
    ed25519_public_key_file: Option<PathBuf>,
    rs256_public_key_file: Option<PathBuf>,
    es256_public_key_file: Option<PathBuf>,
    jwks_file: Option<PathBuf>,
    issuer: String,
    audience: String,
    leeway_secs: u64,
    create_accounts: bool,
    password_accounts: bool,
}

impl Default for JwtParts {
    fn default() -> JwtParts {
        JwtParts {
            hs256_secret_file: None,
            ed25519_public_key_file: None,
            rs256_public_key_file: None,
            es256_public_key_file: None,
            jwks_file: None,
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
            create_accounts: true,
            password_accounts: false,
        }
    }
}

impl JwtParts {
    /// The verifier these parts describe; `None` when no key is set.
    fn load(&self, registration: bool) -> Result<Option<JwtVerifier>, String> {
        let no_key = self.hs256_secret_file.is_none()
            && self.ed25519_public_key_file.is_none()
            && self.rs256_public_key_file.is_none()
            && self.es256_public_key_file.is_none()
            && self.jwks_file.is_none();
        if no_key {
            let defaults = JwtParts::default();
            let set = !self.issuer.is_empty()
                || !self.audience.is_empty()
                || self.leeway_secs != defaults.leeway_secs
                || self.create_accounts != defaults.create_accounts
                || self.password_accounts != defaults.password_accounts;
            if set {
                return Err(
                    "jwt_* settings need jwt_hs256_secret_file, a jwt_*_public_key_file \
                            (ed25519, rs256, es256) or jwt_jwks_file"
                        .into(),
                );
            }
            return Ok(None);
        }
        if self.password_accounts && registration {
            // Whoever registers a name first would own the provider's
            // user of that name, with a password the user does not know.
            return Err(
                "jwt_password_accounts = true needs registration = false: with both, anyone could \
                 register a name before its owner's first JWT login and keep their account"
                    .into(),
            );
        }
        let hs256_secret = match &self.hs256_secret_file {
            Some(path) => Some(jwt::trim_secret(jwt::read_key_file(
                path,
                "jwt_hs256_secret_file",
            )?)),
            None => None,
        };
        let pem = |file: &Option<PathBuf>, key: &str| {
            file.as_deref()
                .map(|path| jwt::read_key_file(path, key))
                .transpose()
        };
        let settings = JwtSettings {
            hs256_secret,
            ed25519_public_key_pem: pem(&self.ed25519_public_key_file, "jwt_ed25519_public_key_file")?,
            rs256_public_key_pem: pem(&self.rs256_public_key_file, "jwt_rs256_public_key_file")?,
            es256_public_key_pem: pem(&self.es256_public_key_file, "jwt_es256_public_key_file")?,
            jwks_file: self.jwks_file.clone(),
            issuer: (!self.issuer.is_empty()).then(|| self.issuer.clone()),
            audience: (!self.audience.is_empty()).then(|| self.audience.clone()),
            leeway_secs: self.leeway_secs,
            policy: ExternalPolicy {
                create_accounts: self.create_accounts,
                password_accounts: self.password_accounts,
            },
        };
        JwtVerifier::new(&settings).map(Some)
    }
}

fn path_or_empty(path: &Option<PathBuf>) -> String {
    toml_str(&path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A config file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(name) => write!(f, "from environment variable {name}"),
            Origin::Flag(flag) => write!(f, "from flag --{flag}"),
        }
    }
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("config file {path} is not valid TOML: {detail}")]
    Syntax { path: PathBuf, detail: String },
    #[error("unknown config key `{key}` ({origin}); docs/configuration.md lists every key")]
    UnknownKey { key: String, origin: Origin },
    #[error("config key `{key}`: {detail} ({origin})")]
    BadValue {
        key: String,
        detail: String,
        origin: Origin,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A value as given: typed from TOML, text from the environment or a flag.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

impl fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Toml(toml::Value::String(s)) => write!(f, "{s:?}"),
            Raw::Text(s) => write!(f, "{s:?}"),
            Raw::Toml(v @ toml::Value::Table(_)) => write!(f, "a table {v}"),
            Raw::Toml(v @ toml::Value::Array(_)) => write!(f, "an array {v}"),
            Raw::Toml(v) => write!(f, "{v}"),
        }
    }
}

impl<'a> Raw<'a> {
    /// The value if it is a string (any text from the environment or a flag).
    fn text(self) -> Option<&'a str> {
        match self {
            Raw::Toml(toml::Value::String(s)) => Some(s),
            Raw::Text(s) => Some(s),
            Raw::Toml(_) => None,
        }
    }
}

/// One configuration key.
pub struct Key {
    /// The TOML key; the environment variable is `TERN_` + its upper case,
    /// the flag `--` + it with `-` for `_`.
    pub name: &'static str,
    /// What the key sets, and its unit.
    pub help: &'static str,
    apply: fn(&mut Settings, Raw) -> Result<(), String>,
    show: fn(&Settings) -> String,
}

impl Key {
    /// The environment variable that sets this key.
    pub fn env_var(&self) -> String {
        format!("TERN_{}", self.name.to_ascii_uppercase())
    }

    /// The long flag (without `--`) that sets this key.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }
}

fn expected_uint(raw: Raw, min: u64, max: u64) -> Result<u64, String> {
    let value = match raw {
        Raw::Toml(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
        Raw::Text(s) => s.trim().replace('_', "").parse::<u64>().ok(),
        Raw::Toml(_) => None,
    };
    match value {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!("expected an integer in {min}..={max}, got {raw}")),
    }
}

fn expected_usize(raw: Raw, min: usize, max: usize) -> Result<usize, String> {
    // usize is 64 bits on every platform `ternd` runs on (glommio: Linux).
    expected_uint(raw, min as u64, max as u64).map(|v| v as usize)
}

fn expected_u32(raw: Raw, min: u32, max: u32) -> Result<u32, String> {
    expected_uint(raw, u64::from(min), u64::from(max)).map(|v| v as u32)
}

fn expected_ms(raw: Raw, min: u64, max: u64) -> Result<Duration, String> {
    expected_uint(raw, min, max).map(Duration::from_millis)
}

fn expected_secs(raw: Raw, min: u64, max: u64) -> Result<Duration, String> {
    expected_uint(raw, min, max).map(Duration::from_secs)
}

fn expected_bool(raw: Raw) -> Result<bool, String> {
    match raw {
        Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
        Raw::Text("true" | "1" | "yes" | "on") => Ok(true),
        Raw::Text("false" | "0" | "no" | "off") => Ok(false),
        _ => Err(format!("expected true or false, got {raw}")),
    }
}

fn expected_text<'a>(raw: Raw<'a>, what: &str) -> Result<&'a str, String> {
    match raw {
        Raw::Toml(toml::Value::String(s)) => Ok(s),
        Raw::Text(s) => Ok(s),
        Raw::Toml(_) => Err(format!("expected {what}, got {raw}")),
    }
}

const ADDR_ALLOWED: &str = "an IP address and port such as \"127.0.0.1:7878\" or \"[::]:7878\"";

fn expected_addr(raw: Raw) -> Result<SocketAddr, String> {
    expected_text(raw, ADDR_ALLOWED)?
        .trim()
        .parse()
        .map_err(|_| format!("expected {ADDR_ALLOWED}, got {raw}"))
}

/// A largest sane value for durations given in milliseconds: one day.
const DAY_MS: u64 = 24 * 3600 * 1000;
/// A largest sane value for durations given in seconds: ten years.
const DECADE_SECS: u64 = 10 * 366 * 24 * 3600;
/// Queue depths, windows and caches: large enough for any machine, small
/// enough that a typo (an extra zero or three) is caught.
const MAX_COUNT: usize = 1 << 32;

/// Stores a parsed value in its field.
/// A file path, or `""` for none.
fn optional_path(raw: Raw) -> Result<Option<PathBuf>, String> {
    let path = expected_text(raw, "a file path")?;
    Ok((!path.is_empty()).then(|| PathBuf::from(path)))
}

fn set<T>(field: &mut T, value: Result<T, String>) -> Result<(), String> {
    *field = value?;
    Ok(())
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

const NETS_ALLOWED: &str =
    "a list of IP networks such as [\"127.0.0.0/8\", \"::1/128\"] (or, as text, comma-separated)";

fn expected_nets(raw: Raw) -> Result<Vec<IpNet>, String> {
    let items: Vec<&str> = match raw {
        Raw::Toml(toml::Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| format!("expected {NETS_ALLOWED}, got {raw}"))
            })
            .collect::<Result<_, _>>()?,
        Raw::Toml(toml::Value::String(s)) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).collect(),
        Raw::Text(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).collect(),
        Raw::Toml(_) => return Err(format!("expected {NETS_ALLOWED}, got {raw}")),
    };
    if items.len() > 1024 {
        return Err("at most 1024 networks".into());
    }
    items
        .into_iter()
        .map(|item| {
            item.parse::<IpNet>()
                .map_err(|e| format!("expected {NETS_ALLOWED}: {e}"))
        })
        .collect()
}

/// Every key, in the order `docs/configuration.md` and the effective
/// config list them.
pub static KEYS: &[Key] = &[
    Key {
        name: "listen",
        help: "Address every shard accepts plain-TCP clients on",
        apply: |s, v| set(&mut s.config.listen, expected_addr(v)),
        show: |s| toml_str(&s.config.listen.to_string()),
    },
    Key {
        name: "data_dir",
        help: "Directory of the store (created if missing)",
        apply: |s, v| {
            let dir = expected_text(v, "a directory path")?;
            if dir.is_empty() {
                return Err("expected a directory path, got an empty string".into());
            }
            set(&mut s.config.data_dir, Ok(PathBuf::from(dir)))
        },
        show: |s| toml_str(&s.config.data_dir.display().to_string()),
    },
    Key {
        name: "shards",
        help: "Number of shards, one executor thread each (default: one per available CPU but one, for the storage writer)",
        apply: |s, v| set(&mut s.config.shards, expected_usize(v, 1, 1024)),
        show: |s| s.config.shards.to_string(),
    },
    Key {
        name: "pin_shards",
        help: "Pin each shard to its own CPU (ignored when there are more shards than CPUs)",
        apply: |s, v| set(&mut s.config.pin_shards, expected_bool(v)),
        show: |s| s.config.pin_shards.to_string(),
    },
    Key {
        name: "pin_store_writer",
        help: "With pinned shards and fewer shards than CPUs, pin the storage writer to the last CPU and place no shard there",
        apply: |s, v| set(&mut s.config.pin_store_writer, expected_bool(v)),
        show: |s| s.config.pin_store_writer.to_string(),
    },
    Key {
        name: "blocking_threads",
        help: "Threads per shard for store calls, floating over the server's CPUs",
        apply: |s, v| {
            let max = crate::config::MAX_BLOCKING_THREADS;
            set(&mut s.config.blocking_threads, expected_usize(v, 1, max))
        },
        show: |s| s.config.blocking_threads.to_string(),
    },
    Key {
        name: "hash_threads",
        help: "Threads that hash passwords (argon2), each holding argon2_memory_kib while it hashes; 0: on the blocking threads (default: one per available CPU)",
        apply: |s, v| {
            let max = crate::config::MAX_HASH_THREADS;
            set(&mut s.config.store.hash_threads, expected_usize(v, 0, max))
        },
        show: |s| s.config.store.hash_threads.to_string(),
    },
    Key {
        name: "hash_idle_priority",
        help: "Run the password-hashing threads under SCHED_IDLE, on CPU time the shards leave idle",
        apply: |s, v| set(&mut s.config.hash_idle_priority, expected_bool(v)),
        show: |s| s.config.hash_idle_priority.to_string(),
    },
    Key {
        name: "max_frame_bytes",
        help: "Largest frame body accepted from a client, in bytes",
        apply: |s, v| {
            let max = tern_proto::limits::ABSOLUTE_MAX_FRAME_BYTES;
            set(&mut s.config.max_frame_bytes, expected_u32(v, 1024, max))
        },
        show: |s| s.config.max_frame_bytes.to_string(),
    },
    Key {
        name: "max_message_bytes",
        help: "Largest chat message body (text or caption), in bytes",
        apply: |s, v| set(&mut s.config.max_message_bytes, expected_usize(v, 1, 1 << 30)),
        show: |s| s.config.max_message_bytes.to_string(),
    },
    Key {
        name: "idle_timeout_ms",
        help: "A connection that sends nothing for this long is closed, in ms",
        apply: |s, v| set(&mut s.config.idle_timeout, expected_ms(v, 100, DAY_MS)),
        show: |s| s.config.idle_timeout.as_millis().to_string(),
    },
    Key {
        name: "park_after_ms",
        help: "A session silent this long parks, releasing its tasks and buffers until it is active again (0: never), in ms",
        apply: |s, v| set(&mut s.config.park_after, expected_ms(v, 0, DAY_MS)),
        show: |s| s.config.park_after.as_millis().to_string(),
    },
    Key {
        name: "write_timeout_ms",
        help: "A write that cannot progress for this long closes the connection, in ms",
        apply: |s, v| set(&mut s.config.write_timeout, expected_ms(v, 1, DAY_MS)),
        show: |s| s.config.write_timeout.as_millis().to_string(),
    },
    Key {
        name: "outbound_queue_bytes",
        help: "Bytes queued for one client before it is disconnected as a slow consumer",
        apply: |s, v| set(&mut s.config.outbound_queue_bytes, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.outbound_queue_bytes.to_string(),
    },
    Key {
        name: "cross_shard_queue_depth",
        help: "Depth of each cross-shard queue (per ordered pair of shards and kind)",
        apply: |s, v| set(&mut s.config.cross_shard_queue_depth, expected_usize(v, 1, 1 << 20)),
        show: |s| s.config.cross_shard_queue_depth.to_string(),
    },
    Key {
        name: "max_sessions_per_user",
        help: "Simultaneous sessions (devices) one user may have",
        apply: |s, v| set(&mut s.config.max_sessions_per_user, expected_usize(v, 1, 1 << 16)),
        show: |s| s.config.max_sessions_per_user.to_string(),
    },
    Key {
        name: "shutdown_retry_after_ms",
        help: "Reconnect hint sent to clients when the server shuts down, in ms",
        apply: |s, v| {
            set(&mut s.config.shutdown_retry_after, expected_ms(v, 0, u64::from(u32::MAX)))
        },
        show: |s| s.config.shutdown_retry_after.as_millis().to_string(),
    },
    Key {
        name: "shutdown_grace_ms",
        help: "How long shutdown waits for connections to flush before closing them, in ms",
        apply: |s, v| set(&mut s.config.shutdown_grace, expected_ms(v, 0, DAY_MS)),
        show: |s| s.config.shutdown_grace.as_millis().to_string(),
    },
    Key {
        name: "argon2_memory_kib",
        help: "argon2id memory cost for new password hashes, in KiB",
        apply: |s, v| set(&mut s.config.store.argon2_memory_kib, expected_u32(v, 8, 4 << 20)),
        show: |s| s.config.store.argon2_memory_kib.to_string(),
    },
    Key {
        name: "argon2_iterations",
        help: "argon2id iterations (time cost) for new password hashes",
        apply: |s, v| set(&mut s.config.store.argon2_iterations, expected_u32(v, 1, 64)),
        show: |s| s.config.store.argon2_iterations.to_string(),
    },
    Key {
        name: "token_ttl_secs",
        help: "How long an issued session token stays valid, in seconds",
        apply: |s, v| set(&mut s.config.store.token_ttl, expected_secs(v, 1, DECADE_SECS)),
        show: |s| s.config.store.token_ttl.as_secs().to_string(),
    },
    Key {
        name: "max_tokens_per_user",
        help: "Most live session tokens one user may hold; a new login drops the oldest",
        apply: |s, v| set(&mut s.config.store.max_tokens_per_user, expected_usize(v, 1, 1 << 16)),
        show: |s| s.config.store.max_tokens_per_user.to_string(),
    },
    Key {
        name: "max_friends",
        help: "Most friends one user may have",
        apply: |s, v| set(&mut s.config.store.max_friends, expected_usize(v, 0, MAX_COUNT)),
        show: |s| s.config.store.max_friends.to_string(),
    },
    Key {
        name: "max_blocks_per_user",
        help: "Most users one user may block",
        apply: |s, v| set(&mut s.config.store.max_blocks_per_user, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_blocks_per_user.to_string(),
    },
    Key {
        name: "max_friend_requests",
        help: "Most pending friend requests one user may have sent, and, apart, most they may have received",
        apply: |s, v| set(&mut s.config.store.max_friend_requests, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_friend_requests.to_string(),
    },
    Key {
        name: "max_group_members",
        help: "Most members one group may have (the owner included)",
        apply: |s, v| set(&mut s.config.store.max_group_members, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_group_members.to_string(),
    },
    Key {
        name: "max_group_invites",
        help: "Most pending invites one group may hold (a join uses its invite up)",
        apply: |s, v| set(&mut s.config.store.max_group_invites, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_group_invites.to_string(),
    },
    Key {
        name: "max_invites_per_user",
        help: "Most pending invites one user may hold, from different groups (a join or a decline uses one up)",
        apply: |s, v| set(&mut s.config.store.max_invites_per_user, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_invites_per_user.to_string(),
    },
    Key {
        name: "max_group_bans",
        help: "Most users one group may have banned",
        apply: |s, v| set(&mut s.config.store.max_group_bans, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_group_bans.to_string(),
    },
    Key {
        name: "max_departures_per_user",
        help: "Most groups one user may have left, or been kicked or banned from, whose messages from their membership they have not acknowledged yet",
        apply: |s, v| set(&mut s.config.store.max_departures_per_user, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_departures_per_user.to_string(),
    },
    Key {
        name: "max_groups_per_user",
        help: "Most groups one user may be a member of (created ones included)",
        apply: |s, v| set(&mut s.config.store.max_groups_per_user, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.store.max_groups_per_user.to_string(),
    },
    Key {
        name: "store_fsync",
        help: "fdatasync account, token, friend and group writes before answering",
        apply: |s, v| set(&mut s.config.store.fsync, expected_bool(v)),
        show: |s| s.config.store.fsync.to_string(),
    },
    Key {
        name: "durability",
        help: "When an acknowledged message is on disk: \"sync\" (fsynced before the ack) or \"async\" (within flush_interval_ms)",
        apply: |s, v| {
            s.config.durability = match v.text() {
                Some("sync") => Durability::Sync,
                Some("async") => Durability::Async {
                    flush_interval: s.flush_interval,
                },
                _ => return Err(format!("expected \"sync\" or \"async\", got {v}")),
            };
            Ok(())
        },
        show: |s| match s.config.durability {
            Durability::Sync => toml_str("sync"),
            Durability::Async { .. } => toml_str("async"),
        },
    },
    Key {
        name: "flush_interval_ms",
        help: "With durability = \"async\": longest time a commit stays unsynced, in ms",
        apply: |s, v| {
            s.flush_interval = expected_ms(v, 1, 60_000)?;
            if let Durability::Async { flush_interval } = &mut s.config.durability {
                *flush_interval = s.flush_interval;
            }
            Ok(())
        },
        show: |s| s.flush_interval.as_millis().to_string(),
    },
    Key {
        name: "writer_queue_depth",
        help: "Commit batches the storage writer may have queued before shards wait",
        apply: |s, v| set(&mut s.config.writer_queue_depth, expected_usize(v, 1, 1 << 20)),
        show: |s| s.config.writer_queue_depth.to_string(),
    },
    Key {
        name: "max_staged_writes",
        help: "Writes a shard may have staged for its next commit while the previous one is on its way to disk; past it new messages and Sync cursors wait",
        apply: |s, v| set(&mut s.config.max_staged_writes, expected_usize(v, 1, 1 << 20)),
        show: |s| s.config.max_staged_writes.to_string(),
    },
    Key {
        name: "dedup_window",
        help: "Client message ids remembered per conversation for retry dedup",
        apply: |s, v| set(&mut s.config.dedup_window, expected_usize(v, 1, 1 << 16)),
        show: |s| s.config.dedup_window.to_string(),
    },
    Key {
        name: "max_cached_conversations",
        help: "Conversations whose sequence state a shard keeps in memory",
        apply: |s, v| set(&mut s.config.max_cached_conversations, expected_usize(v, 16, MAX_COUNT)),
        show: |s| s.config.max_cached_conversations.to_string(),
    },
    Key {
        name: "max_cached_group_members",
        help: "Members of cached groups a shard keeps in memory (least recently used idle groups are dropped past it)",
        apply: |s, v| set(&mut s.config.max_cached_group_members, expected_usize(v, 1, MAX_COUNT)),
        show: |s| s.config.max_cached_group_members.to_string(),
    },
    Key {
        name: "write_diffusion_max_members",
        help: "Groups up to this size copy each message into every member's inbox",
        apply: |s, v| {
            set(&mut s.config.write_diffusion_max_members, expected_usize(v, 0, MAX_COUNT))
        },
        show: |s| s.config.write_diffusion_max_members.to_string(),
    },
    Key {
        name: "recall_window_secs",
        help: "How long after sending a message its sender may withdraw it for everyone (Recall), in seconds; 0: never",
        apply: |s, v| set(&mut s.config.recall_window, expected_secs(v, 0, DECADE_SECS)),
        show: |s| s.config.recall_window.as_secs().to_string(),
    },
    Key {
        name: "inbox_ttl_secs",
        help: "Offline inbox entries older than this are deleted, in seconds",
        apply: |s, v| set(&mut s.config.inbox_ttl, expected_secs(v, 1, DECADE_SECS)),
        show: |s| s.config.inbox_ttl.as_secs().to_string(),
    },
    Key {
        name: "history_retention_secs",
        help: "History older than this is deleted, in seconds, or \"forever\"",
        apply: |s, v| {
            s.config.history_retention = match v.text() {
                Some("forever") => None,
                _ => Some(expected_secs(v, 1, DECADE_SECS).map_err(|_| {
                    format!("expected \"forever\" or an integer in 1..={DECADE_SECS}, got {v}")
                })?),
            };
            Ok(())
        },
        show: |s| match s.config.history_retention {
            None => toml_str("forever"),
            Some(keep) => keep.as_secs().to_string(),
        },
    },
    Key {
        name: "expiry_interval_secs",
        help: "How often expired inbox and history entries are swept, in seconds",
        apply: |s, v| set(&mut s.config.expiry_interval, expected_secs(v, 1, DECADE_SECS)),
        show: |s| s.config.expiry_interval.as_secs().to_string(),
    },
    Key {
        name: "sync_page",
        help: "Inbox entries read from the store per step of a sync",
        apply: |s, v| set(&mut s.config.sync_page, expected_usize(v, 1, 1 << 16)),
        show: |s| s.config.sync_page.to_string(),
    },
    Key {
        name: "sync_hold_max",
        help: "Live messages held for a session while its sync runs",
        apply: |s, v| set(&mut s.config.sync_hold_max, expected_usize(v, 1, 1 << 20)),
        show: |s| s.config.sync_hold_max.to_string(),
    },
    Key {
        name: "tls_listen",
        help: "Address of the TLS listener (beside the plain one, on a port of its own), or \"off\"; needs tls_cert and tls_key",
        apply: |s, v| {
            s.tls_listen = match v.text() {
                Some("off") => None,
                _ => Some(expected_addr(v).map_err(|_| format!("expected \"off\" or {ADDR_ALLOWED}, got {v}"))?),
            };
            Ok(())
        },
        show: |s| toml_str(&s.tls_listen.map_or_else(|| "off".to_owned(), |a| a.to_string())),
    },
    Key {
        name: "tls_cert",
        help: "PEM file with the TLS certificate chain (reloaded on SIGHUP)",
        apply: |s, v| set(&mut s.tls_cert, optional_path(v)),
        show: |s| toml_str(&s.tls_cert.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
    },
    Key {
        name: "tls_key",
        help: "PEM file with the TLS private key (reloaded on SIGHUP; the path is printed, never the key)",
        apply: |s, v| set(&mut s.tls_key, optional_path(v)),
        show: |s| toml_str(&s.tls_key.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
    },
    Key {
        name: "tls_allow_tls12",
        help: "Accept TLS 1.2 clients as well as TLS 1.3",
        apply: |s, v| set(&mut s.tls_allow_tls12, expected_bool(v)),
        show: |s| s.tls_allow_tls12.to_string(),
    },
    Key {
        name: "handshake_timeout_ms",
        help: "A TLS handshake that takes longer than this is dropped, in ms",
        apply: |s, v| set(&mut s.config.handshake_timeout, expected_ms(v, 1, DAY_MS)),
        show: |s| s.config.handshake_timeout.as_millis().to_string(),
    },
    Key {
        name: "login_timeout_ms",
        help: "Hello and a successful login must complete within this long of the accept, in ms",
        apply: |s, v| set(&mut s.config.login_timeout, expected_ms(v, 100, DAY_MS)),
        show: |s| s.config.login_timeout.as_millis().to_string(),
    },
    Key {
        name: "message_rate_per_sec",
        help: "SendDirect/SendGroup/Typing, 1:1 Receipts, the costly rare requests (docs/security.md) and a Sync's cursors per second per connection (0: no limit)",
        apply: |s, v| set(&mut s.config.limits.message_rate_per_sec, expected_u32(v, 0, 1_000_000)),
        show: |s| s.config.limits.message_rate_per_sec.to_string(),
    },
    Key {
        name: "message_burst",
        help: "Messages a connection may send at once before message_rate_per_sec applies",
        apply: |s, v| set(&mut s.config.limits.message_burst, expected_u32(v, 1, 1_000_000)),
        show: |s| s.config.limits.message_burst.to_string(),
    },
    Key {
        name: "frame_rate_per_sec",
        help: "Frames of any kind per second per connection (0: no limit)",
        apply: |s, v| set(&mut s.config.limits.frame_rate_per_sec, expected_u32(v, 0, 1_000_000)),
        show: |s| s.config.limits.frame_rate_per_sec.to_string(),
    },
    Key {
        name: "frame_burst",
        help: "Frames a connection may send at once before frame_rate_per_sec applies",
        apply: |s, v| set(&mut s.config.limits.frame_burst, expected_u32(v, 1, 1_000_000)),
        show: |s| s.config.limits.frame_burst.to_string(),
    },
    Key {
        name: "rate_limit_disconnect_after",
        help: "Rate-limited frames in a row after which a connection is disconnected (0: never)",
        apply: |s, v| set(&mut s.config.limits.rate_limit_disconnect_after, expected_u32(v, 0, u32::MAX)),
        show: |s| s.config.limits.rate_limit_disconnect_after.to_string(),
    },
    Key {
        name: "connection_rate_per_ip",
        help: "New connections per second from one address, per shard (0: no limit)",
        apply: |s, v| set(&mut s.config.limits.connection_rate_per_ip, expected_u32(v, 0, 1_000_000)),
        show: |s| s.config.limits.connection_rate_per_ip.to_string(),
    },
    Key {
        name: "connection_burst_per_ip",
        help: "New connections one address may open at once, per shard",
        apply: |s, v| set(&mut s.config.limits.connection_burst_per_ip, expected_u32(v, 1, 1_000_000)),
        show: |s| s.config.limits.connection_burst_per_ip.to_string(),
    },
    Key {
        name: "max_connections_per_ip",
        help: "Open connections from one address, per shard (0: no limit)",
        apply: |s, v| set(&mut s.config.limits.max_connections_per_ip, expected_u32(v, 0, u32::MAX)),
        show: |s| s.config.limits.max_connections_per_ip.to_string(),
    },
    Key {
        name: "registration_rate_per_ip_per_hour",
        help: "Register requests per hour from one address, per shard (0: no limit)",
        apply: |s, v| {
            set(
                &mut s.config.limits.registration_rate_per_ip_per_hour,
                expected_u32(v, 0, 1_000_000),
            )
        },
        show: |s| s.config.limits.registration_rate_per_ip_per_hour.to_string(),
    },
    Key {
        name: "registration_burst_per_ip",
        help: "Register requests one address may make at once, per shard",
        apply: |s, v| set(&mut s.config.limits.registration_burst_per_ip, expected_u32(v, 1, 1_000_000)),
        show: |s| s.config.limits.registration_burst_per_ip.to_string(),
    },
    Key {
        name: "login_failures_per_account",
        help: "Failed logins of one account before further attempts back off (0: no back-off)",
        apply: |s, v| set(&mut s.config.limits.login_failures_per_account, expected_u32(v, 0, 1_000_000)),
        show: |s| s.config.limits.login_failures_per_account.to_string(),
    },
    Key {
        name: "login_failures_per_ip",
        help: "Failed logins from one address before further attempts back off (0: no back-off)",
        apply: |s, v| set(&mut s.config.limits.login_failures_per_ip, expected_u32(v, 0, 1_000_000)),
        show: |s| s.config.limits.login_failures_per_ip.to_string(),
    },
    Key {
        name: "login_backoff_base_ms",
        help: "First login back-off; each further failure doubles it, in ms",
        apply: |s, v| set(&mut s.config.limits.login_backoff_base, expected_ms(v, 1, DAY_MS)),
        show: |s| s.config.limits.login_backoff_base.as_millis().to_string(),
    },
    Key {
        name: "login_backoff_max_ms",
        help: "Longest login back-off, in ms",
        apply: |s, v| set(&mut s.config.limits.login_backoff_max, expected_ms(v, 1, DAY_MS)),
        show: |s| s.config.limits.login_backoff_max.as_millis().to_string(),
    },
    Key {
        name: "login_failure_window_ms",
        help: "Failed logins are forgotten after this long without another, in ms",
        apply: |s, v| set(&mut s.config.limits.login_failure_window, expected_ms(v, 1, DAY_MS)),
        show: |s| s.config.limits.login_failure_window.as_millis().to_string(),
    },
    Key {
        name: "max_tracked_addresses",
        help: "Addresses (and accounts) each shard remembers for connection rates and login back-off",
        apply: |s, v| set(&mut s.config.limits.max_tracked_addresses, expected_usize(v, 1, 1 << 24)),
        show: |s| s.config.limits.max_tracked_addresses.to_string(),
    },
    Key {
        name: "limits_exempt",
        help: "IP networks exempt from per-address and per-connection rate limits",
        apply: |s, v| set(&mut s.config.limits.limits_exempt, expected_nets(v)),
        show: |s| {
            let nets: Vec<toml::Value> = s
                .config
                .limits
                .limits_exempt
                .iter()
                .map(|n| toml::Value::String(n.to_string()))
                .collect();
            toml::Value::Array(nets).to_string()
        },
    },
    Key {
        name: "content_filter_file",
        help: "Word list (one word or phrase per line) checked against text messages, reloaded on SIGHUP; \"\" for none",
        apply: |s, v| set(&mut s.content_filter_file, optional_path(v)),
        show: |s| {
            toml_str(
                &s.content_filter_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
        },
    },
    Key {
        name: "content_filter_mode",
        help: "What a filtered word does: \"reject\" (ContentRejected) or \"mask\" (replaced by *)",
        apply: |s, v| {
            s.content_filter_mode = match v.text() {
                Some("reject") => FilterMode::Reject,
                Some("mask") => FilterMode::Mask,
                _ => return Err(format!("expected \"reject\" or \"mask\", got {v}")),
            };
            Ok(())
        },
        show: |s| toml_str(s.content_filter_mode.name()),
    },
    Key {
        name: "registration",
        help: "Accept Register (password accounts); false when accounts come only from JWT logins",
        apply: |s, v| set(&mut s.config.registration, expected_bool(v)),
        show: |s| s.config.registration.to_string(),
    },
    Key {
        name: "jwt_hs256_secret_file",
        help: "File holding the HS256 secret (at least 32 bytes) that signs LoginJwt tokens; \"\" for none",
        apply: |s, v| set(&mut s.jwt.hs256_secret_file, optional_path(v)),
        show: |s| path_or_empty(&s.jwt.hs256_secret_file),
    },
    Key {
        name: "jwt_ed25519_public_key_file",
        help: "PEM file with the Ed25519 public key that verifies EdDSA LoginJwt tokens; \"\" for none",
        apply: |s, v| set(&mut s.jwt.ed25519_public_key_file, optional_path(v)),
        show: |s| path_or_empty(&s.jwt.ed25519_public_key_file),
    },
    Key {
        name: "jwt_rs256_public_key_file",
        help: "PEM file with the RSA public key (2048 bits or more) that verifies RS256 LoginJwt tokens; \"\" for none",
        apply: |s, v| set(&mut s.jwt.rs256_public_key_file, optional_path(v)),
        show: |s| path_or_empty(&s.jwt.rs256_public_key_file),
    },
    Key {
        name: "jwt_es256_public_key_file",
        help: "PEM file with the P-256 public key that verifies ES256 LoginJwt tokens; \"\" for none",
        apply: |s, v| set(&mut s.jwt.es256_public_key_file, optional_path(v)),
        show: |s| path_or_empty(&s.jwt.es256_public_key_file),
    },
    Key {
        name: "jwt_jwks_file",
        help: "JWK Set file (the provider's jwks_uri, saved) whose RSA, P-256 and Ed25519 keys verify LoginJwt tokens by kid; reread on SIGHUP; \"\" for none",
        apply: |s, v| set(&mut s.jwt.jwks_file, optional_path(v)),
        show: |s| path_or_empty(&s.jwt.jwks_file),
    },
    Key {
        name: "jwt_issuer",
        help: "The iss claim every LoginJwt token must carry; \"\" to not check it",
        apply: |s, v| {
            s.jwt.issuer = expected_text(v, "an issuer such as \"https://login.example.com\"")?.to_owned();
            Ok(())
        },
        show: |s| toml_str(&s.jwt.issuer),
    },
    Key {
        name: "jwt_audience",
        help: "A value the aud claim of every LoginJwt token must hold; \"\" refuses tokens that carry aud",
        apply: |s, v| {
            s.jwt.audience = expected_text(v, "an audience such as \"tern\"")?.to_owned();
            Ok(())
        },
        show: |s| toml_str(&s.jwt.audience),
    },
    Key {
        name: "jwt_leeway_secs",
        help: "Clock skew allowed on a JWT's exp and nbf, seconds",
        apply: |s, v| set(&mut s.jwt.leeway_secs, expected_uint(v, 0, 3600)),
        show: |s| s.jwt.leeway_secs.to_string(),
    },
    Key {
        name: "jwt_create_accounts",
        help: "A LoginJwt for a name with no account creates it (without a password)",
        apply: |s, v| set(&mut s.jwt.create_accounts, expected_bool(v)),
        show: |s| s.jwt.create_accounts.to_string(),
    },
    Key {
        name: "jwt_password_accounts",
        help: "A LoginJwt may log into an account registered with a password (only if both systems' names are the same people)",
        apply: |s, v| set(&mut s.jwt.password_accounts, expected_bool(v)),
        show: |s| s.jwt.password_accounts.to_string(),
    },
    Key {
        name: "metrics_listen",
        help: "Address of the HTTP endpoint for /metrics, /healthz and /readyz (on a port of its own), or \"off\"",
        apply: |s, v| {
            s.metrics_listen = match v.text() {
                Some("off") => None,
                _ => Some(
                    expected_addr(v)
                        .map_err(|_| format!("expected \"off\" or {ADDR_ALLOWED}, got {v}"))?,
                ),
            };
            Ok(())
        },
        show: |s| match s.metrics_listen {
            None => toml_str("off"),
            Some(addr) => toml_str(&addr.to_string()),
        },
    },
    Key {
        name: "log",
        help: "Log filter (tracing EnvFilter directives), e.g. \"info\" or \"info,tern_engine=debug\"",
        apply: |s, v| {
            let filter = expected_text(v, "log filter directives such as \"info\"")?;
            // Parse now so that a typo stops startup instead of silently
            // falling back to a default level.
            tracing_subscriber::EnvFilter::builder()
                .parse(filter)
                .map_err(|e| format!("expected log filter directives such as \"info\" or \"warn,tern_engine=debug\", got {v}: {e}"))?;
            set(&mut s.log, Ok(filter.to_owned()))
        },
        show: |s| toml_str(&s.log),
    },
];

/// The key named `name`, if there is one.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// `TERN_*` variables that are not settings of the server: the config
/// file's path, and the `tern` CLI's, which a shell may export beside the
/// server's.
const OTHER_ENV_VARS: &[&str] = &[
    "TERN_CONFIG",
    "TERN_SERVER",
    "TERN_USER",
    "TERN_PASSWORD",
    "TERN_JWT",
    "TERN_NEW_PASSWORD",
];

/// The variables among `names` that look like settings (`TERN_` prefix)
/// but set nothing, sorted. A misspelt `TERN_DURABLITY` would otherwise be
/// ignored without a word and the server would run on the default; unlike
/// an unknown key in a file or flag this is a warning, not an error,
/// because the environment is shared with other programs.
pub fn unrecognised_env_vars(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|name| {
            name.starts_with("TERN_")
                && !OTHER_ENV_VARS.contains(&name.as_str())
                && !KEYS.iter().any(|key| key.env_var() == *name)
        })
        .collect();
    unknown.sort();
    unknown
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            config: Config::default(),
            metrics_listen: None,
            // fjall and lsm-tree log every journal recovery step and every
            // memtable flush at `info`: ~50 lines per start and one per
            // flush under load, which drowns the server's own lines.
            log: DEFAULT_LOG.to_owned(),
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_allow_tls12: false,
            content_filter_file: None,
            content_filter_mode: FilterMode::Reject,
            jwt: JwtParts::default(),
        }
    }
}

impl Settings {
    /// Loads the settings: defaults, then `file` (if any), then the
    /// environment as read by `env` (`TERN_<KEY>`, plus `RUST_LOG` for
    /// `log` when `TERN_LOG` is unset), then `flags` as `(key, value)`
    /// pairs in order, then checks the whole with [`Config::validate`].
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &[(&str, &str)],
    ) -> Result<Settings, ConfigError> {
        let mut settings = Settings::default();
        if let Some(path) = file {
            settings.apply_file(path)?;
        }
        settings.apply_env(env)?;
        for (name, value) in flags {
            settings.apply_text(name, value, Origin::Flag(name.replace('_', "-")))?;
        }
        settings.finish()
    }

    /// Applies every key of a TOML file.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let read_error = |detail: String| ConfigError::Read {
            path: path.to_owned(),
            detail,
        };
        let Some(bytes) = tern_net::files::read_at_most(path, MAX_CONFIG_FILE_BYTES)
            .map_err(|e| read_error(e.to_string()))?
        else {
            return Err(read_error(format!(
                "more than the {MAX_CONFIG_FILE_BYTES} bytes a config file may have"
            )));
        };
        let text = String::from_utf8(bytes).map_err(|_| read_error("not UTF-8 text".into()))?;
        self.apply_toml(&text, path)
    }

    /// Applies every key of a TOML document read from `path`.
    pub fn apply_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let origin = Origin::File(path.to_owned());
        for (name, value) in &table {
            self.apply(name, Raw::Toml(value), &origin)?;
        }
        Ok(())
    }

    /// Applies `TERN_<KEY>` for every key that has one set.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for key in KEYS {
            let var = key.env_var();
            let (var, value) = match env(&var) {
                Some(value) => (var, value),
                None if key.name == "log" => match env("RUST_LOG") {
                    Some(value) => ("RUST_LOG".to_owned(), value),
                    None => continue,
                },
                None => continue,
            };
            self.apply(key.name, Raw::Text(&value), &Origin::Env(var))?;
        }
        Ok(())
    }

    /// Applies one key given as text (a flag's value).
    pub fn apply_text(&mut self, name: &str, value: &str, origin: Origin) -> Result<(), ConfigError> {
        self.apply(name, Raw::Text(value), &origin)
    }

    fn apply(&mut self, name: &str, value: Raw, origin: &Origin) -> Result<(), ConfigError> {
        let key = key(name).ok_or_else(|| ConfigError::UnknownKey {
            key: name.to_owned(),
            origin: origin.clone(),
        })?;
        (key.apply)(self, value).map_err(|detail| ConfigError::BadValue {
            key: name.to_owned(),
            detail,
            origin: origin.clone(),
        })
    }

    /// Checks the settings as a whole.
    pub fn finish(mut self) -> Result<Settings, ConfigError> {
        self.config.tls = match (self.tls_listen, &self.tls_cert, &self.tls_key) {
            (None, _, _) => None,
            (Some(listen), Some(cert), Some(key)) => Some(crate::config::TlsListener {
                listen,
                cert_chain: cert.clone(),
                key: key.clone(),
                allow_tls12: self.tls_allow_tls12,
            }),
            (Some(_), _, _) => return Err(ConfigError::Invalid(
                "tls_listen needs both tls_cert and tls_key (see `ternd gen-cert` for a self-signed pair)"
                    .into(),
            )),
        };
        self.config.content_filter = match &self.content_filter_file {
            None => None,
            Some(path) => Some(Arc::new(
                ContentFilter::open(path, self.content_filter_mode)
                    .map_err(|e| ConfigError::Invalid(format!("content_filter_file: {e}")))?,
            )),
        };
        self.config.jwt = self
            .jwt
            .load(self.config.registration)
            .map_err(ConfigError::Invalid)?
            .map(Arc::new);
        self.config.validate().map_err(ConfigError::Invalid)?;
        // The listeners bind with SO_REUSEPORT among the shards, so two of
        // them on one port would share it rather than fail.
        let listen = self.config.listen;
        let others = [
            ("metrics_listen", self.metrics_listen),
            ("tls_listen", self.config.tls.as_ref().map(|tls| tls.listen)),
        ];
        for (key, addr) in others {
            if let Some(addr) = addr.filter(|&addr| same_port(addr, listen)) {
                return Err(ConfigError::Invalid(format!(
                    "{key} ({addr}) and listen ({listen}) share a port; each listener needs its own"
                )));
            }
        }
        if let (Some(metrics), Some(tls)) = (self.metrics_listen, &self.config.tls) {
            if same_port(metrics, tls.listen) {
                return Err(ConfigError::Invalid(format!(
                    "metrics_listen ({metrics}) and tls_listen ({}) share a port; each listener needs its own",
                    tls.listen
                )));
            }
        }
        let admin = self.config.data_dir.join(crate::admin::ADMIN_SOCKET);
        if admin.as_os_str().len() > UNIX_SOCKET_PATH_MAX {
            return Err(ConfigError::Invalid(format!(
                "data_dir is too long: its admin socket {} would be {} bytes, and a Unix socket \
                 path holds at most {UNIX_SOCKET_PATH_MAX}; use a shorter path (or a symlink to it)",
                admin.display(),
                admin.as_os_str().len()
            )));
        }
        if let Some(tls) = &self.config.tls {
            // Read once here so that `check-config` refuses what startup
            // would, and startup refuses before it creates the store; the
            // server reads the files again when it opens the listener.
            TlsConfig::from_pem_files(&tls.cert_chain, &tls.key, tls.allow_tls12)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", tls_keys_at_fault(&e, tls))))?;
        }
        Ok(self)
    }

    /// The settings as a TOML document that sets every key: printed at
    /// startup and by `ternd check-config`, and loadable as a config file.
    /// There are no secrets yet; keys that will hold them (TLS key paths)
    /// print the path, never the contents.
    pub fn effective_toml(&self) -> String {
        let mut out = String::new();
        for key in KEYS {
            out.push_str(key.name);
            out.push_str(" = ");
            out.push_str(&(key.show)(self));
            out.push('\n');
        }
        out
    }
}

/// The `tls_*` key(s) whose file a loading error is about.
fn tls_keys_at_fault(error: &TlsError, tls: &crate::config::TlsListener) -> &'static str {
    match error {
        TlsError::Read { path, .. } | TlsError::Pem { path, .. } | TlsError::TooLarge { path, .. }
            if *path == tls.cert_chain =>
        {
            "tls_cert"
        }
        TlsError::Read { .. } | TlsError::Pem { .. } | TlsError::TooLarge { .. } | TlsError::NoKey { .. } => {
            "tls_key"
        }
        TlsError::NoCertificate { .. } => "tls_cert",
        _ => "tls_cert and tls_key",
    }
}

/// Longest path a Unix socket can be bound to (`sun_path` is 108 bytes
/// with its terminating NUL).
const UNIX_SOCKET_PATH_MAX: usize = 107;

/// Whether two fixed listen addresses would take the same port: the same
/// port on the same address, or on an address and the wildcard.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_toml(text: &str) -> Result<Settings, ConfigError> {
        let mut settings = Settings::default();
        settings.apply_toml(text, Path::new("test.toml"))?;
        settings.finish()
    }

    #[test]
    fn every_key_round_trips_through_the_effective_toml() {
        let settings = load_toml(
            "durability = \"async\"\nflush_interval_ms = 25\nhistory_retention_secs = 86400\n\
             metrics_listen = \"127.0.0.1:9878\"\ndata_dir = \"/var/lib/tern \\\"x\\\"\"\n",
        )
        .unwrap();
        let printed = settings.effective_toml();
        let again = load_toml(&printed).unwrap();
        assert_eq!(again.effective_toml(), printed);
        assert_eq!(
            again.config.durability,
            Durability::Async {
                flush_interval: Duration::from_millis(25)
            }
        );
        assert_eq!(again.config.history_retention, Some(Duration::from_secs(86400)));
        assert_eq!(again.config.data_dir, PathBuf::from("/var/lib/tern \"x\""));
        assert_eq!(printed.lines().count(), KEYS.len());
    }

    #[test]
    fn limits_and_the_content_filter_load_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let words = dir.path().join("words.txt");
        std::fs::write(&words, "darn\n").unwrap();
        let text = format!(
            "message_rate_per_sec = 7\nlimits_exempt = [\"10.0.0.0/8\", \"::1\"]\n\
             content_filter_file = {:?}\ncontent_filter_mode = \"mask\"\nlogin_timeout_ms = 2500\n",
            words.display().to_string()
        );
        let settings = load_toml(&text).unwrap();
        let config = &settings.config;
        assert_eq!(config.limits.message_rate_per_sec, 7);
        assert_eq!(config.login_timeout, Duration::from_millis(2500));
        assert!(config.limits.is_exempt("10.1.2.3".parse().unwrap()));
        assert!(!config.limits.is_exempt("127.0.0.1".parse().unwrap()));
        let filter = config.content_filter.as_ref().unwrap();
        assert_eq!((filter.words(), filter.mode()), (1, FilterMode::Mask));
        let again = load_toml(&settings.effective_toml()).unwrap();
        assert_eq!(again.effective_toml(), settings.effective_toml());
        let settings =
            Settings::load(None, no_env, &[("limits_exempt", "192.0.2.0/24, 2001:db8::/32")]).unwrap();
        assert_eq!(settings.config.limits.limits_exempt.len(), 2);
        let err = load_toml("limits_exempt = [\"10.0.0.0/33\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefix length"), "{err}");
        let err = load_toml("content_filter_file = \"/nonexistent/words\"").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }

    #[test]
    fn jwt_settings_load_and_unsafe_combinations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("jwt.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        let with_secret = |rest: &str| {
            format!(
                "jwt_hs256_secret_file = {:?}\n{rest}",
                secret.display().to_string()
            )
        };
        let settings = load_toml(&with_secret(
            "jwt_issuer = \"login.example\"\nregistration = false\n",
        ))
        .unwrap();
        let jwt = settings.config.jwt.as_ref().expect("JWT logins on");
        assert!(jwt.policy.create_accounts && !jwt.policy.password_accounts);
        assert!(!settings.config.registration);
        let again = load_toml(&settings.effective_toml()).unwrap();
        assert_eq!(again.effective_toml(), settings.effective_toml());

        // Password accounts reachable by JWT only with registration closed.
        let err = load_toml(&with_secret("jwt_password_accounts = true\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("registration = false"), "{err}");
        load_toml(&with_secret(
            "jwt_password_accounts = true\nregistration = false\n",
        ))
        .unwrap();
        // jwt_* settings without a key are a mistake, not silently ignored.
        for text in [
            "jwt_issuer = \"x\"",
            "jwt_create_accounts = false",
            "jwt_leeway_secs = 5",
        ] {
            let err = load_toml(text).unwrap_err().to_string();
            assert!(err.contains("need jwt_hs256_secret_file"), "{text}: {err}");
        }
        let err = load_toml("jwt_hs256_secret_file = \"/nonexistent/secret\"").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");

        // A public key alone turns JWT logins on, for its own algorithm.
        let rsa = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jwt-rs256-public.pem");
        let p256 = dir.path().join("p256.pem");
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&p256, pair.public_key_pem()).unwrap();
        for (key, file) in [
            ("jwt_rs256_public_key_file", &rsa),
            ("jwt_es256_public_key_file", &p256),
        ] {
            let text = format!("{key} = {:?}\n", file.display().to_string());
            let settings = load_toml(&text).unwrap();
            assert!(settings.config.jwt.is_some(), "{key}");
            assert!(settings.effective_toml().contains(key), "{key} is shown");
        }
        // Each file must hold its own kind of key.
        let text = format!("jwt_es256_public_key_file = {:?}\n", rsa.display().to_string());
        let err = load_toml(&text).unwrap_err().to_string();
        assert!(err.contains("P-256"), "{err}");
    }

    #[test]
    fn listeners_sharing_a_port_and_unservable_data_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = tern_net::tls::generate_self_signed(dir.path(), &[]).unwrap();
        let tls = |listen: &str| {
            format!(
                "tls_listen = \"{listen}\"\ntls_cert = {:?}\ntls_key = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            )
        };
        for (text, key) in [
            (
                format!("listen = \"127.0.0.1:7000\"\n{}", tls("127.0.0.1:7000")),
                "tls_listen",
            ),
            (
                format!("listen = \"0.0.0.0:7000\"\n{}", tls("127.0.0.1:7000")),
                "tls_listen",
            ),
            (
                "listen = \"127.0.0.1:7000\"\nmetrics_listen = \"0.0.0.0:7000\"\n".to_owned(),
                "metrics_listen",
            ),
            (
                format!("metrics_listen = \"127.0.0.1:7001\"\n{}", tls("127.0.0.1:7001")),
                "metrics_listen",
            ),
        ] {
            let err = load_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("share a port"), "{text}: {err}");
        }
        // Other ports, other addresses, or port 0 (each picks its own).
        for text in [
            format!("listen = \"127.0.0.1:7000\"\n{}", tls("127.0.0.1:7443")),
            format!("listen = \"127.0.0.1:7000\"\n{}", tls("127.0.0.2:7000")),
            format!(
                "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n{}",
                tls("127.0.0.1:0")
            ),
        ] {
            load_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        // admin.sock must fit a Unix socket path.
        let long = format!("/{}", "d".repeat(120));
        let err = load_toml(&format!("data_dir = \"{long}\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_dir is too long"), "{err}");
        load_toml(&format!("data_dir = \"/{}\"", "d".repeat(90))).unwrap();
    }

    #[test]
    fn defaults_match_the_engine_defaults() {
        let settings = Settings::load(None, no_env, &[]).unwrap();
        let engine = Config::default();
        assert_eq!(settings.config.listen, engine.listen);
        assert_eq!(settings.config.idle_timeout, engine.idle_timeout);
        assert_eq!(settings.config.durability, Durability::Sync);
        assert_eq!(settings.metrics_listen, None);
        assert_eq!(settings.log, DEFAULT_LOG);
    }

    #[test]
    fn flush_interval_applies_in_either_order() {
        let a = load_toml("flush_interval_ms = 7\ndurability = \"async\"").unwrap();
        let b = load_toml("durability = \"async\"\nflush_interval_ms = 7").unwrap();
        let want = Durability::Async {
            flush_interval: Duration::from_millis(7),
        };
        assert_eq!(a.config.durability, want);
        assert_eq!(b.config.durability, want);
    }

    #[test]
    fn bad_values_name_the_key_and_what_is_allowed() {
        let cases = [
            (
                "durability = \"fast\"",
                "config key `durability`: expected \"sync\" or \"async\", got \"fast\"",
            ),
            (
                "shards = 0",
                "config key `shards`: expected an integer in 1..=1024, got 0",
            ),
            (
                "shards = \"four\"",
                "config key `shards`: expected an integer in 1..=1024, got \"four\"",
            ),
            (
                "pin_shards = 1",
                "config key `pin_shards`: expected true or false, got 1",
            ),
            (
                "listen = \"localhost\"",
                "config key `listen`: expected an IP address and port",
            ),
            (
                "metrics_listen = 9878",
                "config key `metrics_listen`: expected \"off\" or an IP address",
            ),
            (
                "idle_timeout_ms = -5",
                "config key `idle_timeout_ms`: expected an integer in 100..=",
            ),
            (
                "log = \"info,[\"",
                "config key `log`: expected log filter directives",
            ),
            (
                "history_retention_secs = \"never\"",
                "config key `history_retention_secs`: expected \"forever\" or an integer",
            ),
        ];
        for (text, want) in cases {
            let err = load_toml(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text}: got {err}");
            assert!(err.ends_with("(in test.toml)"), "{text}: got {err}");
        }
    }

    #[test]
    fn unrecognised_environment_variables_are_named() {
        let names = [
            "TERN_LISTEN",
            "TERN_DURABLITY",
            "PATH",
            "TERN_USER",
            "TERN_CONFIG",
            "TERN_",
            "TERN_LOG",
        ];
        let unknown = unrecognised_env_vars(names.iter().map(|s| s.to_string()));
        assert_eq!(unknown, ["TERN_", "TERN_DURABLITY"]);
    }

    #[test]
    fn unknown_keys_and_tables_are_refused_by_name() {
        let err = load_toml("listen = \"127.0.0.1:1\"\nlsiten = \"x\"").unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownKey {
                key: "lsiten".into(),
                origin: Origin::File("test.toml".into())
            }
        );
        let err = load_toml("[store]\nfsync = true").unwrap_err();
        assert!(err.to_string().contains("unknown config key `store`"), "{err}");
    }

    #[test]
    fn syntax_errors_say_where() {
        let err = load_toml("listen = ").unwrap_err().to_string();
        assert!(
            err.starts_with("config file test.toml is not valid TOML"),
            "{err}"
        );
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn cross_field_checks_run_after_all_layers() {
        let err = load_toml("max_frame_bytes = 2048\nmax_message_bytes = 4096").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let err = load_toml("listen = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"").unwrap_err();
        assert!(err.to_string().contains("needs its own"), "{err}");
    }

    #[test]
    fn env_beats_file_and_flags_beat_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ternd.toml");
        std::fs::write(&file, "shards = 3\nlisten = \"127.0.0.1:1000\"\nsync_page = 9\n").unwrap();
        let env = |var: &str| match var {
            "TERN_SHARDS" => Some("5".to_owned()),
            "TERN_LISTEN" => Some("127.0.0.1:2000".to_owned()),
            "RUST_LOG" => Some("debug".to_owned()),
            _ => None,
        };
        let settings = Settings::load(Some(&file), env, &[("listen", "127.0.0.1:3000")]).unwrap();
        assert_eq!(settings.config.sync_page, 9, "file beats default");
        assert_eq!(settings.config.shards, 5, "env beats file");
        assert_eq!(settings.config.listen.port(), 3000, "flag beats env");
        assert_eq!(settings.log, "debug", "RUST_LOG sets log without TERN_LOG");
    }

    #[test]
    fn env_and_flag_errors_say_where_the_value_came_from() {
        let env = |var: &str| (var == "TERN_DURABILITY").then(|| "fast".to_owned());
        let err = Settings::load(None, env, &[]).unwrap_err().to_string();
        assert!(
            err.ends_with("(from environment variable TERN_DURABILITY)"),
            "{err}"
        );
        let err = Settings::load(None, no_env, &[("sync_page", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("(from flag --sync-page)"), "{err}");
    }

    #[test]
    fn oversized_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            Settings::load(Some(&missing), no_env, &[]),
            Err(ConfigError::Read { .. })
        ));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_FILE_BYTES as usize + 1]).unwrap();
        let err = Settings::load(Some(&big), no_env, &[]).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
        // A device reports a size of 0 and never ends: refused after the
        // bound, not read until memory runs out.
        let err = Settings::load(Some(Path::new("/dev/zero")), no_env, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn every_key_is_documented() {
        let docs = include_str!("../../docs/configuration.md");
        for key in KEYS {
            assert!(
                docs.contains(&format!("| `{}` |", key.name)),
                "docs/configuration.md lacks `{}`",
                key.name
            );
            assert!(
                docs.contains(&key.env_var()),
                "docs/configuration.md lacks {}",
                key.env_var()
            );
        }
    }

    /// `ternd --help` prints each key's help; the table's "what it sets"
    /// column must begin with it (backticks aside), so the two cannot
    /// drift apart: the help is the table's first sentence or clause.
    #[test]
    fn the_help_of_every_key_opens_its_row_in_the_docs() {
        let docs = include_str!("../../docs/configuration.md");
        for key in KEYS {
            let row = docs
                .lines()
                .find(|line| line.starts_with(&format!("| `{}` |", key.name)))
                .unwrap_or_else(|| panic!("docs/configuration.md lacks `{}`", key.name));
            let what = row
                .trim_end_matches('|')
                .rsplit(" | ")
                .next()
                .unwrap_or_default()
                .replace('`', "");
            assert!(
                what.starts_with(key.help),
                "`{}`: --help says\n  {}\nbut docs/configuration.md says\n  {}",
                key.name,
                key.help,
                what
            );
        }
    }
}
