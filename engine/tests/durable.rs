//! Durable messaging through the client library, over TCP, against an
//! in-process server on a real store: offline delivery, multi-device sync
//! by cursor, the catch-up/live seam under concurrent sends, retry dedup
//! across a restart, receipts, history, the conversation list, groups
//! (write and read diffusion), async durability and inbox expiry.
//!
//! Where a duplicate from the server would matter, the receiving side reads
//! raw frames (`read_frame`), so the client library's cursor-based dedup
//! cannot hide it.

mod common;
mod durable_common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::next_raw_push;
use durable_common::*;
use tern_client::{
    Client, ClientBody, Content, ConvId, Cursor, ErrorCode, ReceiptKind, ServerBody, ServerFrame, UserId,
};

fn cursor(conv: ConvId, seq: u64) -> Cursor {
    Cursor { conv, seq }
}

/// The next `Receipt` push (raw; other pushes but `Presence` fail the test).
fn expect_receipt(client: &mut Client) -> (ConvId, u64, ReceiptKind, u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.read_frame(left).expect("connection") {
            Some(ServerFrame {
                body:
                    ServerBody::Receipt {
                        conv,
                        user,
                        kind,
                        seq,
                    },
                ..
            }) => return (conv, user, kind, seq),
            Some(ServerFrame {
                body: ServerBody::Presence { .. },
                ..
            }) => {}
            Some(other) => panic!("expected a Receipt push, got {other:?}"),
            None => panic!("no Receipt push within {TIMEOUT:?}"),
        }
    }
}

/// Logs in with a token without syncing (raw `LoginToken`).
fn login_token_unsynced(server: &TestServer, token: &[u8]) -> Client {
    let mut client = server.connect();
    match client
        .request(ClientBody::LoginToken {
            token: token.to_vec(),
        })
        .expect("login with token")
    {
        ServerBody::LoggedIn { .. } => client,
        other => panic!("expected LoggedIn, got {other:?}"),
    }
}

// 1. Offline delivery.

#[test]
fn offline_recipient_gets_every_message_on_login_in_order() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);

    let mut a = server.login(&alice);
    let mut acks = Vec::new();
    for i in 1..=50u64 {
        let ack = a.send_text(bob.id, &format!("offline #{i}")).expect("send");
        assert_eq!(ack.conv, conv);
        assert_eq!(ack.seq, i, "acks are numbered 1, 2, 3, … with no gap");
        acks.push(ack);
    }

    // `login` syncs; the catch-up is queued for the caller. Read it raw.
    let mut b = server.login(&bob);
    let got = raw_messages(&mut b, 50);
    assert_seqs(&got, conv, 1..=50);
    for (i, (m, ack)) in got.iter().zip(&acks).enumerate() {
        assert_eq!(m.from, alice.id);
        assert_eq!(m.client_msg_id, ack.client_msg_id);
        assert_eq!(m.timestamp_ms, ack.timestamp_ms);
        assert_eq!(m.content, Content::text(format!("offline #{}", i + 1)));
    }
    expect_quiet(&mut [&mut b, &mut a]);

    // The same through the raw protocol: SyncDone counts exactly 50.
    let mut raw = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut raw, vec![], 50);
    assert_eq!(sync.sync_done, 50);
    assert_eq!(sync.before_done, 50);
    assert_seqs(&sync.messages, conv, 1..=50);
}

// 2. Multi-device and sync by cursor.

#[test]
fn devices_sync_what_they_missed_and_cursors_skip_what_they_hold() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);

    // Device A is online; B has never connected.
    let mut dev_a = server.login(&bob);
    for i in 1..=5 {
        assert_eq!(a.send_text(bob.id, &format!("m{i}")).expect("send").seq, i);
    }
    assert_seqs(&raw_messages(&mut dev_a, 5), conv, 1..=5);

    // A did not acknowledge, so B's first sync streams them all.
    let mut dev_b = server.connect();
    let session_b = dev_b.login_unsynced(&bob.name, PASSWORD).expect("login");
    assert_eq!(dev_b.sync().expect("sync"), 5);
    assert_seqs(&messages(&mut dev_b, 5), conv, 1..=5);

    // Both devices are live now.
    assert_eq!(a.send_text(bob.id, "m6").expect("send").seq, 6);
    assert_seqs(&raw_messages(&mut dev_a, 1), conv, [6]);
    assert_seqs(&messages(&mut dev_b, 1), conv, [6]);
    expect_quiet(&mut [&mut dev_a, &mut dev_b]);

    // A acknowledges everything; B goes offline and misses 7..=9.
    dev_a.ack_all().expect("ack");
    let b_cursors: Vec<Cursor> = dev_b.cursors().collect();
    assert_eq!(b_cursors, vec![cursor(conv, 6)]);
    drop(dev_b);
    for i in 7..=9 {
        assert_eq!(a.send_text(bob.id, &format!("m{i}")).expect("send").seq, i);
    }
    assert_seqs(&raw_messages(&mut dev_a, 3), conv, 7..=9);

    // B comes back as a new Client carrying its old cursors: only 7..=9.
    let mut dev_b2 = server.connect();
    for c in &b_cursors {
        dev_b2.set_cursor(c.conv, c.seq);
    }
    dev_b2.login_token(&session_b.token).expect("resume");
    let got = messages(&mut dev_b2, 3);
    assert_seqs(&got, conv, 7..=9);
    assert_eq!(got[0].content, Content::text("m7"));

    // The server itself sends nothing at or below a presented cursor.
    let mut raw = login_token_unsynced(&server, &session_b.token);
    let sync = raw_sync_all(&mut raw, vec![cursor(conv, 6)], 3);
    assert_eq!(sync.sync_done, 3);
    assert_seqs(&sync.messages, conv, 7..=9);
    let mut raw = login_token_unsynced(&server, &session_b.token);
    let sync = raw_sync_all(&mut raw, vec![cursor(conv, 8)], 1);
    assert_seqs(&sync.messages, conv, [9]);

    // A presented cursor is a delivered receipt: after one device synced
    // with cursor 9, a device with no cursors gets nothing.
    drop(raw);
    let mut dev_b3 = server.connect();
    dev_b3.set_cursor(conv, 9);
    dev_b3.login_token(&session_b.token).expect("resume");
    let mut fresh = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut fresh, vec![], 0);
    assert_eq!(sync.sync_done, 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages);
    expect_quiet(&mut [&mut dev_a, &mut dev_b2, &mut dev_b3]);
}

// 3. The seam between catch-up and live delivery.

