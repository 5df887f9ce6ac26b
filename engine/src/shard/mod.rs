//! One shard: the state it owns and the work it does for other shards.
//!
//! A shard is one glommio executor pinned to one core. It owns, with no
//! lock: the connections it serves (every one belongs to a user homed here,
//! see [`crate::conn`]), the sessions of each of its users and whether each
//! is synced ([`Delivery`]), the sequence state of the conversations homed
//! here ([`commit`]), and the cached member lists of the groups homed here
//! ([`groups`]). Other shards reach this state only through the
//! [`crate::mesh`] queues: [`Shard::handle_request`] serves work for
//! conversations and groups owned here, [`Shard::handle_event`] applies
//! results for users owned here.

mod accounts;
mod blocks;
mod commit;
mod deletion;
mod groups;
mod loads;
mod presence;
mod recall;
mod receipts;
mod typing;

pub use accounts::ACCOUNT_DELETED;
use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{SystemTime, UNIX_EPOCH};

use glommio::channels::shared_channel::ConnectedSender;
use glommio::{GlommioError, ResourceType};
use rkyv::util::AlignedVec;
use rustc_hash::{FxHashMap, FxHashSet};
use slab::Slab;
use tern_proto::session::Refusal;
use tern_proto::{
    encode_server, shard_of, ChatMessage, ContentKind, ConvId, ErrorCode, ServerBody, ServerFrame, UserId,
};
use tern_storage::WriterHandle;
use tern_storage::{InboxTargets, MessageWrite, Store, StoreError, WriteOp};

use crate::config::Config;
use crate::conn::{Heard, Parked};
use crate::mesh::{ConnKey, Event, Recipients, Request};
use crate::metrics::{Metrics, ShardMetrics};
use crate::outbox::Outbox;
use crate::park::ParkSet;
use crate::stop::StopSignal;

use commit::{ConvCache, Effect, Staged};
use groups::GroupCache;

/// A connection of a user homed on this shard.
struct ConnEntry {
    generation: u32,
    user: UserId,
    /// The socket; parking moves it to a new descriptor, resuming keeps it.
    fd: Cell<RawFd>,
    link: RefCell<Link>,
    delivery: RefCell<Delivery>,
    /// The first bytes of the session token it logged in with or was
    /// issued (tokens are random): a `LoginToken` with the same token at
    /// the session limit replaces it ([`Shard::add_conn`]).
    token_tag: u64,
}

/// The session token a login presents to [`Shard::add_conn`].
#[derive(Debug, Clone, Copy)]
pub struct SessionToken {
    /// [`ConnEntry::token_tag`] of `token`.
    tag: u64,
    /// Whether the client presented it (`LoginToken`: a device resuming)
    /// rather than being issued it now.
    presented: bool,
}

impl SessionToken {
    pub fn new(token: &[u8], presented: bool) -> SessionToken {
        let mut first = [0u8; 8];
        let n = token.len().min(8);
        first[..n].copy_from_slice(&token[..n]);
        SessionToken {
            tag: u64::from_le_bytes(first),
            presented,
        }
    }
}

/// How the shard reaches a connection.
enum Link {
    /// Its tasks run; frames for it go to its queue.
    Live(Rc<Outbox>),
    /// Idle with no task (see [`crate::park`]); resumed by anything sent.
    Parked(Box<Parked>),
}

impl ConnEntry {
    /// The connection's outbound queue, resuming the session first if it
    /// is parked: whatever is pushed then wakes it.
    fn outbox(&self) -> Rc<Outbox> {
        let mut link = self.link.borrow_mut();
        let outbox = match &*link {
            Link::Live(outbox) => return outbox.clone(),
            Link::Parked(parked) => crate::conn::new_outbox(parked.shard()),
        };
        if let Link::Parked(parked) = std::mem::replace(&mut *link, Link::Live(outbox.clone())) {
            crate::conn::resume(*parked, outbox.clone());
        }
        outbox
    }

    /// Whether the connection is on its way out (a parked one is not).
    fn is_closing(&self) -> bool {
        match &*self.link.borrow() {
            Link::Live(outbox) => outbox.is_closing(),
            Link::Parked(_) => false,
        }
    }

    /// When a parked session passes its idle timeout; `None` if live.
    fn parked_deadline_ms(&self) -> Option<u64> {
        match &*self.link.borrow() {
            Link::Parked(parked) => Some(parked.idle_deadline_ms()),
            Link::Live(_) => None,
        }
    }

    /// Resumes the session if it is parked and `due` says so of its idle
    /// deadline.
    fn resume_if_parked(&self, due: impl FnOnce(u64) -> bool) {
        if self.parked_deadline_ms().is_some_and(due) {
            self.outbox();
        }
    }
}

