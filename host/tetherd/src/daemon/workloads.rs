//! Standalone mode's workload source: a directory of Kubernetes manifests (Pods,
//! VirtualMachineInstances, VirtualMachines, StatefulSets, Namespaces, ...), re-read when a
//! file changes, so a manifest written before a CNI call is seen by that call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;
use tether_core::alloc::Liveness;
use tether_core::manifest::{ObjectIndex, object_from_value, workload_from_pod};
use tether_core::{Object, ObjectKey, ReleaseCondition, Workload};

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
    fn insert(&mut self, v: &Value) -> Result<(), String> {
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

struct FileEntry {
    stamp: (SystemTime, u64),
    /// The documents, or why the file could not be read.
    docs: Result<Vec<Value>, String>,
}

/// The directory and its parsed files.
pub struct WorkloadDir {
    dir: PathBuf,
    files: HashMap<PathBuf, FileEntry>,
    index: Arc<WorkloadIndex>,
}

impl WorkloadDir {
    /// Watches `dir` (created if missing).
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut w = WorkloadDir {
            dir,
            files: HashMap::new(),
            index: Arc::new(WorkloadIndex::default()),
        };
        w.refresh();
        Ok(w)
    }

    /// Re-reads changed files and returns the current index. An unreadable file (say, one
    /// half-written during an update) is read again once it changes; meanwhile the index is
    /// incomplete and judges nothing gone (see [`WorkloadIndex::complete`]).
    pub fn refresh(&mut self) -> Arc<WorkloadIndex> {
        let paths = match crate::manifests::manifest_files(&self.dir, true) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "listing workloads: {e}");
                return self.index.clone();
            }
        };
        let mut changed = paths.len() != self.files.len();
        let mut seen = HashMap::with_capacity(paths.len());
        for path in paths {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                // Listed a moment ago and gone now: deleted meanwhile (a rename's source).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    changed = true;
                    let stamp = (SystemTime::UNIX_EPOCH, 0);
                    seen.insert(
                        path,
                        FileEntry {
                            stamp,
                            docs: Err(e.to_string()),
                        },
                    );
                    continue;
                }
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            match self.files.remove(&path) {
                Some(e) if e.stamp == stamp => {
                    seen.insert(path, e);
                }
                _ => {
                    changed = true;
                    let docs = crate::manifests::read_documents(&path).map_err(|e| {
                        tracing::warn!(file = %path.display(), "workload manifest unreadable; nothing is judged gone until it is fixed: {e}");
                        e.to_string()
                    });
                    seen.insert(path, FileEntry { stamp, docs });
                }
            }
        }
        self.files = seen;
        if changed {
            let mut idx = WorkloadIndex::default();
            for (path, f) in &self.files {
                let docs = match &f.docs {
                    Ok(d) => d,
                    Err(e) => {
                        idx.unreadable.push(format!("{}: {e}", path.display()));
                        continue;
                    }
                };
                for doc in docs {
                    if let Err(e) = idx.insert(doc) {
                        tracing::warn!(file = %path.display(), "object unreadable; nothing is judged gone until it is fixed: {e}");
                        idx.unreadable.push(format!("{}: {e}", path.display()));
                    }
                }
            }
            self.index = Arc::new(idx);
        }
        self.index.clone()
    }
}
