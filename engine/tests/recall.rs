//! Recalls ("delete for everyone") over real sockets and a real store:
//! the sender withdraws a 1:1 or group message (conversations homed on
//! every shard); live peers get the `Recall` message, history and an
//! offline peer's sync serve the target erased (`Recalled`, no body), also
//! after a restart; refused for other users' messages, missing messages,
//! recalls, and after the recall window; a retry is answered like any.

mod common;

use std::time::Duration;

use common::*;
use tern_client::{ChatMessage, Client, Content, ContentKind, ConvId, ErrorCode};
use tern_proto::shard_of;

fn recall_of(message: &ChatMessage) -> Option<u64> {
    match message.content.kind {
        ContentKind::Recall { seq } => Some(seq),
        _ => None,
    }
}

fn assert_erased(message: &ChatMessage, seq: u64, from: u64) {
    assert_eq!((message.seq, message.from), (seq, from));
    assert_eq!(message.content.kind, ContentKind::Recalled);
    assert!(message.content.body.is_empty(), "content kept: {message:?}");
}

#[test]
fn a_direct_message_is_withdrawn_for_everyone_and_stays_erased() {
    let mut server = TestServer::start();
    let shards = server.shards();
    let mut pairs = Vec::new();
    for shard in 0..shards {
        let alice = server.user_on_shard(&format!("ra{shard}_"), 0);
        let bob = server.user_where(&format!("rb{shard}_"), |bob| {
            shard_of(ConvId::direct(alice.id, bob.id).placement_key(), shards) == shard
        });
        let carol = server.user_on_shard(&format!("rc{shard}_"), 0);
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        let conv = ConvId::direct(alice.id, bob.id);

        let secret = a.send_text(bob.id, "my card number is 1234").expect("send");
        let kept = a.send_text(bob.id, "see you").expect("send");
        assert_eq!(expect_message(&mut b).seq, secret.seq);
        assert_eq!(expect_message(&mut b).seq, kept.seq);

        // Only the sender may withdraw it; bob cannot, carol is no party.
        assert_eq!(code_of(b.recall(conv, secret.seq)), ErrorCode::Forbidden);
        let mut c = server.login(&carol);
        assert_eq!(
            code_of(c.send_direct(bob.id, 9, recall_content(secret.seq))),
            ErrorCode::NotFound
        );
        assert_eq!(code_of(a.recall(conv, 99)), ErrorCode::NotFound);

        let recall = a.recall(conv, secret.seq).expect("recall");
        let pushed = expect_message(&mut b);
        assert_eq!((pushed.seq, recall_of(&pushed)), (recall.seq, Some(secret.seq)));
        // A recall cannot be withdrawn.
        assert_eq!(code_of(a.recall(conv, recall.seq)), ErrorCode::InvalidArgument);

        let page = b.history(conv, 0, true, 10).expect("history");
        assert_eq!(page.len(), 3, "{page:?}");
        assert_erased(&page[0], secret.seq, alice.id);
        assert_eq!(page[1].content.body, b"see you");
        assert_eq!(recall_of(&page[2]), Some(secret.seq));
        pairs.push((alice, bob, conv, secret.seq));
    }

    // Erased in the store: still so after a restart.
    server.restart();
    for (alice, bob, conv, seq) in pairs {
        let mut b = server.login(&bob);
        let page = b.history(conv, 0, true, 1).expect("history");
        assert_erased(&page[0], seq, alice.id);
    }
}

fn recall_content(seq: u64) -> Content {
    Content {
        kind: ContentKind::Recall { seq },
        body: Vec::new(),
    }
}

