//! Reopening and damage: everything written is found after a reopen, ids
//! continue densely, and bad bytes on disk are errors naming where they
//! are, never panics.

mod common;

use common::{fast_opts, open};
use fjall::{Database, KeyspaceCreateOptions};
use tern_storage::{GroupRecord, Store, StoreError};

#[test]
fn reopen_finds_everything_and_ids_continue() {
    let dir = tempfile::tempdir().unwrap();
    let token;
    {
        let store = open(dir.path());
        store.register("alice", b"password1").unwrap();
        store.register("bob", b"password2").unwrap();
        store.register("carol", b"password3").unwrap();
        store.add_friend(1, 2).unwrap();
        store.add_friend(2, 1).unwrap();
        store.add_friend(3, 1).unwrap();
        store.add_friend(1, 3).unwrap();
        store.add_friend(2, 3).unwrap(); // a request, still pending
        let g = store.create_group(1, "club").unwrap();
        store.add_member(g, 3).unwrap();
        token = store.issue_token(2).unwrap();
        store.persist().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.verify_password("alice", b"password1").unwrap(), 1);
    assert_eq!(store.user_id("carol").unwrap(), Some(3));
    assert_eq!(store.username(2).unwrap().as_deref(), Some("bob"));
    assert_eq!(store.friends(1).unwrap(), vec![2, 3]);
    assert_eq!(store.friends(2).unwrap(), vec![1]);
    assert_eq!(
        store.friend_requests_after(3, true, 0, 10).unwrap(),
        (vec![2], false)
    );
    assert_eq!(
        store.friend_requests_after(2, false, 0, 10).unwrap(),
        (vec![3], false)
    );
    assert_eq!(store.verify_token(&token).unwrap(), 2);
    assert_eq!(
        store.group(1).unwrap(),
        Some(GroupRecord {
            id: 1,
            name: "club".into(),
            owner: 1
        })
    );
    assert_eq!(store.members(1).unwrap(), vec![1, 3]);
    assert_eq!(store.register("dave", b"password4").unwrap(), 4);
    assert_eq!(store.create_group(4, "second").unwrap(), 2);
    assert!(matches!(
        store.register("alice", b"password9"),
        Err(StoreError::UsernameTaken)
    ));
}

#[test]
fn reopen_without_persist_keeps_committed_writes() {
    // Without fsync, commits still reach the OS before returning, so a
    // process that exits (or is dropped) without `persist` loses nothing.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.register("alice", b"password1").unwrap();
        store.create_group(1, "g").unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.user_id("alice").unwrap(), Some(1));
    assert_eq!(store.register("bob", b"password2").unwrap(), 2);
    assert_eq!(store.create_group(2, "h").unwrap(), 2);
}

#[test]
fn member_count_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = common::open_with(dir.path(), |o| o.max_group_members = 2);
        store.register("alice", b"password1").unwrap();
        store.register("bob", b"password2").unwrap();
        store.register("carol", b"password3").unwrap();
        store.create_group(1, "pair").unwrap();
        store.add_member(1, 2).unwrap();
    }
    let store = common::open_with(dir.path(), |o| o.max_group_members = 2);
    assert!(matches!(
        store.add_member(1, 3),
        Err(StoreError::LimitExceeded(_))
    ));
}

#[test]
fn opening_twice_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    match Store::open(dir.path(), fast_opts()) {
        Err(e) => assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}"),
        Ok(_) => panic!("a second handle on a locked store opened"),
    }
}

