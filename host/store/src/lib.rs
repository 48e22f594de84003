//! Where allocations live between restarts.
//!
//! The [`Store`] trait speaks the allocator's terms: a [`Snapshot`] of every allocation with a
//! revision per pool, and an atomic, durable compare-and-swap [`Store::commit`] of
//! [`Change`]s. The embedded backend ([`embedded::EmbeddedStore`], a redb file) serves
//! standalone mode; the Kubernetes backend maps a pool's revision to its resource's
//! `resourceVersion`. [`contract`] holds the behaviour every backend must show, as functions
//! each backend's tests call.
//!
//! # Guarantees
//!
//! - A commit whose expected revisions all match is applied whole and is durable when
//!   `commit` returns; otherwise nothing of it is applied ([`StoreError::Conflict`]).
//! - A commit touching one pool is atomic on every backend; the embedded backend also makes a
//!   commit across several pools atomic.

pub mod contract;
pub mod embedded;

use std::collections::BTreeMap;

use tether_core::alloc::{Allocation, Change};
use thiserror::Error;

/// A pool's revision: bumped by every commit that touches the pool. 0 for a pool never written.
pub type Revision = u64;

/// Everything the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Revision per pool that has ever been written.
    pub revisions: BTreeMap<String, Revision>,
    /// Every allocation.
    pub allocations: Vec<Allocation>,
}

impl Snapshot {
    /// The revision of a pool (0 if never written).
    pub fn revision(&self, pool: &str) -> Revision {
        self.revisions.get(pool).copied().unwrap_or(0)
    }
}

/// The changes to one pool, valid only if the pool is still at `expected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Pool.
    pub pool: String,
    /// The revision the changes were planned against.
    pub expected: Revision,
    /// Changes, all of this pool.
    pub changes: Vec<Change>,
}

/// Groups changes by pool into batches against the given revisions.
pub fn batches(changes: &[Change], revision: impl Fn(&str) -> Revision) -> Vec<Batch> {
    let mut by_pool: BTreeMap<&str, Vec<Change>> = BTreeMap::new();
    for c in changes {
        by_pool.entry(c.pool()).or_default().push(c.clone());
    }
    by_pool
        .into_iter()
        .map(|(pool, changes)| Batch {
            pool: pool.to_owned(),
            expected: revision(pool),
            changes,
        })
        .collect()
}

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A pool moved on since the changes were planned.
    #[error("pool {pool} is at revision {actual}, not {expected}: another writer committed first")]
    Conflict {
        /// Pool.
        pool: String,
        /// Expected revision.
        expected: Revision,
        /// Actual revision.
        actual: Revision,
    },
    /// A batch holds a change of another pool.
    #[error("a batch for pool {batch} holds a change of pool {change}")]
    MixedBatch {
        /// The batch's pool.
        batch: String,
        /// The change's pool.
        change: String,
    },
    /// Stored data cannot be read.
    #[error("stored allocation {key} is unreadable: {reason}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The backend failed (I/O, database).
    #[error("store backend: {0}")]
    Backend(String),
}

/// Persistence of allocations.
pub trait Store: Send + Sync {
    /// Every allocation and the revision of every pool.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// Applies the batches if every pool is at its expected revision, durably; returns the new
    /// revision of each batch's pool, in order.
    fn commit(&self, batches: &[Batch]) -> Result<Vec<Revision>, StoreError>;
}
