//! Reading back what the store holds for a user: sync, history, and the
//! conversation list.
//!
//! [`sync`] is the seam between stored and live delivery. The session first
//! starts *holding* live messages, then streams from the store everything
//! the user has not acknowledged: the inbox (1:1 and small-group messages)
//! and, for each group, the group history after the user's cursor (large
//! groups are read-diffused). Per conversation it remembers the highest seq
//! sent; held live messages at or below it are dropped, the rest are sent,
//! and only when nothing is held any more does the session go live, with
//! no yield in between. Because a message is delivered live only after it
//! is durable, anything not held was in the store when it was scanned: no
//! gap and no duplicate at the seam.

use std::rc::Rc;

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_proto::limits::{MEMBERS_PAGE_LIMIT_MAX, PAGE_LIMIT_MAX};
use tern_proto::{
    decode_server, ArchivedChatMessage, ArchivedConversationSummary, ChatMessage, ContentKind, ConvId,
    ConversationSummary, Cursor, FrameHeader, GroupId, ServerBody, ServerFrame, UserId, HEADER_LEN,
};
use tern_storage::{recency_bucket, Departure, RecentEntry, Store, StoreError, StoredFrame};

use crate::mesh::ConnKey;
use crate::outbox::Outbox;
use crate::shard::Shard;

/// Catch-up passes before a session that keeps overflowing its hold
/// buffer is told to reconnect.
const SYNC_PASSES_MAX: usize = 4;

/// Why a sync did not complete.
pub enum SyncError {
    /// The connection closed meanwhile.
    Closed,
    /// Live traffic outran the catch-up too often.
    TooBusy,
    /// The store failed.
    Store(StoreError),
}

pub use crate::shard::Floors;
use crate::shard::NOTICE_SEQ;

/// Catches a session up; returns how many messages were streamed.
pub async fn sync(
    shard: &Rc<Shard>,
    user: UserId,
    key: ConnKey,
    outbox: &Outbox,
    cursors: Vec<Cursor>,
) -> Result<u64, SyncError> {
    shard.begin_sync(key);
    let mut floors = Floors::default();
    for cursor in cursors {
        let floor = floors.entry(cursor.conv).or_insert(0);
        *floor = (*floor).max(cursor.seq);
    }
    let pace = outbox.limit_bytes() / 2;
    // A presented cursor is the client's own delivered receipt, stored
    // once per conversation, and every presented cursor is a floor. Only
    // conversations that hold, or held, messages for the user are stored:
    // a 1:1 of theirs with at least one message, or a group they are in,
    // or one they left and still have a cursor or inbox entries for (only
    // a cursor can acknowledge those). Any other cursor can match no
    // message, and storing it would let a client write a receipt row for
    // every user and group there is (SYNC_CURSORS_MAX per Sync, Sync
    // after Sync): its rows must grow only with its conversations. The
    // memory checks first, the store's below.
    let candidates: Vec<(ConvId, u64)> = floors
        .iter()
        .filter(|(&conv, &seq)| seq > 0 && may_exist(&shard.store, user, conv))
        .map(|(&conv, &seq)| (conv, seq))
        .collect();
    // The first inbox page, the user's groups and those checks in one
    // store call: each hand-off to the blocking pool costs the shard two
    // context switches, and most syncs (a resume with nothing new) need
    // nothing more. The same call caps each cursor at its conversation's
    // last stored seq, as a receipt is capped (protocol.md 2.8.5): a
    // client can hold only what is stored, and a cursor stored past the
    // last seq would hide the messages still to come from every later
    // sync of the user.
    let page = shard.config.sync_page;
    let (first_page, groups, stored, departures) = shard
        .blocking(move |store| {
            let mut stored = Vec::with_capacity(candidates.len());
            for (conv, seq) in candidates {
                if !store.has_conversation(user, conv)? {
                    continue;
                }
                stored.push((conv, seq.min(store.conv_tail(conv, 0)?.last_seq)));
            }
            let (inbox, groups) = (store.inbox_after(user, None, page)?, store.user_groups(user)?);
            let departures = departures_with_state(store, user)?;
            Ok((inbox, groups, stored, departures))
        })
        .await
        .map_err(SyncError::Store)?;
    let departures = owed_departures(shard, user, &floors, departures).await?;
    // Nothing yields between the reservation and the staging; a Sync with
    // nothing to store does not wait for room.
    let room = match stored.is_empty() {
        true => None,
        false => Some(shard.room_to_stage(stored.len()).await),
    };
    for (conv, seq) in stored.into_iter().filter(|&(_, seq)| seq > 0) {
        shard.stage_receipt(user, conv, tern_proto::ReceiptKind::Delivered, seq, None, None);
    }
    drop(room);
    let (mut first_page, mut groups) = (Some(first_page), Some(groups));
    let mut based = Based::default();
    // Before the inbox: a group left and joined again has its earlier
    // membership's messages first, and they are below the inbox's.
    let mut streamed = stream_departures(shard, outbox, pace, &mut floors, departures).await?;
    for _ in 0..SYNC_PASSES_MAX {
        let scan = &mut Scan {
            floors: &mut floors,
            based: &mut based,
        };
        streamed += stream_inbox(shard, user, outbox, pace, scan, first_page.take()).await?;
        streamed += stream_groups(shard, user, outbox, pace, scan, groups.take()).await?;
        loop {
            let (held, overflowed) = shard.take_held(key);
            if overflowed {
                // Only notices were kept: send them now (each raises its
                // conversation's floor past anything the rescan finds).
                for (conv, seq, frame) in held {
                    send_if_new(outbox, pace, &mut floors, conv, seq, &frame).await?;
                }
                break;
            }
            if held.is_empty() {
                // No await since `take_held`: nothing can slip in between.
                // The floors go along, to drop deliveries of messages the
                // scan already sent that are still on their way here.
                shard.go_live(key, std::mem::take(&mut floors));
                return Ok(streamed);
            }
            for (conv, seq, frame) in held {
                // `SyncDone` counts messages; a notice is not one.
                if send_if_new(outbox, pace, &mut floors, conv, seq, &frame).await? && seq != NOTICE_SEQ {
                    streamed += 1;
                }
            }
        }
    }
    Err(SyncError::TooBusy)
}

