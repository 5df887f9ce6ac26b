//! Friends, blocks and groups over a real store: symmetry, limits,
//! idempotence.

mod common;

use common::{open, open_with};
use tern_storage::{Blocks, GroupRecord, StoreError, BLOCKED_BY_THEM, YOU_BLOCKED};

fn users(store: &tern_storage::Store, n: u64) {
    for i in 1..=n {
        assert_eq!(store.register(&format!("user{i}"), b"password1").unwrap(), i);
    }
}

#[test]
fn friendship_is_mutual_sorted_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 4);
    store.add_friend(1, 3).unwrap();
    store.add_friend(1, 2).unwrap();
    store.add_friend(4, 1).unwrap();
    store.add_friend(1, 2).unwrap();
    store.add_friend(2, 1).unwrap();
    assert_eq!(store.friends(1).unwrap(), vec![2, 3, 4]);
    assert_eq!(store.friends(2).unwrap(), vec![1]);
    assert_eq!(store.friends(3).unwrap(), vec![1]);
    assert_eq!(store.friends(4).unwrap(), vec![1]);

    store.remove_friend(2, 1).unwrap();
    store.remove_friend(2, 1).unwrap();
    store.remove_friend(3, 4).unwrap();
    assert_eq!(store.friends(1).unwrap(), vec![3, 4]);
    assert_eq!(store.friends(2).unwrap(), Vec::<u64>::new());
    assert_eq!(store.friends(99).unwrap(), Vec::<u64>::new());
}

#[test]
fn a_block_ends_the_friendship_keeps_both_from_befriending_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        users(&store, 4);
        store.add_friend(1, 2).unwrap();
        store.add_friend(1, 3).unwrap();
        store.block(2, 1).unwrap();
        store.block(2, 1).unwrap(); // again: nothing to do
        store.block(2, 4).unwrap(); // never friends
        assert_eq!(store.friends(1).unwrap(), vec![3]);
        assert!(store.friends(2).unwrap().is_empty());
        assert!(matches!(
            store.add_friend(1, 2),
            Err(StoreError::Forbidden(BLOCKED_BY_THEM))
        ));
        assert!(matches!(
            store.add_friend(2, 1),
            Err(StoreError::Forbidden(YOU_BLOCKED))
        ));
        assert!(matches!(store.block(1, 1), Err(StoreError::InvalidArgument(_))));
        assert!(matches!(store.block(1, 99), Err(StoreError::NotFound)));
        assert!(matches!(store.block(99, 1), Err(StoreError::NotFound)));
        assert_eq!(
            store.blocks_between(1, 2).unwrap(),
            Blocks {
                first_blocks_second: false,
                second_blocks_first: true,
            }
        );
        // Both may block each other; each lifts only their own.
        store.block(1, 2).unwrap();
        assert!(store.blocks_between(2, 1).unwrap().first_blocks_second);
        store.unblock(1, 2).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.blocks_after(2, 0, 10).unwrap(), (vec![1, 4], false));
    assert_eq!(store.blocks_after(2, 0, 1).unwrap(), (vec![1], true));
    assert_eq!(store.blocks_after(2, 1, 1).unwrap(), (vec![4], false));
    assert_eq!(store.blocks_after(1, 0, 10).unwrap(), (vec![], false));
    assert!(!store.blocks_between(1, 3).unwrap().any());
    store.unblock(2, 1).unwrap();
    store.unblock(2, 1).unwrap(); // not blocked: nothing to do
    assert!(!store.blocks_between(1, 2).unwrap().any());
    assert!(
        store.friends(2).unwrap().is_empty(),
        "the friendship does not come back"
    );
    store.add_friend(2, 1).unwrap();
    assert_eq!(store.friends(2).unwrap(), vec![1]);
}

#[test]
fn blocks_per_user_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_blocks_per_user = 2);
    users(&store, 4);
    store.block(1, 2).unwrap();
    store.block(1, 3).unwrap();
    assert!(matches!(store.block(1, 4), Err(StoreError::LimitExceeded(_))));
    store.block(1, 3).unwrap(); // already blocked: no new place needed
    store.block(4, 1).unwrap(); // others' lists are their own
    store.unblock(1, 2).unwrap();
    store.block(1, 4).unwrap();
    assert_eq!(store.blocks_after(1, 0, 10).unwrap(), (vec![3, 4], false));
}

