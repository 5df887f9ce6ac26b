//! A group crossing the write-diffusion threshold up and down, over real
//! sockets and a real store: small groups copy each message into the
//! members' inboxes, large ones are read from the group history, and
//! members join and leave so that the group crosses the line again and
//! again while messages are sent, members are offline or catching up, a
//! second device syncs and the server restarts. Every member must get
//! every message of their membership exactly once, in order, with no gap,
//! read raw so the client library's dedup cannot hide a duplicate.
//! `TERN_THRESHOLD_SEED` repeats a run.

mod common;
mod durable_common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, User};
use durable_common::{raw_sync, summarize};
use tern_client::{Client, ConvId, Cursor, GroupId, ReceiptKind, ServerBody, ServerFrame};

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

    fn ack(&mut self, conv: ConvId) {
        let seq = self.seen.cursor;
        if let (Some(client), true) = (self.client.as_mut(), seq > 0) {
            client
                .receipt(conv, ReceiptKind::Delivered, seq)
                .expect("receipt");
        }
    }
}

#[test]
fn members_get_their_messages_exactly_once_while_the_group_crosses_the_threshold() {
    const THRESHOLD: usize = 3;
    let steps: u64 = std::env::var("TERN_THRESHOLD_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("TERN_THRESHOLD_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("TERN_THRESHOLD_SEED={seed}");
    let mut rng = Rng(seed);
    let mut server = TestServer::start_with(|c| c.write_diffusion_max_members = THRESHOLD);
    let owner = server.user_on_shard("thr_owner", 0);
    let mut o = server.login_unsynced(&owner);
    let group: GroupId = common::group_on_shard(&mut o, 1 % server.shards(), server.shards(), true);
    let conv = ConvId::Group { group };
    // Readers: 0 stays online and acknowledges, 1 stays offline, 2 flaps
    // between member and not, online; 3.. flap offline and only sync at
    // the end. Joins and leaves of the flappers move the group (owner
    // included) across the threshold.
    let names = ["online", "offline", "flapper", "extra0", "extra1", "extra2"];
    let mut readers: Vec<Reader> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Reader::new(
                name,
                server.user_on_shard(&format!("thr_{name}"), i % server.shards()),
            )
        })
        .collect();
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
        let seen: BTreeSet<u64> = reader.seen.times.keys().copied().collect();
        if seen != owed[i] {
            let missing: Vec<u64> = owed[i].difference(&seen).copied().collect();
            let extra: Vec<u64> = seen.difference(&owed[i]).copied().collect();
            problems.push(format!(
                "{}: missing {} extra {} (owed {})",
                reader.name,
                summarize(&missing),
                summarize(&extra),
                summarize(&owed[i].iter().copied().collect::<Vec<_>>())
            ));
        }
        for (seq, times) in &reader.seen.times {
            if *times != 1 {
                problems.push(format!("{}: seq {seq} sent {times} times", reader.name));
            }
        }
        problems.extend(reader.seen.problems.iter().cloned());
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
    let steps: u64 = std::env::var("TERN_THRESHOLD_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("TERN_THRESHOLD_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("TERN_THRESHOLD_SEED={seed}");
    let mut rng = Rng(seed);
    let server = TestServer::start_with(|c| c.write_diffusion_max_members = THRESHOLD);
    let owner = server.user_on_shard("race_owner", 0);
    let mut o = server.login_unsynced(&owner);
    let group: GroupId = common::group_on_shard(&mut o, 1 % server.shards(), server.shards(), true);
    let conv = ConvId::Group { group };
    let names = ["online", "offline", "flapper", "extra0", "extra1", "extra2"];
    let mut readers: Vec<Reader> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Reader::new(
                name,
                server.user_on_shard(&format!("race_{name}"), i % server.shards()),
            )
        })
        .collect();
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
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let asked = Instant::now();
                let ack = o.send_group_text(group, &format!("message {n}")).expect("send");
                sent.push(Sent {
                    seq: ack.seq,
                    asked,
                    acked: Instant::now(),
                });
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };
    for _ in 0..steps {
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
    stop.store(true, Ordering::Relaxed);
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
        for (seq, times) in &reader.seen.times {
            if *times != 1 {
                problems.push(format!("{}: seq {seq} sent {times} times", reader.name));
            }
        }
        problems.extend(reader.seen.problems.iter().cloned());
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
}
