//! PROXY protocol v1/v2 headers (placeholder: replaced by the full codec).

use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslInfo {
    pub verified: bool,
    pub client_cert: bool,
    pub version: Option<String>,
    pub cipher: Option<String>,
    pub cn: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub len: usize,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub authority: Option<String>,
    pub ssl: Option<SslInfo>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    Incomplete,
    Complete(Header),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
}

pub const MAX_HEADER: usize = 4096;

pub fn encode(
    version: Version,
    source: SocketAddr,
    destination: SocketAddr,
    _ssl: Option<&SslInfo>,
    _authority: Option<&str>,
) -> Vec<u8> {
    let _ = version;
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

pub fn parse(_buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    Err(ProxyHeaderError::NotProxy)
}
