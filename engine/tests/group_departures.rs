//! What a user who leaves a group, or is kicked or banned from it, still
//! receives: every message sequenced while they were a member, once, in
//! order, whether they were online or offline at the time, also from a
//! large (read-diffused) group whose messages are in no inbox of theirs
//! (docs/protocol.md 2.8.8). Over TCP against an in-process server on a
//! real store; the syncing side reads raw frames so that the client
//! library's cursor-based dedup cannot hide a duplicate.

mod common;
mod durable_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use durable_common::*;
use tern_client::{ConvId, Cursor, GroupId};

/// A large group: above the write-diffusion threshold of 2 its messages
/// are stored only in the group's history.
fn large_group_server() -> TestServer {
    TestServer::start_with(|c| c.write_diffusion_max_members = 2)
}

/// A group created by `owner` with `members` joined, none of them synced.
fn group_with(server: &TestServer, owner: &User, members: &[&User]) -> GroupId {
    let group = server.login_unsynced(owner).group_create("crew").expect("create");
    for user in members {
        server.login_unsynced(user).group_join(group).expect("join");
    }
    group
}

#[test]
fn offline_members_removed_from_a_large_group_get_what_was_sent_while_they_were_members() {
    let server = large_group_server();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let group = group_with(&server, &alice, &[&bob, &carol, &dave]);
    let gconv = ConvId::Group { group };
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(group), &ids(1, 5), 5);
    // Bob is kicked, carol banned, dave leaves (from a session that never
    // syncs): all three were offline for messages 1..=5.
    a.group_kick(group, bob.id).expect("kick");
    a.group_ban(group, carol.id).expect("ban");
    server.login_unsynced(&dave).group_leave(group).expect("leave");
    send_pipelined(&mut a, To::Group(group), &ids(6, 3), 3);

    for user in [&bob, &carol, &dave] {
        let mut client = server.login_unsynced(user);
        let sync = raw_sync_all(&mut client, vec![], 5);
        assert_seqs(&sync.messages, gconv, 1..=5);
        assert_eq!(sync.sync_done, 5, "{}", user.name);
        // A client that holds them says so with its cursor: nothing more.
        drop(client);
        let mut client = server.login_unsynced(user);
        let sync = raw_sync_all(&mut client, vec![Cursor { conv: gconv, seq: 5 }], 0);
        assert!(sync.messages.is_empty(), "{}: {:?}", user.name, sync.messages);
    }
}

#[test]
fn leaving_and_joining_again_owes_each_membership_once_in_order() {
    let server = large_group_server();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let group = group_with(&server, &alice, &[&bob, &carol]);
    let gconv = ConvId::Group { group };
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(group), &ids(1, 3), 3);
    a.group_kick(group, bob.id).expect("kick");
    send_pipelined(&mut a, To::Group(group), &ids(4, 2), 2);
    // Bob joins again from a session that never syncs, leaves again (a
    // second departure of the same group), joins a third time.
    let mut b = server.login_unsynced(&bob);
    b.group_join(group).expect("join again");
    send_pipelined(&mut a, To::Group(group), &ids(6, 2), 2);
    b.group_leave(group).expect("leave");
    b.group_leave(group).expect("leaving twice changes nothing");
    send_pipelined(&mut a, To::Group(group), &ids(8, 1), 1);
    b.group_join(group).expect("join a third time");
    send_pipelined(&mut a, To::Group(group), &ids(9, 2), 2);
    drop(b);

    // 4, 5 and 8 came while he was out: never streamed.
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 7);
    assert_seqs(&sync.messages, gconv, [1, 2, 3, 6, 7, 9, 10]);
    drop(b);
    // Acknowledged by the cursor of what he holds: nothing again.
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![Cursor { conv: gconv, seq: 10 }], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages);
    drop(b);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages);
}

