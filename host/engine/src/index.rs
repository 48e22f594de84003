//! An in-memory index of Kubernetes objects (Pods, Namespaces and owner objects such as
//! VirtualMachineInstances, VirtualMachines, StatefulSets), built from their JSON, answering
//! as a [`WorkloadView`]. Standalone mode fills it from manifest files.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_core::alloc::Liveness;
use tether_core::manifest::{ObjectIndex, api_group, object_from_value, workload_from_pod};
use tether_core::{Object, ObjectKey, OwnerReference, ReleaseCondition, Workload};

use crate::ports::WorkloadView;

/// Names one object of the index, to compare what a manifest file held before and after it
/// changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ObjectId {
    /// A Pod. Its UID is part of its name here: a pod recreated under its name is another
    /// pod.
    Pod {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// UID (empty when the manifest has none).
        uid: String,
    },
    /// Any other object but a Namespace.
    Object {
        /// `apiVersion` (compared by API group, as lookups are).
        api_version: String,
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

impl ObjectId {
    /// Whether this names the object `k` points at (any version of its API group).
    fn is(&self, k: &ObjectKey) -> bool {
        match self {
            ObjectId::Object {
                api_version,
                kind,
                namespace,
                name,
            } => {
                api_group(api_version) == api_group(&k.api_version)
                    && *kind == k.kind
                    && *namespace == k.namespace
                    && *name == k.name
            }
            ObjectId::Pod { .. } => false,
        }
    }
}

/// Whether two pod UIDs may name the same pod: equal, or one of them unknown (empty).
fn same_pod(a: &str, b: &str) -> bool {
    a.is_empty() || b.is_empty() || a == b
}

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
    /// Objects that left a manifest file that is still there (rewritten in place, truncated,
    /// replaced, moved within the directory) and have not come back: the file may be caught
    /// half-written, so they are not judged gone until [`WorkloadIndex::settle`] has passed
    /// since [`WorkloadIndex::last_change`].
    pub vanished: HashSet<ObjectId>,
    /// When a change in the files was last seen (`None`: nothing to wait for).
    pub last_change: Option<Instant>,
    /// How long the files must stay unchanged before the [`WorkloadIndex::vanished`] objects
    /// count as gone.
    pub settle: Duration,
}

