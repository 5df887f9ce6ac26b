//! Groups, their membership, roles and invites. It owns the `groups`
//! keyspace (id -> owner, member count, invite count, open flag, name), the
//! `members` keyspace (`group ++ user` -> role) and the `group_invites`
//! keyspace (`group ++ user`, no value) with its reverse index
//! `user_invites` (`user ++ group`). The member and invite counts live
//! in the group's record and are rewritten in the same batch as each
//! membership or invite change, so the limit checks are one point read
//! however large the group is, and the counts can never drift from the
//! keys. Every membership change also writes the reverse index
//! `user_groups` (`user ++ group`) in the same batch. Who may change what
//! is decided by the engine (on the group's home shard); this module keeps
//! the data's own invariants: the owner is always a member with role
//! `Owner`, nobody else ever gets that role, and a join consumes the
//! joiner's pending invite.

use tern_proto::limits::check_group_name;

use crate::codec::{self, GroupValue};
use crate::{
    lock, Departed, GroupId, GroupRecord, GroupRole, GroupRoster, Inner, Ks, Store, StoreError, UserId,
};

/// Why a banned user may not join, or be invited to, a group.
pub const BANNED: &str = "this user is banned from the group";

/// Why a user may not create or join one more group.
pub const TOO_MANY_GROUPS: &str = "you are a member of as many groups as the server allows; leave one first";

/// Why an invite is refused to a user who holds
/// [`crate::StoreOptions::max_invites_per_user`] pending invites already.
pub const TOO_MANY_INVITES: &str =
    "this user holds as many pending invites as the server allows; they must join or decline one first";

/// Most users one [`Store::add_members`] call takes.
pub const MAX_JOIN_BATCH: usize = 1024;

/// What [`Store::add_members`] did for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Now a member.
    Joined,
    /// Was a member already (or earlier in the same batch); nothing written.
    AlreadyMember,
    /// No such user.
    NoSuchUser,
    /// The group is invite-only and the user holds no invite.
    NotInvited,
    /// The group reached `max_group_members`.
    GroupFull,
    /// The user is banned from the group.
    Banned,
    /// The user is in `max_groups_per_user` groups already.
    TooManyGroups,
}

impl Inner {
    /// The group's record; `None` for a group that never existed or was
    /// deleted.
    pub(crate) fn load_group(&self, group: GroupId) -> Result<Option<GroupValue>, StoreError> {
        let key = codec::id_key(group);
        let Some(value) = self.groups.get(&key)? else {
            return Ok(None);
        };
        if codec::decode_group_tombstone(&value)
            .map_err(|d| self.groups.corrupt(&key, d))?
            .is_some()
        {
            return Ok(None);
        }
        codec::decode_group(&value)
            .map(Some)
            .map_err(|d| self.groups.corrupt(&key, d))
    }

    /// The stored role of `user` in `group`, if a member; the record's
    /// owner reads as `Owner` (members written before roles have no role).
    fn load_role(
        &self,
        group: GroupId,
        owner: UserId,
        user: UserId,
    ) -> Result<Option<GroupRole>, StoreError> {
        let key = codec::pair_key(group, user);
        let Some(value) = self.members.get(&key)? else {
            return Ok(None);
        };
        let role = codec::decode_member(&value).map_err(|d| self.members.corrupt(&key, d))?;
        Ok(Some(effective_role(owner, user, role)))
    }

    /// Whether `user` is a member of at least `max_groups_per_user`
    /// groups. Call it under `groups_lock`, so no concurrent join slips
    /// past it.
    fn group_count_reaches_limit(&self, user: UserId) -> Result<bool, StoreError> {
        self.user_groups
            .prefix_reaches(user, self.opts.max_groups_per_user)
    }

    /// A page of one of the group-keyed id lists (`group_invites`,
    /// `group_bans`): `NotFound` for a missing group. Deleted accounts are
    /// passed over when `skip_deleted` (their invites wait for the purge,
    /// unseen; bans of them stay the group's records, which its admins
    /// list and lift).
    fn group_ids_after(
        &self,
        list: &Ks,
        group: GroupId,
        after: UserId,
        limit: usize,
        skip_deleted: bool,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        if self.load_group(group)?.is_none() {
            return Err(StoreError::NotFound);
        }
        if skip_deleted {
            self.live_pairs_after(list, group, after, limit)
        } else {
            list.pairs_after(group, after, limit)
        }
    }

    /// Adds the group's record to `batch`, as changed by the batch.
    pub(crate) fn put_group(&self, batch: &mut fjall::OwnedWriteBatch, group: GroupId, record: &GroupValue) {
        batch.insert(
            &self.groups.handle,
            codec::id_key(group),
            codec::encode_group(record),
        );
    }

