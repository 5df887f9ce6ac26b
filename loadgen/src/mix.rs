//! The `mix` scenario: a realistic day from a [`Profile`], open loop.
//!
//! Each executor replays a self-contained share of the population planned
//! by [`DayPlan`]: setup registers every user (keeping ids and tokens),
//! creates the groups and joins their members over short-lived sessions;
//! then every online user holds one connection. During the measured
//! window send k is due at start + k / rate (the executor's share of the
//! profile's target rate); each picks a 1:1 stream or a group by
//! `group_share` and a body size by weight, and carries its intended send
//! time, so when the server falls behind the wait counts as latency. Every
//! receiver checks each of its streams (a partner's 1:1 conversation, each
//! group it is in) for loss, duplicates and reordering, live or — for the
//! share of offline users that logs in once sending has stopped — by the
//! `Sync` catch-up, which records no latency. Connection and delivery
//! handling come from [`crate::pairs`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use tern_proto::{ArchivedServerBody, ClientBody, Content, ConvId, GroupId, ServerBody, UserId};

use crate::cli::MixArgs;
use crate::pairs::spawn_connection;
use crate::profile::{DayPlan, Profile, Rng};
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_accounts;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    frame_failure, message_body, now_ns, open_session, parse_message_body, read_frames, sleep_until_ns,
    with_timeout, Conn, WireError, Writer,
};
use crate::worker::{finish_outcome, for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

/// Groups or members one executor sets up at once.
const SETUP_CONCURRENCY: usize = 16;

/// One sender's messages to one conversation (a 1:1 partner or a group).
struct Stream {
    sender: usize,
    conv: ConvId,
    /// The partner, for a 1:1 stream.
    to: Option<UserId>,
    sent: Cell<u64>,
}

/// What one user receives: a check per stream it expects, keyed by
/// conversation, with the stream's index and expected sender.
#[derive(Default)]
struct Inbox {
    expects: HashMap<ConvId, (usize, UserId)>,
    checks: RefCell<HashMap<ConvId, StreamCheck>>,
    synced: Cell<bool>,
    received: Cell<u64>,
}

impl Inbox {
    fn complete(&self, streams: &[Stream]) -> bool {
        let checks = self.checks.borrow();
        self.expects.iter().all(|(conv, (stream, _))| {
            let sent = streams.get(*stream).map_or(0, |s| s.sent.get());
            checks.get(conv).map_or(0, StreamCheck::unique) >= sent
        })
    }

    fn verdict(&self, streams: &[Stream]) -> Verdict {
        let checks = self.checks.borrow();
        let mut v = Verdict::default();
        for (conv, (stream, _)) in &self.expects {
            let sent = streams.get(*stream).map_or(0, |s| s.sent.get());
            match checks.get(conv) {
                Some(check) => v.add(check.verdict(sent)),
                None => v.lost += sent,
            }
        }
        v
    }
}

type Accounts = Rc<Vec<Option<crate::users::Account>>>;

pub async fn run(ctx: Rc<Ctx>, args: MixArgs) -> ExecOutcome {
    let profile = match Profile::load(&args.profile) {
        Ok(p) => p,
        Err(e) => {
            ctx.fail("loading the profile", &WireError::Protocol(e));
            // Still step through the phases the other executors wait on.
            ctx.setup_done().await;
            ctx.connected().await;
            return finish_outcome(&ctx, ExecOutcome::empty());
        }
    };
    let (slot, slots) = ctx.slot();
    let users = ctx.plan.exec_share(profile.users, ctx.exec);
    let groups = profile
        .groups
        .map(|g| crate::cli::share(g, slots, slot).len().max(1));
    let day = DayPlan::new(&profile, users.len(), groups, 0x6d69_7800 + slot as u64);
    let accounts: Accounts = Rc::new(obtain_accounts(&ctx, users.clone()).await);
    let id = |u: usize| accounts.get(u).and_then(Option::as_ref).map(|(id, _)| *id);

    // Groups: created by their owners, joined by the other members, over
    // short-lived sessions, before anyone holds a connection.
    let group_ids = create_groups(&ctx, &accounts, &day, users.start, slot).await;
    let joined = join_groups(&ctx, &accounts, &day, &group_ids, users.start).await;

    // Streams: each online user to its partner, each owner to its group.
    let mut streams = Vec::new();
    let mut inboxes: Vec<Inbox> = (0..day.users).map(|_| Inbox::default()).collect();
    for u in 0..day.online {
        let (Some(p), Some(from)) = (day.partner[u], id(u)) else {
            continue;
        };
        let Some(to) = id(p) else { continue };
        let conv = ConvId::direct(from, to);
        inboxes[p].expects.insert(conv, (streams.len(), from));
        streams.push(Stream {
            sender: u,
            conv,
            to: Some(to),
            sent: Cell::new(0),
        });
    }
    let direct_streams = streams.len();
    for (g, members) in day.groups.iter().enumerate() {
        let (Some(Some(group)), Some(owner)) = (group_ids.get(g), id(members[0])) else {
            continue;
        };
        let conv = ConvId::Group { group: *group };
        for m in joined.get(g).into_iter().flatten() {
            inboxes[*m].expects.insert(conv, (streams.len(), owner));
        }
        streams.push(Stream {
            sender: members[0],
            conv,
            to: None,
            sent: Cell::new(0),
        });
    }
    let streams = Rc::new(streams);
    let inboxes: Rc<Vec<Inbox>> = Rc::new(inboxes);
    ctx.setup_done().await;

    // Online users connect and stay.
    let writers: Rc<RefCell<Vec<Option<Rc<Writer>>>>> = Rc::new(RefCell::new(vec![None; day.online]));
    let tasks: Rc<RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let connect_start = now_ns();
    {
        let (ctx, accounts, inboxes, writers, tasks) = (
            ctx.clone(),
            accounts.clone(),
            inboxes.clone(),
            writers.clone(),
            tasks.clone(),
        );
        let first = users.start;
        for_each_bounded(day.online, CONNECT_CONCURRENCY, move |u| {
            let (ctx, accounts, inboxes, writers, tasks) = (
                ctx.clone(),
                accounts.clone(),
                inboxes.clone(),
                writers.clone(),
                tasks.clone(),
            );
            async move {
                let Some(Some((_, token))) = accounts.get(u) else {
                    return;
                };
                let common = &ctx.plan.cli.common;
                let opened = open_session(
                    common.server,
                    ctx.source(first + u),
                    token,
                    common.connect_timeout(),
                )
                .await;
                let conn = match opened {
                    Ok((conn, _)) => conn,
                    Err(e) => return ctx.fail("connecting a user", &e),
                };
                let ping = conn.limits().ping_interval();
                let (reader, writer) = conn.into_running();
                LiveCounters::add(&ctx.live().open_connections, 1);
                let handler = receive(ctx.clone(), inboxes, u, true, None);
                let task = spawn_connection(
                    ctx.clone(),
                    read_frames(reader, handler),
                    writer.clone(),
                    ping,
                    "user",
                );
                tasks.borrow_mut().push(task);
                if let Some(slot) = writers.borrow_mut().get_mut(u) {
                    *slot = Some(writer);
                }
            }
        })
        .await;
    }
    let connect_secs = secs_between(connect_start, now_ns());
    let connections = writers.borrow().iter().flatten().count() as u64;
    ctx.connected().await;

    // The measured window: open-loop sends on schedule.
    let start_ns = now_ns();
    let end_ns = start_ns + Duration::from_secs_f64(profile.duration_secs).as_nanos() as u64;
    ctx.set_window_end(end_ns);
    let writers = writers.borrow().clone();
    let sender = Sender {
        profile: &profile,
        streams: &streams,
        direct_streams,
        writers: &writers,
        next_msg_id: vec![ctx.plan.msg_id_base; day.online],
    };
    sender
        .run(&ctx, day.send_per_s, slot as u64, start_ns, end_ns)
        .await;

    let common = &ctx.plan.cli.common;
    let live_done = || (0..day.online).all(|u| inboxes[u].complete(&streams));
    wait_until(common.drain(), live_done).await;

    // The offline users who come back: token login, Sync, catch-up.
    let synced = sync_offline(&ctx, &accounts, &inboxes, &day, users.start).await;
    let sync_done = || {
        day.syncing
            .iter()
            .all(|u| inboxes[*u].synced.get() && inboxes[*u].complete(&streams))
    };
    wait_until(common.drain() + common.connect_timeout(), sync_done).await;
    ctx.closing.set(true);

    let mut verdict = Verdict::default();
    let checked = (0..day.online).chain(day.syncing.iter().copied());
    for u in checked {
        verdict.add(inboxes[u].verdict(&streams));
    }
    let synced_users = day.syncing.iter().filter(|u| inboxes[**u].synced.get()).count() as u64;
    let outcome = ExecOutcome {
        users: users.len() as u64,
        connections,
        connect_failures: (day.online as u64).saturating_sub(connections),
        connect_secs,
        sent: streams.iter().map(|s| s.sent.get()).sum(),
        delivered: inboxes.iter().map(|i| i.received.get()).sum(),
        delivered_in_window: ctx.in_window.get(),
        undelivered: verdict.lost,
        window_secs: secs_between(start_ns, end_ns),
        verdict,
        target_send_per_s: day.send_per_s,
        synced: synced_users,
        ..ExecOutcome::empty()
    };
    let outcome = finish_outcome(&ctx, outcome);
    drop(synced);
    drop(tasks);
    outcome
}

/// The open-loop send schedule of one executor.
struct Sender<'a> {
    profile: &'a Profile,
    streams: &'a [Stream],
    direct_streams: usize,
    writers: &'a [Option<Rc<Writer>>],
    /// Per online sender: its last `client_msg_id` (unique per sender and
    /// run; starts at the run's base).
    next_msg_id: Vec<u64>,
}

