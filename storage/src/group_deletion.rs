//! Deleting a group, and purging what it leaves behind. It owns the
//! `group_purges` keyspace (group id -> (), the deletions whose data is
//! not yet all removed) and its in-memory mirror, [`Inner::purging`],
//! which also keeps where each purge has got to.
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
//! ever as large as the group; each step starts where the last one stopped
//! (an LSM tree keeps removed keys as tombstones for a while, and walking
//! over them again at every step would make a long purge quadratic), and
//! the last one removes the `group_purges` key, so a purge cut short by a
//! crash starts over, idempotently, after the restart
//! ([`Store::pending_group_purges`] lists what is left).

use std::collections::HashMap;

use tern_proto::ConvId;

use crate::codec;
use crate::{lock, now_unix_ms, GroupId, Inner, Store, StoreError, UserId};

/// Why someone other than the owner may not delete a group.
pub const ONLY_THE_OWNER_DELETES: &str = "only the group's owner can delete it";

/// Where a group's purge has got to. In memory only: after a restart a
/// purge starts from the beginning again, which finds what is left.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PurgeCursor {
    phase: Phase,
    /// Members with ids up to this one are gone, with all their keys.
    members_done: UserId,
    /// History entries up to this seq are gone.
    history_done: u64,
}

/// What a purge removes, in this order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Each member with their inbox entries, cursor and `user_groups` key.
    #[default]
    Members,
    /// Invites (with their `user_invites` mirrors) and bans: bounded lists.
    Lists,
    /// The group's history.
    History,
}

impl Inner {
    /// Whether `group` was deleted and its data is not yet all purged.
    pub(crate) fn purging(&self, group: GroupId) -> bool {
        lock(&self.purging).contains_key(&group)
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
            batch.remove(&self.inbox.handle, self.inbox.key_of(guard)?);
            removed += 1;
        }
        Ok(removed)
    }

    /// Adds to `batch` the removal of members of `group` after
    /// `cursor.members_done`, with their keys, up to about `budget` keys;
    /// returns how many and whether no member is left.
    fn purge_members(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        group: GroupId,
        cursor: &mut PurgeCursor,
        budget: usize,
    ) -> Result<(usize, bool), StoreError> {
        let Some(from) = cursor.members_done.checked_add(1) else {
            return Ok((0, true));
        };
        let conv = ConvId::Group { group };
        let mut removed = 0;
        let range = codec::pair_key(group, from)..=codec::pair_key(group, UserId::MAX);
        for guard in self.members.handle.range(range) {
            if removed >= budget {
                return Ok((removed, false));
            }
            let key = self.members.key_of(guard)?;
            let user = codec::decode_pair_second(&key).map_err(|d| self.members.corrupt(&key, d))?;
            let left = budget - removed;
            let inbox = self.purge_inbox(batch, user, conv, left)?;
            removed += inbox;
            if inbox == left {
                // More inbox entries may follow: this member is taken up
                // again by the next step.
                return Ok((removed, false));
            }
            batch.remove(&self.receipts.handle, codec::user_conv_key(user, conv));
            batch.remove(&self.user_groups.handle, codec::pair_key(user, group));
            batch.remove(&self.members.handle, key);
            removed += 3;
            cursor.members_done = user;
        }
        Ok((removed, true))
    }

    /// Adds to `batch` the removal of `group`'s invites (with their
    /// mirrors) and bans, up to `budget` keys; returns how many and
    /// whether none is left. The lists are bounded (`max_group_invites`,
    /// `max_group_bans`), so each call scans them from the start.
    fn purge_lists(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        group: GroupId,
        budget: usize,
    ) -> Result<(usize, bool), StoreError> {
        let mut removed = 0;
        let lists = [
            (&self.group_invites, Some(&self.user_invites)),
            (&self.group_bans, None),
        ];
        for (list, mirror) in lists {
            for guard in list.handle.prefix(codec::id_key(group)) {
                if removed >= budget {
                    return Ok((removed, false));
                }
                let key = list.key_of(guard)?;
                if let Some(mirror) = mirror {
                    let user = codec::decode_pair_second(&key).map_err(|d| list.corrupt(&key, d))?;
                    batch.remove(&mirror.handle, codec::pair_key(user, group));
                    removed += 1;
                }
                batch.remove(&list.handle, key);
                removed += 1;
            }
        }
        // The whole of both lists is in `batch`: the next call would only
        // find the same keys again (the batch is not committed yet).
        Ok((removed, true))
    }

    /// Adds to `batch` the removal of `conv`'s history after
    /// `cursor.history_done`, up to `budget` entries; returns how many and
    /// whether none is left.
    fn purge_history(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        conv: ConvId,
        cursor: &mut PurgeCursor,
        budget: usize,
    ) -> Result<(usize, bool), StoreError> {
        let Some(from) = cursor.history_done.checked_add(1) else {
            return Ok((0, true));
        };
        let mut removed = 0;
        let range = codec::history_key(conv, from)..=codec::history_key(conv, u64::MAX);
        for guard in self.history.handle.range(range) {
            if removed >= budget {
                return Ok((removed, false));
            }
            let key = self.history.key_of(guard)?;
            let (_, seq) = codec::decode_history_key(&key).map_err(|d| self.history.corrupt(&key, d))?;
            batch.remove(&self.history.handle, key);
            removed += 1;
            cursor.history_done = seq;
        }
        Ok((removed, true))
    }
}