/// A departure record of the user and what its group says of it now.
struct DepartureState {
    departure: Departure,
    /// The group exists (neither deleted nor being purged).
    exists: bool,
    /// The user is a member of the group again.
    member: bool,
    /// The user's stored delivered cursor for the group.
    delivered: u64,
}

/// The user's departure records with what deciding whether they are
/// acknowledged needs (read on the blocking pool, with the sync's first
/// reads). At most `max_departures_per_user`, each group's read once.
/// Whether a group exists is read from its record: the store's memory
/// forgets a deletion once its purge is done (`Store::group_exists`),
/// and a record of a group deleted and purged since must go too.
fn departures_with_state(store: &Store, user: UserId) -> Result<Vec<DepartureState>, StoreError> {
    let departures = store.departures(user)?;
    let mut out = Vec::with_capacity(departures.len());
    let mut last: Option<(GroupId, bool, bool, u64)> = None;
    for departure in departures {
        let group = departure.group;
        let (exists, member, delivered) = match last {
            Some((g, exists, member, delivered)) if g == group => (exists, member, delivered),
            _ => {
                let conv = ConvId::Group { group };
                (
                    store.group(group)?.is_some(),
                    store.is_member(group, user)?,
                    store.receipts(user, conv)?.0,
                )
            }
        };
        last = Some((group, exists, member, delivered));
        out.push(DepartureState {
            departure,
            exists,
            member,
            delivered,
        });
    }
    Ok(out)
}

/// The departures still owed to the user, in stream order, each from
/// where the user's acknowledgements leave it; drops from the store the
/// ones that are not: those of a deleted group, and those the user
/// acknowledged, by a presented cursor (in `floors`) at or past their
/// end, or, for the latest departure from a group they have not joined
/// again, by their stored delivered cursor (once they left, only their
/// own cursors move it; a join moves it too, so not after one).
async fn owed_departures(
    shard: &Rc<Shard>,
    user: UserId,
    floors: &Floors,
    departures: Vec<DepartureState>,
) -> Result<Vec<Departure>, SyncError> {
    let mut owed = Vec::with_capacity(departures.len());
    let mut gone = Vec::new();
    let mut iter = departures.into_iter().peekable();
    while let Some(state) = iter.next() {
        let departure = state.departure;
        let group = departure.group;
        let conv = ConvId::Group { group };
        let latest = iter.peek().is_none_or(|next| next.departure.group != group);
        let presented = floors.get(&conv).copied().unwrap_or(0);
        let mut owed_from = departure.start;
        if latest && !state.member {
            owed_from = owed_from.max(state.delivered);
        }
        // Deleted since the read: its purge may have begun.
        let exists = state.exists && shard.store.group_exists(group);
        if departure.until <= owed_from.max(presented) || !exists {
            gone.push(departure);
        } else {
            owed.push(Departure {
                start: owed_from,
                ..departure
            });
        }
    }
    if !gone.is_empty() {
        shard
            .blocking(move |store| store.drop_departures(user, &gone))
            .await
            .map_err(SyncError::Store)?;
    }
    Ok(owed)
}

/// Streams each departure's messages from its group's history, after the
/// higher of its start and what the session already holds, up to its end.
async fn stream_departures(
    shard: &Rc<Shard>,
    outbox: &Outbox,
    pace: usize,
    floors: &mut Floors,
    departures: Vec<Departure>,
) -> Result<u64, SyncError> {
    let mut streamed = 0;
    for departure in departures {
        let conv = ConvId::Group {
            group: departure.group,
        };
        let floor = floors.entry(conv).or_insert(0);
        *floor = (*floor).max(departure.start);
        let until = Some(departure.until.saturating_add(1));
        streamed += stream_range(shard, outbox, pace, floors, conv, until).await?;
    }
    Ok(streamed)
}

/// Whether `conv` can hold messages for `user`: a 1:1 as [`in_direct`]
/// says, or an existing group. Checks memory only.
fn may_exist(store: &Store, user: UserId, conv: ConvId) -> bool {
    match conv {
        ConvId::Direct { .. } => in_direct(store, user, conv),
        ConvId::Group { group } => store.group_exists(group),
    }
}

/// Whether `conv` is a 1:1 conversation of `user` with an existing user,
/// spelled as [`ConvId::direct`] spells it (any other spelling names no
/// stored conversation). Checks memory only.
pub(crate) fn in_direct(store: &Store, user: UserId, conv: ConvId) -> bool {
    match conv {
        ConvId::Direct { low, high } => {
            conv == ConvId::direct(low, high)
                && conv.peer_of(user).is_some_and(|peer| store.user_exists(peer))
        }
        ConvId::Group { .. } => false,
    }
}

/// Sends a stored or held message unless the session already has it.
async fn send_if_new(
    outbox: &Outbox,
    pace: usize,
    floors: &mut Floors,
    conv: ConvId,
    seq: u64,
    frame: &[u8],
) -> Result<bool, SyncError> {
    let floor = floors.entry(conv).or_insert(0);
    if seq <= *floor {
        return Ok(false);
    }
    // Pace to the client instead of overflowing its queue.
    if !outbox.wait_room(pace).await {
        return Err(SyncError::Closed);
    }
    outbox.push_encoded(frame).map_err(|_| SyncError::Closed)?;
    *floors.entry(conv).or_insert(0) = seq;
    Ok(true)
}

