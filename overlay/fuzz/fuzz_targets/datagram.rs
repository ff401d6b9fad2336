//! Datagram and Ethernet/ARP decoders: never a panic, and whatever decodes re-encodes to the
//! same bytes. The same function runs in the crate's proptests (`decode_never_panics`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_overlay::wire::fuzz_decode(data));
