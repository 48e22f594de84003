//! The embedded backend: one redb file, crash-safe (copy-on-write B-trees with checksums) and
//! durable at every commit (fsync before `commit` returns).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tether_core::alloc::{Allocation, Change};

use crate::{Batch, Revision, Snapshot, Store, StoreError};

/// Allocations by `pool/ip`, as JSON.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");
/// Revision by pool.
const REVISIONS: TableDefinition<&str, u64> = TableDefinition::new("revisions");

/// redb's page cache.
const CACHE_BYTES: usize = 32 << 20;

/// A redb-backed store.
pub struct EmbeddedStore {
    db: Database,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn key(pool: &str, ip: std::net::IpAddr) -> String {
    format!("{pool}/{ip}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb caches up to 1 GiB by default. The daemon reads the whole store once, at
        // start-up, and then only writes small commits: a small cache serves that, and keeps a
        // node with a million allocations from holding the file in memory twice.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(ALLOCATIONS).map_err(backend)?;
        txn.open_table(REVISIONS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(EmbeddedStore { db })
    }
}

impl Store for EmbeddedStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut snap = Snapshot::default();
        let revs = txn.open_table(REVISIONS).map_err(backend)?;
        for row in revs.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            snap.revisions.insert(k.value().to_owned(), v.value());
        }
        let allocs = txn.open_table(ALLOCATIONS).map_err(backend)?;
        for row in allocs.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            let a: Allocation =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    key: k.value().to_owned(),
                    reason: e.to_string(),
                })?;
            snap.allocations.push(a);
        }
        Ok(snap)
    }

    fn commit(&self, batches: &[Batch]) -> Result<Vec<Revision>, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let mut out = Vec::with_capacity(batches.len());
        {
            let mut revs = txn.open_table(REVISIONS).map_err(backend)?;
            let mut allocs = txn.open_table(ALLOCATIONS).map_err(backend)?;
            for b in batches {
                let actual = revs
                    .get(b.pool.as_str())
                    .map_err(backend)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                if actual != b.expected {
                    // Dropping the transaction without commit aborts it: nothing is applied.
                    return Err(StoreError::Conflict {
                        pool: b.pool.clone(),
                        expected: b.expected,
                        actual,
                    });
                }
                for c in &b.changes {
                    if c.pool() != b.pool {
                        return Err(StoreError::MixedBatch {
                            batch: b.pool.clone(),
                            change: c.pool().to_owned(),
                        });
                    }
                    match c {
                        Change::Put(a) => {
                            let v = serde_json::to_vec(a).map_err(backend)?;
                            allocs
                                .insert(key(&a.pool, a.ip).as_str(), v.as_slice())
                                .map_err(backend)?;
                        }
                        Change::Delete { pool, ip } => {
                            allocs.remove(key(pool, *ip).as_str()).map_err(backend)?;
                        }
                    }
                }
                let next = actual + 1;
                revs.insert(b.pool.as_str(), next).map_err(backend)?;
                out.push(next);
            }
        }
        txn.commit().map_err(backend)?;
        Ok(out)
    }
}
