//! Input limits that both ends of a connection enforce.
//!
//! Each bound is a named constant so that a client can check its input
//! before sending it and the server can refuse it with a typed error. Limits
//! an operator may tune (frame size, queue depths, rates) live in the
//! server's configuration instead; these are the ones fixed by the protocol.

use crate::message::ErrorCode;

/// Default (and recommended) upper bound of a frame body, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 64 * 1024;
/// A body may never be larger than this, whatever is configured.
pub const ABSOLUTE_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
/// Usernames are 3 to 32 bytes of `[a-z0-9_.-]`, starting with a letter or digit.
pub const USERNAME_LEN_MIN: usize = 3;
/// See [`USERNAME_LEN_MIN`].
pub const USERNAME_LEN_MAX: usize = 32;
/// Passwords are 8 to 256 bytes; anything (UTF-8 or not) is accepted.
pub const PASSWORD_LEN_MIN: usize = 8;
/// See [`PASSWORD_LEN_MIN`].
pub const PASSWORD_LEN_MAX: usize = 256;
/// Group names are 1 to 64 bytes of UTF-8.
pub const GROUP_NAME_LEN_MAX: usize = 64;
/// A client identifier in `Hello` is at most this long.
pub const CLIENT_NAME_LEN_MAX: usize = 64;
/// Media references: URL and MIME type bounds.
pub const MEDIA_URL_LEN_MAX: usize = 2048;
/// See [`MEDIA_URL_LEN_MAX`].
pub const MEDIA_MIME_LEN_MAX: usize = 128;
/// Most messages one `History` page or conversations one `Conversations`
/// page returns; larger requests are clamped.
pub const PAGE_LIMIT_MAX: u32 = 200;
/// Most members one `GroupMembersPage` answer lists, and most users one
/// `GroupInvitesPage` answer lists; larger requests are clamped (a page
/// may also be cut shorter to fit one frame).
pub const MEMBERS_PAGE_LIMIT_MAX: u32 = 1000;
/// Most cursors one `Sync` may carry.
pub const SYNC_CURSORS_MAX: usize = 4096;
/// Session tokens are exactly this many random bytes.
pub const TOKEN_LEN: usize = 32;
/// Longest JSON Web Token `LoginJwt` accepts, in bytes: room for an
/// identity provider's usual claims, far below a frame.
pub const JWT_LEN_MAX: usize = 4096;

/// Checks a username against the protocol's rules.
pub fn check_username(name: &str) -> Result<(), (ErrorCode, &'static str)> {
    let bytes = name.as_bytes();
    if !(USERNAME_LEN_MIN..=USERNAME_LEN_MAX).contains(&bytes.len()) {
        return Err((ErrorCode::InvalidArgument, "username must be 3 to 32 bytes"));
    }
    let valid = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-');
    if !bytes.iter().all(valid) || !bytes.first().is_some_and(|b| b.is_ascii_alphanumeric()) {
        return Err((
            ErrorCode::InvalidArgument,
            "username may hold only a-z, 0-9, '_', '.', '-' and must start with a letter or digit",
        ));
    }
    Ok(())
}

/// Checks a password's length.
pub fn check_password(password: &[u8]) -> Result<(), (ErrorCode, &'static str)> {
    if !(PASSWORD_LEN_MIN..=PASSWORD_LEN_MAX).contains(&password.len()) {
        return Err((ErrorCode::InvalidArgument, "password must be 8 to 256 bytes"));
    }
    Ok(())
}

/// Checks a group name.
pub fn check_group_name(name: &str) -> Result<(), (ErrorCode, &'static str)> {
    if name.is_empty() || name.len() > GROUP_NAME_LEN_MAX || name.chars().any(char::is_control) {
        return Err((
            ErrorCode::InvalidArgument,
            "group name must be 1 to 64 bytes with no control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(check_username("alice").is_ok());
        assert!(check_username("a1_.-").is_ok());
        assert!(check_username("al").is_err());
        assert!(check_username(&"a".repeat(33)).is_err());
        assert!(check_username("Alice").is_err());
        assert!(check_username("_alice").is_err());
        assert!(check_username("al ice").is_err());
    }

    #[test]
    fn passwords_and_groups() {
        assert!(check_password(b"12345678").is_ok());
        assert!(check_password(b"1234567").is_err());
        assert!(check_password(&[0u8; 257]).is_err());
        assert!(check_group_name("rust fans").is_ok());
        assert!(check_group_name("").is_err());
        assert!(check_group_name("a\nb").is_err());
    }
}
