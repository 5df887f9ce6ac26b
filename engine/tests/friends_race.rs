//! Friend requests under concurrency, over real sockets and a real store:
//! crossed asks, limits hit by many asks at once, accepts racing blocks and
//! removals, a restart amid asks, paging at its edges, and who is pushed.

mod common;

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use common::*;
use tern_client::{Client, ClientError, ErrorCode, FriendAdded, ServerBody};

fn roomy(tweak: impl FnOnce(&mut tern_engine::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.limits.message_rate_per_sec = 0;
        c.limits.registration_rate_per_ip_per_hour = 0;
        c.limits.connection_rate_per_ip = 0;
        c.limits.max_connections_per_ip = 0;
        tweak(c);
    })
}

fn ids(users: Vec<tern_client::Friend>) -> Vec<u64> {
    users.iter().map(|f| f.user).collect()
}

fn incoming(c: &mut Client) -> Vec<u64> {
    ids(c.friend_requests_all(true).expect("incoming"))
}

fn outgoing(c: &mut Client) -> Vec<u64> {
    ids(c.friend_requests_all(false).expect("outgoing"))
}

fn friend_ids(c: &mut Client) -> Vec<u64> {
    ids(c.friends().expect("friends"))
}

/// Drains pushes until QUIET passes; returns them.
fn drain(c: &mut Client) -> Vec<ServerBody> {
    let mut out = Vec::new();
    while let Some(p) = c.next_push(QUIET).expect("alive") {
        out.push(p);
    }
    out
}

#[test]
fn crossed_asks_end_as_friends_without_requests() {
    let server = roomy(|_| {});
    let n = server.shards();
    for round in 0..6 {
        for (sa, sb) in [(0, 1), (1, 0), (0, 0), (1 % n, 1 % n)] {
            let alice = server.user_on_shard(&format!("xa{round}{sa}{sb}_"), sa);
            let bob = server.user_on_shard(&format!("xb{round}{sa}{sb}_"), sb);
            let mut a = server.login(&alice);
            let mut b = server.login(&bob);
            let barrier = Barrier::new(2);
            let (ra, rb) = thread::scope(|s| {
                let ta = s.spawn(|| {
                    barrier.wait();
                    a.friend_add(&bob.name)
                });
                let tb = s.spawn(|| {
                    barrier.wait();
                    b.friend_add(&alice.name)
                });
                (ta.join().unwrap(), tb.join().unwrap())
            });
            let (ra, rb) = (ra.expect("a asks"), rb.expect("b asks"));
            match (ra, rb) {
                (FriendAdded::Requested(x), FriendAdded::Friends(y))
                | (FriendAdded::Friends(y), FriendAdded::Requested(x)) => {
                    let _ = (x, y);
                }
                other => panic!("crossed asks answered {other:?}"),
            }
            assert_eq!(friend_ids(&mut a), vec![bob.id]);
            assert_eq!(friend_ids(&mut b), vec![alice.id]);
            for c in [&mut a, &mut b] {
                assert!(incoming(c).is_empty());
                assert!(outgoing(c).is_empty());
            }
            // The one who asked first hears of the acceptance; the other of
            // the request.
            let (pa, pb) = (vec![expect_push(&mut a)], vec![expect_push(&mut b)]);
            let (asker_pushes, accepter_pushes, asker, accepter) = match ra {
                FriendAdded::Requested(_) => (pa, pb, &alice, &bob),
                FriendAdded::Friends(_) => (pb, pa, &bob, &alice),
            };
            assert_eq!(
                asker_pushes,
                vec![ServerBody::FriendAccepted {
                    by: accepter.id,
                    username: accepter.name.clone()
                }],
                "round {round}"
            );
            assert_eq!(
                accepter_pushes,
                vec![ServerBody::FriendRequest {
                    from: asker.id,
                    username: asker.name.clone()
                }],
                "round {round}"
            );
        }
    }
}

