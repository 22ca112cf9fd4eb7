//! Parsing a PROXY protocol v1 or v2 header incrementally from the bytes received so far,
//! strictly (see `proxy_protocol`). Pure; it must not encode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::wire::*;

/// Parses a header from the first bytes of a stream (everything received so far).
///
/// Never reads past the header: [`Header::len`] tells how much to consume; bytes after it are
/// payload. Returns [`Parse::Incomplete`] only while `buf` is a valid prefix of a header no
/// longer than [`MAX_HEADER`]; anything else is an error at once.
pub fn parse(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    if is_prefix_of(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else if is_prefix_of(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(ProxyHeaderError::NotProxy)
    }
}

/// Whether `buf` and `signature` agree on their common length.
fn is_prefix_of(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

// ---------------------------------------------------------------------------------------------
// v1

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::V1TooLong);
        }
        // Still a candidate: check that what came so far can begin a valid line.
        return match buf.split_last() {
            Some((b'\r', line)) => v1_line(line).map(|_| Parse::Incomplete),
            _ => v1_prefix(buf).map(|()| Parse::Incomplete),
        };
    };
    let line = match window[..lf].split_last() {
        Some((b'\r', line)) => line,
        _ => return Err(malformed_v1("line: LF without CR")),
    };
    let (source, destination) = v1_line(line)?;
    Ok(Parse::Complete(Header {
        version: Version::V1,
        len: lf + 1,
        source,
        destination,
        authority: None,
        ssl: None,
        alpn: None,
    }))
}

fn malformed_v1(what: impl Into<String>) -> ProxyHeaderError {
    ProxyHeaderError::V1Malformed(what.into())
}

type Endpoints = (Option<SocketAddr>, Option<SocketAddr>);

/// Parses a whole v1 line, CRLF excluded.
fn v1_line(line: &[u8]) -> Result<Endpoints, ProxyHeaderError> {
    if line.contains(&b'\r') {
        return Err(malformed_v1("line: CR inside the line"));
    }
    let rest = line
        .strip_prefix(V1_PREFIX)
        .ok_or_else(|| malformed_v1("line: missing \"PROXY \""))?;
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        // The spec: the receiver ignores whatever follows UNKNOWN up to the CRLF.
        return Ok((None, None));
    }
    let text = std::str::from_utf8(rest).map_err(|_| malformed_v1("line: not ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    let family = fields[0];
    if family != "TCP4" && family != "TCP6" {
        return Err(malformed_v1(format!("protocol {family:?}")));
    }
    let [_, src, dst, sport, dport] = fields[..] else {
        return Err(malformed_v1(format!(
            "line: {} fields after PROXY, expected 5 (single spaces)",
            fields.len()
        )));
    };
    let ip = |text: &str| -> Result<IpAddr, ProxyHeaderError> {
        let parsed = if family == "TCP4" {
            text.parse::<Ipv4Addr>().map(IpAddr::V4).ok()
        } else {
            text.parse::<Ipv6Addr>().map(IpAddr::V6).ok()
        };
        parsed.ok_or_else(|| malformed_v1(format!("address {text:?} for {family}")))
    };
    let source = SocketAddr::new(ip(src)?, v1_port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, v1_port(dport)?);
    Ok((Some(source), Some(destination)))
}

fn v1_port(text: &str) -> Result<u16, ProxyHeaderError> {
    let bad = || malformed_v1(format!("port {text:?}"));
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(bad());
    }
    text.parse::<u16>().map_err(|_| bad())
}

