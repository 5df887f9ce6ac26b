//! Friend requests over real sockets and a real store: a friendship needs
//! both users, a pending request shows no presence, the asked user's
//! sessions are told, requests are listed, declined, cancelled, dropped by
//! blocks, bounded, and survive a restart, on users of any home shards.

mod common;

use std::time::Duration;

use common::*;
use tern_client::{Client, ClientBody, ClientError, ConvId, ErrorCode, Friend, FriendAdded, ServerBody};
use tern_proto::shard_of;

/// Asserts that `client` gets no push at all (presence included) for [`QUIET`].
fn expect_silence(client: &mut Client) {
    if let Some(push) = client.next_push(QUIET).expect("connection alive") {
        panic!("expected no push, got {push:?}");
    }
}

fn incoming(client: &mut Client) -> Vec<u64> {
    ids(client.friend_requests_all(true).expect("incoming requests"))
}

fn outgoing(client: &mut Client) -> Vec<u64> {
    ids(client.friend_requests_all(false).expect("outgoing requests"))
}

fn ids(users: Vec<tern_client::Friend>) -> Vec<u64> {
    users.iter().map(|f| f.user).collect()
}

/// A page of requests as (ids, more), after checking every entry names
/// its user and shows no presence.
fn page(client: &mut Client, incoming: bool, after: u64, limit: u32) -> (Vec<u64>, bool) {
    let (users, more) = client.friend_requests_page(incoming, after, limit).expect("page");
    for f in &users {
        assert!(!f.online, "a pending request shows presence: {f:?}");
        assert!(!f.username.is_empty(), "a request without a name: {f:?}");
    }
    (ids(users), more)
}

fn friend_ids(client: &mut Client) -> Vec<u64> {
    client
        .friends()
        .expect("friends")
        .into_iter()
        .map(|f| f.user)
        .collect()
}

/// Every ordered pair of home shards (both users on one shard included).
fn shard_pairs(server: &TestServer) -> Vec<(usize, usize)> {
    let n = server.shards();
    (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).collect()
}

#[test]
fn a_request_becomes_a_friendship_when_the_other_adds_back_whoever_asks_first() {
    let server = TestServer::start();
    for (sa, sb) in shard_pairs(&server) {
        let alice = server.user_on_shard(&format!("al{sa}{sb}_"), sa);
        let bob = server.user_on_shard(&format!("bo{sa}{sb}_"), sb);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        // Bob has two devices: both are told.
        let mut b2 = server.login(&bob);

        assert_eq!(
            a.friend_add(&bob.name).expect("ask"),
            FriendAdded::Requested(bob.id)
        );
        for session in [&mut b, &mut b2] {
            assert_eq!(
                expect_push(session),
                ServerBody::FriendRequest {
                    from: alice.id,
                    username: alice.name.clone()
                }
            );
        }
        assert!(friend_ids(&mut a).is_empty());
        assert!(friend_ids(&mut b).is_empty());
        assert_eq!(outgoing(&mut a), vec![bob.id]);
        assert_eq!(incoming(&mut b), vec![alice.id]);
        assert!(incoming(&mut a).is_empty());
        assert!(outgoing(&mut b).is_empty());

        // Bob accepts by adding Alice back: friends both ways, request gone.
        assert_eq!(
            b2.friend_add(&alice.name).expect("accept"),
            FriendAdded::Friends(alice.id)
        );
        assert_eq!(
            expect_push(&mut a),
            ServerBody::FriendAccepted {
                by: bob.id,
                username: bob.name.clone()
            }
        );
        assert_eq!(friend_ids(&mut a), vec![bob.id]);
        assert_eq!(friend_ids(&mut b), vec![alice.id]);
        for c in [&mut a, &mut b] {
            assert!(incoming(c).is_empty());
            assert!(outgoing(c).is_empty());
        }
        // Adding a friend again answers User and pushes nothing.
        assert_eq!(
            a.friend_add(&bob.name).expect("again"),
            FriendAdded::Friends(bob.id)
        );
        expect_quiet(&mut [&mut a, &mut b, &mut b2]);

        // The other way round: a third user asks Alice, who accepts.
        let carol = server.user_on_shard(&format!("ca{sa}{sb}_"), sb);
        let mut c = server.login(&carol);
        befriend(&mut c, &carol, &mut a, &alice);
        assert_eq!(friend_ids(&mut c), vec![alice.id]);
        let mut ids = vec![bob.id, carol.id];
        ids.sort_unstable();
        assert_eq!(friend_ids(&mut a), ids);
        expect_quiet(&mut [&mut a, &mut b, &mut b2, &mut c]);
    }
}

