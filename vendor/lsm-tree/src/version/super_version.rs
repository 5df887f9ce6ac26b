// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use crate::{
    memtable::Memtable,
    tree::sealed::SealedMemtables,
    version::{persist_version, Version},
    SeqNo, SequenceNumberCounter,
};
use std::{collections::VecDeque, path::Path, sync::Arc};

/// A super version is a point-in-time snapshot of memtables and a [`Version`] (list of disk files)
#[derive(Clone)]
pub struct SuperVersion {
    /// Active memtable that is being written to
    #[doc(hidden)]
    pub active_memtable: Arc<Memtable>,

    /// Frozen memtables that are being flushed
    pub(crate) sealed_memtables: Arc<SealedMemtables>,

    /// Current tree version
    pub(crate) version: Version,

    pub(crate) seqno: SeqNo,
}

pub struct SuperVersions(VecDeque<SuperVersion>);

/// Retired batches handed to the reaper and not yet dropped, with the
/// condition [`wait_for_retired`] waits on (Tern's patch).
static RETIRED_PENDING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// Most batches queued on the reaper: each may hold whole memtables, which
/// fjall's write backpressure no longer sees once retired, so a reaper
/// that falls behind must not let them pile up. Past it, a GC pass drops
/// its versions in place again (upstream's stall, not unbounded memory).
const MAX_RETIRED_PENDING: usize = 16;
static RETIRED_DRAINED: std::sync::Condvar = std::sync::Condvar::new();
/// GC passes that found `MAX_RETIRED_PENDING` batches queued and dropped
/// their versions in place (Tern's patch).
static RETIRED_DROPPED_IN_PLACE: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// The reaper's backlog (Tern's patch, for the process's metrics): batches
/// of retired versions handed to the `lsm-reaper` thread and not yet
/// dropped, and GC passes that found it full and dropped theirs in place,
/// stalling their tree's writes as upstream does. Process-wide: one reaper
/// serves every tree.
#[must_use]
pub fn reaper_backlog() -> (usize, u64) {
    let pending = RETIRED_PENDING.lock().map_or(0, |pending| *pending);
    let dropped_in_place = RETIRED_DROPPED_IN_PLACE.load(std::sync::atomic::Ordering::Relaxed);
    (pending, dropped_in_place)
}

thread_local! {
    static ON_REAPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Starts the `lsm-reaper` thread now, from the calling thread, if no
/// caller has yet (Tern's patch). The reaper inherits its spawner's
/// priority and CPU affinity; started lazily, its spawner is whichever
/// thread first retires a version, which may be a writer pinned to a CPU
/// of its own (a write that rotates a memtable inline). Returns whether
/// the reaper runs.
pub fn start_reaper() -> bool {
    reaper().is_some()
}

/// The reaper's queue, spawning the thread on first use; `None` if it
/// could not be spawned.
fn reaper() -> Option<&'static std::sync::mpsc::Sender<Vec<SuperVersion>>> {
    use std::sync::{mpsc, OnceLock};

    static REAPER: OnceLock<Option<mpsc::Sender<Vec<SuperVersion>>>> = OnceLock::new();

    REAPER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Vec<SuperVersion>>();
            let spawned = std::thread::Builder::new()
                .name("lsm-reaper".into())
                .spawn(move || {
                    ON_REAPER.with(|on| on.set(true));
                    while let Ok(versions) = rx.recv() {
                        drop(versions);
                        settle_retired();
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    log::warn!("Cannot spawn the lsm-reaper thread, retired versions drop in place: {e:?}");
                    None
                }
            }
        })
        .as_ref()
}