/// Bob has `backlog` messages waiting; a second session of Alice starts
/// sending `live` more (in windows of `live_window`) just before two of
/// Bob's devices sync at once. Each device must see 1..=backlog+live once,
/// in order: one reads raw frames, one goes through the client library.
///
/// With `strict` false, repeats on the raw device (a seq at or below one
/// already received in the session) are dropped before the check, so
/// that only gaps and disorder fail: see the BUG note on the strict test.
fn seam(backlog: u64, live: u64, live_window: usize, strict: bool) {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let total = backlog + live;

    let mut a = server.login_unsynced(&alice);
    let acks = send_pipelined(&mut a, To::User(bob.id), &ids(1, backlog), 200);
    assert!(acks.iter().map(|a| a.seq).eq(1..=backlog));

    let mut raw = server.login_unsynced(&bob);
    let mut lib = server.connect();
    let mut a2 = server.login_unsynced(&alice);
    let start = Arc::new(Barrier::new(3));

    let sender = {
        let start = start.clone();
        thread::spawn(move || {
            start.wait();
            let began = Instant::now();
            let acks = send_pipelined(&mut a2, To::User(bob.id), &ids(1_000_000, live), live_window);
            (acks, began.elapsed())
        })
    };
    let lib_reader = {
        let start = start.clone();
        let name = bob.name.clone();
        thread::spawn(move || {
            start.wait();
            lib.login(&name, PASSWORD).expect("login");
            let got = messages(&mut lib, total as usize);
            expect_quiet(&mut [&mut lib]);
            got
        })
    };
    start.wait();
    let began = Instant::now();
    let sync = raw_sync_all(&mut raw, vec![], total as usize);
    let sync_elapsed = began.elapsed();
    let (live_acks, send_elapsed) = sender.join().expect("sender");
    assert!(live_acks.iter().map(|a| a.seq).eq(backlog + 1..=total));

    assert_eq!(
        sync.sync_done, sync.before_done as u64,
        "SyncDone must count the Message pushes of the catch-up"
    );
    let mut messages = sync.messages;
    let received = messages.len();
    if !strict {
        let mut high = 0;
        messages.retain(|m| {
            let new = m.seq > high;
            high = high.max(m.seq);
            new
        });
    }
    assert_seqs(&messages, conv, 1..=total);
    for m in &messages {
        let id = if m.seq <= backlog {
            m.seq
        } else {
            1_000_000 + m.seq - backlog - 1
        };
        assert_eq!(m.client_msg_id, id, "seq {} carries the wrong message", m.seq);
        assert_eq!(m.content, Content::text(text_of(id)));
    }
    let got = lib_reader.join().expect("library reader");
    assert_seqs(&got, conv, 1..=total);
    eprintln!(
        "seam: backlog {backlog}, live {live}: sync streamed {} (of which {} live) in {sync_elapsed:?}; \
         {} arrived live after SyncDone; live sender ran {send_elapsed:?}",
        sync.sync_done,
        sync.before_done.saturating_sub(backlog as usize),
        received - sync.before_done,
    );
    if received != messages.len() {
        eprintln!(
            "seam: {} duplicates dropped (known bug)",
            received - messages.len()
        );
    }
}

#[test]
fn seam_between_catch_up_and_live_has_no_gap_and_no_duplicate() {
    seam(2000, 500, 4, true);
}

#[test]
fn seam_between_catch_up_and_live_has_no_gap() {
    // The same, tolerating the known repeats on the raw device (the client
    // library device must still see each message exactly once).
    seam(2000, 500, 4, false);
}

