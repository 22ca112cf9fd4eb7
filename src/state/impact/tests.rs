use std::net::Ipv4Addr;
use std::path::PathBuf;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::*;
use crate::authz::{Grant as Allowed, Name, Policy};
use crate::identity::ClientIdentity;
use crate::pki::Ca;
use crate::state::{Cut, Registration, Registry};

/// A PKI in a directory of its own (removed on drop): `ca` issues the server's certificate and
/// most clients', `other` is a second client CA. Files: `ca.pem`, `both.pem` (both CAs),
/// `server.pem`, `server.key`, and `crl.pem` (by `ca`, revoking carol's certificate).
struct Pki {
    dir: PathBuf,
    ca: Ca,
    other: Ca,
    carol: Vec<CertificateDer<'static>>,
}

impl Pki {
    fn new(label: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("fulcrum-impact-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the PKI directory");
        let ca = Ca::new("impact test CA").expect("CA");
        let other = Ca::new("impact other CA").expect("CA");
        let server = ca.server(&[]).expect("server certificate");
        let carol = ca.client("carol").expect("carol's certificate");
        let next_update = SystemTime::now() + std::time::Duration::from_secs(3600);
        let crl = ca.crl(&[carol.cert.as_str()], next_update).expect("CRL");
        for (name, text) in [
            ("ca.pem", ca.cert_pem()),
            ("both.pem", ca.cert_pem() + &other.cert_pem()),
            ("server.pem", server.cert),
            ("server.key", server.key),
            ("crl.pem", crl),
        ] {
            std::fs::write(dir.join(name), text).expect("write a PKI file");
        }
        let carol = chain(&carol.cert);
        Pki {
            dir,
            ca,
            other,
            carol,
        }
    }

    /// A validated config: mTLS listener `a` (client certificates from the file `client_ca`,
    /// `tls_keys` added to its table) in front of upstream `u`, then `rest`.
    fn config(&self, client_ca: &str, tls_keys: &str, rest: &str) -> Config {
        let path = |name: &str| format!("{:?}", self.dir.join(name).display().to_string());
        let text = format!(
            "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert={}\nkey={}\n\
             client_ca={}\n{tls_keys}\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n{rest}\n",
            path("server.pem"),
            path("server.key"),
            path(client_ca),
        );
        Config::from_toml(&text, "t").expect("config")
    }

    fn crl(&self) -> String {
        format!("crl={:?}", self.dir.join("crl.pem").display().to_string())
    }

