//! Messages: per-conversation history, per-user inboxes (the offline
//! queue), receipt cursors and the conversation indexes. It owns the
//! `history`, `inbox`, `receipts`, `user_convs` and `user_groups`
//! keyspaces (`user_groups` is written by `groups.rs`, in the membership
//! batches; `recent_convs`, whose layout `recency.rs` owns, is written
//! here with the messages) and [`Store::apply`], which turns a slice of [`WriteOp`]s into
//! one atomic fjall batch: the unit the group-commit writer (`writer.rs`)
//! commits and syncs. Sequence numbers and deduplication are the engine's;
//! the store keeps what it is given and answers the queries the engine
//! needs after a restart (last seq, recent client message ids) and on
//! sync, history paging and retention.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use fjall::PersistMode;

use crate::codec::{self, INBOX_KEY_LEN, USER_CONV_KEY_LEN};
use crate::deleted_bits::DeletedBits;
use crate::departures::{departure_key, DEPARTURE_KEY_LEN};
use crate::recency::{recency_bucket, recent_key, RECENT_KEY_LEN};
use crate::{ConvId, GroupId, Inner, Ks, Store, StoreError, UserId};

/// Deletes issued per batch by the expiry sweeps, so a sweep over a large
/// store neither builds one huge batch nor holds every key in memory.
const EXPIRE_CHUNK: usize = 10_000;

/// Which users' inboxes a message is written to (write diffusion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxTargets {
    /// History only (read diffusion: large groups, or no offline member).
    None,
    /// One inbox, e.g. the peer of a 1:1 conversation.
    One(UserId),
    /// Several inboxes, e.g. the members of a small group.
    Many(Arc<[UserId]>),
}

impl InboxTargets {
    fn as_slice(&self) -> &[UserId] {
        match self {
            InboxTargets::None => &[],
            InboxTargets::One(user) => std::slice::from_ref(user),
            InboxTargets::Many(users) => users,
        }
    }
}

/// One message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageWrite {
    pub conv: ConvId,
    /// Per-conversation sequence number, assigned by the home shard.
    pub seq: u64,
    pub from: UserId,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
    /// The encoded push frame. Opaque to the store; returned verbatim by
    /// [`Store::inbox_after`], [`Store::history`] and [`Store::last_message`].
    pub frame: Arc<[u8]>,
    pub inbox: InboxTargets,
    /// For a 1:1 message after the first: the [`recency_bucket`] of the
    /// conversation's previous newest message, when this message's
    /// bucket differs from it. Its `recent_convs` keys then move from
    /// that bucket to this message's. `None` when the bucket stays (and
    /// for groups). The first message (seq 1) enters the index whatever
    /// this says. The engine knows it from its conversation cache, so
    /// the store reads nothing to keep the index.
    pub moved_from: Option<u64>,
}

/// Which receipt cursor a [`WriteOp::Receipt`] moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// One change applied by [`Store::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// `history[conv, seq]`, `inbox[user, conv, seq]` for each target, and
    /// for the first message (seq 1) of a 1:1 conversation
    /// `user_convs[p, conv]` for both participants; for a 1:1 message
    /// that enters or moves the conversation's recency bucket, its
    /// `recent_convs` keys for both.
    Message(MessageWrite),
    /// Moves `user`'s cursor in `conv` forward to `seq` (never back). Both
    /// kinds delete the user's inbox entries of `conv` with seq up to the
    /// delivered cursor; `Read` also raises the delivered cursor.
    Receipt {
        user: UserId,
        conv: ConvId,
        kind: ReceiptKind,
        seq: u64,
    },
    /// Replaces the stored frame of message `seq` of `conv` (a recalled
    /// message: its content erased), keeping its sender, client message
    /// id and time. Nothing is written if the message is gone (expired or
    /// purged): an erasure never brings a message back.
    Erase {
        conv: ConvId,
        seq: u64,
        from: UserId,
        client_msg_id: u64,
        timestamp_ms: u64,
        frame: Arc<[u8]>,
    },
    /// Sets the end of `user`'s departure from `group` recorded with
    /// `start` (inserting it if a catch-up dropped it meanwhile): the
    /// engine extends a departure to the messages that were sequenced
    /// before it but not yet stored when the membership was removed.
    Departure {
        user: UserId,
        group: GroupId,
        start: u64,
        until: u64,
    },
}

