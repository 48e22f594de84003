//! Tether's policy runtime: loads WebAssembly policy components and evaluates them in a sandbox.
//!
//! # Model
//!
//! One [`Runtime`] per process owns the wasmtime `Engine` (with epoch interruption and,
//! by default, the pooling instance allocator), a `Linker` that provides only the contract's
//! `host.log`, and a cache of compiled policies keyed by the sha256 of their bytes. Loading
//! ([`Runtime::load`]) compiles a component once, refuses any import beyond the contract,
//! checks the contract version, pre-instantiates it, and calls its `metadata` export.
//!
//! Every evaluation ([`Runtime::evaluate`]) gets a fresh `Store` and instance, so nothing leaks
//! from one pod's decision into the next; a wall-clock time limit (epochs) and a memory limit bound it,
//! and a semaphore bounds how many run at once. A [`Chain`] evaluates policies in order: the
//! first decision that is not `abstain` wins; when all abstain, the answer is ephemeral.
//!
//! # Guarantees
//!
//! - An evaluation ends within its deadline (plus one epoch tick) whatever the guest does.
//! - A failing evaluation returns a typed [`PolicyError`] naming the policy and changes nothing.
//! - The runtime keeps serving after any guest failure: the failed store is simply dropped.
//!
//! # Caveats
//!
//! Evaluation is synchronous and CPU-bound (microseconds for the built-ins): async callers run
//! it on a blocking thread.

mod bindings;
mod chain;
mod convert;
pub mod digest;
mod error;
mod inspect;
mod runtime;
mod semaphore;

pub use chain::{Chain, ChainEntry, ChainOutcome, Step};
pub use error::PolicyError;
pub use inspect::{Inspection, inspect};
pub use runtime::{
    CONTRACT_VERSION, LoadedPolicy, PolicyMetadata, Prepared, Runtime, RuntimeConfig,
};

/// Per-policy settings from the chain configuration.
pub type Settings = Vec<(String, String)>;
