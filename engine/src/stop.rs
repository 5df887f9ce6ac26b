//! A shard-local stop signal that any number of tasks can wait on.
//!
//! The server's stop request arrives as an atomic flag set from another
//! thread; one watcher task per shard polls it and fires this signal, which
//! wakes the accept loop and the shutdown sequence without cross-thread
//! wake-ups.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Fired once; every waiter then completes.
#[derive(Default)]
pub struct StopSignal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl StopSignal {
    /// Fires the signal and wakes every waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes once the signal has fired.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.fired.get() {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