    /// Adds to `batch` the removal of `user`'s membership of `group` with
    /// its `user_groups` mirror, and counts it in `record` if given.
    fn drop_membership(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        record: Option<&mut GroupValue>,
        group: GroupId,
        user: UserId,
    ) {
        batch.remove(&self.members.handle, codec::pair_key(group, user));
        batch.remove(&self.user_groups.handle, codec::pair_key(user, group));
        if let Some(record) = record {
            record.member_count = record.member_count.saturating_sub(1);
        }
    }

    /// Adds to `batch` the removal of `user`'s pending invite to `group`
    /// with its `user_invites` mirror, and counts it in `record`.
    pub(crate) fn drop_invite(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        record: &mut GroupValue,
        group: GroupId,
        user: UserId,
    ) {
        batch.remove(&self.group_invites.handle, codec::pair_key(group, user));
        batch.remove(&self.user_invites.handle, codec::pair_key(user, group));
        record.invite_count = record.invite_count.saturating_sub(1);
    }

    /// Every member of `group` with their stored role, ascending by id.
    fn scan_members(&self, group: GroupId) -> Result<Vec<(UserId, GroupRole)>, StoreError> {
        let members = &self.members;
        let mut out = Vec::new();
        for guard in members.handle.prefix(codec::id_key(group)) {
            let (key, value) = members.entry(guard)?;
            let user = codec::decode_pair_second(&key).map_err(|d| members.corrupt(&key, d))?;
            let role = codec::decode_member(&value).map_err(|d| members.corrupt(&key, d))?;
            out.push((user, role));
        }
        Ok(out)
    }
}

/// The owner is `Owner` whatever the member value says (an old record's
/// owner has an empty value); nobody else can be.
fn effective_role(owner: UserId, user: UserId, stored: GroupRole) -> GroupRole {
    match (user == owner, stored) {
        (true, _) => GroupRole::Owner,
        (false, GroupRole::Owner) => GroupRole::Member,
        (false, role) => role,
    }
}

impl Store {
    /// Creates an open group owned by `owner`, who becomes its first
    /// member. Ids are dense from 1.
    pub fn create_group(&self, owner: UserId, name: &str) -> Result<GroupId, StoreError> {
        self.create_group_with(owner, name, true)
    }

    /// Creates a group owned by `owner`, who becomes its first member with
    /// role `Owner`; `open` lets anyone join, otherwise joining needs an
    /// invite. Ids are dense from 1.
    pub fn create_group_with(&self, owner: UserId, name: &str, open: bool) -> Result<GroupId, StoreError> {
        check_group_name(name).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        let inner = &*self.inner;
        let mut next_id = lock(&inner.groups_lock);
        // Under the lock, as every membership write checks: see
        // `Inner::may_name`.
        if !inner.may_name(owner)? {
            return Err(StoreError::NotFound);
        }
        if inner.group_count_reaches_limit(owner)? {
            return Err(StoreError::LimitExceeded(TOO_MANY_GROUPS));
        }
        let group = *next_id;
        let record = GroupValue {
            owner,
            member_count: 1,
            invite_count: 0,
            open,
            name: name.to_owned(),
        };
        let mut batch = inner.db.batch();
        inner.put_group(&mut batch, group, &record);
        batch.insert(
            &inner.members.handle,
            codec::pair_key(group, owner),
            codec::encode_member(GroupRole::Owner),
        );
        batch.insert(&inner.user_groups.handle, codec::pair_key(owner, group), []);
        let pending = inner.write(batch, true)?;
        *next_id = group + 1;
        inner
            .highest_group
            .store(group, std::sync::atomic::Ordering::Release);
        drop(next_id);
        inner.sync(pending)?;
        Ok(group)
    }

