//! The `churn` scenario: a reconnect storm with session resume.
//!
//! N sessions (one user each) are held. Every second, the next K% of them
//! in rotation drop their connection and resume: dial, `LoginToken`, and
//! `Sync` with the cursors they hold (the last sequence received per
//! conversation). Resume latency runs from the drop to `SyncDone`. Meanwhile
//! a few senders per executor, which never churn, send a trickle of
//! messages to the churning users round-robin; each (sender, recipient)
//! stream must arrive exactly once and in order across every reconnect,
//! which is what session resume promises. Sessions whose resume failed are
//! retried at the next tick and once more before the final drain.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use tern_proto::{ArchivedServerBody, ClientBody, Content, ConvId, Cursor, UserId};

use crate::cli::ChurnArgs;
use crate::pairs::spawn_connection;
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_tokens;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    frame_failure, message_body, now_ns, open_session, parse_message_body, read_frames, sleep_until_ns,
    with_timeout, Conn, WireError,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

/// Trickle senders per executor (they never churn).
pub const SENDERS: usize = 2;

/// One churning session.
struct Session {
    user_no: usize,
    token: Option<Vec<u8>>,
    user: Cell<Option<UserId>>,
    /// Last sequence received per conversation (one per sender).
    cursors: RefCell<Vec<Cursor>>,
    /// Per sender: the stream check and how many that sender has sent.
    checks: RefCell<Vec<StreamCheck>>,
    sent: Vec<Cell<u64>>,
    synced: Cell<bool>,
    /// Resuming now (not to be picked again until done).
    busy: Cell<bool>,
    /// The running connection; dropping it closes the socket.
    task: RefCell<Option<glommio::Task<()>>>,
}

