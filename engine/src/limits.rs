//! Abuse limits: request rates per connection, login back-off,
//! registrations and connections per address.
//!
//! This module owns every limiter's state and the rules that read it. A
//! connection's own meters ([`ConnLimiter`]: a frame bucket and a stricter
//! message bucket, both GCRA token buckets in one `u64` each) live in the
//! connection's task. Everything keyed by address or account lives in a
//! per-shard table: a glommio shard is exactly one thread, so the tables
//! are `thread_local!`, touched only by the shard that owns them, with no
//! lock and no atomic. "Per address" therefore means per shard: each shard
//! enforces the configured values on the sockets it owns (pre-login
//! connections on the shard that accepted them, sessions on their user's
//! home shard) and on the logins it runs, so a node of `N` shards admits
//! at most `N` times the configured value from one address (the kernel
//! spreads one address's connections over all shards). `docs/security.md`
//! explains the choice. IPv6 addresses count per /64, since one host
//! usually owns a whole /64. Tables that remember recent activity are
//! capped (`max_tracked_addresses` entries per table and shard); idle
//! entries are swept when a table is full, and a table still full after a
//! sweep stops tracking new keys (fails open) rather than refusing
//! everyone.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Instant;

use rustc_hash::FxHashMap;
use tern_proto::ErrorCode;

use crate::config::{Config, Limits};

/// Microseconds since the first call in this process, from a monotonic clock.
pub fn monotonic_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A rate and a burst, as the constants of a GCRA token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Time one token takes to come back.
    interval_us: u64,
    /// How far ahead of real time the bucket may run (burst − 1 tokens).
    tolerance_us: u64,
}

impl Rate {
    /// `per_second` tokens per second, up to `burst` at once; `None`
    /// (no limit) when `per_second` is 0.
    pub fn new(per_second: u32, burst: u32) -> Option<Rate> {
        if per_second == 0 {
            return None;
        }
        let interval_us = (1_000_000 / u64::from(per_second)).max(1);
        Some(Rate::every(interval_us, burst))
    }

    /// `per_hour` tokens per hour, up to `burst` at once; `None` (no limit)
    /// when `per_hour` is 0.
    pub fn per_hour(per_hour: u32, burst: u32) -> Option<Rate> {
        const HOUR_US: u64 = 3_600_000_000;
        if per_hour == 0 {
            return None;
        }
        Some(Rate::every((HOUR_US / u64::from(per_hour)).max(1), burst))
    }

    fn every(interval_us: u64, burst: u32) -> Rate {
        Rate {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.max(1) - 1)),
        }
    }
}

/// One token bucket's state: the theoretical arrival time of the next
/// request (GCRA), so a bucket is a single integer and a check is a few
/// additions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bucket {
    tat_us: u64,
}

impl Bucket {
    /// Takes a token at `now_us`, or says how long until one is there.
    pub fn take(&mut self, rate: &Rate, now_us: u64) -> Result<(), u64> {
        let tat = self.tat_us.max(now_us);
        let allowed_at = tat.saturating_sub(rate.tolerance_us);
        if now_us < allowed_at {
            return Err(allowed_at - now_us);
        }
        self.tat_us = tat.saturating_add(rate.interval_us);
        Ok(())
    }

    /// Whether the bucket is full again (nothing to remember).
    fn is_full(&self, now_us: u64) -> bool {
        self.tat_us <= now_us
    }
}

fn us_to_ms_ceil(us: u64) -> u32 {
    us.div_ceil(1000).min(u64::from(u32::MAX)) as u32
}

/// What to do with a frame, as the connection's meters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Allow,
    /// Answer `Error(RateLimited)`; a token is back in `retry_after_ms`.
    Refuse { retry_after_ms: u32 },
    /// The connection kept sending past its limit: `Disconnect(RateLimited)`.
    Disconnect { retry_after_ms: u32 },
}

/// The meters of one connection. Owned by the connection's task. Clone to
/// meter on trial (a parked session answering heartbeats commits the copy
/// only if every frame passes).
#[derive(Debug, Clone)]
pub struct ConnLimiter {
    frame_rate: Option<Rate>,
    message_rate: Option<Rate>,
    disconnect_after: u32,
    frames: Bucket,
    messages: Bucket,
    refused_in_a_row: u32,
}

