//! `mix` profiles: the TOML description of a realistic day, its validation
//! (every error names the key at fault), and the pure planning that turns
//! it into one executor's population: who is online, who talks to whom 1:1,
//! which groups exist with which members, who catches up by `Sync` at the
//! end, and the open-loop send rate. Planning is deterministic (a seeded
//! SplitMix64), so a run can be repeated and the plan unit-tested without a
//! server; [`crate::mix`] does the I/O.

use std::path::Path;

use serde::Deserialize;

/// Most users one profile may describe (explicit bound on setup and memory).
pub const MAX_USERS: usize = 1_000_000;
/// Most entries in `group_sizes` or `payload_bytes`.
pub const MAX_CHOICES: usize = 64;
/// Largest group a profile may ask for.
pub const MAX_GROUP_SIZE: usize = 10_000;
/// Largest message body: the server's default 64 KiB frame limit less room
/// for the frame header and the rest of the `SendDirect`/`SendGroup`.
pub const MAX_PAYLOAD_BYTES: usize = 60_000;
/// Longest measured window a profile may ask for: one day.
pub const MAX_DURATION_SECS: f64 = 86_400.0;

/// One entry of a weighted distribution of group sizes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSize {
    /// Members, the publishing owner included.
    pub size: usize,
    pub weight: f64,
}

/// One entry of a weighted distribution of message body sizes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadSize {
    pub bytes: usize,
    pub weight: f64,
}

/// A day, as written in the profile file (see `loadgen/profiles/day.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub users: usize,
    pub online_share: f64,
    pub messages_per_user_per_minute: f64,
    pub group_share: f64,
    #[serde(default)]
    pub group_sizes: Vec<GroupSize>,
    pub payload_bytes: Vec<PayloadSize>,
    pub duration_secs: f64,
    #[serde(default = "one")]
    pub rate_multiplier: f64,
    /// Groups in the whole population; default: one membership per user on
    /// average (users / mean group size).
    #[serde(default)]
    pub groups: Option<usize>,
    /// Share of the offline users that log in at the end and `Sync`; their
    /// catch-up is verified exactly-once like live delivery.
    #[serde(default = "default_sync_share")]
    pub offline_sync_share: f64,
    /// `Typing` hints per message sent (before it, to the same
    /// conversation), as apps send while their user types; 0..=10, the
    /// fraction drawn at random. Not part of the message rate.
    #[serde(default)]
    pub typing_per_message: f64,
}

fn one() -> f64 {
    1.0
}

fn default_sync_share() -> f64 {
    0.1
}

fn finite_in(key: &str, x: f64, low: f64, high: f64) -> Result<(), String> {
    if x.is_finite() && (low..=high).contains(&x) {
        Ok(())
    } else {
        Err(format!("`{key}` must be in {low}..={high}, got {x}"))
    }
}

fn weights_ok(key: &str, weights: impl Iterator<Item = f64>) -> Result<(), String> {
    let mut total = 0.0;
    for w in weights {
        finite_in(&format!("{key}[].weight"), w, 0.0, 1e9)?;
        total += w;
    }
    if total > 0.0 {
        Ok(())
    } else {
        Err(format!("`{key}` weights must add up to more than 0"))
    }
}

