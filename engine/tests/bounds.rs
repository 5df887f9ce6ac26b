//! Bounds on what clients can make the server keep, over real sockets and
//! a real store: state that one client's requests could otherwise grow
//! with the number of users or groups on the server rather than with the
//! client's own conversations, and the limits and errors that stop it.

mod common;

use common::{code_of, eventually, TestServer, PASSWORD};
use tern_client::{ConvId, ErrorCode};

/// A `Sync` cursor is a delivered receipt, stored per conversation. One
/// for a 1:1 with a user the caller never exchanged a message with, or
/// for a group they never belonged to, can match no message: storing it
/// would let a client write a receipt row for every user and group on the
/// server (4,096 per `Sync`, `Sync` after `Sync`), rows that nothing ever
/// removes. Only conversations that hold, or held, messages for the user
/// get their cursor stored; the others still bound the catch-up.
#[test]
fn sync_cursors_are_stored_only_for_the_callers_conversations() {
    const STRANGERS: usize = 40;
    let server = TestServer::start();
    let store = server.admin_context().store;
    let mut anon = server.connect();
    let alice = anon.register("alice", PASSWORD).expect("register");
    let bob = anon.register("bob", PASSWORD).expect("register");
    let carol = anon.register("carol", PASSWORD).expect("register");
    let strangers: Vec<u64> = (0..STRANGERS)
        .map(|n| {
            anon.register(&format!("stranger{n}"), PASSWORD)
                .expect("register")
        })
        .collect();

    let mut b = server.connect();
    b.login_unsynced("bob", PASSWORD).expect("login");
    b.send_text(alice, "hello alice").expect("send");
    let mut c = server.connect();
    c.login_unsynced("carol", PASSWORD).expect("login");
    // A group alice never joins, one she is in, and one she left after a
    // message reached her inbox.
    let never = c.group_create("never").expect("create");
    let member = c.group_create("member").expect("create");
    let left = c.group_create("left").expect("create");

    let mut a = server.connect();
    a.login_unsynced("alice", PASSWORD).expect("login");
    a.group_join(member).expect("join");
    // Cursors are capped at the last stored seq: give the group three.
    for _ in 0..3 {
        c.send_group_text(member, "hello members").expect("send");
    }
    a.group_join(left).expect("join");
    c.send_group_text(left, "before you go").expect("send");
    a.group_leave(left).expect("leave");

    let with_bob = ConvId::direct(alice, bob);
    for &stranger in &strangers {
        a.set_cursor(ConvId::direct(alice, stranger), 7);
    }
    a.set_cursor(ConvId::direct(alice, carol), 7);
    a.set_cursor(ConvId::Group { group: never }, 9);
    a.set_cursor(ConvId::Group { group: member }, 3);
    a.set_cursor(ConvId::Group { group: left }, 1);
    a.set_cursor(with_bob, 1);
    a.sync().expect("sync");

    // The cursors of alice's own conversations are stored...
    let receipts = |conv: ConvId| store.receipts(alice, conv).expect("read receipts");
    eventually("alice's 1:1 cursor to be stored", || {
        (receipts(with_bob).0 == 1).then_some(())
    });
    assert_eq!(receipts(ConvId::Group { group: member }).0, 3);
    assert_eq!(receipts(ConvId::Group { group: left }).0, 1);
    // ... and none of the others (they were staged in the same batch).
    let stored_for_strangers = strangers
        .iter()
        .filter(|&&s| receipts(ConvId::direct(alice, s)) != (0, 0))
        .count();
    assert_eq!(
        stored_for_strangers, 0,
        "a Sync stored cursors for {stored_for_strangers} of {STRANGERS} 1:1 conversations without a message"
    );
    assert_eq!(receipts(ConvId::direct(alice, carol)), (0, 0));
    assert_eq!(receipts(ConvId::Group { group: never }), (0, 0));
    // Not refused either: the Sync answered, and alice's real
    // conversations work as before.
    assert_eq!(
        code_of(a.history(ConvId::Group { group: never }, 1, true, 10)),
        ErrorCode::Forbidden
    );
}

