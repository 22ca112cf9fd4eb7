//! The counters fulcrum keeps, and why connections are refused.
//!
//! Counters and histograms are plain atomics embedded in the live state (one set per listener,
//! upstream and backend), so the connection path never looks anything up by name or takes a
//! lock; the per-identity table ([`identities`]) is the one exception, a short mutex per open,
//! close and refusal of an identified client. This module owns the counter types, the histogram
//! buckets and the rejection reasons (their labels are public contract); the Prometheus text that
//! exposes them is rendered on the admin side (`admin::prometheus`). Nothing here does I/O.

use std::sync::atomic::{AtomicU64, Ordering};

pub mod identities;

pub use identities::Identities;

/// Why a connection was closed without being proxied. The label values are public contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Every backend tried refused or timed out.
    ConnectFailed,
    /// The upstream has no backend in rotation.
    NoHealthyBackend,
    /// The TLS handshake failed or missed its deadline (includes bad or missing client certificates).
    TlsHandshake,
    /// The client's identity may not reach the upstream, or its certificate names no usable identity.
    Unauthorized,
    /// A deny entry of the authorization table matches the client's identity.
    Denied,
    /// The client's source is outside the listener's `allow_from`, inside its `deny_from`
    /// (refused at accept, before any handshake), or outside the networks its grant lists.
    SourceDenied,
    /// Over the client's connection rate or concurrency limit.
    RateLimited,
    /// The client's identity or certificate serial is quarantined (`fulcrum ctl quarantine`).
    Quarantined,
    /// `accept_proxy_protocol`: a missing, malformed or late PROXY protocol header.
    ProxyHeader,
    /// The process's or the listener's `max_connections` was reached (closed before any
    /// handshake).
    MaxConnections,
    /// `max_handshakes_per_source` connections from the client's source are already in the
    /// PROXY-header or TLS-handshake phase.
    HandshakeLimit,
    /// `trusted_proxies`: a peer that is not a trusted front (refused before its header is read).
    UntrustedProxy,
    /// Every backend is at its `max_connections` and the upstream's queue is full (or
    /// `queue_size` is 0).
    QueueFull,
    /// Waited `queue_timeout` in the upstream's queue without a backend freeing a slot.
    QueueTimeout,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::ConnectFailed,
        Reason::NoHealthyBackend,
        Reason::TlsHandshake,
        Reason::Unauthorized,
        Reason::Denied,
        Reason::SourceDenied,
        Reason::RateLimited,
        Reason::Quarantined,
        Reason::ProxyHeader,
        Reason::MaxConnections,
        Reason::HandshakeLimit,
        Reason::UntrustedProxy,
        Reason::QueueFull,
        Reason::QueueTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ConnectFailed => "connect_failed",
            Reason::NoHealthyBackend => "no_healthy_backend",
            Reason::TlsHandshake => "tls_handshake",
            Reason::Unauthorized => "unauthorized",
            Reason::Denied => "denied",
            Reason::SourceDenied => "source_denied",
            Reason::RateLimited => "rate_limited",
            Reason::Quarantined => "quarantined",
            Reason::ProxyHeader => "proxy_header",
            Reason::MaxConnections => "max_connections",
            Reason::HandshakeLimit => "handshake_limit",
            Reason::UntrustedProxy => "untrusted_proxy",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
        }
    }
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// Bytes moved through connections, each way, counted as they move (not only at close).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Client to backend.
    pub up: Counter,
    /// Backend to client.
    pub down: Counter,
}

impl Traffic {
    pub fn add(&self, up: u64, down: u64) {
        if up > 0 {
            self.up.add(up);
        }
        if down > 0 {
            self.down.add(down);
        }
    }
}

