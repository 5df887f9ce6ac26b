//! Sequencing messages and committing them durably, in batches.
//!
//! The home shard of a conversation keeps its [`ConvState`]: the last
//! sequence number and a window of recent client message ids, loaded from
//! the store on first use (so both survive restarts). A new message gets the
//! next seq; a retry of a recent one gets its original ack instead. For a
//! 1:1 conversation the state also knows the recency bucket its index keys
//! are in (that of its newest message, `tern_storage::recency_bucket`), so
//! a message moves them only when it starts a new bucket, without a read.
//! Writes are *staged* on the shard together with the [`Effect`]s that must
//! follow them (deliveries, acks, receipts). One committer task per shard
//! hands whatever was staged to the storage writer thread as one batch and,
//! once that batch is durable, runs its effects in order. Batches therefore
//! grow with load, and the writer merges batches from every shard into one
//! fsync: group commit without a timer.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use tern_proto::{ConvId, ErrorCode, ReceiptKind, ServerFrame, UserId};
use tern_storage::SubmitError;
use tern_storage::{recency_bucket, Blocks, ConvTail, ReceiptKind as StoredReceiptKind, StoreError, WriteOp};

use super::loads::{InFlight, ReadGuard};
use super::{encode_shared, store_error_frame, Encoded, Shard};
use crate::mesh::{ConnKey, Event};

/// How long a shard waits before retrying a submission to a full writer.
const WRITER_FULL_BACKOFF: Duration = Duration::from_micros(200);

/// Room reserved under `max_staged_writes` by [`Shard::room_to_stage`];
/// hold it until the writes are staged (or will not be).
pub struct StageRoom<'a> {
    shard: &'a Shard,
    ops: usize,
}

impl Drop for StageRoom<'_> {
    fn drop(&mut self) {
        let shard = self.shard;
        let reserved = &shard.staged_reserved;
        reserved.set(reserved.get().saturating_sub(self.ops));
        // A reservation whose writes were staged frees nothing (they moved
        // from reserved to staged); one given back unused (a refused
        // message) may let a waiter in before the next commit. Waking only
        // when there is room spares the waiters a poll per message while
        // the bound is full.
        let taken = shard.staged.borrow().ops.len() + reserved.get();
        if taken < shard.config.max_staged_writes {
            shard.wake_room_waiters();
        }
    }
}

/// The sequence state of a conversation homed here.
pub(super) struct ConvState {
    last_seq: u64,
    /// The highest seq known to be stored: the last seq read from the
    /// store, raised as each message is committed. Commits of one shard
    /// are settled in order and a failed one fails every later message
    /// of the conversation, so the stored seqs are exactly `1..=` this.
    stored_seq: u64,
    /// Messages sequenced but not yet durable. While non-zero the state
    /// must stay cached: a reload from the store would reuse their seqs.
    inflight: u32,
    dedup: FxHashMap<(UserId, u64), Dedup>,
    /// Insertion order of `dedup`, to forget the oldest beyond the window.
    order: VecDeque<(UserId, u64)>,
    /// For a 1:1 conversation, who blocks whom (`low` is the first user):
    /// loaded with the state and changed only on this shard
    /// ([`Shard::change_block`]), so the check costs no store read.
    blocks: Blocks,
    /// A write of this conversation failed: `last_seq` counts seqs that
    /// were never stored, so nothing new is sequenced until the state is
    /// dropped (when `inflight` reaches 0) and reloaded.
    poisoned: bool,
    /// The recency bucket of the newest message sequenced (`None`: no
    /// message yet). A 1:1 conversation's `recent_convs` keys are in the
    /// bucket of its newest stored message, and each message that starts
    /// another bucket moves them in its own batch, so this is where they
    /// are once the messages in flight are stored. A failed write poisons
    /// the state, which then reloads this from the store.
    bucket: Option<u64>,
}

impl ConvState {
    /// Forgets that `from` sent `client_msg_id` (its write failed): a
    /// retry is then sequenced anew.
    fn forget_client_msg_id(&mut self, from: UserId, client_msg_id: u64) {
        let key = (from, client_msg_id);
        if self.dedup.remove(&key).is_some() {
            self.order.retain(|seen| *seen != key);
        }
    }

    /// The state as the store has it: the last seq and the recent client
    /// message ids, for deduplication.
    fn from_tail(tail: ConvTail, blocks: Blocks) -> ConvState {
        let mut state = ConvState {
            last_seq: tail.last_seq,
            stored_seq: tail.last_seq,
            inflight: 0,
            dedup: FxHashMap::default(),
            order: VecDeque::new(),
            blocks,
            poisoned: false,
            bucket: (tail.last_seq > 0).then(|| recency_bucket(tail.last_timestamp_ms)),
        };
        // `recent` is in ascending seq order, so trimming forgets the oldest.
        for recent in tail.recent.iter().filter(|r| r.client_msg_id != 0) {
            let key = (recent.from, recent.client_msg_id);
            let entry = Dedup {
                seq: recent.seq,
                timestamp_ms: recent.timestamp_ms,
                waiters: None,
            };
            if state.dedup.insert(key, entry).is_none() {
                state.order.push_back(key);
            }
        }
        state
    }
}

/// What a client message id was sequenced as.
struct Dedup {
    seq: u64,
    timestamp_ms: u64,
    /// `Some` until durable: retries that arrived meanwhile, acked on commit.
    waiters: Option<Vec<(ConnKey, u64)>>,
}