/// Pending invites are bounded per group (`max_group_invites`), but a
/// user could be invited by any number of groups, and nothing but a join
/// or the inviting group's owner or admins removed one: anyone able to
/// create groups (each user up to `max_groups_per_user`, and users are
/// cheap) could pile invites on a user without end, each a pair of keys
/// that `MyInvitesPage` pages through. A user now holds at most
/// `max_invites_per_user`; past it `GroupInvite` is `LimitExceeded`,
/// and the user can make room by declining (`GroupUninvite` naming
/// themself, which needs no membership).
#[test]
fn a_user_holds_at_most_max_invites_per_user_and_can_decline_them() {
    const LIMIT: usize = 3;
    let server = TestServer::start_with(|c| c.store.max_invites_per_user = LIMIT);
    let mut anon = server.connect();
    anon.register("inviter", PASSWORD).expect("register");
    let invitee = anon.register("invitee", PASSWORD).expect("register");
    let other = anon.register("other", PASSWORD).expect("register");
    let mut inviter = server.connect();
    inviter.login_unsynced("inviter", PASSWORD).expect("login");
    let groups: Vec<u64> = (0..=LIMIT)
        .map(|n| {
            inviter
                .group_create_with(&format!("invite-only {n}"), false)
                .expect("create")
        })
        .collect();
    for &group in &groups[..LIMIT] {
        inviter
            .group_invite(group, invitee)
            .expect("invite within the limit");
    }
    assert_eq!(
        code_of(inviter.group_invite(groups[LIMIT], invitee)),
        ErrorCode::LimitExceeded,
        "one invite past max_invites_per_user"
    );
    // Inviting again is still Ok (nothing new), and other users are not
    // affected by this one's full list.
    inviter.group_invite(groups[0], invitee).expect("invite again");
    inviter
        .group_invite(groups[LIMIT], other)
        .expect("another user's invite");

    let mut i = server.connect();
    i.login_unsynced("invitee", PASSWORD).expect("login");
    let (listed, more) = i.my_invites_page(0, 100).expect("my invites");
    assert_eq!((listed.as_slice(), more), (&groups[..LIMIT], false));
    // Declining makes room, and withdraws the invite: joining with it is
    // no longer possible.
    i.group_uninvite(groups[0], invitee).expect("decline an invite");
    i.group_uninvite(groups[0], invitee)
        .expect("declining again is Ok");
    assert_eq!(code_of(i.group_join(groups[0])), ErrorCode::Forbidden);
    let (listed, _) = i.my_invites_page(0, 100).expect("my invites");
    assert_eq!(listed, &groups[1..LIMIT]);
    inviter.group_invite(groups[LIMIT], invitee).expect("room again");
    // Declining is only for one's own invites: another user's stays.
    assert_eq!(
        code_of(i.group_uninvite(groups[LIMIT], other)),
        ErrorCode::Forbidden
    );
    // A join uses its invite up too.
    i.group_join(groups[1]).expect("join with the invite");
    let (listed, _) = i.my_invites_page(0, 100).expect("my invites");
    assert_eq!(listed, vec![groups[2], groups[LIMIT]]);
}

/// While a shard's commit is on its way to disk, the messages that arrive
/// are sequenced and staged for the next one. Staging is bounded by
/// `max_staged_writes`: past it a message waits (its connection stops
/// being read), so a slow disk pushes back on senders instead of growing
/// the shard's memory without end, and nothing is lost or reordered by
/// the wait. Here the bound is 4 against 32 senders.
#[test]
fn staged_writes_stay_within_max_staged_writes_and_every_message_arrives() {
    const SENDERS: usize = 32;
    const MESSAGES: usize = 25;
    const MAX_STAGED: usize = 4;
    let server = TestServer::start_with(|config| config.max_staged_writes = MAX_STAGED);
    let mut anon = server.connect();
    let pairs: Vec<(String, u64)> = (0..SENDERS)
        .map(|n| {
            anon.register(&format!("sender{n}"), PASSWORD).expect("register");
            let name = format!("receiver{n}");
            let id = anon.register(&name, PASSWORD).expect("register");
            (name, id)
        })
        .collect();
    std::thread::scope(|scope| {
        for (n, (_, to)) in pairs.iter().enumerate() {
            let server = &server;
            scope.spawn(move || {
                let mut client = server.connect();
                client
                    .login_unsynced(&format!("sender{n}"), PASSWORD)
                    .expect("login");
                for m in 0..MESSAGES {
                    let sent = client.send_text(*to, &format!("{n}:{m}")).expect("send");
                    assert_eq!(sent.seq, m as u64 + 1, "sender{n}");
                }
            });
        }
    });
    for (n, (name, _)) in pairs.iter().enumerate() {
        let mut client = server.connect();
        client.login(name, PASSWORD).expect("login");
        for m in 0..MESSAGES {
            let msg = common::expect_message(&mut client);
            assert_eq!(msg.seq, m as u64 + 1, "{name}");
            assert_eq!(msg.content.body, format!("{n}:{m}").into_bytes(), "{name}");
        }
    }
    let metrics = server.admin_context().metrics;
    let (mut high_water, mut waits) = (0, 0);
    for shard in 0..server.shards() {
        let m = metrics.shard(shard);
        high_water = high_water.max(m.staged_high_water.load(std::sync::atomic::Ordering::Relaxed));
        waits += m.staged_waits.load(std::sync::atomic::Ordering::Relaxed);
    }
    assert!(
        high_water as usize <= MAX_STAGED,
        "a commit took {high_water} staged writes, above max_staged_writes {MAX_STAGED}"
    );
    assert!(waits > 0, "no message ever waited: the bound was not exercised");
}

