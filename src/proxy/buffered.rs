//! The buffered direction: bytes copied from one stream to the other through a buffer, for any
//! pair of streams (TLS included), and the process-wide pool the buffers come from.
//!
//! A direction holds a buffer only while bytes are moving: it takes one from the pool when a read
//! may return data and gives it back as soon as a read would block, so an idle connection holds
//! none, and at most one per direction, so a sink that stops reading stops the copy
//! (backpressure). It reads, writes, flushes and passes the source's FIN on as a shutdown of the
//! sink's write side; it must not dial, log, count metrics or read the clock (the relay's loop in
//! `proxy.rs` does the timing and the counting).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pump::{half_closed, DirectionError, Flow, Pump};

/// Size of each direction's buffer while it is moving bytes.
pub const BUFFER_SIZE: usize = 32 * 1024;
/// Idle buffers kept for reuse, process-wide; more are freed.
const POOLED_BUFFERS: usize = 256;

/// One direction's state: a buffer of read-but-unwritten bytes (held only while bytes are
/// moving) and how far the stream has got.
#[derive(Default)]
pub(super) struct Direction {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    eof: bool,
    unflushed: bool,
    done: bool,
    /// The last read filled the whole buffer.
    full: bool,
}

impl<R, W> Pump<R, W> for Direction
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        moved: &mut u64,
    ) -> Poll<Result<(), DirectionError>> {
        // Without `switch`, the only flow that ends a step is `Done`.
        self.step(cx, reader, writer, moved, false).map_ok(|_| ())
    }

    fn holds_bytes(&self) -> bool {
        Direction::holds_bytes(self)
    }

    fn source_ended(&self) -> bool {
        Direction::source_ended(self)
    }
}

impl Direction {
    pub(super) fn holds_bytes(&self) -> bool {
        self.start < self.end
    }

    pub(super) fn source_ended(&self) -> bool {
        self.eof || self.done
    }

    /// Copies until the reader would block, EOF has been passed on, or (with `switch`) a read that
    /// filled the buffer has been written out: then [`Flow::Switch`], holding no buffer.
    pub(super) fn step<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        moved: &mut u64,
        switch: bool,
    ) -> Poll<Result<Flow, DirectionError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(Flow::Done));
        }
        loop {
            if self.start == self.end && !self.eof {
                if switch && self.full {
                    buffers::give(self.buf.take());
                    return Poll::Ready(Ok(Flow::Switch));
                }
                let buf = self.buf.get_or_insert_with(buffers::take);
                let mut read = ReadBuf::new(buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        self.full = n == read.capacity();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(DirectionError::Read(e))),
                    Poll::Pending => {
                        // Idle: the buffer is empty, give it back until the next read.
                        buffers::give(self.buf.take());
                        // Nothing more to read for now: make sure what was written is on its way.
                        if self.unflushed {
                            ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(DirectionError::Write)?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.start..self.end]))
                        .map_err(DirectionError::Write)?;
                    if n == 0 {
                        return Poll::Ready(Err(DirectionError::Write(io::ErrorKind::WriteZero.into())));
                    }
                    self.start += n;
                    *moved += n as u64;
                    self.unflushed = true;
                }
            }
            if self.eof {
                buffers::give(self.buf.take());
                // Propagate the half-close: flush, then shut down the sink's write side.
                half_closed(ready!(Pin::new(&mut *writer).poll_shutdown(cx)))?;
                self.done = true;
                return Poll::Ready(Ok(Flow::Done));
            }
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        buffers::give(self.buf.take());
    }
}

/// The process-wide pool of relay buffers.
mod buffers {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

    pub(super) fn take() -> Box<[u8]> {
        let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        pooled.unwrap_or_else(|| vec![0; crate::proxy::buffered::BUFFER_SIZE].into_boxed_slice())
    }

    pub(super) fn give(buf: Option<Box<[u8]>>) {
        if let Some(buf) = buf {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < crate::proxy::buffered::POOLED_BUFFERS {
                pool.push(buf);
            }
        }
    }
}
