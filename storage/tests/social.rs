//! Friends, friend requests, blocks and groups over a real store:
//! symmetry, consent, limits, idempotence.

mod common;

use common::{open, open_with};
use tern_storage::{
    Blocks, FriendOutcome, GroupRecord, Store, StoreError, BLOCKED_BY_THEM, FRIEND_LIST_FULL,
    INCOMING_REQUESTS_FULL, OUTGOING_REQUESTS_FULL, YOU_BLOCKED,
};

fn users(store: &tern_storage::Store, n: u64) {
    for i in 1..=n {
        assert_eq!(store.register(&format!("user{i}"), b"password1").unwrap(), i);
    }
}

/// `a` asks `b`, `b` accepts: they are friends.
fn befriend(store: &Store, a: u64, b: u64) {
    assert_eq!(
        store.add_friend(a, b).unwrap(),
        FriendOutcome::Requested { new: true }
    );
    assert_eq!(store.add_friend(b, a).unwrap(), FriendOutcome::Accepted);
}

/// The pending requests to `user` (incoming) or from them, all of them.
fn requests(store: &Store, user: u64, incoming: bool) -> Vec<u64> {
    let (users, more) = store.friend_requests_after(user, incoming, 0, 1000).unwrap();
    assert!(!more);
    users
}

#[test]
fn friendship_is_mutual_sorted_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 4);
    befriend(&store, 1, 3);
    befriend(&store, 1, 2);
    befriend(&store, 4, 1);
    assert_eq!(store.add_friend(1, 2).unwrap(), FriendOutcome::AlreadyFriends);
    assert_eq!(store.add_friend(2, 1).unwrap(), FriendOutcome::AlreadyFriends);
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
fn friend_lists_page_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 6);
    for friend in [5, 2, 4, 6] {
        befriend(&store, 1, friend);
    }
    // A pending request is not a friend.
    store.add_friend(1, 3).unwrap();
    assert_eq!(store.friends_after(1, 0, 2).unwrap(), (vec![2, 4], true));
    assert_eq!(store.friends_after(1, 4, 2).unwrap(), (vec![5, 6], false));
    assert_eq!(store.friends_after(1, 2, 10).unwrap(), (vec![4, 5, 6], false));
    assert_eq!(store.friends_after(1, 6, 10).unwrap(), (vec![], false));
    assert_eq!(store.friends_after(1, u64::MAX, 10).unwrap(), (vec![], false));
    assert_eq!(store.friends_after(3, 0, 10).unwrap(), (vec![], false));
    assert_eq!(store.friends_after(6, 0, 10).unwrap(), (vec![1], false));
    // A friendship looked up pair by pair, in the order asked.
    assert_eq!(store.friends_among(1, &[6, 3, 2, 99]).unwrap(), vec![6, 2]);
    assert_eq!(store.friends_among(3, &[1]).unwrap(), Vec::<u64>::new());
}

#[test]
fn a_block_ends_the_friendship_keeps_both_from_befriending_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        users(&store, 4);
        befriend(&store, 1, 2);
        befriend(&store, 1, 3);
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
    befriend(&store, 2, 1);
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
    befriend(&store, 1, 2);
    befriend(&store, 1, 3);
    // user 1 is full: 1 may not ask, and may be asked but not accept, nor
    // be accepted.
    assert!(matches!(
        store.add_friend(1, 4),
        Err(StoreError::LimitExceeded(FRIEND_LIST_FULL))
    ));
    assert_eq!(
        store.add_friend(4, 1).unwrap(),
        FriendOutcome::Requested { new: true }
    );
    assert!(matches!(
        store.add_friend(1, 4),
        Err(StoreError::LimitExceeded(FRIEND_LIST_FULL))
    ));
    assert!(store.friends(4).unwrap().is_empty());
    assert_eq!(requests(&store, 1, true), vec![4], "the request stays");
    // Re-adding an existing friendship at the limit is still fine.
    assert_eq!(store.add_friend(1, 2).unwrap(), FriendOutcome::AlreadyFriends);
    // Removing one frees a slot.
    store.remove_friend(1, 3).unwrap();
    assert_eq!(store.add_friend(1, 4).unwrap(), FriendOutcome::Accepted);
    assert_eq!(store.friends(1).unwrap(), vec![2, 4]);
}

#[test]
fn concurrent_friend_adds_respect_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_friends = 3);
    users(&store, 9);
    for f in 2..=9 {
        store.add_friend(f, 1).unwrap();
    }
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
    assert_eq!(requests(&store, 1, true).len(), 5, "the refused stay pending");
}

