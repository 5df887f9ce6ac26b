//! Deleting an account, and purging what it leaves behind. It owns the
//! `deleted_users` keyspace (user id -> when the account was deleted,
//! kept forever), the `user_purges` keyspace (user id -> (), the
//! deletions whose data is not yet all removed) and their in-memory
//! mirrors, [`crate::deleted_bits::DeletedBits`] and [`UserPurgeCursor`].
//!
//! An account can have a lot attached to it (an inbox, a conversation
//! index, friends, requests, blocks, invites), so deleting it is two steps,
//! as deleting a group is (`group_deletion`). [`Store::delete_account`] is
//! one small synced write: the `accounts` and `users` records go (the name
//! is free for a new registration; the id is never reused, since
//! `deleted_users` keeps it), every token is revoked, and the deletion is
//! recorded in `deleted_users` and `user_purges`. From then on no login of
//! any kind reaches the account and every list of another user's (friends,
//! requests, blocks) or of a group's (invites) skips it.
//! [`Store::purge_user_step`] then removes the rest in batches of a bounded
//! number of keys, both sides of each relation together: friendships,
//! friend requests either way, blocks either way, invites held (with their
//! groups' invite counts), inbox entries, departure records (what the user
//! was owed from groups they left, the engine's departures at the deletion
//! included), receipt cursors, the conversation indexes (`user_convs`
//! and `recent_convs`) and any token left.
//! Each phase goes on from the last key it removed; the last step removes
//! the revocation record and the `user_purges` key, so a purge cut short
//! by a crash starts over, idempotently, after the restart
//! ([`Store::pending_user_purges`]). Group memberships are not removed
//! here: the engine leaves each group first, on the group's home shard, as
//! a `GroupLeave` would, until [`Store::groups_to_leave`] finds none.
//!
//! No key naming the account is written after the purge has passed its
//! kind. Every write that can add one (a membership, an invite, a
//! friendship, a request, a block) checks the deletion under the lock
//! that serialises it ([`Inner::may_name`]), and the purge lists or
//! removes that kind under the same lock: a write that checked before the
//! mark is committed before the purge reads, and one that checks after is
//! refused.
//!
//! What stays: history. Messages the user sent stay in their
//! conversations, attributed to the id, so the other party's history and
//! sync never find a hole; messages others sent them stay in the others'
//! history too.
//!
//! A message to the account sequenced just before the deletion may still
//! be in the [`crate::Writer`]'s queue. The writer drops inbox entries,
//! receipts, index keys and departure ends of deleted accounts, and holds
//! [`crate::Inner`]'s deletion gate from that check to its commit; a
//! deletion takes the gate to mark the account, so once marked, every
//! batch that missed the mark is committed, and the purge, which starts
//! after, finds its keys.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;

use crate::accounts::PasswordChecked;
use crate::deleted_bits::{DeletedBits, MAX_USER_ID};
use crate::external::NO_PASSWORD;
use crate::{codec, lock, now_unix_ms, GroupId, Inner, Ks, Store, StoreError, UserId};

/// Why an account without a password (made by a JWT login) cannot be
/// deleted by its user: there is nothing to re-prove, and the operator's
/// login system, which owns that identity, decides (`ternd admin
/// delete-user`).
pub const NO_PASSWORD_TO_CHECK: &str =
    "this account has no password (it logs in through your organisation's login system); ask the operator to delete it";

/// Keys one purge step removes at most: one store batch of about 100 KB,
/// as for a group's purge.
pub const USER_PURGE_STEP_KEYS: usize = 1024;

/// Where an account's purge has got to. In memory only: after a restart
/// a purge starts from the beginning again, which finds what is left.
#[derive(Debug, Default, Clone)]
pub(crate) struct UserPurgeCursor {
    phase: Phase,
    /// The last key this phase removed: the next step starts after it, not
    /// over the tombstones of the keys it removed.
    after: Option<Vec<u8>>,
}

