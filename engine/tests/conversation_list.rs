//! The conversation list of an account with more 1:1 conversations than
//! the list once considered (10,000, by peer id), over real sockets and a
//! real store: the newest come first, pages join up to every
//! conversation exactly once while messages keep arriving, a message
//! moves an old conversation to the top (the engine's recency index, kept
//! without a read per message), a restart keeps the order, and a store
//! written before the index existed is indexed when it opens and lists
//! the same.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{TestServer, PASSWORD};
use fjall::{Database, KeyspaceCreateOptions};
use rkyv::util::AlignedVec;
use tern_client::{ChatMessage, Client, Content, ConvId, ServerBody, ServerFrame, UserId};
use tern_proto::encode_server;
use tern_storage::{InboxTargets, MessageWrite, Store, StoreOptions, WriteOp};

/// More than the 10,000 conversations the list used to consider.
const CUSTOMERS: u64 = 10_050;

/// A message's push frame as the server stores it (it serves it as is).
fn push_frame(conv: ConvId, from: UserId, timestamp_ms: u64) -> Arc<[u8]> {
    let push = ServerFrame {
        request_id: 0,
        body: ServerBody::Message(ChatMessage {
            conv,
            seq: 1,
            from,
            client_msg_id: 1,
            timestamp_ms,
            content: Content::text(format!("hello from {from}")),
        }),
    };
    let mut frame = AlignedVec::new();
    encode_server(&push, &mut frame, u32::MAX).expect("encode");
    frame.as_slice().into()
}

/// Registers the customers (`customer0`, …) in the stopped server's store,
/// each of whom wrote to `support` once, a minute apart, starting ten
/// days ago (so all in the past): the highest ids are the newest. Returns their ids, oldest first.
fn populate(data: &Path, support: UserId) -> Vec<UserId> {
    let opts = StoreOptions {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        fsync: false,
        ..StoreOptions::default()
    };
    let store = Store::open(data, opts).expect("open store");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let start = now - 10 * 24 * 3600 * 1000;
    let mut customers = Vec::new();
    let mut ops = Vec::new();
    for n in 0..CUSTOMERS {
        let customer = store
            .register(&format!("customer{n}"), PASSWORD.as_bytes())
            .expect("register");
        customers.push(customer);
        let conv = ConvId::direct(support, customer);
        let timestamp_ms = start + n * 60_000;
        ops.push(WriteOp::Message(MessageWrite {
            conv,
            seq: 1,
            from: customer,
            client_msg_id: 1,
            timestamp_ms,
            frame: push_frame(conv, customer, timestamp_ms),
            inbox: InboxTargets::One(support),
            moved_from: None,
        }));
        if ops.len() == 1000 {
            store.apply(&ops, false).expect("messages");
            ops.clear();
        }
    }
    store.apply(&ops, false).expect("messages");
    store.persist().expect("persist");
    customers
}

/// Asserts two lists are equal, showing where they part (the lists are
/// too long to print whole).
#[track_caller]
fn assert_same(listed: &[ConvId], expected: &[ConvId], what: &str) {
    let at = listed.iter().zip(expected).position(|(a, b)| a != b);
    if let Some(at) = at {
        let around = |list: &[ConvId]| list[at.saturating_sub(2)..(at + 3).min(list.len())].to_vec();
        panic!(
            "{what}: they part at {at}: {:?} against {:?}",
            around(listed),
            around(expected)
        );
    }
    assert_eq!(listed.len(), expected.len(), "{what}: lengths");
}

/// Every page of 200 (the most one page holds), joined.
fn all_pages(client: &mut Client, mut between: impl FnMut(usize)) -> Vec<ConvId> {
    let mut listed = Vec::new();
    loop {
        let page = client
            .conversations(listed.len() as u32, 200)
            .expect("conversations");
        if page.is_empty() {
            return listed;
        }
        listed.extend(page.iter().map(|s| s.conv));
        between(listed.len());
    }
}

/// The first `n` conversations and a page deep in the list.
fn sample(client: &mut Client) -> (Vec<ConvId>, Vec<ConvId>) {
    let convs = |page: Vec<tern_client::ConversationSummary>| page.iter().map(|s| s.conv).collect();
    let top = convs(client.conversations(0, 200).expect("top"));
    let deep = convs(client.conversations(9_990, 40).expect("deep"));
    (top, deep)
}

/// Wipes the recency index and its backfill record, as in a store
/// written before the index existed.
fn as_before_the_index(data: &Path) {
    let db = Database::builder(data).open().expect("open raw");
    let recent = db
        .keyspace("recent_convs", KeyspaceCreateOptions::default)
        .expect("keyspace");
    let keys: Vec<_> = recent.iter().map(|g| g.key().expect("key")).collect();
    assert_eq!(
        keys.len() as u64,
        2 * (CUSTOMERS + 1),
        "two keys per conversation (one per side), however many messages"
    );
    for key in keys {
        recent.remove(key).expect("remove");
    }
    let meta = db
        .keyspace("meta", KeyspaceCreateOptions::default)
        .expect("keyspace");
    meta.remove("recent_convs_backfill").expect("remove");
    db.persist(fjall::PersistMode::SyncAll).expect("persist");
}

