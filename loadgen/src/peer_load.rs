//! The `connect`, `pairs` and `groups` scenarios against nats-server or
//! mosquitto (`--protocol nats|mqtt`), measured the same way as against
//! Tern: open-loop connection attempts timed from their intended start,
//! message latency from the intended send time carried in the body,
//! deliveries counted inside the measured window, every stream checked for
//! loss, duplicates and reordering.
//!
//! The mapping: a Tern user's session is one peer connection (no accounts,
//! so no setup phase); a pair's receiver subscribes to its own subject and
//! the sender publishes to it; a group's members subscribe to the group's
//! subject and its publisher (not subscribed, as Tern does not echo to the
//! sending session) publishes to it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::sync::Semaphore;

use crate::cli::{ConnectArgs, GroupsArgs, PairsArgs, Protocol};
use crate::peer::{read_deliveries, subject, PeerConn, PeerWriter};
use crate::stats::{ExecOutcome, LiveCounters};
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    due_before, due_ns, message_body, now_ns, open_loop_period_ns, open_loop_starts_ns, parse_message_body,
    sleep_until_ns, WireError,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

fn proto(ctx: &Ctx) -> Protocol {
    ctx.plan.cli.common.protocol
}

fn run_name(ctx: &Ctx) -> String {
    ctx.plan.prefix.trim_end_matches('_').to_string()
}

async fn open(ctx: &Rc<Ctx>, conn_no: usize) -> Result<PeerConn, WireError> {
    let common = &ctx.plan.cli.common;
    let client_id = format!("{}{conn_no}", ctx.plan.prefix);
    PeerConn::open(
        proto(ctx),
        common.server,
        ctx.source(conn_no),
        &client_id,
        common.connect_timeout(),
    )
    .await
}

/// Runs a connection's read loop and keep-alive until either ends; counts
/// the end as a failure unless the run is closing.
fn spawn_running(
    ctx: &Rc<Ctx>,
    conn: PeerConn,
    role: &'static str,
    on_payload: impl FnMut(&[u8]) + 'static,
) -> (Rc<PeerWriter>, glommio::Task<()>) {
    let (reader, writer) = conn.into_running();
    LiveCounters::add(&ctx.live().open_connections, 1);
    let (task_ctx, task_writer) = (ctx.clone(), writer.clone());
    let task = glommio::spawn_local(async move {
        let reading = read_deliveries(reader, task_writer.clone(), on_payload);
        let ended = future::or(reading, task_writer.keep_alive()).await;
        task_ctx
            .live()
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if !task_ctx.closing.get() {
            task_ctx.fail(&format!("{role} connection ended"), &ended);
        }
    });
    (writer, task)
}

/// A receiver's per-stream state.
struct Stream {
    check: RefCell<StreamCheck>,
    delivered: Cell<u64>,
}

/// The payload handler of a receiving connection: latency, window and
/// exactly-once bookkeeping, shared by pairs and groups.
fn on_delivery(ctx: Rc<Ctx>, stream: Rc<Stream>, window: Option<Rc<Semaphore>>) -> impl FnMut(&[u8]) {
    move |payload| {
        let now = now_ns();
        let Some((intended_ns, seq)) = parse_message_body(payload) else {
            ctx.fail(
                "delivery",
                &WireError::Protocol("a message without a loadgen header".into()),
            );
            return;
        };
        stream.check.borrow_mut().observe(seq);
        stream.delivered.set(stream.delivered.get() + 1);
        ctx.recorder.record_ns(now.saturating_sub(intended_ns));
        LiveCounters::add(&ctx.live().delivered, 1);
        ctx.count_delivery_in_window(now);
        if let Some(window) = &window {
            window.signal(1);
        }
    }
}

