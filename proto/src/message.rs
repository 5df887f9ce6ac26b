//! The messages that travel inside frames.
//!
//! A client sends [`ClientFrame`]s and the server sends [`ServerFrame`]s.
//! Every client frame carries a client-chosen `request_id`; every answer to
//! it echoes that id. Frames the server pushes unasked (deliveries, presence,
//! disconnect notices) carry `request_id` 0, so clients should start their
//! ids at 1. Message bodies travel as bytes, never as `String`, so the server
//! validates their length but does not pay a UTF-8 check per message.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::{ConvId, GroupId, UserId};

/// One frame from a client.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ClientFrame {
    /// Chosen by the client, echoed in the answer. 0 is reserved for pushes.
    pub request_id: u64,
    /// What is asked.
    pub body: ClientBody,
}

/// What a client can ask. The first frame on a connection must be `Hello`.
///
/// A variant's wire tag is its place in this list, counted from 0, unless
/// it says otherwise with an explicit discriminant (which the archived
/// form keeps; `repr(u8)` is what allows one on a variant with fields).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum ClientBody {
    /// Opens the connection: the protocol version the client speaks.
    Hello { version: u16, client_name: String },
    /// Creates an account. Answered with `Registered`; does not log in.
    Register { username: String, password: Vec<u8> },
    /// Logs in with a password. Answered with `LoggedIn`.
    Login { username: String, password: Vec<u8> },
    /// Logs in with a token from an earlier `LoggedIn`.
    LoginToken { token: Vec<u8> },
    /// Keeps the connection alive; answered with `Pong`.
    Ping { nonce: u64 },
    /// Looks up a user by name; answered with `User`.
    ResolveUser { username: String },
    /// Asks a user, by name, to be friends, or accepts their pending
    /// request: answered with `User` once the two are friends (already, or
    /// now that this accepted their request; their live sessions get
    /// `FriendAccepted`), with `FriendRequestSent` while the caller's
    /// request waits for the other's `FriendAdd` (their live sessions get
    /// `FriendRequest` when it is new).
    FriendAdd { username: String },
    /// Ends a friendship, and drops any pending friend request between
    /// the two either way (declining theirs, cancelling one's own);
    /// answered with `Ok`, also if there was nothing.
    FriendRemove { user: UserId },
    /// Lists friends with their presence, all in one frame; answered with
    /// `Friends`, or `LimitExceeded` when they do not fit in one (about
    /// 1,100 friends at the default frame size). Kept for old clients:
    /// new ones page with `FriendsPage`.
    FriendList,
    /// Sends a 1:1 message; answered with `Sent`.
    SendDirect {
        to: UserId,
        client_msg_id: u64,
        content: Content,
    },
    /// Creates an open group owned by the caller, who joins it; answered
    /// with `GroupCreated`. Same as `GroupCreateWith { name, open: true }`.
    GroupCreate { name: String },
    /// Joins a group; answered with `Ok`. An invite-only group needs a
    /// pending invite (`GroupInvite`), which the join consumes.
    GroupJoin { group: GroupId },
    /// Leaves a group; answered with `Ok`. The owner cannot leave.
    GroupLeave { group: GroupId },
    /// Lists a group's members (caller must be one); answered with `Members`.
    GroupMembers { group: GroupId },
    /// Sends to a group the caller belongs to; answered with `Sent`.
    SendGroup {
        group: GroupId,
        client_msg_id: u64,
        content: Content,
    },
    /// Catches up after login: acknowledges `cursors` (the last sequence
    /// the client holds per conversation) as delivered, streams every
    /// undelivered message after them as `Message` pushes in sequence order
    /// per conversation, then answers `SyncDone`, after which the session
    /// receives messages live. A session that never syncs gets no messages
    /// (they wait in its inbox).
    Sync { cursors: Vec<Cursor> },
    /// Cumulative receipt: every message of `conv` up to `seq` was
    /// delivered (or read). Answered with `Ok`; forwarded to the peer of a
    /// 1:1 conversation as a `Receipt` push.
    Receipt {
        conv: ConvId,
        kind: ReceiptKind,
        seq: u64,
    },
    /// A page of a conversation's history: up to `limit` (at most 200)
    /// messages from `from_seq` onwards (`forward`) or backwards.
    /// Answered with `HistoryPage`.
    History {
        conv: ConvId,
        from_seq: u64,
        forward: bool,
        limit: u32,
    },
    /// The caller's conversations, most recent first, `limit` (at most 200)
    /// from `offset`. Answered with `Conversations`.
    Conversations { offset: u32, limit: u32 },
    /// Ends this session: revokes the token it logged in with (or was
    /// issued at login), answers `Ok` and closes the connection. Other
    /// sessions of the user and their tokens are not affected.
    Logout,
    /// Changes the caller's password: `old_password` must be the current
    /// one. On success every token of the user is revoked (this session's
    /// too); every open session, this one included, stays connected, but
    /// the next login must use the new password. Answered with `Ok`.
    ChangePassword {
        old_password: Vec<u8>,
        new_password: Vec<u8>,
    },
    /// Creates a group owned by the caller, who joins it as `Owner`:
    /// `open` lets anyone join, otherwise joining needs an invite.
    /// Answered with `GroupCreated`.
    GroupCreateWith { name: String, open: bool },
    /// Invites `user` to `group` (owner or admin only); answered with `Ok`.
    GroupInvite { group: GroupId, user: UserId },
    /// Removes `user` from `group` (owner, or admin for plain members);
    /// answered with `Ok`.
    GroupKick { group: GroupId, user: UserId },
    /// Makes `user` an `Admin` or a `Member` (owner only); answered with `Ok`.
    GroupSetRole {
        group: GroupId,
        user: UserId,
        role: GroupRole,
    },
    /// A group's name, openness and members with their roles (caller must
    /// be a member); answered with `GroupInfo`.
    GroupInfo { group: GroupId },
    /// Withdraws `user`'s pending invite to `group` (owner or admin only);
    /// answered with `Ok`, whether or not there was one.
    GroupUninvite { group: GroupId, user: UserId },
    /// A page of a group's members with their roles (caller must be a
    /// member): those with ids above `after`, ascending, at most `limit`
    /// (clamped to 1..=1000). Answered with `MembersPage`; unlike
    /// `GroupInfo` and `GroupMembers` it lists a group of any size.
    GroupMembersPage {
        group: GroupId,
        after: UserId,
        limit: u32,
    },
    /// A page of a group's pending invites (owner or admin only): the
    /// invited users with ids above `after`, ascending, at most `limit`
    /// (clamped to 1..=1000). Answered with `InvitesPage`.
    GroupInvitesPage {
        group: GroupId,
        after: UserId,
        limit: u32,
    },
    /// Makes member `user` the group's owner (the owner only); the caller
    /// becomes an `Admin`, and may then leave. Answered with `Ok`.
    GroupTransferOwnership { group: GroupId, user: UserId },
    /// A page of the groups that invited the caller and whose invites are
    /// still pending: ids above `after`, ascending, at most `limit`
    /// (clamped to 1..=1000). Answered with `MyInvites`.
    MyInvitesPage { after: GroupId, limit: u32 },
    /// Bans `user` from `group` (owner, or admin for anyone but admins and
    /// the owner): removes them if a member, withdraws their invite, and
    /// refuses their joins until `GroupUnban`. Answered with `Ok`.
    GroupBan { group: GroupId, user: UserId },
    /// Lifts `user`'s ban from `group` (owner or admin); answered with
    /// `Ok`, whether or not there was one.
    GroupUnban { group: GroupId, user: UserId },
    /// A page of the users banned from `group` (owner or admin), paged
    /// like `GroupInvitesPage`. Answered with `BansPage`.
    GroupBansPage {
        group: GroupId,
        after: UserId,
        limit: u32,
    },
    /// Blocks `user`: from the `Ok` on, no 1:1 message passes between the
    /// two in either direction and neither can befriend the other; an
    /// existing friendship ends. Groups are not affected. Answered with
    /// `Ok`, also if already blocked.
    UserBlock { user: UserId },
    /// Lifts the caller's block of `user`; answered with `Ok`, whether or
    /// not there was one.
    UserUnblock { user: UserId },
    /// A page of the users the caller blocks: ids above `after`,
    /// ascending, at most `limit` (clamped to 1..=1000). Answered with
    /// `Blocks`.
    BlocksPage { after: UserId, limit: u32 },
    /// Deletes `group` (its owner only): from the `Ok` on the group is
    /// gone for every request, its id is never reused, and its members'
    /// live sessions get `GroupDeleted`. Its history, invites, bans and
    /// cursors are removed by the server in the background.
    GroupDelete { group: GroupId },
    /// Logs in with a JSON Web Token issued by the operator's own login
    /// system, on a server configured to trust it: the token's `sub`
    /// claim is the username. Answered with `LoggedIn` (whose token
    /// resumes the session with `LoginToken`, as after `Login`).
    LoginJwt { token: String },
    /// The caller is typing in `conv`: its other participants' live
    /// sessions get `Typing` (nothing is stored). Answered with `Ok`.
    /// Clients send it at most every few seconds while the user types;
    /// receivers show it for about 6 s unless it is repeated.
    Typing { conv: ConvId },
    /// Logs the caller out of every other device: every token of the user
    /// is revoked (this session's too), JWTs issued before now are
    /// refused, and the user's other sessions get `Disconnect {
    /// AuthFailed }`. This session stays logged in with a new token, the
    /// user's only one: answered with `LoggedIn`. `AuthFailed` if this
    /// session's own token was revoked already.
    LogoutOthers,
    /// A page of the caller's pending friend requests: the users who asked
    /// the caller (`incoming`), or whom the caller asked, with ids above
    /// `after`, ascending, at most `limit` (clamped to 1..=1000). Answered
    /// with `FriendRequests`.
    FriendRequestsPage {
        incoming: bool,
        after: UserId,
        limit: u32,
    },
    /// Deletes the caller's account: `password` must be its current one
    /// (an account made by a JWT login has none and is refused with
    /// `Forbidden`; the operator deletes those). Answered with `Ok`; then
    /// every session of the user, this one included, gets `Disconnect {
    /// AccountDeleted }`. From the `Ok` on no login of any kind reaches the
    /// account, messages and friend requests to it are refused with
    /// `NotFound`, and it is gone from its friends' lists; the server then
    /// removes its friendships, requests, blocks, group memberships,
    /// invites, inbox and cursors in the background. Messages it sent stay
    /// in their conversations. The name is free for a new registration;
    /// the id is never reused.
    AccountDelete { password: Vec<u8> },
    /// A page of the caller's friends with their presence: ids above
    /// `after`, ascending, at most `limit` (clamped to 1..=1000 and cut to
    /// fit a frame). Answered with `FriendsPage`. Tag 43: 42 is
    /// `AccountDelete`'s, added beside it.
    FriendsPage { after: UserId, limit: u32 } = 43,
}

