//! Messages on a real store: history paging, inboxes, receipts, the
//! conversation indexes, seq recovery after a reopen, retention and
//! corrupt records.

mod common;

use std::sync::Arc;

use common::open;
use fjall::{Database, KeyspaceCreateOptions};
use tern_storage::{
    recency_bucket, ConvId, InboxTargets, MessageWrite, ReceiptKind, RecentMessage, StoreError, StoredFrame,
    WriteOp, RECENCY_BUCKET_MS,
};

fn frame(conv: ConvId, seq: u64) -> Arc<[u8]> {
    format!("{conv:?}#{seq}").into_bytes().into()
}

fn msg(conv: ConvId, seq: u64, from: u64, ts: u64, inbox: InboxTargets) -> WriteOp {
    WriteOp::Message(MessageWrite {
        conv,
        seq,
        from,
        client_msg_id: 1000 + seq,
        timestamp_ms: ts,
        frame: frame(conv, seq),
        inbox,
        moved_from: None,
    })
}

fn receipt(user: u64, conv: ConvId, kind: ReceiptKind, seq: u64) -> WriteOp {
    WriteOp::Receipt {
        user,
        conv,
        kind,
        seq,
    }
}

fn seqs(frames: &[StoredFrame]) -> Vec<u64> {
    frames.iter().map(|f| f.seq).collect()
}

fn positions(frames: &[StoredFrame]) -> Vec<(ConvId, u64)> {
    frames.iter().map(|f| (f.conv, f.seq)).collect()
}

#[test]
fn history_pages_forward_and_backward() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let conv = ConvId::direct(1, 2);
    let other = ConvId::direct(1, 3);
    let ops: Vec<_> = (1..=10)
        .map(|s| msg(conv, s, 1, 100 + s, InboxTargets::None))
        .chain([msg(other, 1, 1, 5, InboxTargets::None)])
        .collect();
    store.apply(&ops, false).unwrap();

    let page = store.history(conv, 1, true, 4).unwrap();
    assert_eq!(seqs(&page), vec![1, 2, 3, 4]);
    assert_eq!(page[0].frame, &*frame(conv, 1));
    assert_eq!(page[0].timestamp_ms, 101);
    assert_eq!(page[0].conv, conv);
    let page = store.history(conv, 5, true, 4).unwrap();
    assert_eq!(seqs(&page), vec![5, 6, 7, 8]);
    assert_eq!(seqs(&store.history(conv, 9, true, 4).unwrap()), vec![9, 10]);
    assert!(store.history(conv, 11, true, 4).unwrap().is_empty());

    assert_eq!(seqs(&store.history(conv, 10, false, 3).unwrap()), vec![10, 9, 8]);
    assert_eq!(seqs(&store.history(conv, 7, false, 3).unwrap()), vec![7, 6, 5]);
    assert_eq!(seqs(&store.history(conv, 2, false, 3).unwrap()), vec![2, 1]);
    assert_eq!(
        seqs(&store.history(conv, u64::MAX, false, 2).unwrap()),
        vec![10, 9]
    );
    assert!(store.history(conv, 0, false, 3).unwrap().is_empty());
    assert!(store.history(conv, 1, true, 0).unwrap().is_empty());
    // The neighbouring conversation is not mixed in either way.
    assert_eq!(seqs(&store.history(other, 0, true, 100).unwrap()), vec![1]);
    assert!(store
        .history(ConvId::Group { group: 1 }, 0, true, 10)
        .unwrap()
        .is_empty());
}

#[test]
fn inbox_pages_across_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = ConvId::direct(1, 2);
    let b = ConvId::direct(2, 3);
    let g = ConvId::Group { group: 4 };
    let members: Arc<[u64]> = vec![2, 3, 5].into();
    let mut ops = Vec::new();
    for s in 1..=3 {
        ops.push(msg(a, s, 1, s, InboxTargets::One(2)));
        ops.push(msg(b, s, 3, s, InboxTargets::One(2)));
        ops.push(msg(g, s, 5, s, InboxTargets::Many(members.clone())));
    }
    // User 1's own inbox gets nothing: only targets are written.
    store.apply(&ops, true).unwrap();

    let all = store.inbox_after(2, None, 100).unwrap();
    let expect = vec![
        (a, 1),
        (a, 2),
        (a, 3),
        (b, 1),
        (b, 2),
        (b, 3),
        (g, 1),
        (g, 2),
        (g, 3),
    ];
    assert_eq!(positions(&all), expect);
    assert_eq!(all[3].frame, &*frame(b, 1));

    // Paging with the last position seen, across conversation boundaries.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.inbox_after(2, after, 2).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|f| (f.conv, f.seq));
        seen.extend(positions(&page));
    }
    assert_eq!(seen, expect);

    assert_eq!(
        positions(&store.inbox_after(3, None, 100).unwrap()),
        vec![(g, 1), (g, 2), (g, 3)]
    );
    assert_eq!(store.inbox_after(5, Some((g, 2)), 100).unwrap().len(), 1);
    assert!(store.inbox_after(1, None, 100).unwrap().is_empty());
    assert!(store.inbox_after(5, Some((g, u64::MAX)), 100).unwrap().is_empty());
}