#[test]
fn an_offline_member_syncs_the_erased_message_and_the_recall() {
    let server = TestServer::start();
    let shards = server.shards();
    let mut setup = server.connect();
    let owner = server.user_on_shard("rg_owner", 0);
    let mut o = server.login(&owner);
    for home in 0..shards {
        let group = group_on_shard(&mut o, home, shards, true);
        let member = register_on_shard(&mut setup, &format!("rg_m{home}_"), home, shards);
        let mut m = server.login(&member);
        m.group_join(group).expect("join");
        drop(m); // offline from here

        let conv = ConvId::Group { group };
        let sent = o.send_group_text(group, "oops, wrong group").expect("send");
        let recall = o.recall(conv, sent.seq).expect("recall");

        let mut m = server.login(&member);
        let first = expect_message(&mut m);
        assert_erased(&first, sent.seq, owner.id);
        let second = expect_message(&mut m);
        assert_eq!((second.seq, recall_of(&second)), (recall.seq, Some(sent.seq)));
        expect_no_message(&mut m);
        // A member cannot withdraw the owner's message.
        assert_eq!(code_of(m.recall(conv, sent.seq)), ErrorCode::Forbidden);
    }
}

#[test]
fn a_retried_recall_gets_its_ack_and_late_recalls_are_refused() {
    let server = TestServer::start_with(|config| config.recall_window = Duration::from_secs(1));
    let alice = server.user_on_shard("rr_a", 0);
    let bob = server.user_on_shard("rr_b", 1 % server.shards());
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let conv = ConvId::direct(alice.id, bob.id);
    let sent = a.send_text(bob.id, "hello").expect("send");
    expect_message(&mut b);

    let first = a
        .send_direct(bob.id, 4242, recall_content(sent.seq))
        .expect("recall");
    // The same client message id again: the original ack, nothing new.
    let again = a
        .send_direct(bob.id, 4242, recall_content(sent.seq))
        .expect("retry");
    assert_eq!((again.seq, again.timestamp_ms), (first.seq, first.timestamp_ms));
    assert_eq!(recall_of(&expect_message(&mut b)), Some(sent.seq));
    expect_no_message(&mut b);

    let late = a.send_text(bob.id, "too slow").expect("send");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(code_of(a.recall(conv, late.seq)), ErrorCode::Forbidden);
    let page = b.history(conv, late.seq, true, 1).expect("history");
    assert_eq!(page[0].content.body, b"too slow");
}

#[test]
fn a_server_with_no_recall_window_refuses_recalls() {
    let server = TestServer::start_with(|config| config.recall_window = Duration::ZERO);
    let alice = server.user_on_shard("rz_a", 0);
    let bob = server.user_on_shard("rz_b", 0);
    let mut a: Client = server.login(&alice);
    let sent = a.send_text(bob.id, "hello").expect("send");
    assert_eq!(
        code_of(a.recall(ConvId::direct(alice.id, bob.id), sent.seq)),
        ErrorCode::Forbidden
    );
    // Invalid recalls are refused before they reach a shard.
    assert_eq!(
        code_of(a.send_direct(bob.id, 5, recall_content(0))),
        ErrorCode::InvalidArgument
    );
    let erased = Content {
        kind: ContentKind::Recalled,
        body: Vec::new(),
    };
    assert_eq!(
        code_of(a.send_direct(bob.id, 6, erased)),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn outsiders_learn_nothing_about_a_groups_messages_from_recalls() {
    let server = TestServer::start();
    let owner = server.user_on_shard("ro_owner", 0);
    let outsider = server.user_on_shard("ro_out", 1 % server.shards());
    let mut o = server.login(&owner);
    let mut x = server.login(&outsider);
    let group = o.group_create("private-ish").expect("group");
    let sent = o.send_group_text(group, "members only").expect("send");
    let conv = ConvId::Group { group };
    // Existing or not, someone else's or not: the same answer.
    for seq in [sent.seq, sent.seq + 50] {
        match x.recall(conv, seq) {
            Err(tern_client::ClientError::Server { code, message, .. }) => {
                assert_eq!(
                    (code, message.as_str()),
                    (ErrorCode::Forbidden, "not a member of this group")
                );
            }
            other => panic!("expected Forbidden, got {other:?}"),
        }
    }
}
