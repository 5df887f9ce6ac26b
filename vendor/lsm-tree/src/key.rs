// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use crate::{SeqNo, UserKey, ValueType};

#[derive(Clone, Eq)]
pub struct InternalKey {
    pub user_key: UserKey,
    pub seqno: SeqNo,
    pub value_type: ValueType,
}

impl PartialEq for InternalKey {
    fn eq(&self, other: &Self) -> bool {
        self.user_key == other.user_key && self.seqno == other.seqno
    }
}

#[cfg_attr(coverage_nightly, coverage(off))]
impl std::fmt::Debug for InternalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}:{}:{}",
            self.user_key,
            self.seqno,
            match self.value_type {
                ValueType::Value => "V",
                ValueType::Tombstone => "T",
                ValueType::WeakTombstone => "W",
                ValueType::Indirection => "Vb",
            },
        )
    }
}

impl InternalKey {
    pub fn new<K: Into<UserKey>>(user_key: K, seqno: SeqNo, value_type: ValueType) -> Self {
        let user_key = user_key.into();

        assert!(
            u16::try_from(user_key.len()).is_ok(),
            "keys can be 65535 bytes in length",
        );

        Self {
            user_key,
            seqno,
            value_type,
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.value_type.is_tombstone()
    }
}

impl PartialOrd for InternalKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

// Order by user key ascending, THEN by sequence number descending
// This is one of the most important functions
// Otherwise queries will not match expected behaviour
impl Ord for InternalKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match compare_user_keys(&self.user_key, &other.user_key) {
            std::cmp::Ordering::Equal => other.seqno.cmp(&self.seqno),
            order => order,
        }
    }
}

/// Two keys the shorter of which is no longer than this are compared by
/// [`compare_user_keys`] eight bytes at a time; others by `<[u8]>::cmp`
/// (libc's `memcmp`), which is faster once there are enough bytes to
/// vectorise.
const WORDWISE_COMPARE_MAX: usize = 64;

/// Lexicographic byte order, exactly as `<[u8] as Ord>::cmp`, for the
/// memtable's skiplist (Tern patch, see vendor/README.md).
///
/// A memtable insert compares its key with ~2·log2(n) others, and keys of
/// one store share long prefixes (big-endian ids whose high bytes are zero),
/// so `ByteView`'s 4-byte inline prefix never decides and every compare
/// went on to a `memcmp` call over 17–33 bytes. Comparing big-endian words
/// inline decides such keys in two to four loads.
#[inline]
pub(crate) fn compare_user_keys(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let common = a.len().min(b.len());
    if common > WORDWISE_COMPARE_MAX {
        return a.cmp(b);
    }
    let (mut a_rest, mut b_rest) = (&a[..common], &b[..common]);
    while let (Some((a_word, a_tail)), Some((b_word, b_tail))) =
        (a_rest.split_first_chunk::<8>(), b_rest.split_first_chunk::<8>())
    {
        let (a_word, b_word) = (u64::from_be_bytes(*a_word), u64::from_be_bytes(*b_word));
        if a_word != b_word {
            return a_word.cmp(&b_word);
        }
        (a_rest, b_rest) = (a_tail, b_tail);
    }
    // Under eight bytes left, as long in both: zero-padded words order them
    // as the bytes would, and a tie falls to the lengths below.
    let mut a_word = [0u8; 8];
    let mut b_word = [0u8; 8];
    a_word[..a_rest.len()].copy_from_slice(a_rest);
    b_word[..b_rest.len()].copy_from_slice(b_rest);
    u64::from_be_bytes(a_word)
        .cmp(&u64::from_be_bytes(b_word))
        .then(a.len().cmp(&b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_log::test;

    #[test]
    fn user_keys_compare_as_byte_slices() {
        // Every pair of keys up to 20 bytes over a small alphabet (so ties
        // and shared prefixes are common), and keys around the word and
        // fallback lengths.
        let mut keys: Vec<Vec<u8>> = vec![vec![]];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for len in (1..=20).chain([63, 64, 65, 66, 200]) {
            for _ in 0..40 {
                let key = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        [0u8, 1, 0x7f, 0x80, 0xff][(state % 5) as usize]
                    })
                    .collect();
                keys.push(key);
            }
        }
        for a in &keys {
            for b in &keys {
                assert_eq!(compare_user_keys(a, b), a.as_slice().cmp(b.as_slice()), "{a:?} {b:?}");
                let mut longer = b.clone();
                longer.push(0);
                assert_eq!(compare_user_keys(a, &longer), a.as_slice().cmp(longer.as_slice()), "{a:?} {longer:?}");
            }
        }
    }

    #[test]
    fn key_order_smoke_test() {
        use ValueType::Value as V;

        let mut keys = [
            InternalKey::new(b"d", 3, V),
            InternalKey::new(b"a", 0, V),
            InternalKey::new(b"b", 0, V),
            InternalKey::new(b"a", 2, V),
            InternalKey::new(b"b", 1, V),
            InternalKey::new(b"a", 1, V),
            InternalKey::new(b"c", 3, V),
        ];
        keys.sort();

        assert_eq!(
            [
                InternalKey::new(b"a", 2, V),
                InternalKey::new(b"a", 1, V),
                InternalKey::new(b"a", 0, V),
                InternalKey::new(b"b", 1, V),
                InternalKey::new(b"b", 0, V),
                InternalKey::new(b"c", 3, V),
                InternalKey::new(b"d", 3, V),
            ],
            keys,
        );
    }
}
