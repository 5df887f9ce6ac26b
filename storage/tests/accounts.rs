//! Accounts and tokens over a real store: registration, password checks,
//! token lifetime and revocation, and concurrent registration.

mod common;

use std::sync::{Arc, Barrier};

use common::{open, open_with, tiny_ttl};
use tern_storage::{Store, StoreError, StoreOptions};

#[test]
fn handle_is_clone_send_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<Store>();
}

#[test]
fn default_options_follow_the_spec() {
    let o = StoreOptions::default();
    assert_eq!((o.argon2_memory_kib, o.argon2_iterations), (19_456, 2));
    assert_eq!(o.token_ttl.as_secs(), 30 * 24 * 3600);
    assert_eq!(o.max_tokens_per_user, 64);
    assert_eq!(
        (o.max_friends, o.max_friend_requests, o.max_group_members, o.fsync),
        (1000, 1000, 10_000, true)
    );
}

#[test]
fn register_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.register("alice", b"password1").unwrap(), 1);
    assert_eq!(store.register("bob", b"password2").unwrap(), 2);
    assert_eq!(store.verify_password("alice", b"password1").unwrap(), 1);
    assert_eq!(store.verify_password("bob", b"password2").unwrap(), 2);
    assert_eq!(store.username(1).unwrap().as_deref(), Some("alice"));
    assert_eq!(store.username(3).unwrap(), None);
    assert_eq!(store.user_id("bob").unwrap(), Some(2));
    assert_eq!(store.user_id("carol").unwrap(), None);
    assert_eq!(store.user_id("NOT VALID").unwrap(), None);
}

#[test]
fn default_argon2_parameters_hash_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| *o = StoreOptions::default());
    let id = store.register("alice", b"correct horse").unwrap();
    assert_eq!(store.verify_password("alice", b"correct horse").unwrap(), id);
}

#[test]
fn password_hashes_keep_their_own_parameters() {
    // Raising the cost later must not lock out accounts hashed earlier.
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).register("alice", b"password1").unwrap();
    let store = open_with(dir.path(), |o| o.argon2_memory_kib = 256);
    assert_eq!(store.verify_password("alice", b"password1").unwrap(), 1);
}

#[test]
fn duplicate_username_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.register("alice", b"password1").unwrap();
    assert!(matches!(
        store.register("alice", b"other-password"),
        Err(StoreError::UsernameTaken)
    ));
    // The failed attempt did not consume an id.
    assert_eq!(store.register("bob", b"password2").unwrap(), 2);
    assert_eq!(store.verify_password("alice", b"password1").unwrap(), 1);
}

#[test]
fn wrong_password_and_unknown_user_fail_alike() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.register("alice", b"password1").unwrap();
    assert!(matches!(
        store.verify_password("alice", b"password2"),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(
        store.verify_password("mallory", b"password1"),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(
        store.verify_password("", b""),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(
        store.verify_password("Bad Name!", b"x"),
        Err(StoreError::AuthFailed)
    ));
}

#[test]
fn invalid_names_and_passwords_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(matches!(
        store.register("al", b"password1"),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.register("Alice", b"password1"),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.register("alice", b"short"),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.register("alice", &[0u8; 257]),
        Err(StoreError::InvalidArgument(_))
    ));
    assert_eq!(store.register("alice", b"password1").unwrap(), 1);
}

#[test]
fn bad_argon2_parameters_fail_open() {
    let dir = tempfile::tempdir().unwrap();
    let res = Store::open(
        dir.path(),
        StoreOptions {
            argon2_iterations: 0,
            ..StoreOptions::default()
        },
    );
    assert!(matches!(res, Err(StoreError::InvalidArgument(_))));
}

#[test]
fn tokens_issue_verify_and_reject_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let bob = store.register("bob", b"password2").unwrap();
    let ta = store.issue_token(alice).unwrap();
    let ta2 = store.issue_token(alice).unwrap();
    let tb = store.issue_token(bob).unwrap();
    assert_ne!(ta, ta2);
    assert_eq!(store.verify_token(&ta).unwrap(), alice);
    assert_eq!(store.verify_token(&ta2).unwrap(), alice);
    assert_eq!(store.verify_token(&tb).unwrap(), bob);
    assert!(matches!(
        store.verify_token(&[0u8; 32]),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(
        store.verify_token(&ta[..31]),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(store.verify_token(b""), Err(StoreError::AuthFailed)));
    assert!(matches!(store.issue_token(99), Err(StoreError::NotFound)));
}

#[test]
fn tokens_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.token_ttl = tiny_ttl());
    let alice = store.register("alice", b"password1").unwrap();
    let token = store.issue_token(alice).unwrap();
    assert_eq!(store.verify_token(&token).unwrap(), alice);
    std::thread::sleep(tiny_ttl() * 2);
    assert!(matches!(store.verify_token(&token), Err(StoreError::AuthFailed)));
    // Issuing again sweeps the expired token, so revoke finds only the new one.
    let fresh = store.issue_token(alice).unwrap();
    assert_eq!(store.verify_token(&fresh).unwrap(), alice);
    assert_eq!(store.revoke_tokens(alice).unwrap(), 1);
}

