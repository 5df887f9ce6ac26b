//! Byte layouts of every key and value the store writes, and their
//! defensive decoders. It owns the on-disk format described in
//! `docs/storage.md`: ids are big-endian `u64` so that byte order equals
//! numeric order and `id ++ id` keys group by their first id under a prefix
//! scan; structured values start with a format-version byte so a later
//! layout can be told apart. Decoders never index blindly: any short,
//! long or unknown-version input is an `Err(detail)`, which the caller
//! turns into [`crate::StoreError::Corrupt`] naming its keyspace.

/// Version byte at the start of every structured value written by this build.
pub const VALUE_V1: u8 = 1;
/// Version byte of the `groups` values written since groups have roles and
/// invites (v1 records still decode, as open groups with no invites).
pub const GROUP_V2: u8 = 2;
/// Version byte of a deleted group's `groups` value, `[3][deleted_at_ms
/// u64 BE]`: the key stays, so the id is never handed out again.
pub const GROUP_DELETED: u8 = 3;

use tern_proto::{ConvId, GroupRole};

/// Bytes of a SHA-256 token hash (the `tokens` key).
pub const TOKEN_HASH_LEN: usize = 32;

/// `users`, `groups` keys: the id, big-endian.
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// `friends` (`user ++ friend`) and `members` (`group ++ user`) keys.
pub fn pair_key(first: u64, second: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&first.to_be_bytes());
    key[8..].copy_from_slice(&second.to_be_bytes());
    key
}

/// `user_tokens` key: `user ++ sha256(token)`.
pub fn user_token_key(user: u64, hash: &[u8; TOKEN_HASH_LEN]) -> [u8; 8 + TOKEN_HASH_LEN] {
    let mut key = [0u8; 8 + TOKEN_HASH_LEN];
    key[..8].copy_from_slice(&user.to_be_bytes());
    key[8..].copy_from_slice(hash);
    key
}

/// Decodes an 8-byte big-endian id key.
pub fn decode_id_key(key: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| format!("id key is {} bytes, expected 8", key.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes the second id of a 16-byte pair key.
pub fn decode_pair_second(key: &[u8]) -> Result<u64, String> {
    match key.get(8..) {
        Some(rest) if key.len() == 16 => decode_id_key(rest),
        _ => Err(format!("pair key is {} bytes, expected 16", key.len())),
    }
}

/// Decodes the token hash of a `user_tokens` key.
pub fn decode_user_token_hash(key: &[u8]) -> Result<[u8; TOKEN_HASH_LEN], String> {
    key.get(8..)
        .and_then(|rest| <[u8; TOKEN_HASH_LEN]>::try_from(rest).ok())
        .ok_or_else(|| format!("user_tokens key is {} bytes, expected 40", key.len()))
}

/// `accounts` value: `[v1][user u64 BE][argon2id PHC string, UTF-8]`.
pub fn encode_account(user: u64, phc: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + phc.len());
    v.push(VALUE_V1);
    v.extend_from_slice(&user.to_be_bytes());
    v.extend_from_slice(phc.as_bytes());
    v
}

/// Decodes an `accounts` value into `(user, phc)`.
pub fn decode_account(value: &[u8]) -> Result<(u64, &str), String> {
    let mut r = Reader::versioned(value)?;
    let user = r.u64()?;
    let phc = r.rest_utf8()?;
    Ok((user, phc))
}

/// `users` value: `[v1][username, UTF-8]`.
pub fn encode_user(username: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + username.len());
    v.push(VALUE_V1);
    v.extend_from_slice(username.as_bytes());
    v
}

/// Decodes a `users` value into the username.
pub fn decode_user(value: &[u8]) -> Result<&str, String> {
    Reader::versioned(value)?.rest_utf8()
}

/// `tokens` value: `[v1][user u64 BE][expires_at unix ms u64 BE]`.
pub fn encode_token(user: u64, expires_at_ms: u64) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[0] = VALUE_V1;
    v[1..9].copy_from_slice(&user.to_be_bytes());
    v[9..].copy_from_slice(&expires_at_ms.to_be_bytes());
    v
}

