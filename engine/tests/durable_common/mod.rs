//! Helpers for the durable-messaging tests (`durable.rs`): an in-process
//! server on a real store in a temporary directory that can be restarted on
//! the same directory, users placed on chosen home shards, pipelined senders
//! (so that backlogs of thousands of messages take one group commit per
//! window, not one fsync each), and raw readers that look at every frame the
//! server sends, bypassing the client library's cursor-based dedup so that a
//! duplicate sent by the server cannot hide.
#![allow(dead_code)] // not every helper is used by every test binary

#[allow(unused_imports)] // not every test binary uses every one
pub use crate::common::{code_of, expect_quiet, TestServer, User, PASSWORD, QUIET, TIMEOUT};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;
use tern_client::{
    ChatMessage, Client, ClientBody, Content, ConvId, Cursor, GroupId, ServerBody, ServerFrame, UserId,
};
use tern_proto::{encode_client, ClientFrame};

/// Request ids used by pipelined sends: far above the ones `Client` hands
/// out, so that its own requests never collide with them.
const PIPELINE_REQUEST_BASE: u64 = 1 << 40;

/// Where a pipelined burst goes.
#[derive(Debug, Clone, Copy)]
pub enum To {
    User(UserId),
    Group(GroupId),
}

/// The text of message `n` of a burst, so receivers can check content.
pub fn text_of(n: u64) -> String {
    format!("message #{n}")
}

/// An acknowledged send: what `Sent` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub client_msg_id: u64,
    pub conv: ConvId,
    pub seq: u64,
    pub timestamp_ms: u64,
}

/// Sends one message per id in `ids` (content [`text_of`] the id), keeping
/// up to `window` requests in flight; returns the acks in id order. The
/// client should be unsynced, or echoes of its own messages would be
/// interleaved (they are skipped, but cost time).
pub fn send_pipelined(client: &mut Client, to: To, ids: &[u64], window: usize) -> Vec<Acked> {
    let mut acks: HashMap<u64, Acked> = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(window.max(1)) {
        let mut out = AlignedVec::new();
        for &id in chunk {
            let content = Content::text(text_of(id));
            let body = match to {
                To::User(to) => ClientBody::SendDirect {
                    to,
                    client_msg_id: id,
                    content,
                },
                To::Group(group) => ClientBody::SendGroup {
                    group,
                    client_msg_id: id,
                    content,
                },
            };
            let frame = ClientFrame {
                request_id: PIPELINE_REQUEST_BASE + id,
                body,
            };
            encode_client(&frame, &mut out, 1 << 20).expect("encode");
        }
        client.send_raw(&out).expect("send burst");
        let mut waiting = chunk.len();
        let deadline = Instant::now() + TIMEOUT;
        while waiting > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = client
                .read_frame(left)
                .expect("read ack")
                .unwrap_or_else(|| panic!("{waiting} acks missing after {TIMEOUT:?}"));
            if frame.request_id < PIPELINE_REQUEST_BASE {
                continue; // a push (an echo, presence, a receipt)
            }
            match frame.body {
                ServerBody::Sent {
                    client_msg_id,
                    conv,
                    seq,
                    timestamp_ms,
                } => {
                    assert_eq!(frame.request_id, PIPELINE_REQUEST_BASE + client_msg_id);
                    let ack = Acked {
                        client_msg_id,
                        conv,
                        seq,
                        timestamp_ms,
                    };
                    assert!(
                        acks.insert(client_msg_id, ack).is_none(),
                        "two acks for {client_msg_id}"
                    );
                    waiting -= 1;
                }
                other => panic!("expected Sent, got {other:?}"),
            }
        }
    }
    ids.iter().map(|id| acks[id]).collect()
}

/// Sync with explicit cursors through the raw request path; returns the
/// `SyncDone` count. Pushes that arrive meanwhile are queued in the client
/// and come back, uninterpreted, from `read_frame`.
pub fn raw_sync(client: &mut Client, cursors: Vec<Cursor>) -> u64 {
    match client.request(ClientBody::Sync { cursors }).expect("sync") {
        ServerBody::SyncDone { messages } => messages,
        other => panic!("expected SyncDone, got {other:?}"),
    }
}

