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
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::ConnectFailed,
        Reason::NoHealthyBackend,
        Reason::TlsHandshake,
        Reason::Unauthorized,
        Reason::RateLimited,
        Reason::ProxyHeader,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ConnectFailed => "connect_failed",
            Reason::NoHealthyBackend => "no_healthy_backend",
            Reason::TlsHandshake => "tls_handshake",
            Reason::Unauthorized => "unauthorized",
            Reason::RateLimited => "rate_limited",
            Reason::ProxyHeader => "proxy_header",
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

/// Reload outcomes, carried from generation to generation.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub ok: Counter,
    pub failed: Counter,
}
