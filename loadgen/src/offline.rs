//! The `offline` scenario: a backlog waits for users who were away, then
//! they come online and drain it.
//!
//! Recipient r (user 2r+1) has its own sender (user 2r). While no
//! recipient is connected, every sender sends its recipient's share of the
//! backlog, keeping `--send-window` sends unacknowledged, and the phase
//! ends once every send is acknowledged (so the whole backlog is durable
//! in the recipients' inboxes). Then all recipients connect at once, log
//! in with their token and send `Sync` with no cursors. Measured per
//! recipient: time from the `Sync` request to the first message (the
//! latency histogram); overall: the drain rate, every message received
//! over the time from the first `Sync` to the last recipient holding its
//! whole backlog and its `SyncDone`. Every message must arrive once and in
//! order.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use glommio::sync::Semaphore;
use tern_proto::{ArchivedServerBody, ClientBody, Content, ConvId, ReceiptKind, ServerBody, UserId};

use crate::cli::OfflineArgs;
use crate::pairs::spawn_connection;
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_tokens;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    frame_failure, message_body, now_ns, open_session, parse_message_body, read_frames, with_timeout, Conn,
    WireError, Writer,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

/// One recipient and its sender.
struct Mailbox {
    recipient_no: usize,
    recipient_user: UserId,
    sender_user: UserId,
    backlog: u64,
    acked: Cell<u64>,
    check: RefCell<StreamCheck>,
    received: Cell<u64>,
    synced: Cell<bool>,
    /// When this recipient had everything (process clock, ns), 0 until then.
    done_ns: Cell<u64>,
    /// When its sender began sending the backlog (process clock, ns), 0
    /// until then: the backlog's rate is timed from the first of these,
    /// not from the sessions' setup.
    send_start_ns: Cell<u64>,
}

impl Mailbox {
    fn complete(&self) -> bool {
        self.synced.get() && self.check.borrow().unique() >= self.acked.get()
    }
}

pub async fn run(ctx: Rc<Ctx>, args: OfflineArgs) -> ExecOutcome {
    let recipients = ctx.plan.exec_share(args.users, ctx.exec);
    let users = 2 * recipients.start..2 * recipients.end;
    let tokens = Rc::new(obtain_tokens(&ctx, users.clone()).await);
    ctx.setup_done().await;

    // Fill the backlog with every recipient offline.
    let boxes: Rc<RefCell<Vec<Rc<Mailbox>>>> = Rc::default();
    let tasks: Rc<RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let fill_start = now_ns();
    {
        let (ctx, tokens, boxes, tasks, args) = (
            ctx.clone(),
            tokens.clone(),
            boxes.clone(),
            tasks.clone(),
            args.clone(),
        );
        let first = recipients.start;
        for_each_bounded(recipients.len(), CONNECT_CONCURRENCY, move |i| {
            let (ctx, tokens, boxes, tasks, args) = (
                ctx.clone(),
                tokens.clone(),
                boxes.clone(),
                tasks.clone(),
                args.clone(),
            );
            async move {
                if let Some(mailbox) = fill_backlog(&ctx, &tokens, first + i, 2 * i, &args, &tasks).await {
                    boxes.borrow_mut().push(mailbox);
                }
            }
        })
        .await;
    }
    let boxes = boxes.borrow().clone();
    // From the first send, not from `fill_start`: opening the senders'
    // sessions and looking up the recipients is setup, not the backlog.
    let first_send_ns = boxes
        .iter()
        .map(|m| m.send_start_ns.get())
        .filter(|&ns| ns > 0)
        .min()
        .unwrap_or(fill_start);
    let backlog_secs = secs_between(first_send_ns, now_ns());
    ctx.connected().await;

    // Bring the recipients online together.
    let start_ns = now_ns();
    let recipients_up = Rc::new(Cell::new(0u64));
    let syncs: Vec<_> = boxes
        .iter()
        .map(|mailbox| {
            let (ctx, mailbox, tokens, up, tasks) = (
                ctx.clone(),
                mailbox.clone(),
                tokens.clone(),
                recipients_up.clone(),
                tasks.clone(),
            );
            let token_at = 2 * (mailbox.recipient_no - recipients.start) + 1;
            glommio::spawn_local(async move {
                let Some(Some(token)) = tokens.get(token_at) else {
                    return;
                };
                match drain(&ctx, &mailbox, token).await {
                    Ok(task) => {
                        up.set(up.get() + 1);
                        tasks.borrow_mut().push(task);
                    }
                    Err(e) => ctx.fail("bringing a recipient online", &e),
                }
            })
        })
        .collect();
    let common = &ctx.plan.cli.common;
    let limit = common.duration() + common.drain();
    wait_until(limit, || boxes.iter().all(|m| m.complete())).await;
    // A mailbox still incomplete was draining until now: its deliveries
    // count in `received`, so the window runs to now too, or the rate
    // would divide them by the time the complete ones took.
    let last_done = if boxes.iter().all(|m| m.complete()) {
        boxes.iter().map(|m| m.done_ns.get()).max().unwrap_or(start_ns)
    } else {
        now_ns()
    };
    let drain_secs = secs_between(start_ns, last_done.max(start_ns));
    ctx.closing.set(true);

    let mut verdict = Verdict::default();
    for m in &boxes {
        verdict.add(m.check.borrow().verdict(m.acked.get()));
    }
    let received: u64 = boxes.iter().map(|m| m.received.get()).sum();
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            users: users.len() as u64,
            connections: boxes.len() as u64 + recipients_up.get(),
            connect_failures: (2 * recipients.len() as u64)
                .saturating_sub(boxes.len() as u64 + recipients_up.get()),
            sent: boxes.iter().map(|m| m.acked.get()).sum(),
            delivered: received,
            delivered_in_window: received,
            undelivered: verdict.lost,
            window_secs: drain_secs,
            backlog_secs,
            verdict,
            ..ExecOutcome::empty()
        },
    );
    drop(syncs);
    drop(tasks);
    outcome
}

