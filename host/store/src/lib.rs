//! Where allocations live between restarts.
//!
//! The [`Store`] trait speaks the allocator's terms, one address at a time: every allocated
//! address is one record with its own [`Revision`], whatever pool it was allocated under, and
//! every write is conditional on it. A [`Change`] that puts an allocation at revision 0
//! creates it only if nobody holds the address, under any pool name (a claim); any other
//! change applies only if the record of that pool and address is still at the revision it was
//! planned on. So two writers with stale views, even of the pools (one still calls a pool by
//! its old name), can never both take one address: the second one's create fails with a
//! [`Conflict`], and it re-reads the address and re-plans.
//!
//! The embedded backend ([`embedded::EmbeddedStore`], a redb file) serves standalone mode;
//! the Kubernetes backend maps each record to one custom resource per address and a revision
//! to its `resourceVersion`. [`contract`] holds the behaviour every backend must show, as
//! functions each backend's tests call.
//!
//! # Guarantees
//!
//! - [`Store::commit`] takes groups of changes. A group is applied whole or not at all: if
//!   any of its changes finds its record at another revision, the group gets a [`Conflict`]
//!   and none of it is applied. Groups are independent of each other.
//! - What `commit` reports as applied is durable when it returns.
//! - Revisions are never reused: a record written again, or deleted and created again, gets
//!   a revision it never had, so "unchanged since I read it" is exact.
//! - [`Store::subscribe`] delivers every applied change, with its new revision, to every
//!   subscriber, in commit order (the embedded backend; the Kubernetes backend's watch).
//!
//! # Caveats
//!
//! On the embedded backend all groups of one `commit` share one transaction and one fsync.
//! The Kubernetes backend writes a group's changes one by one and undoes the ones already
//! made when a later one conflicts.

pub mod contract;
pub mod embedded;

use std::net::IpAddr;
use std::sync::mpsc::Receiver;

pub use tether_core::alloc::Revision;
use tether_core::alloc::{Allocation, Change};
use thiserror::Error;

/// Everything the store holds, each allocation with its revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every allocation, `revision` set.
    pub allocations: Vec<Allocation>,
}

/// Why a group was not applied: one of its changes found its record otherwise than planned
/// (`found` is the revision of the address's record, possibly under another pool name).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{pool}/{ip}: planned on revision {expected}, the store has {found}")]
pub struct Conflict {
    /// Pool of the record.
    pub pool: String,
    /// Address of the record.
    pub ip: IpAddr,
    /// The revision the change was planned on (0: expected no record).
    pub expected: Revision,
    /// The record's revision in the store (0: no record).
    pub found: Revision,
}

/// What a commit did to one group: the new revision of each of its changes (0 for a
/// delete), or the conflict that kept it out.
pub type GroupOutcome = Result<Vec<Revision>, Conflict>;

/// A change the store applied, as subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The allocation was written; `revision` is its new one.
    Put(Allocation),
    /// The record was deleted.
    Deleted {
        /// Pool.
        pool: String,
        /// Address.
        ip: IpAddr,
        /// The revision it had.
        revision: Revision,
    },
    /// The feed may have missed changes of this address (a watch re-listed after a gap and
    /// no longer found it): read it again from the store. It may come when nothing was
    /// missed (a write that raced the re-list): a needless re-read, never a wrong one.
    Stale {
        /// Address.
        ip: IpAddr,
    },
}

/// Why a store operation failed as a whole.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Stored data cannot be read.
    #[error("stored allocation {key} is unreadable: {reason}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A file holds one address twice under one pool name: an older tetherd wrote the second
    /// record after a downgrade. The engine keys an address by its pool, so it could keep
    /// only one, and the other's pod would share the address unseen. Nothing was changed.
    #[error(
        "the store holds {ip} twice under pool {pool} ({first}; {second}): an older tetherd wrote \
         the second record after a downgrade. Nothing was changed. Start that older tetherd \
         again, release the address of one of them (`tetherd release {pool}/{ip}`) or delete \
         its pod, then start this one"
    )]
    Twice {
        /// The address.
        ip: std::net::IpAddr,
        /// The pool name both records carry.
        pool: String,
        /// Who holds the first record.
        first: String,
        /// Who holds the second.
        second: String,
    },
    /// The backend failed (I/O, database). Nothing of the commit may be assumed applied or
    /// not applied: re-read the store.
    #[error("store backend: {0}")]
    Backend(String),
    /// The store does not answer now (its server unreachable, overloaded or too slow): a
    /// passing condition. Whether a write in flight was applied is unknown; the writer
    /// re-reads the store, and the caller should try again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Persistence of allocations, one record per address.
pub trait Store: Send + Sync {
    /// Every allocation, with its revision.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// The record of an address, with its revision, under whatever pool it was allocated;
    /// empty if the address is free. (More than one only in an embedded file written before
    /// addresses were claimed across pools: see [`embedded`].)
    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError>;

    /// Applies each group whole if all its changes find their records at the revisions
    /// they were planned on, durably; returns one outcome per group, in order.
    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError>;

    /// A feed of every change applied from now on, by any writer of this store.
    fn subscribe(&self) -> Receiver<Event>;

    /// The allocations pinned to `identity` of `kind`, read from the store itself, for a
    /// writer whose state comes from a feed that may lag (other nodes write too): before it
    /// gives an identity its first address it asks whether the identity has one already.
    /// `None`: this store has no other writers, the state is complete.
    fn pinned_to(
        &self,
        _kind: tether_core::IdentityKind,
        _identity: &str,
    ) -> Result<Option<Vec<Allocation>>, StoreError> {
        Ok(None)
    }
}