/// What a purge removes, in this order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// `user ++ friend` and `friend ++ user` in `friends`.
    #[default]
    Friends,
    /// The user's requests out, with their `requests_in` mirrors.
    RequestsOut,
    /// The requests to the user, with their `requests_out` mirrors.
    RequestsIn,
    /// Whom the user blocks, with the `blocked_by` mirrors.
    BlocksOut,
    /// Who blocks the user, with the `blocks` keys.
    BlocksIn,
    /// Invites held, with their mirrors and their groups' invite counts.
    Invites,
    /// The inbox.
    Inbox,
    /// What the user is owed from groups they left (`departures`): one
    /// record per group the engine's departures at the deletion left,
    /// and any older ones.
    Departures,
    /// Receipt cursors.
    Receipts,
    /// The 1:1 conversation index (the other party's stays).
    Conversations,
    /// The 1:1 conversations by recency (`recent_convs`; the other
    /// party's stays).
    Recency,
    /// Tokens left (the deletion revoked them; one issued by a login that
    /// raced it is found here).
    Tokens,
}

impl Phase {
    fn next(self) -> Option<Phase> {
        Some(match self {
            Phase::Friends => Phase::RequestsOut,
            Phase::RequestsOut => Phase::RequestsIn,
            Phase::RequestsIn => Phase::BlocksOut,
            Phase::BlocksOut => Phase::BlocksIn,
            Phase::BlocksIn => Phase::Invites,
            Phase::Invites => Phase::Inbox,
            Phase::Inbox => Phase::Departures,
            Phase::Departures => Phase::Receipts,
            Phase::Receipts => Phase::Conversations,
            Phase::Conversations => Phase::Recency,
            Phase::Recency => Phase::Tokens,
            Phase::Tokens => return None,
        })
    }
}

/// The deleted accounts, as stored: read once when the store opens.
pub(crate) fn load_deleted(deleted_users: &Ks) -> Result<DeletedBits, StoreError> {
    let out = DeletedBits::new();
    for guard in deleted_users.handle.iter() {
        let (key, value) = deleted_users.entry(guard)?;
        codec::decode_revocation(&value).map_err(|d| deleted_users.corrupt(&key, d))?;
        let user = codec::decode_id_key(&key).map_err(|d| deleted_users.corrupt(&key, d))?;
        if out.insert(user).is_none() {
            let why = format!("user id {user} is past the highest the store assigns ({MAX_USER_ID})");
            return Err(deleted_users.corrupt(&key, why));
        }
    }
    Ok(out)
}

/// The deletions not yet purged, as stored: read once when the store opens.
pub(crate) fn load_purges(user_purges: &Ks) -> Result<HashMap<UserId, UserPurgeCursor>, StoreError> {
    let mut out = HashMap::new();
    for guard in user_purges.handle.iter() {
        let (key, value) = user_purges.entry(guard)?;
        codec::check_empty(&value).map_err(|d| user_purges.corrupt(&key, d))?;
        let user = codec::decode_id_key(&key).map_err(|d| user_purges.corrupt(&key, d))?;
        out.insert(user, UserPurgeCursor::default());
    }
    Ok(out)
}

impl Inner {
    /// Whether `user`'s account was deleted. No lock.
    pub(crate) fn is_deleted(&self, user: UserId) -> bool {
        self.deleted.contains(user)
    }

    /// Whether a new key may name `user`: a registered account, not
    /// deleted. Call it under the lock that serialises the write (the
    /// groups lock for memberships and invites, the friends lock for
    /// friendships, requests and blocks), which the purge takes too for
    /// what it removes of that kind: a write that checked before the
    /// deletion is committed before the purge reads, and one that checks
    /// after is refused, so no such key outlives the purge.
    pub(crate) fn may_name(&self, user: UserId) -> Result<bool, StoreError> {
        Ok(!self.is_deleted(user) && self.user_exists(user)?)
    }

    /// Drops the deleted accounts from `users` (a list of another user's
    /// friends, requests or blocks, or of a group's invites, whose keys
    /// may await the purge).
    pub(crate) fn retain_live(&self, users: &mut Vec<UserId>) {
        if self.deleted.count() > 0 {
            users.retain(|&user| !self.deleted.contains(user));
        }
    }

