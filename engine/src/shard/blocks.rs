//! Blocks between two users, enforced by the home shard of their 1:1
//! conversation, and everything else between the two that must be ordered
//! with a block or with the end of their friendship.
//!
//! A block is stored by the store (`blocks` keyspace, which also ends the
//! friendship), and enforced where every message between the two is
//! sequenced anyway: the conversation's cached state carries who blocks
//! whom ([`super::commit`]), so a message costs no store read for it. A
//! change therefore runs on that shard: the store is written, then the
//! cached state is updated, so no message is sequenced after it; a block
//! then waits until the messages sequenced before it are out (durable,
//! their deliveries queued) and only then answers, so no 1:1 message
//! between the two arrives after a block's `Ok`. Changes are serialised per shard
//! by one permit: two changes of the same pair cannot reach the cache in
//! the other order than they reached the store. The other pushes from one
//! of the two to the other (pair notices: `FriendRequest`,
//! `FriendAccepted`, `Invited`) go out from here too, under the same
//! permit, after a look at the stored blocks: one that a block overtook is
//! dropped, so none arrives after the block's `Ok`. Whoever sends one
//! makes its change in the store first and hands the push over to
//! [`Shard::pair_notice`] of this shard.
//!
//! Friendships end here too (`FriendRemove`, [`Shard::unfriend`]), under
//! the same permit, and the presence pushes between friends go out from
//! here (`super::presence`, in batches): a user's announcement, built from
//! a read of their friends that may be stale by now, is split by the shard
//! of each pair and looked at again under the permit, so no `Presence`
//! of an ex-friend arrives after the `Ok` of a `FriendRemove` or of a
//! block, which ends the friendship as well. Nothing else pushes from one
//! user to another outside a conversation.

use std::rc::Rc;

use tern_proto::session::Refusal;
use tern_proto::{ConvId, ErrorCode, ServerBody, ServerFrame, UserId};
use tern_storage::StoreError;

use super::{encode_shared, refusal, Encoded, Shard};
use crate::mesh::{Event, Recipients, Request};

impl Shard {
    /// `user` blocks `peer` (or, with `block` false, lifts that block);
    /// answers once the conversation's home shard (this one) enforces it.
    pub(super) async fn change_block(
        self: &Rc<Self>,
        user: UserId,
        peer: UserId,
        block: bool,
    ) -> Result<(), Refusal> {
        let _permit = self
            .pair_changes
            .acquire_permit(1)
            .await
            .map_err(|_| refusal(ErrorCode::ShuttingDown, "server is shutting down"))?;
        let conv = ConvId::direct(user, peer);
        let (low, high) = (user.min(peer), user.max(peer));
        let changed = self
            .blocking(move |store| {
                if block {
                    store.block(user, peer)?;
                } else {
                    store.unblock(user, peer)?;
                }
                store.blocks_between(low, high)
            })
            .await;
        match changed {
            Ok(blocks) => {
                self.convs.borrow_mut().set_blocks(conv, Some(blocks));
                if block {
                    self.settle_conv(conv).await;
                }
                Ok(())
            }
            Err(e) => {
                // A failed commit may still have landed: take the blocks
                // from the store again, or, if that fails too, drop the
                // cached state if no write holds it (the next message then
                // reads the store).
                let reread = self
                    .blocking(move |store| store.blocks_between(low, high))
                    .await
                    .ok();
                self.convs.borrow_mut().set_blocks(conv, reread);
                Err(match e {
                    StoreError::NotFound => refusal(ErrorCode::NotFound, "no such user"),
                    StoreError::InvalidArgument(why) => refusal(ErrorCode::InvalidArgument, why),
                    StoreError::LimitExceeded(why) => refusal(ErrorCode::LimitExceeded, why),
                    other => {
                        tracing::error!(error = %other, user, peer, "block store failure");
                        refusal(ErrorCode::Internal, "internal storage error; retry later")
                    }
                })
            }
        }
    }

    /// `user` ends their friendship with `peer` and drops the pending
    /// friend requests between them, either way; the answer is ready once
    /// no presence push between the two can follow it. `None` when the
    /// server is stopping (no answer).
    pub(super) async fn unfriend(
        self: &Rc<Self>,
        user: UserId,
        peer: UserId,
    ) -> Option<Result<(), StoreError>> {
        let _permit = self.pair_changes.acquire_permit(1).await.ok()?;
        Some(self.blocking(move |store| store.remove_friend(user, peer)).await)
    }

    /// Hands `body`, news from `from` to `to` of a change already stored,
    /// to the home shard of their 1:1 conversation, which pushes it to
    /// `to`'s live sessions unless a block between the two overtook it
    /// ([`Shard::pair_notice`]). Returns once the push is queued there
    /// (or dropped).
    ///
    /// Waiting for that is the back-pressure of pair notices: that shard
    /// runs each as a task waiting for its permit of pair changes, which a
    /// block change holds across its store write, so while a disk stalls
    /// there, requesters that did not wait would pile up tasks at the rate
    /// they ask. Waiting, each caller (a session's `FriendAdd`, a group's
    /// `Invite`, which a session awaits too) has at most one notice there,
    /// and its session stops reading its socket meanwhile: the tasks are
    /// bounded by the sessions. It cannot deadlock: the caller holds no
    /// permit (an invite lets its group's go first), and the permit's
    /// holders wait only on the store, on their shard's committer and on
    /// event queues, whose consumers never wait.
    pub(crate) async fn send_pair_notice(self: &Rc<Self>, from: UserId, to: UserId, body: ServerBody) {
        let push = ServerFrame { request_id: 0, body };
        let frame = encode_shared(&push, self.config.max_frame_bytes);
        let home = self.home_of(ConvId::direct(from, to).placement_key());
        let (queued, done) = futures_channel::oneshot::channel();
        let notice = Request::PairNotice {
            from,
            to,
            frame,
            queued,
        };
        self.send_request(home, notice).await;
        // Dropped unsent: the push is queued or dropped (or the shard stops).
        let _ = done.await;
    }

    /// Pushes `frame`, news from `from` to `to` of a change already
    /// stored (a friend request, its acceptance, a group invite), to
    /// `to`'s live sessions, unless either blocks the other by now. For
    /// the home shard of their 1:1 conversation only. Holds the permit of
    /// pair changes while it looks and queues the push: a block of the
    /// pair is either in the store before the look (no push) or starts
    /// after the push is queued, ahead of the block's `Ok`. Best effort: a
    /// failed look drops it.
    pub(super) async fn pair_notice(self: &Rc<Self>, from: UserId, to: UserId, frame: Encoded) {
        let Ok(_permit) = self.pair_changes.acquire_permit(1).await else {
            return;
        };
        match self.blocking(move |store| store.blocks_between(from, to)).await {
            Ok(blocks) if !blocks.any() => {}
            Ok(_) => return,
            Err(e) => return tracing::warn!(error = %e, from, to, "pair notice dropped"),
        }
        let notify = Event::Notify {
            to: Recipients::One(to),
            frame,
        };
        self.send_event(self.home_of(to), notify).await;
    }
}
