//! Between two plain TCP sockets: the adaptive direction, and splice(2) through pooled pipes.
//!
//! A [`TcpDirection`] starts with the buffered copy (`buffered.rs`) and turns bulk once a read
//! fills its buffer: it then moves bytes with splice(2) through a pipe, never copying them into
//! user space, until a spliced read is small again. Pipes are pooled and held only while moving,
//! like buffers, and counted against a budget ([`set_pipe_limit`], from `caps::pipe_budget`) so
//! that splicing never takes the descriptors the connection cap counts on; with no pipe to be had,
//! a direction stays with the buffered copy. Elsewhere than Linux there is no splicing at all.
//!
//! The Linux part is the crate's one exception to `unsafe_code = "deny"`: each libc call says why
//! it is sound. This file must not dial, log, count metrics or read the clock.

use std::task::{ready, Context, Poll};

use tokio::net::TcpStream;

use super::buffered::{self, BUFFER_SIZE};
use super::pump::{DirectionError, Flow, Pump};

// The spliced direction and the pipe budget, from this platform's `spliced` (the budget's
// pipes themselves only for the relay's tests).
pub(crate) use spliced::set_pipe_limit;
pub(super) use spliced::Direction;
#[cfg(all(test, target_os = "linux"))]
pub(super) use spliced::{Pipe, Pipes};

/// A spliced read shorter than this is small: it would have fitted in half a buffer.
const SMALL_READ: usize = BUFFER_SIZE / 2;
/// Small spliced reads in a row that send a direction back to the buffered copy: the stream is
/// no longer bulk. One is not enough: with several bulk streams sharing a core, a bulk stream's
/// read often finds less than half a buffer waiting, and going back and forth costs a pipe hand
/// over and a copy each time.
const SMALL_READS_TO_COPY: u8 = 4;

/// One direction between TCP sockets. It starts buffered: a small message costs one read and one
/// write, and a short read tells tokio the socket is drained (no extra read to learn it would
/// block). A read that fills the buffer makes it bulk: splice(2), no copy through user space,
/// until [`SMALL_READS_TO_COPY`] spliced reads in a row are under [`SMALL_READ`]. A switch happens
/// only between reads, with nothing
/// held, so no byte is reordered or lost. Without a pipe it stays buffered for good.
pub(super) enum TcpDirection {
    Small(buffered::Direction),
    Bulk(Direction),
    NoPipe(buffered::Direction),
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
                        *self = TcpDirection::NoPipe(buffered::Direction::default());
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
                        TcpDirection::Small(_) => TcpDirection::Bulk(Direction::default()),
                        _ => TcpDirection::Small(buffered::Direction::default()),
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

/// Zero-copy relay between TCP sockets through a pipe, with splice(2).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // pipe2, fcntl and splice through libc; each call says why it is sound
mod spliced {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard};
    use std::task::{ready, Context, Poll};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use crate::proxy::pump::{half_closed, DirectionError, Flow};

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
    pub(in crate::proxy) struct Pipes {
        live: AtomicUsize,
        limit: AtomicUsize,
        pool: Mutex<Vec<Pipe>>,
    }

    impl Pipes {
        pub(in crate::proxy) const fn new(limit: usize) -> Pipes {
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
        pub(in crate::proxy) fn live(&self) -> usize {
            self.live.load(Ordering::Acquire)
        }

        /// A pooled pipe, or a new one if the budget allows it.
        pub(in crate::proxy) fn take(&'static self) -> io::Result<Pipe> {
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
    pub(in crate::proxy) struct Pipe {
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
    pub(in crate::proxy) struct Direction {
        pipe: Option<Pipe>,
        in_pipe: usize,
        eof: bool,
        done: bool,
        /// Reads under [`super::SMALL_READ`] in a row.
        small: u8,
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
        pub(in crate::proxy) fn within(pipes: &'static Pipes) -> Direction {
            Direction {
                pipe: None,
                in_pipe: 0,
                eof: false,
                done: false,
                small: 0,
                pipes,
            }
        }

        pub(in crate::proxy) fn holds_bytes(&self) -> bool {
            self.in_pipe > 0
        }

        pub(in crate::proxy) fn source_ended(&self) -> bool {
            self.eof || self.done
        }

        /// Splices until the source would block, EOF has been passed on, or the last of
        /// [`super::SMALL_READS_TO_COPY`] small reads in a row has been written out: then
        /// [`Flow::Switch`], the pipe given back.
        pub(in crate::proxy) fn poll(
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
                    if self.small >= crate::proxy::splice::SMALL_READS_TO_COPY {
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
                            self.small = match n < crate::proxy::splice::SMALL_READ {
                                true => self.small.saturating_add(1),
                                false => 0,
                            };
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
                    half_closed(socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write))?;
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
mod spliced {
    use std::task::{Context, Poll};
    use tokio::net::TcpStream;

    /// No pipes here: nothing to limit.
    pub(crate) fn set_pipe_limit(_: usize) {}

    #[derive(Default)]
    pub(in crate::proxy) struct Direction;

    impl Direction {
        pub(in crate::proxy) fn holds_bytes(&self) -> bool {
            false
        }

        pub(in crate::proxy) fn source_ended(&self) -> bool {
            false
        }

        pub(in crate::proxy) fn poll(
            &mut self,
            _: &mut Context<'_>,
            _: &TcpStream,
            _: &TcpStream,
            _: &mut u64,
        ) -> Poll<Result<crate::proxy::pump::Flow, crate::proxy::pump::DirectionError>> {
            Poll::Ready(Err(crate::proxy::pump::DirectionError::NoPipe))
        }
    }
}
