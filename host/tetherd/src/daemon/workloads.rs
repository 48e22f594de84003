//! Standalone mode's workload source: a directory of Kubernetes manifests (Pods,
//! VirtualMachineInstances, VirtualMachines, StatefulSets, Namespaces, ...), re-read when a
//! file changes, so a manifest written before a CNI call is seen by that call.
//!
//! # What counts as deleted
//!
//! A file that does not parse makes the whole index incomplete: nothing is judged gone. A
//! file that parses may still be half-written: `kubectl get vm db -o yaml > vm.yaml` empties
//! the file first, and a file cut inside a block mapping reads as another object. So an object
//! that leaves a file that is still there (rewritten in place, replaced by a rename onto it,
//! or moved to another name within the directory) is judged gone only once no file of the
//! directory has changed for the settle period. An object whose file was deleted (or moved out
//! of the directory) is gone at once: deleting a file is deliberate and atomic.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tether_engine::index::{ObjectId, WorkloadIndex};
use tether_engine::ports::{WorkloadSource, WorkloadView};

/// What tells one version of a file from the next: modification time, length, and the file
/// itself (device, inode), which a rename onto the path replaces.
type Stamp = (SystemTime, u64, (u64, u64));

struct FileEntry {
    stamp: Stamp,
    /// The documents, or why the file could not be read.
    docs: Result<Vec<Value>, String>,
    /// The objects the file held when last read (while it cannot be read, those of its last
    /// readable version).
    objects: HashSet<ObjectId>,
}

/// The directory and its parsed files.
pub struct WorkloadDir {
    dir: PathBuf,
    files: HashMap<PathBuf, FileEntry>,
    index: Arc<WorkloadIndex>,
    /// How long the directory must stay unchanged before an object that left a file still
    /// there counts as gone.
    settle: Duration,
    /// Objects that left a file still there and have not come back, with that file.
    vanished: HashMap<ObjectId, PathBuf>,
    /// When a change in the files was last seen.
    changed_at: Option<Instant>,
}

