//! Group roles and invite-only groups over real sockets: who may join,
//! invite, kick and change roles (docs/protocol.md 2.8.9), that a kicked
//! member stops receiving and reading at once, and that roles and pending
//! invites survive a restart. Members live on both shards, and each rule is
//! exercised for a group homed on every shard.

mod common;

use common::*;
use tern_client::proto::{GroupMember, GroupRole};
use tern_client::{Client, Content, ContentKind, ConvId, ErrorCode, GroupId, ServerBody};

/// The roles `GroupInfo` reports, as (user, role) ascending by user.
fn roles(client: &mut Client, group: GroupId) -> Vec<(u64, GroupRole)> {
    let info = client.group_info(group).expect("group info");
    info.members
        .into_iter()
        .map(|GroupMember { user, role }| (user, role))
        .collect()
}

/// The next push of `client` is the news of an invite to `group` by `by`.
fn expect_invited(client: &mut Client, group: GroupId, by: u64) {
    match expect_any_push(client) {
        ServerBody::Invited { group: g, by: b } => assert_eq!((g, b), (group, by)),
        other => panic!("expected Invited to {group}, got {other:?}"),
    }
}

fn sorted(mut v: Vec<(u64, GroupRole)>) -> Vec<(u64, GroupRole)> {
    v.sort_unstable_by_key(|&(user, _)| user);
    v
}

#[test]
fn invite_only_join_is_refused_until_invited_and_the_invite_is_used_up() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);

    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, false);
        let info = a.group_info(group).expect("info");
        assert!(!info.open);
        assert_eq!(
            info.members,
            vec![GroupMember {
                user: alice.id,
                role: GroupRole::Owner
            }]
        );

        assert_eq!(code_of(b.group_join(group)), ErrorCode::Forbidden);
        assert_eq!(code_of(b.group_info(group)), ErrorCode::Forbidden);
        // Only members with rights invite; unknown users are NotFound.
        assert_eq!(code_of(c.group_invite(group, bob.id)), ErrorCode::Forbidden);
        assert_eq!(code_of(a.group_invite(group, 999_999)), ErrorCode::NotFound);
        a.group_invite(group, bob.id).expect("invite bob");
        a.group_invite(group, bob.id).expect("inviting twice is harmless");
        // Bob hears of each invite (twice: a repeated invite reminds).
        for _ in 0..2 {
            expect_invited(&mut b, group, alice.id);
        }
        b.group_join(group).expect("invited join");
        assert_eq!(
            roles(&mut b, group),
            sorted(vec![(alice.id, GroupRole::Owner), (bob.id, GroupRole::Member)])
        );
        // The join used the invite up: after leaving, bob needs a new one.
        b.group_leave(group).expect("leave");
        assert_eq!(code_of(b.group_join(group)), ErrorCode::Forbidden);
        a.group_invite(group, bob.id).expect("invite again");
        expect_invited(&mut b, group, alice.id);
        b.group_join(group).expect("join again");

        // Members of an invite-only group hear each other like any group.
        let ack = a.send_group_text(group, "welcome").expect("send");
        let msg = expect_message(&mut b);
        assert_eq!((msg.conv, msg.seq), (ConvId::Group { group }, ack.seq));
        expect_quiet(&mut [&mut a, &mut b, &mut c]);

        // An open group (GroupCreate) still lets anyone in.
        let open = a.group_create("anyone").expect("create open");
        assert!(a.group_info(open).expect("info").open);
        c.group_join(open).expect("open join");
    }
}

#[test]
fn members_cannot_manage_admins_manage_members_and_the_owner_manages_roles() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let eve = server.user_on_shard("eve", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);
    let mut d = server.login(&dave);
    let mut e = server.login(&eve);

    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, false);
        for (user, client) in [(&bob, &mut b), (&carol, &mut c), (&dave, &mut d)] {
            a.group_invite(group, user.id).expect("invite");
            client.group_join(group).expect("join");
        }

        // A plain member may neither invite, kick nor change roles.
        assert_eq!(code_of(c.group_invite(group, eve.id)), ErrorCode::Forbidden);
        assert_eq!(code_of(c.group_kick(group, dave.id)), ErrorCode::Forbidden);
        assert_eq!(
            code_of(c.group_set_role(group, carol.id, GroupRole::Admin)),
            ErrorCode::Forbidden
        );
        // Outsiders neither.
        assert_eq!(code_of(e.group_kick(group, dave.id)), ErrorCode::Forbidden);

        // The owner makes bob an admin.
        a.group_set_role(group, bob.id, GroupRole::Admin)
            .expect("promote bob");
        assert_eq!(
            roles(&mut d, group),
            sorted(vec![
                (alice.id, GroupRole::Owner),
                (bob.id, GroupRole::Admin),
                (carol.id, GroupRole::Member),
                (dave.id, GroupRole::Member),
            ])
        );
        // An admin invites and kicks plain members, but not roles.
        b.group_invite(group, eve.id).expect("admin invites");
        e.group_join(group).expect("eve joins");
        b.group_kick(group, dave.id).expect("admin kicks a member");
        assert_eq!(code_of(b.group_kick(group, dave.id)), ErrorCode::NotFound);
        assert_eq!(code_of(b.group_kick(group, alice.id)), ErrorCode::Forbidden);
        assert_eq!(
            code_of(b.group_set_role(group, eve.id, GroupRole::Admin)),
            ErrorCode::Forbidden
        );
        a.group_set_role(group, carol.id, GroupRole::Admin)
            .expect("promote carol");
        assert_eq!(code_of(b.group_kick(group, carol.id)), ErrorCode::Forbidden);
        assert_eq!(code_of(b.group_kick(group, bob.id)), ErrorCode::InvalidArgument);

        // The owner's own rules.
        assert_eq!(
            code_of(a.group_set_role(group, bob.id, GroupRole::Owner)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code_of(a.group_set_role(group, alice.id, GroupRole::Member)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code_of(a.group_set_role(group, dave.id, GroupRole::Admin)),
            ErrorCode::NotFound
        );
        assert_eq!(code_of(a.group_leave(group)), ErrorCode::InvalidArgument);
        // The owner demotes carol and kicks an admin.
        a.group_set_role(group, carol.id, GroupRole::Member)
            .expect("demote carol");
        a.group_kick(group, bob.id).expect("owner kicks an admin");
        assert_eq!(
            roles(&mut e, group),
            sorted(vec![
                (alice.id, GroupRole::Owner),
                (carol.id, GroupRole::Member),
                (eve.id, GroupRole::Member),
            ])
        );
        // Admins leave like anyone; members listing agrees with the roles.
        let mut members = vec![alice.id, carol.id, eve.id];
        members.sort_unstable();
        assert_eq!(c.group_members(group).expect("members"), members);
    }
}

