//! Blocking users, over real sockets against an in-process server on a
//! real store: a block stops 1:1 messages both ways from its `Ok` and ends
//! the friendship, holds across a restart, leaves groups alone, and is
//! listed and limited.

mod common;

use common::*;
use tern_client::{Client, Content, ConvId, ErrorCode};
use tern_proto::shard_of;

/// Two users whose 1:1 conversation is homed on `shard`.
fn pair_homed_on(server: &TestServer, shard: usize) -> (User, User) {
    let shards = server.shards();
    let alice = server.user_on_shard(&format!("alice{shard}_"), 0);
    let bob = server.user_where(&format!("bob{shard}_"), |bob| {
        shard_of(ConvId::direct(alice.id, bob.id).placement_key(), shards) == shard
    });
    (alice, bob)
}

fn text(body: &str) -> Content {
    Content::text(body.as_bytes())
}

#[test]
fn a_block_stops_direct_messages_both_ways_from_its_ok_and_ends_the_friendship() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let (alice, bob) = pair_homed_on(&server, shard);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        befriend(&mut a, &alice, &mut b, &bob);

        // A message before the block caches the conversation's state.
        let before = b.send_direct(alice.id, 77, text("hi")).expect("send");
        assert_eq!(before.seq, 1);
        assert_eq!(expect_message(&mut a).seq, 1);

        a.block_user(bob.id).expect("block");
        assert_eq!(
            code_of(b.send_direct(alice.id, 78, text("hello?"))),
            ErrorCode::Forbidden
        );
        assert_eq!(code_of(a.send_text(bob.id, "bye")), ErrorCode::Forbidden);
        // A retry of a message sent before the block still gets its ack.
        let retried = b.send_direct(alice.id, 77, text("hi")).expect("retry");
        assert_eq!((retried.seq, retried.timestamp_ms), (1, before.timestamp_ms));
        expect_quiet(&mut [&mut a, &mut b]);

        // The friendship is over, and neither can start a new one.
        assert!(a.friends().expect("friends").is_empty());
        assert!(b.friends().expect("friends").is_empty());
        assert_eq!(code_of(b.friend_add(&alice.name)), ErrorCode::Forbidden);
        assert_eq!(code_of(a.friend_add(&bob.name)), ErrorCode::Forbidden);

        // Only the blocker lists it.
        assert_eq!(a.blocks_page(0, 10).expect("blocks"), (vec![bob.id], false));
        assert_eq!(b.blocks_page(0, 10).expect("blocks"), (vec![], false));

        // Blocked both ways, each lift frees only its own side.
        b.block_user(alice.id).expect("block back");
        a.unblock_user(bob.id).expect("unblock");
        assert_eq!(code_of(a.send_text(bob.id, "still?")), ErrorCode::Forbidden);
        b.unblock_user(alice.id).expect("unblock back");
        b.unblock_user(alice.id).expect("unblocking twice is Ok");

        // The conversation goes on where it stopped: no seq was used.
        assert_eq!(b.send_text(alice.id, "friends again?").expect("send").seq, 2);
        assert_eq!(expect_message(&mut a).seq, 2);
        befriend(&mut a, &alice, &mut b, &bob);
    }
}

#[test]
fn a_block_holds_across_a_restart_and_for_a_conversation_not_yet_cached() {
    let mut server = TestServer::start();
    let (alice, bob) = pair_homed_on(&server, 1);
    let (carol, dave) = pair_homed_on(&server, 0);
    {
        let mut a = server.login(&alice);
        a.block_user(bob.id).expect("block before any message");
        let mut c = server.login(&carol);
        c.block_user(dave.id).expect("block");
    }
    let mut b = server.login_unsynced(&bob);
    assert_eq!(code_of(b.send_text(alice.id, "hi")), ErrorCode::Forbidden);
    drop(b);

    server.restart();
    let mut b = server.login_unsynced(&bob);
    assert_eq!(code_of(b.send_text(alice.id, "hi")), ErrorCode::Forbidden);
    let mut d = server.login_unsynced(&dave);
    assert_eq!(code_of(d.send_text(carol.id, "hi")), ErrorCode::Forbidden);
    let mut a = server.login(&alice);
    assert_eq!(a.blocks_page(0, 10).expect("blocks"), (vec![bob.id], false));
    a.unblock_user(bob.id).expect("unblock");
    assert_eq!(b.send_text(alice.id, "hi").expect("send").seq, 1);
    assert_eq!(expect_message(&mut a).seq, 1);
}

