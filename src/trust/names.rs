//! Name constraints (RFC 5280 4.2.1.10) on a verified path, and the rule that binds the
//! identity to them. Pure.
//!
//! The constraints of every CA on the path apply to every certificate below it (self-issued
//! intermediates excepted, as RFC 5280 says): each DNS, URI, IP address, e-mail and directory
//! name (SANs, and the subject) must be inside a permitted subtree of its own form when the CA
//! permits any of that form, and outside every excluded subtree of its form. URI constraints
//! name the URI's host (for a SPIFFE ID, its trust domain): `prod` matches exactly that host,
//! `.prod` its subdomains. A CA constraining a form fulcrum does not check (otherName, x400,
//! ediParty, registeredID) refuses the path.
//!
//! On top of RFC 5280, the identity fulcrum takes must be vouched for by every name-constrained
//! CA on the path: a CA with permitted subtrees must permit the identity's own form (a
//! DNS-constrained CA cannot mint a SPIFFE ID, which RFC 5280 and webpki would let through as an
//! unconstrained form), and a Common Name identity is refused under any name-constrained CA,
//! since no constraint form covers it.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, GeneralSubtree, NameConstraints};
use x509_parser::x509::X509Name;

use crate::identity::{Certified, NameField};

/// The name forms fulcrum checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Dns,
    Uri,
    Ip,
    Email,
    Directory,
}

impl Form {
    fn of(name: &GeneralName<'_>) -> Option<Form> {
        match name {
            GeneralName::DNSName(_) => Some(Form::Dns),
            GeneralName::URI(_) => Some(Form::Uri),
            GeneralName::IPAddress(_) => Some(Form::Ip),
            GeneralName::RFC822Name(_) => Some(Form::Email),
            GeneralName::DirectoryName(_) => Some(Form::Directory),
            _ => None,
        }
    }
}

/// Why a path breaks a name constraint.
pub(super) type Violation = String;

fn refused(detail: String) -> Violation {
    detail
}

/// Checks the path (leaf first, anchor last) against its CAs' name constraints, and the
/// identity against the rule above.
pub(super) fn check(path: &[&X509Certificate<'_>], certified: Option<&Certified>) -> Result<(), Violation> {
    for (depth, ca) in path.iter().enumerate().skip(1) {
        let Some(constraints) = ca.name_constraints().ok().flatten().map(|ext| ext.value) else {
            continue;
        };
        let subtrees = || {
            let permitted = constraints.permitted_subtrees.iter().flatten();
            permitted.chain(constraints.excluded_subtrees.iter().flatten())
        };
        if let Some(other) = subtrees().find(|s| Form::of(&s.base).is_none()) {
            return Err(refused(format!(
                "{} constrains a name form fulcrum does not check ({:?})",
                ca.subject(),
                other.base
            )));
        }
        for (index, cert) in path[..depth].iter().enumerate() {
            if index > 0 && cert.subject().as_raw() == cert.issuer().as_raw() {
                continue;
            }
            for name in names_of(cert) {
                if !allowed(constraints, &name) {
                    return Err(refused(format!(
                        "{} names {} outside the name constraints of {}",
                        cert.subject(),
                        shown(&name),
                        ca.subject()
                    )));
                }
            }
        }
        if let Some(certified) = certified {
            identity_vouched(ca, constraints, certified)?;
        }
    }
    Ok(())
}

/// The names of a certificate that constraints apply to: its SANs, and its subject if not empty.
fn names_of<'a>(cert: &'a X509Certificate<'a>) -> Vec<GeneralName<'a>> {
    let mut names: Vec<GeneralName<'a>> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.clone(),
        _ => Vec::new(),
    };
    if cert.subject().iter().next().is_some() {
        names.push(GeneralName::DirectoryName(cert.subject().clone()));
    }
    names
}

/// Whether one name is inside the permitted subtrees of its form (if any) and outside the
/// excluded ones.
fn allowed(constraints: &NameConstraints<'_>, name: &GeneralName<'_>) -> bool {
    let Some(form) = Form::of(name) else {
        return true;
    };
    fn of_form<'s, 'a>(
        subtrees: &'s Option<Vec<GeneralSubtree<'a>>>,
        form: Form,
    ) -> impl Iterator<Item = &'s GeneralName<'a>> + Clone {
        subtrees
            .iter()
            .flatten()
            .map(|s| &s.base)
            .filter(move |base| Form::of(base) == Some(form))
    }
    let mut permitted = of_form(&constraints.permitted_subtrees, form);
    let mut excluded = of_form(&constraints.excluded_subtrees, form);
    let inside = |base: &GeneralName<'_>| within(name, base);
    (permitted.clone().next().is_none() || permitted.any(inside)) && !excluded.any(inside)
}

/// The identity rule: every name-constrained CA must vouch for the identity's form.
fn identity_vouched(
    ca: &X509Certificate<'_>,
    constraints: &NameConstraints<'_>,
    certified: &Certified,
) -> Result<(), Violation> {
    let form = match certified.field {
        NameField::SpiffeUri => Form::Uri,
        NameField::Dns => Form::Dns,
        NameField::CommonName => {
            return Err(refused(format!(
                "the identity {} is a common name, which the name constraints of {} cannot cover",
                certified.identity,
                ca.subject()
            )))
        }
    };
    let permitted = constraints.permitted_subtrees.iter().flatten();
    let permits_any = permitted.clone().next().is_some();
    if permits_any && !permitted.clone().any(|s| Form::of(&s.base) == Some(form)) {
        return Err(refused(format!(
            "{}'s name constraints permit no {} names, so it cannot vouch for the identity {}",
            ca.subject(),
            if form == Form::Uri { "URI" } else { "DNS" },
            certified.identity
        )));
    }
    Ok(())
}

