//! The server side of a TLS connection over TCP, on rustls' unbuffered API, so that an idle
//! connection holds no buffer: [`Hello`] reads the ClientHello (rustls' `Acceptor` parses it, for
//! the caller to choose a configuration), then [`TlsStream`] runs the handshake and carries the
//! application data.
//!
//! Buffers are taken only while bytes move, from a process-wide pool as the plain relay's are:
//! received records are read into a buffer taken when the socket is readable and given back once
//! every record in it has been processed and the socket would block; encrypted bytes wait in a
//! buffer given back once written; a record's plaintext is kept only when the reader asked for
//! less. (rustls' buffered connection keeps a 4 KiB receive buffer for the connection's whole
//! life.) What a peer can make this hold is bounded: the largest handshake message rustls accepts
//! plus one record.
//!
//! Ends as tokio-rustls ends them: the peer's close_notify reads as EOF, a FIN without it as
//! `UnexpectedEof`; a rustls error is an `InvalidData` I/O error carrying the `rustls::Error`
//! (its alert sent if the socket takes it at once); shutting down sends close_notify, then the FIN.
//! It must not judge the client (admission does) or keep time (the caller's deadline bounds the
//! handshake, the relay's timeouts the rest).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Accepted, Acceptor, ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, ReadTraffic,
    UnbufferedStatus, WriteTraffic,
};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Room a read needs beyond a record carried over (a read takes all the buffer's room).
const READ_SIZE: usize = 16 * 1024;
/// The most received bytes held unprocessed: the largest handshake message rustls accepts
/// (64 KiB, possibly over several records) and one record more. A peer that sends more without
/// completing a message is refused.
const MAX_INCOMING: usize = 0xffff + 16 * 1024 + 2048;
/// Application bytes encrypted per write (two full records, as the relay's buffer holds); the
/// rest waits for the next write.
const WRITE_SIZE: usize = 32 * 1024;

/// A TLS connection before its ClientHello is complete.
pub struct Hello {
    tcp: TcpStream,
    incoming: Incoming,
    acceptor: Acceptor,
    /// How much of `incoming` the acceptor has been given.
    fed: usize,
}

impl Hello {
    pub fn new(tcp: TcpStream) -> Hello {
        Hello {
            tcp,
            incoming: Incoming::default(),
            acceptor: Acceptor::default(),
            fed: 0,
        }
    }

    /// The socket underneath (to reset it).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Reads until the ClientHello is complete and returns it parsed; the bytes stay here for
    /// the handshake ([`Hello::start`]). A malformed one is refused with its alert.
    pub async fn read(&mut self) -> io::Result<Accepted> {
        loop {
            while self.fed < self.incoming.buf.len() {
                let mut rest = &self.incoming.buf[self.fed..];
                match self.acceptor.read_tls(&mut rest)? {
                    // Takes nothing more until it has parsed what it holds.
                    0 => break,
                    n => self.fed += n,
                }
            }
            match self.acceptor.accept() {
                Ok(Some(accepted)) => return Ok(accepted),
                Ok(None) => {}
                Err((error, mut alert)) => {
                    let mut bytes = Vec::new();
                    let _ = alert.write_all(&mut bytes);
                    let _ = self.tcp.try_write(&bytes);
                    return Err(invalid(error));
                }
            }
            if poll_fn(|cx| self.incoming.poll_fill(&self.tcp, cx)).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
            }
        }
    }

    /// Starts the handshake with `config`, the ClientHello read so far given again to the
    /// connection; `server_name` is the ClientHello's.
    pub fn start(self, config: Arc<ServerConfig>, server_name: Option<String>) -> io::Result<TlsStream> {
        Ok(TlsStream {
            tcp: self.tcp,
            conn: UnbufferedServerConnection::new(config).map_err(invalid)?,
            server_name,
            incoming: self.incoming,
            plaintext: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            peer_closed: false,
            tcp_eof: false,
            sent_close: false,
        })
    }
}

/// A server-side TLS connection over TCP (see the module's documentation).
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    server_name: Option<String>,
    incoming: Incoming,
    /// A record's plaintext that a read had no room for, from `plain_at`.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes not yet written to the socket, from `out_at`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer's close_notify came: reads end.
    peer_closed: bool,
    /// The socket read its FIN.
    tcp_eof: bool,
    /// Our close_notify is queued.
    sent_close: bool,
}

/// What processing the received records came to.
enum Progress {
    /// Application data (copied to the reader, the rest kept).
    Data,
    /// The peer's close_notify.
    PeerClosed,
    /// Nothing more until more bytes arrive.
    NeedData,
}

impl TlsStream {
    /// The socket underneath (to reset it, or look at its state).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The session's state: certificates, version, suite, ALPN, how the handshake went.
    pub fn session(&self) -> &CommonState {
        &self.conn
    }

