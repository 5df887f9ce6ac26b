//! The command line: options shared by every scenario, the scenario
//! subcommands, and the small parsers and arithmetic they need (source
//! address ranges, splitting work into near-equal shares).
//!
//! The coordinator re-runs this same command line in each child process
//! with the hidden `--child` flag added, so everything a child needs to do
//! its share must be derivable from these options alone.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Drives a real `ternd` over TCP and reports throughput and latency.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options every scenario understands (accepted before or after the subcommand).
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The server to load.
    #[arg(long, global = true, default_value = "127.0.0.1:7878")]
    pub server: SocketAddr,
    /// glommio executors (threads) per process.
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
    /// Worker processes; each gets a share of the connections (the per-process
    /// fd limit caps how many one process can hold).
    #[arg(long, global = true, default_value_t = 1)]
    pub procs: usize,
    /// Source addresses to connect from, e.g. `127.0.0.2-127.0.0.254,10.0.0.5`.
    /// `auto`: that loopback range when the server is on loopback, else the
    /// kernel's choice. `none`: never bind.
    #[arg(long, global = true, default_value = "auto")]
    pub source_ips: String,
    /// Username prefix. Given: users `<prefix><n>` are reused when they exist
    /// (login is tried first). Default: `lg{run_id}_`, registered fresh.
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// Password of every load-generator user.
    #[arg(long, global = true, default_value = "loadgen-password")]
    pub password: String,
    /// The server's HS256 JWT secret (its `jwt_hs256_secret_file`): users
    /// log in with JWTs minted from it instead of registering with a
    /// password (no password hashing during setup; the server creates each
    /// account on its first JWT login).
    #[arg(long, global = true, value_name = "FILE")]
    pub jwt_secret_file: Option<std::path::PathBuf>,
    /// The `iss` claim of minted JWTs (the server's `jwt_issuer`).
    #[arg(long, global = true, requires = "jwt_secret_file")]
    pub jwt_issuer: Option<String>,
    /// The `aud` claim of minted JWTs (the server's `jwt_audience`).
    #[arg(long, global = true, requires = "jwt_secret_file")]
    pub jwt_audience: Option<String>,
    /// Registrations/logins in flight at once during setup (all processes
    /// together); the server hashes passwords, so more rarely helps.
    #[arg(long, global = true, default_value_t = 16)]
    pub setup_concurrency: usize,
    /// How long the measured phase runs (for `connect`: the default hold).
    #[arg(long, global = true, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// After sending stops, wait at most this long for outstanding deliveries.
    #[arg(long, global = true, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Give up on one connection's TCP connect + handshake + login after this long.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Read the server's resident memory from /proc/PID/status before and
    /// after connecting, and report KiB per connection.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// With `--server-pid`: how long the connected sessions sit idle before
    /// the "after" memory is read. The server parks sessions idle for its
    /// `park_after_ms` (5 s by default), so idle memory is read past that.
    #[arg(long, global = true, default_value_t = 1.0)]
    pub rss_settle_secs: f64,
    /// Write the merged result as JSON here.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Create this file once every worker has connected its sessions (the
    /// measured phase starts then); scripts wait for it, e.g. to restart
    /// the server under a held load.
    #[arg(long, global = true)]
    pub connected_file: Option<PathBuf>,
    /// Write the latency histogram here (HdrHistogram interval log, V2 deflate).
    #[arg(long, global = true)]
    pub hdr_log: Option<PathBuf>,
    /// No live progress line on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Identifies this run in usernames (default: derived from time and pid).
    #[arg(long, global = true)]
    pub run_id: Option<String>,
    /// Which server protocol to drive: Tern, or for comparison NATS
    /// (nats-server) or MQTT 3.1.1 (mosquitto). Peers support `connect`,
    /// `pairs` and `groups`.
    #[arg(long, global = true, value_enum, default_value_t = Protocol::Tern)]
    pub protocol: Protocol,
    /// Connect over TLS (Tern only), trusting exactly the certificates in
    /// this PEM file (e.g. the `cert.pem` that `ternd gen-cert` writes);
    /// `--server` is then ternd's TLS listener.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// With `--tls-ca`: the name the server's certificate must carry.
    #[arg(long, global = true, default_value = "localhost")]
    pub tls_server_name: String,
    /// Verify exactly-once, in-order delivery of every message (always
    /// counted and reported as `lost`, `duplicated`, `reordered`); with this
    /// flag any of them makes the run fail (exit status 1).
    #[arg(long, global = true)]
    pub verify: bool,
    /// Internal: this process is worker number N of `--procs`.
    #[arg(long, global = true, hide = true)]
    pub child: Option<usize>,
}