#[test]
fn groups_are_not_affected_by_a_block() {
    let server = TestServer::start();
    let (alice, bob) = pair_homed_on(&server, 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    a.block_user(bob.id).expect("block");
    let group = a.group_create("both").expect("create");
    b.group_join(group).expect("join");
    b.send_group_text(group, "in the group")
        .expect("send to the group");
    let got = expect_message(&mut a);
    assert_eq!((got.conv, got.from), (ConvId::Group { group }, bob.id));
}

#[test]
fn blocking_oneself_or_nobody_is_refused_and_the_list_is_limited_and_paged() {
    let server = TestServer::start_with(|c| c.store.max_blocks_per_user = 2);
    let users: Vec<User> = (0..4)
        .map(|n| server.user_where(&format!("u{n}_"), |_| true))
        .collect();
    let mut first: Client = server.login(&users[0]);
    assert_eq!(code_of(first.block_user(users[0].id)), ErrorCode::InvalidArgument);
    assert_eq!(code_of(first.block_user(u64::MAX)), ErrorCode::NotFound);
    assert_eq!(code_of(first.unblock_user(u64::MAX)), ErrorCode::NotFound);
    first.block_user(users[3].id).expect("block");
    first.block_user(users[1].id).expect("block");
    first
        .block_user(users[1].id)
        .expect("blocking again takes no new place");
    assert_eq!(code_of(first.block_user(users[2].id)), ErrorCode::LimitExceeded);
    let (page, more) = first.blocks_page(0, 1).expect("page");
    assert_eq!((page, more), (vec![users[1].id], true));
    let (page, more) = first.blocks_page(users[1].id, 0).expect("limit 0 counts as 1");
    assert_eq!((page, more), (vec![users[3].id], false));
    first.unblock_user(users[3].id).expect("unblock");
    first.block_user(users[2].id).expect("a place is free again");
}

/// A block refuses group invites between the two, either way round: a
/// blocked user cannot push `Invited` to the blocker from a group of
/// theirs, again and again. Lifting the block lets invites through.
#[test]
fn a_block_refuses_group_invites_both_ways() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let (alice, bob) = pair_homed_on(&server, shard);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        let alices = a.group_create_with("alices", false).expect("create");
        let bobs = b.group_create_with("bobs", false).expect("create");
        a.block_user(bob.id).expect("block");
        assert_eq!(code_of(b.group_invite(bobs, alice.id)), ErrorCode::Forbidden);
        assert_eq!(code_of(a.group_invite(alices, bob.id)), ErrorCode::Forbidden);
        expect_quiet(&mut [&mut a]);
        a.unblock_user(bob.id).expect("unblock");
        b.group_invite(bobs, alice.id).expect("invite after the unblock");
        match expect_push(&mut a) {
            tern_client::ServerBody::Invited { group, by } => assert_eq!((group, by), (bobs, bob.id)),
            other => panic!("expected Invited, got {other:?}"),
        }
    }
}

/// No `Invited` from a user reaches the blocker after the `Ok` of the
/// block, not even from an invite answered before it (docs/protocol.md
/// 2.8.10). Races a new `GroupInvite` against `UserBlock`, for groups
/// homed on every shard and users on every pair of shards, reading the
/// blocker's frames in order. The invitees hold nearly their most pending
/// invites, so each invite's store write counts them first: a block then
/// fits between the invite's look at the blocks and its write.
#[test]
fn no_invite_from_a_user_arrives_after_blocking_them() {
    const FILLER: usize = 400;
    let server = TestServer::start_with(|c| {
        c.limits.message_rate_per_sec = 0;
        c.store.max_invites_per_user = FILLER + 2;
        c.store.max_groups_per_user = FILLER + 1;
    });
    let shards = server.shards();
    let bobs: Vec<User> = (0..shards)
        .map(|sb| server.user_on_shard(&format!("ibo{sb}_"), sb))
        .collect();
    let carol = server.user_on_shard("icarol_", 0);
    let mut c = server.login(&carol);
    for n in 0..FILLER {
        let group = c
            .group_create_with(&format!("filler {n}"), false)
            .expect("create");
        for bob in &bobs {
            c.group_invite(group, bob.id).expect("filler invite");
        }
    }
    let mut late = Vec::new();
    for sg in 0..shards {
        for (sa, bob) in (0..shards).flat_map(|a| bobs.iter().map(move |b| (a, b))) {
            let alice = server.user_on_shard(&format!("ial{sg}{sa}_"), sa);
            let mut a = server.login(&alice);
            let group = group_on_shard(&mut a, sg, shards, false);
            let mut b = server.login_unsynced(bob);
            let mut raw = RawConn::connect(server.addr());
            raw.login(bob);
            for round in 0..20u32 {
                b.unblock_user(alice.id).expect("unblock");
                // Each round's invite is new: a pending one is not written.
                a.group_uninvite(group, bob.id).expect("withdraw");
                let delay = std::time::Duration::from_micros(u64::from(round * 37 % 400));
                let invite = || {
                    // Refused when the block came first.
                    let _ = a.group_invite(group, bob.id);
                };
                let from_alice = |body: &tern_client::ServerBody| matches!(body, tern_client::ServerBody::Invited { by, .. } if *by == alice.id);
                if push_after_block(&mut raw, alice.id, delay, from_alice, invite) {
                    late.push((sg, sa, bob.home(shards), round));
                }
            }
            b.unblock_user(alice.id).expect("unblock");
        }
    }
    assert!(
        late.is_empty(),
        "an invite from the blocked user came after the block's Ok (group's shard, shards, round): {late:?}"
    );
}
