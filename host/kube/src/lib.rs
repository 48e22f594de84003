//! Tether's Kubernetes adapters. [`crd`] defines the custom resources of group
//! `ipam.tether.dev`, version `v1alpha1`, from Rust types (`tetherd crd` prints them):
//!
//! - [`crd::IPPool`] (cluster-scoped): the pool spec standalone mode reads from files, plus
//!   node and namespace selectors; its status counts addresses and reports why a pool serves
//!   nothing.
//! - [`crd::IPAllocation`] (cluster-scoped): one object per allocated address, named by the
//!   address alone (see [`crd::allocation_name`]): creating it is the claim, so the API server
//!   refuses a second holder of one address by construction.
//! - [`crd::PinnedIdentity`] (namespaced): one record per pinned identity (a VM, a StatefulSet
//!   pod), named after it, derived from the address objects.
//!
//!
//! [`store::KubeStore`] keeps allocations as those objects, and [`workloads::KubeWorkloads`]
//! answers the engine's questions about pods and their owners from watch caches.
//! [`policies::ConfigMapPolicies`] loads policy components from labelled ConfigMaps and puts
//! the chain in force without a restart.
//!
//! The domain types stay in `tether-core`, free of Kubernetes; the conversions live here.

pub mod crd;
pub mod health;
pub mod policies;
pub mod store;
pub mod workloads;
