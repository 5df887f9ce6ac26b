//! The deleted accounts in memory: one bit per user id, shared by every
//! thread without a lock. User ids are dense (assigned one after another
//! from 1) and never reused, so a bitmap indexed by id is both the
//! smallest set of them (a bit per account ever registered in the ranges
//! where any was deleted, 1.25 MB for 10 million accounts) and the
//! cheapest to read: a check is one atomic load, so every shard asks it on
//! the message path instead of keeping its own copy, and the store's lists
//! of friends, requests, blocks and invites pass over deleted ids without
//! a lock. The bitmap grows in pages of [`PAGE_BITS`] ids, allocated at
//! the first deletion in their range and never freed; the table of pages
//! covers ids up to [`MAX_USER_ID`], and registration refuses ids past it.
//! Bits are only ever set (a deletion is forever), by the deletion under
//! the store's deletion gate (`user_deletion`), which orders them with the
//! writer's check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::UserId;

/// Ids one page covers: 2^22 bits, 512 KiB.
const PAGE_BITS: u64 = 1 << 22;
/// 64-bit words in a page.
const PAGE_WORDS: usize = (PAGE_BITS / 64) as usize;
/// Pages the table holds (the table itself is 16,384 empty slots, about
/// 400 KB, allocated when the store opens).
const PAGES: usize = 1 << 14;
/// The highest user id the store assigns: 2^36 - 1, about 68 billion
/// accounts, past anything one store holds.
pub const MAX_USER_ID: UserId = PAGE_BITS * PAGES as u64 - 1;

/// A set of user ids, one bit each, that only grows. See the module docs.
pub(crate) struct DeletedBits {
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// How many ids are set.
    count: AtomicU64,
}

impl std::fmt::Debug for DeletedBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeletedBits")
            .field("count", &self.count())
            .field("pages", &self.pages_allocated())
            .finish()
    }
}

/// The page, the word in it and the bit in the word of `user`; `None`
/// past [`MAX_USER_ID`].
fn locate(user: UserId) -> Option<(usize, usize, u64)> {
    if user > MAX_USER_ID {
        return None;
    }
    let page = usize::try_from(user / PAGE_BITS).ok()?;
    let in_page = user % PAGE_BITS;
    let word = usize::try_from(in_page / 64).ok()?;
    Some((page, word, 1u64 << (in_page % 64)))
}

impl DeletedBits {
    pub(crate) fn new() -> Self {
        DeletedBits {
            pages: (0..PAGES).map(|_| OnceLock::new()).collect(),
            count: AtomicU64::new(0),
        }
    }

    /// Whether `user` is in the set: one atomic load (two with the page's
    /// slot), no lock.
    pub(crate) fn contains(&self, user: UserId) -> bool {
        let Some((page, word, bit)) = locate(user) else {
            return false;
        };
        self.pages
            .get(page)
            .and_then(OnceLock::get)
            .and_then(|words| words.get(word))
            .is_some_and(|w| w.load(Ordering::Acquire) & bit != 0)
    }

    /// Adds `user`: `Some(false)` if it was in the set already, `None`
    /// past [`MAX_USER_ID`] (the store never assigns such an id, so only
    /// a corrupt `deleted_users` key names one).
    pub(crate) fn insert(&self, user: UserId) -> Option<bool> {
        let (page, word, bit) = locate(user)?;
        let words = self
            .pages
            .get(page)?
            .get_or_init(|| (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect());
        let before = words.get(word)?.fetch_or(bit, Ordering::AcqRel);
        let new = before & bit == 0;
        if new {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        Some(new)
    }

    /// How many ids are in the set.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// How many pages are allocated (each [`PAGE_BITS`] / 8 bytes).
    pub(crate) fn pages_allocated(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_set_once_and_only_their_pages_are_allocated() {
        let bits = DeletedBits::new();
        assert_eq!(bits.pages_allocated(), 0);
        assert!(!bits.contains(1));
        for user in [1, 63, 64, PAGE_BITS - 1, PAGE_BITS, MAX_USER_ID] {
            assert_eq!(bits.insert(user), Some(true), "{user}");
            assert_eq!(bits.insert(user), Some(false), "{user} twice");
            assert!(bits.contains(user), "{user}");
        }
        assert_eq!(bits.insert(MAX_USER_ID + 1), None);
        for user in [0, 2, 62, 65, PAGE_BITS + 1, MAX_USER_ID - 1] {
            assert!(!bits.contains(user), "{user}");
        }
        // Past the table: never in the set, and no panic on a look.
        assert!(!bits.contains(MAX_USER_ID + 1));
        assert!(!bits.contains(u64::MAX));
        assert_eq!(bits.count(), 6);
        assert_eq!(bits.pages_allocated(), 3, "pages 0, 1 and the last");
    }

    #[test]
    fn ten_million_accounts_fit_in_three_pages() {
        // Ids 1..=10M with every tenth deleted: pages of 4M ids.
        let bits = DeletedBits::new();
        for user in (10..=10_000_000).step_by(10) {
            assert_eq!(bits.insert(user), Some(true));
        }
        assert_eq!(bits.count(), 1_000_000);
        assert_eq!(bits.pages_allocated(), 3);
        assert_eq!(
            bits.pages_allocated() * (PAGE_BITS / 8) as usize,
            3 << 19,
            "1.5 MiB"
        );
    }
}