impl ConnLimiter {
    /// Meters for a connection from `peer` (`None`: unknown, metered).
    /// A connection from an exempt network is not metered.
    pub fn new(limits: &Limits, peer: Option<IpAddr>) -> ConnLimiter {
        let exempt = peer.is_some_and(|ip| limits.is_exempt(ip));
        ConnLimiter {
            frame_rate: if exempt {
                None
            } else {
                Rate::new(limits.frame_rate_per_sec, limits.frame_burst)
            },
            message_rate: if exempt {
                None
            } else {
                Rate::new(limits.message_rate_per_sec, limits.message_burst)
            },
            disconnect_after: limits.rate_limit_disconnect_after,
            frames: Bucket::default(),
            messages: Bucket::default(),
            refused_in_a_row: 0,
        }
    }

    /// Starts this session's message bucket where `user`'s last session on
    /// this shard (their home) left it, if that one had tokens still to
    /// win back: otherwise a client could spend the burst, reconnect with
    /// `LoginToken` (answered from memory) and spend a fresh one, a
    /// burst per connection rate instead of the message rate, and shed a
    /// `Sync`'s cursor debt the same way.
    pub fn resume_messages(&mut self, user: u64) {
        if self.message_rate.is_none() {
            return;
        }
        if let Some(tat_us) = TABLES.with(|tables| tables.borrow().message_debts.get(&user).copied()) {
            self.messages.tat_us = self.messages.tat_us.max(tat_us);
        }
    }

    /// Leaves this session's message bucket for `user`'s next session
    /// ([`ConnLimiter::resume_messages`]) if it still owes tokens.
    pub fn leave_messages(&self, limits: &Limits, user: u64, now_us: u64) {
        let tat_us = self.messages.tat_us;
        if self.message_rate.is_none() || tat_us <= now_us {
            return;
        }
        TABLES.with(|tables| {
            let mut tables = tables.borrow_mut();
            if let Some(known) = tables.message_debts.get_mut(&user) {
                *known = (*known).max(tat_us);
            } else if tables.room(limits, now_us, Table::MessageDebts) {
                tables.message_debts.insert(user, tat_us);
            }
        });
    }

    /// Charges `tokens` more to the message bucket of a request already
    /// served, as a debt the next messages wait out (a `Sync`'s cursors,
    /// each a receipt write): never refuses.
    pub fn charge_messages(&mut self, tokens: u64, now_us: u64) {
        if let Some(rate) = &self.message_rate {
            let tat = self.messages.tat_us.max(now_us);
            self.messages.tat_us = tat.saturating_add(rate.interval_us.saturating_mul(tokens));
        }
    }

    /// Meters one frame; `is_message` for a request metered at the
    /// message rate as well (see [`Limits::message_rate_per_sec`]).
    pub fn check(&mut self, is_message: bool, now_us: u64) -> Verdict {
        let mut result = match &self.frame_rate {
            Some(rate) => self.frames.take(rate, now_us),
            None => Ok(()),
        };
        if result.is_ok() && is_message {
            if let Some(rate) = &self.message_rate {
                result = self.messages.take(rate, now_us);
            }
        }
        match result {
            Ok(()) => {
                self.refused_in_a_row = 0;
                Verdict::Allow
            }
            Err(wait_us) => {
                self.refused_in_a_row = self.refused_in_a_row.saturating_add(1);
                let retry_after_ms = us_to_ms_ceil(wait_us);
                if self.disconnect_after > 0 && self.refused_in_a_row >= self.disconnect_after {
                    Verdict::Disconnect {
                        retry_after_ms: retry_after_ms.max(1000),
                    }
                } else {
                    Verdict::Refuse { retry_after_ms }
                }
            }
        }
    }
}

/// The key an address is counted under: IPv4 whole, IPv6 by /64 (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4(u32),
    V6(u64),
}

impl AddrKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(u32::from(v4)),
                None => AddrKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Failed logins of one account or address, the back-off they earned, and
/// the password checks running for it now.
#[derive(Debug, Clone, Copy, Default)]
struct Failures {
    count: u32,
    last_ms: u64,
    blocked_until_ms: u64,
    /// Password checks begun and not yet settled ([`LoginAttempt`]). Each
    /// may still fail, so each counts against the failures left before
    /// the back-off: guesses sent at once must not all pass the check
    /// before the first of them has failed.
    in_flight: u32,
}