impl WorkloadIndex {
    /// Adds one object (a parsed manifest document); returns its id (none for a Namespace).
    pub fn insert(&mut self, v: &Value) -> Result<Option<ObjectId>, String> {
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "Pod" => {
                let w = workload_from_pod(v).map_err(|e| e.to_string())?;
                let id = ObjectId::Pod {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    uid: w.uid.clone(),
                };
                self.pods.insert((w.namespace.clone(), w.name.clone()), w);
                Ok(Some(id))
            }
            "Namespace" => {
                let name = v
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .ok_or("Namespace without metadata.name")?;
                let mut o = object_from_value(v).map_err(|e| e.to_string())?;
                o.namespace = String::new();
                self.namespaces.insert(name.to_owned(), o.annotations);
                Ok(None)
            }
            _ => {
                let o = object_from_value(v).map_err(|e| e.to_string())?;
                let id = ObjectId::Object {
                    api_version: o.api_version.clone(),
                    kind: o.kind.clone(),
                    namespace: o.namespace.clone(),
                    name: o.name.clone(),
                };
                self.objects.insert(o);
                Ok(Some(id))
            }
        }
    }

    /// Whether the object `id` names is in the index.
    pub fn contains(&self, id: &ObjectId) -> bool {
        match id {
            ObjectId::Pod {
                namespace,
                name,
                uid,
            } => self
                .pods
                .get(&(namespace.clone(), name.clone()))
                .is_some_and(|w| w.uid == *uid),
            ObjectId::Object {
                api_version,
                kind,
                namespace,
                name,
            } => self
                .objects
                .lookup(api_version, kind, namespace, name)
                .is_some(),
        }
    }

    /// Whether every manifest was read: only then may a missing object mean a deleted one.
    pub fn complete(&self) -> bool {
        self.unreadable.is_empty()
    }

    /// Whether a missing object is known deleted at `now`: every manifest was read, and it
    /// did not just leave a file that is still there (`vanished` picks it among
    /// [`WorkloadIndex::vanished`]) unless the settle period is over.
    fn known_missing(&self, now: Instant, vanished: impl Fn(&ObjectId) -> bool) -> bool {
        let settling = self
            .last_change
            .is_some_and(|t| now.saturating_duration_since(t) < self.settle);
        self.complete() && !(settling && self.vanished.iter().any(vanished))
    }

    /// Whether the pod `namespace/name` with `uid` exists at `now`: live when a manifest has
    /// that pod (same UID, or either UID empty); gone when every manifest was read and it
    /// has not (the name is missing, or has another UID, both set), unless the pod just left
    /// a file that is still there and the settle period is not over; unknown otherwise.
    pub fn pod_liveness_at(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        now: Instant,
    ) -> Liveness {
        if self
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .is_some_and(|w| same_pod(&w.uid, uid))
        {
            return Liveness::Live;
        }
        let just_left = |id: &ObjectId| {
            matches!(id, ObjectId::Pod { namespace: n, name: m, uid: u }
                if n == namespace && m == name && same_pod(u, uid))
        };
        if self.known_missing(now, just_left) {
            Liveness::Gone
        } else {
            Liveness::Unknown
        }
    }

    /// [`WorkloadIndex::pod_liveness_at`] now.
    pub fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        self.pod_liveness_at(namespace, name, uid, Instant::now())
    }

    fn lookup(&self, k: &ObjectKey) -> Option<&Object> {
        self.objects
            .lookup(&k.api_version, &k.kind, &k.namespace, &k.name)
    }

    /// Whether a release condition is known to hold at `now`: its owner is gone (missing,
    /// every manifest was read, and it did not just leave a file that is still there unless
    /// the settle period is over), or scaled below the ordinal. Unknown never fires.
    pub fn fires_at(&self, c: &ReleaseCondition, now: Instant) -> bool {
        let gone = |k: &ObjectKey| self.known_missing(now, |id| id.is(k));
        match c {
            ReleaseCondition::OwnerDeleted(k) => self.lookup(k).is_none() && gone(k),
            ReleaseCondition::ScaledBelow { owner, ordinal } => match self.lookup(owner) {
                None => gone(owner),
                Some(o) => o.replicas.is_some_and(|r| r <= *ordinal),
            },
            ReleaseCondition::Never | ReleaseCondition::IdleForSeconds(_) => false,
        }
    }

    /// [`WorkloadIndex::fires_at`] now.
    pub fn fires(&self, c: &ReleaseCondition) -> bool {
        self.fires_at(c, Instant::now())
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

    fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        WorkloadIndex::pod_liveness(self, namespace, name, uid)
    }

    fn fires(&self, condition: &ReleaseCondition) -> bool {
        WorkloadIndex::fires(self, condition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index(pods: &[(&str, &str)]) -> WorkloadIndex {
        let mut idx = WorkloadIndex::default();
        for (name, uid) in pods {
            idx.insert(&json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ns", "uid": uid}}))
                .expect("pod");
        }
        idx
    }

    #[test]
    fn pod_liveness_compares_uids() {
        let idx = index(&[("a", "u1"), ("b", "")]);
        let live = |name: &str, uid: &str| idx.pod_liveness("ns", name, uid);
        assert_eq!(live("a", "u1"), Liveness::Live);
        assert_eq!(live("a", ""), Liveness::Live, "an ADD without a UID");
        assert_eq!(live("a", "u2"), Liveness::Gone, "another pod of that name");
        assert_eq!(live("b", "u1"), Liveness::Live, "a manifest without a UID");
        assert_eq!(live("c", "u1"), Liveness::Gone);
    }

    #[test]
    fn nothing_is_gone_while_a_file_is_unreadable_or_an_object_just_left_one() {
        let mut idx = index(&[("a", "u1")]);
        idx.unreadable.push("x.yaml: bad".into());
        assert_eq!(idx.pod_liveness("ns", "a", "u2"), Liveness::Unknown);
        assert_eq!(idx.pod_liveness("ns", "c", "u1"), Liveness::Unknown);
        idx.unreadable.clear();
        let t0 = Instant::now();
        idx.vanished.insert(ObjectId::Pod {
            namespace: "ns".into(),
            name: "c".into(),
            uid: "u1".into(),
        });
        idx.last_change = Some(t0);
        idx.settle = Duration::from_secs(5);
        let at = |uid: &str, t: Instant| idx.pod_liveness_at("ns", "c", uid, t);
        assert_eq!(at("u1", t0), Liveness::Unknown);
        assert_eq!(at("", t0), Liveness::Unknown);
        assert_eq!(at("u9", t0), Liveness::Gone, "not the pod that left");
        assert_eq!(at("u1", t0 + Duration::from_secs(5)), Liveness::Gone);
    }
}
