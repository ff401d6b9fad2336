//! The switching core fed arbitrary datagrams, control messages, TAP frames and clock jumps
//! (see `switch::fuzz_switch`): no panic, malformed datagrams counted and dropped, everything
//! sent decodes, no delivery into a foreign violin.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_overlay::switch::fuzz_switch(data));
