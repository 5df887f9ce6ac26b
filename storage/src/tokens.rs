//! Session tokens: issue, verify, revoke. It owns the `tokens`
//! (sha256(token) -> user + expiry) and `user_tokens` (user ++ hash ->
//! expiry) keyspaces. Only the digest is stored, so a copy of the database
//! does not hand out live sessions; the token itself is 32 random bytes,
//! enough entropy that a fast unsalted hash is the right tool (nothing to
//! brute-force, unlike a password).
//!
//! It also owns [`TokenCache`]: the tokens recently verified, with their
//! user and username, in memory, so that a reconnect (`LoginToken`) can be
//! answered without a disk read and without leaving the calling thread
//! ([`Store::cached_token_login`]). Every revocation goes through this
//! module and drops the cached entries it revokes; a cached entry past its
//! expiry is never returned.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tern_proto::limits::TOKEN_LEN;

use crate::accounts::PasswordChecked;
use crate::codec::{self, TOKEN_HASH_LEN};
use crate::{lock, now_unix_ms, Inner, Store, StoreError, UserId};

fn digest(token: &[u8]) -> [u8; TOKEN_HASH_LEN] {
    Sha256::digest(token).into()
}

/// Most tokens the cache holds (about 100 bytes each). When full it is
/// emptied and refills from the store on the next logins: simple, bounded,
/// and a miss costs only what every token login cost before the cache.
pub const TOKEN_CACHE_MAX: usize = 65_536;

/// A verified token, as cached.
struct CachedToken {
    user: UserId,
    username: String,
    expires_at_ms: u64,
}

struct CacheState {
    /// sha256(token) -> what it verified as: a memory dump shows digests,
    /// which log no one in, as in the store.
    entries: HashMap<[u8; TOKEN_HASH_LEN], CachedToken>,
    /// Counts revocations. A fill carries the epoch it read before going
    /// to the store and lands only if no revocation happened since: a
    /// verify that read a token just before a revocation committed must
    /// not put it back after the revocation cleared it.
    epoch: u64,
}

/// Live tokens recently verified; see the module documentation.
pub(crate) struct TokenCache {
    state: Mutex<CacheState>,
}

impl TokenCache {
    pub(crate) fn new() -> TokenCache {
        TokenCache {
            state: Mutex::new(CacheState {
                entries: HashMap::new(),
                epoch: 0,
            }),
        }
    }

    fn epoch(&self) -> u64 {
        lock(&self.state).epoch
    }

    fn get(&self, hash: &[u8; TOKEN_HASH_LEN], now_ms: u64) -> Option<(UserId, String)> {
        let state = lock(&self.state);
        let cached = state.entries.get(hash)?;
        (cached.expires_at_ms > now_ms).then(|| (cached.user, cached.username.clone()))
    }

    fn fill(&self, hash: [u8; TOKEN_HASH_LEN], entry: CachedToken, epoch: u64) {
        let mut state = lock(&self.state);
        if state.epoch != epoch {
            return;
        }
        if state.entries.len() >= TOKEN_CACHE_MAX {
            state.entries.clear();
        }
        state.entries.insert(hash, entry);
    }

    /// Forgets the cached tokens of `user` (and any fill in flight).
    pub(crate) fn revoke_user(&self, user: UserId) {
        self.revoke(|_, cached| cached.user == user);
    }

    /// Forgets the cached tokens `revoked` picks (and any fill in flight).
    fn revoke(&self, revoked: impl Fn(&[u8; TOKEN_HASH_LEN], &CachedToken) -> bool) {
        let mut state = lock(&self.state);
        state.entries.retain(|hash, cached| !revoked(hash, cached));
        state.epoch = state.epoch.wrapping_add(1);
    }
}

