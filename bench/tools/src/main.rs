//! `loadtool`: the small load generators and peers that `bench/run` needs where no standard tool
//! fits (iperf3 and wrk cover plaintext bulk and HTTP).
//!
//! - `sink`, `echo`: backends (plain or mTLS) that discard or echo bytes, on several addresses.
//! - `tls-bulk`: N mTLS connections sending for D seconds; reports Gbit/s.
//! - `handshakes`: full mTLS handshakes (no resumption) with a client certificate, C at a time,
//!   for D seconds; reports handshakes/s.
//! - `hold`: opens N connections (plain or mTLS), makes one echo round trip on each so the proxy
//!   has dialed its backend, prints `ready`, and holds them until a file appears.
//!
//! Every loop is bounded in time (and the load loops also in count). Results are printed as one
//! line of `key=value` pairs so the harness can parse them with `sed`.

mod load;
mod servers;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadtool", about = "Load tools for fulcrum's bench/run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept connections and discard everything they send.
    Sink(servers::ServerArgs),
    /// Accept connections and send back everything they send.
    Echo(servers::ServerArgs),
    /// Send as fast as possible over N connections for D seconds; report Gbit/s.
    TlsBulk(load::BulkArgs),
    /// Full mTLS handshakes (plus a one-byte echo) in a loop; report handshakes/s.
    Handshakes(load::HandshakeArgs),
    /// Open N connections, echo one byte on each, print "ready", hold until a file appears.
    Hold(load::HoldArgs),
}

/// Client-side TLS material; TLS is used when `--ca` is given.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientTls {
    /// CA certificate (PEM) that signed the server certificate; enables TLS.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    #[arg(long, requires = "ca")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Server name to send and verify.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

/// Where a load tool connects.
#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// Address to connect to (ip:port).
    #[arg(long)]
    connect: SocketAddr,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One worker per CPU the process may run on: under `taskset -c 1` that is one.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Sink(args) => servers::run(args, servers::Mode::Sink).await,
            Command::Echo(args) => servers::run(args, servers::Mode::Echo).await,
            Command::TlsBulk(args) => load::bulk(args).await,
            Command::Handshakes(args) => load::handshakes(args).await,
            Command::Hold(args) => load::hold(args).await,
        }
    })
}