impl Failures {
    /// `Err` is the wait in ms: the back-off, or, while as many password
    /// checks are running as may still fail before it starts (`free`
    /// failures in all; one at a time once it has begun), a short wait for
    /// them to settle.
    fn check(&self, limits: &Limits, free: u32, now_ms: u64) -> Result<(), u64> {
        if now_ms < self.blocked_until_ms {
            return Err(self.blocked_until_ms - now_ms);
        }
        let window = limits.login_failure_window.as_millis() as u64;
        let failed = match now_ms.saturating_sub(self.last_ms) >= window {
            true => 0,
            false => self.count,
        };
        if free > 0 && self.in_flight >= free.saturating_sub(failed).max(1) {
            return Err(IN_FLIGHT_WAIT_MS);
        }
        Ok(())
    }

    fn record(&mut self, limits: &Limits, free: u32, now_ms: u64) {
        let window = limits.login_failure_window.as_millis() as u64;
        if now_ms.saturating_sub(self.last_ms) >= window {
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.last_ms = now_ms;
        if self.count >= free {
            let doublings = (self.count - free).min(32);
            let base = limits.login_backoff_base.as_millis() as u64;
            let max = limits.login_backoff_max.as_millis() as u64;
            let backoff = base.saturating_mul(1u64 << doublings).min(max);
            self.blocked_until_ms = now_ms.saturating_add(backoff);
        }
    }

    /// Nothing to remember: no check running, no back-off, and no failure
    /// within the window. A count of 0 is idle whatever `last_ms` says:
    /// an entry that never failed has `last_ms` 0, and `now_ms` counts
    /// from the process's start, so the window test alone kept every such
    /// entry (one per connecting address) unsweepable for the first window
    /// of uptime, and a full table then left new addresses unmetered.
    fn is_idle(&self, limits: &Limits, now_ms: u64) -> bool {
        let window = limits.login_failure_window.as_millis() as u64;
        self.in_flight == 0
            && now_ms >= self.blocked_until_ms
            && (self.count == 0 || now_ms.saturating_sub(self.last_ms) >= window)
    }
}

/// What a shard remembers about one address beyond its open sockets.
#[derive(Debug, Clone, Copy, Default)]
struct Recent {
    connections: Bucket,
    registrations: Bucket,
    logins: Failures,
}

/// One shard's tables.
#[derive(Default)]
struct Tables {
    /// Sockets this shard owns per address. Bounded by the open sockets
    /// (and so by the process's descriptor limit); an entry goes at zero.
    open: FxHashMap<AddrKey, u32>,
    recent: FxHashMap<AddrKey, Recent>,
    accounts: FxHashMap<Box<str>, Failures>,
    /// When each user homed here may next change their account
    /// (monotonic ms): see [`account_change_allowed`].
    account_changes: FxHashMap<(u64, AccountChange), u64>,
    /// The message bucket a user's session left behind with tokens still
    /// owed (its theoretical arrival time, monotonic µs), for the user's
    /// next session here to start from: see [`ConnLimiter::resume_messages`].
    message_debts: FxHashMap<u64, u64>,
    /// When a full table was last swept, so that a table full of live
    /// entries is not rescanned on every insert.
    last_sweep_us: u64,
}

thread_local! {
    static TABLES: RefCell<Tables> = RefCell::new(Tables::default());
}

/// One of the bounded tables of [`Tables`].
#[derive(Debug, Clone, Copy)]
enum Table {
    Addresses,
    Accounts,
    AccountChanges,
    MessageDebts,
}

/// An account-wide change a user may make only every
/// [`ACCOUNT_CHANGE_INTERVAL_MS`], each kind on its own clock (so that
/// changing the password and then logging out the other devices, the
/// documented way to lock out someone who knows the old password, need
/// not wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountChange {
    Password,
    LogoutOthers,
    /// `AccountDelete`: an argon2 check each, like a password change; a
    /// second device's attempt right after a wrong password waits too.
    Delete,
}

/// Shortest time between two account-wide changes of one kind by one
/// user (`ChangePassword`, `LogoutOthers`). Each is a synced write that also
/// empties the store's token cache for every user, and a password change
/// costs two argon2 hashes: a user (or a stolen session) may not repeat
/// them at the frame rate. Kept per user on the home shard, where all of
/// a user's sessions live, so a new connection does not reset it.
pub const ACCOUNT_CHANGE_INTERVAL_MS: u64 = 5_000;