/// A member's role in a group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum GroupRole {
    /// The creator: every right, cannot leave or be kicked.
    Owner,
    /// May invite, and kick plain members.
    Admin,
    /// May send, read and leave.
    Member,
}

impl ArchivedGroupRole {
    /// Converts the archived role back into a native [`GroupRole`].
    pub fn to_native(self) -> GroupRole {
        match self {
            ArchivedGroupRole::Owner => GroupRole::Owner,
            ArchivedGroupRole::Admin => GroupRole::Admin,
            ArchivedGroupRole::Member => GroupRole::Member,
        }
    }
}

/// A group member and their role, as listed by `GroupInfo`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct GroupMember {
    pub user: UserId,
    pub role: GroupRole,
}

/// The last sequence a client holds for a conversation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Cursor {
    pub conv: ConvId,
    pub seq: u64,
}

/// What a receipt says.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum ReceiptKind {
    /// The messages reached a device of the user.
    Delivered,
    /// The user read them (implies delivered).
    Read,
}

impl ArchivedReceiptKind {
    /// Converts the archived kind back into a native [`ReceiptKind`].
    pub fn to_native(self) -> ReceiptKind {
        match self {
            ArchivedReceiptKind::Delivered => ReceiptKind::Delivered,
            ArchivedReceiptKind::Read => ReceiptKind::Read,
        }
    }
}

