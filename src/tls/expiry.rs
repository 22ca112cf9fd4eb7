//! When the certificates a configuration relies on stop being valid: each listener's server
//! certificate, the earliest certificate of its client CA bundle and the earliest `nextUpdate`
//! of its CRLs, and the same for each of its `[[listener.tls.certificate]]` entries (a client
//! trust several share is reported once); each upstream's backend CA and client certificate;
//! the shared rate limit's Redis CA and client certificate. Read from the files the generation was loaded from (already checked
//! by the loaders: a file that no longer parses here is left out, not an error). Reported as
//! `fulcrum_certificate_not_after_timestamp_seconds`, in `/status` and by `fulcrum check`; and a
//! CRL past its `nextUpdate` is warned about when it passes it (`warn_at_crl_next_update`).

use std::path::Path;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Certificates, ServerTls};
use crate::config::{Config, TrustFiles};

/// Certificates expiring within this many days are warned about (`fulcrum check`, the status
/// page).
pub const WARN_DAYS: u64 = 14;

/// What a certificate is for; the `listener`, `upstream` (or neither, for Redis) label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Listener(String),
    Upstream(String),
    Redis,
}

/// One certificate (or CRL) deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub scope: Scope,
    /// Of a listener's `[[listener.tls.certificate]]` entry other than its fallback: the entry's
    /// first server name (the `certificate` label).
    pub certificate: Option<String>,
    /// `server`, `client_ca`, `crl_next_update`, `upstream_ca`, `upstream_cert`, `redis_ca`,
    /// `redis_cert`: the `kind` label.
    pub kind: &'static str,
    /// The certificate's `notAfter` (the earliest one, for a bundle), or the CRL's `nextUpdate`.
    pub not_after: SystemTime,
}

impl Expiry {
    /// Whole days left at `now` (negative once past).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(left) => (left.as_secs() / 86_400) as i64,
            Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
        }
    }

    /// Whether it is due within [`WARN_DAYS`] of `now` (or past).
    pub fn is_near(&self, now: SystemTime) -> bool {
        self.days_left(now) < WARN_DAYS as i64
    }

    /// `listener "edge" server certificate`, for messages.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            "server" => "server certificate",
            "client_ca" => "client CA (earliest in the bundle)",
            "crl_next_update" => "CRL nextUpdate (earliest)",
            "upstream_ca" => "backend CA (earliest in the bundle)",
            "upstream_cert" => "client certificate to the backends",
            "redis_ca" => "Redis CA (earliest in the bundle)",
            "redis_cert" => "client certificate to Redis",
            other => other,
        };
        match (&self.scope, &self.certificate) {
            (Scope::Listener(name), Some(entry)) => format!("listener {name:?} certificate {entry:?} {what}"),
            (Scope::Listener(name), None) => format!("listener {name:?} {what}"),
            (Scope::Upstream(name), _) => format!("upstream {name:?} {what}"),
            (Scope::Redis, _) => format!("[rate_limit.shared] {what}"),
        }
    }
}