/// How long between sweeps of a full table.
const SWEEP_INTERVAL_US: u64 = 1_000_000;

impl Tables {
    /// The address's entry in the table of recent activity, made if there
    /// is room; `None` when the table is full of live entries (the address
    /// then goes unmetered: fail open).
    fn recent_mut(&mut self, limits: &Limits, key: AddrKey, now_us: u64) -> Option<&mut Recent> {
        if !self.recent.contains_key(&key) && !self.room(limits, now_us, Table::Addresses) {
            return None;
        }
        Some(self.recent.entry(key).or_default())
    }

    /// Makes room for a new key in `table` if it can; `false` means that
    /// table is full of live entries. Each table is judged on its own:
    /// failed logins for made-up account names fill only the accounts
    /// table, and must not switch off the limits on new addresses.
    fn room(&mut self, limits: &Limits, now_us: u64, table: Table) -> bool {
        let cap = limits.max_tracked_addresses;
        let has_room = |tables: &Tables| match table {
            Table::Addresses => tables.recent.len() < cap,
            Table::Accounts => tables.accounts.len() < cap,
            Table::AccountChanges => tables.account_changes.len() < cap,
            Table::MessageDebts => tables.message_debts.len() < cap,
        };
        if has_room(self) {
            return true;
        }
        if now_us.saturating_sub(self.last_sweep_us) >= SWEEP_INTERVAL_US || self.last_sweep_us == 0 {
            self.last_sweep_us = now_us.max(1);
            let now_ms = now_us / 1000;
            self.recent.retain(|_, r| {
                !(r.connections.is_full(now_us)
                    && r.registrations.is_full(now_us)
                    && r.logins.is_idle(limits, now_ms))
            });
            self.accounts.retain(|_, f| !f.is_idle(limits, now_ms));
            self.account_changes.retain(|_, &mut after_ms| after_ms > now_ms);
            self.message_debts.retain(|_, &mut tat_us| tat_us > now_us);
            let swept = has_room(self);
            if !swept {
                tracing::warn!(
                    cap,
                    ?table,
                    "an abuse-limit table is full of live entries; its new keys go untracked"
                );
            }
            return swept;
        }
        false
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: &'static str,
    pub retry_after_ms: u32,
}

/// A socket counted against its address on this shard; uncounts on drop.
/// Not `Send`: it must drop on the shard whose table counts it.
pub struct ConnectionPermit {
    key: Option<AddrKey>,
    _shard_local: PhantomData<Rc<()>>,
}

impl ConnectionPermit {
    /// A permit that counts nothing (an exempt or unknown address).
    pub fn uncounted() -> ConnectionPermit {
        ConnectionPermit {
            key: None,
            _shard_local: PhantomData,
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        // `try_with`: a permit dropped while the thread is exiting finds
        // the table already gone, and there is nothing left to count.
        let _ = TABLES.try_with(|tables| {
            let mut tables = tables.borrow_mut();
            if let Some(open) = tables.open.get_mut(&key) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    tables.open.remove(&key);
                }
            }
        });
    }
}

/// Admits a freshly accepted socket from `peer`, checking the address's
/// new-connection rate and its concurrent sockets on this shard.
pub fn admit_connection(config: &Config, peer: Option<IpAddr>) -> Result<ConnectionPermit, Refused> {
    admit(config, peer, true)
}

/// Counts a logged-in socket handed to this shard (its home shard),
/// checking only the address's concurrent sockets here.
pub fn adopt_connection(config: &Config, peer: Option<IpAddr>) -> Result<ConnectionPermit, Refused> {
    admit(config, peer, false)
}

