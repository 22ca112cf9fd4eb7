//! Backends for fulcrum to dial: the one echo backend [`TestBackend`] (with a few misbehaviours),
//! a [`BlackHole`] whose connects hang, and addresses where nothing listens.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fulcrum::CancellationToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What a [`TestBackend`] does with each accepted connection.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Send every byte back; half-close when the client does.
    Echo,
    /// Send this banner first, then echo.
    BannerThenEcho(Vec<u8>),
    /// Read one chunk, then reset the connection (SO_LINGER 0, then close).
    ResetAfterFirstRead,
    /// Read and discard everything, never write, keep the connection open after the client's
    /// end of stream.
    Silent,
}

/// A backend on 127.0.0.1 that counts the connections it accepted. Dropping it closes its
/// listener and every connection it accepted.
pub struct TestBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Stops the accept loop (and with it the listener).
    listening: CancellationToken,
    /// Ends the accepted connections.
    connections: CancellationToken,
    accept: Option<JoinHandle<()>>,
}

impl TestBackend {
    pub async fn start(behavior: Behavior) -> TestBackend {
        TestBackend::start_at("127.0.0.1:0".parse().expect("address"), behavior).await
    }

    /// A backend on `addr` (port 0: any), e.g. back on the address of one that was stopped
    /// (tokio sets SO_REUSEADDR, so a port in TIME_WAIT can be bound again).
    pub async fn start_at(addr: SocketAddr, behavior: Behavior) -> TestBackend {
        let listener = TcpListener::bind(addr).await.expect("bind test backend");
        let addr = listener.local_addr().expect("test backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let listening = CancellationToken::new();
        let connections = CancellationToken::new();
        let accept = tokio::spawn(accept_loop(
            listener,
            behavior,
            Arc::clone(&accepted),
            listening.clone(),
            connections.clone(),
        ));
        TestBackend {
            addr,
            accepted,
            listening,
            connections,
            accept: Some(accept),
        }
    }

    pub async fn echo() -> TestBackend {
        TestBackend::start(Behavior::Echo).await
    }

    pub async fn banner(banner: &[u8]) -> TestBackend {
        TestBackend::start(Behavior::BannerThenEcho(banner.to_vec())).await
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket and waits until it is closed (new connects are refused);
    /// the connections already accepted keep being served. Returns the address, to start a
    /// backend there again.
    pub async fn stop_listening(mut self) -> SocketAddr {
        self.listening.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        // Detach the accepted connections: they end with their peers, not with this value.
        self.connections = CancellationToken::new();
        self.addr
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.listening.cancel();
        self.connections.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    behavior: Behavior,
    accepted: Arc<AtomicUsize>,
    listening: CancellationToken,
    connections: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = listening.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let behavior = behavior.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connections.cancelled() => {}
                _ = serve(stream, behavior) => {}
            }
        });
    }
}

async fn serve(stream: TcpStream, behavior: Behavior) -> io::Result<()> {
    match behavior {
        Behavior::Echo => echo(stream, &[]).await,
        Behavior::BannerThenEcho(banner) => echo(stream, &banner).await,
        Behavior::ResetAfterFirstRead => {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await?;
            reset(stream);
            Ok(())
        }
        Behavior::Silent => {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            while stream.read(&mut buf).await? > 0 {}
            std::future::pending().await
        }
    }
}

async fn echo(stream: TcpStream, banner: &[u8]) -> io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    write.write_all(banner).await?;
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}

/// Closes `stream` with a reset instead of a FIN: SO_LINGER 0, then close.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
    drop(stream);
}

/// An address where nothing listens: a connect to it is refused at once.
pub fn refused_addr() -> SocketAddr {
    refused_addrs(1)[0]
}

/// `n` distinct addresses where nothing listens (bound together so their ports differ, then
/// closed; nothing else binds them during the test).
pub fn refused_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind to learn a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address"))
        .collect()
}

/// A listener that never accepts and whose accept queue is full, so further connects to it hang
/// (their SYNs are dropped) until the dialer gives up.
pub struct BlackHole {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
    _queued: Vec<TcpStream>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("black hole socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        socket.bind(&any.into()).expect("bind black hole");
        socket.listen(0).expect("listen with backlog 0");
        let addr = socket
            .local_addr()
            .expect("black hole address")
            .as_socket()
            .expect("an IP address");
        // Fill the accept queue: connect until one connect does not complete. On loopback a
        // handshake the kernel answers completes in microseconds; one it drops never does.
        let mut queued = Vec::new();
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(e)) => panic!("connect to the black hole failed: {e}"),
                Err(_) => {
                    return BlackHole {
                        addr,
                        _socket: socket,
                        _queued: queued,
                    }
                }
            }
        }
        panic!("the black hole's accept queue never filled");
    }
}
