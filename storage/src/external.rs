//! Logins vouched for by the operator's own identity provider: the engine
//! verifies a JSON Web Token and hands this module the username and the
//! token's issue time; this module finds (or creates) the account and
//! issues a session token. It owns the passwordless account marker and the
//! `revocations` keyspace (user -> when the user's sessions were last
//! revoked), which a token issued by the provider before that moment
//! cannot outlive: Tern cannot revoke the provider's tokens, so it refuses
//! those that are older than the user's last revocation.

use tern_proto::limits::{check_username, TOKEN_LEN};

use crate::tokens::IssueCheck;
use crate::{codec, lock, Inner, Store, StoreError, UserId};

/// The password "hash" of an account created by an external login. It is
/// not a PHC string (those start with `$`), so no password ever matches it;
/// password logins to such an account fail as for a wrong password.
pub(crate) const NO_PASSWORD: &str = "!external";

/// Which accounts an external login may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalPolicy {
    /// Create a missing account (without a password).
    pub create_accounts: bool,
    /// Log into accounts registered with a password too. Off, a `Register`
    /// of a name cannot capture the provider's user of that name later.
    pub password_accounts: bool,
}

/// What [`Store::external_login`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalLogin {
    /// Logged in: a new session token for the account, which
    /// [`Store::token_login`] accepts from now on.
    LoggedIn {
        user: UserId,
        token: [u8; TOKEN_LEN],
        /// The account was created by this login.
        created: bool,
    },
    /// No account has the name and the policy does not create one.
    NoAccount,
    /// The name belongs to an account registered with a password, which
    /// the policy keeps from external logins.
    PasswordAccount,
    /// The user's sessions were revoked after the provider issued the
    /// token (or the token does not say when it was issued).
    IssuedBeforeRevocation,
}

impl Inner {
    /// When `user`'s sessions were last revoked (Unix ms), if ever.
    pub(crate) fn revoked_at(&self, user: UserId) -> Result<Option<u64>, StoreError> {
        let key = codec::id_key(user);
        match self.revocation_times.get(&key)? {
            Some(value) => codec::decode_revocation(&value)
                .map(Some)
                .map_err(|d| self.revocation_times.corrupt(&key, d)),
            None => Ok(None),
        }
    }

    /// Adds "`user`'s sessions revoked at `at_ms`" to `batch`, unless an
    /// earlier revocation is recorded as later (the clock was stepped
    /// back): the recorded time never moves backwards, so a token one
    /// revocation refused no later one lets in. Call under the user's
    /// token lock.
    pub(crate) fn put_revocation(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: UserId,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let at_ms = at_ms.max(self.revoked_at(user)?.unwrap_or(0));
        batch.insert(
            &self.revocation_times.handle,
            codec::id_key(user),
            codec::encode_revocation(at_ms),
        );
        Ok(())
    }

    /// Whether a token issued at `issued_at_ms` (None: unknown) predates
    /// `user`'s last revocation. Call under the user's token lock, where
    /// revocations are written.
    pub(crate) fn issued_before_revocation(
        &self,
        user: UserId,
        issued_at_ms: Option<u64>,
    ) -> Result<bool, StoreError> {
        Ok(match self.revoked_at(user)? {
            None => false,
            Some(revoked) => issued_at_ms.is_none_or(|issued| issued <= revoked),
        })
    }
}

impl Store {
    /// Logs `username` in on the word of the operator's identity provider
    /// (the caller verified its token): issues a session token as
    /// [`Store::login`] does, unless the provider's token was issued
    /// (`issued_at_ms`, Unix ms; None when it does not say) no later than
    /// the user's last revocation ([`Store::revoke_tokens`],
    /// [`Store::change_password`]). That check and the issue happen under
    /// the lock revocations take, so a revocation either sees the new
    /// token (and removes it) or is seen by the check.
    ///
    /// `policy` says which accounts it may use: with `create_accounts`, a
    /// missing account is created without a password (password logins to
    /// it fail with [`StoreError::AuthFailed`]), in a synced write like
    /// [`Store::register`]; without `password_accounts`, an account that
    /// was registered with a password is [`ExternalLogin::PasswordAccount`].
    pub fn external_login(
        &self,
        username: &str,
        issued_at_ms: Option<u64>,
        policy: ExternalPolicy,
    ) -> Result<ExternalLogin, StoreError> {
        check_username(username).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        let inner = &*self.inner;
        let (user, phc, created) = match inner.lookup_account(username)? {
            Some((user, phc)) => (user, phc, false),
            None if !policy.create_accounts => return Ok(ExternalLogin::NoAccount),
            None => inner.create_account(username, NO_PASSWORD)?,
        };
        if phc != NO_PASSWORD && !policy.password_accounts {
            return Ok(ExternalLogin::PasswordAccount);
        }
        match self.issue_token_checked(user, IssueCheck::NotRevokedSince(issued_at_ms)) {
            Ok(token) => Ok(ExternalLogin::LoggedIn { user, token, created }),
            Err(StoreError::AuthFailed) => Ok(ExternalLogin::IssuedBeforeRevocation),
            Err(e) => Err(e),
        }
    }
}

impl Inner {
    /// Creates `username` with the password hash `phc` and returns its
    /// id, `phc` and `true`; if a concurrent registration took the name
    /// first, that account's id and hash and `false`. Synced.
    pub(crate) fn create_account(
        &self,
        username: &str,
        phc: &str,
    ) -> Result<(UserId, String, bool), StoreError> {
        let next_id = lock(&self.register_lock);
        if let Some((user, existing)) = self.lookup_account(username)? {
            return Ok((user, existing, false));
        }
        let user = self.insert_account(next_id, username, phc)?;
        Ok((user, phc.to_owned(), true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_time_never_moves_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::test_options()).unwrap();
        let inner = &*store.inner;
        for (at, recorded) in [(5_000, 5_000), (3_000, 5_000), (9_000, 9_000)] {
            // As a revocation after the clock was stepped back would.
            let mut batch = inner.db.batch();
            inner.put_revocation(&mut batch, 7, at).unwrap();
            inner.commit(batch, false).unwrap();
            assert_eq!(inner.revoked_at(7).unwrap(), Some(recorded));
        }
        // Refused up to and including the recorded time.
        assert!(inner.issued_before_revocation(7, Some(9_000)).unwrap());
        assert!(!inner.issued_before_revocation(7, Some(9_001)).unwrap());
        assert!(inner.issued_before_revocation(7, None).unwrap());
        assert!(!inner.issued_before_revocation(8, None).unwrap());
    }
}