/// Bucket upper bounds (seconds) of `fulcrum_tls_handshake_duration_seconds`: a full mTLS
/// handshake on loopback takes about 0.5 ms of CPU; a client across the world adds round trips
/// of up to 0.3 s; the default `handshake_timeout` is 10 s.
pub const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket upper bounds (seconds) of `fulcrum_backend_connect_duration_seconds`: a dial in one
/// data centre takes 0.1-1 ms; the default `connect_timeout` is 3 s.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Bucket upper bounds (seconds) of `fulcrum_connection_duration_seconds`: from one request
/// (milliseconds) to streams held for days (a minute, 5 min, 30 min, an hour, 6 h, a day, a week).
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0, 604800.0,
];
/// Bucket upper bounds (seconds) of `fulcrum_queue_wait_seconds`, up to well past the default
/// `queue_timeout` of 5 s.
pub const QUEUE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram of durations: lock-free, one atomic add per bucket and two for the sum and count
/// per observation.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending; `+Inf` is implicit.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), the last one above every bound.
    counts: Box<[Counter]>,
    /// The sum of all observations, in microseconds.
    sum_micros: Counter,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum_micros: Counter::default(),
        }
    }

    pub fn observe(&self, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self.bounds.partition_point(|&bound| bound < seconds);
        if let Some(count) = self.counts.get(bucket) {
            count.inc();
        }
        self.sum_micros
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// The sum in seconds, the count, and each bucket's upper bound (`+Inf` last) with the
    /// observations in it, not cumulative (the encoder accumulates them).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, count)| (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), count.get()))
            .collect();
        let total = buckets.iter().map(|(_, n)| n).sum();
        (self.sum_micros.get() as f64 / 1e6, total, buckets)
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(Counter::get).sum()
    }
}

/// A listener's latency and traffic figures (carried over reloads with the listener's name).
#[derive(Debug)]
pub struct ListenerFigures {
    /// Completed TLS handshakes (TLS listeners).
    pub handshake: Histogram,
    /// Proxied connections, from accept to close.
    pub duration: Histogram,
    pub bytes: Traffic,
}

impl Default for ListenerFigures {
    fn default() -> ListenerFigures {
        ListenerFigures {
            handshake: Histogram::new(HANDSHAKE_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
            bytes: Traffic::default(),
        }
    }
}

/// An upstream's latency figures (carried over reloads with the upstream's name).
#[derive(Debug)]
pub struct UpstreamFigures {
    /// Dials that succeeded, from the first SYN to the connection (and backend TLS) being ready.
    pub connect: Histogram,
    /// Waits in the queue that ended, served or timed out.
    pub queue: Histogram,
}

impl Default for UpstreamFigures {
    fn default() -> UpstreamFigures {
        UpstreamFigures {
            connect: Histogram::new(CONNECT_BUCKETS),
            queue: Histogram::new(QUEUE_BUCKETS),
        }
    }
}

/// Per-listener rejection counts, one per [`Reason`].
#[derive(Debug, Default)]
pub struct Rejections([Counter; Reason::ALL.len()]);

impl Rejections {
    pub fn inc(&self, reason: Reason) {
        self.0[reason as usize].inc();
    }

    pub fn get(&self, reason: Reason) -> u64 {
        self.0[reason as usize].get()
    }
}

/// What a listener's shadow authorization table would have decided, per upstream
/// (`fulcrum_authorization_shadow_total`): only listeners with a shadow table count, and only
/// upstreams their clients asked for, so the map stays as small as the routes.
#[derive(Debug, Default)]
pub struct ShadowVerdicts(std::sync::Mutex<std::collections::BTreeMap<(String, bool), u64>>);

impl ShadowVerdicts {
    /// One admission judged by the shadow table: it would have allowed (`true`) or refused.
    pub fn count(&self, upstream: &str, would_allow: bool) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get_mut(&(upstream.to_string(), would_allow)) {
            Some(n) => *n += 1,
            None => {
                counts.insert((upstream.to_string(), would_allow), 1);
            }
        }
    }

