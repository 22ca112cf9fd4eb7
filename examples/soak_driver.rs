//! Traffic for `scripts/soak`: many echo connections through a running fulcrum, plain and mTLS,
//! short and long, some reset on purpose, each checked byte for byte (SHA-256 of what was sent
//! against what came back).
//!
//! `soak_driver free-ports N` prints N free loopback ports (for the script's configs).
//! `soak_driver run --plain ADDR --tls ADDR --ca FILE --cert FILE --key FILE [--duration SECS]
//! [--concurrency N] [--seed N]` drives traffic for the duration, then prints a report, one
//! `key: value` per line. SIGUSR1 tells it a backend is about to be killed, SIGUSR2 that the
//! kill is over: a connection open during such a window that ends short is counted as cut by
//! the kill (a fault), not as a loss.
//! Only a connection that ended cleanly with other bytes than it sent, and with no kill during
//! it, counts as lost. Loopback only; every loop is bounded by the duration or a deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Deadline for one connection, whatever its size: a hung connection is a finding.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    tls_connections: AtomicU64,
    long_connections: AtomicU64,
    intact: AtomicU64,
    bytes_verified: AtomicU64,
    client_resets: AtomicU64,
    cut_by_kill: AtomicU64,
    refused: AtomicU64,
    unexplained_aborts: AtomicU64,
    connect_errors: AtomicU64,
    hung: AtomicU64,
    lost_connections: AtomicU64,
    bytes_lost: AtomicU64,
}

/// xorshift64, for choices and payload bytes.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Args {
    plain: SocketAddr,
    tls: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    duration: Duration,
    concurrency: usize,
    seed: u64,
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("free-ports") => {
            let n: usize = args.get(1).ok_or("free-ports N")?.parse()?;
            let held: Vec<std::net::TcpListener> = (0..n)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()?;
            for l in &held {
                println!("{}", l.local_addr()?.port());
            }
            Ok(())
        }
        Some("run") => {
            let args = parse(&args[1..])?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(args))
        }
        _ => Err("usage: soak_driver free-ports N | run --plain ADDR --tls ADDR --ca F --cert F --key F [--duration S] [--concurrency N] [--seed N]".into()),
    }
}

fn parse(args: &[String]) -> Result<Args, Error> {
    let value =
        |name: &str| -> Option<&String> { args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)) };
    let need = |name: &str| value(name).ok_or_else(|| format!("missing {name}"));
    let read = |name: &str| -> Result<Vec<u8>, Error> { Ok(std::fs::read(need(name)?)?) };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read("--ca")?) {
        roots.add(ca?)?;
    }
    let chain = CertificateDer::pem_slice_iter(&read("--cert")?).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&read("--key")?)?;
    let client = rustls::ClientConfig::builder_with_provider(fulcrum::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let seed = match value("--seed") {
        Some(s) => s.parse()?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    Ok(Args {
        plain: need("--plain")?.parse()?,
        tls: need("--tls")?.parse()?,
        client: Arc::new(client),
        duration: Duration::from_secs(value("--duration").map_or(Ok(600), |s| s.parse())?),
        concurrency: value("--concurrency").map_or(Ok(16), |s| s.parse())?,
        seed: seed | 1,
    })
}

async fn run(args: Args) -> Result<(), Error> {
    let stats = Arc::new(Stats::default());
    let kills = Arc::new(AtomicU64::new(0));
    // Odd while a kill window is open (SIGUSR1 opens it, SIGUSR2 closes it).
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let notices = Arc::clone(&kills);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = usr1.recv() => {}
                Some(()) = usr2.recv() => {}
                else => break,
            }
            notices.fetch_add(1, Relaxed);
        }
    });
    eprintln!("soak_driver: seed {}", args.seed);
    let args = Arc::new(args);
    let until = Instant::now() + args.duration;
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (args, stats, kills) = (Arc::clone(&args), Arc::clone(&stats), Arc::clone(&kills));
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(args.seed.wrapping_add(worker as u64 * 0x9e37_79b9_7f4a_7c15) | 1);
            while Instant::now() < until {
                let seed = rng.next() | 1;
                let choice = Choice {
                    tls: rng.below(2) == 0,
                    long: rng.below(10) == 0,
                    reset: rng.below(10) == 0,
                    len: 0,
                    seed,
                };
                let len = if choice.long {
                    1 << 20 | rng.below(7 << 20) as usize
                } else {
                    1 + rng.below(64 * 1024) as usize
                };
                one(&args, &stats, &kills, Choice { len, ..choice }).await;
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let s = &stats;
    let report = [
        ("connections", &s.connections),
        ("tls_connections", &s.tls_connections),
        ("long_connections", &s.long_connections),
        ("intact", &s.intact),
        ("bytes_verified", &s.bytes_verified),
        ("faults_client_resets", &s.client_resets),
        ("faults_cut_by_backend_kill", &s.cut_by_kill),
        ("refused", &s.refused),
        ("unexplained_aborts", &s.unexplained_aborts),
        ("connect_errors", &s.connect_errors),
        ("hung", &s.hung),
        ("lost_connections", &s.lost_connections),
        ("bytes_lost", &s.bytes_lost),
    ];
    println!("backend_kill_windows: {}", kills.load(Relaxed) / 2);
    for (name, value) in report {
        println!("{name}: {}", value.load(Relaxed));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Choice {
    tls: bool,
    long: bool,
    reset: bool,
    len: usize,
    seed: u64,
}

/// What the connection saw.
enum End {
    /// Clean end of stream: what came back, and how much of it matched from the start.
    Closed {
        received: u64,
        prefix_ok: u64,
        digest_ok: bool,
    },
    Aborted,
    Reset,
}

async fn one(args: &Args, stats: &Stats, kills: &AtomicU64, choice: Choice) {
    stats.connections.fetch_add(1, Relaxed);
    if choice.tls {
        stats.tls_connections.fetch_add(1, Relaxed);
    }
    if choice.long {
        stats.long_connections.fetch_add(1, Relaxed);
    }
    let kills_before = kills.load(Relaxed);
    let end = tokio::time::timeout(CONNECTION_DEADLINE, connection(args, choice)).await;
    // Open during a kill window, or across one.
    let killed = kills_before % 2 == 1 || kills.load(Relaxed) != kills_before;
    let len = choice.len as u64;
    match end {
        Err(_) => {
            stats.hung.fetch_add(1, Relaxed);
            eprintln!("soak_driver: connection (seed {}) hung", choice.seed);
        }
        Ok(Err(e)) => {
            stats.connect_errors.fetch_add(1, Relaxed);
            eprintln!("soak_driver: connect failed: {e}");
        }
        Ok(Ok(End::Reset)) => {
            stats.client_resets.fetch_add(1, Relaxed);
        }
        Ok(Ok(End::Aborted)) if killed => {
            stats.cut_by_kill.fetch_add(1, Relaxed);
        }
        Ok(Ok(End::Aborted)) => {
            stats.unexplained_aborts.fetch_add(1, Relaxed);
        }
        Ok(Ok(End::Closed {
            received,
            digest_ok: true,
            ..
        })) if received == len => {
            stats.intact.fetch_add(1, Relaxed);
            stats.bytes_verified.fetch_add(len, Relaxed);
        }
        Ok(Ok(End::Closed {
            received, prefix_ok, ..
        })) => {
            if killed && prefix_ok == received {
                stats.cut_by_kill.fetch_add(1, Relaxed);
            } else if received == 0 {
                stats.refused.fetch_add(1, Relaxed);
            } else {
                stats.lost_connections.fetch_add(1, Relaxed);
                stats
                    .bytes_lost
                    .fetch_add(len.saturating_sub(prefix_ok).max(1), Relaxed);
                eprintln!(
                    "soak_driver: LOSS (seed {}, tls {}): sent {len}, received {received}, {prefix_ok} matching",
                    choice.seed, choice.tls
                );
            }
        }
    }
}

async fn connection(args: &Args, choice: Choice) -> Result<End, Error> {
    let addr = if choice.tls { args.tls } else { args.plain };
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    tcp.set_nodelay(true)?;
    if choice.reset {
        // Closing later sends a reset instead of a FIN.
        socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO))?;
    }
    if !choice.tls {
        return Ok(exchange(tcp, choice).await);
    }
    let name = ServerName::try_from("localhost")?;
    let connecting = TlsConnector::from(Arc::clone(&args.client)).connect(name, tcp);
    match tokio::time::timeout(Duration::from_secs(5), connecting).await? {
        Ok(stream) => Ok(exchange(stream, choice).await),
        // Refused at the handshake (e.g. a cut during it): no data was at stake.
        Err(_) => Ok(End::Aborted),
    }
}

