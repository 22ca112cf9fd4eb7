//! Who a connection is counted against: [`ClientKey`], the one value every limiter of this room
//! keys its tables by (the local windows, the cluster's shares and its slots).
//!
//! It only names a client; it must not count anything nor know where a key comes from (the
//! connection builds it from the verified identity or the masked source address).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// Who a connection is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An authenticated client identity (e.g. from its certificate).
    Identity(Arc<str>),
    /// The peer address, for clients without an identity.
    Ip(IpAddr),
}

impl ClientKey {
    /// The key for a peer address, mapping `::ffff:a.b.c.d` to `a.b.c.d` so a dual-stack
    /// listener counts an IPv4 client the same way as an IPv4 listener does.
    pub fn from_ip(ip: IpAddr) -> Self {
        ClientKey::Ip(ip.to_canonical())
    }

    /// The same client with an IPv4-mapped address made plain (identities are unchanged).
    pub fn canonical(&self) -> Self {
        match self {
            ClientKey::Ip(ip) => ClientKey::from_ip(*ip),
            identity => identity.clone(),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::Identity(id) => f.write_str(id),
            ClientKey::Ip(ip) => ip.fmt(f),
        }
    }
}