/// Hands the super versions a GC pass removed to a thread of their own to
/// drop (Tern's patch, see Tern's vendor/README.md).
///
/// Dropping the last reference to a retired version frees the memtables
/// it held after their flush (hundreds of thousands of skiplist nodes for
/// a 64 MiB memtable) and deletes the files of tables compacted away:
/// tens of milliseconds. [`SuperVersions::maintenance`] runs under the
/// tree's version-history write lock, which every memtable insert takes
/// for reading (`Tree::append_entry`), so dropping them there stalled
/// every write to the tree for that long. A tree being dropped waits for
/// what was handed over ([`wait_for_retired`]), so a store closed and
/// reopened in one process never sees a file deleted under it; files of a
/// process that exits with drops still queued are orphans the next
/// recovery removes, as upstream does after a crash. The reaper thread is
/// spawned by [`start_reaper`] or else by the first caller here (in fjall,
/// a flush or compaction worker, or a writer that rotates a memtable
/// inline; it inherits that thread's priority and CPU affinity) and sleeps
/// in `recv` while idle; if it cannot be spawned, the versions are dropped
/// here, as upstream does.
fn retire(versions: Vec<SuperVersion>) {
    use std::sync::mpsc;

    if versions.is_empty() {
        return;
    }
    let Some(tx) = reaper() else {
        return;
    };
    // Counted before the send, so the reaper's decrement cannot come first.
    // (The guard goes at the end of this statement, before any drop below.)
    let queued = match RETIRED_PENDING.lock() {
        Ok(mut pending) if *pending < MAX_RETIRED_PENDING => {
            *pending += 1;
            true
        }
        _ => false,
    };
    if !queued {
        RETIRED_DROPPED_IN_PLACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        log::debug!("lsm-reaper backlog full, retired versions drop in place");
        drop(versions);
        return;
    }
    if let Err(mpsc::SendError(versions)) = tx.send(versions) {
        log::warn!("The lsm-reaper thread is gone, retired versions drop in place");
        drop(versions);
        settle_retired();
    }
}

/// Counts one handed-over batch as dropped and wakes the waiters.
fn settle_retired() {
    if let Ok(mut pending) = RETIRED_PENDING.lock() {
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            RETIRED_DRAINED.notify_all();
        }
    }
}

/// Waits (at most `limit`) until every batch of versions handed to the
/// reaper so far has been dropped: their table files are deleted by then.
/// Returns at once on the reaper thread itself.
pub(crate) fn wait_for_retired(limit: std::time::Duration) {
    if ON_REAPER.with(std::cell::Cell::get) {
        return;
    }
    let Ok(pending) = RETIRED_PENDING.lock() else {
        return;
    };
    if let Ok((_, timeout)) = RETIRED_DRAINED.wait_timeout_while(pending, limit, |p| *p > 0) {
        if timeout.timed_out() {
            log::warn!("Retired versions still queued for the lsm-reaper after {limit:?}");
        }
    }
}

impl SuperVersions {
    pub fn new(version: Version) -> Self {
        Self(
            vec![SuperVersion {
                active_memtable: Arc::new(Memtable::new(0)),
                sealed_memtables: Arc::default(),
                version,
                seqno: 0,
            }]
            .into(),
        )
    }