impl WorkloadDir {
    /// Watches `dir` (created if missing). An object that leaves a file that is still there
    /// counts as gone once no file has changed for `settle`.
    pub fn new(dir: PathBuf, settle: Duration) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut w = WorkloadDir {
            dir,
            files: HashMap::new(),
            index: Arc::new(WorkloadIndex::default()),
            settle,
            vanished: HashMap::new(),
            changed_at: None,
        };
        w.refresh();
        Ok(w)
    }

    /// Re-reads changed files and returns the current index. An unreadable file (say, one
    /// half-written during an update) is read again once it changes; meanwhile the index is
    /// incomplete and judges nothing gone (see [`WorkloadIndex::complete`]). Objects that left
    /// a file still there are judged gone only after the settle period (see the module
    /// documentation).
    pub fn refresh(&mut self) -> Arc<WorkloadIndex> {
        self.refresh_at(Instant::now())
    }

    fn refresh_at(&mut self, now: Instant) -> Arc<WorkloadIndex> {
        let paths = match crate::manifests::manifest_files(&self.dir, true) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "listing workloads: {e}");
                return self.index.clone();
            }
        };
        let mut changed = paths.len() != self.files.len();
        let mut seen = HashMap::with_capacity(paths.len());
        // Files there before and now, in another version: what they held before.
        let mut rewritten: Vec<(PathBuf, HashSet<ObjectId>)> = Vec::new();
        for path in paths {
            let read = std::fs::metadata(&path);
            if let Err(e) = &read
                && e.kind() == std::io::ErrorKind::NotFound
            {
                // Listed a moment ago and gone now: deleted meanwhile (a rename's source).
                continue;
            }
            let old = self.files.remove(&path);
            let (stamp, docs) = match read {
                Ok(meta) => {
                    let stamp = (
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                        (meta.dev(), meta.ino()),
                    );
                    match old {
                        Some(e) if e.stamp == stamp => {
                            seen.insert(path, e);
                            continue;
                        }
                        _ => {}
                    }
                    let docs = crate::manifests::read_documents(&path).map_err(|e| {
                        tracing::warn!(file = %path.display(), "workload manifest unreadable; nothing is judged gone until it is fixed: {e}");
                        e.to_string()
                    });
                    (stamp, docs)
                }
                Err(e) => ((SystemTime::UNIX_EPOCH, 0, (0, 0)), Err(e.to_string())),
            };
            changed = true;
            let before = match old {
                Some(e) => {
                    rewritten.push((path.clone(), e.objects.clone()));
                    e.objects
                }
                None => HashSet::new(),
            };
            seen.insert(
                path,
                FileEntry {
                    stamp,
                    docs,
                    // Filled when the index is built; kept while the file cannot be read.
                    objects: before,
                },
            );
        }
        // What is left of the previous listing is no longer there.
        let left = std::mem::replace(&mut self.files, seen);
        if !changed && left.is_empty() {
            return self.index.clone();
        }
        // The objects that left a file still there before the last change are gone for good
        // once the directory stayed unchanged for the settle period.
        if self
            .changed_at
            .is_some_and(|t| now.saturating_duration_since(t) >= self.settle)
        {
            self.vanished.clear();
        }
        self.changed_at = Some(now);
        let mut candidates: Vec<(ObjectId, PathBuf)> = Vec::new();
        if !left.is_empty() {
            let here = file_ids(&self.dir);
            for (path, f) in left {
                if here.contains(&f.stamp.2) {
                    // Moved within the directory (an editor's backup, another name): its
                    // objects are elsewhere, or on their way back.
                    candidates.extend(f.objects.into_iter().map(|id| (id, path.clone())));
                } else {
                    // Deleted: its objects are gone at once, even those that had left it.
                    self.vanished.retain(|_, from| *from != path);
                }
            }
        }
        let mut idx = WorkloadIndex::default();
        for (path, f) in &mut self.files {
            let docs = match &f.docs {
                Ok(d) => d,
                Err(e) => {
                    idx.unreadable.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let mut objects = HashSet::with_capacity(docs.len());
            let mut complete = true;
            for doc in docs {
                match idx.insert(doc) {
                    Ok(id) => objects.extend(id),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), "object unreadable; nothing is judged gone until it is fixed: {e}");
                        idx.unreadable.push(format!("{}: {e}", path.display()));
                        complete = false;
                    }
                }
            }
            if complete {
                f.objects = objects;
            } else {
                f.objects.extend(objects);
            }
        }
        for (path, before) in rewritten {
            if let Some(f) = self.files.get(&path) {
                candidates.extend(
                    before
                        .into_iter()
                        .filter(|id| !f.objects.contains(id))
                        .map(|id| (id, path.clone())),
                );
            }
        }
        for (id, path) in candidates {
            if !idx.contains(&id) {
                tracing::info!(file = %path.display(), object = ?id, settle = ?self.settle, "object left a workload manifest that is still there; judged gone only once the directory is unchanged for the settle period");
                self.vanished.insert(id, path);
            }
        }
        self.vanished.retain(|id, _| !idx.contains(id));
        if !self.vanished.is_empty() {
            idx.vanished = self.vanished.keys().cloned().collect();
            idx.last_change = Some(now);
            idx.settle = self.settle;
        }
        self.index = Arc::new(idx);
        self.index.clone()
    }
}

/// (device, inode) of every file under `dir`, whatever its name (hidden, or not a
/// manifest): where a file that left the listing may have been moved to.
fn file_ids(dir: &Path) -> HashSet<(u64, u64)> {
    fn walk(dir: &Path, out: &mut HashSet<(u64, u64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                walk(&entry.path(), out);
            } else {
                out.insert((meta.dev(), meta.ino()));
            }
        }
    }
    let mut out = HashSet::new();
    walk(dir, &mut out);
    out
}

/// The directory as the engine's workload source: every view re-reads what changed.
pub struct WorkloadFiles(Mutex<WorkloadDir>);

