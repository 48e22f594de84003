//! Host bindings generated from wit/policy.wit.

#![allow(missing_docs, clippy::all)]

wasmtime::component::bindgen!({
    world: "policy",
    path: "../../wit",
});

pub use tether::policy::host::Level;
pub use tether::policy::types as wit;
