//! What a 1:1 receipt may say, answered by the conversation's home shard
//! from the same cached state a message is sequenced against: the
//! conversation's last stored seq (a receipt cannot claim more than was
//! delivered, and a message is delivered only once stored; a seq still
//! being written may yet go to another message) and who blocks whom (a blocked user's receipts are stored for
//! themselves but not pushed to the blocker). The receipt itself is
//! staged by the sender's own shard; this module owns only the check.

use std::rc::Rc;

use tern_proto::{ConvId, UserId};
use tern_storage::StoreError;

use super::Shard;
use crate::mesh::DirectReceiptCheck;

impl Shard {
    /// Checks a receipt of `user` in the 1:1 `conv`, homed here.
    pub(super) async fn direct_receipt_check(
        self: &Rc<Self>,
        user: UserId,
        conv: ConvId,
    ) -> Result<DirectReceiptCheck, StoreError> {
        let stored_seq = self.stored_seq(conv).await?;
        // Nothing yields between the load (in `stored_seq`) and this read,
        // so the state is cached; were it not, the block is unknown and
        // nothing is pushed.
        let push = matches!(self.cached_block_refusal(conv, user), Some(None));
        Ok(DirectReceiptCheck { stored_seq, push })
    }
}
