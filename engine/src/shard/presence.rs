//! Presence: telling a user's friends that the user came online or went
//! offline, in batches, so that a login storm costs a few store calls and
//! cross-shard hops per batch rather than per friend.
//!
//! Two halves. On the user's home shard, opening the user's first session
//! or closing the last marks the user in a set ([`Announcing`]): however
//! often a user comes and goes before being announced, that is one entry.
//! At most [`ANNOUNCE_WORKERS`] tasks per shard drain the set, up to
//! [`ANNOUNCE_BATCH`] users at a time: one blocking call reads all their
//! friend lists, each user's state is taken after that read (so an
//! announcement says what holds now), and one [`Request::PresenceNotices`]
//! per pair shard carries the batch's notices. A worker waits until its
//! notices are queued there before it takes more.
//!
//! On the home shard of each pair's 1:1 conversation, where friendships
//! end and blocks change under the permit of pair changes
//! ([`super::blocks`]), notices wait in [`PairQueue`], one entry per
//! subject holding the friends that asked for each state: notices of the
//! same subject coalesce, and per friend only the state that holds at the
//! look is pushed. One task per shard drains it, up to [`PAIR_BATCH`]
//! subjects at a time, under the permit: one `OnlineQuery` per home shard
//! of the batch's subjects, one blocking call re-checking every
//! friendship, then the pushes. A subject's state is pushed only to the
//! friends whose notice asked for that very state, and only if its home
//! shard, asked under the permit, still says it: notices may arrive in
//! another order than their changes happened (two workers of one shard
//! announce side by side), but the notice of the last change is looked at
//! after that change, so it is pushed, and any look after it finds the
//! same state; the last `Presence` a friend gets is the state that holds.
//! And since the friendship is looked at under the permit, no `Presence`
//! of an ex-friend follows the `Ok` of a `FriendRemove` or of a block.
//!
//! Bounds: the announce set holds each user homed here at most once, and
//! its tasks are [`ANNOUNCE_WORKERS`] whatever the connection rate. A pair
//! shard's queue holds at most the notices of the workers waiting on it
//! (shards × [`ANNOUNCE_WORKERS`] × [`ANNOUNCE_BATCH`] subjects, each with
//! at most the user's friends) plus one per account purge in flight, and
//! the notices a disk error sent round again (a second later, coalescing
//! with those of the same subject): when
//! it is that full, the workers wait, and so new changes pile up in the
//! announce sets as marks, one per user, not as tasks or notices. Both
//! queues are drained oldest first. A user whose friend list cannot be
//! read is marked again a second later, and a notice whose friendships
//! cannot be checked on the pair shard is queued there again a second
//! later, so a disk error delays an announcement instead of losing it.

use std::collections::VecDeque;
use std::rc::Rc;

use futures_channel::oneshot;
use rustc_hash::{FxHashMap, FxHashSet};
use tern_proto::{ConvId, UserId};

use super::Shard;
use crate::mesh::{Event, PresenceNotice, Request};

/// Announce tasks per shard: enough to read the next batch's friend lists
/// while earlier batches wait on pair shards.
pub const ANNOUNCE_WORKERS: usize = 4;
/// Users one announce task takes at a time.
pub const ANNOUNCE_BATCH: usize = 256;
/// Subjects a pair shard looks at under one hold of the permit: bounds
/// how long a block change waits behind a burst.
pub const PAIR_BATCH: usize = 512;
/// Pause before users whose friend lists could not be read are announced
/// again.
const RETRY_UNREAD_FRIENDS: std::time::Duration = std::time::Duration::from_secs(1);

/// Users homed here whose presence changed and is not announced yet.
#[derive(Default)]
pub struct Announcing {
    marked: FxHashSet<UserId>,
    order: VecDeque<UserId>,
    workers: usize,
}

/// Presence notices waiting for this shard's permit of pair changes.
#[derive(Default)]
pub struct PairQueue {
    subjects: FxHashMap<UserId, Pending>,
    /// The keys of `subjects` in the order they arrived, each once: a
    /// batch takes the oldest, so none waits behind later arrivals.
    order: VecDeque<UserId>,
    running: bool,
}

/// One subject's waiting notices.
#[derive(Default)]
struct Pending {
    /// Friends told of the subject coming online, if it holds at the look.
    online: Vec<UserId>,
    /// Friends told of the subject going offline, if it holds at the look.
    offline: Vec<UserId>,
    /// The senders waiting until these are queued (dropped then).
    queued: Vec<Rc<Queued>>,
}

