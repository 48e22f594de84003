//! The allocator: in-memory state of every pool and allocation, and pure planning of ADD, DEL,
//! GC and release.
//!
//! # Expected flow
//!
//! The daemon asks [`Ipam::plan_add`] (or `plan_del`, `plan_gc`, `plan_release`) for a
//! [`Plan`]: the [`Change`]s to persist and, for ADD, the addresses to return. It commits the
//! changes to its store, then [`Ipam::apply`]s them, then answers the caller.
//!
//! # Guarantees
//!
//! - An address is in at most one [`Allocation`]; an allocation belongs to one owner (an
//!   attachment, or a pinned identity). Several pods hold a pinned address at once only when
//!   the newcomer's policy allowed sharing (`may_share`, the live-migration target).
//! - Every allocatable address is either in the pool's [`FreeSet`] or in an allocation, never
//!   both; planning never hands out an address that is not free.
//! - Planning is O(log n) in the number of free intervals: no scan of the pool.
//!
//! # Assumptions
//!
//! One writer applies plans in order (the daemon serializes them). Plans are computed against
//! the current state and must be applied before the next plan is computed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The maps of the allocation state: foldhash (seeded per process) instead of SipHash, which
/// halves the cost of indexing a million allocations at start-up.
type Map<K, V> = foldhash::HashMap<K, V>;

use crate::decision::{Decision, IdentityKind, ReleaseCondition};
use crate::net::{Family, to_u128};
use crate::pool::{FreeSet, Pool, PoolError, Route, addr, check_disjoint};

/// At most this many pods hold one pinned address at once, whatever a policy's `may-share`
/// says: a live migration's source and its target. A policy that marks unrelated pods as
/// sharing cannot pile them onto one address.
pub const MAX_SHARING_HOLDERS: usize = 2;

/// Whether a pod (an attachment's holder: that namespace, name and UID) still exists, as far as
/// the workload source knows.
///
/// Only [`Liveness::Gone`] lets the allocator act against a holder (another pod of the
/// identity takes over, a release rule fires): a source that cannot tell (a manifest that does
/// not parse or was just rewritten, a cache not synced yet) answers [`Liveness::Unknown`],
/// which keeps everything as it is. The one other evidence is the kubelet's: an ADD for the
/// same pod name with another UID (both set) replaces a holder the source does not say is
/// [`Liveness::Live`] (see [`Ipam::plan_add`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    /// It exists.
    Live,
    /// It is known not to exist.
    Gone,
    /// The source cannot tell.
    Unknown,
}

use crate::select::{ANNOTATION_NS_DEFAULT, ANNOTATION_POOL};

/// One interface of one pod: what CNI calls an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// Pod namespace (empty outside Kubernetes).
    #[serde(default)]
    pub namespace: String,
    /// Pod name.
    #[serde(default)]
    pub pod: String,
    /// Pod UID.
    #[serde(default)]
    pub pod_uid: String,
}

impl Attachment {
    fn key(&self) -> (String, String) {
        (self.container_id.clone(), self.ifname.clone())
    }

    /// `namespace/pod (container id, ifname)`, for messages.
    pub fn describe(&self) -> String {
        if self.pod.is_empty() {
            format!("container {} ({})", self.container_id, self.ifname)
        } else {
            format!(
                "pod {}/{} (container {}, {})",
                self.namespace, self.pod, self.container_id, self.ifname
            )
        }
    }
}

/// A pod holding an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// The attachment.
    pub attachment: Attachment,
    /// It joined while another pod held the address (a migration target).
    #[serde(default)]
    pub shared: bool,
    /// The node whose daemon added it (Kubernetes mode; empty standalone, and in records
    /// written before nodes were recorded): a CNI GC on one node drops only its own holders.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// When it started holding (unix seconds).
    pub since: u64,
}

/// Who owns an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Owner {
    /// Released with its only holder.
    Ephemeral,
    /// Kept for an identity until a release condition fires.
    #[serde(rename_all = "camelCase")]
    Pinned {
        /// Identity key.
        identity: String,
        /// What it stands for.
        kind: IdentityKind,
        /// When to release.
        release: Vec<ReleaseCondition>,
    },
}

/// The store's version of one allocation: set by every write of it, never reused (a delete
/// and a re-create give a new one). 0: not stored yet. A change carries the revision it was
/// planned on, and the store applies it only if the allocation is still at that revision.
pub type Revision = u64;

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// Pool.
    pub pool: String,
    /// Address.
    pub ip: IpAddr,
    /// CNI network name.
    pub network: String,
    /// The interface (CNI_IFNAME) it was allocated for: a pinned identity keeps one address
    /// per network and interface.
    pub interface: String,
    /// Owner.
    pub owner: Owner,
    /// Pods holding it now: one for ephemeral; zero (kept), one, or two (migration) for pinned.
    pub holders: Vec<Holder>,
    /// Since when no pod holds it (pinned only; unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<u64>,
    /// The store's revision of it when it was read (0: not stored yet). Kept by the store
    /// beside the record, not in it.
    #[serde(skip)]
    pub revision: Revision,
}

impl Allocation {
    /// The pinned identity, if any.
    pub fn identity(&self) -> Option<&str> {
        match &self.owner {
            Owner::Pinned { identity, .. } => Some(identity),
            Owner::Ephemeral => None,
        }
    }

    fn key(&self) -> AllocKey {
        AllocKey {
            pool: self.pool.clone(),
            ip: self.ip,
        }
    }