#[test]
fn a_kicked_member_gets_no_more_messages_and_is_forbidden_at_once() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let dave = server.user_on_shard("dave", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);
    let mut d1 = server.login(&dave);
    let mut d2 = server.login(&dave);

    for home in 0..shards {
        // An open group: the kick, not the invite list, must stop dave.
        let group = group_on_shard(&mut a, home, shards, true);
        let conv = ConvId::Group { group };
        for client in [&mut b, &mut c, &mut d1] {
            client.group_join(group).expect("join");
        }
        a.group_set_role(group, bob.id, GroupRole::Admin)
            .expect("promote bob");
        a.send_group_text(group, "before").expect("send");
        for client in [&mut b, &mut c, &mut d1, &mut d2] {
            assert_eq!(expect_message(client).content.body, b"before");
        }

        b.group_kick(group, dave.id).expect("kick dave");
        // Every message sequenced after the kick's answer misses dave's
        // sessions, both of them, while the others keep getting them.
        for i in 0..3 {
            let text = format!("after {i}");
            a.send_group_text(group, &text).expect("send");
            for client in [&mut b, &mut c] {
                assert_eq!(expect_message(client).content.body, text.as_bytes());
            }
        }
        expect_quiet(&mut [&mut a, &mut b, &mut c, &mut d1, &mut d2]);
        assert_eq!(code_of(d1.send_group_text(group, "hello?")), ErrorCode::Forbidden);
        assert_eq!(code_of(d2.history(conv, 1, true, 10)), ErrorCode::Forbidden);
        assert_eq!(code_of(d1.group_info(group)), ErrorCode::Forbidden);
        assert_eq!(code_of(d1.group_members(group)), ErrorCode::Forbidden);
        // A fresh login's sync streams nothing said after the kick.
        let mut d3 = server.login(&dave);
        while let Some(push) = d3.next_push(QUIET).expect("read pushes") {
            if let ServerBody::Message(m) = push {
                assert!(m.conv != conv || m.seq == 1, "kicked dave got {m:?}");
            }
        }
        // Those who stayed still read the whole history.
        assert_eq!(c.history(conv, 1, true, 10).expect("history").len(), 4);
    }
}

/// A member's message whose `Sent` was lost (the connection dropped) is
/// retried with the same `client_msg_id` after the member left, was
/// kicked or banned: the retry gets the original `Sent`, as any retry does
/// (protocol.md 2.8.4), and is neither stored nor delivered again, also
/// after a restart; a new message, or a new recall, is still `Forbidden`.
/// The retry used to be refused as from a non-member, so the client was
/// told its stored and delivered message had failed.
#[test]
fn a_retry_after_leaving_or_being_removed_gets_the_original_ack() {
    let mut server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let carol = server.user_on_shard("carol", 1);
    let mut leavers = Vec::new();
    let mut a = server.login(&alice);
    let mut c = server.login(&carol);
    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, true);
        let conv = ConvId::Group { group };
        c.group_join(group).expect("join");
        for (i, how) in ["leave", "kick", "ban"].into_iter().enumerate() {
            let user = server.user_on_shard(&format!("{how}{home}_"), i % shards);
            let mut u = server.login_unsynced(&user);
            u.group_join(group).expect("join");
            let sent = u
                .send_group(group, 500 + i as u64, Content::text(how))
                .expect("send");
            let recall = u.recall(conv, sent.seq).expect("recall");
            for member in [&mut a, &mut c] {
                for m in [expect_message(member), expect_message(member)] {
                    assert!(m.seq == sent.seq || m.seq == recall.seq, "{m:?}");
                }
            }
            match how {
                "leave" => u.group_leave(group).expect("leave"),
                "kick" => a.group_kick(group, user.id).expect("kick"),
                _ => a.group_ban(group, user.id).expect("ban"),
            }
            let retry = u
                .send_group(group, 500 + i as u64, Content::text("again"))
                .expect("a retry after the membership ended");
            assert_eq!(retry, sent, "{how}: the original ack");
            let recall_retry = u
                .send_group(group, recall.client_msg_id, recall_content(sent.seq))
                .expect("a recall's retry");
            assert_eq!(recall_retry, recall, "{how}");
            assert_eq!(
                code_of(u.send_group(group, 600 + i as u64, Content::text("new"))),
                ErrorCode::Forbidden,
                "{how}: a new message"
            );
            assert_eq!(
                code_of(u.send_group(group, 700 + i as u64, recall_content(sent.seq))),
                ErrorCode::Forbidden,
                "{how}: a new recall"
            );
            leavers.push((user, group, sent, recall));
        }
        expect_quiet(&mut [&mut a, &mut c]);
        assert_eq!(
            a.history(conv, 1, true, 50).expect("history").len(),
            6,
            "three messages and three recalls, stored once each"
        );
    }
    drop((a, c));
    server.restart();
    for (user, group, sent, recall) in leavers {
        let mut u = server.login_unsynced(&user);
        let retry = u
            .send_group(group, sent.client_msg_id, Content::text("again"))
            .expect("a retry after a restart");
        assert_eq!(retry, sent, "the dedup window is reloaded from the store");
        let retry = u
            .send_group(group, recall.client_msg_id, recall_content(sent.seq))
            .expect("a recall's retry after a restart");
        assert_eq!(retry, recall);
    }
}