#[test]
fn receipts_only_move_forward_and_clear_the_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let conv = ConvId::direct(1, 2);
    let other = ConvId::direct(2, 3);
    let ops: Vec<_> = (1..=10)
        .flat_map(|s| {
            [
                msg(conv, s, 1, s, InboxTargets::One(2)),
                msg(other, s, 3, s, InboxTargets::One(2)),
            ]
        })
        .collect();
    store.apply(&ops, false).unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (0, 0));

    store
        .apply(&[receipt(2, conv, ReceiptKind::Delivered, 4)], false)
        .unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (4, 0));
    let left = store.inbox_after(2, None, 100).unwrap();
    assert_eq!(seqs(&left[..6]), vec![5, 6, 7, 8, 9, 10]);
    assert_eq!(left.len(), 16, "the other conversation is untouched");

    // Backwards is ignored; read raises delivered too.
    store
        .apply(&[receipt(2, conv, ReceiptKind::Delivered, 2)], false)
        .unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (4, 0));
    store
        .apply(&[receipt(2, conv, ReceiptKind::Read, 7)], false)
        .unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (7, 7));
    store
        .apply(&[receipt(2, conv, ReceiptKind::Read, 3)], false)
        .unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (7, 7));
    store
        .apply(&[receipt(2, conv, ReceiptKind::Delivered, 8)], false)
        .unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (8, 7));
    let left = store.inbox_after(2, None, 100).unwrap();
    assert_eq!(positions(&left[..2]), vec![(conv, 9), (conv, 10)]);
    assert_eq!(left.len(), 12);
    // History is not touched by receipts.
    assert_eq!(store.history(conv, 1, true, 100).unwrap().len(), 10);

    // In one batch: messages, then a receipt covering some of them, then
    // more; the receipt sees the earlier ones of the same batch.
    let batch = vec![
        msg(conv, 11, 1, 11, InboxTargets::One(2)),
        msg(conv, 12, 1, 12, InboxTargets::One(2)),
        receipt(2, conv, ReceiptKind::Delivered, 11),
        receipt(2, conv, ReceiptKind::Read, 9),
        msg(conv, 13, 1, 13, InboxTargets::One(2)),
    ];
    store.apply(&batch, false).unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (11, 9));
    let left = store.inbox_after(2, None, 100).unwrap();
    assert_eq!(positions(&left[..2]), vec![(conv, 12), (conv, 13)]);
    assert_eq!(left.len(), 12);

    // A receipt of another user or conversation changes nothing here.
    store
        .apply(&[receipt(3, conv, ReceiptKind::Read, 100)], false)
        .unwrap();
    assert_eq!(store.receipts(2, conv).unwrap(), (11, 9));
    assert_eq!(store.receipts(3, conv).unwrap(), (100, 100));
    // Persisted across a reopen.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.receipts(2, conv).unwrap(), (11, 9));
    assert_eq!(store.inbox_after(2, None, 100).unwrap().len(), 12);
}

#[test]
fn an_inbox_entry_below_the_cursor_is_never_returned() {
    // A message written after a receipt already covering its seq (an
    // engine ordering slip) stays stored until expiry, but sync never
    // hands it out again.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let conv = ConvId::direct(1, 2);
    store
        .apply(&[receipt(2, conv, ReceiptKind::Delivered, 5)], false)
        .unwrap();
    store
        .apply(
            &[
                msg(conv, 5, 1, 5, InboxTargets::One(2)),
                msg(conv, 6, 1, 6, InboxTargets::One(2)),
            ],
            false,
        )
        .unwrap();
    assert_eq!(seqs(&store.inbox_after(2, None, 10).unwrap()), vec![6]);
}

