//! Friends and presence across home shards.

mod common;

use std::time::Duration;

use common::*;
use tern_client::{Client, ConvId, ErrorCode, Friend, FriendAdded, ServerBody, UserId};
use tern_proto::shard_of;

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

/// No `Presence` of a friend reaches the remover's session after the `Ok`
/// of their `FriendRemove`, or of their `UserBlock`, which ends the
/// friendship too. Races the ex-friend's coming online (its announcement
/// reads their friends, then pushes) against the removal (even rounds) or
/// the block (odd rounds), reading the remover's frames in order. The
/// ex-friend has many friends of higher ids than the remover, so that the
/// announcement goes on reading after it has seen the remover.
#[test]
fn no_presence_of_an_ex_friend_arrives_after_the_removal() {
    const FILLER: usize = 400;
    let server = TestServer::start_with(|c| {
        c.limits.message_rate_per_sec = 0;
        c.limits.connection_rate_per_ip = 0;
        c.limits.max_connections_per_ip = 0;
        c.limits.registration_rate_per_ip_per_hour = 0;
    });
    let store = server.admin_context().store;
    let shards = server.shards();
    let mut late = Vec::new();
    for (sa, sb) in (0..shards).flat_map(|a| (0..shards).map(move |b| (a, b))) {
        let alice = server.user_on_shard(&format!("pal{sa}{sb}_"), sa);
        let bob = server.user_on_shard(&format!("pbo{sa}{sb}_"), sb);
        let watcher = server.user_on_shard(&format!("pwa{sa}{sb}_"), 0);
        for n in 0..FILLER {
            let filler = store
                .register(&format!("pf{sa}{sb}_{n}"), PASSWORD.as_bytes())
                .expect("register");
            store.add_friend(alice.id, filler).expect("ask");
            store.add_friend(filler, alice.id).expect("accept");
        }
        store.add_friend(alice.id, watcher.id).expect("ask");
        store.add_friend(watcher.id, alice.id).expect("accept");
        let mut w = server.login(&watcher);
        let mut raw = RawConn::connect(server.addr());
        raw.login(&bob);
        for round in 0..30u32 {
            let blocks = round % 2 == 1;
            // The last round's block, if any, is lifted (through the
            // server, whose cached state enforces it).
            let id = raw.send(tern_client::ClientBody::UserUnblock { user: alice.id });
            let unblocked = raw.expect_frame();
            assert_eq!((unblocked.request_id, unblocked.body), (id, ServerBody::Ok));
            store.add_friend(alice.id, bob.id).expect("ask");
            store.add_friend(bob.id, alice.id).expect("accept");
            let delay = Duration::from_micros(300 + u64::from(round * 23 % 600));
            let barrier = std::sync::Barrier::new(2);
            let a = std::thread::scope(|s| {
                let comes = s.spawn(|| {
                    barrier.wait();
                    server.login(&alice)
                });
                barrier.wait();
                std::thread::sleep(delay);
                let id = raw.send(if blocks {
                    tern_client::ClientBody::UserBlock { user: alice.id }
                } else {
                    tern_client::ClientBody::FriendRemove { user: alice.id }
                });
                let mut removed = false;
                loop {
                    let wait = if removed {
                        Duration::from_millis(50)
                    } else {
                        TIMEOUT
                    };
                    match raw.read(wait) {
                        RawRead::Frame(f) if f.request_id == id => {
                            assert_eq!(f.body, ServerBody::Ok);
                            removed = true;
                        }
                        RawRead::Frame(f) => match f.body {
                            ServerBody::Presence { user, .. } if user == alice.id => {
                                if removed {
                                    late.push((sa, sb, round));
                                }
                            }
                            other => panic!("unexpected {other:?}"),
                        },
                        RawRead::Timeout if removed => break,
                        other => panic!("{other:?}"),
                    }
                }
                comes.join().expect("alice logs in")
            });
            // Alice goes again; the watcher sees her come and go, so no
            // announcement of this round is left for the next.
            drop(a);
            loop {
                match expect_presence(&mut w) {
                    (user, false) if user == alice.id => break,
                    (user, true) if user == alice.id => continue,
                    other => panic!("unexpected presence {other:?}"),
                }
            }
        }
    }
    assert!(
        late.is_empty(),
        "a Presence of the ex-friend came after the Ok of FriendRemove (even rounds) or UserBlock (odd) (shards, round): {late:?}"
    );
}