#[test]
fn a_pending_request_shows_no_presence_and_a_friendship_does() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    assert_eq!(
        a.friend_add(&bob.name).expect("ask"),
        FriendAdded::Requested(bob.id)
    );

    // Bob comes and goes: Alice, who only asked, hears nothing of it.
    let b = server.login(&bob);
    expect_silence(&mut a);
    drop(b);
    expect_silence(&mut a);
    assert!(a.friends().expect("friends").is_empty());

    // Nor does Bob hear of Alice, whom he has not accepted.
    let mut b = server.login(&bob);
    drop(a);
    expect_silence(&mut b);
    let mut a = server.login(&alice);
    expect_silence(&mut b);

    // Bob accepts: from now on each sees the other come and go.
    assert_eq!(
        b.friend_add(&alice.name).expect("accept"),
        FriendAdded::Friends(alice.id)
    );
    assert_eq!(
        expect_push(&mut a),
        ServerBody::FriendAccepted {
            by: bob.id,
            username: bob.name.clone()
        }
    );
    assert_eq!(
        a.friends().expect("friends"),
        vec![Friend {
            user: bob.id,
            username: bob.name.clone(),
            online: true,
        }]
    );
    drop(b);
    assert_eq!(expect_presence(&mut a), (bob.id, false));
    let _b = server.login(&bob);
    assert_eq!(expect_presence(&mut a), (bob.id, true));
}

#[test]
fn an_offline_user_finds_the_request_after_logging_in() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 1);
    let bob = server.user_on_shard("bob", 0);
    let mut a = server.login(&alice);
    a.friend_add(&bob.name).expect("ask");

    let mut b = server.login(&bob);
    // The push went to no one; the request waits in the store.
    expect_silence(&mut b);
    assert_eq!(
        b.friend_requests_page(true, 0, 10).expect("page"),
        (
            vec![tern_client::Friend {
                user: alice.id,
                username: alice.name.clone(),
                online: false
            }],
            false
        )
    );
    assert_eq!(
        b.friend_add(&alice.name).expect("accept"),
        FriendAdded::Friends(alice.id)
    );
    assert_eq!(
        expect_push(&mut a),
        ServerBody::FriendAccepted {
            by: bob.id,
            username: bob.name.clone()
        }
    );
}

#[test]
fn asking_again_is_idempotent_and_pushes_once() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    for _ in 0..3 {
        assert_eq!(
            a.friend_add(&bob.name).expect("ask"),
            FriendAdded::Requested(bob.id)
        );
    }
    assert_eq!(
        expect_push(&mut b),
        ServerBody::FriendRequest {
            from: alice.id,
            username: alice.name.clone()
        }
    );
    expect_quiet(&mut [&mut a, &mut b]);
    assert_eq!(outgoing(&mut a), vec![bob.id]);
    assert_eq!(incoming(&mut b), vec![alice.id]);
}

#[test]
fn friend_remove_declines_and_cancels_requests() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let mut a = server.login(&alice);
    let mut c = server.login(&carol);
    a.friend_add(&bob.name).expect("alice asks bob");
    c.friend_add(&bob.name).expect("carol asks bob");
    let mut b = server.login(&bob);
    let mut asked = vec![alice.id, carol.id];
    asked.sort_unstable();
    assert_eq!(incoming(&mut b), asked);

    // Bob declines Alice: she is not told, her request is just gone.
    b.friend_remove(alice.id).expect("decline");
    assert_eq!(incoming(&mut b), vec![carol.id]);
    assert!(outgoing(&mut a).is_empty());
    // Carol cancels hers.
    c.friend_remove(bob.id).expect("cancel");
    assert!(incoming(&mut b).is_empty());
    assert!(outgoing(&mut c).is_empty());
    // Nothing left: still Ok.
    c.friend_remove(bob.id).expect("cancel again");
    expect_quiet(&mut [&mut a, &mut b, &mut c]);

    // A declined request accepts nothing: Bob adding Alice now asks her.
    assert_eq!(
        b.friend_add(&alice.name).expect("ask"),
        FriendAdded::Requested(alice.id)
    );
    assert_eq!(
        expect_push(&mut a),
        ServerBody::FriendRequest {
            from: bob.id,
            username: bob.name.clone()
        }
    );
    assert!(friend_ids(&mut b).is_empty());
}

