//! Deleting an account, over real sockets against an in-process server
//! on a real store: the user proves the password (a wrong one deletes
//! nothing), every session on every device is closed with
//! `AccountDeleted`, and from the `Ok` on no login reaches the account,
//! messages and requests to it are `NotFound` and it is gone from its
//! friends' lists; its friendships, requests, blocks, invites and group
//! memberships are purged (a group it owned passes on, one it was alone
//! in is deleted), the other party's history stays, a purge a restart
//! cut short resumes, and the operator's `delete-user` does the same.

mod common;

use std::time::Duration;

use common::*;
use tern_client::{ClientBody, ConvId, ErrorCode, GroupRole, ReceiptKind, ServerBody, ServerFrame};
use tern_engine::admin::admin_request;
use tern_storage::{Store, StoreOptions};

/// Reads pushes up to the `Disconnect`, which must say `AccountDeleted`.
fn expect_account_deleted(client: &mut tern_client::Client) {
    loop {
        if let ServerBody::Disconnect { code, .. } = expect_push(client) {
            assert_eq!(code, ErrorCode::AccountDeleted);
            return;
        }
    }
}

/// A server that meters loopback clients too, as it meters everyone.
fn metered() -> TestServer {
    TestServer::start_with(|config| {
        config.limits.limits_exempt.clear();
        config.limits.registration_rate_per_ip_per_hour = 0;
    })
}

fn purged(server: &TestServer) -> Store {
    let store = server.admin_context().store;
    eventually("the account purge to finish", || {
        store.pending_user_purges().is_empty().then_some(())
    });
    store
}

#[test]
fn deleting_closes_every_device_and_nothing_logs_in_again() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let alice = server.user_on_shard(&format!("alice{shard}x"), shard);
        let mut phone = server.connect();
        let token = phone.login(&alice.name, PASSWORD).expect("login").token;
        let mut laptop = server.login(&alice);

        phone.delete_account(PASSWORD).expect("delete");
        expect_account_deleted(&mut phone);
        expect_account_deleted(&mut laptop);

        let mut c = server.connect();
        assert_eq!(code_of(c.login(&alice.name, PASSWORD)), ErrorCode::AuthFailed);
        assert_eq!(code_of(c.login_token(&token)), ErrorCode::AuthFailed);
        let bob = server.user_on_shard(&format!("bob{shard}x"), 0);
        let mut b = server.login(&bob);
        assert_eq!(code_of(b.resolve_user(&alice.name)), ErrorCode::NotFound);
        // The name is free again; the new account is someone else.
        let again = c
            .register(&alice.name, PASSWORD)
            .expect("register the freed name");
        assert_ne!(again, alice.id);
        assert!(b.friends().expect("friends").is_empty());
    }
    let store = purged(&server);
    assert_eq!(store.deleted_count(), server.shards() as u64);
}

#[test]
fn a_wrong_password_deletes_nothing() {
    let server = metered();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    befriend(&mut a, &alice, &mut b, &bob);
    assert_eq!(
        code_of(a.delete_account("not the password")),
        ErrorCode::AuthFailed
    );
    // A second try at once waits, as a password change does.
    assert_eq!(code_of(a.delete_account(PASSWORD)), ErrorCode::RateLimited);
    // Nothing changed.
    b.send_text(alice.id, "still there?").expect("send");
    assert_eq!(expect_message(&mut a).content.body, b"still there?");
    assert_eq!(b.friends().expect("friends").len(), 1);
    server.connect().login(&alice.name, PASSWORD).expect("login");
    assert!(server.admin_context().store.pending_user_purges().is_empty());
}