fn admit(config: &Config, peer: Option<IpAddr>, new: bool) -> Result<ConnectionPermit, Refused> {
    let limits = &config.limits;
    let Some(ip) = peer.filter(|ip| !limits.is_exempt(*ip)) else {
        return Ok(ConnectionPermit::uncounted());
    };
    let key = AddrKey::of(ip);
    let now_us = monotonic_us();
    TABLES.with(|tables| {
        let mut tables = tables.borrow_mut();
        let open = tables.open.get(&key).copied().unwrap_or(0);
        if limits.max_connections_per_ip > 0 && open >= limits.max_connections_per_ip {
            return Err(Refused {
                code: ErrorCode::LimitExceeded,
                message: "too many connections from this address",
                retry_after_ms: 1000,
            });
        }
        if new {
            if let Some(rate) = Rate::new(limits.connection_rate_per_ip, limits.connection_burst_per_ip) {
                if let Some(recent) = tables.recent_mut(limits, key, now_us) {
                    if let Err(wait_us) = recent.connections.take(&rate, now_us) {
                        return Err(Refused {
                            code: ErrorCode::RateLimited,
                            message: "too many new connections from this address",
                            retry_after_ms: us_to_ms_ceil(wait_us),
                        });
                    }
                }
            }
        }
        *tables.open.entry(key).or_insert(0) += 1;
        Ok(ConnectionPermit {
            key: Some(key),
            _shard_local: PhantomData,
        })
    })
}

/// Takes one of `peer`'s registrations on this shard, before the password
/// is hashed; `Err` is the wait in ms until the next one. An exempt or
/// unknown address, and one that finds the tables full, is not metered.
pub fn registration_allowed(config: &Config, peer: Option<IpAddr>) -> Result<(), u32> {
    let limits = &config.limits;
    let Some(ip) = peer.filter(|ip| !limits.is_exempt(*ip)) else {
        return Ok(());
    };
    let Some(rate) = Rate::per_hour(
        limits.registration_rate_per_ip_per_hour,
        limits.registration_burst_per_ip,
    ) else {
        return Ok(());
    };
    let key = AddrKey::of(ip);
    let now_us = monotonic_us();
    TABLES.with(
        |tables| match tables.borrow_mut().recent_mut(limits, key, now_us) {
            Some(recent) => recent.registrations.take(&rate, now_us).map_err(us_to_ms_ceil),
            None => Ok(()),
        },
    )
}

/// How long a login refused because checks of its account or address are
/// still running is told to wait, ms: about one password hash.
const IN_FLIGHT_WAIT_MS: u64 = 1000;

/// A password check under way (`Login`, and the password of
/// `ChangePassword` and `AccountDelete`): while it lives it counts against
/// its account's and address's failures left ([`Failures::in_flight`]).
/// Drop it once the outcome is recorded ([`login_failed`],
/// [`login_succeeded`]), on the shard that made it.
#[must_use = "the attempt counts only while it is held"]
pub struct LoginAttempt {
    addr: Option<AddrKey>,
    account: Option<Box<str>>,
    /// The tables are the shard thread's own.
    _not_send: PhantomData<Rc<()>>,
}

impl Drop for LoginAttempt {
    fn drop(&mut self) {
        // `try_with`: nothing to settle once the thread's tables are gone.
        let _ = TABLES.try_with(|tables| {
            let mut tables = tables.borrow_mut();
            if let Some(recent) = self.addr.and_then(|key| tables.recent.get_mut(&key)) {
                recent.logins.in_flight = recent.logins.in_flight.saturating_sub(1);
            }
            if let Some(name) = self.account.as_deref() {
                if let Some(failures) = tables.accounts.get_mut(name) {
                    failures.in_flight = failures.in_flight.saturating_sub(1);
                    // A success forgot the failures while this check ran
                    // (`login_succeeded`): nothing is left to remember.
                    if failures.in_flight == 0 && failures.count == 0 && failures.blocked_until_ms == 0 {
                        tables.accounts.remove(name);
                    }
                }
            }
        });
    }
}

