//! The `churn` scenario: a reconnect storm with session resume, and the
//! client side of a (rolling) server restart.
//!
//! N sessions (one user each) are held. Every second, the next K% of them
//! in rotation drop their connection and resume: dial, `LoginToken`, and
//! `Sync` with the cursors they hold (the last sequence received per
//! conversation). A session the server drops — `Disconnect { ShuttingDown,
//! retry_after_ms }` when it restarts, or a lost connection — resumes the
//! same way after the hint plus up to one more hint of jitter (so a node's
//! clients do not return in the same millisecond), retrying with capped,
//! jittered exponential backoff up to `--max-retries` times. With
//! `--percent 0` nobody drops on purpose and the scenario simply holds the
//! sessions through whatever the server does (bench/rolling-restart.sh
//! restarts it). Resume latency runs from the drop to `SyncDone`; the
//! outage runs from the first unplanned loss until every session is live
//! again. Meanwhile a few senders per executor send a trickle of messages
//! to the sessions round-robin. A sender keeps every message until its
//! `Sent` arrives and, after a reconnect, resends the unacknowledged ones
//! with the same `client_msg_id`, which the server deduplicates; so each
//! (sender, recipient) stream must arrive exactly once and in order across
//! every reconnect and restart.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::future;
use tern_proto::{ArchivedServerBody, ClientBody, Content, ConvId, Cursor, ErrorCode, UserId};

use crate::cli::ChurnArgs;
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_tokens;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    due_ns, frame_failure, keep_alive, message_body, now_ns, parse_message_body, sleep_until_ns,
    with_timeout, Conn, ReadSide, WireError, Writer,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, Ctx, CONNECT_CONCURRENCY};

/// Trickle senders per executor (they never churn on purpose).
pub const SENDERS: usize = 2;
/// Messages one sender keeps unacknowledged at most; the trickle skips a
/// send (and counts an error) rather than queue more while a server is down.
const MAX_UNACKED: usize = 65_536;
/// Backoff between failed reconnect attempts: the first, and the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Jitter window before resuming after a loss that came without a hint.
const LOSS_JITTER: Duration = Duration::from_millis(500);
/// The jitter window after a hint is the hint itself, at least this.
const MIN_HINT_JITTER: Duration = Duration::from_millis(100);
/// How often the sender's pump looks for new messages to send.
const PUMP_POLL: Duration = Duration::from_millis(2);
/// How often the end of the run checks whether everything settled.
const SETTLE_POLL: Duration = Duration::from_millis(10);

/// One connection's life as the scenario sees it; shared by receivers and
/// senders.
struct Link {
    user_no: usize,
    token: Option<Vec<u8>>,
    user: Cell<Option<UserId>>,
    /// `SyncDone` arrived on the current connection.
    synced: Cell<bool>,
    /// A connection is open (counted in the live `open_connections`).
    open: Cell<bool>,
    /// When the connection was lost, until the resume's `SyncDone`.
    down_since: Cell<Option<u64>>,
    /// The loss was the server's doing (it counts in the outage).
    in_outage: Cell<bool>,
    /// `retry_after_ms` of the `Disconnect` that ended the connection.
    hint_ms: Cell<Option<u32>>,
    /// Retries ran out; the session stays down.
    gave_up: Cell<bool>,
    /// The task holding the session; dropping it closes the socket.
    task: RefCell<Option<glommio::Task<()>>>,
}

impl Link {
    fn new(user_no: usize, token: Option<Vec<u8>>) -> Link {
        Link {
            user_no,
            token,
            user: Cell::new(None),
            synced: Cell::new(false),
            open: Cell::new(false),
            down_since: Cell::new(None),
            in_outage: Cell::new(false),
            hint_ms: Cell::new(None),
            gave_up: Cell::new(false),
            task: RefCell::new(None),
        }
    }

    fn up(&self) -> bool {
        self.synced.get() && self.open.get()
    }