/// Decodes a `tokens` value into `(user, expires_at_ms)`.
pub fn decode_token(value: &[u8]) -> Result<(u64, u64), String> {
    let mut r = Reader::versioned(value)?;
    let out = (r.u64()?, r.u64()?);
    r.end()?;
    Ok(out)
}

/// `user_tokens` value: `[v1][expires_at unix ms u64 BE]`, so expired
/// entries can be swept from the index without reading `tokens`.
pub fn encode_user_token(expires_at_ms: u64) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = VALUE_V1;
    v[1..].copy_from_slice(&expires_at_ms.to_be_bytes());
    v
}

/// Encodes a `revocations` value: when the user's sessions were revoked.
pub fn encode_revocation(at_ms: u64) -> [u8; 9] {
    encode_user_token(at_ms)
}

/// Decodes a `revocations` value into its Unix ms.
pub fn decode_revocation(value: &[u8]) -> Result<u64, String> {
    decode_user_token(value)
}

/// Decodes a `user_tokens` value into `expires_at_ms`.
pub fn decode_user_token(value: &[u8]) -> Result<u64, String> {
    let mut r = Reader::versioned(value)?;
    let expires = r.u64()?;
    r.end()?;
    Ok(expires)
}

/// A `groups` value decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupValue {
    pub owner: u64,
    pub member_count: u32,
    /// Pending invites (keys under the group in `group_invites`).
    pub invite_count: u32,
    /// Anyone may join; otherwise joining needs an invite.
    pub open: bool,
    pub name: String,
}

/// Bit 0 of a v2 group's flags byte: the group is open.
const GROUP_FLAG_OPEN: u8 = 0x01;

/// `groups` value: `[v2][owner u64 BE][member_count u32 BE][invite_count
/// u32 BE][flags u8: bit 0 open][name, UTF-8]`.
pub fn encode_group(g: &GroupValue) -> Vec<u8> {
    let mut v = Vec::with_capacity(18 + g.name.len());
    v.push(GROUP_V2);
    v.extend_from_slice(&g.owner.to_be_bytes());
    v.extend_from_slice(&g.member_count.to_be_bytes());
    v.extend_from_slice(&g.invite_count.to_be_bytes());
    v.push(if g.open { GROUP_FLAG_OPEN } else { 0 });
    v.extend_from_slice(g.name.as_bytes());
    v
}

/// A deleted group's `groups` value.
pub fn encode_group_tombstone(deleted_at_ms: u64) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = GROUP_DELETED;
    v[1..].copy_from_slice(&deleted_at_ms.to_be_bytes());
    v
}

/// When the group was deleted, if `value` is a deleted group's value;
/// `None` for any other version (decode it with [`decode_group`]).
pub fn decode_group_tombstone(value: &[u8]) -> Result<Option<u64>, String> {
    let Some((&GROUP_DELETED, rest)) = value.split_first() else {
        return Ok(None);
    };
    let mut r = Reader { rest };
    let at = r.u64()?;
    r.end()?;
    Ok(Some(at))
}

/// Decodes a `groups` value: v2, or v1 (`[v1][owner][member_count][name]`,
/// written before roles), which reads as an open group with no invites.
pub fn decode_group(value: &[u8]) -> Result<GroupValue, String> {
    let (version, rest) = value.split_first().ok_or("empty value")?;
    let mut r = Reader { rest };
    let owner = r.u64()?;
    let member_count = r.u32()?;
    let (invite_count, open) = match *version {
        VALUE_V1 => (0, true),
        GROUP_V2 => {
            let invite_count = r.u32()?;
            let [flags] = r.take::<1>()?;
            if flags & !GROUP_FLAG_OPEN != 0 {
                return Err(format!("unknown group flags {flags:#04x}"));
            }
            (invite_count, flags & GROUP_FLAG_OPEN != 0)
        }
        v => return Err(format!("unknown value version {v}")),
    };
    let name = r.rest_utf8()?.to_owned();
    Ok(GroupValue {
        owner,
        member_count,
        invite_count,
        open,
        name,
    })
}

/// `members` value: `[v1][role u8: 0 owner, 1 admin, 2 member]`.
pub fn encode_member(role: GroupRole) -> [u8; 2] {
    let byte = match role {
        GroupRole::Owner => 0,
        GroupRole::Admin => 1,
        GroupRole::Member => 2,
    };
    [VALUE_V1, byte]
}