/// Dropped, with the sender in it, once the last notice of one request is
/// pushed or dropped.
struct Queued(#[allow(dead_code)] oneshot::Sender<()>);

impl Shard {
    /// `user`'s first session opened or last one closed: their friends
    /// will be told of the state that holds when the announcement runs.
    pub(crate) fn presence_changed(self: &Rc<Self>, user: UserId) {
        let spawn = {
            let mut announcing = self.announcing.borrow_mut();
            if announcing.marked.insert(user) {
                announcing.order.push_back(user);
            }
            let spawn = announcing.workers < ANNOUNCE_WORKERS;
            announcing.workers += usize::from(spawn);
            spawn
        };
        // Not under the borrow: a spawned task may start running at once.
        if spawn {
            glommio::spawn_local(self.clone().announce()).detach();
        }
    }

    /// Announces marked users a batch at a time until none is left.
    async fn announce(self: Rc<Self>) {
        loop {
            let batch: Vec<UserId> = {
                let mut announcing = self.announcing.borrow_mut();
                let take = announcing.order.len().min(ANNOUNCE_BATCH);
                let batch: Vec<UserId> = announcing.order.drain(..take).collect();
                for user in &batch {
                    announcing.marked.remove(user);
                }
                if batch.is_empty() {
                    announcing.workers -= 1;
                    // A storm's set should not stay allocated at its peak.
                    announcing.marked.shrink_to(ANNOUNCE_BATCH);
                    announcing.order.shrink_to(ANNOUNCE_BATCH);
                    return;
                }
                batch
            };
            let lists = self
                .blocking(move |store| {
                    batch
                        .into_iter()
                        .map(|user| (user, store.friends(user)))
                        .collect::<Vec<_>>()
                })
                .await;
            let mut by_pair_shard: Vec<Vec<PresenceNotice>> = (0..self.shards).map(|_| Vec::new()).collect();
            let mut unread = Vec::new();
            for (user, friends) in lists {
                let friends = match friends {
                    Ok(friends) => friends,
                    Err(e) => {
                        if unread.is_empty() {
                            tracing::warn!(error = %e, user, "cannot load friends for presence; retrying in 1 s");
                        }
                        unread.push(user);
                        continue;
                    }
                };
                // Read now, after the friend lists: a change since the
                // mark is announced here, and a change after this read
                // marks the user again.
                let online = self.is_online(user);
                self.notices_by_pair_shard(user, online, friends, &mut by_pair_shard);
            }
            self.send_notices(by_pair_shard).await;
            if !unread.is_empty() {
                // Marked again, after a pause (a failing disk is asked
                // once a second, with one warning per batch): their
                // friends must still learn the state that holds.
                glommio::timer::sleep(RETRY_UNREAD_FRIENDS).await;
                let mut announcing = self.announcing.borrow_mut();
                for user in unread {
                    if announcing.marked.insert(user) {
                        announcing.order.push_back(user);
                    }
                }
            }
        }
    }

    /// Hands `user`'s presence to the home shard of each pair's 1:1
    /// conversation, where a friendship's end is ordered with it;
    /// returns once every shard has queued its pushes (a deleted
    /// account's purge waits for that before it removes the friendships).
    pub(crate) async fn notify_friends(self: &Rc<Self>, user: UserId, online: bool, friends: Vec<UserId>) {
        let mut by_pair_shard: Vec<Vec<PresenceNotice>> = (0..self.shards).map(|_| Vec::new()).collect();
        self.notices_by_pair_shard(user, online, friends, &mut by_pair_shard);
        self.send_notices(by_pair_shard).await;
    }

    /// Splits `friends` by the shard of each one's pair with `user`.
    fn notices_by_pair_shard(
        &self,
        user: UserId,
        online: bool,
        friends: Vec<UserId>,
        by_pair_shard: &mut [Vec<PresenceNotice>],
    ) {
        let split = self.partition_by(friends, |friend| {
            self.home_of(ConvId::direct(user, friend).placement_key())
        });
        for (notices, to) in by_pair_shard.iter_mut().zip(split) {
            if !to.is_empty() {
                notices.push(PresenceNotice {
                    subject: user,
                    online,
                    to,
                });
            }
        }
    }

    /// Sends each pair shard its notices; returns once all are queued.
    async fn send_notices(self: &Rc<Self>, by_pair_shard: Vec<Vec<PresenceNotice>>) {
        let mut queued = Vec::new();
        for (shard, notices) in by_pair_shard.into_iter().enumerate() {
            if notices.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let request = Request::PresenceNotices {
                notices,
                queued: Some(tx),
            };
            self.send_request(shard, request).await;
            queued.push(rx);
        }
        for rx in queued {
            // Dropped unsent: the pushes are queued (or the shard stops).
            let _ = rx.await;
        }
    }

    /// Queues presence notices whose pairs are homed here; `queued` is
    /// dropped once every one of them is pushed or dropped. Never waits.
    pub(super) fn queue_presence(
        self: &Rc<Self>,
        notices: Vec<PresenceNotice>,
        queued: Option<oneshot::Sender<()>>,
    ) {
        let queued = queued.map(|tx| Rc::new(Queued(tx)));
        let mut queue = self.pair_queue.borrow_mut();
        for notice in notices {
            let queue = &mut *queue;
            let pending = queue.subjects.entry(notice.subject).or_insert_with(|| {
                queue.order.push_back(notice.subject);
                Pending::default()
            });
            let to = if notice.online {
                &mut pending.online
            } else {
                &mut pending.offline
            };
            to.extend(notice.to);
            if let Some(queued) = &queued {
                pending.queued.push(queued.clone());
            }
        }
        let spawn = !queue.running && !queue.subjects.is_empty();
        queue.running |= spawn;
        drop(queue);
        // Not under the borrow: a spawned task may start running at once.
        if spawn {
            glommio::spawn_local(self.clone().push_presence()).detach();
        }
    }

    /// Drains the queue of presence notices, a batch per hold of the
    /// permit of pair changes.
    async fn push_presence(self: Rc<Self>) {
        loop {
            let Ok(_permit) = self.pair_changes.acquire_permit(1).await else {
                self.pair_queue.borrow_mut().running = false;
                return;
            };
            let batch: Vec<(UserId, Pending)> = {
                let mut queue = self.pair_queue.borrow_mut();
                let take = queue.order.len().min(PAIR_BATCH);
                let subjects: Vec<UserId> = queue.order.drain(..take).collect();
                if subjects.is_empty() {
                    queue.running = false;
                    queue.subjects.shrink_to(PAIR_BATCH);
                    queue.order.shrink_to(PAIR_BATCH);
                    return;
                }
                subjects
                    .into_iter()
                    .filter_map(|s| queue.subjects.remove(&s).map(|p| (s, p)))
                    .collect()
            };
            // A deleted account is offline for good, though its sessions
            // may still be closing (its purge announces that before they
            // are gone).
            let asked = batch
                .iter()
                .map(|(subject, _)| *subject)
                .filter(|subject| !self.store.is_deleted(*subject))
                .collect();
            let online = self.online_among(asked).await;
            let mut guards = Vec::with_capacity(batch.len());
            let mut looks = Vec::with_capacity(batch.len());
            for (subject, pending) in batch {
                guards.push(pending.queued);
                let now = online.contains(&subject);
                let mut to = if now { pending.online } else { pending.offline };
                if to.is_empty() {
                    continue;
                }
                to.sort_unstable();
                to.dedup();
                looks.push((subject, now, to));
            }
            let checked = self
                .blocking(move |store| {
                    looks
                        .into_iter()
                        .map(|(subject, online, to)| {
                            let friends = store.friends_among(subject, &to);
                            (subject, online, to, friends)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
            let mut unchecked = Vec::new();
            for (subject, online, to, friends) in checked {
                let friends = match friends {
                    Ok(friends) => friends,
                    Err(e) => {
                        if unchecked.is_empty() {
                            tracing::warn!(error = %e, subject, "cannot check friendships for presence; retrying in 1 s");
                        }
                        unchecked.push(PresenceNotice { subject, online, to });
                        continue;
                    }
                };
                for (shard, to) in self.partition(friends).into_iter().enumerate() {
                    if !to.is_empty() {
                        self.send_event(shard, Event::Presence { to, subject, online })
                            .await;
                    }
                }
            }
            drop(guards);
            if !unchecked.is_empty() {
                // Queued again after a pause, not under the permit (block
                // changes must not wait out a failing disk): the look then
                // pushes the state that holds, as for any notice.
                let shard = self.clone();
                glommio::spawn_local(async move {
                    glommio::timer::sleep(RETRY_UNREAD_FRIENDS).await;
                    shard.queue_presence(unchecked, None);
                })
                .detach();
            }
        }
    }
}
