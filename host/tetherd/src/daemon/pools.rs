//! IPPool manifests from a file or a directory.

use std::path::Path;

use tether_core::pool::{Pool, from_manifest};

use crate::manifests::read_documents;

/// Reads every IPPool of a file, or of every .yaml/.yml/.json file of a directory. Any error
/// stops start-up: a pool typo must not silently drop a pool.
pub fn load(path: &Path) -> anyhow::Result<Vec<Pool>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
        {
            let p = entry?.path();
            if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut pools: Vec<Pool> = Vec::new();
    for f in files {
        for (i, doc) in read_documents(&f)?.iter().enumerate() {
            let pool = from_manifest(doc)
                .map_err(|e| anyhow::anyhow!("{} (document {i}): {e}", f.display()))?;
            if pools.iter().any(|p| p.name == pool.name) {
                anyhow::bail!("{}: pool {} is defined twice", f.display(), pool.name);
            }
            pools.push(pool);
        }
    }
    Ok(pools)
}