/// Checks that `partial` (no CR, no LF yet) can still be completed into a valid v1 line.
fn v1_prefix(partial: &[u8]) -> Result<(), ProxyHeaderError> {
    if partial.contains(&b'\r') {
        return Err(malformed_v1("line: CR inside the line"));
    }
    let Some(rest) = partial.strip_prefix(V1_PREFIX) else {
        return Ok(()); // a prefix of "PROXY " (checked by the caller)
    };
    if rest.starts_with(b"UNKNOWN ") {
        return Ok(());
    }
    let text = std::str::from_utf8(rest).map_err(|_| malformed_v1("line: not ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    let last = fields.len() - 1; // the field still being received
    if last > 4 {
        return Err(malformed_v1("line: more than 5 fields after PROXY"));
    }
    let family = fields[0];
    let family_ok = if last == 0 {
        ["TCP4", "TCP6", "UNKNOWN"].iter().any(|f| f.starts_with(family))
    } else {
        family == "TCP4" || family == "TCP6"
    };
    if !family_ok {
        return Err(malformed_v1(format!("protocol {family:?}")));
    }
    for (i, field) in fields.iter().enumerate().skip(1) {
        let complete = i < last;
        let ok = match i {
            1 | 2 if family == "TCP4" => v4_prefix(field) && (!complete || field.parse::<Ipv4Addr>().is_ok()),
            1 | 2 => v6_prefix(field) && (!complete || field.parse::<Ipv6Addr>().is_ok()),
            _ => {
                if complete {
                    v1_port(field).is_ok()
                } else {
                    field.is_empty() || v1_port(field).is_ok()
                }
            }
        };
        if !ok {
            let what = if i <= 2 { "address" } else { "port" };
            return Err(malformed_v1(format!("{what} {field:?} for {family}")));
        }
    }
    Ok(())
}

/// Whether `text` can begin a dotted-quad IPv4 address without leading zeros.
fn v4_prefix(text: &str) -> bool {
    let groups: Vec<&str> = text.split('.').collect();
    groups.len() <= 4
        && groups.iter().enumerate().all(|(i, g)| {
            let last = i == groups.len() - 1;
            (g.is_empty() && last)
                || (g.len() <= 3
                    && g.bytes().all(|b| b.is_ascii_digit())
                    && !(g.len() > 1 && g.starts_with('0'))
                    && g.parse::<u16>().is_ok_and(|v| v <= 255))
        })
}

/// Whether `text` can begin an IPv6 address (an approximation: alphabet, length, no `:::`, and
/// an embedded IPv4 tail that can still be valid). The 107-byte bound caps the wait anyway.
fn v6_prefix(text: &str) -> bool {
    const LONGEST: usize = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".len();
    let alphabet = text
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    let tail_ok = match text.rsplit_once(':') {
        Some((_, tail)) if tail.contains('.') => v4_prefix(tail),
        Some(_) => true,
        None => !text.contains('.') && text.len() <= 4,
    };
    alphabet && text.len() <= LONGEST && !text.contains(":::") && tail_ok
}

// ---------------------------------------------------------------------------------------------
// v2

fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 || (ver_cmd & 0x0f) > CMD_PROXY {
            return Err(ProxyHeaderError::V2VersionCommand(ver_cmd));
        }
    }
    if let Some(&fam) = buf.get(13) {
        if fam >> 4 > AF_UNIX || (fam & 0x0f) > 0x2 {
            return Err(ProxyHeaderError::V2Family(fam));
        }
    }
    let Some(len_bytes) = buf.get(14..16) else {
        return Ok(Parse::Incomplete);
    };
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let body_len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
    let total = V2_FIXED + body_len;
    if total > MAX_HEADER {
        return Err(ProxyHeaderError::V2TooLong {
            len: total,
            limit: MAX_HEADER,
        });
    }
    let local = ver_cmd & 0x0f == CMD_LOCAL;
    let block = match fam >> 4 {
        // The spec: a LOCAL header's whole block, family included, is discarded unread.
        _ if local => 0,
        AF_INET => INET_BLOCK,
        AF_INET6 => INET6_BLOCK,
        AF_UNIX => UNIX_BLOCK,
        _ => 0, // AF_UNSPEC
    };
    if body_len < block {
        return Err(ProxyHeaderError::V2AddressTooShort);
    }
    let Some(header) = buf.get(..total) else {
        return Ok(Parse::Incomplete);
    };
    let mut parsed = Header {
        version: Version::V2,
        len: total,
        source: None,
        destination: None,
        authority: None,
        ssl: None,
        alpn: None,
    };
    if local {
        return Ok(Parse::Complete(parsed));
    }
    let addresses = &header[V2_FIXED..V2_FIXED + block];
    if fam & 0x0f == PROTO_STREAM {
        (parsed.source, parsed.destination) = v2_addresses(fam >> 4, addresses);
    }
    read_tlvs(header, V2_FIXED + block, &mut parsed)?;
    if let Some(ssl) = &mut parsed.ssl {
        ssl.alpn.clone_from(&parsed.alpn);
    }
    Ok(Parse::Complete(parsed))
}