#[test]
fn a_busy_account_lists_its_newest_conversations_first_and_pages_through_all() {
    let server = TestServer::start();
    let mut anon = server.connect();
    let support = anon.register("support", PASSWORD).expect("register");
    let latecomer = anon.register("latecomer", PASSWORD).expect("register");
    drop(anon);
    let dir = server.shutdown();
    let data = dir.path().join("data");
    let customers = populate(&data, support);
    let mut server = TestServer::start_in(dir, |_| {});
    let direct = |peer: UserId| ConvId::direct(support, peer);
    let newest_first: Vec<ConvId> = customers.iter().rev().map(|&c| direct(c)).collect();

    let mut agent = server.connect();
    agent.login_unsynced("support", PASSWORD).expect("login");
    let first = agent.conversations(0, 20).expect("conversations");
    let firsts: Vec<ConvId> = first.iter().map(|s| s.conv).collect();
    assert_eq!(
        firsts,
        newest_first[..20],
        "the newest customers (highest ids) first"
    );
    let summary = &first[0];
    assert_eq!((summary.last_seq, summary.unread), (1, 1));
    let body = summary.last_message.as_ref().map(|m| m.content.body.clone());
    assert_eq!(
        body,
        Some(format!("hello from {}", customers[customers.len() - 1]).into_bytes())
    );

    // Page through everything while customers already listed write again:
    // each moves to the top, ahead of where the pages read, so the rest
    // of the list does not shift and the pages join up exactly.
    let mut writers = Vec::new();
    let listed = all_pages(&mut agent, |seen| {
        let n = writers.len();
        if n < 10 && seen >= 200 {
            // The customer at position 150 - n of the list as it stood.
            let customer = customers[customers.len() - 151 + n];
            let mut client = server.connect();
            client
                .login_unsynced(&format!("customer{}", CUSTOMERS as usize - 151 + n), PASSWORD)
                .expect("customer login");
            let sent = client.send_text(support, "any news?").expect("send");
            assert_eq!(sent.seq, 2);
            writers.push(customer);
        }
    });
    assert_eq!(writers.len(), 10);
    assert_same(&listed, &newest_first, "in order, every conversation once");

    // The ones who wrote are on top now, the last first; the old bucket
    // of each no longer lists it.
    let mut moved: Vec<ConvId> = writers.iter().rev().map(|&c| direct(c)).collect();
    moved.extend(
        newest_first
            .iter()
            .filter(|c| !moved.contains(c))
            .copied()
            .collect::<Vec<_>>(),
    );
    // A brand-new conversation goes first of all.
    let mut late = server.connect();
    late.login_unsynced("latecomer", PASSWORD).expect("login");
    for n in 0..20 {
        let sent = late
            .send_text(support, &format!("first time here ({n})"))
            .expect("send");
        assert_eq!(sent.seq, n + 1);
    }
    moved.insert(0, direct(latecomer));
    let relisted = all_pages(&mut agent, |_| {});
    assert_same(&relisted, &moved, "after the moves");

    // A restart keeps the order.
    let before = sample(&mut agent);
    assert_same(&before.0, &moved[..200], "top");
    assert_same(&before.1, &moved[9_990..10_030], "deep");
    drop((agent, late));
    server.restart();
    let mut agent = server.connect();
    agent.login_unsynced("support", PASSWORD).expect("login");
    let after = sample(&mut agent);
    assert_same(&after.0, &before.0, "top after a restart");
    assert_same(&after.1, &before.1, "deep after a restart");

    // A store from before the index: indexed when it opens, same list.
    drop(agent);
    let dir = server.shutdown();
    as_before_the_index(&dir.path().join("data"));
    let server = TestServer::start_in(dir, |_| {});
    let mut agent = server.connect();
    agent.login_unsynced("support", PASSWORD).expect("login");
    let older = sample(&mut agent);
    assert_same(&older.0, &before.0, "top of an older store");
    assert_same(&older.1, &before.1, "deep in an older store");
    assert_same(&all_pages(&mut agent, |_| {}), &moved, "all of an older store");
    // And it keeps moving conversations as before.
    let mut customer = server.connect();
    customer
        .login_unsynced(&format!("customer{}", 0), PASSWORD)
        .expect("customer login");
    customer.send_text(support, "remember me?").expect("send");
    let top = agent.conversations(0, 2).expect("top");
    let top: Vec<ConvId> = top.iter().map(|s| s.conv).collect();
    assert_eq!(top, vec![direct(customers[0]), direct(latecomer)]);
    let listed = all_pages(&mut agent, |_| {});
    assert_eq!(listed.len(), moved.len(), "moved, not copied");
}
