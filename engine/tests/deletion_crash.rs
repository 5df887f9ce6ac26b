//! Account deletion survives crashes, end to end: the real `ternd`
//! binary deletes an account with thousands of keys (friends, requests,
//! blocks, groups owned and joined, invites, a departure, an inbox of
//! tens of thousands, tokens), is killed with SIGKILL at random moments
//! of the purge several times and restarted on the same data directory,
//! until the purge is done. Then the store's raw keyspaces are read: no
//! key names the account except those docs/storage.md says stay (its
//! `deleted_users` record, history, and bans of it); the groups it owned
//! have live owners; and a new registration of the freed name gets a new
//! id and finds nothing of the old account.
//!
//! `TERN_CRASH_SEED` repeats one run.

mod common;
mod ternd_common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::{opts, PASSWORD};
use fjall::{Database, KeyspaceCreateOptions};
use rkyv::util::AlignedVec;
use tern_client::{ChatMessage, Client, Content, ConvId, ServerBody, ServerFrame, UserId};
use tern_engine::admin::{admin_request, ADMIN_SOCKET};
use tern_proto::encode_server;
use tern_proto::ids::mix64;
use tern_storage::{InboxTargets, MessageWrite, Store, StoreOptions, WriteOp};
use ternd_common::Ternd;

const FRIENDS: usize = 1500;
const INBOX: u64 = 30_000;
const KILLS: usize = 4;

fn store_opts() -> StoreOptions {
    StoreOptions {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        max_friends: FRIENDS + 10,
        ..StoreOptions::default()
    }
}

/// What the account had, for the checks after the purge.
struct World {
    alice: UserId,
    owned: Vec<u64>,
    direct: ConvId,
}

/// Alice (user 1) with thousands of keys of every kind; bob and carol
/// share groups with her; `friendN` are her friends.
fn populate(data_dir: &Path) -> World {
    let store = Store::open(data_dir, store_opts()).expect("open store");
    let reg = |name: &str| store.register(name, PASSWORD.as_bytes()).expect("register");
    let alice = reg("alice");
    let bob = reg("bob");
    let carol = reg("carol");
    for n in 0..FRIENDS {
        let friend = reg(&format!("friend{n}"));
        store.add_friend(alice, friend).expect("ask");
        store.add_friend(friend, alice).expect("accept");
        match n % 10 {
            0 => store.block(friend, alice).map(|_| ()).expect("block"),
            1 => {
                store.remove_friend(alice, friend).expect("unfriend");
                store.add_friend(alice, friend).map(|_| ()).expect("ask again")
            }
            2 => {
                store.remove_friend(friend, alice).expect("unfriend");
                store.add_friend(friend, alice).map(|_| ()).expect("asked again")
            }
            _ => {}
        }
    }
    for n in 0..20 {
        let other = reg(&format!("blocked{n}"));
        store.block(alice, other).expect("block");
    }
    let mut owned = Vec::new();
    for n in 0..6 {
        let group = store.create_group(alice, &format!("hers{n}")).expect("create");
        if n % 3 != 0 {
            store.add_member(group, bob).expect("join");
        }
        if n % 3 == 2 {
            store.add_member(group, carol).expect("join");
            store
                .set_member_role(group, carol, tern_storage::GroupRole::Admin)
                .expect("admin");
        }
        owned.push(group);
    }
    for n in 0..6 {
        let group = store.create_group(bob, &format!("bobs{n}")).expect("create");
        store.add_member(group, alice).expect("join");
        if n == 0 {
            store.remove_member(group, alice).expect("leave: a departure");
        }
        let closed = store
            .create_group_with(carol, &format!("closed{n}"), false)
            .expect("create");
        store.invite(closed, alice).expect("invite");
        store.ban(closed, bob).expect("a ban of someone else");
    }
    let banning = store.create_group(carol, "banning").expect("create");
    store.ban(banning, alice).expect("ban");
    let direct = ConvId::direct(alice, bob);
    let ops: Vec<WriteOp> = (1..=INBOX)
        .map(|seq| {
            let (from, to) = if seq % 2 == 0 { (bob, alice) } else { (alice, bob) };
            WriteOp::Message(MessageWrite {
                conv: direct,
                seq,
                from,
                client_msg_id: seq,
                timestamp_ms: seq,
                frame: push_frame(direct, seq, from),
                inbox: InboxTargets::One(to),
                moved_from: None,
            })
        })
        .collect();
    for chunk in ops.chunks(5000) {
        store.apply(chunk, false).expect("messages");
    }
    for _ in 0..3 {
        store.issue_token(alice).expect("token");
    }
    store.persist().expect("persist");
    World { alice, owned, direct }
}

/// A message's push frame as the server stores it (it serves it as is).
fn push_frame(conv: ConvId, seq: u64, from: UserId) -> std::sync::Arc<[u8]> {
    let push = ServerFrame {
        request_id: 0,
        body: ServerBody::Message(ChatMessage {
            conv,
            seq,
            from,
            client_msg_id: seq,
            timestamp_ms: seq,
            content: Content::text(format!("#{seq}")),
        }),
    };
    let mut frame = AlignedVec::new();
    encode_server(&push, &mut frame, u32::MAX).expect("encode");
    frame.as_slice().into()
}

