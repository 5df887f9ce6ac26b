//! Chat delivery: 1:1 across home shards, multi-device fan-out and echo,
//! and groups with members on every shard.

mod common;

use common::*;
use tern_client::{Client, Content, ContentKind, ConvId, ErrorCode};

fn media() -> Content {
    Content {
        kind: ContentKind::Media {
            url: "https://cdn.example/cat.png".into(),
            mime: "image/png".into(),
            size: 12_345,
        },
        body: b"a cat".to_vec(),
    }
}

/// `count` messages from `from` to `to`; checks acks and deliveries.
fn send_and_check(from: &mut Client, from_user: &User, to: &mut Client, to_user: &User, first_seq: u64) {
    let conv = ConvId::direct(from_user.id, to_user.id);
    let mut sent = Vec::new();
    for i in 0..5u64 {
        let text = format!("{} to {} #{i}", from_user.name, to_user.name);
        let ack = from.send_text(to_user.id, &text).expect("send");
        assert_eq!(ack.conv, conv);
        assert_eq!(ack.seq, first_seq + i, "seqs must be 1, 2, 3, … per conversation");
        sent.push((ack, text));
    }
    for (ack, text) in &sent {
        let msg = expect_message(to);
        assert_eq!(msg.conv, conv);
        assert_eq!(msg.seq, ack.seq);
        assert_eq!(msg.from, from_user.id);
        assert_eq!(msg.client_msg_id, ack.client_msg_id);
        assert_eq!(msg.timestamp_ms, ack.timestamp_ms);
        assert_eq!(msg.content, Content::text(text.as_bytes()));
    }
}

#[test]
fn direct_messages_between_home_shards_are_sequenced_and_delivered_in_order() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    assert_ne!(alice.home(2), bob.home(2));
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);

    send_and_check(&mut a, &alice, &mut b, &bob, 1);
    // The reply continues the same conversation's sequence.
    send_and_check(&mut b, &bob, &mut a, &alice, 6);

    // Media content round-trips intact.
    let ack = a.send_direct(bob.id, 4242, media()).expect("send media");
    assert_eq!(ack.seq, 11);
    assert_eq!(ack.client_msg_id, 4242);
    let msg = expect_message(&mut b);
    assert_eq!(msg.seq, 11);
    assert_eq!(msg.client_msg_id, 4242);
    assert_eq!(msg.content, media());

    // Another conversation has its own sequence, starting at 1.
    let carol = server.user_on_shard("carol", 1);
    let mut c = server.login(&carol);
    send_and_check(&mut a, &alice, &mut c, &carol, 1);

    // Nothing extra was delivered anywhere; the sender saw no echo.
    expect_quiet(&mut [&mut a, &mut b, &mut c]);
}

#[test]
fn direct_messages_on_one_shard() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let x = server.user_on_shard(&format!("x{shard}_"), shard);
        let y = server.user_on_shard(&format!("y{shard}_"), shard);
        let mut cx = server.login(&x);
        let mut cy = server.login(&y);
        send_and_check(&mut cx, &x, &mut cy, &y, 1);
        send_and_check(&mut cy, &y, &mut cx, &x, 6);
        expect_quiet(&mut [&mut cx, &mut cy]);
    }
}

#[test]
fn every_device_gets_each_message_and_other_devices_get_the_echo() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a1 = server.login(&alice);
    let mut a2 = server.login(&alice);
    let mut b1 = server.login(&bob);
    let mut b2 = server.login(&bob);

    for i in 1..=3u64 {
        let text = format!("hello {i}");
        let ack = a1.send_text(bob.id, &text).expect("send");
        assert_eq!(ack.seq, i);
        for device in [&mut b1, &mut b2] {
            let msg = expect_message(device);
            assert_eq!(msg.seq, i);
            assert_eq!(msg.from, alice.id);
            assert_eq!(msg.content.body, text.as_bytes());
        }
        // Alice's other device gets the echo: her own message, same seq.
        let echo = expect_message(&mut a2);
        assert_eq!(echo.from, alice.id);
        assert_eq!(echo.seq, i);
        assert_eq!(echo.conv, ConvId::direct(alice.id, bob.id));
        assert_eq!(echo.client_msg_id, ack.client_msg_id);
        assert_eq!(echo.content.body, text.as_bytes());
    }
    // The sending device got only its acks: the next push it sees is Bob's
    // reply below, not an echo of its own messages.

    // Bob answers from his second device: Alice's both devices get it, his
    // first device gets the echo.
    let ack = b2.send_text(alice.id, "reply").expect("reply");
    assert_eq!(ack.seq, 4);
    for device in [&mut a1, &mut a2] {
        let msg = expect_message(device);
        assert_eq!((msg.from, msg.seq), (bob.id, 4));
    }
    let echo = expect_message(&mut b1);
    assert_eq!((echo.from, echo.seq), (bob.id, 4));
    expect_quiet(&mut [&mut a1, &mut a2, &mut b1, &mut b2]);
}