    /// [`Ks::pairs_after`] of `ks` passing over deleted accounts (whose
    /// keys may await the purge).
    pub(crate) fn live_pairs_after(
        &self,
        ks: &Ks,
        first: u64,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        if self.deleted.count() == 0 {
            return ks.pairs_after(first, after, limit);
        }
        ks.pairs_after_where(first, after, limit, |user| !self.deleted.contains(user))
    }

    /// Runs `f` with the set of deleted accounts while holding the
    /// deletion gate, which the caller keeps until its batch is committed
    /// (the writer: see the module docs). `None` and no lock when no
    /// account was ever deleted.
    pub(crate) fn deletion_gate<T>(
        &self,
        f: impl FnOnce(&DeletedBits) -> T,
    ) -> Option<(std::sync::MutexGuard<'_, ()>, T)> {
        if self.deleted.count() == 0 {
            return None;
        }
        let gate = lock(&self.deletion_gate);
        let out = f(&self.deleted);
        Some((gate, out))
    }

    /// Marks `user` deleted in memory, under the deletion gate. The id is
    /// an assigned one (its account was just read), so within the
    /// bitmap's range.
    fn mark_deleted(&self, user: UserId) {
        let _gate = lock(&self.deletion_gate);
        let marked = self.deleted.insert(user);
        debug_assert!(marked.is_some(), "assigned ids are at most MAX_USER_ID");
    }

    /// The upper end of `user`'s keys in a `user ++ ...` keyspace.
    fn prefix_end(user: UserId) -> Bound<Vec<u8>> {
        match user.checked_add(1) {
            Some(next) => Bound::Excluded(codec::id_key(next).to_vec()),
            None => Bound::Unbounded,
        }
    }

    /// Adds to `batch` the removal of up to `budget` keys of `user`'s in
    /// `ks` after `cursor.after`, each with the keys `mirror` names for
    /// it; returns how many keys and whether none is left.
    fn purge_prefix(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        ks: &Ks,
        user: UserId,
        cursor: &mut UserPurgeCursor,
        budget: usize,
        mirror: impl Fn(&mut fjall::OwnedWriteBatch, &[u8]) -> Result<usize, StoreError>,
    ) -> Result<(usize, bool), StoreError> {
        let start = match &cursor.after {
            Some(after) => Bound::Excluded(after.clone()),
            None => Bound::Included(codec::id_key(user).to_vec()),
        };
        let mut removed = 0;
        for guard in ks.handle.range((start, Inner::prefix_end(user))) {
            if removed >= budget {
                return Ok((removed, false));
            }
            let key = ks.key_of(guard)?;
            removed += mirror(batch, &key)?;
            batch.remove(&ks.handle, key.clone());
            removed += 1;
            cursor.after = Some(key.to_vec());
        }
        Ok((removed, true))
    }

    /// The second id of a `user ++ other` key.
    fn other(ks: &Ks, key: &[u8]) -> Result<UserId, StoreError> {
        codec::decode_pair_second(key).map_err(|d| ks.corrupt(key, d))
    }

    /// Removes up to `budget` of `user`'s pending invites, each with its
    /// mirror and its group's invite count, in one batch under the groups
    /// lock (the counts are read-modify-write). The list is bounded by
    /// `max_invites_per_user`, so each call scans it from the start.
    fn purge_invites(&self, user: UserId, budget: usize) -> Result<bool, StoreError> {
        let guard = lock(&self.groups_lock);
        let mut batch = self.db.batch();
        let mut removed = 0;
        let mut done = true;
        for guard in self.user_invites.handle.prefix(codec::id_key(user)) {
            if removed >= budget {
                done = false;
                break;
            }
            let key = self.user_invites.key_of(guard)?;
            let group = Inner::other(&self.user_invites, &key)?;
            match self.load_group(group)? {
                Some(mut record) => {
                    self.drop_invite(&mut batch, &mut record, group, user);
                    self.put_group(&mut batch, group, &record);
                }
                None => {
                    // Deleted: its own purge takes the rest.
                    batch.remove(&self.group_invites.handle, codec::pair_key(group, user));
                    batch.remove(&self.user_invites.handle, key);
                }
            }
            removed += 2;
        }
        self.commit_unlocked(batch, guard)?;
        Ok(done)
    }
}

