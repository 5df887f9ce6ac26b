//! Groups homed on this shard: cached member lists and roles, fan-out,
//! membership and the group rules.
//!
//! A group's home shard keeps its members and their roles in memory, split
//! by the members' home shards, so a group message crosses to each
//! destination shard once, carrying a shared list, not once per member.
//! Every membership, role and invite change for a group runs here: the
//! rules of docs/protocol.md 2.8.9 are checked against the cache, then the
//! store is written, then the cache is updated, with the group's changes
//! serialised by a per-group semaphore so no check sees a state another
//! change is about to replace.

use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;
use rustc_hash::FxHashMap;
use tern_proto::session::Refusal;
use tern_proto::{
    ChatMessage, Content, ConvId, ErrorCode, GroupId, GroupMember, GroupRole, ReceiptKind, ServerFrame,
    UserId,
};
use tern_storage::{GroupRoster, InboxTargets, MessageWrite, StoreError, WriteOp};

use super::commit::{store_frame, Effect};
use super::{refusal, store_error_frame, Shard};
use crate::mesh::{ConnKey, Event, GroupAnswer, GroupOp, GroupReply, Recipients};

/// A group homed on this shard, as cached for fan-out and the group rules.
pub(super) struct GroupState {
    name: String,
    owner: UserId,
    open: bool,
    /// Every member's role; the keys are the member set.
    members: FxHashMap<UserId, GroupRole>,
    /// One permit: held from a change's checks to its cache update. Shared
    /// by every rebuilt state of the group (entries are never evicted).
    changes: Rc<Semaphore>,
    /// Every member, for write diffusion into inboxes.
    all: Arc<[UserId]>,
    /// Members by home shard: one shared list per destination.
    by_shard: Vec<Arc<[UserId]>>,
}

impl Shard {
    /// The cached state of a group homed here, loaded on first use.
    async fn group_state(&self, group: GroupId) -> Result<Rc<GroupState>, StoreError> {
        if let Some(state) = self.groups.borrow().get(&group) {
            return Ok(state.clone());
        }
        let roster = self
            .blocking(move |store| store.group_roster(group)?.ok_or(StoreError::NotFound))
            .await?;
        // Another task may have loaded it while we waited; keep theirs,
        // which may already include later membership changes.
        let mut groups = self.groups.borrow_mut();
        let state = groups.entry(group).or_insert_with(|| {
            let GroupRoster {
                name,
                owner,
                open,
                members,
                ..
            } = roster;
            let base = GroupBase {
                name,
                owner,
                open,
                changes: Rc::new(Semaphore::new(1)),
            };
            Rc::new(self.build_group(base, members.into_iter().collect()))
        });
        Ok(state.clone())
    }

    fn build_group(&self, base: GroupBase, members: FxHashMap<UserId, GroupRole>) -> GroupState {
        let mut by_shard: Vec<Vec<UserId>> = vec![Vec::new(); self.shards];
        for &member in members.keys() {
            if let Some(list) = by_shard.get_mut(self.home_of(member)) {
                list.push(member);
            }
        }
        let all: Arc<[UserId]> = members.keys().copied().collect();
        GroupState {
            name: base.name,
            owner: base.owner,
            open: base.open,
            members,
            changes: base.changes,
            all,
            by_shard: by_shard.into_iter().map(Arc::from).collect(),
        }
    }

    /// Replaces the cached state of `group` (if loaded) by one with
    /// `change` applied to its members. Does not yield.
    fn update_members(&self, group: GroupId, change: impl FnOnce(&mut FxHashMap<UserId, GroupRole>)) {
        let mut groups = self.groups.borrow_mut();
        if let Some(state) = groups.get(&group) {
            let mut members = state.members.clone();
            change(&mut members);
            let base = GroupBase {
                name: state.name.clone(),
                owner: state.owner,
                open: state.open,
                changes: state.changes.clone(),
            };
            let rebuilt = Rc::new(self.build_group(base, members));
            groups.insert(group, rebuilt);
        }
    }

