//! The per-connection session state machine, without I/O or a clock.
//!
//! A connection moves `AwaitingHello → Anonymous → Authenticated`. Every
//! client frame is first passed to [`Session::admit`], which decides, from
//! the phase and the frame alone, whether it may be served, and checks each
//! field against [`crate::limits`]. The caller (a server shard, the fuzzer,
//! a test) then does the work and reports the outcome back
//! ([`Session::hello_accepted`], [`Session::logged_in`]). Time is passed in
//! as milliseconds so that idle deadlines are deterministic under test.

use crate::limits::{
    check_group_name, check_password, check_username, CLIENT_NAME_LEN_MAX, JWT_LEN_MAX, MEDIA_MIME_LEN_MAX,
    MEDIA_URL_LEN_MAX, PASSWORD_LEN_MAX, SYNC_CURSORS_MAX, TOKEN_LEN,
};
use crate::message::{ArchivedClientBody, ArchivedContent, ArchivedContentKind, ErrorCode, GroupRole};
use crate::{ids::UserId, SUPPORTED_VERSIONS};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing but `Hello` is accepted.
    AwaitingHello,
    /// Hello done: may register, log in, ping.
    Anonymous,
    /// Logged in as this user.
    Authenticated(UserId),
}

/// Why a frame was refused: the code and message of the error answer, and
/// whether the connection must close after sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: &'static str,
    pub close: bool,
}

impl Refusal {
    fn keep(code: ErrorCode, message: &'static str) -> Refusal {
        Refusal {
            code,
            message,
            close: false,
        }
    }
}

impl From<(ErrorCode, &'static str)> for Refusal {
    fn from((code, message): (ErrorCode, &'static str)) -> Refusal {
        Refusal::keep(code, message)
    }
}

/// How large a message's content may be, bytes: server settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentLimits {
    /// The body (the server's `max_message_bytes`).
    pub body: usize,
    /// The body, a media URL and its MIME type together. The server's
    /// copy of a message (and a page listing it) carries all three and
    /// must still fit in one of its frames, so a server sets this to its
    /// frame limit less the envelope it keeps for that.
    pub total: usize,
}

/// One connection's protocol state.
#[derive(Debug, Clone)]
pub struct Session {
    phase: Phase,
    last_frame_ms: u64,
    idle_timeout_ms: u64,
    content: ContentLimits,
}

impl Session {
    /// A fresh connection opened at `now_ms`.
    pub fn new(now_ms: u64, idle_timeout_ms: u64, content: ContentLimits) -> Session {
        Session {
            phase: Phase::AwaitingHello,
            last_frame_ms: now_ms,
            idle_timeout_ms,
            content,
        }
    }

