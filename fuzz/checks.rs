//! The checks each fuzz target runs on one input, shared by the libFuzzer targets
//! (`fuzz/fuzz_targets/*.rs`) and the corpus replay in `tests/fuzz_corpus.rs`, so CI checks the
//! committed corpus exactly as the fuzzer does. A check fails by panicking.

// Each fuzz target uses one of these functions.
#![allow(dead_code)]

use fulcrum::proxy_protocol::{self, Parse, MAX_HEADER};

/// Arbitrary bytes, taken as UTF-8, as a configuration file: never panics; an accepted config
/// names only upstreams it defines.
pub(crate) fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = fulcrum::Config::from_toml(text, "<fuzz>") {
        for listener in &config.listeners {
            assert!(config.upstream(&listener.upstream).is_some(), "{listener:?}");
        }
        assert!(config.upstreams.iter().all(|u| !u.backends.is_empty()));
    }
}

/// Arbitrary bytes as a client certificate: never panics; an identity is never empty and never
/// holds a control character (the identity rule, point 3).
pub(crate) fn identity(data: &[u8]) {
    if let Ok(identity) = fulcrum::identity::identity_from_der(data) {
        let name = identity.as_str();
        assert!(!name.is_empty());
        assert!(!name.chars().any(char::is_control), "{name:?}");
    }
}

/// Arbitrary bytes as the start of a stream: never panics; a complete header claims no more than
/// the input, parses the same on its own, every shorter prefix is incomplete, and a PROXY TCP
/// header re-encoded parses back to the same addresses.
pub(crate) fn proxy_protocol(data: &[u8]) {
    let header = match proxy_protocol::parse(data) {
        Ok(Parse::Complete(header)) => header,
        Ok(Parse::Incomplete) => {
            assert!(data.len() < MAX_HEADER, "incomplete after {} bytes", data.len());
            return;
        }
        Err(_) => return,
    };
    assert!(header.len <= data.len() && header.len <= MAX_HEADER, "{header:?}");
    let alone = &data[..header.len];
    assert_eq!(proxy_protocol::parse(alone), Ok(Parse::Complete(header.clone())));
    for cut in 0..header.len {
        assert_eq!(
            proxy_protocol::parse(&alone[..cut]),
            Ok(Parse::Incomplete),
            "cut at {cut}"
        );
    }
    assert_eq!(header.source.is_some(), header.destination.is_some());
    let (Some(source), Some(destination)) = (header.source, header.destination) else {
        return;
    };
    let ssl = header.ssl.as_ref();
    let encoded = proxy_protocol::encode(
        header.version,
        source,
        destination,
        ssl,
        header.authority.as_deref(),
    );
    let again = match proxy_protocol::parse(&encoded) {
        Ok(Parse::Complete(again)) => again,
        other => panic!("re-encoded {header:?} as {encoded:?}, parsed as {other:?}"),
    };
    assert_eq!(again.len, encoded.len());
    assert_eq!(
        (again.source, again.destination),
        (header.source, header.destination)
    );
    // The encoder leaves out string values over 1000 bytes; shorter ones come back unchanged.
    let strings = [&header.authority]
        .into_iter()
        .chain(header.ssl.iter().flat_map(|s| [&s.version, &s.cipher, &s.cn]));
    let all_short = strings.flatten().all(|s| s.len() <= 1000);
    if header.version == proxy_protocol::Version::V2 && all_short {
        assert_eq!((again.authority, again.ssl), (header.authority, header.ssl));
    }
}
