//! Friendships, friend requests and blocks. It owns the `friends`
//! keyspace, where a friendship between `a` and `b` is the two keys
//! `a ++ b` and `b ++ a` (no value), always written and removed together in
//! one batch so that the relation stays symmetric across crashes; the
//! `friend_requests_out` and `friend_requests_in` keyspaces, where `a`'s
//! pending request to `b` is the key `a ++ b` in the first and `b ++ a` in
//! the second, likewise always written together; and the `blocks`
//! keyspace, where `a` blocking `b` is the one key `a ++ b` (mirrored by
//! `b ++ a` in `blocked_by`, written in the same batches). Keying by the
//! user first makes "my friends", "requests I sent", "requests to me" and
//! "whom I block" single prefix scans, already sorted by id. A friendship
//! needs both users' consent: the first `add_friend` stores a request, the
//! other's `add_friend` accepts it. A block, a friendship and a pending
//! request never coexist between two users the wrong way: blocking ends the
//! friendship and drops the requests in the same batch, and befriending
//! checks both directions of blocks, all under the one lock they take.

use crate::codec;
use crate::{lock, Inner, Store, StoreError, UserId};

/// Why `blocker` may not befriend, or message, a user they block.
pub const YOU_BLOCKED: &str = "you blocked this user; unblock them first";

/// Why a user may not befriend, or message, a user who blocks them.
pub const BLOCKED_BY_THEM: &str = "this user does not accept requests or messages from you";

/// Why a friendship cannot be made or asked for: one of the two has the
/// most friends allowed.
pub const FRIEND_LIST_FULL: &str = "friend list is full";

/// Why a user may not send one more friend request: they have the most
/// pending requests out allowed.
pub const OUTGOING_REQUESTS_FULL: &str =
    "you have too many pending friend requests; cancel some or wait for answers";

/// Why a user may not be sent one more friend request: they have the most
/// pending requests in allowed.
pub const INCOMING_REQUESTS_FULL: &str = "this user has too many pending friend requests";

