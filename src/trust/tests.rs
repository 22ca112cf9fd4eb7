//! The trust rules on PKIs shaped like production ones, each with its rejection beside its
//! acceptance: certificates made at test time with rcgen, judged at a fixed `now`.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> SystemTime {
    SystemTime::now()
}

type Authority = CertifiedIssuer<'static, KeyPair>;

fn ca_params(name: &str, valid: (SystemTime, SystemTime)) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = (valid.0.into(), valid.1.into());
    params
}

fn current() -> (SystemTime, SystemTime) {
    (now() - DAY, now() + 365 * DAY)
}

fn root(name: &str) -> Authority {
    CertifiedIssuer::self_signed(ca_params(name, current()), KeyPair::generate().unwrap()).unwrap()
}

fn sub_ca(parent: &Authority, name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Authority {
    let mut params = ca_params(name, current());
    edit(&mut params);
    CertifiedIssuer::signed_by(params, KeyPair::generate().unwrap(), parent).unwrap()
}

/// A client leaf with these SANs (DNS names, or URIs when they contain "://").
fn leaf(
    parent: &Authority,
    sans: &[&str],
    edit: impl FnOnce(&mut CertificateParams),
) -> CertificateDer<'static> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "leaf");
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.contains("://") {
            true => SanType::URI(s.to_string().try_into().unwrap()),
            false => SanType::DnsName(s.to_string().try_into().unwrap()),
        })
        .collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = (current().0.into(), current().1.into());
    edit(&mut params);
    params
        .signed_by(&KeyPair::generate().unwrap(), parent)
        .unwrap()
        .der()
        .clone()
}

