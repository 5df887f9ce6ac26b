//! The queues between shards and the messages that travel on them.
//!
//! Every ordered pair of shards is joined by two bounded glommio
//! `shared_channel`s (ring buffers that let an idle shard sleep and wake it
//! on the first item):
//!
//! * the **request** queue carries work to the shard that *owns* a
//!   conversation or group (assign a sequence number, check membership,
//!   change a member list or a block between two users). Its consumer may wait on storage and on the
//!   event queue.
//! * the **event** queue carries results to the shard that owns a *user*
//!   (deliveries, acks, presence, a socket being handed over). Its consumer
//!   only ever does local, non-blocking work.
//!
//! Because event consumers never wait, request consumers always make
//! progress, so a full queue can only slow senders down (the sending
//! connection stops reading its socket), never deadlock the mesh.
//! All channels are created up front by [`Mesh::new`] and each shard takes
//! its own ends with [`Mesh::take`].

use std::sync::{Arc, Mutex};

use futures_channel::oneshot;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use tern_net::transport::DetachedTransport;
use tern_proto::{Content, ConvId, GroupId, UserId};

use crate::shard::Encoded;

/// Identifies a connection within its shard: slab slot and generation, so a
/// reused slot is never mistaken for the connection that held it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub slot: u32,
    pub generation: u32,
}

/// A request for the shard owning a conversation or group.
#[derive(Debug)]
pub enum Request {
    /// Sequence and deliver a 1:1 message.
    Direct {
        from: UserId,
        conn: ConnKey,
        request_id: u64,
        to: UserId,
        client_msg_id: u64,
        content: Content,
    },
    /// Sequence and fan out a group message.
    Group {
        from: UserId,
        conn: ConnKey,
        request_id: u64,
        group: GroupId,
        client_msg_id: u64,
        content: Content,
    },
    /// Tell the other participants of `conv` that `from` is typing.
    Typing {
        from: UserId,
        conn: ConnKey,
        request_id: u64,
        conv: ConvId,
    },
    /// What `user`'s receipt in the 1:1 `conv` may say (its seq's cap,
    /// whether it may be pushed), asked of the conversation's home shard.
    DirectReceiptCheck {
        user: UserId,
        conv: ConvId,
        reply: oneshot::Sender<Result<DirectReceiptCheck, tern_storage::StoreError>>,
    },
    /// Change or read a group's member list.
    GroupAdmin {
        user: UserId,
        group: GroupId,
        op: GroupOp,
        reply: oneshot::Sender<GroupReply>,
    },
    /// `user` blocks `peer` (`block`) or lifts that block; for the home
    /// shard of their 1:1 conversation, whose cached state enforces it.
    Block {
        user: UserId,
        peer: UserId,
        block: bool,
        reply: oneshot::Sender<Result<(), tern_proto::session::Refusal>>,
    },
    /// Push `frame`, news from `from` to `to` (a friend request, its
    /// acceptance, a group invite), to `to`'s live sessions unless a block
    /// between the two forbids it by now; for the home shard of their 1:1
    /// conversation, where blocks between them change.
    PairNotice {
        from: UserId,
        to: UserId,
        frame: Encoded,
        /// Dropped once the push is queued to `to`'s shard (or dropped):
        /// the sender waits for it, so the notices waiting here for the
        /// pair's permit are at most one per waiting requester.
        queued: oneshot::Sender<()>,
    },
    /// `user` ends their friendship with `peer` and drops the pending
    /// requests between them; for the home shard of their 1:1
    /// conversation, where the presence pushes between them go out.
    Unfriend {
        user: UserId,
        peer: UserId,
        reply: oneshot::Sender<Result<(), tern_storage::StoreError>>,
    },
    /// Users homed on the sender came online or went offline: tell those
    /// of each notice's `to` who are still their friends; for the home
    /// shard of every listed pair's 1:1 conversation, where friendships
    /// end ([`crate::shard`]'s presence batches).
    PresenceNotices {
        notices: Vec<PresenceNotice>,
        /// Dropped once every notice's pushes are queued to the friends'
        /// shards (or dropped): the sender waits for it, which bounds the
        /// notices waiting here, and a deleted account's purge waits for
        /// it before it removes the friendships the look needs.
        queued: Option<oneshot::Sender<()>>,
    },
}

/// `subject` came online (or went offline): for those of `to` who are
/// still friends of theirs, all with their pair homed on one shard.
#[derive(Debug)]
pub struct PresenceNotice {
    pub subject: UserId,
    pub online: bool,
    pub to: Vec<UserId>,
}

/// A membership, role or invite operation by the requesting user, run on
/// the group's home shard so its cached member list and roles stay the
/// single source of truth for fan-out and for the group rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOp {
    Join,
    Leave,
    Members,
    Info,
    /// Members with ids above `after`, at most `limit` (as asked; the
    /// shard clamps it with `catchup::ids_per_page`).
    MembersPage {
        after: UserId,
        limit: u32,
    },
    /// Pending invites with ids above `after`, at most `limit` (as asked).
    InvitesPage {
        after: UserId,
        limit: u32,
    },
    Invite(UserId),
    Uninvite(UserId),
    Kick(UserId),
    SetRole(UserId, tern_proto::GroupRole),
    TransferOwnership(UserId),
    Ban(UserId),
    Unban(UserId),
    /// Banned users with ids above `after`, at most `limit` (as asked).
    BansPage {
        after: UserId,
        limit: u32,
    },
    /// Delete the group (its owner only).
    Delete,
    /// The requesting user's account was deleted: they leave, as with
    /// `Leave`, and if they own the group it passes to the member with the
    /// lowest id among its admins, else among its members; a group with no
    /// other member is deleted. Sent by the account's purge only, never
    /// from a client.
    Depart,
}