/// The outcome of sequencing one message.
enum Sequenced {
    New {
        seq: u64,
        timestamp_ms: u64,
        /// The recency bucket the conversation leaves for this message's
        /// (`MessageWrite::moved_from`), if it changes.
        moved_from: Option<u64>,
    },
    /// A retry of a durable message: answer with the original ack.
    Duplicate { seq: u64, timestamp_ms: u64 },
    /// A retry of a message still being written: answered on commit.
    Waiting,
    /// The conversation's sequence is at `u64::MAX`: only a damaged store
    /// (a history key written at that seq) gets here.
    Exhausted,
    /// A new message between two users one of whom blocks the other.
    Refused(&'static str),
    /// A write of the conversation failed and its state has not reloaded
    /// yet: the sender retries.
    Unstored,
}

/// Writes staged on this shard for the next commit, and what follows them.
#[derive(Default)]
pub(super) struct Staged {
    ops: Vec<WriteOp>,
    effects: Vec<Effect>,
}

/// Work that must wait until a staged write is durable.
pub(super) enum Effect {
    /// The message is durable: release its dedup entry and waiting retries.
    Durable {
        conv: ConvId,
        from: UserId,
        client_msg_id: u64,
        seq: u64,
    },
    /// Send an event (a delivery, an ack, a receipt push) once durable. A
    /// `Sent` becomes an error answer if the write failed.
    Event(usize, Event),
    /// Tell a waiting connection whether the write succeeded.
    Done(futures_channel::oneshot::Sender<bool>),
}

/// Splits the staged writes after a failed commit of `failed`'s messages:
/// the messages (and recall erasures) of those conversations, with their
/// deliveries, come out as failed effects (their `Durable` releases them
/// as failed, their `Sent` becomes an error answer, their deliveries are
/// dropped); everything else stays staged. Notices (seq `NOTICE_SEQ`) and
/// receipts are not messages and stay.
fn split_failed(staged: Staged, failed: &FxHashSet<ConvId>) -> (Staged, Vec<Effect>) {
    let Staged { ops, effects } = staged;
    let mut dropped: FxHashSet<(ConvId, u64)> = FxHashSet::default();
    let ops = ops
        .into_iter()
        .filter(|op| match op {
            WriteOp::Message(m) if failed.contains(&m.conv) => {
                dropped.insert((m.conv, m.seq));
                false
            }
            WriteOp::Erase { conv, .. } => !failed.contains(conv),
            _ => true,
        })
        .collect();
    let mut kept = Vec::new();
    let mut lost = Vec::new();
    for effect in effects {
        let failed_with = match &effect {
            Effect::Durable { conv, .. } => failed.contains(conv),
            Effect::Event(_, Event::Deliver { conv, seq, .. } | Event::Sent { conv, seq, .. }) => {
                dropped.contains(&(*conv, *seq))
            }
            Effect::Event(..) | Effect::Done(_) => false,
        };
        if failed_with {
            lost.push(effect);
        } else {
            kept.push(effect);
        }
    }
    (Staged { ops, effects: kept }, lost)
}

/// Lowers the cursors among `ops` (receipts, departure ends) of each
/// conversation in `stored` to its last stored seq, after a failed commit
/// of its messages. A joiner's cursor or a departure's end is taken from
/// the last seq sequenced ([`Shard::cursor_seq`]) and staged behind those
/// messages: if one of them fails, its seq and those after it are handed
/// out again once the state reloads, to messages sequenced after the join
/// (which the joiner must get) or after the removal (which the departed
/// must not). A receipt or `Sync` cursor from a client never passes a
/// stored seq (a client holds only delivered messages, and both are
/// capped at the store's last seq), so lowering every cursor of those
/// conversations is right for them too.
fn clamp_cursors(ops: &mut [WriteOp], stored: &FxHashMap<ConvId, u64>) {
    for op in ops {
        match op {
            WriteOp::Receipt { conv, seq, .. } => {
                if let Some(&last) = stored.get(conv) {
                    *seq = (*seq).min(last);
                }
            }
            WriteOp::Departure { group, until, .. } => {
                if let Some(&last) = stored.get(&ConvId::Group { group: *group }) {
                    *until = (*until).min(last);
                }
            }
            WriteOp::Message(_) | WriteOp::Erase { .. } => {}
        }
    }
}

/// The bytes of an encoded frame as the store keeps them: the same shared
/// buffer the deliveries use, no copy.
pub(super) fn store_frame(frame: &Encoded) -> Arc<[u8]> {
    frame.clone()
}

/// What became of a message whose batch the store answered, for the
/// retries that waited on it (connection, request id).
#[derive(Debug, PartialEq, Eq)]
enum Released {
    Durable {
        seq: u64,
        timestamp_ms: u64,
        waiters: Vec<(ConnKey, u64)>,
    },
    Unstored {
        waiters: Vec<(ConnKey, u64)>,
    },
}

/// The conversations homed here whose sequence state is cached, and the
/// reads of it from the store in flight. A read that began before a
/// cached state was changed and dropped (evicted when the cache is full,
/// or forgotten after a failed commit) returns what the store held then,
/// which may lack messages sequenced since: inserting it would hand out
/// their seqs again. Likewise a read that began before a block between
/// the two users changed may hold the old blocks. So every drop and every
/// block change is counted against the reads in flight for that
/// conversation, and a read that sees its count moved reads again. Holds
/// reads only while they are in flight.
#[derive(Default)]
pub(super) struct ConvCache {
    map: FxHashMap<ConvId, ConvState>,
    loading: InFlight<ConvId>,
    /// Tasks waiting for a conversation's writes in flight to end
    /// ([`Shard::conv_quiet`]): a membership change or deletion of a group
    /// holds its permit while it waits, so there is at most one per group
    /// change in progress here. Woken as the last one is released.
    quiet: FxHashMap<ConvId, Vec<Waker>>,
}

impl ConvCache {
    pub(super) fn contains(&self, conv: ConvId) -> bool {
        self.map.contains_key(&conv)
    }

    fn get_mut(&mut self, conv: ConvId) -> Option<&mut ConvState> {
        self.map.get_mut(&conv)
    }

    fn reads(&mut self) -> &mut InFlight<ConvId> {
        &mut self.loading
    }

    /// Forgets `conv`'s cached state, telling reads in flight.
    fn remove(&mut self, conv: ConvId) {
        if self.map.remove(&conv).is_some() {
            self.loading.outdate(conv);
        }
    }

    /// Records a changed block between the two users of `conv`: in the
    /// cached state if there is one, and for the reads in flight.
    /// `None` (the change's outcome is unknown) forgets an idle state
    /// instead, so the next message reads the store.
    pub(super) fn set_blocks(&mut self, conv: ConvId, blocks: Option<Blocks>) {
        self.loading.outdate(conv);
        match (blocks, self.map.get_mut(&conv)) {
            (Some(blocks), Some(state)) => state.blocks = blocks,
            (None, Some(state)) if state.inflight == 0 => self.remove(conv),
            _ => {}
        }
    }

    /// Marks a message durable (`ok`) or lost in `conv`'s state and hands
    /// back the retries that waited for it (connection, request id); wakes
    /// whoever waits for the conversation's writes to end if that was the
    /// last one in flight.
    fn release(&mut self, conv: ConvId, released: (UserId, u64, u64), ok: bool) -> Released {
        let result = self.release_one(conv, released, ok);
        if self.inflight(conv) == 0 {
            for waker in self.quiet.remove(&conv).unwrap_or_default() {
                waker.wake();
            }
        }
        result
    }

    /// Wakes `waker` once no write of `conv` is in flight.
    fn wait_quiet(&mut self, conv: ConvId, waker: &Waker) {
        super::add_waiter(self.quiet.entry(conv).or_default(), waker);
    }

