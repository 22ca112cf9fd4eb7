//! One client connection's life, from accept to the closing log line.
//!
//! Steps, in order: pick a backend and dial it (trying the next least-loaded one on refusal or
//! timeout, a bounded number of times), relay bytes both ways, and log one summary line. The
//! backend lease is held for the whole life of the connection, so the active count is exact on
//! every path. Failures end this connection only and are logged once, here. This module owns the
//! order of the steps; the steps themselves live in balancer, proxy and server.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info, info_span, warn, Instrument, Span};

use crate::balancer::Lease;
use crate::metrics::Reason;
use crate::proxy::{relay, Progress, RelayError, Side};
use crate::server::{dial, Listener, Upstream};

/// Serves one accepted client connection to completion. Never panics on peer input; every wait
/// on a peer is bounded by a connect timeout or by `abort` (the drain deadline).
pub(crate) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    abort: CancellationToken,
) {
    let span = info_span!(
        "conn",
        client.addr = %peer,
        listener = %listener.name,
        upstream = %listener.upstream.name,
        backend.addr = field::Empty,
    );
    serve(client, listener, abort).instrument(span).await
}

async fn serve(mut client: TcpStream, listener: Arc<Listener>, abort: CancellationToken) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let upstream = &listener.upstream;
    let connected = tokio::select! {
        _ = abort.cancelled() => return,
        connected = connect(upstream) => connected,
    };
    let (mut backend, lease) = match connected {
        Ok(connected) => connected,
        Err(reason) => {
            listener.rejected.inc(reason);
            warn!(
                reason = reason.label(),
                "no backend for connection; closing client"
            );
            let _ = client.shutdown().await;
            return;
        }
    };
    let chosen = &upstream.backends[lease.index()];
    chosen.connections.inc();
    Span::current().record("backend.addr", chosen.label.as_str());

    let mut progress = Progress::default();
    let result = relay(&mut client, &mut backend, &mut progress, abort.cancelled()).await;
    let end = match &result {
        Ok(()) => "closed",
        Err(RelayError::Cancelled) => "drain_deadline",
        Err(RelayError::Io { side, source }) => {
            // Mirror an abort: the other side sees a reset too, never a clean end of stream.
            let other = match side {
                Side::Client => &backend,
                Side::Backend => &client,
            };
            let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
            describe(*side, source)
        }
    };
    info!(
        bytes_up = progress.client_to_backend,
        bytes_down = progress.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end,
        "connection closed"
    );
    drop(lease);
}

/// Leases and dials backends until one answers, at most `connect_attempts` distinct ones.
async fn connect(upstream: &Upstream) -> Result<(TcpStream, Lease), Reason> {
    let mut tried: Vec<usize> = Vec::new();
    for _ in 0..upstream.connect_attempts {
        let Some(lease) = upstream.pool.pick(&tried) else {
            break;
        };
        let backend = &upstream.backends[lease.index()];
        match dial(&backend.addr, upstream.connect_timeout).await {
            Ok(stream) => return Ok((stream, lease)),
            Err(e) => {
                backend.connect_failures.inc();
                debug!(backend = %backend.label, error = %e, "backend connect failed");
                tried.push(lease.index());
            }
        }
    }
    Err(if tried.is_empty() {
        Reason::NoHealthyBackend
    } else {
        Reason::ConnectFailed
    })
}

fn describe(side: Side, e: &io::Error) -> &'static str {
    let reset = matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    );
    match (side, reset) {
        (Side::Client, true) => "client_reset",
        (Side::Client, false) => "client_error",
        (Side::Backend, true) => "backend_reset",
        (Side::Backend, false) => "backend_error",
    }
}
