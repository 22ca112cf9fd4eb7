//! The counters fulcrum keeps, and why connections are refused.
//!
//! Counters are plain atomics embedded in the live state (one per listener, one per backend), so
//! the connection path never looks anything up by name. This module owns the counter types and
//! the rejection reasons (their labels are public contract); the Prometheus text that exposes
//! them is rendered on the admin side (`admin::prometheus`). Nothing here does I/O.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Over the client's connection rate or concurrency limit.
    RateLimited,
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
    pub const ALL: [Reason; 11] = [
        Reason::ConnectFailed,
        Reason::NoHealthyBackend,
        Reason::TlsHandshake,
        Reason::Unauthorized,
        Reason::RateLimited,
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
            Reason::RateLimited => "rate_limited",
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

/// Waits in an upstream's queue that ended (served or timed out), and their total length:
/// `fulcrum_upstream_queue_wait_seconds` (`_count`, `_sum`).
#[derive(Debug, Default)]
pub struct QueueWaits {
    pub ended: Counter,
    pub micros: Counter,
}

impl QueueWaits {
    pub fn record(&self, waited: std::time::Duration) {
        self.ended.inc();
        self.micros
            .add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
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
    pub const ALL: [HandshakeFailure; 13] = [
        HandshakeFailure::NoCertificate,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::Expired,
        HandshakeFailure::NotYetValid,
        HandshakeFailure::Revoked,
        HandshakeFailure::RevocationUnknown,
        HandshakeFailure::BadUsage,
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
