//! An in-memory index of Kubernetes objects (Pods, Namespaces and owner objects such as
//! VirtualMachineInstances, VirtualMachines, StatefulSets), built from their JSON, answering
//! as a [`WorkloadView`]. Standalone mode fills it from manifest files.

use std::collections::HashMap;

use serde_json::Value;
use tether_core::alloc::Liveness;
use tether_core::manifest::{ObjectIndex, object_from_value, workload_from_pod};
use tether_core::{Object, ObjectKey, OwnerReference, ReleaseCondition, Workload};

use crate::ports::WorkloadView;

/// What the manifests say, indexed.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    /// Owner objects (everything but Pods and Namespaces).
    pub objects: ObjectIndex,
    /// Pods by (namespace, name).
    pub pods: HashMap<(String, String), Workload>,
    /// Namespace annotations by name.
    pub namespaces: HashMap<String, Vec<(String, String)>>,
    /// Files (or documents) that could not be read: while there are any, an object missing
    /// from the index may just be in one of them, so nothing is judged gone.
    pub unreadable: Vec<String>,
}

impl WorkloadIndex {
    /// Adds one object (a parsed manifest document).
    pub fn insert(&mut self, v: &Value) -> Result<(), String> {
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "Pod" => {
                let w = workload_from_pod(v).map_err(|e| e.to_string())?;
                self.pods.insert((w.namespace.clone(), w.name.clone()), w);
            }
            "Namespace" => {
                let name = v
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .ok_or("Namespace without metadata.name")?;
                let mut o = object_from_value(v).map_err(|e| e.to_string())?;
                o.namespace = String::new();
                self.namespaces.insert(name.to_owned(), o.annotations);
            }
            _ => {
                let o = object_from_value(v).map_err(|e| e.to_string())?;
                self.objects.insert(o);
            }
        }
        Ok(())
    }

    /// Whether every manifest was read: only then does a missing object mean a deleted one.
    pub fn complete(&self) -> bool {
        self.unreadable.is_empty()
    }

    /// Whether a pod exists: live when its manifest is there; gone when it is not and every
    /// manifest was read; unknown otherwise.
    pub fn pod_liveness(&self, namespace: &str, name: &str) -> Liveness {
        if self
            .pods
            .contains_key(&(namespace.to_owned(), name.to_owned()))
        {
            Liveness::Live
        } else if self.complete() {
            Liveness::Gone
        } else {
            Liveness::Unknown
        }
    }

    fn lookup(&self, k: &ObjectKey) -> Option<&Object> {
        self.objects
            .lookup(&k.api_version, &k.kind, &k.namespace, &k.name)
    }

    /// Whether a release condition is known to hold: its owner is gone (missing while every
    /// manifest was read), or scaled below the ordinal. Unknown never fires.
    pub fn fires(&self, c: &ReleaseCondition) -> bool {
        match c {
            ReleaseCondition::OwnerDeleted(k) => self.lookup(k).is_none() && self.complete(),
            ReleaseCondition::ScaledBelow { owner, ordinal } => match self.lookup(owner) {
                None => self.complete(),
                Some(o) => o.replicas.is_some_and(|r| r <= *ordinal),
            },
            ReleaseCondition::Never | ReleaseCondition::IdleForSeconds(_) => false,
        }
    }
}

impl WorkloadView for WorkloadIndex {
    fn pod(&self, namespace: &str, name: &str) -> Option<Workload> {
        self.pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn owner_chain(&self, namespace: &str, owners: &[OwnerReference]) -> Vec<Object> {
        self.objects.owner_chain(namespace, owners)
    }

    fn namespace_annotations(&self, namespace: &str) -> Vec<(String, String)> {
        self.namespaces.get(namespace).cloned().unwrap_or_default()
    }

    fn pod_liveness(&self, namespace: &str, name: &str) -> Liveness {
        WorkloadIndex::pod_liveness(self, namespace, name)
    }

    fn fires(&self, condition: &ReleaseCondition) -> bool {
        WorkloadIndex::fires(self, condition)
    }
}