/// Writes `value` under `key` in keyspace `ks` behind the store's back.
fn write_raw(dir: &std::path::Path, ks: &str, key: &[u8], value: &[u8]) {
    let db = Database::builder(dir).open().unwrap();
    let handle = db.keyspace(ks, KeyspaceCreateOptions::default).unwrap();
    handle.insert(key, value).unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

fn assert_corrupt_in(err: StoreError, dir: &std::path::Path, keyspace: &str) {
    match &err {
        StoreError::Corrupt { path, detail } => {
            assert!(path.starts_with(dir), "{path:?} not under {dir:?}");
            assert!(detail.contains(keyspace), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains(&dir.display().to_string()), "{err}");
}

#[test]
fn garbage_values_are_corrupt_errors_naming_the_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.register("alice", b"password1").unwrap();
        store.register("bob", b"password2").unwrap();
        store.create_group(1, "g").unwrap();
    }
    write_raw(dir.path(), "users", &1u64.to_be_bytes(), b"\x01\xff\xfe");
    write_raw(dir.path(), "accounts", b"bob", b"\x07garbage");
    write_raw(dir.path(), "groups", &1u64.to_be_bytes(), b"\x01\x00");
    write_raw(
        dir.path(),
        "friends",
        b"\x00\x00\x00\x00\x00\x00\x00\x01\x02",
        b"",
    );
    write_raw(
        dir.path(),
        "members",
        &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2],
        b"x",
    );
    let store = open(dir.path());
    assert_corrupt_in(store.username(1).unwrap_err(), dir.path(), "users");
    assert_corrupt_in(
        store.verify_password("bob", b"password2").unwrap_err(),
        dir.path(),
        "accounts",
    );
    assert_corrupt_in(store.user_id("bob").unwrap_err(), dir.path(), "accounts");
    assert_corrupt_in(store.group(1).unwrap_err(), dir.path(), "groups");
    assert_corrupt_in(store.add_member(1, 2).unwrap_err(), dir.path(), "groups");
    assert_corrupt_in(store.friends(1).unwrap_err(), dir.path(), "friends");
    assert_corrupt_in(store.members(1).unwrap_err(), dir.path(), "members");
    assert_corrupt_in(store.is_member(1, 2).unwrap_err(), dir.path(), "members");
    // Untouched data still reads.
    assert_eq!(store.username(2).unwrap().as_deref(), Some("bob"));
}

#[test]
fn garbage_token_records_are_corrupt_errors() {
    let dir = tempfile::tempdir().unwrap();
    let token;
    {
        let store = open(dir.path());
        store.register("alice", b"password1").unwrap();
        token = store.issue_token(1).unwrap();
    }
    let db = Database::builder(dir.path()).open().unwrap();
    let tokens = db.keyspace("tokens", KeyspaceCreateOptions::default).unwrap();
    let keys: Vec<_> = tokens.iter().map(|g| g.key().unwrap()).collect();
    assert_eq!(keys.len(), 1);
    tokens.insert(keys[0].clone(), b"\x01short").unwrap();
    let user_tokens = db
        .keyspace("user_tokens", KeyspaceCreateOptions::default)
        .unwrap();
    user_tokens.insert(&[0, 0, 0, 0, 0, 0, 0, 1, 9][..], b"").unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
    drop((tokens, user_tokens, db));
    let store = open(dir.path());
    assert_corrupt_in(store.verify_token(&token).unwrap_err(), dir.path(), "tokens");
    assert_corrupt_in(store.revoke_tokens(1).unwrap_err(), dir.path(), "user_tokens");
}

#[test]
fn a_bad_id_key_fails_open_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    write_raw(dir.path(), "users", b"\xffshort", b"\x01x");
    let err = Store::open(dir.path(), fast_opts()).err().unwrap();
    assert_corrupt_in(err, dir.path(), "users");
}

#[test]
fn damaging_any_single_file_gives_an_error_naming_the_store_or_a_readable_store() {
    let base = tempfile::tempdir().unwrap();
    {
        let store = open(base.path());
        store.register("alice", b"password1").unwrap();
        store.persist().unwrap();
    }
    let originals = files(base.path());
    let mut refused = 0;
    for victim in &originals {
        let dir = copy_of(base.path(), &originals);
        let target = dir.path().join(victim.strip_prefix(base.path()).unwrap());
        let len = std::fs::metadata(&target).unwrap().len() as usize;
        let mut bytes = std::fs::read(&target).unwrap();
        bytes.resize(len.max(16), 0);
        // Garbage over the head of the file (all of it for the small ones).
        bytes.iter_mut().take(64 * 1024).for_each(|b| *b = 0xa5);
        std::fs::write(&target, bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            Store::open(dir.path(), fast_opts()).and_then(|store| store.username(1))
        });
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                refused += 1;
                assert!(
                    err.to_string().contains(&dir.path().display().to_string()),
                    "{victim:?}: {err}"
                );
            }
            Err(_) => panic!("damaged {victim:?} made the store panic"),
        }
    }
    assert!(refused > 0, "no damaged file was noticed");
}