impl Inner {
    /// Adds tombstones to `batch` for every token of `user` that has
    /// expired by `now` (or all of them if `now` is `u64::MAX`), and for
    /// the live ones closest to expiry (the oldest) past the newest `keep`.
    /// Returns how many tokens it removed in all, and the hashes of the
    /// live ones among them, which the caller must also drop from the
    /// token cache.
    pub(crate) fn sweep_tokens(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: UserId,
        now: u64,
        keep: usize,
    ) -> Result<(usize, Vec<[u8; TOKEN_HASH_LEN]>), StoreError> {
        let mut live = Vec::new();
        let mut expired = 0;
        for guard in self.user_tokens.handle.prefix(codec::id_key(user)) {
            let (key, value) = self.user_tokens.entry(guard)?;
            let hash = codec::decode_user_token_hash(&key).map_err(|d| self.user_tokens.corrupt(&key, d))?;
            let expires = codec::decode_user_token(&value).map_err(|d| self.user_tokens.corrupt(&key, d))?;
            if expires <= now {
                batch.remove(&self.tokens.handle, hash);
                batch.remove(&self.user_tokens.handle, key);
                expired += 1;
            } else {
                live.push((expires, hash, key));
            }
        }
        let excess = live.len().saturating_sub(keep);
        if excess == 0 {
            return Ok((expired, Vec::new()));
        }
        live.sort_unstable_by_key(|&(expires, ..)| expires);
        let mut dropped = Vec::with_capacity(excess);
        for (_, hash, key) in live.into_iter().take(excess) {
            batch.remove(&self.tokens.handle, hash);
            batch.remove(&self.user_tokens.handle, key);
            dropped.push(hash);
        }
        Ok((expired + excess, dropped))
    }
}

/// What must still hold, under the user's token lock, for a token to be
/// issued.
pub(crate) enum IssueCheck<'a> {
    Nothing,
    /// A password login: the password it checked is still the account's.
    PasswordUnchanged(PasswordChecked<'a>),
    /// An external login: the provider's token (issued at this Unix ms,
    /// if it says) is newer than the user's last revocation.
    NotRevokedSince(Option<u64>),
}

impl Store {
    /// Issues a new session token for `user`, valid for
    /// [`crate::StoreOptions::token_ttl`]. Also drops the user's expired
    /// tokens, so the index does not grow with abandoned sessions, and,
    /// when the user already holds
    /// [`crate::StoreOptions::max_tokens_per_user`] live tokens, the oldest
    /// of them: a client that logs in by password again and again (each
    /// login issues a token) cannot grow the user's tokens, or the cost of
    /// this sweep, without bound.
    ///
    /// Issuing is not synced even with `fsync` on: a token lost in a
    /// machine crash costs the client one password login, while a sync
    /// per login would cost every login an fsync.
    pub fn issue_token(&self, user: UserId) -> Result<[u8; TOKEN_LEN], StoreError> {
        self.issue_token_checked(user, IssueCheck::Nothing)
    }

    /// [`Store::issue_token`], only if `check` holds (else
    /// [`StoreError::AuthFailed`]), tested under the same per-user lock
    /// that [`Store::revoke_tokens`] takes. A password change writes the
    /// new hash and the revocation in one batch under that lock: a token
    /// issued before it is swept by the revocation, and one issued after
    /// fails the check.
    pub(crate) fn issue_token_checked(
        &self,
        user: UserId,
        check: IssueCheck<'_>,
    ) -> Result<[u8; TOKEN_LEN], StoreError> {
        let inner = &*self.inner;
        if !inner.user_exists(user)? {
            return Err(StoreError::NotFound);
        }
        let (token, hash, expires) = inner.new_token()?;
        let now = now_unix_ms();
        // Check, sweep, insert and commit as one step per user.
        let _issuing = inner.token_lock(user);
        if inner.is_deleted(user) {
            // Deleted since the check above: the deletion swept the
            // user's tokens under this lock, and none may follow.
            return Err(StoreError::AuthFailed);
        }
        let refused = match &check {
            IssueCheck::Nothing => false,
            IssueCheck::PasswordUnchanged(checked) => !inner.password_unchanged(checked)?,
            IssueCheck::NotRevokedSince(issued_at_ms) => {
                inner.issued_before_revocation(user, *issued_at_ms)?
            }
        };
        if refused {
            return Err(StoreError::AuthFailed);
        }
        let mut batch = inner.db.batch();
        let keep = inner.opts.max_tokens_per_user.saturating_sub(1);
        let (_, dropped) = inner.sweep_tokens(&mut batch, user, now, keep)?;
        inner.put_token(&mut batch, user, &hash, expires);
        let committed = inner.commit(batch, false);
        if !dropped.is_empty() {
            // Also when the commit failed: it may have landed anyway.
            inner.token_cache.revoke(|cached, _| dropped.contains(cached));
        }
        committed?;
        Ok(token)
    }