impl Session {
    fn up(&self) -> bool {
        self.synced.get() && self.task.borrow().is_some() && !self.busy.get()
    }

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

pub async fn run(ctx: Rc<Ctx>, args: ChurnArgs) -> ExecOutcome {
    let mine = ctx.plan.exec_share(args.connections, ctx.exec);
    let global_exec = ctx.plan.child * ctx.plan.cli.common.threads + ctx.exec;
    let first_sender = args.connections + global_exec * SENDERS;
    let tokens = obtain_tokens(&ctx, mine.clone()).await;
    let sender_tokens = obtain_tokens(&ctx, first_sender..first_sender + SENDERS).await;
    ctx.setup_done().await;

    let common = &ctx.plan.cli.common;
    let sessions: Vec<Rc<Session>> = mine
        .clone()
        .zip(tokens)
        .map(|(user_no, token)| {
            Rc::new(Session {
                user_no,
                token,
                user: Cell::new(None),
                cursors: RefCell::default(),
                checks: RefCell::new((0..SENDERS).map(|_| StreamCheck::default()).collect()),
                sent: (0..SENDERS).map(|_| Cell::new(0)).collect(),
                synced: Cell::new(false),
                busy: Cell::new(false),
                task: RefCell::new(None),
            })
        })
        .collect();

    // Senders first, so every session knows their user ids.
    let mut senders = Vec::new();
    let mut sender_ids = Vec::new();
    let mut tasks = Vec::new();
    for (k, token) in sender_tokens.iter().enumerate() {
        let Some(token) = token else { continue };
        match open_session(
            common.server,
            ctx.source(first_sender + k),
            token,
            common.connect_timeout(),
        )
        .await
        {
            Ok((conn, user)) => {
                let ping = conn.limits().ping_interval();
                let (reader, writer) = conn.into_running();
                LiveCounters::add(&ctx.live().open_connections, 1);
                let ack_ctx = ctx.clone();
                let acks = read_frames(reader, move |frame| {
                    if let Some(failure) = frame_failure(frame) {
                        if matches!(frame.body, ArchivedServerBody::Disconnect { .. }) {
                            return Err(failure);
                        }
                        ack_ctx.fail("a trickle send was refused", &failure);
                    }
                    Ok(())
                });
                tasks.push(spawn_connection(
                    ctx.clone(),
                    acks,
                    writer.clone(),
                    ping,
                    "sender",
                ));
                senders.push((sender_ids.len(), writer));
                sender_ids.push(user);
            }
            Err(e) => ctx.fail("connecting a sender", &e),
        }
    }
    let sender_ids = Rc::new(sender_ids);

    let start_ns = now_ns();
    {
        let (ctx, sessions, ids) = (ctx.clone(), sessions.clone(), sender_ids.clone());
        for_each_bounded(sessions.len(), CONNECT_CONCURRENCY, move |i| {
            let (ctx, sessions, ids) = (ctx.clone(), sessions.clone(), ids.clone());
            async move {
                if let Some(session) = sessions.get(i) {
                    if let Err(e) = resume(&ctx, session, &ids).await {
                        ctx.fail("connecting a session", &e);
                    }
                }
            }
        })
        .await;
    }
    let connect_secs = secs_between(start_ns, now_ns());
    let connected = sessions.iter().filter(|s| s.up()).count() as u64;
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + common.duration().as_nanos() as u64;
    let reconnects = Rc::new(Cell::new(0u64));
    let failures = Rc::new(Cell::new(0u64));
    let trickle = {
        let (ctx, sessions, rate) = (ctx.clone(), sessions.clone(), args.trickle_rate);
        let payload = args.payload_bytes;
        glommio::spawn_local(async move {
            send_trickle(&ctx, &sessions, &senders, rate, payload, start_ns, end_ns).await;
        })
    };
    // The storm: one tick a second.
    let per_tick = ((sessions.len() as f64 * args.percent / 100.0).ceil() as usize).min(sessions.len());
    let mut next = 0usize;
    let mut tick = 1u64;
    while start_ns + tick * 1_000_000_000 < end_ns {
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
            if session.busy.get() {
                continue;
            }
            picked += 1;
            spawn_resume(&ctx, session, &sender_ids, &reconnects, &failures);
        }
    }
    sleep_until_ns(end_ns).await;
    drop(trickle);
    // Whoever is down (a failed resume) gets one more try before the drain.
    for session in &sessions {
        if !session.busy.get() && session.task.borrow().is_none() {
            spawn_resume(&ctx, session.clone(), &sender_ids, &reconnects, &failures);
        }
    }
    let settled = || sessions.iter().all(|s| s.up() && s.caught_up());
    wait_until(common.drain() + common.connect_timeout(), settled).await;
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
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            users: (mine.len() + SENDERS) as u64,
            connections: connected + sender_ids.len() as u64,
            connect_failures: (sessions.len() as u64).saturating_sub(connected),
            connect_secs,
            sent,
            delivered,
            delivered_in_window: ctx.in_window.get(),
            undelivered: verdict.lost,
            window_secs: secs_between(start_ns, end_ns),
            verdict,
            reconnects: reconnects.get(),
            reconnect_failures: failures.get(),
            ..ExecOutcome::empty()
        },
    );
    for s in &sessions {
        s.task.borrow_mut().take();
    }
    drop(tasks);
    outcome
}

