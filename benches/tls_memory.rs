//! Memory an idle server-side mTLS connection holds in its TLS layer: heap bytes still allocated
//! after a full handshake (ECDSA P-256 from `fulcrum::pki`, client certificate verified) and one
//! byte each way, with the server parked in a read as the relay leaves it; fulcrum's
//! `tls::TlsStream` (rustls' unbuffered API) beside tokio-rustls' buffered stream, over loopback
//! sockets in one thread. Only the server side counts (a thread-local flag set while its futures
//! are polled), from the accepted socket on; the listener's session cache is off (it is bounded
//! by `session_cache`, not per connection) and blocks of 16 KiB or more (the buffer pool, shared)
//! are reported apart. Run: `cargo bench --bench tls_memory`.

// The counting allocator is the one unsafe part: it forwards every call to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

mod common;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 500;
/// Live blocks this large are shared buffers (the pool), reported apart.
const SHARED: usize = 16 * 1024;

thread_local!(static COUNTING: Cell<bool> = const { Cell::new(false) });
// Set while the bookkeeping itself runs (its map allocates too): not counted.
thread_local!(static BUSY: Cell<bool> = const { Cell::new(false) });
/// Live allocations made while counting: address -> size (`None`: not measuring).
static LIVE: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

/// Records an allocation (`Some(size)`) or a free (`None`, whoever frees it); returns whether a
/// freed block was one counted.
fn note(address: *mut u8, size: Option<usize>) -> bool {
    if BUSY.with(Cell::get) {
        return false;
    }
    BUSY.with(|b| b.set(true));
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    let counted = match (live.as_mut(), size) {
        (Some(live), Some(size)) => live.insert(address as usize, size).is_some(),
        (Some(live), None) => live.remove(&(address as usize)).is_some(),
        (None, _) => false,
    };
    drop(live);
    BUSY.with(|b| b.set(false));
    counted
}

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the bookkeeping around it never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let address = unsafe { System.alloc(layout) };
        if COUNTING.with(Cell::get) && !address.is_null() {
            note(address, Some(layout.size()));
        }
        address
    }

    unsafe fn dealloc(&self, address: *mut u8, layout: Layout) {
        note(address, None);
        // SAFETY: the caller's block, allocated by `System` through `alloc` above.
        unsafe { System.dealloc(address, layout) }
    }

    unsafe fn realloc(&self, address: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        // SAFETY: the caller's block and new size, forwarded.
        let moved = unsafe { System.realloc(address, layout, size) };
        if !moved.is_null() {
            // A counted block stays counted wherever it grows.
            let counted = note(address, None);
            if counted || COUNTING.with(Cell::get) {
                note(moved, Some(size));
            }
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Polls `future` as the server: its allocations are counted.
struct Server<F>(F);

impl<F: Future + Unpin> Future for Server<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        COUNTING.with(|c| c.set(true));
        let result = Pin::new(&mut self.0).poll(cx);
        COUNTING.with(|c| c.set(false));
        result
    }
}

/// Counts `future`'s allocations as the server's.
async fn server<T>(future: impl Future<Output = T>) -> T {
    Server(Box::pin(future)).await
}

/// Parks `stream` in a read as the relay leaves an idle connection (one poll, pending).
async fn park(stream: &mut (impl AsyncRead + Unpin)) {
    let mut space = [0u8; 64];
    server(poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Ready(()),
            Poll::Ready(result) => panic!("the idle client sent something: {result:?}"),
        }
    }))
    .await;
}

/// Echoes one byte.
async fn echo(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    let mut byte = [0; 1];
    stream.read_exact(&mut byte).await.expect("one byte");
    stream.write_all(&byte).await.expect("echo");
    stream.flush().await.expect("flush");
}

/// Opens `CONNECTIONS` connections served by `accept` and reports the heap bytes each holds.
async fn measure<S, Fut>(
    name: &str,
    config: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    accept: impl Fn(TcpStream, Arc<ServerConfig>) -> Fut,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    Fut: Future<Output = S>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(client));
    BUSY.with(|b| b.set(true));
    *LIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(HashMap::new());
    BUSY.with(|b| b.set(false));
    let mut open = Vec::new();
    for _ in 0..CONNECTIONS {
        let dial = async {
            let tcp = TcpStream::connect(address).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("client handshake");
            tls.write_all(b"x").await.expect("client data");
            let mut byte = [0; 1];
            tls.read_exact(&mut byte).await.expect("echoed");
            tls
        };
        let serve = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            server(async {
                let mut stream = accept(tcp, Arc::clone(config)).await;
                echo(&mut stream).await;
                stream
            })
            .await
        };
        let (client, mut stream) = tokio::join!(dial, serve);
        park(&mut stream).await;
        open.push((client, stream));
    }
    BUSY.with(|b| b.set(true));
    let live = LIVE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    BUSY.with(|b| b.set(false));
    // Blocks of 16 KiB and more are the process-wide buffer pool's, not any connection's.
    let shared: usize = live.values().filter(|size| **size >= SHARED).sum();
    let total = live.values().sum::<usize>() - shared;
    let mut by_size = BTreeMap::new();
    for size in live.values().filter(|size| **size < SHARED) {
        *by_size.entry(*size).or_insert(0usize) += 1;
    }
    println!(
        "{name}: idle mTLS server connection, {CONNECTIONS} held: {} heap bytes each; inline {} bytes; {} bytes in shared buffers",
        total / CONNECTIONS,
        std::mem::size_of::<S>(),
        shared
    );
    println!("  live allocations per connection, by size (bytes x count):");
    for (size, count) in by_size.iter().rev() {
        let each = *count as f64 / CONNECTIONS as f64;
        if each >= 0.1 {
            println!("  {size:>6} x {each:.2}");
        }
    }
    drop(open);
}

fn main() {
    let common::Mtls {
        dir,
        mut tls,
        client: mut client_config,
        ..
    } = common::mtls("bench-mem");
    tls.session_cache = 0;
    let config = fulcrum::tls::server_config(&tls).expect("server config").config;
    let _ = std::fs::remove_dir_all(&dir);
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        measure(
            "fulcrum::tls::TlsStream",
            &config,
            &client_config,
            |tcp, config| async move {
                let mut hello = fulcrum::tls::Hello::new(tcp);
                let accepted = hello.read().await.expect("ClientHello");
                let name = accepted.client_hello().server_name().map(str::to_string);
                drop(accepted);
                let mut stream = hello.start(config, name).expect("start");
                stream.handshake().await.expect("server handshake");
                stream
            },
        )
        .await;
        measure(
            "tokio_rustls::server::TlsStream",
            &config,
            &client_config,
            |tcp, config| async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                acceptor.accept(tcp).await.expect("server handshake")
            },
        )
        .await;
    });
}