fn recall_content(seq: u64) -> Content {
    Content {
        kind: ContentKind::Recall { seq },
        body: Vec::new(),
    }
}

#[test]
fn a_group_holds_at_most_max_group_invites_pending_invites() {
    let server = TestServer::start_with(|c| c.store.max_group_invites = 2);
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let guests: Vec<User> = (0..3)
        .map(|i| server.user_on_shard(&format!("guest{i}x"), i % shards))
        .collect();
    let mut a = server.login(&alice);
    let mut first_guest = server.login(&guests[0]);
    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, false);
        a.group_invite(group, guests[0].id).expect("first invite");
        a.group_invite(group, guests[1].id).expect("second invite");
        assert_eq!(
            code_of(a.group_invite(group, guests[2].id)),
            ErrorCode::LimitExceeded,
            "home {home}"
        );
        // Inviting someone already invited writes nothing, so it is no
        // refusal even when the group is full.
        a.group_invite(group, guests[1].id).expect("repeated invite");
        // A join uses its invite up and frees a place.
        first_guest.group_join(group).expect("invited join");
        a.group_invite(group, guests[2].id).expect("invite after a join");
    }
}

#[test]
fn a_withdrawn_invite_no_longer_admits_and_frees_its_place() {
    let server = TestServer::start_with(|c| c.store.max_group_invites = 1);
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);
    let mut d = server.login(&dave);
    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, false);
        a.group_invite(group, bob.id).expect("invite bob");
        // Only the owner and admins may withdraw; a stranger may not.
        assert_eq!(code_of(d.group_uninvite(group, bob.id)), ErrorCode::Forbidden);
        a.group_uninvite(group, bob.id).expect("withdraw bob's invite");
        assert_eq!(code_of(b.group_join(group)), ErrorCode::Forbidden, "home {home}");
        // Withdrawing again, or an invite never made, changes nothing.
        a.group_uninvite(group, bob.id).expect("withdraw twice");
        a.group_uninvite(group, dave.id).expect("withdraw one never made");
        // The withdrawn invite's place is free again (the limit is 1).
        a.group_invite(group, carol.id).expect("invite carol");
        assert_eq!(
            code_of(a.group_invite(group, dave.id)),
            ErrorCode::LimitExceeded,
            "home {home}"
        );
        // An admin may withdraw too, and the invite kept its effect until then.
        c.group_join(group).expect("carol joins with her invite");
        a.group_set_role(group, carol.id, GroupRole::Admin)
            .expect("promote carol");
        c.group_invite(group, dave.id).expect("admin invites dave");
        c.group_uninvite(group, dave.id).expect("admin withdraws it");
        assert_eq!(code_of(d.group_join(group)), ErrorCode::Forbidden, "home {home}");
    }
    assert_eq!(code_of(a.group_uninvite(u64::MAX, bob.id)), ErrorCode::NotFound);
}

#[test]
fn an_answer_too_large_for_a_frame_is_refused_not_lost() {
    // The smallest frames a server allows: 70 members listed with their
    // roles (16 bytes each) no longer fit, their bare ids (8 bytes) do.
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 1024;
        c.max_message_bytes = 512;
    });
    let owner = server.user_on_shard("owner", 0);
    let mut host = server.login(&owner);
    let group = host.group_create("crowd").expect("create");
    for i in 0..69 {
        let user = server.user_where(&format!("m{i}x"), |_| true);
        server.login(&user).group_join(group).expect("join");
    }
    assert_eq!(code_of(host.group_info(group)), ErrorCode::LimitExceeded);
    assert_eq!(host.group_members(group).expect("ids fit").len(), 70);
    host.ping().expect("the connection carries on");

    // Pages list the same group at any size: 48 members fit in a 1 KiB
    // frame (768 bytes of 16-byte members), so asking for 1000 gives 48
    // and then the other 22.
    let ids = host.group_members(group).expect("ids");
    let first = host.group_members_page(group, 0, 1000).expect("first page");
    assert_eq!(first.members.len(), 48);
    assert!(first.more);
    let last = first.members.last().expect("48 members").user;
    let second = host.group_members_page(group, last, 1000).expect("second page");
    assert_eq!(second.members.len(), 22);
    assert!(!second.more);
    let paged: Vec<GroupMember> = first.members.into_iter().chain(second.members).collect();
    assert_eq!(paged.iter().map(|m| m.user).collect::<Vec<_>>(), ids);
    assert_eq!(paged.iter().filter(|m| m.role == GroupRole::Owner).count(), 1);
    assert!(paged.contains(&GroupMember {
        user: owner.id,
        role: GroupRole::Owner
    }));
    assert_eq!(host.group_members_all(group).expect("all pages"), paged);
}

