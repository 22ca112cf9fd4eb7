//! Byte relay between a client stream and a backend stream, both directions at once.
//!
//! [`relay`] copies until both directions have ended. When one side finishes sending (EOF), the
//! other side's write half is shut down and the opposite direction keeps flowing: half-close is
//! propagated. An I/O error ends the relay at once and says which side failed, so the caller can
//! abort the other side (reset for reset) instead of faking a clean end. Byte counts live in the
//! caller's [`Progress`], so they are right however the relay ends, cancellation included.
//!
//! This module only moves bytes: it does not dial, log or count metrics, and it holds at most one
//! buffer per direction, so a peer that stops reading stops the copy (backpressure), never growth.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of each direction's buffer.
pub const BUFFER_SIZE: usize = 32 * 1024;

/// Bytes moved so far in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Which peer a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// How a relay ended early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{side:?} side failed: {source}")]
    Io { side: Side, source: io::Error },
    #[error("cancelled")]
    Cancelled,
}

/// Copies client <-> backend until both directions have ended, an I/O error occurs, or `stop`
/// completes (then [`RelayError::Cancelled`]).
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    progress: &mut Progress,
    stop: impl Future<Output = ()>,
) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::new();
    let mut down = Direction::new();
    let mut stop = pin!(stop);
    poll_fn(|cx| {
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(RelayError::Cancelled));
        }
        let up_done = match up.poll(cx, &mut *client, &mut *backend, &mut progress.client_to_backend) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.blame(Side::Client, Side::Backend))),
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
        };
        let down_done = match down.poll(cx, &mut *backend, &mut *client, &mut progress.backend_to_client) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.blame(Side::Backend, Side::Client))),
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
        };
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A failure in one direction: reading from its source or writing to its sink.
enum DirectionError {
    Read(io::Error),
    Write(io::Error),
}

impl DirectionError {
    fn blame(self, reader: Side, writer: Side) -> RelayError {
        match self {
            DirectionError::Read(source) => RelayError::Io { side: reader, source },
            DirectionError::Write(source) => RelayError::Io { side: writer, source },
        }
    }
}

/// One direction's state: a buffer of read-but-unwritten bytes and how far the stream has got.
struct Direction {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    unflushed: bool,
    done: bool,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            unflushed: false,
            done: false,
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        moved: &mut u64,
    ) -> Poll<Result<(), DirectionError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.start == self.end && !self.eof {
                let mut read = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(DirectionError::Read(e))),
                    Poll::Pending => {
                        // Nothing more to read for now: make sure what was written is on its way.
                        if self.unflushed {
                            ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(DirectionError::Write)?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))
                    .map_err(DirectionError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(DirectionError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                *moved += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                // Propagate the half-close: flush, then shut down the sink's write side.
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(DirectionError::Write)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_propagates() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut backend, mut backend_far) = tokio::io::duplex(64);
        let relay_task = tokio::spawn(async move {
            let mut progress = Progress::default();
            let result = relay(
                &mut client_far,
                &mut backend_far,
                &mut progress,
                std::future::pending(),
            )
            .await;
            (result.is_ok(), progress)
        });
        client.write_all(b"hello backend").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello backend");
        // The backend still talks after the client's half-close.
        backend.write_all(b"late reply").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"late reply");
        let (ok, progress) = relay_task.await.unwrap();
        assert!(ok);
        assert_eq!(
            progress,
            Progress {
                client_to_backend: 13,
                backend_to_client: 10
            }
        );
    }

    #[tokio::test]
    async fn cancellation_ends_the_relay_and_keeps_the_counts() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (_backend, mut backend_far) = tokio::io::duplex(64);
        client.write_all(b"abc").await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut progress = Progress::default();
            let result = relay(&mut client_far, &mut backend_far, &mut progress, async {
                let _ = rx.await;
            })
            .await;
            (result, progress)
        });
        let mut backend = _backend;
        let mut got = [0u8; 3];
        backend.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        let (result, progress) = task.await.unwrap();
        assert!(matches!(result, Err(RelayError::Cancelled)));
        assert_eq!(progress.client_to_backend, 3);
    }
}
