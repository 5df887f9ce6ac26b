//! Deleting a group, and purging what it leaves behind. It owns the
//! `group_purges` keyspace (group id -> (), the deletions whose data is
//! not yet all removed) and its in-memory mirror, [`Inner::purging`].
//!
//! A group can be large (members, invites, bans, a long history, and for
//! small groups an inbox entry per member per undelivered message), so
//! deleting it is two steps. [`Store::delete_group`] is one small synced
//! write: the group's record becomes a tombstone (the key stays, so the
//! id is never reused, and every lookup of the group finds nothing) and
//! the deletion is recorded in `group_purges`. From then on the group's
//! keys that remain are invisible: membership checks, a user's group list
//! and the inbox skip groups being purged. [`Store::purge_group_step`] then
//! removes the rest in batches of a bounded number of keys, so no write is
//! ever as large as the group; each step is idempotent, and the last one
//! removes the `group_purges` key, so a purge cut short by a crash resumes
//! where it stopped ([`Store::pending_group_purges`] lists what is left).

use std::collections::HashSet;

use tern_proto::ConvId;

use crate::codec;
use crate::{lock, now_unix_ms, GroupId, Inner, Store, StoreError, UserId};

/// Why someone other than the owner may not delete a group.
pub const ONLY_THE_OWNER_DELETES: &str = "only the group's owner can delete it";

impl Inner {
    /// Whether `group` was deleted and its data is not yet all purged.
    pub(crate) fn purging(&self, group: GroupId) -> bool {
        lock(&self.purging).contains(&group)
    }

    /// Adds to `batch` the removal of up to `budget` keys of `user`'s
    /// inbox entries for `conv`; returns how many.
    fn purge_inbox(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: UserId,
        conv: ConvId,
        budget: usize,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for guard in self
            .inbox
            .handle
            .prefix(codec::user_conv_key(user, conv))
            .take(budget)
        {
            batch.remove(&self.inbox.handle, guard.key()?);
            removed += 1;
        }
        Ok(removed)
    }
}

/// The deletions not yet purged, as stored: read once when the store opens.
pub(crate) fn load_purges(group_purges: &crate::Ks) -> Result<HashSet<GroupId>, StoreError> {
    let mut out = HashSet::new();
    for guard in group_purges.handle.iter() {
        let (key, value) = guard.into_inner()?;
        codec::check_empty(&value).map_err(|d| group_purges.corrupt(&key, d))?;
        out.insert(codec::decode_id_key(&key).map_err(|d| group_purges.corrupt(&key, d))?);
    }
    Ok(out)
}

impl Store {
    /// Deletes `group`, asked by `by`, who must be its owner (otherwise
    /// `Forbidden`; `NotFound` for a group that does not exist or was
    /// deleted). One synced write: from its return the group is gone for
    /// every lookup, its id is never reused, and its members, invites,
    /// bans, history, inbox entries and cursors wait for
    /// [`Store::purge_group_step`].
    pub fn delete_group(&self, group: GroupId, by: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let Some(record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        if record.owner != by {
            return Err(StoreError::Forbidden(ONLY_THE_OWNER_DELETES));
        }
        let mut batch = inner.db.batch();
        batch.insert(
            &inner.groups.handle,
            codec::id_key(group),
            codec::encode_group_tombstone(now_unix_ms()),
        );
        batch.insert(&inner.group_purges.handle, codec::id_key(group), []);
        // In the set before the tombstone is visible, so no reader sees
        // the group gone but its members, inbox and list entries still live.
        lock(&inner.purging).insert(group);
        let committed = inner.commit_unlocked(batch, guard);
        if committed.is_err() && inner.load_group(group).is_ok_and(|g| g.is_some()) {
            lock(&inner.purging).remove(&group);
        }
        committed
    }

    /// Removes up to about `budget` keys of a deleted group (at least one
    /// member's keys are always taken together with its inbox entries up
    /// to the budget): members with their `user_groups`, `receipts` and
    /// inbox entries for the group, then invites with their
    /// `user_invites`, then bans, then history. Returns `true` once
    /// nothing is left, when the group's `group_purges` key is removed
    /// too. Not synced: a purge lost in a crash is simply done again.
    pub fn purge_group_step(&self, group: GroupId, budget: usize) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        if !inner.purging(group) {
            return Ok(true);
        }
        let budget = budget.max(1);
        let conv = ConvId::Group { group };
        let mut batch = inner.db.batch();
        let mut removed = 0usize;
        for guard in inner.members.handle.prefix(codec::id_key(group)) {
            if removed >= budget {
                break;
            }
            let key = guard.key()?;
            let user = codec::decode_pair_second(&key).map_err(|d| inner.members.corrupt(&key, d))?;
            let left = budget.saturating_sub(removed);
            let inbox = inner.purge_inbox(&mut batch, user, conv, left)?;
            removed += inbox;
            if inbox == left {
                // More inbox entries may follow: the member stays for the
                // next step, which starts with them.
                break;
            }
            batch.remove(&inner.receipts.handle, codec::user_conv_key(user, conv));
            batch.remove(&inner.user_groups.handle, codec::pair_key(user, group));
            batch.remove(&inner.members.handle, key);
            removed += 3;
        }
        let lists = [
            (&inner.group_invites, Some(&inner.user_invites)),
            (&inner.group_bans, None),
        ];
        for (list, mirror) in lists {
            for guard in list.handle.prefix(codec::id_key(group)) {
                if removed >= budget {
                    break;
                }
                let key = guard.key()?;
                if let Some(mirror) = mirror {
                    let user = codec::decode_pair_second(&key).map_err(|d| list.corrupt(&key, d))?;
                    batch.remove(&mirror.handle, codec::pair_key(user, group));
                    removed += 1;
                }
                batch.remove(&list.handle, key);
                removed += 1;
            }
        }
        for guard in inner.history.handle.prefix(codec::conv_key(conv)) {
            if removed >= budget {
                break;
            }
            batch.remove(&inner.history.handle, guard.key()?);
            removed += 1;
        }
        let done = removed == 0;
        if done {
            batch.remove(&inner.group_purges.handle, codec::id_key(group));
        }
        inner.commit(batch, false)?;
        if done {
            lock(&inner.purging).remove(&group);
        }
        Ok(done)
    }

    /// The deleted groups whose purge is not finished, ascending.
    pub fn pending_group_purges(&self) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = lock(&self.inner.purging).iter().copied().collect();
        out.sort_unstable();
        out
    }
}