/// Streams the user's inbox; `first_page`, when given, is its first page
/// (`inbox_after(user, None, sync_page)`) already read.
async fn stream_inbox(
    shard: &Rc<Shard>,
    user: UserId,
    outbox: &Outbox,
    pace: usize,
    scan: &mut Scan<'_>,
    mut first_page: Option<Vec<StoredFrame>>,
) -> Result<u64, SyncError> {
    let page = shard.config.sync_page;
    let mut after: Option<(ConvId, u64)> = None;
    let mut streamed = 0;
    loop {
        let entries = match first_page.take() {
            Some(entries) => entries,
            None => shard
                .blocking(move |store| store.inbox_after(user, after, page))
                .await
                .map_err(SyncError::Store)?,
        };
        for entry in &entries {
            if let ConvId::Group { group } = entry.conv {
                // A group that was above the write-diffusion threshold for a
                // while has messages only in its history: send those first,
                // so that its seqs still go out in order.
                let base = group_base(shard, user, entry.conv, scan).await?;
                if entry.seq > base.saturating_add(1) {
                    // Bounded by an inbox entry written for the user as a
                    // member, and starting past their delivered cursor
                    // (set when they joined): within a membership, unless
                    // the user left and joined again meanwhile, which the
                    // membership check sees.
                    let range = History {
                        conv: entry.conv,
                        until: Some(entry.seq),
                        member: Some((group, user)),
                    };
                    streamed += stream_history(shard, outbox, pace, scan.floors, range).await?;
                }
            }
            if send_if_new(outbox, pace, scan.floors, entry.conv, entry.seq, &entry.frame).await? {
                streamed += 1;
            }
        }
        match entries.last() {
            Some(last) if entries.len() == page => after = Some((last.conv, last.seq)),
            _ => return Ok(streamed),
        }
    }
}

/// What a catch-up pass carries from one conversation to the next.
struct Scan<'a> {
    /// The highest seq sent (or presented by the client) per conversation.
    floors: &'a mut Floors,
    /// The groups whose stored delivered cursor is already in `floors`.
    based: &'a mut Based,
}

/// Groups whose stored delivered cursor was read during this sync.
type Based = rustc_hash::FxHashSet<ConvId>;

/// Where the catch-up of group `conv` starts: the higher of the user's
/// stored delivered cursor and what was presented or already sent. A
/// presented cursor can only raise the start, never lower it: the stored
/// cursor is where the user's membership began (a join sets it to the
/// group's last seq), and a lower cursor must not replay what came before
/// it. Read once per group and sync.
async fn group_base(
    shard: &Rc<Shard>,
    user: UserId,
    conv: ConvId,
    scan: &mut Scan<'_>,
) -> Result<u64, SyncError> {
    if !scan.based.contains(&conv) {
        let (delivered, _) = shard
            .blocking(move |store| store.receipts(user, conv))
            .await
            .map_err(SyncError::Store)?;
        scan.based.insert(conv);
        let floor = scan.floors.entry(conv).or_insert(0);
        *floor = (*floor).max(delivered);
    }
    Ok(scan.floors.get(&conv).copied().unwrap_or(0))
}

/// A range of a group's history to stream: after its floor, up to (not
/// including) `until` if given; with `member` (group and user), only what
/// was sequenced while the user was a member.
struct History {
    conv: ConvId,
    until: Option<u64>,
    member: Option<(GroupId, UserId)>,
}

/// Where a group's catch-up stands with the user's membership, read with
/// each page of its history.
enum Membership {
    /// A member, with no removal since the catch-up began, and the user's
    /// stored delivered cursor now. That cursor is read with each page
    /// because it moves when the user joins again (a join sets it to the
    /// group's last seq): a removal whose record a presented cursor
    /// acknowledged (and dropped at the catch-up's start), then a join
    /// from another device, leaves no record to tell the catch-up that
    /// the messages between were not the user's.
    Member { delivered: u64 },
    /// No longer a member, and nothing recorded of the membership's end
    /// (the group was deleted, or the user holds their most departures).
    Gone,
    /// A kick, ban or leave since the catch-up began: its departure
    /// records (what the membership still owes past the stream's
    /// position), and the user's delivered cursor if they joined again
    /// since (the join set it to the group's last seq then).
    Ended {
        departures: Vec<Departure>,
        rejoined_at: Option<u64>,
    },
}

/// Reads [`Membership`] for a catch-up of `group` at `from`. Departure
/// records of earlier memberships end at or below the catch-up's start (a
/// join raises the user's cursor past them), so a record ending at or past
/// `from - 1` was written since, unless `settled` (already streamed here)
/// lists it.
fn membership_at(
    store: &Store,
    (group, user): (GroupId, UserId),
    from: u64,
    settled: &[(u64, u64)],
) -> Result<Membership, StoreError> {
    let member = store.is_member(group, user)?;
    let departures: Vec<Departure> = store
        .departures_from(user, group)?
        .into_iter()
        .filter(|d| d.until.saturating_add(1) >= from && !settled.contains(&(d.start, d.until)))
        .collect();
    Ok(match (member, departures.is_empty()) {
        (true, true) => Membership::Member {
            delivered: store.receipts(user, ConvId::Group { group })?.0,
        },
        (false, true) => Membership::Gone,
        (_, false) => Membership::Ended {
            departures,
            rejoined_at: match member {
                true => Some(store.receipts(user, ConvId::Group { group })?.0),
                false => None,
            },
        },
    })
}