/// Every `Message` frame the server sends until it has been silent for
/// `quiet` (other pushes are skipped). No client-side dedup.
pub fn raw_messages_until_quiet(client: &mut Client, quiet: Duration) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    loop {
        match client.read_frame(quiet) {
            Ok(Some(ServerFrame {
                body: ServerBody::Message(m),
                ..
            })) => messages.push(m),
            Ok(Some(ServerFrame {
                body: ServerBody::Disconnect { code, message, .. },
                ..
            })) => panic!("server disconnected the reader: {code}: {message}"),
            Ok(Some(_)) => {}
            Ok(None) => return messages,
            Err(e) => panic!("reader connection failed: {e}"),
        }
    }
}

/// Exactly `count` raw `Message` frames (other pushes skipped).
pub fn raw_messages(client: &mut Client, count: usize) -> Vec<ChatMessage> {
    let deadline = Instant::now() + TIMEOUT;
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.read_frame(left) {
            Ok(Some(ServerFrame {
                body: ServerBody::Message(m),
                ..
            })) => messages.push(m),
            Ok(Some(_)) => {}
            Ok(None) => panic!("got {} of {count} messages within {TIMEOUT:?}", messages.len()),
            Err(e) => panic!("reader connection failed: {e}"),
        }
    }
    messages
}

/// The next `count` chat messages through the client library (which drops
/// anything at or below its cursors).
pub fn messages(client: &mut Client, count: usize) -> Vec<ChatMessage> {
    let deadline = Instant::now() + TIMEOUT;
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_push(left) {
            Ok(Some(ServerBody::Message(m))) => messages.push(m),
            Ok(Some(_)) => {}
            Ok(None) => panic!("got {} of {count} messages within {TIMEOUT:?}", messages.len()),
            Err(e) => panic!("connection failed while waiting for messages: {e}"),
        }
    }
    messages
}

/// The next chat message through the client library.
pub fn expect_message(client: &mut Client) -> ChatMessage {
    messages(client, 1).remove(0)
}

/// Asserts `messages` are exactly `seqs` of `conv`, in order.
pub fn assert_seqs(messages: &[ChatMessage], conv: ConvId, seqs: impl IntoIterator<Item = u64>) {
    let got: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    let want: Vec<u64> = seqs.into_iter().collect();
    if got != want {
        panic!(
            "wrong seqs: got {} messages {}, want {} messages {}",
            got.len(),
            summarize(&got),
            want.len(),
            summarize(&want)
        );
    }
    for m in messages {
        assert_eq!(m.conv, conv, "message {} in the wrong conversation", m.seq);
    }
}

/// A short description of a seq list: runs of consecutive values.
pub fn summarize(seqs: &[u64]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        runs.push(if start == end {
            format!("{start}")
        } else {
            format!("{start}..={end}")
        });
        i += 1;
        if runs.len() > 20 {
            runs.push("…".into());
            break;
        }
    }
    format!("[{}]", runs.join(", "))
}

/// Consecutive client message ids for a burst, distinct per test user.
pub fn ids(base: u64, count: u64) -> Vec<u64> {
    (base..base + count).collect()
}

/// What a raw sync saw, in wire order.
#[derive(Debug)]
pub struct RawSync {
    /// Every `Message` frame, catch-up and live, until the server fell silent.
    pub messages: Vec<ChatMessage>,
    /// The count `SyncDone` reported.
    pub sync_done: u64,
    /// How many `Message` frames came before `SyncDone`.
    pub before_done: usize,
}