#[test]
fn seam_survives_overflowing_the_hold_buffer() {
    // Tiny pages and hold buffer: live messages overflow the hold during
    // the catch-up, which must rescan the store instead of losing them.
    // If live traffic outruns it every pass, the server may drop the
    // session as too busy; the client then syncs again from its cursor.
    let server = TestServer::start_with(|c| {
        c.sync_page = 16;
        c.sync_hold_max = 8;
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let (backlog, live) = (600, 300);
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::User(bob.id), &ids(1, backlog), 200);
    let mut a2 = server.login_unsynced(&alice);
    let sender =
        thread::spawn(move || send_pipelined(&mut a2, To::User(bob.id), &ids(1_000_000, live), 2).len());
    let (got, resyncs) = raw_sync_resuming(&server, &bob, conv, backlog + live);
    assert_eq!(sender.join().expect("sender"), live as usize);
    assert_seqs(&got, conv, 1..=backlog + live);
    eprintln!("hold overflow: {resyncs} sessions dropped as too busy and resumed");
}

#[test]
fn seam_holds_by_bytes_too_and_survives_overflowing_them() {
    // The hold buffer's count bound is left at its default; the byte bound
    // (outbound_queue_bytes, at its minimum for 2 KiB frames: two 1.5 KB
    // messages) is what overflows: the catch-up must rescan the store, not
    // lose messages, and the overflow is counted. Live messages must be
    // arriving while the catch-up runs, whatever the machine's load: four
    // senders, already going before the Sync is sent.
    use std::sync::atomic::{AtomicUsize, Ordering};
    const LIVE_SENDERS: u64 = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(|c| {
        c.sync_page = 16;
        c.max_frame_bytes = 2048;
        c.max_message_bytes = 1500;
        c.outbound_queue_bytes = 4096;
    });
    let admin = common::admin(&server, dir.path());
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let (backlog, live) = (600, 300);
    let mut a = server.login_unsynced(&alice);
    // A window of acks that fits the small outbound queue.
    send_pipelined(&mut a, To::User(bob.id), &ids(1, backlog), 10);
    // Live messages of 1.5 KB: three fill the byte bound.
    let acked = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..LIVE_SENDERS)
        .map(|_| {
            let mut client = server.login_unsynced(&alice);
            let (bob_id, acked) = (bob.id, acked.clone());
            thread::spawn(move || {
                let body = "y".repeat(1500);
                for _ in 0..live / LIVE_SENDERS {
                    client.send_text(bob_id, &body).expect("live send");
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    common::eventually("live sends begin", || {
        (acked.load(Ordering::Relaxed) > 0).then_some(())
    });
    let (got, resyncs) = raw_sync_resuming(&server, &bob, conv, backlog + live);
    for sender in senders {
        sender.join().expect("sender");
    }
    assert_seqs(&got, conv, 1..=backlog + live);
    let overflows = common::total(&admin, "tern_sync_hold_overflows_total");
    assert!(overflows > 0, "the byte bound never tripped");
    eprintln!("hold bytes overflowed {overflows} times; {resyncs} sessions dropped as too busy and resumed");
}

#[test]
fn seam_holds_over_many_syncs_during_continuous_sends() {
    // Many short sessions, each syncing from the cursors of the last one
    // while two senders keep going: one conversation homed on the
    // recipient's shard (deliveries run inline after the commit), one on
    // the other shard (deliveries cross a queue). Every session must get
    // exactly cursor+1, cursor+2, … per conversation: a duplicate means a
    // message the catch-up read from the store was also delivered live.
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = TestServer::start();
    let bob = server.user_on_shard("bob", 1);
    let local = server.user_where("local", |u| conv_home(u, &bob) == 1);
    let remote = server.user_where("remote", |u| conv_home(u, &bob) == 0);
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = [&local, &remote]
        .into_iter()
        .map(|user| {
            let mut client = server.login_unsynced(user);
            let stop = stop.clone();
            let to = bob.id;
            thread::spawn(move || {
                let mut next = 1;
                while !stop.load(Ordering::Relaxed) {
                    send_pipelined(&mut client, To::User(to), &ids(next, 2), 2);
                    next += 2;
                }
                next - 1
            })
        })
        .collect();
    let convs = [
        ConvId::direct(local.id, bob.id),
        ConvId::direct(remote.id, bob.id),
    ];
    let mut last = [0u64; 2];
    let mut sessions = 0;
    let mut violations = Vec::new();
    let began = Instant::now();
    let mut rng = 0x1234_5678_u64;
    while began.elapsed() < Duration::from_secs(3) {
        sessions += 1;
        let mut b = server.login_unsynced(&bob);
        let cursors = (0..2).map(|i| cursor(convs[i], last[i])).collect();
        let mut out = rkyv::util::AlignedVec::new();
        let frame = tern_client::ClientFrame {
            request_id: 7,
            body: ClientBody::Sync { cursors },
        };
        tern_proto::encode_client(&frame, &mut out, 1 << 20).expect("encode");
        b.send_raw(&out).expect("send Sync");
        rng = tern_proto::ids::mix64(rng);
        let live_for = Duration::from_millis(rng % 30);
        let mut synced_at: Option<Instant> = None;
        loop {
            let wait = match synced_at {
                Some(at) => live_for.saturating_sub(at.elapsed()),
                None => TIMEOUT,
            };
            match b.read_frame(wait).expect("session") {
                Some(ServerFrame {
                    body: ServerBody::Message(m),
                    ..
                }) => {
                    let i = convs.iter().position(|c| *c == m.conv).expect("known conv");
                    if m.seq != last[i] + 1 {
                        let what = if m.seq <= last[i] { "duplicate" } else { "gap" };
                        let when = if synced_at.is_some() { "live" } else { "catch-up" };
                        violations.push(format!(
                            "session {sessions}, {} conv: {what}: after {} came {} ({when})",
                            ["local", "remote"][i],
                            last[i],
                            m.seq
                        ));
                    }
                    last[i] = last[i].max(m.seq);
                }
                Some(ServerFrame {
                    request_id: 7,
                    body: ServerBody::SyncDone { .. },
                }) => synced_at = Some(Instant::now()),
                Some(other) => panic!("unexpected {other:?}"),
                None if synced_at.is_some() => break,
                None => panic!("no SyncDone within {TIMEOUT:?}"),
            }
        }
        if sessions % 2 == 0 {
            // Trim the inbox now and then, so the catch-up stays short.
            for i in 0..2 {
                if last[i] > 0 {
                    b.receipt(convs[i], ReceiptKind::Delivered, last[i])
                        .expect("receipt");
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<u64> = senders.into_iter().map(|s| s.join().expect("sender")).collect();
    let mut b = server.login_unsynced(&bob);
    let cursors = (0..2).map(|i| cursor(convs[i], last[i])).collect();
    let rest = (sent[0] - last[0] + sent[1] - last[1]) as usize;
    let sync = raw_sync_all(&mut b, cursors, rest);
    for i in 0..2 {
        let got: Vec<_> = sync
            .messages
            .iter()
            .filter(|m| m.conv == convs[i])
            .cloned()
            .collect();
        assert_seqs(&got, convs[i], last[i] + 1..=sent[i]);
    }
    eprintln!(
        "seam stress: {sessions} sessions, {} + {} messages",
        sent[0], sent[1]
    );
    assert!(
        violations.is_empty(),
        "{} seam violations in {sessions} sessions:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

fn conv_home(a: &User, b: &User) -> usize {
    tern_proto::shard_of(ConvId::direct(a.id, b.id).placement_key(), 2)
}

// 4. Retry dedup, across a restart.

#[test]
fn retries_are_deduplicated_even_after_a_restart() {
    let mut server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login(&bob);

    let first = a.send_direct(bob.id, 777, Content::text("once")).expect("send");
    assert_eq!(first.seq, 1);
    let retry = a.send_direct(bob.id, 777, Content::text("once")).expect("retry");
    assert_eq!(retry, first, "a retry gets the original ack");
    // Even with different content: the id decides.
    let retry = a
        .send_direct(bob.id, 777, Content::text("changed"))
        .expect("retry");
    assert_eq!(retry, first);
    let m = expect_message(&mut b);
    assert_eq!((m.seq, m.client_msg_id), (1, 777));
    assert_eq!(m.content, Content::text("once"));
    expect_quiet(&mut [&mut b]);

    // Ids are per sender and per conversation: Bob's 777 is a new message.
    let bobs = b
        .send_direct(alice.id, 777, Content::text("bob's"))
        .expect("send");
    assert_eq!(bobs.seq, 2);
    // Id 0 disables dedup.
    let z1 = a.send_direct(bob.id, 0, Content::text("zero")).expect("send");
    let z2 = a.send_direct(bob.id, 0, Content::text("zero")).expect("send");
    assert_eq!((z1.seq, z2.seq), (3, 4));
    let mut window = Vec::new();
    for id in 1001..=1005 {
        window.push(
            a.send_direct(bob.id, id, Content::text(text_of(id)))
                .expect("send"),
        );
    }
    assert_eq!(window.last().map(|s| s.seq), Some(9));
    assert_seqs(&raw_messages(&mut b, 7), conv, 3..=9);
    drop((a, b));

    server.restart();
    let mut a = server.login_unsynced(&alice);
    let again = a
        .send_direct(bob.id, 777, Content::text("once"))
        .expect("retry after restart");
    assert_eq!(again, first, "the dedup window is reloaded from the store");
    for sent in &window {
        let again = a
            .send_direct(bob.id, sent.client_msg_id, Content::text("x"))
            .expect("retry after restart");
        assert_eq!(&again, sent);
    }
    let next = a.send_direct(bob.id, 778, Content::text("new")).expect("send");
    assert_eq!(next.seq, 10, "the next seq follows the last stored one");
    assert!(next.timestamp_ms >= window[4].timestamp_ms);

    // Bob got every message of Alice's exactly once, none of the retries
    // (seq 2 is his own, so not in his inbox).
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 9);
    assert_seqs(&sync.messages, conv, [1].into_iter().chain(3..=10));
    assert!(sync.messages.iter().all(|m| m.from == alice.id));
    // History has all ten, Bob's included.
    let history = b.history(conv, 1, true, 50).expect("history");
    assert_seqs(&history, conv, 1..=10);
    assert_eq!(history[1].from, bob.id);
}

// 5. Receipts.

/// A conversation cache far smaller than the conversations in use, so
/// states are dropped and reloaded from the store all the time, with
/// several sessions writing to each conversation at once so that reloads
/// of one conversation overlap: every conversation must still number its
/// messages 1, 2, 3, … with no seq handed out twice (a reload that began
/// before a drop and returned after it holds a stale last seq).
#[test]
fn a_conversation_cache_under_pressure_never_reuses_a_seq() {
    const RECIPIENTS: usize = 48;
    const ROUNDS: u64 = 4;
    const SENDERS: usize = 2;
    const SESSIONS: usize = 4;
    let server = TestServer::start_with(|c| c.max_cached_conversations = 16);
    let mut admin = server.connect();
    let recipients: Vec<UserId> = (0..RECIPIENTS)
        .map(|n| admin.register(&format!("reader{n}"), PASSWORD).expect("register"))
        .collect();
    let recipients = Arc::new(recipients);
    let mut threads = Vec::new();
    for n in 0..SENDERS {
        let sender = server.user_where(&format!("writer{n}_"), |_| true);
        for session in 0..SESSIONS {
            let mut client = server.login_unsynced(&sender);
            let recipients = recipients.clone();
            let sender = sender.id;
            threads.push(thread::spawn(move || {
                let mut acks = Vec::new();
                // Every session walks the recipients in the same order, so
                // they reach each conversation at about the same time.
                for round in 0..ROUNDS {
                    for (index, &to) in recipients.iter().enumerate() {
                        let id = ((round * RECIPIENTS as u64 + index as u64) << 8) + session as u64 + 1;
                        let acked = send_pipelined(&mut client, To::User(to), &[id], 1);
                        acks.extend(acked.into_iter().map(|ack| (sender, to, ack)));
                    }
                }
                acks
            }));
        }
    }
    let mut seqs: HashMap<ConvId, Vec<u64>> = HashMap::new();
    for handle in threads {
        for (sender, to, ack) in handle.join().expect("sender thread") {
            assert_eq!(ack.conv, ConvId::direct(sender, to));
            seqs.entry(ack.conv).or_default().push(ack.seq);
        }
    }
    assert_eq!(seqs.len(), SENDERS * RECIPIENTS);
    let expected: Vec<u64> = (1..=ROUNDS * SESSIONS as u64).collect();
    for (conv, mut got) in seqs {
        got.sort_unstable();
        assert_eq!(got, expected, "{conv:?}");
    }
}

#[test]
fn receipts_are_forwarded_live_stored_for_offline_peers_and_trim_the_inbox() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login(&alice);
    for i in 1..=10 {
        a.send_text(bob.id, &format!("m{i}")).expect("send");
    }

    let mut b = server.login(&bob);
    assert_seqs(&messages(&mut b, 10), conv, 1..=10);
    b.receipt(conv, ReceiptKind::Delivered, 7).expect("receipt");
    assert_eq!(expect_receipt(&mut a), (conv, bob.id, ReceiptKind::Delivered, 7));

    // A fresh device of Bob's syncs only what is after the delivered cursor.
    let mut fresh = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut fresh, vec![], 3);
    assert_seqs(&sync.messages, conv, 8..=10);
    drop(fresh);

    // Cursors never move back.
    b.receipt(conv, ReceiptKind::Delivered, 3).expect("receipt");
    let _ = expect_receipt(&mut a); // forwarded as sent; the stored cursor stays
    let mut fresh = server.login_unsynced(&bob);
    assert_eq!(raw_sync_all(&mut fresh, vec![], 3).messages.len(), 3);
    drop(fresh);

    // Refusals: seq 0, and a conversation Bob is not in.
    assert_eq!(
        code_of(b.receipt(conv, ReceiptKind::Read, 0)),
        ErrorCode::InvalidArgument
    );
    let foreign = ConvId::direct(alice.id, carol.id);
    assert_eq!(
        code_of(b.receipt(foreign, ReceiptKind::Delivered, 1)),
        ErrorCode::Forbidden
    );

    // Alice goes offline; Bob reads up to 9 (Read implies Delivered).
    drop(a);
    b.receipt(conv, ReceiptKind::Read, 9).expect("read receipt");
    let mut a = server.login(&alice);
    let convs = a.conversations(0, 50).expect("conversations");
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0].conv, conv);
    assert_eq!((convs[0].peer_delivered, convs[0].peer_read), (9, 9));
    // The receipt she missed is not replayed as a push.
    expect_quiet(&mut [&mut a]);

    // Bob's own view: one unread; a fresh device gets only seq 10.
    let convs = b.conversations(0, 50).expect("conversations");
    assert_eq!((convs[0].last_seq, convs[0].unread), (10, 1));
    let mut fresh = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut fresh, vec![], 1).messages, conv, [10]);
}

// 6. History.

#[test]
fn pages_of_big_messages_are_cut_to_one_frame_and_paging_on_reaches_them_all() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);
    // 40 messages of 4,000 bytes: 160 kB, well past one 64 KiB frame.
    let big = |i: u64| format!("{i:04}{}", "x".repeat(3996));
    for i in 1..=40 {
        a.send_text(bob.id, &big(i)).expect("send");
    }
    let mut b = server.login_unsynced(&bob);
    let mut all = Vec::new();
    let mut from = 1;
    loop {
        let page = b.history(conv, from, true, 200).expect("a page, not a timeout");
        assert!(page.len() < 40, "one page held all {} messages", page.len());
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        all.extend(page);
    }
    assert_seqs(&all, conv, 1..=40);
    for (i, m) in (1..).zip(&all) {
        assert_eq!(m.content, Content::text(big(i)));
    }
    // Backwards too, from the newest.
    let page = b.history(conv, u64::MAX, false, 200).expect("page");
    assert!(!page.is_empty() && page.len() < 40);
    assert_eq!(page[0].seq, 40);

    // The conversation list cuts its pages the same way: 20 conversations
    // whose last messages are 4,000 bytes each.
    let peers: Vec<User> = (0..20)
        .map(|i| server.user_where(&format!("peer{i}x"), |_| true))
        .collect();
    for peer in &peers {
        a.send_text(peer.id, &big(0)).expect("send");
    }
    let mut listed = Vec::new();
    loop {
        let page = a
            .conversations(listed.len() as u32, 200)
            .expect("a page, not a timeout");
        assert!(page.len() < 21, "one page held all {} conversations", page.len());
        if page.is_empty() {
            break;
        }
        listed.extend(page.into_iter().map(|c| c.conv));
    }
    listed.sort_unstable_by_key(|c| format!("{c:?}"));
    listed.dedup();
    assert_eq!(listed.len(), 21, "bob's conversation and the 20 new ones");
    a.ping().expect("the connection carries on");
}

#[test]
fn history_pages_forwards_and_backwards_and_is_for_participants_only() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);
    let acks = send_pipelined(&mut a, To::User(bob.id), &ids(1, 250), 50);
    let mut b = server.login_unsynced(&bob);

    // Forwards in pages of 64.
    let mut all = Vec::new();
    let mut from = 1;
    loop {
        let page = b.history(conv, from, true, 64).expect("history");
        assert!(page.len() <= 64);
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        all.extend(page);
    }
    assert_seqs(&all, conv, 1..=250);
    for (m, ack) in all.iter().zip(&acks) {
        assert_eq!(
            (m.client_msg_id, m.timestamp_ms),
            (ack.client_msg_id, ack.timestamp_ms)
        );
        assert_eq!(m.content, Content::text(text_of(ack.client_msg_id)));
        assert_eq!(m.from, alice.id);
    }

    // Backwards from the latest.
    let page = b.history(conv, u64::MAX, false, 100).expect("history");
    assert_seqs(&page, conv, (151..=250).rev());
    let page = b.history(conv, 150, false, 100).expect("history");
    assert_seqs(&page, conv, (51..=150).rev());
    let page = b.history(conv, 50, false, 100).expect("history");
    assert_seqs(&page, conv, (1..=50).rev());
    assert!(b.history(conv, 0, false, 100).expect("history").is_empty());
    assert_seqs(
        &b.history(conv, 10, false, 5).expect("history"),
        conv,
        (6..=10).rev(),
    );
    assert_seqs(&b.history(conv, 249, true, 10).expect("history"), conv, 249..=250);
    assert!(b.history(conv, 251, true, 10).expect("history").is_empty());

    // The limit is clamped to 200.
    assert_seqs(&a.history(conv, 1, true, 1000).expect("history"), conv, 1..=200);
    assert_seqs(
        &a.history(conv, u64::MAX, false, u32::MAX).expect("history"),
        conv,
        (51..=250).rev(),
    );

    // History moves no cursor: Bob still syncs all 250.
    assert_eq!(raw_sync_all(&mut b, vec![], 250).messages.len(), 250);

    // Non-participants are refused, for 1:1 and group conversations.
    let mut c = server.login_unsynced(&carol);
    assert_eq!(code_of(c.history(conv, 1, true, 10)), ErrorCode::Forbidden);
    assert_eq!(
        code_of(c.history(conv, u64::MAX, false, 10)),
        ErrorCode::Forbidden
    );
    // So is a 1:1 id that is not one: reversed, or with nobody.
    let reversed = ConvId::Direct {
        low: carol.id.max(alice.id),
        high: carol.id.min(alice.id),
    };
    assert_eq!(code_of(c.history(reversed, 1, true, 10)), ErrorCode::Forbidden);
    let nobody = ConvId::direct(carol.id, 1_000_000);
    assert_eq!(code_of(c.history(nobody, 1, true, 10)), ErrorCode::Forbidden);
    let group = a.group_create("history").expect("create");
    let gconv = ConvId::Group { group };
    b.group_join(group).expect("join");
    for i in 1..=3 {
        a.send_group_text(group, &format!("g{i}")).expect("send");
    }
    assert_eq!(code_of(c.history(gconv, 1, true, 10)), ErrorCode::Forbidden);
    assert_seqs(
        &b.history(gconv, u64::MAX, false, 10).expect("history"),
        gconv,
        [3, 2, 1],
    );
    // Joining later still shows what was said before.
    c.group_join(group).expect("join");
    assert_seqs(&c.history(gconv, 1, true, 10).expect("history"), gconv, 1..=3);
    // Leaving revokes access.
    c.group_leave(group).expect("leave");
    assert_eq!(code_of(c.history(gconv, 1, true, 10)), ErrorCode::Forbidden);
}

