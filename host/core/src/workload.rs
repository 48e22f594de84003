//! The workload a policy decides about.

use serde::{Deserialize, Serialize};

/// Ordered key/value pairs (labels, annotations, CNI args, settings). Order is kept as given so
/// that evaluations are reproducible.
pub type Pairs = Vec<(String, String)>;

/// An entry of `metadata.ownerReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// `apiVersion` of the owner, e.g. `kubevirt.io/v1`.
    pub api_version: String,
    /// Kind of the owner, e.g. `VirtualMachineInstance`.
    pub kind: String,
    /// Name of the owner (same namespace as the owned object).
    pub name: String,
    /// UID of the owner.
    pub uid: String,
    /// `controller: true`.
    #[serde(default)]
    pub controller: bool,
}

/// A resolved owner object (VMI, VM, StatefulSet, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.labels`.
    pub labels: Pairs,
    /// `metadata.annotations`.
    pub annotations: Pairs,
    /// `metadata.ownerReferences`.
    pub owner_references: Vec<OwnerReference>,
    /// `spec.replicas` where the kind has it.
    pub replicas: Option<u32>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl Object {
    /// The controller owner reference, if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller)
    }
}

/// The pod that asks for an address, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Pod labels.
    pub labels: Pairs,
    /// Pod annotations.
    pub annotations: Pairs,
    /// Pod owner references.
    pub owner_references: Vec<OwnerReference>,
    /// Node the pod runs on.
    pub node: String,
    /// CNI network name.
    pub network: String,
    /// Interface name inside the pod.
    pub interface: String,
    /// Container (sandbox) ID given by the runtime.
    pub container_id: String,
    /// CNI_ARGS and runtime args.
    pub cni_args: Pairs,
}

impl Workload {
    /// The controller owner reference, if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The input of one policy evaluation, minus the per-policy settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRequest {
    /// The pod.
    pub workload: Workload,
    /// Its owner chain, nearest first.
    pub owners: Vec<Object>,
}
