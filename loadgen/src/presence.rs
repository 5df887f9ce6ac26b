//! The `presence` scenario: friends' presence pushes under a login storm
//! or under steady churn.
//!
//! Each executor takes its share of `--users` and makes every one of them
//! friends with its `--friends` nearest neighbours in a ring of that share
//! (half before, half after), through the real protocol (`FriendAdd` from
//! both sides: the second accepts the first), before anything is measured.
//! A graph stays inside one executor, so the login time of a user and the
//! pushes it causes are read on one clock. Then either:
//!
//! * `storm` (default): every user logs in (`LoginToken`, then
//!   `FriendList`), at `--rate` logins a second or as fast as
//!   `--max-pending` logins in flight allow. The measured window runs from
//!   the first login until the storm settled: every expected push arrived
//!   and every session's view of its friends is all online (or
//!   `--drain-secs` passed after the last login).
//! * `churn`: the storm above is setup; then, every second for
//!   `--duration-secs`, the next `--percent` of the online users in
//!   rotation drop their connection and log in again after
//!   `--offline-ms`.
//!
//! The latency of a push runs from the start of `u`'s login (the dial)
//! to friend `r`'s receipt of `Presence { u, online: true }`: the first
//! such push per login of `u` at each `r` is timed. A push is *owed* to
//! `r` when `u` starts a login while `r` is logged in (a friend that logs
//! in meanwhile may hear of `u` through its `FriendList` instead). A later
//! login of `u` supersedes it, and a drop of `r` or of `u` calls it off
//! (the server then owes `r` no such push). In a storm nobody was online
//! before, so an owed push that never came is an error; under churn a
//! reconnect the server saw before the old connection's close is no
//! presence change, so it is only counted.
//!
//! Correctness, checked on every session: a `Presence` naming anyone but a
//! friend is an error, and at the end, with every user online again, each
//! session's view of each friend must say online: the last push it got of
//! that friend, or where none came, the friend's `online` in the
//! `FriendList` answer (which may be older than a push that arrived
//! before it, so a push wins): the last presence a friend gets is the
//! state that holds.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use tern_proto::{ArchivedServerBody, ClientBody, ServerBody, UserId};

use crate::cli::{PresenceArgs, PresenceMode};
use crate::stats::{ExecOutcome, LiveCounters, PresenceTally};
use crate::users::obtain_accounts;
use crate::wire::{frame_failure, keep_alive, now_ns, sleep_until_ns, with_timeout, Conn, WireError};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, Ctx};

/// How often the end of a phase checks whether everything settled.
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// One user of this executor's graph.
struct User {
    no: usize,
    id: UserId,
    token: Vec<u8>,
    /// Local indexes of the user's friends.
    friends: Vec<usize>,
    /// What this user's current session knows of each friend (same order
    /// as `friends`): `None` until the `FriendList` answer or a push.
    known: RefCell<Vec<Option<bool>>>,
    /// Per friend, whether the current session got a push of theirs: the
    /// `FriendList` answer's `online` may be older than a push that
    /// arrived before it (it is read on the friend's home shard, with no
    /// order to the pushes), so it only fills in where no push did.
    pushed: RefCell<Vec<bool>>,
    /// Per friend, the friend's login generation whose online push was
    /// last timed here (each login is timed once per friend).
    timed: RefCell<Vec<u64>>,
    /// Logins started so far; a push is owed for the latest one only.
    generation: Cell<u64>,
    /// When the current login started (the dial).
    login_ns: Cell<u64>,
    /// `LoggedIn` arrived on the current connection.
    up: Cell<bool>,
    /// The current connection ended (or its login failed).
    ended: Cell<bool>,
    /// The task holding the session; dropping it closes the socket.
    task: RefCell<Option<glommio::Task<()>>>,
}

/// An executor's graph and tallies.
struct Graph {
    users: Vec<User>,
    index_of: HashMap<UserId, usize>,
    /// Expected pushes: (receiver, subject) → the subject's login generation.
    pending: RefCell<HashMap<(usize, usize), u64>>,
    /// Record latencies (not during a churn run's initial storm).
    measuring: Cell<bool>,
    tally: RefCell<PresenceTally>,
    /// When the last online push arrived.
    last_push_ns: Cell<u64>,
    login_failures: Cell<u64>,
    relogins: Cell<u64>,
}