// 7. The conversation list.

#[test]
fn conversation_list_counts_unread_and_orders_by_recency() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login_unsynced(&bob);
    let mut c = server.login_unsynced(&carol);
    let with_alice = ConvId::direct(alice.id, bob.id);
    let with_carol = ConvId::direct(bob.id, carol.id);
    let group = a.group_create("news").expect("create");
    let gconv = ConvId::Group { group };
    b.group_join(group).expect("join");

    assert!(b
        .conversations(0, 50)
        .expect("list")
        .iter()
        .all(|s| s.conv == gconv));
    // Timestamps are in milliseconds: space the conversations out.
    let gap = || thread::sleep(Duration::from_millis(15));
    for i in 1..=3 {
        a.send_text(bob.id, &format!("from alice {i}")).expect("send");
    }
    gap();
    a.send_group_text(group, "news 1").expect("send");
    a.send_group_text(group, "news 2").expect("send");
    gap();
    c.send_text(bob.id, "from carol").expect("send");

    let list = b.conversations(0, 50).expect("list");
    let order: Vec<ConvId> = list.iter().map(|s| s.conv).collect();
    assert_eq!(order, vec![with_carol, gconv, with_alice]);
    let counts: Vec<(u64, u64)> = list.iter().map(|s| (s.last_seq, s.unread)).collect();
    assert_eq!(counts, vec![(1, 1), (2, 2), (3, 3)]);
    let last = |i: usize| {
        list[i]
            .last_message
            .as_ref()
            .expect("last message")
            .content
            .clone()
    };
    assert_eq!(last(0), Content::text("from carol"));
    assert_eq!(last(1), Content::text("news 2"));
    assert_eq!(last(2), Content::text("from alice 3"));
    assert_eq!(list[0].last_message.as_ref().map(|m| m.from), Some(carol.id));

    // Reading moves unread; delivered alone does not.
    b.receipt(with_alice, ReceiptKind::Delivered, 3).expect("receipt");
    b.receipt(with_alice, ReceiptKind::Read, 1).expect("receipt");
    b.receipt(gconv, ReceiptKind::Read, 2).expect("receipt");
    let list = b.conversations(0, 50).expect("list");
    let unread: Vec<(ConvId, u64)> = list.iter().map(|s| (s.conv, s.unread)).collect();
    assert_eq!(unread, vec![(with_carol, 1), (gconv, 0), (with_alice, 2)]);

    // A new message moves its conversation to the front.
    gap();
    a.send_text(bob.id, "from alice 4").expect("send");
    let list = b.conversations(0, 50).expect("list");
    let order: Vec<(ConvId, u64)> = list.iter().map(|s| (s.conv, s.unread)).collect();
    assert_eq!(order, vec![(with_alice, 3), (with_carol, 1), (gconv, 0)]);

    // Paging.
    let page = b.conversations(1, 1).expect("list");
    assert_eq!(page.iter().map(|s| s.conv).collect::<Vec<_>>(), vec![with_carol]);
    assert!(b.conversations(3, 10).expect("list").is_empty());
    // (A late joiner's view of the group: see
    // `joining_a_group_replays_nothing_even_right_away`.)
}

