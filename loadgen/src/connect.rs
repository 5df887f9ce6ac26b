//! The `connect` scenario: open N authenticated sessions at a ramp rate and
//! hold them idle.
//!
//! Connection attempts are scheduled open-loop (attempt k at start + k/rate)
//! and each one's latency, from its scheduled time to `LoggedIn`, goes into
//! the histogram, so a server that falls behind shows up as latency rather
//! than as a slower ramp. Held connections ping at a third of the server's
//! idle timeout and validate whatever the server sends. Users may carry
//! several sessions each (`--sessions-per-user`), which keeps the slow
//! password setup short for large counts.
//!
//! At most `--max-pending` attempts are in flight at once: a burst larger
//! than the server's accept backlog would otherwise lose SYNs, and each
//! lost SYN costs its connection the kernel's one-second retransmit, which
//! measures that timer rather than the server. A session's `Hello`,
//! `LoginToken` and `Sync` go out in one write unless `--serial-setup`.
//! With `--login jwt` each session logs in with a JWT minted for it
//! (`--jwt-secret-file`), which measures JWT logins instead of resumes.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::sync::Semaphore;
use tern_proto::{ArchivedServerBody, ClientBody};

use crate::cli::{ConnectArgs, LoginKind};
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_tokens;
use crate::wire::{
    due_ns, frame_failure, keep_alive, now_ns, open_session_serial, open_session_with, read_frames,
    sleep_until_ns, WireError,
};
use crate::worker::{finish_outcome, secs_between, wait_until, Ctx};

/// Total users for `connections` sessions at `per_user` sessions each.
pub fn users_needed(connections: usize, per_user: usize) -> usize {
    connections.div_ceil(per_user.max(1))
}

/// Sessions user `u` carries.
pub fn sessions_of(u: usize, connections: usize, per_user: usize) -> usize {
    connections.saturating_sub(u * per_user).min(per_user)
}

