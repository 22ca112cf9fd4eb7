//! Byte relay between a client stream and a backend stream, both directions at once.
//!
//! [`relay`] copies until both directions have ended. When one side finishes sending (EOF), the
//! other side's write half is shut down and the opposite direction keeps flowing: half-close is
//! propagated. An I/O error ends the relay at once and says which side failed, so the caller can
//! abort the other side (reset for reset) instead of faking a clean end. Byte counts live in the
//! caller's [`Progress`], so they are right however the relay ends, cancellation included.
//!
//! Memory: a direction holds a buffer only while bytes are moving. Buffers come from a small
//! process-wide pool when a read may return data and go back as soon as a read would block, so an
//! idle connection holds none. Between two plain TCP sockets on Linux, [`relay_tcp`] is adaptive
//! per direction: small messages take one read into a buffer and one write (fewest syscalls), and
//! once a read fills the whole buffer the direction is bulk and moves bytes with splice(2) through
//! a pipe (also pooled, also held only while moving) without copying them into user space, until
//! four reads in a row are small. If no pipe can be had (e.g. out of descriptors) that direction stays with
//! the buffered copy.
//!
//! This module only moves bytes: it does not dial, log or count metrics (it tells a [`Meter`] what
//! moved, and when the meter's checkpoint is due), and it holds at most one buffer or pipe per
//! direction, so a peer that stops reading stops the copy (backpressure).
//!
//! # Files
//! - this file: the relay's API ([`relay`], [`relay_tcp`], [`Meter`], [`Progress`], [`Timeouts`],
//!   the errors), the loop that drives both directions, and the relay's one timer;
//! - `buffered`: a direction that copies through a pooled buffer (any stream), and the pool;
//! - `splice`: a direction between two TCP sockets, buffered or spliced as its traffic suits,
//!   and the splice(2) machinery with its pipe budget (the crate's one `unsafe`).

mod buffered;
mod pump;
mod splice;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use buffered::Direction;
use pump::{DirectionError, Pump};
use splice::TcpDirection;

pub use buffered::BUFFER_SIZE;
pub(crate) use splice::set_pipe_limit;

/// Bytes moved so far in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Where a relay keeps its byte counts, and whom it tells as they grow: the caller's metrics
/// (bytes counted while they move, not only at the end) and its checkpoints (interim log entries
/// of long connections). [`Progress`] alone is a meter that only counts.
pub trait Meter {
    /// The totals so far; the relay adds to them.
    fn progress(&mut self) -> &mut Progress;

    /// Bytes moved at one poll, client to backend (`up`) and back (`down`); called only when
    /// some did.
    fn moved(&mut self, _up: u64, _down: u64) {}

    /// Bytes moved at one poll to a peer that had already sent its FIN (counted in
    /// [`Meter::progress`], not in [`Meter::moved`]): a peer that has closed may refuse them with
    /// a reset, so whether they were delivered is known only when the stream has ended.
    fn late(&mut self, _up: u64, _down: u64) {}

    /// The next instant [`Meter::checkpoint`] is due, if any. The relay's one timer covers it.
    fn next_checkpoint(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Called once the instant of [`Meter::next_checkpoint`] has passed; it should move on.
    fn checkpoint(&mut self) {}
}

impl Meter for Progress {
    fn progress(&mut self) -> &mut Progress {
        self
    }
}

/// Which peer a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// How a relay ended early. A cut (`Cancelled`, `TimedOut`) says whether bytes were in flight
/// in the relay then (read from one side and not yet written to the other), so that the caller
/// ends such a stream with a reset rather than a FIN that would pass it off as complete.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{side:?} side failed: {source}")]
    Io { side: Side, source: io::Error },
    #[error("cancelled")]
    Cancelled { in_flight: bool },
    #[error("{timeout:?} timeout")]
    TimedOut { timeout: Timeout, in_flight: bool },
}

/// Which of [`Timeouts`] ended a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// No byte either way for `idle`.
    Idle,
    /// After one direction ended, no byte for `half_closed`.
    HalfClosed,
    /// `deadline` passed.
    Lifetime,
}