#[test]
fn a_media_message_at_the_content_limit_is_delivered_listed_and_paged() {
    // A media message's URL and MIME type travel beside its body. Only
    // the body was held to a limit, so at the smallest frame limit the
    // config allows, a 430-byte URL with a full body was acknowledged,
    // stored as an empty frame it could not encode and never delivered;
    // a smaller one was delivered but made every page listing it too
    // large to send. Now body, URL and MIME type together are held to
    // the frame limit less the server's envelope.
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 2048;
        c.max_message_bytes = 1536;
    });
    let mut pair = common::Pair::new(&server, "m");
    let media = |url: usize, body: usize| tern_client::Content {
        kind: tern_client::ContentKind::Media {
            url: "u".repeat(url),
            mime: "image/png".into(),
            size: 1,
        },
        body: vec![b'x'; body],
    };
    let to = pair.b_user.id;
    assert_eq!(
        code_of(pair.a.send_direct(to, 1, media(430, 1536))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(pair.a.send_direct(to, 2, media(300, 1536 - 9 - 299))),
        ErrorCode::InvalidArgument
    );
    // Exactly at the limit: 300 + 9 + 1227 = 1536 bytes of content.
    let sent = pair
        .a
        .send_direct(to, 3, media(300, 1536 - 9 - 300))
        .expect("at the limit");
    let got = common::expect_message(&mut pair.b);
    assert_eq!((got.seq, got.content.body.len()), (sent.seq, 1227));
    let conv = ConvId::direct(pair.a_user.id, to);
    for client in [&mut pair.a, &mut pair.b] {
        let page = client.history(conv, u64::MAX, false, 10).expect("history");
        assert_eq!(page.len(), 1);
        let listed = client.conversations(0, 10).expect("conversations");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_seq, sent.seq);
    }
}

/// A client receives frames as large as the server announced, not only as
/// large as its own default. The reference client kept its receive limit
/// at `ClientOptions::max_frame_bytes` (64 KiB) even when the server's
/// `HelloOk` announced more, so on a server configured for large messages
/// the first one over 64 KiB closed every recipient's connection as a
/// protocol error, and closed it again at every login's catch-up: the
/// recipient could never get past it.
#[test]
fn a_client_accepts_frames_up_to_the_limit_the_server_announced() {
    const BODY: usize = 150 * 1024;
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 256 * 1024;
        c.max_message_bytes = 200 * 1024;
    });
    let mut pair = common::Pair::new(&server, "big");
    assert!(common::opts().max_frame_bytes < BODY as u32);
    assert_eq!(pair.b.server_max_frame_bytes(), 256 * 1024);
    let to = pair.b_user.id;
    let body = vec![b'y'; BODY];
    let sent = pair
        .a
        .send_direct(to, 1, tern_client::Content::text(body.clone()))
        .expect("send");
    let got = common::expect_message(&mut pair.b);
    assert_eq!((got.seq, got.content.body.len()), (sent.seq, BODY));
    let conv = ConvId::direct(pair.a_user.id, to);
    let page = pair.b.history(conv, u64::MAX, false, 10).expect("history");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].content.body, body);
}
