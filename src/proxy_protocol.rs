//! PROXY protocol v1 (text) and v2 (binary) headers: encoding and incremental parsing.
//!
//! This module owns the byte layout of the header a load balancer puts in front of a stream to
//! tell the next hop who the real client was (haproxy's `doc/proxy-protocol.txt`), and nothing
//! else. It is pure: it never reads or writes a socket and keeps no state between calls. The
//! caller reads bytes (within its own deadline), hands everything received so far to [`parse`]
//! and, once it gets [`Parse::Complete`], consumes exactly [`Header::len`] bytes; whatever follows
//! is payload. Its one I/O edge, reading a header off a socket that way, is [`reader`].
//!
//! # What is accepted
//! - v1: `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN[ <anything>]\r\n`,
//!   at most 107 bytes with the CRLF. Strict: single spaces, addresses of the named family,
//!   decimal ports 0-65535 without leading zeros.
//! - v2: the 12-byte signature, version 2, command LOCAL or PROXY, any family/protocol the spec
//!   defines. Only TCP over IPv4/IPv6 yields addresses; LOCAL, `AF_UNSPEC`, `AF_UNIX` and
//!   datagram headers are accepted without them (the caller uses the real connection's
//!   endpoints). TLVs of PROXY headers are read: authority (SNI), SSL with its version, CN and
//!   cipher sub-TLVs, and CRC32C, which is verified; other types are skipped.
//!
//! Bytes that cannot begin a header are refused as soon as they are seen: the parser never asks
//! for more input unless what it has is still a valid prefix, and never for more than
//! [`MAX_HEADER`] bytes.

mod encode;
mod parse;
mod wire;

pub use encode::encode;
pub use parse::parse;
pub use wire::{Header, Parse, ProxyHeaderError, SslInfo, Version, MAX_HEADER};

pub mod reader;

#[cfg(test)]
mod tests;