#[test]
fn concurrent_asks_never_exceed_the_request_limits() {
    let server = roomy(|c| c.store.max_friend_requests = 3);
    let n = server.shards();
    let target = server.user_on_shard("target_", 0);
    let askers: Vec<User> = (0..8)
        .map(|i| server.user_on_shard(&format!("ask{i}_"), i % n))
        .collect();
    let mut clients: Vec<Client> = askers.iter().map(|u| server.login(u)).collect();
    let barrier = Barrier::new(clients.len());
    let results: Vec<Result<FriendAdded, ClientError>> = thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .map(|c| {
                let (barrier, name) = (&barrier, target.name.clone());
                s.spawn(move || {
                    barrier.wait();
                    c.friend_add(&name)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
            assert!(e.to_string().contains("this user has too many pending"), "{e}");
        }
    }
    assert_eq!(ok, 3, "{results:?}");
    let mut t = server.login(&target);
    assert_eq!(incoming(&mut t).len(), 3);

    // One user, many sessions, asking many users at once.
    let sender = server.user_on_shard("sender_", 1 % n);
    let targets: Vec<User> = (0..8)
        .map(|i| server.user_on_shard(&format!("tg{i}_"), i % n))
        .collect();
    let mut sessions: Vec<Client> = (0..8).map(|_| server.login(&sender)).collect();
    let barrier = Barrier::new(sessions.len());
    let results: Vec<Result<FriendAdded, ClientError>> = thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .zip(&targets)
            .map(|(c, t)| {
                let (barrier, name) = (&barrier, t.name.clone());
                s.spawn(move || {
                    barrier.wait();
                    c.friend_add(&name)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3, "{results:?}");
    assert_eq!(outgoing(&mut sessions[0]).len(), 3);
}

#[test]
fn concurrent_accepts_never_exceed_max_friends() {
    let server = roomy(|c| c.store.max_friends = 2);
    let n = server.shards();
    let popular = server.user_on_shard("pop_", 0);
    let askers: Vec<User> = (0..6)
        .map(|i| server.user_on_shard(&format!("fan{i}_"), i % n))
        .collect();
    for u in &askers {
        server.login(u).friend_add(&popular.name).expect("ask");
    }
    let mut sessions: Vec<Client> = (0..6).map(|_| server.login(&popular)).collect();
    let barrier = Barrier::new(sessions.len());
    let results: Vec<Result<FriendAdded, ClientError>> = thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .zip(&askers)
            .map(|(c, u)| {
                let (barrier, name) = (&barrier, u.name.clone());
                s.spawn(move || {
                    barrier.wait();
                    c.friend_add(&name)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "{results:?}");
    assert_eq!(friend_ids(&mut sessions[0]).len(), 2);
    // The refused ones still wait.
    assert_eq!(incoming(&mut sessions[0]).len(), 4);
}

#[test]
fn a_block_racing_an_accept_leaves_nothing() {
    let server = roomy(|_| {});
    for round in 0..12 {
        let (sa, sb) = (round % 2, (round / 2) % 2);
        let alice = server.user_on_shard(&format!("ba{round}_"), sa);
        let bob = server.user_on_shard(&format!("bb{round}_"), sb);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        a.friend_add(&bob.name).expect("ask");
        let mut blocker = if round % 4 < 2 {
            server.login(&alice)
        } else {
            server.login(&bob)
        };
        let blocked = if round % 4 < 2 { bob.id } else { alice.id };
        let barrier = Barrier::new(2);
        let (accept, block) = thread::scope(|s| {
            let t1 = s.spawn(|| {
                barrier.wait();
                b.friend_add(&alice.name)
            });
            let t2 = s.spawn(|| {
                barrier.wait();
                blocker.block_user(blocked)
            });
            (t1.join().unwrap(), t2.join().unwrap())
        });
        block.expect("block");
        match accept {
            Ok(FriendAdded::Friends(_)) => {}
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}"),
            Ok(other) => panic!("accept answered {other:?}"),
        }
        for c in [&mut a, &mut b] {
            assert!(friend_ids(c).is_empty(), "round {round}");
            assert!(incoming(c).is_empty());
            assert!(outgoing(c).is_empty());
        }
    }
}

#[test]
fn a_remove_racing_an_accept_leaves_a_consistent_state() {
    let server = roomy(|_| {});
    for round in 0..12 {
        let (sa, sb) = (round % 2, (round / 2) % 2);
        let alice = server.user_on_shard(&format!("ra{round}_"), sa);
        let bob = server.user_on_shard(&format!("rb{round}_"), sb);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        a.friend_add(&bob.name).expect("ask");
        let barrier = Barrier::new(2);
        let (accept, remove) = thread::scope(|s| {
            let t1 = s.spawn(|| {
                barrier.wait();
                b.friend_add(&alice.name)
            });
            let t2 = s.spawn(|| {
                barrier.wait();
                a.friend_remove(bob.id)
            });
            (t1.join().unwrap(), t2.join().unwrap())
        });
        remove.expect("remove");
        assert!(friend_ids(&mut a).is_empty());
        assert!(friend_ids(&mut b).is_empty());
        match accept.expect("accept") {
            // Accepted first, then removed: nothing left.
            FriendAdded::Friends(_) => {
                assert!(outgoing(&mut b).is_empty());
                assert!(incoming(&mut a).is_empty());
            }
            // Cancelled first: Bob's add asks Alice.
            FriendAdded::Requested(_) => {
                assert_eq!(outgoing(&mut b), vec![alice.id]);
                assert_eq!(incoming(&mut a), vec![bob.id]);
            }
        }
        assert!(outgoing(&mut a).is_empty());
        assert!(incoming(&mut b).is_empty());
    }
}

#[test]
fn a_one_sided_request_never_shows_presence() {
    let server = roomy(|_| {});
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    a.friend_add(&bob.name).expect("ask");
    for _ in 0..3 {
        let b1 = server.login(&bob);
        let b2 = server.login(&bob);
        drop(b1);
        drop(b2);
    }
    let mut b = server.login(&bob);
    assert_eq!(
        drain(&mut a),
        vec![],
        "alice, who only asked, heard of bob coming and going"
    );
    // Alice comes and goes on other sessions; Bob hears nothing but the request.
    for _ in 0..3 {
        drop(server.login(&alice));
    }
    assert!(drain(&mut b).is_empty());
    // Declined: still nothing.
    b.friend_remove(alice.id).expect("decline");
    drop(b);
    for _ in 0..2 {
        drop(server.login(&bob));
    }
    assert!(drain(&mut a).is_empty());
}

#[test]
fn request_pages_at_the_edges() {
    let server = roomy(|c| {
        c.max_frame_bytes = 1024;
        c.max_message_bytes = 512;
    });
    let alice = server.user_on_shard("alice", 0);
    let mut a = server.login(&alice);
    let mut askers = Vec::new();
    for i in 0..20 {
        // 32-byte names, the longest.
        let prefix = format!("{:0<28}{i:02}_", "longname");
        let u = server.user_on_shard(&prefix[..prefix.len().min(31)], i % server.shards());
        assert!(u.name.len() <= 32, "{}", u.name);
        server.login(&u).friend_add(&alice.name).expect("ask");
        askers.push(u.id);
    }
    askers.sort_unstable();
    let all = a.friend_requests_all(true).expect("all");
    assert_eq!(ids(all.clone()), askers);
    assert!(all.iter().all(|f| !f.online && !f.username.is_empty()));
    let (page, more) = a.friend_requests_page(true, 0, u32::MAX).expect("huge limit");
    assert!(
        more && !page.is_empty() && page.len() < 20,
        "{} {more}",
        page.len()
    );
    let (page, more) = a
        .friend_requests_page(true, u64::MAX, u32::MAX)
        .expect("after max");
    assert!(page.is_empty() && !more);
    let (page, more) = a
        .friend_requests_page(true, u64::MAX - 1, 0)
        .expect("after max-1");
    assert!(page.is_empty() && !more);
    let (page, more) = a.friend_requests_page(true, askers[19] - 1, 0).expect("last");
    assert_eq!((ids(page), more), (vec![askers[19]], false));
    let (page, more) = a.friend_requests_page(false, 0, 0).expect("none out");
    assert!(page.is_empty() && !more);
    // Ask self in other spellings.
    for name in ["ALICE", "Alice", " alice", "alice ", "alice\0"] {
        assert_eq!(
            code_of(a.friend_add(name)),
            ErrorCode::InvalidArgument,
            "{name:?}"
        );
    }
    let err = a.friend_add(&alice.name).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    a.friend_remove(alice.id).expect("remove self is Ok");
    a.friend_remove(u64::MAX).expect("remove unknown is Ok");
    a.friend_remove(0).expect("remove 0 is Ok");
    assert_eq!(code_of(a.friend_add("nobody_here")), ErrorCode::NotFound);
}

#[test]
fn pushes_reach_only_the_asked_user() {
    let server = roomy(|_| {});
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a1 = server.login(&alice);
    let mut a2 = server.login(&alice);
    let mut b1 = server.login(&bob);
    let mut b2 = server.login(&bob);
    let mut c = server.login(&carol);
    a1.friend_add(&bob.name).expect("ask");
    for b in [&mut b1, &mut b2] {
        assert_eq!(
            drain(b),
            vec![ServerBody::FriendRequest {
                from: alice.id,
                username: alice.name.clone()
            }]
        );
    }
    assert!(drain(&mut a2).is_empty());
    assert!(drain(&mut a1).is_empty());
    assert!(drain(&mut c).is_empty());
    b1.friend_add(&alice.name).expect("accept");
    for a in [&mut a1, &mut a2] {
        assert_eq!(
            drain(a),
            vec![ServerBody::FriendAccepted {
                by: bob.id,
                username: bob.name.clone()
            }]
        );
    }
    assert!(drain(&mut b2).is_empty());
    assert!(drain(&mut c).is_empty());
}

#[test]
fn a_restart_amid_asks_leaves_no_half_state() {
    let mut server = roomy(|_| {});
    let n = server.shards();
    let pairs: Vec<(User, User)> = (0..6)
        .map(|i| {
            (
                server.user_on_shard(&format!("pa{i}_"), i % n),
                server.user_on_shard(&format!("pb{i}_"), (i / 2) % n),
            )
        })
        .collect();
    let addr = server.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for (x, y) in pairs.clone() {
        for (me, other) in [(x.clone(), y.clone()), (y, x)] {
            let stop = stop.clone();
            handles.push(thread::spawn(move || {
                let mut c = connect(addr);
                c.login(&me.name, PASSWORD).expect("login");
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = if i % 3 == 2 {
                        c.friend_remove(other.id).map(|_| ())
                    } else {
                        c.friend_add(&other.name).map(|_| ())
                    };
                    if r.is_err() {
                        return i;
                    }
                    i += 1;
                }
                i
            }));
        }
    }
    thread::sleep(Duration::from_millis(400));
    server.restart();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        let done = h.join().unwrap();
        assert!(done > 0);
    }
    for (x, y) in &pairs {
        let mut cx = server.login(x);
        let mut cy = server.login(y);
        let fx = friend_ids(&mut cx).contains(&y.id);
        let fy = friend_ids(&mut cy).contains(&x.id);
        assert_eq!(fx, fy, "half a friendship");
        let x_to_y = outgoing(&mut cx).contains(&y.id);
        assert_eq!(x_to_y, incoming(&mut cy).contains(&x.id), "half a request");
        let y_to_x = outgoing(&mut cy).contains(&x.id);
        assert_eq!(y_to_x, incoming(&mut cx).contains(&y.id), "half a request");
        assert!(!(x_to_y && y_to_x), "crossed requests");
        assert!(!(fx && (x_to_y || y_to_x)), "a request between friends");
    }
}
