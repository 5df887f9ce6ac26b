//! Operator commands against a running server, over a local Unix socket.
//!
//! `ternd admin CMD` connects to `<data_dir>/admin.sock` (mode 0600: only
//! the server's own user may use it) and sends one line; the server answers
//! with text and closes. Commands: `stats` (live counters per shard),
//! `sessions USER`, `kick USER` (closes every session of the user with a
//! `Disconnect`), `revoke USER` (revokes every token of the user, then
//! kicks), `delete-user USER` (deletes the account as the user's own
//! `AccountDelete` does, without a password: an erasure request), and
//! `log FILTER` (changes the log filter at runtime). A session
//! lives on its user's home shard, so kicks and session counts are handed
//! to that shard through [`AdminQueues`], which each shard drains from its
//! stop-watcher tick (every 50 ms): admin commands never touch the message
//! path, and the mutex they take is never taken by it.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_proto::{shard_of, UserId};
use tern_storage::{Store, StoreError};

use crate::metrics::{Metrics, ProcessStats, Scrape};

/// The admin socket's file name in the data directory.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// Longest command line accepted.
const MAX_COMMAND_BYTES: usize = 1024;
/// How long one admin connection may take to send its command.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the idle accept loop looks at its stop flag. The loop does
/// not rely on a connection to its own path to wake it: the socket file
/// may have been removed or replaced (a second server on the same data
/// directory), and shutdown must not hang on it.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// How long a command waits for the shard that owns the user.
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The counters `stats` shows, per shard and in total.
const STATS_METRICS: &[&str] = &[
    "tern_connections_open",
    "tern_sessions_open",
    "tern_sessions_parked",
    "tern_parked_pings_total",
    "tern_messages_sent_total",
    "tern_messages_delivered_total",
    "tern_messages_stored_total",
    "tern_slow_consumer_disconnects_total",
    "tern_sync_hold_overflows_total",
    "tern_outbound_queued_bytes",
    "tern_groups_cached",
    "tern_group_members_cached",
    "tern_group_purges_running",
    "tern_user_purges_running",
];

/// A request for the shard that owns `user`.
pub enum AdminRequest {
    /// How many live sessions `user` has.
    Sessions {
        user: UserId,
        reply: mpsc::Sender<usize>,
    },
    /// Close every session of `user`; answers how many.
    Kick {
        user: UserId,
        reply: mpsc::Sender<usize>,
    },
    /// `user`'s account was deleted in the store: close every session of
    /// the user with `AccountDeleted` and start the purge; answers how
    /// many sessions were closed.
    AccountDeleted {
        user: UserId,
        reply: mpsc::Sender<usize>,
    },
}

/// One queue of admin requests per shard.
pub struct AdminQueues {
    per_shard: Vec<Mutex<Vec<AdminRequest>>>,
}