fn crl(issuer: &Authority, revoked: &[&CertificateDer<'_>]) -> CertificateRevocationListDer<'static> {
    let serial = |der: &CertificateDer<'_>| {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        rcgen::SerialNumber::from_slice(cert.raw_serial())
    };
    rcgen::CertificateRevocationListParams {
        this_update: (now() - DAY).into(),
        next_update: (now() + DAY).into(),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|der| rcgen::RevokedCertParams {
                serial_number: serial(der),
                revocation_time: now().into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(issuer)
    .unwrap()
    .der()
    .clone()
}

fn der(authority: &Authority) -> CertificateDer<'static> {
    authority.der().clone()
}

fn trust(client_ca: &[&Authority]) -> Trust {
    Trust {
        client_ca: Some(Store::new(client_ca.iter().map(|a| der(a)).collect()).unwrap()),
        ..Trust::default()
    }
}

fn with_crls(mut trust: Trust, crls: &[CertificateRevocationListDer<'static>]) -> Trust {
    let cas: Vec<_> = trust.all_cas().cloned().collect();
    let cas: Vec<_> = cas.iter().collect();
    trust.revocations = Some(Revocations::load(crls, &cas).unwrap().0);
    trust
}

fn reason(trust: &Trust, chain: &[CertificateDer<'static>]) -> Result<String, HandshakeFailure> {
    match trust.verify(chain, now()) {
        Ok(verified) => Ok(verified.certified.expect("an identity").identity.to_string()),
        Err(rejection) => Err(rejection.reason),
    }
}

#[test]
fn a_ca_file_splits_into_anchors_and_the_intermediates_they_issue() {
    let r = root("R");
    let i = sub_ca(&r, "I", |_| {});
    let store = Store::new(vec![der(&i), der(&r)]).unwrap();
    assert_eq!(store.anchors, vec![der(&r)]);
    assert_eq!(store.intermediates, vec![der(&i)]);
    // Without its issuer, an intermediate is an anchor of its own.
    let alone = Store::new(vec![der(&i)]).unwrap();
    assert_eq!(alone.anchors, vec![der(&i)]);
}

#[test]
fn a_certificate_that_is_not_a_ca_is_not_used_as_an_anchor() {
    let r = root("R");
    let not_ca = leaf(&root("elsewhere"), &["alice"], |_| {});
    let store = Store::new(vec![not_ca.clone(), der(&r)]).unwrap();
    assert_eq!(store.anchors, vec![der(&r)]);
    assert_eq!(store.unusable.len(), 1, "{:?}", store.unusable);
    assert!(Store::new(vec![not_ca]).unwrap_err().contains("not a CA"));
}

#[test]
fn an_intermediate_from_the_file_is_checked_for_dates_and_revocation_when_the_client_sends_only_its_leaf() {
    let r = root("R");
    let i = sub_ca(&r, "I", |_| {});
    let alice = leaf(&i, &["alice"], |_| {});
    let chain = [alice.clone()];
    assert_eq!(reason(&trust(&[&r, &i]), &chain), Ok("alice".into()));
    let clean = with_crls(trust(&[&r, &i]), &[crl(&r, &[]), crl(&i, &[])]);
    assert_eq!(reason(&clean, &chain), Ok("alice".into()));
    let revoked = with_crls(trust(&[&r, &i]), &[crl(&r, &[&der(&i)]), crl(&i, &[])]);
    assert_eq!(reason(&revoked, &chain), Err(HandshakeFailure::Revoked));
    assert_eq!(
        reason(&revoked, &[alice, der(&i)]),
        Err(HandshakeFailure::Revoked)
    );

    let expired = sub_ca(&r, "I", |p| {
        (p.not_before, p.not_after) = ((now() - 30 * DAY).into(), (now() - DAY).into());
    });
    let bob = leaf(&expired, &["bob"], |_| {});
    assert_eq!(
        reason(&trust(&[&r, &expired]), &[bob]),
        Err(HandshakeFailure::Expired)
    );
}

#[test]
fn the_verified_paths_earliest_not_after_is_the_expiry() {
    let r = root("R");
    let soon = now() + 3 * DAY;
    let i = sub_ca(&r, "I", |p| p.not_after = soon.into());
    let alice = leaf(&i, &["alice"], |_| {});
    let verified = trust(&[&r, &i]).verify(&[alice], now()).unwrap();
    let seconds = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(seconds(verified.not_after), seconds(soon));
}

#[test]
fn a_crl_covers_only_certificates_its_signing_key_issued() {
    // A key rollover: two roots of one name.
    let old = root("Root");
    let new = root("Root");
    let alice = leaf(&new, &["alice"], |_| {});
    let both = || trust(&[&old, &new]);
    assert_eq!(reason(&both(), std::slice::from_ref(&alice)), Ok("alice".into()));
    let only_old = with_crls(both(), &[crl(&old, &[])]);
    assert_eq!(
        reason(&only_old, std::slice::from_ref(&alice)),
        Err(HandshakeFailure::RevocationUnknown)
    );
    let old_revokes = with_crls(both(), &[crl(&old, &[&alice]), crl(&new, &[])]);
    assert_eq!(
        reason(&old_revokes, std::slice::from_ref(&alice)),
        Ok("alice".into())
    );
    let new_revokes = with_crls(both(), &[crl(&old, &[]), crl(&new, &[&alice])]);
    assert_eq!(reason(&new_revokes, &[alice]), Err(HandshakeFailure::Revoked));
}

#[test]
fn a_dns_constrained_ca_vouches_for_dns_names_inside_it_and_for_no_spiffe_id() {
    let r = root("R");
    let team = sub_ca(&r, "team A", |p| {
        p.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("team-a.example".into())],
            excluded_subtrees: vec![],
        });
    });
    let t = trust(&[&r, &team]);
    let inside = leaf(&team, &["svc.team-a.example"], |_| {});
    assert_eq!(reason(&t, &[inside]), Ok("svc.team-a.example".into()));
    let outside = leaf(&team, &["svc.team-b.example"], |_| {});
    assert_eq!(reason(&t, &[outside]), Err(HandshakeFailure::NameConstraints));
    let minted = leaf(&team, &["svc.team-a.example", "spiffe://prod/admin"], |_| {});
    assert_eq!(reason(&t, &[minted]), Err(HandshakeFailure::NameConstraints));
    let common_name_only = leaf(&team, &[], |_| {});
    assert_eq!(
        reason(&t, &[common_name_only]),
        Err(HandshakeFailure::NameConstraints)
    );
}

/// A nameConstraints extension permitting URIs of these hosts (rcgen has no URI subtree).
fn permitted_uri_hosts(hosts: &[&str]) -> CustomExtension {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match body.len() {
            n if n < 128 => out.push(n as u8),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(body);
        out
    }
    let subtrees: Vec<u8> = hosts
        .iter()
        .flat_map(|host| tlv(0x30, &tlv(0x86, host.as_bytes())))
        .collect();
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], tlv(0x30, &tlv(0xa0, &subtrees)));
    ext.set_criticality(true);
    ext
}

#[test]
fn a_uri_constrained_ca_vouches_for_spiffe_ids_of_its_trust_domain_only() {
    let r = root("R");
    let prod = sub_ca(&r, "prod CA", |p| {
        p.custom_extensions = vec![permitted_uri_hosts(&["prod"])]
    });
    let t = trust(&[&r, &prod]);
    let svc = leaf(&prod, &["spiffe://prod/svc"], |_| {});
    assert_eq!(reason(&t, &[svc]), Ok("spiffe://prod/svc".into()));
    let other = leaf(&prod, &["spiffe://other/svc"], |_| {});
    assert_eq!(reason(&t, &[other]), Err(HandshakeFailure::NameConstraints));
    let dns = leaf(&prod, &["alice"], |_| {});
    assert_eq!(reason(&t, &[dns]), Err(HandshakeFailure::NameConstraints));
}

