//! `tern`: the command-line client for a Tern server.
//!
//! Every subcommand opens one connection, logs in when it needs to, does its
//! one job and exits: 0 on success, 1 with a message on stderr on failure.
//! `listen` and `chat` stay connected and ping often enough that the
//! server's idle timeout never closes the connection.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use tern_client::proto::limits::MEMBERS_PAGE_LIMIT_MAX;
use tern_client::{
    ChatMessage, Client, ClientError, ClientOptions, ClientTls, ContentKind, ConvId, ErrorCode, FriendAdded,
    GroupId, GroupRole, ReceiptKind, ServerBody, Session, UserId,
};

#[derive(Parser, Debug)]
#[command(
    name = "tern",
    version,
    about = "Command-line client for the Tern messaging server"
)]
struct Cli {
    /// Server address (host:port).
    #[arg(long, global = true, env = "TERN_SERVER", default_value = "127.0.0.1:7878")]
    server: String,
    /// Username to register or log in as.
    #[arg(long, global = true, env = "TERN_USER")]
    user: Option<String>,
    /// Password for --user.
    #[arg(long, global = true, env = "TERN_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Log in with this JSON Web Token from the server's trusted login
    /// system instead of --user and --password (the token names the user).
    #[arg(long, global = true, env = "TERN_JWT", hide_env_values = true, conflicts_with_all = ["user", "password"])]
    jwt: Option<String>,
    /// Connect over TLS, verifying the server's certificate (against the
    /// public web roots unless --ca is given).
    #[arg(long, global = true)]
    tls: bool,
    /// With --tls: trust exactly the certificates in this PEM file (e.g. the
    /// cert.pem written by `ternd gen-cert`) instead of the public roots.
    #[arg(long, global = true, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// With --tls: the name the server's certificate must carry; defaults to
    /// the host part of --server.
    #[arg(long, global = true, value_name = "NAME", requires = "tls")]
    server_name: Option<String>,
    /// How long one request may wait for its answer (and the connect for
    /// the server), in seconds. A send that gets no answer in time is
    /// resent with the same message id, twice at most, so the server
    /// stores it once.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0, value_parser = parse_timeout)]
    request_timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the account given by --user and --password.
    Register,
    /// Send a direct message.
    Send {
        /// Recipient's username.
        #[arg(long)]
        to: String,
        /// The message; several words are joined with spaces.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Send a message to a group.
    SendGroup {
        /// Group id.
        #[arg(long)]
        group: GroupId,
        /// The message; several words are joined with spaces.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Print incoming messages and presence changes.
    Listen {
        /// Exit successfully after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds; an error if --count was not reached by then.
        #[arg(long)]
        timeout_secs: Option<u64>,
    },
    /// Manage friends.
    Friends {
        #[command(subcommand)]
        action: FriendsCommand,
    },
    /// Manage groups.
    Group {
        #[command(subcommand)]
        action: GroupCommand,
    },
    /// Block a user by username: no 1:1 messages either way and no
    /// friendship until you unblock them (groups are not affected).
    Block { name: String },
    /// Withdraw one of your messages for everyone: message SEQ of your
    /// conversation with --to, or of --group.
    Recall {
        /// The other user of the 1:1 conversation.
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        to: Option<String>,
        /// The group.
        #[arg(long)]
        group: Option<GroupId>,
        /// The message's sequence number (as `send` printed it).
        seq: u64,
    },
    /// Show the messages of your conversation with --to, or of --group,
    /// oldest first, each with its sequence number.
    History {
        /// The other user of the 1:1 conversation.
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        to: Option<String>,
        /// The group.
        #[arg(long)]
        group: Option<GroupId>,
        /// Show messages up to this sequence number (default: the newest).
        #[arg(long, value_name = "SEQ")]
        up_to: Option<u64>,
        /// How many messages, the newest of them (1 to 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Lift your block of a user.
    Unblock { name: String },
    /// List the users you block.
    Blocks,
    /// Interactive chat; type /help once connected.
    Chat,
    /// End a session: revoke its token and close. With --token, the
    /// session of that token (hex, as a client saved it); without, the
    /// session this command logs in for (password login).
    Logout {
        /// A session token in hex (64 digits); --user/--password are then not needed.
        #[arg(long, value_name = "HEX")]
        token: Option<String>,
    },
    /// End every session of the user on every device: revokes every token
    /// the user has and closes their open sessions (this command's too).
    LogoutEverywhere,
    /// Change the password of --user; revokes every token of the user
    /// (open sessions stay connected, their next login needs the new password).
    Passwd {
        /// The new password (8 to 256 bytes).
        #[arg(long, env = "TERN_NEW_PASSWORD", hide_env_values = true)]
        new_password: String,
    },
    /// Manage the account of --user.
    Account {
        #[command(subcommand)]
        action: AccountCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Delete the account of --user for good, proving it with --password:
    /// every session of it is closed, its friendships, requests, blocks,
    /// group memberships (groups it owns pass to an admin or member) and
    /// inbox are removed; the messages it sent stay with their readers.
    /// The name becomes free; the account cannot be restored.
    Delete {
        /// Confirm: without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FriendsCommand {
    /// Ask a user (by username) to be friends, or accept their request:
    /// you are friends once both have added each other.
    Add { name: String },
    /// Remove a friend by username; also declines their pending request
    /// or cancels yours.
    Remove { name: String },
    /// List friends and whether they are online.
    List,
    /// List pending friend requests: to you, and from you.
    Requests,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group and print its id.
    Create {
        name: String,
        /// Only invited users may join (default: anyone may).
        #[arg(long)]
        invite_only: bool,
    },
    /// Join a group (an invite-only group needs an invite).
    Join { id: GroupId },
    /// Leave a group.
    Leave { id: GroupId },
    /// Delete a group you own, for everyone: its history, members and
    /// invites go; the id is never used again.
    Delete { id: GroupId },
    /// List a group's members with their roles (any size: asked a page at a time).
    Members { id: GroupId },
    // The other user is `target`, never `user`: a field named `user` would
    // share its id with the global `--user`, and clap would then log in as
    // the user named here.
    /// Invite a user (by name) to a group; owner or admin only.
    Invite {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
    },
    /// List a group's pending invites; owner or admin only.
    Invites { id: GroupId },
    /// List the groups that invited you (pending invites).
    MyInvites,
    /// Ban a user (by name) from a group: removed, invite withdrawn, joins refused; owner or admin only.
    Ban {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
    },
    /// Lift a user's (by name) ban; owner or admin only.
    Unban {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
    },
    /// List the users banned from a group; owner or admin only.
    Bans { id: GroupId },
    /// Hand the group over to a member (by name); owner only. You become an admin.
    Transfer {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
    },
    /// Withdraw a user's (by name) pending invite; owner or admin only.
    Uninvite {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
    },
    /// Remove a user (by name) from a group; owner, or admin for members.
    Kick {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
    },
    /// Make a member an admin or a plain member; owner only.
    Role {
        id: GroupId,
        #[arg(value_name = "USER")]
        target: String,
        role: RoleArg,
    },
    /// Show a group's name, whether it is open, and its members' roles.
    Info { id: GroupId },
}

/// A role the owner can give.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RoleArg {
    Admin,
    Member,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; every real error exits 1.
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How the command logs in.
enum Credentials<'a> {
    Password { user: &'a str, password: &'a str },
    Jwt(&'a str),
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Logout { token: Some(token) } = &cli.command {
        let token = parse_hex(token).ok_or_else(|| anyhow!("--token must be hex digits"))?;
        let mut client = connect(&cli)?;
        client
            .login_token_unsynced(&token)
            .context("cannot log in with that token (expired or revoked?)")?;
        client.logout().context("logout failed")?;
        println!("logged out; the token is revoked");
        return Ok(());
    }
    // Every command acts as a user, so a missing credential is reported
    // before anything touches the network.
    let credentials = match (&cli.jwt, &cli.command) {
        (Some(_), Command::Register | Command::Passwd { .. } | Command::Account { .. }) => {
            bail!("this command needs --user and --password, not --jwt")
        }
        (
            _,
            Command::Account {
                action: AccountCommand::Delete { yes: false },
            },
        ) => {
            bail!("deleting an account cannot be undone: add --yes to delete it")
        }
        (Some(jwt), _) => Credentials::Jwt(jwt),
        (None, _) => Credentials::Password {
            user: cli
                .user
                .as_deref()
                .ok_or_else(|| anyhow!("--user is required (or set TERN_USER, or log in with --jwt)"))?,
            password: cli
                .password
                .as_deref()
                .ok_or_else(|| anyhow!("--password is required (or set TERN_PASSWORD)"))?,
        },
    };
    let mut client = connect(&cli)?;
    let (session, password) = match credentials {
        Credentials::Jwt(jwt) => {
            let session = client
                .login_jwt_unsynced(jwt)
                .context("cannot log in with the JWT")?;
            (session, "")
        }
        Credentials::Password { user, password } => {
            if let Command::Register = cli.command {
                let id = client
                    .register(user, password)
                    .with_context(|| format!("cannot register {user}"))?;
                println!("registered {user} (id {id})");
                return Ok(());
            }
            let session = client
                .login_unsynced(user, password)
                .with_context(|| format!("cannot log in as {user}"))?;
            (session, password)
        }
    };
    // Only the commands that show messages catch up. The others make
    // requests: a catch-up would stream, and queue in memory, the user's
    // whole backlog before the first of them, and a backlog past the
    // client's queue bound would stop every command, `passwd` and
    // `account delete` included.
    if matches!(cli.command, Command::Listen { .. } | Command::Chat) {
        client.sync().context("cannot catch up on missed messages")?;
    }
    let user = session.username.clone();
    let mut names = Names::new(&session);
    match cli.command {
        Command::Register => {}
        Command::Send { to, text } => {
            let peer = client
                .resolve_user(&to)
                .with_context(|| format!("cannot find user {to}"))?;
            let sent = send_once(&mut client, &Target::User(peer, to.clone()), &text.join(" "))?;
            println!("sent to {to}: conv {} seq {}", fmt_conv(&sent.conv), sent.seq);
        }
        Command::SendGroup { group, text } => {
            let sent = send_once(&mut client, &Target::Group(group), &text.join(" "))?;
            println!("sent to group {group}: seq {}", sent.seq);
        }
        Command::Listen { count, timeout_secs } => {
            listen(
                &mut client,
                &mut names,
                count,
                timeout_secs.map(Duration::from_secs),
            )?;
        }
        Command::Friends { action } => match action {
            FriendsCommand::Add { name } => println!("{}", friend_add(&mut client, &mut names, &name)?),
            FriendsCommand::Remove { name } => {
                let id = client
                    .resolve_user(&name)
                    .with_context(|| format!("cannot find user {name}"))?;
                client.friend_remove(id)?;
                println!("removed {name}: no friendship or pending request between you now");
            }
            FriendsCommand::List => print_friends(&mut client, &mut names)?,
            FriendsCommand::Requests => print_friend_requests(&mut client, &mut names)?,
        },
        Command::Recall { to, group, seq } => {
            let conv = match (to, group) {
                (_, Some(group)) => ConvId::Group { group },
                (Some(name), None) => {
                    let peer = client
                        .resolve_user(&name)
                        .with_context(|| format!("cannot find user {name}"))?;
                    ConvId::direct(session.user, peer)
                }
                (None, None) => bail!("recall needs --to or --group"),
            };
            let sent = client.recall(conv, seq).context("cannot withdraw the message")?;
            println!("withdrew message {seq} (the recall is message {})", sent.seq);
        }
        Command::History {
            to,
            group,
            up_to,
            limit,
        } => {
            let conv = match (to, group) {
                (_, Some(group)) => ConvId::Group { group },
                (Some(name), None) => {
                    let peer = names
                        .resolve(&mut client, &name)
                        .with_context(|| format!("cannot find user {name}"))?;
                    ConvId::direct(session.user, peer)
                }
                (None, None) => bail!("history needs --to or --group"),
            };
            print_history(&mut client, &mut names, conv, up_to.unwrap_or(u64::MAX), limit)?;
        }
        Command::Block { name } => {
            let id = client
                .resolve_user(&name)
                .with_context(|| format!("cannot find user {name}"))?;
            client.block_user(id)?;
            println!("blocked {name}");
        }
        Command::Unblock { name } => {
            let id = client
                .resolve_user(&name)
                .with_context(|| format!("cannot find user {name}"))?;
            client.unblock_user(id)?;
            println!("unblocked {name}");
        }
        Command::Blocks => {
            let fetch = |client: &mut Client, after| client.blocks_page(after, MEMBERS_PAGE_LIMIT_MAX);
            print_paged_users(&mut client, &mut names, fetch, "blocked", "you block nobody")?;
        }
        Command::Group { action } => match action {
            GroupCommand::Create { name, invite_only } => {
                println!("{}", client.group_create_with(&name, !invite_only)?)
            }
            GroupCommand::Join { id } => {
                client.group_join(id)?;
                println!("joined group {id}");
            }
            GroupCommand::Leave { id } => {
                client.group_leave(id)?;
                println!("left group {id}");
            }
            GroupCommand::Delete { id } => {
                client.group_delete(id)?;
                println!("deleted group {id}");
            }
            GroupCommand::Members { id } => print_members(&mut client, &mut names, id)?,
            GroupCommand::Invite { id, target } => {
                let user = client.resolve_user(&target)?;
                client.group_invite(id, user)?;
                println!("invited {target} to group {id}");
            }
            GroupCommand::Invites { id } => print_invites(&mut client, &mut names, id)?,
            GroupCommand::MyInvites => print_my_invites(&mut client)?,
            GroupCommand::Ban { id, target } => {
                let user = client.resolve_user(&target)?;
                client.group_ban(id, user)?;
                println!("banned {target} from group {id}");
            }
            GroupCommand::Unban { id, target } => {
                let user = client.resolve_user(&target)?;
                client.group_unban(id, user)?;
                println!("lifted any ban of {target} from group {id}");
            }
            GroupCommand::Bans { id } => print_bans(&mut client, &mut names, id)?,
            GroupCommand::Transfer { id, target } => {
                let user = client.resolve_user(&target)?;
                client.group_transfer_ownership(id, user)?;
                println!("{target} now owns group {id}; you are an admin");
            }
            GroupCommand::Uninvite { id, target } => {
                let user = client.resolve_user(&target)?;
                client.group_uninvite(id, user)?;
                println!("withdrew any invite of {target} to group {id}");
            }
            GroupCommand::Kick { id, target } => {
                let user = client.resolve_user(&target)?;
                client.group_kick(id, user)?;
                println!("removed {target} from group {id}");
            }
            GroupCommand::Role { id, target, role } => {
                let user = client.resolve_user(&target)?;
                let role = match role {
                    RoleArg::Admin => GroupRole::Admin,
                    RoleArg::Member => GroupRole::Member,
                };
                client.group_set_role(id, user, role)?;
                println!("{target} is now {role:?} in group {id}");
            }
            GroupCommand::Info { id } => print_group_info(&mut client, &mut names, id)?,
        },
        Command::Chat => chat(&mut client, &session, &mut names)?,
        Command::Logout { .. } => {
            client.logout().context("logout failed")?;
            println!("logged out {user}");
        }
        Command::LogoutEverywhere => {
            // The other devices first; then this command's own session,
            // which revokes the one token the first step issued it.
            client
                .logout_others()
                .context("cannot log out the other devices")?;
            client.logout().context("logout failed")?;
            println!("logged out every session of {user}; every token {user} had is revoked");
        }
        Command::Passwd { new_password } => {
            client
                .change_password(password, &new_password)
                .with_context(|| format!("cannot change the password of {user}"))?;
            println!("password of {user} changed; every session token of {user} is revoked");
        }
        Command::Account {
            action: AccountCommand::Delete { .. },
        } => {
            client
                .delete_account(password)
                .with_context(|| format!("cannot delete the account {user}"))?;
            println!("account {user} deleted; its sessions are closed and its data is being removed");
        }
    }
    Ok(())
}

/// Bytes from hex digits (an even number of them), or `None`.
fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}

/// Connects to `--server`. A certificate that no public root vouches for
/// is most often `ternd gen-cert`'s own, so that failure says what to add.
fn connect(cli: &Cli) -> Result<Client> {
    Client::connect(cli.server.as_str(), client_options(cli)).map_err(|e| {
        let unknown_issuer = matches!(
            e,
            ClientError::Tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        );
        if unknown_issuer && cli.ca.is_none() {
            anyhow!(
                "cannot connect to {}: {e}\n(no public root signed the server's certificate: \
                 for a self-signed one, as `ternd gen-cert` writes, add --ca FILE naming its cert.pem)",
                cli.server
            )
        } else {
            anyhow::Error::from(e).context(format!("cannot connect to {}", cli.server))
        }
    })
}

fn client_options(cli: &Cli) -> ClientOptions {
    let tls = cli.tls.then(|| ClientTls {
        ca_file: cli.ca.clone(),
        server_name: cli
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(&cli.server).to_owned()),
    });
    ClientOptions {
        client_name: concat!("tern-cli/", env!("CARGO_PKG_VERSION")).to_string(),
        tls,
        timeout: Duration::from_secs_f64(cli.request_timeout),
        ..ClientOptions::default()
    }
}

/// `--request-timeout`: from a millisecond to an hour.
fn parse_timeout(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.001..=3600.0).contains(&secs) => Ok(secs),
        _ => Err("a number of seconds from 0.001 to 3600".into()),
    }
}

/// Resends after a timeout: the attempts a send gets in all.
const SEND_ATTEMPTS: usize = 3;

/// Sends `text` to `to` (a user, or a group), resending with the same
/// message id when no answer came in time: the first attempt may have
/// been stored, and the server answers a resend of it with the original
/// `Sent` (docs/protocol.md 2.8.4) rather than storing it twice, as a
/// user who typed the message again would have had it.
fn send_once(client: &mut Client, to: &Target, text: &str) -> Result<tern_client::Sent, ClientError> {
    let client_msg_id = client.new_client_msg_id();
    let mut attempt = 1;
    loop {
        let content = tern_client::Content::text(text);
        let result = match to {
            Target::User(id, _) => client.send_direct(*id, client_msg_id, content),
            Target::Group(group) => client.send_group(*group, client_msg_id, content),
        };
        match result {
            Err(ClientError::Timeout) if attempt < SEND_ATTEMPTS => {
                eprintln!("(no answer yet; sending again with the same message id)");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(server: &str) -> &str {
    if let Some(rest) = server.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match server.rsplit_once(':') {
        // More than one colon without brackets: a bare IPv6 address.
        Some((host, _)) if !host.contains(':') => host,
        _ => server,
    }
}

/// How often to ping: well inside the server's idle timeout, so one delayed
/// ping does not cost the connection.
fn ping_interval(idle_timeout: Duration) -> Duration {
    if idle_timeout.is_zero() {
        Duration::from_secs(30)
    } else {
        (idle_timeout / 3).max(Duration::from_millis(10))
    }
}

/// User names the CLI has learned. The protocol has no id→name request, so
/// names come from our own session, the friend list, and lookups by name.
struct Names {
    by_id: HashMap<UserId, String>,
    by_name: HashMap<String, UserId>,
    /// Ids a friend-list refresh already failed to name; refreshing again
    /// for every message from a stranger would double the traffic.
    unknown: HashSet<UserId>,
}

impl Names {
    fn new(session: &Session) -> Names {
        let mut names = Names {
            by_id: HashMap::new(),
            by_name: HashMap::new(),
            unknown: HashSet::new(),
        };
        names.learn(session.user, &session.username);
        names
    }

    fn learn(&mut self, id: UserId, name: &str) {
        self.by_id.insert(id, name.to_owned());
        self.by_name.insert(name.to_owned(), id);
        self.unknown.remove(&id);
    }

    fn refresh(&mut self, client: &mut Client) -> Result<Vec<tern_client::Friend>, ClientError> {
        let friends = client.friends()?;
        for f in &friends {
            self.learn(f.user, &f.username);
        }
        Ok(friends)
    }

    /// The name of `id`, asking the server for the friend list once if it is new.
    fn name(&mut self, client: &mut Client, id: UserId) -> Result<String, ClientError> {
        if !self.by_id.contains_key(&id) && !self.unknown.contains(&id) {
            self.refresh(client)?;
            if !self.by_id.contains_key(&id) {
                self.unknown.insert(id);
            }
        }
        Ok(self
            .by_id
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("user {id}")))
    }

    fn resolve(&mut self, client: &mut Client, name: &str) -> Result<UserId, ClientError> {
        if let Some(&id) = self.by_name.get(name) {
            return Ok(id);
        }
        let id = client.resolve_user(name)?;
        self.learn(id, name);
        Ok(id)
    }
}

fn fmt_conv(conv: &ConvId) -> String {
    match conv {
        ConvId::Direct { low, high } => format!("direct:{low}:{high}"),
        ConvId::Group { group } => format!("group:{group}"),
    }
}

/// Message text comes from other users: escape control characters so a
/// message cannot move the cursor, clear the screen or fake extra lines,
/// and Unicode's bidirectional controls so it cannot reorder the rest of
/// the line (a name or text displayed backwards: "Trojan Source").
fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The explicit directional marks, embeddings, overrides and isolates
/// (Unicode's Bidi_Control property).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn fmt_message(client: &mut Client, names: &mut Names, msg: &ChatMessage) -> Result<String, ClientError> {
    let from = names.name(client, msg.from)?;
    let body = sanitize(&msg.content.body);
    let content = match &msg.content.kind {
        ContentKind::Text => body,
        ContentKind::Media { url, mime, size } => {
            format!(
                "<{} {size} bytes: {}> {body}",
                sanitize(mime.as_bytes()),
                sanitize(url.as_bytes())
            )
        }
        ContentKind::Recall { seq } => format!("<withdrew message #{seq}>"),
        ContentKind::Recalled => "<message withdrawn>".to_owned(),
    };
    Ok(match msg.conv {
        ConvId::Direct { .. } => format!("[{from}] {content}"),
        ConvId::Group { group } => format!("[#group {group} {from}] {content}"),
    })
}

/// What a push meant to a listening loop.
enum Pushed {
    Message,
    Other,
}

/// Prints one push. A `Disconnect` ends the session, so it is an error.
/// Where a push is shown, so that its hints name the command that works
/// there.
#[derive(Clone, Copy)]
enum Shown {
    /// `tern listen`: hints are shell commands.
    Listen,
    /// `tern chat`: hints are chat commands.
    Chat,
}

fn print_push(client: &mut Client, names: &mut Names, body: ServerBody, shown: Shown) -> Result<Pushed> {
    match body {
        ServerBody::Message(msg) => {
            println!("{}", fmt_message(client, names, &msg)?);
            Ok(Pushed::Message)
        }
        ServerBody::Presence { user, online } => {
            let name = names.name(client, user)?;
            println!("* {name} is {}", if online { "online" } else { "offline" });
            Ok(Pushed::Other)
        }
        ServerBody::Invited { group, by } => {
            let name = names.name(client, by)?;
            let hint = match shown {
                Shown::Listen => format!("tern group join {group}"),
                Shown::Chat => format!("/join {group}"),
            };
            println!("* {name} invited you to group {group} ({hint})");
            Ok(Pushed::Other)
        }
        ServerBody::GroupDeleted { group, by } => {
            let name = names.name(client, by)?;
            println!("* {name} deleted group {group}");
            Ok(Pushed::Other)
        }
        ServerBody::FriendRequest { from, username } => {
            names.learn(from, &username);
            let name = sanitize(username.as_bytes());
            let hint = match shown {
                Shown::Listen => format!("tern friends add {name}"),
                Shown::Chat => format!("/friend {name}"),
            };
            println!("* {name} asks to be your friend (accept: {hint})");
            Ok(Pushed::Other)
        }
        ServerBody::FriendAccepted { by, username } => {
            names.learn(by, &username);
            let name = sanitize(username.as_bytes());
            println!("* {name} accepted your friend request: you are friends now");
            Ok(Pushed::Other)
        }
        ServerBody::Typing { conv, user } => {
            let name = names.name(client, user)?;
            match conv {
                ConvId::Direct { .. } => println!("* {name} is typing"),
                ConvId::Group { group } => println!("* {name} is typing in group {group}"),
            }
            Ok(Pushed::Other)
        }
        ServerBody::Receipt {
            conv,
            user,
            kind,
            seq,
        } => {
            let name = names.name(client, user)?;
            let what = match kind {
                ReceiptKind::Delivered => "received",
                ReceiptKind::Read => "read",
            };
            println!("* {name} has {what} {} up to #{seq}", conv_name(conv));
            Ok(Pushed::Other)
        }
        ServerBody::Disconnect { code, message, .. } => {
            bail!(
                "server closed the connection: {code}: {}",
                sanitize(message.as_bytes())
            )
        }
        ServerBody::Error { code, message, .. } => {
            eprintln!("* server error: {code}: {}", sanitize(message.as_bytes()));
            Ok(Pushed::Other)
        }
        other => {
            eprintln!("* unexpected push: {other:?}");
            Ok(Pushed::Other)
        }
    }
}

fn listen(client: &mut Client, names: &mut Names, count: Option<u64>, limit: Option<Duration>) -> Result<()> {
    names.refresh(client)?;
    let interval = ping_interval(client.idle_timeout());
    let started = Instant::now();
    // A limit past what Instant can hold is no limit, not a panic.
    let stop_at = limit.and_then(|l| started.checked_add(l));
    let mut next_ping = started + interval;
    let mut seen = 0u64;
    let mut acks = Acks::default();
    loop {
        if count.is_some_and(|n| seen >= n) {
            return acks.finish(client);
        }
        let now = Instant::now();
        if let Some(stop_at) = stop_at.filter(|&s| now >= s) {
            acks.finish(client)?;
            let waited = stop_at.duration_since(started).as_secs();
            return match count {
                Some(n) => Err(anyhow!("timed out after {waited}s with {seen} of {n} messages")),
                None => Ok(()),
            };
        }
        if now >= next_ping {
            client.ping().context("keep-alive ping failed")?;
            next_ping = now + interval;
            continue;
        }
        let wake = stop_at.map_or(next_ping, |s| s.min(next_ping));
        match client.next_push(acks.poll_wait(now, wake - now))? {
            Some(body) => {
                acks.note(&body);
                if let Pushed::Message = print_push(client, names, body, Shown::Listen)? {
                    seen += 1;
                }
                if acks.full() {
                    acks.finish(client)?;
                }
            }
            // Nothing more is waiting: acknowledge what was shown so far.
            None => acks.send(client)?,
        }
    }
}

/// Most conversations with a receipt owed; past it the receipts go out
/// before anything else is shown.
const PENDING_ACKS_MAX: usize = 256;
/// How long to hold receipts when the server rate-limited one without a hint.
const RATE_LIMIT_FALLBACK: Duration = Duration::from_secs(1);
/// Rate-limited rounds to wait out before exiting with receipts unsent.
const FINAL_ACK_ROUNDS: usize = 10;

/// `Delivered` receipts owed for shown messages, so that they leave the
/// inbox and the next login does not show them again. The server meters
/// 1:1 receipts at the message rate (docs/protocol.md 2.9.5), so they
/// are cumulative: one per conversation for the highest seq shown, sent
/// once no more frames are waiting (after a catch-up batch, or a live
/// message), and a rate-limited one waits out the server's hint.
#[derive(Default)]
struct Acks {
    /// Per conversation, the highest seq shown and not yet acknowledged.
    pending: HashMap<ConvId, u64>,
    /// The server rate-limited a receipt: none goes out before this.
    not_before: Option<Instant>,
}

impl Acks {
    fn note(&mut self, body: &ServerBody) {
        if let ServerBody::Message(message) = body {
            let seq = self.pending.entry(message.conv).or_insert(0);
            *seq = (*seq).max(message.seq);
        }
    }

    fn full(&self) -> bool {
        self.pending.len() >= PENDING_ACKS_MAX
    }

    /// How long to wait for the next push: not at all while receipts are
    /// due (only frames already received are taken, so a batch is
    /// acknowledged as soon as it is shown), otherwise up to `limit`.
    fn poll_wait(&self, now: Instant, limit: Duration) -> Duration {
        if self.pending.is_empty() {
            return limit;
        }
        match self.not_before {
            Some(at) if at > now => limit.min(at - now),
            _ => Duration::ZERO,
        }
    }

    /// Sends the owed receipts unless the server asked to wait. A
    /// rate-limited one stays owed until the server's retry hint has passed.
    fn send(&mut self, client: &mut Client) -> Result<()> {
        if self.not_before.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        self.not_before = None;
        let owed: Vec<(ConvId, u64)> = self.pending.iter().map(|(c, s)| (*c, *s)).collect();
        for (conv, seq) in owed {
            match client.receipt(conv, ReceiptKind::Delivered, seq) {
                Ok(()) => {
                    self.pending.remove(&conv);
                }
                Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                    let wait = e.retry_after().unwrap_or(RATE_LIMIT_FALLBACK);
                    self.not_before = Some(Instant::now() + wait);
                    return Ok(());
                }
                // The conversation stopped being the user's after its
                // messages were shown (a group deleted, or left with
                // nothing more owed, a peer's account deleted): there is
                // nothing to acknowledge any more, and the messages were
                // shown, so listening goes on.
                Err(e) if matches!(e.code(), Some(ErrorCode::Forbidden | ErrorCode::NotFound)) => {
                    eprintln!("tern: {} no longer takes receipts: {e}", fmt_conv(&conv));
                    self.pending.remove(&conv);
                }
                Err(e) => return Err(e).context("cannot acknowledge a message"),
            }
        }
        Ok(())
    }

    /// Sends every owed receipt, waiting out rate limits, before the
    /// command exits or shows more; gives up (with a warning, not an
    /// error: the messages were shown) after a few refused rounds.
    fn finish(&mut self, client: &mut Client) -> Result<()> {
        for _ in 0..FINAL_ACK_ROUNDS {
            if let Some(at) = self.not_before {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            self.send(client)?;
            if self.pending.is_empty() {
                return Ok(());
            }
        }
        eprintln!(
            "tern: the server kept refusing receipts; the next login shows {} conversation(s) again",
            self.pending.len()
        );
        Ok(())
    }
}

/// `FriendAdd` of `name`, as a line saying what happened.
fn friend_add(client: &mut Client, names: &mut Names, name: &str) -> Result<String> {
    Ok(match client.friend_add(name)? {
        FriendAdded::Friends(id) => {
            names.learn(id, name);
            format!("{name} (id {id}) and you are friends")
        }
        FriendAdded::Requested(id) => {
            names.learn(id, name);
            format!("asked {name} (id {id}) to be friends; you are friends once they add you too")
        }
    })
}

/// Prints the newest `limit` messages of `conv` at or below seq `up_to`,
/// oldest first, asking page after page (the server cuts a page to its
/// frame size and to `PAGE_LIMIT_MAX`).
fn print_history(client: &mut Client, names: &mut Names, conv: ConvId, up_to: u64, limit: u32) -> Result<()> {
    let mut newest_first: Vec<ChatMessage> = Vec::new();
    let mut from = up_to;
    while newest_first.len() < limit as usize {
        let left = limit - newest_first.len() as u32;
        let page = client
            .history(conv, from, false, left)
            .context("cannot read the history")?;
        let Some(oldest) = page.last().map(|m| m.seq) else {
            break;
        };
        // Pages go down; one that does not is a faulty server, not a loop.
        if oldest > from {
            bail!("the server's history pages did not move back");
        }
        newest_first.extend(page);
        match oldest.checked_sub(1) {
            Some(next) if next > 0 => from = next,
            _ => break,
        }
    }
    if newest_first.is_empty() {
        println!("no messages");
    }
    for message in newest_first.iter().rev() {
        println!("#{} {}", message.seq, fmt_message(client, names, message)?);
    }
    Ok(())
}

/// Lists the pending friend requests to this user, then those from them.
fn print_friend_requests(client: &mut Client, names: &mut Names) -> Result<()> {
    for (incoming, what, none) in [
        (true, "asks to be your friend", "no friend requests to you"),
        (false, "was asked by you", "no friend requests from you"),
    ] {
        let requests = client.friend_requests_all(incoming)?;
        if requests.is_empty() {
            println!("{none}");
        }
        for request in requests {
            names.learn(request.user, &request.username);
            let name = sanitize(request.username.as_bytes());
            println!("{name} (id {}) {what}", request.user);
        }
    }
    Ok(())
}

fn print_friends(client: &mut Client, names: &mut Names) -> Result<()> {
    let friends = names.refresh(client)?;
    if friends.is_empty() {
        eprintln!("no friends yet");
    }
    for f in friends {
        let state = if f.online { "online" } else { "offline" };
        println!("{} (id {}) {state}", f.username, f.user);
    }
    Ok(())
}

fn print_group_info(client: &mut Client, names: &mut Names, group: GroupId) -> Result<()> {
    let info = client.group_info(group).map_err(|e| match e.code() {
        Some(ErrorCode::LimitExceeded) => {
            anyhow!("{e}\n(`tern group members {group}` lists a group of any size)")
        }
        _ => anyhow::Error::from(e),
    })?;
    let access = if info.open { "open" } else { "invite-only" };
    println!(
        "group {} \"{}\" ({access})",
        info.group,
        sanitize(info.name.as_bytes())
    );
    for member in info.members {
        let name = names.name(client, member.user)?;
        let role = role_name(member.role);
        println!("{name} (id {}) {role}", member.user);
    }
    Ok(())
}

/// Lists the members with their roles. The library asks a page at a time
/// (and refuses pages that do not move forward), so a group of any size is
/// listed; `GroupInfo` must fit in one frame.
fn print_members(client: &mut Client, names: &mut Names, group: GroupId) -> Result<()> {
    for member in client.group_members_all(group)? {
        let id = member.user;
        let name = names.name(client, id)?;
        let role = role_name(member.role);
        if name.starts_with("user ") {
            println!("{name} {role}");
        } else {
            println!("{name} (id {id}) {role}");
        }
    }
    Ok(())
}

/// Asks `fetch(after)` for pages of ids until one says there are no more,
/// handing each id to `each`; returns how many there were. Refuses pages
/// that do not move forward, so a faulty server cannot loop it.
fn each_paged_id(
    client: &mut Client,
    mut fetch: impl FnMut(&mut Client, u64) -> Result<(Vec<u64>, bool), ClientError>,
    mut each: impl FnMut(&mut Client, u64) -> Result<()>,
) -> Result<usize> {
    let mut after = 0;
    let mut listed = 0usize;
    loop {
        let (ids, more) = fetch(client, after)?;
        for &id in &ids {
            each(client, id)?;
        }
        listed += ids.len();
        match ids.last() {
            Some(&last) if more && last > after => after = last,
            _ if more => bail!("the server's pages did not move forward"),
            _ => return Ok(listed),
        }
    }
}

/// Lists the groups that invited this user.
fn print_my_invites(client: &mut Client) -> Result<()> {
    let listed = each_paged_id(
        client,
        |client, after| client.my_invites_page(after, MEMBERS_PAGE_LIMIT_MAX),
        |_, group| {
            println!("invited to group {group}");
            Ok(())
        },
    )?;
    if listed == 0 {
        println!("no pending invites");
    }
    Ok(())
}

/// Lists the users banned from a group.
fn print_bans(client: &mut Client, names: &mut Names, group: GroupId) -> Result<()> {
    let fetch = |client: &mut Client, after| client.group_bans_page(group, after, MEMBERS_PAGE_LIMIT_MAX);
    let none = format!("nobody is banned from group {group}");
    print_paged_users(client, names, fetch, "banned", &none)
}

/// Lists a group's pending invites.
fn print_invites(client: &mut Client, names: &mut Names, group: GroupId) -> Result<()> {
    let fetch = |client: &mut Client, after| client.group_invites_page(group, after, MEMBERS_PAGE_LIMIT_MAX);
    let none = format!("no pending invites to group {group}");
    print_paged_users(client, names, fetch, "invited", &none)
}

/// Prints each user of a paged listing as "NAME (id ID) WHAT", or `none`
/// if there are none.
fn print_paged_users(
    client: &mut Client,
    names: &mut Names,
    fetch: impl FnMut(&mut Client, u64) -> Result<(Vec<u64>, bool), ClientError>,
    what: &str,
    none: &str,
) -> Result<()> {
    let listed = each_paged_id(client, fetch, |client, id| {
        let name = names.name(client, id)?;
        if name.starts_with("user ") {
            println!("{name} {what}");
        } else {
            println!("{name} (id {id}) {what}");
        }
        Ok(())
    })?;
    if listed == 0 {
        println!("{none}");
    }
    Ok(())
}

fn conv_name(conv: ConvId) -> String {
    match conv {
        ConvId::Direct { .. } => "your messages".to_owned(),
        ConvId::Group { group } => format!("group {group}"),
    }
}

fn role_name(role: GroupRole) -> &'static str {
    match role {
        GroupRole::Owner => "owner",
        GroupRole::Admin => "admin",
        GroupRole::Member => "member",
    }
}

const CHAT_HELP: &str = "\
commands:
  /msg NAME text    send a direct message (plain lines then go to NAME)
  /g ID text        send to group ID (plain lines then go to the group)
  /friend NAME      ask NAME to be friends, or accept their request
  /unfriend NAME    remove a friend, decline or cancel a request
  /friends          list friends
  /requests         list pending friend requests
  /create NAME      create a group
  /join ID          join a group
  /leave ID         leave a group
  /members ID       list a group's members
  /help             this text
  /quit             exit";

/// Where plain (non-command) lines go: the last /msg or /g target.
#[derive(Clone)]
enum Target {
    User(UserId, String),
    Group(GroupId),
}

enum Flow {
    Continue,
    Quit,
}

fn chat(client: &mut Client, session: &Session, names: &mut Names) -> Result<()> {
    names.refresh(client)?;
    // Reading stdin blocks, so it gets its own thread; the connection stays
    // on this one and polls both.
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) => {
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    println!(
        "logged in as {} (id {}); /help for commands",
        session.username, session.user
    );
    let interval = ping_interval(client.idle_timeout());
    let mut next_ping = Instant::now() + interval;
    let mut target: Option<Target> = None;
    let mut acks = Acks::default();
    loop {
        let wait = acks.poll_wait(Instant::now(), Duration::from_millis(100));
        match client.next_push(wait)? {
            Some(body) => {
                acks.note(&body);
                print_push(client, names, body, Shown::Chat)?;
                if acks.full() {
                    acks.finish(client)?;
                }
            }
            // Nothing more is waiting: acknowledge what was shown so far.
            None => acks.send(client)?,
        }
        loop {
            let line = match lines.try_recv() {
                Ok(line) => line,
                Err(TryRecvError::Empty) => break,
                // Stdin closed: nothing more to send.
                Err(TryRecvError::Disconnected) => return acks.finish(client),
            };
            match chat_line(client, names, &mut target, line.trim()) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Quit) => return acks.finish(client),
                Err(e) => {
                    // A refused request is the user's to fix; a dead connection ends the chat.
                    if e.downcast_ref::<ClientError>().is_some_and(ClientError::is_fatal) {
                        return Err(e);
                    }
                    eprintln!("error: {e:#}");
                }
            }
        }
        if Instant::now() >= next_ping {
            client.ping().context("keep-alive ping failed")?;
            next_ping = Instant::now() + interval;
        }
    }
}

