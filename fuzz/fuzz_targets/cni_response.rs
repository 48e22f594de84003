#![no_main]
//! Fuzz target `cni_response`: see [`tether_fuzz::response`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::response::one(data));
