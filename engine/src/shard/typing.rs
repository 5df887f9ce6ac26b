//! Typing hints: `Typing { conv }` checked on the conversation's home
//! shard against the same cached state a message is (the 1:1 block state,
//! the group's member list) and pushed, unsequenced and unstored, to the
//! other participants' live sessions. It owns only that check and
//! fan-out: a hint is never queued for later, so nothing here grows.

use std::rc::Rc;
use std::sync::Arc;

use tern_proto::{ConvId, ErrorCode, ServerBody, ServerFrame, UserId};
use tern_storage::StoreError;

use super::{encode_shared, store_error_frame, Shard};
use crate::mesh::{ConnKey, Event, Recipients};

/// Why a typing hint is refused.
enum Refused {
    Store(StoreError),
    Because(ErrorCode, &'static str),
}

impl Shard {
    /// Serves `Typing` for a conversation homed here and answers the
    /// typing connection (`Ok` or the refusal).
    pub(super) async fn typing(self: &Rc<Self>, from: UserId, conn: ConnKey, request_id: u64, conv: ConvId) {
        let answer = match self.typing_recipients(from, conv).await {
            Ok(recipients) => {
                let push = ServerFrame {
                    request_id: 0,
                    body: ServerBody::Typing { conv, user: from },
                };
                let frame = encode_shared(&push, self.config.max_frame_bytes);
                for (shard, to) in recipients {
                    let notify = Event::Notify {
                        to,
                        frame: frame.clone(),
                    };
                    self.send_event(shard, notify).await;
                }
                ServerFrame {
                    request_id,
                    body: ServerBody::Ok,
                }
            }
            Err(Refused::Store(e)) => store_error_frame(request_id, &e),
            Err(Refused::Because(code, why)) => ServerFrame::error(request_id, code, why),
        };
        self.reply(from, conn, answer).await;
    }

    /// Who gets `from`'s typing hint in `conv`, by home shard.
    async fn typing_recipients(
        self: &Rc<Self>,
        from: UserId,
        conv: ConvId,
    ) -> Result<Vec<(usize, Recipients)>, Refused> {
        match conv {
            ConvId::Direct { .. } => {
                let peer = conv.peer_of(from).ok_or(Refused::Because(
                    ErrorCode::Forbidden,
                    "not a participant of this conversation",
                ))?;
                self.ensure_conv(conv).await.map_err(Refused::Store)?;
                // Nothing yields between the load and this check, so the
                // state is cached; were it not, the block is unknown and
                // the hint is simply not sent.
                match self.cached_block_refusal(conv, from) {
                    Some(None) => Ok(vec![(self.home_of(peer), Recipients::One(peer))]),
                    Some(Some(why)) => Err(Refused::Because(ErrorCode::Forbidden, why)),
                    None => Ok(Vec::new()),
                }
            }
            ConvId::Group { group } => {
                let not_member = || Refused::Because(ErrorCode::Forbidden, "not a member of this group");
                let may_be = self
                    .may_be_member(group, from)
                    .await
                    .map_err(|refused| Refused::Because(refused.code, refused.message))?;
                if !may_be {
                    return Err(not_member());
                }
                let state = self.group_state(group).await.map_err(Refused::Store)?;
                if !state.members.contains_key(&from) {
                    return Err(not_member());
                }
                if state.all.len() > self.config.write_diffusion_max_members {
                    // A crowd: the hint is noise and would cost a push per member.
                    return Ok(Vec::new());
                }
                let home = self.home_of(from);
                Ok(state
                    .members_by_shard()
                    .filter_map(|(shard, members)| {
                        let to: Arc<[UserId]> = if shard == home {
                            members.iter().copied().filter(|&m| m != from).collect()
                        } else {
                            members.clone()
                        };
                        (!to.is_empty()).then_some((shard, Recipients::Many(to)))
                    })
                    .collect())
            }
        }
    }
}
