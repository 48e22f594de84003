//! Workloads and owner chains from Kubernetes objects given as JSON values (a parsed manifest,
//! or an object from the API server).

use std::collections::HashMap;

use serde_json::Value;
use thiserror::Error;

use crate::workload::{Object, OwnerReference, Pairs, Workload};

/// Every non-empty document of a manifest file's text (a YAML stream; JSON is YAML), as JSON
/// values; a `kind: List` is flattened into its items. `Err`: the index of the document that
/// is not YAML, and why.
pub fn documents(text: &str) -> Result<Vec<Value>, (usize, yaml_serde::Error)> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for (index, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc).map_err(|e| (index, e))? {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(items) = m.get("items").and_then(Value::as_array) {
                    out.extend(items.iter().cloned());
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// How far owner chains are followed (pod -> VMI -> VM is 2).
pub const MAX_OWNER_DEPTH: usize = 8;

/// A manifest that is not a usable Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestError {
    /// Not a JSON/YAML mapping.
    #[error("not a Kubernetes object (expected a mapping with apiVersion, kind and metadata)")]
    NotAnObject,
    /// A required field is missing or has the wrong type.
    #[error("{field} is missing or not a {expected}")]
    Field {
        /// JSON path of the field.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// The object is not of the expected kind.
    #[error("expected a {expected}, found kind {found:?}")]
    WrongKind {
        /// Wanted kind.
        expected: &'static str,
        /// Found kind.
        found: String,
    },
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn required<'a>(v: &'a Value, ptr: &'static str) -> Result<&'a str, ManifestError> {
    str_at(v, ptr).ok_or(ManifestError::Field {
        field: ptr,
        expected: "string",
    })
}

fn pairs(v: &Value, ptr: &'static str) -> Result<Pairs, ManifestError> {
    match v.pointer(ptr) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(map)) => {
            let mut out = Vec::with_capacity(map.len());
            for (k, val) in map {
                let s = match val {
                    Value::String(s) => s.clone(),
                    // YAML turns `true` and `3` into non-strings; Kubernetes would reject them,
                    // we accept their text so a hand-written manifest still works.
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return Err(ManifestError::Field {
                            field: ptr,
                            expected: "map of strings",
                        });
                    }
                };
                out.push((k.clone(), s));
            }
            Ok(out)
        }
        Some(_) => Err(ManifestError::Field {
            field: ptr,
            expected: "map of strings",
        }),
    }
}

fn owner_refs(v: &Value) -> Result<Vec<OwnerReference>, ManifestError> {
    const FIELD: &str = "/metadata/ownerReferences";
    let Some(list) = v.pointer(FIELD) else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(ManifestError::Field {
            field: FIELD,
            expected: "list",
        });
    };
    list.iter()
        .map(|r| {
            Ok(OwnerReference {
                api_version: required(r, "/apiVersion")?.to_owned(),
                kind: required(r, "/kind")?.to_owned(),
                name: required(r, "/name")?.to_owned(),
                uid: str_at(r, "/uid").unwrap_or_default().to_owned(),
                controller: r
                    .get("controller")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            })
        })
        .collect()
}

/// Reads any namespaced object. A missing namespace means `default`, as `kubectl apply` does.
pub fn object_from_value(v: &Value) -> Result<Object, ManifestError> {
    if !v.is_object() {
        return Err(ManifestError::NotAnObject);
    }
    Ok(Object {
        api_version: required(v, "/apiVersion")?.to_owned(),
        kind: required(v, "/kind")?.to_owned(),
        namespace: str_at(v, "/metadata/namespace")
            .unwrap_or("default")
            .to_owned(),
        name: required(v, "/metadata/name")?.to_owned(),
        uid: str_at(v, "/metadata/uid").unwrap_or_default().to_owned(),
        labels: pairs(v, "/metadata/labels")?,
        annotations: pairs(v, "/metadata/annotations")?,
        owner_references: owner_refs(v)?,
        replicas: v
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .and_then(|r| u32::try_from(r).ok()),
        deleting: v
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null()),
    })
}

/// Reads a Pod into a workload. Network, interface, container ID and CNI args are not in the
/// Pod: the caller fills them from the CNI call.
pub fn workload_from_pod(v: &Value) -> Result<Workload, ManifestError> {
    let o = object_from_value(v)?;
    if o.kind != "Pod" {
        return Err(ManifestError::WrongKind {
            expected: "Pod",
            found: o.kind,
        });
    }
    Ok(Workload {
        namespace: o.namespace,
        name: o.name,
        uid: o.uid,
        labels: o.labels,
        annotations: o.annotations,
        owner_references: o.owner_references,
        node: str_at(v, "/spec/nodeName").unwrap_or_default().to_owned(),
        ..Workload::default()
    })
}

/// The API group of an `apiVersion` (`apps/v1` -> `apps`, `v1` -> ``).
pub fn api_group(api_version: &str) -> &str {
    api_version
        .rsplit_once('/')
        .map(|(group, _)| group)
        .unwrap_or("")
}