#[test]
fn a_departure_is_owed_until_acknowledged_and_survives_a_restart() {
    let mut server = large_group_server();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let group = group_with(&server, &alice, &[&bob, &carol]);
    let gconv = ConvId::Group { group };
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(group), &ids(1, 4), 4);
    // He had acknowledged 2 before he was banned.
    let mut b = server.login(&bob);
    let _ = raw_messages(&mut b, 4);
    b.receipt(gconv, tern_client::ReceiptKind::Delivered, 2)
        .expect("receipt");
    drop(b);
    a.group_ban(group, bob.id).expect("ban");
    drop(a);
    server.restart();

    // Streamed by every sync until acknowledged, not dropped by streaming.
    for _ in 0..2 {
        let mut b = server.login_unsynced(&bob);
        let sync = raw_sync_all(&mut b, vec![], 2);
        assert_seqs(&sync.messages, gconv, 3..=4);
    }
    // A cursor short of the end bounds the stream but does not settle it.
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![Cursor { conv: gconv, seq: 3 }], 1);
    assert_seqs(&sync.messages, gconv, [4]);
    drop(b);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 1);
    assert_seqs(&sync.messages, gconv, [4]);
    drop(b);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![Cursor { conv: gconv, seq: 4 }], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages);
    drop(b);
    let mut b = server.login_unsynced(&bob);
    assert!(raw_sync_all(&mut b, vec![], 0).messages.is_empty());
}

#[test]
fn a_deleted_group_owes_nothing_to_those_who_left_it() {
    let server = large_group_server();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let group = group_with(&server, &alice, &[&bob, &carol]);
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(group), &ids(1, 3), 3);
    a.group_kick(group, bob.id).expect("kick");
    a.group_delete(group).expect("delete");
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages);
}

#[test]
fn a_departure_from_a_group_deleted_and_purged_since_is_dropped_and_frees_its_place() {
    // Bob is kicked while offline, then the group is deleted and its purge
    // runs to the end before he comes back. What he was owed went with the
    // group; his catch-up must drop the record, or it would be kept
    // forever (nothing is streamed for him to acknowledge) and, with one
    // record allowed, take the place of his next departure.
    let server = TestServer::start_with(|c| {
        c.write_diffusion_max_members = 2;
        c.store.max_departures_per_user = 1;
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let deleted = group_with(&server, &alice, &[&bob, &carol]);
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(deleted), &ids(1, 3), 3);
    a.group_kick(deleted, bob.id).expect("kick");
    a.group_delete(deleted).expect("delete");
    let store = server.admin_context().store;
    crate::common::eventually("the purge to finish", || {
        store.pending_group_purges().is_empty().then_some(())
    });
    let mut b = server.login_unsynced(&bob);
    assert!(raw_sync_all(&mut b, vec![], 0).messages.is_empty());
    drop(b);
    assert_eq!(store.departures(bob.id).expect("read"), vec![]);

    // His place is free again: the next departure is recorded and owed.
    let next = group_with(&server, &alice, &[&bob, &carol]);
    send_pipelined(&mut a, To::Group(next), &ids(4, 2), 2);
    a.group_kick(next, bob.id).expect("kick");
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 2);
    assert_seqs(&sync.messages, ConvId::Group { group: next }, 1..=2);
}

#[test]
fn a_user_holds_at_most_max_departures_per_user() {
    let server = TestServer::start_with(|c| {
        c.write_diffusion_max_members = 2;
        c.store.max_departures_per_user = 1;
    });
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let first = group_with(&server, &alice, &[&bob, &carol]);
    let second = group_with(&server, &alice, &[&bob, &carol]);
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(first), &ids(1, 2), 2);
    send_pipelined(&mut a, To::Group(second), &ids(3, 2), 2);
    a.group_kick(first, bob.id).expect("kick");
    // Past the limit: the kick is done, the departure not recorded.
    a.group_kick(second, bob.id).expect("kick past the limit");
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 2);
    assert_seqs(&sync.messages, ConvId::Group { group: first }, 1..=2);
    assert_eq!(
        a.group_members(second).expect("members"),
        vec![alice.id, carol.id]
    );
}

#[test]
fn a_small_groups_former_member_gets_each_message_once() {
    // Write diffusion: the messages are in bob's inbox and in his
    // departure; the catch-up sends each once, in order.
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let group = group_with(&server, &alice, &[&bob]);
    let gconv = ConvId::Group { group };
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(group), &ids(1, 3), 3);
    a.group_kick(group, bob.id).expect("kick");
    send_pipelined(&mut a, To::Group(group), &ids(4, 1), 1);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 3);
    assert_seqs(&sync.messages, gconv, 1..=3);
    assert_eq!(sync.sync_done, 3);
}