#[test]
fn groups_fan_out_to_every_member_session_on_every_shard() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let eve = server.user_on_shard("eve", 1);
    let mut a1 = server.login(&alice);
    let mut a2 = server.login(&alice);
    let mut b1 = server.login(&bob);
    let mut b2 = server.login(&bob);
    let mut c = server.login(&carol);
    let mut d = server.login(&dave);
    let mut e = server.login(&eve);

    for home in 0..shards {
        let group = group_on_shard(&mut a1, home, shards, true);
        for member in [&mut b1, &mut c, &mut d] {
            member.group_join(group).expect("join");
        }
        // Joining twice is harmless.
        c.group_join(group).expect("join again");
        let mut expected = vec![alice.id, bob.id, carol.id, dave.id];
        expected.sort_unstable();
        assert_eq!(b2.group_members(group).expect("members"), expected);
        assert_eq!(a1.group_members(group).expect("members"), expected);

        for i in 1..=3u64 {
            let text = format!("group {group} message {i}");
            let ack = a1.send_group_text(group, &text).expect("send to group");
            assert_eq!(ack.conv, ConvId::Group { group });
            assert_eq!(ack.seq, i);
            // Every session of every member, on both shards, gets it once,
            // including the sender's other session.
            for session in [&mut a2, &mut b1, &mut b2, &mut c, &mut d] {
                let msg = expect_message(session);
                assert_eq!(msg.conv, ConvId::Group { group });
                assert_eq!(msg.seq, i);
                assert_eq!(msg.from, alice.id);
                assert_eq!(msg.client_msg_id, ack.client_msg_id);
                assert_eq!(msg.content.body, text.as_bytes());
            }
        }
        expect_quiet(&mut [&mut a1, &mut a2, &mut b1, &mut b2, &mut c, &mut d, &mut e]);

        // A member on the other shard sends: sequence continues.
        let ack = d
            .send_group(group, 77, Content::text("from dave"))
            .expect("dave sends");
        assert_eq!(ack.seq, 4);
        for session in [&mut a1, &mut a2, &mut b1, &mut b2, &mut c] {
            let msg = expect_message(session);
            assert_eq!((msg.from, msg.seq, msg.client_msg_id), (dave.id, 4, 77));
        }
        // (Dave's own session gets no echo: checked by the quiet check below.)

        // Outsiders may not send or list members.
        assert_eq!(
            code_of(e.send_group_text(group, "let me in")),
            ErrorCode::Forbidden
        );
        assert_eq!(code_of(e.group_members(group)), ErrorCode::Forbidden);

        // After leaving, Dave gets nothing more.
        d.group_leave(group).expect("leave");
        assert_eq!(
            code_of(d.send_group_text(group, "still here?")),
            ErrorCode::Forbidden
        );
        let ack = b2.send_group_text(group, "after dave left").expect("send");
        assert_eq!(ack.seq, 5);
        for session in [&mut a1, &mut a2, &mut b1, &mut c] {
            let msg = expect_message(session);
            assert_eq!((msg.from, msg.seq), (bob.id, 5));
            assert_eq!(msg.content.body, b"after dave left");
        }
        let mut expected = vec![alice.id, bob.id, carol.id];
        expected.sort_unstable();
        assert_eq!(c.group_members(group).expect("members"), expected);
        expect_quiet(&mut [&mut a1, &mut a2, &mut b1, &mut b2, &mut c, &mut d, &mut e]);
    }
}

#[test]
fn unknown_groups_are_not_found() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    for user in [&alice, &bob] {
        let mut client = server.login(user);
        for group in [999_999, 1_000_000] {
            assert_eq!(code_of(client.group_members(group)), ErrorCode::NotFound);
            assert_eq!(code_of(client.group_join(group)), ErrorCode::NotFound);
            assert_eq!(
                code_of(client.send_group_text(group, "anyone?")),
                ErrorCode::NotFound
            );
        }
        client.ping().expect("connection survives");
    }
}
