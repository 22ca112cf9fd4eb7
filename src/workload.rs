//! The SPIFFE Workload API as a source of TLS material (`source = "spiffe"`): one connection
//! per process to the agent's socket (`[spiffe] socket`, else `SPIFFE_ENDPOINT_SOCKET`),
//! through the `spiffe` crate's `X509Source`, which streams X509-SVIDs and bundles and
//! reconnects with backoff. Each delivery that changes what is held goes to the shared table
//! (`state::workload`) and asks the run loop to rebuild the generation from memory
//! (`reload::Change::Refresh`): new handshakes get the rotated SVID, open connections stay, and
//! those a changed bundle no longer trusts are closed as a reload closes them.
//!
//! Startup (and `fulcrum check`, and a reload that first needs it) waits for the first
//! delivery up to `[spiffe] startup_timeout`, then fails with [`WorkloadError`]. A lost socket
//! keeps the last material; reconnections and errors are counted and logged. This is the I/O
//! shell: what the material makes is `tls::svid`'s.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spiffe::x509_source::{MetricsErrorKind, MetricsRecorder};
use spiffe::{X509Context, X509Source, X509SourceBuilder};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, SpiffeConfig};
use crate::reload::Handle;
use crate::state::build::Checked;
use crate::state::workload::{WorkloadError, WorkloadTable};
use crate::state::ServerError;
use crate::tls::svid::{Material, Svid};

/// How long stopping the Workload API client may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected Workload API client that delivered at least once.
pub(crate) struct Agent {
    source: X509Source,
    settings: SpiffeConfig,
}

impl Agent {
    /// Connects and waits for the first delivery (up to `startup_timeout`), which it offers to
    /// `table`.
    pub(crate) async fn start(
        settings: &SpiffeConfig,
        table: &Arc<WorkloadTable>,
    ) -> Result<Agent, WorkloadError> {
        let endpoint = match &settings.socket {
            Some(socket) => socket.clone(),
            None => std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| WorkloadError::NoEndpoint)?,
        };
        let builder = X509SourceBuilder::new()
            .endpoint(&endpoint)
            .initial_sync_timeout(settings.startup_timeout)
            .shutdown_timeout(Some(STOP_TIMEOUT))
            .metrics(Arc::new(Recorder(Arc::clone(table))));
        // The crate bounds the first sync itself; this bounds the rest of `build` too.
        let built = tokio::time::timeout(settings.startup_timeout + STOP_TIMEOUT, builder.build()).await;
        let source = match built {
            Ok(Ok(source)) => source,
            Ok(Err(e)) => return Err(startup(&endpoint, settings, e.to_string())),
            Err(_) => return Err(startup(&endpoint, settings, "timed out".into())),
        };
        let context = source
            .x509_context()
            .map_err(|e| startup(&endpoint, settings, e.to_string()))?;
        table.offer(material(&context));
        info!(
            endpoint,
            svids = context.svids().len(),
            bundles = context.bundle_set().len(),
            "X509-SVIDs and bundles received from the Workload API"
        );
        Ok(Agent {
            source,
            settings: settings.clone(),
        })
    }

    /// The `[spiffe]` settings it was started with.
    pub(crate) fn settings(&self) -> &SpiffeConfig {
        &self.settings
    }

    /// Offers every later delivery to `table` and, when it changed what is held, asks for the
    /// generation to be rebuilt with it; until `stop`.
    pub(crate) async fn watch(self, table: Arc<WorkloadTable>, handle: Handle, stop: CancellationToken) {
        let mut updates = self.source.updated();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = updates.changed() => if let Err(e) = changed {
                    warn!(error = %e, "the Workload API client stopped; the last SVID and bundles stay in use");
                    break;
                },
            }
            let context = match self.source.state().context() {
                Ok(context) => context,
                Err(e) => {
                    table.errors.inc();
                    warn!(error = %e, "the Workload API withdrew the SVIDs; the last ones stay in use until it delivers again");
                    continue;
                }
            };
            if !table.offer(material(&context)) {
                continue;
            }
            info!(
                svids = context.svids().len(),
                bundles = context.bundle_set().len(),
                "new X509-SVIDs or bundles from the Workload API; applying them"
            );
            if let Err(e) = handle.refresh().await {
                warn!(error = %e, "the Workload API's new material could not be applied");
            }
        }
        let _ = self.source.shutdown_with_timeout(STOP_TIMEOUT).await;
    }
}

/// `fulcrum check`: [`crate::check`], with the Workload API's first delivery when a TLS side
/// has `source = "spiffe"` (waiting up to `[spiffe] startup_timeout`, as startup does).
pub async fn check_connected(config: &Config) -> Result<Checked, ServerError> {
    let table = Arc::new(WorkloadTable::default());
    if config.uses_spiffe() {
        let agent = Agent::start(&config.spiffe, &table).await?;
        let _ = agent.source.shutdown_with_timeout(STOP_TIMEOUT).await;
    }
    crate::state::build::check_with(config, &table)
}

fn startup(endpoint: &str, settings: &SpiffeConfig, reason: String) -> WorkloadError {
    WorkloadError::Startup {
        endpoint: endpoint.to_string(),
        timeout: settings.startup_timeout,
        reason,
    }
}

/// The material of one delivery, as DER values.
fn material(context: &X509Context) -> Material {
    let svids = context
        .svids()
        .iter()
        .map(|svid| Svid {
            id: svid.spiffe_id().to_string(),
            chain: svid
                .cert_chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
            key: PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()),
        })
        .collect();
    let bundles = context
        .bundle_set()
        .iter()
        .map(|(domain, bundle)| {
            let certs = bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect();
            (domain.as_str().to_string(), certs)
        })
        .collect();
    Material { svids, bundles }
}

/// Counts what the Workload API client reports, and logs it.
struct Recorder(Arc<WorkloadTable>);

impl MetricsRecorder for Recorder {
    fn record_update(&self) {}

    fn record_reconnect(&self) {
        self.0.reconnects.inc();
        warn!(
            reconnects = self.0.reconnects.get(),
            "the Workload API connection was lost; reconnecting with backoff, the last SVID and bundles stay in use"
        );
    }

    fn record_error(&self, kind: MetricsErrorKind) {
        // Counted; logged with the reconnection that follows (one warning per attempt).
        self.0.errors.inc();
        tracing::debug!(error = kind.as_str(), "Workload API error");
    }
}