#[test]
fn conv_tail_recovers_seq_and_dedup_window_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let conv = ConvId::Group { group: 9 };
    let next = ConvId::Group { group: 10 };
    {
        let store = open(dir.path());
        for chunk in (1..=50u64).collect::<Vec<_>>().chunks(7) {
            let ops: Vec<_> = chunk
                .iter()
                .map(|&s| msg(conv, s, s % 3 + 1, 10 * s, InboxTargets::None))
                .collect();
            store.apply(&ops, true).unwrap();
        }
        store
            .apply(&[msg(next, 1, 1, 1, InboxTargets::None)], true)
            .unwrap();
    }
    let store = open(dir.path());
    let tail = store.conv_tail(conv, 5).unwrap();
    assert_eq!(tail.last_seq, 50);
    assert_eq!(
        tail.recent,
        (46..=50)
            .map(|s| RecentMessage {
                seq: s,
                from: s % 3 + 1,
                client_msg_id: 1000 + s,
                timestamp_ms: 10 * s
            })
            .collect::<Vec<_>>()
    );
    let tail = store.conv_tail(conv, 0).unwrap();
    assert_eq!((tail.last_seq, tail.recent.len()), (50, 0));
    assert_eq!(store.conv_tail(conv, 1000).unwrap().recent.len(), 50);
    let empty = store.conv_tail(ConvId::direct(1, 2), 5).unwrap();
    assert_eq!((empty.last_seq, empty.recent.len()), (0, 0));
    assert_eq!(store.conv_tail(next, 5).unwrap().last_seq, 1);

    let last = store.last_message(conv).unwrap().unwrap();
    assert_eq!((last.seq, last.timestamp_ms), (50, 500));
    assert_eq!(last.frame, &*frame(conv, 50));
    assert_eq!(store.last_message(ConvId::Group { group: 8 }).unwrap(), None);
}

#[test]
fn direct_conversations_index_both_participants() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ops = vec![
        msg(ConvId::direct(1, 2), 1, 1, 1, InboxTargets::One(2)),
        msg(ConvId::direct(1, 2), 2, 2, 2, InboxTargets::One(1)),
        msg(ConvId::direct(3, 1), 1, 3, 3, InboxTargets::None),
        msg(ConvId::direct(2, 3), 1, 2, 4, InboxTargets::One(3)),
        msg(
            ConvId::Group { group: 1 },
            1,
            1,
            5,
            InboxTargets::Many(vec![2, 3].into()),
        ),
    ];
    store.apply(&ops, false).unwrap();
    assert_eq!(
        store.direct_conversations(1, usize::MAX).unwrap(),
        vec![ConvId::direct(1, 2), ConvId::direct(1, 3)]
    );
    assert_eq!(
        store.direct_conversations(2, usize::MAX).unwrap(),
        vec![ConvId::direct(1, 2), ConvId::direct(2, 3)]
    );
    assert_eq!(
        store.direct_conversations(3, usize::MAX).unwrap(),
        vec![ConvId::direct(1, 3), ConvId::direct(2, 3)]
    );
    assert!(store.direct_conversations(4, usize::MAX).unwrap().is_empty());
    // At most `max`, the first in key order.
    assert_eq!(
        store.direct_conversations(3, 1).unwrap(),
        vec![ConvId::direct(1, 3)]
    );
    assert!(store.direct_conversations(3, 0).unwrap().is_empty());
}

#[test]
fn user_groups_follow_membership_changes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for name in ["alice", "bob", "carol"] {
            store.register(name, b"password1").unwrap();
        }
        let g1 = store.create_group(1, "one").unwrap();
        let g2 = store.create_group(2, "two").unwrap();
        let g3 = store.create_group(1, "three").unwrap();
        store.add_member(g2, 1).unwrap();
        store.add_member(g2, 3).unwrap();
        store.add_member(g1, 3).unwrap();
        store.add_member(g1, 3).unwrap();
        assert_eq!(store.user_groups(1).unwrap(), vec![g1, g2, g3]);
        assert_eq!(store.user_groups(2).unwrap(), vec![g2]);
        assert_eq!(store.user_groups(3).unwrap(), vec![g1, g2]);
        store.remove_member(g2, 1).unwrap();
        store.remove_member(g2, 1).unwrap();
        store.remove_member(g1, 3).unwrap();
        assert_eq!(store.user_groups(1).unwrap(), vec![g1, g3]);
        assert_eq!(store.user_groups(3).unwrap(), vec![g2]);
    }
    let store = open(dir.path());
    assert_eq!(store.user_groups(1).unwrap(), vec![1, 3]);
    assert_eq!(store.user_groups(2).unwrap(), vec![2]);
    assert_eq!(store.user_groups(3).unwrap(), vec![2]);
    assert!(store.user_groups(4).unwrap().is_empty());
}

#[test]
fn user_groups_is_backfilled_for_an_older_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.register("alice", b"password1").unwrap();
        store.register("bob", b"password2").unwrap();
        store.create_group(1, "g").unwrap();
        store.add_member(1, 2).unwrap();
        store.create_group(2, "h").unwrap();
    }
    // Wipe the index, as a store written before it existed.
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = db
            .keyspace("user_groups", KeyspaceCreateOptions::default)
            .unwrap();
        let keys: Vec<_> = ks.iter().map(|g| g.key().unwrap()).collect();
        assert_eq!(keys.len(), 3);
        for k in keys {
            ks.remove(k).unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.user_groups(1).unwrap(), vec![1]);
    assert_eq!(store.user_groups(2).unwrap(), vec![1, 2]);
}

