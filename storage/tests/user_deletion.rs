//! Deleting an account on a real store: the deletion is visible at once
//! to every login and to every other user's lists, the purge removes
//! both sides of every relation in bounded steps, a purge cut short
//! resumes after a reopen, the name is free and the id never reused.

mod common;

use std::sync::Arc;

use common::open;
use tern_storage::{
    ConvId, ExternalLogin, ExternalPolicy, InboxTargets, MessageWrite, ReceiptKind, Store, StoreError,
    WriteOp, NO_PASSWORD_TO_CHECK,
};

fn msg(conv: ConvId, seq: u64, from: u64, inbox: u64) -> WriteOp {
    WriteOp::Message(MessageWrite {
        conv,
        seq,
        from,
        client_msg_id: seq,
        timestamp_ms: seq,
        frame: Arc::from(format!("#{seq}").into_bytes()),
        inbox: InboxTargets::One(inbox),
        moved_from: None,
    })
}

/// Users 1..=6; user 1, the one deleted, is friends with 2, has asked 3,
/// was asked by 4, blocks 5 and is blocked by 6, holds an invite to a
/// group of 6's, and has 20 messages with 2 (half unread by each).
fn populated(store: &Store) -> (ConvId, u64) {
    for i in 1..=6 {
        store.register(&format!("user{i}"), b"password1").unwrap();
    }
    store.add_friend(1, 2).unwrap();
    store.add_friend(2, 1).unwrap();
    store.add_friend(1, 3).unwrap();
    store.add_friend(4, 1).unwrap();
    store.block(1, 5).unwrap();
    store.block(6, 1).unwrap();
    let group = store.create_group_with(6, "six", false).unwrap();
    store.invite(group, 1).unwrap();
    store.invite(group, 2).unwrap();
    let conv = ConvId::direct(1, 2);
    let ops: Vec<WriteOp> = (1..=20)
        .map(|seq| {
            if seq % 2 == 0 {
                msg(conv, seq, 2, 1)
            } else {
                msg(conv, seq, 1, 2)
            }
        })
        .collect();
    store.apply(&ops, false).unwrap();
    let read = WriteOp::Receipt {
        user: 1,
        conv,
        kind: ReceiptKind::Read,
        seq: 4,
    };
    store.apply(&[read], false).unwrap();
    (conv, group)
}

fn purge(store: &Store, user: u64, budget: usize) -> usize {
    let mut steps = 1;
    while !store.purge_user_step(user, budget).unwrap() {
        steps += 1;
        assert!(steps < 10_000, "the purge makes no progress");
    }
    steps
}

#[test]
fn a_deleted_account_is_gone_at_once_and_purged_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (conv, group) = populated(&store);
    let (_, token) = store.login("user1", b"password1").unwrap();

    assert_eq!(store.delete_account(1).unwrap(), "user1");

    // No way in, before a single key is purged.
    assert!(store.is_deleted(1));
    assert!(matches!(
        store.login("user1", b"password1"),
        Err(StoreError::AuthFailed)
    ));
    assert!(matches!(store.verify_token(&token), Err(StoreError::AuthFailed)));
    assert!(matches!(store.token_login(&token), Err(StoreError::AuthFailed)));
    assert!(store.cached_token_login(&token).is_none());
    assert!(matches!(store.issue_token(1), Err(StoreError::NotFound)));
    assert_eq!(store.username(1).unwrap(), None);
    assert_eq!(store.user_id("user1").unwrap(), None);
    // Gone from everyone's lists, and nobody can befriend or block it.
    assert!(store.friends(2).unwrap().is_empty());
    assert_eq!(
        store.friend_requests_after(3, true, 0, 10).unwrap(),
        (vec![], false)
    );
    assert_eq!(
        store.friend_requests_after(4, false, 0, 10).unwrap(),
        (vec![], false)
    );
    assert_eq!(store.blocks_after(6, 0, 10).unwrap(), (vec![], false));
    assert!(matches!(store.add_friend(3, 1), Err(StoreError::NotFound)));
    assert!(matches!(store.block(3, 1), Err(StoreError::NotFound)));
    assert!(matches!(store.invite(group, 1), Err(StoreError::NotFound)));
    // Twice is refused, as is an id that never was.
    assert!(matches!(store.delete_account(1), Err(StoreError::NotFound)));
    assert!(matches!(store.delete_account(99), Err(StoreError::NotFound)));
    assert_eq!(store.pending_user_purges(), vec![1]);

    // Small steps: every kind of key goes, a few at a time.
    assert!(purge(&store, 1, 2) > 10);
    assert!(store.pending_user_purges().is_empty());
    assert!(store.inbox_after(1, None, 100).unwrap().is_empty());
    assert_eq!(store.receipts(1, conv).unwrap(), (0, 0));
    assert!(store.direct_conversations(1, 10).unwrap().is_empty());
    assert_eq!(store.user_invites_after(1, 0, 10).unwrap(), (vec![], false));
    assert_eq!(store.invites_after(group, 0, 10).unwrap(), (vec![2], false));
    assert!(!store.blocks_between(1, 5).unwrap().any());
    assert!(!store.blocks_between(6, 1).unwrap().any());
    assert!(store.purge_user_step(1, 10).unwrap(), "nothing left to do");

    // The other party keeps the conversation, history and inbox.
    assert_eq!(store.direct_conversations(2, 10).unwrap(), vec![conv]);
    assert_eq!(store.history(conv, 1, true, 100).unwrap().len(), 20);
    assert_eq!(store.inbox_after(2, None, 100).unwrap().len(), 10);
    // The name is free; the id is not.
    assert_eq!(store.register("user1", b"password2").unwrap(), 7);
    assert!(!store.is_deleted(7));
    assert!(store.friends(7).unwrap().is_empty());
}

