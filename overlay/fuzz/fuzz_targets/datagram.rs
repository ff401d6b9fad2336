//! Datagram, Ethernet/ARP and control-message decoders must never panic on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    viola_overlay::wire::fuzz_decode(data);
    let _ = viola_overlay::control::decode(data);
});