/// The same for table files, which the test above never has (its data is
/// only in the journal): fjall finds a damaged block only when a read
/// reaches it, at open (`next_id` reads the last user) or later (a login
/// reads `accounts`). Either way the error names the store and the
/// keyspace.
#[test]
fn a_damaged_table_file_is_an_error_naming_the_store_and_keyspace() {
    let base = tempfile::tempdir().unwrap();
    {
        let store = open(base.path());
        for i in 0..200 {
            store.register(&format!("user{i:03}"), b"password1").unwrap();
        }
        store.persist().unwrap();
    }
    {
        // Move the users and accounts out of the journal into tables.
        let db = Database::builder(base.path()).open().unwrap();
        for name in ["users", "accounts"] {
            let ks = db.keyspace(name, KeyspaceCreateOptions::default).unwrap();
            ks.rotate_memtable_and_wait().unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let originals = files(base.path());
    let tables: Vec<_> = originals
        .iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "tables"))
        .collect();
    assert!(tables.len() >= 2, "no table files were written: {originals:?}");
    let mut refused = 0;
    for victim in tables {
        let dir = copy_of(base.path(), &originals);
        let target = dir.path().join(victim.strip_prefix(base.path()).unwrap());
        let mut bytes = std::fs::read(&target).unwrap();
        // Garbage over the middle third: the data blocks, past the head.
        let len = bytes.len();
        bytes
            .iter_mut()
            .skip(len / 3)
            .take(len / 3)
            .for_each(|b| *b ^= 0x5a);
        std::fs::write(&target, bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            let store = Store::open(dir.path(), fast_opts())?;
            for user in 1..=200 {
                store.username(user)?;
            }
            store.verify_password("user100", b"password1")
        });
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                refused += 1;
                let shown = err.to_string();
                assert!(
                    matches!(err, StoreError::Corrupt { .. } | StoreError::Io { .. }),
                    "{victim:?}: {err:?}"
                );
                assert!(
                    shown.contains(&dir.path().display().to_string()),
                    "{victim:?}: {shown}"
                );
            }
            Err(_) => panic!("damaged {victim:?} made the store panic"),
        }
    }
    assert!(refused > 0, "no damaged table was noticed");
}

#[test]
fn a_file_where_the_directory_should_be_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    std::fs::write(&path, b"not a directory").unwrap();
    let err = Store::open(&path, fast_opts()).err().unwrap();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

/// A fresh directory holding a copy of `files`, which are under `base`.
fn copy_of(base: &std::path::Path, files: &[std::path::PathBuf]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        let dst = dir.path().join(f.strip_prefix(base).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(f, &dst).unwrap();
    }
    dir
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn synced_writes_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = common::open_with(dir.path(), |o| o.fsync = true);
        store.register("alice", b"password1").unwrap();
        store.register("bob", b"password2").unwrap();
        store.add_friend(1, 2).unwrap();
        store.add_friend(2, 1).unwrap();
        store.create_group(1, "g").unwrap();
        store.add_member(1, 2).unwrap();
        store.issue_token(1).unwrap();
        assert_eq!(store.revoke_tokens(1).unwrap(), 1);
        store.remove_member(1, 2).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.friends(2).unwrap(), vec![1]);
    assert_eq!(store.members(1).unwrap(), vec![1]);
}

#[test]
fn concurrent_synced_changes_share_fdatasyncs_and_keep_every_invariant() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_with(dir.path(), |o| o.fsync = true);
    let owner = store.register("owner", b"password0").unwrap();
    let group = store.create_group(owner, "crowd").unwrap();
    let before = store.sync_stats();
    assert_eq!(before.durable_writes, 2);

    // Registrations, joins and friendships (a request and its acceptance)
    // at once, from several threads, as the shards' blocking threads make
    // them.
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = &store;
            scope.spawn(move || {
                for i in 0..PER_THREAD {
                    let name = format!("user{t}x{i}");
                    let user = store.register(&name, b"password1").unwrap();
                    store.add_member(group, user).unwrap();
                    store.add_friend(owner, user).unwrap();
                    store.add_friend(user, owner).unwrap();
                }
            });
        }
    });

    let users = THREADS * PER_THREAD;
    let after = store.sync_stats();
    assert_eq!(after.durable_writes - before.durable_writes, 4 * users);
    assert!(after.syncs - before.syncs <= 4 * users, "{after:?}");
    // Ids stay dense and unique, every join counted once, every
    // friendship symmetric: the locks still serialise the checks.
    let mut ids = store.members(group).unwrap();
    assert_eq!(ids.len() as u64, users + 1);
    ids.sort_unstable();
    assert_eq!(ids, (1..=users + 1).collect::<Vec<_>>());
    assert_eq!(store.friends(owner).unwrap().len() as u64, users);
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.members(group).unwrap().len() as u64, users + 1);
    assert_eq!(
        store.group_roster(group).unwrap().unwrap().members.len() as u64,
        users + 1
    );
    let next = store.register("late", b"password2").unwrap();
    assert_eq!(next, users + 2, "ids continue densely after the reopen");
}
