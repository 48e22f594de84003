//! Tether's engine: what a node daemon does, whatever it runs on.
//!
//! [`Engine`] serves the CNI calls (ADD, DEL, CHECK, GC, STATUS), the reconciler and the
//! operator's calls. It owns the in-memory allocation state ([`tether_core::alloc::Ipam`]) and
//! the single [`writer`] that plans ADD and DEL on it and commits to the store. It talks to
//! the outside only through ports:
//!
//! - a [`Store`](tether_store::Store): one record per allocated address, every write
//!   conditional on that address's revision (embedded redb file, or one custom resource per
//!   address in Kubernetes mode);
//! - a [`WorkloadSource`](ports::WorkloadSource): pods by namespace and name, owner chains,
//!   namespace annotations, three-valued liveness, and whether it has synced (a manifest
//!   directory, or informer caches);
//! - a [`Decide`](ports::Decide) port: the policy chain.
//!
//! `tetherd` only wires adapters to these ports and serves the engine over its socket.
//!
//! # Guarantees
//!
//! - No address is handed to two identities: planning only picks addresses free in the
//!   state, and the store refuses a claim of an address someone else claimed first (the
//!   writer then re-reads it and plans again).
//! - Nothing is released on a guess: only a workload source that knows a pod or owner is gone
//!   lets a holder be replaced or a release rule fire; the reconciler, CNI GC and releases by
//!   hand delete only what is unchanged since they looked.

pub mod engine;
pub mod gc;
pub mod index;
pub mod metrics;
pub mod ports;
pub mod writer;

use tether_core::alloc::Ipam;
use tether_core::pool::{Pool, PoolError};
use tether_store::StoreError;

pub use engine::{
    ClaimRef, ClaimReport, ClaimReporter, Engine, EngineError, GcReporter, NodeInfo, Ports,
    ReleaseGate,
};
pub use gc::{GcReason, GcSettings};
pub use metrics::Metrics;

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be read.
    #[error("reading the store: {0}")]
    Store(#[from] StoreError),
    /// The pools cannot be used with the stored allocations.
    #[error(transparent)]
    Pools(#[from] PoolError),
    /// The writer thread did not start.
    #[error("starting the writer thread: {0}")]
    Thread(std::io::Error),
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PoolDiff {
    /// Pools that are new.
    pub added: Vec<String>,
    /// Pools that are gone.
    pub removed: Vec<String>,
    /// Pools whose definition changed.
    pub changed: Vec<String>,
}

impl PoolDiff {
    /// What changes from `old` to `new`.
    pub fn between(old: &[&Pool], new: &[Pool]) -> PoolDiff {
        let mut d = PoolDiff::default();
        for n in new {
            match old.iter().find(|o| o.name == n.name) {
                None => d.added.push(n.name.clone()),
                Some(o) if *o != n => d.changed.push(n.name.clone()),
                Some(_) => {}
            }
        }
        for o in old {
            if !new.iter().any(|n| n.name == o.name) {
                d.removed.push(o.name.clone());
            }
        }
        d
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Logs the allocations whose address is in no current pool (at start-up and after a reload).
pub fn warn_orphans(ipam: &Ipam) {
    for o in ipam.orphans() {
        let covering = ipam
            .pools()
            .find(|p| p.contains(o.ip))
            .map(|p| p.name.as_str());
        match covering {
            Some(p) => {
                tracing::warn!(pool = %o.pool, ip = %o.ip, reserved_in = p, "allocation held under a pool name no longer in force; its address stays reserved in pool {p} until released (DEL, GC, its release rule or `tetherd release`)")
            }
            None => {
                tracing::warn!(pool = %o.pool, ip = %o.ip, "allocation outside every current pool is kept until released (DEL, GC, its release rule or `tetherd release`)")
            }
        }
    }
}
