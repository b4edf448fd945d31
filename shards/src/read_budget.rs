//! A read budget for the link handshake.
//!
//! The WebSocket message limit is the data limit (a batch plus one maximal frame, megabytes),
//! and async-tungstenite cannot lower it for the handshake alone. So the socket under the
//! WebSocket gets a byte budget while the handshake runs: a peer can make this node buffer at
//! most [`HANDSHAKE_READ_BUDGET`] bytes before it has proven who it is, whatever size it
//! announces; past it, reads fail and the set-up ends. Once the handshake succeeds the budget
//! is lifted.

use std::{
    cell::Cell,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, ready},
};

use futures::io::{AsyncRead, AsyncWrite};

/// Bytes a peer may send before its handshake completes: the WebSocket upgrade, a Hello and an
/// Auth (each ≤ 4 KiB) with room to spare.
pub(crate) const HANDSHAKE_READ_BUDGET: usize = 64 * 1024;

/// A stream whose reads are limited while the shared budget is `Some`.
pub(crate) struct ReadBudget<S> {
    inner: S,
    left: Rc<Cell<Option<usize>>>,
}

impl<S> ReadBudget<S> {
    /// Wraps `inner` with [`HANDSHAKE_READ_BUDGET`]; the returned handle lifts it (`set(None)`).
    pub(crate) fn new(inner: S) -> (Self, Rc<Cell<Option<usize>>>) {
        let left = Rc::new(Cell::new(Some(HANDSHAKE_READ_BUDGET)));
        (
            Self {
                inner,
                left: Rc::clone(&left),
            },
            left,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadBudget<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let allowed = match this.left.get() {
            None => buf.len(),
            Some(0) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the peer sent more than the handshake allows before completing it",
                )));
            }
            Some(left) => left.min(buf.len()),
        };
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf[..allowed]))?;
        if let Some(left) = this.left.get() {
            this.left.set(Some(left.saturating_sub(n)));
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadBudget<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, executor::block_on, io::Cursor};

    use super::*;

    #[test]
    fn reads_stop_at_the_budget_until_it_is_lifted() {
        let data = vec![7u8; HANDSHAKE_READ_BUDGET * 2];
        let (mut stream, budget) = ReadBudget::new(Cursor::new(data));
        let mut buf = vec![0u8; HANDSHAKE_READ_BUDGET * 2];
        let mut read = 0;
        let error = loop {
            match block_on(stream.read(&mut buf[read..])) {
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert_eq!(read, HANDSHAKE_READ_BUDGET);
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        budget.set(None);
        block_on(stream.read_exact(&mut buf[read..])).unwrap();
    }
}
