//! Tether's core: the domain types every other crate speaks, with no I/O, no async, no
//! Kubernetes client and no WebAssembly runtime.
//!
//! - [`workload`]: the pod asking for an address and the owner objects that explain it.
//! - [`decision`]: what a policy decided (ephemeral, pinned under an identity, abstain) and the
//!   rules that validate a decision before the allocator trusts it.
//! - [`claim`]: whether the identity a pinned decision claims is the pod's own (by kind: a VM's
//!   only from a pod the VM owns, a StatefulSet pod's only from that pod, any other only in the
//!   pod's namespace).
//! - [`alloc`]: the allocation state and the planning of ADD, DEL, GC and releases.
//! - [`select`]: which pools an ADD draws from, and which of them may serve it.
//! - [`labels`]: label selectors (a pool's node and namespace selectors).
//! - [`manifest`]: reading workloads and owner chains out of Kubernetes objects (JSON values),
//!   shared by the standalone daemon, the policy test tool and the Kubernetes backend.

pub mod alloc;
pub mod claim;
pub mod decision;
pub mod labels;
pub mod manifest;
pub mod net;
pub mod netsel;
pub mod pool;
#[cfg(any(test, feature = "samples"))]
pub mod samples;
pub mod select;
pub mod workload;

pub use claim::ClaimError;
pub use decision::{Decision, DecisionError, IdentityKind, ObjectKey, Pinned, ReleaseCondition};
pub use workload::{Object, OwnerReference, PolicyRequest, Workload};
