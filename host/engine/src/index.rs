//! An in-memory index of Kubernetes objects (Pods, Namespaces and owner objects such as
//! VirtualMachineInstances, VirtualMachines, StatefulSets), built from their JSON, answering
//! as a [`WorkloadView`]. Standalone mode fills it from manifest files.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tether_core::alloc::Liveness;
use tether_core::manifest::{ObjectIndex, object_from_value, workload_from_pod};
use tether_core::{Object, ObjectKey, OwnerReference, ReleaseCondition, Workload};

use crate::ports::WorkloadView;

/// Whether two pod UIDs may name the same pod: equal, or one of them unknown (empty).
fn same_pod(a: &str, b: &str) -> bool {
    a.is_empty() || b.is_empty() || a == b
}

/// What the manifests say, indexed.
///
/// A missing object is judged deleted only when the index is *settled* (see
/// [`WorkloadIndex::settled_at`]): every manifest was read, and the files have not changed
/// for [`WorkloadIndex::settle`] since [`WorkloadIndex::newest_change`]. Until then nothing
/// is gone and no release condition fires.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    /// Owner objects (everything but Pods and Namespaces).
    pub objects: ObjectIndex,
    /// Pods by (namespace, name).
    pub pods: HashMap<(String, String), Workload>,
    /// Namespaces by name (their labels and annotations).
    pub namespaces: HashMap<String, Object>,
    /// Files (or documents) that could not be read: while there are any, an object missing
    /// from the index may just be in one of them, so nothing is judged gone.
    pub unreadable: Vec<String>,
    /// The latest modification time, by the filesystem's clock, of the source (its files and
    /// directories); `None` when there is none to wait for.
    pub newest_change: Option<SystemTime>,
    /// How long after [`WorkloadIndex::newest_change`] the index is settled (zero: at once,
    /// whatever the modification times say).
    pub settle: Duration,
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
                self.namespaces.insert(name.to_owned(), o);
            }
            _ => {
                let o = object_from_value(v).map_err(|e| e.to_string())?;
                self.objects.insert(o);
            }
        }
        Ok(())
    }

    /// Whether every manifest was read: only then may a missing object mean a deleted one.
    pub fn complete(&self) -> bool {
        self.unreadable.is_empty()
    }

    /// Whether what the index lacks is known deleted at `now`: every manifest was read, and
    /// the settle period has passed since the newest change (a change in the future, by a
    /// skewed clock, is not settled). A file that changed within it may be caught
    /// half-written, or between a delete and a create.
    pub fn settled_at(&self, now: SystemTime) -> bool {
        self.complete()
            && (self.settle.is_zero()
                || self.newest_change.is_none_or(|t| {
                    now.duration_since(t)
                        .is_ok_and(|since| since >= self.settle)
                }))
    }

    /// Whether the pod `namespace/name` with `uid` exists at `now`: live when a manifest has
    /// that pod (same UID, or either UID empty); gone when the index is settled (see
    /// [`WorkloadIndex::settled_at`]) and it has not (the name is missing, or has another
    /// UID, both set); unknown otherwise.
    pub fn pod_liveness_at(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        now: SystemTime,
    ) -> Liveness {
        if self
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .is_some_and(|w| same_pod(&w.uid, uid))
        {
            Liveness::Live
        } else if self.settled_at(now) {
            Liveness::Gone
        } else {
            Liveness::Unknown
        }
    }

    /// [`WorkloadIndex::pod_liveness_at`] now.
    pub fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        self.pod_liveness_at(namespace, name, uid, SystemTime::now())
    }

    fn lookup(&self, k: &ObjectKey) -> Option<&Object> {
        self.objects
            .lookup(&k.api_version, &k.kind, &k.namespace, &k.name)
    }

    /// Whether a release condition is known to hold at `now`: the index is settled (see
    /// [`WorkloadIndex::settled_at`]; a half-written StatefulSet may say `replicas: 1`), and
    /// the owner is missing, or scaled below the ordinal. Unknown never fires.
    pub fn fires_at(&self, c: &ReleaseCondition, now: SystemTime) -> bool {
        if !self.settled_at(now) {
            return false;
        }
        match c {
            ReleaseCondition::OwnerDeleted(k) => self.lookup(k).is_none(),
            ReleaseCondition::ScaledBelow { owner, ordinal } => self
                .lookup(owner)
                .is_none_or(|o| o.replicas.is_some_and(|r| r <= *ordinal)),
            ReleaseCondition::Never | ReleaseCondition::IdleForSeconds(_) => false,
        }
    }

    /// [`WorkloadIndex::fires_at`] now.
    pub fn fires(&self, c: &ReleaseCondition) -> bool {
        self.fires_at(c, SystemTime::now())
    }
}

impl WorkloadView for WorkloadIndex {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Workload>, String> {
        Ok(self
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned())
    }

    fn owner_chain(
        &self,
        namespace: &str,
        owners: &[OwnerReference],
    ) -> Result<Vec<Object>, String> {
        Ok(self.objects.owner_chain(namespace, owners))
    }

    fn namespace_annotations(&self, namespace: &str) -> Result<Vec<(String, String)>, String> {
        Ok(self
            .namespaces
            .get(namespace)
            .map(|o| o.annotations.clone())
            .unwrap_or_default())
    }