/// Every deadline of `config`, with the CRLs as `listeners` (aligned with `config.listeners`)
/// loaded them.
pub fn of(config: &Config, listeners: &[Option<Certificates>]) -> Vec<Expiry> {
    let mut found = Vec::new();
    let mut add = |scope: &Scope, certificate: &Option<String>, kind, at: Option<SystemTime>| {
        if let Some(not_after) = at {
            found.push(Expiry {
                scope: scope.clone(),
                certificate: certificate.clone(),
                kind,
                not_after,
            });
        }
    };
    for (l, loaded) in config.listeners.iter().zip(listeners) {
        let Some(tls) = &l.tls else { continue };
        let scope = Scope::Listener(l.name.clone());
        let loaded = loaded.as_ref();
        // The fallback, then each entry that is not it (the default entry is).
        let entries = tls.certificates.iter().enumerate().filter(|(_, c)| !c.default);
        let certificates = std::iter::once((None, &tls.cert, tls.trust(), loaded.map(|l| &l.fallback)))
            .chain(entries.map(|(i, c)| {
                (
                    Some(c.label()),
                    &c.cert,
                    c.trust(),
                    loaded.and_then(|l| l.entries.get(i)),
                )
            }));
        let mut reported: Vec<TrustFiles<'_>> = Vec::new();
        for (certificate, cert, trust, server_tls) in certificates {
            add(&scope, &certificate, "server", first(cert));
            if reported.contains(&trust) {
                continue;
            }
            reported.push(trust);
            add(
                &scope,
                &certificate,
                "client_ca",
                trust.client_ca.and_then(earliest),
            );
            let next_update = server_tls.and_then(ServerTls::crl_next_update);
            add(&scope, &certificate, "crl_next_update", next_update);
        }
    }
    for u in &config.upstreams {
        let Some(tls) = &u.tls else { continue };
        let scope = Scope::Upstream(u.name.clone());
        add(&scope, &None, "upstream_ca", earliest(&tls.ca));
        add(
            &scope,
            &None,
            "upstream_cert",
            tls.client_cert.as_ref().and_then(|(c, _)| first(c)),
        );
    }
    let redis = config
        .rate_limit
        .as_ref()
        .and_then(|r| r.shared.as_ref()?.tls.as_ref());
    if let Some(tls) = redis {
        add(
            &Scope::Redis,
            &None,
            "redis_ca",
            tls.ca.as_deref().and_then(earliest),
        );
        add(
            &Scope::Redis,
            &None,
            "redis_cert",
            tls.client_cert.as_ref().and_then(|(c, _)| first(c)),
        );
    }
    found
}

/// The `notAfter` of every certificate in a PEM file, in file order.
fn not_afters(path: &Path) -> Vec<SystemTime> {
    let Ok(pem) = std::fs::read(path) else {
        return Vec::new();
    };
    CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .filter_map(|der| crate::identity::not_after(&der).ok())
        .collect()
}

/// The leaf's (the first certificate's) `notAfter`.
fn first(path: &Path) -> Option<SystemTime> {
    not_afters(path).first().copied()
}

/// The earliest `notAfter` in a bundle.
fn earliest(path: &Path) -> Option<SystemTime> {
    not_afters(path).into_iter().min()
}

/// Warns once per CRL when it passes its `nextUpdate` (at once if it already has): the CRL keeps
/// being applied, but the operator should fetch a fresh one. Stopped with its generation.
pub(crate) async fn warn_at_crl_next_update(
    mut deadlines: Vec<(String, String, SystemTime)>,
    stop: CancellationToken,
) {
    deadlines.sort_by_key(|(_, _, at)| *at);
    for (listener, issuer, at) in deadlines {
        while SystemTime::now() < at {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(crate::clock::until_wall(at, SystemTime::now())) => {}
            }
        }
        let next_update = humantime::format_rfc3339_seconds(at);
        warn!(
            %listener,
            %issuer,
            %next_update,
            "CRL is past its nextUpdate and is still applied: publish a fresh one and reload"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{Expiry, Scope};

    #[test]
    fn days_left_count_whole_days_and_go_negative_once_past() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let at = |secs: u64| Expiry {
            scope: Scope::Redis,
            certificate: None,
            kind: "redis_ca",
            not_after: now + Duration::from_secs(secs),
        };
        assert_eq!(at(3 * 86_400 + 5).days_left(now), 3);
        assert!(at(3 * 86_400).is_near(now));
        assert!(at(13 * 86_400 + 86_399).is_near(now));
        assert!(!at(14 * 86_400).is_near(now));
        let past = Expiry {
            not_after: now - Duration::from_secs(10),
            ..at(0)
        };
        assert_eq!(past.days_left(now), -1);
        assert!(past.is_near(now));
    }
}
