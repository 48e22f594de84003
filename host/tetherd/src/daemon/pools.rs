//! IPPool manifests from a file or a directory, loaded at start-up and again whenever a file
//! changes (or on SIGHUP). A reload that fails keeps the pools in force.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tether_core::pool::{Pool, check_disjoint, from_manifest};

use crate::manifests::{manifest_files, read_documents};

/// The manifest files of `path`: the file itself, or those of a directory (not descending).
fn files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    manifest_files(path, false).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

/// Reads every IPPool of `files`. Any error fails the whole load: a pool typo must not
/// silently drop a pool.
fn load_files(files: &[PathBuf]) -> anyhow::Result<Vec<Pool>> {
    let mut pools: Vec<Pool> = Vec::new();
    for f in files {
        for (i, doc) in read_documents(f)?.iter().enumerate() {
            let pool = from_manifest(doc)
                .map_err(|e| anyhow::anyhow!("{} (document {i}): {e}", f.display()))?;
            if pools.iter().any(|p| p.name == pool.name) {
                anyhow::bail!("{}: pool {} is defined twice", f.display(), pool.name);
            }
            pools.push(pool);
        }
    }
    // Two pools sharing an address would both hand it out.
    check_disjoint(&pools)?;
    Ok(pools)
}

/// What the files looked like at the last load: path, modification time and length.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f.clone(), modified, len)
        })
        .collect()
}

/// The pools' source, watched for changes.
pub struct PoolFiles {
    path: PathBuf,
    seen: Stamp,
}

impl PoolFiles {
    /// Loads the pools for start-up.
    pub fn open(path: &Path) -> anyhow::Result<(PoolFiles, Vec<Pool>)> {
        let list = files(path)?;
        let pools = load_files(&list)?;
        Ok((
            PoolFiles {
                path: path.to_owned(),
                seen: stamp(&list),
            },
            pools,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pools again if a file changed since the last look (or `force`), else `None`.
    /// A failed load is reported once per change.
    pub fn reload(&mut self, force: bool) -> Option<anyhow::Result<Vec<Pool>>> {
        let list = files(&self.path);
        let now = list.as_deref().map(stamp).unwrap_or_default();
        if !force && now == self.seen {
            return None;
        }
        self.seen = now;
        Some(list.and_then(|l| load_files(&l)))
    }
}