impl WriteOp {
    /// Keys this op writes, roughly: the writer bounds its batches by this.
    pub fn weight(&self) -> usize {
        match self {
            WriteOp::Message(m) => 1 + m.inbox.as_slice().len() + 4 * usize::from(m.moved_from.is_some()),
            WriteOp::Receipt { .. } | WriteOp::Erase { .. } | WriteOp::Departure { .. } => 1,
        }
    }
}

/// A stored push frame with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFrame {
    pub conv: ConvId,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub frame: Vec<u8>,
}

/// One stored message as [`Store::history_entry`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub from: UserId,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
    /// The encoded `Message` frame as stored.
    pub frame: Vec<u8>,
}

/// One entry of [`ConvTail::recent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentMessage {
    pub seq: u64,
    pub from: UserId,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
}

/// The end of a conversation's history, for seq recovery and the dedup
/// window after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvTail {
    /// The highest stored seq (0 for a conversation with no history).
    pub last_seq: u64,
    /// The time of the message at `last_seq` (0 with no history): a 1:1
    /// conversation's `recent_convs` keys are in its
    /// [`recency_bucket`].
    pub last_timestamp_ms: u64,
    /// The newest stored entries, at most `window`, in ascending seq order.
    pub recent: Vec<RecentMessage>,
}

/// The writes of one [`Store::apply`] call before they go into the batch.
/// Receipts are read-modify-write and inbox deletions must also catch
/// entries written earlier in the same call, so both are staged here.
#[derive(Default)]
struct Staged {
    /// `inbox` inserts not yet in the batch, ordered so a receipt can drop
    /// a `user ++ conv` range of them.
    inbox: BTreeMap<[u8; INBOX_KEY_LEN], [u8; 9]>,
    /// `(delivered, read)` per `user ++ conv` after this call's receipts.
    receipts: HashMap<[u8; USER_CONV_KEY_LEN], (u64, u64)>,
    /// `user_convs` keys already in the batch (many messages of one
    /// conversation in a batch write the index once).
    user_convs: HashSet<[u8; USER_CONV_KEY_LEN]>,
    /// `departures` ends set by [`WriteOp::Departure`], staged so that a
    /// deleted account's are dropped with its other keys (and so that a
    /// batch holds each key once: the last op's end).
    departures: BTreeMap<[u8; DEPARTURE_KEY_LEN], [u8; 9]>,
    /// `recent_convs` changes, `true` to insert and `false` to remove,
    /// so that when two messages of a batch move one conversation the
    /// later wins and a batch holds each key once.
    recent: BTreeMap<[u8; RECENT_KEY_LEN], bool>,
}

impl Staged {
    /// Drops the inbox entries, receipt cursors, conversation index keys
    /// and departure ends of deleted accounts (a message sequenced just
    /// before the deletion, a receipt sent just before the session was
    /// closed, a departure the purge's leave of a group extends).
    fn drop_users(&mut self, deleted: &DeletedBits) {
        let owner = |key: &[u8]| {
            key.get(..8)
                .and_then(|id| codec::decode_id_key(id).ok())
                .is_some_and(|user| deleted.contains(user))
        };
        self.inbox.retain(|key, _| !owner(key));
        self.receipts.retain(|key, _| !owner(key));
        self.user_convs.retain(|key| !owner(key));
        self.departures.retain(|key, _| !owner(key));
        self.recent.retain(|key, _| !owner(key));
    }
}

