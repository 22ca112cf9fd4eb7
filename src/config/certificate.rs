//! `[[listener.tls.certificate]]`: the certificates a TLS listener chooses among by the server
//! name the client sends (SNI), each with its own client trust and authorization
//! ([`CertificateConfig`]); their names ([`ServerName`]); the one rule choosing an entry for a
//! name ([`select`]); and every rule about valid entries (names well formed and listed once on
//! the listener, at most one `default`, client trust the entry's own or the listener's whole, an
//! entry's `authorization` only with client certificates). The trust-domain keys the listener and
//! its entries share are checked here too, and [`TrustFiles`] is their client trust as the
//! verifier is loaded from it.
//!
//! Pure: it reads no file (`tls` loads the certificates) and must not decide the listener-level
//! keys (`listener.rs` does, from what this returns).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::authorization::{AuthorizationConfig, RawAuthorization};
use super::upstream::UpstreamConfig;
use super::values::{ConfigError, Validator};

/// A server name of a certificate entry, lowercase: exact (`a.example`), or `*.` then a suffix,
/// which stands for exactly one label before the suffix, as in a certificate (`*.b.example`
/// covers `x.b.example`, not `b.example` nor `y.x.b.example`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerName {
    /// Lowercase; for a wildcard, what follows `*.`.
    name: String,
    wildcard: bool,
}

impl ServerName {
    /// Parses a name as written in `server_names` (compared without regard to ASCII case).
    pub fn parse(text: &str) -> Result<ServerName, &'static str> {
        let lower = text.to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(suffix) => (suffix.to_string(), true),
            None => (lower, false),
        };
        if name.is_empty() || name.len() > 253 {
            return Err("a server name is 1 to 253 characters");
        }
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
        };
        if !name.split('.').all(label_ok) {
            return Err(
                "expected a DNS name (labels of letters, digits, '-' and '_' between dots), or '*.' and one",
            );
        }
        if name.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit())) {
            return Err("an IP address is never sent as SNI (such clients get the fallback certificate)");
        }
        Ok(ServerName { name, wildcard })
    }

    /// Whether `server_name` is this (exact) name, ASCII case ignored.
    pub fn is(&self, server_name: &str) -> bool {
        !self.wildcard && self.name.eq_ignore_ascii_case(server_name)
    }

    /// Whether this wildcard covers `server_name`: one non-empty label, a dot, then the suffix.
    pub fn covers(&self, server_name: &str) -> bool {
        self.wildcard
            && server_name
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(&self.name))
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// The one rule choosing a listener's certificate for the server name a client sent: the entry
/// (by position in `entries`, each given by its server names) that lists `server_name` exactly,
/// else the one with a wildcard covering it. `None` (no SNI, or a name no entry lists): the
/// listener's fallback, the `default = true` entry or else the listener-level certificate. A
/// name is listed once per listener (config validation), so at most one entry lists it exactly
/// and at most one wildcard covers it.
pub fn select<'a, I>(entries: I, server_name: Option<&str>) -> Option<usize>
where
    I: IntoIterator<Item = &'a [ServerName]>,
    I::IntoIter: Clone,
{
    let name = server_name?;
    let entries = entries.into_iter();
    entries
        .clone()
        .position(|names| names.iter().any(|n| n.is(name)))
        .or_else(|| {
            entries
                .into_iter()
                .position(|names| names.iter().any(|n| n.covers(name)))
        })
}

/// The client trust of one certificate (the listener's or an entry's): the files its verifier
/// is loaded from. Certificates with equal trust share one verifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustFiles<'a> {
    pub client_ca: Option<&'a Path>,
    pub trust_domains: &'a BTreeMap<String, PathBuf>,
    pub crl: Option<&'a Path>,
}

impl<'a> TrustFiles<'a> {
    /// The trust of these settings (of `[listener.tls]`, an entry or a resolved one).
    pub(super) fn of(
        client_ca: &'a Option<PathBuf>,
        trust_domains: &'a BTreeMap<String, PathBuf>,
        crl: &'a Option<PathBuf>,
    ) -> TrustFiles<'a> {
        TrustFiles {
            client_ca: client_ca.as_deref(),
            trust_domains,
            crl: crl.as_deref(),
        }
    }

    /// Whether clients must present a certificate verified by this trust (mTLS).
    pub fn verifies_clients(&self) -> bool {
        self.client_ca.is_some() || !self.trust_domains.is_empty()
    }
}

/// One `[[listener.tls.certificate]]` entry. Paths are resolved against the config file's
/// directory.
#[derive(Clone, Debug)]
pub struct CertificateConfig {
    /// The names it is served for, each listed once on its listener; empty only on the default
    /// entry.
    pub server_names: Vec<ServerName>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key matching `cert`.
    pub key: PathBuf,
    /// Client trust, as `[listener.tls]`'s: the entry's own, or, when it sets neither
    /// `client_ca` nor `trust_domains`, the listener's `client_ca`, `trust_domains` and `crl`
    /// together.
    pub client_ca: Option<PathBuf>,
    pub trust_domains: BTreeMap<String, PathBuf>,
    pub crl: Option<PathBuf>,
    /// The entry's own `authorization`, in place of the listener's for its clients.
    pub authorization: Option<AuthorizationConfig>,
    /// Served to clients whose SNI names no entry (or who send none).
    pub default: bool,
}