/// What to measure.
#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Open N authenticated connections at a ramp rate and hold them idle.
    Connect(ConnectArgs),
    /// P sender→receiver pairs, windowed or open-loop: 1:1 throughput and latency.
    Pairs(PairsArgs),
    /// G groups of M members, one publisher per group at a rate: fan-out.
    Groups(GroupsArgs),
    /// A backlog sent to offline users, then drained: drain rate and time
    /// to first message (Tern only).
    Offline(OfflineArgs),
    /// Reconnect storm: every second K% of N sessions drop and resume with
    /// LoginToken + Sync from their cursors, while messages trickle in;
    /// sessions the server drops (a restart) resume after its hint
    /// (Tern only).
    Churn(ChurnArgs),
    /// A realistic day from a TOML profile, open loop: online users chat
    /// 1:1 and in groups, offline users catch up by `Sync` at the end
    /// (Tern only; see loadgen/profiles/day.toml).
    Mix(MixArgs),
    /// Friends' presence: U users, each friends with F others (set up
    /// through FriendAdd first), then a login storm (every user logs in at
    /// once or at --rate) or steady churn (K% of users log out and in
    /// every second); latency from a login to each online friend's
    /// `Presence` push, and a check that every friend ends seeing the
    /// state that holds (Tern only).
    Presence(PresenceArgs),
    /// Turns `--json` results into a capacity-planning summary (markdown on
    /// stdout) and optionally a latency-percentile plot (SVG). Runs no load.
    Report(ReportArgs),
}

#[derive(Args, Debug, Clone)]
pub struct MixArgs {
    /// The day to replay (TOML; see loadgen/profiles/day.toml).
    #[arg(long)]
    pub profile: PathBuf,
}

/// What the `presence` scenario measures.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMode {
    /// Every user logs in once; the window runs until the pushes settled.
    Storm,
    /// After the storm (not measured), users log out and in for
    /// --duration-secs.
    Churn,
}

#[derive(Args, Debug, Clone)]
pub struct PresenceArgs {
    /// Users (all processes together). Each executor's share forms its own
    /// friend graph, so it must exceed --friends.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Friends per user: the nearest in a ring of the executor's users.
    #[arg(long, default_value_t = 20)]
    pub friends: usize,
    #[arg(long, value_enum, default_value_t = PresenceMode::Storm)]
    pub mode: PresenceMode,
    /// Storm logins per second (all processes together); default: as fast
    /// as --max-pending allows.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Storm logins in flight at once (all processes together).
    #[arg(long, default_value_t = 512)]
    pub max_pending: usize,
    /// `churn`: percentage of the online users that log out and in again
    /// every second.
    #[arg(long, default_value_t = 5.0)]
    pub percent: f64,
    /// `churn`: how long a user stays logged out, ms.
    #[arg(long, default_value_t = 500)]
    pub offline_ms: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Results written by `--json`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Write a latency-percentile plot (one line per result with a histogram) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// An `--hdr-log` file for the plot; the n-th `--hdr` belongs to the
    /// n-th result (repeat the flag). Without it a result's own histogram
    /// (in results written since `report` existed) is plotted.
    #[arg(long = "hdr")]
    pub hdr: Vec<PathBuf>,
    /// Cores the measured server ran on (its shards, writer and store together).
    #[arg(long, default_value_t = 1.0)]
    pub server_cores: f64,
    /// Cores of the node to project for.
    #[arg(long, default_value_t = 64)]
    pub node_cores: usize,
    /// Memory of the node to project for, GiB.
    #[arg(long, default_value_t = 256.0)]
    pub node_mem_gib: f64,
    /// Share of the node's memory kept for the store's caches, the page
    /// cache and headroom (docs/capacity-planning.md section 3).
    #[arg(long, default_value_t = 0.25)]
    pub reserve_share: f64,
    /// Cores left to the storage writer, the store's workers, IRQs and the
    /// blocking pool; the rest run shards.
    #[arg(long, default_value_t = 8)]
    pub reserved_cores: usize,
    /// Kernel memory per idle TCP socket, KiB (not in the server's RSS).
    #[arg(long, default_value_t = 4.0)]
    pub kernel_kib_per_conn: f64,
    /// Server KiB per idle session to assume when no result measured it.
    #[arg(long, default_value_t = 6.5)]
    pub assumed_server_kib_per_conn: f64,
    /// Share of sessions busy at once, each holding `--active-kib` of buffers.
    #[arg(long, default_value_t = 0.05)]
    pub active_share: f64,
    #[arg(long, default_value_t = 64.0)]
    pub active_kib: f64,
}

