//! Fitting glommio's registered I/O memory into `RLIMIT_MEMLOCK`.
//!
//! Each glommio executor registers `io_memory` bytes of buffers with
//! io_uring, which counts against the locked-memory limit unless the process
//! has `CAP_IPC_LOCK` (root does). An operator running `ternd` as a service
//! user often has only 8 MiB, or even 64 KiB. [`io_memory_per_shard`] picks
//! a size that fits, or explains exactly what to change.

use std::io;

/// glommio's default registered memory per executor.
pub const DEFAULT_IO_MEMORY: usize = 10 << 20;
/// Below this per executor, glommio cannot start its rings.
pub const MIN_IO_MEMORY: usize = 256 << 10;

/// The locked-memory limit (soft), or `None` if unlimited.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur))
}

/// Whether the process is exempt from memlock accounting.
fn is_exempt() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Registered I/O memory per shard for `shards` executors, or a message
/// naming the limit to raise.
pub fn io_memory_per_shard(shards: usize) -> Result<usize, String> {
    let limit = match memlock_limit() {
        Ok(limit) => limit,
        Err(e) => return Err(format!("cannot read RLIMIT_MEMLOCK: {e}")),
    };
    plan(limit, is_exempt(), shards)
}

fn plan(limit: Option<u64>, exempt: bool, shards: usize) -> Result<usize, String> {
    let shards = shards.max(1);
    let Some(limit) = limit.filter(|_| !exempt) else {
        return Ok(DEFAULT_IO_MEMORY);
    };
    // Keep a quarter of the limit for io_uring's own rings.
    let usable = (limit as usize / 4) * 3;
    let per_shard = (usable / shards).min(DEFAULT_IO_MEMORY);
    if per_shard < MIN_IO_MEMORY {
        let need_kib = (MIN_IO_MEMORY * shards * 4 / 3) >> 10;
        return Err(format!(
            "locked-memory limit is {} KiB, too small for {shards} io_uring shards; raise it to at least \
             {need_kib} KiB (ulimit -l {need_kib}, or LimitMEMLOCK={need_kib}K in the systemd unit), \
             or run fewer shards",
            limit >> 10
        ));
    }
    Ok(per_shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fit_the_limit() {
        assert_eq!(plan(None, false, 4), Ok(DEFAULT_IO_MEMORY));
        assert_eq!(plan(Some(64 << 10), true, 4), Ok(DEFAULT_IO_MEMORY));
        let per = plan(Some(8 << 20), false, 2).unwrap();
        assert!(per * 2 <= 8 << 20 && per >= MIN_IO_MEMORY);
        let err = plan(Some(64 << 10), false, 2).unwrap_err();
        assert!(err.contains("LimitMEMLOCK"), "{err}");
    }
}
