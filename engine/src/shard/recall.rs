//! Recalls ("delete for everyone"): a message whose content is
//! `Recall { seq }` withdraws message `seq` of the same conversation. The
//! conversation's home shard checks it before sequencing (the target is
//! stored, the caller sent it, it is not itself a recall, it is inside
//! the recall window), then sequences and delivers the recall like any
//! message, and stages, in the same store batch, the erasure of the
//! target's content ([`WriteOp::Erase`]): from the commit on, history and
//! sync serve the target as `Recalled`, and the recall tells live clients
//! to hide it. This module owns that check and the erased frame.

use std::rc::Rc;

use tern_proto::{ChatMessage, Content, ContentKind, ConvId, ErrorCode, ServerFrame, UserId};
use tern_storage::{StoreError, WriteOp};

use super::{now_ms, store_error_frame, Shard};

/// Why a recall is refused; becomes the answer to its sender.
pub(super) enum RecallRefused {
    Store(StoreError),
    Because(ErrorCode, &'static str),
}

impl RecallRefused {
    pub(super) fn frame(&self, request_id: u64) -> ServerFrame {
        match self {
            RecallRefused::Store(e) => store_error_frame(request_id, e),
            RecallRefused::Because(code, why) => ServerFrame::error(request_id, *code, *why),
        }
    }
}

impl Shard {
    /// Checks that `from` may withdraw message `target` of `conv` and
    /// returns the erasure to stage with the recall (`None` when the
    /// target was already erased: the recall is still sequenced, as a
    /// retry would be, and erases nothing). A retry of a recall already
    /// sequenced (same `client_msg_id`) is not checked again: sequencing
    /// answers it with its original ack, whatever became of the target.
    pub(super) async fn check_recall(
        self: &Rc<Self>,
        conv: ConvId,
        from: UserId,
        client_msg_id: u64,
        target: u64,
    ) -> Result<Option<WriteOp>, RecallRefused> {
        self.ensure_conv(conv).await.map_err(RecallRefused::Store)?;
        if self.seen_client_msg_id(conv, from, client_msg_id) {
            return Ok(None);
        }
        let window_ms = u64::try_from(self.config.recall_window.as_millis()).unwrap_or(u64::MAX);
        if window_ms == 0 {
            return Err(RecallRefused::Because(
                ErrorCode::Forbidden,
                "this server does not allow withdrawing messages",
            ));
        }
        let entry = self
            .blocking(move |store| store.history_entry(conv, target))
            .await
            .map_err(RecallRefused::Store)?
            .ok_or(RecallRefused::Because(
                ErrorCode::NotFound,
                "no such message in this conversation",
            ))?;
        if entry.from != from {
            return Err(RecallRefused::Because(
                ErrorCode::Forbidden,
                "only its sender may withdraw a message",
            ));
        }
        let Some(message) = crate::catchup::decode_stored_frame(&entry.frame) else {
            let detail = format!("history of {conv:?} seq {target} does not decode as a message");
            return Err(RecallRefused::Store(StoreError::Corrupt {
                path: self.store.dir().to_path_buf(),
                detail,
            }));
        };
        match message.content.kind {
            ContentKind::Recall { .. } => {
                return Err(RecallRefused::Because(
                    ErrorCode::InvalidArgument,
                    "a recall cannot itself be withdrawn",
                ))
            }
            ContentKind::Recalled => return Ok(None),
            ContentKind::Text | ContentKind::Media { .. } => {}
        }
        if now_ms().saturating_sub(entry.timestamp_ms) > window_ms {
            return Err(RecallRefused::Because(
                ErrorCode::Forbidden,
                "too late to withdraw this message",
            ));
        }
        let erased = self.message_frame(ChatMessage {
            conv,
            seq: target,
            from,
            client_msg_id: entry.client_msg_id,
            timestamp_ms: entry.timestamp_ms,
            content: Content {
                kind: ContentKind::Recalled,
                body: Vec::new(),
            },
        });
        Ok(Some(WriteOp::Erase {
            conv,
            seq: target,
            from,
            client_msg_id: entry.client_msg_id,
            timestamp_ms: entry.timestamp_ms,
            frame: super::commit::store_frame(&erased),
        }))
    }
}
