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

    /// Puts the halves of one stream back together, so that it can be
    /// detached (an idle session parking). Gives both halves back if they
    /// come from different streams.
    pub fn reunite(self, write: WriteHalf<S>) -> Result<S, (ReadHalf<S>, WriteHalf<S>)> {
        if !Rc::ptr_eq(&self.stream, &write.stream) {
            return Err((self, write));
        }
        drop(write);
        match Rc::try_unwrap(self.stream) {
            Ok(cell) => Ok(cell.into_inner()),
            // Unreachable: only the two halves ever hold the stream.
            Err(stream) => Err((
                ReadHalf {
                    stream: stream.clone(),
                },
                WriteHalf { stream },
            )),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_of_one_stream_reunite_and_strangers_do_not() {
        let (read, write) = split(futures_lite::io::Cursor::new(vec![1u8, 2, 3]));
        let stream = read.reunite(write).ok().map(|cursor| cursor.into_inner());
        assert_eq!(stream, Some(vec![1, 2, 3]));

        let (read_a, _write_a) = split(futures_lite::io::Cursor::new(vec![1u8]));
        let (_read_b, write_b) = split(futures_lite::io::Cursor::new(vec![2u8]));
        assert!(read_a.reunite(write_b).is_err());
    }
}