    /// A connection that was authenticated elsewhere (handed over between shards).
    pub fn authenticated(user: UserId, now_ms: u64, idle_timeout_ms: u64, content: ContentLimits) -> Session {
        Session {
            phase: Phase::Authenticated(user),
            last_frame_ms: now_ms,
            idle_timeout_ms,
            content,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<UserId> {
        match self.phase {
            Phase::Authenticated(user) => Some(user),
            _ => None,
        }
    }

    /// When the connection counts as idle unless another frame arrives.
    pub fn idle_deadline_ms(&self) -> u64 {
        self.last_frame_ms.saturating_add(self.idle_timeout_ms)
    }

    /// Whether the connection has been silent past its idle timeout.
    pub fn is_idle(&self, now_ms: u64) -> bool {
        now_ms >= self.idle_deadline_ms()
    }

    /// Counts a frame that is refused before [`Session::admit`] sees it
    /// (by the connection's rate meters) as activity: every frame that
    /// arrives keeps the connection from being idle, served or not.
    pub fn touch(&mut self, now_ms: u64) {
        self.last_frame_ms = self.last_frame_ms.max(now_ms);
    }

    /// Decides whether a frame may be served now. Any frame, admitted or
    /// not, counts as activity for the idle timeout.
    pub fn admit(&mut self, now_ms: u64, body: &ArchivedClientBody) -> Result<(), Refusal> {
        self.last_frame_ms = self.last_frame_ms.max(now_ms);
        use ArchivedClientBody as B;
        match (self.phase, body) {
            (Phase::AwaitingHello, B::Hello { version, client_name }) => {
                if !SUPPORTED_VERSIONS.contains(&version.to_native()) {
                    return Err(Refusal {
                        code: ErrorCode::UnsupportedVersion,
                        message: "protocol version not supported",
                        close: true,
                    });
                }
                if client_name.len() > CLIENT_NAME_LEN_MAX {
                    return Err(Refusal {
                        code: ErrorCode::InvalidArgument,
                        message: "client name longer than 64 bytes",
                        close: true,
                    });
                }
                Ok(())
            }
            (Phase::AwaitingHello, _) => Err(Refusal {
                code: ErrorCode::InvalidState,
                message: "the first frame must be Hello",
                close: true,
            }),
            (_, B::Hello { .. }) => Err(Refusal::keep(ErrorCode::InvalidState, "Hello was already sent")),
            (_, B::Ping { .. }) => Ok(()),
            (Phase::Anonymous, B::Register { username, password } | B::Login { username, password }) => {
                check_username(username.as_str())?;
                check_password(password.as_slice())?;
                Ok(())
            }
            (Phase::Anonymous, B::LoginToken { token }) => {
                if token.len() != TOKEN_LEN {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "token must be 32 bytes",
                    ));
                }
                Ok(())
            }
            (Phase::Anonymous, B::LoginJwt { token }) => {
                if token.is_empty() || token.len() > JWT_LEN_MAX {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "JWT must be 1 to 4096 bytes",
                    ));
                }
                Ok(())
            }
            (Phase::Anonymous, _) => Err(Refusal::keep(ErrorCode::InvalidState, "log in first")),
            (
                Phase::Authenticated(_),
                B::Register { .. } | B::Login { .. } | B::LoginToken { .. } | B::LoginJwt { .. },
            ) => Err(Refusal::keep(ErrorCode::InvalidState, "already logged in")),
            (Phase::Authenticated(_), B::ResolveUser { username } | B::FriendAdd { username }) => {
                check_username(username.as_str())?;
                Ok(())
            }
            (Phase::Authenticated(_), B::GroupCreate { name } | B::GroupCreateWith { name, .. }) => {
                check_group_name(name.as_str())?;
                Ok(())
            }
            (Phase::Authenticated(_), B::GroupSetRole { role, .. }) => {
                if role.to_native() == GroupRole::Owner {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "the Owner role cannot be assigned; use GroupTransferOwnership",
                    ));
                }
                Ok(())
            }
            (Phase::Authenticated(_), B::SendDirect { content, to, .. }) => {
                if to.to_native() == 0 {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "recipient id 0 is never assigned",
                    ));
                }
                self.check_content(content)
            }
            (Phase::Authenticated(_), B::SendGroup { content, .. }) => self.check_content(content),
            (Phase::Authenticated(_), B::Sync { cursors }) => {
                if cursors.len() > SYNC_CURSORS_MAX {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "more than 4096 sync cursors",
                    ));
                }
                Ok(())
            }
            (
                Phase::Authenticated(_),
                B::ChangePassword {
                    old_password,
                    new_password,
                },
            ) => {
                // The old password is bounded like any password, so that a
                // huge one is refused before it reaches argon2.
                check_password(old_password.as_slice())?;
                check_password(new_password.as_slice())?;
                Ok(())
            }
            (Phase::Authenticated(_), B::AccountDelete { password }) => {
                // Bounded like any password, so a huge one never reaches
                // argon2; not held to the minimum, so an account without a
                // password gets its own answer rather than this one.
                if password.len() > PASSWORD_LEN_MAX {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "password must be at most 256 bytes",
                    ));
                }
                Ok(())
            }
            (Phase::Authenticated(_), B::Receipt { seq, .. }) => {
                if seq.to_native() == 0 {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "receipt sequence 0 acknowledges nothing",
                    ));
                }
                Ok(())
            }
            (
                Phase::Authenticated(_),
                B::FriendRemove { .. }
                | B::FriendList
                | B::GroupJoin { .. }
                | B::GroupLeave { .. }
                | B::GroupMembers { .. }
                | B::GroupInvite { .. }
                | B::GroupUninvite { .. }
                | B::GroupKick { .. }
                | B::GroupInfo { .. }
                | B::GroupMembersPage { .. }
                | B::GroupInvitesPage { .. }
                | B::GroupTransferOwnership { .. }
                | B::MyInvitesPage { .. }
                | B::GroupBan { .. }
                | B::GroupUnban { .. }
                | B::GroupBansPage { .. }
                | B::UserBlock { .. }
                | B::UserUnblock { .. }
                | B::BlocksPage { .. }
                | B::FriendRequestsPage { .. }
                | B::FriendsPage { .. }
                | B::GroupDelete { .. }
                | B::Typing { .. }
                | B::History { .. }
                | B::Conversations { .. }
                | B::Logout
                | B::LogoutOthers,
            ) => Ok(()),
        }
    }

    fn check_content(&self, content: &ArchivedContent) -> Result<(), Refusal> {
        if content.body.len() > self.content.body {
            return Err(Refusal::keep(
                ErrorCode::InvalidArgument,
                "message body too large",
            ));
        }
        match &content.kind {
            ArchivedContentKind::Recall { seq } => {
                if seq.to_native() == 0 || !content.body.is_empty() {
                    return Err(Refusal::keep(
                        ErrorCode::InvalidArgument,
                        "a recall names a message (seq 1 or more) and has no body",
                    ));
                }
            }
            ArchivedContentKind::Recalled => {
                return Err(Refusal::keep(
                    ErrorCode::InvalidArgument,
                    "Recalled marks erased messages; send Recall to withdraw one",
                ));
            }
            ArchivedContentKind::Text | ArchivedContentKind::Media { .. } => {}
        }
        if let ArchivedContentKind::Media { url, mime, .. } = &content.kind {
            if url.is_empty() || url.len() > MEDIA_URL_LEN_MAX {
                return Err(Refusal::keep(
                    ErrorCode::InvalidArgument,
                    "media URL must be 1 to 2048 bytes",
                ));
            }
            if mime.is_empty() || mime.len() > MEDIA_MIME_LEN_MAX {
                return Err(Refusal::keep(
                    ErrorCode::InvalidArgument,
                    "MIME type must be 1 to 128 bytes",
                ));
            }
            if content.body.len() + url.len() + mime.len() > self.content.total {
                return Err(Refusal::keep(
                    ErrorCode::InvalidArgument,
                    "message too large: its body, media URL and MIME type together exceed this server's limit",
                ));
            }
        }
        Ok(())
    }

    /// Records that the server answered `Hello` with `HelloOk`.
    pub fn hello_accepted(&mut self) {
        assert_eq!(self.phase, Phase::AwaitingHello, "hello accepted twice");
        self.phase = Phase::Anonymous;
    }

    /// Records a successful login.
    pub fn logged_in(&mut self, user: UserId) {
        assert_eq!(self.phase, Phase::Anonymous, "login outside the anonymous phase");
        assert_ne!(user, 0, "user id 0 is never assigned");
        self.phase = Phase::Authenticated(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_client, encode_client};
    use crate::message::{ClientBody, ClientFrame, Content};
    use rkyv::util::AlignedVec;

    /// A body limit, and room for a full-size media URL and MIME type.
    fn limits(body: usize) -> ContentLimits {
        ContentLimits {
            body,
            total: body + MEDIA_URL_LEN_MAX + MEDIA_MIME_LEN_MAX,
        }
    }

    #[test]
    fn a_media_message_is_held_to_the_total_content_limit() {
        let mut s = Session::authenticated(
            1,
            0,
            1000,
            ContentLimits {
                body: 1536,
                total: 1536,
            },
        );
        let media = |url: usize, body: usize| ClientBody::SendDirect {
            to: 2,
            client_msg_id: 1,
            content: Content {
                kind: crate::message::ContentKind::Media {
                    url: "u".repeat(url),
                    mime: "image/png".into(),
                    size: 1,
                },
                body: vec![b'x'; body],
            },
        };
        // Body alone at its limit: a text message, or media within the total.
        admit(
            &mut s,
            ClientBody::SendDirect {
                to: 2,
                client_msg_id: 1,
                content: Content::text(vec![b'x'; 1536]),
            },
        )
        .unwrap();
        admit(&mut s, media(1536 - 9 - 100, 100)).unwrap();
        admit(&mut s, media(300, 1536 - 9 - 300)).unwrap();
        for (url, body) in [(300, 1536 - 9 - 299), (430, 1536)] {
            let refused = admit(&mut s, media(url, body)).unwrap_err();
            assert_eq!((refused.code, refused.close), (ErrorCode::InvalidArgument, false));
            assert!(
                refused.message.starts_with("message too large"),
                "{}",
                refused.message
            );
        }
    }

    fn admit(session: &mut Session, body: ClientBody) -> Result<(), Refusal> {
        let mut buf = AlignedVec::new();
        encode_client(&ClientFrame { request_id: 1, body }, &mut buf, 1 << 20).unwrap();
        let frame =
            decode_client(&buf[8..8 + u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize]).unwrap();
        session.admit(10, &frame.body)
    }

    fn hello() -> ClientBody {
        ClientBody::Hello {
            version: crate::PROTOCOL_VERSION,
            client_name: "test".into(),
        }
    }

    #[test]
    fn phases_gate_requests() {
        let mut s = Session::new(0, 1000, limits(1024));
        let r = admit(&mut s, ClientBody::FriendList).unwrap_err();
        assert!(r.close);
        assert_eq!(r.code, ErrorCode::InvalidState);
        admit(&mut s, hello()).unwrap();
        s.hello_accepted();
        assert_eq!(
            admit(&mut s, ClientBody::FriendList).unwrap_err().code,
            ErrorCode::InvalidState
        );
        admit(
            &mut s,
            ClientBody::Login {
                username: "alice".into(),
                password: b"password".to_vec(),
            },
        )
        .unwrap();
        s.logged_in(5);
        admit(&mut s, ClientBody::FriendList).unwrap();
        assert_eq!(admit(&mut s, hello()).unwrap_err().code, ErrorCode::InvalidState);
        assert_eq!(s.user(), Some(5));
    }

    #[test]
    fn bad_version_closes() {
        let mut s = Session::new(0, 1000, limits(1024));
        let r = admit(
            &mut s,
            ClientBody::Hello {
                version: 99,
                client_name: String::new(),
            },
        )
        .unwrap_err();
        assert_eq!(r.code, ErrorCode::UnsupportedVersion);
        assert!(r.close);
    }

    #[test]
    fn fields_are_checked() {
        let mut s = Session::authenticated(1, 0, 1000, limits(16));
        let big = ClientBody::SendDirect {
            to: 2,
            client_msg_id: 1,
            content: Content::text(vec![0; 17]),
        };
        assert_eq!(admit(&mut s, big).unwrap_err().code, ErrorCode::InvalidArgument);
        let to_zero = ClientBody::SendDirect {
            to: 0,
            client_msg_id: 1,
            content: Content::text("hi"),
        };
        assert_eq!(
            admit(&mut s, to_zero).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(admit(&mut s, ClientBody::GroupCreate { name: String::new() }).is_err());
        let unnamed = ClientBody::GroupCreateWith {
            name: String::new(),
            open: false,
        };
        assert!(admit(&mut s, unnamed).is_err());
        let make_owner = ClientBody::GroupSetRole {
            group: 1,
            user: 2,
            role: GroupRole::Owner,
        };
        assert_eq!(
            admit(&mut s, make_owner).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        let make_admin = ClientBody::GroupSetRole {
            group: 1,
            user: 2,
            role: GroupRole::Admin,
        };
        admit(&mut s, make_admin).unwrap();
        let short = ClientBody::ChangePassword {
            old_password: b"password".to_vec(),
            new_password: b"short".to_vec(),
        };
        assert_eq!(admit(&mut s, short).unwrap_err().code, ErrorCode::InvalidArgument);
        let ok = ClientBody::ChangePassword {
            old_password: b"password".to_vec(),
            new_password: b"longer password".to_vec(),
        };
        admit(&mut s, ok).unwrap();
        admit(&mut s, ClientBody::LogoutOthers).unwrap();
        let delete = |len: usize| ClientBody::AccountDelete {
            password: vec![b'p'; len],
        };
        admit(&mut s, delete(0)).unwrap();
        admit(&mut s, delete(PASSWORD_LEN_MAX)).unwrap();
        let huge = admit(&mut s, delete(PASSWORD_LEN_MAX + 1)).unwrap_err();
        assert_eq!((huge.code, huge.close), (ErrorCode::InvalidArgument, false));
        // Not "8 to 256": a shorter one is admitted (see above).
        assert_eq!(huge.message, "password must be at most 256 bytes");
        admit(&mut s, ClientBody::Logout).unwrap();
    }

    #[test]
    fn jwt_logins_are_bounded_and_only_before_a_login() {
        let mut s = Session::new(0, 1000, limits(1024));
        admit(&mut s, hello()).unwrap();
        s.hello_accepted();
        let jwt = |len: usize| ClientBody::LoginJwt {
            token: "a".repeat(len),
        };
        for len in [0, JWT_LEN_MAX + 1] {
            let r = admit(&mut s, jwt(len)).unwrap_err();
            assert_eq!(r.code, ErrorCode::InvalidArgument);
            assert!(!r.close, "a bad JWT is a failed login, not a broken connection");
        }
        admit(&mut s, jwt(1)).unwrap();
        admit(&mut s, jwt(JWT_LEN_MAX)).unwrap();
        s.logged_in(5);
        assert_eq!(admit(&mut s, jwt(10)).unwrap_err().code, ErrorCode::InvalidState);
    }

    #[test]
    fn logout_and_password_change_need_a_login() {
        let mut s = Session::new(0, 1000, limits(1024));
        admit(&mut s, hello()).unwrap();
        s.hello_accepted();
        for logout in [ClientBody::Logout, ClientBody::LogoutOthers] {
            assert_eq!(admit(&mut s, logout).unwrap_err().code, ErrorCode::InvalidState);
        }
        let change = ClientBody::ChangePassword {
            old_password: b"password".to_vec(),
            new_password: b"password2".to_vec(),
        };
        assert_eq!(admit(&mut s, change).unwrap_err().code, ErrorCode::InvalidState);
        let delete = ClientBody::AccountDelete {
            password: b"password".to_vec(),
        };
        assert_eq!(admit(&mut s, delete).unwrap_err().code, ErrorCode::InvalidState);
    }

    #[test]
    fn idle_deadline_moves_with_frames() {
        let mut s = Session::new(0, 1000, limits(1024));
        assert!(!s.is_idle(999));
        assert!(s.is_idle(1000));
        admit(&mut s, hello()).unwrap();
        assert_eq!(s.idle_deadline_ms(), 1010);
        s.touch(500);
        assert_eq!(s.idle_deadline_ms(), 1500);
        // Never backwards.
        s.touch(20);
        assert_eq!(s.idle_deadline_ms(), 1500);
    }
}