    fn namespace_labels(&self, namespace: &str) -> Result<Option<Vec<(String, String)>>, String> {
        Ok(self.namespaces.get(namespace).map(|o| o.labels.clone()))
    }

    fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        WorkloadIndex::pod_liveness(self, namespace, name, uid)
    }

    fn fires(&self, condition: &ReleaseCondition) -> bool {
        WorkloadIndex::fires(self, condition)
    }
}

/// An index judged as of one moment: the moment it was read for a request. An ADD's view
/// is asked about holders later, on the writer thread, maybe after a wait behind a slow
/// commit; judged then, a view that found the files unsettled could count as settled
/// without the files having been looked at again.
#[derive(Debug, Clone)]
pub struct IndexAt {
    /// The index.
    pub index: std::sync::Arc<WorkloadIndex>,
    /// When it was read.
    pub at: SystemTime,
}

impl WorkloadView for IndexAt {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Workload>, String> {
        self.index.pod(namespace, name)
    }

    fn owner_chain(
        &self,
        namespace: &str,
        owners: &[OwnerReference],
    ) -> Result<Vec<Object>, String> {
        self.index.owner_chain(namespace, owners)
    }

    fn namespace_annotations(&self, namespace: &str) -> Result<Vec<(String, String)>, String> {
        self.index.namespace_annotations(namespace)
    }

    fn namespace_labels(&self, namespace: &str) -> Result<Option<Vec<(String, String)>>, String> {
        self.index.namespace_labels(namespace)
    }

    fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        self.index.pod_liveness_at(namespace, name, uid, self.at)
    }

    fn fires(&self, condition: &ReleaseCondition) -> bool {
        self.index.fires_at(condition, self.at)
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

    fn sts(replicas: u32) -> WorkloadIndex {
        let mut idx = index(&[]);
        idx.insert(&json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "ns"}, "spec": {"replicas": replicas}}))
            .expect("sts");
        idx
    }

    fn below(ordinal: u32) -> ReleaseCondition {
        ReleaseCondition::ScaledBelow {
            owner: ObjectKey {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                namespace: "ns".into(),
                name: "db".into(),
            },
            ordinal,
        }
    }

    fn deleted(name: &str) -> ReleaseCondition {
        ReleaseCondition::OwnerDeleted(ObjectKey {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            namespace: "ns".into(),
            name: name.into(),
        })
    }

    #[test]
    fn nothing_is_gone_while_a_file_is_unreadable() {
        let mut idx = sts(1);
        idx.insert(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1"}}))
            .expect("pod");
        assert!(idx.fires(&below(1)));
        idx.unreadable.push("x.yaml: bad".into());
        assert_eq!(idx.pod_liveness("ns", "a", "u1"), Liveness::Live);
        assert_eq!(idx.pod_liveness("ns", "a", "u2"), Liveness::Unknown);
        assert_eq!(idx.pod_liveness("ns", "c", "u1"), Liveness::Unknown);
        assert!(
            !idx.fires(&below(1)),
            "the StatefulSet may be in that file too"
        );
        assert!(!idx.fires(&deleted("other")));
    }

    /// A4 and the settle rule: while the files changed within the settle period nothing is
    /// gone and nothing fires, not even `scaled-below` on a StatefulSet that is there (cut
    /// from `replicas: 10` to `replicas: 1`, it still parses).
    #[test]
    fn nothing_is_gone_and_nothing_fires_until_the_files_settle() {
        let mut idx = sts(1);
        idx.insert(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1"}}))
            .expect("pod");
        let t0 = SystemTime::now();
        idx.newest_change = Some(t0);
        idx.settle = Duration::from_secs(5);
        let settling = [t0, t0 + Duration::from_millis(4999)];
        let settled = [t0 + Duration::from_secs(5), t0 + Duration::from_secs(3600)];
        for now in settling {
            assert!(!idx.settled_at(now));
            assert!(!idx.fires_at(&below(1), now), "scaled-below");
            assert!(!idx.fires_at(&deleted("other"), now), "owner-deleted");
            assert_eq!(idx.pod_liveness_at("ns", "a", "u1", now), Liveness::Live);
            assert_eq!(idx.pod_liveness_at("ns", "a", "", now), Liveness::Live);
            assert_eq!(idx.pod_liveness_at("ns", "a", "u2", now), Liveness::Unknown);
            assert_eq!(idx.pod_liveness_at("ns", "c", "u1", now), Liveness::Unknown);
        }
        for now in settled {
            assert!(idx.settled_at(now));
            assert!(idx.fires_at(&below(1), now));
            assert!(!idx.fires_at(&below(0), now));
            assert!(idx.fires_at(&deleted("other"), now));
            assert!(!idx.fires_at(&deleted("db"), now));
            assert_eq!(idx.pod_liveness_at("ns", "a", "u2", now), Liveness::Gone);
            assert_eq!(idx.pod_liveness_at("ns", "c", "u1", now), Liveness::Gone);
        }
        // A change in the future (a skewed clock) is not settled.
        assert!(!idx.settled_at(t0 - Duration::from_secs(60)));
        // A zero settle period judges at once, whatever the times say.
        idx.settle = Duration::ZERO;
        assert!(idx.fires_at(&below(1), t0 - Duration::from_secs(60)));
    }
}
