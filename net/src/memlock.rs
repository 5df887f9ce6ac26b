//! Fitting glommio's registered I/O memory into `RLIMIT_MEMLOCK`.
//!
//! Each glommio executor registers `io_memory` bytes of buffers with
//! io_uring, which counts against the locked-memory limit unless the process
//! has `CAP_IPC_LOCK` (root usually does; root in a container or a user
//! namespace may not). Kernels before 5.12 also charge the
//! executor's three rings there (about 100 bytes per ring entry, so ~1.2 MiB
//! per shard at ternd's 4,096-entry rings). An operator running `ternd` as a
//! service user often has only 8 MiB, or even 64 KiB. [`io_memory_per_shard`]
//! picks a size that fits, or explains exactly what to change.

use std::io;

/// glommio's default registered memory per executor.
pub const DEFAULT_IO_MEMORY: usize = 10 << 20;
/// Below this per executor, glommio cannot start its rings.
pub const MIN_IO_MEMORY: usize = 256 << 10;
/// glommio's ring depth unless an executor asks for another.
pub const GLOMMIO_DEFAULT_RING_DEPTH: usize = 128;
/// Rings per glommio executor: main, latency and poll, each `ring_depth` deep.
const RINGS_PER_EXECUTOR: usize = 3;
const PAGE: usize = 4096;

/// io_uring memory of one executor's rings at `ring_depth` entries: per
/// ring, `ring_depth` 64-byte submission entries and 4-byte indices and
/// twice as many 16-byte completion entries, each region rounded up to
/// pages.
pub fn ring_bytes_per_executor(ring_depth: usize) -> usize {
    let pages = |bytes: usize| bytes.div_ceil(PAGE) * PAGE;
    let entries = ring_depth.max(1).next_power_of_two();
    let per_ring = pages(entries * 64) + pages(entries * 4 + 2 * entries * 16 + PAGE);
    RINGS_PER_EXECUTOR * per_ring
}

/// Whether a kernel of this release (`uname -r`) charges io_uring rings to
/// `RLIMIT_MEMLOCK`: those before 5.12 do (later ones charge the memory
/// cgroup). A release that does not parse is assumed to.
fn charges_rings_to_memlock(release: &str) -> bool {
    kernel_version(release).is_none_or(|version| version < (5, 12))
}

/// `(major, minor)` of a kernel release string as `uname -r` prints it
/// (`"6.18.44-fc-v669"` → `(6, 18)`), or `None` if it does not start so.
/// io_uring features come with kernel versions: what the rings cost
/// (here) and whether they can skip interrupts (5.19,
/// `glommio::coop_taskrun_rings`) both depend on it.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    Some((numbers.next().flatten()?, numbers.next().flatten()?))
}

/// This kernel's release string, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
}

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

/// `CAP_IPC_LOCK`'s bit in a capability set.
const CAP_IPC_LOCK: u32 = 14;

/// Whether the process is exempt from memlock accounting: it holds
/// `CAP_IPC_LOCK` in its effective set. Not whether it is root: root in a
/// container's default capability set, or in a user namespace, lacks it,
/// and is charged like anyone. Where `/proc` cannot tell, root is taken
/// to hold it.
fn is_exempt() -> bool {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => holds_ipc_lock(&status).unwrap_or(false),
        // SAFETY: geteuid has no preconditions.
        Err(_) => unsafe { libc::geteuid() == 0 },
    }
}

/// Whether the `CapEff` line of a `/proc/<pid>/status` text has
/// `CAP_IPC_LOCK`; `None` without a readable line.
fn holds_ipc_lock(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let effective = u64::from_str_radix(hex, 16).ok()?;
    Some(effective >> CAP_IPC_LOCK & 1 == 1)
}

/// Registered I/O memory per shard for `shards` executors whose rings are
/// `ring_depth` deep, or a message naming the limit to raise.
pub fn io_memory_per_shard(shards: usize, ring_depth: usize) -> Result<usize, String> {
    let limit = match memlock_limit() {
        Ok(limit) => limit,
        Err(e) => return Err(format!("cannot read RLIMIT_MEMLOCK: {e}")),
    };
    let rings = if charges_rings_to_memlock(&kernel_release()) {
        ring_bytes_per_executor(ring_depth)
    } else {
        0
    };
    plan(limit, is_exempt(), shards, rings)
}