/// Sends the history `range` describes. With `member`, each page is read
/// together with the membership and follows it: a kick, ban or leave
/// writes its departure record with the membership change, before its
/// `Ok`, so a page read while neither has happened holds only messages of
/// the membership. Once one has, the page is dropped and the record's
/// range (the rest of the membership) is streamed in its place; then the
/// stream ends, or, if the user joined again, goes on from their new
/// cursor, skipping what was sent while they were out.
async fn stream_history(
    shard: &Rc<Shard>,
    outbox: &Outbox,
    pace: usize,
    floors: &mut Floors,
    range: History,
) -> Result<u64, SyncError> {
    let History { conv, until, member } = range;
    let Some(member) = member else {
        return stream_range(shard, outbox, pace, floors, conv, until).await;
    };
    let page = shard.config.sync_page;
    let mut streamed = 0;
    // As in `stream_range`.
    let Some(mut from) = floors.get(&conv).copied().unwrap_or(0).checked_add(1) else {
        return Ok(streamed);
    };
    let mut settled: Vec<(u64, u64)> = Vec::new();
    loop {
        let settled_now = settled.clone();
        let (entries, membership) = shard
            .blocking(move |store| {
                let entries = store.history(conv, from, true, page)?;
                let membership = membership_at(store, member, from, &settled_now)?;
                Ok((entries, membership))
            })
            .await
            .map_err(SyncError::Store)?;
        match membership {
            // Acknowledged by a device of the user, or below a join.
            Membership::Member { delivered } => {
                let floor = floors.entry(conv).or_insert(0);
                *floor = (*floor).max(delivered);
            }
            Membership::Gone => return Ok(streamed),
            Membership::Ended {
                departures,
                rejoined_at,
            } => {
                settled.extend(departures.iter().map(|d| (d.start, d.until)));
                streamed += stream_departures(shard, outbox, pace, floors, departures).await?;
                let Some(joined) = rejoined_at else {
                    return Ok(streamed);
                };
                let floor = floors.entry(conv).or_insert(0);
                *floor = (*floor).max(joined);
                match floor.checked_add(1) {
                    Some(next) => from = from.max(next),
                    None => return Ok(streamed),
                }
                continue;
            }
        }
        let (sent, next) = send_page(outbox, pace, floors, (conv, until), (&entries, from, page)).await?;
        streamed += sent;
        match next {
            Some(next) => from = next,
            None => return Ok(streamed),
        }
    }
}

/// Sends `conv`'s history after its floor, up to (not including) `until`
/// if given.
async fn stream_range(
    shard: &Rc<Shard>,
    outbox: &Outbox,
    pace: usize,
    floors: &mut Floors,
    conv: ConvId,
    until: Option<u64>,
) -> Result<u64, SyncError> {
    let page = shard.config.sync_page;
    let mut streamed = 0;
    // A floor of u64::MAX (a cursor or receipt a client set that high)
    // leaves nothing to send. Each page starts after the last one, so the
    // scan moves forward whatever the floors say.
    let Some(mut from) = floors.get(&conv).copied().unwrap_or(0).checked_add(1) else {
        return Ok(streamed);
    };
    loop {
        let entries = shard
            .blocking(move |store| store.history(conv, from, true, page))
            .await
            .map_err(SyncError::Store)?;
        let (sent, next) = send_page(outbox, pace, floors, (conv, until), (&entries, from, page)).await?;
        streamed += sent;
        match next {
            Some(next) => from = next,
            None => return Ok(streamed),
        }
    }
}

/// Sends one page of history read from `from` (up to `until`, exclusive);
/// returns how many went out and where the next page starts (`None`: the
/// range is done).
async fn send_page(
    outbox: &Outbox,
    pace: usize,
    floors: &mut Floors,
    (conv, until): (ConvId, Option<u64>),
    (entries, from, page): (&[StoredFrame], u64, usize),
) -> Result<(u64, Option<u64>), SyncError> {
    let mut streamed = 0;
    for entry in entries {
        if until.is_some_and(|until| entry.seq >= until) {
            return Ok((streamed, None));
        }
        if send_if_new(outbox, pace, floors, conv, entry.seq, &entry.frame).await? {
            streamed += 1;
        }
    }
    let next = match entries.last().and_then(|last| last.seq.checked_add(1)) {
        Some(next) if entries.len() >= page && next > from => Some(next),
        _ => None,
    };
    Ok((streamed, next))
}

/// Sends, for each of the user's groups, its history after the user's
/// cursor: all of it for read-diffused groups, and whatever the inbox did
/// not hold for the others. `groups`, when given, is the user's group list
/// already read.
async fn stream_groups(
    shard: &Rc<Shard>,
    user: UserId,
    outbox: &Outbox,
    pace: usize,
    scan: &mut Scan<'_>,
    groups: Option<Vec<GroupId>>,
) -> Result<u64, SyncError> {
    let groups = match groups {
        Some(groups) => groups,
        None => {
            let mut groups = shard
                .blocking(move |store| store.user_groups(user))
                .await
                .map_err(SyncError::Store)?;
            // Read again on a later pass: a group the user was removed
            // from since the first is missing from the list, though an
            // overflowed hold buffer may have dropped some of its
            // messages, and a later one held since may have gone out.
            // Every group this catch-up touched is visited again; the
            // membership check streams what a removal's record still owes
            // and nothing else.
            let listed: rustc_hash::FxHashSet<GroupId> = groups.iter().copied().collect();
            let mut touched: Vec<GroupId> = scan
                .based
                .iter()
                .filter_map(|conv| match conv {
                    ConvId::Group { group } if !listed.contains(group) => Some(*group),
                    _ => None,
                })
                .collect();
            touched.sort_unstable();
            groups.extend(touched);
            groups
        }
    };
    let mut streamed = 0;
    for group in groups {
        if !shard.store.group_exists(group) {
            // Deleted since the list was read: its notice is on its way.
            continue;
        }
        let conv = ConvId::Group { group };
        group_base(shard, user, conv, scan).await?;
        let range = History {
            conv,
            until: None,
            member: Some((group, user)),
        };
        streamed += stream_history(shard, outbox, pace, scan.floors, range).await?;
    }
    Ok(streamed)
}

/// Turns a stored push frame back into the message it carries.
fn decode_stored(stored: &StoredFrame) -> Option<ChatMessage> {
    decode_stored_frame(&stored.frame)
}

