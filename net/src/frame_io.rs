//! Reading frames into a [`FrameBuf`] and writing encoded frames.
//!
//! Reads go straight into the buffer's read slot, which is small (256 bytes)
//! unless a larger frame is in flight, so an idle connection pins little
//! memory; or, with [`fill_shared`], through one scratch buffer per thread,
//! so that a connection waiting for its next frame holds no read buffer at
//! all. Writes take whatever a connection has queued (many frames,
//! already encoded back to back) and send it with one `write_all`, so a
//! burst of pushes costs one syscall, not one per frame.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tern_proto::{FrameBuf, FrameError};

/// The largest read [`fill_shared`] makes at once.
const SHARED_READ_BYTES: usize = 16 * 1024;

thread_local! {
    /// Every connection of a thread reads through this buffer; it is
    /// borrowed only inside one `poll_read` call.
    static SHARED_READ: RefCell<Box<[u8]>> = RefCell::new(vec![0; SHARED_READ_BYTES].into_boxed_slice());
}

/// What one [`fill`] call produced.
#[derive(Debug)]
pub enum Filled {
    /// This many bytes were added to the buffer.
    Bytes(usize),
    /// The peer closed its side (no partial frame was pending).
    Eof,
}

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed (includes the read timeout).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The buffered bytes cannot become a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed mid-frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Reads once from `reader` into `buf`.
pub async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut FrameBuf) -> Result<Filled, ReadError> {
    let slot = buf.read_slot()?;
    let n = reader.read(slot).await?;
    if n == 0 {
        return if buf.buffered() == 0 {
            Ok(Filled::Eof)
        } else {
            Err(ReadError::Truncated)
        };
    }
    buf.commit(n);
    Ok(Filled::Bytes(n))
}

/// Reads once from `reader` into `buf` through the thread's shared read
/// buffer, copying into `buf` only what arrived, and releases `buf`'s memory
/// first if it holds nothing. The reader must not keep the buffer it is
/// handed after `poll_read` returns (true of glommio's unbuffered streams,
/// which wait for readiness, not for a read into the caller's memory, and
/// of TLS over them).
pub async fn fill_shared<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut FrameBuf,
) -> Result<Filled, ReadError> {
    let wanted = buf.wanted()?.min(SHARED_READ_BYTES);
    buf.release_if_idle();
    let n = poll_fn(|cx| {
        let polled = SHARED_READ.try_with(|shared| match shared.try_borrow_mut() {
            Ok(mut shared) => {
                let read = shared
                    .get_mut(..wanted)
                    .map(|into| Pin::new(&mut *reader).poll_read(cx, into));
                match read {
                    Some(Poll::Ready(Ok(n))) => {
                        if let Some(bytes) = shared.get(..n) {
                            buf.append_read(bytes, wanted);
                        }
                        Some(Poll::Ready(Ok(n)))
                    }
                    other => other,
                }
            }
            // Only a reader that re-enters this function could get here.
            Err(_) => None,
        });
        match polled {
            Ok(Some(poll)) => poll,
            // No shared buffer on this thread (it is being torn down):
            // read into the connection's own buffer.
            _ => match buf.read_slot() {
                Ok(slot) => Pin::new(&mut *reader).poll_read(cx, slot).map_ok(|n| {
                    buf.commit(n);
                    n
                }),
                Err(e) => Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
            },
        }
    })
    .await?;
    if n == 0 {
        return if buf.buffered() == 0 {
            Ok(Filled::Eof)
        } else {
            Err(ReadError::Truncated)
        };
    }
    Ok(Filled::Bytes(n))
}

/// Writes every byte of `bytes` and flushes.
pub async fn write_batch<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}
