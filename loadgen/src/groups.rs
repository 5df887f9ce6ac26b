//! The `groups` scenario: G groups of M members, one publisher per group.
//!
//! Member 0 of each group creates it and publishes; members 1..M join it
//! and receive. Everything of one group lives on one executor. The
//! publisher runs open loop at `--rate` messages per second: message k of
//! group g is due at start + (k + g/G)/rate (the G publishers spread over
//! one period as `pairs` spreads its senders: publishers in step would
//! measure their own burst) and carries that intended time; every member
//! records its latency from it, so a slow fan-out shows up as latency and,
//! past the drain time, as undelivered messages (expected deliveries =
//! messages sent × members that joined, the publisher's own session
//! excluded: the server echoes only to a sender's *other* sessions).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tern_proto::{ArchivedServerBody, ClientBody, Content, GroupId, ServerBody};

use crate::cli::GroupsArgs;
use crate::pairs::{deliveries_from, spawn_connection};
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_tokens;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    due_ns, frame_failure, message_body, now_ns, open_loop_period_ns, open_loop_starts_ns, open_session,
    read_frames, sleep_until_ns, WireError, Writer,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

/// Groups one executor sets up at once (each then joins members in parallel).
const GROUP_CONCURRENCY: usize = 4;

/// One running group.
struct Group {
    publisher: Rc<Writer>,
    id: GroupId,
    receivers: Cell<u64>,
    sent: Cell<u64>,
    delivered: Cell<u64>,
    /// One check per joined member.
    checks: RefCell<Vec<Rc<RefCell<StreamCheck>>>>,
    publisher_done: Cell<bool>,
}

type Tasks = Rc<RefCell<Vec<glommio::Task<()>>>>;

