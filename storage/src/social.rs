//! Friendships and blocks. It owns the `friends` keyspace, where a
//! friendship between `a` and `b` is the two keys `a ++ b` and `b ++ a`
//! (no value), always written and removed together in one batch so that
//! the relation stays symmetric across crashes, and the `blocks` keyspace,
//! where `a` blocking `b` is the one key `a ++ b`. Keying by the user first
//! makes "my friends" and "whom I block" single prefix scans, already
//! sorted by id. A block and a friendship never coexist: blocking ends the
//! friendship in the same batch, and befriending checks both directions
//! of blocks, under the one lock both take.

use crate::codec;
use crate::{lock, Inner, Store, StoreError, UserId};

/// Why `blocker` may not befriend, or message, a user they block.
pub const YOU_BLOCKED: &str = "you blocked this user; unblock them first";

/// Why a user may not befriend, or message, a user who blocks them.
pub const BLOCKED_BY_THEM: &str = "this user does not accept requests or messages from you";

/// The blocks between two users, each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Blocks {
    /// The first user of the pair blocks the second.
    pub first_blocks_second: bool,
    /// The second user of the pair blocks the first.
    pub second_blocks_first: bool,
}

impl Blocks {
    /// Whether either blocks the other.
    pub fn any(self) -> bool {
        self.first_blocks_second || self.second_blocks_first
    }

    /// Why the first user may not reach the second (a message, a friend
    /// request, an invite), if a block between them forbids it: their own
    /// block first ([`YOU_BLOCKED`]), then the other's
    /// ([`BLOCKED_BY_THEM`]).
    pub fn refusal(self) -> Option<&'static str> {
        if self.first_blocks_second {
            Some(YOU_BLOCKED)
        } else if self.second_blocks_first {
            Some(BLOCKED_BY_THEM)
        } else {
            None
        }
    }

    /// The same blocks, seen from the second user.
    pub fn reversed(self) -> Blocks {
        Blocks {
            first_blocks_second: self.second_blocks_first,
            second_blocks_first: self.first_blocks_second,
        }
    }
}

impl Inner {
    fn blocks_between(&self, a: UserId, b: UserId) -> Result<Blocks, StoreError> {
        let has = |key: [u8; 16]| self.blocks.contains(key);
        Ok(Blocks {
            first_blocks_second: has(codec::pair_key(a, b))?,
            second_blocks_first: has(codec::pair_key(b, a))?,
        })
    }
}

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
        let has = |key: &[u8]| inner.friends.contains(key);
        if has(&forward)? && has(&backward)? {
            return Ok(());
        }
        if let Some(why) = inner.blocks_between(user, friend)?.refusal() {
            return Err(StoreError::Forbidden(why));
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
        let has = |key: &[u8]| inner.friends.contains(key);
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

    /// `blocker` blocks `blocked`: records the block and ends any
    /// friendship between them, in one synced batch. Blocking again
    /// succeeds without writing. `NotFound` for an unknown user,
    /// `InvalidArgument` for oneself, `LimitExceeded` past
    /// [`crate::StoreOptions::max_blocks_per_user`].
    pub fn block(&self, blocker: UserId, blocked: UserId) -> Result<(), StoreError> {
        if blocker == blocked {
            return Err(StoreError::InvalidArgument("you cannot block yourself"));
        }
        let inner = &*self.inner;
        if !inner.user_exists(blocker)? || !inner.user_exists(blocked)? {
            return Err(StoreError::NotFound);
        }
        let key = codec::pair_key(blocker, blocked);
        let guard = lock(&inner.friends_lock);
        if inner.blocks.contains(key)? {
            return Ok(());
        }
        if inner
            .blocks
            .prefix_reaches(blocker, inner.opts.max_blocks_per_user)?
        {
            return Err(StoreError::LimitExceeded("block list is full"));
        }
        let mut batch = inner.db.batch();
        batch.insert(&inner.blocks.handle, key, []);
        batch.remove(&inner.friends.handle, codec::pair_key(blocker, blocked));
        batch.remove(&inner.friends.handle, codec::pair_key(blocked, blocker));
        inner.commit_unlocked(batch, guard)
    }

    /// Lifts `blocker`'s block of `blocked`; succeeds whether or not there
    /// was one. The friendship the block ended does not come back.
    pub fn unblock(&self, blocker: UserId, blocked: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let key = codec::pair_key(blocker, blocked);
        let guard = lock(&inner.friends_lock);
        if !inner.blocks.contains(key)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.blocks.handle, key);
        inner.commit_unlocked(batch, guard)
    }

    /// The blocks between `a` and `b`, each direction.
    pub fn blocks_between(&self, a: UserId, b: UserId) -> Result<Blocks, StoreError> {
        self.inner.blocks_between(a, b)
    }

    /// The users `blocker` blocks with ids above `after`, ascending, at
    /// most `limit`, and whether more follow.
    pub fn blocks_after(
        &self,
        blocker: UserId,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        self.inner.blocks.pairs_after(blocker, after, limit)
    }
}