impl Sender<'_> {
    async fn run(mut self, ctx: &Ctx, rate: f64, seed: u64, start_ns: u64, end_ns: u64) {
        let group_streams = self.streams.len() - self.direct_streams;
        if self.streams.is_empty() || rate.is_nan() || rate <= 0.0 {
            return;
        }
        // With only one kind of stream, every send goes to it.
        let group_share = match (self.direct_streams, group_streams) {
            (0, _) => 1.0,
            (_, 0) => 0.0,
            _ => self.profile.group_share,
        };
        let payload_weights: Vec<f64> = self.profile.payload_bytes.iter().map(|p| p.weight).collect();
        let mut rng = Rng::new(seed ^ 0x5eed);
        let period_ns = 1e9 / rate;
        // Saturating (the cast saturates too): see `due_ns`.
        let due = |k: u64| start_ns.saturating_add((k as f64 * period_ns) as u64);
        let mut k = 0u64;
        while due(k) < end_ns {
            sleep_until_ns(due(k)).await;
            let now = now_ns();
            // Everything already due goes out now, one write per sender.
            let mut batches: HashMap<usize, Vec<ClientBody>> = HashMap::new();
            while due(k) <= now && due(k) < end_ns {
                let stream = if rng.unit() < group_share {
                    self.direct_streams + rng.below(group_streams)
                } else {
                    rng.below(self.direct_streams)
                };
                let bytes = self.profile.payload_bytes[rng.weighted(&payload_weights)].bytes;
                if let Some(body) = self.body(stream, due(k), bytes) {
                    let s = &self.streams[stream];
                    let batch = batches.entry(s.sender).or_default();
                    // Typing hints go ahead of the message they announce.
                    let typing = self.profile.typing_per_message;
                    let hints = typing.trunc() as usize + usize::from(rng.unit() < typing.fract());
                    batch.extend((0..hints).map(|_| ClientBody::Typing { conv: s.conv }));
                    batch.push(body);
                }
                k += 1;
            }
            for (sender, bodies) in batches {
                let Some(Some(writer)) = self.writers.get(sender) else {
                    continue;
                };
                if let Err(e) = writer.send_batch(bodies).await {
                    ctx.fail("sending", &e);
                }
            }
        }
    }

    /// The next message of `stream`, or `None` if its sender is not connected
    /// (nothing is counted as sent then).
    fn body(&mut self, stream: usize, intended_ns: u64, bytes: usize) -> Option<ClientBody> {
        let s = self.streams.get(stream)?;
        self.writers.get(s.sender)?.as_ref()?;
        let msg_id = self.next_msg_id.get_mut(s.sender)?;
        *msg_id += 1;
        let seq = s.sent.get();
        s.sent.set(seq + 1);
        let content = Content::text(message_body(intended_ns, seq, bytes));
        Some(match s.to {
            Some(to) => ClientBody::SendDirect {
                to,
                client_msg_id: *msg_id,
                content,
            },
            None => ClientBody::SendGroup {
                group: match s.conv {
                    ConvId::Group { group } => group,
                    ConvId::Direct { .. } => return None,
                },
                client_msg_id: *msg_id,
                content,
            },
        })
    }
}