#[test]
fn friends_requests_blocks_and_messages_are_gone_but_the_peer_keeps_the_history() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let erin = server.user_on_shard("erin", 0);
    let frank = server.user_on_shard("frank", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    befriend(&mut a, &alice, &mut b, &bob);
    let mut c = server.login_unsynced(&carol);
    c.friend_add(&alice.name).expect("carol asks alice");
    a.friend_add(&dave.name).expect("alice asks dave");
    a.block_user(erin.id).expect("alice blocks erin");
    let mut f = server.login_unsynced(&frank);
    f.block_user(alice.id).expect("frank blocks alice");
    let conv = ConvId::direct(alice.id, bob.id);
    for n in 0..5 {
        a.send_text(bob.id, &format!("from alice {n}")).expect("send");
        b.send_text(alice.id, &format!("from bob {n}")).expect("send");
    }

    a.delete_account(PASSWORD).expect("delete");
    // Bob, her friend, sees her go offline, as when any session ends.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut offline = false;
    while !offline && std::time::Instant::now() < deadline {
        match next_raw_push(&mut b, Duration::from_millis(100)) {
            Some(ServerBody::Presence { user, online: false }) if user == alice.id => offline = true,
            _ => {}
        }
    }
    assert!(offline, "bob was not told alice went offline");

    // From the Ok on: gone from lists, unreachable.
    assert!(b.friends().expect("friends").is_empty());
    assert!(c.friend_requests_all(false).expect("requests").is_empty());
    let mut d = server.login_unsynced(&dave);
    assert!(d.friend_requests_all(true).expect("requests").is_empty());
    assert_eq!(f.blocks_page(0, 10).expect("blocks"), (vec![], false));
    assert_eq!(code_of(b.send_text(alice.id, "hello?")), ErrorCode::NotFound);
    assert_eq!(code_of(b.typing(conv)), ErrorCode::NotFound);
    assert_eq!(code_of(b.block_user(alice.id)), ErrorCode::NotFound);
    assert_eq!(code_of(c.friend_add(&alice.name)), ErrorCode::NotFound);
    let mut e = server.login_unsynced(&erin);
    e.friend_add(&bob.name)
        .expect("erin is not blocked by anyone any more");

    // Bob keeps the conversation: it is listed, and its history pages.
    let listed = b.conversations(0, 10).expect("conversations");
    assert!(listed.iter().any(|s| s.conv == conv), "{listed:?}");
    let first = b.history(conv, 1, true, 4).expect("history");
    let rest = b.history(conv, 5, true, 100).expect("history");
    assert_eq!(first.len() + rest.len(), 10);
    assert_eq!(first[0].from, alice.id);
    assert_eq!(b.history(conv, u64::MAX, false, 3).expect("history").len(), 3);
    // A new device of bob's syncs without a hitch.
    let mut b2 = server.connect();
    b2.login(&bob.name, PASSWORD).expect("bob's second device syncs");

    let store = purged(&server);
    assert!(!store.blocks_between(alice.id, erin.id).expect("read").any());
    assert!(!store.blocks_between(frank.id, alice.id).expect("read").any());
    assert!(store.direct_conversations(alice.id, 10).expect("read").is_empty());
    assert_eq!(store.direct_conversations(bob.id, 10).expect("read"), vec![conv]);
    // And still, after the purge.
    assert_eq!(b.history(conv, 1, true, 100).expect("history").len(), 10);
}

#[test]
fn groups_pass_on_to_an_admin_or_member_and_a_group_left_empty_is_deleted() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login_unsynced(&bob);
    let mut c = server.login_unsynced(&carol);
    // Alice owns `staffed` (bob a member, carol an admin), `members` (bob
    // only) and `lonely`; she is a member of bob's `bobs`, and invited to
    // bob's invite-only `closed`.
    let staffed = group_on_shard(&mut a, 0, shards, true);
    let members = group_on_shard(&mut a, 1 % shards, shards, true);
    let lonely = group_on_shard(&mut a, 1 % shards, shards, true);
    let bobs = group_on_shard(&mut b, 0, shards, true);
    let closed = b.group_create_with("closed", false).expect("create");
    for group in [staffed, members] {
        b.group_join(group).expect("bob joins");
    }
    c.group_join(staffed).expect("carol joins");
    a.group_set_role(staffed, carol.id, GroupRole::Admin)
        .expect("carol is an admin");
    a.group_join(bobs).expect("alice joins");
    b.group_invite(closed, alice.id).expect("invite alice");
    a.send_group_text(staffed, "bye all").expect("send");

    a.delete_account(PASSWORD).expect("delete");
    let store = purged(&server);

    let info = c.group_info(staffed).expect("info");
    assert_eq!(
        info.members.iter().map(|m| (m.user, m.role)).collect::<Vec<_>>(),
        vec![(bob.id, GroupRole::Member), (carol.id, GroupRole::Owner)]
    );
    assert_eq!(store.group(staffed).expect("read").expect("kept").owner, carol.id);
    let info = b.group_info(members).expect("info");
    assert_eq!(info.members.len(), 1);
    assert_eq!(info.members[0].role, GroupRole::Owner);
    assert_eq!(info.members[0].user, bob.id);
    assert!(
        store.group(lonely).expect("read").is_none(),
        "deleted: nobody was left"
    );
    assert_eq!(b.group_members(bobs).expect("members"), vec![bob.id]);
    assert_eq!(
        b.group_invites_page(closed, 0, 10).expect("invites"),
        (vec![], false)
    );
    assert!(store.user_groups(alice.id).expect("read").is_empty());
    // The group's history keeps what she said.
    let said = c
        .history(ConvId::Group { group: staffed }, 1, true, 10)
        .expect("history");
    assert_eq!(said.len(), 1);
    assert_eq!(said[0].from, alice.id);
    // The new owner runs the group.
    c.group_kick(staffed, bob.id).expect("the new owner kicks");
    eventually("the lonely group's purge to finish", || {
        store.pending_group_purges().is_empty().then_some(())
    });
}

