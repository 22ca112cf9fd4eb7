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
//! a pipe (also pooled, also held only while moving) without copying them into user space, until a
//! read is small again. If no pipe can be had (e.g. out of descriptors) that direction stays with
//! the buffered copy.
//!
//! This module only moves bytes: it does not dial, log or count metrics (it tells a [`Meter`] what
//! moved, and when the meter's checkpoint is due), and it holds at most one buffer or pipe per
//! direction, so a peer that stops reading stops the copy (backpressure).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Size of each direction's buffer while it is moving bytes.
pub const BUFFER_SIZE: usize = 32 * 1024;
/// Idle buffers kept for reuse, process-wide; more are freed.
const POOLED_BUFFERS: usize = 256;
/// A spliced read shorter than this sends its direction back to the buffered copy: it would have
/// fitted in half a buffer, so the stream is not (or no longer) bulk.
const SMALL_READ: usize = BUFFER_SIZE / 2;

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
/// (on Linux) once a read fills its buffer, and copies again after a small read.
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

/// Moves bytes one way, from `R` to `W`: buffered for any stream, spliced between TCP sockets.
trait Pump<R, W> {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        moved: &mut u64,
    ) -> Poll<Result<(), DirectionError>>;

    /// Whether bytes read from the source wait to be written to the sink.
    fn holds_bytes(&self) -> bool;

    /// Whether the source has sent its FIN.
    fn source_ended(&self) -> bool;
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
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.blame(Side::Client, Side::Backend))),
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
        };
        let down_done = match down_done {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.blame(Side::Backend, Side::Client))),
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

/// One direction between TCP sockets. It starts buffered: a small message costs one read and one
/// write, and a short read tells tokio the socket is drained (no extra read to learn it would
/// block). A read that fills the buffer makes it bulk: splice(2), no copy through user space,
/// until a spliced read is under [`SMALL_READ`]. A switch happens only between reads, with nothing
/// held, so no byte is reordered or lost. Without a pipe it stays buffered for good.
enum TcpDirection {
    Small(Direction),
    Bulk(splice::Direction),
    NoPipe(Direction),
}

impl Pump<TcpStream, TcpStream> for TcpDirection {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        moved: &mut u64,
    ) -> Poll<Result<(), DirectionError>> {
        loop {
            let flow = match self {
                TcpDirection::Small(direction) => ready!(direction.step(cx, src, dst, moved, true)),
                TcpDirection::Bulk(direction) => match ready!(direction.poll(cx, src, dst, moved)) {
                    Err(DirectionError::NoPipe) => {
                        *self = TcpDirection::NoPipe(Direction::default());
                        continue;
                    }
                    other => other,
                },
                TcpDirection::NoPipe(direction) => ready!(direction.step(cx, src, dst, moved, false)),
            };
            match flow? {
                Flow::Done => return Poll::Ready(Ok(())),
                Flow::Switch => {
                    *self = match self {
                        TcpDirection::Small(_) => TcpDirection::Bulk(splice::Direction::default()),
                        _ => TcpDirection::Small(Direction::default()),
                    }
                }
            }
        }
    }

    fn holds_bytes(&self) -> bool {
        match self {
            TcpDirection::Small(d) | TcpDirection::NoPipe(d) => d.holds_bytes(),
            TcpDirection::Bulk(d) => d.holds_bytes(),
        }
    }

    fn source_ended(&self) -> bool {
        match self {
            TcpDirection::Small(d) | TcpDirection::NoPipe(d) => d.source_ended(),
            TcpDirection::Bulk(d) => d.source_ended(),
        }
    }
}

/// How a direction's poll ended when it did not wait.
enum Flow {
    /// EOF was passed on: this direction is finished.
    Done,
    /// Everything read has been written and the last read says the other way of moving bytes
    /// suits this stream better (buffered <-> spliced).
    Switch,
}

/// A failure in one direction: reading from its source or writing to its sink.
enum DirectionError {
    Read(io::Error),
    Write(io::Error),
    /// No pipe could be made for splicing (nothing was moved): use the buffered copy instead.
    NoPipe,
}

impl DirectionError {
    fn blame(self, reader: Side, writer: Side) -> RelayError {
        match self {
            DirectionError::Read(source) => RelayError::Io { side: reader, source },
            DirectionError::Write(source) => RelayError::Io { side: writer, source },
            DirectionError::NoPipe => RelayError::Io {
                side: reader,
                source: io::Error::other("no pipe for splicing"),
            },
        }
    }
}

/// One direction's state: a buffer of read-but-unwritten bytes (held only while bytes are
/// moving) and how far the stream has got.
#[derive(Default)]
struct Direction {
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
    fn holds_bytes(&self) -> bool {
        self.start < self.end
    }

    fn source_ended(&self) -> bool {
        self.eof || self.done
    }