impl Graph {
    /// `u` starts a login: every friend online now is owed a push.
    fn login_started(&self, u: usize) {
        let Some(user) = self.users.get(u) else { return };
        let generation = user.generation.get() + 1;
        user.generation.set(generation);
        user.login_ns.set(now_ns());
        user.up.set(false);
        user.ended.set(false);
        let mut pending = self.pending.borrow_mut();
        let mut tally = self.tally.borrow_mut();
        for &r in &user.friends {
            if self.users.get(r).is_some_and(|f| f.up.get()) {
                tally.expected += 1;
                if pending.insert((r, u), generation).is_some() {
                    tally.superseded += 1;
                }
            }
        }
    }

    /// `u`'s session ended: nothing is owed to it, and nothing of its
    /// login (its friends may or may not hear that it went away).
    fn dropped(&self, u: usize) {
        let Some(user) = self.users.get(u) else { return };
        user.up.set(false);
        let mut pending = self.pending.borrow_mut();
        let mut tally = self.tally.borrow_mut();
        for &f in &user.friends {
            for key in [(u, f), (f, u)] {
                if pending.remove(&key).is_some() {
                    tally.cancelled += 1;
                }
            }
        }
    }

    /// `r` received `Presence { subject, online }`.
    fn presence(&self, ctx: &Ctx, r: usize, subject: UserId, online: bool) {
        let Some(user) = self.users.get(r) else { return };
        let slot = self
            .index_of
            .get(&subject)
            .and_then(|u| user.friends.iter().position(|f| f == u).map(|k| (*u, k)));
        let Some((u, k)) = slot else {
            self.tally.borrow_mut().foreign += 1;
            ctx.fail(
                "presence",
                &WireError::Protocol(format!(
                    "a Presence of {subject}, who is no friend of {}",
                    user.id
                )),
            );
            return;
        };
        if let Some(known) = user.known.borrow_mut().get_mut(k) {
            *known = Some(online);
        }
        if let Some(pushed) = user.pushed.borrow_mut().get_mut(k) {
            *pushed = true;
        }
        LiveCounters::add(&ctx.live().delivered, 1);
        let mut tally = self.tally.borrow_mut();
        if !online {
            tally.offline_pushes += 1;
            return;
        }
        tally.online_pushes += 1;
        let now = now_ns();
        self.last_push_ns.set(now);
        let generation = self.users.get(u).map_or(0, |s| s.generation.get());
        let mut pending = self.pending.borrow_mut();
        if pending.get(&(r, u)) == Some(&generation) {
            pending.remove(&(r, u));
            tally.met += 1;
        }
        let first = user
            .timed
            .borrow_mut()
            .get_mut(k)
            .is_some_and(|timed| std::mem::replace(timed, generation) != generation);
        if first && self.measuring.get() {
            tally.timed += 1;
            let login = self.users.get(u).map_or(now, |s| s.login_ns.get());
            ctx.recorder.record_ns(now.saturating_sub(login));
            ctx.count_delivery_in_window(now);
        }
    }

    /// `r`'s `FriendList` answer: the snapshot its pushes then update.
    fn friend_list(&self, ctx: &Ctx, r: usize, friends: &[(UserId, bool)]) {
        let Some(user) = self.users.get(r) else { return };
        let mut known = user.known.borrow_mut();
        let pushed = user.pushed.borrow();
        let mut listed = 0;
        for &(id, online) in friends {
            let slot = self
                .index_of
                .get(&id)
                .and_then(|u| user.friends.iter().position(|f| f == u));
            match slot.and_then(|k| Some((known.get_mut(k)?, pushed.get(k)?))) {
                Some((state, pushed)) => {
                    if !pushed {
                        *state = Some(online);
                    }
                    listed += 1;
                }
                None => ctx.fail(
                    "friend list",
                    &WireError::Protocol(format!("{} lists {id}, not a friend of the graph", user.id)),
                ),
            }
        }
        if listed != user.friends.len() {
            ctx.fail(
                "friend list",
                &WireError::Protocol(format!(
                    "{} has {listed} of its {} friends",
                    user.id,
                    user.friends.len()
                )),
            );
        }
    }