// 8. Groups.

#[test]
fn group_messages_reach_offline_members_and_not_earlier_than_their_join() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let mut a = server.login_unsynced(&alice);
    let group = a.group_create("team").expect("create");
    let gconv = ConvId::Group { group };
    let mut b = server.login_unsynced(&bob);
    b.group_join(group).expect("join");
    drop(b);
    let mut c = server.login(&carol);
    c.group_join(group).expect("join");

    // Bob is offline, Carol live.
    let acks = send_pipelined(&mut a, To::Group(group), &ids(1, 5), 5);
    assert!(acks.iter().map(|a| a.seq).eq(1..=5));
    assert_seqs(&raw_messages(&mut c, 5), gconv, 1..=5);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 5);
    assert_seqs(&sync.messages, gconv, 1..=5);
    assert_eq!(sync.messages[4].content, Content::text(text_of(5)));

    // Dave joins after 5, goes offline, misses 6 and 7.
    let mut d = server.login_unsynced(&dave);
    d.group_join(group).expect("join");
    drop(d);
    send_pipelined(&mut a, To::Group(group), &ids(6, 2), 2);
    assert_seqs(&raw_messages(&mut b, 2), gconv, 6..=7);
    assert_seqs(&raw_messages(&mut c, 2), gconv, 6..=7);
    let mut d = server.login_unsynced(&dave);
    let sync = raw_sync_all(&mut d, vec![], 2);
    assert_seqs(&sync.messages, gconv, 6..=7);
    // History still has what was said before he joined.
    assert_seqs(
        &d.history(gconv, u64::MAX, false, 50).expect("history"),
        gconv,
        (1..=7).rev(),
    );
    // The sender's own sessions: none of her messages came back to `a`.
    expect_quiet(&mut [&mut a, &mut b, &mut c, &mut d]);
}

#[test]
fn large_groups_are_caught_up_by_read_diffusion_without_duplicates() {
    let server = TestServer::start_with(|c| c.write_diffusion_max_members = 2);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let mut a = server.login_unsynced(&alice);
    let group = a.group_create("big").expect("create");
    let gconv = ConvId::Group { group };
    for user in [&bob, &carol, &dave] {
        let mut client = server.login_unsynced(user);
        client.group_join(group).expect("join");
    }
    let mut c = server.login(&carol);

    send_pipelined(&mut a, To::Group(group), &ids(1, 30), 10);
    assert_seqs(&raw_messages(&mut c, 30), gconv, 1..=30);

    // Bob, offline, gets all 30 from the group history.
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 30);
    assert_eq!(sync.sync_done, 30);
    assert_seqs(&sync.messages, gconv, 1..=30);
    // He acknowledges 20 and leaves; 31..=35 come meanwhile.
    b.receipt(gconv, ReceiptKind::Delivered, 20).expect("receipt");
    drop(b);
    send_pipelined(&mut a, To::Group(group), &ids(31, 5), 5);
    assert_seqs(&raw_messages(&mut c, 5), gconv, 31..=35);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 15);
    assert_seqs(&sync.messages, gconv, 21..=35);
    // All acknowledged: the next login streams nothing.
    b.receipt(gconv, ReceiptKind::Delivered, 35).expect("receipt");
    drop(b);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages.len());
    // And live delivery to him works after that sync.
    send_pipelined(&mut a, To::Group(group), &ids(36, 1), 1);
    assert_seqs(&raw_messages(&mut b, 1), gconv, [36]);
    assert_seqs(&raw_messages(&mut c, 1), gconv, [36]);

    // Dave presents a cursor of his own instead of acknowledging.
    let mut d = server.login_unsynced(&dave);
    let sync = raw_sync_all(&mut d, vec![cursor(gconv, 10)], 26);
    assert_seqs(&sync.messages, gconv, 11..=36);
    expect_quiet(&mut [&mut b, &mut c, &mut d]);
}