#[test]
fn a_purge_cut_short_resumes_when_the_server_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, bob, group);
    {
        // A store as a server killed in the middle of a purge leaves it:
        // the account deleted, one step done, the groups not yet left.
        let opts = StoreOptions {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("data"), opts).expect("open store");
        alice = store.register("alice", PASSWORD.as_bytes()).expect("register");
        bob = store.register("bob", PASSWORD.as_bytes()).expect("register");
        store.add_friend(alice, bob).expect("ask");
        store.add_friend(bob, alice).expect("accept");
        group = store.create_group(alice, "hers").expect("create");
        store.add_member(group, bob).expect("join");
        store.delete_account(alice).expect("delete");
        assert!(!store.purge_user_step(alice, 1).expect("step"));
        store.persist().expect("persist");
    }
    let server = TestServer::start_in(dir, |_| {});
    let store = purged(&server);
    assert_eq!(store.group(group).expect("read").expect("kept").owner, bob);
    assert_eq!(store.members(group).expect("read"), vec![bob]);
    assert!(store.user_groups(alice).expect("read").is_empty());
    let mut b = server.connect();
    b.login("bob", PASSWORD).expect("login");
    assert!(b.friends().expect("friends").is_empty());
    assert_eq!(
        code_of(server.connect().login("alice", PASSWORD)),
        ErrorCode::AuthFailed
    );
}

#[test]
fn a_deleted_member_never_inherits_a_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, bob, carol, staffed, theirs);
    {
        // Carol, an admin of alice's `staffed` (bob a member) and the only
        // other member of alice's `theirs`, is deleted and her store purge
        // is done, but her memberships are kept: as if her own purge had
        // not yet reached these groups when alice's hands them on.
        let opts = StoreOptions {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("data"), opts).expect("open store");
        alice = store.register("alice", PASSWORD.as_bytes()).expect("register");
        bob = store.register("bob", PASSWORD.as_bytes()).expect("register");
        carol = store.register("carol", PASSWORD.as_bytes()).expect("register");
        staffed = store.create_group(alice, "staffed").expect("create");
        theirs = store.create_group(alice, "theirs").expect("create");
        store.add_member(staffed, carol).expect("join");
        store.add_member(staffed, bob).expect("join");
        store
            .set_member_role(staffed, carol, GroupRole::Admin)
            .expect("admin");
        store.add_member(theirs, carol).expect("join");
        store.delete_account(carol).expect("delete");
        while !store.purge_user_step(carol, 1024).expect("step") {}
        store.persist().expect("persist");
    }
    let server = TestServer::start_in(dir, |_| {});
    let mut a = server.connect();
    a.login("alice", PASSWORD).expect("login");
    a.delete_account(PASSWORD).expect("delete");
    let store = purged(&server);

    // Bob, the only live member, inherits `staffed` though carol was
    // its admin.
    assert_eq!(store.group(staffed).expect("read").expect("kept").owner, bob);
    assert_eq!(
        store.member_role(staffed, bob).expect("read"),
        Some(GroupRole::Owner)
    );
    assert!(store.groups_to_leave(alice).expect("read").is_empty());
    // Nobody live was left in `theirs`: it is deleted, carol's
    // membership with it.
    assert!(store.group(theirs).expect("read").is_none(), "deleted");
    eventually("the group's purge to finish", || {
        store.pending_group_purges().is_empty().then_some(())
    });
    // Carol was still in `staffed` all along (nothing here departs her):
    // she was passed over, not found gone.
    assert_eq!(store.user_groups(carol).expect("read"), vec![staffed]);
}