#[test]
fn a_friendship_needs_both_whoever_asks_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 3);
    // 1 asks 2: nothing mutual yet, the request is listed on both sides.
    assert_eq!(
        store.add_friend(1, 2).unwrap(),
        FriendOutcome::Requested { new: true }
    );
    assert!(store.friends(1).unwrap().is_empty());
    assert!(store.friends(2).unwrap().is_empty());
    assert_eq!(requests(&store, 1, false), vec![2]);
    assert_eq!(requests(&store, 2, true), vec![1]);
    assert!(requests(&store, 1, true).is_empty());
    assert!(requests(&store, 2, false).is_empty());
    // Asking again changes nothing.
    assert_eq!(
        store.add_friend(1, 2).unwrap(),
        FriendOutcome::Requested { new: false }
    );
    assert_eq!(requests(&store, 2, true), vec![1]);
    // 2 accepts by adding 1: friends both ways, the request gone.
    assert_eq!(store.add_friend(2, 1).unwrap(), FriendOutcome::Accepted);
    assert_eq!(store.friends(1).unwrap(), vec![2]);
    assert_eq!(store.friends(2).unwrap(), vec![1]);
    for user in 1..=2 {
        assert!(requests(&store, user, true).is_empty());
        assert!(requests(&store, user, false).is_empty());
    }
    // The other way round: 3 asks 1, 1 accepts.
    assert_eq!(
        store.add_friend(3, 1).unwrap(),
        FriendOutcome::Requested { new: true }
    );
    assert_eq!(store.add_friend(1, 3).unwrap(), FriendOutcome::Accepted);
    assert_eq!(store.friends(1).unwrap(), vec![2, 3]);
    assert_eq!(store.friends(3).unwrap(), vec![1]);
    assert_eq!(store.add_friend(3, 1).unwrap(), FriendOutcome::AlreadyFriends);
}

#[test]
fn repeating_a_pending_request_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.fsync = true);
    users(&store, 2);
    store.add_friend(1, 2).unwrap();
    let before = store.sync_stats();
    assert_eq!(
        store.add_friend(1, 2).unwrap(),
        FriendOutcome::Requested { new: false }
    );
    assert_eq!(store.sync_stats(), before);
}

#[test]
fn removing_declines_or_cancels_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 3);
    store.add_friend(1, 2).unwrap();
    store.add_friend(3, 2).unwrap();
    // 2 declines 1's request.
    store.remove_friend(2, 1).unwrap();
    assert_eq!(requests(&store, 2, true), vec![3]);
    assert!(requests(&store, 1, false).is_empty());
    // 3 cancels their own.
    store.remove_friend(3, 2).unwrap();
    assert!(requests(&store, 2, true).is_empty());
    assert!(requests(&store, 3, false).is_empty());
    // Nothing left to remove: still fine.
    store.remove_friend(3, 2).unwrap();
    // A declined request does not accept anything later: 2's add is a
    // new request of their own.
    assert_eq!(
        store.add_friend(2, 1).unwrap(),
        FriendOutcome::Requested { new: true }
    );
    assert!(store.friends(2).unwrap().is_empty());
}

#[test]
fn a_block_drops_requests_both_ways_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    users(&store, 3);
    store.add_friend(1, 2).unwrap();
    store.add_friend(3, 2).unwrap();
    store.add_friend(2, 3).unwrap(); // accepts: 2 and 3 are friends
    store.add_friend(1, 3).unwrap();
    // 2 blocks 1: 1's request to 2 is gone; the others stay.
    store.block(2, 1).unwrap();
    assert!(requests(&store, 2, true).is_empty());
    assert_eq!(requests(&store, 1, false), vec![3]);
    assert!(matches!(
        store.add_friend(1, 2),
        Err(StoreError::Forbidden(BLOCKED_BY_THEM))
    ));
    assert!(matches!(
        store.add_friend(2, 1),
        Err(StoreError::Forbidden(YOU_BLOCKED))
    ));
    // 3 blocks 1, who had asked them: gone too, the other direction.
    store.block(3, 1).unwrap();
    assert!(requests(&store, 3, true).is_empty());
    assert!(requests(&store, 1, false).is_empty());
    // Lifting the blocks brings no request back.
    store.unblock(2, 1).unwrap();
    store.unblock(3, 1).unwrap();
    assert!(requests(&store, 2, true).is_empty());
    assert!(requests(&store, 3, true).is_empty());
    assert_eq!(store.friends(2).unwrap(), vec![3]);
}