#[test]
fn a_block_drops_requests_both_ways_and_refuses_new_ones() {
    let server = TestServer::start();
    for (sa, sb) in shard_pairs(&server) {
        let alice = server.user_on_shard(&format!("al{sa}{sb}_"), sa);
        let bob = server.user_on_shard(&format!("bo{sa}{sb}_"), sb);
        let carol = server.user_on_shard(&format!("ca{sa}{sb}_"), sb);
        let mut a = server.login(&alice);
        let mut c = server.login(&carol);
        a.friend_add(&bob.name).expect("alice asks bob");
        c.friend_add(&alice.name).expect("carol asks alice");
        assert_eq!(
            expect_push(&mut a),
            ServerBody::FriendRequest {
                from: carol.id,
                username: carol.name.clone()
            }
        );

        // Bob blocks Alice, who had asked him: her request is gone.
        let mut b = server.login(&bob);
        b.block_user(alice.id).expect("block");
        assert!(incoming(&mut b).is_empty());
        assert!(outgoing(&mut a).is_empty());
        assert_eq!(code_of(a.friend_add(&bob.name)), ErrorCode::Forbidden);
        assert_eq!(code_of(b.friend_add(&alice.name)), ErrorCode::Forbidden);

        // Alice blocks Carol, who had asked her: gone the other way too.
        a.block_user(carol.id).expect("block");
        assert!(incoming(&mut a).is_empty());
        assert!(outgoing(&mut c).is_empty());

        // Lifting the blocks brings nothing back.
        b.unblock_user(alice.id).expect("unblock");
        a.unblock_user(carol.id).expect("unblock");
        assert!(incoming(&mut b).is_empty());
        assert!(incoming(&mut a).is_empty());
        expect_quiet(&mut [&mut a, &mut b, &mut c]);
    }
}

#[test]
fn pending_requests_are_bounded_sent_and_received() {
    let server = TestServer::start_with(|c| c.store.max_friend_requests = 2);
    let users: Vec<User> = (0..6)
        .map(|i| server.user_on_shard(&format!("u{i}_"), i % server.shards()))
        .collect();
    let mut clients: Vec<Client> = users.iter().map(|u| server.login(u)).collect();

    // Sent: user 0 asks 1 and 2, and no third.
    clients[0].friend_add(&users[1].name).expect("ask 1");
    clients[0].friend_add(&users[2].name).expect("ask 2");
    let refused = clients[0].friend_add(&users[3].name).unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded));
    assert!(
        refused.to_string().contains("you have too many pending"),
        "{refused}"
    );
    // Asking again for a pending one is fine at the limit.
    assert_eq!(
        clients[0].friend_add(&users[2].name).expect("again"),
        FriendAdded::Requested(users[2].id)
    );

    // Received: user 5 is asked by 3 and 4, and not by 1.
    clients[3].friend_add(&users[5].name).expect("3 asks 5");
    clients[4].friend_add(&users[5].name).expect("4 asks 5");
    let refused = clients[1].friend_add(&users[5].name).unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded));
    assert!(
        refused.to_string().contains("this user has too many pending"),
        "{refused}"
    );

    // Accepting needs no place, and frees one on both sides.
    assert_eq!(
        clients[5].friend_add(&users[3].name).expect("accept"),
        FriendAdded::Friends(users[3].id)
    );
    clients[1].friend_add(&users[5].name).expect("room again");
    // Cancelling frees one too.
    clients[0].friend_remove(users[1].id).expect("cancel");
    clients[0].friend_add(&users[3].name).expect("room again");
    assert_eq!(outgoing(&mut clients[0]), vec![users[2].id, users[3].id]);
    let mut asked = vec![users[1].id, users[4].id];
    asked.sort_unstable();
    assert_eq!(incoming(&mut clients[5]), asked);
}