#[test]
fn the_operator_deletes_an_account_with_delete_user() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("alice", 1 % server.shards());
    let bob = server.user_on_shard("bob", 0);
    let mut a1 = server.login(&alice);
    let mut a2 = server.login(&alice);
    let mut b = server.login(&bob);
    befriend(&mut a1, &alice, &mut b, &bob);

    let answer = admin_request(admin.path(), &format!("delete-user {}", alice.name)).expect("delete-user");
    assert!(
        answer.starts_with(&format!(
            "deleted {} (id {}): closed 2 sessions",
            alice.name, alice.id
        )),
        "{answer}"
    );
    expect_account_deleted(&mut a1);
    expect_account_deleted(&mut a2);
    assert_eq!(
        code_of(server.connect().login(&alice.name, PASSWORD)),
        ErrorCode::AuthFailed
    );
    assert_eq!(code_of(b.send_text(alice.id, "hi")), ErrorCode::NotFound);
    assert!(b.friends().expect("friends").is_empty());
    // Twice: the name is unknown now.
    let again = admin_request(admin.path(), &format!("delete-user {}", alice.name)).expect("answer");
    assert!(again.contains("no user named"), "{again}");
    purged(&server);
}

/// Two devices asking at once: one deletes, the other is refused (the
/// account-change clock) or closed; both end with `AccountDeleted`, and
/// the account is deleted once.
#[test]
fn two_devices_deleting_at_once_delete_once() {
    let server = metered();
    let alice = server.user_on_shard("alice", 0);
    let mut one = RawConn::connect(server.addr());
    one.login(&alice);
    let mut two = RawConn::connect(server.addr());
    two.login(&alice);
    let delete = ClientBody::AccountDelete {
        password: PASSWORD.as_bytes().to_vec(),
    };
    let first = one.send(delete.clone());
    let second = two.send(delete);
    let mut oks = 0;
    for (conn, request) in [(&mut one, first), (&mut two, second)] {
        let frames: Vec<ServerFrame> = conn.expect_closed();
        for frame in &frames {
            match &frame.body {
                ServerBody::Ok if frame.request_id == request => oks += 1,
                ServerBody::Error { code, .. } if frame.request_id == request => {
                    assert_eq!(*code, ErrorCode::RateLimited, "{frames:?}");
                }
                _ => {}
            }
        }
        match frames.last().map(|f| &f.body) {
            Some(ServerBody::Disconnect { code, .. }) => assert_eq!(*code, ErrorCode::AccountDeleted),
            other => panic!("expected the connection to end with AccountDeleted, got {other:?}"),
        }
    }
    assert_eq!(oks, 1);
    let store = purged(&server);
    assert_eq!(store.deleted_count(), 1);
}

/// An account made by a JWT login has no password for its user to prove:
/// `Forbidden`, and nothing is deleted. The operator can delete it; a
/// later JWT for the name is then a new, empty account.
#[test]
fn a_jwt_account_is_deleted_by_the_operator_not_by_its_user() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use std::sync::Arc;
    use tern_engine::jwt::{JwtSettings, JwtVerifier};
    use tern_storage::ExternalPolicy;

    const SECRET: &[u8] = b"a test secret of at least thirty-two bytes";
    let settings = JwtSettings {
        hs256_secret: Some(SECRET.to_vec()),
        ed25519_public_key_pem: None,
        rs256_public_key_pem: None,
        es256_public_key_pem: None,
        jwks_file: None,
        issuer: None,
        audience: None,
        leeway_secs: 0,
        policy: ExternalPolicy {
            create_accounts: true,
            password_accounts: false,
        },
    };
    let verifier = Arc::new(JwtVerifier::new(&settings).expect("jwt settings"));
    let server = TestServer::start_with(move |config| config.jwt = Some(verifier));
    let jwt = |sub: &str| {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + 300});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("sign")
    };
    let mut sso = server.connect();
    let user = sso.login_jwt(&jwt("sso_user")).expect("jwt login").user;
    for password in ["", PASSWORD] {
        assert_eq!(code_of(sso.delete_account(password)), ErrorCode::Forbidden);
    }
    sso.ping().expect("still logged in");

    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let answer = admin_request(admin.path(), "delete-user sso_user").expect("delete-user");
    assert!(answer.starts_with("deleted sso_user"), "{answer}");
    expect_account_deleted(&mut sso);
    purged(&server);
    let again = server
        .connect()
        .login_jwt(&jwt("sso_user"))
        .expect("a new account")
        .user;
    assert_ne!(again, user);
}

