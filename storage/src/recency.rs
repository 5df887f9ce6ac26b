//! The recency index of 1:1 conversations: it owns the `recent_convs`
//! keyspace (`user ++ inverted bucket ++ conv -> ()`, one key per
//! participant and conversation) and the `meta` key that records how far
//! an older store's conversations have been indexed. A conversation's
//! keys sit in the [`recency_bucket`] of its newest message's time, so a
//! forward prefix scan of a user lists their conversations newest bucket
//! first, and a list page reads only the buckets it shows.
//!
//! The index is written with the messages, in their batch
//! (`messages.rs`): a conversation's first message enters it, and a later
//! message moves it only when the message falls in another bucket than
//! the previous newest did; the engine knows that bucket from its
//! conversation cache ([`crate::MessageWrite::moved_from`]), so a message
//! costs no read and, within a bucket, no index write. Hence the
//! invariant the engine relies on when it loads a conversation: a 1:1
//! conversation's keys are in the bucket of its newest stored message.
//! Retention keeps each conversation's newest message and an erasure
//! keeps its time, so nothing else moves it.
//!
//! A store written before the index existed is indexed when it is opened
//! ([`Inner::backfill_recency`]), before anything else can write: one
//! pass over `user_convs`, one history read per key, committed in chunks
//! together with the position reached, which a restart goes on from.

use std::ops::Bound;

use crate::backfill::{self, Chunks, Progress};
use crate::codec::{self, CONV_KEY_LEN, USER_CONV_KEY_LEN};
use crate::{ConvId, Inner, Ks, Store, StoreError, UserId};

/// Width of a recency bucket: 10 minutes. Part of the on-disk format
/// (a conversation's keys are found again by the bucket of its newest
/// message), so never changed for an existing store. Coarser buckets
/// cost a busy conversation fewer index moves; finer ones let a list
/// page read fewer conversations (a page reads every conversation of
/// the buckets it touches, to order them by their newest message).
pub const RECENCY_BUCKET_MS: u64 = 600_000;

/// The recency bucket of a message sent at `timestamp_ms` (Unix ms).
pub fn recency_bucket(timestamp_ms: u64) -> u64 {
    timestamp_ms / RECENCY_BUCKET_MS
}

/// `recent_convs` key: `user (8) ++ !bucket (8) ++ conv (17)`.
pub(crate) const RECENT_KEY_LEN: usize = 8 + 8 + CONV_KEY_LEN;

/// The `meta` key of the backfill of `recent_convs`.
const BACKFILL_KEY: &[u8] = b"recent_convs_backfill";

/// `recent_convs` key. The bucket is stored inverted (`u64::MAX -
/// bucket`), so that a forward scan of the user's prefix meets the newest
/// bucket first; within a bucket, conversations sort by their key.
pub(crate) fn recent_key(user: UserId, bucket: u64, conv: ConvId) -> [u8; RECENT_KEY_LEN] {
    let mut key = [0u8; RECENT_KEY_LEN];
    key[..8].copy_from_slice(&user.to_be_bytes());
    key[8..16].copy_from_slice(&(u64::MAX - bucket).to_be_bytes());
    key[16..].copy_from_slice(&codec::conv_key(conv));
    key
}

/// Decodes a `recent_convs` key into `(user, bucket, conv)`; the
/// conversation must be a 1:1 of the user's.
pub(crate) fn decode_recent_key(key: &[u8]) -> Result<(UserId, u64, ConvId), String> {
    if key.len() != RECENT_KEY_LEN {
        return Err(format!(
            "recent_convs key is {} bytes, expected {RECENT_KEY_LEN}",
            key.len()
        ));
    }
    let user = codec::decode_id_key(key.get(..8).unwrap_or_default())?;
    let bucket = u64::MAX - codec::decode_id_key(key.get(8..16).unwrap_or_default())?;
    let conv = codec::decode_conv_key(key.get(16..).unwrap_or_default())?;
    if conv.peer_of(user).is_none() {
        return Err(format!("{conv:?} is not a 1:1 conversation of user {user}"));
    }
    Ok((user, bucket, conv))
}

impl Inner {
    /// The time of `conv`'s newest stored message, if it has one.
    pub(crate) fn newest_timestamp(&self, conv: ConvId) -> Result<Option<u64>, StoreError> {
        let history = &self.history;
        let Some(guard) = history.handle.prefix(codec::conv_key(conv)).next_back() else {
            return Ok(None);
        };
        let (key, value) = history.entry(guard)?;
        let v = codec::decode_history(&value).map_err(|d| history.corrupt(&key, d))?;
        Ok(Some(v.timestamp_ms))
    }