#[test]
fn a_user_holds_at_most_max_tokens_per_user_and_the_oldest_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_tokens_per_user = 3);
    let alice = store.register("alice", b"password1").unwrap();
    let bob = store.register("bob", b"password2").unwrap();
    let b1 = store.issue_token(bob).unwrap();
    let mut issued = Vec::new();
    for _ in 0..5 {
        issued.push(store.issue_token(alice).unwrap());
        // Tokens are ordered by expiry, in milliseconds.
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    // A cached token is dropped from the cache too, not only the store.
    assert_eq!(store.token_login(&issued[2]).unwrap().0, alice);
    assert_eq!(store.cached_token_login(&issued[2]).map(|(u, _)| u), Some(alice));
    issued.push(store.issue_token(alice).unwrap());
    for (i, token) in issued.iter().enumerate() {
        if i < 3 {
            assert!(
                matches!(store.verify_token(token), Err(StoreError::AuthFailed)),
                "token {i} should be dropped"
            );
        } else {
            assert_eq!(store.verify_token(token).unwrap(), alice, "token {i}");
        }
    }
    assert_eq!(store.cached_token_login(&issued[2]), None);
    assert!(matches!(
        store.token_login(&issued[2]),
        Err(StoreError::AuthFailed)
    ));
    // Another user's tokens are not counted or touched.
    assert_eq!(store.verify_token(&b1).unwrap(), bob);
    assert_eq!(store.revoke_tokens(alice).unwrap(), 3);
}

#[test]
fn concurrent_logins_of_one_user_stay_within_max_tokens_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_tokens_per_user = 4);
    let alice = store.register("alice", b"password1").unwrap();
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..8 {
                    store.issue_token(alice).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(store.revoke_tokens(alice).unwrap(), 4);
}

#[test]
fn revoke_removes_only_that_users_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let bob = store.register("bob", b"password2").unwrap();
    let a1 = store.issue_token(alice).unwrap();
    let a2 = store.issue_token(alice).unwrap();
    let b1 = store.issue_token(bob).unwrap();
    assert_eq!(store.revoke_tokens(alice).unwrap(), 2);
    assert!(matches!(store.verify_token(&a1), Err(StoreError::AuthFailed)));
    assert!(matches!(store.verify_token(&a2), Err(StoreError::AuthFailed)));
    assert_eq!(store.verify_token(&b1).unwrap(), bob);
    assert_eq!(store.revoke_tokens(alice).unwrap(), 0);
    // A token issued after revocation works.
    let a3 = store.issue_token(alice).unwrap();
    assert_eq!(store.verify_token(&a3).unwrap(), alice);
}

#[test]
fn reissue_sole_token_leaves_one_new_token_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2, a3, fresh, b1);
    {
        let store = open(dir.path());
        let alice = store.register("alice", b"password1").unwrap();
        let bob = store.register("bob", b"password2").unwrap();
        a1 = store.issue_token(alice).unwrap();
        a2 = store.issue_token(alice).unwrap();
        a3 = store.issue_token(alice).unwrap();
        b1 = store.issue_token(bob).unwrap();
        for token in [&a1, &a2, &a3] {
            store.token_login(token).unwrap(); // cached
        }
        let (new, revoked) = store.reissue_sole_token(alice, &a2).unwrap();
        assert_eq!(revoked, 3, "the caller's own token goes too");
        fresh = new;
        assert_eq!(store.token_login(&fresh).unwrap(), (alice, "alice".to_owned()));
        for token in [&a1, &a2, &a3] {
            assert_eq!(store.cached_token_login(token), None);
            assert!(matches!(store.token_login(token), Err(StoreError::AuthFailed)));
        }
        assert_eq!(store.verify_token(&b1).unwrap(), bob);
        // A token that is no longer live (or someone else's, or garbage)
        // may not log anyone out.
        for current in [&a1[..], &b1[..], b"short"] {
            assert!(matches!(
                store.reissue_sole_token(alice, current),
                Err(StoreError::AuthFailed)
            ));
        }
        assert_eq!(store.verify_token(&fresh).unwrap(), alice);
        assert_eq!(store.verify_token(&b1).unwrap(), bob);
    }
    let store = open(dir.path());
    for token in [&a1, &a2, &a3] {
        assert!(matches!(store.verify_token(token), Err(StoreError::AuthFailed)));
    }
    assert!(store.verify_token(&fresh).is_ok());
    assert!(store.verify_token(&b1).is_ok());
}

