//! Phase 5, the relay: what a proxied connection holds while its bytes flow ([`Proxied`]), the
//! signals that stop it (the drain deadline, the backend marked down or put in `maint`, the access
//! revoked, the client certificate expired, the connection closed by an operator or
//! quarantined), [`relay`] itself and how a stopped relay leaves its sockets (a clean close, or
//! resets).
//!
//! The byte copying is `proxy`'s; this file wires a connection to it and turns its result into an
//! [`End`]. It reports nothing: the closing log line and the access log entry are the end's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::client::{reset, Client, CLOSE_DEADLINE};
use super::dial::Connected;
use super::end::{End, Ended, Tally};
use super::limits::{Held, Limited};
use super::record::Record;
use crate::accesslog::Entry;
use crate::config::OnDown;
use crate::health::AdminState;
use crate::net::BackendStream;
use crate::proxy::{relay_tcp, RelayError, Side, Timeout, Timeouts};
use crate::state::registry::Tracked;
use crate::state::{Backend, Listener, Registration, Upstream};

/// What a proxied connection holds while its bytes flow: no more than its relay needs (the
/// setup's state, the handshake's included, is gone by then).
pub(super) struct Proxied {
    client: Client,
    backend: BackendStream,
    held: Held,
    /// With `on_down = "close"`: cancelled when the backend is marked down.
    backend_down: Option<CancellationToken>,
    chosen: Arc<Backend>,
    /// An authorized mTLS connection's registration (revocation, expiry).
    registration: Option<Registration>,
    /// Its record in the table of open connections (listed until the relay gives it back).
    record: Tracked<Record>,
    /// The listener as the generation that admitted the connection has it.
    pub(super) listener: Arc<Listener>,
    timeouts: Timeouts,
}

impl Proxied {
    /// A connection ready to relay: `client` admitted to `upstream` by `listener`, `connected` to
    /// one of its backends, holding the limit phase's counts and the backend's lease; its
    /// lifetime runs from `started`; `record`: its place in the table of open connections.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        client: Client,
        connected: Connected,
        limited: Limited,
        registration: Option<Registration>,
        listener: Arc<Listener>,
        upstream: &Upstream,
        started: Instant,
        record: Tracked<Record>,
    ) -> Box<Proxied> {
        let Connected {
            backend,
            lease,
            chosen,
        } = connected;
        let timeouts = Timeouts {
            idle: listener.idle_timeout,
            half_closed: listener.half_closed_timeout,
            deadline: listener.max_lifetime.map(|max| {
                let age = lifetime(max, listener.max_lifetime_jitter, random_unit());
                crate::clock::later(tokio::time::Instant::from_std(started), age)
            }),
        };
        // Taken after the dial: if the backend went down meanwhile, the signal has already fired.
        let backend_down = match upstream.health_check.on_down {
            OnDown::Close => Some(chosen.health.down_signal()),
            OnDown::Keep => None,
        };
        // Boxed: the connection's task then holds a pointer while its relay runs.
        Box::new(Proxied {
            client,
            backend,
            held: Held::new(limited, lease),
            backend_down,
            chosen,
            registration,
            record,
            listener,
            timeouts,
        })
    }

    /// Phase 5: [`relay`], then a clean close of TLS legs cut with nothing in flight; gives the
    /// connection back with how it ended and the bytes it delivered. `entry`: the access log
    /// entry so far, with an access log (for interim entries).
    // Not an `async fn`, like `handle`: no second copy of the arguments in the future.
    pub(super) fn run<'a>(
        self: Box<Self>,
        abort: &'a CancellationToken,
        started: Instant,
        entry: Option<&'a Entry>,
    ) -> impl Future<Output = (Box<Proxied>, Ended)> + 'a {
        let mut this = self;
        async move {
            let mut tally = Tally::new(&this.listener, &this.chosen, this.record.record(), started, entry);
            let (end, aborted) = relay(&mut this, abort, &mut tally).await;
            if !aborted && end.is_cut() {
                // A clean cut is a complete end for TLS peers too: close_notify, then the FIN.
                if let client @ Client::Tls(_) = &mut this.client {
                    client.close().await;
                }
                if let BackendStream::Tls(backend) = &mut this.backend {
                    let _ = tokio::time::timeout(CLOSE_DEADLINE, backend.shutdown()).await;
                }
            }
            let progress = tally.settle(end);
            let ended = Ended {
                end,
                aborted,
                progress,
            };
            (this, ended)
        }
    }

    /// Gives the connection's counts back ([`Held::release`]), then closes its sockets and
    /// leaves the table of open connections.
    pub(super) fn release(self: Box<Self>) {
        self.held.release();
    }
}

/// The age at which a connection is closed for `max_lifetime`: `max - jitter * unit`, `unit`
/// uniform in [0, 1), so that connections opened together are closed over `jitter`, never after
/// `max`.
fn lifetime(max: Duration, jitter: Duration, unit: f64) -> Duration {
    let cut = Duration::try_from_secs_f64(jitter.as_secs_f64() * unit.clamp(0.0, 1.0)).unwrap_or(jitter);
    max.saturating_sub(cut)
}