/// Checks, before any password is hashed or token checked, whether a login
/// for `account` (when named: a password check) from `peer` may be tried
/// now; `Err` is the wait in ms. A password check counts against the
/// back-off of its account and address until the returned attempt is
/// dropped; a token or JWT login (no account) only checks its address's.
pub fn login_allowed(
    config: &Config,
    peer: Option<IpAddr>,
    account: Option<&str>,
) -> Result<LoginAttempt, u32> {
    let limits = &config.limits;
    let now_us = monotonic_us();
    let now_ms = now_us / 1000;
    let metered_addr = peer.filter(|ip| !limits.is_exempt(*ip)).map(AddrKey::of);
    TABLES
        .with(|tables| {
            let mut tables = tables.borrow_mut();
            let (per_ip, per_account) = (limits.login_failures_per_ip, limits.login_failures_per_account);
            let by_addr = metered_addr
                .and_then(|key| tables.recent.get(&key))
                .map_or(Ok(()), |r| match account {
                    Some(_) => r.logins.check(limits, per_ip, now_ms),
                    // Only password checks are counted in flight.
                    None => r.logins.check(limits, 0, now_ms),
                });
            let by_account = account
                .and_then(|name| tables.accounts.get(name))
                .map_or(Ok(()), |f| f.check(limits, per_account, now_ms));
            match (by_addr, by_account) {
                (Ok(()), Ok(())) => {}
                (Err(a), Err(b)) => return Err(a.max(b)),
                (Err(wait), _) | (_, Err(wait)) => return Err(wait),
            }
            let mut attempt = LoginAttempt {
                addr: None,
                account: None,
                _not_send: PhantomData,
            };
            let Some(name) = account else {
                return Ok(attempt);
            };
            // Counted where tracked; a full table goes unmetered (fails
            // open), as its failures would.
            if let Some(key) = metered_addr.filter(|_| per_ip > 0) {
                if let Some(recent) = tables.recent_mut(limits, key, now_us) {
                    recent.logins.in_flight = recent.logins.in_flight.saturating_add(1);
                    attempt.addr = Some(key);
                }
            }
            if per_account > 0 {
                let tracked =
                    tables.accounts.contains_key(name) || tables.room(limits, now_us, Table::Accounts);
                if tracked {
                    let failures = tables.accounts.entry(name.into()).or_default();
                    failures.in_flight = failures.in_flight.saturating_add(1);
                    attempt.account = Some(name.into());
                }
            }
            Ok(attempt)
        })
        .map_err(|wait_ms| wait_ms.min(u64::from(u32::MAX)) as u32)
}

/// Records a failed login (or password check) for `account` from `peer`.
pub fn login_failed(config: &Config, peer: Option<IpAddr>, account: Option<&str>) {
    let limits = &config.limits;
    let now_us = monotonic_us();
    let now_ms = now_us / 1000;
    TABLES.with(|tables| {
        let mut tables = tables.borrow_mut();
        if let Some(ip) = peer.filter(|ip| !limits.is_exempt(*ip)) {
            if limits.login_failures_per_ip > 0 {
                if let Some(recent) = tables.recent_mut(limits, AddrKey::of(ip), now_us) {
                    recent.logins.record(limits, limits.login_failures_per_ip, now_ms);
                }
            }
        }
        if let Some(name) = account.filter(|_| limits.login_failures_per_account > 0) {
            if let Some(failures) = tables.accounts.get_mut(name) {
                failures.record(limits, limits.login_failures_per_account, now_ms);
            } else if tables.room(limits, now_us, Table::Accounts) {
                let mut failures = Failures::default();
                failures.record(limits, limits.login_failures_per_account, now_ms);
                tables.accounts.insert(name.into(), failures);
            }
        }
    });
}

/// Whether `user` may change their account now (`ChangePassword`,
/// `LogoutOthers`); if so, the next change must wait
/// [`ACCOUNT_CHANGE_INTERVAL_MS`]. `Err` is the wait in ms. Call on the
/// user's home shard. Exempt addresses are not metered.
pub fn account_change_allowed(
    config: &Config,
    peer: Option<IpAddr>,
    user: u64,
    change: AccountChange,
) -> Result<(), u32> {
    let limits = &config.limits;
    if peer.is_some_and(|ip| limits.is_exempt(ip)) {
        return Ok(());
    }
    let now_us = monotonic_us();
    let now_ms = now_us / 1000;
    TABLES.with(|tables| {
        let mut tables = tables.borrow_mut();
        if let Some(&after_ms) = tables.account_changes.get(&(user, change)) {
            if after_ms > now_ms {
                return Err(u32::try_from(after_ms - now_ms).unwrap_or(u32::MAX));
            }
        } else if !tables.room(limits, now_us, Table::AccountChanges) {
            return Ok(());
        }
        tables
            .account_changes
            .insert((user, change), now_ms + ACCOUNT_CHANGE_INTERVAL_MS);
        Ok(())
    })
}

