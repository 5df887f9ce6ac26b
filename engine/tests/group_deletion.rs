//! Deleting a group, over real sockets against an in-process server on a
//! real store: only the owner may; every member's session is told, after
//! the group's last message; from the `Ok` on the group is gone for every
//! request, for a member who was offline, and from the conversation list;
//! its data is purged in the background, and a purge a restart cut short
//! resumes when the server starts. Groups homed on each shard.

mod common;

use common::*;
use tern_client::{Client, ClientBody, ConvId, ErrorCode, GroupId, ServerBody};
use tern_storage::{Store, StoreOptions};

fn expect_deleted(client: &mut Client, group: GroupId, by: u64) {
    match expect_push(client) {
        ServerBody::GroupDeleted { group: g, by: b } => assert_eq!((g, b), (group, by)),
        other => panic!("expected GroupDeleted of {group}, got {other:?}"),
    }
}

#[test]
fn the_owner_deletes_a_group_members_are_told_last_and_it_is_gone_for_every_request() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login(&bob);
    for shard in 0..shards {
        let group = group_on_shard(&mut a, shard, shards, true);
        b.group_join(group).expect("bob joins");
        {
            let mut c = server.login(&carol);
            c.group_join(group).expect("carol joins");
        }
        // Carol is offline: her copies wait in her inbox.
        for n in 0..3 {
            a.send_group_text(group, &format!("last words {n}"))
                .expect("send");
        }
        assert_eq!(code_of(b.group_delete(group)), ErrorCode::Forbidden);

        a.group_delete(group).expect("delete");
        // Bob got the three messages, then the news, in that order.
        for n in 0..3 {
            assert_eq!(
                expect_message(&mut b).content.body,
                format!("last words {n}").as_bytes()
            );
        }
        expect_deleted(&mut b, group, alice.id);

        // Gone for every request, for members and owner alike.
        assert_eq!(code_of(b.send_group_text(group, "hello?")), ErrorCode::NotFound);
        assert_eq!(code_of(a.send_group_text(group, "hello?")), ErrorCode::NotFound);
        assert_eq!(code_of(b.group_info(group)), ErrorCode::NotFound);
        assert_eq!(code_of(b.group_join(group)), ErrorCode::NotFound);
        assert_eq!(code_of(a.group_delete(group)), ErrorCode::NotFound);
        assert_eq!(code_of(a.group_invite(group, carol.id)), ErrorCode::NotFound);
        let conv = ConvId::Group { group };
        assert_eq!(code_of(b.history(conv, 1, true, 10)), ErrorCode::Forbidden);
        let listed = b.conversations(0, 50).expect("conversations");
        assert!(listed.iter().all(|s| s.conv != conv), "{listed:?}");
        // Carol, offline throughout, catches up with nothing of it.
        let mut c = server.login_unsynced(&carol);
        assert_eq!(c.sync().expect("sync"), 0);
        expect_quiet(&mut [&mut b, &mut c]);
    }
    // Every purge finishes (the gauge says so too), and ids are never
    // handed out again.
    let store = server.admin_context().store;
    eventually("the purges to finish", || {
        store.pending_group_purges().is_empty().then_some(())
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    eventually("the purge gauge to read 0", || {
        (total(&admin, "tern_group_purges_running") == 0).then_some(())
    });
    let newest = a.group_create("after").expect("create");
    assert!(
        store.group(newest - 1).expect("read").is_none(),
        "deleted ids stay taken"
    );
    assert!(store.user_groups(carol.id).expect("read").is_empty());
}

#[test]
fn a_purge_cut_short_resumes_when_the_server_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group;
    {
        // A store as a server killed right after a deletion leaves it.
        let opts = StoreOptions {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("data"), opts).expect("open store");
        let owner = store.register("owner", PASSWORD.as_bytes()).expect("register");
        let member = store.register("member", PASSWORD.as_bytes()).expect("register");
        group = store.create_group(owner, "half gone").expect("create");
        store.add_member(group, member).expect("join");
        store.delete_group(group, owner).expect("delete");
        assert_eq!(store.pending_group_purges(), vec![group]);
    }
    let server = TestServer::start_in(dir, |_| {});
    let store = server.admin_context().store;
    eventually("the purge to resume and finish", || {
        store.pending_group_purges().is_empty().then_some(())
    });
    assert!(store.user_groups(2).expect("read").is_empty());
    assert!(store.group(group).expect("read").is_none());
    let mut member = server.connect();
    member.login("member", PASSWORD).expect("login");
    assert_eq!(code_of(member.group_info(group)), ErrorCode::NotFound);
}

/// A member catching up (`Sync`) while the owner deletes the group gets
/// the group's messages the catch-up finds, then `GroupDeleted`, and none
/// of its messages after it, whichever moment the deletion lands at.
#[test]
fn a_member_catching_up_during_the_deletion_gets_the_notice_last() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login_unsynced(&alice);
    for round in 0..4 {
        let group = group_on_shard(&mut a, round % shards, shards, true);
        server.login(&bob).group_join(group).expect("join");
        // Bob is offline: a backlog for his catch-up to stream.
        for n in 0..150 {
            a.send_group_text(group, &format!("backlog {n}")).expect("send");
        }
        let mut raw = RawConn::connect(server.addr());
        raw.login(&bob);
        let sync = raw.send(ClientBody::Sync { cursors: Vec::new() });
        let deleter = std::thread::spawn(move || {
            a.group_delete(group).expect("delete");
            a
        });
        let conv = ConvId::Group { group };
        let (mut notice, mut done, mut messages) = (false, false, 0);
        while !(notice && done) {
            let frame = raw.expect_frame();
            match frame.body {
                ServerBody::Message(m) if m.conv == conv => {
                    assert!(!notice, "round {round}: message {} after GroupDeleted", m.seq);
                    messages += 1;
                }
                ServerBody::GroupDeleted { group: g, by } if g == group => {
                    assert!(!notice, "round {round}: GroupDeleted twice");
                    assert_eq!(by, alice.id);
                    notice = true;
                }
                ServerBody::SyncDone { .. } if frame.request_id == sync => done = true,
                _ => {}
            }
        }
        assert!(messages <= 150, "round {round}: {messages} messages");
        a = deleter.join().expect("deleter");
        match raw.read(QUIET) {
            RawRead::Timeout => {}
            other => panic!("round {round}: after the notice and SyncDone: {other:?}"),
        }
    }
}
