//! The bodies of Tether's fuzz targets (fuzz_targets/ only call `one`), each over the entry
//! point the shipped code calls on untrusted bytes, with checks of what must hold for every
//! input (a panic, an abort or a failed check is a crash libFuzzer keeps):
//!
//! - [`cni`]: the plugin's parsing of the `CNI_*` environment, `CNI_ARGS` and the network
//!   config on stdin ([`tether_cni::plugin::parse`]), no socket and no file touched;
//! - [`response`]: the daemon's HTTP answer as the plugin parses it
//!   ([`tether_api::client::parse_response`]): bytes from a daemon that may die mid-answer;
//! - [`api`]: the daemon's socket API: a body decoded as tetherd's http.rs does, then the
//!   engine's own checks and the allocation itself ([`tether_engine::Engine`] over the
//!   embedded store and the built-in policy chain), with the no-duplicate invariant after
//!   every call;
//! - [`manifests`]: YAML manifest streams as tetherd reads pool and workload files, into
//!   IPPools ([`tether_core::pool::from_manifest`], [`tether_core::pool::check_disjoint`]) and
//!   workloads ([`tether_core::manifest`]), with the pool math checked;
//! - [`policy`]: policy component bytes as a file or ConfigMap gives them
//!   ([`tether_policy::inspect`], which compiles, lists imports and exports and runs
//!   [`tether_policy::Runtime::load`]), and an evaluation of whatever loads.

pub mod api;
pub mod cni;
pub mod manifests;
pub mod policy;
pub mod response;

/// Splits `KEY=VALUE` lines up to the first empty line from what follows it: the fuzz input
/// format of targets that take an environment and a body (seeds stay readable). Without an
/// empty line, everything is the body.
pub fn split_env(data: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let Some(at) = data.windows(2).position(|w| w == b"\n\n") else {
        return (Vec::new(), data);
    };
    let head = String::from_utf8_lossy(&data[..at]);
    let env = head
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (env, &data[at + 2..])
}