/// Whether a session receives messages yet.
enum Delivery {
    /// Logged in, not synced: messages wait in the inbox.
    Waiting,
    /// Catching up: live messages are held here until the catch-up ends.
    /// `held_bytes` counts their frames against `outbound_queue_bytes`.
    Syncing {
        held: Vec<Held>,
        held_bytes: u32,
        overflowed: bool,
    },
    /// Synced: messages are pushed as they come. `floors` holds, per
    /// conversation, the highest seq the catch-up sent from the store: a
    /// message can be durable (so the scan saw it) while its delivery is
    /// still on its way here, and must then be dropped, not sent twice.
    /// Deliveries of a conversation arrive in seq order, so an entry is
    /// removed by the first delivery above it.
    Live { floors: Option<Box<Floors>> },
}

/// The highest seq sent per conversation during a catch-up.
pub type Floors = FxHashMap<ConvId, u64>;

/// A message that arrived live while its session was catching up.
pub type Held = (ConvId, u64, Encoded);

/// The `seq` a conversation's *closing notice* travels with on the
/// delivery path (today: `GroupDeleted`): above every message's, so it
/// passes every floor and, once sent, raises the conversation's floor
/// past any message of it a catch-up could still find. It reaches every
/// session: held in order behind a catch-up's messages (and kept when
/// the hold buffer overflows), pushed at once to a session not syncing.
pub const NOTICE_SEQ: u64 = u64::MAX;

/// The state and queues of one shard.
pub struct Shard {
    pub index: usize,
    pub shards: usize,
    pub config: Arc<Config>,
    pub store: Store,
    pub stop: StopSignal,
    conns: RefCell<Slab<ConnEntry>>,
    next_generation: Cell<u32>,
    sessions: RefCell<FxHashMap<UserId, Vec<ConnKey>>>,
    convs: RefCell<ConvCache>,
    groups: RefCell<GroupCache>,
    /// Joins waiting for their group's permit, applied together by the
    /// first of them to find the queue idle.
    join_queues: RefCell<FxHashMap<u64, groups::JoinQueue>>,
    /// Groups whose sequencing a membership change (a join batch, a leave,
    /// kick or ban) holds still ([`groups`]), each with
    /// the sends waiting for it to lift (at most one per connection task
    /// and request queue consumer).
    send_fences: RefCell<FxHashMap<u64, Vec<Waker>>>,
    /// One permit: held by a change between two users whose conversation
    /// is homed here (a block, a friendship's end) from its store write to
    /// its answer, and by a push from one of them to the other while it
    /// looks at the store and queues ([`blocks`]).
    pair_changes: glommio::sync::Semaphore,
    /// Users homed here whose presence is not announced yet ([`presence`]).
    announcing: RefCell<presence::Announcing>,
    /// Presence notices waiting for `pair_changes` ([`presence`]).
    pair_queue: RefCell<presence::PairQueue>,
    /// One permit: held by a group purge for each step ([`deletion`]), so
    /// however many purges there are, one blocking thread at a time does
    /// that work and the others stay free for logins and requests.
    purge_steps: glommio::sync::Semaphore,
    /// Queue ends to other shards, dropped at shutdown so that the peers'
    /// consumer tasks end (`Rc` so a send in flight keeps its end alive).
    requests_out: RefCell<Vec<Option<Rc<ConnectedSender<Request>>>>>,
    events_out: RefCell<Vec<Option<Rc<ConnectedSender<Event>>>>>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    staged: RefCell<Staged>,
    /// Tasks waiting for the staged writes to drop below
    /// `max_staged_writes` (at most one per connection task and request
    /// queue consumer); woken when the committer takes a batch.
    staged_room_waiters: RefCell<Vec<Waker>>,
    /// Writes that tasks have reserved room for and not yet staged.
    staged_reserved: Cell<usize>,
    committer_waker: RefCell<Option<Waker>>,
    committing: Cell<bool>,
    /// Batches the committer has settled (all their effects run), for
    /// waiting until a conversation's last writes are out ([`deletion`]).
    settled: Cell<u64>,
    /// Tasks waiting for the batch being committed to settle (at most one
    /// per group deletion in progress); woken as `settled` moves.
    settle_waiters: RefCell<Vec<Waker>>,
    /// Where idle sessions park; `None` when parking is off (or the epoll
    /// set could not be made, which only costs memory).
    parking: Option<ParkSet>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An encoded frame, shared by every session, shard and store write it
/// goes to. Writing needs no alignment, so plain bytes will do.
pub type Encoded = Arc<[u8]>;

thread_local! {
    /// The shard's reused encoding buffer: each shared frame costs one
    /// allocation (its `Encoded`), not a buffer and a copy.
    static ENCODE_SCRATCH: RefCell<AlignedVec> = RefCell::new(AlignedVec::new());
}

/// Encodes a frame into a shareable buffer.
pub fn encode_shared(frame: &ServerFrame, max_frame_bytes: u32) -> Encoded {
    ENCODE_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        if let Err(e) = encode_server(frame, &mut scratch, max_frame_bytes) {
            tracing::error!(error = %e, "server built an unencodable frame");
        }
        let encoded = Encoded::from(scratch.as_slice());
        if scratch.capacity() > 64 * 1024 {
            // One huge frame should not pin its buffer for the shard's life.
            *scratch = AlignedVec::new();
        }
        encoded
    })
}