/// What [`Store::add_friend`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FriendOutcome {
    /// The two were friends already; nothing was written.
    AlreadyFriends,
    /// The other user had asked first: this accepted their request, and
    /// the two are friends now.
    Accepted,
    /// The caller's request to the other is pending: `new` if this stored
    /// it, false if it was pending already (nothing written).
    Requested { new: bool },
}

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
    /// `user` asks to befriend `friend`, or accepts their request: if the
    /// two are friends already, nothing happens; if `friend` has a request
    /// to `user` pending, the friendship is written both ways and that
    /// request removed, in one batch; otherwise `user`'s request to
    /// `friend` is stored (once: asking again writes nothing).
    /// `InvalidArgument` for oneself, `NotFound` for an unknown user,
    /// `Forbidden` if either blocks the other, `LimitExceeded` past
    /// [`crate::StoreOptions::max_friends`] (either side) or
    /// [`crate::StoreOptions::max_friend_requests`] (the sender's requests
    /// out, or the recipient's requests in).
    pub fn add_friend(&self, user: UserId, friend: UserId) -> Result<FriendOutcome, StoreError> {
        if user == friend {
            return Err(StoreError::InvalidArgument("cannot befriend oneself"));
        }
        let inner = &*self.inner;
        let forward = codec::pair_key(user, friend);
        let backward = codec::pair_key(friend, user);
        // Held across count, check and commit, so two concurrent adds
        // cannot both see room for one more friend or request, and two
        // users asking each other at once end up friends, not with two
        // crossed requests; and so no request or friendship lands for an
        // account whose purge is past it (see `Inner::may_name`).
        let guard = lock(&inner.friends_lock);
        if !inner.may_name(user)? || !inner.may_name(friend)? {
            return Err(StoreError::NotFound);
        }
        let has = |key: &[u8]| inner.friends.contains(key);
        if has(&forward)? && has(&backward)? {
            return Ok(FriendOutcome::AlreadyFriends);
        }
        if let Some(why) = inner.blocks_between(user, friend)?.refusal() {
            return Err(StoreError::Forbidden(why));
        }
        let max = inner.opts.max_friends;
        let friends = &inner.friends;
        if inner.requests_out.contains(backward)? {
            // `friend` asked first: accept.
            if friends.prefix_reaches(user, max)? || friends.prefix_reaches(friend, max)? {
                return Err(StoreError::LimitExceeded(FRIEND_LIST_FULL));
            }
            let mut batch = inner.db.batch();
            batch.insert(&inner.friends.handle, forward, []);
            batch.insert(&inner.friends.handle, backward, []);
            remove_requests(inner, &mut batch, user, friend);
            inner.commit_unlocked(batch, guard)?;
            return Ok(FriendOutcome::Accepted);
        }
        if inner.requests_out.contains(forward)? {
            return Ok(FriendOutcome::Requested { new: false });
        }
        // A request the sender could never see accepted is refused now.
        if friends.prefix_reaches(user, max)? {
            return Err(StoreError::LimitExceeded(FRIEND_LIST_FULL));
        }
        let max_requests = inner.opts.max_friend_requests;
        if inner.requests_out.prefix_reaches(user, max_requests)? {
            return Err(StoreError::LimitExceeded(OUTGOING_REQUESTS_FULL));
        }
        if inner.requests_in.prefix_reaches(friend, max_requests)? {
            return Err(StoreError::LimitExceeded(INCOMING_REQUESTS_FULL));
        }
        let mut batch = inner.db.batch();
        batch.insert(&inner.requests_out.handle, forward, []);
        batch.insert(&inner.requests_in.handle, backward, []);
        inner.commit_unlocked(batch, guard)?;
        Ok(FriendOutcome::Requested { new: true })
    }

    /// Ends the friendship between `user` and `friend` on both sides, and
    /// drops any pending friend request between them, either way (declining
    /// theirs, cancelling one's own), in one batch. Succeeds if there is
    /// nothing to remove.
    pub fn remove_friend(&self, user: UserId, friend: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.friends_lock);
        let forward = codec::pair_key(user, friend);
        let backward = codec::pair_key(friend, user);
        let has = |key: &[u8]| inner.friends.contains(key);
        let requested = |key: &[u8]| inner.requests_out.contains(key);
        if !has(&forward)? && !has(&backward)? && !requested(&forward)? && !requested(&backward)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.friends.handle, forward);
        batch.remove(&inner.friends.handle, backward);
        remove_requests(inner, &mut batch, user, friend);
        inner.commit_unlocked(batch, guard)
    }

    /// The users with ids above `after` whose friend requests to `user`
    /// are pending (`incoming`), or to whom `user`'s are (not
    /// `incoming`), ascending, at most `limit`, and whether more follow.
    pub fn friend_requests_after(
        &self,
        user: UserId,
        incoming: bool,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        let inner = &*self.inner;
        let ks = if incoming {
            &inner.requests_in
        } else {
            &inner.requests_out
        };
        inner.live_pairs_after(ks, user, after, limit)
    }

    /// `user`'s friends, ascending by id (never a deleted account, whose
    /// keys may still await their purge).
    pub fn friends(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        let mut friends = self.inner.friends.scan_pairs(user)?;
        self.inner.retain_live(&mut friends);
        Ok(friends)
    }

    /// Those of `users` who are friends of `user`, in the same order: one
    /// point read each.
    pub fn friends_among(&self, user: UserId, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        let friends = &self.inner.friends;
        let mut among = Vec::with_capacity(users.len());
        for &friend in users {
            if friends.contains(codec::pair_key(user, friend))? {
                among.push(friend);
            }
        }
        Ok(among)
    }

    /// `user`'s friends with ids above `after`, ascending, at most
    /// `limit`, and whether more follow.
    pub fn friends_after(
        &self,
        user: UserId,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        self.inner
            .live_pairs_after(&self.inner.friends, user, after, limit)
    }

    /// `blocker` blocks `blocked`: records the block, ends any friendship
    /// between them and drops their pending friend requests, either way,
    /// in one synced batch. Blocking again
    /// succeeds without writing. `NotFound` for an unknown user,
    /// `InvalidArgument` for oneself, `LimitExceeded` past
    /// [`crate::StoreOptions::max_blocks_per_user`].
    pub fn block(&self, blocker: UserId, blocked: UserId) -> Result<(), StoreError> {
        if blocker == blocked {
            return Err(StoreError::InvalidArgument("you cannot block yourself"));
        }
        let inner = &*self.inner;
        let key = codec::pair_key(blocker, blocked);
        let guard = lock(&inner.friends_lock);
        if !inner.may_name(blocker)? || !inner.may_name(blocked)? {
            return Err(StoreError::NotFound);
        }
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
        batch.insert(&inner.blocked_by.handle, codec::pair_key(blocked, blocker), []);
        batch.remove(&inner.friends.handle, codec::pair_key(blocker, blocked));
        batch.remove(&inner.friends.handle, codec::pair_key(blocked, blocker));
        remove_requests(inner, &mut batch, blocker, blocked);
        inner.commit_unlocked(batch, guard)
    }

    /// Lifts `blocker`'s block of `blocked`; succeeds whether or not there
    /// was one. The friendship and requests the block ended do not come
    /// back.
    pub fn unblock(&self, blocker: UserId, blocked: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let key = codec::pair_key(blocker, blocked);
        let guard = lock(&inner.friends_lock);
        if !inner.blocks.contains(key)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.blocks.handle, key);
        batch.remove(&inner.blocked_by.handle, codec::pair_key(blocked, blocker));
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
        self.inner
            .live_pairs_after(&self.inner.blocks, blocker, after, limit)
    }
}

/// Adds to `batch` the removal of the friend requests between `a` and
/// `b`, both ways, from both request keyspaces (removing an absent key is
/// harmless).
fn remove_requests(inner: &Inner, batch: &mut fjall::OwnedWriteBatch, a: UserId, b: UserId) {
    for (from, to) in [(a, b), (b, a)] {
        batch.remove(&inner.requests_out.handle, codec::pair_key(from, to));
        batch.remove(&inner.requests_in.handle, codec::pair_key(to, from));
    }
}