#[test]
fn member_pages_follow_the_limit_the_ids_and_the_group_rules() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let eve = server.user_on_shard("eve", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);
    let mut e = server.login(&eve);
    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, true);
        b.group_join(group).expect("bob joins");
        c.group_join(group).expect("carol joins");
        a.group_set_role(group, bob.id, GroupRole::Admin)
            .expect("promote bob");
        let mut everyone = sorted(vec![
            (alice.id, GroupRole::Owner),
            (bob.id, GroupRole::Admin),
            (carol.id, GroupRole::Member),
        ]);
        let pairs = |members: &[GroupMember]| -> Vec<(u64, GroupRole)> {
            members.iter().map(|m| (m.user, m.role)).collect()
        };

        // One at a time, then all at once; limit 0 counts as 1.
        let mut after = 0;
        let mut one_by_one = Vec::new();
        loop {
            let page = c.group_members_page(group, after, 0).expect("page");
            assert!(page.members.len() <= 1, "home {home}");
            one_by_one.extend(pairs(&page.members));
            match page.members.last() {
                Some(last) => after = last.user,
                None => break,
            }
            if !page.more {
                break;
            }
        }
        assert_eq!(one_by_one, everyone, "home {home}");
        let whole = b.group_members_page(group, 0, 1000).expect("one page");
        assert_eq!(pairs(&whole.members), everyone, "home {home}");
        assert!(!whole.more);
        assert_eq!(pairs(&a.group_members_all(group).expect("all")), everyone);

        // `after` is a position, not a member: any id works.
        let mid = everyone[1].0;
        let rest = a.group_members_page(group, mid, 1000).expect("after mid");
        assert_eq!(pairs(&rest.members), everyone[2..].to_vec(), "home {home}");
        let past = a.group_members_page(group, u64::MAX, 5).expect("after the last");
        assert!(past.members.is_empty() && !past.more, "home {home}");

        // Between two pages the membership may change: a member who left
        // is gone from the next page, and nobody is listed twice.
        let page = a.group_members_page(group, 0, 1).expect("first");
        assert_eq!(pairs(&page.members), everyone[..1].to_vec());
        // The larger of bob and carol is never first (the other is smaller).
        let leaver = bob.id.max(carol.id);
        let leaving = if leaver == carol.id { &mut c } else { &mut b };
        leaving.group_leave(group).expect("leave");
        everyone.retain(|&(user, _)| user != leaver);
        let next = a
            .group_members_page(group, page.members[0].user, 1000)
            .expect("next");
        assert_eq!(pairs(&next.members), everyone[1..].to_vec(), "home {home}");

        // Members only; no group is NotFound.
        assert_eq!(
            code_of(e.group_members_page(group, 0, 10)),
            ErrorCode::Forbidden,
            "home {home}"
        );
    }
    assert_eq!(
        code_of(a.group_members_page(u64::MAX, 0, 10)),
        ErrorCode::NotFound
    );
}

#[test]
fn roles_openness_and_pending_invites_survive_a_restart() {
    let mut server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let dave = server.user_on_shard("dave", 0);
    let mut groups = Vec::new();
    {
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        for home in 0..shards {
            let group = group_on_shard(&mut a, home, shards, false);
            a.group_invite(group, bob.id).expect("invite bob");
            b.group_join(group).expect("join");
            a.group_set_role(group, bob.id, GroupRole::Admin)
                .expect("promote");
            b.group_invite(group, carol.id).expect("invite carol");
            groups.push(group);
        }
    }
    server.restart();
    let mut a = server.login(&alice);
    let mut c = server.login(&carol);
    let mut d = server.login(&dave);
    for group in groups {
        let info = a.group_info(group).expect("info");
        assert!(!info.open);
        assert_eq!(
            info.members.iter().map(|m| (m.user, m.role)).collect::<Vec<_>>(),
            sorted(vec![(alice.id, GroupRole::Owner), (bob.id, GroupRole::Admin)])
        );
        assert_eq!(code_of(d.group_join(group)), ErrorCode::Forbidden);
        c.group_join(group).expect("carol's invite survived");
        assert_eq!(
            roles(&mut c, group),
            sorted(vec![
                (alice.id, GroupRole::Owner),
                (bob.id, GroupRole::Admin),
                (carol.id, GroupRole::Member),
            ])
        );
    }
}

