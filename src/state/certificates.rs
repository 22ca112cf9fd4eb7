//! A TLS listener's certificates in the live model ([`ListenerTls`]): what a client is served
//! and judged with, chosen by the server name it sent (SNI): the certificate, its client trust
//! and session cache ([`ServerTls`]), and an entry's own authorization.
//!
//! The choice is `config::select`'s, made here once for everything that asks (the handshake,
//! `Listener::tls_for`, `Listener::authorization_for`). This file holds what was loaded and
//! built; it loads no file and decides nobody's access.

use std::sync::Arc;

use crate::authz::Authorization;
use crate::config::{select, AuthorizationConfig, ServerName, TlsConfig};
use crate::tls::{Certificates, ServerTls};

/// What a client that chose one certificate is served and judged with.
#[derive(Clone)]
pub(crate) struct Served {
    pub(crate) tls: ServerTls,
    /// The entry's own `authorization` (`None`: the listener's).
    pub(crate) authorization: Option<Arc<Authorization>>,
}

/// A TLS listener's certificates: the fallback, for clients whose SNI names no entry, and each
/// `[[listener.tls.certificate]]` entry with its server names, in config order (a default entry
/// is the fallback too).
#[derive(Clone)]
pub(crate) struct ListenerTls {
    fallback: Served,
    entries: Vec<(Vec<ServerName>, Served)>,
    /// The entry of `config` it was built from that the fallback is, if any.
    default: Option<usize>,
}

impl ListenerTls {
    /// The model of `config`'s certificates as `loaded`, each entry's own authorization built by
    /// `authorization`.
    pub(crate) fn new(
        config: &TlsConfig,
        loaded: Certificates,
        authorization: impl Fn(&AuthorizationConfig) -> Arc<Authorization>,
    ) -> ListenerTls {
        let entries: Vec<(Vec<ServerName>, Served)> = config
            .certificates
            .iter()
            .zip(loaded.entries)
            .map(|(c, tls)| {
                let served = Served {
                    tls,
                    authorization: c.authorization.as_ref().map(&authorization),
                };
                (c.server_names.clone(), served)
            })
            .collect();
        let default = config.certificates.iter().position(|c| c.default);
        let fallback = Served {
            tls: loaded.fallback,
            authorization: default
                .and_then(|i| entries.get(i))
                .and_then(|(_, served)| served.authorization.clone()),
        };
        ListenerTls {
            fallback,
            entries,
            default,
        }
    }

    /// What a client that sent `server_name` is served and judged with: the entry
    /// `config::select` picks, else the fallback.
    pub(crate) fn choose(&self, server_name: Option<&str>) -> &Served {
        let names = self.entries.iter().map(|(names, _)| names.as_slice());
        select(names, server_name)
            .and_then(|i| self.entries.get(i))
            .map_or(&self.fallback, |(_, served)| served)
    }

    /// Each certificate once, with the entry's first server name (`None`: the fallback).
    pub(crate) fn each(&self) -> impl Iterator<Item = (Option<&ServerName>, &ServerTls)> {
        let entries = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != self.default)
            .map(|(_, (names, served))| (names.first(), &served.tls));
        std::iter::once((None, &self.fallback.tls)).chain(entries)
    }

    /// The certificates as loaded, to build the same listener again without reading any file.
    pub(crate) fn loaded(&self) -> Certificates {
        Certificates {
            fallback: self.fallback.tls.clone(),
            entries: self
                .entries
                .iter()
                .map(|(_, served)| served.tls.clone())
                .collect(),
        }
    }
}
