//! Exactly-once, in-order checking of one message stream (one sender to
//! one receiver, or one publisher to one group member).
//!
//! Every load-generator message carries its sender's sequence number
//! (0, 1, 2, …). A [`StreamCheck`] remembers which numbers arrived in a
//! bitset, so at the end it can say how many were lost (sent, never
//! received), duplicated (received again) and reordered (arrived after a
//! later one). The bitset is bounded: numbers past [`MAX_TRACKED`] are
//! counted as untracked rather than growing memory without limit.

use serde::{Deserialize, Serialize};

/// Highest sequence number a stream tracks (2^26: an 8 MiB bitset at most).
pub const MAX_TRACKED: u64 = 1 << 26;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next number due (or a later one, leaving a gap).
    InOrder,
    /// Seen before.
    Duplicate,
    /// New, but a later number arrived first.
    Reordered,
    /// Past [`MAX_TRACKED`]: not checked.
    Untracked,
}

/// Loss, duplication and reordering totals (summed over streams).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl Verdict {
    pub fn add(&mut self, other: Verdict) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
    }

    #[cfg(test)]
    pub fn clean(&self) -> bool {
        *self == Verdict::default()
    }
}

/// One stream's arrivals.
#[derive(Debug, Default)]
pub struct StreamCheck {
    seen: Vec<u64>,
    /// One past the highest number seen.
    high: u64,
    unique: u64,
    duplicated: u64,
    reordered: u64,
    untracked: u64,
}

impl StreamCheck {
    pub fn observe(&mut self, seq: u64) -> Arrival {
        if seq >= MAX_TRACKED {
            self.untracked += 1;
            return Arrival::Untracked;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        if seq < self.high {
            self.reordered += 1;
            return Arrival::Reordered;
        }
        self.high = seq + 1;
        Arrival::InOrder
    }

    /// Distinct messages received (tracked or not).
    pub fn unique(&self) -> u64 {
        self.unique + self.untracked
    }

    /// The verdict once the sender says it sent `sent` messages (0..sent).
    pub fn verdict(&self, sent: u64) -> Verdict {
        Verdict {
            lost: sent.saturating_sub(self.unique()),
            duplicated: self.duplicated,
            reordered: self.reordered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_streams_are_clean() {
        let mut s = StreamCheck::default();
        for seq in 0..1000 {
            assert_eq!(s.observe(seq), Arrival::InOrder);
        }
        assert!(s.verdict(1000).clean());
        assert_eq!(s.verdict(1003).lost, 3);
    }

    #[test]
    fn duplicates_reorders_and_gaps_are_told_apart() {
        let mut s = StreamCheck::default();
        assert_eq!(s.observe(0), Arrival::InOrder);
        assert_eq!(s.observe(2), Arrival::InOrder); // gap: 1 missing so far
        assert_eq!(s.observe(1), Arrival::Reordered);
        assert_eq!(s.observe(2), Arrival::Duplicate);
        assert_eq!(s.observe(0), Arrival::Duplicate);
        assert_eq!(s.observe(200), Arrival::InOrder);
        assert_eq!(
            s.verdict(201),
            Verdict {
                lost: 197,
                duplicated: 2,
                reordered: 1
            }
        );
        assert_eq!(s.observe(MAX_TRACKED), Arrival::Untracked);
        assert_eq!(s.unique(), 5);
    }
}