/// The server protocol a run drives.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tern,
    Nats,
    Mqtt,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tern => "tern",
            Protocol::Nats => "nats",
            Protocol::Mqtt => "mqtt",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct OfflineArgs {
    /// Recipients (each gets its own sender; all processes together).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Backlog messages in total, spread evenly over the recipients.
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Backlog per recipient (overrides --backlog).
    #[arg(long)]
    pub backlog_per_user: Option<usize>,
    /// Sends each sender keeps unacknowledged while filling the backlog.
    #[arg(long, default_value_t = 256)]
    pub send_window: usize,
    /// Message body size in bytes (at least 20).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
}

impl OfflineArgs {
    /// Messages recipient `r` (of `users`) is sent.
    pub fn backlog_of(&self, r: usize) -> usize {
        match self.backlog_per_user {
            Some(n) => n,
            None => share(self.backlog, self.users, r).len(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Sessions held (one user each; all processes together).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Percentage of the sessions dropped and resumed every second; 0 just
    /// holds them (through a server restart, say: every session the server
    /// drops resumes after its `retry_after_ms` hint plus jitter).
    #[arg(long, default_value_t = 10.0)]
    pub percent: f64,
    /// Failed reconnect attempts in a row (capped, jittered exponential
    /// backoff from 200 ms to 5 s) before a session gives up.
    #[arg(long, default_value_t = 10)]
    pub max_retries: u32,
    /// Messages per second (all senders of one executor together) sent to
    /// the churning users; 0 for none. Each must arrive exactly once, in order.
    #[arg(long, default_value_t = 200.0)]
    pub trickle_rate: f64,
    /// Message body size in bytes (at least 20).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// The server will be killed during the run (a crash test): a live
    /// session lost without a `Disconnect` is expected, counted and
    /// resumed, not an error. Without it, ternd must say goodbye.
    #[arg(long)]
    pub server_crashes: bool,
}

/// How a `connect` session logs in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginKind {
    Token,
    Jwt,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Connections to open (all processes together).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connection attempts per second (all processes together).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Hold the connections idle this long (default: --duration-secs).
    #[arg(long)]
    pub hold_secs: Option<f64>,
    /// Sessions per user (the server allows up to 16 per user). More sessions
    /// per user means fewer slow password registrations before the run.
    #[arg(long, default_value_t = 1)]
    pub sessions_per_user: usize,
    /// Open each session one round trip at a time (Hello, then LoginToken,
    /// then Sync) instead of sending the three in one write.
    #[arg(long)]
    pub serial_setup: bool,
    /// How each measured session logs in: `token` (LoginToken, a session
    /// resume) or `jwt` (LoginJwt with a freshly minted token; needs
    /// --jwt-secret-file).
    #[arg(long, value_enum, default_value_t = LoginKind::Token)]
    pub login: LoginKind,
    /// Connection attempts in flight at once (all processes together).
    /// Keep it under the server's accept backlog (ternd: 1024 per shard):
    /// past it the kernel drops SYNs, and each dropped one waits a second
    /// to be retransmitted.
    #[arg(long, default_value_t = 512)]
    pub max_pending: usize,
}

#[derive(Args, Debug, Clone)]
pub struct PairsArgs {
    /// Sender→receiver pairs (each side its own user and connection).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Messages in flight per pair (sent, not yet delivered to the receiver).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Message body size in bytes (at least 20: the timestamp header).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Open loop: messages per second per pair, latency from the intended
    /// send time. Pairs are spread evenly over one period (not all due at
    /// once). The window still caps what is in flight; waiting on it shows
    /// up as latency.
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(Args, Debug, Clone)]
pub struct GroupsArgs {
    /// Groups (all processes together).
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// Members per group, the publisher included.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Messages per second each group's publisher sends (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Message body size in bytes (at least 20).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Spread each group's members over every executor of the process
    /// instead of keeping a group on one: one executor reading all of a
    /// 10,000-member group's sockets measures that core, not the server.
    /// Tern only, with --procs 1.
    #[arg(long)]
    pub spread_members: bool,
}

/// Smallest message body: magic (4), intended send time (8), sequence (8).
pub const MIN_PAYLOAD_BYTES: usize = 20;

impl Cli {
    /// Checks values the run could not work with.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.common;
        if c.threads == 0 || c.procs == 0 {
            return Err("--threads and --procs must be at least 1".into());
        }
        let drain_ok = c.drain_secs == 0.0 || positive(c.drain_secs);
        if !positive(c.duration_secs) || !positive(c.connect_timeout_secs) || !drain_ok {
            return Err("--duration-secs and --connect-timeout-secs must be > 0, --drain-secs >= 0".into());
        }
        if c.setup_concurrency == 0 {
            return Err("--setup-concurrency must be at least 1".into());
        }
        parse_source_ips(&c.source_ips, c.server)?;
        let tern_only = matches!(
            self.scenario,
            Scenario::Offline(_) | Scenario::Churn(_) | Scenario::Mix(_) | Scenario::Presence(_)
        );
        if tern_only && c.protocol != Protocol::Tern {
            return Err(format!("{} runs against Tern only", self.scenario_name()));
        }
        if c.tls_ca.is_some() && c.protocol != Protocol::Tern {
            return Err("--tls-ca is for Tern's TLS listener only".into());
        }
        match &self.scenario {
            Scenario::Connect(a) => {
                if !positive(a.rate) {
                    return Err("connect --rate must be > 0".into());
                }
                if a.sessions_per_user == 0 {
                    return Err("--sessions-per-user must be at least 1".into());
                }
            }
            Scenario::Pairs(a) => {
                if a.window == 0 {
                    return Err("--window must be at least 1".into());
                }
                if a.payload_bytes < MIN_PAYLOAD_BYTES {
                    return Err(format!("--payload-bytes must be at least {MIN_PAYLOAD_BYTES}"));
                }
                if a.rate.is_some_and(|r| !positive(r)) {
                    return Err("pairs --rate must be > 0".into());
                }
            }
            Scenario::Groups(a) => {
                if a.members < 2 {
                    return Err("--members must be at least 2 (a publisher and a receiver)".into());
                }
                if a.payload_bytes < MIN_PAYLOAD_BYTES {
                    return Err(format!("--payload-bytes must be at least {MIN_PAYLOAD_BYTES}"));
                }
                if !positive(a.rate) {
                    return Err("groups --rate must be > 0".into());
                }
                if a.spread_members && (c.procs > 1 || c.protocol != Protocol::Tern) {
                    return Err("--spread-members needs --procs 1 and the Tern protocol".into());
                }
            }
            Scenario::Offline(a) => {
                if a.users == 0 || a.send_window == 0 {
                    return Err("--users and --send-window must be at least 1".into());
                }
                if a.payload_bytes < MIN_PAYLOAD_BYTES {
                    return Err(format!("--payload-bytes must be at least {MIN_PAYLOAD_BYTES}"));
                }
            }
            Scenario::Churn(a) => {
                if a.connections == 0 {
                    return Err("--connections must be at least 1".into());
                }
                if !(a.percent.is_finite() && (0.0..=100.0).contains(&a.percent)) {
                    return Err("--percent must be in [0, 100]".into());
                }
                if !(a.trickle_rate == 0.0 || positive(a.trickle_rate)) {
                    return Err("--trickle-rate must be >= 0".into());
                }
                if a.payload_bytes < MIN_PAYLOAD_BYTES {
                    return Err(format!("--payload-bytes must be at least {MIN_PAYLOAD_BYTES}"));
                }
            }
            Scenario::Mix(a) => {
                crate::profile::Profile::load(&a.profile)?.check_split(c.procs * c.threads)?;
            }
            Scenario::Presence(a) => {
                if a.friends == 0 || a.max_pending == 0 {
                    return Err("--friends and --max-pending must be at least 1".into());
                }
                let slots = c.procs * c.threads;
                if a.users / slots <= a.friends {
                    return Err(format!(
                        "--users {} over {slots} executors leaves fewer than --friends {} + 1 users \
                         in some executor's graph",
                        a.users, a.friends
                    ));
                }
                if a.rate.is_some_and(|r| !positive(r)) {
                    return Err("presence --rate must be > 0".into());
                }
                if !(a.percent.is_finite() && (0.0..=100.0).contains(&a.percent)) {
                    return Err("--percent must be in [0, 100]".into());
                }
            }
            Scenario::Report(a) => a.validate()?,
        }
        Ok(())
    }

    /// The scenario's name as reported.
    pub fn scenario_name(&self) -> &'static str {
        match self.scenario {
            Scenario::Connect(_) => "connect",
            Scenario::Pairs(_) => "pairs",
            Scenario::Groups(_) => "groups",
            Scenario::Offline(_) => "offline",
            Scenario::Churn(_) => "churn",
            Scenario::Mix(_) => "mix",
            Scenario::Presence(_) => "presence",
            Scenario::Report(_) => "report",
        }
    }
}