    fn release_one(&mut self, conv: ConvId, released: (UserId, u64, u64), ok: bool) -> Released {
        let (from, client_msg_id, stored) = released;
        let Some(state) = self.map.get_mut(&conv) else {
            // Not cached, so nothing waited on it here.
            return Released::Unstored { waiters: Vec::new() };
        };
        state.inflight = state.inflight.saturating_sub(1);
        if ok {
            state.stored_seq = state.stored_seq.max(stored);
        }
        let entry = state.dedup.get_mut(&(from, client_msg_id));
        let (seq, timestamp_ms) = entry.as_ref().map_or((0, 0), |e| (e.seq, e.timestamp_ms));
        let waiters = entry.and_then(|e| e.waiters.take()).unwrap_or_default();
        if ok {
            return Released::Durable {
                seq,
                timestamp_ms,
                waiters,
            };
        }
        // The store refused the batch: forget the cached state so the next
        // message reloads the last durable seq. The id is forgotten even
        // while other messages keep the state cached, so that a retry is
        // sequenced anew rather than acked with a seq that was never
        // stored (for a recall: an erasure that never ran); the retries
        // that waited are told, like the original, to send again.
        state.forget_client_msg_id(from, client_msg_id);
        if state.inflight == 0 {
            self.remove(conv);
        }
        Released::Unstored { waiters }
    }

    /// Drops up to `count` cached conversations with no write in flight.
    fn evict_idle(&mut self, count: usize) {
        let idle: Vec<ConvId> = self
            .map
            .iter()
            .filter(|(_, s)| s.inflight == 0)
            .map(|(c, _)| *c)
            .take(count)
            .collect();
        for conv in idle {
            self.remove(conv);
        }
    }

    /// The highest seq of `conv` a cursor may be set to now without
    /// passing a seq that may be handed out again: the last one sequenced,
    /// unless a write of the conversation failed, in which case the seqs
    /// after the stored ones will be reused (the state reloads). `None`
    /// when not cached: then nothing is in flight and the store has all.
    fn cursor_seq(&self, conv: ConvId) -> Option<u64> {
        let state = self.map.get(&conv)?;
        Some(match state.poisoned {
            true => state.stored_seq,
            false => state.last_seq,
        })
    }

    /// Messages of `conv` sequenced and not yet durable.
    pub(super) fn inflight(&self, conv: ConvId) -> u32 {
        self.map.get(&conv).map_or(0, |s| s.inflight)
    }

    /// Forgets `conv`'s state unless writes are in flight.
    pub(super) fn forget_idle(&mut self, conv: ConvId) {
        if self.inflight(conv) == 0 {
            self.remove(conv);
        }
    }

    /// Conversations cached, for tests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

impl Shard {
    /// Why a 1:1 message (or typing hint) from `from` in `conv` is refused
    /// by a block, from the cached state: `None` if `conv` is not cached.
    pub(super) fn cached_block_refusal(&self, conv: ConvId, from: UserId) -> Option<Option<&'static str>> {
        let mut convs = self.convs.borrow_mut();
        let state = convs.get_mut(conv)?;
        Some(block_refusal(conv, state.blocks, from))
    }

    /// Whether `from` already sent `client_msg_id` in `conv` (within the
    /// dedup window of the cached state): sequencing will answer it as a
    /// retry.
    pub(super) fn seen_client_msg_id(&self, conv: ConvId, from: UserId, client_msg_id: u64) -> bool {
        client_msg_id != 0
            && self
                .convs
                .borrow_mut()
                .get_mut(conv)
                .is_some_and(|state| state.dedup.contains_key(&(from, client_msg_id)))
    }

    /// Whether `from` already sent `client_msg_id` in `conv`, within the
    /// dedup window (the cached state's, or the store's): a retry is
    /// answered with its original ack whatever changed since (the sender
    /// left the group). `false` if the state cannot be read.
    pub(super) async fn is_retry(&self, conv: ConvId, from: UserId, client_msg_id: u64) -> bool {
        if client_msg_id == 0 {
            return false;
        }
        if self.conv_cached(conv) {
            return self.seen_client_msg_id(conv, from, client_msg_id);
        }
        // Not cached: read the window from the store without caching it,
        // so that sends from non-members cannot fill the cache with groups
        // they are not in (what `may_be_member` guards). Nothing of an
        // uncached conversation is in flight, so the store has it all.
        let window = self.config.dedup_window;
        self.blocking(move |store| {
            let tail = store.conv_tail(conv, window)?;
            Ok::<_, StoreError>(
                tail.recent
                    .iter()
                    .any(|r| r.from == from && r.client_msg_id == client_msg_id),
            )
        })
        .await
        .unwrap_or(false)
    }

    /// Whether a conversation's sequence state is cached: then sequencing
    /// it does not yield.
    pub(super) fn conv_cached(&self, conv: ConvId) -> bool {
        self.convs.borrow().contains(conv)
    }

    /// Loads a conversation's sequence state from the store if not cached.
    pub(super) async fn ensure_conv(&self, conv: ConvId) -> Result<(), StoreError> {
        loop {
            let seen = {
                let mut convs = self.convs.borrow_mut();
                if convs.contains(conv) {
                    return Ok(());
                }
                convs.loading.begin(conv)
            };
            let _read = ReadGuard::new(&self.convs, ConvCache::reads, conv);
            let window = self.config.dedup_window;
            let (tail, blocks) = self
                .blocking(move |store| {
                    let tail = store.conv_tail(conv, window)?;
                    let blocks = match conv {
                        ConvId::Direct { low, high } => store.blocks_between(low, high)?,
                        ConvId::Group { .. } => Blocks::default(),
                    };
                    Ok::<_, StoreError>((tail, blocks))
                })
                .await?;
            let mut convs = self.convs.borrow_mut();
            if convs.contains(conv) {
                // Loaded by another task while we waited; theirs may be newer.
                return Ok(());
            }
            if convs.loading.changed_since(conv, seen) {
                // Loaded, written to and dropped meanwhile: `tail` may
                // predate those writes.
                continue;
            }
            if convs.map.len() >= self.config.max_cached_conversations {
                convs.evict_idle(self.config.max_cached_conversations / 8);
            }
            convs.map.insert(conv, ConvState::from_tail(tail, blocks));
            return Ok(());
        }
    }

    /// The seq a cursor of `conv` (a joiner's start, a departure's end)
    /// is set to now: the last one sequenced, messages not yet stored
    /// included, but never one that a failed write will hand out again.
    /// A cursor staged after this call is staged behind every message up
    /// to it, and if one of those fails, the commit's failure path lowers
    /// the cursor to what was stored ([`clamp_cursors`]). `None`: not
    /// cached, so nothing is in flight and the store's last seq is it.
    pub(super) fn cursor_seq(&self, conv: ConvId) -> Option<u64> {
        self.convs.borrow().cursor_seq(conv)
    }

