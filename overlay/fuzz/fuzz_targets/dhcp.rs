//! The DHCP parser fed arbitrary bytes, as a DHCP message and as an Ethernet frame (see
//! `dhcp::fuzz_parse`): no panic, and a message that parses re-encodes to the same fields.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_overlay::dhcp::fuzz_parse(data));