impl WorkloadFiles {
    /// Watches `dir` (created if missing), with the settle period of [`WorkloadDir::new`].
    pub fn new(dir: PathBuf, settle: Duration) -> std::io::Result<Self> {
        Ok(WorkloadFiles(Mutex::new(WorkloadDir::new(dir, settle)?)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tether_core::alloc::Liveness;
    use tether_core::{ObjectKey, ReleaseCondition};

    /// Longer than any test: "now" is always within it, `now + SETTLE` always after it.
    const SETTLE: Duration = Duration::from_secs(60);

    const VM: &str = "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm-cirros\n  namespace: prod\n  uid: vm-uid-1\nspec:\n  runStrategy: Always\n";
    const STS: &str = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db\n  namespace: prod\n  uid: sts-uid-1\nspec:\n  replicas: 3\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db-0\n  namespace: prod\n  uid: 6a1f9e0e-0000-4000-8000-000000000001\n  ownerReferences:\n  - {apiVersion: apps/v1, kind: StatefulSet, name: db, uid: sts-uid-1, controller: true}\n";
    const POD_UID: &str = "6a1f9e0e-0000-4000-8000-000000000001";

    fn vm_deleted() -> ReleaseCondition {
        ReleaseCondition::OwnerDeleted(ObjectKey {
            api_version: "kubevirt.io/v1".into(),
            kind: "VirtualMachine".into(),
            namespace: "prod".into(),
            name: "vm-cirros".into(),
        })
    }

    fn sts_below(ordinal: u32) -> ReleaseCondition {
        ReleaseCondition::ScaledBelow {
            owner: ObjectKey {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                namespace: "prod".into(),
                name: "db".into(),
            },
            ordinal,
        }
    }

    /// A directory holding vm.yaml, sts.yaml and db-0.yaml, read once.
    fn populated() -> (tempfile::TempDir, WorkloadDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (name, text) in [("vm.yaml", VM), ("sts.yaml", STS), ("db-0.yaml", POD)] {
            std::fs::write(tmp.path().join(name), text).expect("write");
        }
        let w = WorkloadDir::new(tmp.path().to_owned(), SETTLE).expect("workloads");
        (tmp, w)
    }

    fn pod(idx: &WorkloadIndex, uid: &str) -> Liveness {
        idx.pod_liveness("prod", "db-0", uid)
    }

    /// What the index says about the VM, the StatefulSet and db-0 now.
    fn judged(idx: &WorkloadIndex) -> (bool, bool, Liveness) {
        (
            idx.fires(&vm_deleted()),
            idx.fires(&sts_below(1)),
            pod(idx, POD_UID),
        )
    }

    /// The same once the settle period is over.
    fn judged_after_settle(idx: &WorkloadIndex) -> (bool, bool, Liveness) {
        let later = Instant::now() + SETTLE;
        (
            idx.fires_at(&vm_deleted(), later),
            idx.fires_at(&sts_below(1), later),
            idx.pod_liveness_at("prod", "db-0", POD_UID, later),
        )
    }

    const UNKNOWN: (bool, bool, Liveness) = (false, false, Liveness::Unknown);
    const GONE: (bool, bool, Liveness) = (true, true, Liveness::Gone);

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn everything_present_is_live() {
        let (_tmp, mut w) = populated();
        let idx = w.refresh();
        assert_eq!(judged(&idx), (false, false, Liveness::Live));
        assert_eq!(judged_after_settle(&idx), (false, false, Liveness::Live));
        // UIDs: the same or an unknown one is that pod; another one is not.
        assert_eq!(pod(&idx, ""), Liveness::Live);
        assert_eq!(pod(&idx, "another-uid"), Liveness::Gone);
        assert_eq!(idx.pod_liveness("prod", "db-1", POD_UID), Liveness::Gone);
    }

    /// Defect A: `kubectl get vm -o yaml > vm.yaml` truncates the file to 0 bytes first; an
    /// empty file parses as no document, and read as "the VM is gone".
    #[test]
    fn a_file_truncated_to_nothing_judges_nothing_gone() {
        let (tmp, mut w) = populated();
        w.refresh();
        for name in ["vm.yaml", "sts.yaml", "db-0.yaml"] {
            write(tmp.path(), name, "");
        }
        let idx = w.refresh();
        assert_eq!(judged(&idx), UNKNOWN);
        assert_eq!(pod(&idx, ""), Liveness::Unknown);
        // Left so for the settle period: deleted, as far as anyone can tell.
        assert_eq!(judged_after_settle(&idx), GONE);
    }

    /// Defect A: a file cut inside a block mapping still parses, as another object (a VM
    /// named `vm-cir`, a pod in `default`) or as the object without its uid.
    #[test]
    fn a_block_style_truncation_judges_nothing_gone() {
        let cuts = [
            (
                "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm-cir",
                "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: d",
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db",
            ),
            // Cut before `namespace:`: the objects land in `default`.
            (
                "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm-cirros\n",
                "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db\n",
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db-0\n",
            ),
            // Cut at a `---` boundary: the first document only.
            (
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n---\n",
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n---\n",
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n---\n",
            ),
        ];
        for (vm, sts, pod) in cuts {
            let (tmp, mut w) = populated();
            w.refresh();
            write(tmp.path(), "vm.yaml", vm);
            write(tmp.path(), "sts.yaml", sts);
            write(tmp.path(), "db-0.yaml", pod);
            let idx = w.refresh();
            assert!(idx.complete(), "the cut files parse: {:?}", idx.unreadable);
            assert_eq!(judged(&idx), UNKNOWN, "{vm:?}");
            assert_eq!(judged_after_settle(&idx), GONE, "{vm:?}");
        }
    }

    /// Cut inside the pod's uid: the manifest names db-0 with another UID, which would say
    /// "the holder's pod was recreated".
    #[test]
    fn a_pod_cut_inside_its_uid_is_not_another_pod() {
        let (tmp, mut w) = populated();
        w.refresh();
        let cut = &POD[..POD.find(POD_UID).expect("uid") + 8];
        write(tmp.path(), "db-0.yaml", cut);
        let idx = w.refresh();
        assert!(idx.complete(), "{:?}", idx.unreadable);
        assert_eq!(pod(&idx, POD_UID), Liveness::Unknown);
        assert_eq!(pod(&idx, ""), Liveness::Live, "a pod of that name is there");
    }

    /// The settle period runs from the last change of any file, and ends with the directory
    /// unchanged.
    #[test]
    fn the_settle_period_restarts_with_every_change() {
        let (tmp, mut w) = populated();
        let t0 = Instant::now();
        w.refresh_at(t0);
        write(tmp.path(), "vm.yaml", "");
        let idx = w.refresh_at(t0);
        assert!(!idx.fires_at(&vm_deleted(), t0 + SETTLE / 2));
        // Another file changes halfway: the VM waits a whole period more.
        write(
            tmp.path(),
            "sts.yaml",
            &STS.replace("replicas: 3", "replicas: 30"),
        );
        let idx = w.refresh_at(t0 + SETTLE / 2);
        assert!(!idx.fires_at(&vm_deleted(), t0 + SETTLE));
        assert!(idx.fires_at(&vm_deleted(), t0 + SETTLE / 2 + SETTLE));
        // Once settled it stays gone, whatever changes later.
        let idx = w.refresh_at(t0 + 2 * SETTLE);
        assert!(idx.fires_at(&vm_deleted(), t0 + 2 * SETTLE));
        write(tmp.path(), "sts.yaml", STS);
        let idx = w.refresh_at(t0 + 2 * SETTLE);
        assert!(idx.fires_at(&vm_deleted(), t0 + 2 * SETTLE));
        assert!(idx.vanished.is_empty());
    }

    /// A file replaced atomically (a temporary renamed onto it) without the object is a
    /// rewrite, not a deletion.
    #[test]
    fn a_file_replaced_by_rename_without_the_object_is_a_rewrite() {
        let (tmp, mut w) = populated();
        w.refresh();
        let other = VM.replace("vm-cirros", "vm-other");
        write(tmp.path(), ".vm.yaml.tmp", &other);
        std::fs::rename(tmp.path().join(".vm.yaml.tmp"), tmp.path().join("vm.yaml"))
            .expect("rename");
        let idx = w.refresh();
        assert!(!idx.fires(&vm_deleted()));
        assert!(idx.fires_at(&vm_deleted(), Instant::now() + SETTLE));
    }

    /// A pod manifest rewritten for a recreated pod: the new UID is live at once, the old one
    /// is gone once the directory settles (until then, an ADD of the new pod still takes the
    /// address over: see `tether_core::alloc::Ipam::plan_add`).
    #[test]
    fn a_pod_rewritten_with_another_uid() {
        let (tmp, mut w) = populated();
        w.refresh();
        write(tmp.path(), "db-0.yaml", &POD.replace(POD_UID, "uid-2"));
        let idx = w.refresh();
        assert_eq!(pod(&idx, "uid-2"), Liveness::Live);
        assert_eq!(pod(&idx, ""), Liveness::Live);
        assert_eq!(pod(&idx, POD_UID), Liveness::Unknown);
        let later = Instant::now() + SETTLE;
        assert_eq!(
            idx.pod_liveness_at("prod", "db-0", POD_UID, later),
            Liveness::Gone
        );
    }

    /// A file renamed within the directory: its objects are still there (another manifest
    /// name) or may be on their way back (an editor's backup, `vm.yaml~`).
    #[test]
    fn a_file_moved_within_the_directory_is_not_a_deletion() {
        let (tmp, mut w) = populated();
        w.refresh();
        std::fs::rename(tmp.path().join("vm.yaml"), tmp.path().join("vm2.yaml")).expect("mv");
        let idx = w.refresh();
        assert!(!idx.fires(&vm_deleted()), "moved to another manifest");
        assert!(idx.vanished.is_empty(), "still there: {:?}", idx.vanished);
        std::fs::rename(tmp.path().join("vm2.yaml"), tmp.path().join("vm2.yaml~")).expect("mv");
        let idx = w.refresh();
        assert!(!idx.fires(&vm_deleted()), "moved to a backup name");
        assert!(idx.fires_at(&vm_deleted(), Instant::now() + SETTLE));
        std::fs::rename(tmp.path().join("vm2.yaml~"), tmp.path().join("vm.yaml")).expect("mv");
        let idx = w.refresh();
        assert!(
            !idx.fires_at(&vm_deleted(), Instant::now() + SETTLE),
            "back"
        );
        // Moved out of the directory: deleted.
        let out = tempfile::tempdir().expect("tempdir");
        std::fs::rename(tmp.path().join("vm.yaml"), out.path().join("vm.yaml")).expect("mv");
        assert!(w.refresh().fires(&vm_deleted()));
    }

    /// Deleting a file is deliberate: its objects are gone at once.
    #[test]
    fn a_deleted_file_is_gone_at_once() {
        let (tmp, mut w) = populated();
        w.refresh();
        std::fs::remove_file(tmp.path().join("vm.yaml")).expect("rm");
        std::fs::remove_file(tmp.path().join("db-0.yaml")).expect("rm");
        let idx = w.refresh();
        assert!(idx.fires(&vm_deleted()));
        assert_eq!(pod(&idx, POD_UID), Liveness::Gone);
        std::fs::remove_file(tmp.path().join("sts.yaml")).expect("rm");
        assert!(w.refresh().fires(&sts_below(1)));
    }

    /// A truncated file that is then deleted: gone at once, too.
    #[test]
    fn a_truncated_file_then_deleted_is_gone_at_once() {
        let (tmp, mut w) = populated();
        w.refresh();
        write(tmp.path(), "vm.yaml", "");
        write(
            tmp.path(),
            "db-0.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db",
        );
        assert_eq!(judged(&w.refresh()), UNKNOWN);
        std::fs::remove_file(tmp.path().join("vm.yaml")).expect("rm");
        std::fs::remove_file(tmp.path().join("db-0.yaml")).expect("rm");
        let idx = w.refresh();
        assert!(idx.fires(&vm_deleted()));
        assert_eq!(pod(&idx, POD_UID), Liveness::Gone);
    }

    /// A file that does not parse keeps what it held: once it parses without the object,
    /// that object left a file that is still there.
    #[test]
    fn an_unreadable_file_remembers_its_objects() {
        let (tmp, mut w) = populated();
        w.refresh();
        write(tmp.path(), "vm.yaml", "kind: [unclosed");
        let idx = w.refresh();
        assert!(!idx.complete());
        assert!(!idx.fires_at(&vm_deleted(), Instant::now() + SETTLE));
        write(tmp.path(), "vm.yaml", "");
        let idx = w.refresh();
        assert!(idx.complete());
        assert!(!idx.fires(&vm_deleted()));
        assert!(idx.fires_at(&vm_deleted(), Instant::now() + SETTLE));
    }

    /// The object written back: live again.
    #[test]
    fn an_object_written_back_is_live() {
        let (tmp, mut w) = populated();
        w.refresh();
        write(tmp.path(), "vm.yaml", "");
        write(tmp.path(), "db-0.yaml", "");
        w.refresh();
        write(tmp.path(), "vm.yaml", VM);
        write(tmp.path(), "db-0.yaml", POD);
        let idx = w.refresh();
        assert_eq!(judged(&idx), (false, false, Liveness::Live));
        assert_eq!(judged_after_settle(&idx), (false, false, Liveness::Live));
        assert!(idx.vanished.is_empty());
    }

    /// Without a settle period, an object that left its file is gone at once (the behaviour
    /// before the settle period existed).
    #[test]
    fn a_zero_settle_period_judges_at_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "vm.yaml", VM);
        let mut w = WorkloadDir::new(tmp.path().to_owned(), Duration::ZERO).expect("dir");
        write(tmp.path(), "vm.yaml", "");
        assert!(w.refresh().fires(&vm_deleted()));
    }
}
