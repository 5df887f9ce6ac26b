//! What Tern's patch to lsm-tree (vendor/README.md) must keep while it moves
//! the drop of retired versions off the tree's insert lock onto the
//! `lsm-reaper` thread: the files of tables compacted away are still
//! deleted, a dropped store has none of those deletions still queued (so a
//! reopen in the same process cannot race them), and nothing written goes
//! missing, before or after a reopen. (The memtables those versions held
//! are freed by the same drop; nothing here observes that directly.) And
//! what its word-at-a-time key compare must keep: keys come back in the
//! byte order of `<[u8]>::cmp`, from the memtable and from tables alike.

use std::collections::BTreeMap;
use std::ops::Bound;
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
        // What /metrics reports of its backlog: never past its bound, and
        // drained once the reaper catches up (other tests of this binary
        // may queue batches meanwhile; they end within seconds).
        let drained_by = Instant::now() + Duration::from_secs(20);
        loop {
            let backlog = tern_storage::ReaperBacklog::now();
            assert!(backlog.pending_batches <= 16, "{backlog:?}");
            if backlog.pending_batches == 0 {
                break;
            }
            assert!(
                Instant::now() < drained_by,
                "reaper backlog never drained: {backlog:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

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

/// Keys of 1–80 bytes (lsm-tree refuses empty ones) over five byte values, so that ties, shared
/// prefixes, one key a prefix of another, and differences in every byte of
/// an 8-byte word are all common; lengths around 8, 16, 64 (where the
/// compare falls back to `memcmp`) included.
fn awkward_keys(count: usize) -> Vec<Vec<u8>> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut keys = Vec::with_capacity(count);
    let mut stem: Vec<u8> = Vec::new();
    while keys.len() < count {
        let len = match next() % 4 {
            0 => 1 + (next() % 80) as usize,
            1 => [7, 8, 9, 15, 16, 17, 63, 64, 65][(next() % 9) as usize],
            // Grow or cut the previous key: long runs of shared prefixes.
            2 => stem.len().saturating_sub((next() % 3) as usize).max(1),
            _ => (stem.len() + 1 + (next() % 3) as usize).min(80),
        };
        stem.resize(len, 0);
        if let Some(byte) = stem.get_mut((next() as usize) % len) {
            *byte = [0u8, 1, 0x7f, 0x80, 0xff][(next() % 5) as usize];
        }
        keys.push(stem.clone());
    }
    keys
}

#[test]
fn keys_come_back_in_byte_order_from_memtables_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    // The first half flushed to tables (a rotation waited for), the second
    // written after it (64 KiB memtables: most of it flushed as they fill,
    // the newest keys still in the memtable), then everything again after a
    // major compaction.
    let (_db, ks) = open(dir.path(), 64 * 1024);
    let mut expected = BTreeMap::new();
    for (i, key) in awkward_keys(20_000).into_iter().enumerate() {
        if i == 10_000 {
            ks.rotate_memtable_and_wait().unwrap();
        }
        let value = (i as u32).to_be_bytes();
        ks.insert(&key, value).unwrap();
        expected.insert(key, value.to_vec());
    }
    let check = |stage: &str| {
        let got: Vec<(Vec<u8>, Vec<u8>)> = ks
            .iter()
            .map(|kv| {
                let (k, v) = kv.into_inner().unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = expected.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(got.len(), want.len(), "{stage}: key count");
        assert!(got == want, "{stage}: iteration order or values differ");
        for probe in expected.keys().step_by(97) {
            assert_eq!(
                ks.get(probe).unwrap().as_deref(),
                expected.get(probe).map(Vec::as_slice),
                "{stage}: get {probe:?}"
            );
            let from: Vec<Vec<u8>> = ks
                .range::<&[u8], _>((Bound::Excluded(probe.as_slice()), Bound::Unbounded))
                .take(3)
                .map(|kv| kv.key().unwrap().to_vec())
                .collect();
            let want_from: Vec<Vec<u8>> = expected
                .range::<Vec<u8>, _>((Bound::Excluded(probe), Bound::Unbounded))
                .take(3)
                .map(|(k, _)| k.clone())
                .collect();
            assert_eq!(from, want_from, "{stage}: range after {probe:?}");
        }
    };
    assert!(ks.table_count() > 0, "some keys were flushed to tables");
    check("memtable and tables");
    ks.rotate_memtable_and_wait().unwrap();
    ks.major_compact().unwrap();
    check("after a major compaction");
}