/// A large (read-diffused) group keeps what a leaving member is owed in a
/// departure record keyed by the member; the departures made for a
/// deleted account (and any it had from before) go with its purge. The
/// group's members and count stay right, and its traffic goes on.
#[test]
fn a_large_group_s_departure_records_of_the_account_are_purged() {
    let server = TestServer::start_with(|c| c.write_diffusion_max_members = 2);
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1 % shards);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login_unsynced(&bob);
    let mut c = server.login_unsynced(&carol);
    let large = group_on_shard(&mut b, 1 % shards, shards, true);
    let left = group_on_shard(&mut b, 0, shards, true);
    for group in [large, left] {
        a.group_join(group).expect("alice joins");
        c.group_join(group).expect("carol joins");
    }
    b.send_group_text(large, "before").expect("send");
    b.send_group_text(left, "before").expect("send");
    a.group_leave(left).expect("alice leaves one group herself");
    let store = server.admin_context().store;
    assert_eq!(store.departures(alice.id).expect("read").len(), 1);

    a.delete_account(PASSWORD).expect("delete");
    let store = purged(&server);
    assert!(
        store.departures(alice.id).expect("read").is_empty(),
        "no departure record of the deleted account is left"
    );
    assert_eq!(b.group_members(large).expect("members"), vec![bob.id, carol.id]);
    let mut c2 = server.login(&carol);
    b.send_group_text(large, "after").expect("send");
    loop {
        let message = expect_message(&mut c2);
        if message.content.body == b"after" {
            assert_eq!(message.conv, ConvId::Group { group: large });
            break;
        }
    }
}

/// After the `Ok`, no request of another user recreates state keyed by
/// the deleted id: invites, bans, blocks and unblocks of it are refused,
/// role changes and hand-overs to it are undone by the purge; a receipt
/// in the 1:1 with it touches only the caller's own state, and ending
/// the friendship is harmless. After the purge the
/// store holds nothing of the account but its deletion record, the
/// history and bans of it made before (group records, as docs/security.md
/// says); the peer's conversation list reads it with no cursors of the
/// deleted account.
#[test]
fn nothing_recreates_state_keyed_by_the_deleted_id() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1 % shards);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    befriend(&mut a, &alice, &mut b, &bob);
    let group = group_on_shard(&mut b, 0, shards, true);
    let banned = group_on_shard(&mut b, 1 % shards, shards, true);
    a.group_join(group).expect("alice joins");
    b.group_ban(banned, alice.id).expect("ban alice before");
    let conv = ConvId::direct(alice.id, bob.id);
    b.send_text(alice.id, "hi").expect("send");
    expect_message(&mut a);
    a.receipt(conv, ReceiptKind::Read, 1).expect("alice reads");

    a.delete_account(PASSWORD).expect("delete");
    // (An invite of a member is an `Ok` that writes nothing, so `banned`,
    // which she is not in.)
    assert_eq!(code_of(b.group_invite(banned, alice.id)), ErrorCode::NotFound);
    assert_eq!(code_of(b.group_ban(group, alice.id)), ErrorCode::NotFound);
    assert_eq!(code_of(b.block_user(alice.id)), ErrorCode::NotFound);
    assert_eq!(code_of(b.send_text(alice.id, "there?")), ErrorCode::NotFound);
    // Still a member until the purge departs her (then it takes), or
    // departed (then `NotFound`): either way the purge leaves the group
    // to bob below.
    for result in [
        b.group_set_role(group, alice.id, GroupRole::Admin),
        b.group_transfer_ownership(group, alice.id),
    ] {
        if let Err(e) = result {
            assert_eq!(code_of::<()>(Err(e)), ErrorCode::NotFound);
        }
    }
    b.receipt(conv, ReceiptKind::Read, 1).expect("bob's own cursor");
    b.friend_remove(alice.id).expect("removing is harmless");
    assert_eq!(code_of(b.unblock_user(alice.id)), ErrorCode::NotFound);
    let mut c = server.login_unsynced(&carol);
    assert_eq!(code_of(c.friend_add(&alice.name)), ErrorCode::NotFound);

    let store = purged(&server);
    // The owner is bob whatever happened above, and alice is in no group.
    assert_eq!(b.group_members(group).expect("members"), vec![bob.id]);
    assert_eq!(store.group(group).expect("read").expect("kept").owner, bob.id);
    assert!(store.user_groups(alice.id).expect("read").is_empty());
    assert!(store.friends(alice.id).expect("read").is_empty());
    for incoming in [true, false] {
        let requests = store.friend_requests_after(alice.id, incoming, 0, 10);
        assert_eq!(requests.expect("read"), (vec![], false));
    }
    assert_eq!(
        store.blocks_after(alice.id, 0, 10).expect("read"),
        (vec![], false)
    );
    assert_eq!(
        store.user_invites_after(alice.id, 0, 10).expect("read"),
        (vec![], false)
    );
    assert!(store.inbox_after(alice.id, None, 10).expect("read").is_empty());
    assert!(store.departures(alice.id).expect("read").is_empty());
    assert!(store.direct_conversations(alice.id, 10).expect("read").is_empty());
    assert_eq!(store.receipts(alice.id, conv).expect("read"), (0, 0));
    // Kept: the ban made before (the group's record) and the history.
    assert_eq!(
        b.group_bans_page(banned, 0, 10).expect("bans"),
        (vec![alice.id], false)
    );
    let listed = b.conversations(0, 10).expect("conversations");
    let summary = listed.iter().find(|s| s.conv == conv).expect("listed");
    assert_eq!((summary.last_seq, summary.unread), (1, 0));
    assert_eq!((summary.peer_delivered, summary.peer_read), (0, 0));
}