#[test]
fn requests_and_friendships_survive_a_restart() {
    let mut server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    {
        let mut a = server.login(&alice);
        let mut c = server.login(&carol);
        a.friend_add(&bob.name).expect("ask bob");
        befriend(&mut a, &alice, &mut c, &carol);
    }
    server.restart();

    let mut b = server.login(&bob);
    assert_eq!(incoming(&mut b), vec![alice.id]);
    let mut a = server.login(&alice);
    assert_eq!(outgoing(&mut a), vec![bob.id]);
    assert_eq!(friend_ids(&mut a), vec![carol.id]);
    assert_eq!(
        b.friend_add(&alice.name).expect("accept after the restart"),
        FriendAdded::Friends(alice.id)
    );
    assert_eq!(
        expect_push(&mut a),
        ServerBody::FriendAccepted {
            by: bob.id,
            username: bob.name.clone()
        }
    );
    let mut ids = vec![bob.id, carol.id];
    ids.sort_unstable();
    assert_eq!(friend_ids(&mut a), ids);
}

#[test]
fn request_lists_page_like_the_other_lists() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let mut a = server.login(&alice);
    let mut askers = Vec::new();
    for i in 0..5 {
        let user = server.user_on_shard(&format!("asker{i}_"), i % server.shards());
        server.login(&user).friend_add(&alice.name).expect("ask");
        askers.push(user.id);
        assert_eq!(
            expect_push(&mut a),
            ServerBody::FriendRequest {
                from: user.id,
                username: user.name.clone()
            }
        );
    }
    askers.sort_unstable();
    let (first, more) = page(&mut a, true, 0, 2);
    assert_eq!((first.as_slice(), more), (&askers[..2], true));
    let (second, more) = page(&mut a, true, first[1], 2);
    assert_eq!((second.as_slice(), more), (&askers[2..4], true));
    let (last, more) = page(&mut a, true, second[1], 2);
    assert_eq!((last.as_slice(), more), (&askers[4..], false));
    // A limit of 0 is taken as 1; the whole list in one go.
    let (one, more) = page(&mut a, true, 0, 0);
    assert_eq!((one.len(), more), (1, true));
    assert_eq!(incoming(&mut a), askers);
    assert_eq!(page(&mut a, false, 0, 10), (vec![], false));
}

