//! A virtio-net header and an Ethernet frame as a TAP with offloads hands them over, through
//! the segmenter and the coalescer: never a panic, segments fit, merged frames stay in 64 KiB.
//! The same function runs in the crate's proptests (`any_bytes_never_panic`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| viola_overlay::offload::fuzz_offload(data));