    /// Sequences, stores and fans out a group message.
    pub(super) async fn group_send(
        self: &Rc<Self>,
        from: UserId,
        conn: ConnKey,
        request_id: u64,
        group: GroupId,
        client_msg_id: u64,
        content: Content,
    ) {
        let state = match self.group_state(group).await {
            Ok(state) => state,
            Err(e) => return self.reply(from, conn, store_error_frame(request_id, &e)).await,
        };
        if !state.members.contains_key(&from) {
            let frame = ServerFrame::error(request_id, ErrorCode::Forbidden, "not a member of this group");
            return self.reply(from, conn, frame).await;
        }
        let conv = ConvId::Group { group };
        let Some((seq, timestamp_ms)) = self.sequence(conv, from, conn, request_id, client_msg_id).await
        else {
            return;
        };
        let frame = self.message_frame(ChatMessage {
            conv,
            seq,
            from,
            client_msg_id,
            timestamp_ms,
            content,
        });
        // Small groups also copy the message into each member's inbox;
        // large ones are caught up from the group history by cursor.
        let inbox = if state.all.len() <= self.config.write_diffusion_max_members {
            InboxTargets::Many(state.all.clone())
        } else {
            InboxTargets::None
        };
        let write = MessageWrite {
            conv,
            seq,
            from,
            client_msg_id,
            timestamp_ms,
            frame: store_frame(&frame),
            inbox,
        };
        let mut effects = vec![Effect::Durable {
            conv,
            from,
            client_msg_id,
        }];
        for (shard, members) in state.by_shard.iter().enumerate().filter(|(_, m)| !m.is_empty()) {
            let deliver = Event::Deliver {
                to: Recipients::Many(members.clone()),
                conv,
                seq,
                frame: frame.clone(),
                skip: Some((from, conn)),
            };
            effects.push(Effect::Event(shard, deliver));
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
        effects.push(Effect::Event(self.home_of(from), sent));
        self.stage(WriteOp::Message(write), effects);
    }

    /// Runs a membership, role or invite operation for a group homed here.
    pub(super) async fn group_admin(&self, user: UserId, group: GroupId, op: GroupOp) -> GroupReply {
        let state = self
            .group_state(group)
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))?;
        let caller_role = state.members.get(&user).copied();
        match op {
            GroupOp::Members | GroupOp::Info => {
                if caller_role.is_none() {
                    return Err(refusal(ErrorCode::Forbidden, "not a member of this group"));
                }
                let mut members: Vec<GroupMember> = state
                    .members
                    .iter()
                    .map(|(&user, &role)| GroupMember { user, role })
                    .collect();
                members.sort_unstable_by_key(|m| m.user);
                return Ok(if op == GroupOp::Members {
                    GroupAnswer::Members(members.into_iter().map(|m| m.user).collect())
                } else {
                    GroupAnswer::Info {
                        name: state.name.clone(),
                        open: state.open,
                        members,
                    }
                });
            }
            _ => {}
        }
        // Changes: check, write and update the cache under the group's
        // permit, against the state as it is once the permit is ours.
        let changes = state.changes.clone();
        drop(state);
        let _permit = changes
            .acquire_permit(1)
            .await
            .map_err(|_| refusal(ErrorCode::ShuttingDown, "server is shutting down"))?;
        let state = self
            .group_state(group)
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))?;
        let caller_role = state.members.get(&user).copied();
        match op {
            GroupOp::Members | GroupOp::Info => Err(refusal(ErrorCode::Internal, "not a change")),
            GroupOp::Join => {
                if caller_role.is_some() {
                    return Ok(GroupAnswer::Done);
                }
                if !state.open {
                    let invited = self
                        .blocking(move |store| store.has_invite(group, user))
                        .await
                        .map_err(|e| store_refusal(e, group, "no such group"))?;
                    if !invited {
                        return Err(refusal(
                            ErrorCode::Forbidden,
                            "this group is invite-only; ask its owner or an admin for an invite",
                        ));
                    }
                }
                drop(state);
                self.join(user, group).await
            }
            GroupOp::Leave => match caller_role {
                None => Ok(GroupAnswer::Done),
                Some(GroupRole::Owner) => Err(refusal(
                    ErrorCode::InvalidArgument,
                    "the owner cannot leave; delete is not supported",
                )),
                Some(_) => self.remove(group, user).await,
            },
            GroupOp::Invite(target) => {
                if !matches!(caller_role, Some(GroupRole::Owner | GroupRole::Admin)) {
                    return Err(refusal(
                        ErrorCode::Forbidden,
                        "only the group's owner or an admin can invite",
                    ));
                }
                if state.members.contains_key(&target) {
                    return Ok(GroupAnswer::Done);
                }
                self.blocking(move |store| store.invite(group, target))
                    .await
                    .map_err(|e| store_refusal(e, group, "no such user"))?;
                Ok(GroupAnswer::Done)
            }
            GroupOp::Kick(target) => {
                if !matches!(caller_role, Some(GroupRole::Owner | GroupRole::Admin)) {
                    return Err(refusal(
                        ErrorCode::Forbidden,
                        "only the group's owner or an admin can kick",
                    ));
                }
                if target == user {
                    return Err(refusal(
                        ErrorCode::InvalidArgument,
                        "you cannot kick yourself; leave the group instead",
                    ));
                }
                match (caller_role, state.members.get(&target)) {
                    (_, None) => Err(refusal(ErrorCode::NotFound, "not a member of this group")),
                    (_, Some(GroupRole::Owner)) => {
                        Err(refusal(ErrorCode::Forbidden, "the owner cannot be kicked"))
                    }
                    (Some(GroupRole::Admin), Some(GroupRole::Admin)) => Err(refusal(
                        ErrorCode::Forbidden,
                        "an admin cannot kick another admin",
                    )),
                    _ => {
                        drop(state);
                        self.remove(group, target).await
                    }
                }
            }
            GroupOp::SetRole(target, role) => {
                if caller_role != Some(GroupRole::Owner) {
                    return Err(refusal(
                        ErrorCode::Forbidden,
                        "only the group's owner can change roles",
                    ));
                }
                if role == GroupRole::Owner {
                    return Err(refusal(
                        ErrorCode::InvalidArgument,
                        "the Owner role cannot be assigned (ownership transfer is not supported)",
                    ));
                }
                if target == user {
                    return Err(refusal(
                        ErrorCode::InvalidArgument,
                        "the owner cannot change their own role",
                    ));
                }
                if !state.members.contains_key(&target) {
                    return Err(refusal(ErrorCode::NotFound, "not a member of this group"));
                }
                drop(state);
                self.blocking(move |store| store.set_member_role(group, target, role))
                    .await
                    .map_err(|e| store_refusal(e, group, "not a member of this group"))?;
                self.update_members(group, |members| {
                    members.insert(target, role);
                });
                Ok(GroupAnswer::Done)
            }
        }
    }

    /// Adds `user` to `group` (the checks are done): store, read cursor,
    /// cache.
    async fn join(&self, user: UserId, group: GroupId) -> GroupReply {
        let map_err = |e| store_refusal(e, group, "no such group");
        self.blocking(move |store| store.add_member(group, user))
            .await
            .map_err(map_err)?;
        // A new member starts at the group's current seq, so a sync does
        // not replay what was said before they joined.
        let conv = ConvId::Group { group };
        let joined_at = self.last_seq(conv).await.map_err(map_err)?;
        // From here to the cache update nothing yields: every message
        // sequenced after `joined_at` sees the new member list.
        let cursor_stored = (joined_at > 0).then(|| {
            let (tx, rx) = futures_channel::oneshot::channel();
            self.stage_receipt(user, conv, ReceiptKind::Read, joined_at, Some(tx), None);
            rx
        });
        self.update_members(group, |members| {
            members.insert(user, GroupRole::Member);
        });
        // Answer only once the cursor is stored, or a sync right after the
        // join would replay the whole group.
        if let Some(stored) = cursor_stored {
            if stored.await != Ok(true) {
                return Err(refusal(ErrorCode::Internal, "join not stored; retry"));
            }
        }
        Ok(GroupAnswer::Done)
    }

    /// Removes `user` from `group` (a leave or a kick; the checks are
    /// done). The cache is updated as soon as the store has it, so no
    /// message sequenced after the answer reaches them.
    async fn remove(&self, group: GroupId, user: UserId) -> GroupReply {
        self.blocking(move |store| store.remove_member(group, user))
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))?;
        self.update_members(group, |members| {
            members.remove(&user);
        });
        Ok(GroupAnswer::Done)
    }
}

/// The fixed part of a cached group, carried over when its members change.
struct GroupBase {
    name: String,
    owner: UserId,
    open: bool,
    changes: Rc<Semaphore>,
}

/// The refusal for a store error of a group operation; `not_found` says
/// what was missing.
fn store_refusal(e: StoreError, group: GroupId, not_found: &'static str) -> Refusal {
    match e {
        StoreError::NotFound => refusal(ErrorCode::NotFound, not_found),
        StoreError::LimitExceeded(why) => refusal(ErrorCode::LimitExceeded, why),
        StoreError::InvalidArgument(why) => refusal(ErrorCode::InvalidArgument, why),
        other => {
            tracing::error!(error = %other, group, "group store failure");
            refusal(ErrorCode::Internal, "internal storage error; retry later")
        }
    }
}