    /// Copies until the reader would block, EOF has been passed on, or (with `switch`) a read that
    /// filled the buffer has been written out: then [`Flow::Switch`], holding no buffer.
    fn step<R, W>(
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

/// The result of shutting down a sink's write side. `ENOTCONN` before our own FIN means the
/// peer reset the connection: a write error like `EPIPE`, passed on as a reset, never a clean
/// end.
fn half_closed(result: io::Result<()>) -> Result<(), DirectionError> {
    result.map_err(DirectionError::Write)
}

/// The process-wide pool of relay buffers.
mod buffers {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

    pub(super) fn take() -> Box<[u8]> {
        let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        pooled.unwrap_or_else(|| vec![0; super::BUFFER_SIZE].into_boxed_slice())
    }

    pub(super) fn give(buf: Option<Box<[u8]>>) {
        if let Some(buf) = buf {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < super::POOLED_BUFFERS {
                pool.push(buf);
            }
        }
    }
}

/// Zero-copy relay between TCP sockets through a pipe, with splice(2).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // pipe2, fcntl and splice through libc; each call says why it is sound
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard};
    use std::task::{ready, Context, Poll};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{DirectionError, Flow};

    /// Bytes asked of one splice call; the pipe is sized to hold them.
    const CHUNK: usize = 256 * 1024;
    /// Idle pipes kept for reuse, process-wide (each costs two descriptors).
    const POOLED_PIPES: usize = 64;

    /// Every direction's pipes. Unlimited until a server sets the limit from its descriptor
    /// budget ([`set_pipe_limit`], `caps::pipe_budget`).
    static PIPES: Pipes = Pipes::new(usize::MAX);

    /// Sets how many pipes may be alive at once, held or pooled (on start and every reload).
    /// Pooled pipes over a lower limit are closed at once, held ones when they are given back.
    pub(crate) fn set_pipe_limit(limit: usize) {
        PIPES.set_limit(limit);
    }

    /// Pipes under a budget: every pipe alive (held by a direction or idle in the pool) is
    /// counted, and none is made past the limit, so splicing never takes the descriptors that
    /// the connection cap counts on. Past it, [`Pipes::take`] fails and the direction falls back
    /// to the buffered copy.
    pub(super) struct Pipes {
        live: AtomicUsize,
        limit: AtomicUsize,
        pool: Mutex<Vec<Pipe>>,
    }

    impl Pipes {
        pub(super) const fn new(limit: usize) -> Pipes {
            Pipes {
                live: AtomicUsize::new(0),
                limit: AtomicUsize::new(limit),
                pool: Mutex::new(Vec::new()),
            }
        }

        fn set_limit(&self, limit: usize) {
            self.limit.store(limit, Ordering::Release);
            let mut pool = self.lock();
            while self.live.load(Ordering::Acquire) > limit && pool.pop().is_some() {}
        }

        /// Pipes alive now: held and pooled.
        pub(super) fn live(&self) -> usize {
            self.live.load(Ordering::Acquire)
        }

        /// A pooled pipe, or a new one if the budget allows it.
        pub(super) fn take(&'static self) -> io::Result<Pipe> {
            if let Some(pipe) = self.lock().pop() {
                return Ok(pipe);
            }
            let limit = self.limit.load(Ordering::Acquire);
            let counted = self.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
            if counted.is_err() {
                return Err(io::Error::other(format!(
                    "the pipe budget ({limit} pipes) is spent"
                )));
            }
            Pipe::new(self).inspect_err(|_| {
                self.live.fetch_sub(1, Ordering::AcqRel);
            })
        }

        fn lock(&self) -> MutexGuard<'_, Vec<Pipe>> {
            // Pushes and pops only; nothing panics while the lock is held.
            self.pool.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    /// A pipe: bytes spliced in from the source wait here until spliced out to the sink. It
    /// counts against the budget it was made under until it is closed (dropped).
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        pipes: &'static Pipes,
    }

    impl Pipe {
        /// A new pipe, already counted in `pipes`.
        fn new(pipes: &'static Pipes) -> io::Result<Pipe> {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` is a valid, writable array of two descriptors, as pipe2 requires.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
            let pipe = unsafe {
                Pipe {
                    read: OwnedFd::from_raw_fd(fds[0]),
                    write: OwnedFd::from_raw_fd(fds[1]),
                    pipes,
                }
            };
            // A larger pipe moves more per call; the default size still works if this fails.
            // SAFETY: fcntl on a descriptor we own, with an integer argument.
            unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
            Ok(pipe)
        }

        /// Returns an empty pipe to the pool (a pipe holding bytes must be dropped instead);
        /// closes it if the pool is full or the budget was lowered under what is alive.
        fn give(self) {
            let pipes = self.pipes;
            let mut pool = pipes.lock();
            if pool.len() < POOLED_PIPES && pipes.live() <= pipes.limit.load(Ordering::Acquire) {
                pool.push(self);
            }
        }
    }