/// Decodes a `members` value. An empty value (written before roles)
/// is a plain member; the caller promotes the group's owner.
pub fn decode_member(value: &[u8]) -> Result<GroupRole, String> {
    if value.is_empty() {
        return Ok(GroupRole::Member);
    }
    let mut r = Reader::versioned(value)?;
    let [byte] = r.take::<1>()?;
    r.end()?;
    match byte {
        0 => Ok(GroupRole::Owner),
        1 => Ok(GroupRole::Admin),
        2 => Ok(GroupRole::Member),
        other => Err(format!("unknown member role {other}")),
    }
}

/// Edge sets (`friends`, `members`) carry no value; anything else is corrupt.
pub fn check_empty(value: &[u8]) -> Result<(), String> {
    if value.is_empty() {
        Ok(())
    } else {
        Err(format!("edge value is {} bytes, expected 0", value.len()))
    }
}

/// Bytes of a conversation key: a tag byte and two `u64`s.
pub const CONV_KEY_LEN: usize = 17;
/// Tag byte of a 1:1 conversation key (`0x01 ++ low ++ high`).
pub const CONV_TAG_DIRECT: u8 = 0x01;
/// Tag byte of a group conversation key (`0x02 ++ group ++ 0u64`).
pub const CONV_TAG_GROUP: u8 = 0x02;
/// `history` key: `conv ++ seq`.
pub const HISTORY_KEY_LEN: usize = CONV_KEY_LEN + 8;
/// `inbox` key: `user ++ conv ++ seq`.
pub const INBOX_KEY_LEN: usize = 8 + CONV_KEY_LEN + 8;
/// `receipts` and `user_convs` keys: `user ++ conv`.
pub const USER_CONV_KEY_LEN: usize = 8 + CONV_KEY_LEN;

/// The fixed-length conversation key: `0x01 ++ low ++ high` for a 1:1
/// conversation, `0x02 ++ group ++ 0u64` for a group, so every conversation
/// key is 17 bytes and a conversation's entries form one prefix.
pub fn conv_key(conv: ConvId) -> [u8; CONV_KEY_LEN] {
    let mut key = [0u8; CONV_KEY_LEN];
    let (tag, a, b) = match conv {
        ConvId::Direct { low, high } => (CONV_TAG_DIRECT, low, high),
        ConvId::Group { group } => (CONV_TAG_GROUP, group, 0),
    };
    key[0] = tag;
    key[1..9].copy_from_slice(&a.to_be_bytes());
    key[9..].copy_from_slice(&b.to_be_bytes());
    key
}

/// Decodes a 17-byte conversation key.
pub fn decode_conv_key(key: &[u8]) -> Result<ConvId, String> {
    let Some((&tag, rest)) = key.split_first() else {
        return Err("empty conversation key".to_owned());
    };
    if key.len() != CONV_KEY_LEN {
        return Err(format!(
            "conversation key is {} bytes, expected {CONV_KEY_LEN}",
            key.len()
        ));
    }
    let a = decode_id_key(rest.get(..8).unwrap_or_default())?;
    let b = decode_id_key(rest.get(8..).unwrap_or_default())?;
    match tag {
        CONV_TAG_DIRECT if a <= b => Ok(ConvId::Direct { low: a, high: b }),
        CONV_TAG_DIRECT => Err(format!("direct conversation key with low {a} > high {b}")),
        CONV_TAG_GROUP if b == 0 => Ok(ConvId::Group { group: a }),
        CONV_TAG_GROUP => Err("group conversation key with non-zero padding".to_owned()),
        other => Err(format!("unknown conversation tag {other:#04x}")),
    }
}

