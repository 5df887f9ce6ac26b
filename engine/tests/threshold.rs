//! A group crossing the write-diffusion threshold up and down, over real
//! sockets and a real store: small groups copy each message into the
//! members' inboxes, large ones are read from the group history, and
//! members join and leave so that the group crosses the line again and
//! again while messages are sent, members are offline or catching up, a
//! second device syncs and the server restarts. Every member must get
//! every message of their membership exactly once, in order, with no gap,
//! read raw so the client library's dedup cannot hide a duplicate. The
//! last test does it against the real `ternd` binary killed with SIGKILL.
//! `TERN_THRESHOLD_SEED` repeats a run.

mod common;
mod durable_common;
mod ternd_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestServer, User, PASSWORD};
use durable_common::{raw_sync, summarize};
use tern_client::{
    Client, ClientBody, ClientOptions, ConvId, Cursor, ErrorCode, GroupId, ReceiptKind, ServerBody,
    ServerFrame,
};
use ternd_common::{env_or, Ternd};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one user's devices were sent of the group, raw.
#[derive(Default)]
struct Seen {
    /// seq -> times any session of the user was sent it after presenting
    /// a cursor below it.
    times: BTreeMap<u64, u32>,
    /// The highest seq held, presented as the cursor of the next `Sync`.
    cursor: u64,
    problems: Vec<String>,
}

impl Seen {
    fn take(&mut self, who: &str, conv: ConvId, frame: ServerFrame, session_last: &mut u64) {
        if let ServerBody::Disconnect { code, message, .. } = &frame.body {
            eprintln!("{who}: disconnected: {code:?}: {message}");
        }
        let ServerBody::Message(m) = frame.body else {
            return;
        };
        if m.conv != conv {
            return;
        }
        if m.seq <= *session_last {
            self.problems.push(format!(
                "{who}: seq {} after seq {} in one session",
                m.seq, *session_last
            ));
        }
        *session_last = m.seq;
        *self.times.entry(m.seq).or_default() += 1;
        self.cursor = self.cursor.max(m.seq);
    }
}

/// One user's connection, reading raw.
struct Reader {
    name: &'static str,
    user: User,
    client: Option<Client>,
    session_last: u64,
    seen: Seen,
}

impl Reader {
    fn new(name: &'static str, user: User) -> Reader {
        Reader {
            name,
            user,
            client: None,
            session_last: 0,
            seen: Seen::default(),
        }
    }

    /// Logs in and syncs with the cursor held.
    fn connect(&mut self, server: &TestServer, conv: ConvId) {
        let mut client = server.login_unsynced(&self.user);
        let cursors = match self.seen.cursor {
            0 => Vec::new(),
            seq => vec![Cursor { conv, seq }],
        };
        self.session_last = self.seen.cursor;
        raw_sync(&mut client, cursors);
        self.client = Some(client);
        self.drain(conv, Duration::from_millis(1));
    }

    /// Reads what has arrived, until nothing has for `quiet`.
    fn drain(&mut self, conv: ConvId, quiet: Duration) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        loop {
            match client.read_frame(quiet) {
                Ok(Some(frame)) => self.seen.take(self.name, conv, frame, &mut self.session_last),
                Ok(None) => return,
                Err(e) => panic!("{}: connection failed: {e}", self.name),
            }
        }
    }

    /// What this reader got wrong against exactly the seqs `owed`:
    /// missing, extra, and [`Reader::delivery_problems`].
    fn problems_owed(&self, owed: &BTreeSet<u64>) -> Vec<String> {
        let mut problems = Vec::new();
        let seen: BTreeSet<u64> = self.seen.times.keys().copied().collect();
        if &seen != owed {
            let missing: Vec<u64> = owed.difference(&seen).copied().collect();
            let extra: Vec<u64> = seen.difference(owed).copied().collect();
            problems.push(format!(
                "{}: missing {} extra {} (owed {})",
                self.name,
                summarize(&missing),
                summarize(&extra),
                summarize(&owed.iter().copied().collect::<Vec<_>>())
            ));
        }
        problems.extend(self.delivery_problems());
        problems
    }

    /// Seqs delivered more than once, and what [`Seen`] found.
    fn delivery_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .seen
            .times
            .iter()
            .filter(|&(_, &times)| times != 1)
            .map(|(seq, times)| format!("{}: seq {seq} sent {times} times", self.name))
            .collect();
        problems.extend(self.seen.problems.iter().cloned());
        problems
    }

    fn ack(&mut self, conv: ConvId) {
        let seq = self.seen.cursor;
        if let (Some(client), true) = (self.client.as_mut(), seq > 0) {
            client
                .receipt(conv, ReceiptKind::Delivered, seq)
                .expect("receipt");
        }
    }
}