impl ReportArgs {
    pub fn validate(&self) -> Result<(), String> {
        let shares_ok = (0.0..1.0).contains(&self.reserve_share) && (0.0..=1.0).contains(&self.active_share);
        if !positive(self.server_cores) || !positive(self.node_mem_gib) || self.node_cores == 0 {
            return Err("--server-cores, --node-cores and --node-mem-gib must be > 0".into());
        }
        if !shares_ok {
            return Err("--reserve-share must be in [0, 1), --active-share in [0, 1]".into());
        }
        let sizes = [
            self.kernel_kib_per_conn,
            self.assumed_server_kib_per_conn,
            self.active_kib,
        ];
        if sizes.iter().any(|k| !(k.is_finite() && *k >= 0.0)) {
            return Err("KiB figures must be finite and >= 0".into());
        }
        if self.hdr.len() > self.files.len() {
            return Err("more --hdr logs than results: the n-th --hdr belongs to the n-th result".into());
        }
        Ok(())
    }
}

impl Common {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    /// The username prefix and whether existing users may be reused.
    pub fn user_prefix(&self, run_id: &str) -> (String, bool) {
        match &self.prefix {
            Some(prefix) => (prefix.clone(), true),
            None => (format!("lg{run_id}_"), false),
        }
    }
}