impl Profile {
    /// Reads and validates a profile; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Profile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read profile {}: {e}", path.display()))?;
        Profile::parse(&text).map_err(|e| format!("profile {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Profile, String> {
        let profile: Profile = toml::from_str(text).map_err(|e| e.to_string())?;
        profile.validate()?;
        Ok(profile)
    }

    fn validate(&self) -> Result<(), String> {
        if !(2..=MAX_USERS).contains(&self.users) {
            return Err(format!("`users` must be in 2..={MAX_USERS}, got {}", self.users));
        }
        finite_in("online_share", self.online_share, 0.0, 1.0)?;
        if self.online_share == 0.0 {
            return Err("`online_share` must be above 0: only online users send".into());
        }
        finite_in(
            "messages_per_user_per_minute",
            self.messages_per_user_per_minute,
            0.0,
            60_000.0,
        )?;
        if self.messages_per_user_per_minute == 0.0 {
            return Err("`messages_per_user_per_minute` must be above 0".into());
        }
        finite_in("group_share", self.group_share, 0.0, 1.0)?;
        finite_in("offline_sync_share", self.offline_sync_share, 0.0, 1.0)?;
        finite_in("typing_per_message", self.typing_per_message, 0.0, 10.0)?;
        finite_in("rate_multiplier", self.rate_multiplier, 0.0, 1e6)?;
        if self.rate_multiplier == 0.0 {
            return Err("`rate_multiplier` must be above 0".into());
        }
        finite_in("duration_secs", self.duration_secs, 0.0, MAX_DURATION_SECS)?;
        if self.duration_secs == 0.0 {
            return Err("`duration_secs` must be above 0".into());
        }
        if self.group_sizes.len() > MAX_CHOICES || self.payload_bytes.len() > MAX_CHOICES {
            return Err(format!(
                "`group_sizes` and `payload_bytes` have at most {MAX_CHOICES} entries"
            ));
        }
        if self.group_share > 0.0 {
            if self.group_sizes.is_empty() {
                return Err("`group_sizes` must list at least one size when `group_share` > 0".into());
            }
            weights_ok("group_sizes", self.group_sizes.iter().map(|g| g.weight))?;
        }
        for g in &self.group_sizes {
            if !(2..=MAX_GROUP_SIZE).contains(&g.size) {
                return Err(format!(
                    "`group_sizes[].size` must be in 2..={MAX_GROUP_SIZE}, got {}",
                    g.size
                ));
            }
            if g.size > self.users {
                return Err(format!("`group_sizes[].size` {} exceeds `users`", g.size));
            }
        }
        if self.payload_bytes.is_empty() {
            return Err("`payload_bytes` must list at least one size".into());
        }
        weights_ok("payload_bytes", self.payload_bytes.iter().map(|p| p.weight))?;
        let min = crate::cli::MIN_PAYLOAD_BYTES;
        for p in &self.payload_bytes {
            if !(min..=MAX_PAYLOAD_BYTES).contains(&p.bytes) {
                return Err(format!(
                    "`payload_bytes[].bytes` must be in {min}..={MAX_PAYLOAD_BYTES}, got {}",
                    p.bytes
                ));
            }
        }
        if self.groups.is_some_and(|g| g > self.users) {
            return Err("`groups` must not exceed `users`".into());
        }
        Ok(())
    }

    /// Checks that `slots` executors (procs × threads) can each hold a
    /// self-contained share of the population: every share needs an online
    /// user, and the largest group must fit in one share.
    pub fn check_split(&self, slots: usize) -> Result<(), String> {
        let smallest = self.users / slots.max(1);
        if online_count(smallest, self.online_share) == 0 || smallest < 2 {
            return Err(format!(
                "`users` {} is too few for {slots} executors (each needs 2 users and an online one)",
                self.users
            ));
        }
        if let Some(g) = self.group_sizes.iter().find(|g| g.size > smallest) {
            return Err(format!(
                "`group_sizes[].size` {} exceeds the {smallest} users one executor holds \
                 (--procs x --threads = {slots}); use fewer executors or smaller groups",
                g.size
            ));
        }
        Ok(())
    }

    fn mean_group_size(&self) -> f64 {
        let total: f64 = self.group_sizes.iter().map(|g| g.weight).sum();
        if total <= 0.0 {
            return 0.0;
        }
        self.group_sizes
            .iter()
            .map(|g| g.size as f64 * g.weight)
            .sum::<f64>()
            / total
    }
}

/// Online users among `users` (rounded; at least one when there are users).
pub fn online_count(users: usize, share: f64) -> usize {
    if users == 0 {
        return 0;
    }
    ((users as f64 * share).round() as usize).clamp(1, users)
}

fn send_per_s(online: usize, p: &Profile) -> f64 {
    online as f64 * p.messages_per_user_per_minute / 60.0 * p.rate_multiplier
}

/// SplitMix64: small, fast, good enough to scatter users and choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Index of the entry chosen with probability weight / total.
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len().saturating_sub(1)
    }
}

/// One executor's population and traffic, in local user numbers `0..users`.
#[derive(Debug, Clone, PartialEq)]
pub struct DayPlan {
    pub users: usize,
    /// Users `0..online` are online for the whole run.
    pub online: usize,
    /// Each user's 1:1 partner (mutual; none for an odd one out).
    pub partner: Vec<Option<usize>>,
    /// Each group's members; the first is its owner and publisher (online).
    pub groups: Vec<Vec<usize>>,
    /// Offline users who log in and `Sync` once sending has stopped.
    pub syncing: Vec<usize>,
    /// Sends per second this executor makes (open loop).
    pub send_per_s: f64,
}