/// Connects recipient `recipient_no`'s sender (token at `token_at`) and
/// sends the recipient's backlog, waiting for every ack. The sender stays
/// connected (idle) until the run ends.
async fn fill_backlog(
    ctx: &Rc<Ctx>,
    tokens: &[Option<Vec<u8>>],
    recipient_no: usize,
    token_at: usize,
    args: &OfflineArgs,
    tasks: &Rc<RefCell<Vec<glommio::Task<()>>>>,
) -> Option<Rc<Mailbox>> {
    let (Some(Some(sender_token)), Some(Some(recipient_token))) =
        (tokens.get(token_at), tokens.get(token_at + 1))
    else {
        return None;
    };
    let common = &ctx.plan.cli.common;
    let timeout = common.connect_timeout();
    let (conn, sender_user) =
        match open_session(common.server, ctx.source(2 * recipient_no), sender_token, timeout).await {
            Ok(opened) => opened,
            Err(e) => {
                ctx.fail("connecting a sender", &e);
                return None;
            }
        };
    // The recipient's user id: one login, then the session ends before
    // anything is sent, so the recipient is offline. A recipient reused
    // from an earlier run (`--prefix`) first acknowledges everything its
    // sender sent before (the loadgen never sends receipts while it
    // measures), so that the drain streams this run's backlog only.
    let reuse = ctx.plan.reuse;
    let recipient = async {
        let mut conn = Conn::open(common.server, ctx.source(2 * recipient_no + 1)).await?;
        let user = conn.login_token(recipient_token).await?;
        if reuse {
            let receipt = ClientBody::Receipt {
                conv: ConvId::direct(user, sender_user),
                kind: ReceiptKind::Delivered,
                // Capped by the server at the last stored message.
                seq: u64::MAX,
            };
            match conn.request(receipt).await? {
                ServerBody::Ok => {}
                other => {
                    return Err(WireError::Protocol(format!(
                        "a receipt clearing an earlier run's backlog was answered {other:?}"
                    )))
                }
            }
        }
        Ok(user)
    };
    let recipient_user = match with_timeout(timeout, recipient).await {
        Ok(user) => user,
        Err(e) => {
            ctx.fail("looking up a recipient", &e);
            return None;
        }
    };
    let mailbox = Rc::new(Mailbox {
        recipient_no,
        recipient_user,
        sender_user,
        backlog: args.backlog_of(recipient_no) as u64,
        acked: Cell::new(0),
        check: RefCell::default(),
        received: Cell::new(0),
        synced: Cell::new(false),
        done_ns: Cell::new(0),
        send_start_ns: Cell::new(0),
    });
    let ping = conn.limits().ping_interval();
    let (reader, writer) = conn.into_running();
    LiveCounters::add(&ctx.live().open_connections, 1);
    let window = Rc::new(Semaphore::new(args.send_window as u64));
    let (ack_ctx, ack_box, ack_window) = (ctx.clone(), mailbox.clone(), window.clone());
    let acks = read_frames(reader, move |frame| {
        match &frame.body {
            ArchivedServerBody::Sent { .. } => ack_box.acked.set(ack_box.acked.get() + 1),
            ArchivedServerBody::Disconnect { .. } => {
                return Err(frame_failure(frame).unwrap_or(WireError::Closed));
            }
            _ => {
                if let Some(failure) = frame_failure(frame) {
                    ack_ctx.fail("a backlog send was refused", &failure);
                }
            }
        }
        ack_window.signal(1);
        Ok(())
    });
    tasks.borrow_mut().push(spawn_connection(
        ctx.clone(),
        acks,
        writer.clone(),
        ping,
        "sender",
    ));
    mailbox.send_start_ns.set(now_ns());
    if let Err(e) = send_backlog(&mailbox, &writer, &window, args, ctx.plan.msg_id_base).await {
        ctx.fail("sending the backlog", &e);
        return None;
    }
    let limit = common.duration() + common.drain();
    if !wait_until(limit, || mailbox.acked.get() >= mailbox.backlog).await {
        ctx.fail("filling the backlog", &WireError::Timeout);
    }
    Some(mailbox)
}