impl Inner {
    /// Stages `op` into `batch` / `staged`. Reads (receipt cursors, inbox
    /// entries to delete) see the committed state plus `staged`.
    fn stage(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        staged: &mut Staged,
        op: &WriteOp,
    ) -> Result<(), StoreError> {
        match op {
            WriteOp::Message(m) => {
                batch.insert(
                    &self.history.handle,
                    codec::history_key(m.conv, m.seq),
                    codec::encode_history(m.from, m.client_msg_id, m.timestamp_ms, &m.frame),
                );
                // A reference to the history record, not a copy of the
                // frame: the frame is written once per message.
                let value = codec::encode_inbox(m.timestamp_ms);
                for &user in m.inbox.as_slice() {
                    staged.inbox.insert(codec::inbox_key(user, m.conv, m.seq), value);
                }
                // A conversation's first message (seq 1) indexes it: every
                // later message would only rewrite the same two keys, which
                // cost ~20% of the keys written under 1:1 load.
                if let (ConvId::Direct { low, high }, 1) = (m.conv, m.seq) {
                    for user in [low, high] {
                        staged.user_convs.insert(codec::user_conv_key(user, m.conv));
                    }
                }
                if let ConvId::Direct { low, high } = m.conv {
                    let to = recency_bucket(m.timestamp_ms);
                    let from = m.moved_from.filter(|&from| from != to && m.seq != 1);
                    if m.seq == 1 || from.is_some() {
                        for user in [low, high] {
                            if let Some(from) = from {
                                staged.recent.insert(recent_key(user, from, m.conv), false);
                            }
                            staged.recent.insert(recent_key(user, to, m.conv), true);
                        }
                    }
                }
            }
            &WriteOp::Receipt {
                user,
                conv,
                kind,
                seq,
            } => {
                let key = codec::user_conv_key(user, conv);
                let (old_delivered, old_read) = match staged.receipts.get(&key) {
                    Some(&cursors) => cursors,
                    None => self.load_receipts(&key)?,
                };
                let read = match kind {
                    ReceiptKind::Read => old_read.max(seq),
                    ReceiptKind::Delivered => old_read,
                };
                let delivered = old_delivered.max(seq).max(read);
                staged.receipts.insert(key, (delivered, read));
                if delivered > old_delivered {
                    // Entries up to the old cursor went with earlier receipts.
                    let from = codec::inbox_key(user, conv, old_delivered.saturating_add(1));
                    let to = codec::inbox_key(user, conv, delivered);
                    for guard in self.inbox.handle.range(from..=to) {
                        batch.remove(&self.inbox.handle, self.inbox.key_of(guard)?);
                    }
                }
                // Entries staged in this call, whatever their seq.
                let from = codec::inbox_key(user, conv, 0);
                let to = codec::inbox_key(user, conv, delivered);
                let doomed: Vec<_> = staged.inbox.range(from..=to).map(|(k, _)| *k).collect();
                for k in doomed {
                    staged.inbox.remove(&k);
                }
            }
            WriteOp::Erase {
                conv,
                seq,
                from,
                client_msg_id,
                timestamp_ms,
                frame,
            } => {
                let key = codec::history_key(*conv, *seq);
                if self.history.contains(key)? {
                    let value = codec::encode_history(*from, *client_msg_id, *timestamp_ms, frame);
                    batch.insert(&self.history.handle, key, value);
                }
            }
            &WriteOp::Departure {
                user,
                group,
                start,
                until,
            } => {
                staged.departures.insert(
                    departure_key(user, group, start),
                    crate::departures::encode_until(until),
                );
            }
        }
        Ok(())
    }

    /// Moves `staged` into `batch` and commits it: fsynced (`SyncData`)
    /// if `sync`, else handed to the OS (`Buffer`).
    fn commit_staged(
        &self,
        mut batch: fjall::OwnedWriteBatch,
        staged: Staged,
        sync: bool,
    ) -> Result<(), StoreError> {
        for (key, value) in staged.inbox {
            batch.insert(&self.inbox.handle, key, value);
        }
        for key in staged.user_convs {
            batch.insert(&self.user_convs.handle, key, []);
        }
        for (key, value) in staged.departures {
            batch.insert(&self.departures.handle, key, value);
        }
        for (key, insert) in staged.recent {
            match insert {
                true => batch.insert(&self.recent.handle, key, []),
                false => batch.remove(&self.recent.handle, key),
            }
        }
        for (key, (delivered, read)) in staged.receipts {
            batch.insert(
                &self.receipts.handle,
                key,
                codec::encode_receipts(delivered, read),
            );
        }
        let mode = if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        batch.durability(Some(mode)).commit()?;
        Ok(())
    }

