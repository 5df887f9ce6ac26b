//! What Tern's patch to lsm-tree (vendor/README.md) must keep while it moves
//! the drop of retired versions off the tree's insert lock onto the
//! `lsm-reaper` thread: the files of tables compacted away are still
//! deleted, a dropped store has none of those deletions still queued (so a
//! reopen in the same process cannot race them), and nothing written goes
//! missing, before or after a reopen. (The memtables those versions held
//! are freed by the same drop; nothing here observes that directly.)

use std::path::Path;
use std::time::{Duration, Instant};

use fjall::{Database, KeyspaceCreateOptions};

const KEYS: u32 = 20_000;

fn key(i: u32) -> [u8; 4] {
    i.to_be_bytes()
}

fn value(i: u32) -> Vec<u8> {
    // 100 bytes each, so 20,000 keys fill a 64 KiB memtable ~30 times.
    let mut v = vec![b'x'; 100];
    v[..4].copy_from_slice(&i.to_be_bytes());
    v
}

/// Opens the store in `dir` with keyspace `t`, whose memtables rotate at
/// `memtable_bytes`.
fn open(dir: &Path, memtable_bytes: u64) -> (Database, fjall::Keyspace) {
    let db = Database::builder(dir).open().unwrap();
    let ks = db
        .keyspace("t", || {
            KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
        })
        .unwrap();
    (db, ks)
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn table_files(ks: &fjall::Keyspace) -> usize {
    files_in(&ks.path().join("tables"))
}

fn reaper_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "lsm-reaper")
        .count()
}

fn assert_all_readable(ks: &fjall::Keyspace) {
    for i in 0..KEYS {
        let got = ks.get(key(i)).unwrap();
        assert_eq!(got.as_deref(), Some(value(i).as_slice()), "key {i}");
    }
}

#[test]
fn compacted_tables_files_are_deleted_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, ks) = open(dir.path(), 64 * 1024);
        for i in 0..KEYS {
            ks.insert(key(i), value(i)).unwrap();
        }
        ks.rotate_memtable_and_wait().unwrap();
        let before = ks.table_count();
        ks.major_compact().unwrap();
        assert!(
            ks.table_count() < before,
            "compaction dropped tables: {before} → {}",
            ks.table_count()
        );
        // The version GC is lazy: it runs at the next rotation (which also
        // raises its watermark), as upstream's does.
        ks.insert(key(0), value(0)).unwrap();
        ks.rotate_memtable_and_wait().unwrap();
        assert_all_readable(&ks);
        assert_eq!(reaper_threads(), 1, "the GC's drops go to one lsm-reaper thread");

        // The compacted-away tables' files go when the reaper drops the
        // last version holding them: soon, not never.
        let deadline = Instant::now() + Duration::from_secs(20);
        while table_files(&ks) > ks.table_count() {
            assert!(
                Instant::now() < deadline,
                "{} table files for {} live tables",
                table_files(&ks),
                ks.table_count()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let (_db, ks) = open(dir.path(), 64 * 1024);
    assert_all_readable(&ks);
    assert_eq!(table_files(&ks), ks.table_count());
}

#[test]
fn a_dropped_store_leaves_no_table_deletion_queued() {
    let dir = tempfile::tempdir().unwrap();
    let live;
    let tables_dir;
    {
        // Memtables of 4 MiB: the versions the last rotation retires hold
        // several, whose free delays the deletion of the compacted tables
        // behind them on the reaper.
        let (_db, ks) = open(dir.path(), 4 << 20);
        for i in 0..200_000u32 {
            ks.insert(key(i), value(i)).unwrap();
        }
        ks.rotate_memtable_and_wait().unwrap();
        ks.major_compact().unwrap();
        ks.insert(key(0), value(0)).unwrap();
        ks.rotate_memtable_and_wait().unwrap();
        live = ks.table_count();
        tables_dir = ks.path().join("tables");
    }
    assert_eq!(
        files_in(&tables_dir),
        live,
        "table files left after the store was dropped"
    );
    let (_db, ks) = open(dir.path(), 4 << 20);
    for i in [0u32, 1, 99_999, 199_999] {
        assert_eq!(ks.get(key(i)).unwrap().as_deref(), Some(value(i).as_slice()));
    }
}