/// The user and the operator deleting the same account at once: one of
/// them deletes it and says so, the other is told it is gone. Raced
/// over many accounts at spread offsets, so that each side wins some.
#[test]
fn the_user_and_the_operator_deleting_at_once_delete_once() {
    const ROUNDS: usize = 24;
    let server = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let mut both = 0;
    for round in 0..ROUNDS {
        let alice = server.user_on_shard(&format!("race{round}x"), round % server.shards());
        let mut conn = RawConn::connect(server.addr());
        conn.login(&alice);
        let path = admin.path().to_owned();
        let command = format!("delete-user {}", alice.name);
        let delete = ClientBody::AccountDelete {
            password: PASSWORD.as_bytes().to_vec(),
        };
        let operator = std::thread::spawn(move || admin_request(&path, &command));
        // Spread over rounds, so that in some the two meet in the store.
        // (the admin socket's accept loop polls every 100 ms).
        std::thread::sleep(Duration::from_millis(5 * round as u64));
        let request = conn.send(delete);
        let frames = conn.expect_closed();
        let user_deleted = frames
            .iter()
            .any(|f| f.request_id == request && f.body == ServerBody::Ok);
        let answer = operator.join().expect("operator thread").expect("answer");
        let operator_deleted = answer.starts_with("deleted ");
        if user_deleted && operator_deleted {
            both += 1;
        }
        assert!(
            user_deleted || operator_deleted,
            "round {round}: nobody deleted: {answer} {frames:?}"
        );
        if !operator_deleted {
            assert!(answer.starts_with("error: "), "{answer}");
        }
    }
    assert_eq!(
        both, 0,
        "both said they deleted the account in {both} of {ROUNDS} rounds"
    );
    let store = purged(&server);
    assert_eq!(store.deleted_count(), ROUNDS as u64);
}

