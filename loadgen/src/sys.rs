//! The operating-system limits and readings a load run depends on: raising
//! this process's open-file limit (every connection is a descriptor) with a
//! precise message when the hard limit is too low, and reading another
//! process's resident memory from `/proc`.

use std::io;

/// Descriptors a worker needs beyond its connections (executor rings,
/// eventfds, pipes, stdio, the setup connections still closing).
pub const SPARE_FDS: u64 = 128;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and checks that
/// `needed` descriptors fit. The error says what to change.
pub fn raise_nofile(needed: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "cannot read RLIMIT_NOFILE: {}",
            io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; lowering nothing, raising the
        // soft limit up to the hard one is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    check_nofile(limit.rlim_cur, limit.rlim_max, needed)
}

fn check_nofile(soft: u64, hard: u64, needed: u64) -> Result<u64, String> {
    if soft >= needed {
        return Ok(soft);
    }
    let procs_hint = needed.div_ceil(hard.saturating_sub(SPARE_FDS).max(1));
    Err(format!(
        "this process needs about {needed} file descriptors but may open only {soft} (hard limit {hard}). \
         Raise the hard limit (`ulimit -Hn {needed}` as root, `LimitNOFILE={needed}` in a systemd unit, \
         or `nofile` in /etc/security/limits.conf; fs.nr_open caps it), or spread the connections over \
         more processes: --procs {procs_hint} or more"
    ))
}

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_vm_rss(&text).ok_or_else(|| format!("{path} has no VmRSS line"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_parses() {
        let status = "Name:\tternd\nVmPeak:\t  100 kB\nVmRSS:\t   23456 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(23456));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn nofile_check_explains_the_fix() {
        assert_eq!(check_nofile(20_000, 20_000, 10_000), Ok(20_000));
        let err = check_nofile(20_000, 20_000, 40_000).unwrap_err();
        assert!(err.contains("LimitNOFILE=40000"), "{err}");
        assert!(err.contains("--procs 3"), "{err}");
    }
}