    pub(crate) fn load_receipts(&self, key: &[u8; USER_CONV_KEY_LEN]) -> Result<(u64, u64), StoreError> {
        match self.receipts.get(key)? {
            Some(value) => codec::decode_receipts(&value).map_err(|d| self.receipts.corrupt(key, d)),
            None => Ok((0, 0)),
        }
    }

    /// Applies every op of every slice in one batch (the writer passes one
    /// slice per submission).
    pub(crate) fn apply_all<'a>(
        &self,
        ops: impl IntoIterator<Item = &'a [WriteOp]> + Clone,
        sync: bool,
    ) -> Result<(), StoreError> {
        // Sized up front (weight ≈ keys written): grown one push at a time,
        // the batch's item vector was reallocated, its fresh pages faulted
        // in, several times per group commit (2.7% of the writer's CPU
        // under `pairs` 100 × 64).
        let capacity = ops.clone().into_iter().flatten().map(WriteOp::weight).sum();
        let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), capacity);
        let mut staged = Staged::default();
        for slice in ops {
            for op in slice {
                self.stage(&mut batch, &mut staged, op)?;
            }
        }
        // Held to the commit: see `user_deletion` on why.
        let _gate = self.deletion_gate(|deleted| staged.drop_users(deleted));
        self.commit_staged(batch, staged, sync)
    }
}

fn history_frame(ks: &Ks, key: &[u8], value: &[u8]) -> Result<StoredFrame, StoreError> {
    let (conv, seq) = codec::decode_history_key(key).map_err(|d| ks.corrupt(key, d))?;
    let v = codec::decode_history(value).map_err(|d| ks.corrupt(key, d))?;
    Ok(StoredFrame {
        conv,
        seq,
        timestamp_ms: v.timestamp_ms,
        frame: v.frame.to_vec(),
    })
}

impl Store {
    /// Applies `ops` in order as ONE atomic batch: all of them are in the
    /// store afterwards, or (on error) none. With `sync` the batch is
    /// fsynced (`fdatasync`) before this returns; without, it has been
    /// written to the OS (it survives a crash of this process, not of the
    /// machine). Receipts are read-modify-write: callers must not apply
    /// receipts for the same user and conversation from two threads at
    /// once (the [`crate::Writer`] is the single caller in the server).
    pub fn apply(&self, ops: &[WriteOp], sync: bool) -> Result<(), StoreError> {
        self.inner.apply_all([ops], sync)
    }

    /// The highest stored seq of `conv` and its newest `window` entries
    /// (ascending), read after a restart to continue the sequence and to
    /// rebuild the engine's client-message-id dedup window.
    pub fn conv_tail(&self, conv: ConvId, window: usize) -> Result<ConvTail, StoreError> {
        let history = &self.inner.history;
        let mut tail = ConvTail::default();
        for guard in history.handle.prefix(codec::conv_key(conv)).rev() {
            let (key, value) = history.entry(guard)?;
            let (_, seq) = codec::decode_history_key(&key).map_err(|d| history.corrupt(&key, d))?;
            let v = codec::decode_history(&value).map_err(|d| history.corrupt(&key, d))?;
            if tail.last_seq == 0 {
                tail.last_seq = seq;
                tail.last_timestamp_ms = v.timestamp_ms;
            }
            if tail.recent.len() >= window {
                break;
            }
            tail.recent.push(RecentMessage {
                seq,
                from: v.from,
                client_msg_id: v.client_msg_id,
                timestamp_ms: v.timestamp_ms,
            });
        }
        tail.recent.reverse();
        Ok(tail)
    }

