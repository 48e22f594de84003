//! Standalone mode's workload source: a directory of Kubernetes manifests (Pods,
//! VirtualMachineInstances, VirtualMachines, StatefulSets, Namespaces, ...), re-read when a
//! file changes, so a manifest written before a CNI call is seen by that call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;
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

    /// Whether a pod exists.
    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.pods
            .contains_key(&(namespace.to_owned(), name.to_owned()))
    }

    fn lookup(&self, k: &ObjectKey) -> Option<&Object> {
        self.objects
            .lookup(&k.api_version, &k.kind, &k.namespace, &k.name)
    }

    /// Whether a release condition holds: its owner is gone, or scaled below the ordinal.
    pub fn fires(&self, c: &ReleaseCondition) -> bool {
        match c {
            ReleaseCondition::OwnerDeleted(k) => self.lookup(k).is_none(),
            ReleaseCondition::ScaledBelow { owner, ordinal } => match self.lookup(owner) {
                None => true,
                Some(o) => o.replicas.is_some_and(|r| r <= *ordinal),
            },
            ReleaseCondition::Never | ReleaseCondition::IdleForSeconds(_) => false,
        }
    }
}

struct FileEntry {
    stamp: (SystemTime, u64),
    docs: Vec<Value>,
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

    /// Re-reads changed files and returns the current index. Unreadable files are skipped
    /// with a warning (a half-written file is read again once complete).
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
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
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
                    let docs = match crate::manifests::read_documents(&path) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!(file = %path.display(), "skipping workload manifest: {e}");
                            Vec::new()
                        }
                    };
                    seen.insert(path, FileEntry { stamp, docs });
                }
            }
        }
        self.files = seen;
        if changed {
            let mut idx = WorkloadIndex::default();
            for (path, f) in &self.files {
                for doc in &f.docs {
                    if let Err(e) = idx.insert(doc) {
                        tracing::warn!(file = %path.display(), "skipping object: {e}");
                    }
                }
            }
            self.index = Arc::new(idx);
        }
        self.index.clone()
    }
}