    /// Every session is up and sees every friend online, and (`owed`)
    /// every owed push arrived.
    fn settled(&self, owed: bool) -> bool {
        (!owed || self.pending.borrow().is_empty())
            && self
                .users
                .iter()
                .all(|u| u.up.get() && u.known.borrow().iter().all(|k| *k == Some(true)))
    }

    /// Friends that an online session does not see online (at the end,
    /// when everybody is online).
    fn stale(&self) -> u64 {
        self.users
            .iter()
            .filter(|u| u.up.get())
            .map(|u| u.known.borrow().iter().filter(|k| **k != Some(true)).count() as u64)
            .sum()
    }
}

/// The ring lattice: the `friends` nearest neighbours of `i` among `n`
/// (half before, half after; an odd count takes one more after).
pub fn ring_friends(i: usize, n: usize, friends: usize) -> Vec<usize> {
    let after = friends.div_ceil(2);
    let before = friends / 2;
    let mut out = Vec::with_capacity(friends);
    for d in 1..=after {
        out.push((i + d) % n);
    }
    for d in 1..=before {
        out.push((i + n - d) % n);
    }
    out
}

pub async fn run(ctx: Rc<Ctx>, args: PresenceArgs) -> ExecOutcome {
    let mine = ctx.plan.exec_share(args.users, ctx.exec);
    let accounts = obtain_accounts(&ctx, mine.clone()).await;
    let n = mine.len();
    let mut users = Vec::with_capacity(n);
    let mut setup_failed = 0u64;
    for (i, (no, account)) in mine.clone().zip(accounts).enumerate() {
        let (id, token) = account.unwrap_or_else(|| {
            setup_failed += 1;
            (0, Vec::new())
        });
        let friends = if n > args.friends {
            ring_friends(i, n, args.friends)
        } else {
            Vec::new()
        };
        users.push(User {
            no,
            id,
            token,
            known: RefCell::new(vec![None; friends.len()]),
            timed: RefCell::new(vec![0; friends.len()]),
            pushed: RefCell::new(vec![false; friends.len()]),
            friends,
            generation: Cell::new(0),
            login_ns: Cell::new(0),
            up: Cell::new(false),
            ended: Cell::new(false),
            task: RefCell::new(None),
        });
    }
    if n <= args.friends {
        ctx.fail(
            "presence setup",
            &WireError::Protocol(format!(
                "{n} users on this executor cannot each have {} friends",
                args.friends
            )),
        );
    }
    let graph = Rc::new(Graph {
        index_of: users.iter().enumerate().map(|(i, u)| (u.id, i)).collect(),
        users,
        pending: RefCell::default(),
        measuring: Cell::new(args.mode == PresenceMode::Storm),
        tally: RefCell::default(),
        last_push_ns: Cell::new(0),
        login_failures: Cell::new(0),
        relogins: Cell::new(0),
    });
    make_friends(&ctx, &graph).await;
    ctx.setup_done().await;

    let common = &ctx.plan.cli.common;
    let slots = ctx.plan.slots();
    let storm_start = now_ns();
    storm(&ctx, &graph, &args, slots).await;
    let connect_secs = secs_between(storm_start, now_ns());
    let connected = graph.users.iter().filter(|u| u.up.get()).count() as u64;

    let (start_ns, end_ns) = match args.mode {
        PresenceMode::Storm => {
            let drain_end = now_ns() + common.drain().as_nanos() as u64;
            wait_settled(&graph, true, drain_end).await;
            ctx.connected().await;
            (storm_start, graph.last_push_ns.get().max(storm_start))
        }
        PresenceMode::Churn => {
            let drain_end = now_ns() + common.drain().as_nanos() as u64;
            wait_settled(&graph, true, drain_end).await;
            // The setup's own pushes are not the measure.
            *graph.tally.borrow_mut() = PresenceTally::default();
            graph.measuring.set(true);
            ctx.connected().await;
            let start = now_ns();
            let end = start + common.duration().as_nanos() as u64;
            ctx.set_window_end(end);
            churn(&ctx, &graph, &args, start, end).await;
            // Owed pushes are not waited for: under churn some never come
            // (a reconnect the server saw as no change), and the views
            // say whether the last word each friend got holds.
            let drain_end = now_ns() + (common.drain() + common.connect_timeout()).as_nanos() as u64;
            wait_settled(&graph, false, drain_end).await;
            // A push on its way may still change a view: look again.
            glommio::timer::sleep(Duration::from_millis(500)).await;
            wait_settled(&graph, false, drain_end).await;
            (start, end)
        }
    };
    ctx.closing.set(true);

    let mut tally = graph.tally.borrow().clone();
    tally.missing = graph.pending.borrow().len() as u64;
    tally.stale = graph.stale();
    tally.down = graph.users.iter().filter(|u| !u.up.get()).count() as u64;
    tally.settle_s = secs_between(start_ns, graph.last_push_ns.get().max(start_ns));
    // In a storm every expected push is owed; under churn a missing one
    // may be a reconnect the server never saw as a change (counted only).
    let undelivered = if args.mode == PresenceMode::Storm {
        tally.missing
    } else {
        0
    };
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            users: n as u64,
            connections: connected,
            connect_failures: graph.login_failures.get() + setup_failed,
            connect_secs,
            sent: tally.expected,
            delivered: tally.online_pushes + tally.offline_pushes,
            delivered_in_window: ctx.in_window.get(),
            undelivered: undelivered + tally.stale + tally.down,
            window_secs: secs_between(start_ns, end_ns),
            reconnects: graph.relogins.get(),
            presence: Some(tally),
            ..ExecOutcome::empty()
        },
    );
    for user in &graph.users {
        user.task.borrow_mut().take();
    }
    outcome
}