pub async fn connect(ctx: Rc<Ctx>, args: ConnectArgs) -> ExecOutcome {
    let conns = ctx.plan.exec_share(args.connections, ctx.exec);
    ctx.setup_done().await;
    let slots = ctx.plan.slots() as f64;
    let interval_ns = (1e9 * slots / args.rate) as u64;
    let established = Rc::new(Cell::new(0u64));
    let failed = Rc::new(Cell::new(0u64));
    let last_done_ns = Rc::new(Cell::new(0u64));
    let held: Rc<RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let start_ns = now_ns();
    let mut attempts = Vec::with_capacity(conns.len());
    for (k, conn_no) in conns.clone().enumerate() {
        let intended_ns = due_ns(start_ns, k as u64, interval_ns);
        let (ctx, established, failed, last_done_ns, held) = (
            ctx.clone(),
            established.clone(),
            failed.clone(),
            last_done_ns.clone(),
            held.clone(),
        );
        attempts.push(glommio::spawn_local(async move {
            sleep_until_ns(intended_ns).await;
            let opened = open(&ctx, conn_no).await;
            last_done_ns.set(now_ns());
            match opened {
                Ok(conn) => {
                    ctx.recorder.record_ns(now_ns().saturating_sub(intended_ns));
                    established.set(established.get() + 1);
                    let (_writer, task) = spawn_running(&ctx, conn, "held", |_| {});
                    held.borrow_mut().push(task);
                }
                Err(e) => {
                    failed.set(failed.get() + 1);
                    ctx.fail("connecting", &e);
                }
            }
        }));
    }
    let total = conns.len() as u64;
    let ramp = Duration::from_nanos(interval_ns.saturating_mul(total));
    let limit = ramp + ctx.plan.cli.common.connect_timeout() * 2 + Duration::from_secs(5);
    wait_until(limit, || established.get() + failed.get() >= total).await;
    let connect_secs = secs_between(start_ns, last_done_ns.get().max(start_ns));
    ctx.connected().await;
    let hold_for = Duration::from_secs_f64(args.hold_secs.unwrap_or(ctx.plan.cli.common.duration_secs));
    glommio::timer::sleep(hold_for).await;
    ctx.closing.set(true);
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            connections: established.get(),
            connect_failures: failed.get(),
            connect_secs,
            window_secs: hold_for.as_secs_f64(),
            ..ExecOutcome::empty()
        },
    );
    drop(attempts);
    drop(held);
    outcome
}

struct PeerPair {
    sender: Rc<PeerWriter>,
    subject: String,
    window: Rc<Semaphore>,
    stream: Rc<Stream>,
    sent: Cell<u64>,
    sender_done: Cell<bool>,
}

pub async fn pairs(ctx: Rc<Ctx>, args: PairsArgs) -> ExecOutcome {
    let pairs = ctx.plan.exec_share(args.pairs, ctx.exec);
    ctx.setup_done().await;
    let running: Rc<RefCell<Vec<Rc<PeerPair>>>> = Rc::default();
    let tasks: Rc<RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let failed = Rc::new(Cell::new(0u64));
    let start_ns = now_ns();
    {
        let (ctx, running, tasks, failed, window) = (
            ctx.clone(),
            running.clone(),
            tasks.clone(),
            failed.clone(),
            args.window,
        );
        let first = pairs.start;
        for_each_bounded(pairs.len(), CONNECT_CONCURRENCY, move |i| {
            let (ctx, running, tasks, failed) = (ctx.clone(), running.clone(), tasks.clone(), failed.clone());
            async move {
                let pair_no = first + i;
                let subj = subject(proto(&ctx), &run_name(&ctx), &format!("p{pair_no}"));
                let opened = async {
                    let mut receiver = open(&ctx, 2 * pair_no + 1).await?;
                    receiver.subscribe(&subj).await?;
                    let sender = open(&ctx, 2 * pair_no).await?;
                    Ok::<_, WireError>((sender, receiver))
                };
                let (sender, receiver) = match opened.await {
                    Ok(both) => both,
                    Err(e) => {
                        failed.set(failed.get() + 1);
                        ctx.fail("connecting a pair", &e);
                        return;
                    }
                };
                let stream = Rc::new(Stream {
                    check: RefCell::default(),
                    delivered: Cell::new(0),
                });
                let window_sem = Rc::new(Semaphore::new(window as u64));
                let handler = on_delivery(ctx.clone(), stream.clone(), Some(window_sem.clone()));
                let (_, receiver_task) = spawn_running(&ctx, receiver, "receiver", handler);
                let ack_ctx = ctx.clone();
                let (sender, sender_task) = spawn_running(&ctx, sender, "sender", move |_| {
                    ack_ctx.fail("sender", &WireError::Protocol("a delivery to a sender".into()));
                });
                tasks.borrow_mut().extend([receiver_task, sender_task]);
                running.borrow_mut().push(Rc::new(PeerPair {
                    sender,
                    subject: subj,
                    window: window_sem,
                    stream,
                    sent: Cell::new(0),
                    sender_done: Cell::new(false),
                }));
            }
        })
        .await;
    }
    let connect_secs = secs_between(start_ns, now_ns());
    let up = running.borrow().clone();
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + ctx.plan.cli.common.duration().as_nanos() as u64;
    ctx.set_window_end(end_ns);
    // The same spread as Tern's pairs, so both are measured alike.
    let firsts = open_loop_starts_ns(start_ns, args.rate, up.len(), ctx.slot());
    let senders: Vec<_> = up
        .iter()
        .zip(&firsts)
        .map(|(pair, &first_ns)| {
            let (ctx, pair, args) = (ctx.clone(), pair.clone(), args.clone());
            glommio::spawn_local(async move {
                let result = pair_send_loop(&pair, &args, first_ns, end_ns).await;
                pair.sender_done.set(true);
                if let Err(e) = result {
                    if !ctx.closing.get() {
                        ctx.fail("sending", &e);
                    }
                }
            })
        })
        .collect();
    sleep_until_ns(end_ns).await;
    let all_delivered = || {
        up.iter()
            .all(|p| p.sender_done.get() && p.stream.check.borrow().unique() >= p.sent.get())
    };
    wait_until(ctx.plan.cli.common.drain(), all_delivered).await;
    ctx.closing.set(true);
    let close_ns = now_ns();
    let schedule = firsts.iter().copied().zip(up.iter().map(|p| p.sent.get()));
    let unsent = ctx
        .recorder
        .record_all_unsent(args.rate, schedule, end_ns, close_ns);

    let mut verdict = Verdict::default();
    for p in &up {
        verdict.add(p.stream.check.borrow().verdict(p.sent.get()));
    }
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            connections: 2 * up.len() as u64,
            connect_failures: failed.get(),
            connect_secs,
            sent: up.iter().map(|p| p.sent.get()).sum(),
            delivered: up.iter().map(|p| p.stream.delivered.get()).sum(),
            delivered_in_window: ctx.in_window.get(),
            undelivered: verdict.lost,
            unsent,
            target_send_per_s: args.rate.map_or(0.0, |r| r * pairs.len() as f64),
            window_secs: secs_between(start_ns, end_ns),
            verdict,
            ..ExecOutcome::empty()
        },
    );
    drop(senders);
    drop(tasks);
    outcome
}

