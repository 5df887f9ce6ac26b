//! A shard-local stop signal that any number of tasks can wait on.
//!
//! The server's stop request arrives as an atomic flag set from another
//! thread; one watcher task per shard polls it and fires this signal, which
//! wakes the accept loop, connections that have not logged in yet and the
//! shutdown sequence without cross-thread wake-ups. Each waiter holds one
//! slot, refreshed in place when it is polled again and freed when it is
//! dropped, so the signal holds one waker per live waiter, not one per poll,
//! and nothing once the waiters are gone.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// Fired once; every waiter then completes.
#[derive(Default)]
pub struct StopSignal {
    fired: Cell<bool>,
    waiters: RefCell<Slab<Waker>>,
}

impl StopSignal {
    /// Fires the signal and wakes every waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes once the signal has fired.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            signal: self,
            slot: None,
        }
    }

    /// Sleeps for `period` unless the signal fires first; returns whether
    /// it fired (for periodic tasks that end with the shard).
    pub async fn sleep_unless_fired(&self, period: std::time::Duration) -> bool {
        futures_lite::future::or(
            async {
                glommio::timer::sleep(period).await;
                false
            },
            async {
                self.wait().await;
                true
            },
        )
        .await
    }

    /// Waiters currently registered.
    #[cfg(test)]
    fn registered(&self) -> (usize, usize) {
        let waiters = self.waiters.borrow();
        (waiters.len(), waiters.capacity())
    }
}

/// A wait for a [`StopSignal`]; see [`StopSignal::wait`].
pub struct Wait<'a> {
    signal: &'a StopSignal,
    slot: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let signal = self.signal;
        if signal.fired.get() {
            // `fire` has already dropped every registered waker.
            self.slot = None;
            return Poll::Ready(());
        }
        let mut waiters = signal.waiters.borrow_mut();
        match self.slot.and_then(|slot| waiters.get_mut(slot)) {
            Some(waker) => {
                if !waker.will_wake(cx.waker()) {
                    waker.clone_from(cx.waker());
                }
            }
            None => {
                let slot = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(slot) = self.slot else { return };
        if self.signal.fired.get() {
            return;
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        waiters.try_remove(slot);
        // A burst of waiters (a login wave) leaves its peak capacity
        // behind; give it back once they are all gone.
        if waiters.is_empty() && waiters.capacity() > 0 {
            *waiters = Slab::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn a_waiter_holds_one_slot_however_often_it_is_polled() {
        let signal = StopSignal::default();
        block_on(async {
            let mut waits: Vec<_> = (0..100).map(|_| Box::pin(signal.wait())).collect();
            for _ in 0..3 {
                for wait in &mut waits {
                    assert_eq!(poll_once(wait.as_mut()).await, None);
                }
            }
            assert_eq!(signal.registered().0, 100);
            waits.truncate(1);
            assert_eq!(signal.registered().0, 1);
            signal.fire();
            assert_eq!(poll_once(waits[0].as_mut()).await, Some(()));
            signal.wait().await;
        });
        assert_eq!(signal.registered(), (0, 0));
    }

    #[test]
    fn the_peak_is_released_once_every_waiter_is_gone() {
        let signal = StopSignal::default();
        block_on(async {
            let mut waits: Vec<_> = (0..1000).map(|_| Box::pin(signal.wait())).collect();
            for wait in &mut waits {
                assert_eq!(poll_once(wait.as_mut()).await, None);
            }
        });
        assert_eq!(signal.registered(), (0, 0));
    }
}