#[test]
fn group_growing_past_the_write_diffusion_threshold_loses_nothing() {
    // Write diffusion while small (messages also in the inbox), read
    // diffusion once large: an offline member needs both, once each.
    let server = TestServer::start_with(|c| c.write_diffusion_max_members = 2);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login_unsynced(&alice);
    let group = a.group_create("growing").expect("create");
    let gconv = ConvId::Group { group };
    server.login_unsynced(&bob).group_join(group).expect("join");
    send_pipelined(&mut a, To::Group(group), &ids(1, 5), 5);
    for name in ["carol", "dave"] {
        let user = server.user_on_shard(name, 0);
        server.login_unsynced(&user).group_join(group).expect("join");
    }
    send_pipelined(&mut a, To::Group(group), &ids(6, 5), 5);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 10);
    assert_seqs(&sync.messages, gconv, 1..=10);
}

#[test]
fn group_shrinking_below_the_write_diffusion_threshold_loses_nothing() {
    // Read diffusion while large (history only), then write diffusion once
    // members left (inbox too): an offline member must still get 1..=10.
    let server = TestServer::start_with(|c| c.write_diffusion_max_members = 2);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let mut a = server.login_unsynced(&alice);
    let group = a.group_create("shrinking").expect("create");
    let gconv = ConvId::Group { group };
    for user in [&bob, &carol, &dave] {
        server.login_unsynced(user).group_join(group).expect("join");
    }
    send_pipelined(&mut a, To::Group(group), &ids(1, 5), 5);
    for user in [&carol, &dave] {
        server.login_unsynced(user).group_leave(group).expect("leave");
    }
    send_pipelined(&mut a, To::Group(group), &ids(6, 5), 5);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 10);
    assert_seqs(&sync.messages, gconv, 1..=10);
}

#[test]
fn joining_a_group_replays_nothing_even_right_away() {
    // The join answer must not come before the joiner's cursors are
    // stored: a sync or a conversation list right after it must already
    // see them at the group's seq.
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let mut a = server.login_unsynced(&alice);
    let group = a.group_create("busy").expect("create");
    let gconv = ConvId::Group { group };
    send_pipelined(&mut a, To::Group(group), &ids(1, 20), 20);
    for (i, shard) in [0, 1, 0, 1].into_iter().enumerate() {
        let user = server.user_on_shard(&format!("joiner{i}_"), shard);
        let mut j = server.login_unsynced(&user);
        j.group_join(group).expect("join");
        let sync = raw_sync_all(&mut j, vec![], 0);
        assert!(
            sync.messages.is_empty(),
            "joiner #{i} was replayed {} messages from before the join",
            sync.messages.len()
        );
        let list = j.conversations(0, 10).expect("list");
        assert_eq!(
            (list[0].conv, list[0].last_seq, list[0].unread),
            (gconv, 20, 0),
            "joiner #{i} sees old messages as unread"
        );
    }
}

// 9. Async durability.

#[test]
fn async_durability_delivers_live_offline_and_after_a_restart() {
    let mut server = TestServer::start_with(|c| {
        c.durability = tern_storage::Durability::Async {
            flush_interval: Duration::from_millis(50),
        }
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login(&bob);
    let acks = send_pipelined(&mut a, To::User(bob.id), &ids(1, 10), 10);
    assert!(acks.iter().map(|a| a.seq).eq(1..=10));
    assert_seqs(&messages(&mut b, 10), conv, 1..=10);
    b.ack_all().expect("ack");
    drop(b);

    send_pipelined(&mut a, To::User(bob.id), &ids(11, 10), 5);
    let mut b = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut b, vec![], 10).messages, conv, 11..=20);
    drop((a, b));

    server.restart();
    let mut a = server.login_unsynced(&alice);
    let again = a.send_direct(bob.id, 5, Content::text("x")).expect("retry");
    assert_eq!(
        (again.seq, again.timestamp_ms),
        (acks[4].seq, acks[4].timestamp_ms),
        "dedup survives the restart"
    );
    let next = a.send_text(bob.id, "after restart").expect("send");
    assert_eq!(next.seq, 21);
    let mut b = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut b, vec![], 11).messages, conv, 11..=21);
}

// 10. Inbox expiry.

#[test]
fn expired_inbox_entries_leave_sync_but_not_history() {
    let ttl = Duration::from_millis(1000);
    let server = TestServer::start_with(|c| {
        c.inbox_ttl = ttl;
        c.expiry_interval = Duration::from_millis(100);
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);
    a.send_text(bob.id, "old").expect("send");
    // Past the ttl and a few sweeps.
    thread::sleep(ttl + Duration::from_millis(600));
    let fresh = a.send_text(bob.id, "fresh").expect("send");
    assert_eq!(fresh.seq, 2);

    // Well within the ttl of the fresh one: it must still be there.
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 1);
    assert_seqs(&sync.messages, conv, [2]);
    assert_eq!(sync.messages[0].content, Content::text("fresh"));
    let history = b.history(conv, 1, true, 10).expect("history");
    assert_seqs(&history, conv, 1..=2);
    assert_eq!(history[0].content, Content::text("old"));
}

/// A group's catch-up reads the group's history, so a group message whose
/// inbox entry expired is still streamed, to a member and to a former
/// member within their departure, where a 1:1 one is not (above; storage.md
/// "Retention").
#[test]
fn expired_inbox_entries_of_a_group_are_still_caught_up_from_history() {
    let ttl = Duration::from_millis(1000);
    let server = TestServer::start_with(|c| {
        c.inbox_ttl = ttl;
        c.expiry_interval = Duration::from_millis(100);
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let mut a = server.login_unsynced(&alice);
    let group = a.group_create("small").expect("create");
    let gconv = ConvId::Group { group };
    for user in [&bob, &carol] {
        server.login_unsynced(user).group_join(group).expect("join");
    }
    a.send_group_text(group, "old").expect("send");
    thread::sleep(ttl + Duration::from_millis(600));
    a.send_group_text(group, "fresh").expect("send");
    a.group_kick(group, carol.id).expect("kick");
    for user in [&bob, &carol] {
        let mut client = server.login_unsynced(user);
        let sync = raw_sync_all(&mut client, vec![], 2);
        assert_seqs(&sync.messages, gconv, 1..=2);
        assert_eq!(sync.messages[0].content, Content::text("old"));
    }
}

/// A 1:1 receipt cannot claim more than was sent: its seq is capped at the
/// conversation's last, in the push and in the stored cursor. Between two
/// users one of whom blocks the other, a receipt is stored for its sender
/// but pushed to neither (protocol.md 2.8.5, 2.8.10).
#[test]
fn direct_receipts_are_capped_at_the_last_seq_and_not_pushed_across_a_block() {
    let server = TestServer::start();
    let alice = server.user_on_shard("capalice", 0);
    let bob = server.user_on_shard("capbob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    // Before any message there is nothing to acknowledge or push.
    b.receipt(conv, ReceiptKind::Read, 5).expect("receipt of nothing");
    a.send_text(bob.id, "hi").expect("send");
    assert_eq!(expect_message(&mut b).seq, 1);
    b.receipt(conv, ReceiptKind::Read, 424_242).expect("receipt");
    assert_eq!(expect_receipt(&mut a), (conv, bob.id, ReceiptKind::Read, 1));
    let summary = a.conversations(0, 10).expect("conversations");
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].peer_read, 1, "{summary:?}");
    // A message after the capped receipt is still streamed to a new device.
    a.send_text(bob.id, "after").expect("send");
    assert_eq!(expect_message(&mut b).seq, 2);
    let mut fresh = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut fresh, vec![], 1).messages, conv, 2..=2);
    drop(fresh);

    a.block_user(bob.id).expect("block");
    b.receipt(conv, ReceiptKind::Read, 2)
        .expect("stored for the blocked user");
    a.receipt(conv, ReceiptKind::Read, 2)
        .expect("stored for the blocker");
    assert!(next_raw_push(&mut a, Duration::from_millis(300)).is_none());
    assert!(next_raw_push(&mut b, Duration::from_millis(300)).is_none());
    let mut fresh = server.login_unsynced(&bob);
    assert_eq!(
        raw_sync_all(&mut fresh, vec![], 0).messages.len(),
        0,
        "bob's receipt was stored"
    );
}