/// Friends asked for per `FriendsPage` while setup looks for stale ones.
const FRIENDS_PAGE: u32 = 500;

/// Every user adds each of its friends (`FriendAdd` by name); of the two
/// adds of a pair the second accepts the first, whichever it is. Users
/// reused from an earlier run (`--prefix`) first end each friendship that
/// this run's ring does not have (`FriendsPage`, then `FriendRemove`): its pushes would count
/// as a non-friend's. The ring is symmetric, so a pair one side removes is
/// a pair the other side does not add.
async fn make_friends(ctx: &Rc<Ctx>, graph: &Rc<Graph>) {
    let workers = ctx.setup_workers.max(crate::worker::CONNECT_CONCURRENCY);
    let (task_ctx, task_graph) = (ctx.clone(), graph.clone());
    for_each_bounded(graph.users.len(), workers, move |i| {
        let (ctx, graph) = (task_ctx.clone(), task_graph.clone());
        async move {
            let Some(user) = graph.users.get(i) else { return };
            if user.token.is_empty() {
                return;
            }
            let names: Vec<String> = user
                .friends
                .iter()
                .filter_map(|&f| graph.users.get(f).map(|u| ctx.username(u.no)))
                .collect();
            let planned: Vec<UserId> = user
                .friends
                .iter()
                .filter_map(|&f| graph.users.get(f).map(|u| u.id))
                .collect();
            let common = &ctx.plan.cli.common;
            let adds = async {
                let mut conn = Conn::open(common.server, ctx.source(user.no)).await?;
                conn.login_token(&user.token).await?;
                // Paged: one `FriendList` frame holds ~1,800 friends at most.
                let mut friends = Vec::new();
                loop {
                    let after = friends.last().map_or(0, |f: &tern_proto::Friend| f.user);
                    let limit = FRIENDS_PAGE;
                    match conn.request(ClientBody::FriendsPage { after, limit }).await? {
                        ServerBody::FriendsPage { friends: page, more } => {
                            friends.extend(page);
                            if !more {
                                break;
                            }
                        }
                        other => return Err(WireError::Protocol(format!("FriendsPage answered {other:?}"))),
                    }
                }
                for stale in friends.iter().filter(|f| !planned.contains(&f.user)) {
                    match conn
                        .request(ClientBody::FriendRemove { user: stale.user })
                        .await?
                    {
                        ServerBody::Ok => {}
                        other => return Err(WireError::Protocol(format!("FriendRemove answered {other:?}"))),
                    }
                }
                for username in names {
                    match conn.request(ClientBody::FriendAdd { username }).await? {
                        ServerBody::User { .. } | ServerBody::FriendRequestSent { .. } => {}
                        other => return Err(WireError::Protocol(format!("FriendAdd answered {other:?}"))),
                    }
                }
                Ok(())
            };
            if let Err(e) = with_timeout(Duration::from_secs(120), adds).await {
                ctx.fail("making friends", &e);
            }
        }
    })
    .await;
}