/// Writes a message stages: itself, and for a recall the erasure of the
/// recalled message's content too.
fn staged_writes(content: &tern_proto::Content) -> usize {
    match content.kind {
        ContentKind::Recall { .. } => 2,
        _ => 1,
    }
}

/// The error answer for a store failure.
pub fn store_error_frame(request_id: u64, error: &StoreError) -> ServerFrame {
    let (code, message) = match error {
        StoreError::UsernameTaken => (ErrorCode::UsernameTaken, "username is taken".to_owned()),
        StoreError::AuthFailed => (
            ErrorCode::AuthFailed,
            "wrong username, password or token".to_owned(),
        ),
        StoreError::NotFound => (ErrorCode::NotFound, "no such user or group".to_owned()),
        StoreError::InvalidArgument(m) => (ErrorCode::InvalidArgument, (*m).to_owned()),
        StoreError::LimitExceeded(m) => (ErrorCode::LimitExceeded, (*m).to_owned()),
        StoreError::Forbidden(m) => (ErrorCode::Forbidden, (*m).to_owned()),
        other => {
            tracing::error!(error = %other, "store failure");
            (
                ErrorCode::Internal,
                "internal storage error; retry later".to_owned(),
            )
        }
    };
    ServerFrame::error(request_id, code, message)
}

/// Adds `waker` to `waiters` unless it is there already: a task polled
/// again before its wake must not be listed twice.
fn add_waiter(waiters: &mut Vec<Waker>, waker: &Waker) {
    if !waiters.iter().any(|w| w.will_wake(waker)) {
        waiters.push(waker.clone());
    }
}

fn refusal(code: ErrorCode, message: &'static str) -> Refusal {
    Refusal {
        code,
        message,
        close: false,
    }
}

