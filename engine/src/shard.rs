//! One shard: the state it owns and the work it does for other shards.
//!
//! A shard is one glommio executor pinned to one core. It owns, with no
//! lock: the connections it serves (every one of them belongs to a user
//! homed here, see `conn`), the sessions of each of its users, the sequence
//! counters of the conversations homed here, and the cached member lists
//! of the groups homed here. Other shards reach this state only through the
//! [`crate::mesh`] queues: [`Shard::handle_request`] serves work for
//! conversations and groups owned here, [`Shard::handle_event`] applies
//! results for users owned here.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use glommio::channels::shared_channel::ConnectedSender;
use rkyv::util::AlignedVec;
use rustc_hash::{FxHashMap, FxHashSet};
use slab::Slab;
use tern_proto::session::Refusal;
use tern_proto::{
    encode_server, shard_of, ChatMessage, ConvId, ErrorCode, GroupId, ServerBody, ServerFrame, UserId,
};
use tern_storage::{Store, StoreError};

use crate::config::Config;
use crate::mesh::{ConnKey, Event, GroupOp, GroupReply, Recipients, Request};
use crate::outbox::Outbox;
use crate::stop::StopSignal;

/// A live connection of a user homed on this shard.
struct ConnEntry {
    generation: u32,
    user: UserId,
    fd: RawFd,
    outbox: Rc<Outbox>,
}

/// A group homed on this shard, as cached for fan-out.
struct GroupState {
    members: FxHashSet<UserId>,
    /// Members by home shard: one shared list per destination, so a message
    /// crosses to each shard once, carrying this list, with no copying.
    by_shard: Vec<Arc<[UserId]>>,
}

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
    conv_seqs: RefCell<FxHashMap<ConvId, u64>>,
    groups: RefCell<FxHashMap<GroupId, Rc<GroupState>>>,
    requests_out: Vec<Option<ConnectedSender<Request>>>,
    events_out: Vec<Option<ConnectedSender<Event>>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encodes a frame into a fresh shareable buffer.