/// The readers' names, in the roles the tests give them by index: 0
/// stays online, 1 offline, 2 flaps between member and not, 3.. flap too.
const READERS: [&str; 6] = ["online", "offline", "flapper", "extra0", "extra1", "extra2"];

/// A server whose groups above `threshold` members are read-diffused.
fn crossing_server(threshold: usize) -> TestServer {
    TestServer::start_with(|c| {
        c.write_diffusion_max_members = threshold;
        // The control connections (joins and leaves) may sit idle for
        // longer than the default on a loaded machine.
        c.idle_timeout = Duration::from_secs(600);
    })
}

/// One user per name of [`READERS`], `prefix_name`, spread over the
/// shards.
fn readers_on_shards(server: &TestServer, prefix: &str) -> Vec<Reader> {
    READERS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Reader::new(
                name,
                server.user_on_shard(&format!("{prefix}_{name}"), i % server.shards()),
            )
        })
        .collect()
}

#[test]
fn members_get_their_messages_exactly_once_while_the_group_crosses_the_threshold() {
    const THRESHOLD: usize = 3;
    let steps: u64 = env_or("TERN_THRESHOLD_STEPS", 300);
    let seed = ternd_common::seed("TERN_THRESHOLD_SEED");
    let mut rng = Rng(seed);
    let mut server = crossing_server(THRESHOLD);
    let owner = server.user_on_shard("thr_owner", 0);
    let mut o = server.login_unsynced(&owner);
    let group: GroupId = common::group_on_shard(&mut o, 1 % server.shards(), server.shards(), true);
    let conv = ConvId::Group { group };
    // Readers: 0 stays online and acknowledges, 1 stays offline, 2 flaps
    // between member and not, online; 3.. flap offline and only sync at
    // the end. Joins and leaves of the flappers move the group (owner
    // included) across the threshold.
    let mut readers = readers_on_shards(&server, "thr");
    // Per reader, whether a member now.
    let mut member = vec![false; readers.len()];
    // Per reader, the seqs sent while a member.
    let mut owed: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); readers.len()];
    let mut clients: Vec<Client> = readers.iter().map(|r| server.login_unsynced(&r.user)).collect();
    for i in [0, 1] {
        clients[i].group_join(group).expect("join");
        member[i] = true;
    }
    readers[0].connect(&server, conv);
    let mut last_seq = 0u64;
    let mut second: Option<Reader> = None;
    for step in 0..steps {
        let size = 1 + member.iter().filter(|m| **m).count();
        match rng.below(100) {
            0..=54 => {
                let sent = o.send_group_text(group, &format!("step {step}")).expect("send");
                assert_eq!(sent.seq, last_seq + 1, "seqs are gap-free");
                last_seq = sent.seq;
                for (i, m) in member.iter().enumerate() {
                    if *m {
                        owed[i].insert(sent.seq);
                    }
                }
            }
            55..=79 => {
                // A flapper joins or leaves; leaning towards the threshold.
                let i = 2 + rng.below((readers.len() - 2) as u64) as usize;
                let join = if size <= THRESHOLD {
                    rng.below(4) != 0
                } else {
                    rng.below(4) == 0
                };
                if join && !member[i] {
                    clients[i].group_join(group).expect("join");
                    member[i] = true;
                } else if !join && member[i] {
                    clients[i].group_leave(group).expect("leave");
                    member[i] = false;
                }
            }
            80..=86 => readers[0].ack(conv),
            87..=91 => {
                // The flapper's device syncs (or goes away).
                if readers[2].client.is_some() && rng.below(2) == 0 {
                    readers[2].client = None;
                } else {
                    readers[2].connect(&server, conv);
                }
            }
            92..=96 => {
                // A second device of the online user syncs from scratch,
                // while the first one acknowledges.
                let mut device = Reader::new("online's second device", readers[0].user.clone());
                device.connect(&server, conv);
                readers[0].ack(conv);
                device.drain(conv, Duration::from_millis(20));
                if let Some(old) = second.replace(device) {
                    assert!(old.seen.problems.is_empty(), "{:?}", old.seen.problems);
                }
            }
            _ => {
                readers[0].drain(conv, Duration::from_millis(50));
                eprintln!("restart at step {step}, seq {last_seq}, {size} members");
                drop(clients);
                server.restart();
                o = server.login_unsynced(&owner);
                clients = readers.iter().map(|r| server.login_unsynced(&r.user)).collect();
                for (i, reader) in readers.iter_mut().enumerate() {
                    if i == 0 || (i == 2 && reader.client.is_some()) {
                        reader.connect(&server, conv);
                    } else {
                        reader.client = None;
                    }
                }
                second = None;
            }
        }
        readers[0].drain(conv, Duration::from_millis(1));
        readers[2].drain(conv, Duration::from_millis(1));
        if let Some(device) = second.as_mut() {
            device.drain(conv, Duration::from_millis(1));
        }
    }
    eprintln!("{steps} steps, {last_seq} messages");
    // Everyone catches up, from the cursor their devices hold.
    let mut problems = Vec::new();
    for (i, reader) in readers.iter_mut().enumerate() {
        reader.connect(&server, conv);
        reader.drain(conv, Duration::from_millis(300));
        problems.extend(reader.problems_owed(&owed[i]));
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
}

