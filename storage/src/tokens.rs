//! Session tokens: issue, verify, revoke. It owns the `tokens`
//! (sha256(token) -> user + expiry) and `user_tokens` (user ++ hash ->
//! expiry) keyspaces. Only the digest is stored, so a copy of the database
//! does not hand out live sessions; the token itself is 32 random bytes,
//! enough entropy that a fast unsalted hash is the right tool (nothing to
//! brute-force, unlike a password).

use sha2::{Digest, Sha256};
use tern_proto::limits::TOKEN_LEN;

use crate::codec::{self, TOKEN_HASH_LEN};
use crate::{now_unix_ms, Inner, Store, StoreError, UserId};

fn digest(token: &[u8]) -> [u8; TOKEN_HASH_LEN] {
    Sha256::digest(token).into()
}

impl Inner {
    /// Adds tombstones to `batch` for every token of `user` that has
    /// expired by `now` (or all of them if `now` is `u64::MAX`) and returns
    /// how many.
    fn sweep_tokens(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: UserId,
        now: u64,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for guard in self.user_tokens.handle.prefix(codec::id_key(user)) {
            let (key, value) = guard.into_inner()?;
            let hash = codec::decode_user_token_hash(&key).map_err(|d| self.user_tokens.corrupt(&key, d))?;
            let expires = codec::decode_user_token(&value).map_err(|d| self.user_tokens.corrupt(&key, d))?;
            if expires <= now {
                batch.remove(&self.tokens.handle, hash);
                batch.remove(&self.user_tokens.handle, key);
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Store {
    /// Issues a new session token for `user`, valid for
    /// [`crate::StoreOptions::token_ttl`]. Also drops the user's expired
    /// tokens, so the index does not grow with abandoned sessions.
    ///
    /// Issuing is not synced even with `fsync` on: a token lost in a
    /// machine crash costs the client one password login, while a sync
    /// per login would cost every login an fsync.
    pub fn issue_token(&self, user: UserId) -> Result<[u8; TOKEN_LEN], StoreError> {
        let inner = &*self.inner;
        if !inner.user_exists(user)? {
            return Err(StoreError::NotFound);
        }
        let mut token = [0u8; TOKEN_LEN];
        getrandom::fill(&mut token).map_err(|e| StoreError::Crypto(format!("random source: {e}")))?;
        let hash = digest(&token);
        let now = now_unix_ms();
        let ttl_ms = u64::try_from(inner.opts.token_ttl.as_millis()).unwrap_or(u64::MAX);
        let expires = now.saturating_add(ttl_ms);
        let mut batch = inner.db.batch();
        inner.sweep_tokens(&mut batch, user, now)?;
        batch.insert(&inner.tokens.handle, hash, codec::encode_token(user, expires));
        batch.insert(
            &inner.user_tokens.handle,
            codec::user_token_key(user, &hash),
            codec::encode_user_token(expires),
        );
        inner.commit(batch, false)?;
        Ok(token)
    }

    /// The user a token belongs to. Unknown, expired and wrong-length
    /// tokens are all [`StoreError::AuthFailed`].
    pub fn verify_token(&self, token: &[u8]) -> Result<UserId, StoreError> {
        if token.len() != TOKEN_LEN {
            return Err(StoreError::AuthFailed);
        }
        let inner = &*self.inner;
        let hash = digest(token);
        let Some(value) = inner.tokens.get(&hash)? else {
            return Err(StoreError::AuthFailed);
        };
        let (user, expires) = codec::decode_token(&value).map_err(|d| inner.tokens.corrupt(&hash, d))?;
        if expires <= now_unix_ms() {
            return Err(StoreError::AuthFailed);
        }
        Ok(user)
    }

    /// Removes one token (a logout) and returns whether it was live.
    /// Synced when `fsync` is on, like [`Store::revoke_tokens`].
    pub fn revoke_token(&self, token: &[u8]) -> Result<bool, StoreError> {
        if token.len() != TOKEN_LEN {
            return Ok(false);
        }
        let inner = &*self.inner;
        let hash = digest(token);
        let Some(value) = inner.tokens.get(&hash)? else {
            return Ok(false);
        };
        let (user, _) = codec::decode_token(&value).map_err(|d| inner.tokens.corrupt(&hash, d))?;
        let mut batch = inner.db.batch();
        batch.remove(&inner.tokens.handle, hash);
        batch.remove(&inner.user_tokens.handle, codec::user_token_key(user, &hash));
        inner.commit(batch, true)?;
        Ok(true)
    }

    /// Removes every token of `user` and returns how many there were.
    /// Synced when `fsync` is on: a revocation that a crash undid would
    /// bring a session the user ended back to life.
    pub fn revoke_tokens(&self, user: UserId) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        let mut batch = inner.db.batch();
        let removed = inner.sweep_tokens(&mut batch, user, u64::MAX)?;
        inner.commit(batch, true)?;
        Ok(removed)
    }
}
