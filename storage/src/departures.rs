//! Departures: what a user who left a group (a leave, a kick or a ban)
//! is still owed from it. It owns the `departures` keyspace (`user ++
//! group ++ start` -> `until`): the messages of the group with seqs in
//! `start + 1 ..= until` were sequenced while the user was a member, and
//! the user's catch-up streams them from the group's history, so a large
//! (read-diffused) group, whose messages are in nobody's inbox, keeps the
//! promise a small one keeps with its inbox entries. `start` is the user's
//! delivered cursor for the group when they left; a record is written in
//! the same batch as the membership's removal (`groups.rs`), so a crash
//! keeps both or neither. The engine extends `until` to messages still
//! being written at that moment ([`crate::WriteOp::Departure`]) and drops
//! a record once the user has acknowledged it ([`Store::drop_departures`]).
//! A user holds at most [`crate::StoreOptions::max_departures_per_user`]
//! records; a departure past that is not recorded.

use crate::codec;
use crate::{GroupId, Inner, Store, StoreError, UserId};

/// Bytes of a `departures` key: `user ++ group ++ start`.
pub(crate) const DEPARTURE_KEY_LEN: usize = 24;

/// A range of a group's messages owed to a user who left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Departure {
    pub group: GroupId,
    /// The user's delivered cursor when they left: owed from `start + 1`.
    pub start: u64,
    /// The last seq sequenced while they were a member (inclusive).
    pub until: u64,
}

/// What removing a member recorded for their catch-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departed {
    /// The user was not a member: nothing was removed or recorded.
    NotMember,
    /// Removed; the departure is recorded with the group's last stored
    /// seq as `until` (`until <= start`: nothing owed yet).
    Recorded(Departure),
    /// Removed, but the user holds `max_departures_per_user` records
    /// already: nothing is owed to them from this membership by history.
    Unrecorded,
}

pub(crate) fn departure_key(user: UserId, group: GroupId, start: u64) -> [u8; DEPARTURE_KEY_LEN] {
    let mut key = [0u8; DEPARTURE_KEY_LEN];
    key[..16].copy_from_slice(&codec::pair_key(user, group));
    key[16..].copy_from_slice(&start.to_be_bytes());
    key
}

/// `departures` value: `[v1][until u64 BE]` (9 bytes).
pub(crate) fn encode_until(until: u64) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = codec::VALUE_V1;
    v[1..].copy_from_slice(&until.to_be_bytes());
    v
}

fn decode(key: &[u8], value: &[u8]) -> Result<Departure, String> {
    let key: [u8; DEPARTURE_KEY_LEN] = key.try_into().map_err(|_| {
        format!(
            "departure key is {} bytes, expected {DEPARTURE_KEY_LEN}",
            key.len()
        )
    })?;
    let (_, rest) = key.split_at(8);
    let (group, start) = rest.split_at(8);
    let value: [u8; 9] = value
        .try_into()
        .map_err(|_| format!("departure value is {} bytes, expected 9", value.len()))?;
    let (version, until) = value.split_at(1);
    if version != [codec::VALUE_V1] {
        return Err(format!("unknown value version {version:?}"));
    }
    let id = |bytes: &[u8]| codec::decode_id_key(bytes);
    Ok(Departure {
        group: id(group)?,
        start: id(start)?,
        until: id(until)?,
    })
}

impl Inner {
    /// Adds to `batch` the departure of `user` from `group`, whose last
    /// stored seq is read here, unless the user holds the most records
    /// allowed. Call it under the groups lock with the membership's
    /// removal in the same batch.
    pub(crate) fn record_departure(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        group: GroupId,
        user: UserId,
    ) -> Result<Departed, StoreError> {
        if self
            .departures
            .prefix_reaches(user, self.opts.max_departures_per_user)?
        {
            return Ok(Departed::Unrecorded);
        }
        let conv = crate::ConvId::Group { group };
        let (start, _) = self.load_receipts(&codec::user_conv_key(user, conv))?;
        let until = self.last_stored_seq(conv)?;
        batch.insert(
            &self.departures.handle,
            departure_key(user, group, start),
            encode_until(until),
        );
        Ok(Departed::Recorded(Departure { group, start, until }))
    }

    /// The highest seq of `conv` in history (0 if none): one reverse step.
    fn last_stored_seq(&self, conv: crate::ConvId) -> Result<u64, StoreError> {
        let history = &self.history;
        match history.handle.prefix(codec::conv_key(conv)).next_back() {
            Some(guard) => {
                let key = history.key_of(guard)?;
                codec::decode_history_key(&key)
                    .map(|(_, seq)| seq)
                    .map_err(|d| history.corrupt(&key, d))
            }
            None => Ok(0),
        }
    }