/// One entry of a conversation list.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ConversationSummary {
    pub conv: ConvId,
    /// The conversation's newest sequence number.
    pub last_seq: u64,
    /// Messages after the caller's read cursor.
    pub unread: u64,
    /// The newest message, if any is still kept.
    pub last_message: Option<ChatMessage>,
    /// For 1:1 conversations, the peer's delivered and read cursors.
    pub peer_delivered: u64,
    pub peer_read: u64,
}

/// The payload of a chat message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Content {
    /// What `body` is.
    pub kind: ContentKind,
    /// Text (UTF-8 by convention) or a caption for media.
    pub body: Vec<u8>,
}

/// The type of a message's content.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum ContentKind {
    /// Plain text in `body`.
    Text,
    /// A reference to a media object stored elsewhere.
    Media { url: String, mime: String, size: u64 },
    /// Sent by a message's sender: message `seq` of the same conversation
    /// is withdrawn for everyone ("delete for everyone"). `body` is empty.
    /// The server erases that message's content from its store and
    /// delivers this like any message; clients hide message `seq`.
    Recall { seq: u64 },
    /// What a recalled message becomes in the store (history, sync): its
    /// content is gone. Only the server sends it; `body` is empty.
    Recalled,
}

impl Content {
    /// A text message.
    pub fn text(text: impl Into<Vec<u8>>) -> Content {
        Content {
            kind: ContentKind::Text,
            body: text.into(),
        }
    }
}