/// A `Sync` cursor is a delivered receipt (protocol.md 2.8.2), and in a
/// 1:1 conversation a receipt cannot claim more than was sent: the cursor
/// is stored capped at the last seq, so a cursor ahead of the server (a
/// client's stale or damaged local state) does not hide the messages that
/// come later from the user's other devices. It used to be stored as
/// presented: every later sync of the user skipped the conversation's
/// next messages, up to the cursor, for good.
#[test]
fn a_sync_cursor_past_the_last_seq_is_capped_like_a_receipt() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login_unsynced(&alice);
    a.send_text(bob.id, "one").expect("send");
    a.send_text(bob.id, "two").expect("send");

    // One device presents a cursor far ahead: this sync streams nothing.
    let mut ahead = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut ahead, vec![cursor(conv, 424_242)], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages);
    drop(ahead);
    // The cursor was stored (capped at 2): a device with no cursor gets
    // nothing of 1..=2.
    common::eventually("the cursor stored", || {
        let mut probe = server.login_unsynced(&bob);
        (raw_sync_all(&mut probe, vec![], 0).messages.is_empty()).then_some(())
    });
    let summary = a.conversations(0, 10).expect("conversations");
    assert_eq!((summary[0].last_seq, summary[0].peer_delivered), (2, 2));

    // What comes next reaches every device of Bob's.
    for text in ["three", "four"] {
        a.send_text(bob.id, text).expect("send");
    }
    let mut fresh = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut fresh, vec![], 2);
    assert_seqs(&sync.messages, conv, 3..=4);
    assert_eq!(sync.messages[0].content, Content::text("three"));
    // The same with a cursor ahead before the first message: nothing is
    // stored, and the first message is still streamed.
    let carol = server.user_on_shard("carol", 0);
    let first = ConvId::direct(carol.id, bob.id);
    let mut b = server.login_unsynced(&bob);
    let cursors = vec![cursor(first, 9), cursor(conv, 4)];
    assert!(raw_sync_all(&mut b, cursors, 0).messages.is_empty());
    drop(b);
    // (The cursor is staged in the background: let its commit land.)
    thread::sleep(Duration::from_millis(200));
    server
        .login_unsynced(&carol)
        .send_text(bob.id, "hello")
        .expect("send");
    let mut fresh = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut fresh, vec![], 1).messages, first, [1]);
}

/// The same for groups, small (write diffusion: the inbox) and large
/// (read diffusion: the history after the cursor): a receipt or a `Sync`
/// cursor past the group's last seq is stored capped at it, so the
/// group's next messages still reach the member's other devices and
/// count as unread. Both used to be stored as sent: the next messages, up
/// to the cursor, were skipped by every later sync and never unread.
#[test]
fn group_receipts_and_cursors_past_the_last_seq_are_capped() {
    let server = TestServer::start_with(|c| c.write_diffusion_max_members = 2);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login_unsynced(&alice);
    let small = a.group_create("small").expect("create");
    let large = a.group_create("large").expect("create");
    let (small_conv, large_conv) = (ConvId::Group { group: small }, ConvId::Group { group: large });
    let mut b = server.login_unsynced(&bob);
    for group in [small, large] {
        b.group_join(group).expect("join");
    }
    for name in ["carol", "dave"] {
        let user = server.user_on_shard(name, 0);
        server.login_unsynced(&user).group_join(large).expect("join");
    }
    // Before any message there is nothing to acknowledge.
    b.receipt(small_conv, ReceiptKind::Read, 7)
        .expect("receipt of nothing");
    send_pipelined(&mut a, To::Group(small), &ids(1, 2), 2);
    send_pipelined(&mut a, To::Group(large), &ids(1, 2), 2);
    let sync = raw_sync_all(&mut b, vec![cursor(large_conv, 424_242)], 2);
    assert_seqs(&sync.messages, small_conv, 1..=2);
    b.receipt(small_conv, ReceiptKind::Read, 424_242)
        .expect("receipt");
    drop(b);
    common::eventually("the cursors stored", || {
        let mut probe = server.login_unsynced(&bob);
        (raw_sync_all(&mut probe, vec![], 0).messages.is_empty()).then_some(())
    });

    send_pipelined(&mut a, To::Group(small), &ids(3, 2), 2);
    send_pipelined(&mut a, To::Group(large), &ids(3, 2), 2);
    let mut fresh = server.login_unsynced(&bob);
    let list = fresh.conversations(0, 10).expect("conversations");
    for summary in &list {
        // Read up to 2 in the small group; nothing read in the large one.
        let unread = if summary.conv == small_conv { 2 } else { 4 };
        assert_eq!((summary.last_seq, summary.unread), (4, unread), "{summary:?}");
    }
    let sync = raw_sync_all(&mut fresh, vec![], 4);
    for conv in [small_conv, large_conv] {
        let got: Vec<_> = sync.messages.iter().filter(|m| m.conv == conv).cloned().collect();
        assert_seqs(&got, conv, 3..=4);
    }
}

#[test]
fn cursors_and_receipts_at_the_top_of_the_seq_range_end_the_catch_up() {
    // A cursor or receipt of u64::MAX once made the catch-up's next seq
    // overflow: a panic in debug builds, and in release builds a history
    // scan that re-read its first page forever, holding a blocking thread.
    // More messages than a sync page, so the scan has to page.
    let server = TestServer::start_with(|c| c.sync_page = 4);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let group = a.group_create("top").expect("create");
    server.login(&bob).group_join(group).expect("join");
    let (in_group, direct) = (ConvId::Group { group }, ConvId::direct(alice.id, bob.id));
    for i in 0..10 {
        a.send_group_text(group, &format!("g{i}")).expect("group send");
        a.send_text(bob.id, &format!("d{i}")).expect("direct send");
    }

    let mut top = server.login_unsynced(&bob);
    top.set_cursor(in_group, u64::MAX);
    top.set_cursor(direct, u64::MAX);
    assert_eq!(top.sync().expect("a sync from the top ends"), 0);
    top.receipt(in_group, ReceiptKind::Read, u64::MAX)
        .expect("group receipt");
    top.receipt(direct, ReceiptKind::Read, u64::MAX)
        .expect("direct receipt");
    let mut fresh = server.login_unsynced(&bob);
    assert_eq!(fresh.sync().expect("a sync from stored top cursors ends"), 0);
    a.ping().expect("the server carries on");
}