    /// The departure records whose keys start with `prefix` (a user, or
    /// a user and a group), in key order, at most
    /// `max_departures_per_user` of them.
    fn scan_departures(&self, prefix: &[u8]) -> Result<Vec<Departure>, StoreError> {
        let ks = &self.departures;
        let mut out = Vec::new();
        for guard in ks.handle.prefix(prefix).take(self.opts.max_departures_per_user) {
            let (key, value) = ks.entry(guard)?;
            out.push(decode(&key, &value).map_err(|d| ks.corrupt(&key, d))?);
        }
        Ok(out)
    }

    /// Whether `user` holds a departure record for `group`.
    pub(crate) fn has_departure(&self, user: UserId, group: GroupId) -> Result<bool, StoreError> {
        match self.departures.handle.prefix(codec::pair_key(user, group)).next() {
            Some(guard) => self.departures.key_of(guard).map(|_| true),
            None => Ok(false),
        }
    }
}

impl Store {
    /// `user`'s departure records, by group then start (so each group's in
    /// seq order), at most `max_departures_per_user` of them.
    pub fn departures(&self, user: UserId) -> Result<Vec<Departure>, StoreError> {
        self.inner.scan_departures(&codec::id_key(user))
    }

    /// `user`'s departure records for `group`, in seq order.
    pub fn departures_from(&self, user: UserId, group: GroupId) -> Result<Vec<Departure>, StoreError> {
        self.inner.scan_departures(&codec::pair_key(user, group))
    }

    /// Removes the given departure records of `user` (acknowledged, or of
    /// a deleted group), unsynced: one lost in a crash is found again by
    /// the next catch-up, which drops it then.
    pub fn drop_departures(&self, user: UserId, gone: &[Departure]) -> Result<(), StoreError> {
        if gone.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        let mut batch = inner.db.batch();
        for d in gone {
            batch.remove(&inner.departures.handle, departure_key(user, d.group, d.start));
        }
        inner.write(batch, false).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InboxTargets, MessageWrite, StoreOptions, WriteOp};

    fn message(group: GroupId, seq: u64) -> WriteOp {
        WriteOp::Message(MessageWrite {
            conv: crate::ConvId::Group { group },
            seq,
            from: 1,
            client_msg_id: seq,
            timestamp_ms: seq,
            frame: std::sync::Arc::from(&b"frame"[..]),
            inbox: InboxTargets::None,
            moved_from: None,
        })
    }

    #[test]
    fn removals_record_what_is_owed_within_the_limit_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || StoreOptions {
            max_departures_per_user: 2,
            ..crate::test_options()
        };
        let (g1, g2, g3);
        {
            let store = Store::open(dir.path(), opts()).unwrap();
            for name in ["alice", "bob"] {
                store.register(name, b"password1").unwrap();
            }
            g1 = store.create_group(1, "one").unwrap();
            g2 = store.create_group(1, "two").unwrap();
            g3 = store.create_group(1, "three").unwrap();
            for g in [g1, g2, g3] {
                store.add_member(g, 2).unwrap();
            }
            store
                .apply(&[message(g1, 1), message(g1, 2), message(g2, 1)], false)
                .unwrap();
            let conv = crate::ConvId::Group { group: g1 };
            let receipt = WriteOp::Receipt {
                user: 2,
                conv,
                kind: crate::ReceiptKind::Delivered,
                seq: 1,
            };
            store.apply(&[receipt], false).unwrap();
            let d1 = Departure {
                group: g1,
                start: 1,
                until: 2,
            };
            assert_eq!(store.remove_member(g1, 2).unwrap(), Departed::Recorded(d1));
            assert_eq!(store.remove_member(g1, 2).unwrap(), Departed::NotMember);
            let d2 = Departure {
                group: g2,
                start: 0,
                until: 1,
            };
            assert_eq!(store.ban(g2, 2).unwrap(), Departed::Recorded(d2));
            // The third is past the limit: removed, not recorded.
            assert_eq!(store.remove_member(g3, 2).unwrap(), Departed::Unrecorded);
            assert!(!store.is_member(g3, 2).unwrap());
            assert!(store.has_conversation(2, conv).unwrap());
        }
        let store = Store::open(dir.path(), opts()).unwrap();
        let held = store.departures(2).unwrap();
        assert_eq!(
            held,
            vec![
                Departure {
                    group: g1,
                    start: 1,
                    until: 2
                },
                Departure {
                    group: g2,
                    start: 0,
                    until: 1
                }
            ]
        );
        // The writer's op extends one; dropping frees its place.
        let extend = WriteOp::Departure {
            user: 2,
            group: g2,
            start: 0,
            until: 5,
        };
        store.apply(&[extend], false).unwrap();
        assert_eq!(store.departures(2).unwrap()[1].until, 5);
        store.drop_departures(2, &held[..1]).unwrap();
        assert_eq!(store.departures(2).unwrap().len(), 1);
        store.add_member(g3, 2).unwrap();
        assert!(matches!(
            store.remove_member(g3, 2).unwrap(),
            Departed::Recorded(_)
        ));
    }
}