/// Creates every group of `day` with its owner's token; `None` where that
/// failed (counted).
async fn create_groups(
    ctx: &Rc<Ctx>,
    accounts: &Accounts,
    day: &DayPlan,
    first_user: usize,
    slot: usize,
) -> Vec<Option<GroupId>> {
    let ids: Rc<RefCell<Vec<Option<GroupId>>>> = Rc::new(RefCell::new(vec![None; day.groups.len()]));
    let owners: Rc<Vec<usize>> = Rc::new(day.groups.iter().map(|m| m[0]).collect());
    let (task_ctx, task_accounts, task_ids) = (ctx.clone(), accounts.clone(), ids.clone());
    for_each_bounded(owners.len(), SETUP_CONCURRENCY, move |g| {
        let (ctx, accounts, ids, owners) = (
            task_ctx.clone(),
            task_accounts.clone(),
            task_ids.clone(),
            owners.clone(),
        );
        async move {
            let Some(Some((_, token))) = owners.get(g).and_then(|o| accounts.get(*o)) else {
                return;
            };
            let owner = owners.get(g).copied().unwrap_or_default();
            let name = format!("{}m{slot}_{g}", ctx.plan.prefix);
            let created = short_session(&ctx, first_user + owner, token, |mut conn| async move {
                match conn.request(ClientBody::GroupCreate { name }).await? {
                    ServerBody::GroupCreated { group } => Ok(group),
                    other => Err(WireError::Protocol(format!(
                        "expected GroupCreated, got {other:?}"
                    ))),
                }
            })
            .await;
            match created {
                Ok(group) => {
                    if let Some(slot) = ids.borrow_mut().get_mut(g) {
                        *slot = Some(group);
                    }
                }
                Err(e) => ctx.fail("creating a group", &e),
            }
        }
    })
    .await;
    Rc::try_unwrap(ids).map_or_else(|rc| rc.borrow().clone(), RefCell::into_inner)
}