/// The message in a stored `Message` frame (header included), if it is one.
pub(crate) fn decode_stored_frame(frame: &[u8]) -> Option<ChatMessage> {
    let mut aligned = AlignedVec::<16>::with_capacity(frame.len());
    aligned.extend_from_slice(frame);
    let header: [u8; HEADER_LEN] = aligned.get(..HEADER_LEN)?.try_into().ok()?;
    let header = FrameHeader::parse(header, u32::MAX).ok()?;
    let body = aligned.get(HEADER_LEN..HEADER_LEN + header.body_len as usize)?;
    let archived = decode_server(body).ok()?;
    match rkyv::deserialize::<ServerFrame, BoxedError>(archived).ok()?.body {
        ServerBody::Message(message) => Some(message),
        _ => None,
    }
}

/// Whether `user` may read `conv`.
fn may_read(store: &Store, user: UserId, conv: ConvId) -> Result<bool, StoreError> {
    match conv {
        ConvId::Direct { .. } => Ok(in_direct(store, user, conv)),
        ConvId::Group { group } => store.is_member(group, user),
    }
}

/// A page of history, or `None` if `user` may not read `conv`.
pub fn history(
    store: &Store,
    user: UserId,
    conv: ConvId,
    from_seq: u64,
    forward: bool,
    limit: u32,
    max_frame_bytes: u32,
) -> Result<Option<Vec<ChatMessage>>, StoreError> {
    if !may_read(store, user, conv)? {
        return Ok(None);
    }
    let limit = limit.clamp(1, PAGE_LIMIT_MAX) as usize;
    let stored = store.history(conv, from_seq, forward, limit)?;
    let mut page: Vec<ChatMessage> = stored.iter().filter_map(decode_stored).collect();
    fit_in_frame(&mut page, max_frame_bytes, archived_message_bound);
    Ok(Some(page))
}

/// Bytes of a page reply kept free of its items: the 112-byte server root,
/// the list's header and alignment padding, with room to spare.
const PAGE_OVERHEAD_BYTES: usize = 256;

/// Bytes one page reply may spend on its items.
pub(crate) fn page_budget(max_frame_bytes: u32) -> usize {
    (max_frame_bytes as usize).saturating_sub(PAGE_OVERHEAD_BYTES)
}

/// How many items of at most `item_bytes` each (8 for an id, 16 for a
/// `GroupMember`, a `Friend` plus the longest name for `FriendRequests`
/// and `FriendsPage`) one page of a user listing (`GroupMembersPage`,
/// `GroupInvitesPage`, `GroupBansPage`, `MyInvitesPage`, `BlocksPage`,
/// `FriendRequestsPage`, `FriendsPage`) holds: the asked-for `limit`
/// clamped to 1..=[`MEMBERS_PAGE_LIMIT_MAX`], and no more than fit in one
/// frame.
pub(crate) fn ids_per_page(limit: u32, max_frame_bytes: u32, item_bytes: usize) -> usize {
    let asked = limit.clamp(1, MEMBERS_PAGE_LIMIT_MAX) as usize;
    asked.min(page_budget(max_frame_bytes) / item_bytes.max(1)).max(1)
}

/// An upper bound of the bytes `message` takes in an archived page: its
/// fixed part plus its out-of-line body, URL and MIME type, each with up
/// to 8 bytes of alignment.
fn archived_message_bound(message: &ChatMessage) -> usize {
    let media = match &message.content.kind {
        ContentKind::Text | ContentKind::Recall { .. } | ContentKind::Recalled => 0,
        ContentKind::Media { url, mime, .. } => url.len() + mime.len() + 16,
    };
    std::mem::size_of::<ArchivedChatMessage>() + message.content.body.len() + 8 + media
}

/// Cuts `items` to the longest prefix whose bounds fit in one frame of
/// `max_frame_bytes`, so that a page is never too large to send: 200
/// messages of 16 KiB would be 3 MiB. A page may therefore hold fewer
/// items than asked for; clients page on from its last item, and only an
/// empty page ends the list. The first item always stays: a message's
/// content, media URL and MIME type included, is kept
/// `FRAME_ENVELOPE_BYTES` below `max_frame_bytes` (`Config::content_limits`).
fn fit_in_frame<T>(items: &mut Vec<T>, max_frame_bytes: u32, bound: impl Fn(&T) -> usize) {
    let budget = page_budget(max_frame_bytes);
    let mut used = 0usize;
    let fits = items
        .iter()
        .position(|item| {
            used = used.saturating_add(bound(item));
            used > budget
        })
        .unwrap_or(items.len());
    items.truncate(fits.max(1));
}

/// Most 1:1 conversations of one recency bucket that a list orders by
/// their newest message. A page reads the newest message of every
/// conversation in the buckets it touches (ten minutes each,
/// `tern_storage::RECENCY_BUCKET_MS`), so this bounds its reads: a
/// bucket holding more (a user written to by more than 16 new peers a
/// second for ten minutes) lists its groups first, newest first, then its
/// 1:1 conversations in index order (by peer id), and reads only those
/// on the page (protocol.md 2.8.7 says so).
const BUCKET_SORT_MAX: usize = 10_000;

/// The conversation list of `user`, most recent first.
///
/// The 1:1 conversations come from the store's recency index, newest
/// bucket first; the groups (at most `max_groups_per_user`, one read
/// each) are merged in by their newest message. Buckets wholly before
/// `offset` are counted, not read, so a page costs `offset + limit`
/// index keys, one read per conversation of the buckets it shows, and a
/// few reads per listed conversation (its cursors and last message).
pub fn conversations(
    store: &Store,
    user: UserId,
    offset: u32,
    limit: u32,
    max_frame_bytes: u32,
) -> Result<Vec<ConversationSummary>, StoreError> {
    conversations_sorting(store, user, offset, limit, max_frame_bytes, BUCKET_SORT_MAX)
}

