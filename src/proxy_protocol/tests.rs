//! Tests of the PROXY protocol codec: the spec's examples byte for byte, round trips, incremental
//! parsing and every refusal.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::encode::mapped;
use super::parse::crc32c;
use super::wire::*;
use super::*;
use proptest::prelude::*;
use std::net::{SocketAddrV4, SocketAddrV6};

const SIG: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn complete(buf: &[u8]) -> Header {
    match parse(buf) {
        Ok(Parse::Complete(header)) => header,
        other => panic!("expected a complete header for {buf:?}, got {other:?}"),
    }
}

fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut out = SIG.to_vec();
    out.push(ver_cmd);
    out.push(fam);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The IPv4 address block of 192.168.0.1:56324 -> 192.168.0.11:443.
const V4_BLOCK: [u8; 12] = [192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb];

fn v4_with_tlvs(tlvs: &[u8]) -> Vec<u8> {
    v2(0x21, 0x11, &[&V4_BLOCK[..], tlvs].concat())
}

fn malformed(buf: &[u8]) -> ProxyHeaderError {
    match parse(buf) {
        Err(err) => err,
        Ok(other) => panic!(
            "expected an error for {:?}, got {other:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

// ---- v1: the spec's examples ----------------------------------------------------------------

#[test]
fn v1_tcp4_example_parses_to_its_addresses() {
    let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    let header = complete(line);
    assert_eq!(header.version, Version::V1);
    assert_eq!(header.len, line.len());
    assert_eq!(header.source, Some(addr("192.168.0.1:56324")));
    assert_eq!(header.destination, Some(addr("192.168.0.11:443")));
    assert_eq!((header.authority, header.ssl), (None, None));
}

#[test]
fn v1_worst_case_tcp4_example_parses() {
    let line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    assert_eq!(complete(line).source, Some(addr("255.255.255.255:65535")));
}

#[test]
fn v1_worst_case_tcp6_example_parses() {
    let line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(line.len(), 104);
    let header = complete(line);
    let all = SocketAddr::new(IpAddr::V6(Ipv6Addr::from([0xff; 16])), 65535);
    assert_eq!((header.source, header.destination), (Some(all), Some(all)));
}

#[test]
fn v1_unknown_without_addresses_has_no_source() {
    let header = complete(b"PROXY UNKNOWN\r\n");
    assert_eq!((header.len, header.source, header.destination), (15, None, None));
}

#[test]
fn v1_unknown_with_the_longest_addresses_is_exactly_107_bytes_and_accepted() {
    let line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(line.len(), 107);
    let header = complete(line);
    assert_eq!((header.len, header.source), (107, None));
}

#[test]
fn v1_encoding_matches_the_spec_text() {
    let out = encode(
        Version::V1,
        addr("192.168.0.1:56324"),
        addr("192.168.0.11:443"),
        None,
        None,
    );
    assert_eq!(out, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
    let out = encode(
        Version::V1,
        addr("[2001:db8::1]:1"),
        addr("[2001:db8::2]:0"),
        None,
        None,
    );
    assert_eq!(out, b"PROXY TCP6 2001:db8::1 2001:db8::2 1 0\r\n");
}

#[test]
fn v1_encoding_of_mixed_families_uses_tcp6_with_mapped_addresses() {
    let out = encode(
        Version::V1,
        addr("10.0.0.1:5000"),
        addr("[2001:db8::2]:443"),
        None,
        None,
    );
    assert_eq!(out, b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 5000 443\r\n");
    let header = complete(&out);
    assert_eq!(header.source, Some(addr("[::ffff:10.0.0.1]:5000")));
}

#[test]
fn v1_encoding_ignores_ssl_and_authority() {
    let ssl = SslInfo {
        cn: Some("alice".into()),
        ..SslInfo::default()
    };
    let with = encode(
        Version::V1,
        addr("1.2.3.4:1"),
        addr("5.6.7.8:2"),
        Some(&ssl),
        Some("example.com"),
    );
    assert_eq!(
        with,
        encode(Version::V1, addr("1.2.3.4:1"), addr("5.6.7.8:2"), None, None)
    );
}

// ---- v1: refusals ---------------------------------------------------------------------------

#[test]
fn v1_double_spaces_are_rejected() {
    for line in [
        &b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    ] {
        assert!(
            matches!(malformed(line), ProxyHeaderError::V1Malformed(_)),
            "{line:?}"
        );
    }
}

#[test]
fn v1_bad_ports_are_rejected() {
    for port in ["65536", "01", "00", "-1", "+1", "1a", "", "99999", "123456"] {
        let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {port} 80\r\n");
        let err = malformed(line.as_bytes());
        assert!(matches!(err, ProxyHeaderError::V1Malformed(_)), "{port}: {err}");
    }
}

#[test]
fn v1_port_zero_and_the_largest_port_are_accepted() {
    let header = complete(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n");
    assert_eq!(header.source, Some(addr("1.2.3.4:0")));
    assert_eq!(header.destination, Some(addr("5.6.7.8:65535")));
}

#[test]
fn v1_addresses_of_the_other_family_are_rejected() {
    let err = malformed(b"PROXY TCP4 ::1 ::1 1 2\r\n");
    assert_eq!(err.to_string(), "malformed v1 address \"::1\" for TCP4");
    let err = malformed(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n");
    assert_eq!(err.to_string(), "malformed v1 address \"1.2.3.4\" for TCP6");
}

#[test]
fn v1_malformed_addresses_and_protocols_are_rejected() {
    for line in [
        &b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"[..],
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY \r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    ] {
        assert!(
            matches!(malformed(line), ProxyHeaderError::V1Malformed(_)),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn v1_line_without_crlf_within_107_bytes_is_rejected() {
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(107, b'a');
    assert_eq!(malformed(&line), ProxyHeaderError::V1TooLong);
    line.extend_from_slice(b"\r\n");
    assert_eq!(malformed(&line), ProxyHeaderError::V1TooLong);
    assert_eq!(
        ProxyHeaderError::V1TooLong.to_string(),
        "v1 header longer than 107 bytes"
    );
}

#[test]
fn v1_108_byte_line_is_rejected_even_with_its_crlf() {
    let line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 655350\r\n";
    assert_eq!(line.len(), 108);
    assert_eq!(malformed(line), ProxyHeaderError::V1TooLong);
}

#[test]
fn v1_lf_without_cr_and_stray_cr_are_rejected() {
    assert!(matches!(
        malformed(b"PROXY UNKNOWN\n"),
        ProxyHeaderError::V1Malformed(_)
    ));
    assert!(matches!(
        malformed(b"PROXY UNKNOWN\rx\r\n"),
        ProxyHeaderError::V1Malformed(_)
    ));
    assert!(matches!(
        malformed(b"PROXY TCP4 1.2.3.4\rx"),
        ProxyHeaderError::V1Malformed(_)
    ));
}

#[test]
fn v1_invalid_prefix_is_rejected_before_the_crlf_arrives() {
    for partial in [
        &b"PROXY  "[..],
        b"PROXY TCP4  ",
        b"PROXY TCP4 ::1",
        b"PROXY TCP4 1.2.3.4.5",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0123",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"PROXY TCP6 1.2.3.4 ",
        b"PROXY TCP6 fffff",
        b"PROXY TCPX",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r",
    ] {
        let err = malformed(partial);
        assert!(
            matches!(err, ProxyHeaderError::V1Malformed(_)),
            "{:?}: {err}",
            String::from_utf8_lossy(partial)
        );
    }
}

// ---- v2: byte layouts -----------------------------------------------------------------------

#[test]
fn v2_ipv4_encoding_matches_the_hand_written_layout() {
    let out = encode(
        Version::V2,
        addr("192.168.0.1:56324"),
        addr("192.168.0.11:443"),
        None,
        None,
    );
    #[rustfmt::skip]
    let expected: [u8; 28] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21,                   // version 2, PROXY
        0x11,                   // AF_INET, STREAM
        0x00, 0x0c,             // 12 bytes follow
        0xc0, 0xa8, 0x00, 0x01, // 192.168.0.1
        0xc0, 0xa8, 0x00, 0x0b, // 192.168.0.11
        0xdc, 0x04,             // 56324
        0x01, 0xbb,             // 443
    ];
    assert_eq!(out, expected);
    let header = complete(&expected);
    assert_eq!(header.len, 28);
    assert_eq!(header.source, Some(addr("192.168.0.1:56324")));
    assert_eq!(header.destination, Some(addr("192.168.0.11:443")));
}

#[test]
fn v2_ipv6_encoding_matches_the_hand_written_layout() {
    let out = encode(
        Version::V2,
        addr("[2001:db8::1]:56324"),
        addr("[2001:db8::2]:443"),
        None,
        None,
    );
    #[rustfmt::skip]
    let expected: [u8; 52] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
        0x21, 0x21, 0x00, 0x24, // PROXY, AF_INET6 STREAM, 36 bytes
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // 2001:db8::2
        0xdc, 0x04, 0x01, 0xbb,
    ];
    assert_eq!(out, expected);
    let header = complete(&expected);
    assert_eq!(header.source, Some(addr("[2001:db8::1]:56324")));
    assert_eq!(header.destination, Some(addr("[2001:db8::2]:443")));
}

#[test]
fn v2_mixed_families_are_encoded_as_ipv4_mapped_ipv6() {
    let out = encode(
        Version::V2,
        addr("10.0.0.1:5000"),
        addr("[2001:db8::2]:443"),
        None,
        None,
    );
    assert_eq!(&out[12..16], &[0x21, 0x21, 0x00, 0x24]);
    assert_eq!(
        &out[16..32],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
    );
    assert_eq!(complete(&out).source, Some(addr("[::ffff:10.0.0.1]:5000")));
}

#[test]
fn v2_authority_and_ssl_tlvs_match_the_hand_written_layout() {
    let ssl = SslInfo {
        verified: true,
        client_cert: true,
        version: Some("TLSv1.3".into()),
        cipher: Some("X".into()),
        cn: Some("alice".into()),
        alpn: None,
    };
    let out = encode(
        Version::V2,
        addr("192.168.0.1:56324"),
        addr("192.168.0.11:443"),
        Some(&ssl),
        Some("a.example"),
    );
    #[rustfmt::skip]
    let tlvs: &[u8] = &[
        0x02, 0x00, 0x09, b'a', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', // AUTHORITY
        0x20, 0x00, 0x1b,       // SSL, 27 bytes
        0x03,                   // PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
        0x00, 0x00, 0x00, 0x00, // verify: 0 = verified
        0x21, 0x00, 0x07, b'T', b'L', b'S', b'v', b'1', b'.', b'3', // version
        0x22, 0x00, 0x05, b'a', b'l', b'i', b'c', b'e', // CN
        0x23, 0x00, 0x01, b'X', // cipher
    ];
    assert_eq!(out, v4_with_tlvs(tlvs));
    let header = complete(&out);
    assert_eq!(header.authority.as_deref(), Some("a.example"));
    assert_eq!(header.ssl, Some(ssl));
}

#[test]
fn v2_unverified_client_without_certificate_round_trips() {
    let ssl = SslInfo::default();
    let out = encode(
        Version::V2,
        addr("1.2.3.4:1"),
        addr("5.6.7.8:2"),
        Some(&ssl),
        None,
    );
    assert_eq!(&out[28..], &[0x20, 0x00, 0x05, 0x01, 0, 0, 0, 1]);
    assert_eq!(complete(&out).ssl, Some(ssl));
}

#[test]
fn v2_values_longer_than_1000_bytes_are_left_out_and_the_header_stays_under_the_limit() {
    let long = "a".repeat(1000);
    let ssl = SslInfo {
        verified: true,
        client_cert: true,
        version: Some(long.clone()),
        cipher: Some(long.clone()),
        cn: Some(long.clone()),
        alpn: None,
    };
    let out = encode(
        Version::V2,
        addr("[::1]:1"),
        addr("[::2]:2"),
        Some(&ssl),
        Some(&long),
    );
    assert!(out.len() <= MAX_HEADER, "{}", out.len());
    let header = complete(&out);
    assert_eq!(
        (header.authority.as_deref(), header.ssl.as_ref()),
        (Some(long.as_str()), Some(&ssl))
    );

    let too_long = "b".repeat(1001);
    let ssl = SslInfo {
        cn: Some(too_long.clone()),
        ..SslInfo::default()
    };
    let header = complete(&encode(
        Version::V2,
        addr("[::1]:1"),
        addr("[::2]:2"),
        Some(&ssl),
        Some(&too_long),
    ));
    assert_eq!(header.authority, None);
    assert_eq!(header.ssl, Some(SslInfo::default()));
}

// ---- v2: commands, families, TLVs ------------------------------------------------------------

#[test]
fn v2_local_command_has_no_source_and_its_block_is_skipped() {
    let header = complete(&v2(0x20, 0x00, &[]));
    assert_eq!((header.len, header.source, header.destination), (16, None, None));
    // LOCAL with an address block and garbage TLVs: the whole block is discarded.
    let header = complete(&v2(0x20, 0x11, &[&V4_BLOCK[..], &[0x02, 0xff, 0xff]].concat()));
    assert_eq!((header.len, header.source, header.authority), (31, None, None));
}

#[test]
fn v2_unix_unspec_and_datagram_headers_are_accepted_without_addresses() {
    let header = complete(&v2(0x21, 0x31, &[b'/'; 216]));
    assert_eq!((header.len, header.source), (232, None));
    let header = complete(&v2(0x21, 0x00, &[0x02, 0x00, 0x01, b'x']));
    assert_eq!((header.source, header.authority.as_deref()), (None, Some("x")));
    let header = complete(&v2(0x21, 0x12, &V4_BLOCK));
    assert_eq!((header.len, header.source), (28, None));
    let header = complete(&v2(0x21, 0x10, &V4_BLOCK));
    assert_eq!(header.source, None);
}

#[test]
fn v2_unknown_family_or_protocol_is_rejected_as_soon_as_its_byte_arrives() {
    assert_eq!(
        malformed(&[&SIG[..], &[0x21, 0x41]].concat()),
        ProxyHeaderError::V2Family(0x41)
    );
    assert_eq!(
        malformed(&[&SIG[..], &[0x21, 0x13]].concat()),
        ProxyHeaderError::V2Family(0x13)
    );
}

#[test]
fn v2_other_versions_and_commands_are_rejected_as_soon_as_their_byte_arrives() {
    for byte in [0x11, 0x31, 0x22, 0x2f, 0x00] {
        let err = malformed(&[&SIG[..], &[byte]].concat());
        assert_eq!(err, ProxyHeaderError::V2VersionCommand(byte));
    }
    assert_eq!(
        ProxyHeaderError::V2VersionCommand(0x11).to_string(),
        "unsupported v2 version/command 0x11"
    );
}

#[test]
fn v2_length_below_the_family_address_block_is_rejected_without_waiting() {
    let head = [&SIG[..], &[0x21, 0x11, 0x00, 0x0b]].concat();
    assert_eq!(malformed(&head), ProxyHeaderError::V2AddressTooShort);
    let head = [&SIG[..], &[0x21, 0x21, 0x00, 0x0c]].concat();
    assert_eq!(malformed(&head), ProxyHeaderError::V2AddressTooShort);
}

#[test]
fn oversized_v2_length_is_rejected_without_waiting_for_the_body() {
    let head = [&SIG[..], &[0x21, 0x11, 0xff, 0xff]].concat();
    let err = malformed(&head);
    assert_eq!(
        err,
        ProxyHeaderError::V2TooLong {
            len: 65551,
            limit: MAX_HEADER
        }
    );
    assert_eq!(
        err.to_string(),
        "v2 header of 65551 bytes exceeds the limit of 4096"
    );
    let at_limit = u16::try_from(MAX_HEADER - 16).unwrap().to_be_bytes();
    assert_eq!(
        parse(&[&SIG[..], &[0x21, 0x11], &at_limit[..]].concat()),
        Ok(Parse::Incomplete)
    );
    let over = u16::try_from(MAX_HEADER - 15).unwrap().to_be_bytes();
    assert!(matches!(
        malformed(&[&SIG[..], &[0x21, 0x11], &over[..]].concat()),
        ProxyHeaderError::V2TooLong { .. }
    ));
}

#[test]
fn tlv_running_past_the_header_is_rejected() {
    let err = malformed(&v4_with_tlvs(&[0x02, 0x00, 0x0a, b'a', b'b', b'c']));
    assert!(matches!(err, ProxyHeaderError::Tlv(_)), "{err}");
    assert!(matches!(
        malformed(&v4_with_tlvs(&[0x04, 0x00])),
        ProxyHeaderError::Tlv(_)
    ));
    // A sub-TLV running past the SSL TLV.
    let err = malformed(&v4_with_tlvs(&[
        0x20, 0x00, 0x08, 0x01, 0, 0, 0, 0, 0x22, 0x00, 0x09,
    ]));
    assert!(matches!(err, ProxyHeaderError::Tlv(_)), "{err}");
}

#[test]
fn ssl_tlv_shorter_than_client_and_verify_is_rejected() {
    assert!(matches!(
        malformed(&v4_with_tlvs(&[0x20, 0x00, 0x04, 0x01, 0, 0, 0])),
        ProxyHeaderError::Tlv(_)
    ));
}

#[test]
fn duplicate_or_non_utf8_authority_is_rejected() {
    let twice = [0x02, 0x00, 0x01, b'a', 0x02, 0x00, 0x01, b'b'];
    assert!(matches!(
        malformed(&v4_with_tlvs(&twice)),
        ProxyHeaderError::Tlv(_)
    ));
    assert!(matches!(
        malformed(&v4_with_tlvs(&[0x02, 0x00, 0x01, 0xff])),
        ProxyHeaderError::Tlv(_)
    ));
    let two_cns = [
        0x20, 0x00, 0x0d, 0x01, 0, 0, 0, 0, 0x22, 0x00, 0x01, b'a', 0x22, 0x00, 0x01, b'b',
    ];
    assert!(matches!(
        malformed(&v4_with_tlvs(&two_cns)),
        ProxyHeaderError::Tlv(_)
    ));
}

#[test]
fn unknown_tlv_types_and_ssl_sub_types_are_skipped() {
    #[rustfmt::skip]
    let tlvs = [
        0x01, 0x00, 0x02, b'h', b'2',  // ALPN (read, not skipped)
        0x04, 0x00, 0x03, 0, 0, 0,     // NOOP
        0x05, 0x00, 0x01, 0x42,        // UNIQUE_ID
        0x30, 0x00, 0x00,              // NETNS, empty
        0xe0, 0x00, 0x01, 0x00,        // custom
        0x20, 0x00, 0x0b, 0x01, 0, 0, 0, 2, 0x24, 0x00, 0x03, b'R', b'S', b'A', // SSL with sig_alg only
    ];
    let header = complete(&v4_with_tlvs(&tlvs));
    assert_eq!(header.authority, None);
    assert_eq!(header.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        header.ssl,
        Some(SslInfo {
            verified: false,
            client_cert: false,
            alpn: Some(b"h2".to_vec()),
            ..SslInfo::default()
        })
    );
}

#[test]
fn crc32c_matches_the_standard_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn v2_header_with_a_correct_crc32c_is_accepted_and_a_wrong_one_rejected() {
    let mut header = v4_with_tlvs(&[0x03, 0x00, 0x04, 0, 0, 0, 0, 0x02, 0x00, 0x01, b'x']);
    let crc = crc32c(&header);
    header[31..35].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(complete(&header).authority.as_deref(), Some("x"));
    header[35 + 3] = b'y';
    assert_eq!(malformed(&header), ProxyHeaderError::Checksum);
    assert!(matches!(
        malformed(&v4_with_tlvs(&[0x03, 0x00, 0x02, 0, 0])),
        ProxyHeaderError::Tlv(_)
    ));
}

// ---- streaming: prefixes, payload, non-headers ----------------------------------------------

fn sample_headers() -> Vec<Vec<u8>> {
    let ssl = SslInfo {
        verified: true,
        client_cert: true,
        version: Some("TLSv1.3".into()),
        cipher: None,
        cn: Some("alice".into()),
        alpn: None,
    };
    vec![
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 65535\r\n".to_vec(),
        b"PROXY UNKNOWN\r\n".to_vec(),
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec(),
        encode(Version::V2, addr("192.168.0.1:56324"), addr("192.168.0.11:443"), Some(&ssl), Some("a.example")),
        encode(Version::V2, addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2"), None, None),
        v2(0x20, 0x00, &[]),
        v2(0x21, 0x31, &[0; 216]),
    ]
}

#[test]
fn header_split_at_every_offset_is_incomplete_then_complete() {
    for header in sample_headers() {
        for cut in 0..header.len() {
            assert_eq!(
                parse(&header[..cut]),
                Ok(Parse::Incomplete),
                "{header:?} cut at {cut}"
            );
        }
        assert_eq!(complete(&header).len, header.len());
    }
}

#[test]
fn header_fused_with_payload_reports_exactly_the_header_length() {
    for header in sample_headers() {
        let fused = [&header[..], b"GET / HTTP/1.1\r\n\r\n\x16\x03\x01"].concat();
        assert_eq!(complete(&fused).len, header.len());
        assert_eq!(complete(&fused), complete(&header));
    }
}

#[test]
fn bytes_that_are_not_a_header_are_rejected_at_once() {
    for bytes in [
        &[0x16, 0x03, 0x01][..],
        &[0x16],
        b"GET / HTTP/1.1\r\n",
        b"G",
        b"PROXX",
        b"proxy TCP4",
        b"\r\n\r\n\0\r\nQUIX",
        b"\r\n\r\n\r\n",
        b"\r\r",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ] {
        assert_eq!(parse(bytes), Err(ProxyHeaderError::NotProxy), "{bytes:?}");
    }
    assert_eq!(
        ProxyHeaderError::NotProxy.to_string(),
        "not a PROXY protocol header"
    );
}

#[test]
fn empty_input_is_incomplete() {
    assert_eq!(parse(b""), Ok(Parse::Incomplete));
}

// ---- properties -----------------------------------------------------------------------------

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip.into(), port))),
        any::<([u8; 16], u16, u32, u32)>().prop_map(|(ip, port, flow, scope)| {
            SocketAddr::V6(SocketAddrV6::new(ip.into(), port, flow, scope))
        }),
    ]
}

fn ssl_info() -> impl Strategy<Value = SslInfo> {
    let text = || proptest::option::of("\\PC{0,40}");
    (any::<bool>(), any::<bool>(), text(), text(), text()).prop_map(
        |(verified, client_cert, version, cipher, cn)| SslInfo {
            verified,
            client_cert,
            version,
            cipher,
            cn,
            alpn: None,
        },
    )
}

/// What a header carries of an address: no flow info, no scope, mapped when families mix.
fn carried(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let strip = |a: SocketAddr| SocketAddr::new(a.ip(), a.port());
    match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => (source, destination),
        _ => {
            let six = |a: SocketAddr| SocketAddr::new(IpAddr::V6(mapped(a.ip())), a.port());
            (strip(six(source)), strip(six(destination)))
        }
    }
}

proptest! {
    #[test]
    fn encode_then_parse_round_trips(
        source in socket_addr(),
        destination in socket_addr(),
        ssl in proptest::option::of(ssl_info()),
        authority in proptest::option::of("\\PC{0,60}"),
        v1 in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let version = if v1 { Version::V1 } else { Version::V2 };
        let encoded = encode(version, source, destination, ssl.as_ref(), authority.as_deref());
        let fused = [&encoded[..], &payload[..]].concat();
        let header = complete(&fused);
        let (s, d) = carried(source, destination);
        prop_assert_eq!(header.len, encoded.len());
        prop_assert_eq!(header.version, version);
        prop_assert_eq!((header.source, header.destination), (Some(s), Some(d)));
        if v1 {
            prop_assert_eq!((header.authority, header.ssl), (None, None));
        } else {
            prop_assert_eq!(header.authority, authority);
            prop_assert_eq!(header.ssl, ssl);
        }
        for cut in 0..encoded.len() {
            prop_assert_eq!(parse(&encoded[..cut]), Ok(Parse::Incomplete));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_claim_more_than_they_got(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        prefix in 0usize..3,
    ) {
        let lead: &[u8] = [&b""[..], b"PROXY ", &SIG[..]][prefix];
        let input = [lead, &bytes[..]].concat();
        if let Ok(Parse::Complete(header)) = parse(&input) {
            prop_assert!(header.len <= input.len() && header.len <= MAX_HEADER);
            prop_assert_eq!(header.source.is_some(), header.destination.is_some());
        }
    }
}

#[test]
fn v2_carries_the_negotiated_alpn_as_its_own_tlv() {
    let ssl = SslInfo {
        cn: Some("alice".into()),
        alpn: Some(b"h2".to_vec()),
        ..SslInfo::default()
    };
    let src: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
    let bytes = encode(Version::V2, src, dst, Some(&ssl), None);
    assert!(
        bytes.windows(5).any(|w| w == [0x01, 0x00, 0x02, b'h', b'2']),
        "PP2_TYPE_ALPN, length 2, h2"
    );
    let header = complete(&bytes);
    assert_eq!(header.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(header.ssl, Some(ssl));
    let without = complete(&encode(Version::V2, src, dst, None, None));
    assert_eq!(without.alpn, None);
}