/// Keys of `name` that name `user` where a user id sits: at offset 0 of
/// a user-keyed keyspace, or either id of a pair key.
fn keys_naming(db: &Database, name: &'static str, user: UserId) -> usize {
    let ks = db
        .keyspace(name, KeyspaceCreateOptions::default)
        .expect("keyspace");
    let id = user.to_be_bytes();
    let pair = matches!(
        name,
        "friends"
            | "friend_requests_out"
            | "friend_requests_in"
            | "blocks"
            | "blocked_by"
            | "members"
            | "group_invites"
            | "group_bans"
            | "user_invites"
            | "user_groups"
    );
    let group_first = matches!(name, "members" | "group_invites" | "group_bans");
    ks.iter()
        .map(|guard| guard.key().expect("key"))
        .filter(|key| {
            let first = key.get(..8) == Some(&id[..]);
            let second = pair && key.get(8..16) == Some(&id[..]);
            if group_first {
                second
            } else {
                first || second
            }
        })
        .count()
}

fn purged(data_dir: &Path) -> bool {
    let store = Store::open(data_dir, store_opts()).expect("open store");
    store.pending_user_purges().is_empty()
}

#[test]
fn a_deletion_killed_mid_purge_again_and_again_ends_with_nothing_left() {
    let seed = ternd_common::crash_seed();
    let mut rng = seed;
    let mut pause = move |max_ms: u64| {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        Duration::from_millis(mix64(rng) % max_ms.max(1))
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir: PathBuf = dir.path().join("data");
    let world = populate(&data_dir);

    let ternd = Ternd::start(&data_dir, &data_dir.with_extension("log"));
    let answer = admin_request(&data_dir.join(ADMIN_SOCKET), "delete-user alice").expect("admin");
    assert!(answer.starts_with("deleted alice"), "{answer}");
    thread::sleep(pause(10));
    ternd.kill9();
    let mut cut_short = usize::from(!purged(&data_dir));
    for _ in 1..KILLS {
        let ternd = Ternd::start(&data_dir, &data_dir.with_extension("log"));
        thread::sleep(pause(40));
        ternd.kill9();
        cut_short += usize::from(!purged(&data_dir));
    }
    eprintln!("{cut_short} of {KILLS} kills cut the purge short");
    assert!(cut_short > 0, "no kill landed in the purge: make it bigger");
    let mut done = false;
    for _ in 0..10 {
        let ternd = Ternd::start(&data_dir, &data_dir.with_extension("log"));
        thread::sleep(Duration::from_secs(2));
        ternd.stop();
        if purged(&data_dir) {
            done = true;
            break;
        }
    }
    assert!(done, "the purge did not finish");

    // Through the store: the deletion stays; the groups she owned have
    // live owners; nothing is pending.
    {
        let store = Store::open(&data_dir, store_opts()).expect("open store");
        assert!(store.is_deleted(world.alice));
        assert_eq!(store.user_id("alice").expect("read"), None);
        for &group in &world.owned {
            if let Some(record) = store.group(group).expect("read") {
                assert_ne!(record.owner, world.alice, "group {group}");
                assert!(!store.is_deleted(record.owner));
                assert!(!store.is_member(group, world.alice).expect("read"));
            }
        }
        assert_eq!(
            store.history(world.direct, 1, true, 200).expect("read").len(),
            200,
            "history stays"
        );
    }

    // Raw: no key names her but those that stay.
    {
        let db = Database::builder(&data_dir).open().expect("open raw");
        for name in [
            "users",
            "user_tokens",
            "revocations",
            "friends",
            "friend_requests_out",
            "friend_requests_in",
            "blocks",
            "blocked_by",
            "user_purges",
            "members",
            "group_invites",
            "user_invites",
            "user_groups",
            "departures",
            "inbox",
            "receipts",
            "user_convs",
            "recent_convs",
        ] {
            assert_eq!(keys_naming(&db, name, world.alice), 0, "keyspace {name}");
        }
        assert_eq!(keys_naming(&db, "deleted_users", world.alice), 1);
        assert_eq!(keys_naming(&db, "group_bans", world.alice), 1, "the ban stays");
        let bob = world.direct.peer_of(world.alice).expect("bob");
        assert_eq!(
            keys_naming(&db, "recent_convs", bob),
            1,
            "bob's index of the conversation stays"
        );
        let tokens = db
            .keyspace("tokens", KeyspaceCreateOptions::default)
            .expect("keyspace");
        assert_eq!(tokens.iter().count(), 0, "only she had tokens");
    }

    // A new alice is someone else, with nothing of the old one; bob
    // keeps their conversation.
    let ternd = Ternd::start(&data_dir, &data_dir.with_extension("log"));
    let mut fresh = Client::connect(ternd.addr, opts()).expect("connect");
    let id = fresh
        .register("alice", PASSWORD)
        .expect("register the freed name");
    assert!(id > world.alice, "a new id: {id}");
    fresh.login("alice", PASSWORD).expect("login");
    assert!(fresh.friends().expect("friends").is_empty());
    assert!(fresh.conversations(0, 10).expect("conversations").is_empty());
    assert_eq!(fresh.my_invites_page(0, 10).expect("invites"), (vec![], false));
    assert!(fresh.friend_requests_all(true).expect("requests").is_empty());
    let mut bob = Client::connect(ternd.addr, opts()).expect("connect");
    bob.login("bob", PASSWORD).expect("login");
    let listed = bob.conversations(0, 10).expect("conversations");
    assert!(listed.iter().any(|s| s.conv == world.direct), "{listed:?}");
    ternd.stop();
}