#[test]
fn a_kick_during_a_burst_owes_exactly_what_reached_the_members_devices() {
    // Bob's live device gets every message fanned out to him before the
    // kick took effect, some of them still on their way to the disk when
    // it did; his other device, offline throughout, must get the same.
    let server = large_group_server();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let group = group_with(&server, &alice, &[&bob, &carol]);
    let gconv = ConvId::Group { group };
    let mut live = server.login(&bob);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let mut a = server.login_unsynced(&alice);
        let stop = stop.clone();
        thread::spawn(move || {
            let mut next = 1;
            while !stop.load(Ordering::Relaxed) && next < 20_000 {
                send_pipelined(&mut a, To::Group(group), &ids(next, 50), 50);
                next += 50;
            }
        })
    };
    // Kicked in the middle of the burst.
    let mut got = raw_messages(&mut live, 100);
    server
        .login_unsynced(&alice)
        .group_kick(group, bob.id)
        .expect("kick");
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    got.extend(raw_messages_until_quiet(&mut live, QUIET));
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_seqs(&got, gconv, 1..=seqs.len() as u64);
    let mut offline = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut offline, vec![], seqs.len());
    assert_seqs(&sync.messages, gconv, seqs);
}

#[test]
fn a_former_member_acknowledges_what_they_are_owed_with_a_receipt() {
    // Large group (history only) and small group (inbox entries too): a
    // client that acknowledges the messages its catch-up showed with a
    // `Receipt`, as it would a member's, is taken at its word up to the
    // end of what it is owed, and later catch-ups stream nothing.
    for large in [true, false] {
        let server = if large {
            large_group_server()
        } else {
            TestServer::start()
        };
        let alice = server.user_on_shard("alice", 0);
        let bob = server.user_on_shard("bob", 1);
        let carol = server.user_on_shard("carol", 0);
        let group = group_with(&server, &alice, &[&bob, &carol]);
        let other = group_with(&server, &alice, &[&carol]);
        let gconv = ConvId::Group { group };
        let mut a = server.login_unsynced(&alice);
        send_pipelined(&mut a, To::Group(group), &ids(1, 3), 3);
        a.group_kick(group, bob.id).expect("kick");
        send_pipelined(&mut a, To::Group(group), &ids(4, 2), 2);

        let mut b = server.login_unsynced(&bob);
        let sync = raw_sync_all(&mut b, vec![], 3);
        assert_seqs(&sync.messages, gconv, 1..=3);
        // Claiming more than was owed (5 were sent) is capped at 3.
        b.receipt(gconv, tern_client::ReceiptKind::Delivered, 5)
            .expect("a former member's receipt");
        // Acknowledged, but the range is dropped only by the next `Sync`:
        // until then a receipt for the group is still accepted.
        b.receipt(gconv, tern_client::ReceiptKind::Read, 3)
            .expect("the range is kept until the next Sync");
        // A group never joined stays refused.
        let refused = b
            .receipt(
                ConvId::Group { group: other },
                tern_client::ReceiptKind::Delivered,
                1,
            )
            .expect_err("not owed anything");
        assert_eq!(refused.code(), Some(tern_client::ErrorCode::Forbidden));
        drop(b);
        let mut b = server.login_unsynced(&bob);
        let sync = raw_sync_all(&mut b, vec![], 0);
        assert!(sync.messages.is_empty(), "large {large}: {:?}", sync.messages);
        // Settled: a receipt after the range is dropped is refused again.
        let refused = b
            .receipt(gconv, tern_client::ReceiptKind::Read, 1)
            .expect_err("nothing owed any more");
        assert_eq!(refused.code(), Some(tern_client::ErrorCode::Forbidden));
    }
}

/// Messages a backlog catch-up is held up by: enough ~1.9 KB frames that
/// the server's socket buffer (autotuned up to 4 MiB), the reader's 4 KiB
/// one and the 8 KiB outbound queue fill long before the end.
const STALL_BACKLOG: u64 = 3000;
/// How long a `Sync` is given to fill the buffers and stall.
const STALL_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// A server whose catch-ups a reader can hold up mid-stream: small
/// outbound queues, 1.9 KB messages, no fsync per send, small sync pages.
fn stalling_server(write_diffusion_max_members: usize) -> TestServer {
    stalling_server_with(write_diffusion_max_members, |_| {})
}

