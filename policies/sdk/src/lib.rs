//! Guest SDK for Tether policies.
//!
//! A policy is a Rust library built for `wasm32-unknown-unknown` and wrapped as a WebAssembly
//! component. This crate carries the bindings of the `tether:policy` contract (wit/policy.wit),
//! a [`Policy`] trait to implement, the [`export!`] macro that turns an implementation into the
//! component's exports, and helpers for the questions every policy asks (who is the controller,
//! which owner object is that, what is this StatefulSet pod's ordinal).
//!
//! ```ignore
//! use tether_policy_sdk::{Decision, Metadata, Policy, Request};
//!
//! struct Mine;
//! impl Policy for Mine {
//!     fn metadata() -> Metadata { Metadata::new("mine", "0.1.0", "pins nothing") }
//!     fn evaluate(req: &Request) -> Result<Decision, String> { Ok(Decision::Abstain) }
//! }
//! tether_policy_sdk::export!(Mine);
//! ```
//!
//! The decision logic is plain Rust over plain structs, so it is unit-tested natively with
//! `cargo test`; the same code runs inside tetherd's sandbox.

#![allow(unsafe_code)] // the generated canonical-ABI glue is unsafe by nature

#[cfg(target_family = "wasm")]
pub mod arena;

#[cfg(target_family = "wasm")]
#[global_allocator]
static ALLOC: arena::BumpAlloc = arena::BumpAlloc::new();

/// Bindings generated from wit/policy.wit. Most policies only need the re-exports below.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_policy",
        default_bindings_module: "tether_policy_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::tether::policy::host::Level;
pub use bindings::tether::policy::types::{
    Decision, IdentityKind, Object, ObjectKey, OwnerReference, Pinned, PolicyMetadata as Metadata,
    ReleaseCondition, Request, ScaleDown, Workload,
};

/// The version of the contract this SDK builds against.
pub const CONTRACT_VERSION: &str = "0.1.0";

/// What a policy implements. Export it with [`export!`].
pub trait Policy {
    /// Name, version and description, shown by `tetherd policy inspect`.
    fn metadata() -> Metadata;
    /// The decision for one workload. An `Err` fails the CNI call with its message.
    fn evaluate(request: &Request) -> Result<Decision, String>;
}

/// Exports a [`Policy`] implementation as the component's `tether:policy/evaluator`.
///
/// It also installs a panic hook that sends the panic message to the host's log before the
/// instance traps, so `tetherd` can report *why* the policy failed.
#[macro_export]
macro_rules! export {
    ($policy:ty) => {
        // Only a wasm build exports anything: natively (unit tests) the crate is plain Rust,
        // and the contract's export names are not valid native symbol names.
        #[cfg(target_family = "wasm")]
        const _: () = {
            struct __TetherExport;
            impl $crate::bindings::exports::tether::policy::evaluator::Guest for __TetherExport {
                fn metadata() -> $crate::Metadata {
                    <$policy as $crate::Policy>::metadata()
                }
                fn evaluate(
                    request: $crate::Request,
                ) -> ::core::result::Result<$crate::Decision, String> {
                    $crate::install_panic_hook();
                    <$policy as $crate::Policy>::evaluate(&request)
                }
            }
    $crate::bindings::export_policy!(__TetherExport with_types_in $crate::bindings);
        };
    };
}

/// Sends panic messages to the host log at error level. Called by [`export!`].
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            log(Level::Error, &format!("policy panicked: {info}"));
        }));
    });
}

/// Writes a line to tetherd's log, tagged with this policy's name. Natively (in unit tests)
/// the line goes to stderr instead.
pub fn log(level: Level, message: &str) {
    #[cfg(target_family = "wasm")]
    bindings::tether::policy::host::log(level, message);
    #[cfg(not(target_family = "wasm"))]
    eprintln!("[{level:?}] {message}");
}

impl Metadata {
    /// Builds metadata from string slices.
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        Metadata {
            name: name.to_owned(),
            version: version.to_owned(),
            description: description.to_owned(),
        }
    }
}

/// Looks a key up in a list of pairs (labels, annotations, settings, CNI args).
pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The API group of an `apiVersion` (`apps/v1` -> `apps`, `v1` -> ``).
pub fn api_group(api_version: &str) -> &str {
    api_version
        .rsplit_once('/')
        .map(|(group, _)| group)
        .unwrap_or("")
}