/// Parses `--source-ips`: a comma-separated list of addresses and inclusive
/// `A-B` ranges, `auto` or `none`. An empty result means "do not bind".
pub fn parse_source_ips(spec: &str, server: SocketAddr) -> Result<Vec<Ipv4Addr>, String> {
    let spec = spec.trim();
    if spec == "none" {
        return Ok(Vec::new());
    }
    if spec == "auto" {
        // Spreading over 127/8 only works when the server is reachable from
        // those addresses, i.e. on loopback itself.
        return if server.ip().is_loopback() && server.is_ipv4() {
            parse_source_ips("127.0.0.2-127.0.0.254", server)
        } else {
            Ok(Vec::new())
        };
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (parse_ip(a)?, parse_ip(b)?),
            None => {
                let ip = parse_ip(item)?;
                (ip, ip)
            }
        };
        let (first, last) = (u32::from(first), u32::from(last));
        if first > last {
            return Err(format!("source range {item} runs backwards"));
        }
        if (last - first) as usize + out.len() > 1 << 20 {
            return Err(format!("source range {item} is unreasonably large"));
        }
        out.extend((first..=last).map(Ipv4Addr::from));
    }
    if out.is_empty() {
        return Err(format!("--source-ips {spec:?} names no address"));
    }
    Ok(out)
}

/// A finite number above zero (NaN and infinities are not rates or times).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn parse_ip(text: &str) -> Result<Ipv4Addr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address"))
}

/// The `index`-th of `parts` near-equal contiguous shares of `0..total`
/// (earlier shares get the remainder, one each).
pub fn share(total: usize, parts: usize, index: usize) -> Range<usize> {
    let parts = parts.max(1);
    let base = total / parts;
    let extra = total % parts;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    start.min(total)..(start + len).min(total)
}

