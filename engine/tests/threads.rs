//! The threads a real `ternd` runs beside its shards, read from `/proc`:
//! which priority and CPU set each inherits is decided by which thread
//! spawns it, so these tests pin that down.

mod ternd_common;

use ternd_common::Ternd;

/// One thread of a process, as `/proc/PID/task/TID` shows it.
#[derive(Debug)]
struct ThreadInfo {
    tid: u32,
    name: String,
    nice: i64,
    cpus: String,
}

fn threads_of(pid: u32) -> Vec<ThreadInfo> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read the tasks") {
        let dir = task.expect("task entry").path();
        let Some(tid) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        // A thread may exit between the listing and the reads.
        let (Ok(comm), Ok(stat), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        threads.push(ThreadInfo {
            tid,
            name: comm.trim().to_owned(),
            nice: nice_from_stat(&stat),
            cpus: cpus_from_status(&status),
        });
    }
    threads
}

/// Field 19 of `stat`; fields count from the `)` closing the name, which
/// may itself hold spaces.
fn nice_from_stat(stat: &str) -> i64 {
    let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
    after_name
        .split(' ')
        .nth(16)
        .expect("stat has a nice field")
        .parse()
        .expect("nice is a number")
}

fn cpus_from_status(status: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("status lists the allowed CPUs")
        .trim()
        .to_owned()
}

/// The thread named `name`, as the kernel keeps it (15 bytes at most).
fn one_named<'a>(threads: &'a [ThreadInfo], name: &str) -> &'a ThreadInfo {
    let kept = &name[..name.len().min(15)];
    let found: Vec<&ThreadInfo> = threads.iter().filter(|t| t.name == kept).collect();
    assert_eq!(found.len(), 1, "one thread named {name}: {threads:#?}");
    found[0]
}

/// lsm-tree's reaper frees every flushed memtable of the node. Started on
/// demand it could be spawned by the storage writer (a write that rotates
/// a memtable inline), which on a box with a CPU to spare is pinned to a
/// CPU of its own: the reaper's frees would then compete with every group
/// commit. It starts with the store instead, as fjall's own workers do.
#[test]
fn the_reaper_starts_with_the_store_at_its_workers_priority_on_every_cpu() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("ternd.log");
    // The binary's defaults: shards and the writer pinned where CPUs allow.
    let ternd = Ternd::start_plain(&dir.path().join("data"), &log, &[]);
    let threads = threads_of(ternd.pid());
    let main = threads
        .iter()
        .find(|t| t.tid == ternd.pid())
        .expect("the main thread, whose id is the process's");
    let reaper = one_named(&threads, "lsm-reaper");
    let workers: Vec<&ThreadInfo> = threads.iter().filter(|t| t.name == "fjall:worker").collect();
    assert!(!workers.is_empty(), "{threads:#?}");
    for worker in &workers {
        assert_eq!(
            reaper.nice, worker.nice,
            "the reaper runs at fjall's workers' priority: {threads:#?}"
        );
        assert_eq!(reaper.cpus, worker.cpus, "{threads:#?}");
    }
    // Not equal where the server already runs at nice 19.
    assert!(reaper.nice >= main.nice, "{threads:#?}");
    assert_eq!(reaper.cpus, main.cpus, "{threads:#?}");
    let writer = one_named(&threads, "tern-store-writer");
    if writer.cpus != main.cpus {
        // Pinned (a CPU to spare): the reaper is not confined with it.
        assert_ne!(reaper.cpus, writer.cpus);
    }
    ternd.stop();
}
