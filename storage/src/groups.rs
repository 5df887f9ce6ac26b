//! Groups and their membership. It owns the `groups` keyspace (id ->
//! owner, member count, name) and the `members` keyspace (`group ++ user`,
//! no value). The member count lives in the group's record and is
//! rewritten in the same batch as each membership change, so the limit
//! check is one point read however large the group is, and the count can
//! never drift from the member keys. Every membership change also writes
//! the reverse index `user_groups` (`user ++ group`) in the same batch.

use tern_proto::limits::check_group_name;

use crate::codec::{self, GroupValue};
use crate::{lock, GroupId, GroupRecord, Inner, Store, StoreError, UserId};

impl Inner {
    fn load_group(&self, group: GroupId) -> Result<Option<GroupValue>, StoreError> {
        let key = codec::id_key(group);
        let Some(value) = self.groups.get(&key)? else {
            return Ok(None);
        };
        codec::decode_group(&value)
            .map(Some)
            .map_err(|d| self.groups.corrupt(&key, d))
    }
}

impl Store {
    /// Creates a group owned by `owner`, who becomes its first member.
    /// Ids are dense from 1.
    pub fn create_group(&self, owner: UserId, name: &str) -> Result<GroupId, StoreError> {
        check_group_name(name).map_err(|(_, why)| StoreError::InvalidArgument(why))?;
        let inner = &*self.inner;
        if !inner.user_exists(owner)? {
            return Err(StoreError::NotFound);
        }
        let mut next_id = lock(&inner.groups_lock);
        let group = *next_id;
        let record = GroupValue {
            owner,
            member_count: 1,
            name: name.to_owned(),
        };
        let mut batch = inner.db.batch();
        batch.insert(
            &inner.groups.handle,
            codec::id_key(group),
            codec::encode_group(&record),
        );
        batch.insert(&inner.members.handle, codec::pair_key(group, owner), []);
        batch.insert(&inner.user_groups.handle, codec::pair_key(owner, group), []);
        inner.commit(batch, true)?;
        *next_id = group + 1;
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

    /// Adds `user` to `group`. Adding a member again succeeds without
    /// writing.
    pub fn add_member(&self, group: GroupId, user: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        if !inner.user_exists(user)? {
            return Err(StoreError::NotFound);
        }
        let _guard = lock(&inner.groups_lock);
        let Some(mut record) = inner.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        let key = codec::pair_key(group, user);
        if inner.members.handle.contains_key(key)? {
            return Ok(());
        }
        let full = usize::try_from(record.member_count).map_or(true, |n| n >= inner.opts.max_group_members);
        if full || record.member_count == u32::MAX {
            return Err(StoreError::LimitExceeded("group is full"));
        }
        record.member_count += 1;
        let mut batch = inner.db.batch();
        batch.insert(&inner.members.handle, key, []);
        batch.insert(&inner.user_groups.handle, codec::pair_key(user, group), []);
        batch.insert(
            &inner.groups.handle,
            codec::id_key(group),
            codec::encode_group(&record),
        );
        inner.commit(batch, true)
    }

    /// Removes `user` from `group`. Removing a non-member (or from a
    /// missing group) succeeds.
    pub fn remove_member(&self, group: GroupId, user: UserId) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let _guard = lock(&inner.groups_lock);
        let key = codec::pair_key(group, user);
        if !inner.members.handle.contains_key(key)? {
            return Ok(());
        }
        let mut batch = inner.db.batch();
        batch.remove(&inner.members.handle, key);
        batch.remove(&inner.user_groups.handle, codec::pair_key(user, group));
        if let Some(mut record) = inner.load_group(group)? {
            record.member_count = record.member_count.saturating_sub(1);
            batch.insert(
                &inner.groups.handle,
                codec::id_key(group),
                codec::encode_group(&record),
            );
        }
        inner.commit(batch, true)
    }

    /// The members of `group`, ascending by id (empty for a missing group).
    pub fn members(&self, group: GroupId) -> Result<Vec<UserId>, StoreError> {
        self.inner.members.scan_pairs(group)
    }

    /// Whether `user` is a member of `group`.
    pub fn is_member(&self, group: GroupId, user: UserId) -> Result<bool, StoreError> {
        let members = &self.inner.members;
        let key = codec::pair_key(group, user);
        match members.get(&key)? {
            Some(value) => codec::check_empty(&value)
                .map(|()| true)
                .map_err(|d| members.corrupt(&key, d)),
            None => Ok(false),
        }
    }
}
