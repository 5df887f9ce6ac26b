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
//! change is about to replace. Joins queue per group and are applied in
//! batches by whichever of them holds the permit: a crowd joining a group
//! at once costs a few store writes, not one each. A join batch fences the
//! group's sends from its store write to its cache update, so the joiners'
//! start it stores is the group's last seq, none of it still in flight.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;
use rustc_hash::FxHashMap;
use tern_proto::session::Refusal;
use tern_proto::{
    ArchivedGroupMember, ChatMessage, Content, ConvId, ErrorCode, GroupId, GroupMember, GroupRole,
    ReceiptKind, ServerBody, ServerFrame, UserId,
};
use tern_storage::{
    Departed, GroupRoster, InboxTargets, JoinOutcome, MessageWrite, StoreError, WriteOp, MAX_JOIN_BATCH,
};

use super::commit::{store_frame, Effect};
use super::loads::{InFlight, ReadGuard};
use super::{refusal, store_error_frame, Shard};
use crate::catchup::{ids_per_page, page_budget};
use crate::mesh::{ConnKey, Event, GroupAnswer, GroupOp, GroupReply, Recipients};

/// The joins of one group waiting to be applied.
#[derive(Default)]
pub(super) struct JoinQueue {
    /// Who, and where each answer goes, in arrival order.
    waiting: Vec<(UserId, futures_channel::oneshot::Sender<GroupReply>)>,
    /// A task is applying this queue's joins (and will take these too).
    draining: bool,
}

/// A membership change's hold on its group's sequencing ([`Shard::fence_sends`]):
/// dropping it, on every path, lets the waiting sends go.
struct SendFence<'a> {
    shard: &'a Shard,
    group: GroupId,
}

impl Drop for SendFence<'_> {
    fn drop(&mut self) {
        let waiters = self.shard.send_fences.borrow_mut().remove(&self.group);
        for waker in waiters.into_iter().flatten() {
            waker.wake();
        }
    }
}

/// The groups homed on this shard that are cached, within
/// `max_cached_group_members` members in all: past it, loading a group
/// evicts the least recently used idle ones (no task holds their state or
/// their permit, no joins queued) down to 7/8 of the budget. An evicted
/// group is loaded again from the store, which has every change: a change
/// writes the store before it updates the cache, and holds the group's
/// permit (so the group is not idle) from its checks to that update.
#[derive(Default)]
pub(super) struct GroupCache {
    map: FxHashMap<GroupId, Rc<GroupState>>,
    /// Members of the cached groups, summed.
    members: usize,
    /// Ticks on every use, for least-recently-used eviction.
    clock: u64,
    /// Groups being read from the store: every eviction or removal of one
    /// outdates its reads in flight, since a load that sees its group
    /// evicted while it read may hold a roster older than a change made,
    /// cached and evicted meanwhile, and must read again.
    loading: InFlight<GroupId>,
}

impl GroupCache {
    fn get(&mut self, group: GroupId) -> Option<Rc<GroupState>> {
        self.clock += 1;
        let state = self.map.get(&group)?;
        state.last_used.set(self.clock);
        Some(state.clone())
    }

    fn reads(&mut self) -> &mut InFlight<GroupId> {
        &mut self.loading
    }

    fn insert(&mut self, group: GroupId, state: Rc<GroupState>) {
        self.members += state.members.len();
        if let Some(old) = self.map.insert(group, state) {
            self.members = self.members.saturating_sub(old.members.len());
        }
    }

    /// Evicts idle groups, least recently used first, until the members
    /// cached are within 7/8 of `budget` (or no idle group is left).
    fn evict_over(&mut self, budget: usize, joins: &FxHashMap<GroupId, JoinQueue>) {
        if self.members <= budget {
            return;
        }
        let target = budget - budget / 8;
        let mut idle: Vec<(u64, GroupId)> = self
            .map
            .iter()
            .filter(|(group, state)| {
                Rc::strong_count(state) == 1
                    && Rc::strong_count(&state.changes) == 1
                    && !joins.contains_key(*group)
            })
            .map(|(&group, state)| (state.last_used.get(), group))
            .collect();
        idle.sort_unstable();
        for (_, group) in idle {
            if self.members <= target {
                break;
            }
            if let Some(state) = self.map.remove(&group) {
                self.members = self.members.saturating_sub(state.members.len());
                self.loading.outdate(group);
            }
        }
    }

    /// Drops `group` (deleted), telling loads in flight.
    pub(super) fn remove(&mut self, group: GroupId) -> Option<Rc<GroupState>> {
        let state = self.map.remove(&group)?;
        self.members = self.members.saturating_sub(state.members.len());
        self.loading.outdate(group);
        Some(state)
    }

    /// (groups, members) cached, for the metrics.
    pub(super) fn size(&self) -> (usize, usize) {
        (self.map.len(), self.members)
    }
}