    /// [`Shard::cursor_seq`], loading the conversation's state if needed.
    pub(super) async fn cursor_seq_loaded(&self, conv: ConvId) -> Result<u64, StoreError> {
        self.ensure_conv(conv).await?;
        Ok(self.cursor_seq(conv).unwrap_or(0))
    }

    /// The last stored sequence number of a conversation homed here: the
    /// highest seq a recipient can have been given. Seqs handed out to
    /// messages still being written are not counted: a failed write or a
    /// crash hands them out again, to other messages.
    pub async fn stored_seq(&self, conv: ConvId) -> Result<u64, StoreError> {
        self.ensure_conv(conv).await?;
        Ok(self.convs.borrow_mut().get_mut(conv).map_or(0, |s| s.stored_seq))
    }

    /// Assigns the next seq of `conv` to a message, unless it is a retry:
    /// its seq, time and the recency bucket it moves the conversation
    /// from (see [`Sequenced::New`]). Returns `None` when nothing must be
    /// written: a retry (answered here or on commit) or a store failure
    /// (answered with an error).
    pub(super) async fn sequence(
        self: &Rc<Self>,
        conv: ConvId,
        from: UserId,
        conn: ConnKey,
        request_id: u64,
        client_msg_id: u64,
    ) -> Option<(u64, u64, Option<u64>)> {
        if let Err(e) = self.ensure_conv(conv).await {
            self.reply(from, conn, store_error_frame(request_id, &e)).await;
            return None;
        }
        let outcome = {
            let mut convs = self.convs.borrow_mut();
            let state = convs.get_mut(conv)?;
            let refused = block_refusal(conv, state.blocks, from);
            assign(
                state,
                self.config.dedup_window,
                from,
                conn,
                request_id,
                client_msg_id,
                refused,
            )
        };
        match outcome {
            Sequenced::New {
                seq,
                timestamp_ms,
                moved_from,
            } => Some((seq, timestamp_ms, moved_from)),
            Sequenced::Duplicate { seq, timestamp_ms } => {
                let sent = Event::Sent {
                    user: from,
                    conn,
                    request_id,
                    client_msg_id,
                    conv,
                    seq,
                    timestamp_ms,
                    echo: None,
                };
                self.send_event(self.home_of(from), sent).await;
                None
            }
            Sequenced::Waiting => None,
            Sequenced::Refused(why) => {
                let frame = ServerFrame::error(request_id, ErrorCode::Forbidden, why);
                self.reply(from, conn, frame).await;
                None
            }
            Sequenced::Unstored => {
                self.reply(from, conn, unstored(request_id)).await;
                None
            }
            Sequenced::Exhausted => {
                tracing::error!(
                    ?conv,
                    "conversation sequence exhausted: the store holds seq u64::MAX"
                );
                let frame = ServerFrame::error(
                    request_id,
                    ErrorCode::Internal,
                    "this conversation cannot take more messages",
                );
                self.reply(from, conn, frame).await;
                None
            }
        }
    }