impl Store {
    /// Deletes `user`'s account (the operator's `delete-user`, or the
    /// user's own request once its password is checked): one synced
    /// write removes the `accounts` and `users` records and every token,
    /// and records the deletion. Returns the name the account had, which
    /// is free from now on. `NotFound` for an id that is not a live
    /// account (never registered, or deleted already). The rest waits for
    /// [`Store::purge_user_step`].
    pub fn delete_account(&self, user: UserId) -> Result<String, StoreError> {
        self.delete_account_checked(user, None)
    }

    /// [`Store::delete_account`] for the user themself: `password` must be
    /// the account's (`AuthFailed` otherwise, checked off any lock as a
    /// login's is), and an account without one (made by a JWT login) is
    /// `Forbidden` ([`NO_PASSWORD_TO_CHECK`]).
    pub fn delete_own_account(&self, user: UserId, password: &[u8]) -> Result<String, StoreError> {
        let inner = &*self.inner;
        let username = self.username(user)?.ok_or(StoreError::NotFound)?;
        match inner.lookup_account(&username)? {
            Some((owner, phc)) if owner == user && phc == NO_PASSWORD => {
                return Err(StoreError::Forbidden(NO_PASSWORD_TO_CHECK));
            }
            Some((owner, _)) if owner == user => {}
            _ => return Err(StoreError::NotFound),
        }
        let (owner, phc) = inner.check_password(&username, password)?;
        if owner != user {
            return Err(StoreError::AuthFailed);
        }
        let checked = PasswordChecked {
            username: &username,
            phc: &phc,
        };
        self.delete_account_checked(user, Some(checked))
    }

    fn delete_account_checked(
        &self,
        user: UserId,
        checked: Option<PasswordChecked<'_>>,
    ) -> Result<String, StoreError> {
        let inner = &*self.inner;
        // As for a password change: no registration's check-then-insert of
        // the name interleaves with its removal, and no token is issued
        // between the sweep and the mark (issuing checks under this lock).
        let registering = lock(&inner.register_lock);
        let issuing = inner.token_lock(user);
        if inner.is_deleted(user) {
            return Err(StoreError::NotFound);
        }
        let username = self.username(user)?.ok_or(StoreError::NotFound)?;
        if let Some(checked) = &checked {
            if !inner.password_unchanged(checked)? {
                // Changed since it was checked: not the password any more.
                return Err(StoreError::AuthFailed);
            }
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.accounts.handle, username.as_bytes());
        batch.remove(&inner.users.handle, codec::id_key(user));
        batch.insert(
            &inner.deleted_users.handle,
            codec::id_key(user),
            codec::encode_revocation(now_unix_ms()),
        );
        batch.insert(&inner.user_purges.handle, codec::id_key(user), []);
        inner.sweep_tokens(&mut batch, user, u64::MAX, 0)?;
        let pending = inner.write(batch, true)?;
        // Written: readers see it from here, so mark it before anyone can
        // act on the store's answer, and before the locks go.
        lock(&inner.user_purging).insert(user, UserPurgeCursor::default());
        inner.mark_deleted(user);
        drop(issuing);
        drop(registering);
        inner.token_cache.revoke_user(user);
        inner.revocations.fetch_add(1, Ordering::AcqRel);
        inner.sync(pending)?;
        Ok(username)
    }

    /// Whether `user`'s account was deleted (memory only).
    pub fn is_deleted(&self, user: UserId) -> bool {
        self.inner.is_deleted(user)
    }

    /// How many accounts were ever deleted. No lock.
    pub fn deleted_count(&self) -> u64 {
        self.inner.deleted.count()
    }

