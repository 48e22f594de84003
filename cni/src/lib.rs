//! The `tether` CNI plugin as a library: [`plugin::run`] is the whole plugin minus the process
//! (the binary in `main.rs` only reads the environment and stdin and prints), and
//! [`plugin::parse`] is its config and environment parsing alone, with no I/O, for the fuzz
//! target `cni_parse` (fuzz/). Not a stable API: it exists for the binary and the fuzzers.

pub mod plugin;