/// Narrows `range` to the `index`-th of `parts` shares of it.
pub fn sub_share(range: &Range<usize>, parts: usize, index: usize) -> Range<usize> {
    let inner = share(range.len(), parts, index);
    range.start + inner.start..range.start + inner.end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> SocketAddr {
        "127.0.0.1:7878".parse().unwrap()
    }

    #[test]
    fn source_ranges_parse() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4, 10.0.0.9", server()).unwrap();
        let expected: Vec<Ipv4Addr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ips, expected);
        assert_eq!(parse_source_ips("auto", server()).unwrap().len(), 253);
        assert!(parse_source_ips("auto", "10.1.1.1:7878".parse().unwrap())
            .unwrap()
            .is_empty());
        assert!(parse_source_ips("none", server()).unwrap().is_empty());
        // Ranges may cross octet boundaries.
        assert_eq!(
            parse_source_ips("127.0.0.255-127.0.1.1", server()).unwrap().len(),
            3
        );
        assert!(parse_source_ips("127.0.0.9-127.0.0.2", server()).is_err());
        assert!(parse_source_ips("127.0.0", server()).is_err());
        assert!(parse_source_ips(",", server()).is_err());
    }

    #[test]
    fn shares_cover_everything_once() {
        for total in [0, 1, 7, 100, 19_000] {
            for parts in 1..6 {
                let mut next = 0;
                for i in 0..parts {
                    let r = share(total, parts, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() == total / parts || r.len() == total / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
        assert_eq!(sub_share(&(10..20), 3, 1), 14..17);
        assert_eq!(sub_share(&(10..20), 3, 2), 17..20);
    }

    #[test]
    fn arguments_parse_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "--procs",
            "2",
            "pairs",
            "--pairs",
            "4",
            "--window",
            "8",
            "--duration-secs",
            "2",
            "--json",
            "/tmp/x.json",
        ])
        .unwrap();
        assert_eq!(cli.common.procs, 2);
        assert_eq!(cli.common.duration_secs, 2.0);
        assert_eq!(cli.scenario_name(), "pairs");
        match &cli.scenario {
            Scenario::Pairs(p) => {
                assert_eq!((p.pairs, p.window, p.payload_bytes, p.rate), (4, 8, 64, None));
            }
            other => panic!("wrong scenario {other:?}"),
        }
        cli.validate().unwrap();

        let bad = Cli::try_parse_from(["loadgen", "pairs", "--window", "0"]).unwrap();
        assert!(bad.validate().is_err());
        let bad = Cli::try_parse_from(["loadgen", "groups", "--members", "1"]).unwrap();
        assert!(bad.validate().is_err());
        // Spread members share one process's registry of group ids.
        let bad = Cli::try_parse_from(["loadgen", "--procs", "2", "groups", "--spread-members"]).unwrap();
        assert!(bad.validate().unwrap_err().contains("--spread-members"));
        let ok = Cli::try_parse_from(["loadgen", "--threads", "4", "groups", "--spread-members"]).unwrap();
        ok.validate().unwrap();
        let bad = Cli::try_parse_from(["loadgen", "--source-ips", "x", "connect"]).unwrap();
        assert!(bad.validate().is_err());
        let bad =
            Cli::try_parse_from(["loadgen", "--protocol", "nats", "--tls-ca", "ca.pem", "pairs"]).unwrap();
        assert!(bad.validate().unwrap_err().contains("--tls-ca"));
        assert!(Cli::try_parse_from(["loadgen", "bogus"]).is_err());

        let ok = Cli::try_parse_from(["loadgen", "presence", "--users", "42", "--friends", "20"]).unwrap();
        ok.validate().unwrap();
        // Each executor's share must hold a user and all its friends.
        let bad = Cli::try_parse_from([
            "loadgen",
            "--threads",
            "2",
            "presence",
            "--users",
            "40",
            "--friends",
            "20",
        ])
        .unwrap();
        assert!(bad.validate().unwrap_err().contains("--friends"));
        let bad =
            Cli::try_parse_from(["loadgen", "presence", "--mode", "churn", "--percent", "101"]).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn prefix_selects_reuse() {
        let cli = Cli::try_parse_from(["loadgen", "connect"]).unwrap();
        assert_eq!(cli.common.user_prefix("abc"), ("lgabc_".to_string(), false));
        let cli = Cli::try_parse_from(["loadgen", "--prefix", "bench_", "connect"]).unwrap();
        assert_eq!(cli.common.user_prefix("abc"), ("bench_".to_string(), true));
    }

    #[test]
    fn help_shows_the_prefix_pattern_on_one_line() {
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        let line = help
            .lines()
            .find(|line| line.contains("Username prefix"))
            .expect("--prefix has help");
        assert!(line.contains("users `<prefix><n>` are reused"), "{line}");
    }
}
