//! Addresses and prefixes: the values several rooms use; pure.
//!
//! This module owns [`IpNet`] (a network, `address/prefix`, as `trusted_proxies` lists it) and
//! [`SourcePrefixes`] (how much of a source address names a client, for every per-source key).
//! It sits below every other module: it imports nothing of the crate, never does I/O and knows
//! nothing of configuration files (`config` parses these values and re-exports them).

use std::net::IpAddr;

/// Default `[rate_limit] ipv4_prefix`: an IPv4 client is its whole address.
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
/// Default `[rate_limit] ipv6_prefix`: an IPv6 client is its /64 (what one host usually gets).
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The prefix lengths that make a source address a client key: an IPv6 client usually holds a
/// whole /64, so keying on its full address would give it 2^64 keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePrefixes {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl Default for SourcePrefixes {
    fn default() -> Self {
        SourcePrefixes {
            ipv4: DEFAULT_IPV4_PREFIX,
            ipv6: DEFAULT_IPV6_PREFIX,
        }
    }
}

impl SourcePrefixes {
    /// `ip` masked to its prefix (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask_bits::<u32>(self.ipv4)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask_bits::<u128>(self.ipv6)).into()),
        }
    }
}

/// The netmask of `prefix` leading one bits, for a 32- or 128-bit address.
fn mask_bits<T>(prefix: u8) -> T
where
    T: std::ops::Not<Output = T> + std::ops::Shr<u32, Output = T> + From<u8> + Copy,
{
    let bits = (std::mem::size_of::<T>() * 8) as u32;
    let ones = !T::from(0u8);
    match u32::from(prefix) {
        0 => T::from(0u8),
        p if p >= bits => ones,
        p => !(ones >> p),
    }
}

/// A network, `address/prefix`: one entry of `trusted_proxies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (one host).
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| "expected an address or address/prefix, e.g. 10.0.0.0/8 or ::1/128".to_string())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("the prefix length must be 0 to {max}")),
            },
        };
        Ok(IpNet { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = SourcePrefixes {
            ipv4: self.prefix,
            ipv6: self.prefix,
        };
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask.mask(ip) == mask.mask(self.addr)
    }
}