#[test]
fn a_spiffe_id_must_chain_to_its_own_trust_domains_bundle() {
    let prod = root("prod");
    let staging = root("staging");
    let bundle = |a: &Authority| Store::new(vec![der(a)]).unwrap();
    let t = Trust {
        trust_domains: [
            ("prod.example".to_string(), bundle(&prod)),
            ("staging.example".to_string(), bundle(&staging)),
        ]
        .into_iter()
        .collect(),
        ..Trust::default()
    };
    let web = leaf(&prod, &["spiffe://prod.example/web"], |_| {});
    assert_eq!(reason(&t, &[web]), Ok("spiffe://prod.example/web".into()));
    let staged = leaf(&staging, &["spiffe://staging.example/web"], |_| {});
    assert_eq!(reason(&t, &[staged]), Ok("spiffe://staging.example/web".into()));
    let forged = leaf(&staging, &["spiffe://prod.example/admin"], |_| {});
    assert_eq!(reason(&t, &[forged]), Err(HandshakeFailure::UnknownCa));
    let stranger = leaf(&prod, &["spiffe://other.example/x"], |_| {});
    assert_eq!(reason(&t, &[stranger]), Err(HandshakeFailure::TrustDomain));
    let no_spiffe = leaf(&prod, &["alice"], |_| {});
    assert_eq!(reason(&t, &[no_spiffe]), Err(HandshakeFailure::UnknownCa));
}

#[test]
fn a_client_leaf_that_can_act_as_a_ca_is_refused() {
    let r = root("R");
    let t = trust(&[&r]);
    assert_eq!(reason(&t, &[leaf(&r, &["alice"], |_| {})]), Ok("alice".into()));
    let ca = leaf(&r, &["alice"], |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
    });
    assert_eq!(reason(&t, &[ca]), Err(HandshakeFailure::BadCertificate));
    let signer = leaf(&r, &["alice"], |p| {
        p.key_usages.push(KeyUsagePurpose::KeyCertSign)
    });
    assert_eq!(reason(&t, &[signer]), Err(HandshakeFailure::BadCertificate));
    let server = leaf(&r, &["alice"], |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
    });
    assert_eq!(reason(&t, &[server]), Err(HandshakeFailure::BadUsage));
}

#[test]
fn unknown_critical_and_wrongly_critical_extensions_are_refused_anywhere_on_the_path() {
    let r = root("R");
    let t = trust(&[&r]);
    let mut unknown = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    unknown.set_criticality(true);
    let odd = leaf(&r, &["alice"], |p| p.custom_extensions = vec![unknown]);
    assert_eq!(reason(&t, &[odd]), Err(HandshakeFailure::BadCertificate));
    // A non-critical unknown extension is ignored.
    let benign = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    let fine = leaf(&r, &["alice"], |p| p.custom_extensions = vec![benign]);
    assert_eq!(reason(&t, &[fine]), Ok("alice".into()));
    // A critical authority information access on an intermediate the client sends.
    let mut aia = CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], vec![0x30, 0x00]);
    aia.set_criticality(true);
    let i = sub_ca(&r, "I", |p| p.custom_extensions = vec![aia]);
    let bob = leaf(&i, &["bob"], |_| {});
    assert_eq!(reason(&t, &[bob, der(&i)]), Err(HandshakeFailure::BadCertificate));
}

#[test]
fn an_expired_anchor_and_an_exceeded_path_length_are_refused() {
    let old = CertifiedIssuer::self_signed(
        ca_params("old root", (now() - 30 * DAY, now() - DAY)),
        KeyPair::generate().unwrap(),
    )
    .unwrap();
    let alice = leaf(&old, &["alice"], |_| {});
    assert_eq!(reason(&trust(&[&old]), &[alice]), Err(HandshakeFailure::Expired));

    let r = root("R");
    let i = sub_ca(&r, "I", |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    let j = sub_ca(&i, "J", |_| {});
    let under_i = leaf(&i, &["ok"], |_| {});
    assert_eq!(reason(&trust(&[&r, &i]), &[under_i]), Ok("ok".into()));
    let under_j = leaf(&j, &["deep"], |_| {});
    assert_eq!(
        reason(&trust(&[&r, &i, &j]), &[under_j]),
        Err(HandshakeFailure::BadCertificate)
    );
}

#[test]
fn a_chain_to_no_anchor_is_an_unknown_ca_and_a_long_one_is_refused_unread() {
    let r = root("R");
    let stranger = root("R");
    let alice = leaf(&stranger, &["alice"], |_| {});
    assert_eq!(
        reason(&trust(&[&r]), std::slice::from_ref(&alice)),
        Err(HandshakeFailure::UnknownCa)
    );
    let long = vec![alice; MAX_PRESENTED + 1];
    assert_eq!(
        reason(&trust(&[&r]), &long),
        Err(HandshakeFailure::BadCertificate)
    );
}