/// `rings`: ring memory per shard charged to the limit (0 when the kernel
/// charges it elsewhere).
fn plan(limit: Option<u64>, exempt: bool, shards: usize, rings: usize) -> Result<usize, String> {
    let shards = shards.max(1);
    let Some(limit) = limit.filter(|_| !exempt) else {
        return Ok(DEFAULT_IO_MEMORY);
    };
    let rings_total = rings.saturating_mul(shards);
    // Keep a quarter of what the rings leave for io_uring's other uses.
    let usable = (usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(rings_total)
        / 4)
        * 3;
    let per_shard = (usable / shards).min(DEFAULT_IO_MEMORY);
    if per_shard < MIN_IO_MEMORY {
        let need_kib = (MIN_IO_MEMORY * shards * 4 / 3 + rings_total).div_ceil(1024);
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
    fn the_exemption_is_cap_ipc_lock_in_the_effective_set() {
        let status = |eff: &str| format!("Name:\tternd\nCapPrm:\t000001ffffffffff\nCapEff:\t{eff}\n");
        assert_eq!(holds_ipc_lock(&status("000001fffeffffff")), Some(true));
        // Docker's default set as root: no CAP_IPC_LOCK.
        assert_eq!(holds_ipc_lock(&status("00000000a80425fb")), Some(false));
        assert_eq!(holds_ipc_lock(&status("0000000000004000")), Some(true));
        assert_eq!(holds_ipc_lock(&status("0000000000000000")), Some(false));
        assert_eq!(holds_ipc_lock("Name:\tternd\n"), None);
        assert_eq!(holds_ipc_lock(&status("zz")), None);
    }

    #[test]
    fn plans_fit_the_limit() {
        assert_eq!(plan(None, false, 4, 0), Ok(DEFAULT_IO_MEMORY));
        assert_eq!(plan(Some(64 << 10), true, 4, 0), Ok(DEFAULT_IO_MEMORY));
        let per = plan(Some(8 << 20), false, 2, 0).unwrap();
        assert!(per * 2 <= 8 << 20 && per >= MIN_IO_MEMORY);
        let err = plan(Some(64 << 10), false, 2, 0).unwrap_err();
        assert!(err.contains("LimitMEMLOCK"), "{err}");
    }

    #[test]
    fn rings_charged_to_the_limit_leave_less_for_buffers() {
        let rings = ring_bytes_per_executor(4096);
        // 3 rings x (256 KiB of submission entries + 148 KiB of indices,
        // completions and the ring header, in whole pages).
        assert_eq!(rings, 3 * ((256 << 10) + (148 << 10)));
        assert_eq!(
            ring_bytes_per_executor(GLOMMIO_DEFAULT_RING_DEPTH),
            3 * ((8 << 10) + (12 << 10))
        );
        let limit = 8u64 << 20;
        let per = plan(Some(limit), false, 2, rings).unwrap();
        assert!(2 * (per + rings) <= limit as usize, "{per}");
        assert!(per < plan(Some(limit), false, 2, 0).unwrap());
        // The advice covers the rings: raising the limit to it is enough.
        let err = plan(Some(2 << 20), false, 4, rings).unwrap_err();
        let need_kib: u64 = err
            .split("at least ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{err}"));
        assert!(plan(Some(need_kib << 10), false, 4, rings).is_ok(), "{err}");
    }

    #[test]
    fn kernels_before_5_12_charge_rings_to_memlock() {
        for (release, charged) in [
            ("5.10.0-28-amd64", true),
            ("5.11.22", true),
            ("5.12.0", false),
            ("6.18.44-fc-v669", false),
            ("4.19.0", true),
            ("", true),
        ] {
            assert_eq!(charges_rings_to_memlock(release), charged, "{release}");
        }
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.19"), Some((5, 19)));
        assert_eq!(kernel_version("6"), None);
    }
}
