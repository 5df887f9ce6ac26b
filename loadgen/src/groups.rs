//! The `groups` scenario: G groups of M members, one publisher per group.
//!
//! Member 0 of each group creates it and publishes; members 1..M join it
//! and receive. Everything of one group lives on one executor, unless
//! `--spread-members` spreads each group's members over every executor of
//! the process (they learn the group's id and its publisher's progress
//! through [`SharedGroups`]), so that one core reading a big group's
//! sockets does not bound what the run measures. The
//! publisher runs open loop at `--rate` messages per second: message k of
//! group g is due at start + (k + g/G)/rate (the G publishers spread over
//! one period as `pairs` spreads its senders: publishers in step would
//! measure their own burst) and carries that intended time; every member
//! records its latency from it, so a slow fan-out shows up as latency and,
//! past the drain time, as undelivered messages (expected deliveries =
//! messages sent × members that joined, the publisher's own session
//! excluded: the server echoes only to a sender's *other* sessions).

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use tern_proto::{ArchivedServerBody, ClientBody, Content, GroupId, ServerBody, UserId};

use crate::cli::{share, sub_share, GroupsArgs, Scenario};
use crate::pairs::{deliveries_from, spawn_connection};
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_accounts_of;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    due_ns, frame_failure, message_body, now_ns, open_loop_period_ns, open_loop_starts_ns, open_session,
    read_frames, sleep_until_ns, WireError, Writer,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

/// Groups one executor sets up at once (each then joins members in parallel).
const GROUP_CONCURRENCY: usize = 4;

/// [`SharedGroup::state`] once the group exists (it starts at 0: not yet)
/// or its owner could not create it.
const CREATED: u8 = 1;
const FAILED: u8 = 2;

/// What the executors of one process know of a group: its owner's
/// executor creates it and publishes to it; whichever executors hold its
/// members (the owner's alone, or all of them with `--spread-members`)
/// join once it exists and count deliveries against `sent`.
#[derive(Default)]
pub struct SharedGroup {
    state: AtomicU8,
    id: AtomicU64,
    owner: AtomicU64,
    sent: AtomicU64,
    publisher_done: AtomicBool,
}

/// One [`SharedGroup`] per group of this process, by its number in the
/// process's share of `--groups`.
#[derive(Default)]
pub struct SharedGroups {
    first: usize,
    groups: Vec<SharedGroup>,
}

impl SharedGroups {
    /// The groups `scenario` gives worker `child` of `procs` (none but for
    /// `groups`).
    pub fn for_scenario(scenario: &Scenario, procs: usize, child: usize) -> SharedGroups {
        let Scenario::Groups(args) = scenario else {
            return SharedGroups::default();
        };
        let mine = share(args.groups, procs, child);
        SharedGroups {
            first: mine.start,
            groups: mine.map(|_| SharedGroup::default()).collect(),
        }
    }

    fn get(&self, group_no: usize) -> Option<&SharedGroup> {
        self.groups.get(group_no.checked_sub(self.first)?)
    }

    fn numbers(&self) -> Range<usize> {
        self.first..self.first + self.groups.len()
    }
}

/// A group this executor created and publishes to.
struct Publisher {
    group_no: usize,
    writer: Rc<Writer>,
    id: GroupId,
}

/// The members of one group whose sockets this executor reads.
struct Audience {
    group_no: usize,
    receivers: Cell<u64>,
    delivered: Cell<u64>,
    /// One check per joined member.
    checks: RefCell<Vec<Rc<RefCell<StreamCheck>>>>,
}

type Tasks = Rc<RefCell<Vec<glommio::Task<()>>>>;
type Tokens = Rc<HashMap<usize, Vec<u8>>>;

