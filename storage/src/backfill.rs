//! Backfills run when a store is opened, before anything else writes: an
//! index built from another keyspace for a store written before the index
//! existed (the recency index, `recency.rs`; the reverse indexes,
//! `lib.rs`). This module owns how they commit: every [`CHUNK`] source
//! keys go out in one batch together with the position reached, in the
//! `meta` keyspace under the backfill's record name, so memory stays
//! bounded whatever the store's size and a crash resumes after the last
//! chunk that reached the disk. The last batch marks the record done and
//! is fsynced; the chunks before it are not, so a power cut can lose
//! several, each with its own position: the index and its record always
//! agree.
//!
//! The record's value is `[v1]` when done, `[v1] ++ the last source key
//! indexed` while under way.

use fjall::{Database, OwnedWriteBatch, PersistMode};

use crate::codec;
use crate::{Ks, StoreError};

/// Source keys indexed per batch (the recency backfill's ~330 KB of index
/// keys, the reverse indexes' ~160 KB).
const CHUNK: usize = 10_000;

/// How far the backfill recorded under a name has got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// No record: never started (or a store from before records).
    Unrecorded,
    /// Under way: go on after this source key.
    After(Vec<u8>),
    /// Finished.
    Done,
}

/// Reads the record `name` in `meta`, whose position is a source key of
/// `key_len` bytes.
pub(crate) fn progress(meta: &Ks, name: &[u8], key_len: usize) -> Result<Progress, StoreError> {
    match meta.get(name)? {
        None => Ok(Progress::Unrecorded),
        Some(value) => decode(&value, key_len).map_err(|d| meta.corrupt(name, d)),
    }
}

/// The batches of one backfill run: index keys go into [`Chunks::batch`],
/// each source key is then counted with [`Chunks::indexed`], and
/// [`Chunks::finish`] marks the backfill done.
pub(crate) struct Chunks<'a> {
    db: &'a Database,
    meta: &'a Ks,
    name: &'a [u8],
    batch: OwnedWriteBatch,
    keys: usize,
}

impl<'a> Chunks<'a> {
    pub(crate) fn new(db: &'a Database, meta: &'a Ks, name: &'a [u8]) -> Chunks<'a> {
        Chunks {
            db,
            meta,
            name,
            batch: db.batch(),
            keys: 0,
        }
    }

    /// The batch the current chunk's index keys go into.
    pub(crate) fn batch(&mut self) -> &mut OwnedWriteBatch {
        &mut self.batch
    }

    /// Counts `source_key` as indexed; a full chunk is committed with it
    /// as the position reached.
    pub(crate) fn indexed(&mut self, source_key: &[u8]) -> Result<(), StoreError> {
        self.keys += 1;
        if self.keys < CHUNK {
            return Ok(());
        }
        let mut batch = std::mem::replace(&mut self.batch, self.db.batch());
        batch.insert(&self.meta.handle, self.name, encode(Some(source_key)));
        batch.durability(Some(PersistMode::Buffer)).commit()?;
        self.keys = 0;
        Ok(())
    }

    /// Commits the last chunk with the record marked done, fsynced.
    pub(crate) fn finish(mut self) -> Result<(), StoreError> {
        self.batch.insert(&self.meta.handle, self.name, encode(None));
        self.batch.durability(Some(PersistMode::SyncData)).commit()?;
        Ok(())
    }
}

fn encode(after: Option<&[u8]>) -> Vec<u8> {
    let mut v = vec![codec::VALUE_V1];
    v.extend_from_slice(after.unwrap_or_default());
    v
}

fn decode(value: &[u8], key_len: usize) -> Result<Progress, String> {
    match value.split_first() {
        Some((&codec::VALUE_V1, [])) => Ok(Progress::Done),
        Some((&codec::VALUE_V1, rest)) if rest.len() == key_len => Ok(Progress::After(rest.to_vec())),
        Some((&codec::VALUE_V1, rest)) => Err(format!(
            "backfill position is {} bytes, expected {key_len}",
            rest.len()
        )),
        Some((v, _)) => Err(format!("unknown value version {v}")),
        None => Err("empty backfill record".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        assert_eq!(decode(&encode(None), 26).unwrap(), Progress::Done);
        let at = [7u8; 26];
        assert_eq!(
            decode(&encode(Some(&at)), 26).unwrap(),
            Progress::After(at.to_vec())
        );
        assert!(decode(&[1, 2], 26).is_err());
        assert!(decode(&encode(Some(&at)), 16).is_err());
        assert!(decode(&[9], 26).is_err());
        assert!(decode(&[], 26).is_err());
    }
}