#[test]
fn of_two_devices_logging_each_other_out_at_once_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    for _ in 0..20 {
        let tokens = [
            store.issue_token(alice).unwrap(),
            store.issue_token(alice).unwrap(),
        ];
        let barrier = Arc::new(Barrier::new(2));
        let outcomes: Vec<_> = tokens
            .iter()
            .map(|token| {
                let (store, barrier, token) = (store.clone(), barrier.clone(), *token);
                std::thread::spawn(move || {
                    barrier.wait();
                    store.reissue_sole_token(alice, &token)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let winners: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        assert!(outcomes.iter().any(|o| matches!(o, Err(StoreError::AuthFailed))));
        // The winner's new token is the user's only one.
        assert_eq!(store.revoke_tokens(alice).unwrap(), 1);
    }
}

#[test]
fn revoke_token_removes_only_that_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let a1 = store.issue_token(alice).unwrap();
    let a2 = store.issue_token(alice).unwrap();
    assert!(store.revoke_token(&a1).unwrap());
    assert!(matches!(store.verify_token(&a1), Err(StoreError::AuthFailed)));
    assert_eq!(store.verify_token(&a2).unwrap(), alice);
    assert!(!store.revoke_token(&a1).unwrap(), "already revoked");
    assert!(!store.revoke_token(b"short").unwrap());
    // The per-user index lost it too: revoking all finds only a2.
    assert_eq!(store.revoke_tokens(alice).unwrap(), 1);
}

#[test]
fn token_login_caches_and_every_revocation_clears_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let bob = store.register("bob", b"password2").unwrap();
    let a1 = store.issue_token(alice).unwrap();
    let a2 = store.issue_token(alice).unwrap();
    let b1 = store.issue_token(bob).unwrap();
    // Not cached until a login verified it against the store.
    assert_eq!(store.cached_token_login(&a1), None);
    for token in [&a1, &a2] {
        assert_eq!(store.token_login(token).unwrap(), (alice, "alice".to_owned()));
        assert_eq!(store.cached_token_login(token), Some((alice, "alice".to_owned())));
    }
    assert_eq!(store.token_login(&b1).unwrap(), (bob, "bob".to_owned()));
    assert_eq!(store.cached_token_login(&a1[..31]), None);
    assert!(matches!(
        store.token_login(&[7u8; 32]),
        Err(StoreError::AuthFailed)
    ));
    assert_eq!(
        store.cached_token_login(&[7u8; 32]),
        None,
        "a refused token is not cached"
    );

    // A logout forgets that token only.
    assert!(store.revoke_token(&a1).unwrap());
    assert_eq!(store.cached_token_login(&a1), None);
    assert!(matches!(store.token_login(&a1), Err(StoreError::AuthFailed)));
    assert_eq!(store.cached_token_login(&a2), Some((alice, "alice".to_owned())));

    // Revoking a user's tokens (admin revoke, password change) forgets all
    // of that user's, and no one else's.
    assert_eq!(store.revoke_tokens(alice).unwrap(), 1);
    assert_eq!(store.cached_token_login(&a2), None);
    assert!(matches!(store.token_login(&a2), Err(StoreError::AuthFailed)));
    assert_eq!(store.cached_token_login(&b1), Some((bob, "bob".to_owned())));

    // The same through a password change as the server does it.
    store.set_password(bob, b"password3").unwrap();
    store.revoke_tokens(bob).unwrap();
    assert_eq!(store.cached_token_login(&b1), None);
}

#[test]
fn cached_tokens_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.token_ttl = tiny_ttl());
    let alice = store.register("alice", b"password1").unwrap();
    let token = store.issue_token(alice).unwrap();
    assert_eq!(store.token_login(&token).unwrap().0, alice);
    assert!(store.cached_token_login(&token).is_some());
    std::thread::sleep(tiny_ttl() * 2);
    assert_eq!(store.cached_token_login(&token), None);
    assert!(matches!(store.token_login(&token), Err(StoreError::AuthFailed)));
}