/// Sends `Sync { cursors }` as a raw frame and reads the stream in wire
/// order until `SyncDone` has come, at least `total` messages have, and
/// the server then stays silent for [`QUIET`]. No client-side dedup.
pub fn raw_sync_all(client: &mut Client, cursors: Vec<Cursor>, total: usize) -> RawSync {
    let request_id = PIPELINE_REQUEST_BASE - 1;
    let mut out = AlignedVec::new();
    let frame = ClientFrame {
        request_id,
        body: ClientBody::Sync { cursors },
    };
    encode_client(&frame, &mut out, 1 << 20).expect("encode");
    client.send_raw(&out).expect("send Sync");
    let mut messages = Vec::with_capacity(total);
    let mut done: Option<(u64, usize)> = None;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let complete = done.is_some() && messages.len() >= total;
        let wait = if complete {
            QUIET
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match client.read_frame(wait).expect("reader connection") {
            Some(ServerFrame {
                body: ServerBody::Message(m),
                ..
            }) => messages.push(m),
            Some(ServerFrame {
                request_id: id,
                body: ServerBody::SyncDone { messages: count },
            }) if id == request_id => {
                assert!(done.is_none(), "two SyncDone");
                done = Some((count, messages.len()));
            }
            Some(ServerFrame {
                body: ServerBody::Disconnect { code, message, .. },
                ..
            }) => panic!("server disconnected the syncing session: {code}: {message}"),
            Some(ServerFrame {
                body: ServerBody::Error { code, message, .. },
                ..
            }) => panic!("sync failed: {code}: {message}"),
            Some(_) => {}
            None if complete => break,
            None => panic!(
                "sync incomplete after {TIMEOUT:?}: SyncDone {done:?}, {} of {total} messages",
                messages.len()
            ),
        }
    }
    let (sync_done, before_done) = done.expect("SyncDone seen");
    RawSync {
        messages,
        sync_done,
        before_done,
    }
}

/// Like [`raw_sync_all`] for one conversation, but a session the server
/// drops as too busy (`Disconnect { SlowConsumer }`: live traffic kept
/// outrunning the catch-up) is reopened with the cursor of what arrived,
/// as a client must. Returns every message, in order, and the number of
/// reopened sessions. Each session is checked never to repeat a seq at or
/// below its cursor.
pub fn raw_sync_resuming(
    server: &TestServer,
    user: &User,
    conv: ConvId,
    total: u64,
) -> (Vec<ChatMessage>, u32) {
    let mut messages: Vec<ChatMessage> = Vec::new();
    let mut resyncs = 0;
    let deadline = Instant::now() + TIMEOUT;
    'session: loop {
        let last = messages.last().map_or(0, |m| m.seq);
        let mut client = server.login_unsynced(user);
        let request_id = PIPELINE_REQUEST_BASE - 1;
        let mut out = AlignedVec::new();
        let cursors = if last > 0 {
            vec![Cursor { conv, seq: last }]
        } else {
            vec![]
        };
        let frame = ClientFrame {
            request_id,
            body: ClientBody::Sync { cursors },
        };
        encode_client(&frame, &mut out, 1 << 20).expect("encode");
        client.send_raw(&out).expect("send Sync");
        let mut synced = false;
        loop {
            let complete = synced && messages.last().map_or(0, |m| m.seq) >= total;
            let wait = if complete {
                QUIET
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match client.read_frame(wait) {
                Ok(Some(ServerFrame {
                    body: ServerBody::Message(m),
                    ..
                })) => {
                    assert!(
                        m.seq > last,
                        "seq {} at or below the presented cursor {last}",
                        m.seq
                    );
                    messages.push(m);
                }
                Ok(Some(ServerFrame {
                    request_id: id,
                    body: ServerBody::SyncDone { .. },
                })) if id == request_id => synced = true,
                Ok(Some(ServerFrame {
                    body: ServerBody::Disconnect { code, message, .. },
                    ..
                })) => {
                    assert_eq!(code, tern_client::ErrorCode::SlowConsumer, "{message}");
                    resyncs += 1;
                    continue 'session;
                }
                Ok(Some(_)) => {}
                Ok(None) if complete => return (messages, resyncs),
                Ok(None) => panic!("sync incomplete after {TIMEOUT:?}: {} messages", messages.len()),
                // Closed right after the Disconnect push was read.
                Err(_) => {
                    resyncs += 1;
                    continue 'session;
                }
            }
        }
    }
}