fn chat_line(
    client: &mut Client,
    names: &mut Names,
    target: &mut Option<Target>,
    line: &str,
) -> Result<Flow> {
    if line.is_empty() {
        return Ok(Flow::Continue);
    }
    let Some(command) = line.strip_prefix('/') else {
        return match target.clone() {
            Some(to) => send_to(client, &to, line),
            None => bail!("no recipient yet: start with /msg NAME text or /g ID text"),
        };
    };
    let (command, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
    let rest = rest.trim();
    match command {
        "msg" => {
            let (name, text) = split_arg(rest, "/msg NAME text")?;
            let id = names.resolve(client, name)?;
            let to = Target::User(id, name.to_owned());
            *target = Some(to.clone());
            send_to(client, &to, text)
        }
        "g" => {
            let (id, text) = split_arg(rest, "/g ID text")?;
            let to = Target::Group(parse_id(id)?);
            *target = Some(to.clone());
            send_to(client, &to, text)
        }
        "friend" => {
            let name = one_arg(rest, "/friend NAME")?;
            println!("* {}", friend_add(client, names, name)?);
            Ok(Flow::Continue)
        }
        "unfriend" => {
            let name = one_arg(rest, "/unfriend NAME")?;
            let id = names.resolve(client, name)?;
            client.friend_remove(id)?;
            println!("* removed {name}: no friendship or pending request between you now");
            Ok(Flow::Continue)
        }
        "friends" => print_friends(client, names).map(|()| Flow::Continue),
        "requests" => print_friend_requests(client, names).map(|()| Flow::Continue),
        "create" => {
            let name = one_arg(rest, "/create NAME")?;
            let id = client.group_create(name)?;
            println!("* created group {name} (id {id})");
            Ok(Flow::Continue)
        }
        "join" => {
            let id = parse_id(one_arg(rest, "/join ID")?)?;
            client.group_join(id)?;
            println!("* joined group {id}");
            Ok(Flow::Continue)
        }
        "leave" => {
            let id = parse_id(one_arg(rest, "/leave ID")?)?;
            client.group_leave(id)?;
            println!("* left group {id}");
            Ok(Flow::Continue)
        }
        "members" => {
            let id = parse_id(one_arg(rest, "/members ID")?)?;
            print_members(client, names, id).map(|()| Flow::Continue)
        }
        "help" => {
            println!("{CHAT_HELP}");
            Ok(Flow::Continue)
        }
        "quit" | "exit" => Ok(Flow::Quit),
        other => bail!("unknown command /{other}; /help lists them"),
    }
}

fn send_to(client: &mut Client, to: &Target, text: &str) -> Result<Flow> {
    let sent = send_once(client, to, text)?;
    match to {
        Target::User(_, name) => println!("(to {name}, seq {})", sent.seq),
        Target::Group(group) => println!("(to group {group}, seq {})", sent.seq),
    }
    Ok(Flow::Continue)
}

fn split_arg<'a>(rest: &'a str, usage: &str) -> Result<(&'a str, &'a str)> {
    match rest.split_once(char::is_whitespace) {
        Some((arg, text)) if !text.trim().is_empty() => Ok((arg, text.trim())),
        _ => bail!("usage: {usage}"),
    }
}

