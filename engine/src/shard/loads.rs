//! Reads of cached state from the store that are in flight, for the
//! shard's caches (conversations in [`super::commit`], groups in
//! [`super::groups`]).
//!
//! A cache miss reads the store on the blocking pool, and the shard runs
//! other tasks meanwhile. One of them may load the same entry, change it
//! (writing the store first) and have it dropped from the cache again, all
//! before the first read returns what the store held *before* that
//! change: caching it would bring back a stale state. So each cache counts,
//! per entry with a read in flight, every change that makes such a read
//! stale ([`InFlight::outdate`]), and a read that sees the count moved
//! reads again. Entries exist only while a read is in flight.

use std::cell::RefCell;
use std::hash::Hash;

use rustc_hash::FxHashMap;

/// The reads in flight per key, and the changes since each began.
pub(super) struct InFlight<K> {
    map: FxHashMap<K, Reads>,
}

struct Reads {
    readers: usize,
    changes: u64,
}

impl<K> Default for InFlight<K> {
    fn default() -> Self {
        InFlight {
            map: FxHashMap::default(),
        }
    }
}

impl<K: Hash + Eq + Copy> InFlight<K> {
    /// Notes a read of `key`; returns the changes so far, for
    /// [`InFlight::changed_since`] when it is done. Pair with a
    /// [`ReadGuard`], which ends it.
    pub(super) fn begin(&mut self, key: K) -> u64 {
        let reads = self.map.entry(key).or_insert(Reads {
            readers: 0,
            changes: 0,
        });
        reads.readers += 1;
        reads.changes
    }

    /// Whether `key` was outdated since a read that saw `seen` began.
    pub(super) fn changed_since(&self, key: K, seen: u64) -> bool {
        self.map.get(&key).is_some_and(|reads| reads.changes != seen)
    }

    /// Tells the reads of `key` in flight that what they read is stale.
    pub(super) fn outdate(&mut self, key: K) {
        if let Some(reads) = self.map.get_mut(&key) {
            reads.changes += 1;
        }
    }

    fn end(&mut self, key: K) {
        if let Some(reads) = self.map.get_mut(&key) {
            reads.readers = reads.readers.saturating_sub(1);
            if reads.readers == 0 {
                self.map.remove(&key);
            }
        }
    }

    /// Whether no read is in flight (for tests).
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Ends a read begun with [`InFlight::begin`], however its task leaves it
/// (an error, a retry, or the task dropped at shutdown).
pub(super) struct ReadGuard<'a, C, K: Hash + Eq + Copy> {
    cache: &'a RefCell<C>,
    reads: fn(&mut C) -> &mut InFlight<K>,
    key: K,
}

impl<'a, C, K: Hash + Eq + Copy> ReadGuard<'a, C, K> {
    pub(super) fn new(cache: &'a RefCell<C>, reads: fn(&mut C) -> &mut InFlight<K>, key: K) -> Self {
        ReadGuard { cache, reads, key }
    }
}

impl<C, K: Hash + Eq + Copy> Drop for ReadGuard<'_, C, K> {
    fn drop(&mut self) {
        let mut cache = self.cache.borrow_mut();
        (self.reads)(&mut cache).end(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_learns_of_changes_made_while_it_was_in_flight() {
        let reads: RefCell<InFlight<u64>> = RefCell::default();
        let seen = reads.borrow_mut().begin(7);
        let guard = ReadGuard::new(&reads, |r| r, 7);
        let other = reads.borrow_mut().begin(7); // a second read of 7
        let other_guard = ReadGuard::new(&reads, |r| r, 7);
        reads.borrow_mut().outdate(8); // no read of 8: nothing to tell
        assert!(!reads.borrow().changed_since(7, seen));
        reads.borrow_mut().outdate(7);
        assert!(reads.borrow().changed_since(7, seen));
        assert!(reads.borrow().changed_since(7, other));
        drop(other_guard);
        assert!(
            reads.borrow().changed_since(7, seen),
            "kept while one read is left"
        );
        drop(guard);
        assert!(reads.borrow().is_empty());
        // A read begun after the change sees a clean slate.
        let fresh = reads.borrow_mut().begin(7);
        assert!(!reads.borrow().changed_since(7, fresh));
    }
}