    /// `user`'s inbox in `(conversation key, seq)` order, starting after
    /// the exclusive position `after` (`None`: from the start), at most
    /// `limit` entries. Entries at or below the user's delivered cursor
    /// of their conversation are never returned, even if still stored.
    /// An entry's frame is read from `history` (one range read per run of
    /// a conversation's entries); an entry whose history record is gone
    /// (history retention shorter than the inbox's) is skipped.
    pub fn inbox_after(
        &self,
        user: UserId,
        after: Option<(ConvId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredFrame>, StoreError> {
        let inner = &*self.inner;
        let inbox = &inner.inbox;
        let prefix = codec::id_key(user);
        let start = match after {
            Some((conv, seq)) => Bound::Excluded(codec::inbox_key(user, conv, seq).to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let end = Bound::Included([&prefix[..], &[0xff; INBOX_KEY_LEN - 8]].concat());
        let mut out = Vec::new();
        // Entries of the current conversation whose frame is in history.
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut cursor: Option<(ConvId, u64)> = None;
        for guard in inbox.handle.range((start, end)) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = inbox.entry(guard)?;
            let (_, conv, seq) = codec::decode_inbox_key(&key).map_err(|d| inbox.corrupt(&key, d))?;
            if let ConvId::Group { group } = conv {
                // A deleted group's entries wait for their purge, unseen.
                if inner.purging(group) {
                    continue;
                }
            }
            let delivered = match cursor {
                Some((c, d)) if c == conv => d,
                previous => {
                    if let Some((c, _)) = previous {
                        inner.resolve_inbox_run(c, &mut pending, &mut out)?;
                    }
                    let d = inner.load_receipts(&codec::user_conv_key(user, conv))?.0;
                    cursor = Some((conv, d));
                    d
                }
            };
            if seq <= delivered {
                continue;
            }
            let entry = codec::decode_inbox(&value).map_err(|d| inbox.corrupt(&key, d))?;
            match entry.frame {
                Some(frame) => {
                    // A version-1 entry carries its frame; keep the order.
                    inner.resolve_inbox_run(conv, &mut pending, &mut out)?;
                    out.push(StoredFrame {
                        conv,
                        seq,
                        timestamp_ms: entry.timestamp_ms,
                        frame: frame.to_vec(),
                    });
                }
                None => {
                    pending.push((seq, entry.timestamp_ms));
                    // Resolve before the page is full; a record that has
                    // expired from history leaves room for more entries.
                    if out.len() + pending.len() >= limit {
                        inner.resolve_inbox_run(conv, &mut pending, &mut out)?;
                    }
                }
            }
        }
        if let Some((conv, _)) = cursor {
            inner.resolve_inbox_run(conv, &mut pending, &mut out)?;
        }
        Ok(out)
    }

    /// Message `seq` of `conv`, if stored.
    pub fn history_entry(&self, conv: ConvId, seq: u64) -> Result<Option<HistoryEntry>, StoreError> {
        let history = &self.inner.history;
        let key = codec::history_key(conv, seq);
        let Some(value) = history.get(&key)? else {
            return Ok(None);
        };
        let v = codec::decode_history(&value).map_err(|d| history.corrupt(&key, d))?;
        Ok(Some(HistoryEntry {
            from: v.from,
            client_msg_id: v.client_msg_id,
            timestamp_ms: v.timestamp_ms,
            frame: v.frame.to_vec(),
        }))
    }

    /// A page of `conv`'s history: `forward`, entries with seq >=
    /// `from_seq` ascending; backward, entries with seq <= `from_seq`
    /// descending. At most `limit` entries.
    pub fn history(
        &self,
        conv: ConvId,
        from_seq: u64,
        forward: bool,
        limit: usize,
    ) -> Result<Vec<StoredFrame>, StoreError> {
        let history = &self.inner.history;
        let (lo, hi) = if forward {
            (from_seq, u64::MAX)
        } else {
            (0, from_seq)
        };
        let range = codec::history_key(conv, lo)..=codec::history_key(conv, hi);
        let iter = history.handle.range(range);
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = if forward {
            Box::new(iter)
        } else {
            Box::new(iter.rev())
        };
        let mut out = Vec::new();
        for guard in iter.take(limit) {
            let (key, value) = history.entry(guard)?;
            out.push(history_frame(history, &key, &value)?);
        }
        Ok(out)
    }

    /// `user`'s `(delivered, read)` cursors in `conv`; `(0, 0)` if none.
    pub fn receipts(&self, user: UserId, conv: ConvId) -> Result<(u64, u64), StoreError> {
        self.inner.load_receipts(&codec::user_conv_key(user, conv))
    }

    /// Whether `conv` holds, or held, messages for `user`, so that a cursor
    /// of theirs for it can mean something: a 1:1 conversation of theirs
    /// with at least one message (its `user_convs` key, written with seq
    /// 1), or a group they are a member of, or one they left that they
    /// still have a cursor or inbox entries for. A few point reads. The
    /// engine stores a `Sync` cursor only for such a conversation, so a
    /// client cannot write a receipt row for every user and group there is.
    pub fn has_conversation(&self, user: UserId, conv: ConvId) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let key = codec::user_conv_key(user, conv);
        match conv {
            ConvId::Direct { .. } => inner.user_convs.contains(key),
            ConvId::Group { group } => {
                if inner.purging(group) {
                    return Ok(false);
                }
                if inner.members.contains(codec::pair_key(group, user))?
                    || inner.receipts.contains(key)?
                    || inner.has_departure(user, group)?
                {
                    return Ok(true);
                }
                match inner.inbox.handle.prefix(key).next() {
                    Some(guard) => inner.inbox.entry(guard).map(|_| true),
                    None => Ok(false),
                }
            }
        }
    }

    /// The 1:1 conversations `user` has sent or received a message in,
    /// in conversation-key order, at most `max` of them (the index grows
    /// with everyone who ever wrote to the user).
    pub fn direct_conversations(&self, user: UserId, max: usize) -> Result<Vec<ConvId>, StoreError> {
        let ks = &self.inner.user_convs;
        let mut out = Vec::new();
        for guard in ks.handle.prefix(codec::id_key(user)).take(max) {
            let (key, value) = ks.entry(guard)?;
            codec::check_empty(&value).map_err(|d| ks.corrupt(&key, d))?;
            out.push(codec::decode_user_conv_key(&key).map_err(|d| ks.corrupt(&key, d))?);
        }
        Ok(out)
    }

    /// The groups `user` is a member of, ascending by id (never a deleted
    /// group, whose keys may still await their purge).
    pub fn user_groups(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        let mut groups = self.inner.user_groups.scan_pairs(user)?;
        groups.retain(|&group| !self.inner.purging(group));
        Ok(groups)
    }

    /// The newest stored message of `conv`, if any.
    pub fn last_message(&self, conv: ConvId) -> Result<Option<StoredFrame>, StoreError> {
        let history = &self.inner.history;
        match history.handle.prefix(codec::conv_key(conv)).next_back() {
            Some(guard) => {
                let (key, value) = history.entry(guard)?;
                history_frame(history, &key, &value).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Deletes every inbox entry whose timestamp is before `older_than_ms`
    /// and returns how many. Entries at or after it are never touched. A
    /// full scan of `inbox`: run it from a maintenance thread, rarely.
    pub fn expire_inbox(&self, older_than_ms: u64) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        let inbox = &inner.inbox;
        let mut doomed = Vec::new();
        let mut removed = 0;
        for guard in inbox.handle.iter() {
            let (key, value) = inbox.entry(guard)?;
            let entry = codec::decode_inbox(&value).map_err(|d| inbox.corrupt(&key, d))?;
            if entry.timestamp_ms < older_than_ms {
                doomed.push(key);
                if doomed.len() >= EXPIRE_CHUNK {
                    removed += inner.remove_all(inbox, std::mem::take(&mut doomed))?;
                }
            }
        }
        removed += inner.remove_all(inbox, doomed)?;
        Ok(removed)
    }

    /// Deletes every history entry whose timestamp is before
    /// `older_than_ms`, except each conversation's newest entry (it
    /// carries the conversation's last seq, see [`Store::conv_tail`]), and
    /// returns how many. Entries at or after it are never touched.
    pub fn expire_history(&self, older_than_ms: u64) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        let history = &inner.history;
        let mut doomed = Vec::new();
        let mut removed = 0;
        // The previous entry, held back until we know it is not its
        // conversation's newest: (key, conversation, expired?).
        let mut pending: Option<(fjall::Slice, ConvId, bool)> = None;
        for guard in history.handle.iter() {
            let (key, value) = history.entry(guard)?;
            let (conv, _) = codec::decode_history_key(&key).map_err(|d| history.corrupt(&key, d))?;
            let v = codec::decode_history(&value).map_err(|d| history.corrupt(&key, d))?;
            if let Some((prev_key, prev_conv, expired)) = pending.take() {
                if expired && prev_conv == conv {
                    doomed.push(prev_key);
                    if doomed.len() >= EXPIRE_CHUNK {
                        removed += inner.remove_all(history, std::mem::take(&mut doomed))?;
                    }
                }
            }
            pending = Some((key, conv, v.timestamp_ms < older_than_ms));
        }
        removed += inner.remove_all(history, doomed)?;
        Ok(removed)
    }
}

/// Inbox entry `(seq, timestamp_ms)` of `conv` with the frame of its
/// history record (`key`, `value`).
fn inbox_frame(
    history: &crate::Ks,
    conv: ConvId,
    (seq, timestamp_ms): (u64, u64),
    key: &[u8],
    value: &[u8],
) -> Result<StoredFrame, StoreError> {
    let v = codec::decode_history(value).map_err(|d| history.corrupt(key, d))?;
    Ok(StoredFrame {
        conv,
        seq,
        timestamp_ms,
        frame: v.frame.to_vec(),
    })
}

/// Above this many history records per wanted one, an inbox run's frames
/// are read one by one rather than by one range read (see
/// `resolve_inbox_run`; `store/inbox_after` in bench/benches/store.rs).
const INBOX_RUN_SPARSE_FACTOR: u64 = 5;

impl Inner {
    /// Appends the history frames of `pending` (ascending seqs of `conv`,
    /// with their inbox timestamps) to `out`, in order, and empties
    /// `pending`: with one range read over `conv`'s history where the
    /// wanted seqs are most of it, else one point read each. A range read
    /// costs every record between the first and the last wanted seq, and
    /// those can be many: the user's own messages are in history but not
    /// in their inbox, so two entries can have a long chat between them.
    fn resolve_inbox_run(
        &self,
        conv: ConvId,
        pending: &mut Vec<(u64, u64)>,
        out: &mut Vec<StoredFrame>,
    ) -> Result<(), StoreError> {
        let (Some(&(first, _)), Some(&(last, _))) = (pending.first(), pending.last()) else {
            return Ok(());
        };
        let history = &self.history;
        let span = last - first + 1;
        if span > INBOX_RUN_SPARSE_FACTOR.saturating_mul(pending.len() as u64) {
            for (seq, timestamp_ms) in pending.drain(..) {
                let key = codec::history_key(conv, seq);
                // Gone: expired from history.
                let Some(value) = history.get(&key)? else {
                    continue;
                };
                out.push(inbox_frame(history, conv, (seq, timestamp_ms), &key, &value)?);
            }
            return Ok(());
        }
        let range = codec::history_key(conv, first)..=codec::history_key(conv, last);
        let mut wanted = pending.drain(..).peekable();
        for guard in history.handle.range(range) {
            if wanted.peek().is_none() {
                break;
            }
            let (key, value) = history.entry(guard)?;
            let (_, stored_seq) = codec::decode_history_key(&key).map_err(|d| history.corrupt(&key, d))?;
            // Wanted seqs below this record have expired from history;
            // records between wanted seqs are the user's own messages.
            while wanted.next_if(|&(seq, _)| seq < stored_seq).is_some() {}
            let Some(entry) = wanted.next_if(|&(seq, _)| seq == stored_seq) else {
                continue;
            };
            out.push(inbox_frame(history, conv, entry, &key, &value)?);
        }
        Ok(())
    }

    /// Removes `keys` from `ks` in one unsynced batch (expiry: losing a
    /// deletion in a machine crash only delays it to the next sweep).
    fn remove_all(&self, ks: &Ks, keys: Vec<fjall::Slice>) -> Result<usize, StoreError> {
        let n = keys.len();
        if n == 0 {
            return Ok(0);
        }
        let mut batch = self.db.batch();
        for key in keys {
            batch.remove(&ks.handle, key);
        }
        batch.durability(Some(PersistMode::Buffer)).commit()?;
        Ok(n)
    }
}
