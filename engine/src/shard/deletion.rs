//! Deleting a group homed on this shard, and purging its data.
//!
//! The owner's `GroupDelete` runs under the group's permit, like every
//! change: the store turns the group's record into a tombstone (one small
//! synced write, see `storage::group_deletion`), then the cached member
//! list is dropped, so no message is sequenced for the group after the
//! `Ok`. Messages sequenced just before may still be committing: the
//! deletion waits until the last of them is durable and its deliveries are
//! on their way, then pushes `GroupDeleted` to every member, so on each
//! member's queue the push comes after the group's last message. Finally a
//! background task removes the group's members, invites, bans, history,
//! inbox entries and cursors from the store in bounded steps on the
//! blocking pool; a purge cut short by a restart resumes when the group's
//! home shard starts ([`Shard::resume_group_purges`]).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tern_proto::{ConvId, GroupId, ServerBody, ServerFrame, UserId};
use tern_storage::{Store, StoreError};

use super::{encode_shared, Shard, NOTICE_SEQ};
use crate::mesh::{Event, GroupAnswer, GroupReply, Recipients};

/// Keys one purge step removes at most: one store batch of about 100 KB,
/// so a purge never holds a blocking thread or the journal for long.
const PURGE_STEP_KEYS: usize = 1024;

/// How long a failed purge step (or an account purge's group departure)
/// waits before it is tried again.
pub(super) const PURGE_RETRY: Duration = Duration::from_secs(1);

impl Shard {
    /// Deletes `group` for its owner `by` (checked by the caller, under
    /// the group's permit, which the caller holds).
    pub(super) async fn delete_group(self: &Rc<Self>, group: GroupId, by: UserId) -> GroupReply {
        let deleted = self.blocking(move |store| store.delete_group(group, by)).await;
        if let Err(e) = deleted {
            // A failed sync may still have left the tombstone in place,
            // visible to every lookup: then the deletion happened, and the
            // rest of it must follow, or members would go on sending to a
            // group the store no longer knows.
            let refused = matches!(e, StoreError::NotFound | StoreError::Forbidden(_));
            let landed = !refused
                && self
                    .blocking(move |store| store.group(group))
                    .await
                    .is_ok_and(|record| record.is_none());
            if !landed {
                return Err(super::groups::store_refusal(e, group, "no such group"));
            }
            tracing::error!(error = %e, group, "group deletion failed to sync but is visible; completing it");
        }
        // Cached, since the caller holds its permit. Joins still queued
        // find the group gone when they get the permit.
        let state = {
            let mut cache = self.groups.borrow_mut();
            let state = cache.remove(group);
            self.note_group_cache(&cache);
            state
        };
        let conv = ConvId::Group { group };
        self.settle_conv(conv).await;
        self.convs.borrow_mut().forget_idle(conv);
        let push = ServerFrame {
            request_id: 0,
            body: ServerBody::GroupDeleted { group, by },
        };
        let frame = encode_shared(&push, self.config.max_frame_bytes);
        for (shard, members) in state.iter().flat_map(|state| state.members_by_shard()) {
            // On the delivery path, behind the group's last messages on
            // each member's queue and in each catch-up (see NOTICE_SEQ).
            let notice = Event::Deliver {
                to: Recipients::Many(Arc::clone(members)),
                conv,
                seq: NOTICE_SEQ,
                frame: frame.clone(),
                skip: None,
            };
            self.send_event(shard, notice).await;
        }
        self.spawn_purge(group);
        Ok(GroupAnswer::Done)
    }

    /// Waits until every message of `conv` sequenced so far is durable and
    /// the batch that committed the last of them has run all its effects
    /// (its deliveries are queued to the members' shards).
    pub(super) async fn settle_conv(&self, conv: ConvId) {
        self.conv_quiet(conv).await;
        if self.committing.get() {
            let batch = self.settled.get();
            std::future::poll_fn(|cx| {
                if self.settled.get() != batch {
                    return std::task::Poll::Ready(());
                }
                super::add_waiter(&mut self.settle_waiters.borrow_mut(), cx.waker());
                std::task::Poll::Pending
            })
            .await;
        }
    }

    /// Purges the deleted groups homed here whose purge a restart cut short.
    pub fn resume_group_purges(self: &Rc<Self>) {
        for group in self.store.pending_group_purges() {
            if self.home_of(group) == self.index {
                self.spawn_purge(group);
            }
        }
    }

    fn spawn_purge(self: &Rc<Self>, group: GroupId) {
        let shard = self.clone();
        glommio::spawn_local(async move { shard.purge_group(group).await }).detach();
    }

    /// Removes a deleted group's data, a step at a time, until none is
    /// left or the shard stops (the next start resumes it).
    async fn purge_group(&self, group: GroupId) {
        /// Counts the purge in the metrics for as long as its task runs.
        struct Running<'a>(&'a crate::metrics::ShardMetrics);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.group_purge(false);
            }
        }
        self.m().group_purge(true);
        let _running = Running(self.m());
        self.purge_in_steps("group", group, move |store| {
            store.purge_group_step(group, PURGE_STEP_KEYS)
        })
        .await;
    }

    /// Runs a purge (a deleted group's or account's) to its end: `step`
    /// on the blocking pool, one step at a time per shard under the purge
    /// permit, until it reports nothing left or the shard stops (the next
    /// start resumes it). A failed step is logged and tried again after
    /// [`PURGE_RETRY`].
    pub(super) async fn purge_in_steps<F>(&self, what: &'static str, id: u64, step: F)
    where
        F: Fn(&Store) -> Result<bool, StoreError> + Clone + Send + 'static,
    {
        let mut steps = 0u64;
        loop {
            if self.stop.is_fired() {
                return;
            }
            steps += 1;
            let Ok(_step) = self.purge_steps.acquire_permit(1).await else {
                return; // closed: the shard is stopping
            };
            match self.blocking(step.clone()).await {
                Ok(true) => {
                    tracing::info!(id, steps, "deleted {what} purged");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, id, "{what} purge step failed; retrying");
                    glommio::timer::sleep(PURGE_RETRY).await;
                }
            }
        }
    }
}