impl CertificateConfig {
    /// Its client trust.
    pub fn trust(&self) -> TrustFiles<'_> {
        TrustFiles::of(&self.client_ca, &self.trust_domains, &self.crl)
    }

    /// The name it is known by in messages and labels: its first server name (the default
    /// entry may have none).
    pub fn label(&self) -> String {
        self.server_names
            .first()
            .map_or_else(|| "default".to_string(), ToString::to_string)
    }
}

/// `[[listener.tls.certificate]]`: another certificate of the listener, chosen by the client's SNI.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    /// DNS names (compared without regard to case), or `*.` and a name for exactly one label; a
    /// name is listed once on the listener; no IP address. Required, not empty, unless
    /// `default = true`.
    #[serde(default)]
    server_names: Vec<String>,
    /// PEM certificate chain, leaf first.
    cert: PathBuf,
    /// PEM key (PKCS#8, PKCS#1 or SEC1) matching `cert`.
    key: PathBuf,
    /// The entry's own client trust (with `trust_domains` and `crl`), in place of the listener's:
    /// PEM file of CA certificates.
    client_ca: Option<PathBuf>,
    /// The entry's own trust domain -> PEM bundle table, in place of the listener's.
    #[serde(default)]
    trust_domains: BTreeMap<String, PathBuf>,
    /// PEM file of CRLs; needs `client_ca` or `trust_domains` in the entry.
    crl: Option<PathBuf>,
    /// The entry's own `[authorization]` table for clients it serves, in place of the listener's;
    /// needs client certificates.
    #[schemars(with = "Option<super::authorization::AuthorizationTable>")]
    authorization: Option<RawAuthorization>,
    /// `true` on at most one entry: served when SNI names no entry (`[listener.tls]` then has no
    /// `cert` and `key`).
    #[serde(default)]
    default: bool,
}

/// Client trust settings, validated and resolved against the config directory: the listener's,
/// which entries without their own inherit.
#[derive(Clone, Debug, Default)]
pub(super) struct ClientTrust {
    pub(super) client_ca: Option<PathBuf>,
    pub(super) trust_domains: BTreeMap<String, PathBuf>,
    pub(super) crl: Option<PathBuf>,
}

impl ClientTrust {
    pub(super) fn files(&self) -> TrustFiles<'_> {
        TrustFiles::of(&self.client_ca, &self.trust_domains, &self.crl)
    }
}

impl From<TrustFiles<'_>> for ClientTrust {
    fn from(files: TrustFiles<'_>) -> ClientTrust {
        ClientTrust {
            client_ca: files.client_ca.map(Path::to_path_buf),
            trust_domains: files.trust_domains.clone(),
            crl: files.crl.map(Path::to_path_buf),
        }
    }
}