    /// The pin index key of a pinned allocation: one pin per identity and its kind, network
    /// and interface. The kind is part of it: a VM and a StatefulSet pod of the same name
    /// are different identities.
    fn pin_key(&self) -> Option<PinKey> {
        match &self.owner {
            Owner::Pinned { identity, kind, .. } => Some(PinKey {
                identity: identity.clone(),
                kind: *kind,
                network: self.network.clone(),
                ifname: self.interface.clone(),
            }),
            Owner::Ephemeral => None,
        }
    }
}

/// What a plan asks the store to do. Every change is conditional on the revision it was
/// planned on: a `Put` of an allocation at revision 0 creates it only if nobody holds the
/// address; any other change applies only if the stored allocation is still at that revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    /// Create (revision 0) or replace (its revision) the allocation of `(pool, ip)`.
    Put(Allocation),
    /// Remove the allocation of `(pool, ip)`, if still at `revision`.
    Delete {
        /// Pool.
        pool: String,
        /// Address.
        ip: IpAddr,
        /// The revision it was planned on.
        #[serde(default)]
        revision: Revision,
    },
}

impl Change {
    /// The change that deletes `a` as it was read.
    pub fn delete(a: &Allocation) -> Change {
        Change::Delete {
            pool: a.pool.clone(),
            ip: a.ip,
            revision: a.revision,
        }
    }

    /// The pool this change touches.
    pub fn pool(&self) -> &str {
        match self {
            Change::Put(a) => &a.pool,
            Change::Delete { pool, .. } => pool,
        }
    }

    /// The address this change touches.
    pub fn ip(&self) -> IpAddr {
        match self {
            Change::Put(a) => a.ip,
            Change::Delete { ip, .. } => *ip,
        }
    }

    /// The revision it was planned on (0: the address was free).
    pub fn revision(&self) -> Revision {
        match self {
            Change::Put(a) => a.revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// An address handed to a pod, with what CNI returns about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Assigned {
    /// Pool.
    pub pool: String,
    /// Address.
    pub ip: IpAddr,
    /// Prefix length of the pool's subnet.
    pub prefix: u8,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Routes.
    pub routes: Vec<Route>,
}

/// The outcome of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What to persist, in order.
    pub changes: Vec<Change>,
    /// For ADD: the addresses, one per family.
    pub assigned: Vec<Assigned>,
}

/// Why an allocation cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocError {
    /// A named pool does not exist.
    #[error("pool {pool:?} does not exist{}", hint(.known))]
    UnknownPool {
        /// The name.
        pool: String,
        /// Pools that exist.
        known: Vec<String>,
    },
    /// A selected pool's node or namespace selector leaves this pod out.
    #[error("pool {pool:?} may not serve this pod: {reason}")]
    PoolNotAllowed {
        /// The pool.
        pool: String,
        /// Which selector, and what it did not match.
        reason: String,
    },
    /// A selected pool's node selector cannot be checked yet (this node's labels are not
    /// known yet): try again.
    #[error("pool {pool:?} may not serve this pod yet: {reason}; try again")]
    SelectorUnknown {
        /// The pool.
        pool: String,
        /// What is not known.
        reason: String,
    },
    /// Nothing names a pool and there is no default pool.
    #[error(
        "no pool selected for this pod: annotate it with {ANNOTATION_POOL}, annotate its namespace with {ANNOTATION_NS_DEFAULT}, list pools in the CNI config, or mark a pool `default: true`"
    )]
    NoPool,
    /// Every candidate pool of a family is full.
    #[error(
        "{family} pools {pools:?} are exhausted: every address is allocated (see `tetherd pools`); add addresses or free some"
    )]
    PoolExhausted {
        /// Family.
        family: Family,
        /// The pools tried.
        pools: Vec<String>,
    },
    /// A requested address is in none of the candidate pools.
    #[error("requested address {ip} is not allocatable in pools {pools:?}")]
    AddressNotInPool {
        /// Address.
        ip: IpAddr,
        /// Candidate pools.
        pools: Vec<String>,
    },
    /// A requested address is taken.
    #[error("requested address {ip} is already held by {holder}")]
    AddressInUse {
        /// Address.
        ip: IpAddr,
        /// Who holds it.
        holder: String,
    },
    /// A pinned address is held by another live pod and this pod may not share it.
    #[error(
        "address {ip} of identity {identity} is held by {holder}; another pod of the identity may hold it at the same time only when its policy allows sharing (a live-migration target). Retry once the old pod is gone"
    )]
    IdentityBusy {
        /// Identity.
        identity: String,
        /// Address.
        ip: IpAddr,
        /// Current holder.
        holder: String,
    },
    /// A pool annotation cannot be read.
    #[error("annotation {annotation}: {reason}")]
    BadAnnotation {
        /// Annotation key.
        annotation: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The decision cannot be allocated (abstain reached the allocator).
    #[error("the policy chain returned no decision")]
    NoDecision,
    /// An address asked to be released by hand is held by a pod.
    #[error(
        "{ip} is held by {holder}: release it once the pod is gone (its DEL or a CNI GC frees an ephemeral address), or add --force (`tetherd release --force`) if the pod is gone for good"
    )]
    StillHeld {
        /// Address.
        ip: IpAddr,
        /// Who holds it.
        holder: String,
    },
    /// An address asked to be released is not allocated.
    #[error("{ip} is not allocated in pool {pool:?} (see /v1/allocations)")]
    NotAllocated {
        /// Pool.
        pool: String,
        /// Address.
        ip: IpAddr,
    },
}