/// An account with thousands of keys (friends both ways, blocks, an
/// inbox of thousands) is purged in bounded steps in the background:
/// another pair's messages keep flowing meanwhile (the bound asserted is
/// generous: this is no benchmark), and the purge leaves none of it.
#[test]
fn a_big_account_is_purged_in_steps_while_others_chat() {
    use std::sync::Arc;
    use std::time::Instant;
    use tern_storage::{InboxTargets, MessageWrite, WriteOp};

    const FRIENDS: usize = 1100;
    const INBOX: u64 = 6000;
    let server = TestServer::start_with(|c| c.store.max_friends = FRIENDS);
    let store = server.admin_context().store;
    let alice = server.user_on_shard("alice", 0);
    let carol = server.user_on_shard("carol", 1 % server.shards());
    let dave = server.user_on_shard("dave", 0);
    let erin = server.user_on_shard("erin", 1 % server.shards());
    // Written to the store directly (thousands of requests would only
    // meet the rate limits); carol's conversation with alice is not yet
    // known to any shard.
    let mut friends = Vec::new();
    for n in 0..FRIENDS {
        let friend = store
            .register(&format!("friend{n}"), PASSWORD.as_bytes())
            .expect("register");
        store.add_friend(alice.id, friend).expect("ask");
        store.add_friend(friend, alice.id).expect("accept");
        friends.push(friend);
    }
    for &friend in friends.iter().take(300) {
        store.block(friend, alice.id).expect("block");
    }
    let conv = ConvId::direct(alice.id, carol.id);
    let inbox: Vec<WriteOp> = (1..=INBOX)
        .map(|seq| {
            WriteOp::Message(MessageWrite {
                conv,
                seq,
                from: carol.id,
                client_msg_id: seq,
                timestamp_ms: seq,
                frame: Arc::from(format!("#{seq}").into_bytes()),
                inbox: InboxTargets::One(alice.id),
                moved_from: None,
            })
        })
        .collect();
    store.apply(&inbox, false).expect("inbox");

    let mut d = server.login(&dave);
    let mut e = server.login(&erin);
    let mut a = server.login_unsynced(&alice);
    a.delete_account(PASSWORD).expect("delete");
    let mut slowest = Duration::ZERO;
    let mut exchanged = 0;
    while exchanged < 20 || !store.pending_user_purges().is_empty() {
        let sent = Instant::now();
        d.send_text(erin.id, "still here").expect("send");
        expect_message(&mut e);
        slowest = slowest.max(sent.elapsed());
        exchanged += 1;
        assert!(exchanged < 100_000, "the purge never ends");
    }
    assert!(
        slowest < Duration::from_secs(5),
        "a message took {slowest:?} while the purge ran"
    );
    assert!(store.friends(alice.id).expect("read").is_empty());
    assert!(store.inbox_after(alice.id, None, 10).expect("read").is_empty());
    for &friend in &friends {
        assert!(store.friends(friend).expect("read").is_empty());
        assert!(!store.blocks_between(friend, alice.id).expect("read").any());
    }
    // Carol keeps the conversation, all of it.
    assert_eq!(store.history(conv, 1, true, 10).expect("read").len(), 10);
    assert_eq!(
        store.direct_conversations(carol.id, 10).expect("read"),
        vec![conv]
    );
}

/// From the `Ok` on, a group's pending invites no longer list the
/// deleted account, though the purge removes its invites only after it
/// has left every group (here hundreds, which takes a while).
#[test]
fn a_deleted_account_is_gone_from_invite_lists_at_once() {
    const GROUPS: usize = 300;
    let server = TestServer::start();
    let store = server.admin_context().store;
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1 % server.shards());
    let carol = server.user_on_shard("carol", 0);
    // Many memberships for the purge to leave first: straight to the
    // store, as thousands of requests would only meet the rate limits.
    for n in 0..GROUPS {
        let group = store.create_group(bob.id, &format!("g{n}")).expect("create");
        store.add_member(group, alice.id).expect("join");
    }
    let mut b = server.login_unsynced(&bob);
    let closed = b.group_create_with("closed", false).expect("create");
    b.group_invite(closed, alice.id).expect("invite alice");
    b.group_invite(closed, carol.id).expect("invite carol");
    assert_eq!(
        b.group_invites_page(closed, 0, 10).expect("invites"),
        (vec![alice.id, carol.id], false)
    );

    server
        .login_unsynced(&alice)
        .delete_account(PASSWORD)
        .expect("delete");
    let (listed, _) = b.group_invites_page(closed, 0, 10).expect("invites");
    let purging = !store.pending_user_purges().is_empty();
    assert_eq!(listed, vec![carol.id], "the purge still running: {purging}");
    purged(&server);
    assert_eq!(
        b.group_invites_page(closed, 0, 10).expect("invites"),
        (vec![carol.id], false)
    );
}