/// Drops `session`'s connection and resumes it in the background,
/// recording the time from the drop to `SyncDone`.
fn spawn_resume(
    ctx: &Rc<Ctx>,
    session: Rc<Session>,
    sender_ids: &Rc<Vec<UserId>>,
    reconnects: &Rc<Cell<u64>>,
    failures: &Rc<Cell<u64>>,
) {
    session.busy.set(true);
    let (ctx, ids, reconnects, failures) = (
        ctx.clone(),
        sender_ids.clone(),
        reconnects.clone(),
        failures.clone(),
    );
    glommio::spawn_local(async move {
        let dropped = now_ns();
        if session.task.borrow_mut().take().is_some() {
            // A cancelled connection task cannot count itself down.
            ctx.live()
                .open_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        match resume(&ctx, &session, &ids).await {
            Ok(()) => {
                ctx.recorder.record_ns(now_ns().saturating_sub(dropped));
                reconnects.set(reconnects.get() + 1);
            }
            Err(e) => {
                failures.set(failures.get() + 1);
                ctx.fail("resuming a session", &e);
            }
        }
        session.busy.set(false);
    })
    .detach();
}

/// Connects `session`: token login, `Sync` from its cursors, and a reader
/// that keeps its cursors and checks; returns once `SyncDone` arrived.
async fn resume(ctx: &Rc<Ctx>, session: &Rc<Session>, sender_ids: &Rc<Vec<UserId>>) -> Result<(), WireError> {
    let common = &ctx.plan.cli.common;
    let token = session
        .token
        .as_deref()
        .ok_or_else(|| WireError::Protocol("no token (user setup failed)".into()))?;
    session.synced.set(false);
    let attempt = async {
        let mut conn = Conn::open(common.server, ctx.source(session.user_no)).await?;
        let user = conn.login_token(token).await?;
        session.user.set(Some(user));
        let ping = conn.limits().ping_interval();
        let (reader, writer) = conn.into_running();
        let cursors = session.cursors.borrow().clone();
        let sync_id = writer.send(ClientBody::Sync { cursors }).await?;
        let (handler_ctx, s, ids) = (ctx.clone(), session.clone(), sender_ids.clone());
        let reading = read_frames(reader, move |frame| {
            match &frame.body {
                ArchivedServerBody::Message(msg) => {
                    let from = msg.from.to_native();
                    let (Some(k), Some((_, seq))) = (
                        ids.iter().position(|&id| id == from),
                        parse_message_body(msg.content.body.as_slice()),
                    ) else {
                        handler_ctx.fail("churn delivery", &WireError::Protocol("a foreign message".into()));
                        return Ok(());
                    };
                    if let Some(check) = s.checks.borrow_mut().get_mut(k) {
                        check.observe(seq);
                    }
                    s.advance_cursor(msg.conv.to_native(), msg.seq.to_native());
                    LiveCounters::add(&handler_ctx.live().delivered, 1);
                    handler_ctx.in_window.set(handler_ctx.in_window.get() + 1);
                }
                ArchivedServerBody::SyncDone { .. } if frame.request_id.to_native() == sync_id => {
                    s.synced.set(true)
                }
                ArchivedServerBody::Disconnect { .. } => {
                    return Err(frame_failure(frame).unwrap_or(WireError::Closed));
                }
                _ => {
                    if let Some(failure) = frame_failure(frame) {
                        handler_ctx.fail("churning session got an error", &failure);
                    }
                }
            }
            Ok(())
        });
        LiveCounters::add(&ctx.live().open_connections, 1);
        let task = spawn_connection(ctx.clone(), reading, writer, ping, "churning");
        *session.task.borrow_mut() = Some(task);
        if wait_until(common.connect_timeout(), || session.synced.get()).await {
            Ok(())
        } else {
            Err(WireError::Timeout)
        }
    };
    let result = with_timeout(common.connect_timeout() * 2, attempt).await;
    // A half-made connection is dropped, so the next attempt starts clean.
    if result.is_err() && session.task.borrow_mut().take().is_some() {
        ctx.live()
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

/// Sends `rate` messages a second (this executor's share) until `end_ns`,
/// round-robin over the sessions and the senders; each (sender, session)
/// stream is numbered 0, 1, 2, …
async fn send_trickle(
    ctx: &Rc<Ctx>,
    sessions: &[Rc<Session>],
    senders: &[(usize, Rc<crate::wire::Writer>)],
    rate: f64,
    payload_bytes: usize,
    start_ns: u64,
    end_ns: u64,
) {
    let slots = (ctx.plan.cli.common.procs * ctx.plan.cli.common.threads) as f64;
    if rate <= 0.0 || senders.is_empty() || sessions.is_empty() {
        return;
    }
    let period = ((1e9 * slots / rate) as u64).max(1);
    let mut n = 0u64;
    loop {
        let due = start_ns + n * period;
        if due >= end_ns {
            return;
        }
        sleep_until_ns(due).await;
        let (k, writer) = &senders[(n as usize) % senders.len()];
        let session = &sessions[(n as usize / senders.len()) % sessions.len()];
        n += 1;
        let (Some(to), Some(sent)) = (session.user.get(), session.sent.get(*k)) else {
            continue;
        };
        let seq = sent.get();
        let body = ClientBody::SendDirect {
            to,
            client_msg_id: seq + 1,
            content: Content::text(message_body(due, seq, payload_bytes)),
        };
        match writer.send(body).await {
            Ok(_) => sent.set(seq + 1),
            Err(e) => {
                ctx.fail("trickle send", &e);
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