    /// Indexes the 1:1 conversations of a store written before
    /// `recent_convs` existed (its `meta` record is missing, or says where
    /// an interrupted backfill got to). Runs inside `Store::open`, before
    /// anything else can write. Each conversation's newest message is
    /// read once, at its lower participant's `user_convs` key, and both
    /// participants get their index key in its bucket (the higher one's
    /// `user_convs` key indexes only itself, if the lower one's is gone);
    /// they are committed in chunks with the position reached (see
    /// [`crate::backfill`]), so a crash costs at most the chunks not yet
    /// on disk, and memory stays bounded whatever the store's size. A
    /// deleted account's keys are
    /// skipped (its purge removes what it has). A new store, with no
    /// conversation yet, only writes the record.
    pub(crate) fn backfill_recency(&self) -> Result<(), StoreError> {
        let start = match backfill::progress(&self.meta, BACKFILL_KEY, USER_CONV_KEY_LEN)? {
            Progress::Done => return Ok(()),
            Progress::After(after) => Bound::Excluded(after),
            Progress::Unrecorded => Bound::Unbounded,
        };
        let ks = &self.user_convs;
        let mut chunks = Chunks::new(&self.db, &self.meta, BACKFILL_KEY);
        for guard in ks.handle.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let key = ks.key_of(guard)?;
            let user =
                codec::decode_id_key(key.get(..8).unwrap_or_default()).map_err(|d| ks.corrupt(&key, d))?;
            let conv = codec::decode_user_conv_key(&key).map_err(|d| ks.corrupt(&key, d))?;
            // Both participants' keys from one history read, at the lower
            // id's `user_convs` key, which sorts (and so is resumed) before
            // the higher one's. The higher id's key indexes only itself,
            // when the lower one's is gone (that account purged).
            let participants = match conv {
                ConvId::Direct { low, high } if user == low => [Some(low), Some(high)],
                ConvId::Direct { low, high } if user == high => {
                    let low_indexed = ks.contains(codec::user_conv_key(low, conv))?;
                    [None, (!low_indexed).then_some(high)]
                }
                _ => [None, None],
            };
            let live = participants.map(|p| p.filter(|&p| !self.is_deleted(p)));
            if live.iter().any(Option::is_some) {
                if let Some(newest) = self.newest_timestamp(conv)? {
                    for p in live.into_iter().flatten() {
                        let index = recent_key(p, recency_bucket(newest), conv);
                        chunks.batch().insert(&self.recent.handle, index, []);
                    }
                }
            }
            chunks.indexed(&key)?;
        }
        chunks.finish()
    }
}

/// One entry of [`Store::recent_conversations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentEntry {
    /// The [`recency_bucket`] of the conversation's newest message.
    pub bucket: u64,
    pub conv: ConvId,
}

impl Store {
    /// The time of `conv`'s newest stored message, if it has one:
    /// [`Store::last_message`] without copying its frame.
    pub fn last_message_time(&self, conv: ConvId) -> Result<Option<u64>, StoreError> {
        self.inner.newest_timestamp(conv)
    }

    /// `user`'s 1:1 conversations, newest [`recency_bucket`] first, by
    /// conversation key within a bucket: a lazy scan of the index, so a
    /// caller that stops after `n` entries read `n` keys. Conversations
    /// with a deleted account stay listed (their history does).
    pub fn recent_conversations(
        &self,
        user: UserId,
    ) -> impl Iterator<Item = Result<RecentEntry, StoreError>> + '_ {
        let ks: &Ks = &self.inner.recent;
        ks.handle.prefix(codec::id_key(user)).map(move |guard| {
            let key = ks.key_of(guard)?;
            let (_, bucket, conv) = decode_recent_key(&key).map_err(|d| ks.corrupt(&key, d))?;
            Ok(RecentEntry { bucket, conv })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_newest_bucket_first_and_decode_back() {
        let conv = ConvId::direct(3, 7);
        let old = recent_key(3, 5, conv);
        let new = recent_key(3, 6, ConvId::direct(1, 3));
        assert!(new < old, "a forward scan meets the newer bucket first");
        assert_eq!(decode_recent_key(&old).unwrap(), (3, 5, conv));
        assert!(
            decode_recent_key(&recent_key(4, 5, conv)).is_err(),
            "not user 4's"
        );
        assert!(decode_recent_key(&old[..32]).is_err());
        // docs/storage.md's example.
        let key = recent_key(7, recency_bucket(1_700_000_000_000), conv);
        assert_eq!(
            crate::hex(&key),
            "0000000000000007ffffffffffd4c44a0100000000000000030000000000000007"
        );
    }
}