/// Orders conversations of one bucket: newest message first, then by
/// conversation (1:1 before groups, by ids), so that equal times list
/// the same way on every page.
fn newest_first(a: &(u64, ConvId), b: &(u64, ConvId)) -> std::cmp::Ordering {
    let rank = |conv: ConvId| match conv {
        ConvId::Direct { low, high } => (0u8, low, high),
        ConvId::Group { group } => (1u8, group, 0),
    };
    b.0.cmp(&a.0).then_with(|| rank(a.1).cmp(&rank(b.1)))
}

/// The positions `offset..offset + limit` of a list, filled as its items
/// are counted in order.
struct Window {
    offset: usize,
    end: usize,
    at: usize,
    page: Vec<ConvId>,
}

impl Window {
    fn push(&mut self, conv: ConvId) {
        if self.at >= self.offset && self.at < self.end {
            self.page.push(conv);
        }
        self.at += 1;
    }

    fn full(&self) -> bool {
        self.at >= self.end
    }
}

/// The conversations at `offset..offset + limit` of `user`'s list, most
/// recent first (see [`BUCKET_SORT_MAX`] for the exception).
fn list_window(
    store: &Store,
    user: UserId,
    offset: usize,
    limit: usize,
    sort_max: usize,
) -> Result<Vec<ConvId>, StoreError> {
    let mut groups = Vec::new();
    for group in store.user_groups(user)? {
        let conv = ConvId::Group { group };
        groups.push((store.last_message_time(conv)?.unwrap_or(0), conv));
    }
    groups.sort_by(newest_first);
    let mut groups = groups.into_iter().peekable();
    let mut window = Window {
        offset,
        end: offset.saturating_add(limit),
        at: 0,
        page: Vec::with_capacity(limit),
    };
    let mut entries = store.recent_conversations(user).peekable();
    while !window.full() {
        let Some(first) = entries.next().transpose()? else {
            break;
        };
        let bucket = first.bucket;
        // Groups newer than the bucket go before it.
        while let Some((_, conv)) = groups.next_if(|&(time, _)| recency_bucket(time) > bucket) {
            window.push(conv);
        }
        let mut items: Vec<(u64, ConvId)> = Vec::new();
        while let Some(group) = groups.next_if(|&(time, _)| recency_bucket(time) == bucket) {
            items.push(group);
        }
        let in_bucket = |e: &Result<RecentEntry, StoreError>| e.as_ref().is_ok_and(|e| e.bucket == bucket);
        let mut directs = vec![first.conv];
        while directs.len() <= sort_max {
            match entries.next_if(in_bucket) {
                Some(entry) => directs.push(entry?.conv),
                None => break,
            }
        }
        if directs.len() > sort_max {
            // Too many to read for the order: groups, then index order.
            for (_, conv) in items {
                window.push(conv);
            }
            for conv in directs {
                window.push(conv);
            }
            while !window.full() {
                match entries.next_if(in_bucket) {
                    Some(entry) => window.push(entry?.conv),
                    None => break,
                }
            }
            continue;
        }
        let count = items.len() + directs.len();
        if window.at.saturating_add(count) <= window.offset {
            // Wholly before the page: counted, not read.
            window.at += count;
            continue;
        }
        for conv in directs {
            items.push((store.last_message_time(conv)?.unwrap_or(0), conv));
        }
        items.sort_by(newest_first);
        for (_, conv) in items {
            window.push(conv);
        }
    }
    // Groups older than every 1:1 conversation.
    while !window.full() {
        match groups.next() {
            Some((_, conv)) => window.push(conv),
            None => break,
        }
    }
    Ok(window.page)
}