#[test]
fn a_revocation_racing_token_logins_never_leaves_the_token_cached() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    for _ in 0..20 {
        let token = store.issue_token(alice).unwrap();
        let barrier = Arc::new(Barrier::new(3));
        let logins: Vec<_> = (0..2)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..50 {
                        let _ = store.token_login(&token);
                    }
                })
            })
            .collect();
        barrier.wait();
        store.revoke_token(&token).unwrap();
        for login in logins {
            login.join().unwrap();
        }
        assert_eq!(store.cached_token_login(&token), None);
        assert!(matches!(store.token_login(&token), Err(StoreError::AuthFailed)));
    }
}

#[test]
fn set_password_replaces_the_old_one_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let alice;
    {
        let store = open(dir.path());
        alice = store.register("alice", b"password1").unwrap();
        let bob = store.register("bob", b"password2").unwrap();
        store.set_password(alice, b"new password").unwrap();
        assert!(matches!(
            store.verify_password("alice", b"password1"),
            Err(StoreError::AuthFailed)
        ));
        assert_eq!(store.verify_password("alice", b"new password").unwrap(), alice);
        assert_eq!(store.verify_password("bob", b"password2").unwrap(), bob);
        assert!(matches!(
            store.set_password(alice, b"short"),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.set_password(99, b"password9"),
            Err(StoreError::NotFound)
        ));
        assert_eq!(store.user_id("alice").unwrap(), Some(alice));
    }
    let store = open(dir.path());
    assert_eq!(store.verify_password("alice", b"new password").unwrap(), alice);
}

#[test]
fn tokens_are_stored_only_as_digests() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let token = store.issue_token(alice).unwrap();
    store.persist().unwrap();
    drop(store);
    let mut found = false;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token),
            "raw token in {entry:?}"
        );
        found |= !bytes.is_empty();
    }
    assert!(found, "store wrote no files");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn concurrent_registration_of_one_name_has_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                store.register("alice", format!("password{i}").as_bytes())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(winners, vec![1], "{results:?}");
    let taken = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::UsernameTaken)))
        .count();
    assert_eq!(taken, 7, "{results:?}");
}

#[test]
fn concurrent_registration_of_many_names_gets_dense_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || store.register(&format!("user{i}"), b"password1").unwrap())
        })
        .collect();
    let mut ids: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
}

static HASH_THREADS_STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_hash_thread() {
    HASH_THREADS_STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let name = std::thread::current()
        .name()
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(name.starts_with("tern-hash-"), "{name}");
}

#[test]
fn hashing_threads_register_and_check_passwords_for_every_caller() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| {
        o.hash_threads = 2;
        o.hash_thread_start = Some(count_hash_thread);
    });
    // More callers than hashing threads, all at once.
    std::thread::scope(|scope| {
        for t in 0..6 {
            let store = &store;
            scope.spawn(move || {
                let name = format!("hasher{t}");
                let id = store.register(&name, b"password1").unwrap();
                assert_eq!(store.verify_password(&name, b"password1").unwrap(), id);
                assert!(matches!(
                    store.verify_password(&name, b"password2"),
                    Err(StoreError::AuthFailed)
                ));
                store.set_password(id, b"password3").unwrap();
                assert_eq!(store.verify_password(&name, b"password3").unwrap(), id);
            });
        }
    });
    assert!(matches!(
        store.verify_password("nobody", b"password1"),
        Err(StoreError::AuthFailed)
    ));
    // Dropping the store stops its hashing threads; a store hashing
    // inline reads the same accounts.
    drop(store);
    // Joined by the drop: both ran their start hook.
    assert_eq!(HASH_THREADS_STARTED.load(std::sync::atomic::Ordering::SeqCst), 2);
    let inline = open(dir.path());
    let id = inline.user_id("hasher3").unwrap().expect("registered");
    assert_eq!(inline.verify_password("hasher3", b"password3").unwrap(), id);
}

