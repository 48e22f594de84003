//! The built-in policies as WebAssembly component bytes, compiled from policies/ by this
//! crate's build script. `tetherd` embeds them as its default chain and `tetherd policy export`
//! writes them out.
//!
//! [`fixtures`] holds the test-only components (the example custom policy and hostile
//! policies); they are not part of any default chain.

#![allow(missing_docs)] // the generated constants carry their own docs

mod generated {
    include!(concat!(env!("OUT_DIR"), "/components.rs"));
}

/// A built-in policy: its name in chain configurations and its component bytes.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// Name, as in `builtin:NAME`.
    pub name: &'static str,
    /// The component.
    pub wasm: &'static [u8],
}

/// The built-in policies, in the order of the default chain.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "kubevirt",
        wasm: generated::KUBEVIRT,
    },
    Builtin {
        name: "statefulset",
        wasm: generated::STATEFULSET,
    },
    Builtin {
        name: "stateless",
        wasm: generated::STATELESS,
    },
];

/// Looks a built-in up by name.
pub fn builtin(name: &str) -> Option<Builtin> {
    BUILTINS.iter().copied().find(|b| b.name == name)
}

/// Components for tests and documentation examples; not shipped in any chain.
pub mod fixtures {
    /// The example custom policy of docs/policy-authoring.md.
    pub const LABEL_IDENTITY: &[u8] = super::generated::LABEL_IDENTITY;
    /// A policy that misbehaves as its `mode` setting asks.
    pub const HOSTILE: &[u8] = super::generated::HOSTILE;
    /// A policy that imports `wasi:cli/environment`.
    pub const WASI_IMPORT: &[u8] = super::generated::WASI_IMPORT;
    /// A policy built against `tether:policy@0.2.0`.
    pub const FUTURE_CONTRACT: &[u8] = super::generated::FUTURE_CONTRACT;
}