/// [`conversations`] ordering at most `sort_max` conversations of a
/// bucket by time.
fn conversations_sorting(
    store: &Store,
    user: UserId,
    offset: u32,
    limit: u32,
    max_frame_bytes: u32,
    sort_max: usize,
) -> Result<Vec<ConversationSummary>, StoreError> {
    let limit = limit.clamp(1, PAGE_LIMIT_MAX) as usize;
    let listed = list_window(store, user, offset as usize, limit, sort_max)?;
    let mut page = Vec::with_capacity(listed.len());
    for conv in listed {
        let last = store.last_message(conv)?;
        let (_, read) = store.receipts(user, conv)?;
        let (peer_delivered, peer_read) = match conv.peer_of(user) {
            Some(peer) => store.receipts(peer, conv)?,
            None => (0, 0),
        };
        let last_seq = last.as_ref().map_or(0, |m| m.seq);
        page.push(ConversationSummary {
            conv,
            last_seq,
            unread: last_seq.saturating_sub(read),
            last_message: last.as_ref().and_then(decode_stored),
            // Receipts and `Sync` cursors are capped when they arrive,
            // but a store written before `Sync` cursors were may hold
            // one up to u64::MAX: the peer's cursors never claim more
            // than was sent.
            peer_delivered: peer_delivered.min(last_seq),
            peer_read: peer_read.min(last_seq),
        });
    }
    fit_in_frame(&mut page, max_frame_bytes, |summary| {
        std::mem::size_of::<ArchivedConversationSummary>()
            + summary.last_message.as_ref().map_or(0, archived_message_bound)
    });
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{encode_server, Content};
    use tern_storage::RECENCY_BUCKET_MS;

    fn message(seq: u64, content: Content) -> ChatMessage {
        ChatMessage {
            conv: ConvId::Group { group: 7 },
            seq,
            from: 3,
            client_msg_id: seq,
            timestamp_ms: 1_700_000_000_000,
            content,
        }
    }

    /// The bound must never undercount: whatever the mix of sizes, a page
    /// cut by `fit_in_frame` encodes within the frame limit.
    #[test]
    fn a_fitted_page_always_encodes_within_the_frame() {
        let media = |n: usize| Content {
            kind: ContentKind::Media {
                url: "u".repeat(n % 2048),
                mime: "m".repeat(n % 128),
                size: n as u64,
            },
            body: vec![b'c'; n % 300],
        };
        for max_frame_bytes in [1024u32, 4096, 65_536] {
            for size in [0usize, 1, 7, 9, 100, 511, 512] {
                let mut page: Vec<ChatMessage> = (1..=200)
                    .map(|seq| {
                        let n = size + seq as usize;
                        let content = if seq % 3 == 0 {
                            media(n)
                        } else {
                            Content::text("t".repeat(n.min(512)))
                        };
                        message(seq, content)
                    })
                    .filter(|m| archived_message_bound(m) + PAGE_OVERHEAD_BYTES <= max_frame_bytes as usize)
                    .collect();
                fit_in_frame(&mut page, max_frame_bytes, archived_message_bound);
                assert!(!page.is_empty());
                let frame = ServerFrame {
                    request_id: u64::MAX,
                    body: ServerBody::HistoryPage {
                        conv: ConvId::Group { group: 7 },
                        messages: page,
                    },
                };
                let mut out = AlignedVec::new();
                encode_server(&frame, &mut out, max_frame_bytes)
                    .unwrap_or_else(|e| panic!("{max_frame_bytes} / {size}: {e}"));
            }
        }
    }

    /// A store where user 1 has a 1:1 with each of users 2..=`peers`+1,
    /// the conversation with user `n` holding one message at time `n`
    /// (so the most recent is the highest id); user 1 read up to it in the
    /// odd ones and each peer delivered it.
    fn busy_user(peers: u64) -> (tempfile::TempDir, Store) {
        busy_user_every(peers, 1)
    }

    /// [`busy_user`] with the message of user `n` at time `n * spacing_ms`.
    fn busy_user_every(peers: u64, spacing_ms: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = tern_storage::StoreOptions {
            fsync: false,
            ..tern_storage::StoreOptions::default()
        };
        let store = Store::open(dir.path(), opts).expect("store");
        let mut ops = Vec::new();
        for peer in 2..peers + 2 {
            let conv = ConvId::direct(1, peer);
            let mut m = message(1, Content::text(format!("hi from {peer}")));
            (m.conv, m.from, m.timestamp_ms) = (conv, peer, peer * spacing_ms);
            let mut frame = AlignedVec::new();
            let push = ServerFrame {
                request_id: 0,
                body: ServerBody::Message(m),
            };
            encode_server(&push, &mut frame, u32::MAX).expect("encode");
            ops.push(tern_storage::WriteOp::Message(tern_storage::MessageWrite {
                conv,
                seq: 1,
                from: peer,
                client_msg_id: 1,
                timestamp_ms: peer * spacing_ms,
                frame: frame.as_slice().into(),
                inbox: tern_storage::InboxTargets::One(1),
                moved_from: None,
            }));
            let receipt = |user, kind| tern_storage::WriteOp::Receipt {
                user,
                conv,
                kind,
                seq: 1,
            };
            ops.push(receipt(peer, tern_storage::ReceiptKind::Delivered));
            if peer % 2 == 1 {
                ops.push(receipt(1, tern_storage::ReceiptKind::Read));
            }
        }
        store.apply(&ops, false).expect("apply");
        (dir, store)
    }

    #[test]
    fn a_conversation_list_is_most_recent_first_with_cursors_and_pages() {
        let (_dir, store) = busy_user(30);
        let page = conversations(&store, 1, 0, 10, 65_536).expect("first page");
        let peers: Vec<u64> = page.iter().map(|s| s.conv.peer_of(1).unwrap_or(0)).collect();
        assert_eq!(peers, (22..=31).rev().collect::<Vec<_>>());
        for summary in &page {
            let peer = summary.conv.peer_of(1).unwrap_or(0);
            assert_eq!(summary.last_seq, 1);
            assert_eq!(summary.unread, u64::from(peer % 2 == 0), "peer {peer}");
            assert_eq!((summary.peer_delivered, summary.peer_read), (1, 0));
            let last = summary.last_message.as_ref().expect("last message");
            assert_eq!(last.content.body, format!("hi from {peer}").into_bytes());
        }
        let rest = conversations(&store, 1, 25, 200, 65_536).expect("last page");
        let peers: Vec<u64> = rest.iter().map(|s| s.conv.peer_of(1).unwrap_or(0)).collect();
        assert_eq!(peers, (2..=6).rev().collect::<Vec<_>>());
        assert!(conversations(&store, 1, 30, 10, 65_536)
            .expect("past the end")
            .is_empty());
        assert!(conversations(&store, 99, 0, 10, 65_536)
            .expect("nobody")
            .is_empty());
    }

    /// A peer's cursor stored past the last message (as a `Sync` cursor
    /// was stored before they were capped) is shown as the last message.
    #[test]
    fn a_peers_cursors_never_pass_the_last_seq() {
        let (_dir, store) = busy_user(3);
        let conv = ConvId::direct(1, 2);
        let receipt = tern_storage::WriteOp::Receipt {
            user: 2,
            conv,
            kind: tern_storage::ReceiptKind::Read,
            seq: u64::MAX,
        };
        store.apply(&[receipt], false).expect("apply");
        let page = conversations(&store, 1, 0, 10, 65_536).expect("page");
        let summary = page.iter().find(|s| s.conv == conv).expect("listed");
        assert_eq!(
            (summary.last_seq, summary.peer_delivered, summary.peer_read),
            (1, 1, 1)
        );
    }

    /// Stores message `seq` of `conv` from `from` at `time`, as the
    /// engine would (a 1:1 message moves the recency index when its
    /// bucket differs from the previous one's).
    fn send_at(store: &Store, conv: ConvId, seq: u64, from: UserId, time: u64, moved_from: Option<u64>) {
        let mut m = message(seq, Content::text(format!("#{seq} at {time}")));
        (m.conv, m.from, m.timestamp_ms) = (conv, from, time);
        let mut frame = AlignedVec::new();
        let push = ServerFrame {
            request_id: 0,
            body: ServerBody::Message(m),
        };
        encode_server(&push, &mut frame, u32::MAX).expect("encode");
        let write = tern_storage::MessageWrite {
            conv,
            seq,
            from,
            client_msg_id: seq,
            timestamp_ms: time,
            frame: frame.as_slice().into(),
            inbox: tern_storage::InboxTargets::None,
            moved_from,
        };
        store
            .apply(&[tern_storage::WriteOp::Message(write)], false)
            .expect("apply");
    }

    fn listed(store: &Store, offset: u32, limit: u32, sort_max: usize) -> Vec<ConvId> {
        conversations_sorting(store, 1, offset, limit, 1 << 20, sort_max)
            .expect("list")
            .iter()
            .map(|s| s.conv)
            .collect()
    }

    /// Every page of `size` from the start, joined.
    fn paged(store: &Store, size: u32, sort_max: usize) -> Vec<ConvId> {
        let mut all = Vec::new();
        loop {
            let page = listed(store, all.len() as u32, size, sort_max);
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    /// 12,000 conversations, one a minute: the newest (highest ids) come
    /// first, groups are merged in by time, and pages join up to the
    /// whole list, newest first, without duplicates or gaps.
    #[test]
    fn the_newest_conversations_come_first_however_many_there_are() {
        const PEERS: u64 = 12_000;
        let (_dir, store) = busy_user_every(PEERS, 60_000);
        let user = store.register("busy", b"password1").expect("register");
        assert_eq!(user, 1, "busy_user's conversations are user 1's");
        let newest = store.create_group(1, "newest").expect("group");
        let middle = store.create_group(1, "middle").expect("group");
        let quiet = store.create_group(1, "quiet").expect("group");
        let (newest, middle, quiet) = (
            ConvId::Group { group: newest },
            ConvId::Group { group: middle },
            ConvId::Group { group: quiet },
        );
        send_at(&store, newest, 1, 1, u64::MAX / 2, None);
        // Between the conversations with users 101 and 100, in their bucket.
        send_at(&store, middle, 1, 1, 100 * 60_000 + 30_000, None);
        let direct = |peer: u64| ConvId::direct(1, peer);
        let mut expected = vec![newest];
        expected.extend((101..=PEERS + 1).rev().map(direct));
        expected.push(middle);
        expected.extend((2..=100).rev().map(direct));
        expected.push(quiet);
        assert_eq!(listed(&store, 0, 3, BUCKET_SORT_MAX), expected[..3]);
        assert_eq!(
            listed(&store, 11_900, 5, BUCKET_SORT_MAX),
            expected[11_900..11_905]
        );
        assert_eq!(paged(&store, 200, BUCKET_SORT_MAX), expected);

        // A new message moves an old conversation to the top, and the
        // old bucket no longer lists it.
        let old = direct(50);
        send_at(
            &store,
            old,
            2,
            50,
            u64::MAX / 2 + 1,
            Some(recency_bucket(50 * 60_000)),
        );
        let mut moved = vec![old];
        moved.extend(expected.iter().filter(|&&c| c != old));
        assert_eq!(paged(&store, 200, BUCKET_SORT_MAX), moved);
    }

    /// A bucket with more conversations than are sorted lists its groups,
    /// then its 1:1 conversations in peer order; pages still join up.
    #[test]
    fn an_overfull_bucket_is_listed_in_index_order() {
        let (_dir, store) = busy_user_every(30, 1);
        store.register("busy", b"password1").expect("register");
        let group = store.create_group(1, "g").expect("group");
        let group = ConvId::Group { group };
        send_at(&store, group, 1, 1, 5, None);
        // One conversation in a newer bucket, sorted as usual.
        let newer = ConvId::direct(1, 40);
        send_at(&store, newer, 1, 40, RECENCY_BUCKET_MS, None);
        let mut expected = vec![newer, group];
        expected.extend((2..=31).map(|peer| ConvId::direct(1, peer)));
        assert_eq!(paged(&store, 7, 8), expected);
        // Sorted when the bound allows.
        let sorted = paged(&store, 7, 100);
        assert_eq!(sorted[..2], [newer, ConvId::direct(1, 31)]);
        assert_eq!(sorted.len(), expected.len());
        // Equal times (the group's and user 5's): 1:1 first.
        let direct = |peer| ConvId::direct(1, peer);
        assert_eq!(sorted[27..], [direct(5), group, direct(4), direct(3), direct(2)]);
    }

    /// Not a test: prints how long one conversation list of a user with
    /// 5,000 conversations takes (`cargo test --release -p tern-engine
    /// --lib -- --ignored conversation_list_timing --nocapture`).
    #[test]
    #[ignore]
    fn conversation_list_timing() {
        let (_dir, store) = busy_user(5_000);
        let mut times = Vec::new();
        for _ in 0..11 {
            let start = std::time::Instant::now();
            let page = conversations(&store, 1, 0, 50, 65_536).expect("list");
            times.push(start.elapsed());
            assert_eq!(page.len(), 50);
        }
        times.sort();
        eprintln!(
            "conversations(5,000, first 50): median {:?}, min {:?}, max {:?}",
            times[5], times[0], times[10]
        );
    }

    #[test]
    fn fitting_keeps_the_longest_prefix_and_at_least_one_item() {
        let mut items = vec![100usize, 200, 300, 400];
        fit_in_frame(&mut items, (PAGE_OVERHEAD_BYTES + 600) as u32, |n| *n);
        assert_eq!(items, [100, 200, 300]);
        let mut huge = vec![10_000usize, 1];
        fit_in_frame(&mut huge, 1024, |n| *n);
        assert_eq!(
            huge,
            [10_000],
            "the first item stays; the outbox refuses it if it cannot be sent"
        );
        let mut none: Vec<usize> = Vec::new();
        fit_in_frame(&mut none, 1024, |n| *n);
        assert!(none.is_empty());
    }
}