pub async fn run(ctx: Rc<Ctx>, args: ConnectArgs) -> ExecOutcome {
    let per_user = args.sessions_per_user;
    let serial = args.serial_setup;
    let login_kind = args.login;
    let users = ctx
        .plan
        .exec_share(users_needed(args.connections, per_user), ctx.exec);
    let users_start = users.start;
    let tokens = obtain_tokens(&ctx, users.clone()).await;
    ctx.setup_done().await;

    // (global connection number, index into `tokens`) for each attempt.
    let attempts: Vec<(usize, usize)> = users
        .clone()
        .enumerate()
        .flat_map(|(i, u)| {
            (0..sessions_of(u, args.connections, per_user)).map(move |s| (u * per_user + s, i))
        })
        .collect();
    let slots = ctx.plan.slots() as f64;
    let interval_ns = (1e9 * slots / args.rate) as u64;
    let tokens = Rc::new(tokens);
    let established = Rc::new(Cell::new(0u64));
    let failed = Rc::new(Cell::new(0u64));
    let last_done_ns = Rc::new(Cell::new(0u64));
    // This executor's share of the attempts allowed in flight at once.
    let pending = Rc::new(Semaphore::new(
        (args.max_pending as f64 / slots).ceil().max(1.0) as u64
    ));
    let start_ns = now_ns();
    let mut held = Vec::with_capacity(attempts.len());
    for (k, &(conn_no, token_index)) in attempts.iter().enumerate() {
        let intended_ns = due_ns(start_ns, k as u64, interval_ns);
        let (ctx, tokens) = (ctx.clone(), tokens.clone());
        let (established, failed, last_done_ns) = (established.clone(), failed.clone(), last_done_ns.clone());
        let pending = pending.clone();
        held.push(glommio::spawn_local(async move {
            sleep_until_ns(intended_ns).await;
            // Never closed, so this cannot fail; the attempt waits its turn
            // (and that wait counts in its latency).
            let permit = pending.acquire_permit(1).await;
            let Some(Some(token)) = tokens.get(token_index) else {
                // The user's setup failed (already counted there).
                failed.set(failed.get() + 1);
                last_done_ns.set(now_ns());
                return;
            };
            let timeout = ctx.plan.cli.common.connect_timeout();
            let (server, source) = (ctx.plan.cli.common.server, ctx.source(conn_no));
            let login = match (login_kind, &ctx.plan.jwt) {
                (LoginKind::Jwt, Some(minter)) => minter
                    .mint(&ctx.username(users_start + token_index))
                    .map(|token| ClientBody::LoginJwt { token })
                    .map_err(WireError::Protocol),
                (LoginKind::Jwt, None) => {
                    Err(WireError::Protocol("--login jwt needs --jwt-secret-file".into()))
                }
                (LoginKind::Token, _) => Ok(ClientBody::LoginToken { token: token.clone() }),
            };
            let opened = match login {
                Ok(login) if serial => open_session_serial(server, source, login, timeout).await,
                Ok(login) => open_session_with(server, source, login, timeout).await,
                Err(e) => Err(e),
            };
            last_done_ns.set(now_ns());
            drop(permit);
            let conn = match opened {
                Ok((conn, _user)) => conn,
                Err(e) => {
                    failed.set(failed.get() + 1);
                    ctx.fail("connecting", &e);
                    return;
                }
            };
            ctx.recorder.record_ns(now_ns().saturating_sub(intended_ns));
            established.set(established.get() + 1);
            LiveCounters::add(&ctx.live().open_connections, 1);
            let ended = hold(&ctx, conn).await;
            ctx.live()
                .open_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if !ctx.closing.get() {
                ctx.fail("held connection ended", &ended);
            }
        }));
    }
    let total = attempts.len() as u64;
    // Every attempt ends by its own timeout; the margin only guards bugs.
    let ramp = Duration::from_nanos(interval_ns.saturating_mul(total));
    let limit = ramp + ctx.plan.cli.common.connect_timeout() * 2 + Duration::from_secs(5);
    wait_until(limit, || established.get() + failed.get() >= total).await;
    let connect_secs = secs_between(start_ns, last_done_ns.get().max(start_ns));
    // The ramp's figures, taken together: an attempt still waiting for a
    // --max-pending permit at the limit is not established by it (it may
    // get through during the hold, after the rate and the server's memory
    // were taken), so it counts as failed here.
    let established_by_limit = established.get();

    ctx.connected().await;
    let hold_for = Duration::from_secs_f64(args.hold_secs.unwrap_or(ctx.plan.cli.common.duration_secs));
    glommio::timer::sleep(hold_for).await;
    ctx.closing.set(true);
    let outcome = ExecOutcome {
        users: users.len() as u64,
        connections: established_by_limit,
        connect_failures: total - established_by_limit,
        connect_secs,
        window_secs: hold_for.as_secs_f64(),
        ..ExecOutcome::empty()
    };
    let outcome = finish_outcome(&ctx, outcome);
    drop(held);
    outcome
}

/// Keeps one idle session alive until it fails.
async fn hold(ctx: &Rc<Ctx>, conn: crate::wire::Conn) -> WireError {
    let ping = conn.limits().ping_interval();
    let (reader, writer) = conn.into_running();
    let handler_ctx = ctx.clone();
    let reading = read_frames(reader, move |frame| {
        if let Some(failure) = frame_failure(frame) {
            if matches!(frame.body, ArchivedServerBody::Disconnect { .. }) {
                return Err(failure);
            }
            handler_ctx.fail("idle connection got an error", &failure);
        }
        Ok(())
    });
    match ping {
        Some(interval) => future::or(reading, keep_alive(writer, interval)).await,
        None => reading.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_spread_over_users() {
        assert_eq!(users_needed(19_000, 16), 1188);
        assert_eq!(users_needed(50, 1), 50);
        let total: usize = (0..users_needed(19_000, 16))
            .map(|u| sessions_of(u, 19_000, 16))
            .sum();
        assert_eq!(total, 19_000);
        assert_eq!(sessions_of(1187, 19_000, 16), 19_000 - 1187 * 16);
        assert_eq!(sessions_of(2000, 19_000, 16), 0);
    }
}
