//! Reading frames into a [`FrameBuf`] and writing encoded frames.
//!
//! Reads go straight into the buffer's read slot, which is small (256 bytes)
//! unless a larger frame is in flight, so an idle connection pins little
//! memory. Writes take whatever a connection has queued (many frames,
//! already encoded back to back) and send it with one `write_all`, so a
//! burst of pushes costs one syscall, not one per frame.

use std::io;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tern_proto::{FrameBuf, FrameError};

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

/// Writes every byte of `bytes` and flushes.
pub async fn write_batch<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}