/// One frame from the server.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ServerFrame {
    /// The `request_id` of the client frame answered, or 0 for a push.
    pub request_id: u64,
    /// The answer or push.
    pub body: ServerBody,
}

/// What the server says.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum ServerBody {
    /// The answer to `Hello`: the version in use and the server's limits.
    HelloOk {
        version: u16,
        max_frame_bytes: u32,
        idle_timeout_ms: u32,
    },
    /// A request failed. `supported_versions` is filled only for
    /// [`ErrorCode::UnsupportedVersion`]; `retry_after_ms` only for
    /// [`ErrorCode::RateLimited`]: how long until a request of the same
    /// kind would be served (0 elsewhere, and from servers older than the
    /// field, which wrote zero bytes there).
    Error {
        code: ErrorCode,
        message: String,
        supported_versions: Vec<u16>,
        retry_after_ms: u32,
    },
    /// A generic success with nothing to return.
    Ok,
    /// The answer to `Register`.
    Registered { user: UserId },
    /// The answer to `Login`, `LoginToken` and `LoginJwt`: the session is
    /// authenticated; and to `LogoutOthers`, with the session's new token.
    LoggedIn {
        user: UserId,
        username: String,
        token: Vec<u8>,
    },
    /// The answer to `Ping`.
    Pong { nonce: u64 },
    /// A user, as answer to `ResolveUser` or `FriendAdd`.
    User { user: UserId, username: String },
    /// The answer to `FriendList`.
    Friends { friends: Vec<Friend> },
    /// The ack of a sent message: durable as configured, sequence assigned.
    Sent {
        client_msg_id: u64,
        conv: ConvId,
        seq: u64,
        timestamp_ms: u64,
    },
    /// The answer to `GroupCreate`.
    GroupCreated { group: GroupId },
    /// The answer to `GroupMembers`.
    Members { group: GroupId, members: Vec<UserId> },
    /// A pushed chat message: a delivery, or an echo of one's own message
    /// sent from another session (then `from` is the session's own user).
    Message(ChatMessage),
    /// A friend came online or went offline.
    Presence { user: UserId, online: bool },
    /// The server is closing this connection, and why. `retry_after_ms` is
    /// a hint for when reconnecting makes sense (0: no hint).
    Disconnect {
        code: ErrorCode,
        message: String,
        retry_after_ms: u32,
    },
    /// The answer to `Sync`: `messages` were streamed; the session is live.
    SyncDone { messages: u64 },
    /// A pushed receipt: `user` has received or read `conv` up to `seq`.
    Receipt {
        conv: ConvId,
        user: UserId,
        kind: ReceiptKind,
        seq: u64,
    },
    /// The answer to `History`, in the order asked for.
    HistoryPage {
        conv: ConvId,
        messages: Vec<ChatMessage>,
    },
    /// The answer to `Conversations`.
    Conversations { conversations: Vec<ConversationSummary> },
    /// The answer to `GroupInfo`: members ascending by user id.
    GroupInfo {
        group: GroupId,
        name: String,
        open: bool,
        members: Vec<GroupMember>,
    },
    /// The answer to `GroupMembersPage`: members ascending by user id.
    /// `more` says whether members with larger ids exist; ask again with
    /// `after` set to the last id listed. A page may be shorter than asked
    /// (cut to fit one frame) and still have `more`.
    MembersPage {
        group: GroupId,
        members: Vec<GroupMember>,
        more: bool,
    },
    /// The answer to `GroupInvitesPage`: invited users ascending by id;
    /// `more` as in `MembersPage`.
    InvitesPage {
        group: GroupId,
        users: Vec<UserId>,
        more: bool,
    },
    /// The answer to `MyInvitesPage`: groups ascending by id; `more` as in
    /// `MembersPage`.
    MyInvites { groups: Vec<GroupId>, more: bool },
    /// Pushed to the invited user's live sessions when `by` invites them
    /// to `group` (and again if invited again while the invite is pending).
    Invited { group: GroupId, by: UserId },
    /// The answer to `GroupBansPage`: banned users ascending by id; `more`
    /// as in `MembersPage`.
    BansPage {
        group: GroupId,
        users: Vec<UserId>,
        more: bool,
    },
    /// The answer to `BlocksPage`: blocked users ascending by id; `more`
    /// as in `MembersPage`.
    Blocks { users: Vec<UserId>, more: bool },
    /// Pushed to every member's live sessions when `by` (its owner)
    /// deletes `group`: the last frame a session gets for the group.
    GroupDeleted { group: GroupId, by: UserId },
    /// Pushed to the live sessions of `conv`'s other participants when
    /// `user` sends `Typing`.
    Typing { conv: ConvId, user: UserId },
    /// The answer to a `FriendAdd` that stored a request (or found it
    /// pending already): `user` (named `username`) is asked, and becomes a
    /// friend once they add the caller in turn.
    FriendRequestSent { user: UserId, username: String },
    /// The answer to `FriendRequestsPage`: users ascending by id, with
    /// their names (a pending request shares no presence: `online` is
    /// always false); `more` as in `MembersPage`.
    FriendRequests { users: Vec<Friend>, more: bool },
    /// Pushed to a user's live sessions when `from` (named `username`)
    /// asks them to be friends (a new request; `FriendAdd` of `username`
    /// accepts it).
    FriendRequest { from: UserId, username: String },
    /// Pushed to a user's live sessions when `by` (named `username`)
    /// accepts their friend request: the two are friends from now on.
    FriendAccepted { by: UserId, username: String },
    /// The answer to `FriendsPage`: friends ascending by id, with their
    /// names and presence; `more` as in `MembersPage`.
    FriendsPage { friends: Vec<Friend>, more: bool },
}