/// Logs every user in, paced at `--rate` (this executor's share) with at
/// most `--max-pending` (its share) logins in flight.
async fn storm(ctx: &Rc<Ctx>, graph: &Rc<Graph>, args: &PresenceArgs, slots: usize) {
    let in_flight = args.max_pending.div_ceil(slots).max(1);
    let period_ns = match args.rate {
        Some(rate) => (1e9 * slots as f64 / rate) as u64,
        None => 0,
    };
    let start = now_ns();
    let (task_ctx, task_graph) = (ctx.clone(), graph.clone());
    for_each_bounded(graph.users.len(), in_flight, move |i| {
        let (ctx, graph) = (task_ctx.clone(), task_graph.clone());
        async move {
            sleep_until_ns(start + period_ns.saturating_mul(i as u64)).await;
            start_session(&ctx, &graph, i, Duration::ZERO);
            wait_login(&ctx, &graph, i).await;
        }
    })
    .await;
}

/// Waits until user `i`'s login is done (or failed).
async fn wait_login(ctx: &Ctx, graph: &Graph, i: usize) {
    let Some(user) = graph.users.get(i) else { return };
    let generation = user.generation.get();
    let deadline = now_ns() + ctx.plan.cli.common.connect_timeout().as_nanos() as u64 * 2;
    while !user.up.get() && !user.ended.get() && user.generation.get() == generation && now_ns() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Every second until `end_ns`, the next `--percent` of the online users
/// drop and log in again after `--offline-ms`.
async fn churn(ctx: &Rc<Ctx>, graph: &Rc<Graph>, args: &PresenceArgs, start_ns: u64, end_ns: u64) {
    let n = graph.users.len();
    let per_tick = ((n as f64 * args.percent / 100.0).ceil() as usize).min(n);
    let offline = Duration::from_millis(args.offline_ms);
    // Neighbours in the ring are friends: a stride spreads each tick's
    // users over the ring, so their friends mostly stay online.
    let stride = coprime_stride(n);
    let mut next = 0usize;
    let mut tick = 1u64;
    while per_tick > 0 && start_ns + tick * 1_000_000_000 < end_ns {
        sleep_until_ns(start_ns + tick * 1_000_000_000).await;
        tick += 1;
        let (mut picked, mut looked) = (0, 0);
        while picked < per_tick && looked < n {
            let i = (next % n.max(1)).wrapping_mul(stride) % n.max(1);
            next += 1;
            looked += 1;
            let Some(user) = graph.users.get(i) else { break };
            if !user.up.get() {
                continue;
            }
            picked += 1;
            user.task.borrow_mut().take();
            graph.dropped(i);
            graph.relogins.set(graph.relogins.get() + 1);
            start_session(ctx, graph, i, offline);
        }
    }
    sleep_until_ns(end_ns).await;
}

/// A step about 0.38 of the way around a ring of `n` that visits every
/// position (coprime to `n`).
fn coprime_stride(n: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut stride = (n as f64 * 0.381_966) as usize | 1;
    while n > 1 && gcd(stride, n) != 1 {
        stride += 1;
    }
    stride.max(1)
}

async fn wait_settled(graph: &Graph, owed: bool, deadline_ns: u64) {
    while !graph.settled(owed) && now_ns() < deadline_ns {
        glommio::timer::sleep(SETTLE_POLL).await;
    }
}

/// Starts holding user `i`'s session after `wait`: login, `FriendList`,
/// then every push until the task is dropped.
fn start_session(ctx: &Rc<Ctx>, graph: &Rc<Graph>, i: usize, wait: Duration) {
    let (ctx2, graph2) = (ctx.clone(), graph.clone());
    let task = glommio::spawn_local(async move {
        glommio::timer::sleep(wait).await;
        let ended = session(&ctx2, &graph2, i).await;
        graph2.dropped(i);
        if let Some(user) = graph2.users.get(i) {
            user.ended.set(true);
        }
        if !ctx2.closing.get() {
            ctx2.fail("presence session ended", &ended);
        }
    });
    if let Some(user) = graph.users.get(i) {
        *user.task.borrow_mut() = Some(task);
    }
}

/// One connection of user `i`; returns why it ended.
async fn session(ctx: &Rc<Ctx>, graph: &Rc<Graph>, i: usize) -> WireError {
    let Some(user) = graph.users.get(i) else {
        return WireError::Protocol("no such user".into());
    };
    if user.token.is_empty() {
        graph.login_failures.set(graph.login_failures.get() + 1);
        return WireError::Protocol("no token (user setup failed)".into());
    }
    let common = &ctx.plan.cli.common;
    graph.login_started(i);
    let login = async {
        let mut conn = Conn::open(common.server, ctx.source(user.no)).await?;
        conn.login_token(&user.token).await?;
        Ok(conn)
    };
    let conn = match with_timeout(common.connect_timeout(), login).await {
        Ok(conn) => conn,
        Err(e) => {
            graph.login_failures.set(graph.login_failures.get() + 1);
            return e;
        }
    };
    user.known.borrow_mut().iter_mut().for_each(|k| *k = None);
    user.pushed.borrow_mut().iter_mut().for_each(|p| *p = false);
    user.up.set(true);
    let _open = Open::new(ctx);
    let ping = conn.limits().ping_interval();
    let (reader, writer) = conn.into_running();
    let list_id = match writer.send(ClientBody::FriendList).await {
        Ok(id) => id,
        Err(e) => return e,
    };
    let pinging = {
        let writer = writer.clone();
        async move {
            match ping {
                Some(interval) => keep_alive(writer, interval).await,
                None => future::pending().await,
            }
        }
    };
    let reading = crate::wire::read_frames(reader, |frame| {
        match &frame.body {
            ArchivedServerBody::Presence {
                user: subject,
                online,
            } => {
                graph.presence(ctx, i, subject.to_native(), *online);
            }
            ArchivedServerBody::Friends { friends } if frame.request_id.to_native() == list_id => {
                let listed: Vec<(UserId, bool)> =
                    friends.iter().map(|f| (f.user.to_native(), f.online)).collect();
                graph.friend_list(ctx, i, &listed);
            }
            _ => {
                if let Some(failure) = frame_failure(frame) {
                    return Err(failure);
                }
            }
        }
        Ok(())
    });
    future::or(reading, pinging).await
}

/// Counts an open connection in the progress line for as long as it
/// lives (its task may be dropped at any await).
struct Open<'a>(&'a LiveCounters);

impl<'a> Open<'a> {
    fn new(ctx: &'a Ctx) -> Open<'a> {
        LiveCounters::add(&ctx.live().open_connections, 1);
        Open(ctx.live())
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_is_symmetric_and_has_no_self_loops() {
        for (n, f) in [(7, 2), (7, 3), (21, 20), (100, 20)] {
            for i in 0..n {
                let friends = ring_friends(i, n, f);
                assert_eq!(friends.len(), f);
                assert!(!friends.contains(&i));
                let mut unique = friends.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), f, "{n} users, {f} friends, user {i}");
                // Even counts make a mutual graph: i's friends count i in.
                if f % 2 == 0 {
                    assert!(friends.iter().all(|&j| ring_friends(j, n, f).contains(&i)));
                }
            }
        }
    }

    #[test]
    fn the_churn_stride_visits_every_user() {
        for n in [1, 2, 3, 10, 64, 97, 1000, 2000] {
            let stride = coprime_stride(n);
            let mut seen: Vec<usize> = (0..n).map(|k| k.wrapping_mul(stride) % n).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), n, "stride {stride} over {n}");
        }
    }
}
