#![no_main]
//! Fuzz target `cni_parse`: see [`tether_fuzz::cni`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::cni::one(data));
