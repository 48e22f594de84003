#![no_main]
//! Fuzz target `policy_load`: see [`tether_fuzz::policy`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::policy::one(data));