/// A group homed on this shard, as cached for fan-out and the group rules.
pub(super) struct GroupState {
    name: String,
    owner: UserId,
    open: bool,
    /// Every member's role; the keys are the member set.
    pub(super) members: FxHashMap<UserId, GroupRole>,
    /// One permit: held from a change's checks to its cache update. Shared
    /// by every rebuilt state of the group; a group whose semaphore anyone
    /// holds or waits on is never evicted, so no two live for one group.
    changes: Rc<Semaphore>,
    /// [`GroupCache::clock`] at the last use.
    last_used: Cell<u64>,
    /// Every member, ascending by id: for write diffusion into inboxes and
    /// for listing the group (a page starts with a binary search).
    pub(super) all: Arc<[UserId]>,
    /// Members by home shard: one shared list per destination.
    by_shard: Vec<Arc<[UserId]>>,
}

impl GroupState {
    /// Each shard with members homed on it, and those members.
    pub(super) fn members_by_shard(&self) -> impl Iterator<Item = (usize, &Arc<[UserId]>)> {
        self.by_shard
            .iter()
            .enumerate()
            .filter(|(_, members)| !members.is_empty())
    }

    /// The members in `ids` (taken from `all`) with their roles.
    fn with_roles(&self, ids: &[UserId]) -> Vec<GroupMember> {
        ids.iter()
            .filter_map(|&user| self.members.get(&user).map(|&role| GroupMember { user, role }))
            .collect()
    }

    /// Answers `Members`, `Info` or `MembersPage` for a member. A listing
    /// of the whole group that could not fit in one frame is refused here,
    /// before it is built, with a pointer to the paged request.
    fn listing(&self, op: GroupOp, max_frame_bytes: u32) -> GroupReply {
        let budget = page_budget(max_frame_bytes);
        let too_large = || {
            refusal(
                ErrorCode::LimitExceeded,
                "the group is too large to list in one frame; use GroupMembersPage",
            )
        };
        match op {
            GroupOp::Members => {
                if self.all.len().saturating_mul(size_of::<u64>()) > budget {
                    return Err(too_large());
                }
                Ok(GroupAnswer::Members(self.all.to_vec()))
            }
            GroupOp::Info => {
                let bytes = self.all.len().saturating_mul(size_of::<ArchivedGroupMember>());
                if bytes.saturating_add(self.name.len()) > budget {
                    return Err(too_large());
                }
                Ok(GroupAnswer::Info {
                    name: self.name.clone(),
                    open: self.open,
                    members: self.with_roles(&self.all),
                })
            }
            GroupOp::MembersPage { after, limit } => {
                let take = ids_per_page(limit, max_frame_bytes, size_of::<ArchivedGroupMember>());
                let start = self.all.partition_point(|&user| user <= after);
                let end = start.saturating_add(take).min(self.all.len());
                let page = self.all.get(start..end).unwrap_or_default();
                Ok(GroupAnswer::MembersPage {
                    members: self.with_roles(page),
                    more: end < self.all.len(),
                })
            }
            _ => Err(refusal(ErrorCode::Internal, "not a listing")),
        }
    }
}

impl Shard {
    /// The cached state of a group homed here, loaded on first use.
    pub(super) async fn group_state(&self, group: GroupId) -> Result<Rc<GroupState>, StoreError> {
        loop {
            let seen = {
                let mut cache = self.groups.borrow_mut();
                if let Some(state) = cache.get(group) {
                    return Ok(state);
                }
                cache.loading.begin(group)
            };
            let _read = ReadGuard::new(&self.groups, GroupCache::reads, group);
            let roster = self
                .blocking(move |store| store.group_roster(group)?.ok_or(StoreError::NotFound))
                .await?;
            let mut cache = self.groups.borrow_mut();
            // Another task may have loaded it while we waited; keep theirs,
            // which may already include later membership changes.
            if let Some(state) = cache.get(group) {
                return Ok(state);
            }
            if cache.loading.changed_since(group, seen) {
                // It may have been loaded, changed and evicted meanwhile.
                continue;
            }
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
            let state = Rc::new(self.build_group(base, members.into_iter().collect()));
            state.last_used.set(cache.clock);
            cache.insert(group, state.clone());
            cache.evict_over(self.config.max_cached_group_members, &self.join_queues.borrow());
            self.note_group_cache(&cache);
            return Ok(state);
        }
    }

    pub(super) fn note_group_cache(&self, cache: &GroupCache) {
        let (groups, members) = cache.size();
        self.m().groups_cached(groups, members);
    }

