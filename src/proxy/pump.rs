//! What one direction of a relay is to the drive loop: the [`Pump`] trait, how a poll ended
//! ([`Flow`]) and how it failed ([`DirectionError`]). Shared by the buffered and the spliced
//! directions; it must not move bytes itself.

use std::io;
use std::task::{Context, Poll};

/// Moves bytes one way, from `R` to `W`: buffered for any stream, spliced between TCP sockets.
pub(super) trait Pump<R, W> {
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

/// How a direction's poll ended when it did not wait.
pub(super) enum Flow {
    /// EOF was passed on: this direction is finished.
    Done,
    /// Everything read has been written and the last read says the other way of moving bytes
    /// suits this stream better (buffered <-> spliced).
    Switch,
}

/// A failure in one direction: reading from its source or writing to its sink.
pub(super) enum DirectionError {
    Read(io::Error),
    Write(io::Error),
    /// No pipe could be made for splicing (nothing was moved): use the buffered copy instead.
    NoPipe,
}

/// The result of shutting down a sink's write side. `ENOTCONN` before our own FIN means the
/// peer reset the connection: a write error like `EPIPE`, passed on as a reset, never a clean
/// end.
pub(super) fn half_closed(result: io::Result<()>) -> Result<(), DirectionError> {
    result.map_err(DirectionError::Write)
}