/// Objects by (group, kind, namespace, name): the lookup behind owner-chain resolution. The
/// version is left out of the key so `kubevirt.io/v1` refers to an object stored as
/// `kubevirt.io/v1alpha3`, as the API server's conversion would.
#[derive(Debug, Default, Clone)]
pub struct ObjectIndex {
    objects: HashMap<(String, String, String, String), Object>,
}

impl ObjectIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an object.
    pub fn insert(&mut self, o: Object) {
        let key = (
            api_group(&o.api_version).to_owned(),
            o.kind.clone(),
            o.namespace.clone(),
            o.name.clone(),
        );
        self.objects.insert(key, o);
    }

    /// Removes an object; returns it if it was there.
    pub fn remove(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Object> {
        self.objects.remove(&(
            api_group(api_version).to_owned(),
            kind.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        ))
    }

    /// The object an owner reference points at, in `namespace`.
    pub fn get(&self, namespace: &str, r: &OwnerReference) -> Option<&Object> {
        self.lookup(&r.api_version, &r.kind, namespace, &r.name)
    }

    /// An object by apiVersion (any version of its group), kind, namespace and name.
    pub fn lookup(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<&Object> {
        self.objects.get(&(
            api_group(api_version).to_owned(),
            kind.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        ))
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Follows controller owner references from `refs`, nearest first, stopping at the first
    /// owner not in the index, at a cycle, or after [`MAX_OWNER_DEPTH`] steps. A uid mismatch
    /// (the owner was deleted and recreated) still resolves: the current object is what
    /// policies should see.
    pub fn owner_chain(&self, namespace: &str, refs: &[OwnerReference]) -> Vec<Object> {
        let mut chain: Vec<Object> = Vec::new();
        let mut next = refs.iter().find(|r| r.controller);
        while let Some(r) = next {
            if chain.len() >= MAX_OWNER_DEPTH {
                break;
            }
            let Some(o) = self.get(namespace, r) else {
                break;
            };
            if chain.iter().any(|c| c.kind == o.kind && c.name == o.name) {
                break;
            }
            chain.push(o.clone());
            next = o.owner_references.iter().find(|r| r.controller);
        }
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm_objects() -> (Value, Value, Value) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "virt-launcher-vm-cirros-abcde", "namespace": "default", "uid": "p1",
                "labels": {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "vm-cirros"},
                "annotations": {"n": 3},
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                    "name": "vm-cirros", "uid": "vmi1", "controller": true}]},
            "spec": {"nodeName": "node-1"}
        });
        let vmi = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm-cirros", "namespace": "default", "uid": "vmi1",
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "name": "vm-cirros", "uid": "vm1", "controller": true}]}
        });
        let vm = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm-cirros", "uid": "vm1"}
        });
        (pod, vmi, vm)
    }

    #[test]
    fn resolves_vm_chain() {
        let (pod, vmi, vm) = vm_objects();
        let w = workload_from_pod(&pod).expect("pod");
        assert_eq!(w.node, "node-1");
        assert_eq!(w.annotations, vec![("n".to_owned(), "3".to_owned())]);
        let mut idx = ObjectIndex::new();
        idx.insert(object_from_value(&vmi).expect("vmi"));
        idx.insert(object_from_value(&vm).expect("vm"));
        let chain = idx.owner_chain(&w.namespace, &w.owner_references);
        let kinds: Vec<_> = chain.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, ["VirtualMachineInstance", "VirtualMachine"]);
        assert!(
            idx.remove("kubevirt.io/v1", "VirtualMachine", "default", "vm-cirros")
                .is_some()
        );
        assert_eq!(idx.owner_chain(&w.namespace, &w.owner_references).len(), 1);
    }

    #[test]
    fn cycle_stops() {
        let a = json!({"apiVersion": "x/v1", "kind": "A", "metadata": {"name": "a",
            "ownerReferences": [{"apiVersion": "x/v1", "kind": "A", "name": "a", "controller": true}]}});
        let mut idx = ObjectIndex::new();
        idx.insert(object_from_value(&a).expect("a"));
        let refs = object_from_value(&a).expect("a").owner_references;
        assert_eq!(idx.owner_chain("default", &refs).len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let e = object_from_value(&json!({"kind": "Pod"})).expect_err("no apiVersion");
        assert_eq!(e.to_string(), "/apiVersion is missing or not a string");
        let e = workload_from_pod(
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}),
        )
        .expect_err("not a pod");
        assert!(e.to_string().contains("expected a Pod"));
        let e = object_from_value(
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": [1]}}),
        )
        .expect_err("bad labels");
        assert!(e.to_string().contains("/metadata/labels"));
        assert_eq!(
            object_from_value(&json!([])),
            Err(ManifestError::NotAnObject)
        );
    }
}
