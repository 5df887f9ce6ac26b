//! Getting a session token for every user a scenario needs.
//!
//! Registration and password login make the server run argon2 (tens of
//! milliseconds each), so this happens before the measured phases, over
//! short-lived connections with bounded concurrency, and yields tokens:
//! the measured phases then log in with `LoginToken`, which is cheap. With
//! `--prefix`, existing users are reused: login is tried first and
//! registration only follows when the user does not exist. With
//! `--jwt-secret-file` each user logs in with a minted JWT instead, which
//! creates the account on the server if needed and hashes no password.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use tern_proto::{ErrorCode, UserId};

use crate::stats::LiveCounters;
use crate::wire::{with_timeout, Conn, WireError};
use crate::worker::{for_each_bounded, Ctx};

/// One user's setup may wait behind many others' password hashing.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Tokens for users `users` (global user numbers), in order; `None` where
/// setup failed (already counted as an error and logged).
pub async fn obtain_tokens(ctx: &Rc<Ctx>, users: Range<usize>) -> Vec<Option<Vec<u8>>> {
    obtain_accounts(ctx, users)
        .await
        .into_iter()
        .map(|account| account.map(|(_, token)| token))
        .collect()
}

/// A user's id and session token.
pub type Account = (UserId, Vec<u8>);

/// Like [`obtain_tokens`], with each user's id (from its login).
pub async fn obtain_accounts(ctx: &Rc<Ctx>, users: Range<usize>) -> Vec<Option<Account>> {
    obtain_accounts_of(ctx, users.collect()).await
}

/// [`obtain_accounts`] for any user numbers, in one bounded pass: slot `i`
/// of the result is user `users[i]`'s.
pub async fn obtain_accounts_of(ctx: &Rc<Ctx>, users: Vec<usize>) -> Vec<Option<Account>> {
    let tokens: Rc<RefCell<Vec<Option<Account>>>> = Rc::new(RefCell::new(vec![None; users.len()]));
    let count = users.len();
    let users = Rc::new(users);
    let workers = ctx.setup_workers;
    let task_ctx = ctx.clone();
    let task_tokens = tokens.clone();
    for_each_bounded(count, workers, move |i| {
        let ctx = task_ctx.clone();
        let tokens = task_tokens.clone();
        let n = users.get(i).copied();
        async move {
            let Some(n) = n else {
                return;
            };
            match with_timeout(SETUP_TIMEOUT, token_for(&ctx, n)).await {
                Ok(token) => {
                    if let Some(slot) = tokens.borrow_mut().get_mut(i) {
                        *slot = Some(token);
                    }
                    LiveCounters::add(&ctx.live().users_ready, 1);
                }
                Err(e) => ctx.fail(&format!("setting up user {}", ctx.username(n)), &e),
            }
        }
    })
    .await;
    Rc::try_unwrap(tokens).map_or_else(|rc| rc.borrow().clone(), RefCell::into_inner)
}

async fn token_for(ctx: &Ctx, n: usize) -> Result<Account, WireError> {
    let name = ctx.username(n);
    if let Some(minter) = &ctx.plan.jwt {
        let jwt = minter.mint(&name).map_err(WireError::Protocol)?;
        let mut conn = Conn::open(ctx.plan.cli.common.server, ctx.source(n)).await?;
        return conn.login_jwt(&jwt).await;
    }
    let password = ctx.plan.cli.common.password.as_str();
    let mut conn = Conn::open(ctx.plan.cli.common.server, ctx.source(n)).await?;
    if ctx.plan.reuse {
        match conn.login(&name, password).await {
            Ok(account) => return Ok(account),
            Err(e) if matches!(e.server_code(), Some(ErrorCode::AuthFailed | ErrorCode::NotFound)) => {}
            Err(e) => return Err(e),
        }
    }
    conn.register(&name, password).await?;
    conn.login(&name, password).await
}