/// [`stalling_server`], then `tweak`.
fn stalling_server_with(
    write_diffusion_max_members: usize,
    tweak: impl FnOnce(&mut tern_engine::config::Config),
) -> TestServer {
    TestServer::start_with(|c| {
        common::stall_catch_ups(c);
        c.write_diffusion_max_members = write_diffusion_max_members;
        c.sync_page = 4;
        tweak(c);
    })
}

/// An open group of `owner` and `victim` holding `STALL_BACKLOG` ~1.9 KB
/// messages, and `victim`'s `Sync` on a connection that does not read:
/// the catch-up is stalled somewhere in the backlog when this returns.
fn stalled_catch_up(
    server: &TestServer,
    owner: &User,
    victim: &User,
) -> (GroupId, tern_client::Client, common::RawConn, u64) {
    let mut o = server.login_unsynced(owner);
    let group = common::group_on_shard(&mut o, 0, server.shards(), true);
    server.login_unsynced(victim).group_join(group).expect("join");
    common::send_stall_backlog(&mut o, group, STALL_BACKLOG);
    let (slow, sync_id) = common::stalled_sync(server, victim, Vec::new(), STALL_SETTLE);
    (group, o, slow, sync_id)
}

/// The seqs of `conv` the stalled connection gets, in wire order: its
/// catch-up to `SyncDone`, then live pushes until it falls quiet.
fn drain_seqs(slow: &mut common::RawConn, sync_id: u64, conv: ConvId) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut done = false;
    loop {
        let frame = match slow.read(if done { QUIET } else { TIMEOUT }) {
            common::RawRead::Frame(frame) => frame,
            common::RawRead::Timeout if done => return seqs,
            other => panic!("catch-up ended with {other:?} after {} messages", seqs.len()),
        };
        match frame.body {
            tern_client::ServerBody::Message(m) if m.conv == conv => seqs.push(m.seq),
            tern_client::ServerBody::SyncDone { .. } if frame.request_id == sync_id => done = true,
            _ => {}
        }
    }
}

#[test]
fn a_kick_during_a_large_groups_catch_up_still_owes_the_rest_of_the_membership() {
    // The catch-up of a read-diffused group checks membership with each
    // history page. It used to stop at the kick and then send the messages
    // held for the session meanwhile, so the client saw 1..k, then the
    // last few: a cursor at the last one then acknowledged the departure
    // record, and k+1.. were never sent. The rest of the membership now
    // comes from the departure record, in the same catch-up.
    let server = stalling_server(1);
    let owner = server.user_on_shard("owner", 0);
    let victim = server.user_on_shard("victim", 1);
    let (group, mut o, mut slow, sync_id) = stalled_catch_up(&server, &owner, &victim);
    let gconv = ConvId::Group { group };
    // Held for the syncing session: the victim is still a member.
    for n in 1..=5 {
        o.send_group_text(group, &format!("held {n}")).expect("send");
    }
    o.group_kick(group, victim.id).expect("kick");
    o.send_group_text(group, "after the kick").expect("send");
    let seqs = drain_seqs(&mut slow, sync_id, gconv);
    let want: Vec<u64> = (1..=STALL_BACKLOG + 5).collect();
    assert!(seqs == want, "got {} messages, {:?}", seqs.len(), gaps(&seqs));
    // Holding all of it, the client says so; nothing more is owed.
    drop(slow);
    let mut again = server.login_unsynced(&victim);
    let cursor = Cursor {
        conv: gconv,
        seq: STALL_BACKLOG + 5,
    };
    let sync = raw_sync_all(&mut again, vec![cursor], 0);
    assert!(sync.messages.is_empty(), "{:?}", sync.messages.len());
}