/// Joins every non-owner member to its groups, one short session per user;
/// returns, per group, the members that joined (the receivers).
async fn join_groups(
    ctx: &Rc<Ctx>,
    accounts: &Accounts,
    day: &DayPlan,
    group_ids: &[Option<GroupId>],
    first_user: usize,
) -> Vec<Vec<usize>> {
    let mut memberships: Vec<Vec<(usize, GroupId)>> = vec![Vec::new(); day.users];
    for (g, members) in day.groups.iter().enumerate() {
        let Some(Some(group)) = group_ids.get(g) else {
            continue;
        };
        for m in &members[1..] {
            memberships[*m].push((g, *group));
        }
    }
    let memberships = Rc::new(memberships);
    let joined: Rc<RefCell<Vec<Vec<usize>>>> = Rc::new(RefCell::new(vec![Vec::new(); day.groups.len()]));
    let (task_ctx, task_accounts, task_joined, task_memberships) =
        (ctx.clone(), accounts.clone(), joined.clone(), memberships.clone());
    for_each_bounded(day.users, SETUP_CONCURRENCY, move |u| {
        let (ctx, accounts, joined, memberships) = (
            task_ctx.clone(),
            task_accounts.clone(),
            task_joined.clone(),
            task_memberships.clone(),
        );
        async move {
            let groups = memberships.get(u).cloned().unwrap_or_default();
            let Some(Some((_, token))) = accounts.get(u) else {
                return;
            };
            if groups.is_empty() {
                return;
            }
            let result = short_session(&ctx, first_user + u, token, |mut conn| async move {
                let mut done = Vec::new();
                for (g, group) in groups {
                    match conn.request(ClientBody::GroupJoin { group }).await? {
                        ServerBody::Ok => done.push(g),
                        other => {
                            return Err(WireError::Protocol(format!(
                                "expected Ok to GroupJoin, got {other:?}"
                            )))
                        }
                    }
                }
                Ok(done)
            })
            .await;
            match result {
                Ok(done) => {
                    let mut joined = joined.borrow_mut();
                    for g in done {
                        if let Some(members) = joined.get_mut(g) {
                            members.push(u);
                        }
                    }
                }
                Err(e) => ctx.fail("joining groups", &e),
            }
        }
    })
    .await;
    Rc::try_unwrap(joined).map_or_else(|rc| rc.borrow().clone(), RefCell::into_inner)
}

/// Logs user `user_no` in with `token` on a connection of its own, runs
/// `work` on it, and closes it.
async fn short_session<T, F, Fut>(ctx: &Ctx, user_no: usize, token: &[u8], work: F) -> Result<T, WireError>
where
    F: FnOnce(Conn) -> Fut,
    Fut: std::future::Future<Output = Result<T, WireError>>,
{
    let common = &ctx.plan.cli.common;
    let attempt = async {
        let mut conn = Conn::open(common.server, ctx.source(user_no)).await?;
        conn.login_token(token).await?;
        work(conn).await
    };
    with_timeout(common.connect_timeout(), attempt).await
}