impl Validator<'_> {
    /// A `trust_domains` table (at `key`): trust domain names well formed, each with a file.
    pub(super) fn trust_domains(
        &self,
        key: &str,
        raw: BTreeMap<String, PathBuf>,
    ) -> Result<BTreeMap<String, PathBuf>, ConfigError> {
        let mut domains = BTreeMap::new();
        for (domain, path) in raw {
            if let Err(why) = trust_domain_name(&domain) {
                return Err(self.invalid(key, &domain, why));
            }
            if path.as_os_str().is_empty() {
                return Err(self.invalid(format!("{key}.{domain:?}"), "", "expected a PEM bundle file"));
            }
            let path = self.base.join(path);
            domains.insert(domain, path);
        }
        Ok(domains)
    }

    /// The `[[listener.tls.certificate]]` entries of the `[listener.tls]` table at `key`, with
    /// `listener` the client trust entries without their own inherit.
    pub(super) fn certificates(
        &self,
        key: &str,
        raw: Vec<RawCertificate>,
        listener: &ClientTrust,
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<CertificateConfig>, ConfigError> {
        let mut entries: Vec<CertificateConfig> = Vec::with_capacity(raw.len());
        for (i, c) in raw.into_iter().enumerate() {
            let key = |field: &str| format!("{key}.certificate[{i}].{field}");
            let mut server_names: Vec<ServerName> = Vec::with_capacity(c.server_names.len());
            for text in &c.server_names {
                let name =
                    ServerName::parse(text).map_err(|why| self.invalid(key("server_names"), text, why))?;
                if server_names.contains(&name) {
                    return Err(self.invalid(key("server_names"), text, "listed twice"));
                }
                let earlier = entries.iter().position(|e| e.server_names.contains(&name));
                if let Some(j) = earlier {
                    return Err(self.invalid(
                        key("server_names"),
                        text,
                        format!("already listed by certificate[{j}]: a name chooses one certificate"),
                    ));
                }
                server_names.push(name);
            }
            if server_names.is_empty() && !c.default {
                return Err(self.invalid(
                    key("server_names"),
                    "[]",
                    "needs at least one server name (or default = true)",
                ));
            }
            if let Some(j) = entries.iter().position(|e| e.default).filter(|_| c.default) {
                return Err(self.invalid(
                    key("default"),
                    "true",
                    format!("certificate[{j}] is already the default: at most one entry may be"),
                ));
            }
            let trust_domains = self.trust_domains(&key("trust_domains"), c.trust_domains)?;
            let own = c.client_ca.is_some() || !trust_domains.is_empty();
            let trust =
                match (own, c.crl) {
                    (true, crl) => ClientTrust {
                        client_ca: c.client_ca.map(|p| self.base.join(p)),
                        trust_domains,
                        crl: crl.map(|p| self.base.join(p)),
                    },
                    (false, None) => listener.clone(),
                    (false, Some(crl)) => return Err(self.invalid(
                        key("crl"),
                        crl.display(),
                        "needs client_ca or trust_domains in this entry (an entry without them inherits the \
                         listener's client_ca, trust_domains and crl together)",
                    )),
                };
            let authorization =
                match c.authorization {
                    Some(_) if !trust.files().verifies_clients() => return Err(self.invalid(
                        key("authorization"),
                        "{..}",
                        "needs client certificates (client_ca or trust_domains, here or in [listener.tls])",
                    )),
                    Some(table) => Some(self.authorization(&key("authorization"), table, upstreams)?),
                    None => None,
                };
            entries.push(CertificateConfig {
                server_names,
                cert: self.base.join(c.cert),
                key: self.base.join(c.key),
                client_ca: trust.client_ca,
                trust_domains: trust.trust_domains,
                crl: trust.crl,
                authorization,
                default: c.default,
            });
        }
        Ok(entries)
    }

    /// What a client whose SNI names no entry is served and judged with: `[listener.tls]`'s
    /// `cert` and `key` (`given`, the table at `key`) with the `listener` trust, or the default
    /// entry's. And the rules tying `entries` to it: every certificate verifies clients or none
    /// does (the client picks one by SNI), and the listener's client trust serves some
    /// certificate.
    pub(super) fn fallback(
        &self,
        key: &str,
        given: (Option<PathBuf>, Option<PathBuf>),
        listener: &ClientTrust,
        entries: &[CertificateConfig],
    ) -> Result<(PathBuf, PathBuf, ClientTrust), ConfigError> {
        let default = entries.iter().find(|c| c.default);
        let (cert, private_key, fallback) = match (default, given) {
            (None, (Some(cert), Some(private_key))) => (
                self.base.join(cert),
                self.base.join(private_key),
                listener.clone(),
            ),
            (None, (cert, _)) => {
                let missing = if cert.is_none() { "cert" } else { "key" };
                return Err(self.invalid(
                    format!("{key}.{missing}"),
                    "",
                    "required (unless a [[listener.tls.certificate]] entry has default = true)",
                ));
            }
            (Some(entry), (None, None)) => (entry.cert.clone(), entry.key.clone(), entry.trust().into()),
            (Some(_), (cert, private_key)) => {
                let (field, path) = match (cert, private_key) {
                    (Some(cert), _) => ("cert", cert),
                    (None, private_key) => ("key", private_key.unwrap_or_default()),
                };
                return Err(self.invalid(
                    format!("{key}.{field}"),
                    path.display(),
                    "never served: the default = true certificate entry serves clients whose SNI names \
                     no entry; leave cert and key out of [listener.tls]",
                ));
            }
        };
        let mutual = fallback.files().verifies_clients();
        let mixed = entries
            .iter()
            .enumerate()
            .find(|(_, c)| c.trust().verifies_clients() != mutual);
        if let Some((i, entry)) = mixed {
            let (this, fallback) = match mutual {
                true => ("does not verify", "does"),
                false => ("verifies", "does not"),
            };
            return Err(self.invalid(
                format!("{key}.certificate[{i}]"),
                entry.label(),
                format!(
                    "{this} client certificates while the fallback certificate {fallback}: every certificate \
                     of a listener verifies clients, or none does (the client picks one by SNI)"
                ),
            ));
        }
        let used = default.is_none() || entries.iter().any(|c| c.trust() == listener.files());
        let given = [
            ("client_ca", listener.client_ca.is_some()),
            ("trust_domains", !listener.trust_domains.is_empty()),
            ("crl", listener.crl.is_some()),
        ];
        if let Some((field, _)) = given.into_iter().find(|(_, given)| *given && !used) {
            return Err(self.invalid(
                format!("{key}.{field}"),
                "..",
                "applies to no certificate: the default entry and every other entry have their own client trust",
            ));
        }
        Ok((cert, private_key, fallback))
    }
}

/// Checks a SPIFFE trust domain name: lowercase letters, digits, `.`, `-` and `_` (the SPIFFE
/// ID specification), 1 to 255 characters.
fn trust_domain_name(name: &str) -> Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if name.is_empty() || name.len() > 255 {
        return Err("a trust domain name is 1 to 255 characters");
    }
    if !name.chars().all(allowed) {
        return Err(
            "a trust domain name has only lowercase letters, digits, '.', '-' and '_' (no scheme, no path)",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