    pub fn memtable_size_sum(&self) -> u64 {
        let mut set = crate::HashMap::default();

        for super_version in &self.0 {
            set.entry(super_version.active_memtable.id)
                .and_modify(|bytes| *bytes += super_version.active_memtable.size())
                .or_insert_with(|| super_version.active_memtable.size());

            for sealed in super_version.sealed_memtables.iter() {
                set.entry(sealed.id)
                    .and_modify(|bytes| *bytes += sealed.size())
                    .or_insert_with(|| sealed.size());
            }
        }

        set.into_values().sum()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn free_list_len(&self) -> usize {
        self.len().saturating_sub(1)
    }

    pub fn maintenance(&mut self, folder: &Path, gc_watermark: SeqNo) -> crate::Result<()> {
        if gc_watermark == 0 {
            return Ok(());
        }

        if self.free_list_len() < 1 {
            return Ok(());
        }

        log::trace!("Running manifest GC with watermark={gc_watermark}");
        let mut retired = Vec::new();

        if let Some(hi_idx) = self.0.iter().rposition(|x| x.seqno < gc_watermark) {
            for _ in 0..hi_idx {
                let Some(head) = self.0.front() else {
                    break;
                };

                log::trace!(
                    "Removing version #{} (seqno={})",
                    head.version.id(),
                    head.seqno,
                );

                let path = folder.join(format!("v{}", head.version.id()));
                if path.try_exists()? {
                    crate::file::retry_transient_io(|| std::fs::remove_file(&path))?;
                }

                retired.extend(self.0.pop_front());
            }
        }
        retire(retired);

        log::trace!("Manifest GC done, version length now {}", self.0.len());

        Ok(())
    }

    /// Modifies the level manifest atomically.
    ///
    /// The function accepts a transition function that receives the current version
    /// and returns a new version.
    ///
    /// The function takes care of persisting the version changes on disk.
    pub(crate) fn upgrade_version<F: FnOnce(&SuperVersion) -> crate::Result<SuperVersion>>(
        &mut self,
        tree_path: &Path,
        f: F,
        seqno: &SequenceNumberCounter,
        visible_seqno: &SequenceNumberCounter,
    ) -> crate::Result<()> {
        self.upgrade_version_with_seqno(tree_path, f, seqno.next(), visible_seqno)
    }

    /// Like `upgrade_version`, but takes an already-allocated sequence number.
    ///
    /// This is useful when the seqno must be coordinated with other operations
    /// (e.g., bulk ingestion where tables are recovered with the same seqno).
    pub(crate) fn upgrade_version_with_seqno<
        F: FnOnce(&SuperVersion) -> crate::Result<SuperVersion>,
    >(
        &mut self,
        tree_path: &Path,
        f: F,
        seqno: SeqNo,
        visible_seqno: &SequenceNumberCounter,
    ) -> crate::Result<()> {
        let mut next_version = f(&self.latest_version())?;
        next_version.seqno = seqno;
        log::trace!("Next version seqno={}", next_version.seqno);

        persist_version(tree_path, &next_version.version)?;
        self.append_version(next_version);

        visible_seqno.fetch_max(seqno + 1);

        Ok(())
    }

    pub fn append_version(&mut self, version: SuperVersion) {
        self.0.push_back(version);
    }

    pub fn replace_latest_version(&mut self, version: SuperVersion) {
        if self.0.pop_back().is_some() {
            self.0.push_back(version);
        }
    }

    pub fn latest_version(&self) -> SuperVersion {
        #[expect(clippy::expect_used, reason = "SuperVersion is expected to exist")]
        self.0
            .iter()
            .last()
            .cloned()
            .expect("should always have a SuperVersion")
    }

    pub fn get_version_for_snapshot(&self, seqno: SeqNo) -> SuperVersion {
        if seqno == 0 {
            #[expect(clippy::expect_used, reason = "SuperVersion is expected to exist")]
            return self
                .0
                .front()
                .cloned()
                .expect("should always find a SuperVersion");
        }

        let version = self
            .0
            .iter()
            .rev()
            .find(|version| version.seqno < seqno)
            .cloned();

        if version.is_none() {
            log::error!("Failed to find a SuperVersion for snapshot with seqno={seqno}");
            log::error!("SuperVersions:");

            for version in self.0.iter().rev() {
                log::error!("-> {}, seqno={}", version.version.id(), version.seqno);
            }
        }

        #[expect(clippy::expect_used, reason = "SuperVersion is expected to exist")]
        version.expect("should always find a SuperVersion")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_log::test;

    #[test]
    fn super_version_gc_above_watermark() -> crate::Result<()> {
        let mut history = SuperVersions(
            vec![
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 0,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 1,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 2,
                },
            ]
            .into(),
        );

        history.maintenance(Path::new("."), 0)?;

        assert_eq!(history.free_list_len(), 2);

        Ok(())
    }

    #[test]
    fn super_version_gc_below_watermark_simple() -> crate::Result<()> {
        let mut history = SuperVersions(
            vec![
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 0,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 1,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 2,
                },
            ]
            .into(),
        );

        history.maintenance(Path::new("."), 3)?;

        assert_eq!(history.len(), 1);

        Ok(())
    }

    #[test]
    fn super_version_gc_below_watermark_simple_2() -> crate::Result<()> {
        let mut history = SuperVersions(
            vec![
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 0,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 1,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 2,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 8,
                },
            ]
            .into(),
        );

        history.maintenance(Path::new("."), 3)?;

        assert_eq!(history.len(), 2);

        Ok(())
    }

    #[test]
    fn super_version_gc_below_watermark_keep() -> crate::Result<()> {
        let mut history = SuperVersions(
            vec![
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 0,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 8,
                },
            ]
            .into(),
        );

        history.maintenance(Path::new("."), 3)?;

        assert_eq!(history.len(), 2);

        Ok(())
    }

    #[test]
    fn super_version_gc_below_watermark_shadowed() -> crate::Result<()> {
        let mut history = SuperVersions(
            vec![
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 0,
                },
                SuperVersion {
                    active_memtable: Arc::new(Memtable::new(0)),
                    sealed_memtables: Arc::default(),
                    version: Version::new(0, crate::TreeType::Standard),
                    seqno: 2,
                },
            ]
            .into(),
        );

        history.maintenance(Path::new("."), 3)?;

        assert_eq!(history.len(), 1);

        Ok(())
    }
}