fn hint(known: &[String]) -> String {
    if known.is_empty() {
        "; no pools are defined".into()
    } else {
        format!("; known pools: {}", known.join(", "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AllocKey {
    pool: String,
    ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PinKey {
    identity: String,
    kind: IdentityKind,
    network: String,
    ifname: String,
}

#[derive(Debug, Clone)]
struct PoolState {
    pool: Pool,
    free: FreeSet,
}

/// Usage of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: String,
    /// Allocated addresses.
    pub allocated: u128,
    /// Allocatable addresses.
    pub total: u128,
    /// Cluster default.
    pub default: bool,
}

/// An ADD to plan.
#[derive(Debug, Clone)]
pub struct AddRequest<'a> {
    /// Who asks.
    pub attachment: Attachment,
    /// CNI network name.
    pub network: String,
    /// The policy chain's decision (ephemeral or pinned).
    pub decision: &'a Decision,
    /// Candidate pools, in order (see [`select_pools`]).
    pub pools: Vec<String>,
    /// Specific addresses asked for (CNI `IP=` args); one per family at most.
    pub requested: Vec<IpAddr>,
    /// The node asking (recorded in the holder; empty standalone).
    pub node: String,
    /// Now, unix seconds.
    pub now: u64,
}

/// Plans the release of those of `candidates` (pinned, unheld: see
/// [`Ipam::release_candidates`]) whose release condition fired. `fires` answers for
/// owner-deleted and scaled-below; idle-for is judged here. Each change carries the revision
/// the candidate was read at: applied only if the allocation is unchanged since.
pub fn plan_release_of(
    candidates: &[Allocation],
    now: u64,
    fires: &dyn Fn(&ReleaseCondition) -> bool,
) -> Plan {
    let mut plan = Plan::default();
    for a in candidates {
        let Owner::Pinned { release, .. } = &a.owner else {
            continue;
        };
        if !a.holders.is_empty() {
            continue;
        }
        let fired = release.iter().any(|c| match c {
            ReleaseCondition::Never => false,
            ReleaseCondition::IdleForSeconds(s) => {
                a.idle_since.is_some_and(|t| now.saturating_sub(t) >= *s)
            }
            other => fires(other),
        });
        if fired {
            plan.changes.push(Change::delete(a));
        }
    }
    plan
}

/// Moves a pool's search to a point derived from `seed` and `key`.
fn place_cursor(ps: &mut PoolState, seed: u64, key: &impl std::hash::Hash) {
    let size: u128 = ps.pool.ranges.iter().map(|&(s, e)| e - s + 1).sum();
    if size == 0 {
        return;
    }
    let mut h = std::hash::BuildHasher::build_hasher(&foldhash::fast::FixedState::with_seed(seed));
    key.hash(&mut h);
    let mut k = u128::from(std::hash::Hasher::finish(&h)) % size;
    for &(s, e) in &ps.pool.ranges {
        let len = e - s + 1;
        if k < len {
            ps.free.set_cursor(s + k);
            return;
        }
        k -= len;
    }
}

/// The state of every pool and allocation.
#[derive(Debug, Clone, Default)]
pub struct Ipam {
    pools: BTreeMap<String, PoolState>,
    /// Boxed: a hash table keeps up to half its slots empty, and an empty slot costs the size
    /// of its value.
    allocs: Map<AllocKey, Box<Allocation>>,
    /// Allocations by the hash of their holders' (container id, interface): a lookup
    /// compares the holders themselves, so a hash collision costs a comparison, never a wrong
    /// answer, and the index keeps no copy of the strings.
    by_attachment: Map<u64, Vec<AllocKey>>,
    attachment_hasher: foldhash::fast::RandomState,
    by_pin: Map<PinKey, Vec<AllocKey>>,
    /// Addresses inside a pool held by more than one allocation, with the count of the extra
    /// ones: only a store written before overlapping pools were refused holds such. Their
    /// address goes back to the free set only with the last of them.
    doubles: Map<IpAddr, u32>,
    /// How many allocations each pool name holds (current pools and removed ones), to find
    /// every allocation of an address.
    names: BTreeMap<String, usize>,
    /// Where each pool's search starts, as a seed (see [`Ipam::spread_cursors`]).
    spread: Option<u64>,
    /// Set while applying another writer's changes: their addresses do not move the cursor.
    foreign: bool,
}

impl Ipam {
    /// Builds the state from pools and persisted allocations. Allocations outside every pool
    /// (a pool deleted or shrunk) are kept, so nothing is silently lost; see [`Ipam::orphans`].
    /// Refuses pools that overlap (see [`check_disjoint`]).
    pub fn new(pools: Vec<Pool>, allocations: Vec<Allocation>) -> Result<Self, PoolError> {
        check_disjoint(&pools)?;
        let mut ipam = Ipam::default();
        ipam.allocs.reserve(allocations.len());
        ipam.by_attachment.reserve(allocations.len());
        for a in allocations {
            ipam.index(a);
        }
        // The free sets are built once, from all the allocations, in one pass per pool.
        ipam.set_pools(pools)?;
        Ok(ipam)
    }

    /// Replaces the pool definitions, keeping every allocation. An address is free in a pool
    /// only if no allocation holds it, under whatever pool name it was allocated: an address
    /// still held under a pool that was removed or renamed stays reserved in the pool that
    /// now covers it until it is released. Refuses pools that overlap, leaving the state
    /// as it was.
    pub fn set_pools(&mut self, pools: Vec<Pool>) -> Result<(), PoolError> {
        check_disjoint(&pools)?;
        let mut taken: Vec<Vec<u128>> = vec![Vec::new(); pools.len()];
        self.doubles.clear();
        for a in self.allocs.values() {
            // The pool the allocation names first (the common case), then any pool covering it.
            let i = pools
                .iter()
                .position(|p| p.name == a.pool && p.contains(a.ip))
                .or_else(|| pools.iter().position(|p| p.contains(a.ip)));
            if let Some(i) = i {
                taken[i].push(to_u128(a.ip));
            }
        }
        self.pools = pools
            .into_iter()
            .zip(taken)
            .map(|(p, mut t)| {
                t.sort_unstable();
                for w in t.windows(2) {
                    if w[0] == w[1] {
                        *self.doubles.entry(addr(&p, w[0])).or_default() += 1;
                    }
                }
                t.dedup();
                let free = FreeSet::without(&p.ranges, &t);
                (p.name.clone(), PoolState { pool: p, free })
            })
            .collect();
        self.place_cursors();
        Ok(())
    }

    /// The pool whose ranges cover `ip` (pools never overlap), trying `hint` first.
    fn covering_mut(&mut self, hint: &str, ip: IpAddr) -> Option<&mut PoolState> {
        let name = if self.pools.get(hint).is_some_and(|p| p.pool.contains(ip)) {
            hint.to_owned()
        } else {
            self.pools
                .values()
                .find(|p| p.pool.contains(ip))?
                .pool
                .name
                .clone()
        };
        self.pools.get_mut(&name)
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name).map(|s| &s.pool)
    }

    /// The pools, by name.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values().map(|s| &s.pool)
    }

    /// Pool names, sorted.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// Names of the pools marked `default: true`.
    pub fn default_pools(&self) -> Vec<String> {
        self.pools
            .values()
            .filter(|s| s.pool.default)
            .map(|s| s.pool.name.clone())
            .collect()
    }

    /// Usage per pool, by name.
    pub fn usage(&self) -> Vec<PoolUsage> {
        self.pools
            .values()
            .map(|s| PoolUsage {
                name: s.pool.name.clone(),
                subnet: s.pool.subnet.to_string(),
                allocated: s.pool.total - s.free.count(),
                total: s.pool.total,
                default: s.pool.default,
            })
            .collect()
    }

    /// Every allocation (unordered).
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocs.values().map(|a| &**a)
    }

    /// Allocations held under a pool name that no longer covers their address (the pool was
    /// removed, renamed or shrunk). Each stays until released; while it does, its address is
    /// reserved in whichever current pool covers it.
    pub fn orphans(&self) -> Vec<&Allocation> {
        self.allocations()
            .filter(|a| {
                !self
                    .pools
                    .get(&a.pool)
                    .is_some_and(|p| p.pool.contains(a.ip))
            })
            .collect()
    }

    fn attachment_hash(&self, container_id: &str, ifname: &str) -> u64 {
        use std::hash::BuildHasher;
        self.attachment_hasher.hash_one((container_id, ifname))
    }

    /// The allocations an attachment holds.
    pub fn held_by(&self, container_id: &str, ifname: &str) -> Vec<&Allocation> {
        self.by_attachment
            .get(&self.attachment_hash(container_id, ifname))
            .into_iter()
            .flatten()
            .filter_map(|k| self.allocs.get(k))
            .map(|a| &**a)
            .filter(|a| {
                a.holders.iter().any(|h| {
                    h.attachment.container_id == container_id && h.attachment.ifname == ifname
                })
            })
            .collect()
    }

    /// The allocation of an address, if any.
    pub fn get(&self, pool: &str, ip: IpAddr) -> Option<&Allocation> {
        self.allocs
            .get(&AllocKey {
                pool: pool.to_owned(),
                ip,
            })
            .map(|a| &**a)
    }

    /// Every allocation of an address, under whatever pool name: one, or none (more only
    /// from a store written before overlapping pools were refused).
    pub fn at(&self, ip: IpAddr) -> Vec<&Allocation> {
        self.names
            .keys()
            .filter_map(|pool| self.get(pool, ip))
            .collect()
    }

    /// What CNI returns for an allocation: the address with its pool's prefix, gateway and
    /// routes.
    pub fn assigned(&self, a: &Allocation) -> Assigned {
        let pool = self.pools.get(&a.pool).map(|s| &s.pool);
        Assigned {
            pool: a.pool.clone(),
            ip: a.ip,
            prefix: pool.map(|p| p.subnet.prefix_len()).unwrap_or(match a.ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            }),
            gateway: pool.and_then(|p| p.gateway),
            routes: pool.map(|p| p.routes.clone()).unwrap_or_default(),
        }
    }

    /// Plans an ADD. `liveness` says whether a current holder's pod (that UID) still exists.
    /// Another pod takes a pinned address over from a holder only when the holder is known to
    /// be [`Liveness::Gone`], or is the same pod name with another UID (both UIDs set: the pod
    /// was recreated) and the source does not say it is [`Liveness::Live`]. A holder the
    /// source cannot judge is kept, and so is one an ADD without a UID names.
    pub fn plan_add(
        &self,
        req: &AddRequest<'_>,
        liveness: &dyn Fn(&Attachment) -> Liveness,
    ) -> Result<Plan, AllocError> {
        // A retried ADD returns what the attachment already holds, once it holds an address
        // of every family its pools have. (A dual-stack ADD whose commit was cut short by a
        // store outage may have kept one family: its retry plans the other.)
        let held = self.held_by(&req.attachment.container_id, &req.attachment.ifname);
        let held_family =
            |family: Family| held.iter().copied().find(|a| Family::of(a.ip) == family);
        if !held.is_empty()
            && req
                .pools
                .iter()
                .filter_map(|name| self.pools.get(name))
                .all(|ps| held_family(ps.pool.family()).is_some())
        {
            return Ok(Plan {
                changes: vec![],
                assigned: held.iter().map(|a| self.assigned(a)).collect(),
            });
        }
        let pinned = match req.decision {
            Decision::Abstain => return Err(AllocError::NoDecision),
            Decision::Ephemeral => None,
            Decision::Pinned(p) => Some(p),
        };
        let mut candidates: Vec<&PoolState> = Vec::with_capacity(req.pools.len());
        for name in &req.pools {
            let ps = self
                .pools
                .get(name)
                .ok_or_else(|| AllocError::UnknownPool {
                    pool: name.clone(),
                    known: self.pool_names(),
                })?;
            candidates.push(ps);
        }
        if candidates.is_empty() {
            return Err(AllocError::NoPool);
        }
        let mut families: Vec<Family> = Vec::new();
        for c in &candidates {
            if !families.contains(&c.pool.family()) {
                families.push(c.pool.family());
            }
        }
        let holder = Holder {
            attachment: req.attachment.clone(),
            shared: pinned.is_some_and(|p| p.may_share),
            node: req.node.clone(),
            since: req.now,
        };
        let mut plan = Plan::default();
        for family in families {
            if let Some(a) = held_family(family) {
                plan.assigned.push(self.assigned(a));
                continue;
            }
            let of_family: Vec<&PoolState> = candidates
                .iter()
                .copied()
                .filter(|c| c.pool.family() == family)
                .collect();
            let requested = req
                .requested
                .iter()
                .copied()
                .find(|ip| Family::of(*ip) == family);

            // A pinned identity reuses its address when a candidate pool still holds it.
            if let Some(p) = pinned {
                let key = PinKey {
                    identity: p.identity.clone(),
                    kind: p.kind,
                    network: req.network.clone(),
                    ifname: req.attachment.ifname.clone(),
                };
                let existing = self
                    .by_pin
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.allocs.get(k))
                    .map(|a| &**a)
                    .find(|a| Family::of(a.ip) == family);
                if let Some(old) = existing {
                    // A store written before overlapping pools were refused may hold the
                    // address a second time, for someone else: never hand it out while that
                    // record stands (`tetherd release` removes it).
                    if let Some(other) = self.at(old.ip).into_iter().find(|o| o.pool != old.pool) {
                        return Err(AllocError::AddressInUse {
                            ip: old.ip,
                            holder: match (&other.owner, other.holders.first()) {
                                (_, Some(h)) => h.attachment.describe(),
                                (Owner::Pinned { identity, .. }, None) => {
                                    format!("identity {identity} (pool {})", other.pool)
                                }
                                (Owner::Ephemeral, None) => {
                                    format!("another allocation (pool {})", other.pool)
                                }
                            },
                        });
                    }
                    let live: Vec<&Holder> = old
                        .holders
                        .iter()
                        .filter(|h| !gives_way(h, &req.attachment, liveness(&h.attachment)))
                        .collect();
                    // The candidate pool covering the old address, whatever name the address
                    // was allocated under (a renamed pool keeps its pins).
                    let covering = of_family
                        .iter()
                        .find(|c| c.pool.contains(old.ip))
                        .filter(|_| requested.is_none_or(|r| r == old.ip));
                    if let Some(covering) = covering {
                        // Sharing is for a live migration: its source and one target. A
                        // third live pod waits (code 11) whatever the policy says.
                        if let Some(first) = live.first()
                            && (!p.may_share || live.len() >= MAX_SHARING_HOLDERS)
                        {
                            return Err(AllocError::IdentityBusy {
                                identity: p.identity.clone(),
                                ip: old.ip,
                                holder: first.attachment.describe(),
                            });
                        }
                        let mut updated = old.clone();
                        if updated.pool != covering.pool.name {
                            // Re-filed under the pool's current name.
                            plan.changes.push(Change::delete(old));
                            updated.pool = covering.pool.name.clone();
                            updated.revision = 0;
                        }
                        updated.holders = live.into_iter().cloned().collect();
                        updated.holders.push(holder.clone());
                        updated.owner = Owner::Pinned {
                            identity: p.identity.clone(),
                            kind: p.kind,
                            release: p.release.clone(),
                        };
                        updated.idle_since = None;
                        plan.assigned.push(self.assigned(&updated));
                        plan.changes.push(Change::Put(updated));
                        continue;
                    }
                    // The pod now selects pools that do not hold the old address: the pin
                    // moves, unless a live pod still uses the old address.
                    if let Some(first) = live.first() {
                        return Err(AllocError::IdentityBusy {
                            identity: p.identity.clone(),
                            ip: old.ip,
                            holder: first.attachment.describe(),
                        });
                    }
                    plan.changes.push(Change::delete(old));
                }
            }

            let (pool, ip) = match requested {
                Some(ip) => self.check_requested(ip, &of_family)?,
                None => of_family
                    .iter()
                    .find_map(|c| c.free.peek_next().map(|n| (*c, addr(&c.pool, n))))
                    .ok_or_else(|| AllocError::PoolExhausted {
                        family,
                        pools: of_family.iter().map(|c| c.pool.name.clone()).collect(),
                    })?,
            };
            let a = Allocation {
                pool: pool.pool.name.clone(),
                ip,
                network: req.network.clone(),
                interface: req.attachment.ifname.clone(),
                owner: match pinned {
                    None => Owner::Ephemeral,
                    Some(p) => Owner::Pinned {
                        identity: p.identity.clone(),
                        kind: p.kind,
                        release: p.release.clone(),
                    },
                },
                holders: vec![Holder {
                    shared: false,
                    ..holder.clone()
                }],
                idle_since: None,
                revision: 0,
            };
            plan.assigned.push(self.assigned(&a));
            plan.changes.push(Change::Put(a));
        }
        Ok(plan)
    }

    fn check_requested<'s>(
        &self,
        ip: IpAddr,
        of_family: &[&'s PoolState],
    ) -> Result<(&'s PoolState, IpAddr), AllocError> {
        let Some(pool) = of_family.iter().copied().find(|c| c.pool.contains(ip)) else {
            return Err(AllocError::AddressNotInPool {
                ip,
                pools: of_family.iter().map(|c| c.pool.name.clone()).collect(),
            });
        };
        if !pool.free.is_free(to_u128(ip)) {
            let holder = self
                .get(&pool.pool.name, ip)
                .map(|a| match (&a.owner, a.holders.first()) {
                    (Owner::Pinned { identity, .. }, _) => format!("identity {identity}"),
                    (_, Some(h)) => h.attachment.describe(),
                    _ => "another allocation".into(),
                })
                .unwrap_or_else(|| "another allocation".into());
            return Err(AllocError::AddressInUse { ip, holder });
        }
        Ok((pool, ip))
    }

    /// Plans a DEL: ephemeral addresses are freed, pinned ones lose this holder and stay.
    /// Idempotent: an unknown attachment plans nothing.
    pub fn plan_del(&self, container_id: &str, ifname: &str, now: u64) -> Plan {
        let mut plan = Plan::default();
        for a in self.held_by(container_id, ifname) {
            plan.changes.push(drop_holders(
                a,
                |h| h.attachment.container_id == container_id && h.attachment.ifname == ifname,
                now,
            ));
        }
        plan
    }

    /// Plans releasing one address by hand, whatever its owner and release rule: the
    /// operator's way out when a rule cannot fire (say, a VM's manifest was never given to a
    /// standalone daemon). Refused while pods hold the address, unless `force` (for holders
    /// known to be gone for good: a lost node whose DEL never comes).
    pub fn plan_release_by_hand(
        &self,
        pool: &str,
        ip: IpAddr,
        force: bool,
    ) -> Result<Plan, AllocError> {
        let a = self.get(pool, ip).ok_or_else(|| AllocError::NotAllocated {
            pool: pool.to_owned(),
            ip,
        })?;
        if !force && let Some(h) = a.holders.first() {
            return Err(AllocError::StillHeld {
                ip,
                holder: h.attachment.describe(),
            });
        }
        Ok(Plan {
            changes: vec![Change::delete(a)],
            ..Plan::default()
        })
    }

    /// Plans re-filing a pinned address no pod holds under another owner (moving a VM's
    /// address from its `virtual-machine` pin to an IPAMClaim without changing it). Refused
    /// while pods hold it, for an ephemeral address, and when the new identity already holds
    /// an address of that family on the address's network and interface.
    pub fn plan_refile(&self, pool: &str, ip: IpAddr, owner: Owner) -> Result<Plan, AllocError> {
        let a = self.get(pool, ip).ok_or_else(|| AllocError::NotAllocated {
            pool: pool.to_owned(),
            ip,
        })?;
        if let Some(h) = a.holders.first() {
            return Err(AllocError::StillHeld {
                ip,
                holder: h.attachment.describe(),
            });
        }
        if matches!(a.owner, Owner::Ephemeral) {
            return Err(AllocError::NotAllocated {
                pool: pool.to_owned(),
                ip,
            });
        }
        let mut moved = a.clone();
        moved.owner = owner;
        if let Some(key) = moved.pin_key()
            && let Some(other) = self
                .by_pin
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|k| self.allocs.get(k))
                .find(|o| o.ip != ip && Family::of(o.ip) == Family::of(ip))
        {
            return Err(AllocError::IdentityBusy {
                identity: key.identity,
                ip: other.ip,
                holder: "its own address".into(),
            });
        }
        Ok(Plan {
            changes: vec![Change::Put(moved)],
            ..Plan::default()
        })
    }

    /// Plans a CNI GC for `network`: every holder of that network not in `valid` is
    /// removed as by DEL. With a `node`, only holders added on that node are looked at: a
    /// runtime lists only its own node's attachments, and the state of a daemon sharing its
    /// store with other nodes holds theirs too. Each allocation gets one change that drops all its stale holders at
    /// once (a migration's source and target may both be gone), so the plan is what the
    /// removals leave when applied one after another.
    pub fn plan_gc(
        &self,
        network: &str,
        valid: &HashSet<(String, String)>,
        node: Option<&str>,
        now: u64,
    ) -> Plan {
        let mut plan = Plan::default();
        let is_valid = |h: &Holder| {
            node.is_some_and(|n| h.node != n)
                || valid.contains(&(
                    h.attachment.container_id.clone(),
                    h.attachment.ifname.clone(),
                ))
        };
        let mut stale: Vec<&Allocation> = self
            .allocs
            .values()
            .map(|a| &**a)
            .filter(|a| a.network == network && !a.holders.iter().all(is_valid))
            .collect();
        stale.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
        for a in stale {
            plan.changes.push(drop_holders(a, |h| !is_valid(h), now));
        }
        plan
    }

    /// Plans the release of pinned addresses that no pod holds and whose release condition
    /// fired (what the reconciler runs). `fires` answers for owner-deleted and scaled-below; idle-for is judged here.
    pub fn plan_release(&self, now: u64, fires: &dyn Fn(&ReleaseCondition) -> bool) -> Plan {
        plan_release_of(&self.release_candidates(), now, fires)
    }

    /// Whether `identity` of `kind` holds an address on `network` and interface `ifname`.
    pub fn has_pin(&self, identity: &str, kind: IdentityKind, network: &str, ifname: &str) -> bool {
        self.by_pin.contains_key(&PinKey {
            identity: identity.to_owned(),
            kind,
            network: network.to_owned(),
            ifname: ifname.to_owned(),
        })
    }

    /// The pinned allocations no pod holds: those a release rule may free. Judging the rules
    /// may read the API server; a caller that holds a lock on the state takes these out
    /// first and judges them with [`plan_release_of`] after letting go.
    pub fn release_candidates(&self) -> Vec<Allocation> {
        self.allocs
            .values()
            .filter(|a| matches!(a.owner, Owner::Pinned { .. }) && a.holders.is_empty())
            .map(|a| (**a).clone())
            .collect()
    }

    /// Applies changes and returns the changes that undo them (to apply in the order given),
    /// for a writer that applies a plan before its commit is known to have succeeded.
    pub fn apply_undoable(&mut self, changes: &[Change]) -> Vec<Change> {
        let mut undo = Vec::with_capacity(changes.len());
        for c in changes {
            let (pool, ip) = match c {
                Change::Put(a) => (&a.pool, a.ip),
                Change::Delete { pool, ip, .. } => (pool, *ip),
            };
            undo.push(match self.get(pool, ip) {
                Some(prior) => Change::Put(prior.clone()),
                None => Change::Delete {
                    pool: pool.clone(),
                    ip,
                    revision: 0,
                },
            });
            self.apply(std::slice::from_ref(c));
        }
        undo.reverse();
        undo
    }

    /// Records the revision the store gave an allocation when it wrote it.
    pub fn set_revision(&mut self, pool: &str, ip: IpAddr, revision: Revision) {
        if let Some(a) = self.allocs.get_mut(&AllocKey {
            pool: pool.to_owned(),
            ip,
        }) {
            a.revision = revision;
        }
    }

    /// [`Ipam::apply`] for changes another writer made (another node's, read from the store):
    /// their addresses leave this writer's search where it was, so writers that spread their
    /// searches (see [`Ipam::spread_cursors`]) keep to their parts of a pool.
    pub fn apply_foreign(&mut self, changes: &[Change]) {
        self.foreign = true;
        self.apply(changes);
        self.foreign = false;
    }

    /// Starts each pool's search for a free address at a point derived from `seed` and the
    /// pool's name, here and after every pool change, instead of after the highest address
    /// taken. Writers sharing a pool (one per node) with different seeds then take addresses
    /// from different parts of it and rarely race for one. Without it (one writer), the
    /// search is plain next-fit from the pool's start.
    pub fn spread_cursors(&mut self, seed: u64) {
        self.spread = Some(seed);
        self.place_cursors();
    }

    /// After losing a race for `ip` to another writer: when searches are spread (see
    /// [`Ipam::spread_cursors`]), moves the search of the pool covering `ip` to another
    /// point of it, derived from the seed and `ip`, so two writers that ran into each other's
    /// part of a pool stop racing for the same next address.
    pub fn scatter(&mut self, ip: IpAddr) {
        let Some(seed) = self.spread else { return };
        if let Some(ps) = self.pools.values_mut().find(|ps| ps.pool.contains(ip)) {
            place_cursor(ps, seed, &to_u128(ip));
        }
    }

    /// The seed of [`Ipam::spread_cursors`], if set.
    pub fn spread(&self) -> Option<u64> {
        self.spread
    }

    fn place_cursors(&mut self) {
        let Some(seed) = self.spread else { return };
        for (name, ps) in &mut self.pools {
            place_cursor(ps, seed, name);
        }
    }

    /// Applies persisted changes.
    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Put(a) => {
                    self.remove(&a.key());
                    self.insert(a.clone());
                }
                Change::Delete { pool, ip, .. } => {
                    self.remove(&AllocKey {
                        pool: pool.clone(),
                        ip: *ip,
                    });
                }
            }
        }
    }

    fn insert(&mut self, a: Allocation) {
        let foreign = self.foreign;
        if let Some(ps) = self.covering_mut(&a.pool, a.ip)
            && !(if foreign {
                ps.free.take_quiet(to_u128(a.ip))
            } else {
                ps.free.take(to_u128(a.ip))
            })
        {
            // Already taken by another allocation: planning never does this, a store may.
            *self.doubles.entry(a.ip).or_default() += 1;
        }
        self.index(a);
    }

    /// Adds an allocation to the maps, leaving the free sets alone.
    fn index(&mut self, a: Allocation) {
        let key = a.key();
        for h in &a.holders {
            let hash = self.attachment_hash(&h.attachment.container_id, &h.attachment.ifname);
            let keys = self.by_attachment.entry(hash).or_default();
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
        }
        if let Some(pk) = a.pin_key() {
            self.by_pin.entry(pk).or_default().push(key.clone());
        }
        match self.names.get_mut(&a.pool) {
            Some(n) => *n += 1,
            None => {
                self.names.insert(a.pool.clone(), 1);
            }
        }
        self.allocs.insert(key, Box::new(a));
    }

    fn remove(&mut self, key: &AllocKey) -> Option<Allocation> {
        let a = *self.allocs.remove(key)?;
        if let Some(n) = self.names.get_mut(&a.pool) {
            *n -= 1;
            if *n == 0 {
                self.names.remove(&a.pool);
            }
        }
        // Another allocation of the same address (under another pool name, loaded from a
        // store written before overlapping pools were refused) keeps it taken.
        let shared = match self.doubles.get_mut(&a.ip) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.doubles.remove(&a.ip);
                }
                true
            }
            None => false,
        };
        if !shared && let Some(ps) = self.covering_mut(&a.pool, a.ip) {
            ps.free.put(to_u128(a.ip));
        }
        for h in &a.holders {
            let hash = self.attachment_hash(&h.attachment.container_id, &h.attachment.ifname);
            if let Some(v) = self.by_attachment.get_mut(&hash) {
                v.retain(|x| x != key);
                if v.is_empty() {
                    self.by_attachment.remove(&hash);
                }
            }
        }
        if let Some(pk) = a.pin_key()
            && let Some(v) = self.by_pin.get_mut(&pk)
        {
            v.retain(|x| x != key);
            if v.is_empty() {
                self.by_pin.remove(&pk);
            }
        }
        Some(a)
    }

    /// Checks the internal invariants; for tests. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let mut per_pool: HashMap<&str, u128> = HashMap::new();
        let mut by_ip: HashMap<IpAddr, &AllocKey> = HashMap::new();
        for (k, a) in &self.allocs {
            if k.pool != a.pool || k.ip != a.ip {
                return Err(format!("allocation {a:?} filed under {k:?}"));
            }
            if let Some(other) = by_ip.insert(a.ip, k) {
                return Err(format!(
                    "{} is in two allocations: pool {} and pool {}",
                    a.ip, other.pool, k.pool
                ));
            }
            let covering: Vec<&PoolState> = self
                .pools
                .values()
                .filter(|p| p.pool.contains(a.ip))
                .collect();
            if covering.len() > 1 {
                return Err(format!("{} is in {} pools", a.ip, covering.len()));
            }
            if let Some(ps) = covering.first() {
                if ps.free.is_free(to_u128(a.ip)) {
                    return Err(format!("{} is allocated and free at once", a.ip));
                }
                *per_pool.entry(&ps.pool.name).or_default() += 1;
            }
            match &a.owner {
                Owner::Ephemeral if a.holders.len() != 1 => {
                    return Err(format!(
                        "ephemeral {} has {} holders",
                        a.ip,
                        a.holders.len()
                    ));
                }
                _ => {}
            }
            for h in &a.holders {
                let hash = self.attachment_hash(&h.attachment.container_id, &h.attachment.ifname);
                let listed = self.by_attachment.get(&hash).is_some_and(|v| v.contains(k));
                if !listed {
                    return Err(format!("holder index misses {}", a.ip));
                }
            }
        }
        for (name, ps) in &self.pools {
            let used = per_pool.get(name.as_str()).copied().unwrap_or(0);
            if used + ps.free.count() != ps.pool.total {
                return Err(format!(
                    "pool {name}: {used} allocated + {} free != {} total",
                    ps.free.count(),
                    ps.pool.total
                ));
            }
        }
        Ok(())
    }
}