/// `history` key: `conv (17) ++ seq (8)`.
pub fn history_key(conv: ConvId, seq: u64) -> [u8; HISTORY_KEY_LEN] {
    let mut key = [0u8; HISTORY_KEY_LEN];
    key[..CONV_KEY_LEN].copy_from_slice(&conv_key(conv));
    key[CONV_KEY_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Decodes a `history` key into `(conv, seq)`.
pub fn decode_history_key(key: &[u8]) -> Result<(ConvId, u64), String> {
    if key.len() != HISTORY_KEY_LEN {
        return Err(format!(
            "history key is {} bytes, expected {HISTORY_KEY_LEN}",
            key.len()
        ));
    }
    let conv = decode_conv_key(key.get(..CONV_KEY_LEN).unwrap_or_default())?;
    let seq = decode_id_key(key.get(CONV_KEY_LEN..).unwrap_or_default())?;
    Ok((conv, seq))
}

/// `user ++ conv` (25 bytes): the `receipts` and `user_convs` key, and the
/// prefix of a user's `inbox` entries in one conversation.
pub fn user_conv_key(user: u64, conv: ConvId) -> [u8; USER_CONV_KEY_LEN] {
    let mut key = [0u8; USER_CONV_KEY_LEN];
    key[..8].copy_from_slice(&user.to_be_bytes());
    key[8..].copy_from_slice(&conv_key(conv));
    key
}

/// Decodes the conversation of a `user ++ conv` key.
pub fn decode_user_conv_key(key: &[u8]) -> Result<ConvId, String> {
    if key.len() != USER_CONV_KEY_LEN {
        return Err(format!(
            "user ++ conversation key is {} bytes, expected {USER_CONV_KEY_LEN}",
            key.len()
        ));
    }
    decode_conv_key(key.get(8..).unwrap_or_default())
}

/// `inbox` key: `user (8) ++ conv (17) ++ seq (8)`.
pub fn inbox_key(user: u64, conv: ConvId, seq: u64) -> [u8; INBOX_KEY_LEN] {
    let mut key = [0u8; INBOX_KEY_LEN];
    key[..USER_CONV_KEY_LEN].copy_from_slice(&user_conv_key(user, conv));
    key[USER_CONV_KEY_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Decodes an `inbox` key into `(user, conv, seq)`.
pub fn decode_inbox_key(key: &[u8]) -> Result<(u64, ConvId, u64), String> {
    if key.len() != INBOX_KEY_LEN {
        return Err(format!(
            "inbox key is {} bytes, expected {INBOX_KEY_LEN}",
            key.len()
        ));
    }
    let user = decode_id_key(key.get(..8).unwrap_or_default())?;
    let conv = decode_conv_key(key.get(8..USER_CONV_KEY_LEN).unwrap_or_default())?;
    let seq = decode_id_key(key.get(USER_CONV_KEY_LEN..).unwrap_or_default())?;
    Ok((user, conv, seq))
}

/// A `history` value decoded (the frame borrowed from the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryValue<'a> {
    pub from: u64,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
    pub frame: &'a [u8],
}

/// `history` value: `[v1][from u64 BE][client_msg_id u64 BE][timestamp ms
/// u64 BE][frame ..]`.
pub fn encode_history(from: u64, client_msg_id: u64, timestamp_ms: u64, frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(25 + frame.len());
    v.push(VALUE_V1);
    v.extend_from_slice(&from.to_be_bytes());
    v.extend_from_slice(&client_msg_id.to_be_bytes());
    v.extend_from_slice(&timestamp_ms.to_be_bytes());
    v.extend_from_slice(frame);
    v
}

/// Decodes a `history` value.
pub fn decode_history(value: &[u8]) -> Result<HistoryValue<'_>, String> {
    let mut r = Reader::versioned(value)?;
    Ok(HistoryValue {
        from: r.u64()?,
        client_msg_id: r.u64()?,
        timestamp_ms: r.u64()?,
        frame: r.rest,
    })
}

/// Version of an `inbox` value that points into `history` instead of
/// carrying the frame (see [`encode_inbox`]).
pub const INBOX_REF_V2: u8 = 2;

/// `inbox` value: `[v2][timestamp ms u64 BE]` (9 bytes). The frame is not
/// copied: the entry's key names the conversation and seq, whose
/// `history` record holds it. Storing the frame once per message instead
/// of once more per recipient is most of the bytes a message writes.
pub fn encode_inbox(timestamp_ms: u64) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = INBOX_REF_V2;
    v[1..].copy_from_slice(&timestamp_ms.to_be_bytes());
    v
}

/// An `inbox` value decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxValue<'a> {
    pub timestamp_ms: u64,
    /// The frame of a version-1 entry; `None` for a version-2 entry,
    /// whose frame is in `history`.
    pub frame: Option<&'a [u8]>,
}