#[test]
fn friend_add_errors() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let mut a = server.login(&alice);
    assert_eq!(code_of(a.friend_add(&alice.name)), ErrorCode::InvalidArgument);
    // An unknown name is said to be one, by FriendAdd and ResolveUser alike.
    let unknown = |result: Result<_, ClientError>| match result {
        Err(ClientError::Server { code, message, .. }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let expected = (ErrorCode::NotFound, r#"no user has the name "nobody""#.to_owned());
    assert_eq!(unknown(a.friend_add("nobody").map(|_| ())), expected);
    assert_eq!(unknown(a.resolve_user("nobody").map(|_| ())), expected);
    assert!(outgoing(&mut a).is_empty());
    expect_silence(&mut a);
}

#[test]
fn no_friend_push_from_a_user_arrives_after_blocking_them() {
    let server = TestServer::start_with(|c| c.limits.message_rate_per_sec = 0);
    let mut late = Vec::new();
    for (sa, sb) in shard_pairs(&server) {
        let alice = server.user_on_shard(&format!("al{sa}{sb}_"), sa);
        let bob = server.user_on_shard(&format!("bo{sa}{sb}_"), sb);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        let mut raw = RawConn::connect(server.addr());
        raw.login(&bob);
        for round in 0..30u32 {
            b.unblock_user(alice.id).expect("unblock");
            // Odd rounds: Bob had asked Alice, who accepts as he blocks her;
            // even rounds: she asks him as he blocks her.
            if round % 2 == 1 {
                b.friend_add(&alice.name).expect("bob asks");
            }
            let delay = Duration::from_micros(u64::from(round % 3) * 100);
            let ask = || {
                // Refused when the block came first.
                let _ = a.friend_add(&bob.name);
            };
            let from_alice = |body: &ServerBody| {
                matches!(body, ServerBody::FriendRequest { from: user, .. }
                    | ServerBody::FriendAccepted { by: user, .. } if *user == alice.id)
            };
            if push_after_block(&mut raw, alice.id, delay, from_alice, ask) {
                late.push((sa, sb, round));
            }
        }
        // The other pushes of the rounds: to Alice and Bob's other session.
        let _ = (a.next_push(QUIET), b.next_push(QUIET));
    }
    assert!(
        late.is_empty(),
        "a friend push from the blocked user came after the block's Ok (shards, round): {late:?}"
    );
}

/// The answer to `request` on `raw`, skipping the pushes before it.
fn raw_answer(raw: &mut RawConn, request: ClientBody) -> ServerBody {
    let id = raw.send(request);
    loop {
        let frame = raw.expect_frame();
        if frame.request_id == id {
            return frame.body;
        }
        assert_eq!(frame.request_id, 0, "an answer to another request: {frame:?}");
    }
}

/// A friend list longer than one frame holds (a frame of 1,024 bytes
/// standing in for a `max_friends` raised past the 1,165 longest-named
/// friends a default frame holds) is listed whole, a page at a time, each
/// friend with its name and presence. `FriendList`, kept for old clients,
/// lists a list that fits and refuses one that does not with
/// `LimitExceeded`, naming `FriendsPage`.
#[test]
fn a_friend_list_longer_than_a_frame_is_listed_by_pages() {
    // 20 entries of 24 + 32 bytes: more than the 768 a page of a 1,024-byte
    // frame spends on them (13 entries).
    const FRIENDS: usize = 20;
    const PER_PAGE: usize = 13;
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 1024;
        c.max_message_bytes = 512;
        c.limits.message_rate_per_sec = 0;
        c.limits.registration_rate_per_ip_per_hour = 0;
        c.limits.connection_rate_per_ip = 0;
        c.limits.max_connections_per_ip = 0;
    });
    let alice = server.user_on_shard("pager_", 0);
    let mut a = server.login(&alice);
    let mut raw = RawConn::connect(server.addr());
    raw.login(&alice);
    let mut online = Vec::new();
    let mut expected = Vec::new();
    for n in 0..FRIENDS {
        // Names of the longest kind, 32 bytes: each entry as large as any.
        let friend = server.user_where(&format!("{n:02}{}", "f".repeat(29)), |_| true);
        assert_eq!(friend.name.len(), tern_proto::limits::USERNAME_LEN_MAX);
        let mut f = server.login(&friend);
        assert_eq!(
            f.friend_add(&alice.name).expect("ask"),
            FriendAdded::Requested(alice.id)
        );
        assert_eq!(
            a.friend_add(&friend.name).expect("accept"),
            FriendAdded::Friends(friend.id)
        );
        // Every third friend stays online.
        let stays = n % 3 == 0;
        if stays {
            online.push(f);
        }
        expected.push(Friend {
            user: friend.id,
            username: friend.name,
            online: stays,
        });
        if n == 1 {
            // Two fit in one frame: the old request still lists them.
            match raw_answer(&mut raw, ClientBody::FriendList) {
                ServerBody::Friends { friends } => assert_eq!(friends.len(), 2),
                other => panic!("expected Friends, got {other:?}"),
            }
        }
    }
    expected.sort_by_key(|f| f.user);
    let ids: Vec<u64> = expected.iter().map(|f| f.user).collect();

    // Pages are cut to fit the frame, and follow `after` and `limit`.
    let (first, more) = a.friends_page(0, 1000).expect("first page");
    assert_eq!((ids_of(&first), more), (ids[..PER_PAGE].to_vec(), true));
    let (rest, more) = a.friends_page(ids[PER_PAGE - 1], 1000).expect("second page");
    assert_eq!((ids_of(&rest), more), (ids[PER_PAGE..].to_vec(), false));
    let (one, more) = a.friends_page(0, 0).expect("limit 0 counts as 1");
    assert_eq!((ids_of(&one), more), (ids[..1].to_vec(), true));
    let (two, more) = a.friends_page(ids[0], 2).expect("a short page");
    assert_eq!((ids_of(&two), more), (ids[1..3].to_vec(), true));
    assert_eq!(
        a.friends_page(u64::MAX, 10).expect("past the end"),
        (vec![], false)
    );

    // The whole list, names and presence (sessions dropped a moment ago
    // may take a moment to end).
    eventually("every friend listed with their presence", || {
        (a.friends().expect("friends") == expected).then_some(())
    });

    // The old request refuses what does not fit, and says what to use.
    match raw_answer(&mut raw, ClientBody::FriendList) {
        ServerBody::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::LimitExceeded);
            assert!(message.contains("FriendsPage"), "{message}");
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    drop(online);
}

