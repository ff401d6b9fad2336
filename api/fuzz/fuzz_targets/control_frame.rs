//! Arbitrary bytes into the manager's control-frame decoder (requests and responses): it must
//! never panic or allocate more than the frame limit. Also exercised by a proptest in
//! `viola_api::wire`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    viola_api::wire::fuzz_decode(data);
});