    fn set_open(&self, ctx: &Ctx, open: bool) {
        if self.open.replace(open) != open {
            let counter = &ctx.live().open_connections;
            if open {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// `SyncDone` arrived: the session is live; a resume is timed.
    fn mark_synced(&self, ctx: &Ctx, shared: &Shared) {
        self.synced.set(true);
        if let Some(dropped) = self.down_since.take() {
            ctx.recorder.record_ns(now_ns().saturating_sub(dropped));
            shared.reconnects.set(shared.reconnects.get() + 1);
        }
        if self.in_outage.replace(false) {
            shared.down.set(shared.down.get().saturating_sub(1));
            if shared.down.get() == 0 {
                shared.all_live_unix_us.set(Some(unix_us()));
            }
        }
    }

    /// The server dropped the connection (it was live).
    fn mark_lost(&self, shared: &Shared) {
        self.down_since.set(Some(now_ns()));
        if !self.in_outage.replace(true) {
            shared.down.set(shared.down.get() + 1);
            if shared.first_loss_unix_us.get().is_none() {
                shared.first_loss_unix_us.set(Some(unix_us()));
            }
            shared.all_live_unix_us.set(None);
        }
    }
}

/// One churning session (a receiver).
struct Session {
    link: Rc<Link>,
    /// Last sequence received per conversation (one per sender).
    cursors: RefCell<Vec<Cursor>>,
    /// Per sender: the stream check and how many that sender has sent.
    checks: RefCell<Vec<StreamCheck>>,
    sent: Vec<Cell<u64>>,
}

impl Session {
    fn caught_up(&self) -> bool {
        let checks = self.checks.borrow();
        self.sent
            .iter()
            .zip(checks.iter())
            .all(|(sent, check)| check.unique() >= sent.get())
    }

    fn advance_cursor(&self, conv: ConvId, seq: u64) {
        let mut cursors = self.cursors.borrow_mut();
        match cursors.iter_mut().find(|c| c.conv == conv) {
            Some(c) => c.seq = c.seq.max(seq),
            None => cursors.push(Cursor { conv, seq }),
        }
    }
}

/// A message a sender keeps until the server acknowledges it.
struct Pending {
    to: UserId,
    body: Vec<u8>,
}

/// A trickle sender.
struct Sender {
    link: Rc<Link>,
    /// Unacknowledged messages by `client_msg_id` (per sender, from the
    /// run's base + 1).
    unacked: RefCell<BTreeMap<u64, Pending>>,
    next_id: Cell<u64>,
    /// Highest id written on the current connection (0 after a reconnect,
    /// so everything unacknowledged is sent again, in order).
    written: Cell<u64>,
    /// Highest id ever written: ids at or below it written again are resends.
    high_water: Cell<u64>,
    resent: Cell<u64>,
}

/// An executor's tallies.
struct Shared {
    /// Sessions lost by the server's doing and not yet live again.
    down: Cell<usize>,
    first_loss_unix_us: Cell<Option<u64>>,
    all_live_unix_us: Cell<Option<u64>>,
    reconnects: Cell<u64>,
    failures: Cell<u64>,
    shutdown_disconnects: Cell<u64>,
    /// Live sessions lost without a `Disconnect` (`--server-crashes`).
    abrupt_losses: Cell<u64>,
    server_crashes: bool,
    rng: Cell<u64>,
    max_retries: u32,
}

impl Shared {
    /// A uniform duration in `[0, window)` (xorshift64; jitter only).
    fn jitter(&self, window: Duration) -> Duration {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        Duration::from_nanos(x % (window.as_nanos() as u64).max(1))
    }

    /// The wait before retry number `attempt` (from 1): half the capped
    /// exponential step, plus up to the other half at random.
    fn backoff(&self, attempt: u32) -> Duration {
        let step = BACKOFF_FIRST
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(BACKOFF_CAP);
        step / 2 + self.jitter(step / 2)
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub async fn run(ctx: Rc<Ctx>, args: ChurnArgs) -> ExecOutcome {
    let mine = ctx.plan.exec_share(args.connections, ctx.exec);
    let (global_exec, _) = ctx.slot();
    let first_sender = args.connections + global_exec * SENDERS;
    let tokens = obtain_tokens(&ctx, mine.clone()).await;
    let sender_tokens = obtain_tokens(&ctx, first_sender..first_sender + SENDERS).await;
    ctx.setup_done().await;

    let common = &ctx.plan.cli.common;
    let shared = Rc::new(Shared {
        down: Cell::new(0),
        first_loss_unix_us: Cell::new(None),
        all_live_unix_us: Cell::new(None),
        reconnects: Cell::new(0),
        failures: Cell::new(0),
        shutdown_disconnects: Cell::new(0),
        abrupt_losses: Cell::new(0),
        server_crashes: args.server_crashes,
        rng: Cell::new(now_ns() ^ ((global_exec as u64 + 1) << 32) | 1),
        max_retries: args.max_retries,
    });
    let sessions: Vec<Rc<Session>> = mine
        .clone()
        .zip(tokens)
        .map(|(user_no, token)| {
            Rc::new(Session {
                link: Rc::new(Link::new(user_no, token)),
                cursors: RefCell::default(),
                checks: RefCell::new((0..SENDERS).map(|_| StreamCheck::default()).collect()),
                sent: (0..SENDERS).map(|_| Cell::new(0)).collect(),
            })
        })
        .collect();

    // Senders first, so every session knows their user ids.
    let mut senders = Vec::new();
    for (k, token) in sender_tokens.into_iter().enumerate() {
        let sender = Rc::new(Sender {
            link: Rc::new(Link::new(first_sender + k, token)),
            unacked: RefCell::default(),
            next_id: Cell::new(ctx.plan.msg_id_base + 1),
            written: Cell::new(0),
            high_water: Cell::new(0),
            resent: Cell::new(0),
        });
        start_sender(&ctx, &shared, &sender, Duration::ZERO);
        if settle_link(&ctx, &sender.link).await {
            senders.push(sender);
        }
    }
    let sender_ids: Rc<Vec<UserId>> = Rc::new(senders.iter().filter_map(|s| s.link.user.get()).collect());

    let start_ns = now_ns();
    {
        let (ctx, shared, sessions, ids) =
            (ctx.clone(), shared.clone(), sessions.clone(), sender_ids.clone());
        for_each_bounded(sessions.len(), CONNECT_CONCURRENCY, move |i| {
            let (ctx, shared, sessions, ids) = (ctx.clone(), shared.clone(), sessions.clone(), ids.clone());
            async move {
                if let Some(session) = sessions.get(i) {
                    start_session(&ctx, &shared, session, &ids, Duration::ZERO);
                    settle_link(&ctx, &session.link).await;
                }
            }
        })
        .await;
    }
    let connect_secs = secs_between(start_ns, now_ns());
    let connected = sessions.iter().filter(|s| s.link.up()).count() as u64;
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + common.duration().as_nanos() as u64;
    ctx.set_window_end(end_ns);
    let trickle = {
        let (ctx, sessions, senders, rate) =
            (ctx.clone(), sessions.clone(), senders.clone(), args.trickle_rate);
        let payload = args.payload_bytes;
        glommio::spawn_local(async move {
            send_trickle(&ctx, &sessions, &senders, rate, payload, start_ns, end_ns).await;
        })
    };
    // The storm: one tick a second.
    let per_tick = ((sessions.len() as f64 * args.percent / 100.0).ceil() as usize).min(sessions.len());
    let mut next = 0usize;
    let mut tick = 1u64;
    while per_tick > 0 && start_ns + tick * 1_000_000_000 < end_ns {
        sleep_until_ns(start_ns + tick * 1_000_000_000).await;
        tick += 1;
        let mut picked = 0;
        let mut looked = 0;
        while picked < per_tick && looked < sessions.len() {
            let Some(session) = sessions.get(next % sessions.len().max(1)).cloned() else {
                break;
            };
            next += 1;
            looked += 1;
            // Sessions that are resuming already are left alone.
            if !session.link.up() {
                continue;
            }
            picked += 1;
            session.link.task.borrow_mut().take();
            session.link.set_open(&ctx, false);
            session.link.synced.set(false);
            session.link.down_since.set(Some(now_ns()));
            start_session(&ctx, &shared, &session, &sender_ids, Duration::ZERO);
        }
    }
    sleep_until_ns(end_ns).await;
    drop(trickle);
    // Sessions may still be coming back from a restart: allow a full
    // retry schedule on top of the drain.
    let retry_budget = (BACKOFF_CAP + common.connect_timeout()) * args.max_retries;
    let settled = || {
        sessions
            .iter()
            .all(|s| s.link.gave_up.get() || (s.link.up() && s.caught_up()))
            && senders
                .iter()
                .all(|s| s.link.gave_up.get() || (s.link.up() && s.unacked.borrow().is_empty()))
    };
    let deadline = now_ns() + (common.drain() + common.connect_timeout() + retry_budget).as_nanos() as u64;
    while !settled() && now_ns() < deadline {
        glommio::timer::sleep(SETTLE_POLL).await;
    }
    ctx.closing.set(true);

    let mut verdict = Verdict::default();
    let (mut sent, mut delivered) = (0, 0);
    for s in &sessions {
        for (k, check) in s.checks.borrow().iter().enumerate() {
            let n = s.sent.get(k).map_or(0, Cell::get);
            verdict.add(check.verdict(n));
            sent += n;
            delivered += check.unique();
        }
    }
    let resent: u64 = senders.iter().map(|s| s.resent.get()).sum();
    let unacked: u64 = senders.iter().map(|s| s.unacked.borrow().len() as u64).sum();
    // Down at the end without having given up (given-up ones are counted).
    let still_down = sessions
        .iter()
        .filter(|s| !s.link.up() && !s.link.gave_up.get())
        .count() as u64;
    let outage_end = if shared.down.get() == 0 {
        shared.all_live_unix_us.get()
    } else {
        None
    };
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            users: (mine.len() + SENDERS) as u64,
            connections: connected + senders.len() as u64,
            connect_failures: (sessions.len() as u64).saturating_sub(connected),
            connect_secs,
            sent,
            delivered,
            delivered_in_window: ctx.in_window.get(),
            undelivered: verdict.lost,
            window_secs: secs_between(start_ns, end_ns),
            verdict,
            reconnects: shared.reconnects.get(),
            reconnect_failures: shared.failures.get() + still_down,
            shutdown_disconnects: shared.shutdown_disconnects.get(),
            abrupt_losses: shared.abrupt_losses.get(),
            outage_start_unix_us: shared.first_loss_unix_us.get(),
            outage_end_unix_us: outage_end,
            unacked,
            resent,
            ..ExecOutcome::empty()
        },
    );
    for link in sessions
        .iter()
        .map(|s| &s.link)
        .chain(senders.iter().map(|s| &s.link))
    {
        link.task.borrow_mut().take();
        link.set_open(&ctx, false);
    }
    outcome
}

/// Waits until `link` is live or gave up; whether it is live.
async fn settle_link(ctx: &Ctx, link: &Link) -> bool {
    // Bounded by the retry schedule; polled, as the initial connect is
    // itself bounded to a few dozen sessions at once.
    while !(link.up() || link.gave_up.get() || ctx.closing.get()) {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    link.up()
}

/// Starts (or restarts) holding `session` after `wait`.
fn start_session(
    ctx: &Rc<Ctx>,
    shared: &Rc<Shared>,
    session: &Rc<Session>,
    ids: &Rc<Vec<UserId>>,
    wait: Duration,
) {
    let (ctx2, shared2, s, ids) = (ctx.clone(), shared.clone(), session.clone(), ids.clone());
    let run = move |reader: ReadSide, writer: Rc<Writer>| {
        let (ctx, shared, s, ids) = (ctx2.clone(), shared2.clone(), s.clone(), ids.clone());
        async move { run_receiver(ctx, shared, s, ids, reader, writer).await }
    };
    let task = glommio::spawn_local(hold(ctx.clone(), shared.clone(), session.link.clone(), wait, run));
    *session.link.task.borrow_mut() = Some(task);
}

/// Starts holding `sender` after `wait`.
fn start_sender(ctx: &Rc<Ctx>, shared: &Rc<Shared>, sender: &Rc<Sender>, wait: Duration) {
    let (ctx2, shared2, s) = (ctx.clone(), shared.clone(), sender.clone());
    let run = move |reader: ReadSide, writer: Rc<Writer>| {
        let (ctx, shared, s) = (ctx2.clone(), shared2.clone(), s.clone());
        async move { run_sender(ctx, shared, s, reader, writer).await }
    };
    let task = glommio::spawn_local(hold(ctx.clone(), shared.clone(), sender.link.clone(), wait, run));
    *sender.link.task.borrow_mut() = Some(task);
}

/// How one connection ended.
enum Ended {
    /// It was live (synced) and then ended.
    Lived(WireError),
    /// It never got live.
    Failed(WireError),
}

/// Holds one session for the rest of the run: connects after `wait`,
/// and whenever the connection ends reconnects after the server's hint
/// (or a short jitter), retrying with backoff until `max_retries` attempts
/// in a row have failed.
async fn hold<F, Fut>(ctx: Rc<Ctx>, shared: Rc<Shared>, link: Rc<Link>, mut wait: Duration, run: F)
where
    F: Fn(ReadSide, Rc<Writer>) -> Fut,
    Fut: Future<Output = WireError>,
{
    let mut failed_attempts = 0u32;
    loop {
        glommio::timer::sleep(wait).await;
        let ended = connection(&ctx, &link, &run).await;
        if ctx.closing.get() {
            return;
        }
        match ended {
            Ended::Lived(why) => {
                failed_attempts = 0;
                link.mark_lost(&shared);
                wait = match link.hint_ms.take() {
                    Some(ms) => {
                        let hint = Duration::from_millis(u64::from(ms));
                        hint + shared.jitter(hint.max(MIN_HINT_JITTER))
                    }
                    None => {
                        // Losing a connection without being told why is
                        // a fault even during a restart (ternd says
                        // goodbye), unless the run kills the server.
                        if shared.server_crashes {
                            shared.abrupt_losses.set(shared.abrupt_losses.get() + 1);
                        } else {
                            ctx.fail("a live session was lost", &why);
                        }
                        shared.jitter(LOSS_JITTER)
                    }
                };
            }
            Ended::Failed(why) => {
                // Refused or reset while the server restarts: expected,
                // and retried; only running out of retries counts.
                failed_attempts += 1;
                if failed_attempts > shared.max_retries {
                    link.gave_up.set(true);
                    shared.failures.set(shared.failures.get() + 1);
                    ctx.fail("giving up on a session after its retries", &why);
                    return;
                }
                wait = shared.backoff(failed_attempts);
            }
        }
    }
}

/// One connection: dial, `LoginToken`, then `run` (which syncs and reads)
/// alongside the keep-alive pinger, until it ends.
async fn connection<F, Fut>(ctx: &Rc<Ctx>, link: &Rc<Link>, run: &F) -> Ended
where
    F: Fn(ReadSide, Rc<Writer>) -> Fut,
    Fut: Future<Output = WireError>,
{
    let common = &ctx.plan.cli.common;
    link.synced.set(false);
    let Some(token) = link.token.as_deref() else {
        return Ended::Failed(WireError::Protocol("no token (user setup failed)".into()));
    };
    let setup = async {
        let mut conn = Conn::open(common.server, ctx.source(link.user_no)).await?;
        let user = conn.login_token(token).await?;
        Ok((conn, user))
    };
    let (conn, user) = match with_timeout(common.connect_timeout(), setup).await {
        Ok(done) => done,
        Err(e) => return Ended::Failed(e),
    };
    link.user.set(Some(user));
    link.set_open(ctx, true);
    let ping = conn.limits().ping_interval();
    let (reader, writer) = conn.into_running();
    let pinging = {
        let writer = writer.clone();
        async move {
            match ping {
                Some(interval) => keep_alive(writer, interval).await,
                None => future::pending().await,
            }
        }
    };
    let sync_deadline = async {
        glommio::timer::sleep(common.connect_timeout()).await;
        if link.synced.get() {
            future::pending::<()>().await;
        }
        WireError::Timeout
    };
    let ended = future::or(future::or(run(reader, writer), pinging), sync_deadline).await;
    link.set_open(ctx, false);
    if link.synced.replace(false) {
        Ended::Lived(ended)
    } else {
        Ended::Failed(ended)
    }
}

/// The `Disconnect` in `frame`, if it is one: records its hint on `link`
/// and returns the error that ends the connection.
fn disconnect_of(frame: &tern_proto::ArchivedServerFrame, link: &Link, shared: &Shared) -> Option<WireError> {
    let ArchivedServerBody::Disconnect {
        code, retry_after_ms, ..
    } = &frame.body
    else {
        return None;
    };
    if code.to_native() == ErrorCode::ShuttingDown {
        shared
            .shutdown_disconnects
            .set(shared.shutdown_disconnects.get() + 1);
        link.hint_ms.set(Some(retry_after_ms.to_native()));
    }
    Some(frame_failure(frame).unwrap_or(WireError::Closed))
}

/// A receiving session's connection: `Sync` from its cursors, then every
/// delivery is checked and moves the cursors.
async fn run_receiver(
    ctx: Rc<Ctx>,
    shared: Rc<Shared>,
    s: Rc<Session>,
    ids: Rc<Vec<UserId>>,
    reader: ReadSide,
    writer: Rc<Writer>,
) -> WireError {
    let cursors = s.cursors.borrow().clone();
    let sync_id = match writer.send(ClientBody::Sync { cursors }).await {
        Ok(id) => id,
        Err(e) => return e,
    };
    crate::wire::read_frames(reader, move |frame| {
        match &frame.body {
            ArchivedServerBody::Message(msg) if !ctx.plan.sent_by_this_run(msg.client_msg_id.to_native()) => {
                // An earlier run's: acknowledged by the next `Sync`, not counted.
                s.advance_cursor(msg.conv.to_native(), msg.seq.to_native());
            }
            ArchivedServerBody::Message(msg) => {
                let from = msg.from.to_native();
                let (Some(k), Some((_, seq))) = (
                    ids.iter().position(|&id| id == from),
                    parse_message_body(msg.content.body.as_slice()),
                ) else {
                    ctx.fail("churn delivery", &WireError::Protocol("a foreign message".into()));
                    return Ok(());
                };
                if let Some(check) = s.checks.borrow_mut().get_mut(k) {
                    check.observe(seq);
                }
                s.advance_cursor(msg.conv.to_native(), msg.seq.to_native());
                LiveCounters::add(&ctx.live().delivered, 1);
                ctx.count_delivery_in_window(now_ns());
            }
            ArchivedServerBody::SyncDone { .. } if frame.request_id.to_native() == sync_id => {
                s.link.mark_synced(&ctx, &shared)
            }
            _ => {
                if let Some(e) = disconnect_of(frame, &s.link, &shared) {
                    return Err(e);
                }
                if let Some(failure) = frame_failure(frame) {
                    ctx.fail("churning session got an error", &failure);
                }
            }
        }
        Ok(())
    })
    .await
}

/// A sender's connection: `Sync` (no cursors; it receives nothing), then
/// a pump that writes every unacknowledged message in `client_msg_id`
/// order (all of them again after a reconnect) while acknowledgements
/// remove them.
async fn run_sender(
    ctx: Rc<Ctx>,
    shared: Rc<Shared>,
    s: Rc<Sender>,
    reader: ReadSide,
    writer: Rc<Writer>,
) -> WireError {
    s.written.set(0);
    let sync_id = match writer.send(ClientBody::Sync { cursors: Vec::new() }).await {
        Ok(id) => id,
        Err(e) => return e,
    };
    let acks = {
        let s = s.clone();
        crate::wire::read_frames(reader, move |frame| {
            match &frame.body {
                ArchivedServerBody::Sent { client_msg_id, .. } => {
                    s.unacked.borrow_mut().remove(&client_msg_id.to_native());
                }
                ArchivedServerBody::SyncDone { .. } if frame.request_id.to_native() == sync_id => {
                    s.link.mark_synced(&ctx, &shared)
                }
                // Not stored; sent again after the reconnect.
                ArchivedServerBody::Error { code, .. } if code.to_native() == ErrorCode::ShuttingDown => {}
                _ => {
                    if let Some(e) = disconnect_of(frame, &s.link, &shared) {
                        return Err(e);
                    }
                    if let Some(failure) = frame_failure(frame) {
                        ctx.fail("a trickle send was refused", &failure);
                    }
                }
            }
            Ok(())
        })
    };
    let pump = async {
        loop {
            glommio::timer::sleep(PUMP_POLL).await;
            if !s.link.synced.get() {
                continue;
            }
            let batch: Vec<(u64, ClientBody)> = s
                .unacked
                .borrow()
                .range(s.written.get() + 1..)
                .map(|(&id, p)| {
                    let body = ClientBody::SendDirect {
                        to: p.to,
                        client_msg_id: id,
                        content: Content::text(p.body.clone()),
                    };
                    (id, body)
                })
                .collect();
            let Some(&(last, _)) = batch.last() else {
                continue;
            };
            let again = batch.iter().filter(|(id, _)| *id <= s.high_water.get()).count();
            s.resent.set(s.resent.get() + again as u64);
            s.high_water.set(s.high_water.get().max(last));
            if let Err(e) = writer.send_batch(batch.into_iter().map(|(_, body)| body)).await {
                return e;
            }
            s.written.set(last);
        }
    };
    future::or(acks, pump).await
}

/// Queues `rate` messages a second (this executor's share) until `end_ns`,
/// round-robin over the sessions and the senders; each (sender, session)
/// stream is numbered 0, 1, 2, … Senders write them when connected.
async fn send_trickle(
    ctx: &Rc<Ctx>,
    sessions: &[Rc<Session>],
    senders: &[Rc<Sender>],
    rate: f64,
    payload_bytes: usize,
    start_ns: u64,
    end_ns: u64,
) {
    let slots = ctx.plan.slots() as f64;
    if rate <= 0.0 || senders.is_empty() || sessions.is_empty() {
        return;
    }
    let period = ((1e9 * slots / rate) as u64).max(1);
    let mut n = 0u64;
    loop {
        let due = due_ns(start_ns, n, period);
        if due >= end_ns {
            return;
        }
        sleep_until_ns(due).await;
        let k = (n as usize) % senders.len();
        let sender = &senders[k];
        let session = &sessions[(n as usize / senders.len()) % sessions.len()];
        n += 1;
        let (Some(to), Some(sent)) = (session.link.user.get(), session.sent.get(k)) else {
            continue;
        };
        if sender.unacked.borrow().len() >= MAX_UNACKED {
            ctx.fail(
                "trickle send",
                &WireError::Protocol(format!("{MAX_UNACKED} sends unacknowledged; skipping")),
            );
            continue;
        }
        let seq = sent.get();
        sent.set(seq + 1);
        let id = sender.next_id.get();
        sender.next_id.set(id + 1);
        let pending = Pending {
            to,
            body: message_body(due, seq, payload_bytes),
        };
        sender.unacked.borrow_mut().insert(id, pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            down: Cell::new(0),
            first_loss_unix_us: Cell::new(None),
            all_live_unix_us: Cell::new(None),
            reconnects: Cell::new(0),
            failures: Cell::new(0),
            shutdown_disconnects: Cell::new(0),
            abrupt_losses: Cell::new(0),
            server_crashes: false,
            rng: Cell::new(0x9e37_79b9_7f4a_7c15),
            max_retries: 10,
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let s = shared();
        for attempt in 1..40 {
            let step = BACKOFF_FIRST
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(BACKOFF_CAP);
            let wait = s.backoff(attempt);
            assert!(wait >= step / 2 && wait < step, "attempt {attempt}: {wait:?}");
        }
        assert!(s.backoff(40) >= BACKOFF_CAP / 2);
    }

    #[test]
    fn jitter_stays_in_its_window_and_spreads() {
        let s = shared();
        let window = Duration::from_secs(1);
        let draws: Vec<Duration> = (0..1000).map(|_| s.jitter(window)).collect();
        assert!(draws.iter().all(|d| *d < window));
        let low = draws.iter().filter(|d| **d < window / 2).count();
        assert!((400..600).contains(&low), "{low} of 1000 in the lower half");
        assert_eq!(s.jitter(Duration::ZERO), Duration::ZERO);
    }
}