#[test]
fn friendship_rejects_self_and_unknown_users() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 1);
    assert!(matches!(
        store.add_friend(1, 1),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(store.add_friend(1, 2), Err(StoreError::NotFound)));
    assert!(matches!(store.add_friend(2, 1), Err(StoreError::NotFound)));
    assert!(store.friends(1).unwrap().is_empty());
}

#[test]
fn friend_limit_applies_to_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_friends = 2);
    users(&store, 5);
    store.add_friend(1, 2).unwrap();
    store.add_friend(1, 3).unwrap();
    // user 1 is full: neither 1 adding nor being added works.
    assert!(matches!(
        store.add_friend(1, 4),
        Err(StoreError::LimitExceeded(_))
    ));
    assert!(matches!(
        store.add_friend(4, 1),
        Err(StoreError::LimitExceeded(_))
    ));
    assert!(store.friends(4).unwrap().is_empty());
    // Re-adding an existing friendship at the limit is still fine.
    store.add_friend(1, 2).unwrap();
    // Removing one frees a slot.
    store.remove_friend(1, 3).unwrap();
    store.add_friend(4, 1).unwrap();
    assert_eq!(store.friends(1).unwrap(), vec![2, 4]);
}

#[test]
fn concurrent_friend_adds_respect_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_friends = 3);
    users(&store, 9);
    let handles: Vec<_> = (2..=9)
        .map(|f| {
            let store = store.clone();
            std::thread::spawn(move || store.add_friend(1, f))
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(Result::is_ok)
        .count();
    assert_eq!(ok, 3);
    assert_eq!(store.friends(1).unwrap().len(), 3);
}

#[test]
fn groups_and_members() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 4);
    let g = store.create_group(2, "rust fans").unwrap();
    assert_eq!(g, 1);
    assert_eq!(store.create_group(3, "other").unwrap(), 2);
    assert_eq!(
        store.group(g).unwrap(),
        Some(GroupRecord {
            id: 1,
            name: "rust fans".into(),
            owner: 2
        })
    );
    assert_eq!(store.group(3).unwrap(), None);
    assert_eq!(store.members(g).unwrap(), vec![2]);
    assert!(store.is_member(g, 2).unwrap());

    store.add_member(g, 4).unwrap();
    store.add_member(g, 1).unwrap();
    store.add_member(g, 1).unwrap();
    assert_eq!(store.members(g).unwrap(), vec![1, 2, 4]);
    assert!(store.is_member(g, 4).unwrap());
    assert!(!store.is_member(g, 3).unwrap());
    assert!(!store.is_member(2, 1).unwrap());

    store.remove_member(g, 4).unwrap();
    store.remove_member(g, 4).unwrap();
    store.remove_member(9, 4).unwrap();
    assert_eq!(store.members(g).unwrap(), vec![1, 2]);
    assert_eq!(store.members(2).unwrap(), vec![3]);
    assert!(store.members(77).unwrap().is_empty());
}

#[test]
fn group_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 2);
    assert!(matches!(
        store.create_group(1, ""),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.create_group(1, &"x".repeat(65)),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.create_group(9, "nobody's"),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(store.add_member(5, 1), Err(StoreError::NotFound)));
    let g = store.create_group(1, "g").unwrap();
    assert_eq!(g, 1, "failed creations must not consume ids");
    assert!(matches!(store.add_member(g, 42), Err(StoreError::NotFound)));
}

#[test]
fn group_member_limit_counts_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_group_members = 3);
    users(&store, 5);
    let g = store.create_group(1, "small").unwrap();
    store.add_member(g, 2).unwrap();
    store.add_member(g, 3).unwrap();
    assert!(matches!(
        store.add_member(g, 4),
        Err(StoreError::LimitExceeded(_))
    ));
    store.add_member(g, 3).unwrap(); // already a member: fine at the limit
    store.remove_member(g, 2).unwrap();
    store.add_member(g, 4).unwrap();
    assert!(matches!(
        store.add_member(g, 5),
        Err(StoreError::LimitExceeded(_))
    ));
    assert_eq!(store.members(g).unwrap(), vec![1, 3, 4]);
}