/// Sends the payload while reading the echo; compares what comes back as it arrives.
async fn exchange<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, choice: Choice) -> End {
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut payload = Payload::new(choice.seed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let stop_at = if choice.reset { choice.len / 2 } else { choice.len };
        let mut sent = 0;
        while sent < stop_at {
            let n = CHUNK.min(stop_at - sent);
            payload.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            write.write_all(&buf[..n]).await?;
            sent += n;
            if choice.long {
                // Long connections last seconds: ~6 MiB/s.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if !choice.reset {
            write.shutdown().await?;
        }
        Ok::<_, std::io::Error>((write, <[u8; 32]>::from(hasher.finalize())))
    });
    if choice.reset {
        // Mid-stream: once half is written, drop both halves (SO_LINGER 0: a reset).
        let _ = writer.await;
        drop(read);
        return End::Reset;
    }
    let mut expected = Payload::new(choice.seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let (mut received, mut prefix_ok, mut intact) = (0u64, 0u64, true);
    let ended = loop {
        match read.read(&mut buf).await {
            Ok(0) => break true,
            Ok(n) => {
                hasher.update(&buf[..n]);
                let fresh = (choice.len as u64).saturating_sub(received).min(n as u64) as usize;
                expected.fill(&mut want[..fresh]);
                if intact {
                    let same = buf[..fresh]
                        .iter()
                        .zip(&want[..fresh])
                        .take_while(|(a, b)| a == b)
                        .count();
                    prefix_ok += same as u64;
                    intact = same == n;
                }
                received += n as u64;
            }
            Err(_) => break false,
        }
    };
    let sent = writer.await;
    match (ended, sent) {
        (true, Ok(Ok((_, sent_digest)))) => End::Closed {
            received,
            prefix_ok,
            digest_ok: <[u8; 32]>::from(hasher.finalize()) == sent_digest,
        },
        // A clean end before everything was sent: the writer then failed (the connection was
        // cut under it); judged on what came back.
        (true, _) => End::Closed {
            received,
            prefix_ok,
            digest_ok: false,
        },
        _ => End::Aborted,
    }
}

/// The payload of a connection as a byte stream: the same bytes whatever the read sizes.
struct Payload {
    rng: Rng,
    word: [u8; 8],
    used: usize,
}

impl Payload {
    fn new(seed: u64) -> Payload {
        Payload {
            rng: Rng(seed),
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            if self.used == 8 {
                self.word = self.rng.next().to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}
