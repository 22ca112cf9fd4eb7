//! The PROXY protocol's wire vocabulary: the header types fulcrum exchanges ([`Header`],
//! [`SslInfo`], [`Version`], [`Parse`], [`ProxyHeaderError`]) and the constants of both
//! formats. Values only; encoding and parsing are their own rooms.

use std::net::SocketAddr;

/// Which header format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Human-readable, one line.
    V1,
    /// Binary, with TLV extensions.
    V2,
}

/// What a v2 header carries about the client's TLS session (`PP2_TYPE_SSL` and its sub-TLVs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslInfo {
    /// The client certificate was verified: the `verify` field is 0.
    pub verified: bool,
    /// The client presented a certificate on this connection (`PP2_CLIENT_CERT_CONN`).
    pub client_cert: bool,
    /// `PP2_SUBTYPE_SSL_VERSION`, e.g. `TLSv1.3`.
    pub version: Option<String>,
    /// `PP2_SUBTYPE_SSL_CIPHER`, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: Option<String>,
    /// `PP2_SUBTYPE_SSL_CN`: fulcrum puts the client identity here.
    pub cn: Option<String>,
    /// The protocol negotiated by ALPN: written as its own `PP2_TYPE_ALPN` TLV (not a sub-TLV
    /// of `PP2_TYPE_SSL`), read back here when the header also has an SSL TLV.
    pub alpn: Option<Vec<u8>>,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// Bytes of the stream the header occupies (the caller consumes exactly these).
    pub len: usize,
    /// The client. `None` for v2 LOCAL, v1 UNKNOWN, or an unsupported family (`AF_UNIX`,
    /// `AF_UNSPEC`, datagrams).
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
    /// `PP2_TYPE_AUTHORITY`: the server name the client asked for (v2 only).
    pub authority: Option<String>,
    /// `PP2_TYPE_SSL`: the client's TLS session (v2 only).
    pub ssl: Option<SslInfo>,
    /// `PP2_TYPE_ALPN`: the application protocol the client negotiated (v2 only).
    pub alpn: Option<Vec<u8>>,
}

/// The outcome of [`parse`](super::parse()) on the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
// Returned once per parse and consumed at once, never stored: the size of `Complete` costs
// nothing, and boxing it would cost an allocation per header.
#[allow(clippy::large_enum_variant)]
pub enum Parse {
    /// Need more bytes (the caller reads more, within its deadline and [`MAX_HEADER`]).
    Incomplete,
    /// A whole header; bytes past [`Header::len`] are payload.
    Complete(Header),
}

/// Why bytes are not an acceptable PROXY protocol header. The connection should be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// The bytes match neither signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// No CRLF within the first 107 bytes of a v1 header.
    #[error("v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    /// A v1 line that breaks the grammar; the message names the part and the bad value.
    #[error("malformed v1 {0}")]
    V1Malformed(String),
    /// The length field announces more than [`MAX_HEADER`] bytes.
    #[error("v2 header of {len} bytes exceeds the limit of {limit}")]
    V2TooLong { len: usize, limit: usize },
    /// The 13th byte: version other than 2 or command other than LOCAL/PROXY.
    #[error("unsupported v2 version/command {0:#04x}")]
    V2VersionCommand(u8),
    /// The 14th byte: an address family or transport protocol the spec does not define.
    #[error("unsupported v2 family/protocol {0:#04x}")]
    V2Family(u8),
    /// The length field is smaller than the family's address block.
    #[error("v2 address block too short for its family")]
    V2AddressTooShort,
    /// A TLV (or SSL sub-TLV) that overruns its container, has a bad value or is duplicated.
    #[error("malformed TLV: {0}")]
    Tlv(String),
    /// A `PP2_TYPE_CRC32C` TLV whose checksum does not match the header.
    #[error("v2 header CRC32C mismatch")]
    Checksum,
}

/// Largest header accepted (v2: 16 + length); longer ones are an error, never buffered.
pub const MAX_HEADER: usize = 4096;

/// Longest v1 header, CRLF included (the spec's worst case, `PROXY UNKNOWN` with two full IPv6
/// addresses and ports).
pub(super) const V1_MAX: usize = 107;
pub(super) const V1_PREFIX: &[u8] = b"PROXY ";
pub(super) const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
pub(super) const V2_FIXED: usize = 16;

pub(super) const CMD_LOCAL: u8 = 0x0;
pub(super) const CMD_PROXY: u8 = 0x1;
pub(super) const AF_INET: u8 = 0x1;
pub(super) const AF_INET6: u8 = 0x2;
pub(super) const AF_UNIX: u8 = 0x3;
pub(super) const PROTO_STREAM: u8 = 0x1;
pub(super) const INET_BLOCK: usize = 12;
pub(super) const INET6_BLOCK: usize = 36;
pub(super) const UNIX_BLOCK: usize = 216;

pub(super) const PP2_TYPE_ALPN: u8 = 0x01;
pub(super) const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub(super) const PP2_TYPE_CRC32C: u8 = 0x03;
pub(super) const PP2_TYPE_SSL: u8 = 0x20;
pub(super) const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub(super) const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
pub(super) const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
pub(super) const PP2_CLIENT_SSL: u8 = 0x01;
pub(super) const PP2_CLIENT_CERT_CONN: u8 = 0x02;