async fn send_backlog(
    mailbox: &Mailbox,
    writer: &Writer,
    window: &Semaphore,
    args: &OfflineArgs,
    msg_id_base: u64,
) -> Result<(), WireError> {
    let to = mailbox.recipient_user;
    let mut seq = 0u64;
    while seq < mailbox.backlog {
        window
            .acquire(1)
            .await
            .map_err(|e| WireError::Protocol(format!("window: {e}")))?;
        let mut batch = 1u64;
        while seq + batch < mailbox.backlog && matches!(window.try_acquire(1), Ok(true)) {
            batch += 1;
        }
        let now = now_ns();
        let bodies: Vec<_> = (seq..seq + batch)
            .map(|s| ClientBody::SendDirect {
                to,
                client_msg_id: msg_id_base + s + 1,
                content: Content::text(message_body(now, s, args.payload_bytes)),
            })
            .collect();
        writer.send_batch(bodies).await?;
        seq += batch;
    }
    Ok(())
}

/// Brings one recipient online: token login, then `Sync` with no cursors,
/// counting every pushed message until `SyncDone` and the whole backlog
/// are in. Returns the task that keeps reading (and pinging).
async fn drain(ctx: &Rc<Ctx>, mailbox: &Rc<Mailbox>, token: &[u8]) -> Result<glommio::Task<()>, WireError> {
    let common = &ctx.plan.cli.common;
    let login = async {
        let mut conn = Conn::open(common.server, ctx.source(2 * mailbox.recipient_no + 1)).await?;
        conn.login_token(token).await?;
        Ok(conn)
    };
    let conn = with_timeout(common.connect_timeout(), login).await?;
    let ping = conn.limits().ping_interval();
    let (reader, writer) = conn.into_running();
    LiveCounters::add(&ctx.live().open_connections, 1);
    let sync_ns = now_ns();
    let sync_id = writer.send(ClientBody::Sync { cursors: Vec::new() }).await?;
    let (handler_ctx, m) = (ctx.clone(), mailbox.clone());
    let reading = read_frames(reader, move |frame| {
        match &frame.body {
            ArchivedServerBody::Message(msg) => {
                let now = now_ns();
                let Some((_, seq)) = parse_message_body(msg.content.body.as_slice()) else {
                    handler_ctx.fail(
                        "draining",
                        &WireError::Protocol("a message without a loadgen header".into()),
                    );
                    return Ok(());
                };
                if msg.from.to_native() != m.sender_user {
                    handler_ctx.fail(
                        "draining",
                        &WireError::Protocol("a message from a stranger".into()),
                    );
                    return Ok(());
                }
                if m.received.get() == 0 {
                    handler_ctx.recorder.record_ns(now.saturating_sub(sync_ns));
                }
                m.received.set(m.received.get() + 1);
                m.check.borrow_mut().observe(seq);
                LiveCounters::add(&handler_ctx.live().delivered, 1);
            }
            ArchivedServerBody::SyncDone { .. } if frame.request_id.to_native() == sync_id => {
                m.synced.set(true)
            }
            ArchivedServerBody::Disconnect { .. } => {
                return Err(frame_failure(frame).unwrap_or(WireError::Closed));
            }
            _ => {
                if let Some(failure) = frame_failure(frame) {
                    handler_ctx.fail("recipient got an error", &failure);
                }
            }
        }
        if m.done_ns.get() == 0 && m.complete() {
            m.done_ns.set(now_ns());
        }
        Ok(())
    });
    Ok(spawn_connection(ctx.clone(), reading, writer, ping, "recipient"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Scenario};

    #[test]
    fn backlog_is_spread_or_fixed_per_user() {
        let cli = Cli::try_parse_from(["loadgen", "offline", "--users", "3", "--backlog", "10"]).unwrap();
        let Scenario::Offline(a) = cli.scenario else {
            panic!()
        };
        assert_eq!((0..3).map(|r| a.backlog_of(r)).collect::<Vec<_>>(), [4, 3, 3]);
        let cli =
            Cli::try_parse_from(["loadgen", "offline", "--users", "3", "--backlog-per-user", "7"]).unwrap();
        let Scenario::Offline(a) = cli.scenario else {
            panic!()
        };
        assert_eq!(a.backlog_of(2), 7);
        assert!(Cli::try_parse_from(["loadgen", "--protocol", "nats", "offline"])
            .unwrap()
            .validate()
            .is_err());
    }
}