/// A friend and whether they are online now (also a user with a pending
/// friend request, in `FriendRequests`, never online there).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Friend {
    pub user: UserId,
    pub username: String,
    pub online: bool,
}

/// A chat message as delivered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ChatMessage {
    pub conv: ConvId,
    pub seq: u64,
    pub from: UserId,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
    pub content: Content,
}

/// Why a request failed or a connection was closed.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum ErrorCode {
    /// The frame could not be decoded; the connection closes.
    MalformedFrame,
    /// The frame was larger than the server's limit; the connection closes.
    FrameTooLarge,
    /// `Hello` named a version the server cannot speak; the connection closes.
    UnsupportedVersion,
    /// The request is not allowed in this connection's state (e.g. before
    /// `Hello`, or a chat request before login).
    InvalidState,
    /// A field is out of its allowed range.
    InvalidArgument,
    /// The username is taken.
    UsernameTaken,
    /// Wrong username, password or token; as a `Disconnect`, the session
    /// was logged out from another device.
    AuthFailed,
    /// The user, group or conversation does not exist.
    NotFound,
    /// The caller may not do this (e.g. send to a group they are not in).
    Forbidden,
    /// A configured limit was reached (group size, friends, connections).
    LimitExceeded,
    /// The connection fell too far behind in reading its pushes.
    SlowConsumer,
    /// No frame arrived within the idle timeout.
    IdleTimeout,
    /// The server is shutting down; reconnect later.
    ShuttingDown,
    /// The server failed internally (e.g. a storage error); retry later.
    Internal,
    /// A rate limit was crossed (requests per connection, login attempts,
    /// connections per address). As an `Error` the request was not served
    /// and may be retried later; as a `Disconnect` the connection kept
    /// flooding and is closed (`retry_after_ms` says when to come back).
    RateLimited,
    /// The server's content filter refused the message's text.
    ContentRejected,
    /// As a `Disconnect`: the user's account was deleted (by the user,
    /// from this or another device, or by the operator). Do not reconnect
    /// with its credentials: they no longer work.
    AccountDeleted,
}

