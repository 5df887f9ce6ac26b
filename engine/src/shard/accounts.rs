//! Deleting the account of a user homed on this shard, and purging its
//! data.
//!
//! The user's `AccountDelete` (password checked) and the operator's
//! `delete-user` both end in the store's one synced write
//! (`storage::user_deletion`): from its return no login reaches the
//! account. Then, here on the user's home shard, where all of the user's
//! sessions live, every session gets `Disconnect { AccountDeleted }` after
//! whatever it has queued (the requesting session's `Ok` among it), and a
//! background task purges the account: first it leaves each of the user's
//! groups on the group's home shard ([`GroupOp::Depart`]: a leave that
//! hands a group the user owns to its senior admin or member not deleted
//! too, or deletes it if nobody else live is in it), then it removes the rest from the store in
//! bounded steps on the blocking pool, one step at a time per shard (the
//! permit group purges share). A purge cut short by a restart resumes
//! when the user's home shard starts ([`Shard::resume_user_purges`]).
//!
//! The checks on the message path (a `SendDirect`, a `Typing`, a block to
//! a deleted user is `NotFound`) ask the store's set of deleted accounts,
//! one bit per id shared by every shard (`storage::deleted_bits`): an
//! atomic load, no lock, and no copy per shard.

use std::rc::Rc;

use futures_channel::oneshot;
use tern_proto::{ErrorCode, UserId};
use tern_storage::USER_PURGE_STEP_KEYS;

use super::deletion::PURGE_RETRY;
use super::Shard;
use crate::mesh::{GroupOp, Request};

/// What a deleted account's sessions are told as they are closed.
pub const ACCOUNT_DELETED: &str = "this account was deleted";

/// Most rounds of group departures a purge makes: each round leaves every
/// group the store lists (at most `max_groups_per_user`); a group whose
/// home shard refused is tried again in the next round, after
/// [`PURGE_RETRY`].
const DEPART_ROUNDS_MAX: u32 = 64;

impl Shard {
    /// Whether `user` is an account that may be written to: assigned and
    /// not deleted. Checks memory only, without a lock.
    pub fn user_live(&self, user: UserId) -> bool {
        self.store.user_exists(user) && !self.store.is_deleted(user)
    }

    /// After the store deleted `user`'s account (the user is homed here):
    /// closes every session of the user, after what each has queued, and
    /// starts the purge. Returns how many sessions were closed.
    pub fn account_deleted(self: &Rc<Self>, user: UserId) -> usize {
        debug_assert_eq!(self.home_of(user), self.index);
        let mut closed = 0;
        self.for_each_session(user, None, |entry| {
            entry
                .outbox()
                .finish(ErrorCode::AccountDeleted, ACCOUNT_DELETED, 0);
            closed += 1;
        });
        self.spawn_user_purge(user);
        closed
    }

    /// Purges the deleted accounts homed here whose purge a restart cut
    /// short.
    pub fn resume_user_purges(self: &Rc<Self>) {
        for user in self.store.pending_user_purges() {
            if self.home_of(user) == self.index {
                self.spawn_user_purge(user);
            }
        }
    }

    fn spawn_user_purge(self: &Rc<Self>, user: UserId) {
        let shard = self.clone();
        glommio::spawn_local(async move { shard.purge_user(user).await }).detach();
    }

    /// Leaves the user's groups, then removes the account's data a step
    /// at a time, until none is left or the shard stops (the next start
    /// resumes it).
    async fn purge_user(self: Rc<Self>, user: UserId) {
        /// Counts the purge in the metrics for as long as its task runs.
        struct Running<'a>(&'a crate::metrics::ShardMetrics);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.user_purge(false);
            }
        }
        self.m().user_purge(true);
        let _running = Running(self.m());
        // The friends hear that the account went offline before the purge
        // removes the friendships: its sessions' own announcements, which
        // look the friendships up when each connection is torn down, can
        // come too late for that.
        match self.blocking(move |store| store.friends(user)).await {
            Ok(friends) => self.notify_friends(user, false, friends).await,
            Err(e) => {
                tracing::warn!(error = %e, user, "cannot load friends to say a deleted account is offline")
            }
        }
        if !self.depart_groups(user).await {
            return;
        }
        self.purge_in_steps("account", user, move |store| {
            store.purge_user_step(user, USER_PURGE_STEP_KEYS)
        })
        .await;
    }

    /// Has `user` leave every group they are in, each on its home shard;
    /// returns `false` if the shard is stopping or some group kept
    /// refusing (the next start tries again: the store's purge must not
    /// run while the user is still a member, or the group's member count
    /// would drift from its keys). The store lists the groups under the
    /// lock every join and creation checks the deletion under, so a list
    /// found empty stays empty.
    async fn depart_groups(self: &Rc<Self>, user: UserId) -> bool {
        for _ in 0..DEPART_ROUNDS_MAX {
            if self.stop.is_fired() {
                return false;
            }
            let groups = match self.blocking(move |store| store.groups_to_leave(user)).await {
                Ok(groups) => groups,
                Err(e) => {
                    tracing::error!(error = %e, user, "cannot list a deleted account's groups; retrying");
                    glommio::timer::sleep(PURGE_RETRY).await;
                    continue;
                }
            };
            if groups.is_empty() {
                return true;
            }
            let mut refused = false;
            for group in groups {
                let (reply, answer) = oneshot::channel();
                let request = Request::GroupAdmin {
                    user,
                    group,
                    op: GroupOp::Depart,
                    reply,
                };
                self.send_request(self.home_of(group), request).await;
                match answer.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(refusal)) => {
                        tracing::warn!(
                            user,
                            group,
                            message = refusal.message,
                            "deleted account's departure refused; retrying"
                        );
                        refused = true;
                    }
                    Err(_) => return false, // the group's shard is stopping
                }
            }
            if refused {
                glommio::timer::sleep(PURGE_RETRY).await;
            }
        }
        tracing::error!(
            user,
            "a deleted account is still in some group; its purge resumes at the next start"
        );
        false
    }
}