#[test]
fn a_purge_cut_short_resumes_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let conv;
    {
        let store = open(dir.path());
        (conv, _) = populated(&store);
        store.delete_account(1).unwrap();
        assert!(!store.purge_user_step(1, 3).unwrap());
        store.persist().unwrap();
    }
    let store = open(dir.path());
    assert!(store.is_deleted(1));
    assert_eq!(store.deleted_count(), 1);
    assert!(!store.is_deleted(2));
    assert_eq!(store.pending_user_purges(), vec![1]);
    assert!(matches!(
        store.login("user1", b"password1"),
        Err(StoreError::AuthFailed)
    ));
    assert!(store.friends(2).unwrap().is_empty());
    purge(&store, 1, 1000);
    assert!(store.pending_user_purges().is_empty());
    drop(store);
    let store = open(dir.path());
    assert!(store.is_deleted(1), "the deletion is kept after the purge");
    assert!(store.pending_user_purges().is_empty());
    assert!(matches!(store.delete_account(1), Err(StoreError::NotFound)));
    assert_eq!(store.history(conv, 1, true, 100).unwrap().len(), 20);
    assert_eq!(store.register("fresh", b"password1").unwrap(), 7);
}

#[test]
fn the_newest_account_s_id_is_not_reused_after_its_deletion_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.register("old", b"password1").unwrap();
        assert_eq!(store.register("newest", b"password1").unwrap(), 2);
        store.delete_account(2).unwrap();
        purge(&store, 2, 1000);
        store.persist().unwrap();
    }
    let store = open(dir.path());
    assert!(store.user_exists(2), "an id once assigned stays known");
    assert!(store.is_deleted(2));
    assert_eq!(store.register("newest", b"password1").unwrap(), 3);
}

#[test]
fn the_user_must_prove_the_password_and_a_wrong_one_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    populated(&store);
    assert!(matches!(
        store.delete_own_account(1, b"wrong-password"),
        Err(StoreError::AuthFailed)
    ));
    assert!(!store.is_deleted(1));
    assert_eq!(store.friends(2).unwrap(), vec![1]);
    store.login("user1", b"password1").unwrap();
    assert_eq!(store.delete_own_account(1, b"password1").unwrap(), "user1");
    assert!(matches!(
        store.delete_own_account(1, b"password1"),
        Err(StoreError::NotFound)
    ));

    // An account made by an external login has no password to prove.
    let policy = ExternalPolicy {
        create_accounts: true,
        password_accounts: false,
    };
    let ExternalLogin::LoggedIn { user, .. } = store.external_login("ext", Some(1), policy).unwrap() else {
        panic!("not logged in");
    };
    assert!(matches!(
        store.delete_own_account(user, b""),
        Err(StoreError::Forbidden(why)) if why == NO_PASSWORD_TO_CHECK
    ));
    // The operator can; a new external login is then a new, empty account.
    store.delete_account(user).unwrap();
    let ExternalLogin::LoggedIn {
        user: again, created, ..
    } = store.external_login("ext", Some(2), policy).unwrap()
    else {
        panic!("not logged in");
    };
    assert!(created && again != user);
}