fn one_arg<'a>(rest: &'a str, usage: &str) -> Result<&'a str> {
    if rest.is_empty() {
        bail!("usage: {usage}");
    }
    Ok(rest)
}

fn parse_id(s: &str) -> Result<u64> {
    s.parse().with_context(|| format!("{s:?} is not a numeric id"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_send_with_several_words() {
        let cli = Cli::try_parse_from(["tern", "--user", "alice", "send", "--to", "bob", "hello", "there"])
            .unwrap();
        match cli.command {
            Command::Send { to, text } => {
                assert_eq!(to, "bob");
                assert_eq!(text.join(" "), "hello there");
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn a_group_command_naming_another_user_keeps_the_login_user() {
        for args in [
            &["group", "invite", "7", "bob"][..],
            &["group", "uninvite", "7", "bob"],
            &["group", "kick", "7", "bob"],
            &["group", "role", "7", "bob", "admin"],
        ] {
            let cli = Cli::try_parse_from(["tern", "--user", "alice"].iter().chain(args)).unwrap();
            assert_eq!(cli.user.as_deref(), Some("alice"), "{args:?}");
            let target = match cli.command {
                Command::Group {
                    action:
                        GroupCommand::Invite { target, .. }
                        | GroupCommand::Uninvite { target, .. }
                        | GroupCommand::Kick { target, .. }
                        | GroupCommand::Role { target, .. },
                } => target,
                other => panic!("{args:?} parsed as {other:?}"),
            };
            assert_eq!(target, "bob", "{args:?}");
        }
    }

    #[test]
    fn tls_flags_build_verifying_options() {
        let cli =
            Cli::try_parse_from(["tern", "--server", "chat.example:7879", "--tls", "register"]).unwrap();
        let tls = client_options(&cli).tls.unwrap();
        assert_eq!(tls, ClientTls::new("chat.example"));
        let cli = Cli::try_parse_from([
            "tern",
            "--server",
            "[::1]:7879",
            "--tls",
            "--ca",
            "/etc/tern/cert.pem",
            "register",
        ])
        .unwrap();
        assert_eq!(
            client_options(&cli).tls.unwrap(),
            ClientTls::new("::1").with_ca_file("/etc/tern/cert.pem")
        );
        let cli = Cli::try_parse_from(["tern", "--tls", "--server-name", "localhost", "register"]).unwrap();
        assert_eq!(client_options(&cli).tls.unwrap().server_name, "localhost");
        assert!(
            client_options(&Cli::try_parse_from(["tern", "register"]).unwrap())
                .tls
                .is_none()
        );
        // --ca alone must not silently fall back to plain TCP.
        assert!(Cli::try_parse_from(["tern", "--ca", "cert.pem", "register"]).is_err());
    }

    #[test]
    fn host_of_handles_ports_and_ipv6() {
        assert_eq!(host_of("localhost:7878"), "localhost");
        assert_eq!(host_of("127.0.0.1:7878"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7878"), "::1");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("chat.example"), "chat.example");
    }

    #[test]
    fn sanitize_escapes_control_characters() {
        assert_eq!(sanitize(b"hi\x1b[2Jthere\n"), "hi\\u{1b}[2Jthere\\n");
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
        assert_eq!(sanitize(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(
            sanitize("a\u{202e}cba\u{2066}x\u{200f}".as_bytes()),
            "a\\u{202e}cba\\u{2066}x\\u{200f}"
        );
        assert_eq!(sanitize("שלום".as_bytes()), "שלום");
    }

    #[test]
    fn ping_interval_stays_inside_idle_timeout() {
        assert_eq!(ping_interval(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(ping_interval(Duration::ZERO), Duration::from_secs(30));
        assert_eq!(ping_interval(Duration::from_millis(3)), Duration::from_millis(10));
    }
}
