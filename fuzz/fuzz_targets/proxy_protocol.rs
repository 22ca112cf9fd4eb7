//! libFuzzer target: `fuzz/checks.rs` `proxy_protocol` on every input.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::proxy_protocol(data));