/// Whether a holder of a pinned address gives way to `new`, whose ADD asks for it: the holder
/// is `new` itself, or known gone, or the same pod name recreated (see [`recreated`]) while
/// the workload source does not say the holder's UID is live, or an earlier sandbox of the
/// same pod (see [`resandboxed`]).
fn gives_way(h: &Holder, new: &Attachment, liveness: Liveness) -> bool {
    h.attachment.key() == new.key()
        || liveness == Liveness::Gone
        || (recreated(&h.attachment, new) && liveness != Liveness::Live)
        || resandboxed(&h.attachment, new)
}

/// The same pod (namespace, name and UID, the UID known) and interface in another container:
/// the runtime gave the pod a new sandbox, which the kubelet does only once the old one is
/// stopped (a DEL of the old one lost, say). The old sandbox no longer uses the address.
fn resandboxed(old: &Attachment, new: &Attachment) -> bool {
    !new.pod_uid.is_empty()
        && old.pod_uid == new.pod_uid
        && old.namespace == new.namespace
        && old.pod == new.pod
        && old.ifname == new.ifname
        && old.container_id != new.container_id
}

/// The same pod name with another UID, both UIDs known: a pod of that name was deleted and
/// created again (Kubernetes keeps pod names unique, so the old one no longer exists). An
/// empty UID says nothing either way.
fn recreated(old: &Attachment, new: &Attachment) -> bool {
    !new.pod.is_empty()
        && !old.pod_uid.is_empty()
        && !new.pod_uid.is_empty()
        && old.namespace == new.namespace
        && old.pod == new.pod
        && old.pod_uid != new.pod_uid
}

/// The change that removes the holders `gone` picks: an ephemeral address goes with its
/// holder; a pinned one stays, idle once nobody holds it.
pub fn drop_holders(a: &Allocation, gone: impl Fn(&Holder) -> bool, now: u64) -> Change {
    match a.owner {
        Owner::Ephemeral => Change::delete(a),
        Owner::Pinned { .. } => {
            let mut kept = a.clone();
            kept.holders.retain(|h| !gone(h));
            if kept.holders.is_empty() && kept.idle_since.is_none() {
                kept.idle_since = Some(now);
            }
            Change::Put(kept)
        }
    }
}