#[test]
fn a_kick_and_a_rejoin_during_a_catch_up_skip_what_was_sent_in_between() {
    // Between two memberships nothing is owed (protocol.md 2.8.8). A kick
    // and a rejoin between two pages of a catch-up passed the per-page
    // membership check (large group), or were not checked at all where the
    // inbox of a small group skips ahead and the gap is filled from the
    // history (small group, above the threshold for a while before).
    for large in [true, false] {
        let server = stalling_server(if large { 1 } else { 200 });
        let owner = server.user_on_shard("owner", 0);
        let victim = server.user_on_shard("victim", 1);
        let (group, mut o, mut slow, sync_id) = stalled_catch_up(&server, &owner, &victim);
        let gconv = ConvId::Group { group };
        o.group_kick(group, victim.id).expect("kick");
        for n in 1..=3 {
            o.send_group_text(group, &format!("between {n}")).expect("send");
        }
        server
            .login_unsynced(&victim)
            .group_join(group)
            .expect("joins again");
        let last = o.send_group_text(group, "after the rejoin").expect("send").seq;
        assert_eq!(last, STALL_BACKLOG + 4);
        let seqs = drain_seqs(&mut slow, sync_id, gconv);
        let want: Vec<u64> = (1..=STALL_BACKLOG).chain([last]).collect();
        assert!(
            seqs == want,
            "large {large}: got {} messages, {:?}",
            seqs.len(),
            gaps(&seqs)
        );
    }
}

/// Where `seqs` is not one run of consecutive numbers, for failure
/// messages: its first, each jump and its last.
#[test]
fn a_kick_after_a_hold_overflow_still_owes_what_the_overflow_dropped() {
    // A catch-up whose buffer of live messages overflows drops them and
    // scans again, reading the user's groups again. A large group the
    // user was kicked from meanwhile was missing from that list, so the
    // messages the overflow dropped were never sent, while later ones,
    // held in the fresh buffer, were: the client saw a gap, and a cursor
    // at its last message then acknowledged the departure record.
    const DIRECT_BACKLOG: u64 = 3000;
    let server = stalling_server_with(1, |c| c.sync_hold_max = 8);
    let owner = server.user_on_shard("owner", 0);
    let victim = server.user_on_shard("victim", 1);
    let mut o = server.login_unsynced(&owner);
    let kicked_from = common::group_on_shard(&mut o, 0, server.shards(), true);
    let stalls_in = common::group_on_shard(&mut o, 0, server.shards(), true);
    assert!(kicked_from < stalls_in, "the catch-up visits groups in id order");
    let mut v = server.login_unsynced(&victim);
    v.group_join(kicked_from).expect("join");
    v.group_join(stalls_in).expect("join");
    drop(v);
    for _ in 0..2 {
        o.send_group_text(kicked_from, "before").expect("send");
    }
    common::send_stall_backlog(&mut o, stalls_in, STALL_BACKLOG);
    let (mut slow, sync_id) = common::stalled_sync(&server, &victim, Vec::new(), STALL_SETTLE);
    // The first pass is done with `kicked_from` and stalled in `stalls_in`:
    // ten more messages overflow the buffer of eight, and a 1:1 backlog
    // (dropped from the buffer too) stalls the second pass's inbox scan.
    for _ in 0..10 {
        o.send_group_text(kicked_from, "overflowing").expect("send");
    }
    let body = "b".repeat(common::STALL_BODY_BYTES);
    for _ in 0..DIRECT_BACKLOG {
        o.send_text(victim.id, &body).expect("send");
    }
    let conv = ConvId::Group { group: kicked_from };
    let mut seqs = Vec::new();
    loop {
        let common::RawRead::Frame(frame) = slow.read(TIMEOUT) else {
            panic!("the catch-up stalled before the second pass");
        };
        match frame.body {
            tern_client::ServerBody::Message(m) if m.conv == conv => seqs.push(m.seq),
            tern_client::ServerBody::Message(m) if matches!(m.conv, ConvId::Direct { .. }) => break,
            _ => {}
        }
    }
    thread::sleep(std::time::Duration::from_millis(300));
    // Held in the fresh buffer (three of eight), then the kick.
    for _ in 0..3 {
        o.send_group_text(kicked_from, "held").expect("send");
    }
    o.group_kick(kicked_from, victim.id).expect("kick");
    o.send_group_text(kicked_from, "after the kick").expect("send");
    seqs.extend(drain_seqs(&mut slow, sync_id, conv));
    let want: Vec<u64> = (1..=15).collect();
    assert!(seqs == want, "got {seqs:?}, gaps {:?}", gaps(&seqs));
}

