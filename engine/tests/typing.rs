//! Typing hints over real sockets against an in-process server: pushed at
//! once to the other participants' live sessions (never to the typist's
//! own), for 1:1 conversations and groups homed on every shard; refused
//! for outsiders, across a block and for missing users or groups; not
//! forwarded in groups above the write-diffusion size; nothing stored.

mod common;

use common::*;
use tern_client::{Client, ConvId, ErrorCode, ServerBody};
use tern_proto::shard_of;

fn expect_typing(client: &mut Client) -> (ConvId, u64) {
    match expect_push(client) {
        ServerBody::Typing { conv, user } => (conv, user),
        other => panic!("expected a Typing push, got {other:?}"),
    }
}

#[test]
fn a_direct_typing_hint_reaches_the_peer_and_only_the_peer() {
    let server = TestServer::start();
    let shards = server.shards();
    for shard in 0..shards {
        let alice = server.user_on_shard(&format!("ta{shard}_"), 0);
        let bob = server.user_where(&format!("tb{shard}_"), |bob| {
            shard_of(ConvId::direct(alice.id, bob.id).placement_key(), shards) == shard
        });
        let mut a = server.login(&alice);
        let mut a2 = server.login(&alice);
        let mut b = server.login(&bob);
        let mut b2 = server.login(&bob);
        let conv = ConvId::direct(alice.id, bob.id);

        a.typing(conv).expect("typing");
        assert_eq!(expect_typing(&mut b), (conv, alice.id));
        assert_eq!(expect_typing(&mut b2), (conv, alice.id));
        expect_quiet(&mut [&mut a, &mut a2]);

        // Either way round, and with no message ever sent: nothing stored.
        b.typing(conv).expect("typing");
        assert_eq!(expect_typing(&mut a), (conv, bob.id));
        assert_eq!(expect_typing(&mut a2), (conv, bob.id));
        expect_quiet(&mut [&mut b, &mut b2]);
        assert!(a.history(conv, 0, true, 10).expect("history").is_empty());

        // A block silences it both ways, refused like a message.
        a.block_user(bob.id).expect("block");
        assert_eq!(code_of(b.typing(conv)), ErrorCode::Forbidden);
        assert_eq!(code_of(a.typing(conv)), ErrorCode::Forbidden);
        expect_quiet(&mut [&mut a, &mut a2, &mut b, &mut b2]);
    }
}

#[test]
fn typing_is_refused_to_outsiders_and_for_what_does_not_exist() {
    let server = TestServer::start();
    let alice = server.user_on_shard("tx_a", 0);
    let bob = server.user_on_shard("tx_b", 1 % server.shards());
    let carol = server.user_on_shard("tx_c", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut c = server.login(&carol);
    let theirs = ConvId::direct(alice.id, bob.id);
    assert_eq!(code_of(c.typing(theirs)), ErrorCode::Forbidden);
    assert_eq!(
        code_of(c.typing(ConvId::direct(carol.id, carol.id))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(c.typing(ConvId::direct(carol.id, 9_999))),
        ErrorCode::NotFound
    );
    assert_eq!(
        code_of(c.typing(ConvId::Group { group: 9_999 })),
        ErrorCode::NotFound
    );
    let group = a.group_create("typists").expect("group");
    assert_eq!(code_of(c.typing(ConvId::Group { group })), ErrorCode::Forbidden);
    expect_quiet(&mut [&mut a, &mut b, &mut c]);
}

#[test]
fn group_typing_reaches_every_other_member_on_every_shard() {
    let server = TestServer::start();
    let shards = server.shards();
    let mut setup = server.connect();
    let owner = server.user_on_shard("tg_owner", 0);
    let mut o = server.login(&owner);
    let mut o2 = server.login(&owner);
    let mut members: Vec<(User, Client)> = (0..shards)
        .map(|shard| {
            let user = register_on_shard(&mut setup, &format!("tg_m{shard}_"), shard, shards);
            let client = server.login(&user);
            (user, client)
        })
        .collect();
    for home in 0..shards {
        let group = group_on_shard(&mut o, home, shards, true);
        for (_, client) in members.iter_mut() {
            client.group_join(group).expect("join");
        }
        let conv = ConvId::Group { group };
        let typist = members[0].0.id;
        members[0].1.typing(conv).expect("typing");
        assert_eq!(expect_typing(&mut o), (conv, typist));
        assert_eq!(expect_typing(&mut o2), (conv, typist));
        for (_, client) in members.iter_mut().skip(1) {
            assert_eq!(expect_typing(client), (conv, typist));
        }
        let mut quiet: Vec<&mut Client> = members.iter_mut().map(|(_, c)| c).collect();
        quiet.push(&mut o);
        expect_quiet(&mut quiet);
    }
}

#[test]
fn typing_in_a_crowd_is_answered_and_not_forwarded() {
    // Groups of more than two members count as a crowd here.
    let server = TestServer::start_with(|config| config.write_diffusion_max_members = 2);
    let owner = server.user_on_shard("tc_owner", 0);
    let mut o = server.login(&owner);
    let group = o.group_create("crowd").expect("group");
    let conv = ConvId::Group { group };
    let mut setup = server.connect();
    let mut others: Vec<Client> = (0..2)
        .map(|i| {
            let user = register_on_shard(
                &mut setup,
                &format!("tc_m{i}_"),
                i % server.shards(),
                server.shards(),
            );
            let mut client = server.login(&user);
            client.group_join(group).expect("join");
            client
        })
        .collect();
    o.typing(conv).expect("typing is answered");
    let mut quiet: Vec<&mut Client> = others.iter_mut().collect();
    quiet.push(&mut o);
    expect_quiet(&mut quiet);
}

#[test]
fn a_reversed_direct_id_is_refused_and_cannot_slip_past_a_block() {
    let server = TestServer::start();
    let alice = server.user_on_shard("tr_a", 0);
    let bob = server.user_on_shard("tr_b", 0);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let conv = ConvId::direct(alice.id, bob.id);
    let ConvId::Direct { low, high } = conv else {
        unreachable!()
    };
    let reversed = ConvId::Direct { low: high, high: low };
    assert_eq!(code_of(a.typing(reversed)), ErrorCode::InvalidArgument);
    b.block_user(alice.id).expect("block");
    assert_eq!(code_of(a.typing(reversed)), ErrorCode::InvalidArgument);
    assert_eq!(code_of(a.typing(conv)), ErrorCode::Forbidden);
    // Unblocked: hints flow again.
    b.unblock_user(alice.id).expect("unblock");
    a.typing(conv).expect("typing");
    assert_eq!(expect_typing(&mut b), (conv, alice.id));
}