#[test]
fn pending_requests_are_bounded_out_and_in() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |o| o.max_friend_requests = 2);
    users(&store, 6);
    store.add_friend(1, 2).unwrap();
    store.add_friend(1, 3).unwrap();
    assert!(matches!(
        store.add_friend(1, 4),
        Err(StoreError::LimitExceeded(OUTGOING_REQUESTS_FULL))
    ));
    // Asking again for a pending one needs no new place.
    assert_eq!(
        store.add_friend(1, 3).unwrap(),
        FriendOutcome::Requested { new: false }
    );
    // 5 gets two requests and no third.
    store.add_friend(2, 5).unwrap();
    store.add_friend(3, 5).unwrap();
    assert!(matches!(
        store.add_friend(4, 5),
        Err(StoreError::LimitExceeded(INCOMING_REQUESTS_FULL))
    ));
    // Accepting needs no place: 5 may still accept, even with its own
    // outgoing list full.
    store.add_friend(5, 6).unwrap();
    store.add_friend(5, 4).unwrap();
    store.add_friend(6, 1).unwrap(); // 1 receives: its outgoing list is full, not its incoming
    assert_eq!(store.add_friend(1, 6).unwrap(), FriendOutcome::Accepted);
    // An accepted, declined or cancelled request frees its places.
    assert_eq!(store.add_friend(3, 1).unwrap(), FriendOutcome::Accepted);
    store.add_friend(1, 4).unwrap();
    store.remove_friend(5, 2).unwrap(); // 5 declines 2
    store.remove_friend(5, 4).unwrap(); // 5 cancels theirs to 4
    store.add_friend(4, 5).unwrap();
    assert_eq!(requests(&store, 1, false), vec![2, 4]);
    assert_eq!(requests(&store, 5, true), vec![3, 4]);
    assert_eq!(requests(&store, 5, false), vec![6]);
}

#[test]
fn request_lists_page_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        users(&store, 6);
        for from in [4, 2, 6, 3] {
            store.add_friend(from, 1).unwrap();
        }
        store.add_friend(1, 5).unwrap();
        assert_eq!(store.add_friend(1, 6).unwrap(), FriendOutcome::Accepted);
    }
    let store = open(dir.path());
    assert_eq!(
        store.friend_requests_after(1, true, 0, 2).unwrap(),
        (vec![2, 3], true)
    );
    assert_eq!(
        store.friend_requests_after(1, true, 3, 2).unwrap(),
        (vec![4], false)
    );
    assert_eq!(
        store.friend_requests_after(1, true, 4, 2).unwrap(),
        (vec![], false)
    );
    assert_eq!(
        store.friend_requests_after(1, true, u64::MAX, 2).unwrap(),
        (vec![], false)
    );
    assert_eq!(
        store.friend_requests_after(1, false, 0, 10).unwrap(),
        (vec![5], false)
    );
    assert_eq!(
        store.friend_requests_after(5, true, 0, 10).unwrap(),
        (vec![1], false)
    );
    assert_eq!(store.friends(6).unwrap(), vec![1]);
    assert_eq!(store.add_friend(1, 4).unwrap(), FriendOutcome::Accepted);
    assert_eq!(store.friends(1).unwrap(), vec![4, 6]);
}

#[test]
fn a_store_from_before_friend_requests_keeps_its_friendships() {
    use fjall::{Database, KeyspaceCreateOptions};
    let dir = tempfile::tempdir().unwrap();
    {
        // What an older build wrote: users, and a friendship of two of them.
        let db = Database::builder(dir.path()).open().unwrap();
        let users = db.keyspace("users", KeyspaceCreateOptions::default).unwrap();
        let friends = db.keyspace("friends", KeyspaceCreateOptions::default).unwrap();
        for (id, name) in [(1u64, "alice"), (2, "bob"), (3, "carol")] {
            let mut record = vec![1u8];
            record.extend_from_slice(name.as_bytes());
            users.insert(id.to_be_bytes(), record).unwrap();
        }
        let pair = |a: u64, b: u64| [a.to_be_bytes(), b.to_be_bytes()].concat();
        friends.insert(pair(1, 2), []).unwrap();
        friends.insert(pair(2, 1), []).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.friends(1).unwrap(), vec![2]);
    assert_eq!(store.friends(2).unwrap(), vec![1]);
    assert!(requests(&store, 1, true).is_empty());
    assert_eq!(store.add_friend(2, 1).unwrap(), FriendOutcome::AlreadyFriends);
    assert_eq!(
        store.add_friend(3, 1).unwrap(),
        FriendOutcome::Requested { new: true }
    );
    assert_eq!(requests(&store, 1, true), vec![3]);
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