#[test]
fn a_crowd_joining_at_once_is_admitted_up_to_the_limit_and_hears_what_follows() {
    const CROWD: usize = 24;
    const ROOM: usize = 16; // members besides the owner
    let server = TestServer::start_with(|c| c.store.max_group_members = ROOM + 1);
    let shards = server.shards();
    let owner = server.user_on_shard("host", 0);
    let mut host = server.login(&owner);
    let crowd: Vec<User> = (0..CROWD)
        .map(|i| server.user_where(&format!("fan{i}x"), |_| true))
        .collect();
    // Groups homed on each shard: the joins queue on the group's home.
    for home in 0..shards {
        let group = group_on_shard(&mut host, home, shards, true);
        let start = std::sync::Barrier::new(CROWD);
        let results: Vec<(User, Result<(), ErrorCode>, Client)> = std::thread::scope(|scope| {
            let handles: Vec<_> = crowd
                .iter()
                .map(|user| {
                    let (server, start) = (&server, &start);
                    scope.spawn(move || {
                        let mut client = server.login(user);
                        start.wait();
                        let joined = client.group_join(group).map_err(|e| code_of::<()>(Err(e)));
                        (user.clone(), joined, client)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (mut admitted, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(|(_, r, _)| r.is_ok());
        assert_eq!(admitted.len(), ROOM, "home {home}");
        assert!(refused
            .iter()
            .all(|(_, r, _)| *r == Err(ErrorCode::LimitExceeded)));
        let mut expected: Vec<u64> = admitted.iter().map(|(u, _, _)| u.id).collect();
        expected.push(owner.id);
        expected.sort_unstable();
        let mut listed = host.group_members(group).expect("members");
        listed.sort_unstable();
        assert_eq!(listed, expected, "home {home}");

        // Every admitted member hears the next message.
        host.send_group_text(group, "welcome").expect("send");
        for (user, _, client) in admitted.iter_mut() {
            // Fans admitted to an earlier group may first be synced its
            // welcome, unread: skip those.
            let message = (0..shards)
                .map(|_| expect_message(client))
                .find(|m| m.conv == ConvId::Group { group })
                .unwrap_or_else(|| panic!("{} missed the welcome", user.name));
            assert_eq!(message.from, owner.id);
            assert_eq!(message.seq, 1, "{}", user.name);
        }
        // Leaving frees room for exactly one more.
        let (_, _, leaver) = admitted.first_mut().expect("someone joined");
        leaver.group_leave(group).expect("leave");
        let mut latecomers = refused.into_iter().map(|(_, _, client)| client);
        latecomers
            .next()
            .expect("a refused fan")
            .group_join(group)
            .expect("room for one");
        assert_eq!(
            code_of(latecomers.next().expect("another").group_join(group)),
            ErrorCode::LimitExceeded
        );
    }
}

#[test]
fn a_user_joins_and_creates_at_most_max_groups_per_user_groups() {
    let server = TestServer::start_with(|c| c.store.max_groups_per_user = 2);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let first = b.group_create("bob's").expect("bob's group");
    let second = server
        .login(&carol)
        .group_create("carol's")
        .expect("carol's group");
    a.group_create("alice's").expect("alice's first group");
    a.group_join(first).expect("alice's second group");
    assert_eq!(code_of(a.group_join(second)), ErrorCode::LimitExceeded);
    assert_eq!(code_of(a.group_create("one more")), ErrorCode::LimitExceeded);
    a.group_join(first).expect("joining again is no new group");
    a.group_leave(first).expect("leave");
    a.group_join(second).expect("a place is free again");
    b.group_create("bob's second").expect("bob's second group");
    assert_eq!(code_of(b.group_create("bob's third")), ErrorCode::LimitExceeded);
}

#[test]
fn groups_dropped_from_a_full_cache_come_back_with_every_change() {
    // A cache of 4 members per shard holds one 3-member group at a time:
    // almost every use below loads its group again from the store.
    let server = TestServer::start_with(|c| c.max_cached_group_members = 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);
    let groups: Vec<GroupId> = (0..6)
        .map(|i| {
            let group = a.group_create(&format!("evicted {i}")).expect("create");
            b.group_join(group).expect("bob joins");
            c.group_join(group).expect("carol joins");
            group
        })
        .collect();
    // Changes to every group, each made while others crowd it out.
    for (i, &group) in groups.iter().enumerate() {
        if i % 2 == 0 {
            a.group_set_role(group, bob.id, GroupRole::Admin)
                .expect("promote");
        }
        if i % 3 == 0 {
            c.group_leave(group).expect("carol leaves");
        }
    }
    for (i, &group) in groups.iter().enumerate() {
        let bob_role = if i % 2 == 0 {
            GroupRole::Admin
        } else {
            GroupRole::Member
        };
        let mut want = vec![(alice.id, GroupRole::Owner), (bob.id, bob_role)];
        if i % 3 != 0 {
            want.push((carol.id, GroupRole::Member));
        }
        assert_eq!(roles(&mut a, group), sorted(want), "group {i}");
        // Fan-out follows the reloaded membership.
        a.send_group_text(group, &format!("to {i}")).expect("send");
        assert_eq!(expect_message(&mut b).conv, ConvId::Group { group });
        if i % 3 == 0 {
            assert_eq!(
                code_of(c.history(ConvId::Group { group }, u64::MAX, false, 5)),
                ErrorCode::Forbidden
            );
        } else {
            assert_eq!(expect_message(&mut c).conv, ConvId::Group { group });
        }
    }
    let cached = total(&admin, "tern_group_members_cached");
    assert!(cached <= 2 * 4, "{cached} members cached");
    assert!(total(&admin, "tern_groups_cached") < 6);
}

#[test]
fn owners_and_admins_list_pending_invites_a_page_at_a_time() {
    // 1 KiB frames hold 96 ids (768 bytes at 8 bytes an id).
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 1024;
        c.max_message_bytes = 512;
    });
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let guests: Vec<u64> = (0..100)
        .map(|i| server.user_where(&format!("guest{i}x"), |_| true).id)
        .collect();
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, false);
        assert_eq!(
            a.group_invites_page(group, 0, 10).expect("none yet"),
            (vec![], false)
        );
        for &guest in &guests {
            a.group_invite(group, guest).expect("invite");
        }
        let (first, more) = a.group_invites_page(group, 0, 1000).expect("first page");
        assert_eq!((first.len(), more), (96, true), "home {home}");
        let last = *first.last().expect("96 ids");
        let (rest, more) = a.group_invites_page(group, last, 1000).expect("second page");
        assert!(!more);
        let listed: Vec<u64> = first.into_iter().chain(rest).collect();
        let mut want = guests.clone();
        want.sort_unstable();
        assert_eq!(listed, want, "home {home}");
        assert_eq!(
            a.group_invites_page(group, 0, 0).expect("limit 0 counts as 1"),
            (want[..1].to_vec(), true)
        );

        // A plain member may not list them; an admin may, and sees a
        // withdrawn invite gone.
        a.group_invite(group, bob.id).expect("invite bob");
        b.group_join(group).expect("bob joins");
        assert_eq!(code_of(b.group_invites_page(group, 0, 10)), ErrorCode::Forbidden);
        a.group_set_role(group, bob.id, GroupRole::Admin)
            .expect("promote bob");
        a.group_uninvite(group, want[0]).expect("withdraw");
        let (seen, more) = b.group_invites_page(group, 0, 3).expect("admin lists");
        assert_eq!((seen, more), (want[1..4].to_vec(), true), "home {home}");
    }
    assert_eq!(code_of(a.group_invites_page(u64::MAX, 0, 1)), ErrorCode::NotFound);
}

#[test]
fn the_owner_hands_the_group_over_and_may_then_leave() {
    let mut server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let mut groups = Vec::new();
    {
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        let mut c = server.login(&carol);
        for home in 0..shards {
            let group = group_on_shard(&mut a, home, shards, true);
            b.group_join(group).expect("bob joins");
            c.group_join(group).expect("carol joins");
            a.group_set_role(group, carol.id, GroupRole::Admin)
                .expect("promote carol");
            // Only the owner, only to another member.
            assert_eq!(
                code_of(c.group_transfer_ownership(group, bob.id)),
                ErrorCode::Forbidden,
                "an admin, home {home}"
            );
            assert_eq!(
                code_of(b.group_transfer_ownership(group, bob.id)),
                ErrorCode::Forbidden,
                "a member, home {home}"
            );
            assert_eq!(
                code_of(a.group_transfer_ownership(group, alice.id)),
                ErrorCode::InvalidArgument
            );
            let stranger = server.user_where(&format!("x{home}y"), |_| true);
            assert_eq!(
                code_of(a.group_transfer_ownership(group, stranger.id)),
                ErrorCode::NotFound
            );
            a.group_transfer_ownership(group, bob.id).expect("hand over");
            assert_eq!(
                roles(&mut c, group),
                sorted(vec![
                    (alice.id, GroupRole::Admin),
                    (bob.id, GroupRole::Owner),
                    (carol.id, GroupRole::Admin),
                ]),
                "home {home}"
            );
            // The rules follow at once: bob now changes roles, alice no
            // longer does, and the new owner cannot leave.
            assert_eq!(
                code_of(a.group_set_role(group, carol.id, GroupRole::Member)),
                ErrorCode::Forbidden
            );
            b.group_set_role(group, carol.id, GroupRole::Member)
                .expect("the new owner sets roles");
            assert_eq!(code_of(b.group_leave(group)), ErrorCode::InvalidArgument);
            assert_eq!(code_of(a.group_kick(group, bob.id)), ErrorCode::Forbidden);
            groups.push(group);
        }
    }
    // The new ownership is in the store: after a restart too.
    server.restart();
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    for &group in &groups {
        assert_eq!(
            roles(&mut b, group),
            sorted(vec![
                (alice.id, GroupRole::Admin),
                (bob.id, GroupRole::Owner),
                (carol.id, GroupRole::Member),
            ])
        );
        a.group_leave(group).expect("the former owner may leave");
        b.group_kick(group, carol.id).expect("the owner kicks");
    }
}

#[test]
fn an_invited_user_is_told_at_once_and_can_list_their_invites() {
    let server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut invited_to = Vec::new();
    for home in 0..shards {
        let group = group_on_shard(&mut a, home, shards, false);
        a.group_invite(group, bob.id).expect("invite bob");
        expect_invited(&mut b, group, alice.id);
        invited_to.push(group);
    }
    invited_to.sort_unstable();
    assert_eq!(
        b.my_invites_page(0, 1000).expect("list"),
        (invited_to.clone(), false)
    );
    assert_eq!(
        b.my_invites_page(0, 1).expect("first page"),
        (invited_to[..1].to_vec(), true)
    );
    // A session that was offline at the time finds them too; a join uses
    // one up and a withdrawal removes the other.
    let mut later = server.login(&bob);
    later.group_join(invited_to[0]).expect("join with the invite");
    a.group_uninvite(invited_to[1], bob.id).expect("withdraw");
    assert_eq!(later.my_invites_page(0, 1000).expect("list"), (vec![], false));
    assert_eq!(
        a.my_invites_page(0, 1000).expect("alice has none"),
        (vec![], false)
    );
}

#[test]
fn a_banned_user_is_removed_and_kept_out_until_unbanned() {
    let mut server = TestServer::start();
    let shards = server.shards();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 0);
    let dave = server.user_on_shard("dave", 1);
    let mut groups = Vec::new();
    {
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        let mut c = server.login(&carol);
        let mut d = server.login(&dave);
        for home in 0..shards {
            let group = group_on_shard(&mut a, home, shards, true);
            for client in [&mut b, &mut c, &mut d] {
                client.group_join(group).expect("join");
            }
            a.group_set_role(group, carol.id, GroupRole::Admin)
                .expect("promote carol");
            // Who may ban whom: as kicks.
            assert_eq!(code_of(b.group_ban(group, dave.id)), ErrorCode::Forbidden);
            assert_eq!(code_of(c.group_ban(group, alice.id)), ErrorCode::Forbidden);
            assert_eq!(code_of(a.group_ban(group, alice.id)), ErrorCode::InvalidArgument);
            a.group_set_role(group, dave.id, GroupRole::Admin)
                .expect("promote dave");
            assert_eq!(code_of(c.group_ban(group, dave.id)), ErrorCode::Forbidden);
            a.group_set_role(group, dave.id, GroupRole::Member)
                .expect("demote dave");
            assert_eq!(code_of(b.group_bans_page(group, 0, 10)), ErrorCode::Forbidden);

            // The admin bans bob: out at once, and kept out of an open group.
            c.group_ban(group, bob.id).expect("ban bob");
            c.group_ban(group, bob.id).expect("banning again is Ok");
            a.send_group_text(group, "after the ban").expect("send");
            assert_eq!(expect_message(&mut c).conv, ConvId::Group { group });
            assert_eq!(expect_message(&mut d).conv, ConvId::Group { group });
            expect_no_message(&mut b);
            assert_eq!(code_of(b.group_join(group)), ErrorCode::Forbidden);
            assert_eq!(code_of(a.group_invite(group, bob.id)), ErrorCode::InvalidArgument);
            assert_eq!(
                a.group_bans_page(group, 0, 10).expect("bans"),
                (vec![bob.id], false)
            );
            groups.push(group);
        }
        assert_eq!(code_of(a.group_ban(u64::MAX, bob.id)), ErrorCode::NotFound);
        assert_eq!(code_of(a.group_ban(groups[0], 999_999)), ErrorCode::NotFound);
    }
    // Bans are stored: after a restart bob is still out, until unbanned.
    server.restart();
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    for &group in &groups {
        assert_eq!(code_of(b.group_join(group)), ErrorCode::Forbidden);
        a.group_unban(group, bob.id).expect("unban");
        a.group_unban(group, bob.id).expect("unbanning again is Ok");
        b.group_join(group).expect("joins again");
        assert_eq!(a.group_bans_page(group, 0, 10).expect("bans"), (vec![], false));
    }
}

/// A `Sync` already streaming a group's history when its user is kicked
/// must stop at the kick: nothing sequenced after the kick's `Ok` reaches
/// them (the catch-up is held back by a client that reads slowly).
#[test]
fn a_sync_under_way_streams_no_message_sequenced_after_a_kick() {
    let server = TestServer::start_with(stall_catch_ups);
    let owner = server.user_on_shard("owner", 0);
    let victim = server.user_on_shard("victim", 1);
    let mut o = server.login_unsynced(&owner);
    let group = group_on_shard(&mut o, 0, server.shards(), true);
    let mut v = server.login_unsynced(&victim);
    v.group_join(group).expect("victim joins");
    let backlog = 3000u64;
    send_stall_backlog(&mut o, group, backlog);
    let (mut slow, sync_id) = stalled_sync(
        &server,
        &victim,
        Vec::new(),
        std::time::Duration::from_millis(1000),
    );
    o.group_kick(group, victim.id).expect("kick");
    assert_eq!(
        code_of(v.history(ConvId::Group { group }, u64::MAX, false, 10)),
        ErrorCode::Forbidden
    );
    let after = o.send_group_text(group, "said after the kick").expect("send");
    assert_eq!(after.seq, backlog + 1);
    let mut leaked = Vec::new();
    loop {
        let frame = slow.expect_frame();
        match frame.body {
            ServerBody::SyncDone { .. } if frame.request_id == sync_id => break,
            ServerBody::Message(msg) if msg.seq > backlog => leaked.push(msg.seq),
            _ => {}
        }
    }
    assert!(
        leaked.is_empty(),
        "a kicked user's sync got post-kick messages: {leaked:?}"
    );
}

/// A cursor presented in `Sync` can raise where a group's catch-up starts,
/// never lower it below the user's stored cursor: a kicked user with an
/// undelivered inbox entry must not pull the history from before their
/// join by presenting a low cursor.
#[test]
fn a_low_sync_cursor_does_not_replay_a_groups_history_from_before_the_join() {
    let server = TestServer::start();
    let owner = server.user_on_shard("owner", 0);
    let victim = server.user_on_shard("victim", 1);
    let mut o = server.login_unsynced(&owner);
    let group = group_on_shard(&mut o, 0, server.shards(), true);
    let conv = ConvId::Group { group };
    for i in 1..=50u64 {
        assert_eq!(
            o.send_group_text(group, &format!("before {i}"))
                .expect("send")
                .seq,
            i
        );
    }
    let mut v = server.login_unsynced(&victim);
    v.group_join(group).expect("join");
    assert_eq!(o.send_group_text(group, "while a member").expect("send").seq, 51);
    o.group_kick(group, victim.id).expect("kick");
    assert_eq!(
        code_of(v.history(conv, u64::MAX, false, 200)),
        ErrorCode::Forbidden
    );
    let mut raw = RawConn::connect(server.addr());
    raw.login(&victim);
    let id = raw.send(tern_client::ClientBody::Sync {
        cursors: vec![tern_client::proto::Cursor { conv, seq: 1 }],
    });
    let mut got = Vec::new();
    loop {
        let frame = raw.expect_frame();
        match frame.body {
            ServerBody::SyncDone { .. } if frame.request_id == id => break,
            ServerBody::Message(msg) if msg.conv == conv => got.push(msg.seq),
            _ => {}
        }
    }
    assert_eq!(got, vec![51], "only the message sent while a member");
}

/// A stranger's request about a group that is not cached is refused from
/// the store, without loading the group's member list into the cache
/// (which anyone could otherwise do for every group id, evicting groups in
/// use); a deleted group is NotFound and a stranger's leave is a no-op.
#[test]
fn a_join_the_store_refuses_does_not_load_the_group() {
    // Anyone may ask to join any group id. A join of an invite-only group
    // without an invite, or by a banned user, used to load the group's
    // roster (up to max_group_members rows, evicting groups in use) and
    // hold its sends at the membership fence, only for the store to
    // refuse it.
    let server = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let owner = server.user_on_shard("jowner", 0);
    let stranger = server.user_on_shard("jstranger", 1);
    let mut o = server.login(&owner);
    let closed = o.group_create_with("closed", false).expect("create");
    let open = o.group_create("open").expect("create");
    o.group_ban(open, stranger.id).expect("ban");
    let before = total(&admin, "tern_groups_cached");
    let mut s = server.login(&stranger);
    for _ in 0..3 {
        assert_eq!(code_of(s.group_join(closed)), ErrorCode::Forbidden);
        assert_eq!(code_of(s.group_join(open)), ErrorCode::Forbidden);
    }
    assert_eq!(code_of(s.group_join(u64::MAX - 1)), ErrorCode::NotFound);
    assert_eq!(
        total(&admin, "tern_groups_cached"),
        before,
        "a refused join loaded nothing"
    );
    // The answers the store gives: what the full join path gave.
    match s.request(tern_client::ClientBody::GroupJoin { group: closed }) {
        Err(tern_client::ClientError::Server { message, .. }) => {
            assert!(message.contains("invite-only"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    match s.request(tern_client::ClientBody::GroupJoin { group: open }) {
        Err(tern_client::ClientError::Server { message, .. }) => {
            assert!(message.contains("banned"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // An invite, or the ban lifted, and the same joins go through.
    o.group_invite(closed, stranger.id).expect("invite");
    s.group_join(closed).expect("invited join");
    o.group_unban(open, stranger.id).expect("unban");
    s.group_join(open).expect("join once unbanned");
    s.group_join(open).expect("joining again is Ok");
    assert_eq!(
        o.send_group_text(closed, "welcome").expect("send").seq,
        1,
        "the group works as before"
    );
}

#[test]
fn a_strangers_refused_request_does_not_load_the_group() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let owner = server.user_on_shard("gowner", 0);
    let stranger = server.user_on_shard("gstranger", 1);
    let mut o = server.login(&owner);
    let group = o.group_create("big").expect("create");
    let before = total(&admin, "tern_groups_cached");
    let mut s = server.login(&stranger);
    for body in [
        tern_client::ClientBody::GroupInfo { group },
        tern_client::ClientBody::GroupMembers { group },
        tern_client::ClientBody::GroupKick {
            group,
            user: owner.id,
        },
    ] {
        match s.request(body) {
            Err(tern_client::ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
            other => panic!("a stranger's request: {other:?}"),
        }
    }
    s.group_leave(group)
        .expect("leaving a group one is not in is a no-op");
    // A message (a recall too) and a typing hint are members' requests as well.
    assert_eq!(code_of(s.send_group_text(group, "hi")), ErrorCode::Forbidden);
    assert_eq!(
        code_of(s.recall(ConvId::Group { group }, 1)),
        ErrorCode::Forbidden
    );
    assert_eq!(code_of(s.typing(ConvId::Group { group })), ErrorCode::Forbidden);
    assert_eq!(total(&admin, "tern_groups_cached"), before, "nothing was loaded");
    // The owner's own request still loads and answers it.
    o.group_info(group).expect("the owner's info");
    assert_eq!(total(&admin, "tern_groups_cached"), before + 1);
    o.group_delete(group).expect("delete");
    assert_eq!(code_of(s.group_info(group)), ErrorCode::NotFound);
    assert_eq!(code_of(s.send_group_text(group, "hi")), ErrorCode::NotFound);
    assert_eq!(code_of(s.typing(ConvId::Group { group })), ErrorCode::NotFound);
}
