#![no_main]
//! Fuzz target `manifests`: see [`tether_fuzz::manifests`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::manifests::one(data));
