//! Friendships. It owns the `friends` keyspace, where a friendship between
//! `a` and `b` is the two keys `a ++ b` and `b ++ a` (no value), always
//! written and removed together in one batch so that the relation stays
//! symmetric across crashes. Keying by the user first makes "my friends" a
//! single prefix scan, already sorted by id.

use crate::codec;
use crate::{lock, Store, StoreError, UserId};

impl Store {
    /// Makes `user` and `friend` friends of each other. Adding an existing
    /// friendship succeeds without writing.
    pub fn add_friend(&self, user: UserId, friend: UserId) -> Result<(), StoreError> {
        if user == friend {
            return Err(StoreError::InvalidArgument("cannot befriend oneself"));
        }
        let inner = &*self.inner;
        if !inner.user_exists(user)? || !inner.user_exists(friend)? {
            return Err(StoreError::NotFound);
        }
        let forward = codec::pair_key(user, friend);
        let backward = codec::pair_key(friend, user);
        // Held across count, check and commit, so two concurrent adds
        // cannot both see room for one more friend.
        let guard = lock(&inner.friends_lock);
        let has = |key: &[u8]| inner.friends.handle.contains_key(key);
        if has(&forward)? && has(&backward)? {
            return Ok(());
        }
        let max = inner.opts.max_friends;
        let friends = &inner.friends;
        if friends.prefix_reaches(user, max)? || friends.prefix_reaches(friend, max)? {
            return Err(StoreError::LimitExceeded("friend list is full"));
        }
        let mut batch = inner.db.batch();
        batch.insert(&inner.friends.handle, forward, []);
        batch.insert(&inner.friends.handle, backward, []);
        inner.commit_unlocked(batch, guard)
    }

    /// Ends the friendship between `user` and `friend` on both sides.
    /// Removing a friendship that does not exist succeeds.
    pub fn remove_friend(&self, user: UserId, friend: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.friends_lock);
        let forward = codec::pair_key(user, friend);
        let backward = codec::pair_key(friend, user);
        let has = |key: &[u8]| inner.friends.handle.contains_key(key);
        if !has(&forward)? && !has(&backward)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.friends.handle, forward);
        batch.remove(&inner.friends.handle, backward);
        inner.commit_unlocked(batch, guard)
    }

    /// `user`'s friends, ascending by id.
    pub fn friends(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        self.inner.friends.scan_pairs(user)
    }
}