#[test]
fn a_direct_receipt_never_covers_a_message_not_yet_stored() {
    // A receipt is capped at what the server holds; for a 1:1 conversation
    // the cap came from the seqs its home shard had handed out, stored or
    // not. A "mark everything" receipt (u64::MAX) could then be stored and
    // pushed for a message still being written: had that write failed, or
    // the server died before it, the seq would have gone to the next
    // message, which the reader's cursor then hid from every Sync. Here the
    // conversation is homed on alice's shard and bob's receipts are staged
    // on his own, while alice keeps messages in flight: a receipt push
    // must never name a seq before alice's ack for it (the commit that
    // stores a message acks it before any receipt can see it stored).
    const ROUNDS: u64 = 24;
    const BURST: u64 = 64;
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_where("bob", |b| {
        b.home(server.shards()) == 1 && ConvId::direct(alice.id, b.id).placement_key() == alice.id
    });
    let conv = ConvId::direct(alice.id, bob.id);
    let mut a = server.login(&alice);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receipts = {
        let stop = Arc::clone(&stop);
        let mut b = server.login_unsynced(&bob);
        thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                b.receipt(conv, ReceiptKind::Delivered, u64::MAX)
                    .expect("receipt");
                sent += 1;
            }
            sent
        })
    };
    let mut acked = 0u64;
    let mut pushed = 0u64;
    for round in 0..ROUNDS {
        let ids: Vec<u64> = (round * BURST + 1..=(round + 1) * BURST).collect();
        let mut out = rkyv::util::AlignedVec::new();
        for &id in &ids {
            let frame = tern_proto::ClientFrame {
                request_id: (1 << 40) + id,
                body: ClientBody::SendDirect {
                    to: bob.id,
                    client_msg_id: id,
                    content: tern_client::Content::text(text_of(id)),
                },
            };
            tern_proto::encode_client(&frame, &mut out, 1 << 20).expect("encode");
        }
        a.send_raw(&out).expect("send burst");
        let mut waiting = ids.len();
        while waiting > 0 {
            let frame = a
                .read_frame(TIMEOUT)
                .expect("connection")
                .unwrap_or_else(|| panic!("{waiting} acks missing"));
            match frame.body {
                ServerBody::Sent { seq, .. } => {
                    acked = acked.max(seq);
                    waiting -= 1;
                }
                ServerBody::Receipt { user, seq, .. } => {
                    assert_eq!(user, bob.id);
                    assert!(
                        seq <= acked,
                        "a receipt for seq {seq} came before the ack of it (acked up to {acked})"
                    );
                    pushed += 1;
                }
                ServerBody::Presence { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = receipts.join().expect("receipt thread");
    assert_eq!(acked, ROUNDS * BURST);
    assert!(sent > 0 && pushed > 0, "receipts sent {sent}, pushed {pushed}");
}

#[test]
fn receipts_and_cursors_for_conversations_not_ones_own_are_refused_or_ignored() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login(&alice);
    let group = a.group_create("closed circle").expect("create");
    a.send_text(bob.id, "hello").expect("send");
    let nobody = u64::MAX - 7;
    let not_mine = [
        ConvId::direct(alice.id, carol.id),
        ConvId::direct(alice.id, nobody),
        // The right pair, spelled backwards: names no stored conversation.
        ConvId::Direct {
            low: alice.id.max(bob.id),
            high: alice.id.min(bob.id),
        },
        ConvId::Group { group },
    ];
    let mut b = server.login_unsynced(&bob);
    for conv in not_mine {
        assert_eq!(
            code_of(b.receipt(conv, ReceiptKind::Read, 1)),
            ErrorCode::Forbidden,
            "{conv:?}"
        );
        b.set_cursor(conv, 5);
    }
    // Cursors for them are ignored: the sync streams bob's own message.
    assert_eq!(b.sync().expect("sync"), 1);
    let got = expect_message(&mut b);
    assert_eq!((got.conv, got.seq), (ConvId::direct(alice.id, bob.id), 1));
    b.receipt(got.conv, ReceiptKind::Read, 1)
        .expect("own conversation");
}

#[test]
fn a_cursor_acknowledges_what_the_inbox_holds_of_a_group_one_has_left() {
    // Messages of a small group wait in the member's inbox until
    // acknowledged; after leaving, both a Receipt (for what the departure
    // still owes, 2.8.8) and the cursor in Sync acknowledge them.
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let group = a.group_create("left behind").expect("create");
    let conv = ConvId::Group { group };
    let mut b = server.login(&bob);
    b.group_join(group).expect("join");
    for i in 0..3 {
        a.send_group_text(group, &format!("m{i}")).expect("send");
        assert_eq!(expect_message(&mut b).conv, conv);
    }
    b.group_leave(group).expect("leave");
    b.receipt(conv, ReceiptKind::Delivered, 2)
        .expect("a former member's receipt for what is owed");
    drop(b);
    let mut again = server.login_unsynced(&bob);
    again.set_cursor(conv, 3);
    assert_eq!(again.sync().expect("sync"), 0, "the cursor bounds this sync");
    // ... and stored (receipts commit in the background): a device
    // without the cursor then gets nothing either.
    common::eventually("the cursor stored", || {
        let mut probe = server.login_unsynced(&bob);
        (probe.sync().expect("sync") == 0).then_some(())
    });
}

/// A join writes the membership and the joiner's starting cursors in one
/// batch: a `Sync` from the joiner's other device, running while the join
/// commits, must never stream the group's messages from before the join
/// (2.8.2, 2.8.8), and a crash right after the join must not leave the
/// new member with a cursor of 0 either. Before, the cursors followed in a
/// second write, and a watcher syncing in a loop saw pre-join messages
/// (12 within 150 joins).
#[test]
fn a_sync_during_a_join_never_streams_the_group_from_before_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    const GROUPS: usize = 120;
    const BEFORE_JOIN: u64 = 3;
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login_unsynced(&alice);
    let mut joiner = server.login_unsynced(&bob);
    let mut watcher = server.login_unsynced(&bob);
    let stop = Arc::new(AtomicBool::new(false));
    // Groups whose pre-join messages are all stored, and what the watcher
    // was streamed of them.
    let joining = Arc::new(Mutex::new(std::collections::HashSet::<u64>::new()));
    let watch = {
        let (stop, joining) = (stop.clone(), joining.clone());
        thread::spawn(move || {
            let mut replayed = Vec::new();
            let mut syncs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = (1u64 << 50) + syncs;
                let mut out = rkyv::util::AlignedVec::new();
                let frame = tern_client::ClientFrame {
                    request_id: id,
                    body: ClientBody::Sync { cursors: vec![] },
                };
                tern_proto::encode_client(&frame, &mut out, 1 << 20).expect("encode");
                watcher.send_raw(&out).expect("send");
                loop {
                    match watcher.read_frame(TIMEOUT).expect("read") {
                        Some(ServerFrame {
                            body: ServerBody::Message(m),
                            ..
                        }) => {
                            if let ConvId::Group { group } = m.conv {
                                if m.seq <= BEFORE_JOIN && joining.lock().expect("lock").contains(&group) {
                                    replayed.push((group, m.seq));
                                }
                            }
                        }
                        Some(ServerFrame {
                            request_id,
                            body: ServerBody::SyncDone { .. },
                        }) if request_id == id => break,
                        Some(_) => {}
                        None => panic!("no SyncDone"),
                    }
                }
                syncs += 1;
            }
            (syncs, replayed)
        })
    };
    for _ in 0..GROUPS {
        let group = a.group_create("g").expect("create");
        send_pipelined(
            &mut a,
            To::Group(group),
            &ids(1, BEFORE_JOIN),
            BEFORE_JOIN as usize,
        );
        joining.lock().expect("lock").insert(group);
        joiner.group_join(group).expect("join");
    }
    stop.store(true, Ordering::Relaxed);
    let (syncs, replayed) = watch.join().expect("watcher");
    assert!(syncs > 0, "the watcher never synced");
    assert!(
        replayed.is_empty(),
        "{} pre-join messages streamed in {syncs} syncs: {:?}",
        replayed.len(),
        &replayed[..replayed.len().min(20)]
    );
}