    fn client(&self, ca: &Ca, name: &str) -> Vec<CertificateDer<'static>> {
        chain(&ca.client(name).expect("client certificate").cert)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    vec![CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")]
}

/// A generation built from `config` on its own (files loaded, nothing taken over).
fn generation(config: &Config) -> State {
    let loaded = build::load(config).expect("load the config's files");
    State::assemble(config, loaded, Vec::new(), None, 1, Arc::default())
}

const EVERYONE: &str = "[authorization]\nalice=['u']\nbob=['u']\ncarol=['u']\ndave=['u']";

/// Registers an open connection of `identity` on listener `a` to upstream `u`.
fn open(registry: &Arc<Registry>, identity: &str, chain: Vec<CertificateDer<'static>>) -> Registration {
    let grant = Grant {
        listener: "a".into(),
        upstream: "u".into(),
        identity: ClientIdentity::new(identity),
        chain,
        server_name: Some("localhost".into()),
        source: Ipv4Addr::new(192, 0, 2, 7).into(),
        expires: None,
    };
    let mut open = registry.lock();
    registry.insert(&mut open, grant)
}

/// `(identity, reason)` of every open connection `next` would close if it replaced `live`.
fn closed(registry: &Registry, live: &State, next: &State) -> Vec<(String, Lost)> {
    let open = registry.lock().entries();
    let mut closed: Vec<(String, Lost)> = next
        .would_close(&open, live, SystemTime::now())
        .iter()
        .map(|loss| (loss.entry.grant().identity.to_string(), loss.lost))
        .collect();
    closed.sort();
    closed
}

fn pairs(list: &[(&str, Lost)]) -> Vec<(String, Lost)> {
    list.iter()
        .map(|(name, lost)| (name.to_string(), *lost))
        .collect()
}

#[test]
fn an_identity_the_candidate_no_longer_authorizes_is_unauthorized_and_one_it_still_authorizes_is_kept() {
    let pki = Pki::new("authz");
    let live = generation(&pki.config("ca.pem", "", EVERYONE));
    let registry = Arc::new(Registry::default());
    let _alice = open(&registry, "alice", pki.client(&pki.ca, "alice"));
    let _bob = open(&registry, "bob", pki.client(&pki.ca, "bob"));
    let next = generation(&pki.config("ca.pem", "", "[authorization]\nalice=['u']"));
    assert_eq!(
        closed(&registry, &live, &next),
        pairs(&[("bob", Lost::Unauthorized)])
    );
    let open = registry.lock().entries();
    let losses = next.would_close(&open, &live, SystemTime::now());
    assert_eq!(losses[0].detail, "bob may not reach upstream \"u\" (no entry)");
}

#[test]
fn a_chain_revoked_by_the_candidates_crl_is_revoked_and_one_of_a_ca_it_no_longer_trusts_is_trust() {
    let pki = Pki::new("trust");
    let live = generation(&pki.config("both.pem", "", EVERYONE));
    let registry = Arc::new(Registry::default());
    let _alice = open(&registry, "alice", pki.client(&pki.ca, "alice"));
    let _carol = open(&registry, "carol", pki.carol.clone());
    let _dave = open(&registry, "dave", pki.client(&pki.other, "dave"));
    assert_eq!(
        closed(
            &registry,
            &live,
            &generation(&pki.config("both.pem", "", EVERYONE))
        ),
        [],
        "the same files loaded again close nothing"
    );
    let next = generation(&pki.config("ca.pem", &pki.crl(), EVERYONE));
    assert_eq!(
        closed(&registry, &live, &next),
        pairs(&[("carol", Lost::Revoked), ("dave", Lost::Trust)])
    );
}

#[test]
fn a_deny_entry_is_denied_and_a_grant_from_other_networks_is_source() {
    let pki = Pki::new("deny");
    let live = generation(&pki.config("ca.pem", "", EVERYONE));
    let registry = Arc::new(Registry::default());
    let _alice = open(&registry, "alice", pki.client(&pki.ca, "alice"));
    let _bob = open(&registry, "bob", pki.client(&pki.ca, "bob"));
    let _dave = open(&registry, "dave", pki.client(&pki.ca, "dave"));
    let name = |n: &str| Name::parse(n).expect("a name");
    let elsewhere = crate::addr::IpNet::parse("10.0.0.0/8").expect("a network");
    let mut config = pki.config("ca.pem", "", "");
    config.authorization = Policy {
        entries: vec![
            (name("alice"), vec![Allowed::to("u")]),
            (
                name("bob"),
                vec![Allowed {
                    upstream: "u".into(),
                    from: vec![elsewhere],
                }],
            ),
            (name("dave"), vec![Allowed::to("u")]),
        ],
        deny: vec![(name("dave"), "offboarded".into())],
        shadow: None,
    };
    let next = generation(&config);
    assert_eq!(
        closed(&registry, &live, &next),
        pairs(&[("bob", Lost::Source), ("dave", Lost::Denied)])
    );
}

#[test]
fn a_source_the_candidates_listener_refuses_is_judged_before_the_chain_and_the_grant() {
    let pki = Pki::new("listener-source");
    let live = generation(&pki.config("ca.pem", "", EVERYONE));
    let registry = Arc::new(Registry::default());
    let _alice = open(&registry, "alice", pki.client(&pki.ca, "alice"));
    let _carol = open(&registry, "carol", pki.carol.clone());
    let mut config = pki.config("ca.pem", &pki.crl(), EVERYONE);
    let elsewhere = crate::addr::IpNet::parse("10.0.0.0/8").expect("a network");
    config.listeners[0].allow_from = vec![elsewhere];
    assert_eq!(
        closed(&registry, &live, &generation(&config)),
        pairs(&[("alice", Lost::Source), ("carol", Lost::Source)])
    );
    config.listeners[0].allow_from = Vec::new();
    assert_eq!(
        closed(&registry, &live, &generation(&config)),
        pairs(&[("carol", Lost::Revoked)])
    );
}

#[test]
fn connections_whose_listener_or_upstream_the_candidate_lacks_are_kept() {
    let pki = Pki::new("gone");
    let live = generation(&pki.config("ca.pem", "", EVERYONE));
    let registry = Arc::new(Registry::default());
    // Revoked and unauthorized too: only a generation that still has both could close it.
    let _carol = open(&registry, "carol", pki.carol.clone());
    let renamed = |from: &str, to: &str| {
        let mut config = pki.config("ca.pem", &pki.crl(), "");
        match from {
            "listener" => config.listeners[0].name = to.into(),
            _ => {
                config.upstreams[0].name = to.into();
                config.listeners[0].upstream = to.into();
            }
        }
        generation(&config)
    };
    assert_eq!(closed(&registry, &live, &renamed("listener", "b")), []);
    assert_eq!(closed(&registry, &live, &renamed("upstream", "v")), []);
    let same_names = generation(&pki.config("ca.pem", &pki.crl(), ""));
    assert_eq!(
        closed(&registry, &live, &same_names),
        pairs(&[("carol", Lost::Revoked)])
    );
}

#[test]
fn a_chain_is_verified_again_only_when_the_listeners_trust_changed() {
    let pki = Pki::new("same-trust");
    let live = generation(&pki.config("ca.pem", "", EVERYONE));
    let registry = Arc::new(Registry::default());
    // No chain at all: it verifies under no trust, so only a new verification can close it.
    let _alice = open(&registry, "alice", Vec::new());
    assert_eq!(
        closed(&registry, &live, &live),
        [],
        "the same verifier checked a chain"
    );
    let reloaded = generation(&pki.config("ca.pem", "", EVERYONE));
    assert_eq!(
        closed(&registry, &reloaded, &live),
        pairs(&[("alice", Lost::Trust)])
    );
}

#[test]
fn the_preview_lists_exactly_what_the_swap_then_cuts_and_leaves_the_live_generation_alone() {
    let pki = Pki::new("preview");
    let first = pki.config("ca.pem", "", EVERYONE);
    let live = Live::new(generation(&first), None);
    let opened: Vec<(&str, Registration)> = [
        ("alice", pki.client(&pki.ca, "alice")),
        ("bob", pki.client(&pki.ca, "bob")),
        ("carol", pki.carol.clone()),
    ]
    .into_iter()
    .map(|(name, chain)| (name, open(&live.registry, name, chain)))
    .collect();
    let mut candidate = pki.config("ca.pem", &pki.crl(), "[authorization]\nalice=['u']\ncarol=['u']");
    // Another backend: a preview that took over the live upstream would add it to its pool.
    let another = crate::config::BackendAddr::Ip("127.0.0.1:2".parse().expect("addr"));
    candidate.upstreams[0]
        .backends
        .push(crate::config::BackendConfig::new(another));
    let pool = live.state().upstream("u").map(|u| u.pool.len());

    let preview = live.impact(&candidate).expect("the candidate loads");
    let listed: Vec<(&str, Lost)> = preview.iter().map(|c| (c.identity.as_str(), c.lost)).collect();
    assert_eq!(listed, [("bob", Lost::Unauthorized), ("carol", Lost::Revoked)]);
    assert_eq!(
        (
            preview[0].listener.as_str(),
            preview[0].upstream.as_str(),
            preview[0].client
        ),
        ("a", "u", IpAddr::from(Ipv4Addr::new(192, 0, 2, 7)))
    );
    assert_eq!(preview[0].server_name.as_deref(), Some("localhost"));
    assert_eq!(live.state().generation, 1);
    assert_eq!(live.state().upstream("u").map(|u| u.pool.len()), pool);
    assert!(
        opened.iter().all(|(_, r)| r.cut.reason().is_none()),
        "the preview cut a connection"
    );

    let current = live.state();
    let loaded = build::load(&candidate).expect("load");
    let next = State::assemble(&candidate, loaded, Vec::new(), Some(&current), 2, Arc::default());
    assert_eq!(live.swap(Arc::new(next)), preview.len());
    let cut: Vec<&str> = opened
        .iter()
        .filter(|(_, r)| r.cut.reason() == Some(Cut::AccessRevoked))
        .map(|(name, _)| *name)
        .collect();
    assert_eq!(cut, ["bob", "carol"]);
}