impl OwnerReference {
    /// Whether this reference points at `kind` in API group `group`, any version.
    pub fn is(&self, group: &str, kind: &str) -> bool {
        self.kind == kind && api_group(&self.api_version) == group
    }
}

impl Object {
    /// This object's key (no uid), for release conditions.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The owner reference with `controller: true`, if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller)
    }

    /// A label value.
    pub fn label(&self, key: &str) -> Option<&str> {
        get(&self.labels, key)
    }

    /// An annotation value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        get(&self.annotations, key)
    }
}

impl Workload {
    /// The owner reference with `controller: true`, if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller)
    }

    /// A label value.
    pub fn label(&self, key: &str) -> Option<&str> {
        get(&self.labels, key)
    }

    /// An annotation value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        get(&self.annotations, key)
    }

    /// `namespace/name` of this pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Request {
    /// The resolved owner object that `reference` points at (same kind and name, in the pod's
    /// namespace), if the host found it.
    pub fn owner(&self, reference: &OwnerReference) -> Option<&Object> {
        self.owners.iter().find(|o| {
            o.kind == reference.kind
                && o.name == reference.name
                && api_group(&o.api_version) == api_group(&reference.api_version)
        })
    }

    /// A setting from the chain configuration.
    pub fn setting(&self, key: &str) -> Option<&str> {
        get(&self.settings, key)
    }
}

impl ObjectKey {
    /// Key of an object in the workload's namespace named by an owner reference.
    pub fn from_reference(namespace: &str, reference: &OwnerReference) -> Self {
        ObjectKey {
            api_version: reference.api_version.clone(),
            kind: reference.kind.clone(),
            namespace: namespace.to_owned(),
            name: reference.name.clone(),
        }
    }
}

/// The ordinal of a StatefulSet pod: `web-3` of StatefulSet `web` is 3.
pub fn statefulset_ordinal(statefulset: &str, pod: &str) -> Option<u32> {
    let rest = pod.strip_prefix(statefulset)?.strip_prefix('-')?;
    if rest.is_empty()
        || !rest.bytes().all(|b| b.is_ascii_digit())
        || (rest.len() > 1 && rest.starts_with('0'))
    {
        return None;
    }
    rest.parse().ok()
}

/// Builders that keep test fixtures and small policies short.
pub mod testing {
    use super::*;

    /// A workload with a namespace and name and nothing else.
    pub fn workload(namespace: &str, name: &str) -> Workload {
        Workload {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: vec![],
            annotations: vec![],
            owner_references: vec![],
            node: "node-1".into(),
            network: "net".into(),
            interface: "eth0".into(),
            container_id: format!("ctr-{name}"),
            cni_args: vec![],
        }
    }

    /// A controller owner reference.
    pub fn controller(api_version: &str, kind: &str, name: &str) -> OwnerReference {
        OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{kind}-{name}"),
            controller: true,
        }
    }

    /// An owner object with nothing but its identity.
    pub fn object(api_version: &str, kind: &str, namespace: &str, name: &str) -> Object {
        Object {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{kind}-{name}"),
            labels: vec![],
            annotations: vec![],
            owner_references: vec![],
            replicas: None,
            deleting: false,
        }
    }

    /// A request with no settings.
    pub fn request(workload: Workload, owners: Vec<Object>) -> Request {
        Request {
            workload,
            owners,
            settings: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals() {
        assert_eq!(statefulset_ordinal("web", "web-0"), Some(0));
        assert_eq!(statefulset_ordinal("web", "web-12"), Some(12));
        assert_eq!(statefulset_ordinal("web", "web-x"), None);
        assert_eq!(statefulset_ordinal("web", "web-"), None);
        assert_eq!(statefulset_ordinal("web", "web-01"), None);
        assert_eq!(statefulset_ordinal("web", "webb-1"), None);
        assert_eq!(statefulset_ordinal("web-a", "web-a-2"), Some(2));
    }

    #[test]
    fn groups() {
        assert_eq!(api_group("apps/v1"), "apps");
        assert_eq!(api_group("v1"), "");
        assert_eq!(api_group("kubevirt.io/v1"), "kubevirt.io");
    }
}