/// A frame handler for user `u`'s connection: deliveries are checked
/// against the user's expected streams; live ones (`live`) record latency
/// from the intended send time and count toward the measured window; the
/// `SyncDone` answering `sync_id` marks a catch-up complete.
fn receive(
    ctx: Rc<Ctx>,
    inboxes: Rc<Vec<Inbox>>,
    u: usize,
    live: bool,
    sync_id: Option<Rc<Cell<u64>>>,
) -> impl FnMut(&tern_proto::ArchivedServerFrame) -> Result<(), WireError> {
    move |frame| {
        let Some(inbox) = inboxes.get(u) else {
            return Ok(());
        };
        match &frame.body {
            ArchivedServerBody::Message(msg) if !ctx.plan.sent_by_this_run(msg.client_msg_id.to_native()) => {
            }
            ArchivedServerBody::Message(msg) => {
                let now = now_ns();
                let conv = msg.conv.to_native();
                let parsed = parse_message_body(msg.content.body.as_slice());
                let expected = inbox.expects.get(&conv);
                let (Some((intended_ns, seq)), Some((_, from))) = (parsed, expected) else {
                    ctx.fail(
                        "delivery",
                        &WireError::Protocol("a message on no stream of ours".into()),
                    );
                    return Ok(());
                };
                if msg.from.to_native() != *from {
                    ctx.fail(
                        "delivery",
                        &WireError::Protocol("a message from a stranger".into()),
                    );
                    return Ok(());
                }
                inbox.checks.borrow_mut().entry(conv).or_default().observe(seq);
                inbox.received.set(inbox.received.get() + 1);
                LiveCounters::add(&ctx.live().delivered, 1);
                if live {
                    ctx.recorder.record_ns(now.saturating_sub(intended_ns));
                    ctx.count_delivery_in_window(now);
                }
            }
            ArchivedServerBody::SyncDone { .. }
                if sync_id
                    .as_ref()
                    .is_some_and(|id| id.get() == frame.request_id.to_native()) =>
            {
                inbox.synced.set(true);
            }
            _ => {
                if let Some(failure) = frame_failure(frame) {
                    if matches!(frame.body, ArchivedServerBody::Disconnect { .. }) {
                        return Err(failure);
                    }
                    ctx.fail("a user got an error", &failure);
                }
            }
        }
        Ok(())
    }
}

/// Brings `day.syncing` online: token login, then `Sync` with no cursors;
/// returns the tasks reading their catch-up.
async fn sync_offline(
    ctx: &Rc<Ctx>,
    accounts: &Accounts,
    inboxes: &Rc<Vec<Inbox>>,
    day: &DayPlan,
    first_user: usize,
) -> Vec<glommio::Task<()>> {
    let tasks: Rc<RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let syncing = Rc::new(day.syncing.clone());
    let (task_ctx, task_accounts, task_inboxes, task_tasks) =
        (ctx.clone(), accounts.clone(), inboxes.clone(), tasks.clone());
    for_each_bounded(syncing.len(), CONNECT_CONCURRENCY, move |i| {
        let (ctx, accounts, inboxes, tasks, syncing) = (
            task_ctx.clone(),
            task_accounts.clone(),
            task_inboxes.clone(),
            task_tasks.clone(),
            syncing.clone(),
        );
        async move {
            let Some(&u) = syncing.get(i) else { return };
            let Some(Some((_, token))) = accounts.get(u) else {
                return;
            };
            let common = &ctx.plan.cli.common;
            let login = async {
                let mut conn = Conn::open(common.server, ctx.source(first_user + u)).await?;
                conn.login_token(token).await?;
                Ok(conn)
            };
            let conn = match with_timeout(common.connect_timeout(), login).await {
                Ok(conn) => conn,
                Err(e) => return ctx.fail("bringing an offline user online", &e),
            };
            let ping = conn.limits().ping_interval();
            let (reader, writer) = conn.into_running();
            LiveCounters::add(&ctx.live().open_connections, 1);
            // The handler learns the Sync's request id once it is sent; the
            // SyncDone cannot arrive before that.
            let sync_id = Rc::new(Cell::new(u64::MAX));
            let handler = receive(ctx.clone(), inboxes, u, false, Some(sync_id.clone()));
            let task = spawn_connection(
                ctx.clone(),
                read_frames(reader, handler),
                writer.clone(),
                ping,
                "syncing user",
            );
            tasks.borrow_mut().push(task);
            match writer.send(ClientBody::Sync { cursors: Vec::new() }).await {
                Ok(id) => sync_id.set(id),
                Err(e) => ctx.fail("syncing", &e),
            }
        }
    })
    .await;
    Rc::try_unwrap(tasks).map_or_else(|rc| rc.borrow_mut().drain(..).collect(), RefCell::into_inner)
}