/// Memberships written straight into `members` with no `user_groups`
/// keys, as an older store holds them; with `at`, the backfill's record
/// says it got as far as that `members` key, and the index holds what it
/// had written by then, except group 1's keys: only a backfill that
/// resumes after `at` leaves them out, where one that started over would
/// write them.
fn older_memberships(dir: &std::path::Path, groups: u64, users: u64, at: Option<(u64, u64)>) {
    let db = Database::builder(dir).open().unwrap();
    let members = db.keyspace("members", KeyspaceCreateOptions::default).unwrap();
    let index = db
        .keyspace("user_groups", KeyspaceCreateOptions::default)
        .unwrap();
    let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
    let pair = |a: u64, b: u64| [a.to_be_bytes(), b.to_be_bytes()].concat();
    let mut batch = db.batch();
    for g in 1..=groups {
        for u in 1..=users {
            batch.insert(&members, pair(g, u), [1u8, 0]);
            if g > 1 && at.is_some_and(|at| (g, u) <= at) {
                batch.insert(&index, pair(u, g), []);
            }
        }
    }
    match at {
        None => batch.remove(&meta, "user_groups_backfill"),
        Some((g, u)) => batch.insert(&meta, "user_groups_backfill", [&[1u8][..], &pair(g, u)].concat()),
    }
    batch.commit().unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

/// The `meta` record of the `user_groups` backfill, if any.
fn backfill_record(dir: &std::path::Path) -> Option<Vec<u8>> {
    let db = Database::builder(dir).open().unwrap();
    let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
    meta.get("user_groups_backfill").unwrap().map(|v| v.to_vec())
}

/// An older store with more memberships than one backfill chunk (10,000)
/// is indexed whole and the record says done; a backfill cut short after
/// a chunk goes on after the position its record names, where the old
/// code took a non-empty index for a finished one.
#[test]
fn a_large_reverse_index_backfill_is_chunked_and_goes_on_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    older_memberships(dir.path(), 3, 9_000, None);
    {
        let store = open(dir.path());
        assert_eq!(store.user_groups(1).unwrap(), vec![1, 2, 3]);
        assert_eq!(store.user_groups(9_000).unwrap(), vec![1, 2, 3]);
    }
    assert_eq!(backfill_record(dir.path()), Some(vec![1]));
    // Cut short after group 2's member 4,000 (group 1's index keys lost
    // too, see `older_memberships`): the next open writes what comes after
    // the position, and only that.
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    older_memberships(dir.path(), 3, 9_000, Some((2, 4_000)));
    {
        let store = open(dir.path());
        for user in [1, 4_000, 4_001, 9_000] {
            assert_eq!(store.user_groups(user).unwrap(), vec![2, 3], "user {user}");
        }
    }
    assert_eq!(backfill_record(dir.path()), Some(vec![1]));
}

#[test]
fn user_invites_is_backfilled_for_an_older_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for name in ["alice", "bob", "carol"] {
            store.register(name, b"password1").unwrap();
        }
        let g = store.create_group_with(1, "g", false).unwrap();
        let h = store.create_group_with(1, "h", false).unwrap();
        store.invite(g, 2).unwrap();
        store.invite(h, 2).unwrap();
        store.invite(h, 3).unwrap();
    }
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = db
            .keyspace("user_invites", KeyspaceCreateOptions::default)
            .unwrap();
        let keys: Vec<_> = ks.iter().map(|g| g.key().unwrap()).collect();
        assert_eq!(keys.len(), 3);
        for k in keys {
            ks.remove(k).unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.user_invites_after(2, 0, 10).unwrap(), (vec![1, 2], false));
    assert_eq!(store.user_invites_after(3, 0, 10).unwrap(), (vec![2], false));
}

