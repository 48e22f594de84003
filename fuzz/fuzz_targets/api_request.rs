#![no_main]
//! Fuzz target `api_request`: see [`tether_fuzz::api`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::api::one(data));