/// Forgets an account's failures after a successful login. The address's
/// count stays: one good account must not launder a guessing address.
pub fn login_succeeded(account: &str) {
    TABLES.with(|tables| {
        let mut tables = tables.borrow_mut();
        match tables.accounts.get_mut(account) {
            // Other checks of the account are still running: keep their
            // count, forget the failures.
            Some(failures) if failures.in_flight > 0 => {
                *failures = Failures {
                    in_flight: failures.in_flight,
                    ..Failures::default()
                }
            }
            Some(_) => {
                tables.accounts.remove(account);
            }
            None => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpNet;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let rate = Rate::new(10, 3).unwrap();
        let mut bucket = Bucket::default();
        let t0 = 1_000_000;
        for _ in 0..3 {
            bucket.take(&rate, t0).unwrap();
        }
        let wait = bucket.take(&rate, t0).unwrap_err();
        assert_eq!(wait, 100_000);
        bucket.take(&rate, t0 + 100_000).unwrap();
        assert!(bucket.take(&rate, t0 + 100_000).is_err());
        assert!(Rate::new(0, 5).is_none());
    }

    #[test]
    fn flooding_connection_is_disconnected_after_refusals_in_a_row() {
        let limits = Limits {
            frame_rate_per_sec: 0,
            message_rate_per_sec: 1,
            message_burst: 2,
            rate_limit_disconnect_after: 5,
            limits_exempt: Vec::new(),
            ..Limits::default()
        };
        let mut conn = ConnLimiter::new(&limits, None);
        let now = 10_000_000;
        assert_eq!(conn.check(true, now), Verdict::Allow);
        assert_eq!(conn.check(true, now), Verdict::Allow);
        for _ in 0..4 {
            assert!(matches!(conn.check(true, now), Verdict::Refuse { .. }));
        }
        // Pings are not messages: they pass and break the run.
        assert_eq!(conn.check(false, now), Verdict::Allow);
        for _ in 0..4 {
            assert!(matches!(conn.check(true, now), Verdict::Refuse { .. }));
        }
        assert!(matches!(conn.check(true, now), Verdict::Disconnect { .. }));
    }

    #[test]
    fn registrations_take_a_burst_per_address_then_one_per_interval() {
        let rate = Rate::per_hour(3600, 2).unwrap();
        let mut bucket = Bucket::default();
        bucket.take(&rate, 10).unwrap();
        bucket.take(&rate, 10).unwrap();
        assert_eq!(bucket.take(&rate, 10), Err(1_000_000), "one per second");
        assert!(Rate::per_hour(0, 5).is_none());

        let mut config = Config::default();
        config.limits.registration_rate_per_ip_per_hour = 1;
        config.limits.registration_burst_per_ip = 2;
        config.limits.limits_exempt.clear();
        let guest: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(registration_allowed(&config, Some(guest)).is_ok());
        assert!(registration_allowed(&config, Some(guest)).is_ok());
        let wait = registration_allowed(&config, Some(guest)).unwrap_err();
        assert!((3_599_000..=3_600_000).contains(&wait), "{wait} ms");
        assert!(registration_allowed(&config, Some(other)).is_ok(), "per address");
        assert!(registration_allowed(&config, None).is_ok(), "unknown peer");
        config.limits.registration_rate_per_ip_per_hour = 0;
        assert!(registration_allowed(&config, Some(guest)).is_ok(), "0 is off");
    }

    #[test]
    fn exempt_networks_are_not_metered() {
        let limits = Limits {
            message_rate_per_sec: 1,
            message_burst: 1,
            ..Limits::default()
        };
        let mut conn = ConnLimiter::new(&limits, Some("127.0.0.1".parse().unwrap()));
        for _ in 0..100 {
            assert_eq!(conn.check(true, 5), Verdict::Allow);
        }
    }

    #[test]
    fn failures_back_off_exponentially_and_expire() {
        let limits = Limits {
            login_backoff_base: Duration::from_millis(100),
            login_backoff_max: Duration::from_millis(350),
            login_failure_window: Duration::from_secs(10),
            ..Limits::default()
        };
        let mut f = Failures::default();
        let t = 1_000_000;
        for i in 0..4 {
            f.record(&limits, 5, t + i);
            assert!(f.check(&limits, 5, t + i).is_ok());
        }
        f.record(&limits, 5, t + 4);
        assert_eq!(f.check(&limits, 5, t + 4), Err(100));
        f.record(&limits, 5, t + 104);
        assert_eq!(f.check(&limits, 5, t + 104), Err(200));
        f.record(&limits, 5, t + 304);
        assert_eq!(f.check(&limits, 5, t + 304), Err(350), "capped");
        assert!(!f.is_idle(&limits, t + 700));
        assert!(f.is_idle(&limits, t + 304 + 10_000));
        // After a quiet window the count starts again.
        f.record(&limits, 5, t + 304 + 10_000);
        assert!(f.check(&limits, 5, t + 304 + 10_000).is_ok());
    }

    #[test]
    fn an_entry_that_never_failed_is_idle_from_the_start() {
        // 15 minutes' window, 1 s after the process started.
        let limits = Limits::default();
        let never_failed = Failures::default();
        assert!(never_failed.is_idle(&limits, 1_000));
        let failed = Failures {
            count: 1,
            last_ms: 500,
            ..Failures::default()
        };
        assert!(!failed.is_idle(&limits, 1_000), "a failure within the window");
    }

    #[test]
    fn a_success_during_its_own_check_leaves_no_account_entry() {
        let config = Config::default();
        let attempt = login_allowed(&config, None, Some("settles")).expect("allowed");
        assert!(TABLES.with(|t| t.borrow().accounts.contains_key("settles")));
        login_succeeded("settles");
        drop(attempt);
        assert!(!TABLES.with(|t| t.borrow().accounts.contains_key("settles")));
    }

    #[test]
    fn checks_in_flight_count_as_failures_to_come() {
        let limits = Limits {
            login_backoff_base: Duration::from_millis(100),
            login_failure_window: Duration::from_secs(10),
            ..Limits::default()
        };
        let t = 1_000_000;
        // Three may fail before the back-off: three at once, not four.
        let mut f = Failures {
            in_flight: 2,
            ..Failures::default()
        };
        assert!(f.check(&limits, 3, t).is_ok());
        f.in_flight = 3;
        assert_eq!(f.check(&limits, 3, t), Err(IN_FLIGHT_WAIT_MS));
        // One failure recorded: two left, so two at once.
        f.record(&limits, 3, t);
        f.in_flight = 2;
        assert_eq!(f.check(&limits, 3, t), Err(IN_FLIGHT_WAIT_MS));
        f.in_flight = 1;
        assert!(f.check(&limits, 3, t).is_ok());
        // Past the back-off: one at a time.
        f.record(&limits, 3, t);
        f.record(&limits, 3, t);
        f.in_flight = 0;
        assert!(f.check(&limits, 3, t).is_err(), "backing off");
        assert!(f.check(&limits, 3, t + 1000).is_ok());
        f.in_flight = 1;
        assert_eq!(f.check(&limits, 3, t + 1000), Err(IN_FLIGHT_WAIT_MS));
        assert!(!f.is_idle(&limits, t + 100_000), "a check is running");
        // A failure count forgotten after the window frees them all again;
        // no limit (0) never counts.
        f.in_flight = 2;
        assert!(f.check(&limits, 3, t + 1000 + 10_000 + 800).is_ok());
        f.in_flight = 1000;
        assert!(f.check(&limits, 0, t + 1000).is_ok());
    }

    #[test]
    fn ipv6_counts_per_slash_64_and_mapped_v4_as_v4() {
        let a = AddrKey::of("2001:db8::1".parse().unwrap());
        let b = AddrKey::of("2001:db8::ffff:2".parse().unwrap());
        let c = AddrKey::of("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            AddrKey::of("::ffff:10.0.0.1".parse().unwrap()),
            AddrKey::of("10.0.0.1".parse().unwrap())
        );
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn connection_count_is_released_on_drop() {
        let mut config = Config::default();
        config.limits.limits_exempt.clear();
        config.limits.max_connections_per_ip = 2;
        config.limits.connection_rate_per_ip = 0;
        let ip = Some("192.0.2.7".parse().unwrap());
        let a = admit_connection(&config, ip).unwrap();
        let _b = admit_connection(&config, ip).unwrap();
        let refused = admit_connection(&config, ip).err().unwrap();
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        drop(a);
        assert!(admit_connection(&config, ip).is_ok());
    }
}