impl Shard {
    /// A shard with its outgoing queue ends (already connected) and the
    /// storage writer's handle.
    pub fn new(
        index: usize,
        config: Arc<Config>,
        store: Store,
        requests_out: Vec<Option<ConnectedSender<Request>>>,
        events_out: Vec<Option<ConnectedSender<Event>>>,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> Shard {
        let parking = config.parks_after().and_then(|_| match ParkSet::new(index) {
            Ok(set) => Some(set),
            Err(error) => {
                tracing::warn!(shard = index, %error, "idle sessions will not park");
                None
            }
        });
        Shard {
            index,
            shards: config.shards,
            config,
            store,
            stop: StopSignal::default(),
            conns: RefCell::new(Slab::new()),
            next_generation: Cell::new(0),
            sessions: RefCell::new(FxHashMap::default()),
            convs: RefCell::new(ConvCache::default()),
            groups: RefCell::new(GroupCache::default()),
            join_queues: RefCell::new(FxHashMap::default()),
            send_fences: RefCell::new(FxHashMap::default()),
            pair_changes: glommio::sync::Semaphore::new(1),
            announcing: RefCell::new(presence::Announcing::default()),
            pair_queue: RefCell::new(presence::PairQueue::default()),
            purge_steps: glommio::sync::Semaphore::new(1),
            requests_out: RefCell::new(requests_out.into_iter().map(|tx| tx.map(Rc::new)).collect()),
            events_out: RefCell::new(events_out.into_iter().map(|tx| tx.map(Rc::new)).collect()),
            writer,
            metrics,
            staged: RefCell::new(Staged::default()),
            staged_room_waiters: RefCell::new(Vec::new()),
            staged_reserved: Cell::new(0),
            committer_waker: RefCell::new(None),
            committing: Cell::new(false),
            settled: Cell::new(0),
            settle_waiters: RefCell::new(Vec::new()),
            parking,
        }
    }

    /// The home shard of a user, group or conversation key.
    /// This shard's counters.
    #[inline]
    pub fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.index)
    }

    /// Every shard's counters (outboxes keep a handle).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn home_of(&self, key: u64) -> usize {
        shard_of(key, self.shards)
    }

    /// Runs a store operation on the executor's blocking thread pool, so
    /// that disk reads and password hashing never stall the reactor.
    pub async fn blocking<R, F>(&self, f: F) -> R
    where
        F: FnOnce(&Store) -> R + Send + 'static,
        R: Send + 'static,
    {
        let store = self.store.clone();
        glommio::executor().spawn_blocking(move || f(&store)).await
    }

    /// Registers a connection of `user`, logged in with `token`. Returns
    /// its key and whether it is the user's first live session here.
    ///
    /// At `max_sessions_per_user` it is refused (`LimitExceeded`), but
    /// sessions already closing do not count (up to as many again), and a
    /// `LoginToken` whose token a live session logged in with replaces that
    /// session, which gets `Disconnect(LimitExceeded)`: the same device
    /// reconnecting while its old connection, dead on the network it left,
    /// waits out its idle timeout. A login that issues a token never
    /// replaces a session.
    pub fn add_conn(
        &self,
        user: UserId,
        fd: RawFd,
        outbox: Rc<Outbox>,
        token: SessionToken,
    ) -> Result<(ConnKey, bool), Refusal> {
        let mut sessions = self.sessions.borrow_mut();
        let list = sessions.entry(user).or_default();
        if list.len() >= self.config.max_sessions_per_user {
            self.make_room(list, token)?;
        }
        let generation = self.next_generation.get().wrapping_add(1);
        self.next_generation.set(generation);
        let entry = ConnEntry {
            generation,
            user,
            fd: Cell::new(fd),
            link: RefCell::new(Link::Live(outbox)),
            delivery: RefCell::new(Delivery::Waiting),
            token_tag: token.tag,
        };
        let slot = self.conns.borrow_mut().insert(entry);
        let key = ConnKey {
            slot: slot as u32,
            generation,
        };
        list.push(key);
        Ok((key, list.len() == 1))
    }

    /// Records that session `key` now holds `token` (reissued by
    /// `LogoutOthers`), so that the device can resume it at the limit.
    pub fn retag_session(&self, key: ConnKey, token: SessionToken) {
        let mut conns = self.conns.borrow_mut();
        if let Some(entry) = conns
            .get_mut(key.slot as usize)
            .filter(|e| e.generation == key.generation)
        {
            entry.token_tag = token.tag;
        }
    }

    /// Makes room for one more session of a user whose sessions `keys`
    /// fill `max_sessions_per_user` (see [`Shard::add_conn`]), or refuses.
    fn make_room(&self, keys: &[ConnKey], token: SessionToken) -> Result<(), Refusal> {
        // Closing sessions stay listed until their writer gives up on the
        // socket (`write_timeout`, a dead peer): at most as many closing as
        // open, so what one user's sessions hold stays bounded.
        let max = self.config.max_sessions_per_user;
        if keys.len() >= max.saturating_mul(2) {
            return Err(refusal(
                ErrorCode::LimitExceeded,
                "too many sessions of this user are still closing; try again shortly",
            ));
        }
        let conns = self.conns.borrow();
        let mut open = keys
            .iter()
            .filter_map(|key| {
                conns
                    .get(key.slot as usize)
                    .filter(|e| e.generation == key.generation)
            })
            .filter(|entry| !entry.is_closing());
        if open.clone().count() < max {
            return Ok(());
        }
        let replaced = token
            .presented
            .then(|| open.find(|entry| entry.token_tag == token.tag));
        let Some(entry) = replaced.flatten() else {
            return Err(refusal(
                ErrorCode::LimitExceeded,
                "too many simultaneous sessions for this user",
            ));
        };
        entry.outbox().kill(
            ErrorCode::LimitExceeded,
            "replaced by a newer connection with this session's token",
            0,
        );
        self.m().session_replaced();
        Ok(())
    }

    /// Forgets a connection. Returns whether it was the user's last session.
    pub fn remove_conn(&self, key: ConnKey) -> bool {
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get(key.slot as usize) else {
            return false;
        };
        if entry.generation != key.generation {
            return false;
        }
        let user = entry.user;
        conns.remove(key.slot as usize);
        let mut sessions = self.sessions.borrow_mut();
        let Some(list) = sessions.get_mut(&user) else {
            return false;
        };
        list.retain(|k| *k != key);
        if list.is_empty() {
            sessions.remove(&user);
            return true;
        }
        false
    }

    /// This shard's parked-session set, if sessions park.
    pub fn park_set(&self) -> Option<&ParkSet> {
        self.parking.as_ref()
    }

    /// Parks connection `key`, whose tasks have ended, on socket `fd`.
    /// Gives the session back if it cannot park (no park set, the epoll
    /// set is full, or the connection is unknown).
    pub fn park(&self, key: ConnKey, fd: RawFd, parked: Box<Parked>) -> Result<(), Box<Parked>> {
        let Some(set) = &self.parking else {
            return Err(parked);
        };
        let conns = self.conns.borrow();
        let Some(entry) = conns
            .get(key.slot as usize)
            .filter(|e| e.generation == key.generation)
        else {
            return Err(parked);
        };
        if let Err(error) = set.watch(fd, key) {
            tracing::debug!(%error, "cannot park a session");
            return Err(parked);
        }
        entry.fd.set(fd);
        *entry.link.borrow_mut() = Link::Parked(parked);
        self.m().session_parked();
        Ok(())
    }

    /// Serves a parked connection whose socket turned readable: answers
    /// heartbeats in place and watches the socket again, or resumes the
    /// session for anything else. A stale key does nothing.
    pub fn wake_parked(&self, key: ConnKey) {
        self.with_conn(key, |entry| {
            let heard = match &mut *entry.link.borrow_mut() {
                Link::Parked(parked) => crate::conn::answer_while_parked(parked),
                Link::Live(_) => return,
            };
            let unsent = match heard {
                Heard::Answered => {
                    let watched = self.parking.as_ref().map(|set| set.rewatch(entry.fd.get(), key));
                    if matches!(watched, Some(Ok(()))) {
                        return;
                    }
                    Vec::new()
                }
                Heard::Resume { unsent } => unsent,
            };
            let outbox = entry.outbox();
            if !unsent.is_empty() {
                let _ = outbox.push_encoded(&unsent);
            }
        });
    }

    /// Resumes every parked session (parking broke down).
    pub fn resume_all_parked(&self) {
        // Resuming only spawns tasks and swaps the entry's link, so the
        // table can stay borrowed.
        for (_, entry) in self.conns.borrow().iter() {
            entry.resume_if_parked(|_| true);
        }
    }

    /// Resumes parked sessions that have sent nothing within the idle
    /// timeout: a resumed session's read finds its deadline passed and
    /// closes it with `Disconnect(IdleTimeout)`, unless a frame is there
    /// after all.
    pub fn sweep_parked(&self, now_ms: u64) {
        for (_, entry) in self.conns.borrow().iter() {
            entry.resume_if_parked(|deadline| deadline <= now_ms);
        }
    }

    /// Live connections on this shard.
    pub fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Whether `user` has a live session (only meaningful on their home shard).
    pub fn is_online(&self, user: UserId) -> bool {
        self.sessions.borrow().contains_key(&user)
    }

    fn with_conn<R>(&self, key: ConnKey, f: impl FnOnce(&ConnEntry) -> R) -> Option<R> {
        let conns = self.conns.borrow();
        let entry = conns
            .get(key.slot as usize)
            .filter(|e| e.generation == key.generation)?;
        Some(f(entry))
    }

    /// Calls `f` with every session of `user` except `skip`.
    fn for_each_session(&self, user: UserId, skip: Option<ConnKey>, mut f: impl FnMut(&ConnEntry)) {
        let sessions = self.sessions.borrow();
        let Some(keys) = sessions.get(&user) else { return };
        let conns = self.conns.borrow();
        for key in keys.iter().filter(|k| Some(**k) != skip) {
            if let Some(entry) = conns.get(key.slot as usize) {
                f(entry);
            }
        }
    }

    /// Pushes message `seq` of `conv` to a session, or holds it while the
    /// session catches up.
    fn deliver_message(&self, entry: &ConnEntry, conv: ConvId, seq: u64, frame: &Encoded) {
        let mut delivery = entry.delivery.borrow_mut();
        match &mut *delivery {
            Delivery::Waiting if seq == NOTICE_SEQ => {
                let _ = entry.outbox().push_encoded(frame);
            }
            Delivery::Waiting => {}
            Delivery::Syncing { held, .. } if seq == NOTICE_SEQ => {
                // Not in the store: a notice is never dropped, and there
                // is at most one per conversation.
                held.push((conv, seq, frame.clone()));
            }
            Delivery::Syncing { overflowed: true, .. } => {}
            Delivery::Syncing {
                held,
                held_bytes,
                overflowed,
            } => {
                // Bounded in count and in bytes: a session that reads its
                // catch-up slowly while 1:1 messages (each frame its own,
                // up to max_frame_bytes) keep coming may hold no more than
                // its outbound queue could.
                let bytes = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                let total = held_bytes.saturating_add(bytes);
                if held.len() >= self.config.sync_hold_max
                    || total as usize > self.config.outbound_queue_bytes
                {
                    // The catch-up scans the store again instead; the
                    // message is there, since deliveries follow durable
                    // writes. Notices are not, and stay.
                    held.retain(|&(_, seq, _)| seq == NOTICE_SEQ);
                    *held_bytes = 0;
                    *overflowed = true;
                    self.m().sync_hold_overflowed();
                } else {
                    held.push((conv, seq, frame.clone()));
                    *held_bytes = total;
                }
            }
            Delivery::Live { floors } => {
                if let Some(map) = floors {
                    match map.get(&conv) {
                        Some(&floor) if seq <= floor => return,
                        Some(_) => {
                            map.remove(&conv);
                            if map.is_empty() {
                                *floors = None;
                            }
                        }
                        None => {}
                    }
                }
                if entry.outbox().push_encoded(frame).is_ok() && seq != NOTICE_SEQ {
                    self.m().message_delivered();
                }
            }
        }
    }

    /// Starts holding live messages for a session about to catch up.
    pub fn begin_sync(&self, key: ConnKey) {
        self.with_conn(key, |entry| {
            *entry.delivery.borrow_mut() = Delivery::Syncing {
                held: Vec::new(),
                held_bytes: 0,
                overflowed: false,
            };
        });
    }

    /// Takes the messages held during a catch-up, and whether some were
    /// dropped (then the store must be scanned again, and what is
    /// returned is only the notices, which the store does not have).
    pub fn take_held(&self, key: ConnKey) -> (Vec<Held>, bool) {
        self.with_conn(key, |entry| match &mut *entry.delivery.borrow_mut() {
            Delivery::Syncing {
                held,
                held_bytes,
                overflowed,
            } => {
                *held_bytes = 0;
                (std::mem::take(held), std::mem::replace(overflowed, false))
            }
            _ => (Vec::new(), false),
        })
        .unwrap_or_default()
    }

    /// Switches a session to live delivery. The caller must not have
    /// yielded since `take_held` last returned nothing, or a message held
    /// in between would be lost.
    pub fn go_live(&self, key: ConnKey, floors: Floors) {
        let floors = (!floors.is_empty()).then(|| Box::new(floors));
        self.with_conn(key, |entry| {
            *entry.delivery.borrow_mut() = Delivery::Live { floors }
        });
    }

    /// Serves an operator's request for a user homed here.
    pub fn admin(self: &Rc<Self>, request: crate::admin::AdminRequest) {
        use crate::admin::AdminRequest;
        match request {
            AdminRequest::Sessions { user, reply } => {
                let count = self.sessions.borrow().get(&user).map_or(0, Vec::len);
                let _ = reply.send(count);
            }
            AdminRequest::Kick { user, reply } => {
                let mut count = 0;
                self.for_each_session(user, None, |entry| {
                    entry
                        .outbox()
                        .kill(ErrorCode::Forbidden, "disconnected by an administrator", 0);
                    count += 1;
                });
                let _ = reply.send(count);
            }
            AdminRequest::AccountDeleted { user, reply } => {
                let _ = reply.send(self.account_deleted(user));
            }
        }
    }

    /// Ends every session of `user` homed here but `keep`, after the user
    /// logged out their other devices (whose tokens are revoked by then);
    /// returns how many.
    pub fn end_other_sessions(&self, user: UserId, keep: ConnKey) -> usize {
        let mut ended = 0;
        self.for_each_session(user, Some(keep), |entry| {
            entry
                .outbox()
                .kill(ErrorCode::AuthFailed, "logged out from another device", 0);
            ended += 1;
        });
        ended
    }

    /// Drops this shard's ends of the queues to other shards, so that
    /// their consumer tasks end once drained (shutdown).
    pub fn close_queues(&self) {
        self.requests_out.borrow_mut().clear();
        self.events_out.borrow_mut().clear();
    }

    /// Tells every connection to go away, with a retry hint.
    pub fn drain_connections(&self, retry_after_ms: u32) {
        for (_, entry) in self.conns.borrow().iter() {
            entry
                .outbox()
                .finish(ErrorCode::ShuttingDown, "server is shutting down", retry_after_ms);
        }
    }

    /// Closes the sockets of connections that did not finish in time.
    pub fn abort_connections(&self) {
        for (_, entry) in self.conns.borrow().iter() {
            entry.outbox().close();
            // SAFETY: shutdown on a descriptor we own has no memory effects;
            // it makes the connection's pending reads and writes complete.
            unsafe { libc::shutdown(entry.fd.get(), libc::SHUT_RDWR) };
        }
    }

    /// Sends a request to the shard that owns its conversation or group;
    /// waits while that queue is full.
    pub async fn send_request(self: &Rc<Self>, shard: usize, request: Request) {
        if shard == self.index {
            return Box::pin(self.handle_request(request)).await;
        }
        let tx = self.requests_out.borrow().get(shard).cloned().flatten();
        self.send_on(tx, request, shard, "request").await;
    }

    /// Sends on a cross-shard queue end: at once if there is room, else
    /// waiting, which stops the caller from taking more work until the
    /// owner catches up (counted as backpressure).
    async fn send_on<T: Send>(&self, tx: Option<Rc<ConnectedSender<T>>>, item: T, shard: usize, kind: &str) {
        let Some(tx) = tx else { return };
        match tx.try_send(item) {
            Ok(()) => self.m().cross_shard_send(false),
            Err(GlommioError::WouldBlock(ResourceType::Channel(item))) => {
                self.m().cross_shard_send(true);
                // Boxed: the waiting send is large and rare, and every
                // connection's future would otherwise reserve room for it.
                if Box::pin(tx.send(item)).await.is_err() {
                    tracing::warn!(shard, kind, "cross-shard queue closed; shard is stopping");
                }
            }
            Err(_) => tracing::warn!(shard, kind, "cross-shard queue closed; shard is stopping"),
        }
    }

    /// Sends an event to the shard that owns its user; waits while that
    /// queue is full.
    pub async fn send_event(self: &Rc<Self>, shard: usize, event: Event) {
        if shard == self.index {
            return self.handle_event(event);
        }
        let tx = self.events_out.borrow().get(shard).cloned().flatten();
        self.send_on(tx, event, shard, "event").await;
    }

    /// Serves a request for a conversation or group homed here.
    pub async fn handle_request(self: &Rc<Self>, request: Request) {
        match request {
            Request::Direct {
                from,
                conn,
                request_id,
                to,
                client_msg_id,
                content,
            } => {
                let _room = self.room_to_stage(staged_writes(&content)).await;
                let conv = ConvId::direct(from, to);
                let erase = match content.kind {
                    ContentKind::Recall { seq: target } => {
                        match self.check_recall(conv, from, client_msg_id, target).await {
                            Ok(erase) => erase,
                            Err(refused) => return self.reply(from, conn, refused.frame(request_id)).await,
                        }
                    }
                    _ => None,
                };
                let Some((seq, timestamp_ms, moved_from)) =
                    self.sequence(conv, from, conn, request_id, client_msg_id).await
                else {
                    return;
                };
                let message = ChatMessage {
                    conv,
                    seq,
                    from,
                    client_msg_id,
                    timestamp_ms,
                    content,
                };
                let frame = self.message_frame(message);
                let write = MessageWrite {
                    conv,
                    seq,
                    from,
                    client_msg_id,
                    timestamp_ms,
                    frame: commit::store_frame(&frame),
                    inbox: InboxTargets::One(to),
                    moved_from,
                };
                let deliver = Event::Deliver {
                    to: Recipients::One(to),
                    conv,
                    seq,
                    frame: frame.clone(),
                    skip: None,
                };
                let sent = Event::Sent {
                    user: from,
                    conn,
                    request_id,
                    client_msg_id,
                    conv,
                    seq,
                    timestamp_ms,
                    echo: Some(frame),
                };
                self.stage(
                    WriteOp::Message(write),
                    [
                        Effect::Durable {
                            conv,
                            from,
                            client_msg_id,
                            seq,
                        },
                        Effect::Event(self.home_of(to), deliver),
                        Effect::Event(self.home_of(from), sent),
                    ],
                );
                // Staged with the recall, nothing awaited in between: one
                // store batch holds both.
                if let Some(erase) = erase {
                    self.stage(erase, []);
                }
            }
            Request::Group {
                from,
                conn,
                request_id,
                group,
                client_msg_id,
                content,
            } => {
                let _room = self.room_to_stage(staged_writes(&content)).await;
                self.group_send(from, conn, request_id, group, client_msg_id, content)
                    .await;
            }
            Request::GroupAdmin {
                user,
                group,
                op,
                reply,
            } => {
                // Membership changes wait on the disk; run them beside the
                // queue so messages for other groups keep flowing.
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let answer = shard.group_admin(user, group, op).await;
                    let _ = reply.send(answer);
                })
                .detach();
            }
            Request::Typing {
                from,
                conn,
                request_id,
                conv,
            } => self.typing(from, conn, request_id, conv).await,
            Request::DirectReceiptCheck { user, conv, reply } => {
                let _ = reply.send(self.direct_receipt_check(user, conv).await);
            }
            Request::Block {
                user,
                peer,
                block,
                reply,
            } => {
                // Waits on the disk too: beside the queue, as above.
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let changed = shard.change_block(user, peer, block).await;
                    // The user's presence pushes of the peer (and pair
                    // notices) queued before the change reach their
                    // sessions before its answer does.
                    shard.flushed(shard.home_of(user)).await;
                    let _ = reply.send(changed);
                })
                .detach();
            }
            Request::Unfriend { user, peer, reply } => {
                // Waits on the disk and on the pair's permit: beside the queue.
                let shard = self.clone();
                glommio::spawn_local(async move {
                    if let Some(removed) = shard.unfriend(user, peer).await {
                        // As for a block: no `Presence` of the ex-friend
                        // queued before the removal follows its `Ok`.
                        shard.flushed(shard.home_of(user)).await;
                        let _ = reply.send(removed);
                    }
                })
                .detach();
            }
            Request::PresenceNotices { notices, queued } => self.queue_presence(notices, queued),
            Request::PairNotice {
                from,
                to,
                frame,
                queued,
            } => {
                // Waits for a block change of the pair: beside the queue.
                let shard = self.clone();
                glommio::spawn_local(async move {
                    shard.pair_notice(from, to, frame).await;
                    drop(queued);
                })
                .detach();
            }
        }
    }

    async fn reply(self: &Rc<Self>, user: UserId, conn: ConnKey, frame: ServerFrame) {
        let frame = encode_shared(&frame, self.config.max_frame_bytes);
        self.send_event(self.home_of(user), Event::Reply { user, conn, frame })
            .await;
    }

    fn message_frame(&self, message: ChatMessage) -> Encoded {
        let frame = ServerFrame {
            request_id: 0,
            body: ServerBody::Message(message),
        };
        encode_shared(&frame, self.config.max_frame_bytes)
    }

    /// Applies an event for users homed here. Never waits.
    pub fn handle_event(self: &Rc<Self>, event: Event) {
        match event {
            Event::Handoff(handoff) => {
                crate::conn::adopt(self.clone(), *handoff);
            }
            Event::Sent {
                user,
                conn,
                request_id,
                client_msg_id,
                conv,
                seq,
                timestamp_ms,
                echo,
            } => {
                let frame = ServerFrame {
                    request_id,
                    body: ServerBody::Sent {
                        client_msg_id,
                        conv,
                        seq,
                        timestamp_ms,
                    },
                };
                if self.with_conn(conn, |entry| entry.outbox().push(&frame).is_ok()) == Some(true) {
                    self.m().message_sent();
                }
                if let Some(echo) = echo {
                    self.for_each_session(user, Some(conn), |entry| {
                        self.deliver_message(entry, conv, seq, &echo)
                    });
                }
            }
            Event::Deliver {
                to,
                conv,
                seq,
                frame,
                skip,
            } => {
                let deliver = |user: UserId| {
                    let skip_conn = skip.filter(|(u, _)| *u == user).map(|(_, c)| c);
                    self.for_each_session(user, skip_conn, |entry| {
                        self.deliver_message(entry, conv, seq, &frame)
                    });
                };
                match to {
                    Recipients::One(user) => deliver(user),
                    Recipients::Many(users) => users.iter().copied().for_each(deliver),
                }
            }
            Event::Notify { to, frame } => {
                let one;
                let users: &[UserId] = match &to {
                    Recipients::One(user) => {
                        one = [*user];
                        &one
                    }
                    Recipients::Many(users) => users,
                };
                for &user in users {
                    self.for_each_session(user, None, |entry| {
                        let _ = entry.outbox().push_encoded(&frame);
                    });
                }
            }
            Event::Reply { conn, frame, .. } => {
                self.with_conn(conn, |entry| entry.outbox().push_encoded(&frame));
            }
            Event::Presence { to, subject, online } => {
                let frame = ServerFrame {
                    request_id: 0,
                    body: ServerBody::Presence {
                        user: subject,
                        online,
                    },
                };
                let frame = encode_shared(&frame, self.config.max_frame_bytes);
                for user in to {
                    self.for_each_session(user, None, |entry| {
                        let _ = entry.outbox().push_encoded(&frame);
                    });
                }
            }
            Event::OnlineQuery { users, reply } => {
                let online = users.into_iter().filter(|u| self.is_online(*u)).collect();
                let _ = reply.send(online);
            }
            Event::Flush { done } => {
                let _ = done.send(());
            }
        }
    }

    /// Returns once every event this shard sent to `shard` before the call
    /// is handled there (at once for this shard: its events are handled
    /// when sent).
    pub(super) async fn flushed(self: &Rc<Self>, shard: usize) {
        let (done, handled) = futures_channel::oneshot::channel();
        self.send_event(shard, Event::Flush { done }).await;
        let _ = handled.await;
    }

    /// Which of `users` are online, asking each of their home shards.
    pub async fn online_among(self: &Rc<Self>, users: Vec<UserId>) -> FxHashSet<UserId> {
        // Every query is sent before any answer is awaited: one round
        // trip in all, not one per shard (the presence batch that asks
        // holds the permit of pair changes meanwhile).
        let mut answers = Vec::new();
        for (shard, users) in self.partition(users).into_iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let (tx, rx) = futures_channel::oneshot::channel();
            self.send_event(shard, Event::OnlineQuery { users, reply: tx })
                .await;
            answers.push(rx);
        }
        let mut online = FxHashSet::default();
        for rx in answers {
            if let Ok(found) = rx.await {
                online.extend(found);
            }
        }
        online
    }

    /// Splits users by home shard.
    pub(super) fn partition(&self, users: Vec<UserId>) -> Vec<Vec<UserId>> {
        self.partition_by(users, |user| self.home_of(user))
    }

    /// Splits users by the shard `shard_of` names for each.
    pub(super) fn partition_by(
        &self,
        users: Vec<UserId>,
        shard_of: impl Fn(UserId) -> usize,
    ) -> Vec<Vec<UserId>> {
        let mut by_shard = vec![Vec::new(); self.shards];
        for user in users {
            if let Some(list) = by_shard.get_mut(shard_of(user)) {
                list.push(user);
            }
        }
        by_shard
    }
}