#[test]
fn a_rejoin_during_a_catch_up_does_not_stream_what_came_between() {
    // A catch-up reads each group's start (the stored cursor) once. A user
    // who left a group, presented a cursor acknowledging that membership
    // (which drops its departure record), and joined again from another
    // device during the catch-up got the messages sent while they were
    // out: a later pass found the new membership's first inbox entry and
    // filled the gap below it from the start read before the rejoin.
    let server = stalling_server_with(100, |c| c.sync_hold_max = 8);
    let owner = server.user_on_shard("owner", 0);
    let victim = server.user_on_shard("victim", 1);
    let mut o = server.login_unsynced(&owner);
    let left = common::group_on_shard(&mut o, 0, server.shards(), true);
    let stalls_in = common::group_on_shard(&mut o, 0, server.shards(), true);
    assert!(left < stalls_in, "inbox entries are in group id order");
    let mut other_device = server.login_unsynced(&victim);
    other_device.group_join(left).expect("join");
    other_device.group_join(stalls_in).expect("join");
    for _ in 0..10 {
        o.send_group_text(left, "member").expect("send");
    }
    other_device.group_leave(left).expect("leave");
    for _ in 0..5 {
        o.send_group_text(left, "between").expect("send");
    }
    common::send_stall_backlog(&mut o, stalls_in, STALL_BACKLOG);
    // This device holds 1..=10: its cursor acknowledges the membership.
    let conv = ConvId::Group { group: left };
    let cursors = vec![Cursor { conv, seq: 10 }];
    let (mut slow, sync_id) = common::stalled_sync(&server, &victim, cursors, STALL_SETTLE);
    // Stalled in `stalls_in`'s entries: the buffer of eight overflows,
    // the other device joins again, and message 16 is the new membership's.
    for _ in 0..10 {
        o.send_group_text(stalls_in, "overflowing").expect("send");
    }
    other_device.group_join(left).expect("join again");
    assert_eq!(o.send_group_text(left, "member again").expect("send").seq, 16);
    let seqs = drain_seqs(&mut slow, sync_id, conv);
    assert_eq!(seqs, vec![16], "gaps {:?}", gaps(&seqs));
}

fn gaps(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = seqs
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
        out.insert(0, (0, *first));
        out.push((*last, u64::MAX));
    }
    out
}

#[test]
fn a_receipt_at_or_past_an_earlier_membership_acknowledges_it() {
    // protocol.md 2.8.8: a range is kept until a `Sync` cursor or a
    // receipt at or past its end acknowledges it. A receipt used to settle
    // only the latest range of a user not in the group again, so a client
    // that acknowledges with receipts (and presents no cursors) got every
    // other range again on each `Sync`.
    let server = large_group_server();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);

    // Member again: kicked after 1..=3, back in.
    let group = group_with(&server, &alice, &[&bob, &carol]);
    let gconv = ConvId::Group { group };
    let mut a = server.login_unsynced(&alice);
    send_pipelined(&mut a, To::Group(group), &ids(1, 3), 3);
    a.group_kick(group, bob.id).expect("kick");
    server.login_unsynced(&bob).group_join(group).expect("join again");
    let mut b = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut b, vec![], 3).messages, gconv, 1..=3);
    b.receipt(gconv, tern_client::ReceiptKind::Delivered, 3)
        .expect("receipt");
    drop(b);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 0);
    assert!(sync.messages.is_empty(), "member again: {:?}", sync.messages);

    // Out again, with two ranges: kicked after 1..=3, back, left after 4..=5.
    let group = group_with(&server, &alice, &[&bob, &carol]);
    let gconv = ConvId::Group { group };
    send_pipelined(&mut a, To::Group(group), &ids(1, 3), 3);
    a.group_kick(group, bob.id).expect("kick");
    server.login_unsynced(&bob).group_join(group).expect("join again");
    send_pipelined(&mut a, To::Group(group), &ids(4, 2), 2);
    server.login_unsynced(&bob).group_leave(group).expect("leave");
    let mut b = server.login_unsynced(&bob);
    assert_seqs(&raw_sync_all(&mut b, vec![], 5).messages, gconv, 1..=5);
    b.receipt(gconv, tern_client::ReceiptKind::Delivered, 5)
        .expect("receipt");
    drop(b);
    let mut b = server.login_unsynced(&bob);
    let sync = raw_sync_all(&mut b, vec![], 0);
    assert!(sync.messages.is_empty(), "two ranges: {:?}", sync.messages);
}
