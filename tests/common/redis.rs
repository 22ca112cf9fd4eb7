//! A real `redis-server` child process for the shared rate limit's end-to-end tests: plaintext,
//! or TLS with a test CA's server certificate (optionally requiring client certificates and a
//! password), on a free loopback port, killed on drop.
//!
//! Readiness is a PING answered (over TLS, after AUTH, as the server demands), polled under
//! [`DEADLINE`]; a server that never answers fails the test naming its port. This module starts
//! and stops processes only: it asserts nothing about fulcrum.

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::Pki;
use super::{poll_for, DEADLINE};

/// How a TLS `redis-server` is set up.
pub struct TlsRedis<'a> {
    /// Its server certificate and key, and the CA it checks client certificates against.
    pub pki: &'a Pki,
    /// `--tls-auth-clients yes`: a client must present a certificate from `pki`'s CA.
    pub auth_clients: bool,
    /// `--requirepass`.
    pub password: Option<&'a str>,
}

/// How the readiness probe reaches the server.
enum Probe {
    Plain,
    Tls {
        config: Arc<rustls::ClientConfig>,
        password: Option<String>,
    },
}

/// A `redis-server` child process on `port`, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    probe: Probe,
}

impl RedisServer {
    /// Starts a plaintext `redis-server` on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        RedisServer::on(free_port()).await
    }

    /// Starts a plaintext `redis-server` on `port` (e.g. the port of one just stopped).
    pub async fn on(port: u16) -> RedisServer {
        let args = ["--port".to_owned(), port.to_string()];
        RedisServer::spawn(port, &args, Probe::Plain).await
    }

    /// Starts a TLS-only `redis-server` (`--port 0 --tls-port P`) on a free port and waits until
    /// it answers PING over TLS.
    pub async fn start_tls(tls: TlsRedis<'_>) -> RedisServer {
        let port = free_port();
        let path = |p: &std::path::Path| p.to_str().expect("temp paths are UTF-8").to_owned();
        let mut args = vec![
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            path(&tls.pki.server_cert),
            "--tls-key-file".to_owned(),
            path(&tls.pki.server_key),
            "--tls-ca-cert-file".to_owned(),
            path(&tls.pki.ca_file),
            "--tls-auth-clients".to_owned(),
            if tls.auth_clients { "yes" } else { "no" }.to_owned(),
        ];
        if let Some(password) = tls.password {
            args.extend(["--requirepass".to_owned(), password.to_owned()]);
        }
        // The probe presents a certificate of its own, which a server not asking ignores.
        let probe = Probe::Tls {
            config: tls.pki.client_config(Some(&tls.pki.client("readiness-probe"))),
            password: tls.password.map(str::to_owned),
        };
        RedisServer::spawn(port, &args, probe).await
    }

    async fn spawn(port: u16, args: &[String], probe: Probe) -> RedisServer {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it (.ci/run installs the Debian package redis-server)")
            });
        let server = RedisServer { port, child, probe };
        if poll_for(async || server.pings().await.then_some(()))
            .await
            .is_none()
        {
            panic!("redis-server on port {port} never answered PING after {DEADLINE:?}");
        }
        server
    }

    async fn pings(&self) -> bool {
        let attempt = async {
            let stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
            match &self.probe {
                Probe::Plain => ping(stream, None).await,
                Probe::Tls { config, password } => {
                    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                    let stream = TlsConnector::from(Arc::clone(config))
                        .connect(name, stream)
                        .await?;
                    ping(stream, password.as_deref()).await
                }
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), attempt).await,
            Ok(Ok(true))
        )
    }

    /// `redis://127.0.0.1:P/0`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = match self.probe {
            Probe::Plain => "redis",
            Probe::Tls { .. } => "rediss",
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server and waits for the process to end.
    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free right now on 127.0.0.1: redis-server cannot pick one itself (`--port 0`
/// disables TCP).
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends `AUTH password` (if any) and `PING`; true if Redis answered `+OK` and `+PONG`.
async fn ping<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    password: Option<&str>,
) -> std::io::Result<bool> {
    let mut expected = Vec::new();
    if let Some(password) = password {
        // A RESP array, so a password with spaces stays one argument.
        let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n", password.len());
        stream.write_all(auth.as_bytes()).await?;
        expected.extend_from_slice(b"+OK\r\n");
    }
    stream.write_all(b"PING\r\n").await?;
    expected.extend_from_slice(b"+PONG\r\n");
    let mut reply = vec![0u8; expected.len()];
    stream.read_exact(&mut reply).await?;
    Ok(reply == expected)
}
