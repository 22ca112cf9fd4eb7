//! Memory an idle server-side mTLS connection holds in rustls: heap bytes still allocated after a
//! full handshake (ECDSA P-256 from `fulcrum::pki`, client certificate verified) and one byte each
//! way, left as tokio-rustls leaves it (its last read would block), with the live allocations by
//! size; and the inline size of the connection. In memory, server side only (a thread-local flag
//! counts only the server's allocations). Run: `cargo bench --bench tls_memory`.

// The counting allocator is the one unsafe part: it forwards every call to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

mod common;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

const CONNECTIONS: usize = 500;

thread_local!(static COUNTING: Cell<bool> = const { Cell::new(false) });
/// Live allocations made while counting: address -> size.
static LIVE: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

fn note(address: *mut u8, size: Option<usize>) {
    // The map allocates too: not counted.
    COUNTING.with(|c| c.set(false));
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    let live = live.get_or_insert_with(HashMap::new);
    match size {
        Some(size) => live.insert(address as usize, size),
        None => live.remove(&(address as usize)),
    };
    COUNTING.with(|c| c.set(true));
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
        if COUNTING.with(Cell::get) {
            note(address, None);
        }
        // SAFETY: the caller's block, allocated by `System` through `alloc` above.
        unsafe { System.dealloc(address, layout) }
    }

    unsafe fn realloc(&self, address: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        // SAFETY: the caller's block and new size, forwarded.
        let moved = unsafe { System.realloc(address, layout, size) };
        if COUNTING.with(Cell::get) && !moved.is_null() {
            note(address, None);
            note(moved, Some(size));
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` as the server: its allocations are counted.
fn server<T>(f: impl FnOnce() -> T) -> T {
    COUNTING.with(|c| c.set(true));
    let result = f();
    COUNTING.with(|c| c.set(false));
    result
}

/// A socket with nothing to read.
struct WouldBlock;

impl Read for WouldBlock {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

fn main() {
    let common::Mtls {
        dir,
        server: server_config,
        client: mut client_config,
        ..
    } = common::mtls("bench-mem");
    let _ = std::fs::remove_dir_all(&dir);
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);

    let mut open = Vec::new();
    for _ in 0..CONNECTIONS {
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = ClientConnection::new(Arc::clone(&client_config), name).expect("client");
        let mut conn = server(|| ServerConnection::new(Arc::clone(&server_config)).expect("server"));
        let mut wire = Vec::new();
        while client.is_handshaking() || conn.is_handshaking() || client.wants_write() || conn.wants_write() {
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client writes");
            }
            server(|| {
                let mut input = &wire[..];
                while !input.is_empty() {
                    conn.read_tls(&mut input).expect("server reads");
                    conn.process_new_packets().expect("server handshake");
                }
            });
            wire.clear();
            server(|| {
                while conn.wants_write() {
                    conn.write_tls(&mut wire).expect("server writes");
                }
            });
            let mut input = &wire[..];
            while !input.is_empty() {
                client.read_tls(&mut input).expect("client reads");
                client.process_new_packets().expect("client handshake");
            }
        }
        client.writer().write_all(b"x").expect("client data");
        wire.clear();
        client.write_tls(&mut wire).expect("client writes data");
        server(|| {
            let mut input = &wire[..];
            conn.read_tls(&mut input).expect("server reads data");
            conn.process_new_packets().expect("server decrypts");
            let mut byte = [0; 1];
            conn.reader().read_exact(&mut byte).expect("one byte");
            conn.writer().write_all(&byte).expect("echo");
            let mut out = Vec::new();
            conn.write_tls(&mut out).expect("server writes data");
            let _ = conn.read_tls(&mut WouldBlock);
        });
        open.push((client, conn));
    }
    let live = LIVE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    let total: usize = live.values().sum();
    let mut by_size = BTreeMap::new();
    for size in live.values() {
        *by_size.entry(*size).or_insert(0usize) += 1;
    }
    println!(
        "idle mTLS server connection, {CONNECTIONS} held: {} heap bytes each; inline: ServerConnection {} bytes, tokio-rustls TlsStream<TcpStream> {} bytes",
        total / CONNECTIONS,
        std::mem::size_of::<ServerConnection>(),
        std::mem::size_of::<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>()
    );
    println!("live allocations per connection, by size (bytes x count):");
    for (size, count) in by_size.iter().rev() {
        let each = *count as f64 / CONNECTIONS as f64;
        if each >= 0.1 {
            println!("  {size:>6} x {each:.2}");
        }
    }
    drop(open);
}