    /// The server name the client's ClientHello asked for.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Runs the handshake to its end (its last flight written).
    pub async fn handshake(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                self.incoming.pooled = true;
                return Poll::Ready(Ok(()));
            }
            match self.process(&mut ReadBuf::new(&mut [])) {
                Err(error) => return Poll::Ready(Err(self.failed(error))),
                Ok(Progress::Data) => {}
                Ok(Progress::PeerClosed) => return Poll::Ready(Err(handshake_eof())),
                Ok(Progress::NeedData) if !self.conn.is_handshaking() => {}
                Ok(Progress::NeedData) => {
                    ready!(self.poll_send(cx))?;
                    if ready!(self.incoming.poll_fill(&self.tcp, cx))? == 0 {
                        return Poll::Ready(Err(handshake_eof()));
                    }
                }
            }
        }
    }

    /// Processes the received records until one gives application data (copied into `out`,
    /// the rest kept), the peer's close_notify, or a need for more bytes; what rustls has to send
    /// meanwhile is queued in `outgoing`.
    fn process(&mut self, out: &mut ReadBuf<'_>) -> Result<Progress, rustls::Error> {
        let TlsStream {
            conn,
            incoming,
            plaintext,
            outgoing,
            ..
        } = self;
        loop {
            let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming.pending());
            let progress = match state {
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    take_records(&mut traffic, out, plaintext).map(|()| Some(Progress::Data))
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(outgoing, &mut data);
                    Ok(None)
                }
                // Queued in `outgoing`, which is written before anything waits.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Ok(Some(Progress::PeerClosed)),
                Ok(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => {
                    Ok(Some(Progress::NeedData))
                }
                // Early data is never enabled.
                Ok(_) => Err(rustls::Error::General("unexpected early data".into())),
                Err(error) => Err(error),
            };
            incoming.discard(discard);
            match progress {
                Ok(Some(progress)) => return Ok(progress),
                Ok(None) => {}
                Err(error) => {
                    // rustls queued the alert for the error: take it.
                    queue_pending(conn, incoming, outgoing);
                    return Err(error);
                }
            }
        }
    }

    /// Turns a rustls error into the I/O error a caller sees, its alert sent if the socket takes
    /// it at once.
    fn failed(&mut self, error: rustls::Error) -> io::Error {
        let _ = self.tcp.try_write(&self.outgoing[self.out_at..]);
        pool::give(std::mem::take(&mut self.outgoing));
        self.out_at = 0;
        invalid(error)
    }

    /// Writes `outgoing` out, then gives its buffer back.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        pool::give(std::mem::take(&mut self.outgoing));
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Reaches the state where application data may be written, queueing what rustls has to
    /// send first (records already received are processed, their plaintext kept for the reader),
    /// and runs `write` in it.
    fn with_traffic<T>(
        &mut self,
        mut write: impl FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            // The received bytes are given again: rustls may be in the middle of a message in them.
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(self.incoming.pending());
            let done = match state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    Some(write(&mut traffic, &mut self.outgoing))
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, &mut data);
                    None
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                // Seen here first: the reader learns it from the flag.
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let kept = take_records(&mut traffic, &mut ReadBuf::new(&mut []), &mut self.plaintext);
                    kept.err().map(|error| Err(invalid(error)))
                }
                Ok(ConnectionState::Closed) => Some(Err(io::ErrorKind::BrokenPipe.into())),
                Ok(_) => Some(Err(io::ErrorKind::NotConnected.into())),
                Err(error) => Some(Err(invalid(error))),
            };
            self.incoming.discard(discard);
            if let Some(done) = done {
                return done;
            }
        }
    }
}

/// Takes the decrypted records: into `out` while it has room, the rest kept in `plaintext`.
fn take_records(
    traffic: &mut ReadTraffic<'_, '_, ServerConnectionData>,
    out: &mut ReadBuf<'_>,
    plaintext: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    while let Some(record) = traffic.next_record() {
        let record = record?;
        let room = record.payload.len().min(out.remaining());
        out.put_slice(&record.payload[..room]);
        plaintext.extend_from_slice(&record.payload[room..]);
    }
    Ok(())
}