    fn build_group(&self, base: GroupBase, members: FxHashMap<UserId, GroupRole>) -> GroupState {
        let mut all: Vec<UserId> = members.keys().copied().collect();
        all.sort_unstable();
        let mut by_shard: Vec<Vec<UserId>> = vec![Vec::new(); self.shards];
        for &member in &all {
            if let Some(list) = by_shard.get_mut(self.home_of(member)) {
                list.push(member);
            }
        }
        let all: Arc<[UserId]> = all.into();
        GroupState {
            name: base.name,
            owner: base.owner,
            open: base.open,
            members,
            changes: base.changes,
            last_used: Cell::new(0),
            all,
            by_shard: by_shard.into_iter().map(Arc::from).collect(),
        }
    }

    /// Replaces the cached state of `group` (if loaded) by one with
    /// `change` applied to its members. Does not yield.
    fn update_members(&self, group: GroupId, change: impl FnOnce(&mut FxHashMap<UserId, GroupRole>)) {
        self.update_cached(group, |_, members| change(members));
    }

    /// [`Shard::update_members`] that may also change the owner.
    fn update_cached(
        &self,
        group: GroupId,
        change: impl FnOnce(&mut UserId, &mut FxHashMap<UserId, GroupRole>),
    ) {
        let mut cache = self.groups.borrow_mut();
        if let Some(state) = cache.get(group) {
            let mut members = state.members.clone();
            let mut owner = state.owner;
            change(&mut owner, &mut members);
            let base = GroupBase {
                name: state.name.clone(),
                owner,
                open: state.open,
                changes: state.changes.clone(),
            };
            let rebuilt = Rc::new(self.build_group(base, members));
            rebuilt.last_used.set(state.last_used.get());
            drop(state);
            cache.insert(group, rebuilt);
            // Joins may take the cache past its budget too; this group is
            // in use (its permit is held), so only others go.
            cache.evict_over(self.config.max_cached_group_members, &self.join_queues.borrow());
            self.note_group_cache(&cache);
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
        let conv = ConvId::Group { group };
        // A retry of a message sequenced while the sender was a member
        // gets its original answer even if they have left or been removed
        // since (protocol.md 2.8.4): `sequence` answers it, never anew.
        let refused = match self.may_be_member(group, from).await {
            Ok(true) => None,
            Ok(false) if self.is_retry(conv, from, client_msg_id).await => None,
            Ok(false) => Some(refusal(ErrorCode::Forbidden, "not a member of this group")),
            Err(refused) => Some(refused),
        };
        if let Some(refused) = refused {
            let frame = ServerFrame::error(request_id, refused.code, refused.message);
            return self.reply(from, conn, frame).await;
        }
        // A recall's target is read before the snapshot below: that read
        // waits on the disk, and nothing may wait between the snapshot and
        // the seq. Members only, first: the answers about the target (its
        // sender, whether it exists) are for the group's members.
        let erase = match content.kind {
            tern_proto::ContentKind::Recall { seq: target } => {
                match self.group_state(group).await {
                    Ok(state) if state.members.contains_key(&from) => {}
                    Ok(_) if self.is_retry(conv, from, client_msg_id).await => {}
                    Ok(_) => {
                        let frame = ServerFrame::error(
                            request_id,
                            ErrorCode::Forbidden,
                            "not a member of this group",
                        );
                        return self.reply(from, conn, frame).await;
                    }
                    Err(e) => return self.reply(from, conn, store_error_frame(request_id, &e)).await,
                }
                match self.check_recall(conv, from, client_msg_id, target).await {
                    Ok(erase) => erase,
                    Err(refused) => return self.reply(from, conn, refused.frame(request_id)).await,
                }
            }
            _ => None,
        };
        // The membership check, the seq and the fan-out list must come
        // from one moment: a kick or ban that completes in between would
        // otherwise let a removed member send, or receive, a message
        // sequenced after its Ok. So load both the conversation and the
        // group first, and take the snapshot only when both are cached:
        // from there to the assigned seq nothing yields.
        let state = loop {
            if let Err(e) = self.ensure_conv(conv).await {
                return self.reply(from, conn, store_error_frame(request_id, &e)).await;
            }
            let state = match self.group_state(group).await {
                Ok(state) => state,
                Err(e) => return self.reply(from, conn, store_error_frame(request_id, &e)).await,
            };
            if self.sends_fenced(group) {
                // A membership change is storing its members' start or
                // a departure's end: wait for it, and take the snapshot
                // after, with the roster it leaves. A retry waits
                // too and then gets its original answer from `sequence`.
                drop(state);
                self.send_fence_lifted(group).await;
                continue;
            }
            if self.conv_cached(conv) {
                break state;
            }
        };
        if !state.members.contains_key(&from) && !self.seen_client_msg_id(conv, from, client_msg_id) {
            let frame = ServerFrame::error(request_id, ErrorCode::Forbidden, "not a member of this group");
            return self.reply(from, conn, frame).await;
        }
        let Some((seq, timestamp_ms, _)) = self.sequence(conv, from, conn, request_id, client_msg_id).await
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
            moved_from: None,
        };
        let mut effects = vec![Effect::Durable {
            conv,
            from,
            client_msg_id,
            seq,
        }];
        for (shard, members) in state.members_by_shard() {
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
        // With the recall, in the same store batch.
        if let Some(erase) = erase {
            self.stage(erase, []);
        }
    }

    /// Whether `user` may be a member of `group`, asked before a request
    /// that only members may make loads the group. For a group not cached
    /// here the store answers with two point reads, before the roster (up
    /// to `max_group_members` rows) is loaded: otherwise anyone could make
    /// this shard load every group by id, each one evicting groups in use,
    /// with requests that are then refused. `true` for a cached group (its
    /// roster answers), `NotFound` for a group that does not exist.
    pub(super) async fn may_be_member(&self, group: GroupId, user: UserId) -> Result<bool, Refusal> {
        if self.groups.borrow().map.contains_key(&group) {
            return Ok(true);
        }
        let (member, exists) = self
            .blocking(move |store| Ok((store.is_member(group, user)?, store.group(group)?.is_some())))
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))?;
        if !exists {
            return Err(refusal(ErrorCode::NotFound, "no such group"));
        }
        Ok(member)
    }

    /// Runs a membership, role or invite operation for a group homed here.
    pub(super) async fn group_admin(
        self: &Rc<Self>,
        user: UserId,
        group: GroupId,
        op: GroupOp,
    ) -> GroupReply {
        if op == GroupOp::Uninvite(user) {
            // Declining one's own invite touches only that invite: no roster
            // to load, no group permit to wait for (the store takes the
            // groups lock itself), member or not.
            self.blocking(move |store| store.uninvite(group, user))
                .await
                .map_err(|e| store_refusal(e, group, "no such group"))?;
            return Ok(GroupAnswer::Done);
        }
        if op == GroupOp::Join {
            // Anyone may ask to join any group id: a join the store can
            // already refuse (banned, not invited) is answered from it,
            // without loading the group's roster or fencing its sends.
            let cached_member = self
                .groups
                .borrow()
                .map
                .get(&group)
                .is_some_and(|state| state.members.contains_key(&user));
            if !cached_member {
                let known = self
                    .blocking(move |store| store.join_check(group, user))
                    .await
                    .map_err(|e| store_refusal(e, group, "no such group"))?;
                // A member by the store whom the loaded roster lacks (a
                // join whose sync failed after its batch was written) goes
                // on to the join below, which puts them in the roster:
                // answered here, they would stay unable to send until the
                // group left the cache.
                let roster_lacks_member = matches!(known, Some(JoinOutcome::AlreadyMember))
                    && self.groups.borrow().map.contains_key(&group);
                if let Some(outcome) = known.filter(|_| !roster_lacks_member) {
                    return join_answer(&outcome);
                }
            }
        } else if !self.may_be_member(group, user).await? {
            // Every other request is a member's.
            return match op {
                GroupOp::Leave | GroupOp::Depart => Ok(GroupAnswer::Done),
                _ => Err(refusal(ErrorCode::Forbidden, "not a member of this group")),
            };
        }
        let state = self
            .group_state(group)
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))?;
        let caller_role = state.members.get(&user).copied();
        match op {
            GroupOp::Members | GroupOp::Info | GroupOp::MembersPage { .. } => {
                if caller_role.is_none() {
                    return Err(refusal(ErrorCode::Forbidden, "not a member of this group"));
                }
                return state.listing(op, self.config.max_frame_bytes);
            }
            GroupOp::InvitesPage { after, limit } => {
                owner_or_admin(caller_role, "only the group's owner or an admin can list invites")?;
                drop(state);
                let (users, more) = self
                    .id_page(group, limit, move |store, take| {
                        store.invites_after(group, after, take)
                    })
                    .await?;
                return Ok(GroupAnswer::InvitesPage { users, more });
            }
            GroupOp::BansPage { after, limit } => {
                owner_or_admin(caller_role, "only the group's owner or an admin can list bans")?;
                drop(state);
                let (users, more) = self
                    .id_page(group, limit, move |store, take| {
                        store.bans_after(group, after, take)
                    })
                    .await?;
                return Ok(GroupAnswer::BansPage { users, more });
            }
            _ => {}
        }
        if op == GroupOp::Join {
            if caller_role.is_some() {
                return Ok(GroupAnswer::Done);
            }
            drop(state);
            return self.queue_join(user, group).await;
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
            GroupOp::Members
            | GroupOp::Info
            | GroupOp::MembersPage { .. }
            | GroupOp::InvitesPage { .. }
            | GroupOp::BansPage { .. }
            | GroupOp::Join => Err(refusal(ErrorCode::Internal, "not a change made here")),
            GroupOp::Delete => {
                if caller_role != Some(GroupRole::Owner) {
                    return Err(refusal(
                        ErrorCode::Forbidden,
                        tern_storage::ONLY_THE_OWNER_DELETES,
                    ));
                }
                drop(state);
                self.delete_group(group, user).await
            }
            GroupOp::Leave => match caller_role {
                None => Ok(GroupAnswer::Done),
                Some(GroupRole::Owner) => Err(refusal(
                    ErrorCode::InvalidArgument,
                    "the owner cannot leave; hand the group over first (GroupTransferOwnership)",
                )),
                Some(_) => self.remove(group, user).await,
            },
            GroupOp::Depart => match caller_role {
                None => Ok(GroupAnswer::Done),
                Some(GroupRole::Owner) => {
                    let heir = heir(&state.members, user, |id| !self.store.is_deleted(id));
                    drop(state);
                    match heir {
                        None => self.delete_group(group, user).await,
                        Some(heir) => {
                            self.blocking(move |store| store.transfer_ownership(group, user, heir))
                                .await
                                .map_err(|e| store_refusal(e, group, "no such group"))?;
                            self.update_cached(group, |owner, members| {
                                *owner = heir;
                                members.insert(heir, GroupRole::Owner);
                                members.insert(user, GroupRole::Admin);
                            });
                            self.remove(group, user).await
                        }
                    }
                }
                Some(_) => self.remove(group, user).await,
            },
            GroupOp::Invite(target) => {
                owner_or_admin(caller_role, "only the group's owner or an admin can invite")?;
                if state.members.contains_key(&target) {
                    return Ok(GroupAnswer::Done);
                }
                // A block between the two refuses the invite, as it refuses
                // a message: otherwise a blocked user could push `Invited`
                // to the blocker again and again from any group of theirs.
                self.blocking(move |store| {
                    if let Some(why) = store.blocks_between(user, target)?.refusal() {
                        return Err(StoreError::Forbidden(why));
                    }
                    store.invite(group, target)
                })
                .await
                .map_err(|e| store_refusal(e, group, "no such user"))?;
                // Tell the invited user's live sessions; offline ones find
                // the invite with MyInvitesPage. The invite is stored, so
                // the group's other changes need not wait on this push
                // (a full queue to the pair's shard would hold them). It
                // goes out from the pair's shard, where blocks between the
                // two change: a block answered before it stops it.
                drop(state);
                drop(_permit);
                let invited = ServerBody::Invited { group, by: user };
                self.send_pair_notice(user, target, invited).await;
                Ok(GroupAnswer::Done)
            }
            GroupOp::Uninvite(target) => {
                owner_or_admin(
                    caller_role,
                    "only the group's owner or an admin can withdraw an invite",
                )?;
                self.blocking(move |store| store.uninvite(group, target))
                    .await
                    .map_err(|e| store_refusal(e, group, "no such group"))?;
                Ok(GroupAnswer::Done)
            }
            GroupOp::Ban(target) => {
                owner_or_admin(caller_role, "only the group's owner or an admin can ban")?;
                if target == user {
                    return Err(refusal(ErrorCode::InvalidArgument, "you cannot ban yourself"));
                }
                match (caller_role, state.members.get(&target)) {
                    (_, Some(GroupRole::Owner)) => {
                        Err(refusal(ErrorCode::Forbidden, "the owner cannot be banned"))
                    }
                    (Some(GroupRole::Admin), Some(GroupRole::Admin)) => {
                        Err(refusal(ErrorCode::Forbidden, "an admin cannot ban another admin"))
                    }
                    _ => {
                        drop(state);
                        let _fence = self.fence_sends(group, ConvId::Group { group }).await;
                        let departed = self
                            .blocking(move |store| store.ban(group, target))
                            .await
                            .map_err(|e| store_refusal(e, group, "no such user"))?;
                        self.departed(group, target, departed).await
                    }
                }
            }
            GroupOp::Unban(target) => {
                owner_or_admin(caller_role, "only the group's owner or an admin can lift a ban")?;
                drop(state);
                self.blocking(move |store| store.unban(group, target))
                    .await
                    .map_err(|e| store_refusal(e, group, "no such group"))?;
                Ok(GroupAnswer::Done)
            }
            GroupOp::Kick(target) => {
                owner_or_admin(caller_role, "only the group's owner or an admin can kick")?;
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
                        "the Owner role cannot be assigned; use GroupTransferOwnership",
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
            GroupOp::TransferOwnership(target) => {
                if caller_role != Some(GroupRole::Owner) {
                    return Err(refusal(
                        ErrorCode::Forbidden,
                        "only the group's owner can hand it over",
                    ));
                }
                if target == user {
                    return Err(refusal(ErrorCode::InvalidArgument, "you already own this group"));
                }
                if !state.members.contains_key(&target) {
                    return Err(refusal(ErrorCode::NotFound, "not a member of this group"));
                }
                drop(state);
                self.blocking(move |store| store.transfer_ownership(group, user, target))
                    .await
                    .map_err(|e| store_refusal(e, group, "not a member of this group"))?;
                self.update_cached(group, |owner, members| {
                    *owner = target;
                    members.insert(target, GroupRole::Owner);
                    members.insert(user, GroupRole::Admin);
                });
                Ok(GroupAnswer::Done)
            }
        }
    }

    /// One page of a stored id list of `group`, read by `read(store, take)`
    /// on the blocking pool with `take` from [`ids_per_page`].
    async fn id_page(
        &self,
        group: GroupId,
        limit: u32,
        read: impl FnOnce(&tern_storage::Store, usize) -> Result<(Vec<UserId>, bool), StoreError> + Send + 'static,
    ) -> Result<(Vec<UserId>, bool), Refusal> {
        let take = ids_per_page(limit, self.config.max_frame_bytes, size_of::<u64>());
        self.blocking(move |store| read(store, take))
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))
    }

    /// Joins `user` to `group` and answers once the join is stored. The
    /// first joiner to find the group's queue idle drains it: under the
    /// group's permit it applies every join queued by then together, and
    /// again while more arrived. Others only wait for their answer.
    async fn queue_join(&self, user: UserId, group: GroupId) -> GroupReply {
        let (tx, rx) = futures_channel::oneshot::channel();
        let drain = {
            let mut queues = self.join_queues.borrow_mut();
            let queue = queues.entry(group).or_default();
            queue.waiting.push((user, tx));
            !std::mem::replace(&mut queue.draining, true)
        };
        if drain {
            self.drain_joins(group).await;
        }
        rx.await
            .unwrap_or_else(|_| Err(refusal(ErrorCode::ShuttingDown, "server is shutting down")))
    }

    /// Applies `group`'s queued joins, at most [`MAX_JOIN_BATCH`] per
    /// store batch, until none are left.
    async fn drain_joins(&self, group: GroupId) {
        loop {
            let permit = match self.group_state(group).await {
                Ok(state) => {
                    let changes = state.changes.clone();
                    drop(state);
                    changes
                        .acquire_static_permit(1)
                        .await
                        .map_err(|_| refusal(ErrorCode::ShuttingDown, "server is shutting down"))
                }
                Err(e) => Err(store_refusal(e, group, "no such group")),
            };
            let batch = {
                let mut queues = self.join_queues.borrow_mut();
                let Some(queue) = queues.get_mut(&group) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    // Nothing yields between this check and the return, so
                    // the next joiner finds the queue idle and drains it.
                    queues.remove(&group);
                    return;
                }
                let take = queue.waiting.len().min(MAX_JOIN_BATCH);
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let replies = match &permit {
                Ok(_) => {
                    let users: Vec<UserId> = batch.iter().map(|(user, _)| *user).collect();
                    self.apply_joins(group, users).await
                }
                Err(refused) => batch.iter().map(|_| Err(refused.clone())).collect(),
            };
            for ((_, answer), reply) in batch.into_iter().zip(replies) {
                let _ = answer.send(reply);
            }
            drop(permit);
            // The sends the fence held run before the next batch fences
            // the group again: a stream of joins cannot starve them.
            glommio::executor().yield_now().await;
        }
    }

    /// Adds `users` to `group` (the permit is held): one store batch, one
    /// read of the group's seq, their read cursors in one commit, one cache
    /// rebuild. A new member starts at the group's current seq, so a sync
    /// does not replay what was said before they joined. That start is
    /// written with the membership, in one batch, under a fence on the
    /// group's sequencing ([`Shard::fence_sends`]): a start raised by a
    /// later commit could be lost to a crash after the messages below it
    /// were stored. The replies are in the order of `users`.
    async fn apply_joins(&self, group: GroupId, users: Vec<UserId>) -> Vec<GroupReply> {
        let map_err = |e| store_refusal(e, group, "no such group");
        let state = match self.group_state(group).await {
            Ok(state) => state,
            Err(e) => {
                let refused = map_err(e);
                return users.iter().map(|_| Err(refused.clone())).collect();
            }
        };
        // Members by the cache are answered without a write.
        let replies: Vec<Option<GroupReply>> = users
            .iter()
            .map(|user| state.members.contains_key(user).then_some(Ok(GroupAnswer::Done)))
            .collect();
        let invited_only = !state.open;
        drop(state);
        let to_add: Vec<UserId> = users
            .iter()
            .zip(&replies)
            .filter(|(_, reply)| reply.is_none())
            .map(|(&user, _)| user)
            .collect();
        let conv = ConvId::Group { group };
        // Nothing is sequenced in the group until the cache has the new
        // members, and the store write waits for every message sequenced
        // before to be stored: so the cursor it writes with the
        // membership, at the group's last stored seq, is the last seq
        // sequenced, and no crash between two commits can leave a new
        // member's start below a message from before the join.
        let fence = match to_add.is_empty() {
            true => None,
            false => Some(self.fence_sends(group, conv).await),
        };
        let outcomes = if to_add.is_empty() {
            Vec::new()
        } else {
            let adding = to_add.clone();
            match self
                .blocking(move |store| store.add_members(group, &adding, invited_only))
                .await
            {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    let refused = map_err(e);
                    return fill(replies, || Err(refused.clone()));
                }
            }
        };
        // (index in `to_add`, user) of each new member.
        let mut joined = Vec::new();
        let mut cached = Vec::new();
        for (index, (&user, outcome)) in to_add.iter().zip(&outcomes).enumerate() {
            match outcome {
                JoinOutcome::Joined => joined.push((index, user)),
                // In the store but not the cache: make them agree.
                JoinOutcome::AlreadyMember => cached.push(user),
                _ => {}
            }
        }
        // The store has the new members whether or not their start can be
        // read: on a failed read the cache still takes them (cache and
        // store agree) and they are answered as when their cursor fails
        // to store.
        let joined_at = if joined.is_empty() {
            Some(0)
        } else {
            self.cursor_seq_loaded(conv).await.ok()
        };
        // Under the fence this is the seq `add_members` stored the
        // cursors at. The receipt restores it should a receipt of a
        // former member, in the writer while the batch was written, have
        // overwritten it with a lower value (see `Store::add_members`).
        let cursors: Vec<_> = joined
            .iter()
            .map(|&(_, user)| {
                joined_at.filter(|&seq| seq > 0).map(|joined_at| {
                    let (tx, rx) = futures_channel::oneshot::channel();
                    self.stage_receipt(user, conv, ReceiptKind::Read, joined_at, Some(tx), None);
                    rx
                })
            })
            .collect();
        self.update_members(group, |members| {
            for &user in joined.iter().map(|(_, user)| user).chain(&cached) {
                members.insert(user, GroupRole::Member);
            }
        });
        // Every message sequenced from here on sees the new members.
        drop(fence);
        let mut answers: Vec<GroupReply> = outcomes.iter().map(join_answer).collect();
        // Answer only once the cursors are stored, or a sync right after
        // the join would replay the whole group.
        for (&(index, _), cursor) in joined.iter().zip(cursors) {
            let stored = match cursor {
                Some(stored) => stored.await == Ok(true),
                None => joined_at.is_some(),
            };
            if !stored {
                if let Some(answer) = answers.get_mut(index) {
                    *answer = Err(refusal(ErrorCode::Internal, "join not stored; retry"));
                }
            }
        }
        // `to_add` holds the unanswered users in order: so do `answers`.
        let mut answers = answers.into_iter();
        fill(replies, || {
            answers
                .next()
                .unwrap_or_else(|| Err(refusal(ErrorCode::Internal, "join not applied; retry")))
        })
    }

    /// Fences `group`'s sequencing for a membership change (until the
    /// guard drops) and waits until every message of `conv` sequenced
    /// before is durable or failed, so that the store's last seq, which
    /// the change writes as a joiner's start or a departure's end in the
    /// membership's own batch, is the last one sequenced. Sends wait at
    /// the fence for one change: the commits in flight plus one store
    /// batch. Changes of one group hold its permit, so fences never nest.
    async fn fence_sends(&self, group: GroupId, conv: ConvId) -> SendFence<'_> {
        self.send_fences.borrow_mut().entry(group).or_default();
        let fence = SendFence { shard: self, group };
        self.conv_quiet(conv).await;
        fence
    }

    /// Whether a membership change holds `group`'s sequencing still.
    #[inline]
    fn sends_fenced(&self, group: GroupId) -> bool {
        let fences = self.send_fences.borrow();
        !fences.is_empty() && fences.contains_key(&group)
    }

    /// Waits until no membership change holds `group`'s sequencing.
    async fn send_fence_lifted(&self, group: GroupId) {
        std::future::poll_fn(|cx| match self.send_fences.borrow_mut().get_mut(&group) {
            Some(waiters) => {
                waiters.push(cx.waker().clone());
                std::task::Poll::Pending
            }
            None => std::task::Poll::Ready(()),
        })
        .await
    }

    /// Removes `user` from `group` (a leave or a kick; the checks are
    /// done).
    async fn remove(&self, group: GroupId, user: UserId) -> GroupReply {
        let _fence = self.fence_sends(group, ConvId::Group { group }).await;
        let departed = self
            .blocking(move |store| store.remove_member(group, user))
            .await
            .map_err(|e| store_refusal(e, group, "no such group"))?;
        self.departed(group, user, departed).await
    }

    /// Ends `user`'s membership of `group` in the cache once the store
    /// has removed it (a leave, kick or ban), so no message sequenced
    /// after the answer reaches them, and makes sure their departure
    /// record covers every message sequenced before (protocol.md 2.8.8).
    /// The store wrote it up to the group's last *stored* seq, under the
    /// fence on the group's sends ([`Shard::fence_sends`]), so that is the
    /// last one sequenced too, and a crash cannot split the two. Should
    /// the cached last seq still be past it, the record is extended
    /// through the writer, behind those messages, before the answer (a
    /// safeguard: the fence leaves nothing for it to do).
    async fn departed(&self, group: GroupId, user: UserId, departed: Departed) -> GroupReply {
        self.update_members(group, |members| {
            members.remove(&user);
        });
        let conv = ConvId::Group { group };
        let departure = match departed {
            Departed::Recorded(departure) => departure,
            Departed::NotMember => return Ok(GroupAnswer::Done),
            Departed::Unrecorded => {
                tracing::warn!(
                    user,
                    group,
                    "departure not recorded: the user holds max_departures_per_user already"
                );
                return Ok(GroupAnswer::Done);
            }
        };
        // Nothing yielded since the cache update: this is the last seq
        // the user was a member for (lowered, should a write of the ones
        // not yet stored fail, to the stored ones: `clamp_cursors`). Not
        // cached: nothing is in flight, the store's `until` is right.
        let last = self.cursor_seq(conv).unwrap_or(0);
        if last <= departure.until {
            return Ok(GroupAnswer::Done);
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let extend = WriteOp::Departure {
            user,
            group,
            start: departure.start,
            until: last,
        };
        self.stage(extend, [Effect::Done(tx)]);
        if rx.await != Ok(true) {
            // The membership is gone either way (a retry would change
            // nothing); what is lost is the catch-up of these messages.
            tracing::error!(user, group, last, "departure not extended: store write failed");
        }
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

/// Who owns a group after its owner `leaving` is gone: the admin with the
/// lowest id, else the member with the lowest id (the longest-registered
/// account among them, ids being assigned in order), or nobody. Only
/// `live` accounts inherit: a deleted member whose own purge has not yet
/// left the group would only hand it on again, and a group of deleted
/// members alone has nobody to hand it to.
fn heir(
    members: &FxHashMap<UserId, GroupRole>,
    leaving: UserId,
    live: impl Fn(UserId) -> bool,
) -> Option<UserId> {
    let others = || members.iter().filter(|&(&id, _)| id != leaving && live(id));
    others()
        .filter(|(_, &role)| role == GroupRole::Admin)
        .map(|(&id, _)| id)
        .min()
        .or_else(|| others().map(|(&id, _)| id).min())
}

/// The answer to a join the store took as `outcome`.
fn join_answer(outcome: &JoinOutcome) -> GroupReply {
    match outcome {
        JoinOutcome::Joined | JoinOutcome::AlreadyMember => Ok(GroupAnswer::Done),
        JoinOutcome::NoSuchUser => Err(refusal(ErrorCode::NotFound, "no such user")),
        JoinOutcome::NotInvited => Err(refusal(
            ErrorCode::Forbidden,
            "this group is invite-only; ask its owner or an admin for an invite",
        )),
        JoinOutcome::GroupFull => Err(refusal(ErrorCode::LimitExceeded, "group is full")),
        JoinOutcome::Banned => Err(refusal(ErrorCode::Forbidden, "you are banned from this group")),
        JoinOutcome::TooManyGroups => Err(refusal(ErrorCode::LimitExceeded, tern_storage::TOO_MANY_GROUPS)),
    }
}

/// `replies` with every missing one made by `make`.
fn fill(replies: Vec<Option<GroupReply>>, mut make: impl FnMut() -> GroupReply) -> Vec<GroupReply> {
    replies
        .into_iter()
        .map(|reply| reply.unwrap_or_else(&mut make))
        .collect()
}

/// `Forbidden` with `refused` unless the caller owns or administers the
/// group: the rule for inviting, withdrawing invites and kicking.
fn owner_or_admin(caller_role: Option<GroupRole>, refused: &'static str) -> Result<(), Refusal> {
    match caller_role {
        Some(GroupRole::Owner | GroupRole::Admin) => Ok(()),
        _ => Err(refusal(ErrorCode::Forbidden, refused)),
    }
}

/// The refusal for a store error of a group operation; `not_found` says
/// what was missing.
pub(super) fn store_refusal(e: StoreError, group: GroupId, not_found: &'static str) -> Refusal {
    match e {
        StoreError::NotFound => refusal(ErrorCode::NotFound, not_found),
        StoreError::LimitExceeded(why) => refusal(ErrorCode::LimitExceeded, why),
        StoreError::InvalidArgument(why) => refusal(ErrorCode::InvalidArgument, why),
        StoreError::Forbidden(why) => refusal(ErrorCode::Forbidden, why),
        other => {
            tracing::error!(error = %other, group, "group store failure");
            refusal(ErrorCode::Internal, "internal storage error; retry later")
        }
    }
}