/// Whether `name` is inside the subtree `base` (both of one form).
fn within(name: &GeneralName<'_>, base: &GeneralName<'_>) -> bool {
    match (name, base) {
        (GeneralName::DNSName(name), GeneralName::DNSName(base)) => dns_within(name, base),
        (GeneralName::URI(uri), GeneralName::URI(base)) => {
            uri_host(uri).is_some_and(|host| host_within(host, base))
        }
        (GeneralName::IPAddress(ip), GeneralName::IPAddress(base)) => ip_within(ip, base),
        (GeneralName::RFC822Name(mail), GeneralName::RFC822Name(base)) => email_within(mail, base),
        (GeneralName::DirectoryName(name), GeneralName::DirectoryName(base)) => directory_within(name, base),
        _ => false,
    }
}

/// RFC 5280: a DNS name is inside `base` if it is `base` with zero or more labels added on the
/// left; a leading dot (`.example.com`, as OpenSSL reads it) admits subdomains only.
fn dns_within(name: &str, base: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let base = base.trim_end_matches('.').to_ascii_lowercase();
    if base.is_empty() {
        return true;
    }
    if base.starts_with('.') {
        return name.ends_with(&base);
    }
    name == base || name.ends_with(&format!(".{base}"))
}

/// A URI constraint names a host: exactly it, or with a leading dot its subdomains.
fn host_within(host: &str, base: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let base = base.to_ascii_lowercase();
    if base.starts_with('.') {
        host.ends_with(&base)
    } else {
        host == base
    }
}

/// The host of a URI's authority (`scheme://[userinfo@]host[:port]/...`); `None` without one.
fn uri_host(uri: &str) -> Option<&str> {
    let (_, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => host_port.split(':').next()?,
    };
    (!host.is_empty()).then_some(host)
}

/// An address inside an address/mask constraint of its family.
fn ip_within(ip: &[u8], base: &[u8]) -> bool {
    let (address, mask) = base.split_at(base.len() / 2);
    ip.len() == address.len() && ip.iter().zip(address).zip(mask).all(|((i, a), m)| i & m == a & m)
}

/// RFC 5280: a mailbox (`user@host`), a host (mailboxes on it), or `.domain` (on its subdomains).
fn email_within(mail: &str, base: &str) -> bool {
    if base.contains('@') {
        return mail.eq_ignore_ascii_case(base);
    }
    let Some((_, host)) = mail.rsplit_once('@') else {
        return false;
    };
    host_within(host, base)
}

/// A directory name is inside `base` if `base`'s RDNs are its first RDNs (compared byte-exact,
/// stricter than RFC 5280's string preparation).
fn directory_within(name: &X509Name<'_>, base: &X509Name<'_>) -> bool {
    let mut rdns = name.iter();
    base.iter().all(|b| {
        rdns.next().is_some_and(|n| {
            let n: Vec<_> = n
                .iter()
                .map(|a| (a.attr_type(), a.attr_value().as_bytes()))
                .collect();
            let b: Vec<_> = b
                .iter()
                .map(|a| (a.attr_type(), a.attr_value().as_bytes()))
                .collect();
            n == b
        })
    })
}

fn shown(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(n) => format!("DNS {n:?}"),
        GeneralName::URI(n) => format!("URI {n:?}"),
        GeneralName::RFC822Name(n) => format!("e-mail {n:?}"),
        GeneralName::IPAddress(ip) => format!("IP {ip:?}"),
        GeneralName::DirectoryName(n) => format!("directory name {n}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dns_name_is_inside_its_domain_and_subdomains_but_not_a_lookalike() {
        assert!(dns_within("team-a.example", "team-a.example"));
        assert!(dns_within("svc.team-a.example", "Team-A.example"));
        assert!(!dns_within("evilteam-a.example", "team-a.example"));
        assert!(!dns_within("team-a.example.evil", "team-a.example"));
        assert!(dns_within("svc.team-a.example", ".team-a.example"));
        assert!(!dns_within("team-a.example", ".team-a.example"));
    }

    #[test]
    fn a_uri_constraint_binds_the_host_that_is_a_spiffe_trust_domain() {
        assert_eq!(uri_host("spiffe://prod/svc"), Some("prod"));
        assert_eq!(uri_host("https://user@host.example:8443/x"), Some("host.example"));
        assert_eq!(uri_host("https://[::1]:80/"), Some("::1"));
        assert_eq!(uri_host("urn:uuid:1234"), None);
        assert_eq!(uri_host("spiffe:///svc"), None);
        assert!(host_within("prod", "prod"));
        assert!(!host_within("prod.other", "prod"));
        assert!(!host_within("production", "prod"));
        assert!(host_within("a.prod", ".prod"));
        assert!(!host_within("prod", ".prod"));
    }

    #[test]
    fn an_address_is_inside_a_network_of_its_family_only() {
        let net = [10, 1, 0, 0, 255, 255, 0, 0];
        assert!(ip_within(&[10, 1, 2, 3], &net));
        assert!(!ip_within(&[10, 2, 2, 3], &net));
        assert!(!ip_within(&[0; 16], &net));
    }

    #[test]
    fn a_mailbox_constraint_matches_the_mailbox_the_host_or_its_subdomains() {
        assert!(email_within("a@example.com", "a@example.com"));
        assert!(!email_within("b@example.com", "a@example.com"));
        assert!(email_within("b@example.com", "example.com"));
        assert!(!email_within("b@x.example.com", "example.com"));
        assert!(email_within("b@x.example.com", ".example.com"));
    }
}