#[test]
fn expiry_removes_only_expired_entries_and_keeps_each_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = ConvId::direct(1, 2);
    let b = ConvId::Group { group: 1 };
    let c = ConvId::direct(5, 6);
    let mut ops = Vec::new();
    // a: seq 1..=10 at ts 100..=1000; b: seq 1..=5 at ts 10..=50 (all old);
    // c: one old message. Timestamps out of seq order in a too.
    for s in 1..=10 {
        ops.push(msg(a, s, 1, 100 * s, InboxTargets::One(2)));
    }
    ops.push(msg(a, 11, 1, 50, InboxTargets::One(2)));
    for s in 1..=5 {
        ops.push(msg(b, s, 1, 10 * s, InboxTargets::Many(vec![2, 3].into())));
    }
    ops.push(msg(c, 1, 5, 1, InboxTargets::One(6)));
    store.apply(&ops, false).unwrap();

    // Inbox: cut at 500 removes ts < 500 only.
    let removed = store.expire_inbox(500).unwrap();
    assert_eq!(removed, 4 + 1 + 5 * 2 + 1);
    let left = store.inbox_after(2, None, 100).unwrap();
    assert!(left.iter().all(|f| f.timestamp_ms >= 500), "{left:?}");
    assert_eq!(positions(&left), (5..=10).map(|s| (a, s)).collect::<Vec<_>>());
    assert!(store.inbox_after(3, None, 100).unwrap().is_empty());
    assert!(store.inbox_after(6, None, 100).unwrap().is_empty());
    assert_eq!(store.expire_inbox(500).unwrap(), 0);

    // History: same cut, but each conversation keeps its newest entry
    // even when it is expired (a's seq 11 at ts 50, b's seq 5, c's seq 1).
    let removed = store.expire_history(500).unwrap();
    assert_eq!(removed, 4 + 4);
    assert_eq!(
        seqs(&store.history(a, 0, true, 100).unwrap()),
        vec![5, 6, 7, 8, 9, 10, 11]
    );
    assert_eq!(seqs(&store.history(b, 0, true, 100).unwrap()), vec![5]);
    assert_eq!(seqs(&store.history(c, 0, true, 100).unwrap()), vec![1]);
    assert_eq!(store.conv_tail(a, 3).unwrap().last_seq, 11);
    assert_eq!(store.conv_tail(b, 3).unwrap().last_seq, 5);
    // Everything expired: still one per conversation.
    store.expire_history(u64::MAX).unwrap();
    for conv in [a, b, c] {
        assert_eq!(store.history(conv, 0, true, 100).unwrap().len(), 1);
    }
    assert_eq!(store.conv_tail(a, 3).unwrap().last_seq, 11);
    assert_eq!(store.expire_history(u64::MAX).unwrap(), 0);
    assert_eq!(store.expire_inbox(0).unwrap(), 0);
}

#[test]
fn expiry_over_many_entries_crosses_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let conv = ConvId::direct(1, 2);
    let n = 25_000u64;
    let ops: Vec<_> = (1..=n)
        .map(|s| msg(conv, s, 1, s, InboxTargets::One(2)))
        .collect();
    for chunk in ops.chunks(5000) {
        store.apply(chunk, false).unwrap();
    }
    assert_eq!(store.expire_inbox(20_001).unwrap(), 20_000);
    assert_eq!(store.inbox_after(2, None, usize::MAX).unwrap().len(), 5_000);
    assert_eq!(store.expire_history(n + 1).unwrap(), (n - 1) as usize);
    // Inbox entries point into history: only the newest is left to read.
    assert_eq!(seqs(&store.inbox_after(2, None, usize::MAX).unwrap()), vec![n]);
    assert_eq!(store.conv_tail(conv, 1).unwrap().last_seq, n);
}

#[test]
fn inbox_entries_read_their_frames_from_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = ConvId::direct(1, 2);
    // User 2 writes seqs 3 and 6 (in user 1's inbox), user 1 the rest.
    let ops: Vec<_> = (1..=10)
        .map(|s| match s {
            3 | 6 => msg(a, s, 2, 100 * s, InboxTargets::One(1)),
            _ => msg(a, s, 1, 100 * s, InboxTargets::One(2)),
        })
        .collect();
    store.apply(&ops, false).unwrap();
    let all = store.inbox_after(2, None, 100).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 4, 5, 7, 8, 9, 10]);
    for f in &all {
        assert_eq!(&f.frame[..], &frame(a, f.seq)[..]);
        assert_eq!(f.timestamp_ms, 100 * f.seq);
    }
    assert_eq!(seqs(&store.inbox_after(1, None, 100).unwrap()), vec![3, 6]);

    // History retention shorter than the inbox's: an entry whose record
    // is gone is skipped, and a page is still filled from later entries.
    assert_eq!(store.expire_history(450).unwrap(), 4);
    assert_eq!(seqs(&store.inbox_after(2, None, 3).unwrap()), vec![5, 7, 8]);
    assert_eq!(seqs(&store.inbox_after(2, Some((a, 8)), 3).unwrap()), vec![9, 10]);
    assert_eq!(seqs(&store.inbox_after(1, None, 100).unwrap()), vec![6]);
}

/// Inbox entries far apart in their conversation's history (many of the
/// user's own messages between them) are read one by one instead of by
/// a range read over everything between; the page is the same, expired
/// records are skipped the same way, and paging resumes the same way.
#[test]
fn sparse_inbox_entries_read_the_same_frames_as_dense_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = ConvId::direct(1, 2);
    // User 2's inbox holds seqs 1, 100, 200, 300, 400; user 2 wrote the rest.
    let wanted = [1u64, 100, 200, 300, 400];
    let ops: Vec<_> = (1..=400)
        .map(|s| match wanted.contains(&s) {
            true => msg(a, s, 1, 10 * s, InboxTargets::One(2)),
            false => msg(a, s, 2, 10 * s, InboxTargets::One(1)),
        })
        .collect();
    store.apply(&ops, false).unwrap();
    let all = store.inbox_after(2, None, 100).unwrap();
    assert_eq!(seqs(&all), wanted);
    for f in &all {
        assert_eq!(&f.frame[..], &frame(a, f.seq)[..]);
        assert_eq!(f.timestamp_ms, 10 * f.seq);
    }
    assert_eq!(seqs(&store.inbox_after(2, None, 2).unwrap()), vec![1, 100]);
    assert_eq!(
        seqs(&store.inbox_after(2, Some((a, 100)), 2).unwrap()),
        vec![200, 300]
    );
    // The records of seqs 1 and 100 expire from history (timestamps
    // before 1,500); their entries are skipped and the page fills on.
    store.expire_history(1500).unwrap();
    assert_eq!(seqs(&store.inbox_after(2, None, 2).unwrap()), vec![200, 300]);
    assert_eq!(
        seqs(&store.inbox_after(2, None, 100).unwrap()),
        vec![200, 300, 400]
    );
}

