//! A recipient that stops reading is cut off once its outbound queue
//! overflows, without holding up the sender or anyone else.
//!
//! (A second device of the recipient that reads in a thread is *not* used
//! as a witness: with an 8 KiB queue and ~2 KiB messages arriving every
//! ~70 µs, a reader descheduled for a few milliseconds legitimately
//! overflows too.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_client::{Content, ErrorCode, ServerBody};

const MESSAGE_BYTES: usize = 2000;

/// Enough messages to overflow the server's socket send buffer (which
/// autotunes up to `tcp_wmem`'s maximum) plus the stalled client's small
/// receive buffer plus the outbound queue, with a margin.
fn blast_count() -> u64 {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(4 << 20);
    (wmem_max + (1 << 20)) / MESSAGE_BYTES as u64
}
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_recipient_that_stops_reading_is_disconnected_and_nobody_else_suffers() {
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 4096;
        c.max_message_bytes = 2048;
        c.outbound_queue_bytes = 8192;
        c.write_timeout = WRITE_TIMEOUT;
        // Thousands of sequential sends: do not fsync each one.
        c.durability = tern_engine::config::Durability::Async {
            flush_interval: Duration::from_millis(100),
        };
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let mut a = server.login(&alice);
    let mut c = server.login(&carol);
    // A pair that keeps chatting during the blast, one of them on Bob's shard.
    let mut pair = Pair::new(&server, "bystander");
    // Bob's stalled device: a small, fixed receive buffer, and it never reads.
    let mut stalled = RawConn::connect_small_rcvbuf(server.addr(), 4096);
    assert!(stalled.login_and_sync(&bob).is_empty());

    let blast = blast_count();
    assert!(
        blast < 20_000,
        "tcp_wmem allows {blast} messages in flight; too many for this test"
    );
    let started = Instant::now();
    let body = vec![b'm'; MESSAGE_BYTES];
    for i in 1..=blast {
        let ack = a
            .send_direct(bob.id, i, Content::text(body.clone()))
            .unwrap_or_else(|e| panic!("sender stalled or failed at message {i}: {e}"));
        assert_eq!(ack.seq, i);
        if i % 100 == 0 {
            pair.exchange();
        }
    }
    let blast_took = started.elapsed();

    // The stalled device got a prefix of the conversation, then (if it reads
    // before the server's write timeout gives up on it) the SlowConsumer
    // notice, then the end of the stream.
    let mut delivered = 0;
    let mut notice = None;
    loop {
        match stalled.read(TIMEOUT) {
            RawRead::Frame(frame) => match frame.body {
                ServerBody::Message(msg) => {
                    assert!(notice.is_none(), "message after the Disconnect");
                    delivered += 1;
                    assert_eq!(msg.seq, delivered, "deliveries must be a gap-free prefix");
                    assert_eq!(msg.content.body.len(), MESSAGE_BYTES);
                }
                ServerBody::Disconnect { code, .. } => {
                    assert!(notice.is_none(), "two Disconnects");
                    notice = Some(code);
                }
                ServerBody::Presence { .. } => {}
                other => panic!("stalled device got {other:?}"),
            },
            RawRead::Closed => break,
            RawRead::Timeout => panic!("stalled device still connected after {delivered} messages"),
        }
    }
    assert!(
        delivered < blast,
        "all {blast} messages fit in the buffers; the test did not overflow anything"
    );
    if blast_took + Duration::from_secs(2) < WRITE_TIMEOUT {
        assert_eq!(
            notice,
            Some(ErrorCode::SlowConsumer),
            "after {delivered} messages"
        );
    } else if let Some(code) = notice {
        assert_eq!(code, ErrorCode::SlowConsumer);
    }

    // Everyone else carries on: the sender, Carol on Bob's shard, the
    // bystanders, and a new device of Bob's.
    a.send_text(carol.id, "still working").expect("send to carol");
    assert_eq!(expect_message(&mut c).content.body, b"still working");
    // A new device of Bob's catches up on everything the stalled one missed
    // (nothing was acknowledged), gap-free, then gets live messages.
    let mut bob3 = server.login(&bob);
    let ack = a.send_text(bob.id, "welcome back").expect("send to bob");
    assert_eq!(ack.seq, blast + 1);
    for seq in 1..=blast + 1 {
        let msg = expect_message(&mut bob3);
        assert_eq!(msg.seq, seq, "catch-up then live, in order");
    }
    c.send_text(alice.id, "hi alice").expect("carol sends");
    assert_eq!(expect_message(&mut a).content.body, b"hi alice");
    pair.exchange();
}

/// A session cut off as a slow consumer stays listed until its writer gives
/// up on the full socket (the write timeout), but no longer counts toward
/// its user's session limit, so the user's next device logs in. Closing
/// sessions have a bound of their own, as many again as the limit: past it
/// even a device resuming its own session waits.
#[test]
fn a_closing_session_frees_its_slot_and_closing_sessions_are_bounded() {
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 4096;
        c.max_message_bytes = 2048;
        // Far more than a tick's pushes: the queue overflows only once the
        // writer is stuck on a full socket, where it then stays for the
        // whole test.
        c.outbound_queue_bytes = 256 * 1024;
        c.write_timeout = Duration::from_secs(60);
        c.max_sessions_per_user = 1;
        c.durability = tern_engine::config::Durability::Async {
            flush_interval: Duration::from_millis(100),
        };
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let mut stalled = RawConn::connect_small_rcvbuf(server.addr(), 4096);
    assert!(stalled.login_and_sync(&bob).is_empty());
    let cut_off = || {
        (0..server.shards())
            .map(|shard| {
                server
                    .metrics
                    .shard(shard)
                    .slow_consumer_disconnects
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum::<u64>()
    };
    let body = vec![b'm'; MESSAGE_BYTES];
    let mut sent = 0;
    while cut_off() == 0 {
        sent += 1;
        assert!(sent <= 20_000, "the stalled session was never cut off");
        a.send_direct(bob.id, sent, Content::text(body.clone()))
            .expect("send to bob");
    }
    // Closing, still listed: the new device is let in all the same.
    let mut phone = server.connect();
    let token = phone
        .login(&bob.name, PASSWORD)
        .expect("a new device while the old session closes")
        .token;
    // One open and one closing at a limit of one: nothing more, not even
    // the phone resuming its own session, until the closing one is gone.
    match server.connect().login_token(&token) {
        Err(tern_client::ClientError::Server { code, message, .. }) => {
            assert_eq!(code, ErrorCode::LimitExceeded);
            assert!(message.contains("still closing"), "{message}");
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    phone.ping().expect("the phone's session is untouched");
    drop(stalled);
}