/// Decodes an `inbox` value of either version.
pub fn decode_inbox(value: &[u8]) -> Result<InboxValue<'_>, String> {
    if let Some((&INBOX_REF_V2, rest)) = value.split_first() {
        let mut r = Reader { rest };
        let timestamp_ms = r.u64()?;
        r.end()?;
        return Ok(InboxValue {
            timestamp_ms,
            frame: None,
        });
    }
    let mut r = Reader::versioned(value)?;
    let timestamp_ms = r.u64()?;
    Ok(InboxValue {
        timestamp_ms,
        frame: Some(r.rest),
    })
}

/// `receipts` value: `[v1][delivered u64 BE][read u64 BE]` (17 bytes).
pub fn encode_receipts(delivered: u64, read: u64) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[0] = VALUE_V1;
    v[1..9].copy_from_slice(&delivered.to_be_bytes());
    v[9..].copy_from_slice(&read.to_be_bytes());
    v
}

/// Decodes a `receipts` value into `(delivered, read)`.
pub fn decode_receipts(value: &[u8]) -> Result<(u64, u64), String> {
    let mut r = Reader::versioned(value)?;
    let out = (r.u64()?, r.u64()?);
    r.end()?;
    Ok(out)
}

/// A cursor that fails instead of panicking on short input.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts after the version byte, which must be [`VALUE_V1`].
    fn versioned(value: &'a [u8]) -> Result<Reader<'a>, String> {
        match value.split_first() {
            Some((&VALUE_V1, rest)) => Ok(Reader { rest }),
            Some((v, _)) => Err(format!("unknown value version {v}")),
            None => Err("empty value".to_owned()),
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(format!(
                "value truncated: needed {N} more bytes, {} left",
                self.rest.len()
            )),
        }
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.take::<8>().map(u64::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_be_bytes)
    }

    fn rest_utf8(self) -> Result<&'a str, String> {
        std::str::from_utf8(self.rest).map_err(|e| format!("text field is not UTF-8: {e}"))
    }

    fn end(self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old `inbox` value, `[v1][timestamp ms u64 BE][frame ..]`, which
    /// carried its own copy of the frame. Stores written before version 2
    /// hold these; they stay readable and are never written any more.
    fn encode_inbox_v1(timestamp_ms: u64, frame: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + frame.len());
        v.push(VALUE_V1);
        v.extend_from_slice(&timestamp_ms.to_be_bytes());
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn roundtrips() {
        assert_eq!(
            decode_account(&encode_account(7, "$argon2id$x")).unwrap(),
            (7, "$argon2id$x")
        );
        assert_eq!(decode_user(&encode_user("alice")).unwrap(), "alice");
        assert_eq!(decode_token(&encode_token(3, 99)).unwrap(), (3, 99));
        assert_eq!(decode_user_token(&encode_user_token(99)).unwrap(), 99);
        for open in [false, true] {
            let g = GroupValue {
                owner: 5,
                member_count: 2,
                invite_count: 7,
                open,
                name: "rust fans".into(),
            };
            assert_eq!(decode_group(&encode_group(&g)).unwrap(), g);
        }
        for role in [GroupRole::Owner, GroupRole::Admin, GroupRole::Member] {
            assert_eq!(decode_member(&encode_member(role)).unwrap(), role);
        }
        assert_eq!(decode_pair_second(&pair_key(1, 2)).unwrap(), 2);
        let h = [9u8; 32];
        assert_eq!(decode_user_token_hash(&user_token_key(4, &h)).unwrap(), h);
    }

    #[test]
    fn pre_role_group_and_member_values_still_decode() {
        // A v1 group record and an empty member value, byte for byte as the
        // build before roles wrote them: an open group, a plain member.
        let mut v1 = vec![1];
        v1.extend_from_slice(&5u64.to_be_bytes());
        v1.extend_from_slice(&3u32.to_be_bytes());
        v1.extend_from_slice(b"old days");
        assert_eq!(
            decode_group(&v1).unwrap(),
            GroupValue {
                owner: 5,
                member_count: 3,
                invite_count: 0,
                open: true,
                name: "old days".into(),
            }
        );
        assert_eq!(decode_member(b"").unwrap(), GroupRole::Member);
        for bad in [&b"\x01"[..], b"\x01\x03", b"\x02\x01", b"\x01\x01\x00", b"x"] {
            assert!(decode_member(bad).is_err(), "{bad:?}");
        }
        let mut bad_flags = encode_group(&GroupValue {
            owner: 1,
            member_count: 1,
            invite_count: 0,
            open: true,
            name: "g".into(),
        });
        bad_flags[17] = 0x80;
        assert!(decode_group(&bad_flags).is_err());
    }

    #[test]
    fn big_endian_keys_sort_numerically() {
        assert!(id_key(255) < id_key(256));
        assert!(pair_key(1, u64::MAX) < pair_key(2, 0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x02abc",
            b"\x01\x00",
            b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\xff",
        ] {
            assert!(decode_account(bad).is_err(), "{bad:?}");
            assert!(decode_token(bad).is_err(), "{bad:?}");
            assert!(decode_group(bad).is_err(), "{bad:?}");
        }
        assert!(decode_token(&[&encode_token(1, 2)[..], b"x"].concat()).is_err());
        assert!(decode_user(b"").is_err());
        assert!(decode_id_key(b"1234567").is_err());
        assert!(decode_pair_second(b"123456789").is_err());
        assert!(check_empty(b"x").is_err());
        // A version-2 inbox value is exactly 9 bytes.
        assert!(decode_inbox(b"\x02\0\0\0\0\0\0\0\0\0").is_err());
        for bad in [&b""[..], b"\x01", b"\x02abc", b"\x03abc", b"\x01\x00\x00\x00\x00"] {
            assert!(decode_history(bad).is_err(), "{bad:?}");
            assert!(decode_inbox(bad).is_err(), "{bad:?}");
            assert!(decode_receipts(bad).is_err(), "{bad:?}");
        }
        let mut k = conv_key(ConvId::direct(1, 2));
        k[0] = 9;
        assert!(decode_conv_key(&k).is_err());
        let mut k = conv_key(ConvId::Group { group: 1 });
        k[16] = 1;
        assert!(decode_conv_key(&k).is_err());
        let k = conv_key(ConvId::Direct { low: 5, high: 2 });
        assert!(decode_conv_key(&k).is_err());
        assert!(decode_history_key(&[0u8; 24]).is_err());
        assert!(decode_inbox_key(&[9u8; 33]).is_err());
    }

    #[test]
    fn message_layouts_roundtrip_and_sort() {
        let d = ConvId::direct(9, 3);
        let g = ConvId::Group { group: 7 };
        assert_eq!(decode_conv_key(&conv_key(d)).unwrap(), d);
        assert_eq!(decode_conv_key(&conv_key(g)).unwrap(), g);
        assert_eq!(decode_history_key(&history_key(g, 42)).unwrap(), (g, 42));
        assert_eq!(decode_inbox_key(&inbox_key(5, d, 42)).unwrap(), (5, d, 42));
        assert_eq!(decode_user_conv_key(&user_conv_key(5, g)).unwrap(), g);
        let h = encode_history(1, 2, 3, b"frame");
        assert_eq!(
            decode_history(&h).unwrap(),
            HistoryValue {
                from: 1,
                client_msg_id: 2,
                timestamp_ms: 3,
                frame: b"frame"
            }
        );
        assert_eq!(
            decode_inbox(&encode_inbox_v1(4, b"f")).unwrap(),
            InboxValue {
                timestamp_ms: 4,
                frame: Some(b"f")
            }
        );
        assert_eq!(
            decode_inbox(&encode_inbox(4)).unwrap(),
            InboxValue {
                timestamp_ms: 4,
                frame: None
            }
        );
        assert_eq!(
            encode_inbox(0x0102).to_vec(),
            b"\x02\0\0\0\0\0\0\x01\x02".to_vec()
        );
        assert_eq!(decode_receipts(&encode_receipts(5, 3)).unwrap(), (5, 3));
        assert!(history_key(d, 255) < history_key(d, 256));
        assert!(history_key(d, u64::MAX) < history_key(ConvId::direct(3, 10), 0));
        assert!(conv_key(ConvId::direct(u64::MAX - 1, u64::MAX)) < conv_key(g));
        assert!(inbox_key(1, g, u64::MAX) < inbox_key(2, d, 0));
    }
}