impl ArchivedErrorCode {
    /// Converts the archived code back into a native [`ErrorCode`].
    pub fn to_native(self) -> ErrorCode {
        match self {
            ArchivedErrorCode::MalformedFrame => ErrorCode::MalformedFrame,
            ArchivedErrorCode::FrameTooLarge => ErrorCode::FrameTooLarge,
            ArchivedErrorCode::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            ArchivedErrorCode::InvalidState => ErrorCode::InvalidState,
            ArchivedErrorCode::InvalidArgument => ErrorCode::InvalidArgument,
            ArchivedErrorCode::UsernameTaken => ErrorCode::UsernameTaken,
            ArchivedErrorCode::AuthFailed => ErrorCode::AuthFailed,
            ArchivedErrorCode::NotFound => ErrorCode::NotFound,
            ArchivedErrorCode::Forbidden => ErrorCode::Forbidden,
            ArchivedErrorCode::LimitExceeded => ErrorCode::LimitExceeded,
            ArchivedErrorCode::SlowConsumer => ErrorCode::SlowConsumer,
            ArchivedErrorCode::IdleTimeout => ErrorCode::IdleTimeout,
            ArchivedErrorCode::ShuttingDown => ErrorCode::ShuttingDown,
            ArchivedErrorCode::Internal => ErrorCode::Internal,
            ArchivedErrorCode::RateLimited => ErrorCode::RateLimited,
            ArchivedErrorCode::ContentRejected => ErrorCode::ContentRejected,
            ArchivedErrorCode::AccountDeleted => ErrorCode::AccountDeleted,
        }
    }
}

impl ErrorCode {
    /// Every error code, in declaration order, so `code as usize` indexes
    /// it (tables keyed by code: metrics, decoders).
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidState,
        ErrorCode::InvalidArgument,
        ErrorCode::UsernameTaken,
        ErrorCode::AuthFailed,
        ErrorCode::NotFound,
        ErrorCode::Forbidden,
        ErrorCode::LimitExceeded,
        ErrorCode::SlowConsumer,
        ErrorCode::IdleTimeout,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::RateLimited,
        ErrorCode::ContentRejected,
        ErrorCode::AccountDeleted,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl ServerFrame {
    /// An error answer to `request_id`.
    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame {
            request_id,
            body: ServerBody::Error {
                code,
                message: message.into(),
                supported_versions: Vec::new(),
                retry_after_ms: 0,
            },
        }
    }

    /// A `RateLimited` answer to `request_id`: a request of the same kind
    /// is served again after `retry_after_ms`.
    pub fn rate_limited(request_id: u64, message: impl Into<String>, retry_after_ms: u32) -> ServerFrame {
        ServerFrame {
            request_id,
            body: ServerBody::Error {
                code: ErrorCode::RateLimited,
                message: message.into(),
                supported_versions: Vec::new(),
                retry_after_ms,
            },
        }
    }
}