    /// The user a token belongs to. Unknown, expired and wrong-length
    /// tokens are all [`StoreError::AuthFailed`].
    pub fn verify_token(&self, token: &[u8]) -> Result<UserId, StoreError> {
        let (user, _) = self.inner.live_token(token, &digest(token))?;
        Ok(user)
    }

    /// The user and username a token logs in as: [`Store::verify_token`]
    /// and [`Store::username`] in one call, which also caches the answer
    /// for [`Store::cached_token_login`].
    pub fn token_login(&self, token: &[u8]) -> Result<(UserId, String), StoreError> {
        let inner = &*self.inner;
        // Read before the store: see `CacheState::epoch`.
        let epoch = inner.token_cache.epoch();
        let hash = digest(token);
        let (user, expires_at_ms) = inner.live_token(token, &hash)?;
        let username = self.username(user)?.ok_or(StoreError::AuthFailed)?;
        let cached = CachedToken {
            user,
            username: username.clone(),
            expires_at_ms,
        };
        inner.token_cache.fill(hash, cached, epoch);
        Ok((user, username))
    }

    /// [`Store::token_login`] answered from memory, never touching the
    /// disk (so a shard may call it on its own thread): `None` when the
    /// token is not cached or has expired, and the caller asks
    /// [`Store::token_login`]. A revoked token is never cached.
    pub fn cached_token_login(&self, token: &[u8]) -> Option<(UserId, String)> {
        if token.len() != TOKEN_LEN {
            return None;
        }
        self.inner.token_cache.get(&digest(token), now_unix_ms())
    }

    /// Removes one token (a logout) and returns whether it was live.
    /// Synced when `fsync` is on, like [`Store::revoke_tokens`].
    pub fn revoke_token(&self, token: &[u8]) -> Result<bool, StoreError> {
        if token.len() != TOKEN_LEN {
            return Ok(false);
        }
        let inner = &*self.inner;
        let hash = digest(token);
        let revoked = inner.revoke_token(&hash);
        // Also when the commit failed: it may have landed anyway.
        inner.token_cache.revoke(|cached, _| *cached == hash);
        revoked
    }

    /// Removes every token of `user` and returns how many there were.
    /// Synced when `fsync` is on: a revocation that a crash undid would
    /// bring a session the user ended back to life.
    pub fn revoke_tokens(&self, user: UserId) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        // No token of the user is issued between the sweep and the write;
        // the sync waits with the lock released (logins of the users on
        // this stripe need not wait for the disk).
        let issuing = inner.token_lock(user);
        inner.commit_revoking_all(inner.db.batch(), user, issuing)
    }

    /// Logs `user` out of every other device: if `current` (the calling
    /// session's token) is still a live token of `user`, revokes every
    /// token of the user, `current` included (a copy of it elsewhere is
    /// logged out too), records the revocation time (the user's older JWTs
    /// are refused) and issues one new token, the only one left, all in
    /// one batch, synced when `fsync` is on. Returns the new token and how
    /// many were revoked. [`StoreError::AuthFailed`] if `current` is not
    /// live: that session was itself logged out (by another device, a
    /// password change or the operator) and may not log anyone out.
    pub fn reissue_sole_token(
        &self,
        user: UserId,
        current: &[u8],
    ) -> Result<([u8; TOKEN_LEN], usize), StoreError> {
        let inner = &*self.inner;
        let (token, hash, expires) = inner.new_token()?;
        let issuing = inner.token_lock(user);
        match inner.live_token(current, &digest(current)) {
            Ok((owner, _)) if owner == user => {}
            Ok(_) | Err(StoreError::AuthFailed) => return Err(StoreError::AuthFailed),
            Err(e) => return Err(e),
        }
        let mut batch = inner.db.batch();
        // Not on disk yet, so the revocation's sweep does not see it.
        inner.put_token(&mut batch, user, &hash, expires);
        let revoked = inner.commit_revoking_all(batch, user, issuing)?;
        Ok((token, revoked))
    }
}