    /// `(upstream, would_allow, count)`, sorted.
    pub fn counts(&self) -> Vec<(String, bool, u64)> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .map(|((u, allow), n)| (u.clone(), *allow, *n))
            .collect()
    }
}

/// Why a TLS handshake failed: the `reason` of `fulcrum_tls_handshake_failures_total` and of the
/// refusal's log line. The label values are public contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// An mTLS listener's client presented no certificate.
    NoCertificate,
    /// The client's certificate does not chain to the listener's `client_ca` (or its signature
    /// does not verify).
    UnknownCa,
    /// The client's certificate (or one in its chain) is past its `notAfter`.
    Expired,
    /// The client's certificate (or one in its chain) is before its `notBefore`.
    NotYetValid,
    /// A CRL of `[listener.tls] crl` revokes the client's certificate (or one in its chain).
    Revoked,
    /// No CRL of `[listener.tls] crl` covers an issuer in the client's chain.
    RevocationUnknown,
    /// The certificate's key usage does not allow client authentication.
    BadUsage,
    /// A name on the chain, or the identity itself, is outside the name constraints of a CA on
    /// the verified path.
    NameConstraints,
    /// The certificate's SPIFFE ID is of a trust domain the listener's `trust_domains` lacks.
    TrustDomain,
    /// Another certificate fault (malformed, unsupported).
    BadCertificate,
    /// The client offered ALPN protocols, none of which the listener speaks (`alpn`).
    NoApplicationProtocol,
    /// The client offered no ALPN at all, on a listener with `alpn_required`.
    NoAlpn,
    /// The client broke the TLS protocol, offered nothing we accept, or sent an alert.
    Protocol,
    /// The client closed or reset the connection during the handshake.
    Closed,
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 15] = [
        HandshakeFailure::NoCertificate,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::Expired,
        HandshakeFailure::NotYetValid,
        HandshakeFailure::Revoked,
        HandshakeFailure::RevocationUnknown,
        HandshakeFailure::BadUsage,
        HandshakeFailure::NameConstraints,
        HandshakeFailure::TrustDomain,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::NoApplicationProtocol,
        HandshakeFailure::NoAlpn,
        HandshakeFailure::Protocol,
        HandshakeFailure::Closed,
        HandshakeFailure::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::NotYetValid => "not_yet_valid",
            HandshakeFailure::Revoked => "revoked",
            HandshakeFailure::RevocationUnknown => "revocation_unknown",
            HandshakeFailure::BadUsage => "bad_usage",
            HandshakeFailure::NameConstraints => "name_constraints",
            HandshakeFailure::TrustDomain => "trust_domain",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::NoApplicationProtocol => "no_application_protocol",
            HandshakeFailure::NoAlpn => "no_alpn",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Timeout => "timeout",
        }
    }
}

/// Per-listener handshake failure counts, one per [`HandshakeFailure`].
#[derive(Debug, Default)]
pub struct HandshakeFailures([Counter; HandshakeFailure::ALL.len()]);

impl HandshakeFailures {
    pub fn inc(&self, failure: HandshakeFailure) {
        self.0[failure as usize].inc();
    }

    pub fn get(&self, failure: HandshakeFailure) -> u64 {
        self.0[failure as usize].get()
    }
}

/// Reload outcomes, carried from generation to generation.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub ok: Counter,
    pub failed: Counter,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Histogram;

    #[test]
    fn a_histogram_puts_each_observation_in_the_first_bucket_at_or_above_it() {
        let h = Histogram::new(&[0.001, 0.01, 1.0]);
        for micros in [500, 1_000, 1_001, 9_000, 2_000_000] {
            h.observe(Duration::from_micros(micros));
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 2.011501).abs() < 1e-9, "{sum}");
        assert_eq!(buckets, [(0.001, 2), (0.01, 2), (1.0, 0), (f64::INFINITY, 1)]);
        assert_eq!(h.count(), 5);
    }
}
