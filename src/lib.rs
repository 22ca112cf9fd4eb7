//! fulcrum: a layer-4 (TCP) load balancer.
//!
//! Each accepted connection goes to the backend with the fewest active connections relative to
//! its weight (ties round-robin) and bytes are copied both ways, half-close included, until both
//! sides end.
//!
//! # Crate map
//! Modules are listed top (what runs) to bottom (what it reads); every import points down, and
//! `scripts/module-graph` checks that no module imports, directly or through others, one that
//! imports it. This table is the crate map's source: `docs/design.md` shows it with each module's
//! files, and `tests/docs.rs` fails when the two differ (`FULCRUM_BLESS=1 cargo test --test docs`
//! regenerates the page).
//!
//! | module | owns |
//! |---|---|
//! | `server` | the run/shutdown/drain sequence ([`Server`]); `server::apply`: applying a reload or an in-memory rebuild; `server::listen`: binding sockets and the options they hand down, accept loops, the backlog at close; `server::workers`: the worker threads of `scheduler = "per_worker"`, one single-threaded runtime each |
//! | `connection` | one connection's phases: front, admission, limit, connect, relay, its end; its record in the table of open connections |
//! | [`verify`] | `fulcrum verify`: a certificate chain judged as a listener's handshake would |
//! | [`admin`] | the admin HTTP API (hyper + axum, TCP and Unix socket); [`admin::guard`] its token, CSRF and DNS rebinding rules (pure); [`admin::status`] (the `/status` snapshot and page) and [`admin::prometheus`] (`/metrics`, by prometheus-client) read the live state; `admin::impact`: `POST /impact`, the reload preview; `admin::connections` (`GET /connections`, `POST /connections/close`) and `admin::quarantine` (`/quarantine`) |
//! | [`reload`] | asking for a reload: the [`reload::Handle`], its request and result |
//! | [`probe`] | health probe loops, and applying probe and dial outcomes and operator states to the live model |
//! | [`health`] | backend health: rise/fall state, failures, admin states (pure) |
//! | `net` | dialing backends: dial, PROXY header, TLS to the backend, resource-exhaustion classification |
//! | [`state`] | the live model: one generation's listeners, upstreams, backends, [`state::Live`], the discovered address sets, why a generation cannot be brought up ([`state::ServerError`]), the CRLs fetched from distribution points (`state::fetched_crls`, over generations), the Workload API's last delivery ([`state::workload`], over generations); `state::registry`: every open connection (the table operators list and close) and, for mTLS ones, their grants and the task closing them at certificate expiry; [`state::build`]: assembling a generation from a loaded config; `state::impact`: which open connections a generation would close, for a reload and its preview; `state::certificates`: a TLS listener's certificates by SNI |
//! | `accesslog` | the JSON-lines access log: entries (interim ones too), the bounded queue, the writer task and its reopening (SIGUSR1) |
//! | [`ratelimit`] | the listener's [`ratelimit::Limiter`], keyed by `ClientKey`: [`ratelimit::local`] fixed windows (pure), [`ratelimit::shares`] (pure), [`ratelimit::slots`] (pure: `shared_concurrency`'s leased slots) and [`ratelimit::cluster`] (their Redis shell: `cluster::store` the connection and its health, `cluster::slots` the slot requests and the lease keeper) |
//! | [`tls`] | each listener's rustls configurations (TLS policy; one per certificate entry chosen by SNI), with one file each for the served stream (ClientHello, handshake and records on rustls' unbuffered API, buffers held only while bytes move), the client verifier, the session cache, client TLS (backends verified by name or `server_identity`, Redis), the provider and the key exchange order (one configuration per group, chosen from the ClientHello), reading PEM files and the fetched CRLs' cache files, the Workload API's SVIDs and bundles made into configurations ([`tls::svid`]); [`tls::expiry`] when the configured certificates expire, and the CRL `nextUpdate` warning |
//! | [`proxy`] | the two-way byte relay with half-close and per-side errors |
//! | [`proxy_protocol`] | PROXY protocol v1/v2 headers: the wire types, encoding and parsing, one file each (pure); [`proxy_protocol::reader`] reads one off a socket |
//! | `clock` | deadlines from configured or peer-supplied durations, saturating instead of panicking, and waits toward wall-clock times (pure) |
//! | `caps` | caps on open connections (process, listener) and on handshakes per source; RAII places; the splice pipe budget (pure); the open-file limit they derive from |
//! | [`balancer`] | weighted least-connections selection, caps, backups, the queue, and the lease that is a connection's count (pure) |
//! | [`quarantine`] | identities and certificate serials refused at admission until a time or a release, over reloads; own entries and the cluster's (pure table and the shared store) |
//! | [`authz`] | which identities (exact or by pattern) may reach which upstreams from where, deny entries, shadow tables; default deny (pure) |
//! | `trust` | the client trust boundary: anchors and intermediates, path building, name constraints, CRLs bound to their issuer's key, SPIFFE trust domains (pure) |
//! | [`identity`] | the client identity rule: verified leaf certificate -> name (pure) |
//! | [`metrics`] | counters, histograms and their buckets, rejection reasons; [`metrics::identities`] the bounded per-identity table (pure) |
//! | [`logging`] | the process's log lines: the subscriber, its non-blocking stderr writer, the text (colour only on a terminal) and JSON line formats |
//! | [`systemd`] | what systemd passes and expects: the listening sockets of socket activation (checked, with their names) and the notifications (ready, reloading, stopping, watchdog pings); a shell over listenfd and sd-notify |
//! | `watch` | `[reload] watch`: reloading when the config file or a file it names changes |
//! | `crl_fetch` | `crl_urls`: fetching each mTLS listener's CRLs over HTTP before their `nextUpdate` (the schedule is pure), checking them as a `crl` file's, and rebuilding the generation when one is taken |
//! | `workload` | `source = "spiffe"`: the SPIFFE Workload API client (the `spiffe` crate), waiting for the first X509-SVID at start, keeping the last material when the agent is lost, and rebuilding the generation when a rotation arrives |
//! | `discovery` | `discover`: resolving upstreams' names (hickory) and rebuilding when their address sets change |
//! | `throttle` | the throttle on log lines a peer can cause |
//! | [`config`] | TOML -> validated [`Config`]; every rule about valid configuration (pure), one file per section under `config/`; the files a config is made of and their fingerprint; its JSON Schema (`docs/fulcrum.schema.json`, from the raw tables) |
//! | `addr` | addresses and prefixes: the values several rooms use (`IpNet`, `SourcePrefixes`, public as [`config::IpNet`] and [`config::SourcePrefixes`]); pure |
//! | [`ctl`] | `fulcrum ctl`: a client of the admin API; `ctl::describe`: its answers as text for a person |
//! | [`pki`] | development certificates for `fulcrum certs`, the demo and tests |
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
//! counts against its backend until dropped; so does the rate limiter
//! ([`ratelimit::RateLimiter`]).

mod accesslog;
mod addr;
pub mod admin;
pub mod authz;
pub mod backend;
pub mod balancer;
mod caps;
mod clock;
pub mod config;
mod connection;
mod crl_fetch;
pub mod ctl;
pub mod demo;
mod discovery;
pub mod health;
pub mod identity;
pub mod logging;
pub mod metrics;
mod net;
pub mod pki;
pub mod probe;
pub mod proxy;
pub mod proxy_protocol;
pub mod quarantine;
pub mod ratelimit;
pub mod reload;
mod server;
pub mod state;
pub mod systemd;
mod throttle;
pub mod tls;
mod trust;
pub mod verify;
mod watch;
mod workload;

pub use config::Config;
pub use server::Server;
pub use state::build::{check, validate, Checked};
pub use state::ServerError;
/// Re-exported so library users can stop a [`Server`] without depending on tokio-util.
pub use tokio_util::sync::CancellationToken;
pub use workload::check_connected;
