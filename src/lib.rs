//! fulcrum: a layer-4 (TCP) load balancer.
//!
//! Each accepted connection goes to the backend with the fewest active connections (ties
//! round-robin) and bytes are copied both ways, half-close included, until both sides end.
//!
//! # Crate map
//! | module | owns |
//! |---|---|
//! | [`config`] | TOML -> validated [`Config`]; every rule about valid configuration (pure) |
//! | [`balancer`] | least-connections selection and the lease that is a connection's count (pure) |
//! | [`proxy`] | the two-way byte relay with half-close and per-side errors |
//! | [`proxy_protocol`] | PROXY protocol v1/v2 headers: encoding and incremental parsing (pure) |
//! | [`server`] | binding, accept loops, live state generations, reload, shutdown and drain |
//! | [`reload`] | reload requests and results, and which open connections lose access |
//! | [`connection`] | one connection's steps in order: handshake, authz, limit, dial, relay, log |
//! | [`health`] | backend health: rise/fall state (pure), probes, passive detection, transitions |
//! | [`tls`] | certificate loading and each listener's rustls configuration (TLS policy) |
//! | [`identity`] | the client identity rule: verified leaf certificate -> name (pure) |
//! | [`authz`] | which identities may reach which upstreams, default deny (pure) |
//! | [`ratelimit`] | per-client fixed-window connection limits and concurrency caps (pure) |
//! | [`sharedlimit`] | the listener's limiter; the cluster-wide limiter's Redis shell and fallback |
//! | [`pki`] | development certificates for `fulcrum certs`, the demo and tests |
//! | [`metrics`] | counters, rejection reasons and Prometheus rendering |
//! | [`admin`] | the admin HTTP listener (`/`, `/status`, `/metrics`, `/healthz`) |
//! | [`status`] | the `/status` JSON snapshot of live state (pure) and the status page |
//! | [`accesslog`] | the JSON-lines access log: entries, the bounded queue, the writer task |
//! | [`backend`] | the demo backend (`fulcrum backend`) |
//! | [`demo`] | `fulcrum demo` |
//!
//! # Use as a library
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = fulcrum::Config::load("fulcrum.toml".as_ref())?;
//! let server = fulcrum::Server::bind(config).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! server.run(shutdown).await; // returns after `shutdown.cancel()` and the drain
//! # Ok(()) }
//! ```
//! The balancer works on its own too: [`balancer::Pool::pick`] returns a [`balancer::Lease`] that
//! counts against its backend until dropped.

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod backend;
pub mod balancer;
pub mod config;
pub mod connection;
pub mod demo;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod sharedlimit;
pub mod status;
pub mod tls;

pub use config::Config;
pub use server::Server;
/// Re-exported so library users can stop a [`Server`] without depending on tokio-util.
pub use tokio_util::sync::CancellationToken;