impl Inner {
    /// Adds the removal of every token of `user` to `batch` and writes
    /// it; then releases `held` (the locks the batch's checks needed, the
    /// user's token lock among them), drops the user's cached tokens,
    /// counts the revocation (see [`Store::revocations`]) and waits for
    /// the sync, so no lock is held on the disk. Returns how many tokens
    /// were removed.
    pub(crate) fn commit_revoking_all<G>(
        &self,
        mut batch: fjall::OwnedWriteBatch,
        user: UserId,
        held: G,
    ) -> Result<usize, StoreError> {
        // Tokens of the operator's identity provider cannot be swept:
        // recording when is what refuses the older ones (see `external`).
        let written = self
            .put_revocation(&mut batch, user, now_unix_ms())
            .and_then(|()| self.sweep_tokens(&mut batch, user, u64::MAX, 0))
            .and_then(|(removed, _)| self.write(batch, true).map(|pending| (removed, pending)));
        drop(held);
        self.token_cache.revoke(|_, cached| cached.user == user);
        self.revocations.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let (removed, pending) = written?;
        self.sync(pending)?;
        Ok(removed)
    }

    /// Adds a token's two keys to `batch`: the token by its digest, and
    /// the user's index entry of it.
    fn put_token(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: UserId,
        hash: &[u8; TOKEN_HASH_LEN],
        expires: u64,
    ) {
        batch.insert(&self.tokens.handle, *hash, codec::encode_token(user, expires));
        batch.insert(
            &self.user_tokens.handle,
            codec::user_token_key(user, hash),
            codec::encode_user_token(expires),
        );
    }

    /// A fresh random token, its digest and its expiry.
    fn new_token(&self) -> Result<([u8; TOKEN_LEN], [u8; TOKEN_HASH_LEN], u64), StoreError> {
        let mut token = [0u8; TOKEN_LEN];
        getrandom::fill(&mut token).map_err(|e| StoreError::Crypto(format!("random source: {e}")))?;
        let ttl_ms = u64::try_from(self.opts.token_ttl.as_millis()).unwrap_or(u64::MAX);
        Ok((token, digest(&token), now_unix_ms().saturating_add(ttl_ms)))
    }