/// The same loop as Tern's pairs: closed loop on the window, or open loop
/// at `--rate` with the window still capping what is in flight.
async fn pair_send_loop(
    pair: &PeerPair,
    args: &PairsArgs,
    start_ns: u64,
    end_ns: u64,
) -> Result<(), WireError> {
    let period_ns = args.rate.map(open_loop_period_ns);
    let mut seq = 0u64;
    loop {
        if let Some(period) = period_ns {
            let due = due_ns(start_ns, seq, period);
            if due >= end_ns {
                return Ok(());
            }
            sleep_until_ns(due).await;
        } else if now_ns() >= end_ns {
            return Ok(());
        }
        pair.window
            .acquire(1)
            .await
            .map_err(|e| WireError::Protocol(format!("window: {e}")))?;
        let mut batch = 1u64;
        let now = now_ns();
        let due_count = match period_ns {
            // Only messages due inside the window: its count is what the
            // run accounts for.
            Some(period) => {
                due_before(start_ns, period, now.saturating_add(1).min(end_ns)).saturating_sub(seq)
            }
            None => u64::MAX,
        };
        while batch < due_count.min(args.window as u64) && matches!(pair.window.try_acquire(1), Ok(true)) {
            batch += 1;
        }
        let payloads: Vec<Vec<u8>> = (seq..seq + batch)
            .map(|s| {
                let intended = period_ns.map_or(now, |p| due_ns(start_ns, s, p));
                message_body(intended, s, args.payload_bytes)
            })
            .collect();
        pair.sender.publish_batch(&pair.subject, &payloads).await?;
        seq += batch;
        pair.sent.set(seq);
    }
}

struct PeerGroup {
    publisher: Rc<PeerWriter>,
    subject: String,
    members: RefCell<Vec<Rc<Stream>>>,
    sent: Cell<u64>,
    publisher_done: Cell<bool>,
}