fn v2_addresses(family: u8, block: &[u8]) -> Endpoints {
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let ip4 = |at: usize| {
        IpAddr::V4(Ipv4Addr::new(
            block[at],
            block[at + 1],
            block[at + 2],
            block[at + 3],
        ))
    };
    let ip6 = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&block[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    match family {
        AF_INET => (
            Some(SocketAddr::new(ip4(0), port(8))),
            Some(SocketAddr::new(ip4(4), port(10))),
        ),
        AF_INET6 => (
            Some(SocketAddr::new(ip6(0), port(32))),
            Some(SocketAddr::new(ip6(16), port(34))),
        ),
        _ => (None, None),
    }
}

/// Splits `bytes` into `(type, value, offset of the value)` triples; a TLV running past the end
/// is an error.
fn tlvs(bytes: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8], usize), ProxyHeaderError>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let Some(head) = bytes.get(at..at + 3) else {
            at = bytes.len();
            return Some(Err(ProxyHeaderError::Tlv(format!(
                "truncated TLV header at offset {at}"
            ))));
        };
        let (kind, len) = (head[0], usize::from(u16::from_be_bytes([head[1], head[2]])));
        let start = at + 3;
        let Some(value) = bytes.get(start..start + len) else {
            at = bytes.len();
            return Some(Err(ProxyHeaderError::Tlv(format!(
                "type {kind:#04x} of {len} bytes runs past the end"
            ))));
        };
        at = start + len;
        Some(Ok((kind, value, start)))
    })
}

fn read_tlvs(header: &[u8], start: usize, parsed: &mut Header) -> Result<(), ProxyHeaderError> {
    let mut crc_seen = false;
    for tlv in tlvs(&header[start..]) {
        let (kind, value, offset) = tlv?;
        match kind {
            PP2_TYPE_AUTHORITY => set_once(&mut parsed.authority, utf8(kind, value)?, "authority")?,
            PP2_TYPE_ALPN => set_once(&mut parsed.alpn, value.to_vec(), "ALPN")?,
            PP2_TYPE_SSL => {
                if parsed.ssl.is_some() {
                    return Err(ProxyHeaderError::Tlv("duplicate SSL TLV".into()));
                }
                parsed.ssl = Some(ssl_info(value)?);
            }
            PP2_TYPE_CRC32C => {
                if value.len() != 4 || crc_seen {
                    return Err(ProxyHeaderError::Tlv(
                        "CRC32C TLV must be a single 4-byte value".into(),
                    ));
                }
                crc_seen = true;
                let expected = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                let mut copy = header.to_vec();
                let at = start + offset;
                copy[at..at + 4].fill(0);
                if crc32c(&copy) != expected {
                    return Err(ProxyHeaderError::Checksum);
                }
            }
            _ => {} // ALPN, NOOP, UNIQUE_ID, NETNS, custom types: not ours to read.
        }
    }
    Ok(())
}

fn ssl_info(value: &[u8]) -> Result<SslInfo, ProxyHeaderError> {
    let [client, v0, v1, v2, v3, subs @ ..] = value else {
        return Err(ProxyHeaderError::Tlv(format!(
            "SSL TLV of {} bytes, at least 5 expected",
            value.len()
        )));
    };
    let mut info = SslInfo {
        verified: u32::from_be_bytes([*v0, *v1, *v2, *v3]) == 0,
        client_cert: client & PP2_CLIENT_CERT_CONN != 0,
        ..SslInfo::default()
    };
    for sub in tlvs(subs) {
        let (kind, value, _) = sub?;
        match kind {
            PP2_SUBTYPE_SSL_VERSION => set_once(&mut info.version, utf8(kind, value)?, "SSL version")?,
            PP2_SUBTYPE_SSL_CN => set_once(&mut info.cn, utf8(kind, value)?, "SSL CN")?,
            PP2_SUBTYPE_SSL_CIPHER => set_once(&mut info.cipher, utf8(kind, value)?, "SSL cipher")?,
            _ => {} // signature and key algorithms, custom sub-types
        }
    }
    Ok(info)
}

fn utf8(kind: u8, value: &[u8]) -> Result<String, ProxyHeaderError> {
    String::from_utf8(value.to_vec())
        .map_err(|_| ProxyHeaderError::Tlv(format!("type {kind:#04x} is not UTF-8")))
}

/// Stores a value that may appear once: a second copy could disagree with the first.
fn set_once<T>(slot: &mut Option<T>, value: T, what: &str) -> Result<(), ProxyHeaderError> {
    if slot.is_some() {
        return Err(ProxyHeaderError::Tlv(format!("duplicate {what}")));
    }
    *slot = Some(value);
    Ok(())
}

/// CRC-32C (Castagnoli), as `PP2_TYPE_CRC32C` uses it. Bitwise: headers are small and rare.
pub(super) fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
