//! The files a configuration is made of: [`Config::files`] lists them (the config file, and every
//! certificate, key, CA, CRL and secret file it names), and [`fingerprint`] hashes their bytes,
//! so that `[reload] watch` and the generation built from a config compare the same thing.
//!
//! This file reads the listed files only to hash them, on the caller's thread (blocking): it must
//! not parse them (`tls` does), keep their bytes, or watch them (`watch` does).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;

use super::Config;

/// A hash of every file's bytes, in order (following symlinks); `None` for one that cannot be
/// read. Compared, never stored or shown.
pub(crate) type Fingerprint = Vec<Option<u64>>;

/// The [`Fingerprint`] of `files` now. Blocking: reads every file.
pub(crate) fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|file| {
            std::fs::read(file).ok().map(|bytes| {
                let mut hasher = DefaultHasher::new();
                bytes.hash(&mut hasher);
                hasher.finish()
            })
        })
        .collect()
}

impl Config {
    /// Every file this configuration is made of: the config file itself and each file it names
    /// (certificates, keys, CAs, CRLs, the Redis password file), each once, in config order.
    /// `[reload] watch` watches these. The access log is output, not configuration.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.path.iter().cloned().collect();
        for l in &self.listeners {
            if let Some(t) = &l.tls {
                files.extend(t.files().cloned());
            }
        }
        for u in &self.upstreams {
            if let Some(t) = u.tls.as_ref().filter(|t| !t.source.is_spiffe()) {
                files.push(t.ca.clone());
                if let Some((cert, key)) = &t.client_cert {
                    files.extend([cert.clone(), key.clone()]);
                }
            }
        }
        if let Some(shared) = self.rate_limit.as_ref().and_then(|r| r.shared.as_ref()) {
            files.extend(shared.password_file.iter().cloned());
            if let Some(t) = &shared.tls {
                files.extend(t.ca.iter().cloned());
                if let Some((cert, key)) = &t.client_cert {
                    files.extend([cert.clone(), key.clone()]);
                }
            }
        }
        if let Some(admin) = &self.admin {
            files.extend(admin.token_file.iter().cloned());
        }
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| seen.insert(f.clone()));
        files
    }
}