/// A rejoin raises the joiner's cursors past what they were owed from
/// an earlier membership (that range is a departure record's, streamed
/// from history). Their inbox entries of that membership were left
/// behind: below the cursor, never returned and never removed by a
/// receipt (which removes only above the old cursor), so they stayed
/// until the inbox expiry sweep, and every inbox read walked past them.
#[test]
fn a_rejoin_removes_the_inbox_entries_its_cursor_passes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for name in ["owner", "member"] {
        store.register(name, b"password1").unwrap();
    }
    let group = store.create_group(1, "g").unwrap();
    let conv = ConvId::Group { group };
    store.add_member(group, 2).unwrap();
    let first: Vec<_> = (1..=5)
        .map(|s| msg(conv, s, 1, s, InboxTargets::One(2)))
        .collect();
    store.apply(&first, true).unwrap();
    store.remove_member(group, 2).unwrap();
    let between: Vec<_> = (6..=10).map(|s| msg(conv, s, 1, s, InboxTargets::None)).collect();
    store.apply(&between, true).unwrap();
    store.add_member(group, 2).unwrap();
    assert_eq!(store.inbox_after(2, None, 100).unwrap().len(), 0);
    // The first membership is still owed, from history.
    let owed = store.departures(2).unwrap();
    assert_eq!((owed.len(), owed[0].start, owed[0].until), (1, 0, 5));
    assert_eq!(store.expire_inbox(u64::MAX).unwrap(), 0, "entries left behind");
}

#[test]
fn version_1_inbox_entries_with_their_own_frame_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let conv = ConvId::direct(1, 2);
    {
        let store = open(dir.path());
        store
            .apply(&[msg(conv, 2, 1, 20, InboxTargets::One(2))], true)
            .unwrap();
    }
    // What a store from before inbox references holds: seq 1 with no
    // history record of its own left, its frame in the inbox value.
    let key = [
        &2u64.to_be_bytes()[..],
        &crate_conv_key(conv),
        &1u64.to_be_bytes(),
    ]
    .concat();
    let value = [&[1u8][..], &10u64.to_be_bytes(), b"old frame"].concat();
    write_raw(dir.path(), "inbox", &key, &value);

    let store = open(dir.path());
    let all = store.inbox_after(2, None, 100).unwrap();
    assert_eq!(seqs(&all), vec![1, 2]);
    assert_eq!(&all[0].frame[..], b"old frame");
    assert_eq!(all[0].timestamp_ms, 10);
    assert_eq!(&all[1].frame[..], &frame(conv, 2)[..]);
    assert_eq!(store.expire_inbox(15).unwrap(), 1);
    assert_eq!(seqs(&store.inbox_after(2, None, 100).unwrap()), vec![2]);
}