    /// Removes up to about `budget` keys of a deleted account (see the
    /// module docs for what, in which order), each step going on from
    /// where the last stopped. Returns `true` once nothing is left, when
    /// the account's `user_purges` key is removed too. The caller removes
    /// the user from their groups first. Not synced: a purge lost in a
    /// crash is simply done again.
    pub fn purge_user_step(&self, user: UserId, budget: usize) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let Some(mut cursor) = lock(&inner.user_purging).get(&user).cloned() else {
            return Ok(true);
        };
        let budget = budget.max(1);
        if cursor.phase == Phase::Invites {
            if inner.purge_invites(user, budget)? {
                cursor = UserPurgeCursor {
                    phase: Phase::Inbox,
                    after: None,
                };
            }
            if let Some(at) = lock(&inner.user_purging).get_mut(&user) {
                *at = cursor;
            }
            return Ok(false);
        }
        // The phases up to `Invites` read and commit under the friends
        // lock, against which `add_friend` and `block` check the deletion
        // (see `Inner::may_name`); a step never runs past `Invites`.
        let friends_guard = (cursor.phase < Phase::Invites).then(|| lock(&inner.friends_lock));
        let mut batch = inner.db.batch();
        let mut removed = 0usize;
        let mut done = false;
        while removed < budget && !done && cursor.phase != Phase::Invites {
            let left = budget - removed;
            let c = &mut cursor;
            let b = &mut batch;
            let (taken, finished) = match c.phase {
                Phase::Friends => inner.purge_prefix(b, &inner.friends, user, c, left, |b, key| {
                    let other = Inner::other(&inner.friends, key)?;
                    b.remove(&inner.friends.handle, codec::pair_key(other, user));
                    Ok(1)
                })?,
                Phase::RequestsOut => {
                    inner.purge_prefix(b, &inner.requests_out, user, c, left, |b, key| {
                        let other = Inner::other(&inner.requests_out, key)?;
                        b.remove(&inner.requests_in.handle, codec::pair_key(other, user));
                        Ok(1)
                    })?
                }
                Phase::RequestsIn => inner.purge_prefix(b, &inner.requests_in, user, c, left, |b, key| {
                    let other = Inner::other(&inner.requests_in, key)?;
                    b.remove(&inner.requests_out.handle, codec::pair_key(other, user));
                    Ok(1)
                })?,
                Phase::BlocksOut => inner.purge_prefix(b, &inner.blocks, user, c, left, |b, key| {
                    let other = Inner::other(&inner.blocks, key)?;
                    b.remove(&inner.blocked_by.handle, codec::pair_key(other, user));
                    Ok(1)
                })?,
                Phase::BlocksIn => inner.purge_prefix(b, &inner.blocked_by, user, c, left, |b, key| {
                    let other = Inner::other(&inner.blocked_by, key)?;
                    b.remove(&inner.blocks.handle, codec::pair_key(other, user));
                    Ok(1)
                })?,
                Phase::Invites => (0, false),
                Phase::Inbox => inner.purge_prefix(b, &inner.inbox, user, c, left, |_, _| Ok(0))?,
                Phase::Departures => inner.purge_prefix(b, &inner.departures, user, c, left, |_, _| Ok(0))?,
                Phase::Receipts => inner.purge_prefix(b, &inner.receipts, user, c, left, |_, _| Ok(0))?,
                Phase::Conversations => {
                    inner.purge_prefix(b, &inner.user_convs, user, c, left, |_, _| Ok(0))?
                }
                Phase::Recency => inner.purge_prefix(b, &inner.recent, user, c, left, |_, _| Ok(0))?,
                Phase::Tokens => inner.purge_prefix(b, &inner.user_tokens, user, c, left, |b, key| {
                    let hash =
                        codec::decode_user_token_hash(key).map_err(|d| inner.user_tokens.corrupt(key, d))?;
                    b.remove(&inner.tokens.handle, hash);
                    Ok(1)
                })?,
            };
            removed += taken;
            if finished {
                match cursor.phase.next() {
                    Some(phase) => cursor = UserPurgeCursor { phase, after: None },
                    None => done = true,
                }
            }
        }
        if done {
            batch.remove(&inner.revocation_times.handle, codec::id_key(user));
            batch.remove(&inner.user_purges.handle, codec::id_key(user));
        }
        inner.commit(batch, false)?;
        drop(friends_guard);
        let mut purging = lock(&inner.user_purging);
        if done {
            purging.remove(&user);
        } else if let Some(at) = purging.get_mut(&user) {
            *at = cursor;
        }
        Ok(done)
    }

    /// The groups `user` is a member of, ascending by id, read under the
    /// groups lock: for a deleted account, the groups its purge must leave
    /// before [`Store::purge_user_step`]. Every write of a membership
    /// checks the deletion under the same lock, so once this is empty for
    /// a deleted account it stays empty.
    pub fn groups_to_leave(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        let _guard = lock(&self.inner.groups_lock);
        self.user_groups(user)
    }

    /// The deleted accounts whose purge is not finished, ascending.
    pub fn pending_user_purges(&self) -> Vec<UserId> {
        let mut out: Vec<UserId> = lock(&self.inner.user_purging).keys().copied().collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tern_proto::ConvId;

    use super::*;
    use crate::{InboxTargets, MessageWrite, WriteOp};

    /// Every key of `ks` that names `user` as either id of a pair key, or
    /// as the first id of a longer key.
    fn keys_naming(ks: &Ks, user: UserId, pair: bool) -> usize {
        ks.handle
            .iter()
            .map(|guard| guard.key().unwrap())
            .filter(|key| {
                let first = codec::decode_id_key(&key[..8]).unwrap();
                let second = pair.then(|| codec::decode_pair_second(key).unwrap());
                first == user || second == Some(user)
            })
            .count()
    }

    #[test]
    fn the_purge_leaves_no_key_naming_the_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::test_options()).unwrap();
        for i in 1..=4 {
            store.register(&format!("user{i}"), b"password1").unwrap();
        }
        store.add_friend(1, 2).unwrap();
        store.add_friend(2, 1).unwrap();
        store.add_friend(1, 3).unwrap();
        store.add_friend(4, 1).unwrap();
        store.block(1, 4).unwrap();
        store.block(3, 1).unwrap();
        let group = store.create_group_with(2, "g", false).unwrap();
        store.invite(group, 1).unwrap();
        let left = store.create_group(2, "left").unwrap();
        store.add_member(left, 1).unwrap();
        store.remove_member(left, 1).unwrap();
        store.issue_token(1).unwrap();
        // A group the user left, owing them a range (a departure record).
        let left = store.create_group(3, "left").unwrap();
        store.add_member(left, 1).unwrap();
        assert!(matches!(
            store.remove_member(left, 1).unwrap(),
            crate::Departed::Recorded(_)
        ));
        let conv = ConvId::direct(1, 2);
        let message = WriteOp::Message(MessageWrite {
            conv,
            seq: 1,
            from: 2,
            client_msg_id: 1,
            timestamp_ms: 1,
            frame: Arc::from(&b"hi"[..]),
            inbox: InboxTargets::One(1),
            moved_from: None,
        });
        store.apply(&[message], false).unwrap();
        let inner = &*store.inner;
        assert_eq!(
            keys_naming(&inner.blocked_by, 1, true),
            2,
            "both blocks are mirrored"
        );

        store.delete_account(1).unwrap();
        while !store.purge_user_step(1, 1).unwrap() {}
        // The engine extending a departure behind the purge (its own
        // leave of a group): the writer drops it.
        let extend = WriteOp::Departure {
            user: 1,
            group: left,
            start: 0,
            until: 9,
        };
        store.apply(&[extend], false).unwrap();
        // A message to the account sequenced before its deletion, stored
        // after the purge, that moves the conversation to a new bucket:
        // the writer keeps only the peer's keys.
        let late = WriteOp::Message(MessageWrite {
            conv,
            seq: 2,
            from: 2,
            client_msg_id: 2,
            timestamp_ms: 2 * crate::RECENCY_BUCKET_MS,
            frame: Arc::from(&b"late"[..]),
            inbox: InboxTargets::One(1),
            moved_from: Some(0),
        });
        store.apply(&[late], false).unwrap();

        for ks in [
            &inner.friends,
            &inner.requests_out,
            &inner.requests_in,
            &inner.blocks,
            &inner.blocked_by,
            &inner.user_invites,
        ] {
            assert_eq!(keys_naming(ks, 1, true), 0, "keyspace {}", ks.name);
        }
        assert_eq!(keys_naming(&inner.group_invites, 1, true), 0);
        for ks in [
            &inner.inbox,
            &inner.departures,
            &inner.receipts,
            &inner.user_convs,
            &inner.recent,
            &inner.user_tokens,
        ] {
            assert_eq!(keys_naming(ks, 1, false), 0, "keyspace {}", ks.name);
        }
        for guard in inner.tokens.handle.iter() {
            let (_, value) = guard.into_inner().unwrap();
            assert_ne!(codec::decode_token(&value).unwrap().0, 1);
        }
        assert!(inner.revocation_times.get(&codec::id_key(1)).unwrap().is_none());
        assert!(inner.user_purges.is_empty().unwrap());
        assert_eq!(keys_naming(&inner.deleted_users, 1, false), 1, "the record stays");
        assert_eq!(inner.load_group(group).unwrap().unwrap().invite_count, 0);
        // The others' own relations are intact.
        assert_eq!(store.friends(2).unwrap(), Vec::<UserId>::new());
        assert_eq!(store.direct_conversations(2, 10).unwrap(), vec![conv]);
        let peer: Vec<_> = store.recent_conversations(2).map(|e| e.unwrap()).collect();
        assert_eq!(peer, vec![crate::RecentEntry { bucket: 2, conv }]);
    }

    /// Writes that name an account racing its deletion and purge: each
    /// either lands before the purge passes (and is purged) or is refused.
    /// The store refuses them under the lock its purge takes too, so no
    /// key can name a deleted id afterwards, however the threads meet.
    #[test]
    fn no_write_racing_a_deletion_outlives_its_purge() {
        use std::sync::atomic::{AtomicBool, AtomicU64};

        const VICTIMS: u64 = 300;
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::StoreOptions {
            // A few groups each, so a victim's creations hit the limit
            // rather than piling up, and the depart loop below stays short.
            max_groups_per_user: 4,
            max_group_invites: 10_000,
            max_invites_per_user: 10_000,
            max_friend_requests: 10_000,
            max_friends: 10_000,
            ..crate::test_options()
        };
        let store = Store::open(dir.path(), opts).unwrap();
        // Four live users (1..=4) who write to each victim (5..).
        for i in 1..=4 + VICTIMS {
            store.register(&format!("user{i}"), b"password1").unwrap();
        }
        let victims = 5..5 + VICTIMS;
        let open = store.create_group(1, "open").unwrap();
        let closed = store.create_group_with(1, "closed", false).unwrap();
        let current = AtomicU64::new(victims.start);
        let stop = AtomicBool::new(false);

        type Write = Box<dyn Fn(&Store, UserId) + Send + Sync>;
        let writes: Vec<Write> = vec![
            Box::new(|store, v| {
                let _ = store.create_group(v, "theirs");
            }),
            Box::new(move |store, v| {
                let _ = store.invite(closed, v);
            }),
            Box::new(move |store, v| {
                let _ = store.add_members(open, &[v], false);
            }),
            Box::new(|store, v| {
                let _ = store.add_friend(2, v);
                let _ = store.add_friend(v, 3);
                let _ = store.add_friend(3, v);
            }),
            Box::new(|store, v| {
                let _ = store.block(4, v);
                let _ = store.block(v, 4);
            }),
        ];
        std::thread::scope(|s| {
            for write in &writes {
                let (store, current, stop) = (&store, &current, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        write(store, current.load(Ordering::Relaxed));
                    }
                });
            }
            for v in victims.clone() {
                current.store(v, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_micros(200));
                store.delete_account(v).unwrap();
                // As the engine's purge: leave every group, then the rest.
                loop {
                    let groups = store.groups_to_leave(v).unwrap();
                    if groups.is_empty() {
                        break;
                    }
                    for group in groups {
                        match store.group(group).unwrap() {
                            Some(record) if record.owner == v => store.delete_group(group, v).unwrap(),
                            Some(_) => {
                                store.remove_member(group, v).unwrap();
                            }
                            None => {}
                        }
                    }
                }
                while !store.purge_user_step(v, USER_PURGE_STEP_KEYS).unwrap() {}
            }
            stop.store(true, Ordering::Relaxed);
        });
        for group in store.pending_group_purges() {
            while !store.purge_group_step(group, USER_PURGE_STEP_KEYS).unwrap() {}
        }

        let inner = &*store.inner;
        let naming = |ks: &Ks, pair: bool| {
            ks.handle
                .iter()
                .map(|guard| guard.key().unwrap())
                .filter(|key| {
                    let first = codec::decode_id_key(&key[..8]).unwrap();
                    let second = pair.then(|| codec::decode_pair_second(key).unwrap());
                    victims.contains(&first) || second.is_some_and(|id| victims.contains(&id))
                })
                .count()
        };
        let left: Vec<(&str, usize)> = [
            &inner.members,
            &inner.user_groups,
            &inner.group_invites,
            &inner.user_invites,
            &inner.friends,
            &inner.requests_out,
            &inner.requests_in,
            &inner.blocks,
            &inner.blocked_by,
        ]
        .into_iter()
        .map(|ks| (ks.name, naming(ks, true)))
        .filter(|&(_, keys)| keys > 0)
        .collect();
        assert_eq!(left, vec![], "keys naming a deleted account, by keyspace");
        let counts = inner.load_group(closed).unwrap().unwrap();
        assert_eq!(counts.invite_count, 0, "the counts follow the keys");
        assert_eq!(inner.load_group(open).unwrap().unwrap().member_count, 1);
    }

    #[test]
    fn the_blocked_by_index_is_backfilled_for_an_older_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), crate::test_options()).unwrap();
            for i in 1..=3 {
                store.register(&format!("user{i}"), b"password1").unwrap();
            }
            store.block(1, 3).unwrap();
            store.block(2, 3).unwrap();
            // As a store written before the index existed.
            let inner = &*store.inner;
            let mut batch = inner.db.batch();
            for key in inner.blocked_by.handle.iter().map(|g| g.key().unwrap()) {
                batch.remove(&inner.blocked_by.handle, key);
            }
            inner.commit(batch, false).unwrap();
            assert!(inner.blocked_by.is_empty().unwrap());
            store.persist().unwrap();
        }
        let store = Store::open(dir.path(), crate::test_options()).unwrap();
        assert_eq!(store.inner.blocked_by.scan_pairs(3).unwrap(), vec![1, 2]);
    }

    #[test]
    fn ids_stop_at_the_bitmaps_reach_and_a_corrupt_deleted_id_is_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), crate::test_options()).unwrap();
            store.register("user1", b"password1").unwrap();
            // As a store that has assigned every id the bitmap reaches.
            let inner = &*store.inner;
            let mut batch = inner.db.batch();
            batch.insert(
                &inner.users.handle,
                codec::id_key(MAX_USER_ID),
                codec::encode_user("last"),
            );
            inner.commit(batch, false).unwrap();
            store.persist().unwrap();
        }
        {
            let store = Store::open(dir.path(), crate::test_options()).unwrap();
            assert!(matches!(
                store.register("user2", b"password1"),
                Err(StoreError::LimitExceeded(_))
            ));
            // The last id can still be deleted, and is marked.
            store.delete_account(MAX_USER_ID).unwrap();
            assert!(store.is_deleted(MAX_USER_ID));
            // A deleted id past the reach can only come from a bad disk.
            let inner = &*store.inner;
            let mut batch = inner.db.batch();
            batch.insert(
                &inner.deleted_users.handle,
                codec::id_key(MAX_USER_ID + 1),
                codec::encode_revocation(1),
            );
            inner.commit(batch, false).unwrap();
            store.persist().unwrap();
        }
        let err = Store::open(dir.path(), crate::test_options()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("deleted_users") && text.contains("past the highest"),
            "{text}"
        );
    }
}