/// One membership of a reader: when its join was asked and answered, and
/// its leave (`None` while still a member).
struct Membership {
    join: (Instant, Instant),
    leave: Option<(Instant, Instant)>,
}

/// A message: when its send was written and when `Sent` came.
struct Sent {
    seq: u64,
    asked: Instant,
    acked: Instant,
}

/// Joins and leaves race the messages: the sender never waits for them.
/// A message acknowledged before a join was asked is not the joiner's;
/// one sent after the join's `Ok` and acknowledged before the leave was
/// asked is; the ones in between may go either way, but still once each
/// and in order.
#[test]
fn joins_and_leaves_racing_messages_across_the_threshold_lose_nothing() {
    const THRESHOLD: usize = 3;
    let messages: u64 = env_or("TERN_THRESHOLD_MESSAGES", 600);
    let seed = ternd_common::seed("TERN_THRESHOLD_SEED");
    let mut rng = Rng(seed);
    let server = crossing_server(THRESHOLD);
    let owner = server.user_on_shard("race_owner", 0);
    let mut o = server.login_unsynced(&owner);
    let group: GroupId = common::group_on_shard(&mut o, 1 % server.shards(), server.shards(), true);
    let conv = ConvId::Group { group };
    let mut readers = readers_on_shards(&server, "race");
    let mut clients: Vec<Client> = readers.iter().map(|r| server.login_unsynced(&r.user)).collect();
    let mut memberships: Vec<Vec<Membership>> = (0..readers.len()).map(|_| Vec::new()).collect();
    for i in [0, 1] {
        let asked = Instant::now();
        clients[i].group_join(group).expect("join");
        memberships[i].push(Membership {
            join: (asked, Instant::now()),
            leave: None,
        });
    }
    readers[0].connect(&server, conv);
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            for n in 1..=messages {
                let asked = Instant::now();
                let ack = o.send_group_text(group, &format!("message {n}")).expect("send");
                sent.push(Sent {
                    seq: ack.seq,
                    asked,
                    acked: Instant::now(),
                });
                std::thread::sleep(Duration::from_millis(20));
            }
            done.store(true, Ordering::Relaxed);
            sent
        })
    };
    let mut steps = 0u64;
    while !done.load(Ordering::Relaxed) {
        steps += 1;
        let size = 1 + memberships
            .iter()
            .filter(|m| m.last().is_some_and(|m| m.leave.is_none()))
            .count();
        match rng.below(10) {
            0..=6 => {
                let i = 2 + rng.below((readers.len() - 2) as u64) as usize;
                let is_member = memberships[i].last().is_some_and(|m| m.leave.is_none());
                let join = if size <= THRESHOLD {
                    rng.below(4) != 0
                } else {
                    rng.below(4) == 0
                };
                let asked = Instant::now();
                if join && !is_member {
                    clients[i].group_join(group).expect("join");
                    memberships[i].push(Membership {
                        join: (asked, Instant::now()),
                        leave: None,
                    });
                } else if !join && is_member {
                    clients[i].group_leave(group).expect("leave");
                    if let Some(m) = memberships[i].last_mut() {
                        m.leave = Some((asked, Instant::now()));
                    }
                }
            }
            7 => readers[0].ack(conv),
            8 => {
                if readers[2].client.is_some() && rng.below(2) == 0 {
                    readers[2].client = None;
                } else {
                    readers[2].connect(&server, conv);
                }
            }
            _ => {
                // From where the first one acknowledged, and while it
                // acknowledges again.
                readers[0].ack(conv);
                let mut device = Reader::new("online's second device", readers[0].user.clone());
                device.connect(&server, conv);
                readers[0].ack(conv);
                device.drain(conv, Duration::from_millis(20));
                assert!(device.seen.problems.is_empty(), "{:?}", device.seen.problems);
            }
        }
        readers[0].drain(conv, Duration::from_millis(1));
        readers[2].drain(conv, Duration::from_millis(1));
    }
    let sent = sender.join().expect("sender");
    eprintln!("{steps} steps, {} messages", sent.len());
    let mut problems = Vec::new();
    for (i, reader) in readers.iter_mut().enumerate() {
        reader.connect(&server, conv);
        reader.drain(conv, Duration::from_millis(300));
        let (mut must, mut may) = (BTreeSet::new(), BTreeSet::new());
        for m in &sent {
            for ship in &memberships[i] {
                let leave_asked = ship.leave.map(|(asked, _)| asked);
                let leave_ok = ship.leave.map(|(_, ok)| ok);
                if m.asked > ship.join.1 && leave_asked.is_none_or(|t| m.acked < t) {
                    must.insert(m.seq);
                }
                if m.acked > ship.join.0 && leave_ok.is_none_or(|t| m.asked < t) {
                    may.insert(m.seq);
                }
            }
        }
        let seen: BTreeSet<u64> = reader.seen.times.keys().copied().collect();
        let missing: Vec<u64> = must.difference(&seen).copied().collect();
        let extra: Vec<u64> = seen.difference(&may).copied().collect();
        if !missing.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "{}: missing {} extra {}",
                reader.name,
                summarize(&missing),
                summarize(&extra)
            ));
        }
        problems.extend(reader.delivery_problems());
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
}