/// The last `Presence` a friend gets of a user matches whether the user
/// is online once things settle, however closely their comings and
/// goings follow each other. Several subjects, each a friend of one
/// watcher, log in and out from two threads each (so either thread's
/// session may be the first or the last), all their pairs with the
/// watcher homed on one shard so that their announcements queue there
/// for the same permit; then half of them stay online. The watcher reads
/// every push as it comes.
#[test]
fn the_last_presence_a_friend_gets_is_the_state_that_holds() {
    const SUBJECTS: usize = 6;
    const ROUNDS: u32 = 40;
    let server = TestServer::start_with(|c| {
        c.limits.message_rate_per_sec = 0;
        c.limits.connection_rate_per_ip = 0;
        c.limits.max_connections_per_ip = 0;
        c.limits.registration_rate_per_ip_per_hour = 0;
    });
    let store = server.admin_context().store;
    let shards = server.shards();
    let watcher = server.user_on_shard("lw", 0);
    // The watcher's own shard: a pair lives with one of its two users, so
    // it is the one shard every subject's pair with the watcher can share.
    let pair_shard = 0;
    let subjects: Vec<User> = (0..SUBJECTS)
        .map(|n| {
            server.user_where(&format!("ls{n}_"), |u| {
                u.home(shards) == n % shards
                    && shard_of(ConvId::direct(u.id, watcher.id).placement_key(), shards) == pair_shard
            })
        })
        .collect();
    for subject in &subjects {
        store.add_friend(subject.id, watcher.id).expect("ask");
        store.add_friend(watcher.id, subject.id).expect("accept");
    }
    let mut w = server.login(&watcher);
    let flapping = std::sync::atomic::AtomicUsize::new(SUBJECTS * 2);
    let mut last: std::collections::HashMap<UserId, bool> = std::collections::HashMap::new();
    let stayed = std::thread::scope(|s| {
        for (n, subject) in subjects.iter().enumerate() {
            for t in 0..2u64 {
                let (server, flapping) = (&server, &flapping);
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        let session = server.login(subject);
                        let pause = (n as u64 * 7 + t * 13 + u64::from(round) * 29) % 400;
                        std::thread::sleep(Duration::from_micros(pause));
                        drop(session);
                    }
                    flapping.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        }
        // Read while they flap, so the watcher's queue never fills.
        while flapping.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if let Some(ServerBody::Presence { user, online }) =
                next_raw_push(&mut w, Duration::from_millis(20))
            {
                last.insert(user, online);
            }
        }
        subjects
            .iter()
            .enumerate()
            .filter(|(n, _)| n % 2 == 1)
            .map(|(_, subject)| server.login(subject))
            .collect::<Vec<_>>()
    });
    // Settled: no announcement is left once the watcher hears nothing
    // for a while.
    while let Some(push) = next_raw_push(&mut w, Duration::from_secs(1)) {
        match push {
            ServerBody::Presence { user, online } => {
                last.insert(user, online);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let wrong: Vec<_> = subjects
        .iter()
        .enumerate()
        .filter(|(n, subject)| last.get(&subject.id).copied() != Some(n % 2 == 1))
        .map(|(n, subject)| (n, subject.id, last.get(&subject.id).copied()))
        .collect();
    assert!(
        wrong.is_empty(),
        "the watcher's last Presence differs from the final state (subject, id, last seen): {wrong:?}"
    );
    drop(stayed);
}

/// Reads what `watchers` get until none of them has heard anything for
/// a second, or for as long as `busy` says so, adding each `Presence` to
/// the watcher's list in `heard`.
fn read_presence(watchers: &mut [Client], heard: &mut [Vec<(UserId, bool)>], busy: impl Fn() -> bool) {
    let mut last_push = std::time::Instant::now();
    while busy() || last_push.elapsed() < Duration::from_secs(1) {
        for (w, pushes) in watchers.iter_mut().zip(heard.iter_mut()) {
            while let Some(push) = next_raw_push(w, Duration::from_millis(1)) {
                match push {
                    ServerBody::Presence { user, online } => pushes.push((user, online)),
                    other => panic!("unexpected {other:?}"),
                }
                last_push = std::time::Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every friend's last `Presence` of `subject` in `heard` says `online`.
fn assert_last_presence(friends: &[User], heard: &[Vec<(UserId, bool)>], subject: UserId, online: bool) {
    let wrong: Vec<_> = friends
        .iter()
        .zip(heard)
        .filter(|(_, pushes)| pushes.last() != Some(&(subject, online)))
        .map(|(f, pushes)| (f.id, pushes.last().copied()))
        .collect();
    let state = if online { "online" } else { "offline" };
    assert!(
        wrong.is_empty(),
        "friends whose last Presence is not {state}: {wrong:?}"
    );
}

fn no_rate_limits(c: &mut tern_engine::config::Config) {
    c.limits.message_rate_per_sec = 0;
    c.limits.connection_rate_per_ip = 0;
    c.limits.max_connections_per_ip = 0;
    c.limits.registration_rate_per_ip_per_hour = 0;
}

/// Many friends of two watchers (one per shard) log in at once: the
/// announcements are batched, and each watcher hears of each of them
/// exactly once, online, and of nobody else.
#[test]
fn a_login_burst_reaches_every_friend_exactly_once() {
    const SUBJECTS: usize = 48;
    let server = TestServer::start_with(no_rate_limits);
    let store = server.admin_context().store;
    let watchers: Vec<User> = (0..2)
        .map(|s| server.user_on_shard(&format!("bw{s}_"), s % server.shards()))
        .collect();
    let subjects: Vec<User> = (0..SUBJECTS)
        .map(|n| server.user_on_shard(&format!("bs{n}_"), n % server.shards()))
        .collect();
    for subject in &subjects {
        for watcher in &watchers {
            store.add_friend(subject.id, watcher.id).expect("ask");
            store.add_friend(watcher.id, subject.id).expect("accept");
        }
    }
    let mut w: Vec<Client> = watchers.iter().map(|u| server.login(u)).collect();
    let barrier = std::sync::Barrier::new(SUBJECTS);
    let sessions = std::thread::scope(|s| {
        let joins: Vec<_> = subjects
            .iter()
            .map(|subject| {
                let (server, barrier) = (&server, &barrier);
                s.spawn(move || {
                    let mut client = server.connect();
                    barrier.wait();
                    client.login(&subject.name, PASSWORD).expect("login");
                    client
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("login"))
            .collect::<Vec<_>>()
    });
    let mut heard = vec![Vec::new(); w.len()];
    read_presence(&mut w, &mut heard, || false);
    for (watcher, pushes) in watchers.iter().zip(&heard) {
        let mut got = pushes.clone();
        got.sort_unstable();
        let mut want: Vec<(UserId, bool)> = subjects.iter().map(|s| (s.id, true)).collect();
        want.sort_unstable();
        assert_eq!(got, want, "watcher {}: one online push per friend", watcher.id);
    }
    drop(sessions);
}

/// A user with many friends on every shard logs in and out rapidly from
/// two threads: once it settles every friend's last `Presence` of them
/// is the final state, first online (a session stays), then offline.
#[test]
fn a_flapping_user_leaves_every_friend_with_the_final_state() {
    const FRIENDS: usize = 40;
    const ROUNDS: u64 = 30;
    let server = TestServer::start_with(no_rate_limits);
    let store = server.admin_context().store;
    let subject = server.user_on_shard("fs", 0);
    let friends: Vec<User> = (0..FRIENDS)
        .map(|n| server.user_on_shard(&format!("ff{n}_"), n % server.shards()))
        .collect();
    for friend in &friends {
        store.add_friend(subject.id, friend.id).expect("ask");
        store.add_friend(friend.id, subject.id).expect("accept");
    }
    let mut w: Vec<Client> = friends.iter().map(|u| server.login(u)).collect();
    let mut heard = vec![Vec::new(); w.len()];
    let flapping = std::sync::atomic::AtomicUsize::new(2);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (server, subject, flapping) = (&server, &subject, &flapping);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let session = server.login(subject);
                    std::thread::sleep(Duration::from_micros((t * 131 + round * 37) % 500));
                    drop(session);
                }
                flapping.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // Read while it flaps, so no friend's queue fills.
        read_presence(&mut w, &mut heard, || {
            flapping.load(std::sync::atomic::Ordering::SeqCst) > 0
        });
    });
    let stays = server.login(&subject);
    read_presence(&mut w, &mut heard, || false);
    assert_last_presence(&friends, &heard, subject.id, true);
    drop(stays);
    read_presence(&mut w, &mut heard, || false);
    assert_last_presence(&friends, &heard, subject.id, false);
}
