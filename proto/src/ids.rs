//! Identifiers and home-shard placement.
//!
//! Users and groups get dense `u64` ids from the store. A 1:1 conversation is
//! named by the ordered pair of its users, so both sides compute the same
//! [`ConvId`] and therefore the same home shard. [`shard_of`] is a fixed,
//! documented mix function (SplitMix64's finaliser) rather than Rust's
//! randomised `DefaultHasher`, so placement is identical across processes,
//! restarts and client implementations.

use rkyv::{Archive, Deserialize, Serialize};

/// A registered user's id. Zero is never assigned.
pub type UserId = u64;
/// A group's id. Zero is never assigned.
pub type GroupId = u64;

/// A conversation: either a 1:1 pair or a group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub enum ConvId {
    /// A 1:1 conversation; `low <= high` always (see [`ConvId::direct`]).
    /// The server refuses messages to oneself, so on the wire `low < high`.
    Direct { low: UserId, high: UserId },
    /// A group conversation.
    Group { group: GroupId },
}

impl ConvId {
    /// The conversation between `a` and `b`, the same whichever side asks.
    pub fn direct(a: UserId, b: UserId) -> ConvId {
        ConvId::Direct {
            low: a.min(b),
            high: a.max(b),
        }
    }

    /// The key the home shard of this conversation is derived from: the
    /// group's id, or for 1:1 one of the two user ids (docs/protocol.md,
    /// "Home-shard placement"). Placing a 1:1 conversation with one of its
    /// users saves a cross-shard hop on every message (the sender's or the
    /// recipient's shard sequences it); a hashed key put it on a third
    /// shard for all but 2 of N shards. Measured on 2 vCPUs at window 1:
    /// server CPU per message −4% at 2 shards, −7% at 4 (docs/benchmarks.md).
    pub fn placement_key(&self) -> u64 {
        match *self {
            // One of the two participants, picked by a mix of both: a
            // message then always starts or ends on its conversation's
            // shard, and one user's conversations still spread.
            ConvId::Direct { low, high } => match mix64(low ^ mix64(high)) & 1 {
                0 => low,
                _ => high,
            },
            ConvId::Group { group } => group,
        }
    }

    /// The other participant of a 1:1 conversation, if `me` is one of them.
    pub fn peer_of(&self, me: UserId) -> Option<UserId> {
        match *self {
            ConvId::Direct { low, high } if low == me => Some(high),
            ConvId::Direct { low, high } if high == me => Some(low),
            _ => None,
        }
    }
}

impl ArchivedConvId {
    /// Converts the archived form back into a native [`ConvId`].
    pub fn to_native(&self) -> ConvId {
        match self {
            ArchivedConvId::Direct { low, high } => ConvId::Direct {
                low: low.to_native(),
                high: high.to_native(),
            },
            ArchivedConvId::Group { group } => ConvId::Group {
                group: group.to_native(),
            },
        }
    }
}

/// SplitMix64's finaliser: a cheap bijective mix with good avalanche, so
/// sequential ids spread evenly over shards.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The home shard of an id (user, group, or a [`ConvId::placement_key`]).
///
/// # Panics
/// Never: `shards` of zero is treated as one.
pub fn shard_of(key: u64, shards: usize) -> usize {
    let shards = shards.max(1) as u64;
    (mix64(key) % shards) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conv_is_symmetric() {
        assert_eq!(ConvId::direct(7, 3), ConvId::direct(3, 7));
        assert_eq!(ConvId::direct(3, 7).peer_of(3), Some(7));
        assert_eq!(ConvId::direct(3, 7).peer_of(9), None);
    }

    #[test]
    fn shard_of_is_stable_and_spreads() {
        // Pinned values: placement must never change between releases.
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        let mut counts = [0usize; 4];
        for id in 1..=4000u64 {
            let s = shard_of(id, 4);
            counts[s] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
        assert_eq!(shard_of(42, 0), 0);
    }

    #[test]
    fn a_direct_conversation_is_placed_with_one_of_its_users_half_each_way() {
        let mut high = 0;
        for low in 1..=100u64 {
            for other in low + 1..=low + 40 {
                let key = ConvId::direct(other, low).placement_key();
                assert!(key == low || key == other, "{low}, {other}: {key}");
                high += usize::from(key == other);
            }
        }
        assert!((1800..2200).contains(&high), "{high} of 4,000 with the higher id");
    }
}