pub async fn groups(ctx: Rc<Ctx>, args: GroupsArgs) -> ExecOutcome {
    let groups = ctx.plan.exec_share(args.groups, ctx.exec);
    let members = args.members;
    ctx.setup_done().await;
    let running: Rc<RefCell<Vec<Rc<PeerGroup>>>> = Rc::default();
    let tasks: Rc<RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let start_ns = now_ns();
    for group_no in groups.clone() {
        let subj = subject(proto(&ctx), &run_name(&ctx), &format!("g{group_no}"));
        let first_conn = group_no * members;
        let publisher = match open(&ctx, first_conn).await {
            Ok(conn) => conn,
            Err(e) => {
                ctx.fail("connecting a publisher", &e);
                continue;
            }
        };
        let fail_ctx = ctx.clone();
        let (publisher, task) = spawn_running(&ctx, publisher, "publisher", move |_| {
            fail_ctx.fail(
                "publisher",
                &WireError::Protocol("a delivery to a publisher".into()),
            );
        });
        tasks.borrow_mut().push(task);
        let group = Rc::new(PeerGroup {
            publisher,
            subject: subj,
            members: RefCell::default(),
            sent: Cell::new(0),
            publisher_done: Cell::new(false),
        });
        let (join_ctx, join_group, join_tasks) = (ctx.clone(), group.clone(), tasks.clone());
        for_each_bounded(members - 1, CONNECT_CONCURRENCY, move |i| {
            let (ctx, group, tasks) = (join_ctx.clone(), join_group.clone(), join_tasks.clone());
            async move {
                let subscribed = async {
                    let mut conn = open(&ctx, first_conn + 1 + i).await?;
                    conn.subscribe(&group.subject).await?;
                    Ok::<_, WireError>(conn)
                };
                let conn = match subscribed.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        ctx.fail("subscribing a member", &e);
                        return;
                    }
                };
                let stream = Rc::new(Stream {
                    check: RefCell::default(),
                    delivered: Cell::new(0),
                });
                let handler = on_delivery(ctx.clone(), stream.clone(), None);
                let (_, task) = spawn_running(&ctx, conn, "member", handler);
                tasks.borrow_mut().push(task);
                group.members.borrow_mut().push(stream);
            }
        })
        .await;
        running.borrow_mut().push(group);
    }
    let connect_secs = secs_between(start_ns, now_ns());
    let up = running.borrow().clone();
    let connections: u64 = up.iter().map(|g| 1 + g.members.borrow().len() as u64).sum();
    let connect_failures = ((groups.len() * members) as u64).saturating_sub(connections);
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + ctx.plan.cli.common.duration().as_nanos() as u64;
    ctx.set_window_end(end_ns);
    // The same spread as Tern's groups, so both are measured alike.
    let firsts = open_loop_starts_ns(start_ns, Some(args.rate), up.len(), ctx.slot());
    let publishers: Vec<_> = up
        .iter()
        .zip(&firsts)
        .map(|(group, &first_ns)| {
            let (ctx, group, args) = (ctx.clone(), group.clone(), args.clone());
            glommio::spawn_local(async move {
                let result = publish(&group, &args, first_ns, end_ns).await;
                group.publisher_done.set(true);
                if let Err(e) = result {
                    if !ctx.closing.get() {
                        ctx.fail("publishing", &e);
                    }
                }
            })
        })
        .collect();
    sleep_until_ns(end_ns).await;
    let all_delivered = || {
        up.iter().all(|g| {
            g.publisher_done.get()
                && g.members
                    .borrow()
                    .iter()
                    .all(|m| m.check.borrow().unique() >= g.sent.get())
        })
    };
    wait_until(ctx.plan.cli.common.drain(), all_delivered).await;
    ctx.closing.set(true);
    let close_ns = now_ns();
    let schedule = firsts.iter().copied().zip(up.iter().map(|g| g.sent.get()));
    let unsent =
        ctx.recorder
            .record_all_unsent_to(Some(args.rate), schedule, end_ns, close_ns, members as u64 - 1);

    let mut verdict = Verdict::default();
    let mut delivered = 0;
    for g in &up {
        for m in g.members.borrow().iter() {
            verdict.add(m.check.borrow().verdict(g.sent.get()));
            delivered += m.delivered.get();
        }
    }
    let outcome = finish_outcome(
        &ctx,
        ExecOutcome {
            connections,
            connect_failures,
            connect_secs,
            sent: up.iter().map(|g| g.sent.get()).sum(),
            delivered,
            delivered_in_window: ctx.in_window.get(),
            undelivered: verdict.lost,
            unsent,
            target_send_per_s: args.rate * groups.len() as f64,
            window_secs: secs_between(start_ns, end_ns),
            verdict,
            ..ExecOutcome::empty()
        },
    );
    drop(publishers);
    drop(tasks);
    outcome
}

async fn publish(group: &PeerGroup, args: &GroupsArgs, start_ns: u64, end_ns: u64) -> Result<(), WireError> {
    let period = open_loop_period_ns(args.rate);
    let mut seq = 0u64;
    loop {
        let due = due_ns(start_ns, seq, period);
        if due >= end_ns {
            return Ok(());
        }
        sleep_until_ns(due).await;
        let now = now_ns().min(end_ns.saturating_sub(1));
        let due_now = (now.saturating_sub(start_ns) / period + 1)
            .saturating_sub(seq)
            .max(1);
        let payloads: Vec<Vec<u8>> = (seq..seq + due_now)
            .map(|s| message_body(due_ns(start_ns, s, period), s, args.payload_bytes))
            .collect();
        group.publisher.publish_batch(&group.subject, &payloads).await?;
        seq += due_now;
        group.sent.set(seq);
    }
}