/// The deletions not yet purged, as stored: read once when the store opens.
pub(crate) fn load_purges(group_purges: &crate::Ks) -> Result<HashMap<GroupId, PurgeCursor>, StoreError> {
    let mut out = HashMap::new();
    for guard in group_purges.handle.iter() {
        let (key, value) = group_purges.entry(guard)?;
        codec::check_empty(&value).map_err(|d| group_purges.corrupt(&key, d))?;
        let group = codec::decode_id_key(&key).map_err(|d| group_purges.corrupt(&key, d))?;
        out.insert(group, PurgeCursor::default());
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
        lock(&inner.purging).insert(group, PurgeCursor::default());
        let committed = inner.commit_unlocked(batch, guard);
        if committed.is_err() && inner.load_group(group).is_ok_and(|g| g.is_some()) {
            lock(&inner.purging).remove(&group);
        }
        committed
    }

    /// Removes up to about `budget` keys of a deleted group (a member's
    /// cursor and list keys always go together, after their inbox
    /// entries): members with their inbox entries for the group, cursors
    /// and `user_groups` keys, then invites with their `user_invites`
    /// mirrors and bans, then history, each step going on from where the
    /// last stopped. Returns `true` once nothing is left, when the group's
    /// `group_purges` key is removed too. Not synced: a purge lost in a
    /// crash is simply done again.
    pub fn purge_group_step(&self, group: GroupId, budget: usize) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let Some(mut cursor) = lock(&inner.purging).get(&group).copied() else {
            return Ok(true);
        };
        let budget = budget.max(1);
        let conv = ConvId::Group { group };
        let mut batch = inner.db.batch();
        let mut removed = 0usize;
        let mut done = false;
        while removed < budget && !done {
            let left = budget - removed;
            let (taken, finished) = match cursor.phase {
                Phase::Members => inner.purge_members(&mut batch, group, &mut cursor, left)?,
                Phase::Lists => inner.purge_lists(&mut batch, group, left)?,
                Phase::History => inner.purge_history(&mut batch, conv, &mut cursor, left)?,
            };
            removed += taken;
            if finished {
                match cursor.phase {
                    Phase::Members => cursor.phase = Phase::Lists,
                    Phase::Lists => cursor.phase = Phase::History,
                    Phase::History => done = true,
                }
            }
        }
        if done {
            batch.remove(&inner.group_purges.handle, codec::id_key(group));
        }
        inner.commit(batch, false)?;
        let mut purging = lock(&inner.purging);
        if done {
            purging.remove(&group);
        } else if let Some(at) = purging.get_mut(&group) {
            *at = cursor;
        }
        Ok(done)
    }

    /// The deleted groups whose purge is not finished, ascending.
    pub fn pending_group_purges(&self) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = lock(&self.inner.purging).keys().copied().collect();
        out.sort_unstable();
        out
    }
}
