//! Friends and presence across home shards.

mod common;

use std::time::Duration;

use common::*;
use tern_client::{Client, ErrorCode, Friend, FriendAdded, ServerBody};

/// Asserts that `client` gets no push at all (presence included) for [`QUIET`].
fn expect_silence(client: &mut Client) {
    if let Some(push) = client.next_push(QUIET).expect("connection alive") {
        panic!("expected no push, got {push:?}");
    }
}

fn friend(user: &User, online: bool) -> Friend {
    Friend {
        user: user.id,
        username: user.name.clone(),
        online,
    }
}

#[test]
fn friends_see_each_other_come_online_and_go_offline() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);

    assert_eq!(a.friends().expect("friends"), vec![]);
    assert_eq!(
        a.friend_add(&bob.name).expect("ask bob"),
        FriendAdded::Requested(bob.id)
    );
    // Asking twice is harmless.
    assert_eq!(
        a.friend_add(&bob.name).expect("ask bob again"),
        FriendAdded::Requested(bob.id)
    );
    // A request is not a friendship: Bob coming online is not news to
    // Alice until he accepts by adding her back.
    assert_eq!(a.friends().expect("friends"), vec![]);
    let mut b0 = server.login(&bob);
    expect_silence(&mut a);
    assert_eq!(
        b0.friend_add(&alice.name).expect("accept"),
        FriendAdded::Friends(alice.id)
    );
    assert_eq!(
        expect_push(&mut a),
        ServerBody::FriendAccepted {
            by: bob.id,
            username: bob.name.clone()
        }
    );
    assert_eq!(a.friends().expect("friends"), vec![friend(&bob, true)]);
    drop(b0);
    assert_eq!(expect_presence(&mut a), (bob.id, false));
    assert_eq!(a.friends().expect("friends"), vec![friend(&bob, false)]);

    // Bob logs in: Alice (on the other shard) is told.
    let mut b1 = server.login(&bob);
    assert_eq!(expect_presence(&mut a), (bob.id, true));
    assert_eq!(a.friends().expect("friends"), vec![friend(&bob, true)]);
    // Friendship is mutual, and Bob sees Alice online.
    assert_eq!(b1.friends().expect("bob's friends"), vec![friend(&alice, true)]);

    // A second device is not news.
    let b2 = server.login(&bob);
    expect_silence(&mut a);

    // Closing one of two sessions is not news either.
    drop(b1);
    expect_silence(&mut a);
    assert_eq!(a.friends().expect("friends"), vec![friend(&bob, true)]);

    // The last session closing is.
    drop(b2);
    assert_eq!(expect_presence(&mut a), (bob.id, false));
    assert_eq!(a.friends().expect("friends"), vec![friend(&bob, false)]);

    // Alice going offline and back is reported to Bob.
    let mut b = server.login(&bob);
    assert_eq!(expect_presence(&mut a), (bob.id, true));
    drop(a);
    assert_eq!(expect_presence(&mut b), (alice.id, false));
    let _a = server.login(&alice);
    assert_eq!(expect_presence(&mut b), (alice.id, true));
    assert_eq!(b.friends().expect("friends"), vec![friend(&alice, true)]);
}

#[test]
fn friends_on_the_same_shard() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let x = server.user_on_shard(&format!("x{shard}_"), shard);
        let y = server.user_on_shard(&format!("y{shard}_"), shard);
        let mut cx = server.login(&x);
        befriend_offline(&server, &mut cx, &x, &y);
        let cy = server.login(&y);
        assert_eq!(expect_presence(&mut cx), (y.id, true));
        assert_eq!(cx.friends().expect("friends"), vec![friend(&y, true)]);
        drop(cy);
        assert_eq!(expect_presence(&mut cx), (y.id, false));
    }
}

#[test]
fn removed_friends_get_no_presence() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 1);
    let bob = server.user_on_shard("bob", 0);
    let mut a = server.login(&alice);
    befriend_offline(&server, &mut a, &alice, &bob);
    a.friend_remove(bob.id).expect("remove");
    // Removing is mutual too.
    assert_eq!(a.friends().expect("friends"), vec![]);
    let mut b = server.login(&bob);
    assert_eq!(b.friends().expect("bob's friends"), vec![]);
    expect_silence(&mut a);
    // Removing a non-friend succeeds.
    a.friend_remove(bob.id).expect("remove again");
}

#[test]
fn friend_errors() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let mut a = server.login(&alice);
    assert_eq!(code_of(a.friend_add("nobody")), ErrorCode::NotFound);
    assert_eq!(code_of(a.friend_add(&alice.name)), ErrorCode::InvalidArgument);
    assert_eq!(code_of(a.friend_add("Not Valid")), ErrorCode::InvalidArgument);
    assert_eq!(code_of(a.resolve_user("nobody")), ErrorCode::NotFound);
    assert_eq!(a.friends().expect("friends"), vec![]);
    // Nothing was pushed for any of it.
    let push = a.next_push(Duration::from_millis(50)).expect("alive");
    assert!(push.is_none(), "unexpected push {push:?}");
}