#[test]
fn a_password_change_revokes_every_token_and_a_login_with_the_new_password_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let bob = store.register("bob", b"password2").unwrap();
    let (_, old_a) = store.login("alice", b"password1").unwrap();
    let (_, old_b) = store.login("alice", b"password1").unwrap();
    let (_, bobs) = store.login("bob", b"password2").unwrap();
    assert!(matches!(
        store.change_password(alice, b"wrong one", b"password3"),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(
        store.change_password(alice, b"password1", b"short"),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.change_password(99, b"password1", b"password3"),
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.change_password(alice, b"password1", b"password3").unwrap(),
        2
    );
    for token in [old_a, old_b] {
        assert!(matches!(store.verify_token(&token), Err(StoreError::AuthFailed)));
    }
    assert_eq!(store.verify_token(&bobs).unwrap(), bob, "other users keep theirs");
    assert!(matches!(
        store.login("alice", b"password1"),
        Err(StoreError::AuthFailed)
    ));
    let (_, fresh) = store.login("alice", b"password3").unwrap();
    assert_eq!(store.verify_token(&fresh).unwrap(), alice);
    // The old password cannot change it again.
    assert!(matches!(
        store.change_password(alice, b"password1", b"password4"),
        Err(StoreError::AuthFailed)
    ));
}

#[test]
fn of_concurrent_changes_from_the_same_password_exactly_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    // Hashing that takes a few milliseconds, so the changes overlap.
    let store = open_with(dir.path(), |o| o.argon2_memory_kib = 4096);
    let alice = store.register("alice", b"password0").unwrap();
    const CHANGES: usize = 6;
    let barrier = Barrier::new(CHANGES);
    let outcomes: Vec<Result<usize, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=CHANGES)
            .map(|n| {
                let (store, barrier) = (&store, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    store.change_password(alice, b"password0", format!("password{n}").as_bytes())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: Vec<usize> = (1..=CHANGES).filter(|n| outcomes[n - 1].is_ok()).collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    for (n, outcome) in outcomes.iter().enumerate() {
        if !won.contains(&(n + 1)) {
            assert!(matches!(outcome, Err(StoreError::AuthFailed)), "{outcome:?}");
        }
    }
    let password = format!("password{}", won[0]);
    assert_eq!(
        store.verify_password("alice", password.as_bytes()).unwrap(),
        alice
    );
}

#[test]
fn password_changes_and_account_deletions_sharing_a_token_stripe_never_deadlock() {
    // A password change took the user's token stripe, then the
    // registration lock; an account deletion takes them the other way
    // round. Users 64 ids apart share a stripe, so a user changing their
    // password while an operator deleted another account could stop every
    // registration, and every login of that stripe, for good. Deleting an
    // id that does not exist takes both locks too, so the deleting thread
    // hammers them without running out of accounts.
    const STRIPES: u64 = 64;
    const CHANGES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let changer = store.register("changer", b"password-0").unwrap();
    let same_stripe = changer + STRIPES * 1000;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let changing = {
        let (store, done) = (store.clone(), done_tx.clone());
        std::thread::spawn(move || {
            for n in 0..CHANGES {
                let (old, new) = (format!("password-{n}"), format!("password-{}", n + 1));
                store
                    .change_password(changer, old.as_bytes(), new.as_bytes())
                    .unwrap();
            }
            done.send(()).unwrap();
        })
    };
    let deleting = {
        let (store, stop, done) = (store.clone(), Arc::clone(&stop), done_tx);
        std::thread::spawn(move || {
            let mut deletions = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(matches!(
                    store.delete_account(same_stripe),
                    Err(StoreError::NotFound)
                ));
                deletions += 1;
            }
            done.send(()).unwrap();
            deletions
        })
    };
    if done_rx.recv_timeout(std::time::Duration::from_secs(30)).is_err() {
        panic!("a password change and an account deletion deadlocked");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if done_rx.recv_timeout(std::time::Duration::from_secs(30)).is_err() {
        panic!("a password change and an account deletion deadlocked");
    }
    changing.join().unwrap();
    assert!(deleting.join().unwrap() > 0);
    // Both locks are free: a registration and a login go through.
    store.register("after", b"password-y").unwrap();
    assert_eq!(
        store
            .verify_password("changer", format!("password-{CHANGES}").as_bytes())
            .unwrap(),
        changer
    );
}
