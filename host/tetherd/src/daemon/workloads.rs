//! Standalone mode's workload source: a directory of Kubernetes manifests (Pods,
//! VirtualMachineInstances, VirtualMachines, StatefulSets, Namespaces, ...), re-read when a
//! file changes, so a manifest written before a CNI call is seen by that call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde_json::Value;
use tether_engine::index::WorkloadIndex;
use tether_engine::ports::{WorkloadSource, WorkloadView};

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

/// The directory as the engine's workload source: every view re-reads what changed.
pub struct WorkloadFiles(Mutex<WorkloadDir>);

impl WorkloadFiles {
    /// Watches `dir` (created if missing).
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        Ok(WorkloadFiles(Mutex::new(WorkloadDir::new(dir)?)))
    }
}

impl WorkloadSource for WorkloadFiles {
    fn synced(&self) -> bool {
        true
    }

    fn view(&self) -> Arc<dyn WorkloadView> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refresh()
    }
}
