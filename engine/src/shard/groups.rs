//! Groups homed on this shard: cached member lists, fan-out and membership.
//!
//! A group's home shard keeps its members in memory, split by the members'
//! home shards, so a group message crosses to each destination shard once,
//! carrying a shared list, not once per member. Every membership change
//! for a group runs here, after its store write, so the cache cannot
//! drift from the store.

use std::rc::Rc;
use std::sync::Arc;

use rustc_hash::FxHashSet;
use tern_proto::{ChatMessage, Content, ConvId, ErrorCode, GroupId, ReceiptKind, ServerFrame, UserId};
use tern_storage::{InboxTargets, MessageWrite, StoreError, WriteOp};

use super::commit::{store_frame, Effect};
use super::{refusal, store_error_frame, Shard};
use crate::mesh::{ConnKey, Event, GroupOp, GroupReply, Recipients};

/// A group homed on this shard, as cached for fan-out.
pub(super) struct GroupState {
    members: FxHashSet<UserId>,
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
        let all: Arc<[UserId]> = members.iter().copied().collect();
        GroupState {
            members,
            all,
            by_shard: by_shard.into_iter().map(Arc::from).collect(),
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
        if !state.members.contains(&from) {
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

    /// Runs a membership operation for a group homed here.
    pub(super) async fn group_admin(&self, user: UserId, group: GroupId, op: GroupOp) -> GroupReply {
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
                // A new member starts at the group's current seq, so a sync
                // does not replay what was said before they joined.
                let conv = ConvId::Group { group };
                let joined_at = if join {
                    self.last_seq(conv).await.map_err(map_err)?
                } else {
                    0
                };
                // From here to the cache update nothing yields: every message
                // sequenced after `joined_at` sees the new member list.
                let cursor_stored = (joined_at > 0).then(|| {
                    let (tx, rx) = futures_channel::oneshot::channel();
                    self.stage_receipt(user, conv, ReceiptKind::Read, joined_at, Some(tx), None);
                    rx
                });
                {
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
                }
                // Answer only once the cursor is stored, or a sync right
                // after the join would replay the whole group.
                if let Some(stored) = cursor_stored {
                    if stored.await != Ok(true) {
                        return Err(refusal(ErrorCode::Internal, "join not stored; retry"));
                    }
                }
                Ok(Vec::new())
            }
        }
    }
}
