//! Fragment reassembly driven by a script of datagrams, clock jumps and round trips (see
//! `reassembly::fuzz_reassemble`): exact byte accounting, limits hold, frames come back whole.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_overlay::reassembly::fuzz_reassemble(data));