#[test]
fn writes_for_a_deleted_account_after_its_deletion_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (conv, _) = populated(&store);
    store.delete_account(1).unwrap();
    purge(&store, 1, 1000);
    // A message sequenced before the deletion and a receipt sent before
    // the session closed, committed after.
    let late = [
        msg(conv, 21, 2, 1),
        WriteOp::Receipt {
            user: 1,
            conv,
            kind: ReceiptKind::Read,
            seq: 20,
        },
    ];
    store.apply(&late, false).unwrap();
    assert!(store.inbox_after(1, None, 100).unwrap().is_empty());
    assert_eq!(store.receipts(1, conv).unwrap(), (0, 0));
    // The history entry stays: the sender's copy.
    assert_eq!(store.history(conv, 1, true, 100).unwrap().len(), 21);
    // A new conversation with the deleted account indexes only the other.
    let fresh = ConvId::direct(1, 3);
    store.apply(&[msg(fresh, 1, 3, 1)], false).unwrap();
    assert!(store.direct_conversations(1, 10).unwrap().is_empty());
    assert_eq!(store.direct_conversations(3, 10).unwrap(), vec![fresh]);
}

#[test]
fn pages_pass_over_deleted_accounts_awaiting_their_purge() {
    // Users 2..=5 are friends of 1 and blocked by 6; 2 and 3 are deleted,
    // not yet purged. A page of one starts at 4, not at an empty page
    // that says more follow (which a client paging from its last item
    // could not go on from).
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 1..=6 {
        store.register(&format!("user{i}"), b"password1").unwrap();
    }
    for other in 2..=5 {
        store.add_friend(1, other).unwrap();
        store.add_friend(other, 1).unwrap();
        store.block(6, other).unwrap();
    }
    store.delete_account(2).unwrap();
    store.delete_account(3).unwrap();
    assert_eq!(store.friends_after(1, 0, 1).unwrap(), (vec![4], true));
    assert_eq!(store.friends_after(1, 4, 1).unwrap(), (vec![5], false));
    assert_eq!(store.friends_after(1, 0, 10).unwrap(), (vec![4, 5], false));
    let mut blocked: Vec<u64> = Vec::new();
    let mut after = 0;
    loop {
        let (page, more) = store.blocks_after(6, after, 1).unwrap();
        assert!(!(more && page.is_empty()), "an empty page said more follow");
        blocked.extend(&page);
        match page.last() {
            Some(&last) if more => after = last,
            _ => break,
        }
    }
    assert_eq!(blocked, vec![4, 5]);
    // Only deleted accounts after the page: no more to list, so `more`
    // is not set (it was, and the next page came back empty).
    store.delete_account(5).unwrap();
    assert_eq!(store.friends_after(1, 0, 1).unwrap(), (vec![4], false));
    assert_eq!(store.blocks_after(6, 0, 1).unwrap(), (vec![4], false));
}

/// What a user who left a group is owed from it (`departures`) is keyed
/// by the user: the engine's departures from the groups at deletion
/// write one such record per group, and older ones may be there too.
/// The purge removes them all; other users' records stay.
#[test]
fn the_purge_removes_the_account_s_departure_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    populated(&store);
    let groups: Vec<u64> = (0..3)
        .map(|n| store.create_group(2, &format!("g{n}")).unwrap())
        .collect();
    for &group in &groups {
        store.add_member(group, 1).unwrap();
        store.add_member(group, 3).unwrap();
    }
    // One left long ago, one is left by the deletion (as the engine does
    // before the purge), and 3 leaves one too.
    store.remove_member(groups[0], 1).unwrap();
    store.delete_account(1).unwrap();
    store.remove_member(groups[1], 1).unwrap();
    store.remove_member(groups[2], 1).unwrap();
    store.remove_member(groups[0], 3).unwrap();
    assert_eq!(store.departures(1).unwrap().len(), 3);

    purge(&store, 1, 1);
    assert!(store.departures(1).unwrap().is_empty());
    assert_eq!(store.departures(3).unwrap().len(), 1, "another user's stays");
}

#[test]
fn a_group_s_invites_skip_a_deleted_account_before_its_purge() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, group) = populated(&store);
    assert_eq!(store.invites_after(group, 0, 10).unwrap(), (vec![1, 2], false));
    store.delete_account(1).unwrap();
    assert_eq!(store.invites_after(group, 0, 10).unwrap(), (vec![2], false));
    // Passed over, not counted: a page of one is not empty.
    assert_eq!(store.invites_after(group, 0, 1).unwrap(), (vec![2], false));
}
