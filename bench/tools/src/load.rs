//! The load generators: `tls-bulk`, `handshakes` and `hold`. Each prints one `key=value` line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::Conn;
use crate::{secs, ClientTls, Target};

/// This process's CPU time (user + system) so far, from /proc/self/stat (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name; the
    // clock tick is 100 Hz on every Linux platform we run on.
    (ticks(11) + ticks(12)) / 100.0
}

/// Deadline for one connect + handshake + echo.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to open a connection: plain, or TLS with a client certificate.
#[derive(Clone)]
struct Dialer {
    addr: std::net::SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    fn new(target: &Target, tls: &ClientTls) -> anyhow::Result<Self> {
        let tls = match (&tls.ca, &tls.cert, &tls.key) {
            (Some(ca), Some(cert), Some(key)) => Some((
                TlsConnector::from(crate::tls::client(ca, cert, key)?),
                crate::tls::server_name(&tls.server_name)?,
            )),
            (None, None, None) => None,
            _ => bail!("TLS needs --ca, --cert and --key together"),
        };
        Ok(Dialer {
            addr: target.connect,
            tls,
        })
    }

    /// Connect and (for TLS) complete the handshake, all under `STEP_TIMEOUT`.
    async fn dial(&self) -> std::io::Result<Conn> {
        let open = async {
            let tcp = TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            match &self.tls {
                None => Ok(Conn::Plain(tcp)),
                Some((connector, name)) => {
                    let tls = connector.connect(name.clone(), tcp).await?;
                    Ok(Conn::Tls(Box::new(tls)))
                }
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, open)
            .await
            .map_err(|_| std::io::Error::other("connect/handshake timeout"))?
    }
}

/// Writes one byte and waits for it to come back.
async fn echo_once(conn: &mut Conn) -> std::io::Result<()> {
    let round_trip = async {
        conn.write_all(b"x").await?;
        conn.flush().await?;
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).await?;
        Ok(())
    };
    tokio::time::timeout(STEP_TIMEOUT, round_trip)
        .await
        .map_err(|_| std::io::Error::other("echo timeout"))?
}

#[derive(clap::Args, Debug)]
pub struct BulkArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: ClientTls,
    /// Parallel connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Bytes per write call.
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: usize,
}

pub async fn bulk(args: BulkArgs) -> anyhow::Result<()> {
    let dialer = Dialer::new(&args.target, &args.tls)?;
    let mut conns = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        conns.push(dialer.dial().await?);
    }
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let deadline = tokio::time::Instant::now() + secs(args.duration);
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut conn in conns {
        let total = Arc::clone(&total);
        let chunk = vec![0x5au8; args.chunk];
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            // Only whole, completed writes count; a write cut by the deadline does not.
            while let Ok(Ok(())) = tokio::time::timeout_at(deadline, conn.write_all(&chunk)).await {
                sent += chunk.len() as u64;
            }
            total.fetch_add(sent, Ordering::Relaxed);
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = start.elapsed().as_secs_f64().min(args.duration.max(1e-9));
    let bytes = total.load(Ordering::Relaxed);
    let client_cpu = 100.0 * (cpu_seconds() - cpu_start) / start.elapsed().as_secs_f64();
    println!(
        "gbps={:.3} bytes={bytes} seconds={elapsed:.3} conns={} client_cpu_pct={client_cpu:.1}",
        bytes as f64 * 8.0 / elapsed / 1e9,
        args.conns
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct HandshakeArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: ClientTls,
    /// Clients handshaking at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop after this many handshakes in total even if time remains.
    #[arg(long, default_value_t = 1_000_000)]
    max: u64,
}

pub async fn handshakes(args: HandshakeArgs) -> anyhow::Result<()> {
    let dialer = Dialer::new(&args.target, &args.tls)?;
    if dialer.tls.is_none() {
        bail!("handshakes needs --ca, --cert and --key");
    }
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let deadline = start + secs(args.duration);
    let started = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let dialer = dialer.clone();
        let started = Arc::clone(&started);
        let max = args.max;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut latencies = Vec::new();
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max {
                let t0 = Instant::now();
                let result = async {
                    let mut conn = dialer.dial().await?;
                    echo_once(&mut conn).await?;
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.shutdown()).await;
                    Ok::<_, std::io::Error>(())
                }
                .await;
                match result {
                    Ok(()) => {
                        ok += 1;
                        latencies.push(t0.elapsed());
                    }
                    Err(_) => failed += 1,
                }
            }
            (ok, failed, latencies)
        }));
    }
    let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
    for task in tasks {
        let (o, f, l) = task.await?;
        ok += o;
        failed += f;
        latencies.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    let client_cpu = 100.0 * (cpu_seconds() - cpu_start) / elapsed;
    println!(
        "hs_per_sec={:.1} ok={ok} failed={failed} seconds={elapsed:.3} p50_ms={:.3} p99_ms={:.3} \
         client_cpu_pct={client_cpu:.1}",
        ok as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: ClientTls,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 9800)]
    conns: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Release the connections and exit once this file exists.
    #[arg(long)]
    release_file: PathBuf,
    /// Exit after this many seconds in any case.
    #[arg(long, default_value_t = 120.0)]
    max_time: f64,
}

pub async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let dialer = Dialer::new(&args.target, &args.tls)?;
    let start = Instant::now();
    let give_up = start + secs(args.max_time);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.parallel.max(1) {
        let dialer = dialer.clone();
        let next = Arc::clone(&next);
        let want = args.conns as u64;
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut failed = 0u64;
            while Instant::now() < give_up && next.fetch_add(1, Ordering::Relaxed) < want {
                let opened = async {
                    let mut conn = dialer.dial().await?;
                    echo_once(&mut conn).await?;
                    Ok::<_, std::io::Error>(conn)
                }
                .await;
                match opened {
                    Ok(conn) => held.push(conn),
                    Err(_) => failed += 1,
                }
            }
            (held, failed)
        }));
    }
    let (mut held, mut failed) = (Vec::new(), 0u64);
    for task in tasks {
        let (h, f) = task.await?;
        held.extend(h);
        failed += f;
    }
    println!(
        "ready held={} failed={failed} seconds={:.3}",
        held.len(),
        start.elapsed().as_secs_f64()
    );
    while !args.release_file.exists() {
        if Instant::now() >= give_up {
            return Err(anyhow!("no release file after {} s", args.max_time));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    Ok(())
}