    impl Drop for Pipe {
        fn drop(&mut self) {
            self.pipes.live.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain descriptors and null offsets (both ends are a socket or a pipe).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// One spliced direction: the pipe (held only while it has bytes or a read is under way).
    pub(super) struct Direction {
        pipe: Option<Pipe>,
        in_pipe: usize,
        eof: bool,
        done: bool,
        /// The last read was under [`super::SMALL_READ`].
        small: bool,
        /// Where its pipe comes from.
        pipes: &'static Pipes,
    }

    impl Default for Direction {
        fn default() -> Direction {
            Direction::within(&PIPES)
        }
    }

    impl Direction {
        /// A direction taking its pipe from `pipes`.
        pub(super) fn within(pipes: &'static Pipes) -> Direction {
            Direction {
                pipe: None,
                in_pipe: 0,
                eof: false,
                done: false,
                small: false,
                pipes,
            }
        }

        pub(super) fn holds_bytes(&self) -> bool {
            self.in_pipe > 0
        }

        pub(super) fn source_ended(&self) -> bool {
            self.eof || self.done
        }

        /// Splices until the source would block, EOF has been passed on, or a small read has
        /// been written out: then [`Flow::Switch`], the pipe given back.
        pub(super) fn poll(
            &mut self,
            cx: &mut Context<'_>,
            src: &TcpStream,
            dst: &TcpStream,
            moved: &mut u64,
        ) -> Poll<Result<Flow, DirectionError>> {
            if self.done {
                return Poll::Ready(Ok(Flow::Done));
            }
            loop {
                if self.in_pipe == 0 && !self.eof {
                    if self.small {
                        if let Some(pipe) = self.pipe.take() {
                            pipe.give();
                        }
                        return Poll::Ready(Ok(Flow::Switch));
                    }
                    if src
                        .poll_read_ready(cx)
                        .map_err(DirectionError::Read)?
                        .is_pending()
                    {
                        // Idle: the pipe is empty, give it back until bytes arrive.
                        if let Some(pipe) = self.pipe.take() {
                            pipe.give();
                        }
                        return Poll::Pending;
                    }
                    let pipe = match &self.pipe {
                        Some(pipe) => pipe,
                        None => match self.pipes.take() {
                            Ok(pipe) => self.pipe.insert(pipe),
                            Err(_) => return Poll::Ready(Err(DirectionError::NoPipe)),
                        },
                    };
                    let (from, to) = (src.as_raw_fd(), pipe.write.as_raw_fd());
                    match src.try_io(Interest::READABLE, || splice(from, to, CHUNK)) {
                        Ok(0) => self.eof = true,
                        Ok(n) => {
                            self.in_pipe = n;
                            self.small = n < super::SMALL_READ;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(DirectionError::Read(e))),
                    }
                }
                while self.in_pipe > 0 {
                    let Some(pipe) = &self.pipe else {
                        return Poll::Ready(Err(DirectionError::NoPipe)); // bytes are only ever in a held pipe
                    };
                    ready!(dst.poll_write_ready(cx)).map_err(DirectionError::Write)?;
                    let (from, to) = (pipe.read.as_raw_fd(), dst.as_raw_fd());
                    match dst.try_io(Interest::WRITABLE, || splice(from, to, self.in_pipe)) {
                        Ok(0) => {
                            return Poll::Ready(Err(DirectionError::Write(io::ErrorKind::WriteZero.into())))
                        }
                        Ok(n) => {
                            self.in_pipe -= n;
                            *moved += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(DirectionError::Write(e))),
                    }
                }
                if self.eof {
                    if let Some(pipe) = self.pipe.take() {
                        pipe.give();
                    }
                    // Propagate the half-close.
                    super::half_closed(socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write))?;
                    self.done = true;
                    return Poll::Ready(Ok(Flow::Done));
                }
            }
        }
    }

    impl Drop for Direction {
        fn drop(&mut self) {
            // A pipe still holding bytes is closed, never reused.
            if self.in_pipe == 0 {
                if let Some(pipe) = self.pipe.take() {
                    pipe.give();
                }
            }
        }
    }
}

/// Elsewhere, "splicing" is never possible and every direction uses the buffered copy.
#[cfg(not(target_os = "linux"))]
mod splice {
    use std::task::{Context, Poll};
    use tokio::net::TcpStream;

    /// No pipes here: nothing to limit.
    pub(crate) fn set_pipe_limit(_: usize) {}

    #[derive(Default)]
    pub(super) struct Direction;

    impl Direction {
        pub(super) fn holds_bytes(&self) -> bool {
            false
        }

        pub(super) fn source_ended(&self) -> bool {
            false
        }

        pub(super) fn poll(
            &mut self,
            _: &mut Context<'_>,
            _: &TcpStream,
            _: &TcpStream,
            _: &mut u64,
        ) -> Poll<Result<super::Flow, super::DirectionError>> {
            Poll::Ready(Err(super::DirectionError::NoPipe))
        }
    }
}

pub(crate) use splice::set_pipe_limit;

#[cfg(test)]
mod tests;