fn write_raw(dir: &std::path::Path, ks: &str, key: &[u8], value: &[u8]) {
    let db = Database::builder(dir).open().unwrap();
    let handle = db.keyspace(ks, KeyspaceCreateOptions::default).unwrap();
    handle.insert(key, value).unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

fn assert_corrupt(err: StoreError, keyspace: &str) {
    match &err {
        StoreError::Corrupt { detail, .. } => assert!(detail.contains(keyspace), "{detail}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn corrupt_message_records_are_errors_naming_the_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    let conv = ConvId::direct(1, 2);
    {
        let store = open(dir.path());
        store
            .apply(&[msg(conv, 1, 1, 1, InboxTargets::One(2))], false)
            .unwrap();
    }
    let mut hk = vec![0x01];
    hk.extend_from_slice(&1u64.to_be_bytes());
    hk.extend_from_slice(&2u64.to_be_bytes());
    let mut ik = 2u64.to_be_bytes().to_vec();
    ik.extend_from_slice(&hk);
    hk.extend_from_slice(&2u64.to_be_bytes());
    ik.extend_from_slice(&2u64.to_be_bytes());
    write_raw(dir.path(), "history", &hk, b"\x01short");
    write_raw(dir.path(), "inbox", &ik, b"\x09whatever");
    let mut rk = 2u64.to_be_bytes().to_vec();
    rk.extend_from_slice(&crate_conv_key(conv));
    write_raw(dir.path(), "receipts", &rk, b"\x01\x00");
    let mut bad_conv = 1u64.to_be_bytes().to_vec();
    bad_conv.extend_from_slice(&[0x07; 17]);
    write_raw(dir.path(), "user_convs", &bad_conv, b"");

    let store = open(dir.path());
    assert_corrupt(store.history(conv, 0, true, 10).unwrap_err(), "history");
    assert_corrupt(store.conv_tail(conv, 10).unwrap_err(), "history");
    assert_corrupt(store.last_message(conv).unwrap_err(), "history");
    assert_corrupt(store.expire_history(0).unwrap_err(), "history");
    assert_corrupt(store.receipts(2, conv).unwrap_err(), "receipts");
    assert_corrupt(store.inbox_after(2, None, 10).unwrap_err(), "receipts");
    assert_corrupt(store.expire_inbox(0).unwrap_err(), "inbox");
    assert_corrupt(
        store
            .apply(&[receipt(2, conv, ReceiptKind::Read, 1)], false)
            .unwrap_err(),
        "receipts",
    );
    assert_corrupt(
        store.direct_conversations(1, usize::MAX).unwrap_err(),
        "user_convs",
    );
    // Intact records still read.
    assert_eq!(seqs(&store.history(conv, 0, true, 1).unwrap()), vec![1]);
}

fn crate_conv_key(conv: ConvId) -> Vec<u8> {
    match conv {
        ConvId::Direct { low, high } => [&[1u8][..], &low.to_be_bytes(), &high.to_be_bytes()].concat(),
        ConvId::Group { group } => [&[2u8][..], &group.to_be_bytes(), &[0; 8]].concat(),
    }
}

#[test]
fn an_erasure_replaces_a_stored_message_and_never_recreates_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let conv = ConvId::direct(1, 2);
    let erased: Arc<[u8]> = b"erased".to_vec().into();
    let erase = |seq: u64| WriteOp::Erase {
        conv,
        seq,
        from: 1,
        client_msg_id: 1000 + seq,
        timestamp_ms: 100 + seq,
        frame: erased.clone(),
    };
    {
        let store = open(dir.path());
        store
            .apply(
                &[
                    msg(conv, 1, 1, 101, InboxTargets::One(2)),
                    msg(conv, 2, 1, 102, InboxTargets::One(2)),
                ],
                false,
            )
            .unwrap();
        // Seq 1 erased, seq 7 never stored, in one batch with a new message.
        store
            .apply(
                &[msg(conv, 3, 1, 103, InboxTargets::One(2)), erase(1), erase(7)],
                false,
            )
            .unwrap();
        let entry = store.history_entry(conv, 1).unwrap().expect("still there");
        assert_eq!(
            (entry.from, entry.client_msg_id, entry.timestamp_ms),
            (1, 1001, 101)
        );
        assert_eq!(entry.frame, b"erased");
        assert_eq!(store.history_entry(conv, 7).unwrap(), None);
        assert_eq!(seqs(&store.history(conv, 0, true, 10).unwrap()), vec![1, 2, 3]);
    }
    // Durable, and the inbox (which points into history) serves it erased.
    let store = open(dir.path());
    let inbox = store.inbox_after(2, None, 10).unwrap();
    assert_eq!(positions(&inbox), vec![(conv, 1), (conv, 2), (conv, 3)]);
    assert_eq!(&*inbox[0].frame, b"erased");
    assert_eq!(&*inbox[1].frame, &*frame(conv, 2));
}

/// A message at `ts` moving `conv` from the bucket of `previous`.
fn moving(conv: ConvId, seq: u64, ts: u64, previous: u64) -> WriteOp {
    let mut op = msg(conv, seq, 1, ts, InboxTargets::None);
    if let WriteOp::Message(m) = &mut op {
        m.moved_from = Some(recency_bucket(previous));
    }
    op
}

fn recent(store: &tern_storage::Store, user: u64) -> Vec<(u64, ConvId)> {
    store
        .recent_conversations(user)
        .map(|e| e.map(|e| (e.bucket, e.conv)).unwrap())
        .collect()
}

#[test]
fn the_recency_index_follows_each_conversations_newest_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    const B: u64 = RECENCY_BUCKET_MS;
    let (a, b, c) = (ConvId::direct(1, 2), ConvId::direct(1, 3), ConvId::direct(1, 4));
    store
        .apply(
            &[
                msg(a, 1, 1, B, InboxTargets::None),
                msg(b, 1, 1, 3 * B, InboxTargets::None),
                msg(c, 1, 1, 2 * B, InboxTargets::None),
                // Same bucket: nothing moves.
                msg(a, 2, 1, B + 5, InboxTargets::None),
            ],
            false,
        )
        .unwrap();
    assert_eq!(recent(&store, 1), vec![(3, b), (2, c), (1, a)]);
    assert_eq!(recent(&store, 2), vec![(1, a)]);
    // Two moves of one conversation in one batch: the later wins, and
    // neither old bucket keeps a key.
    store
        .apply(&[moving(a, 3, 4 * B, B + 5), moving(a, 4, 5 * B, 4 * B)], false)
        .unwrap();
    assert_eq!(recent(&store, 1), vec![(5, a), (3, b), (2, c)]);
    assert_eq!(recent(&store, 2), vec![(5, a)]);
    // Back in time (a clock stepped back): the keys follow the newest.
    store.apply(&[moving(c, 2, B, 2 * B)], false).unwrap();
    assert_eq!(recent(&store, 4), vec![(1, c)]);
    assert_eq!(recent(&store, 1), vec![(5, a), (3, b), (1, c)]);
    // Groups are not in it; the conversation's tail says where it is.
    store
        .apply(
            &[msg(ConvId::Group { group: 1 }, 1, 1, 9 * B, InboxTargets::None)],
            false,
        )
        .unwrap();
    assert_eq!(recent(&store, 1).len(), 3);
    let tail = store.conv_tail(a, 0).unwrap();
    assert_eq!((tail.last_seq, recency_bucket(tail.last_timestamp_ms)), (4, 5));
    assert_eq!(store.last_message_time(a).unwrap(), Some(5 * B));
    assert_eq!(store.last_message_time(ConvId::direct(7, 8)).unwrap(), None);
}

/// Wipes `recent_convs` and the backfill's record, as in a store written
/// before the index existed; or, with `at`, leaves the record saying a
/// backfill got as far as that `user_convs` key.
fn as_before_the_index(dir: &std::path::Path, at: Option<&[u8]>) {
    let db = Database::builder(dir).open().unwrap();
    let recent = db
        .keyspace("recent_convs", KeyspaceCreateOptions::default)
        .unwrap();
    for key in recent.iter().map(|g| g.key().unwrap()).collect::<Vec<_>>() {
        recent.remove(key).unwrap();
    }
    let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
    match at {
        None => meta.remove("recent_convs_backfill").unwrap(),
        Some(at) => meta
            .insert("recent_convs_backfill", [&[1u8][..], at].concat())
            .unwrap(),
    }
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

#[test]
fn an_older_store_is_indexed_when_opened_and_an_interrupted_backfill_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    const B: u64 = RECENCY_BUCKET_MS;
    let (a, b, c) = (ConvId::direct(1, 2), ConvId::direct(1, 3), ConvId::direct(2, 3));
    {
        let store = open(dir.path());
        let ops = [
            msg(a, 1, 1, B, InboxTargets::None),
            moving(a, 2, 7 * B, B),
            msg(b, 1, 1, 3 * B, InboxTargets::None),
            msg(c, 1, 2, 2 * B, InboxTargets::None),
        ];
        store.apply(&ops, false).unwrap();
        store.persist().unwrap();
    }
    as_before_the_index(dir.path(), None);
    {
        let store = open(dir.path());
        assert_eq!(recent(&store, 1), vec![(7, a), (3, b)]);
        assert_eq!(recent(&store, 2), vec![(7, a), (2, c)]);
        assert_eq!(recent(&store, 3), vec![(3, b), (2, c)]);
    }
    // Cut short after user 2's keys: the backfill goes on from user 3's,
    // whose conversations were indexed (both participants) at the lower
    // id's key, committed with that position: nothing is read again.
    let mut at = 2u64.to_be_bytes().to_vec();
    at.extend([0xff; 17]);
    as_before_the_index(dir.path(), Some(&at));
    let store = open(dir.path());
    assert!(recent(&store, 1).is_empty());
    assert!(recent(&store, 2).is_empty());
    assert!(recent(&store, 3).is_empty());
    drop(store);
    // A conversation whose lower id's `user_convs` key is gone (that
    // account purged) is indexed at the higher id's key.
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let user_convs = db.keyspace("user_convs", KeyspaceCreateOptions::default).unwrap();
        for key in user_convs
            .prefix(1u64.to_be_bytes())
            .map(|g| g.key().unwrap())
            .collect::<Vec<_>>()
        {
            user_convs.remove(key).unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    as_before_the_index(dir.path(), None);
    let store = open(dir.path());
    assert!(recent(&store, 1).is_empty());
    assert_eq!(recent(&store, 2), vec![(7, a), (2, c)]);
    assert_eq!(recent(&store, 3), vec![(3, b), (2, c)]);
    drop(store);
    // Done: a reopen indexes nothing again.
    as_before_the_index(dir.path(), Some(&[]));
    let store = open(dir.path());
    assert!(recent(&store, 3).is_empty());
}