pub async fn run(ctx: Rc<Ctx>, args: GroupsArgs) -> ExecOutcome {
    let shared = &ctx.plan.groups;
    let owned = ctx.plan.exec_share(args.groups, ctx.exec);
    let members = args.members;
    let threads = ctx.plan.cli.common.threads;
    let audience_of = |group_no: usize| {
        let spread = args.spread_members.then_some((threads, ctx.exec));
        audience(group_no, members, &owned, spread)
    };
    // The user numbers to log in: owners first.
    let numbers: Vec<usize> = if args.spread_members {
        let owners = owned.clone().map(|g| g * members);
        owners.chain(shared.numbers().flat_map(audience_of)).collect()
    } else {
        (owned.start * members..owned.end * members).collect()
    };
    let users = numbers.len();
    let accounts = obtain_accounts_of(&ctx, numbers.clone()).await;
    let tokens: Tokens = Rc::new(
        numbers
            .into_iter()
            .zip(accounts)
            .filter_map(|(n, account)| Some((n, account?.1)))
            .collect(),
    );
    ctx.setup_done().await;

    let publishers: Rc<RefCell<Vec<Rc<Publisher>>>> = Rc::default();
    let tasks: Tasks = Rc::default();
    let sent_to = |group_no: usize| shared.get(group_no).map_or(0, |s| s.sent.load(Ordering::SeqCst));
    let start_ns = now_ns();
    {
        let (ctx, tokens, publishers, tasks) =
            (ctx.clone(), tokens.clone(), publishers.clone(), tasks.clone());
        let first_group = owned.start;
        for_each_bounded(owned.len(), GROUP_CONCURRENCY, move |i| {
            let (ctx, tokens, publishers, tasks) =
                (ctx.clone(), tokens.clone(), publishers.clone(), tasks.clone());
            async move {
                let group_no = first_group + i;
                let created = create_group(&ctx, &tokens, group_no, members, &tasks).await;
                let Some(slot) = ctx.plan.groups.get(group_no) else {
                    return;
                };
                match created {
                    Some((publisher, owner)) => {
                        slot.id.store(publisher.id, Ordering::SeqCst);
                        slot.owner.store(owner, Ordering::SeqCst);
                        slot.state.store(CREATED, Ordering::SeqCst);
                        publishers.borrow_mut().push(publisher);
                    }
                    None => slot.state.store(FAILED, Ordering::SeqCst),
                }
            }
        })
        .await;
    }
    // Join this executor's members of each group, a few groups at once.
    let to_join: Vec<(usize, Range<usize>)> = shared
        .numbers()
        .map(|g| (g, audience_of(g)))
        .filter(|(_, range)| !range.is_empty())
        .collect();
    let expected_receivers: u64 = to_join.iter().map(|(_, range)| range.len() as u64).sum();
    let joined: Rc<RefCell<Vec<Rc<Audience>>>> = Rc::default();
    {
        let (ctx, tokens, tasks, joined) = (ctx.clone(), tokens.clone(), tasks.clone(), joined.clone());
        let to_join = Rc::new(to_join);
        for_each_bounded(to_join.len(), GROUP_CONCURRENCY, move |i| {
            let (ctx, tokens, tasks, joined) = (ctx.clone(), tokens.clone(), tasks.clone(), joined.clone());
            let job = to_join.get(i).cloned();
            async move {
                let Some((group_no, range)) = job else {
                    return;
                };
                let Some((id, owner)) = created_group(&ctx, group_no).await else {
                    return;
                };
                let audience = join_members(&ctx, &tokens, group_no, id, owner, range, &tasks).await;
                joined.borrow_mut().push(audience);
            }
        })
        .await;
    }
    let audiences = joined.borrow().clone();
    let connect_secs = secs_between(start_ns, now_ns());
    let publishers = publishers.borrow().clone();
    let connections = publishers.len() as u64 + audiences.iter().map(|a| a.receivers.get()).sum::<u64>();
    let connect_failures = (owned.len() as u64 + expected_receivers).saturating_sub(connections);
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + ctx.plan.cli.common.duration().as_nanos() as u64;
    ctx.set_window_end(end_ns);
    let starts = open_loop_starts_ns(start_ns, Some(args.rate), publishers.len(), ctx.slot());
    let publishing: Vec<_> = publishers
        .iter()
        .zip(starts.iter().copied())
        .map(|(publisher, first_due_ns)| {
            let (ctx, publisher, args) = (ctx.clone(), publisher.clone(), args.clone());
            glommio::spawn_local(async move {
                let result = publish(&ctx, &publisher, &args, first_due_ns, end_ns).await;
                if let Some(slot) = ctx.plan.groups.get(publisher.group_no) {
                    slot.publisher_done.store(true, Ordering::SeqCst);
                }
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
        audiences.iter().all(|a| {
            shared
                .get(a.group_no)
                .is_some_and(|s| s.publisher_done.load(Ordering::SeqCst))
                && a.checks
                    .borrow()
                    .iter()
                    .all(|c| c.borrow().unique() >= sent_to(a.group_no))
        }) && publishers.iter().all(|p| {
            shared
                .get(p.group_no)
                .is_some_and(|s| s.publisher_done.load(Ordering::SeqCst))
        })
    };
    wait_until(ctx.plan.cli.common.drain(), all_delivered).await;
    ctx.closing.set(true);
    let close_ns = now_ns();
    let schedule = starts
        .iter()
        .copied()
        .zip(publishers.iter().map(|p| sent_to(p.group_no)));
    // Every member but the publisher gets each message, whichever
    // executor reads it: an unsent one is late for each of them.
    let deliveries_per_message = args.members.saturating_sub(1) as u64;
    let unsent = ctx.recorder.record_all_unsent_to(
        Some(args.rate),
        schedule,
        end_ns,
        close_ns,
        deliveries_per_message,
    );

    let mut verdict = Verdict::default();
    for a in &audiences {
        for c in a.checks.borrow().iter() {
            verdict.add(c.borrow().verdict(sent_to(a.group_no)));
        }
    }
    let outcome = ExecOutcome {
        users: users as u64,
        connections,
        connect_failures,
        connect_secs,
        sent: publishers.iter().map(|p| sent_to(p.group_no)).sum(),
        delivered: audiences.iter().map(|a| a.delivered.get()).sum(),
        delivered_in_window: ctx.in_window.get(),
        undelivered: verdict.lost,
        unsent,
        target_send_per_s: args.rate * owned.len() as f64,
        window_secs: secs_between(start_ns, end_ns),
        verdict,
        ..ExecOutcome::empty()
    };
    let outcome = finish_outcome(&ctx, outcome);
    drop(publishing);
    drop(tasks);
    outcome
}

/// The members of group `group_no` (user numbers; its owner, the first,
/// publishes) whose sockets an executor reads: all of its own groups'
/// (`owned`), or with `spread` = (executors, this one) its share of every
/// group's.
fn audience(
    group_no: usize,
    members: usize,
    owned: &Range<usize>,
    spread: Option<(usize, usize)>,
) -> Range<usize> {
    let all = group_no * members + 1..(group_no + 1) * members;
    match spread {
        Some((executors, exec)) => sub_share(&all, executors, exec),
        None if owned.contains(&group_no) => all,
        None => 0..0,
    }
}

/// Waits until group `group_no`'s owner (on this executor or another) has
/// created it: its id and owner, or `None` if that failed or took longer
/// than the connect timeout allows.
async fn created_group(ctx: &Ctx, group_no: usize) -> Option<(GroupId, UserId)> {
    let slot = ctx.plan.groups.get(group_no)?;
    // Creating is two round trips after connecting: a few connect timeouts.
    let deadline = Instant::now() + ctx.plan.cli.common.connect_timeout() * 4;
    loop {
        match slot.state.load(Ordering::SeqCst) {
            CREATED => return Some((slot.id.load(Ordering::SeqCst), slot.owner.load(Ordering::SeqCst))),
            FAILED => return None,
            _ if Instant::now() >= deadline => {
                ctx.fail(
                    "waiting for a group to be created",
                    &WireError::Protocol(format!("group {group_no} was not created in time")),
                );
                return None;
            }
            _ => glommio::timer::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Creates group `group_no` with its owner (user `group_no * members`) and
/// starts the owner's reader. `None` when the owner could not set the
/// group up (counted).
async fn create_group(
    ctx: &Rc<Ctx>,
    tokens: &Tokens,
    group_no: usize,
    members: usize,
    tasks: &Tasks,
) -> Option<(Rc<Publisher>, UserId)> {
    let common = &ctx.plan.cli.common;
    let owner_no = group_no * members;
    let owner_token = tokens.get(&owner_no)?;
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
    let (acks_reader, writer) = owner_conn.into_running();
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
        writer.clone(),
        ping,
        "publisher",
    ));
    let publisher = Rc::new(Publisher { group_no, writer, id });
    Some((publisher, owner))
}

/// Joins users `range` (members of group `group_no`, by user number) to
/// the group and starts their readers.
async fn join_members(
    ctx: &Rc<Ctx>,
    tokens: &Tokens,
    group_no: usize,
    id: GroupId,
    owner: UserId,
    range: Range<usize>,
    tasks: &Tasks,
) -> Rc<Audience> {
    let audience = Rc::new(Audience {
        group_no,
        receivers: Cell::new(0),
        delivered: Cell::new(0),
        checks: RefCell::default(),
    });
    let (join_ctx, join_tokens, join_audience, join_tasks) =
        (ctx.clone(), tokens.clone(), audience.clone(), tasks.clone());
    let first = range.start;
    for_each_bounded(range.len(), CONNECT_CONCURRENCY, move |i| {
        let (ctx, tokens, audience, tasks) = (
            join_ctx.clone(),
            join_tokens.clone(),
            join_audience.clone(),
            join_tasks.clone(),
        );
        async move {
            let user_no = first + i;
            let Some(token) = tokens.get(&user_no) else {
                return;
            };
            let common = &ctx.plan.cli.common;
            let joined = async {
                let (mut conn, _user) = open_session(
                    common.server,
                    ctx.source(user_no),
                    token,
                    common.connect_timeout(),
                )
                .await?;
                match conn.request(ClientBody::GroupJoin { group: id }).await? {
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
            audience.receivers.set(audience.receivers.get() + 1);
            let counted = audience.clone();
            let check: Rc<RefCell<StreamCheck>> = Rc::default();
            audience.checks.borrow_mut().push(check.clone());
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
    audience
}

/// Publishes at `args.rate` until `end_ns`; messages already due when the
/// publisher gets to run go out in one write. Progress goes to the group's
/// [`SharedGroup`], which every executor reading its members counts against.
async fn publish(
    ctx: &Ctx,
    publisher: &Publisher,
    args: &GroupsArgs,
    start_ns: u64,
    end_ns: u64,
) -> Result<(), WireError> {
    let period = open_loop_period_ns(args.rate);
    let slot = ctx.plan.groups.get(publisher.group_no);
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
                group: publisher.id,
                client_msg_id: ctx.plan.msg_id_base + s + 1,
                content: Content::text(message_body(due_ns(start_ns, s, period), s, args.payload_bytes)),
            })
            .collect();
        publisher.writer.send_batch(bodies).await?;
        seq += due_now;
        if let Some(slot) = slot {
            slot.sent.store(seq, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_members_share_every_group_and_together_keep_their_executor() {
        // Two groups of 7 (users 0..7 and 7..14), three executors; executor
        // 0 owns group 0, executor 1 group 1, executor 2 none.
        let owned = [0..1, 1..2, 2..2];
        let together: Vec<_> = (0..3)
            .map(|e| [audience(0, 7, &owned[e], None), audience(1, 7, &owned[e], None)])
            .collect();
        assert_eq!(together, [[1..7, 0..0], [0..0, 8..14], [0..0, 0..0]]);
        let spread: Vec<_> = (0..3)
            .map(|e| {
                [
                    audience(0, 7, &owned[e], Some((3, e))),
                    audience(1, 7, &owned[e], Some((3, e))),
                ]
            })
            .collect();
        assert_eq!(spread, [[1..3, 8..10], [3..5, 10..12], [5..7, 12..14]]);
    }
}