    /// Serialises the token changes of one user (a stripe of users).
    pub(crate) fn token_lock(&self, user: UserId) -> Option<std::sync::MutexGuard<'_, ()>> {
        let stripe = usize::try_from(user).unwrap_or(0) % self.token_issue_locks.len().max(1);
        self.token_issue_locks.get(stripe).map(lock)
    }

    /// The user and expiry of a live token.
    fn live_token(&self, token: &[u8], hash: &[u8; TOKEN_HASH_LEN]) -> Result<(UserId, u64), StoreError> {
        if token.len() != TOKEN_LEN {
            return Err(StoreError::AuthFailed);
        }
        let Some(value) = self.tokens.get(hash)? else {
            return Err(StoreError::AuthFailed);
        };
        let (user, expires) = codec::decode_token(&value).map_err(|d| self.tokens.corrupt(hash, d))?;
        if expires <= now_unix_ms() {
            return Err(StoreError::AuthFailed);
        }
        Ok((user, expires))
    }

    fn revoke_token(&self, hash: &[u8; TOKEN_HASH_LEN]) -> Result<bool, StoreError> {
        let Some(value) = self.tokens.get(hash)? else {
            return Ok(false);
        };
        let (user, _) = codec::decode_token(&value).map_err(|d| self.tokens.corrupt(hash, d))?;
        let mut batch = self.db.batch();
        batch.remove(&self.tokens.handle, *hash);
        batch.remove(&self.user_tokens.handle, codec::user_token_key(user, hash));
        self.commit(batch, true)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: UserId, expires_at_ms: u64) -> CachedToken {
        CachedToken {
            user,
            username: format!("user{user}"),
            expires_at_ms,
        }
    }

    fn hash(n: usize) -> [u8; TOKEN_HASH_LEN] {
        digest(&n.to_le_bytes())
    }

    #[test]
    fn a_login_that_checked_the_password_before_a_change_gets_no_token_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::test_options()).unwrap();
        let alice = store.register("alice", b"password1").unwrap();
        // A login checks the old password (tens of milliseconds of argon2,
        // no lock held)...
        let (user, phc) = store.inner.check_password("alice", b"password1").unwrap();
        // ...while the user changes it, which revokes every token...
        store.set_password(alice, b"password2").unwrap();
        store.revoke_tokens(alice).unwrap();
        // ...so the login may not issue one now.
        let checked = PasswordChecked {
            username: "alice",
            phc: &phc,
        };
        assert!(matches!(
            store.issue_token_checked(user, IssueCheck::PasswordUnchanged(checked)),
            Err(StoreError::AuthFailed)
        ));
        assert!(matches!(
            store.login("alice", b"password1"),
            Err(StoreError::AuthFailed)
        ));
        // A login that issued before the change loses its token to it.
        let (user, token) = store.login("alice", b"password2").unwrap();
        assert_eq!((user, store.verify_token(&token).unwrap()), (alice, alice));
        store.set_password(alice, b"password3").unwrap();
        store.revoke_tokens(alice).unwrap();
        assert!(matches!(store.verify_token(&token), Err(StoreError::AuthFailed)));
        assert!(matches!(
            store.login("nobody", b"password3"),
            Err(StoreError::AuthFailed)
        ));
        let (_, token) = store.login("alice", b"password3").unwrap();
        assert_eq!(store.verify_token(&token).unwrap(), alice);
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let cache = TokenCache::new();
        for n in 0..TOKEN_CACHE_MAX {
            cache.fill(hash(n), entry(1, u64::MAX), 0);
        }
        assert_eq!(lock(&cache.state).entries.len(), TOKEN_CACHE_MAX);
        assert!(cache.get(&hash(0), 0).is_some());
        // One more empties it first.
        cache.fill(hash(TOKEN_CACHE_MAX), entry(1, u64::MAX), 0);
        assert_eq!(lock(&cache.state).entries.len(), 1);
        assert!(cache.get(&hash(0), 0).is_none());
        assert!(cache.get(&hash(TOKEN_CACHE_MAX), 0).is_some());
    }

    #[test]
    fn a_fill_that_started_before_a_revocation_is_dropped() {
        let cache = TokenCache::new();
        let before = cache.epoch();
        cache.revoke(|_, cached| cached.user == 1);
        cache.fill(hash(1), entry(1, u64::MAX), before);
        assert!(cache.get(&hash(1), 0).is_none());
        cache.fill(hash(1), entry(1, u64::MAX), cache.epoch());
        assert_eq!(cache.get(&hash(1), 0), Some((1, "user1".to_owned())));
        // Expired entries are not returned.
        cache.fill(hash(2), entry(2, 100), cache.epoch());
        assert!(cache.get(&hash(2), 99).is_some());
        assert!(cache.get(&hash(2), 100).is_none());
    }
}
