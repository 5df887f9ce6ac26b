//! A group join survives a crash without a head start into the past: the
//! real `ternd` binary takes joins (and leaves and rejoins) of small
//! groups while members send to them, is killed with SIGKILL at a random
//! moment and restarted, round after round. After each kill the store itself is the oracle. In a group
//! at or below the write-diffusion threshold every message is copied into
//! the inbox of each member *at its sequencing*, so a message a joiner's
//! inbox lacks was sequenced before the joiner was a member. Such a
//! message above the joiner's stored cursor is one their next `Sync`
//! would stream: a message from before the join (protocol.md, group
//! joins). The window this catches is a join whose membership was stored
//! with a cursor below messages that were sequenced but not yet stored,
//! when those messages reach the disk before the cursor is raised.
//!
//! `TERN_CRASH_SEED` repeats one run.

mod common;
mod ternd_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{opts, PASSWORD};
use tern_client::{Client, ConvId, GroupId, UserId};
use tern_proto::ids::mix64;
use tern_storage::{Store, StoreOptions};
use ternd_common::Ternd;

const ROUNDS: usize = 10;
const SENDERS: usize = 6;
/// Joiners per round: with the owner and senders, within the default
/// write-diffusion threshold (200), so every message has inbox copies.
const JOINERS: usize = 100;

fn store_opts() -> StoreOptions {
    StoreOptions {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        ..StoreOptions::default()
    }
}

struct Round {
    group: GroupId,
    senders: Vec<String>,
    joiners: Vec<(String, UserId)>,
}

fn populate(data_dir: &Path) -> Vec<Round> {
    let store = Store::open(data_dir, store_opts()).expect("open store");
    let reg = |name: &str| store.register(name, PASSWORD.as_bytes()).expect("register");
    (0..ROUNDS)
        .map(|r| {
            let owner = reg(&format!("owner{r}"));
            let group = store.create_group(owner, &format!("g{r}")).expect("create");
            let senders = (0..SENDERS)
                .map(|s| {
                    let name = format!("sender{r}_{s}");
                    store.add_member(group, reg(&name)).expect("join");
                    name
                })
                .collect();
            let joiners = (0..JOINERS)
                .map(|j| {
                    let name = format!("joiner{r}_{j}");
                    let id = reg(&name);
                    (name, id)
                })
                .collect();
            Round {
                group,
                senders,
                joiners,
            }
        })
        .collect()
}

fn login(ternd: &Ternd, name: &str) -> Option<Client> {
    let mut client = Client::connect(ternd.addr, opts()).ok()?;
    client.login(name, PASSWORD).ok()?;
    Some(client)
}

/// (joiners found members, the messages some joiner would sync from
/// before their join, described).
fn check(data_dir: &Path, round: &Round) -> (usize, Vec<String>) {
    let store = Store::open(data_dir, store_opts()).expect("reopen store");
    let conv = ConvId::Group { group: round.group };
    let last = store.conv_tail(conv, 0).expect("tail").last_seq;
    let mut members = 0;
    let mut problems = Vec::new();
    for (name, user) in &round.joiners {
        if !store.is_member(round.group, *user).expect("is_member") {
            continue;
        }
        members += 1;
        let (delivered, _) = store.receipts(*user, conv).expect("receipts");
        let inbox: BTreeSet<u64> = store
            .inbox_after(*user, None, 1_000_000)
            .expect("inbox")
            .into_iter()
            .filter(|f| f.conv == conv)
            .map(|f| f.seq)
            .collect();
        for seq in delivered + 1..=last {
            if !inbox.contains(&seq) && store.history_entry(conv, seq).expect("history").is_some() {
                problems.push(format!(
                    "{name}: cursor {delivered}, but seq {seq} (of {last}) was sequenced before the join"
                ));
                break;
            }
        }
    }
    (members, problems)
}

#[test]
fn a_join_killed_at_any_moment_never_starts_before_a_message_sequenced_before_it() {
    let seed = ternd_common::crash_seed();
    let mut rng = seed;
    let mut pause = move |min_ms: u64, max_ms: u64| {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        Duration::from_millis(min_ms + mix64(rng) % (max_ms - min_ms).max(1))
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let log = data_dir.with_extension("log");
    let rounds = populate(&data_dir);
    let mut problems = Vec::new();
    for (r, round) in rounds.iter().enumerate() {
        let ternd = Ternd::start(&data_dir, &log);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for name in &round.senders {
            let Some(mut client) = login(&ternd, name) else {
                panic!("{name} cannot log in")
            };
            let (stop, group) = (stop.clone(), round.group);
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if client.send_group_text(group, "hello").is_err() {
                        return;
                    }
                    // Others' messages queue here: drop them.
                    while let Ok(Some(_)) = client.next_push(Duration::ZERO) {}
                }
            }));
        }
        // Joiners log in up front, so the joins come fast; each joins,
        // and the one half a turn behind leaves, over and over, so rejoins
        // (whose new start must also pass what they missed) come too.
        let mut joiners: Vec<Client> = round
            .joiners
            .iter()
            .map(|(name, _)| login(&ternd, name).expect("joiner logs in"))
            .collect();
        let (joining_stop, group) = (stop.clone(), round.group);
        let joining = thread::spawn(move || {
            let n = joiners.len();
            for i in 0.. {
                if joining_stop.load(Ordering::Relaxed) || joiners[i % n].group_join(group).is_err() {
                    return;
                }
                if i >= n / 2 && joiners[(i - n / 2) % n].group_leave(group).is_err() {
                    return;
                }
            }
        });
        thread::sleep(pause(200, 1500));
        ternd.kill9();
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            thread.join().expect("sender");
        }
        joining.join().expect("joiner");
        let (members, found) = check(&data_dir, round);
        eprintln!(
            "round {r}: {members} joiners members at the kill, {} problems",
            found.len()
        );
        problems.extend(found);
    }
    // A clean start on what the last kill left.
    Ternd::start(&data_dir, &log).stop();
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
}