impl AdminQueues {
    /// Empty queues for `shards` shards.
    pub fn new(shards: usize) -> AdminQueues {
        AdminQueues {
            per_shard: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn push(&self, shard: usize, request: AdminRequest) {
        if let Some(queue) = self.per_shard.get(shard) {
            queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(request);
        }
    }

    /// Takes shard `shard`'s pending requests.
    pub fn take(&self, shard: usize) -> Vec<AdminRequest> {
        match self.per_shard.get(shard) {
            Some(queue) => {
                std::mem::take(&mut *queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
            }
            None => Vec::new(),
        }
    }

    fn shards(&self) -> usize {
        self.per_shard.len()
    }
}

/// Changes the log filter of the running process.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin socket needs from the server.
pub struct AdminContext {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub queues: Arc<AdminQueues>,
    pub log_reload: Option<LogReload>,
}

/// The admin socket's thread; removes the socket file when dropped.
pub struct AdminServer {
    path: PathBuf,
    /// Device and inode of the socket file we bound, so that dropping
    /// removes our file and never another server's at the same path.
    file_id: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if file_id(&self.path).ok() == Some(self.file_id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves admin commands on a Unix socket at `path` (replacing a stale
/// socket file left by a crashed server).
pub fn serve_admin(path: &Path, context: AdminContext) -> io::Result<AdminServer> {
    if path.exists() {
        // A live server answers; a stale file from a crash does not.
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tern-admin".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        // One command at a time: admin traffic is rare, and
                        // this bounds the work a local client can queue.
                        Ok((stream, _)) => {
                            let _ = stream
                                .set_nonblocking(false)
                                .and_then(|()| answer(stream, &context, &stop));
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // WouldBlock, or a transient failure such as EMFILE:
                        // wait rather than spin.
                        Err(_) => std::thread::sleep(ACCEPT_POLL),
                    }
                }
            })?
    };
    Ok(AdminServer {
        path: path.to_owned(),
        file_id: file_id(path)?,
        stop,
        thread: Some(thread),
    })
}

/// The device and inode of the file at `path`.
fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

fn answer(stream: UnixStream, context: &AdminContext, stop: &AtomicBool) -> io::Result<()> {
    let line = read_command(&stream, stop)?;
    let reply = match run(line.trim(), context) {
        Ok(text) => text,
        Err(e) => format!("error: {e}\n"),
    };
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    (&stream).write_all(reply.as_bytes())
}

/// Reads one command line: up to its newline, the end of the stream or
/// [`MAX_COMMAND_BYTES`], all within [`READ_TIMEOUT`] from the start (a
/// limit per read would let a client that sends a byte at a time hold
/// this thread, and with it the server's shutdown, for an hour), and
/// given up as soon as the server stops.
fn read_command(stream: &UnixStream, stop: &AtomicBool) -> io::Result<String> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut command = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !command.contains(&b'\n') && command.len() < MAX_COMMAND_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no command in time"));
        }
        stream.set_read_timeout(Some(left.min(ACCEPT_POLL)))?;
        match (&*stream).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => command.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    command.truncate(MAX_COMMAND_BYTES);
    let end = command.iter().position(|&b| b == b'\n').unwrap_or(command.len());
    command.truncate(end);
    Ok(String::from_utf8_lossy(&command).into_owned())
}

/// `count` and `noun`, the noun in the plural unless `count` is 1: the
/// admin answers and the start banner are read by people.
pub fn counted(count: impl TryInto<u64>, noun: &str) -> String {
    let count = count.try_into().unwrap_or(u64::MAX);
    let plural = if count == 1 { "" } else { "s" };
    format!("{count} {noun}{plural}")
}

fn run(command: &str, context: &AdminContext) -> Result<String, String> {
    let mut words = command.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("stats"), None, _) => Ok(stats(context)),
        (Some("sessions"), Some(name), None) => {
            let user = resolve(context, name)?;
            let count = ask(context, user, |reply| AdminRequest::Sessions { user, reply })?;
            let sessions = counted(count, "session");
            Ok(format!("{name} (id {user}): {sessions} on shard {}\n", home(context, user)))
        }
        (Some("kick"), Some(name), None) => {
            let user = resolve(context, name)?;
            let count = ask(context, user, |reply| AdminRequest::Kick { user, reply })?;
            Ok(format!("kicked {} of {name} (id {user})\n", counted(count, "session")))
        }
        (Some("revoke"), Some(name), None) => {
            let user = resolve(context, name)?;
            let revoked = context.store.revoke_tokens(user).map_err(|e| e.to_string())?;
            let count = ask(context, user, |reply| AdminRequest::Kick { user, reply })?;
            Ok(format!(
                "revoked {} and kicked {} of {name} (id {user})\n",
                counted(revoked, "token"),
                counted(count, "session")
            ))
        }
        (Some("delete-user"), Some(name), None) => {
            let user = resolve(context, name)?;
            if let Err(e) = context.store.delete_account(user) {
                // Deleted between the lookup and here (by the user, say):
                // whoever deleted it closes its sessions and purges it.
                if matches!(e, StoreError::NotFound) {
                    return Err(format!("{name} (id {user}) was deleted already"));
                }
                // A failed sync may still have left the deletion in place:
                // then the rest of it must follow.
                if !context.store.is_deleted(user) {
                    return Err(e.to_string());
                }
                tracing::error!(error = %e, user, "account deletion failed to sync but is visible; completing it");
            }
            tracing::info!(user, "account deleted by the operator");
            let count = ask(context, user, |reply| AdminRequest::AccountDeleted { user, reply })?;
            Ok(format!(
                "deleted {name} (id {user}): closed {}; its data is being purged\n",
                counted(count, "session")
            ))
        }
        (Some("log"), Some(filter), None) => match &context.log_reload {
            Some(reload) => reload(filter).map(|()| format!("log filter is now {filter}\n")),
            None => Err("this server cannot change its log filter at runtime".into()),
        },
        _ => Err(format!(
            "unknown command {command:?}; commands: stats | sessions USER | kick USER | revoke USER | delete-user USER | log FILTER"
        )),
    }
}

fn resolve(context: &AdminContext, name: &str) -> Result<UserId, String> {
    match context.store.user_id(name) {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(format!("no user named {name:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn home(context: &AdminContext, user: UserId) -> usize {
    shard_of(user, context.queues.shards())
}

/// Hands a request to the user's home shard and waits for its answer.
fn ask(
    context: &AdminContext,
    user: UserId,
    request: impl FnOnce(mpsc::Sender<usize>) -> AdminRequest,
) -> Result<usize, String> {
    let (tx, rx) = mpsc::channel();
    context.queues.push(home(context, user), request(tx));
    rx.recv_timeout(SHARD_ANSWER_TIMEOUT)
        .map_err(|_| "the shard did not answer (is the server stopping?)".into())
}

fn stats(context: &AdminContext) -> String {
    let scrape = Scrape {
        ready: true,
        process: ProcessStats::collect(),
        ..Scrape::default()
    };
    let text = context.metrics.render(&scrape);
    let mut out = String::new();
    for line in text.lines() {
        if !line.starts_with('#') && STATS_METRICS.iter().any(|m| line.starts_with(m)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Sends one command to the admin socket at `path` and returns the answer
/// (the `ternd admin` client).
pub fn admin_request(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(SHARD_ANSWER_TIMEOUT + READ_TIMEOUT))?;
    stream.write_all(command.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    io::Read::read_to_string(&mut stream, &mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::counted;

    #[test]
    fn counts_read_as_english() {
        assert_eq!(counted(0usize, "session"), "0 sessions");
        assert_eq!(counted(1usize, "shard"), "1 shard");
        assert_eq!(counted(2u64, "token"), "2 tokens");
    }
}
