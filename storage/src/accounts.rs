//! Accounts: registration, password checks and the two name/id lookups.
//! It owns the `accounts` (username -> id + argon2id PHC string) and
//! `users` (id -> username) keyspaces and the password hashing policy.
//! Names are checked against the protocol's rules here as well as in the
//! engine, because the name is a storage key and must stay bounded.

use std::sync::atomic::Ordering;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tern_proto::limits::{check_password, check_username, TOKEN_LEN};

use std::sync::MutexGuard;

use crate::codec;
use crate::external::NO_PASSWORD;
use crate::tokens::IssueCheck;
use crate::{lock, Inner, Store, StoreError, StoreOptions, UserId};

/// Bytes of random salt per password (the PHC recommendation's 16).
const SALT_LEN: usize = 16;

/// Builds the hasher for new passwords. Verification takes its parameters
/// from each stored PHC string instead, so raising the cost later does not
/// lock out existing accounts.
pub(crate) fn hasher(opts: &StoreOptions) -> Result<Argon2<'static>, StoreError> {
    let params = Params::new(opts.argon2_memory_kib, opts.argon2_iterations, 1, None)
        .map_err(|_| StoreError::InvalidArgument("argon2 parameters out of range"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A new PHC string for `password`, with a random salt.
fn hash_with(argon2: &Argon2<'static>, password: &[u8]) -> Result<String, StoreError> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt).map_err(|e| StoreError::Crypto(format!("random source: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| StoreError::Crypto(e.to_string()))?;
    let hash = argon2
        .hash_password(password, &salt)
        .map_err(|e| StoreError::Crypto(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches `phc`.
fn matches_with(argon2: &Argon2<'static>, phc: &str, password: &[u8]) -> Result<bool, String> {
    let parsed = PasswordHash::new(phc).map_err(|e| format!("bad password hash: {e}"))?;
    Ok(argon2.verify_password(password, &parsed).is_ok())
}

impl Inner {
    /// Runs `f` (argon2 work) on the hashing threads if the store has
    /// them, else here.
    fn hashing<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, StoreError> {
        match &self.hash_pool {
            Some(pool) => pool.run(f),
            None => Ok(f()),
        }
    }

    fn hash_password(&self, password: &[u8]) -> Result<String, StoreError> {
        let (argon2, password) = (self.argon2.clone(), password.to_vec());
        self.hashing(move || hash_with(&argon2, &password))?
    }

    /// Whether `password` matches `phc`. An unparsable PHC string is corrupt
    /// data, not a failed login, so it is reported as such by the caller
    /// (the inner error); the outer one is the hashing threads failing.
    fn password_matches(&self, phc: &str, password: &[u8]) -> Result<Result<bool, String>, StoreError> {
        let (argon2, phc, password) = (self.argon2.clone(), phc.to_owned(), password.to_vec());
        self.hashing(move || matches_with(&argon2, &phc, &password))
    }

    /// Spends about as long as a real check, so response time does not
    /// reveal whether a username exists.
    fn dummy_verify(&self, password: &[u8]) {
        let phc = match self.dummy_hash.get() {
            Some(phc) => phc,
            None => match self.hash_password(b"tern-dummy-password") {
                Ok(phc) => self.dummy_hash.get_or_init(|| phc),
                Err(_) => return,
            },
        };
        let _ = self.password_matches(phc, password);
    }

    pub(crate) fn lookup_account(&self, username: &str) -> Result<Option<(UserId, String)>, StoreError> {
        let key = username.as_bytes();
        let Some(value) = self.accounts.get(key)? else {
            return Ok(None);
        };
        let (user, phc) = codec::decode_account(&value).map_err(|d| self.accounts.corrupt(key, d))?;
        Ok(Some((user, phc.to_owned())))
    }

    /// Checks a username and password; returns the user's id and the
    /// stored password hash the password matched.
    pub(crate) fn check_password(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<(UserId, String), StoreError> {
        // A name that could never have been registered is simply unknown;
        // checking it first keeps arbitrary bytes out of the key lookup.
        let account = match check_username(username) {
            Ok(()) => self.lookup_account(username)?,
            Err(_) => None,
        };
        let Some((user, phc)) = account.filter(|(_, phc)| phc != NO_PASSWORD) else {
            // Unknown, or created by an external login: no password
            // matches, and the answer takes as long as a real check.
            self.dummy_verify(password);
            return Err(StoreError::AuthFailed);
        };
        match self.password_matches(&phc, password)? {
            Ok(true) => Ok((user, phc)),
            Ok(false) => Err(StoreError::AuthFailed),
            Err(detail) => Err(self.accounts.corrupt(username.as_bytes(), detail)),
        }
    }

    /// Whether `username`'s stored password hash is still `checked.phc`.
    pub(crate) fn password_unchanged(&self, checked: &PasswordChecked<'_>) -> Result<bool, StoreError> {
        Ok(self
            .lookup_account(checked.username)?
            .is_some_and(|(_, phc)| phc == checked.phc))
    }

    /// Adds `username`'s account record (its id and password hash) to
    /// `batch`.
    fn put_account(&self, batch: &mut fjall::OwnedWriteBatch, username: &str, user: UserId, phc: &str) {
        batch.insert(
            &self.accounts.handle,
            username.as_bytes(),
            codec::encode_account(user, phc),
        );
    }

    /// Writes a new account under the registration lock (`next_id`, the
    /// caller checked the name is free under it), releases the lock, waits
    /// for the sync and returns the new id.
    pub(crate) fn insert_account(
        &self,
        mut next_id: MutexGuard<'_, u64>,
        username: &str,
        phc: &str,
    ) -> Result<UserId, StoreError> {
        let user = *next_id;
        if user > crate::deleted_bits::MAX_USER_ID {
            return Err(StoreError::LimitExceeded(
                "this store has assigned every user id it can (2^36 - 1)",
            ));
        }
        let mut batch = self.db.batch();
        self.put_account(&mut batch, username, user, phc);
        batch.insert(
            &self.users.handle,
            codec::id_key(user),
            codec::encode_user(username),
        );
        let pending = self.write(batch, true)?;
        *next_id = user + 1;
        self.highest_user.store(user, Ordering::Release);
        drop(next_id);
        self.sync(pending)?;
        Ok(user)
    }

    /// Whether `user` is a registered id.
    pub(crate) fn user_exists(&self, user: UserId) -> Result<bool, StoreError> {
        self.users.contains(codec::id_key(user))
    }
}

/// A password that matched an account's stored hash, for
/// [`Store::login`] to check again when it issues the token.
pub(crate) struct PasswordChecked<'a> {
    pub(crate) username: &'a str,
    pub(crate) phc: &'a str,
}

impl Store {
    /// Creates an account and returns its id. Ids are dense from 1.
    ///
    /// The password is hashed (argon2id, random salt) before the
    /// registration lock is taken, so concurrent registrations hash in
    /// parallel and only the name check and insert are serialised.
    pub fn register(&self, username: &str, password: &[u8]) -> Result<UserId, StoreError> {
        check_username(username).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        check_password(password).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        let inner = &*self.inner;
        let phc = inner.hash_password(password)?;
        let next_id = lock(&inner.register_lock);
        if inner.accounts.contains(username.as_bytes())? {
            return Err(StoreError::UsernameTaken);
        }
        inner.insert_account(next_id, username, &phc)
    }

    /// Checks a username and password and returns the user's id.
    /// Unknown user and wrong password are both [`StoreError::AuthFailed`].
    pub fn verify_password(&self, username: &str, password: &[u8]) -> Result<UserId, StoreError> {
        self.inner
            .check_password(username, password)
            .map(|(user, _)| user)
    }

    /// A password login: checks the username and password and issues a
    /// session token, as [`Store::verify_password`] then
    /// [`Store::issue_token`] would, except that a password changed in
    /// between fails the login. The check hashes for tens of milliseconds
    /// outside any lock, so a `ChangePassword` can commit meanwhile; a
    /// token issued after it, on the strength of the old password, would
    /// outlive the revocation that went with the change.
    pub fn login(&self, username: &str, password: &[u8]) -> Result<(UserId, [u8; TOKEN_LEN]), StoreError> {
        let (user, phc) = self.inner.check_password(username, password)?;
        let checked = PasswordChecked { username, phc: &phc };
        let token = self.issue_token_checked(user, IssueCheck::PasswordUnchanged(checked))?;
        Ok((user, token))
    }

    /// A user's password change: checks `old` against the account, then
    /// stores `new` and revokes every token of the user in one write, as
    /// one step against logins and other changes (under the per-user
    /// token lock): a login that checked the old password gets no token
    /// after it (see [`Store::login`]), a login with the new one gets a
    /// token that stays valid, and of two changes from the same old
    /// password only the first succeeds (`AuthFailed` for the other).
    /// Returns how many tokens were revoked. Synced.
    pub fn change_password(&self, user: UserId, old: &[u8], new: &[u8]) -> Result<usize, StoreError> {
        check_password(new).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        let inner = &*self.inner;
        let username = self.username(user)?.ok_or(StoreError::NotFound)?;
        // Both hashes outside any lock: each costs tens of milliseconds.
        let (owner, old_phc) = inner.check_password(&username, old)?;
        if owner != user {
            return Err(StoreError::AuthFailed);
        }
        let new_phc = inner.hash_password(new)?;
        let checked = PasswordChecked {
            username: &username,
            phc: &old_phc,
        };
        // The registration lock (as in `set_password`: no registration's
        // check-then-insert of the same key interleaves with this
        // overwrite), then the user's token stripe: the order account
        // deletion takes them in. The other order deadlocked with a
        // deletion of any account on the same stripe.
        let registering = lock(&inner.register_lock);
        let issuing = inner.token_lock(user);
        if !inner.password_unchanged(&checked)? {
            // Another change got here first: `old` is no longer the password.
            return Err(StoreError::AuthFailed);
        }
        let mut batch = inner.db.batch();
        inner.put_account(&mut batch, &username, user, &new_phc);
        inner.commit_revoking_all(batch, user, (registering, issuing))
    }

    /// Replaces the password of `user`. Does not revoke tokens: the
    /// caller decides ([`Store::change_password`] does both as one step). Synced like a
    /// registration, so that an acknowledged change survives a crash and
    /// the old password never comes back.
    pub fn set_password(&self, user: UserId, new_password: &[u8]) -> Result<(), StoreError> {
        check_password(new_password).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        let inner = &*self.inner;
        let username = self.username(user)?.ok_or(StoreError::NotFound)?;
        let phc = inner.hash_password(new_password)?;
        // Taken so that a registration's check-then-insert of the same
        // key never interleaves with this overwrite.
        let guard = lock(&inner.register_lock);
        let mut batch = inner.db.batch();
        inner.put_account(&mut batch, &username, user, &phc);
        inner.commit_unlocked(batch, guard)
    }

    /// The username of `user`, if registered.
    pub fn username(&self, user: UserId) -> Result<Option<String>, StoreError> {
        let users = &self.inner.users;
        let key = codec::id_key(user);
        let Some(value) = users.get(&key)? else {
            return Ok(None);
        };
        let name = codec::decode_user(&value).map_err(|d| users.corrupt(&key, d))?;
        Ok(Some(name.to_owned()))
    }

    /// The id registered under `username`, if any.
    pub fn user_id(&self, username: &str) -> Result<Option<UserId>, StoreError> {
        if check_username(username).is_err() {
            return Ok(None);
        }
        Ok(self.inner.lookup_account(username)?.map(|(user, _)| user))
    }
}