/// The answer to [`Request::DirectReceiptCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectReceiptCheck {
    /// The conversation's last stored seq: a receipt's seq is capped at
    /// it.
    pub stored_seq: u64,
    /// Whether the receipt may be pushed to the peer: neither blocks the
    /// other.
    pub push: bool,
}

/// What a successful [`GroupOp`] answers.
#[derive(Debug)]
pub enum GroupAnswer {
    /// A change was made (or there was nothing to change).
    Done,
    /// `Members`: ascending by id.
    Members(Vec<UserId>),
    /// `Info`: members ascending by id.
    Info {
        name: String,
        open: bool,
        members: Vec<tern_proto::GroupMember>,
    },
    /// `MembersPage`: ascending by id; `more` if larger ids exist.
    MembersPage {
        members: Vec<tern_proto::GroupMember>,
        more: bool,
    },
    /// `InvitesPage`: invited users ascending by id; `more` if larger ids exist.
    InvitesPage { users: Vec<UserId>, more: bool },
    /// `BansPage`: banned users ascending by id; `more` if larger ids exist.
    BansPage { users: Vec<UserId>, more: bool },
}

/// The outcome of a [`GroupOp`].
pub type GroupReply = Result<GroupAnswer, tern_proto::session::Refusal>;

/// Who a delivery is for.
#[derive(Debug, Clone)]
pub enum Recipients {
    One(UserId),
    /// The members of a group homed on the destination shard.
    Many(Arc<[UserId]>),
}

/// An event for the shard owning a user; handled without waiting.
#[derive(Debug)]
pub enum Event {
    /// A logged-in connection moving to its user's home shard.
    Handoff(Box<Handoff>),
    /// A message was sequenced: ack the sending connection and echo the
    /// message to the sender's other sessions.
    Sent {
        user: UserId,
        conn: ConnKey,
        request_id: u64,
        client_msg_id: u64,
        conv: ConvId,
        seq: u64,
        timestamp_ms: u64,
        echo: Option<Encoded>,
    },
    /// Push an encoded message (`seq` of `conv`) to every synced session
    /// of the recipients, except the sending connection.
    Deliver {
        to: Recipients,
        conv: ConvId,
        seq: u64,
        frame: Encoded,
        skip: Option<(UserId, ConnKey)>,
    },
    /// Push an unsequenced frame (a receipt, an invite, a group's
    /// deletion) to every session of the recipients.
    Notify { to: Recipients, frame: Encoded },
    /// An answer for one connection, encoded by the shard that produced it.
    Reply {
        user: UserId,
        conn: ConnKey,
        frame: Encoded,
    },
    /// `subject` came online or went offline; tell these friends of
    /// theirs (sent by the shards of the pairs, [`Request::PresenceNotices`]).
    Presence {
        to: Vec<UserId>,
        subject: UserId,
        online: bool,
    },
    /// Which of these users have a live session? (for friend lists)
    OnlineQuery {
        users: Vec<UserId>,
        reply: oneshot::Sender<Vec<UserId>>,
    },
    /// Answered once every event sent before it on the same queue is
    /// handled: an answer that must not overtake pushes its shard queued
    /// earlier (a `Presence` before a `FriendRemove`'s `Ok`) waits on it,
    /// since answers travel by oneshot, beside the queue.
    Flush { done: oneshot::Sender<()> },
}

/// A connection in transit, with everything its new shard needs.
#[derive(Debug)]
pub struct Handoff {
    pub transport: DetachedTransport,
    pub user: UserId,
    pub username: String,
    pub token: Vec<u8>,
    pub request_id: u64,
    /// Bytes the client sent after its login frame.
    pub leftover: Vec<u8>,
    /// The store's revocation count before the login was checked.
    pub revocations: u64,
    /// Whether the login issued `token` (see `conn::LoggedIn`).
    pub minted: bool,
}

/// One shard's ends of the mesh.
pub struct Endpoints {
    /// Senders to each shard (`None` at this shard's own index).
    pub requests_out: Vec<Option<SharedSender<Request>>>,
    pub events_out: Vec<Option<SharedSender<Event>>>,
    /// Receivers from each other shard.
    pub requests_in: Vec<SharedReceiver<Request>>,
    pub events_in: Vec<SharedReceiver<Event>>,
}

/// All channels between `n` shards, waiting to be taken by their shards.
pub struct Mesh {
    slots: Mutex<Vec<Option<Endpoints>>>,
}

impl Mesh {
    /// Creates the 2·n·(n−1) channels, each `depth` items deep.
    pub fn new(shards: usize, depth: usize) -> Mesh {
        let mut ends: Vec<Endpoints> = (0..shards)
            .map(|_| Endpoints {
                requests_out: (0..shards).map(|_| None).collect(),
                events_out: (0..shards).map(|_| None).collect(),
                requests_in: Vec::new(),
                events_in: Vec::new(),
            })
            .collect();
        for from in 0..shards {
            for to in 0..shards {
                if from == to {
                    continue;
                }
                let (req_tx, req_rx) = shared_channel::new_bounded(depth);
                let (evt_tx, evt_rx) = shared_channel::new_bounded(depth);
                if let Some(e) = ends.get_mut(from) {
                    e.requests_out[to] = Some(req_tx);
                    e.events_out[to] = Some(evt_tx);
                }
                if let Some(e) = ends.get_mut(to) {
                    e.requests_in.push(req_rx);
                    e.events_in.push(evt_rx);
                }
            }
        }
        Mesh {
            slots: Mutex::new(ends.into_iter().map(Some).collect()),
        }
    }

    /// Takes shard `index`'s endpoints (once).
    pub fn take(&self, index: usize) -> Option<Endpoints> {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.get_mut(index).and_then(Option::take)
    }
}