pub async fn run(ctx: Rc<Ctx>, args: GroupsArgs) -> ExecOutcome {
    let groups = ctx.plan.exec_share(args.groups, ctx.exec);
    let members = args.members;
    let users = groups.start * members..groups.end * members;
    let tokens = Rc::new(obtain_tokens(&ctx, users.clone()).await);
    ctx.setup_done().await;

    let running: Rc<RefCell<Vec<Rc<Group>>>> = Rc::default();
    let tasks: Tasks = Rc::default();
    let start_ns = now_ns();
    {
        let (ctx, tokens, running, tasks) = (ctx.clone(), tokens.clone(), running.clone(), tasks.clone());
        let first_group = groups.start;
        for_each_bounded(groups.len(), GROUP_CONCURRENCY, move |i| {
            let (ctx, tokens, running, tasks) = (ctx.clone(), tokens.clone(), running.clone(), tasks.clone());
            async move {
                if let Some(group) =
                    connect_group(&ctx, &tokens, first_group + i, i * members, members, &tasks).await
                {
                    running.borrow_mut().push(group);
                }
            }
        })
        .await;
    }
    let connect_secs = secs_between(start_ns, now_ns());
    let groups_up = running.borrow().clone();
    let connections = groups_up.iter().map(|g| 1 + g.receivers.get()).sum::<u64>();
    let connect_failures = ((groups.len() * members) as u64).saturating_sub(connections);
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + ctx.plan.cli.common.duration().as_nanos() as u64;
    ctx.set_window_end(end_ns);
    let starts = open_loop_starts_ns(start_ns, Some(args.rate), groups_up.len(), ctx.slot());
    let publishers: Vec<_> = groups_up
        .iter()
        .zip(starts.iter().copied())
        .map(|(group, first_due_ns)| {
            let (ctx, group, args) = (ctx.clone(), group.clone(), args.clone());
            glommio::spawn_local(async move {
                let result = publish(&group, &args, first_due_ns, end_ns).await;
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
        groups_up.iter().all(|g| {
            g.publisher_done.get()
                && g.checks
                    .borrow()
                    .iter()
                    .all(|c| c.borrow().unique() >= g.sent.get())
        })
    };
    wait_until(ctx.plan.cli.common.drain(), all_delivered).await;
    ctx.closing.set(true);
    let close_ns = now_ns();
    let schedule = starts.iter().copied().zip(groups_up.iter().map(|g| g.sent.get()));
    let unsent = ctx
        .recorder
        .record_all_unsent(Some(args.rate), schedule, end_ns, close_ns);

    let mut verdict = Verdict::default();
    for g in &groups_up {
        for c in g.checks.borrow().iter() {
            verdict.add(c.borrow().verdict(g.sent.get()));
        }
    }
    let outcome = ExecOutcome {
        users: users.len() as u64,
        connections,
        connect_failures,
        connect_secs,
        sent: groups_up.iter().map(|g| g.sent.get()).sum(),
        delivered: groups_up.iter().map(|g| g.delivered.get()).sum(),
        delivered_in_window: ctx.in_window.get(),
        undelivered: verdict.lost,
        unsent,
        target_send_per_s: args.rate * groups.len() as f64,
        window_secs: secs_between(start_ns, end_ns),
        verdict,
        ..ExecOutcome::empty()
    };
    let outcome = finish_outcome(&ctx, outcome);
    drop(publishers);
    drop(tasks);
    outcome
}

/// Creates group `group_no` with its owner (token at `first_token`), joins
/// the other members, and starts every connection's reader. `None` when the
/// owner could not set the group up (counted).
async fn connect_group(
    ctx: &Rc<Ctx>,
    tokens: &Rc<Vec<Option<Vec<u8>>>>,
    group_no: usize,
    first_token: usize,
    members: usize,
    tasks: &Tasks,
) -> Option<Rc<Group>> {
    let common = &ctx.plan.cli.common;
    let owner_no = group_no * members;
    let Some(Some(owner_token)) = tokens.get(first_token) else {
        return None;
    };
    let created = async {
        let (mut conn, owner) = open_session(
            common.server,
            ctx.source(owner_no),
            owner_token,
            common.connect_timeout(),
        )
        .await?;
        let name = format!("{}g{group_no}", ctx.plan.prefix);
        match conn.request(ClientBody::GroupCreate { name }).await? {
            ServerBody::GroupCreated { group } => Ok((conn, owner, group)),
            other => Err(WireError::Protocol(format!(
                "expected GroupCreated, got {other:?}"
            ))),
        }
    };
    let (owner_conn, owner, id) = match created.await {
        Ok(created) => created,
        Err(e) => {
            ctx.fail("creating a group", &e);
            return None;
        }
    };
    let ping = owner_conn.limits().ping_interval();
    let (acks_reader, publisher) = owner_conn.into_running();
    LiveCounters::add(&ctx.live().open_connections, 1);
    let ack_ctx = ctx.clone();
    let acks = read_frames(acks_reader, move |frame| {
        match (&frame.body, frame_failure(frame)) {
            (ArchivedServerBody::Disconnect { .. }, Some(failure)) => return Err(failure),
            (_, Some(failure)) => ack_ctx.fail("a group send was refused", &failure),
            _ => {}
        }
        Ok(())
    });
    tasks.borrow_mut().push(spawn_connection(
        ctx.clone(),
        acks,
        publisher.clone(),
        ping,
        "publisher",
    ));
    let group = Rc::new(Group {
        publisher,
        id,
        receivers: Cell::new(0),
        sent: Cell::new(0),
        delivered: Cell::new(0),
        checks: RefCell::default(),
        publisher_done: Cell::new(false),
    });

    let (join_ctx, join_tokens, join_group, join_tasks) =
        (ctx.clone(), tokens.clone(), group.clone(), tasks.clone());
    for_each_bounded(members - 1, CONNECT_CONCURRENCY, move |i| {
        let (ctx, tokens, group, tasks) = (
            join_ctx.clone(),
            join_tokens.clone(),
            join_group.clone(),
            join_tasks.clone(),
        );
        async move {
            let member = i + 1;
            let Some(Some(token)) = tokens.get(first_token + member) else {
                return;
            };
            let common = &ctx.plan.cli.common;
            let joined = async {
                let (mut conn, _user) = open_session(
                    common.server,
                    ctx.source(owner_no + member),
                    token,
                    common.connect_timeout(),
                )
                .await?;
                match conn.request(ClientBody::GroupJoin { group: group.id }).await? {
                    ServerBody::Ok => Ok(conn),
                    other => Err(WireError::Protocol(format!(
                        "expected Ok to GroupJoin, got {other:?}"
                    ))),
                }
            };
            let conn = match joined.await {
                Ok(conn) => conn,
                Err(e) => {
                    ctx.fail("joining a group", &e);
                    return;
                }
            };
            let ping = conn.limits().ping_interval();
            let (reader, writer) = conn.into_running();
            LiveCounters::add(&ctx.live().open_connections, 1);
            group.receivers.set(group.receivers.get() + 1);
            let counted = group.clone();
            let check: Rc<RefCell<StreamCheck>> = Rc::default();
            group.checks.borrow_mut().push(check.clone());
            let on_delivery = deliveries_from(ctx.clone(), owner, check, move || {
                counted.delivered.set(counted.delivered.get() + 1);
            });
            let reading = read_frames(reader, on_delivery);
            tasks
                .borrow_mut()
                .push(spawn_connection(ctx.clone(), reading, writer, ping, "member"));
        }
    })
    .await;
    Some(group)
}

/// Publishes at `args.rate` until `end_ns`; messages already due when the
/// publisher gets to run go out in one write.
async fn publish(group: &Group, args: &GroupsArgs, start_ns: u64, end_ns: u64) -> Result<(), WireError> {
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
        let bodies: Vec<_> = (seq..seq + due_now)
            .map(|s| ClientBody::SendGroup {
                group: group.id,
                client_msg_id: s + 1,
                content: Content::text(message_body(due_ns(start_ns, s, period), s, args.payload_bytes)),
            })
            .collect();
        group.publisher.send_batch(bodies).await?;
        seq += due_now;
        group.sent.set(seq);
    }
}
