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
    pub name: String,
}

/// `groups` value: `[v1][owner u64 BE][member_count u32 BE][name, UTF-8]`.
pub fn encode_group(g: &GroupValue) -> Vec<u8> {
    let mut v = Vec::with_capacity(13 + g.name.len());
    v.push(VALUE_V1);
    v.extend_from_slice(&g.owner.to_be_bytes());
    v.extend_from_slice(&g.member_count.to_be_bytes());
    v.extend_from_slice(g.name.as_bytes());
    v
}

/// Decodes a `groups` value.
pub fn decode_group(value: &[u8]) -> Result<GroupValue, String> {
    let mut r = Reader::versioned(value)?;
    let owner = r.u64()?;
    let member_count = r.u32()?;
    let name = r.rest_utf8()?.to_owned();
    Ok(GroupValue {
        owner,
        member_count,
        name,
    })
}

/// Edge sets (`friends`, `members`) carry no value; anything else is corrupt.
pub fn check_empty(value: &[u8]) -> Result<(), String> {
    if value.is_empty() {
        Ok(())
    } else {
        Err(format!("edge value is {} bytes, expected 0", value.len()))
    }
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

    #[test]
    fn roundtrips() {
        assert_eq!(
            decode_account(&encode_account(7, "$argon2id$x")).unwrap(),
            (7, "$argon2id$x")
        );
        assert_eq!(decode_user(&encode_user("alice")).unwrap(), "alice");
        assert_eq!(decode_token(&encode_token(3, 99)).unwrap(), (3, 99));
        assert_eq!(decode_user_token(&encode_user_token(99)).unwrap(), 99);
        let g = GroupValue {
            owner: 5,
            member_count: 2,
            name: "rust fans".into(),
        };
        assert_eq!(decode_group(&encode_group(&g)).unwrap(), g);
        assert_eq!(decode_pair_second(&pair_key(1, 2)).unwrap(), 2);
        let h = [9u8; 32];
        assert_eq!(decode_user_token_hash(&user_token_key(4, &h)).unwrap(), h);
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
    }
}