/// When a relay gives up on a connection that has gone quiet or old.
///
/// Cheap by construction: the relay notes the time only when it moved bytes, and keeps one
/// timer that it re-arms lazily. When the timer fires early (bytes moved since it was set), it
/// is set once to the new deadline, so a busy connection re-arms at most once per `idle`
/// period, never per read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// No byte in either direction for this long ends the relay.
    pub idle: Option<Duration>,
    /// Once one direction has ended, the other may stay silent at most this long.
    pub half_closed: Option<Duration>,
    /// The relay ends at this instant, whatever moves.
    pub deadline: Option<tokio::time::Instant>,
}

impl Timeouts {
    /// The next instant a timeout is due, and which, for a relay last active at `last`.
    fn due(&self, last: tokio::time::Instant, half_closed: bool) -> Option<(tokio::time::Instant, Timeout)> {
        let quiet = match (half_closed, self.half_closed) {
            (true, Some(half)) if self.idle.is_none_or(|idle| half < idle) => {
                Some((half, Timeout::HalfClosed))
            }
            _ => self.idle.map(|idle| (idle, Timeout::Idle)),
        };
        let quiet = quiet.map(|(d, which)| (crate::clock::later(last, d), which));
        match (quiet, self.deadline) {
            (Some((at, which)), Some(end)) if at < end => Some((at, which)),
            (_, Some(end)) => Some((end, Timeout::Lifetime)),
            (quiet, None) => quiet,
        }
    }
}

/// Copies client <-> backend until both directions have ended, an I/O error occurs, `stop`
/// completes (then [`RelayError::Cancelled`]) or one of `timeouts` is due
/// ([`RelayError::TimedOut`]).
pub fn relay<'a, C, B>(
    client: &'a mut C,
    backend: &'a mut B,
    progress: &'a mut impl Meter,
    stop: impl Future<Output = ()> + 'a,
    timeouts: Timeouts,
) -> impl Future<Output = Result<(), RelayError>> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Not an `async fn`: its future would keep a copy of `stop` beside the boxed one.
    drive(
        client,
        backend,
        progress,
        stop,
        timeouts,
        Direction::default(),
        Direction::default(),
    )
}

/// [`relay`] for two plain TCP sockets: each direction starts with the buffered copy, splices
/// (on Linux) once a read fills its buffer, and copies again after four small reads in a row.
pub fn relay_tcp<'a>(
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    progress: &'a mut impl Meter,
    stop: impl Future<Output = ()> + 'a,
    timeouts: Timeouts,
) -> impl Future<Output = Result<(), RelayError>> + 'a {
    let up = TcpDirection::Small(Direction::default());
    let down = TcpDirection::Small(Direction::default());
    drive(client, backend, progress, stop, timeouts, up, down)
}

/// Polls both directions until both are done, one fails (blamed on its side), `stop` fires or a
/// timeout is due.
fn drive<'a, C, B>(
    client: &'a mut C,
    backend: &'a mut B,
    meter: &'a mut impl Meter,
    stop: impl Future<Output = ()> + 'a,
    timeouts: Timeouts,
    mut up: impl Pump<C, B> + 'a,
    mut down: impl Pump<B, C> + 'a,
) -> impl Future<Output = Result<(), RelayError>> + 'a {
    let mut stop = Box::pin(stop);
    let mut clock = Clock::default();
    poll_fn(move |cx| {
        if stop.as_mut().poll(cx).is_ready() {
            let in_flight = up.holds_bytes() || down.holds_bytes();
            return Poll::Ready(Err(RelayError::Cancelled { in_flight }));
        }
        // A sink whose peer has sent FIN may refuse what is written to it now.
        let (backend_ended, client_ended) = (down.source_ended(), up.source_ended());
        let before = *meter.progress();
        let up_done = up.poll(
            cx,
            &mut *client,
            &mut *backend,
            &mut meter.progress().client_to_backend,
        );
        let down_done = match up_done {
            Poll::Ready(Err(_)) => Poll::Pending,
            _ => down.poll(
                cx,
                &mut *backend,
                &mut *client,
                &mut meter.progress().backend_to_client,
            ),
        };
        let after = *meter.progress();
        let (went_up, went_down) = (
            after.client_to_backend - before.client_to_backend,
            after.backend_to_client - before.backend_to_client,
        );
        let moved = went_up + went_down > 0;
        if moved {
            let late_up = if backend_ended { went_up } else { 0 };
            let late_down = if client_ended { went_down } else { 0 };
            if went_up + went_down > late_up + late_down {
                meter.moved(went_up - late_up, went_down - late_down);
            }
            if late_up + late_down > 0 {
                meter.late(late_up, late_down);
            }
        }
        let up_done = match up_done {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(blame(e, Side::Client, Side::Backend))),
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
        };
        let down_done = match down_done {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(blame(e, Side::Backend, Side::Client))),
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
        };
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        let mut moved = moved;
        loop {
            match clock.poll(
                cx,
                &timeouts,
                moved,
                up_done || down_done,
                meter.next_checkpoint(),
            ) {
                Poll::Ready(Wake::Checkpoint) => meter.checkpoint(),
                Poll::Ready(Wake::TimedOut(timeout)) => {
                    let in_flight = up.holds_bytes() || down.holds_bytes();
                    return Poll::Ready(Err(RelayError::TimedOut { timeout, in_flight }));
                }
                Poll::Pending => return Poll::Pending,
            }
            moved = false;
        }
    })
}