/// Where the real `ternd` listens now (a restart moves it).
#[derive(Clone)]
struct Target(Arc<Mutex<SocketAddr>>);

impl Target {
    fn get(&self) -> SocketAddr {
        *self.0.lock().expect("target lock")
    }
}

fn crash_opts() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(3),
        client_name: "threshold-crash".into(),
        ..ClientOptions::default()
    }
}

/// A client of `name`, logged in (not synced) wherever the server is now;
/// retried until the server is back.
fn login_at(target: &Target, name: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{name}: no server for 60 s");
        if let Ok(mut client) = Client::connect(target.get(), crash_opts()) {
            match client.login_unsynced(name, PASSWORD) {
                Ok(_) => return client,
                Err(e) if e.code() == Some(ErrorCode::AuthFailed) => panic!("{name}: account lost"),
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `op` on `user`'s client until the server answers it, logging in
/// again whenever the connection is lost (a kill) or the answer is one a
/// retry may change (`Internal`: not stored).
fn until_answered<T>(
    target: &Target,
    user: &User,
    client: &mut Option<Client>,
    mut op: impl FnMut(&mut Client) -> Result<T, tern_client::ClientError>,
) -> T {
    loop {
        let c = client.get_or_insert_with(|| login_at(target, &user.name));
        match op(c) {
            Ok(v) => return v,
            Err(e) => match e.code() {
                None | Some(ErrorCode::Internal) | Some(ErrorCode::ShuttingDown) => *client = None,
                Some(code) => panic!("{}: refused with {code:?}: {e}", user.name),
            },
        }
    }
}

impl Reader {
    /// [`Reader::connect`] against the real server; `false` if the
    /// connection was lost on the way.
    fn connect_at(&mut self, target: &Target, conv: ConvId) -> bool {
        let mut client = login_at(target, &self.user.name);
        let cursors = match self.seen.cursor {
            0 => Vec::new(),
            seq => vec![Cursor { conv, seq }],
        };
        self.session_last = self.seen.cursor;
        if client.request(ClientBody::Sync { cursors }).is_err() {
            return false;
        }
        self.client = Some(client);
        self.try_drain(conv, Duration::from_millis(1))
    }

    /// [`Reader::drain`] that drops the client instead of failing when
    /// the server is gone; `false` then.
    fn try_drain(&mut self, conv: ConvId, quiet: Duration) -> bool {
        let Some(client) = self.client.as_mut() else {
            return true;
        };
        loop {
            match client.read_frame(quiet) {
                Ok(Some(frame)) => self.seen.take(self.name, conv, frame, &mut self.session_last),
                Ok(None) => return true,
                Err(_) => {
                    self.client = None;
                    return false;
                }
            }
        }
    }
}

/// The sequential test above against the real `ternd` binary, killed
/// with SIGKILL at random moments (so in the middle of a send, a join or
/// leave, a receipt or a catch-up) and restarted on its data directory.
/// A request cut off by a kill is retried until answered (a send with
/// its `client_msg_id`, so it is never sequenced twice): each message's
/// members are then known exactly.
#[test]
fn members_get_their_messages_exactly_once_across_sigkills_while_the_group_crosses_the_threshold() {
    const THRESHOLD: &str = "3";
    let kills: u64 = env_or("TERN_THRESHOLD_KILLS", 4);
    let seed = ternd_common::seed("TERN_THRESHOLD_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, log) = (dir.path().join("data"), dir.path().join("ternd.log"));
    let flags = ["--write-diffusion-max-members", THRESHOLD];
    let server = Ternd::start_with(&data, &log, &flags);
    let target = Target(Arc::new(Mutex::new(server.addr)));
    let register = |name: String| {
        let mut c = Client::connect(target.get(), crash_opts()).expect("connect");
        User {
            id: c.register(&name, PASSWORD).expect("register"),
            name,
        }
    };
    let owner = register("owner".into());
    let mut o: Option<Client> = None;
    let group = until_answered(&target, &owner, &mut o, |c| c.group_create("crossing"));
    let conv = ConvId::Group { group };
    let mut readers: Vec<Reader> = READERS
        .iter()
        .map(|name| Reader::new(name, register(format!("crash_{name}"))))
        .collect();
    let mut clients: Vec<Option<Client>> = readers.iter().map(|_| None).collect();
    let mut member = vec![false; readers.len()];
    let mut owed: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); readers.len()];
    for i in [0, 1] {
        let user = readers[i].user.clone();
        until_answered(&target, &user, &mut clients[i], |c| c.group_join(group));
        member[i] = true;
    }
    // The killer: SIGKILL at random moments, restart on the same data.
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (target, done, data, log) = (target.clone(), done.clone(), data.clone(), log.clone());
        let mut rng = Rng(seed ^ 0x5EED);
        std::thread::spawn(move || {
            let mut server = server;
            for k in 0..kills {
                std::thread::sleep(Duration::from_millis(200 + rng.below(1000)));
                server.kill9();
                server = Ternd::start_with(&data, &log, &flags);
                *target.0.lock().expect("target lock") = server.addr;
                eprintln!("kill {}: restarted on {}", k + 1, server.addr);
            }
            done.store(true, Ordering::Relaxed);
            server
        })
    };
    let (mut last_seq, mut next_id, mut step) = (0u64, 1u64, 0u64);
    while !done.load(Ordering::Relaxed) || step < 100 {
        step += 1;
        let size = 1 + member.iter().filter(|m| **m).count();
        match rng.below(100) {
            0..=59 => {
                let id = next_id;
                next_id += 1;
                let text = format!("message {id}");
                let sent = until_answered(&target, &owner, &mut o, |c| {
                    c.send_group(group, id, tern_client::Content::text(text.clone()))
                });
                assert!(
                    sent.seq == last_seq + 1,
                    "seq {} after {last_seq}: acknowledged seqs are gap-free",
                    sent.seq
                );
                last_seq = sent.seq;
                for (i, m) in member.iter().enumerate() {
                    if *m {
                        owed[i].insert(sent.seq);
                    }
                }
            }
            60..=84 => {
                let i = 2 + rng.below((readers.len() - 2) as u64) as usize;
                let join = if size <= 3 {
                    rng.below(4) != 0
                } else {
                    rng.below(4) == 0
                };
                let user = readers[i].user.clone();
                if join && !member[i] {
                    until_answered(&target, &user, &mut clients[i], |c| c.group_join(group));
                    member[i] = true;
                } else if !join && member[i] {
                    until_answered(&target, &user, &mut clients[i], |c| c.group_leave(group));
                    member[i] = false;
                }
            }
            85..=92 => {
                let seq = readers[0].seen.cursor;
                if let (Some(c), true) = (readers[0].client.as_mut(), seq > 0) {
                    if c.receipt(conv, ReceiptKind::Delivered, seq).is_err() {
                        readers[0].client = None;
                    }
                }
            }
            _ => {
                if readers[2].client.is_some() && rng.below(2) == 0 {
                    readers[2].client = None;
                } else {
                    readers[2].connect_at(&target, conv);
                }
            }
        }
        // The flapper's device comes back when it is its turn; the
        // online one at once.
        readers[2].try_drain(conv, Duration::from_millis(1));
        if !readers[0].try_drain(conv, Duration::from_millis(1)) || readers[0].client.is_none() {
            readers[0].connect_at(&target, conv);
        }
    }
    let server = killer.join().expect("killer");
    eprintln!("{step} steps, {last_seq} messages, {kills} kills");
    let mut problems = Vec::new();
    for (i, reader) in readers.iter_mut().enumerate() {
        reader.client = None;
        assert!(
            reader.connect_at(&target, conv),
            "{}: final sync failed",
            reader.name
        );
        assert!(
            reader.try_drain(conv, Duration::from_millis(500)),
            "{}: lost",
            reader.name
        );
        problems.extend(reader.problems_owed(&owed[i]));
    }
    server.stop();
    assert!(
        problems.is_empty(),
        "seed {seed}:\n{}\nternd log:\n{}",
        problems.join("\n"),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
