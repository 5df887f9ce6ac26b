//! Splitting a stream into a read half and a write half.
//!
//! A connection's reader and writer run as two tasks on the same
//! single-threaded executor, so the halves share the stream through an
//! `Rc<RefCell<_>>`: no lock and no atomic, and the borrow lasts only for
//! one `poll_*` call, so the two halves can never conflict (a poll never
//! re-enters the other half).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

/// Splits `stream` into halves usable from two tasks of one executor.
pub fn split<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> (ReadHalf<S>, WriteHalf<S>) {
    let shared = Rc::new(RefCell::new(stream));
    (
        ReadHalf {
            stream: shared.clone(),
        },
        WriteHalf { stream: shared },
    )
}

/// The reading side of a [`split`] stream.
pub struct ReadHalf<S> {
    stream: Rc<RefCell<S>>,
}

/// The writing side of a [`split`] stream.
pub struct WriteHalf<S> {
    stream: Rc<RefCell<S>>,
}

impl<S> ReadHalf<S> {
    /// Runs `f` on the underlying stream (e.g. to read its fd or options).
    pub fn with_stream<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.stream.borrow())
    }
}

impl<S> WriteHalf<S> {
    /// Runs `f` on the underlying stream.
    pub fn with_stream<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.stream.borrow())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadHalf<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteHalf<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_close(cx)
    }
}