/// A number uniform in [0, 1) that differs between connections (not for anything secret).
fn random_unit() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Relays until both sides end, or the drain deadline, the backend being marked down
/// (`on_down = "close"`) or put in `maint`, a revocation, the certificate's expiry, a cut of its
/// record (an operator, a quarantine) or one of the listener's timeouts cuts it. Returns how it ended, and whether fulcrum reset the legs
/// (`aborted`): a failed side resets the other, and a cut resets both when bytes were in flight
/// (always, when access was taken away), so neither side mistakes a cut stream for a complete
/// one; a timeout or the drain deadline with nothing in flight closes both cleanly.
async fn relay(p: &mut Proxied, abort: &CancellationToken, progress: &mut Tally<'_>) -> (End, bool) {
    let Proxied {
        client,
        backend,
        backend_down,
        chosen,
        registration,
        record,
        timeouts,
        ..
    } = p;
    let cut = registration.as_ref().map(|r| &*r.cut);
    let maint = chosen.health.maint_signal();
    let closed = &record.cut;
    // An idle relay keeps this future for its whole life: the common case (no `on_down =
    // "close"`, no mTLS registration) waits on three signals, not five.
    let stop: Pin<Box<dyn Future<Output = ()> + Send + '_>> = match (&*backend_down, cut) {
        (None, None) => Box::pin(async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = maint.cancelled() => {}
                _ = closed.cancelled() => {}
            }
        }),
        (down, cut) => Box::pin(async move {
            let down = async {
                match down {
                    Some(down) => down.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let cut = async {
                match cut {
                    Some(cut) => cut.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = down => {}
                _ = cut => {}
                _ = maint.cancelled() => {}
                _ = closed.cancelled() => {}
            }
        }),
    };
    let timeouts = *timeouts;
    // Zero-copy between plain sockets, buffered through TLS.
    let result = match backend {
        BackendStream::Plain(plain) => match client {
            Client::Plain(tcp) => relay_tcp(tcp, plain, progress, stop, timeouts).await,
            Client::Tls(tls) => crate::proxy::relay(tls.as_mut(), plain, progress, stop, timeouts).await,
        },
        BackendStream::Tls(tls) => match client {
            Client::Plain(tcp) => crate::proxy::relay(tcp, tls.as_mut(), progress, stop, timeouts).await,
            Client::Tls(client) => {
                crate::proxy::relay(client.as_mut(), tls.as_mut(), progress, stop, timeouts).await
            }
        },
    };
    let reset_both = || {
        reset(client.tcp());
        reset(backend.tcp());
        true
    };
    // A cut with bytes in the relay, or unread in either socket, ends with resets; a cut with
    // nothing in flight closes cleanly.
    let cut = |in_flight: bool| (in_flight || unread(client.tcp()) || unread(backend.tcp())) && reset_both();
    match &result {
        // Both FINs were passed on. A reset that came after them cannot reach the other side any
        // more, but it is no clean end: the side that reset is named.
        Ok(()) if reset_pending(backend.tcp()) => (End::BackendReset, false),
        Ok(()) if reset_pending(client.tcp()) => (End::ClientReset, false),
        Ok(()) => (End::Closed, false),
        Err(RelayError::TimedOut { timeout, in_flight }) => {
            let end = match timeout {
                Timeout::Idle => End::IdleTimeout,
                Timeout::HalfClosed => End::HalfClosedTimeout,
                Timeout::Lifetime => End::MaxLifetime,
            };
            (end, cut(*in_flight))
        }
        Err(RelayError::Cancelled { in_flight }) if abort.is_cancelled() => {
            (End::DrainDeadline, cut(*in_flight))
        }
        Err(RelayError::Cancelled { .. }) => {
            // Taken away (closed, quarantined, revoked, expired, the backend down or in
            // maintenance): always a reset.
            let cut = progress
                .record()
                .cut
                .reason()
                .or_else(|| registration.as_ref().and_then(|r| r.cut.reason()));
            let end = match cut {
                Some(cut) => End::from(cut),
                None if chosen.health.admin_state() == AdminState::Maint => End::BackendMaint,
                None => End::BackendDown,
            };
            (end, reset_both())
        }
        Err(RelayError::Io { side, source }) => {
            // Mirror an abort: the other side sees a reset too, never a clean end of stream.
            reset(match side {
                Side::Client => backend.tcp(),
                Side::Backend => client.tcp(),
            });
            (End::failed(*side, source), true)
        }
    }
}

/// Whether bytes wait unread in our socket (the relay stopped reading them).
fn unread(tcp: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut byte), Ok(n) if n > 0)
}

/// Whether the peer reset the connection since our last call that would have said so.
fn reset_pending(tcp: &TcpStream) -> bool {
    match socket2::SockRef::from(tcp).take_error() {
        Ok(Some(e)) => End::is_reset(&e),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_lifetime_lies_within_the_jitter_below_max_lifetime() {
        let (max, jitter) = (Duration::from_secs(600), Duration::from_secs(60));
        assert_eq!(super::lifetime(max, jitter, 0.0), max);
        assert_eq!(super::lifetime(max, jitter, 0.5), Duration::from_secs(570));
        assert!(super::lifetime(max, jitter, 0.999_999) > Duration::from_secs(540));
        assert_eq!(
            super::lifetime(max, jitter, 7.0),
            Duration::from_secs(540),
            "clamped"
        );
        // No overflow however large the configured values.
        assert!(super::lifetime(Duration::MAX, Duration::MAX, 0.5) < Duration::MAX);
        let unit = super::random_unit();
        assert!((0.0..1.0).contains(&unit), "{unit}");
    }
}
