//! Encoding a PROXY protocol v1 or v2 header, TLVs included. Pure; it must not parse.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::wire::*;

/// Longest string value [`encode`] writes into a TLV. With all four strings at this length the
/// header still fits in [`MAX_HEADER`], so our own headers are always accepted by [`parse`].
/// Longer values are left out rather than cut: a truncated name (the CN is the client identity)
/// could name someone else.
const MAX_TLV_VALUE: usize = 1000;

/// Encodes a header announcing `source` -> `destination`.
///
/// v1 ignores `ssl` and `authority`. Mixed address families are written as IPv6 (IPv4-mapped):
/// `TCP6` in v1, `AF_INET6` in v2. v2 adds `PP2_TYPE_AUTHORITY` (the SNI) when given and
/// `PP2_TYPE_SSL` with its sub-TLVs when `ssl` is given, and `PP2_TYPE_ALPN` when `ssl` names a
/// negotiated protocol; string values longer than 1000 bytes are omitted (see `MAX_TLV_VALUE`). IPv6 flow info and scope ids are not carried.
pub fn encode(
    version: Version,
    source: SocketAddr,
    destination: SocketAddr,
    ssl: Option<&SslInfo>,
    authority: Option<&str>,
) -> Vec<u8> {
    let (src, dst) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(mapped(s)), IpAddr::V6(mapped(d))),
    };
    match version {
        Version::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {src} {dst} {} {}\r\n",
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        Version::V2 => encode_v2(src, dst, source.port(), destination.port(), ssl, authority),
    }
}

pub(super) fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn encode_v2(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    ssl: Option<&SslInfo>,
    authority: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED + INET6_BLOCK + 64);
    out.extend_from_slice(V2_SIGNATURE);
    out.push(0x20 | CMD_PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push((AF_INET << 4) | PROTO_STREAM);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push((AF_INET6 << 4) | PROTO_STREAM);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&mapped(s).octets());
            out.extend_from_slice(&mapped(d).octets());
        }
    }
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    if let Some(authority) = authority.filter(|a| a.len() <= MAX_TLV_VALUE) {
        push_tlv(&mut out, PP2_TYPE_AUTHORITY, authority.as_bytes());
    }
    if let Some(ssl) = ssl {
        let mut value = Vec::new();
        let client = PP2_CLIENT_SSL | if ssl.client_cert { PP2_CLIENT_CERT_CONN } else { 0 };
        value.push(client);
        // `verify` is 0 when the client certificate was verified, anything else otherwise.
        let verify: u32 = if ssl.verified { 0 } else { 1 };
        value.extend_from_slice(&verify.to_be_bytes());
        for (kind, text) in [
            (PP2_SUBTYPE_SSL_VERSION, &ssl.version),
            (PP2_SUBTYPE_SSL_CN, &ssl.cn),
            (PP2_SUBTYPE_SSL_CIPHER, &ssl.cipher),
        ] {
            if let Some(text) = text.as_deref().filter(|t| t.len() <= MAX_TLV_VALUE) {
                push_tlv(&mut value, kind, text.as_bytes());
            }
        }
        push_tlv(&mut out, PP2_TYPE_SSL, &value);
    }
    // The ALPN protocol id (at most 255 bytes by RFC 7301), when it still fits under MAX_HEADER.
    if let Some(alpn) = ssl.and_then(|s| s.alpn.as_deref()) {
        if alpn.len() <= 255 && out.len() + 3 + alpn.len() <= MAX_HEADER {
            push_tlv(&mut out, PP2_TYPE_ALPN, alpn);
        }
    }
    // At most 16 + 36 + 3 + 1000 + 3 + 5 + 3 * 1003 = 4072 bytes (MAX_TLV_VALUE) before the
    // ALPN, which is only added under MAX_HEADER, so the length always fits in the u16 field.
    let len = u16::try_from(out.len() - V2_FIXED).unwrap_or(u16::MAX);
    out[14..16].copy_from_slice(&len.to_be_bytes());
    out
}

fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    // Values are bounded by MAX_TLV_VALUE (strings) or by the SSL TLV built from them.
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
}