    /// The group's record, if it exists.
    pub fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        Ok(self.inner.load_group(group)?.map(|g| GroupRecord {
            id: group,
            name: g.name,
            owner: g.owner,
        }))
    }

    /// The group with its settings and every member's role, if it exists.
    pub fn group_roster(&self, group: GroupId) -> Result<Option<GroupRoster>, StoreError> {
        let inner = &*self.inner;
        let Some(record) = inner.load_group(group)? else {
            return Ok(None);
        };
        let members = inner
            .scan_members(group)?
            .into_iter()
            .map(|(user, role)| (user, effective_role(record.owner, user, role)))
            .collect();
        Ok(Some(GroupRoster {
            id: group,
            name: record.name,
            owner: record.owner,
            open: record.open,
            members,
        }))
    }

    /// Adds `user` to `group` as a `Member`, consuming a pending invite in
    /// the same batch. Adding a member again succeeds without writing.
    /// Whether the user may join (open group or invited) is the caller's
    /// check.
    pub fn add_member(&self, group: GroupId, user: UserId) -> Result<(), StoreError> {
        match self.add_members(group, &[user], false)?.first() {
            Some(JoinOutcome::Joined | JoinOutcome::AlreadyMember) => Ok(()),
            Some(JoinOutcome::GroupFull) => Err(StoreError::LimitExceeded("group is full")),
            Some(JoinOutcome::TooManyGroups) => Err(StoreError::LimitExceeded(TOO_MANY_GROUPS)),
            Some(JoinOutcome::Banned) => Err(StoreError::InvalidArgument(BANNED)),
            Some(JoinOutcome::NoSuchUser | JoinOutcome::NotInvited) | None => Err(StoreError::NotFound),
        }
    }

    /// What a join of `user` to `group` would meet that is known before
    /// any work: `AlreadyMember`, `Banned` or `NotInvited` (an invite-only
    /// group, no invite); `None` when it may succeed. Read without the
    /// groups lock, so a change racing it can make the answer stale:
    /// [`Store::add_members`] decides. This lets a caller refuse a join of
    /// any group by anyone without loading the group. `NotFound` for a
    /// group that does not exist.
    pub fn join_check(&self, group: GroupId, user: UserId) -> Result<Option<JoinOutcome>, StoreError> {
        let inner = &*self.inner;
        let Some(record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        let key = codec::pair_key(group, user);
        Ok(if inner.members.contains(key)? {
            Some(JoinOutcome::AlreadyMember)
        } else if inner.group_bans.contains(key)? {
            Some(JoinOutcome::Banned)
        } else if !record.open && !inner.group_invites.contains(key)? {
            Some(JoinOutcome::NotInvited)
        } else {
            None
        })
    }

    /// Adds each of `users` to `group` as a `Member` in one batch and one
    /// sync, in order, until the group is full: a crowd joining at once
    /// costs one write, not one each. With `invited_only`, only users
    /// holding a pending invite join; each join consumes its invite. The
    /// outcomes are in the order of `users`; `NotFound` (the error) means
    /// the group does not exist. At most [`MAX_JOIN_BATCH`] users.
    ///
    /// Each joiner's cursors for the group (delivered and read) are raised
    /// to the group's last stored seq in the same batch: a `Sync` from
    /// another of their devices, or one after a crash right after this
    /// write, must not stream the group's messages from before the join.
    /// The engine calls this with no message of the group sequenced and
    /// not yet stored (it holds the group's sends back meanwhile), so
    /// this is the group's last seq. Receipts are otherwise only written
    /// by the writer; the one case where both touch a row at once (a
    /// former member's cursor in flight while they rejoin) can only lose
    /// this value, which the engine's receipt at the same seq restores.
    pub fn add_members(
        &self,
        group: GroupId,
        users: &[UserId],
        invited_only: bool,
    ) -> Result<Vec<JoinOutcome>, StoreError> {
        if users.len() > MAX_JOIN_BATCH {
            return Err(StoreError::InvalidArgument("too many joins in one batch"));
        }
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let Some(mut record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        let conv = crate::ConvId::Group { group };
        // Read once, and only when someone may join: one reverse step of
        // the group's history.
        let mut last_stored_seq: Option<u64> = None;
        let mut batch = inner.db.batch();
        let mut outcomes = Vec::with_capacity(users.len());
        let mut joined_here: Vec<UserId> = Vec::new();
        for &user in users {
            let key = codec::pair_key(group, user);
            let outcome = if !inner.may_name(user)? {
                JoinOutcome::NoSuchUser
            } else if joined_here.contains(&user) || inner.members.contains(key)? {
                JoinOutcome::AlreadyMember
            } else if inner.group_bans.contains(key)? {
                JoinOutcome::Banned
            } else if usize::try_from(record.member_count).map_or(true, |n| n >= inner.opts.max_group_members)
                || record.member_count == u32::MAX
            {
                JoinOutcome::GroupFull
            } else {
                // The invite first: one point read, where the group count
                // is a scan of up to `max_groups_per_user` keys.
                let invited = inner.group_invites.contains(key)?;
                if invited_only && !invited {
                    JoinOutcome::NotInvited
                } else if inner.group_count_reaches_limit(user)? {
                    JoinOutcome::TooManyGroups
                } else {
                    if invited {
                        inner.drop_invite(&mut batch, &mut record, group, user);
                    }
                    batch.insert(
                        &inner.members.handle,
                        key,
                        codec::encode_member(GroupRole::Member),
                    );
                    batch.insert(&inner.user_groups.handle, codec::pair_key(user, group), []);
                    let last = match last_stored_seq {
                        Some(seq) => seq,
                        None => *last_stored_seq.insert(self.conv_tail(conv, 0)?.last_seq),
                    };
                    if last > 0 {
                        let cursor_key = codec::user_conv_key(user, conv);
                        let (delivered, read) = inner.load_receipts(&cursor_key)?;
                        batch.insert(
                            &inner.receipts.handle,
                            cursor_key,
                            codec::encode_receipts(delivered.max(last), read.max(last)),
                        );
                        // Inbox entries the raised cursor passes (an
                        // earlier membership's, owed through its departure
                        // record from history) would never be returned or
                        // removed by a receipt: removed with the raise.
                        if delivered < last {
                            let from = codec::inbox_key(user, conv, delivered.saturating_add(1));
                            let to = codec::inbox_key(user, conv, last);
                            for guard in inner.inbox.handle.range(from..=to) {
                                batch.remove(&inner.inbox.handle, inner.inbox.key_of(guard)?);
                            }
                        }
                    }
                    record.member_count += 1;
                    joined_here.push(user);
                    JoinOutcome::Joined
                }
            };
            outcomes.push(outcome);
        }
        if joined_here.is_empty() {
            return Ok(outcomes);
        }
        inner.put_group(&mut batch, group, &record);
        inner.commit_unlocked(batch, guard)?;
        Ok(outcomes)
    }

    /// Removes `user` from `group` (a leave or a kick), recording in the
    /// same batch what they are owed from their membership (see
    /// `departures`). Removing a non-member (or from a missing group)
    /// succeeds with `NotMember`; removing the owner is refused, since a
    /// group never lacks one.
    pub fn remove_member(&self, group: GroupId, user: UserId) -> Result<Departed, StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let key = codec::pair_key(group, user);
        if !inner.members.contains(key)? {
            return Ok(Departed::NotMember);
        }
        let record = inner.load_group(group)?;
        if record.as_ref().is_some_and(|r| r.owner == user) {
            return Err(StoreError::InvalidArgument("the owner cannot leave the group"));
        }
        let mut batch = inner.db.batch();
        let mut record = record;
        inner.drop_membership(&mut batch, record.as_mut(), group, user);
        // A deleted group's member keys await their purge: nothing is owed.
        let departed = match &record {
            Some(record) => {
                inner.put_group(&mut batch, group, record);
                inner.record_departure(&mut batch, group, user)?
            }
            None => Departed::NotMember,
        };
        inner.commit_unlocked(batch, guard)?;
        Ok(departed)
    }

    /// Sets a member's role to `Admin` or `Member`. `NotFound` for a
    /// missing group or a non-member; `InvalidArgument` for the role
    /// `Owner` or for the owner (ownership moves only with
    /// [`Store::transfer_ownership`]).
    pub fn set_member_role(&self, group: GroupId, user: UserId, role: GroupRole) -> Result<(), StoreError> {
        if role == GroupRole::Owner {
            return Err(StoreError::InvalidArgument("the Owner role cannot be assigned"));
        }
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let Some(record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        if record.owner == user {
            return Err(StoreError::InvalidArgument("the owner's role cannot change"));
        }
        let key = codec::pair_key(group, user);
        match inner.load_role(group, record.owner, user)? {
            None => Err(StoreError::NotFound),
            Some(current) if current == role => Ok(()),
            Some(_) => {
                let mut batch = inner.db.batch();
                batch.insert(&inner.members.handle, key, codec::encode_member(role));
                inner.commit_unlocked(batch, guard)
            }
        }
    }

    /// Makes member `to` the owner of `group`, whose owner must be `from`;
    /// `from` becomes an `Admin`. In one batch under the groups lock, so
    /// the group always has exactly one owner. `NotFound` for a missing
    /// group or a `to` who is not a member; `InvalidArgument` if `from` is
    /// not the owner or `to` is `from`.
    pub fn transfer_ownership(&self, group: GroupId, from: UserId, to: UserId) -> Result<(), StoreError> {
        if from == to {
            return Err(StoreError::InvalidArgument("the owner already owns the group"));
        }
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let Some(mut record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        if record.owner != from {
            return Err(StoreError::InvalidArgument(
                "only the owner can hand the group over",
            ));
        }
        if !inner.members.contains(codec::pair_key(group, to))? {
            return Err(StoreError::NotFound);
        }
        record.owner = to;
        let mut batch = inner.db.batch();
        inner.put_group(&mut batch, group, &record);
        batch.insert(
            &inner.members.handle,
            codec::pair_key(group, to),
            codec::encode_member(GroupRole::Owner),
        );
        batch.insert(
            &inner.members.handle,
            codec::pair_key(group, from),
            codec::encode_member(GroupRole::Admin),
        );
        inner.commit_unlocked(batch, guard)
    }

    /// Records a pending invite of `user` to `group`. `NotFound` for a
    /// missing group or user; inviting a member or inviting twice succeeds
    /// without writing; `LimitExceeded` past
    /// [`crate::StoreOptions::max_group_invites`] pending invites of the
    /// group or [`crate::StoreOptions::max_invites_per_user`] of the user.
    pub fn invite(&self, group: GroupId, user: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let Some(mut record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        if !inner.may_name(user)? {
            return Err(StoreError::NotFound);
        }
        let key = codec::pair_key(group, user);
        if inner.members.contains(key)? || inner.group_invites.contains(key)? {
            return Ok(());
        }
        if inner.group_bans.contains(key)? {
            return Err(StoreError::InvalidArgument(
                "this user is banned from the group; unban them before inviting",
            ));
        }
        // The invited user's own list is bounded too: any number of groups
        // may invite them, and only they (a join, a decline) or each
        // group's admins take an invite back. A scan that stops at the
        // limit, under the groups lock like every invite write.
        if inner
            .user_invites
            .prefix_reaches(user, inner.opts.max_invites_per_user)?
        {
            return Err(StoreError::LimitExceeded(TOO_MANY_INVITES));
        }
        let full = usize::try_from(record.invite_count).map_or(true, |n| n >= inner.opts.max_group_invites);
        if full || record.invite_count == u32::MAX {
            return Err(StoreError::LimitExceeded(
                "too many pending invites for this group",
            ));
        }
        record.invite_count += 1;
        let mut batch = inner.db.batch();
        batch.insert(&inner.group_invites.handle, key, []);
        batch.insert(&inner.user_invites.handle, codec::pair_key(user, group), []);
        inner.put_group(&mut batch, group, &record);
        inner.commit_unlocked(batch, guard)
    }

    /// Withdraws `user`'s pending invite to `group`, freeing its place
    /// under [`crate::StoreOptions::max_group_invites`]. `NotFound` for a
    /// missing group; withdrawing an invite that is not pending (never
    /// made, used by a join, or withdrawn before) succeeds without writing.
    pub fn uninvite(&self, group: GroupId, user: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        let Some(mut record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        let key = codec::pair_key(group, user);
        if !inner.group_invites.contains(key)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        inner.drop_invite(&mut batch, &mut record, group, user);
        inner.put_group(&mut batch, group, &record);
        inner.commit_unlocked(batch, guard)
    }

    /// The users holding a pending invite to `group` with ids above
    /// `after`, ascending, at most `limit`, and whether more follow.
    /// `NotFound` for a missing group.
    pub fn invites_after(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        let inner = &*self.inner;
        inner.group_ids_after(&inner.group_invites, group, after, limit, true)
    }

    /// The groups with a pending invite for `user` with ids above
    /// `after`, ascending, at most `limit`, and whether more follow.
    pub fn user_invites_after(
        &self,
        user: UserId,
        after: GroupId,
        limit: usize,
    ) -> Result<(Vec<GroupId>, bool), StoreError> {
        // Invites to a deleted group wait for its purge, unseen.
        let inner = &*self.inner;
        inner
            .user_invites
            .pairs_after_where(user, after, limit, |group| !inner.purging(group))
    }

    /// Bans `user` from `group`: removes their membership (if any) and
    /// pending invite (if any) and records the ban, in one batch under the
    /// groups lock; a banned user's joins are refused (`Banned`) and
    /// invites to them are `InvalidArgument`. Banning again succeeds
    /// without writing. `NotFound` for a missing group or user;
    /// `InvalidArgument` for the owner; `LimitExceeded` past
    /// [`crate::StoreOptions::max_group_bans`]. Whether the caller may ban
    /// is the engine's check. A member's removal is recorded as
    /// [`Store::remove_member`] records it.
    pub fn ban(&self, group: GroupId, user: UserId) -> Result<Departed, StoreError> {
        let inner = &*self.inner;
        if !inner.user_exists(user)? {
            return Err(StoreError::NotFound);
        }
        let guard = lock(&inner.groups_lock);
        let Some(mut record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        if record.owner == user {
            return Err(StoreError::InvalidArgument("the owner cannot be banned"));
        }
        let key = codec::pair_key(group, user);
        if inner.group_bans.contains(key)? {
            return Ok(Departed::NotMember);
        }
        if inner
            .group_bans
            .prefix_reaches(group, inner.opts.max_group_bans)?
        {
            return Err(StoreError::LimitExceeded("too many users banned from this group"));
        }
        let mut batch = inner.db.batch();
        batch.insert(&inner.group_bans.handle, key, []);
        let mut departed = Departed::NotMember;
        if inner.members.contains(key)? {
            inner.drop_membership(&mut batch, Some(&mut record), group, user);
            departed = inner.record_departure(&mut batch, group, user)?;
        }
        if inner.group_invites.contains(key)? {
            inner.drop_invite(&mut batch, &mut record, group, user);
        }
        inner.put_group(&mut batch, group, &record);
        inner.commit_unlocked(batch, guard)?;
        Ok(departed)
    }

    /// Lifts `user`'s ban from `group`; succeeds whether or not there was
    /// one. `NotFound` for a missing group.
    pub fn unban(&self, group: GroupId, user: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let guard = lock(&inner.groups_lock);
        if inner.load_group(group)?.is_none() {
            return Err(StoreError::NotFound);
        }
        let key = codec::pair_key(group, user);
        if !inner.group_bans.contains(key)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.group_bans.handle, key);
        inner.commit_unlocked(batch, guard)
    }

    /// The users banned from `group` with ids above `after`, ascending, at
    /// most `limit`, and whether more follow. `NotFound` for a missing group.
    pub fn bans_after(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<UserId>, bool), StoreError> {
        let inner = &*self.inner;
        inner.group_ids_after(&inner.group_bans, group, after, limit, false)
    }

    /// Whether `user` holds a pending invite to `group` (joins check it
    /// themselves, in [`Store::add_members`]).
    #[cfg(test)]
    pub(crate) fn has_invite(&self, group: GroupId, user: UserId) -> Result<bool, StoreError> {
        let invites = &self.inner.group_invites;
        let key = codec::pair_key(group, user);
        match invites.get(&key)? {
            Some(value) => codec::check_empty(&value)
                .map(|()| true)
                .map_err(|d| invites.corrupt(&key, d)),
            None => Ok(false),
        }
    }

    /// The members of `group`, ascending by id (empty for a missing or
    /// deleted group).
    pub fn members(&self, group: GroupId) -> Result<Vec<UserId>, StoreError> {
        if self.inner.purging(group) {
            return Ok(Vec::new());
        }
        Ok(self
            .inner
            .scan_members(group)?
            .into_iter()
            .map(|(user, _)| user)
            .collect())
    }

    /// Whether `user` is a member of `group` (never of a deleted group,
    /// whose member keys may still await their purge).
    pub fn is_member(&self, group: GroupId, user: UserId) -> Result<bool, StoreError> {
        if self.inner.purging(group) {
            return Ok(false);
        }
        let members = &self.inner.members;
        let key = codec::pair_key(group, user);
        match members.get(&key)? {
            Some(value) => codec::decode_member(&value)
                .map(|_| true)
                .map_err(|d| members.corrupt(&key, d)),
            None => Ok(false),
        }
    }

    /// The role of `user` in `group`, or `None` for a non-member or a
    /// missing group.
    pub fn member_role(&self, group: GroupId, user: UserId) -> Result<Option<GroupRole>, StoreError> {
        let inner = &*self.inner;
        let Some(record) = inner.load_group(group)? else {
            return Ok(None);
        };
        inner.load_role(group, record.owner, user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreOptions;

    fn open(dir: &std::path::Path, max_group_invites: usize) -> Store {
        let opts = StoreOptions {
            max_group_invites,
            ..crate::test_options()
        };
        Store::open(dir, opts).unwrap()
    }

    #[test]
    fn a_ban_removes_member_and_invite_keeps_them_out_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let g;
        {
            let store = open(dir.path(), 10);
            for name in ["alice", "bob", "carol", "dave"] {
                store.register(name, b"password1").unwrap();
            }
            g = store.create_group(1, "moderated").unwrap();
            store.add_member(g, 2).unwrap();
            store.invite(g, 3).unwrap();
            store.ban(g, 2).unwrap();
            store.ban(g, 3).unwrap();
            store.ban(g, 4).unwrap(); // before they ever joined
            store.ban(g, 4).unwrap(); // again: nothing to do
            assert_eq!(store.members(g).unwrap(), vec![1]);
            assert!(store.user_groups(2).unwrap().is_empty());
            assert_eq!(store.invites_after(g, 0, 10).unwrap(), (vec![], false));
            assert_eq!(store.user_invites_after(3, 0, 10).unwrap(), (vec![], false));
            assert!(matches!(store.ban(g, 1), Err(StoreError::InvalidArgument(_))));
            assert!(matches!(store.ban(g, 99), Err(StoreError::NotFound)));
            assert!(matches!(store.ban(g + 1, 2), Err(StoreError::NotFound)));
        }
        let store = open(dir.path(), 10);
        assert_eq!(store.bans_after(g, 0, 10).unwrap(), (vec![2, 3, 4], false));
        assert_eq!(store.bans_after(g, 2, 1).unwrap(), (vec![3], true));
        assert_eq!(
            store.add_members(g, &[2, 4], false).unwrap(),
            vec![JoinOutcome::Banned, JoinOutcome::Banned]
        );
        assert!(matches!(store.invite(g, 3), Err(StoreError::InvalidArgument(_))));
        store.unban(g, 2).unwrap();
        store.unban(g, 2).unwrap(); // not banned: nothing to do
        store.add_member(g, 2).unwrap();
        assert_eq!(store.bans_after(g, 0, 10).unwrap(), (vec![3, 4], false));
        assert_eq!(store.group_roster(g).unwrap().unwrap().members.len(), 2);
    }

    #[test]
    fn bans_per_group_are_limited() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            max_group_bans: 2,
            ..crate::test_options()
        };
        let store = Store::open(dir.path(), opts).unwrap();
        for name in ["alice", "bob", "carol", "dave"] {
            store.register(name, b"password1").unwrap();
        }
        let g = store.create_group(1, "strict").unwrap();
        store.ban(g, 2).unwrap();
        store.ban(g, 3).unwrap();
        assert!(matches!(store.ban(g, 4), Err(StoreError::LimitExceeded(_))));
        store.ban(g, 3).unwrap(); // already banned: no new place needed
        store.unban(g, 2).unwrap();
        store.ban(g, 4).unwrap();
    }

    #[test]
    fn ownership_moves_in_one_write_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let g;
        {
            let store = open(dir.path(), 10);
            for name in ["alice", "bob", "carol"] {
                store.register(name, b"password1").unwrap();
            }
            g = store.create_group(1, "handed over").unwrap();
            store.add_member(g, 2).unwrap();
            let refused = |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidArgument(_)));
            assert!(refused(store.transfer_ownership(g, 2, 1)), "not the owner");
            assert!(refused(store.transfer_ownership(g, 1, 1)), "to oneself");
            assert!(matches!(
                store.transfer_ownership(g, 1, 3),
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.transfer_ownership(g + 1, 1, 2),
                Err(StoreError::NotFound)
            ));
            store.transfer_ownership(g, 1, 2).unwrap();
        }
        let store = open(dir.path(), 10);
        let roster = store.group_roster(g).unwrap().unwrap();
        assert_eq!(roster.owner, 2);
        let mut members = roster.members;
        members.sort_unstable_by_key(|&(user, _)| user);
        assert_eq!(members, vec![(1, GroupRole::Admin), (2, GroupRole::Owner)]);
        store.remove_member(g, 1).unwrap();
        assert!(matches!(
            store.remove_member(g, 2),
            Err(StoreError::InvalidArgument(_))
        ));
    }

    #[test]
    fn invites_are_listed_in_id_order_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        for i in 0..6 {
            store.register(&format!("user{i}"), b"password1").unwrap();
        }
        let g = store.create_group_with(1, "closed", false).unwrap();
        let other = store.create_group_with(1, "other", false).unwrap();
        assert_eq!(store.invites_after(g, 0, 10).unwrap(), (vec![], false));
        for user in [5, 2, 4, 3] {
            store.invite(g, user).unwrap();
        }
        store.invite(other, 6).unwrap(); // another group's: never listed here
        assert_eq!(store.invites_after(g, 0, 10).unwrap(), (vec![2, 3, 4, 5], false));
        assert_eq!(store.invites_after(g, 0, 2).unwrap(), (vec![2, 3], true));
        assert_eq!(store.invites_after(g, 3, 2).unwrap(), (vec![4, 5], false));
        assert_eq!(store.invites_after(g, 4, 1).unwrap(), (vec![5], false));
        assert_eq!(store.invites_after(g, 5, 1).unwrap(), (vec![], false));
        assert_eq!(store.invites_after(g, u64::MAX, 1).unwrap(), (vec![], false));
        // Each invited user sees the invite too, and only theirs.
        assert_eq!(store.user_invites_after(3, 0, 10).unwrap(), (vec![g], false));
        assert_eq!(store.user_invites_after(6, 0, 10).unwrap(), (vec![other], false));
        store.invite(other, 3).unwrap();
        assert_eq!(store.user_invites_after(3, 0, 1).unwrap(), (vec![g], true));
        assert_eq!(store.user_invites_after(3, g, 1).unwrap(), (vec![other], false));
        // A join uses its invite up; a withdrawn one is gone, on both sides.
        store.add_members(g, &[3], true).unwrap();
        store.uninvite(g, 5).unwrap();
        assert_eq!(store.invites_after(g, 0, 10).unwrap(), (vec![2, 4], false));
        assert_eq!(store.user_invites_after(3, 0, 10).unwrap(), (vec![other], false));
        assert_eq!(store.user_invites_after(5, 0, 10).unwrap(), (vec![], false));
        assert!(matches!(
            store.invites_after(other + 1, 0, 1),
            Err(StoreError::NotFound)
        ));
    }

    #[test]
    fn a_withdrawn_invite_is_gone_frees_its_slot_and_stays_gone_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let g;
        {
            let store = open(dir.path(), 1);
            for name in ["alice", "bob", "carol"] {
                store.register(name, b"password1").unwrap();
            }
            g = store.create_group_with(1, "closed", false).unwrap();
            store.invite(g, 2).unwrap();
            assert!(matches!(store.invite(g, 3), Err(StoreError::LimitExceeded(_))));
            store.uninvite(g, 2).unwrap();
            assert!(!store.has_invite(g, 2).unwrap());
            store.uninvite(g, 2).unwrap(); // not pending: nothing to do
            store.uninvite(g, 99).unwrap(); // no such user: nothing pending either
            assert!(matches!(store.uninvite(g + 1, 2), Err(StoreError::NotFound)));
            store.invite(g, 3).unwrap(); // the slot is free again
        }
        let store = open(dir.path(), 1);
        assert!(!store.has_invite(g, 2).unwrap());
        assert!(store.has_invite(g, 3).unwrap());
        assert_eq!(
            store.add_members(g, &[2], true).unwrap(),
            vec![JoinOutcome::NotInvited],
            "a withdrawn invite admits no one"
        );
        assert!(matches!(store.invite(g, 2), Err(StoreError::LimitExceeded(_))));
    }

    #[test]
    fn roles_invites_and_their_limit_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), 2);
            for name in ["alice", "bob", "carol", "dave"] {
                store.register(name, b"password1").unwrap();
            }
            let g = store.create_group_with(1, "closed", false).unwrap();
            store.invite(g, 2).unwrap();
            store.invite(g, 2).unwrap(); // twice: no second slot used
            store.invite(g, 3).unwrap();
            assert!(matches!(store.invite(g, 4), Err(StoreError::LimitExceeded(_))));
            assert!(matches!(store.invite(g, 99), Err(StoreError::NotFound)));
            store.add_member(g, 2).unwrap(); // consumes bob's invite
            assert!(!store.has_invite(g, 2).unwrap());
            store.invite(g, 4).unwrap(); // a slot is free again
            store.set_member_role(g, 2, GroupRole::Admin).unwrap();
            assert!(matches!(
                store.set_member_role(g, 1, GroupRole::Member),
                Err(StoreError::InvalidArgument(_))
            ));
            assert!(matches!(
                store.set_member_role(g, 2, GroupRole::Owner),
                Err(StoreError::InvalidArgument(_))
            ));
            assert!(matches!(
                store.set_member_role(g, 3, GroupRole::Admin),
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.remove_member(g, 1),
                Err(StoreError::InvalidArgument(_))
            ));
        }
        let store = open(dir.path(), 2);
        let roster = store.group_roster(1).unwrap().unwrap();
        assert!(!roster.open);
        assert_eq!(roster.owner, 1);
        assert_eq!(roster.members, vec![(1, GroupRole::Owner), (2, GroupRole::Admin)]);
        assert!(store.has_invite(1, 3).unwrap());
        assert!(store.has_invite(1, 4).unwrap());
        assert_eq!(store.member_role(1, 3).unwrap(), None);
    }

    #[test]
    fn a_group_written_before_roles_reads_as_open_with_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        for name in ["alice", "bob", "carol"] {
            store.register(name, b"password1").unwrap();
        }
        // Group 7 exactly as the build before roles wrote it: a v1 record
        // and members with empty values.
        let inner = &*store.inner;
        let mut v1 = vec![codec::VALUE_V1];
        v1.extend_from_slice(&1u64.to_be_bytes());
        v1.extend_from_slice(&2u32.to_be_bytes());
        v1.extend_from_slice(b"vintage");
        inner.groups.handle.insert(codec::id_key(7), v1).unwrap();
        for user in [1, 2] {
            inner.members.handle.insert(codec::pair_key(7, user), []).unwrap();
        }
        let roster = store.group_roster(7).unwrap().unwrap();
        assert!(roster.open);
        assert_eq!(roster.name, "vintage");
        assert_eq!(
            roster.members,
            vec![(1, GroupRole::Owner), (2, GroupRole::Member)]
        );
        assert!(store.is_member(7, 2).unwrap());
        assert_eq!(store.members(7).unwrap(), vec![1, 2]);
        // Changing it rewrites the record in the new format.
        store.add_member(7, 3).unwrap();
        let value = inner.groups.get(&codec::id_key(7)).unwrap().unwrap();
        assert_eq!(value.first(), Some(&codec::GROUP_V2));
        assert_eq!(store.group_roster(7).unwrap().unwrap().members.len(), 3);
    }
}