/// Why a relay's clock woke it.
enum Wake {
    TimedOut(Timeout),
    /// The meter's checkpoint is due.
    Checkpoint,
}

/// A relay's sense of time: when it last moved bytes, and its one timer.
#[derive(Default)]
struct Clock {
    /// When bytes last moved or a direction ended (`None`: not since the relay started).
    last: Option<tokio::time::Instant>,
    half_closed: bool,
    /// Set at the first poll that needs it; re-armed lazily (see [`Timeouts`]).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Clock {
    /// Notes activity, and completes with the timeout that is due, if one is. Cheap on the busy
    /// path: a poll that moved bytes reads the clock once and never touches the timer (whose
    /// waker, registered at an earlier poll, stays valid for this task); the timer is looked at
    /// only when it may have fired, and re-armed only then.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        timeouts: &Timeouts,
        moved: bool,
        half_closed: bool,
        checkpoint: Option<tokio::time::Instant>,
    ) -> Poll<Wake> {
        if moved || half_closed != self.half_closed || self.last.is_none() {
            let now = tokio::time::Instant::now();
            self.last = Some(now);
            self.half_closed = half_closed;
            if timeouts.deadline.is_some_and(|end| now >= end) {
                return Poll::Ready(Wake::TimedOut(Timeout::Lifetime));
            }
        }
        let Some(last) = self.last else {
            return Poll::Pending;
        };
        let (at, wake) = match (timeouts.due(last, half_closed), checkpoint) {
            (Some((at, which)), Some(check)) if at <= check => (at, Wake::TimedOut(which)),
            (_, Some(check)) => (check, Wake::Checkpoint),
            (Some((at, which)), None) => (at, Wake::TimedOut(which)),
            (None, None) => return Poll::Pending,
        };
        let timer = match &mut self.timer {
            Some(timer) if !timer.is_elapsed() && timer.deadline() <= at => return Poll::Pending,
            Some(timer) => timer,
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        if timer.deadline() > at {
            // Due earlier than armed (the relay just half-closed).
            timer.as_mut().reset(at);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if tokio::time::Instant::now() >= at {
                return Poll::Ready(wake);
            }
            // Fired for an older deadline: bytes moved since. Once more, to the current one.
            timer.as_mut().reset(at);
        }
        Poll::Pending
    }
}

/// The relay's error for a failed direction: a failed read is the reader's side's, a failed
/// write the writer's.
fn blame(e: DirectionError, reader: Side, writer: Side) -> RelayError {
    match e {
        DirectionError::Read(source) => RelayError::Io { side: reader, source },
        DirectionError::Write(source) => RelayError::Io { side: writer, source },
        DirectionError::NoPipe => RelayError::Io {
            side: reader,
            source: io::Error::other("no pipe for splicing"),
        },
    }
}

#[cfg(test)]
mod tests;