/// `FriendList` refuses only a list that may not fit: a name of up to 8
/// bytes lies inline in its `Friend` and costs nothing more, so 32
/// friends with short names (24 bytes each, the 768 a 1,024-byte frame
/// keeps for them) are listed, and a 33rd is refused (docs/protocol.md
/// 2.8.13).
#[test]
fn a_friend_list_counts_a_short_name_inline() {
    const FIT: usize = 32;
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 1024;
        c.max_message_bytes = 512;
        c.limits.message_rate_per_sec = 0;
        c.limits.registration_rate_per_ip_per_hour = 0;
        c.limits.connection_rate_per_ip = 0;
        c.limits.max_connections_per_ip = 0;
    });
    let alice = server.user_on_shard("inl_", 0);
    let mut a = server.login(&alice);
    let mut raw = RawConn::connect(server.addr());
    raw.login(&alice);
    for n in 0..=FIT {
        let friend = server.user_where(&format!("i{n:02}_"), |_| true);
        assert!(friend.name.len() <= 8, "{}", friend.name);
        let mut f = server.login(&friend);
        f.friend_add(&alice.name).expect("ask");
        a.friend_add(&friend.name).expect("accept");
        match (n + 1, raw_answer(&mut raw, ClientBody::FriendList)) {
            (listed, ServerBody::Friends { friends }) if listed <= FIT => {
                assert_eq!(friends.len(), listed)
            }
            (_, ServerBody::Error { code, .. }) if n + 1 > FIT => {
                assert_eq!(code, ErrorCode::LimitExceeded)
            }
            (listed, other) => panic!("{listed} friends: {other:?}"),
        }
    }
}

fn ids_of(friends: &[Friend]) -> Vec<u64> {
    friends.iter().map(|f| f.user).collect()
}

/// A requester waits until its pair notice (`FriendRequest`, `Invited`)
/// is queued at the pair's shard before it is answered: every answer
/// still comes, in order, and every push reaches its target, whatever
/// the homes of the target and of the pair. The requests are pipelined
/// on one connection, so each waits behind the one before it.
#[test]
fn pushes_of_pipelined_friend_requests_and_invites_all_arrive() {
    let server = TestServer::start_with(|c| c.limits.message_rate_per_sec = 0);
    let shards = server.shards();
    let requester = server.user_on_shard("pq", 0);
    let mut owner = server.login(&requester);
    let group = group_on_shard(&mut owner, 1 % shards, shards, false);
    let mut targets = Vec::new();
    for home in 0..shards {
        // A pair is homed with one of its two users.
        let mut pairs = vec![0, home];
        pairs.dedup();
        for pair in pairs {
            for n in 0..2 {
                let target = server.user_where(&format!("pt{home}{pair}{n}_"), |u| {
                    u.home(shards) == home
                        && shard_of(ConvId::direct(requester.id, u.id).placement_key(), shards) == pair
                });
                targets.push(target);
            }
        }
    }
    let mut sessions: Vec<Client> = targets.iter().map(|t| server.login(t)).collect();
    let mut raw = RawConn::connect(server.addr());
    raw.login(&requester);
    let mut asked = Vec::new();
    for target in &targets {
        let add = raw.send(ClientBody::FriendAdd {
            username: target.name.clone(),
        });
        let invite = raw.send(ClientBody::GroupInvite {
            group,
            user: target.id,
        });
        asked.push((
            add,
            target,
            ServerBody::FriendRequestSent {
                user: target.id,
                username: target.name.clone(),
            },
        ));
        asked.push((invite, target, ServerBody::Ok));
    }
    for (id, target, answer) in asked {
        let frame = raw.expect_frame();
        assert_eq!(
            (frame.request_id, frame.body),
            (id, answer),
            "answer about {target:?}"
        );
    }
    for (session, target) in sessions.iter_mut().zip(&targets) {
        let mut pushes = vec![expect_push(session), expect_push(session)];
        pushes.sort_by_key(|p| matches!(p, ServerBody::Invited { .. }));
        assert_eq!(
            pushes,
            vec![
                ServerBody::FriendRequest {
                    from: requester.id,
                    username: requester.name.clone()
                },
                ServerBody::Invited {
                    group,
                    by: requester.id
                },
            ],
            "pushes to {target:?}"
        );
    }
}
