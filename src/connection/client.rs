//! The client's transport ([`Client`]): plain TCP, or TLS over TCP, and the ways of closing it
//! that every phase shares (a shutdown, a reject response first, each under [`CLOSE_DEADLINE`];
//! a reset, [`reset`]).
//!
//! It only carries the stream: reading it, relaying it and deciding when to close it are the
//! phases' business.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::TlsStream;

/// Deadline for saying goodbye to a peer: a reject response, a TLS close_notify, a shutdown.
pub(super) const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Makes closing `tcp` send a reset instead of a FIN (`SO_LINGER` 0; no TLS close_notify
/// either): for a stream cut short, which its peer must not take for a complete one.
pub(super) fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// A client transport: plain TCP, or TLS over TCP (boxed: a session is large, and plain
/// connections should not carry its size).
pub(super) enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Client {
    /// The socket underneath (to reset it).
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(tcp) => tcp,
            Client::Tls(tls) => tls.tcp(),
        }
    }

    /// Shuts our side down: a TLS close_notify first on TLS, then the FIN.
    pub(super) async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, self.shutdown()).await;
    }

    /// Turns a refused client away: `response` (the listener's `reject_response`) if any, then
    /// [`Client::close`].
    pub(super) async fn turn_away(&mut self, response: Option<&[u8]>) {
        if let Some(response) = response {
            let _ = tokio::time::timeout(CLOSE_DEADLINE, self.write_all(response)).await;
        }
        self.close().await;
    }

    /// The stream to write to: the socket, or the TLS session over it.
    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Unpin + Send)> {
        match self {
            Client::Plain(tcp) => Pin::new(tcp),
            Client::Tls(tls) => Pin::new(tls.as_mut()),
        }
    }
}

/// For the refusal paths (a reject response, the shutdown); the relay takes the streams apart.
impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().writer().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().writer().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().writer().poll_shutdown(cx)
    }
}