impl DayPlan {
    /// Plans one executor holding `users` of the population, whose share of
    /// all groups is `groups` (default: from the mean group size).
    pub fn new(profile: &Profile, users: usize, groups: Option<usize>, seed: u64) -> DayPlan {
        let mut rng = Rng::new(seed);
        let online = online_count(users, profile.online_share);
        // Partners: a shuffled population paired off, so a partner is
        // online with about the profile's online share.
        let mut order: Vec<usize> = (0..users).collect();
        for i in (1..users).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut partner = vec![None; users];
        for pair in order.chunks_exact(2) {
            partner[pair[0]] = Some(pair[1]);
            partner[pair[1]] = Some(pair[0]);
        }
        let group_count = if profile.group_share > 0.0 && online > 0 {
            groups
                .unwrap_or_else(|| (users as f64 / profile.mean_group_size()).round() as usize)
                .max(1)
        } else {
            0
        };
        let size_weights: Vec<f64> = profile.group_sizes.iter().map(|g| g.weight).collect();
        let mut all: Vec<usize> = (0..users).collect();
        let groups = (0..group_count)
            .map(|g| {
                let owner = g % online;
                let size = profile.group_sizes[rng.weighted(&size_weights)].size.min(users);
                // Partial Fisher-Yates over everyone but the owner.
                all.swap(owner, users - 1);
                let mut members = vec![owner];
                for i in 0..size - 1 {
                    let j = i + rng.below(users - 1 - i);
                    all.swap(i, j);
                    members.push(all[i]);
                }
                all.sort_unstable();
                members
            })
            .collect();
        let offline = users - online;
        let sync_count = ((offline as f64) * profile.offline_sync_share).round() as usize;
        // Spread the syncing users evenly over the offline ones.
        let syncing = (0..sync_count)
            .map(|i| online + i * offline / sync_count.max(1))
            .collect();
        DayPlan {
            users,
            online,
            partner,
            groups,
            syncing,
            send_per_s: send_per_s(online, profile),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: &str = include_str!("../profiles/day.toml");

    fn profile() -> Profile {
        Profile::parse(DAY).unwrap()
    }

    #[test]
    fn the_example_profile_is_valid() {
        let p = profile();
        assert!(p.users >= 2 && p.group_share > 0.0);
        // users × online share × per-minute rate / 60 × multiplier
        let expected = online_count(p.users, p.online_share) as f64 * p.messages_per_user_per_minute / 60.0
            * p.rate_multiplier;
        let whole = send_per_s(online_count(p.users, p.online_share), &p);
        assert!((whole - expected).abs() < 1e-9);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("online_share = 0.3", "online_share = 1.5", "online_share"),
            ("group_share = 0.2", "group_share = -1.0", "group_share"),
            ("duration_secs = 20.0", "duration_secs = 0.0", "duration_secs"),
            (
                "rate_multiplier = 25.0",
                "rate_multiplier = nan",
                "rate_multiplier",
            ),
            ("users = 2000", "users = 1", "users"),
            (
                "{ bytes = 64, weight = 70 }",
                "{ bytes = 8, weight = 70 }",
                "payload_bytes",
            ),
            (
                "{ size = 5, weight = 60 }",
                "{ size = 1, weight = 60 }",
                "group_sizes",
            ),
            ("users = 2000", "users = 2000\nbogus = 1", "bogus"),
            ("users = 2000", "", "users"),
        ];
        for (from, to, key) in cases {
            assert!(DAY.contains(from), "example lacks {from}");
            let err = Profile::parse(&DAY.replacen(from, to, 1)).unwrap_err();
            assert!(err.contains(key), "{to}: {err}");
        }
    }

    #[test]
    fn split_checks_group_sizes_against_one_executor() {
        let p = profile();
        assert!(p.check_split(1).is_ok());
        let biggest = p.group_sizes.iter().map(|g| g.size).max().unwrap();
        let err = p.check_split(p.users / biggest + 1).unwrap_err();
        assert!(err.contains("group_sizes"), "{err}");
    }

    #[test]
    fn plans_are_consistent_and_deterministic() {
        let p = profile();
        let plan = DayPlan::new(&p, 1000, None, 7);
        assert_eq!(plan, DayPlan::new(&p, 1000, None, 7));
        assert_eq!(plan.online, online_count(1000, p.online_share));
        for (u, q) in plan.partner.iter().enumerate() {
            let q = q.unwrap();
            assert_ne!(q, u);
            assert_eq!(plan.partner[q], Some(u));
        }
        let sizes: Vec<usize> = p.group_sizes.iter().map(|g| g.size).collect();
        assert!(!plan.groups.is_empty());
        for members in &plan.groups {
            assert!(members[0] < plan.online, "owner must be online");
            assert!(sizes.contains(&members.len()));
            let mut sorted = members.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), members.len(), "members are distinct");
            assert!(sorted.iter().all(|m| *m < 1000));
        }
        let offline = 1000 - plan.online;
        assert_eq!(
            plan.syncing.len(),
            (offline as f64 * p.offline_sync_share).round() as usize
        );
        assert!(plan.syncing.iter().all(|u| (plan.online..1000).contains(u)));
        assert!(
            (plan.send_per_s
                - plan.online as f64 * p.messages_per_user_per_minute / 60.0 * p.rate_multiplier)
                .abs()
                < 1e-9
        );
        // Odd populations leave one user without a partner.
        assert_eq!(
            DayPlan::new(&p, 9, None, 1)
                .partner
                .iter()
                .filter(|q| q.is_none())
                .count(),
            1
        );
    }

    #[test]
    fn weighted_choices_follow_the_weights() {
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[rng.weighted(&[1.0, 0.0, 2.0])] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((9_000..11_000).contains(&counts[0]), "{counts:?}");
        assert!((19_000..21_000).contains(&counts[2]), "{counts:?}");
        assert!((0..1000).all(|_| rng.below(5) < 5));
    }
}
