//! The SPIFFE Workload API's material as last delivered (`tls::svid::Material`: SVIDs and
//! bundles) and what happened on the way (updates, reconnections, errors), shared by every
//! generation: a reload builds its `source = "spiffe"` listeners and upstreams from what is
//! here, and a generation records which delivery it was built with, so that a refresh rebuilds
//! only when a new one came. A lost Workload API leaves the last delivery in place.
//!
//! This is a table and nothing more: `crate::workload` talks to the Workload API and offers
//! what it receives here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::Counter;
use crate::tls::svid::Material;

/// Why the Workload API gave no material to start with.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("source = \"spiffe\" but no Workload API address: set [spiffe] socket or the SPIFFE_ENDPOINT_SOCKET environment variable")]
    NoEndpoint,
    #[error(
        "no X509-SVID from the SPIFFE Workload API at {endpoint} within {} ([spiffe] startup_timeout): {reason}",
        humantime::format_duration(*timeout)
    )]
    Startup {
        endpoint: String,
        timeout: Duration,
        reason: String,
    },
}

/// The last material delivered, and the Workload API's counters.
#[derive(Debug, Default)]
pub(crate) struct WorkloadTable {
    material: Mutex<Option<Arc<Material>>>,
    /// Deliveries that changed the material (`fulcrum_workload_api_updates_total`).
    pub(crate) updates: Counter,
    /// Waits before connecting again after the stream broke (`…_reconnects_total`).
    pub(crate) reconnects: Counter,
    /// Failed calls and refused responses (`fulcrum_workload_api_errors_total`).
    pub(crate) errors: Counter,
}

impl WorkloadTable {
    /// The last material delivered, if any came yet.
    pub(crate) fn current(&self) -> Option<Arc<Material>> {
        self.lock().clone()
    }

    /// Takes `material` unless it equals the one held; true if it was taken (and counted).
    pub(crate) fn offer(&self, material: Material) -> bool {
        let mut held = self.lock();
        if held.as_deref() == Some(&material) {
            return false;
        }
        *held = Some(Arc::new(material));
        self.updates.inc();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Material>>> {
        self.material.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_material_offered_again_is_not_an_update_and_another_is() {
        let table = WorkloadTable::default();
        assert!(table.current().is_none());
        let first = Material::default();
        assert!(table.offer(first.clone()));
        assert!(!table.offer(first));
        let mut second = Material::default();
        second.bundles.insert("example.org".into(), Vec::new());
        assert!(table.offer(second.clone()));
        assert_eq!(table.current().as_deref(), Some(&second));
        assert_eq!(table.updates.get(), 2);
    }
}