/// Encodes rustls' next handshake or alert record into the end of `outgoing` (a small buffer of
/// its own if it has none: handshake flights are not worth a pooled one).
fn encode(outgoing: &mut Vec<u8>, data: &mut EncodeTlsData<'_, ServerConnectionData>) {
    let start = outgoing.len();
    let mut room = 512;
    loop {
        outgoing.resize(start + room, 0);
        match data.encode(&mut outgoing[start..]) {
            Ok(written) => {
                outgoing.truncate(start + written);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > room =>
            {
                room = required_size;
            }
            Err(_) => {
                outgoing.truncate(start);
                return;
            }
        }
    }
}

/// Encrypts `data` into the end of `outgoing`.
fn encrypt(
    outgoing: &mut Vec<u8>,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
    len: usize,
) -> io::Result<()> {
    pool::fill(outgoing);
    let start = outgoing.len();
    // A record's header, content type and tag fit in 64 bytes.
    let mut room = len + (len / (16 * 1024) + 1) * 64;
    loop {
        outgoing.resize(start + room, 0);
        match encrypt(&mut outgoing[start..]) {
            Ok(written) => {
                outgoing.truncate(start + written);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > room =>
            {
                room = required_size;
            }
            Err(error) => {
                outgoing.truncate(start);
                return Err(io::Error::other(error.to_string()));
            }
        }
    }
}

/// Takes what rustls queued to send (an alert after an error) into `outgoing`.
fn queue_pending(conn: &mut UnbufferedServerConnection, incoming: &mut Incoming, outgoing: &mut Vec<u8>) {
    // Each pass handles one state; rustls has at most a few messages queued.
    for _ in 0..8 {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming.pending());
        let more = match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(outgoing, &mut data);
                true
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                true
            }
            _ => false,
        };
        incoming.discard(discard);
        if !more {
            return;
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_at < this.plaintext.len() {
            let room = (this.plaintext.len() - this.plain_at).min(buf.remaining());
            buf.put_slice(&this.plaintext[this.plain_at..this.plain_at + room]);
            this.plain_at += room;
            if this.plain_at == this.plaintext.len() {
                this.plaintext = Vec::new();
                this.plain_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        loop {
            // Data already given ends the read (an end or an error shows at the next one).
            let given = buf.filled().len() > before;
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // What rustls answered meanwhile (a key update) goes out as we read.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            match this.process(buf) {
                Err(error) => return Poll::Ready(Err(this.failed(error))),
                // Records already received fill the rest of the read.
                Ok(Progress::Data) if buf.remaining() > 0 && this.plaintext.is_empty() => {}
                Ok(Progress::Data) => return Poll::Ready(Ok(())),
                Ok(Progress::PeerClosed) => this.peer_closed = true,
                Ok(Progress::NeedData) if given => return Poll::Ready(Ok(())),
                Ok(Progress::NeedData) => {
                    if this.tcp_eof {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                    if ready!(this.incoming.poll_fill(&this.tcp, cx))? == 0 {
                        this.tcp_eof = true;
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // At most one write's records wait: a peer that stops reading stops the writer.
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(WRITE_SIZE)];
        this.with_traffic(|traffic, outgoing| {
            encrypt(outgoing, |room| traffic.encrypt(data, room), data.len())
        })?;
        // On its way now; what the socket does not take goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.sent_close {
            this.sent_close = true;
            let queued = this.with_traffic(|traffic, outgoing| {
                encrypt(outgoing, |room| traffic.queue_close_notify(room), 0)
            });
            // Closed already (both close_notify sent): nothing more to say.
            if let Err(e) = queued {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    return Poll::Ready(Err(e));
                }
            }
        }
        ready!(this.poll_send(cx))?;
        match ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            done => Poll::Ready(done),
        }
    }
}

/// Received bytes not yet processed (`buf[start..]`), in a buffer held only while there are
/// some or a read is under way.
#[derive(Default)]
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    /// Buffers come from the pool: the handshake is over. A handshake's reads get a small buffer
    /// of their own, freed after it, so that many handshakes at once do not fill the pool.
    pooled: bool,
}

impl Incoming {
    /// The bytes not yet processed.
    fn pending(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    /// Reads what the socket has (0: its FIN). Waiting with nothing held gives the buffer back.
    fn poll_fill(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            if self.buf.len() - self.start >= MAX_INCOMING {
                return Poll::Ready(Err(invalid(rustls::Error::General(
                    "TLS message too large".into(),
                ))));
            }
            if tcp.poll_read_ready(cx).is_pending() {
                if self.start == self.buf.len() {
                    pool::give(std::mem::take(&mut self.buf));
                    self.start = 0;
                }
                return Poll::Pending;
            }
            // A record begun stays at the front; the read takes the rest of the room.
            self.buf.drain(..self.start);
            self.start = 0;
            if self.pooled {
                pool::fill(&mut self.buf);
            }
            self.buf.reserve(READ_SIZE);
            match tcp.try_read_buf(&mut self.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // Readiness cleared: the next pass waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Drops the first `n` pending bytes (processed).
    fn discard(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }
}

/// Buffers of the streams while bytes move, process-wide, so that a busy connection does not go
/// to the allocator (which may hand the memory back to the kernel and fault it in again) for
/// every burst.
mod pool {
    use std::sync::Mutex;

    /// A buffer's capacity: a read's room beside a record carried over, or a write's records.
    const CAPACITY: usize = 64 * 1024;
    /// Idle buffers kept; more are freed.
    const POOLED: usize = 256;

    static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// Gives `buf` a pooled buffer if it has none.
    pub(super) fn fill(buf: &mut Vec<u8>) {
        if buf.capacity() == 0 {
            let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
            *buf = pooled.unwrap_or_else(|| Vec::with_capacity(CAPACITY));
        }
    }

    /// Takes `buf` back (one grown past twice the size, by a large handshake, is freed).
    pub(super) fn give(mut buf: Vec<u8>) {
        if (CAPACITY..=2 * CAPACITY).contains(&buf.capacity()) {
            buf.clear();
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOLED {
                pool.push(buf);
            }
        }
    }
}

/// A rustls error as the I/O error tokio-rustls would give (see `tls::classify_io`).
fn invalid(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

fn handshake_eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")
}

#[cfg(test)]
mod tests;
