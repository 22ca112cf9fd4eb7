//! libFuzzer target: `fuzz/checks.rs` `identity` on every input.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::identity(data));
