//! Applying fetched CRLs to a listener's loaded certificates: the fallback's verifier (and that
//! of every entry sharing it) made again with the CRLs the shared table holds for the listener's
//! URLs beside the `crl` file's, in a server configuration around the same certificate and key;
//! and, at load, the table filled from `crl_cache_dir` for URLs without a CRL yet. Every CRL is
//! checked against the client trust here, a cached one as a fetched one. Reads only the cache.

use std::sync::Arc;

use rustls::pki_types::CertificateRevocationListDer;
use tracing::{error, info, warn};

use crate::config::{CrlFetch, TlsConfig};
use crate::state::fetched_crls::FetchedCrls;
use crate::tls::{Certificates, ServerTls};

/// Reads from `crl_cache_dir` the CRL of each URL of `listener` that has none in `fetched`,
/// checked against the client trust as a fetched one is.
pub(super) fn restore_cached(
    listener: &str,
    fetch: &CrlFetch,
    certificates: &Certificates,
    fetched: &FetchedCrls,
) {
    let (Some(dir), Some(verifier)) = (&fetch.cache_dir, &certificates.fallback.verifier) else {
        return;
    };
    let seen = fetch.from_certificates.then(|| fetched.seen(listener));
    for url in verifier.crl_urls(fetch, seen.as_deref()).0 {
        if fetched.holds(listener, &url) {
            continue;
        }
        let der = match crate::tls::crl_cache::read(dir, &url, fetch.max_size) {
            Ok(Some(bytes)) => CertificateRevocationListDer::from(bytes),
            Ok(None) => continue,
            Err(e) => {
                warn!(listener, url, error = %e, "the cached CRL cannot be read; waiting for the first fetch");
                continue;
            }
        };
        match verifier.check_crl(&der) {
            Ok(crl) => {
                fetched.offer(listener, &url, der, crl, None);
                info!(listener, url, "CRL restored from crl_cache_dir");
            }
            Err(e) => {
                warn!(listener, url, error = %e, "the cached CRL is not usable; waiting for the first fetch")
            }
        }
    }
}

/// Makes the fallback's verifier of `listener` (and of every entry sharing it) again with the
/// fetched CRLs of its URLs beside the file's.
pub(super) fn apply(
    listener: &str,
    tls: &TlsConfig,
    fetch: &CrlFetch,
    certificates: &mut Certificates,
    fetched: &FetchedCrls,
) {
    let Some(base) = certificates.fallback.verifier.clone() else {
        return;
    };
    let seen = fetch.from_certificates.then(|| fetched.seen(listener));
    let held = fetched.held(listener, &base.crl_urls(fetch, seen.as_deref()).0);
    let ders: Vec<_> = held.iter().map(|(_, h)| h.der.clone()).collect();
    let (verifier, crls, unusable) = base.with_fetched(&ders, seen);
    for (i, e) in unusable {
        let url = held.get(i).map_or("", |(url, _)| url.as_str());
        warn!(listener, url, error = %e, "a fetched CRL is not signed by a CA of the client trust now; it is left out");
    }
    let verifier = Arc::new(verifier);
    let rebuild = |served: &mut ServerTls| {
        if !served.verifier.as_ref().is_some_and(|v| Arc::ptr_eq(v, &base)) {
            return;
        }
        // Not expected to fail: the same versions built this configuration at load.
        match served.with_verifier(Arc::clone(&verifier), crls.clone(), tls.min_version) {
            Ok(rebuilt) => *served = rebuilt,
            Err(e) => error!(listener, error = %e, "the fetched CRLs cannot be applied"),
        }
    };
    rebuild(&mut certificates.fallback);
    certificates.entries.iter_mut().for_each(rebuild);
}
