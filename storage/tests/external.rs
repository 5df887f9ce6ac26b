//! External logins (a user vouched for by the operator's identity
//! provider) over a real store: accounts created without a password, the
//! policy on password accounts, and refusal of provider tokens issued
//! before the user's sessions were revoked, across a reopen.

mod common;

use std::sync::{Arc, Barrier};

use common::open;
use tern_storage::{ExternalLogin, ExternalPolicy, StoreError};

const CREATE: ExternalPolicy = ExternalPolicy {
    create_accounts: true,
    password_accounts: false,
};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn logged_in(outcome: ExternalLogin) -> (u64, [u8; 32], bool) {
    match outcome {
        ExternalLogin::LoggedIn { user, token, created } => (user, token, created),
        other => panic!("expected a login, got {other:?}"),
    }
}

#[test]
fn an_external_login_creates_a_passwordless_account_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.register("alice", b"password1").unwrap();
    let (carol, token, created) = logged_in(store.external_login("carol", None, CREATE).unwrap());
    assert!(created);
    assert_eq!(carol, 2);
    assert_eq!(store.token_login(&token).unwrap(), (carol, "carol".to_owned()));
    assert_eq!(store.user_id("carol").unwrap(), Some(carol));

    let (again, second, created) = logged_in(store.external_login("carol", Some(now_ms()), CREATE).unwrap());
    assert_eq!((again, created), (carol, false));
    assert_ne!(token, second);

    // No password opens it, and it has none to change: refused as a
    // wrong password, never reported as a corrupt hash.
    for password in [&b"password1"[..], b"!external", b""] {
        assert!(matches!(
            store.login("carol", password),
            Err(StoreError::AuthFailed)
        ));
    }
    assert!(matches!(
        store.change_password(carol, b"whatever1", b"password2"),
        Err(StoreError::AuthFailed)
    ));
    // The name is taken for Register like any other.
    assert!(matches!(
        store.register("carol", b"password1"),
        Err(StoreError::UsernameTaken)
    ));
}

#[test]
fn the_policy_decides_missing_and_password_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let strict = ExternalPolicy {
        create_accounts: false,
        password_accounts: false,
    };
    assert_eq!(
        store.external_login("nobody", None, strict).unwrap(),
        ExternalLogin::NoAccount
    );
    assert_eq!(store.user_id("nobody").unwrap(), None);
    assert_eq!(
        store.external_login("alice", None, CREATE).unwrap(),
        ExternalLogin::PasswordAccount
    );
    let lenient = ExternalPolicy {
        create_accounts: false,
        password_accounts: true,
    };
    let (user, _, created) = logged_in(store.external_login("alice", None, lenient).unwrap());
    assert_eq!((user, created), (alice, false));
    // Her password still works beside it.
    assert_eq!(store.verify_password("alice", b"password1").unwrap(), alice);
    assert!(matches!(
        store.external_login("Not A Name", None, CREATE),
        Err(StoreError::InvalidArgument(_))
    ));
}

#[test]
fn provider_tokens_older_than_a_revocation_are_refused_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let issued_before;
    {
        let store = open(dir.path());
        let (dave, token, _) = logged_in(store.external_login("dave", Some(now_ms()), CREATE).unwrap());
        issued_before = now_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(store.revoke_tokens(dave).unwrap(), 1);
        assert!(matches!(store.token_login(&token), Err(StoreError::AuthFailed)));
        assert_eq!(
            store.external_login("dave", Some(issued_before), CREATE).unwrap(),
            ExternalLogin::IssuedBeforeRevocation
        );
        // A token that does not say when it was issued cannot be placed
        // after the revocation.
        assert_eq!(
            store.external_login("dave", None, CREATE).unwrap(),
            ExternalLogin::IssuedBeforeRevocation
        );
        logged_in(store.external_login("dave", Some(now_ms() + 1), CREATE).unwrap());
    }
    let store = open(dir.path());
    assert_eq!(
        store.external_login("dave", Some(issued_before), CREATE).unwrap(),
        ExternalLogin::IssuedBeforeRevocation
    );
    logged_in(store.external_login("dave", Some(now_ms() + 1), CREATE).unwrap());
    // Users never revoked accept tokens without an issue time.
    logged_in(store.external_login("erin", None, CREATE).unwrap());
}

#[test]
fn logging_out_other_devices_retires_older_provider_tokens_but_not_the_callers_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (dave, mine, _) = logged_in(store.external_login("dave", Some(now_ms()), CREATE).unwrap());
    let (_, theirs, _) = logged_in(store.external_login("dave", Some(now_ms()), CREATE).unwrap());
    let issued_before = now_ms();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (fresh, revoked) = store.reissue_sole_token(dave, &mine).unwrap();
    assert_eq!(revoked, 2);
    assert_eq!(store.token_login(&fresh).unwrap().0, dave);
    for token in [&mine, &theirs] {
        assert!(matches!(store.token_login(token), Err(StoreError::AuthFailed)));
    }
    assert_eq!(
        store.external_login("dave", Some(issued_before), CREATE).unwrap(),
        ExternalLogin::IssuedBeforeRevocation
    );
    logged_in(store.external_login("dave", Some(now_ms() + 1), CREATE).unwrap());
}

#[test]
fn a_password_change_also_retires_older_provider_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.register("alice", b"password1").unwrap();
    let both = ExternalPolicy {
        create_accounts: false,
        password_accounts: true,
    };
    let before = now_ms();
    std::thread::sleep(std::time::Duration::from_millis(5));
    store.change_password(alice, b"password1", b"password2").unwrap();
    assert_eq!(
        store.external_login("alice", Some(before), both).unwrap(),
        ExternalLogin::IssuedBeforeRevocation
    );
}

#[test]
fn concurrent_first_logins_of_one_name_make_one_account() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                logged_in(store.external_login("frank", None, CREATE).unwrap())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.iter().all(|&(user, ..)| user == 1));
    assert_eq!(results.iter().filter(|&&(.., created)| created).count(), 1);
    assert_eq!(store.username(2).unwrap(), None);
}