    /// Waits until `ops` more writes fit under `max_staged_writes` (counting
    /// those staged and those reserved by tasks between this call and
    /// their `stage`), then reserves room for them until the returned
    /// guard drops. Called before a message is sequenced or a `Sync`'s
    /// cursors are staged: a commit that is slow to come back (a stalled
    /// disk) then stops this task, and with it the connection or
    /// cross-shard queue it serves, instead of staging without end. When
    /// nothing is staged or reserved, any `ops` fits, so a request larger
    /// than the bound still goes through, alone. Safe from deadlock: the
    /// committer that makes room waits only on the writer and on event
    /// queues, whose consumers never wait (crate::mesh).
    pub async fn room_to_stage(&self, ops: usize) -> StageRoom<'_> {
        let max = self.config.max_staged_writes;
        let mut counted = false;
        poll_fn(|cx| {
            let taken = self.staged.borrow().ops.len() + self.staged_reserved.get();
            if taken == 0 || taken.saturating_add(ops) <= max {
                self.staged_reserved.set(self.staged_reserved.get() + ops);
                return Poll::Ready(());
            }
            if !counted {
                counted = true;
                self.m().staged_wait();
            }
            self.staged_room_waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await;
        StageRoom { shard: self, ops }
    }

    fn wake_room_waiters(&self) {
        for waker in self.staged_room_waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Stages a write and the effects that must follow its commit.
    pub(super) fn stage(&self, op: WriteOp, effects: impl IntoIterator<Item = Effect>) {
        {
            let mut staged = self.staged.borrow_mut();
            staged.ops.push(op);
            staged.effects.extend(effects);
        }
        if let Some(waker) = self.committer_waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Stages a receipt of `user`; `done` learns whether it was stored, and
    /// `notify` (a push for the peer) is sent once it is.
    pub fn stage_receipt(
        &self,
        user: UserId,
        conv: ConvId,
        kind: ReceiptKind,
        seq: u64,
        done: Option<futures_channel::oneshot::Sender<bool>>,
        notify: Option<(usize, Event)>,
    ) {
        let kind = match kind {
            ReceiptKind::Delivered => StoredReceiptKind::Delivered,
            ReceiptKind::Read => StoredReceiptKind::Read,
        };
        let effects = done
            .map(Effect::Done)
            .into_iter()
            .chain(notify.map(|(shard, e)| Effect::Event(shard, e)));
        self.stage(
            WriteOp::Receipt {
                user,
                conv,
                kind,
                seq,
            },
            effects,
        );
    }

    /// Whether nothing is staged or being committed (for shutdown).
    pub fn writes_idle(&self) -> bool {
        !self.committing.get() && self.staged.borrow().ops.is_empty()
    }

    /// Lets an idle committer notice that the shard is stopping.
    pub fn wake_committer(&self) {
        if let Some(waker) = self.committer_waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Commits staged writes, batch after batch, until the shard stops and
    /// nothing is left staged.
    pub async fn run_committer(self: Rc<Self>) {
        loop {
            let batch = poll_fn(|cx| {
                let mut staged = self.staged.borrow_mut();
                if staged.ops.is_empty() {
                    if self.stop.is_fired() && self.conn_count() == 0 {
                        return Poll::Ready(None);
                    }
                    *self.committer_waker.borrow_mut() = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(Some(std::mem::take(&mut *staged)))
            })
            .await;
            let Some(batch) = batch else { return };
            self.m().staged_taken(batch.ops.len());
            self.wake_room_waiters();
            self.committing.set(true);
            let committed = self.commit(batch.ops).await;
            let mut effects = batch.effects;
            if let Err(e) = &committed {
                // Every message staged carries a `Durable` effect naming its
                // conversation: the failed batch's conversations, derived
                // only on this rare path.
                let convs_written: FxHashSet<ConvId> = effects
                    .iter()
                    .filter_map(|effect| match effect {
                        Effect::Durable { conv, .. } => Some(*conv),
                        _ => None,
                    })
                    .collect();
                tracing::error!(error = %e, shard = self.index, "storage commit failed; senders get errors");
                // Messages of these conversations staged since were given
                // seqs after the lost ones: committed, they would leave a
                // hole between acknowledged messages. They fail with the
                // batch, and nothing more is sequenced in these
                // conversations until their state reloads from the store.
                let stored = self.poison(&convs_written);
                let staged = std::mem::take(&mut *self.staged.borrow_mut());
                let (mut kept, failed) = split_failed(staged, &convs_written);
                // Cursors staged at a seq from memory may pass the stored
                // ones; those past it will be handed out again, to
                // messages the cursor must not cover.
                clamp_cursors(&mut kept.ops, &stored);
                *self.staged.borrow_mut() = kept;
                effects.extend(failed);
            }
            self.settle(effects, committed.is_ok()).await;
            self.committing.set(false);
            self.settled.set(self.settled.get().wrapping_add(1));
            for waker in self.settle_waiters.take() {
                waker.wake();
            }
        }
    }

    /// Waits until every message of `conv` sequenced so far is durable or
    /// failed: woken by the commit that releases the last of them.
    pub(super) async fn conv_quiet(&self, conv: ConvId) {
        poll_fn(|cx| {
            let mut convs = self.convs.borrow_mut();
            if convs.inflight(conv) == 0 {
                return Poll::Ready(());
            }
            convs.wait_quiet(conv, cx.waker());
            Poll::Pending
        })
        .await
    }

    async fn commit(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let op_count = ops.len();
        let messages = ops.iter().filter(|op| matches!(op, WriteOp::Message(_))).count();
        let mut ops = ops;
        loop {
            let (tx, rx) = futures_channel::oneshot::channel();
            let done = Box::new(move |result: Result<(), StoreError>| {
                let _ = tx.send(result);
            });
            match self.writer.submit(ops, done) {
                Ok(()) => {
                    let result = rx
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Fjall("storage writer stopped".into())));
                    if result.is_ok() {
                        self.m().store_commit(op_count, messages, started.elapsed());
                    }
                    return result;
                }
                Err(SubmitError::Full(back)) => {
                    // The writer is saturated: wait. Meanwhile the shard
                    // stages what arrives until `max_staged_writes`, where
                    // new messages wait too (`room_to_stage`).
                    self.m().store_wait();
                    ops = back;
                    glommio::timer::sleep(WRITER_FULL_BACKOFF).await;
                }
                Err(SubmitError::Stopped(_)) => {
                    return Err(StoreError::Fjall("storage writer stopped".into()))
                }
            }
        }
    }

    /// Runs the effects of a committed (or failed) batch, in order.
    async fn settle(self: &Rc<Self>, effects: Vec<Effect>, ok: bool) {
        for effect in effects {
            match effect {
                Effect::Durable {
                    conv,
                    from,
                    client_msg_id,
                    seq,
                } => {
                    for event in self.release(conv, (from, client_msg_id, seq), ok) {
                        self.send_event(self.home_of(from), event).await;
                    }
                }
                Effect::Event(shard, event) if ok => self.send_event(shard, event).await,
                Effect::Event(
                    shard,
                    Event::Sent {
                        user,
                        conn,
                        request_id,
                        ..
                    },
                ) => {
                    let frame = encode_shared(&unstored(request_id), self.config.max_frame_bytes);
                    self.send_event(shard, Event::Reply { user, conn, frame }).await;
                }
                Effect::Event(..) => {}
                Effect::Done(tx) => {
                    let _ = tx.send(ok);
                }
            }
        }
    }

    /// Marks `convs` as having lost a write: their cached states refuse new
    /// messages until the in-flight ones are released, when they are
    /// dropped and reload the last durable seq. Returns each one's last
    /// stored seq (all are cached: the failed batch's messages are in
    /// flight), which no later write of theirs below it can change.
    fn poison(&self, convs: &FxHashSet<ConvId>) -> FxHashMap<ConvId, u64> {
        let mut cache = self.convs.borrow_mut();
        let mut stored = FxHashMap::default();
        for &conv in convs {
            if let Some(state) = cache.get_mut(conv) {
                state.poisoned = true;
                stored.insert(conv, state.stored_seq);
            }
        }
        stored
    }

    /// Marks a message durable (or failed) in its conversation's state and
    /// returns the answers owed to retries that waited for it: its ack,
    /// or the error the original request got.
    fn release(&self, conv: ConvId, message: (UserId, u64, u64), ok: bool) -> Vec<Event> {
        let (from, client_msg_id, _) = message;
        let released = self.convs.borrow_mut().release(conv, message, ok);
        match released {
            Released::Durable {
                seq,
                timestamp_ms,
                waiters,
            } => waiters
                .into_iter()
                .map(|(conn, request_id)| Event::Sent {
                    user: from,
                    conn,
                    request_id,
                    client_msg_id,
                    conv,
                    seq,
                    timestamp_ms,
                    echo: None,
                })
                .collect(),
            Released::Unstored { waiters } => waiters
                .into_iter()
                .map(|(conn, request_id)| Event::Reply {
                    user: from,
                    conn,
                    frame: encode_shared(&unstored(request_id), self.config.max_frame_bytes),
                })
                .collect(),
        }
    }
}

/// The answer to a send whose store write failed (or that came after one
/// in its conversation): not stored, send it again (protocol.md 2.8.4).
fn unstored(request_id: u64) -> ServerFrame {
    ServerFrame::error(request_id, ErrorCode::Internal, "message not stored; retry")
}

/// Why `from` may not send a new message in `conv`, if a block between
/// its two users forbids it.
fn block_refusal(conv: ConvId, blocks: Blocks, from: UserId) -> Option<&'static str> {
    let ConvId::Direct { low, .. } = conv else {
        return None;
    };
    // `blocks` is the pair (low, high); the sender comes first.
    if from == low {
        blocks.refusal()
    } else {
        blocks.reversed().refusal()
    }
}

/// Sequences one message in `state`; `refused` says why a new message may
/// not be (a retry of one sequenced before still gets its answer).
fn assign(
    state: &mut ConvState,
    window: usize,
    from: UserId,
    conn: ConnKey,
    request_id: u64,
    client_msg_id: u64,
    refused: Option<&'static str>,
) -> Sequenced {
    if client_msg_id != 0 {
        if let Some(seen) = state.dedup.get_mut(&(from, client_msg_id)) {
            return match &mut seen.waiters {
                Some(waiters) => {
                    waiters.push((conn, request_id));
                    Sequenced::Waiting
                }
                None => Sequenced::Duplicate {
                    seq: seen.seq,
                    timestamp_ms: seen.timestamp_ms,
                },
            };
        }
    }
    if let Some(why) = refused {
        return Sequenced::Refused(why);
    }
    if state.poisoned {
        return Sequenced::Unstored;
    }
    let Some(seq) = state.last_seq.checked_add(1) else {
        return Sequenced::Exhausted;
    };
    state.last_seq = seq;
    state.inflight += 1;
    let timestamp_ms = super::now_ms();
    let bucket = recency_bucket(timestamp_ms);
    let moved_from = state.bucket.filter(|&previous| previous != bucket);
    state.bucket = Some(bucket);
    if client_msg_id != 0 {
        let key = (from, client_msg_id);
        state.dedup.insert(
            key,
            Dedup {
                seq,
                timestamp_ms,
                waiters: Some(Vec::new()),
            },
        );
        state.order.push_back(key);
        trim(state, window);
    }
    Sequenced::New {
        seq,
        timestamp_ms,
        moved_from,
    }
}

/// Forgets the oldest remembered ids beyond `window`, never one whose
/// write is still in flight (its waiters must be answered).
fn trim(state: &mut ConvState, window: usize) {
    while state.order.len() > window {
        let Some(oldest) = state.order.front().copied() else {
            break;
        };
        if state.dedup.get(&oldest).is_some_and(|d| d.waiters.is_some()) {
            break;
        }
        state.order.pop_front();
        state.dedup.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_storage::{BLOCKED_BY_THEM, YOU_BLOCKED};

    fn state() -> ConvState {
        ConvState {
            last_seq: 10,
            stored_seq: 10,
            inflight: 0,
            dedup: FxHashMap::default(),
            order: VecDeque::new(),
            blocks: Blocks::default(),
            poisoned: false,
            bucket: None,
        }
    }

    const CONN: ConnKey = ConnKey {
        slot: 0,
        generation: 1,
    };

    #[test]
    fn a_read_that_straddles_a_drop_is_told_and_the_guard_forgets_it() {
        let cache = std::cell::RefCell::new(ConvCache::default());
        let conv = ConvId::direct(1, 2);
        let other = ConvId::direct(1, 3);
        // A read begins while the conversation is not cached...
        let seen = cache.borrow_mut().loading.begin(conv);
        let guard = ReadGuard::new(&cache, ConvCache::reads, conv);
        // ...another task loads it, writes seq 11 and the cache drops it.
        {
            let mut c = cache.borrow_mut();
            c.map.insert(conv, state());
            c.map.insert(other, state());
            c.get_mut(conv).unwrap().last_seq = 11;
            assert!(!c.loading.changed_since(conv, seen));
            c.evict_idle(10);
            assert_eq!(c.len(), 0);
            assert!(
                c.loading.changed_since(conv, seen),
                "the stale read must read again"
            );
            assert!(!c.loading.changed_since(other, 0), "no read of it was in flight");
        }
        drop(guard);
        assert!(cache.borrow().loading.is_empty());
    }

    #[test]
    fn a_conversation_with_writes_in_flight_is_never_evicted() {
        let mut cache = ConvCache::default();
        let busy = ConvId::direct(1, 2);
        let idle = ConvId::direct(1, 3);
        cache.map.insert(busy, state());
        cache.map.insert(idle, state());
        assign(cache.get_mut(busy).unwrap(), 4, 1, CONN, 1, 7, None);
        cache.evict_idle(10);
        assert!(cache.contains(busy));
        assert!(!cache.contains(idle));
    }

    #[test]
    fn new_messages_get_consecutive_seqs() {
        let mut s = state();
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 1, 100, None),
            Sequenced::New { seq: 11, .. }
        ));
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 2, 101, None),
            Sequenced::New { seq: 12, .. }
        ));
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 3, 0, None),
            Sequenced::New { seq: 13, .. }
        ));
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 4, 0, None),
            Sequenced::New { seq: 14, .. }
        ));
        assert_eq!(s.inflight, 4);
    }

    /// A message moves the conversation's recency bucket only when it
    /// starts a new one: the first after a load from an old bucket does,
    /// the next in the same bucket does not.
    #[test]
    fn only_a_message_in_a_new_bucket_moves_the_index() {
        let mut s = state();
        s.bucket = Some(7);
        let Sequenced::New {
            timestamp_ms,
            moved_from,
            ..
        } = assign(&mut s, 4, 1, CONN, 1, 100, None)
        else {
            panic!("sequenced");
        };
        assert_eq!(moved_from, Some(7));
        assert_eq!(s.bucket, Some(recency_bucket(timestamp_ms)));
        let Sequenced::New {
            timestamp_ms: next,
            moved_from,
            ..
        } = assign(&mut s, 4, 1, CONN, 2, 101, None)
        else {
            panic!("sequenced");
        };
        // Unless the clock crossed into the next bucket between the two.
        if recency_bucket(next) == recency_bucket(timestamp_ms) {
            assert_eq!(moved_from, None);
        }
        // A conversation with no message yet enters the index with seq 1,
        // which the store does by itself.
        let mut fresh = state();
        let Sequenced::New { moved_from, .. } = assign(&mut fresh, 4, 1, CONN, 1, 100, None) else {
            panic!("sequenced");
        };
        assert_eq!(moved_from, None);
    }

    #[test]
    fn a_sequence_at_its_end_refuses_instead_of_wrapping() {
        let mut s = state();
        s.last_seq = u64::MAX - 1;
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 1, 100, None),
            Sequenced::New { seq: u64::MAX, .. }
        ));
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 2, 101, None),
            Sequenced::Exhausted
        ));
        assert_eq!((s.last_seq, s.inflight), (u64::MAX, 1));
        // A retry of the last message still gets its answer.
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 3, 100, None),
            Sequenced::Waiting
        ));
    }

    #[test]
    fn retries_wait_then_get_the_original_seq() {
        let mut s = state();
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 1, 100, None),
            Sequenced::New { seq: 11, .. }
        ));
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 2, 100, None),
            Sequenced::Waiting
        ));
        // Another sender may reuse the same client id.
        assert!(matches!(
            assign(&mut s, 4, 2, CONN, 3, 100, None),
            Sequenced::New { seq: 12, .. }
        ));
        let entry = s.dedup.get_mut(&(1, 100)).unwrap();
        assert_eq!(entry.waiters.take().unwrap(), vec![(CONN, 2)]);
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 4, 100, None),
            Sequenced::Duplicate { seq: 11, .. }
        ));
    }

    fn message(conv: ConvId, seq: u64) -> WriteOp {
        WriteOp::Message(tern_storage::MessageWrite {
            conv,
            seq,
            from: 1,
            client_msg_id: seq,
            timestamp_ms: 0,
            frame: Arc::from(&b"m"[..]),
            inbox: tern_storage::InboxTargets::None,
            moved_from: None,
        })
    }

    fn deliver(conv: ConvId, seq: u64) -> Effect {
        Effect::Event(
            0,
            Event::Deliver {
                to: crate::mesh::Recipients::One(2),
                conv,
                seq,
                frame: Arc::from(&b"m"[..]),
                skip: None,
            },
        )
    }

    fn sent(conv: ConvId, seq: u64) -> Effect {
        Effect::Event(
            0,
            Event::Sent {
                user: 1,
                conn: CONN,
                request_id: seq,
                client_msg_id: seq,
                conv,
                seq,
                timestamp_ms: 0,
                echo: None,
            },
        )
    }

    fn durable(conv: ConvId, seq: u64) -> Effect {
        Effect::Durable {
            conv,
            from: 1,
            client_msg_id: seq,
            seq,
        }
    }

    #[test]
    fn after_a_failed_commit_later_messages_of_its_conversations_fail_too() {
        let lost = ConvId::direct(1, 2);
        let fine = ConvId::direct(1, 3);
        let (tx, _rx) = futures_channel::oneshot::channel();
        let staged = Staged {
            ops: vec![
                message(lost, 7),
                message(fine, 4),
                WriteOp::Receipt {
                    user: 2,
                    conv: lost,
                    kind: StoredReceiptKind::Read,
                    seq: 5,
                },
                WriteOp::Erase {
                    conv: lost,
                    seq: 3,
                    from: 1,
                    client_msg_id: 3,
                    timestamp_ms: 0,
                    frame: Arc::from(&b"x"[..]),
                },
            ],
            effects: vec![
                durable(lost, 7),
                deliver(lost, 7),
                sent(lost, 7),
                durable(fine, 4),
                deliver(fine, 4),
                sent(fine, 4),
                Effect::Done(tx),
                // A group's deletion notice is not a message: it stays.
                deliver(lost, super::super::NOTICE_SEQ),
            ],
        };
        let failed: FxHashSet<ConvId> = [lost].into_iter().collect();
        let (kept, gone) = split_failed(staged, &failed);
        assert_eq!(kept.ops.len(), 2);
        assert!(matches!(&kept.ops[0], WriteOp::Message(m) if m.conv == fine));
        assert!(matches!(&kept.ops[1], WriteOp::Receipt { .. }));
        let kept_seqs: Vec<_> = kept
            .effects
            .iter()
            .map(|e| match e {
                Effect::Durable { conv, .. } => (*conv, 0),
                Effect::Event(_, Event::Deliver { conv, seq, .. } | Event::Sent { conv, seq, .. }) => {
                    (*conv, *seq)
                }
                _ => (ConvId::Group { group: 0 }, 0),
            })
            .collect();
        assert_eq!(
            kept_seqs,
            vec![
                (fine, 0),
                (fine, 4),
                (fine, 4),
                (ConvId::Group { group: 0 }, 0),
                (lost, super::super::NOTICE_SEQ)
            ]
        );
        assert_eq!(gone.len(), 3);
        assert!(gone.iter().all(|e| match e {
            Effect::Durable { conv, .. } => *conv == lost,
            Effect::Event(_, Event::Deliver { conv, .. } | Event::Sent { conv, .. }) => *conv == lost,
            _ => false,
        }));
    }

    /// A joiner's cursor and a departure's end are staged at the last seq
    /// sequenced, behind messages still on their way to the disk. When
    /// those fail, their seqs are handed out again after the reload, to
    /// messages sequenced after the join (or removal): the cursors staged
    /// behind them must come down to what was stored, or the joiner would
    /// skip those messages and the departed user would get them.
    #[test]
    fn after_a_failed_commit_cursors_staged_behind_it_come_down_to_the_stored_seq() {
        let group = 9;
        let lost = ConvId::Group { group };
        let fine = ConvId::direct(1, 3);
        let mut cache = ConvCache::default();
        cache.map.insert(lost, state());
        let s = cache.get_mut(lost).unwrap();
        for (request, id) in [(1, 100), (2, 101), (3, 102)] {
            assign(s, 8, 1, CONN, request, id, None);
        }
        // 11 was stored; the batch holding 12 and 13 failed. The join
        // read 13 (all sequenced, none known lost yet).
        assert_eq!(cache.cursor_seq(lost), Some(13));
        assert!(matches!(
            cache.release(lost, (1, 100, 11), true),
            Released::Durable { seq: 11, .. }
        ));
        let receipt = |conv, seq| WriteOp::Receipt {
            user: 2,
            conv,
            kind: StoredReceiptKind::Read,
            seq,
        };
        let mut ops = vec![
            receipt(lost, 13),
            WriteOp::Departure {
                user: 4,
                group,
                start: 2,
                until: 13,
            },
            receipt(fine, 7),
            message(fine, 8),
        ];
        let mut stored = FxHashMap::default();
        stored.insert(lost, cache.get_mut(lost).unwrap().stored_seq);
        clamp_cursors(&mut ops, &stored);
        assert_eq!(ops[0], receipt(lost, 11));
        assert!(matches!(ops[1], WriteOp::Departure { until: 11, .. }));
        assert_eq!(ops[2], receipt(fine, 7), "other conversations keep theirs");
        // A cursor taken after the failure never counts the lost seqs.
        cache.get_mut(lost).unwrap().poisoned = true;
        assert_eq!(cache.cursor_seq(lost), Some(11));
        assert_eq!(cache.cursor_seq(fine), None, "not cached: the store has it all");
    }

    #[test]
    fn a_poisoned_conversation_sequences_nothing_new_but_answers_retries() {
        let mut s = state();
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 1, 100, None),
            Sequenced::New { seq: 11, .. }
        ));
        s.dedup.get_mut(&(1, 100)).unwrap().waiters = None; // durable
        s.poisoned = true;
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 2, 101, None),
            Sequenced::Unstored
        ));
        assert_eq!(s.last_seq, 11, "no seq handed out");
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 3, 100, None),
            Sequenced::Duplicate { seq: 11, .. }
        ));
    }

    #[test]
    fn a_failed_write_is_forgotten_so_its_retry_is_sequenced_anew() {
        let mut s = state();
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 1, 100, None),
            Sequenced::New { seq: 11, .. }
        ));
        // Another message keeps the state busy while the first one's
        // batch fails.
        assert!(matches!(
            assign(&mut s, 4, 2, CONN, 2, 200, None),
            Sequenced::New { seq: 12, .. }
        ));
        s.forget_client_msg_id(1, 100);
        assert!(!s.order.contains(&(1, 100)));
        // Not acked with seq 11, which was never stored.
        assert!(matches!(
            assign(&mut s, 4, 1, CONN, 3, 100, None),
            Sequenced::New { seq: 13, .. }
        ));
    }

    #[test]
    fn a_block_refuses_new_messages_both_ways_but_not_retries_of_old_ones() {
        let conv = ConvId::direct(3, 7);
        let three_blocks = Blocks {
            first_blocks_second: true,
            second_blocks_first: false,
        };
        assert_eq!(block_refusal(conv, three_blocks, 3), Some(YOU_BLOCKED));
        assert_eq!(block_refusal(conv, three_blocks, 7), Some(BLOCKED_BY_THEM));
        let seven_blocks = Blocks {
            first_blocks_second: false,
            second_blocks_first: true,
        };
        assert_eq!(block_refusal(conv, seven_blocks, 3), Some(BLOCKED_BY_THEM));
        assert_eq!(block_refusal(conv, seven_blocks, 7), Some(YOU_BLOCKED));
        assert_eq!(block_refusal(conv, Blocks::default(), 3), None);
        assert_eq!(block_refusal(ConvId::Group { group: 3 }, three_blocks, 3), None);

        let mut s = state();
        assert!(matches!(
            assign(&mut s, 4, 7, CONN, 1, 100, None),
            Sequenced::New { seq: 11, .. }
        ));
        // Sequenced before the block: its retries still get the answer.
        assert!(matches!(
            assign(&mut s, 4, 7, CONN, 2, 100, Some(BLOCKED_BY_THEM)),
            Sequenced::Waiting
        ));
        s.dedup.get_mut(&(7, 100)).unwrap().waiters = None;
        assert!(matches!(
            assign(&mut s, 4, 7, CONN, 3, 100, Some(BLOCKED_BY_THEM)),
            Sequenced::Duplicate { seq: 11, .. }
        ));
        assert!(matches!(
            assign(&mut s, 4, 7, CONN, 4, 101, Some(BLOCKED_BY_THEM)),
            Sequenced::Refused(BLOCKED_BY_THEM)
        ));
        assert_eq!((s.last_seq, s.inflight), (11, 1), "a refusal takes no seq");
    }

    /// Counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wait_for_a_quiet_conversation_is_woken_by_its_last_release_only() {
        let wakes = |w: &Arc<CountingWaker>| w.0.load(std::sync::atomic::Ordering::SeqCst);
        let (conv, other) = (ConvId::direct(1, 2), ConvId::direct(1, 3));
        let mut cache = ConvCache::default();
        for c in [conv, other] {
            cache.map.insert(c, state());
            let s = cache.get_mut(c).unwrap();
            assign(s, 8, 1, CONN, 1, 100, None);
            assign(s, 8, 1, CONN, 2, 101, None);
        }
        let counter = Arc::new(CountingWaker(Default::default()));
        let waker = Waker::from(counter.clone());
        cache.wait_quiet(conv, &waker);
        cache.wait_quiet(conv, &waker); // polled again: still one waiter
        assert_eq!(cache.quiet[&conv].len(), 1);
        cache.release(other, (1, 100, 11), true);
        cache.release(other, (1, 101, 12), true);
        assert_eq!(wakes(&counter), 0, "another conversation's release");
        cache.release(conv, (1, 100, 11), true);
        assert_eq!(wakes(&counter), 0, "one write still in flight");
        // The last one failed: the state is dropped, and the wait is over too.
        cache.release(conv, (1, 101, 12), false);
        assert_eq!(wakes(&counter), 1);
        assert!(cache.quiet.is_empty(), "nothing left waiting");
    }

    #[test]
    fn retries_that_waited_on_a_lost_write_are_answered_and_its_id_forgotten() {
        let conv = ConvId::direct(1, 2);
        let mut cache = ConvCache::default();
        cache.map.insert(conv, state());
        let s = cache.get_mut(conv).unwrap();
        assert!(matches!(
            assign(s, 8, 1, CONN, 1, 100, None),
            Sequenced::New { seq: 11, .. }
        ));
        assert!(matches!(
            assign(s, 8, 1, CONN, 2, 101, None),
            Sequenced::New { seq: 12, .. }
        ));
        // Two retries of the first arrive while its batch is in flight.
        assert!(matches!(assign(s, 8, 1, CONN, 3, 100, None), Sequenced::Waiting));
        assert!(matches!(assign(s, 8, 1, CONN, 4, 100, None), Sequenced::Waiting));
        assert_eq!(
            cache.release(conv, (1, 100, 11), false),
            Released::Unstored {
                waiters: vec![(CONN, 3), (CONN, 4)]
            }
        );
        // Still cached (101 is in flight), but a retry of 100 is sequenced
        // anew rather than acked with seq 11, which was never stored.
        let s = cache.get_mut(conv).unwrap();
        assert!(!s.dedup.contains_key(&(1, 100)));
        assert_eq!(
            cache.release(conv, (1, 101, 12), false),
            Released::Unstored { waiters: vec![] }
        );
        assert!(
            !cache.contains(conv),
            "dropped: the next message reloads the durable seq"
        );

        // A durable write's waiters get its ack.
        cache.map.insert(conv, state());
        let s = cache.get_mut(conv).unwrap();
        assign(s, 8, 1, CONN, 1, 200, None);
        assign(s, 8, 1, CONN, 2, 200, None);
        match cache.release(conv, (1, 200, 11), true) {
            Released::Durable { seq, waiters, .. } => assert_eq!((seq, waiters), (11, vec![(CONN, 2)])),
            other => panic!("{other:?}"),
        }
        assert!(cache.contains(conv));
    }

    #[test]
    fn window_forgets_oldest_durable_ids_only() {
        let mut s = state();
        for id in 1..=3 {
            assign(&mut s, 2, 1, CONN, id, id, None);
        }
        // All three still in flight: none may be forgotten.
        assert_eq!(s.dedup.len(), 3);
        for entry in s.dedup.values_mut() {
            entry.waiters = None;
        }
        assign(&mut s, 2, 1, CONN, 4, 4, None);
        assert_eq!(s.dedup.len(), 2);
        assert!(!s.dedup.contains_key(&(1, 1)));
    }
}