#[test]
fn a_user_is_in_at_most_max_groups_per_user_groups() {
    use tern_storage::JoinOutcome::*;
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_groups_per_user = 2);
    users(&store, 3);
    let own = store.create_group(1, "own").unwrap();
    let other = store.create_group(2, "other").unwrap();
    let third = store.create_group(3, "third").unwrap();
    store.add_member(other, 1).unwrap();
    // Created groups count: user 1 is in two groups and may not join or
    // create a third; someone else still may join.
    assert_eq!(
        store.add_members(third, &[1, 2], false).unwrap(),
        vec![TooManyGroups, Joined]
    );
    assert!(matches!(
        store.create_group(1, "one more"),
        Err(StoreError::LimitExceeded(_))
    ));
    assert!(matches!(
        store.add_member(third, 1),
        Err(StoreError::LimitExceeded(_))
    ));
    store.add_member(other, 1).unwrap(); // already a member: fine at the limit
    store.remove_member(other, 1).unwrap();
    store.add_member(third, 1).unwrap();
    assert_eq!(store.user_groups(1).unwrap(), vec![own, third]);
}

#[test]
fn concurrent_member_adds_respect_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_group_members = 4);
    users(&store, 10);
    let g = store.create_group(1, "race").unwrap();
    let handles: Vec<_> = (2..=10)
        .map(|u| {
            let store = store.clone();
            std::thread::spawn(move || store.add_member(g, u))
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(Result::is_ok)
        .count();
    assert_eq!(ok, 3);
    assert_eq!(store.members(g).unwrap().len(), 4);
}

#[test]
fn a_crowd_joins_in_one_batch_until_the_group_is_full() {
    use tern_storage::{JoinOutcome::*, MAX_JOIN_BATCH};
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_with(dir.path(), |o| {
            o.max_group_members = 5;
            o.fsync = true;
        });
        users(&store, 8);
        let g = store.create_group(1, "crowd").unwrap();
        store.add_member(g, 2).unwrap();
        let syncs = store.sync_stats().syncs;
        let outcomes = store.add_members(g, &[2, 3, 99, 4, 3, 5, 6, 7], false).unwrap();
        assert_eq!(
            outcomes,
            vec![
                AlreadyMember,
                Joined,
                NoSuchUser,
                Joined,
                AlreadyMember,
                Joined,
                GroupFull,
                GroupFull
            ]
        );
        assert_eq!(store.sync_stats().syncs, syncs + 1, "one batch, one sync");
        assert_eq!(store.members(g).unwrap(), vec![1, 2, 3, 4, 5]);
        // Nothing to write: nothing synced.
        assert_eq!(
            store.add_members(g, &[3, 8], false).unwrap(),
            vec![AlreadyMember, GroupFull]
        );
        assert_eq!(store.sync_stats().syncs, syncs + 1);

        assert!(matches!(
            store.add_members(77, &[3], false),
            Err(StoreError::NotFound)
        ));
        let too_many = vec![3; MAX_JOIN_BATCH + 1];
        assert!(matches!(
            store.add_members(g, &too_many, false),
            Err(StoreError::InvalidArgument(_))
        ));

        // Invite-only: only the invited join.
        let closed = store.create_group_with(1, "closed", false).unwrap();
        store.invite(closed, 4).unwrap();
        store.invite(closed, 6).unwrap();
        assert_eq!(
            store.add_members(closed, &[3, 4, 6], true).unwrap(),
            vec![NotInvited, Joined, Joined]
        );
        assert_eq!(store.members(closed).unwrap(), vec![1, 4, 6]);
    }
    // The member count was written with the batch: the limit holds after
    // a reopen, and a leave makes room for exactly one.
    let store = open_with(dir.path(), |o| o.max_group_members = 5);
    assert_eq!(store.add_members(1, &[6], false).unwrap(), vec![GroupFull]);
    store.remove_member(1, 5).unwrap();
    assert_eq!(
        store.add_members(1, &[6, 7], false).unwrap(),
        vec![Joined, GroupFull]
    );
}
