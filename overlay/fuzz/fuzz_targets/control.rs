//! Length-prefixed JSON control messages: never a panic; decode → encode → decode is stable.
//! The same function runs in the crate's proptests (`decode_never_panics`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_overlay::control::fuzz_decode(data));