pub fn encode_shared(frame: &ServerFrame, max_frame_bytes: u32) -> Arc<AlignedVec> {
    let mut buf = AlignedVec::new();
    if let Err(e) = encode_server(frame, &mut buf, max_frame_bytes) {
        tracing::error!(error = %e, "server built an unencodable frame");
    }
    Arc::new(buf)
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

fn refusal(code: ErrorCode, message: &'static str) -> Refusal {
    Refusal {
        code,
        message,
        close: false,
    }
}

impl Shard {
    /// A shard with its outgoing queue ends (already connected).
    pub fn new(
        index: usize,
        config: Arc<Config>,
        store: Store,
        requests_out: Vec<Option<ConnectedSender<Request>>>,
        events_out: Vec<Option<ConnectedSender<Event>>>,
    ) -> Shard {
        Shard {
            index,
            shards: config.shards,
            config,
            store,
            stop: StopSignal::default(),
            conns: RefCell::new(Slab::new()),
            next_generation: Cell::new(0),
            sessions: RefCell::new(FxHashMap::default()),
            conv_seqs: RefCell::new(FxHashMap::default()),
            groups: RefCell::new(FxHashMap::default()),
            requests_out,
            events_out,
        }
    }

    /// The home shard of a user, group or conversation key.
    pub fn home_of(&self, key: u64) -> usize {
        shard_of(key, self.shards)
    }

    /// Runs a store operation on the executor's blocking thread pool, so
    /// that disk I/O and password hashing never stall the reactor.
    pub async fn blocking<R, F>(&self, f: F) -> R
    where
        F: FnOnce(&Store) -> R + Send + 'static,
        R: Send + 'static,
    {
        let store = self.store.clone();
        glommio::executor().spawn_blocking(move || f(&store)).await
    }

    /// Registers a connection of `user`. Returns its key and whether it is
    /// the user's first live session here.
    pub fn add_conn(&self, user: UserId, fd: RawFd, outbox: Rc<Outbox>) -> Result<(ConnKey, bool), Refusal> {
        let mut sessions = self.sessions.borrow_mut();
        let list = sessions.entry(user).or_default();
        if list.len() >= self.config.max_sessions_per_user {
            return Err(refusal(
                ErrorCode::LimitExceeded,
                "too many simultaneous sessions for this user",
            ));
        }
        let generation = self.next_generation.get().wrapping_add(1);
        self.next_generation.set(generation);
        let slot = self.conns.borrow_mut().insert(ConnEntry {
            generation,
            user,
            fd,
            outbox,
        });
        let key = ConnKey {
            slot: slot as u32,
            generation,
        };
        list.push(key);
        Ok((key, list.len() == 1))
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

    /// Live connections on this shard.
    pub fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Whether `user` has a live session (only meaningful on their home shard).
    pub fn is_online(&self, user: UserId) -> bool {
        self.sessions.borrow().contains_key(&user)
    }

    fn outbox_of(&self, key: ConnKey) -> Option<Rc<Outbox>> {
        let conns = self.conns.borrow();
        let entry = conns.get(key.slot as usize)?;
        (entry.generation == key.generation).then(|| entry.outbox.clone())
    }

    /// Calls `f` with the outbox of every session of `user` except `skip`.
    fn for_each_session(&self, user: UserId, skip: Option<ConnKey>, mut f: impl FnMut(&Outbox)) {
        let sessions = self.sessions.borrow();
        let Some(keys) = sessions.get(&user) else { return };
        let conns = self.conns.borrow();
        for key in keys.iter().filter(|k| Some(**k) != skip) {
            if let Some(entry) = conns.get(key.slot as usize) {
                f(&entry.outbox);
            }
        }
    }

    /// Tells every connection to go away, with a retry hint.
    pub fn drain_connections(&self, retry_after_ms: u32) {
        for (_, entry) in self.conns.borrow().iter() {
            entry
                .outbox
                .finish(ErrorCode::ShuttingDown, "server is shutting down", retry_after_ms);
        }
    }

    /// Closes the sockets of connections that did not finish in time.
    pub fn abort_connections(&self) {
        for (_, entry) in self.conns.borrow().iter() {
            entry.outbox.close();
            // SAFETY: shutdown on a descriptor we own has no memory effects;
            // it makes the connection's pending reads and writes complete.
            unsafe { libc::shutdown(entry.fd, libc::SHUT_RDWR) };
        }
    }

    /// Sends a request to the shard that owns its conversation or group;
    /// waits while that queue is full.
    pub async fn send_request(self: &Rc<Self>, shard: usize, request: Request) {
        if shard == self.index {
            return Box::pin(self.handle_request(request)).await;
        }
        if let Some(Some(tx)) = self.requests_out.get(shard) {
            if tx.send(request).await.is_err() {
                tracing::warn!(shard, "request queue closed; shard is stopping");
            }
        }
    }

    /// Sends an event to the shard that owns its user; waits while that
    /// queue is full.
    pub async fn send_event(self: &Rc<Self>, shard: usize, event: Event) {
        if shard == self.index {
            return self.handle_event(event);
        }
        if let Some(Some(tx)) = self.events_out.get(shard) {
            if tx.send(event).await.is_err() {
                tracing::warn!(shard, "event queue closed; shard is stopping");
            }
        }
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
                let conv = ConvId::direct(from, to);
                let seq = self.next_seq(conv);
                let timestamp_ms = now_ms();
                let frame = self.message_frame(ChatMessage {
                    conv,
                    seq,
                    from,
                    client_msg_id,
                    timestamp_ms,
                    content,
                });
                let deliver = Event::Deliver {
                    to: Recipients::One(to),
                    frame: frame.clone(),
                    skip: None,
                };
                self.send_event(self.home_of(to), deliver).await;
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
                self.send_event(self.home_of(from), sent).await;
            }
            Request::Group {
                from,
                conn,
                request_id,
                group,
                client_msg_id,
                content,
            } => {
                let state = match self.group_state(group).await {
                    Ok(state) => state,
                    Err(e) => return self.reply(from, conn, store_error_frame(request_id, &e)).await,
                };
                if !state.members.contains(&from) {
                    let frame =
                        ServerFrame::error(request_id, ErrorCode::Forbidden, "not a member of this group");
                    return self.reply(from, conn, frame).await;
                }
                let conv = ConvId::Group { group };
                let seq = self.next_seq(conv);
                let timestamp_ms = now_ms();
                let frame = self.message_frame(ChatMessage {
                    conv,
                    seq,
                    from,
                    client_msg_id,
                    timestamp_ms,
                    content,
                });
                for (shard, members) in state.by_shard.iter().enumerate() {
                    if members.is_empty() {
                        continue;
                    }
                    let deliver = Event::Deliver {
                        to: Recipients::Many(members.clone()),
                        frame: frame.clone(),
                        skip: Some((from, conn)),
                    };
                    self.send_event(shard, deliver).await;
                }
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
        }
    }

    async fn reply(self: &Rc<Self>, user: UserId, conn: ConnKey, frame: ServerFrame) {
        let frame = encode_shared(&frame, self.config.max_frame_bytes);
        self.send_event(self.home_of(user), Event::Reply { user, conn, frame })
            .await;
    }

    fn next_seq(&self, conv: ConvId) -> u64 {
        let mut seqs = self.conv_seqs.borrow_mut();
        let seq = seqs.entry(conv).or_insert(0);
        *seq += 1;
        *seq
    }

    fn message_frame(&self, message: ChatMessage) -> Arc<AlignedVec> {
        let frame = ServerFrame {
            request_id: 0,
            body: ServerBody::Message(message),
        };
        encode_shared(&frame, self.config.max_frame_bytes)
    }

    /// The cached state of a group homed here, loaded on first use.
    async fn group_state(&self, group: GroupId) -> Result<Rc<GroupState>, StoreError> {
        if let Some(state) = self.groups.borrow().get(&group) {
            return Ok(state.clone());
        }
        let members = self
            .blocking(move |store| match store.group(group)? {
                Some(_) => store.members(group),
                None => Err(StoreError::NotFound),
            })
            .await?;
        // Another task may have loaded it while we waited; keep theirs,
        // which may already include later membership changes.
        let mut groups = self.groups.borrow_mut();
        let state = groups
            .entry(group)
            .or_insert_with(|| Rc::new(self.build_group(members.into_iter().collect())));
        Ok(state.clone())
    }

    fn build_group(&self, members: FxHashSet<UserId>) -> GroupState {
        let mut by_shard: Vec<Vec<UserId>> = vec![Vec::new(); self.shards];
        for &member in &members {
            if let Some(list) = by_shard.get_mut(self.home_of(member)) {
                list.push(member);
            }
        }
        GroupState {
            members,
            by_shard: by_shard.into_iter().map(Arc::from).collect(),
        }
    }

    async fn group_admin(&self, user: UserId, group: GroupId, op: GroupOp) -> GroupReply {
        let map_err = |e: StoreError| match e {
            StoreError::NotFound => refusal(ErrorCode::NotFound, "no such group"),
            StoreError::LimitExceeded(_) => refusal(ErrorCode::LimitExceeded, "the group is full"),
            other => {
                tracing::error!(error = %other, group, "group store failure");
                refusal(ErrorCode::Internal, "internal storage error; retry later")
            }
        };
        match op {
            GroupOp::Members => {
                let state = self.group_state(group).await.map_err(map_err)?;
                if !state.members.contains(&user) {
                    return Err(refusal(ErrorCode::Forbidden, "not a member of this group"));
                }
                let mut members: Vec<UserId> = state.members.iter().copied().collect();
                members.sort_unstable();
                Ok(members)
            }
            GroupOp::Join | GroupOp::Leave => {
                let join = op == GroupOp::Join;
                self.blocking(move |store| {
                    if join {
                        store.add_member(group, user)
                    } else {
                        store.remove_member(group, user)
                    }
                })
                .await
                .map_err(map_err)?;
                let mut groups = self.groups.borrow_mut();
                if let Some(state) = groups.get(&group) {
                    let mut members = state.members.clone();
                    if join {
                        members.insert(user);
                    } else {
                        members.remove(&user);
                    }
                    let rebuilt = Rc::new(self.build_group(members));
                    groups.insert(group, rebuilt);
                }
                Ok(Vec::new())
            }
        }
    }

    /// Applies an event for users homed here. Never waits.
    pub fn handle_event(self: &Rc<Self>, event: Event) {
        match event {
            Event::Handoff(handoff) => {
                glommio::spawn_local(crate::conn::adopt(self.clone(), *handoff)).detach();
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
                if let Some(outbox) = self.outbox_of(conn) {
                    let frame = ServerFrame {
                        request_id,
                        body: ServerBody::Sent {
                            client_msg_id,
                            conv,
                            seq,
                            timestamp_ms,
                        },
                    };
                    let _ = outbox.push(&frame);
                }
                if let Some(echo) = echo {
                    self.for_each_session(user, Some(conn), |outbox| {
                        let _ = outbox.push_encoded(&echo);
                    });
                }
            }
            Event::Deliver { to, frame, skip } => {
                let deliver = |user: UserId| {
                    let skip_conn = skip.filter(|(u, _)| *u == user).map(|(_, c)| c);
                    self.for_each_session(user, skip_conn, |outbox| {
                        let _ = outbox.push_encoded(&frame);
                    });
                };
                match to {
                    Recipients::One(user) => deliver(user),
                    Recipients::Many(users) => users.iter().copied().for_each(deliver),
                }
            }
            Event::Reply { conn, frame, .. } => {
                if let Some(outbox) = self.outbox_of(conn) {
                    let _ = outbox.push_encoded(&frame);
                }
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
                    self.for_each_session(user, None, |outbox| {
                        let _ = outbox.push_encoded(&frame);
                    });
                }
            }
            Event::OnlineQuery { users, reply } => {
                let online = users.into_iter().filter(|u| self.is_online(*u)).collect();
                let _ = reply.send(online);
            }
        }
    }

    /// Tells `user`'s friends, on their home shards, that `user` came
    /// online or went offline.
    pub async fn announce_presence(self: Rc<Self>, user: UserId, online: bool) {
        let friends = match self.blocking(move |store| store.friends(user)).await {
            Ok(friends) => friends,
            Err(e) => return tracing::warn!(error = %e, user, "cannot load friends for presence"),
        };
        for (shard, friends) in self.partition(friends).into_iter().enumerate() {
            if !friends.is_empty() {
                self.send_event(
                    shard,
                    Event::Presence {
                        to: friends,
                        subject: user,
                        online,
                    },
                )
                .await;
            }
        }
    }

    /// Which of `users` are online, asking each of their home shards.
    pub async fn online_among(self: &Rc<Self>, users: Vec<UserId>) -> FxHashSet<UserId> {
        let mut online = FxHashSet::default();
        for (shard, users) in self.partition(users).into_iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let (tx, rx) = futures_channel::oneshot::channel();
            self.send_event(shard, Event::OnlineQuery { users, reply: tx })
                .await;
            if let Ok(found) = rx.await {
                online.extend(found);
            }
        }
        online
    }

    /// Splits users by home shard.
    fn partition(&self, users: Vec<UserId>) -> Vec<Vec<UserId>> {
        let mut by_shard = vec![Vec::new(); self.shards];
        for user in users {
            if let Some(list) = by_shard.get_mut(self.home_of(user)) {
                list.push(user);
            }
        }
        by_shard
    }
}
