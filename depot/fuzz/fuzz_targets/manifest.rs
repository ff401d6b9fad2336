#![no_main]
// The same function is run by the crate's proptests (`decoder_never_panics`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_depot::manifest::fuzz_decode(data));
