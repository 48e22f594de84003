//! Garbage collection: frees what no workload uses any more when no DEL or release said so
//! (a missed DEL, a lost node, a release rule that fired while no daemon watched).
//!
//! # Rules
//!
//! Freeing a live workload's address hands it to two pods, so nothing is freed on one look:
//!
//! 1. A look finds what *looks* leaked: a holder whose pod is not in the pod list (or is
//!    another pod of the name), a holder whose pod is being deleted on a node that is gone or
//!    not ready past the node grace, a pinned address nobody holds whose release rule fired.
//! 2. The same finding, on the same revision of the address, must be made again on a later
//!    look at least the grace period after the first ([`GcSettings::grace`];
//!    [`GcSettings::vm_grace`] for a VM's address). Anything that changed the address, or a
//!    look that did not find it, starts the wait over.
//! 3. Just before the release the address is read from the store again and the workload
//!    from the API server again (no cache); both must still say so.
//! 4. The release is conditional on the revision read: the store refuses it if anything
//!    wrote the address since.
//! 5. Unknown is never gone: a read that fails keeps the address, and a pass that cannot
//!    list pods, or runs while the caches are not synced or the source is unreachable,
//!    forgets every finding (the waits start over once it can look again).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tether_core::IdentityKind;
use tether_core::alloc::{Allocation, Holder, Owner, Revision};

use crate::ports::{NodeState, PodMeta, WorkloadView};

/// How long things must look leaked before they are freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    /// Between the first and the confirming finding, for most addresses.
    pub grace: Duration,
    /// The same for a VM's pinned address (a VM's pod may be recreated slowly).
    pub vm_grace: Duration,
    /// How long a node must be not ready before its pods being deleted count as gone.
    pub node_grace: Duration,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            grace: Duration::from_secs(60),
            vm_grace: Duration::from_secs(300),
            node_grace: Duration::from_secs(300),
        }
    }
}

/// Why something was freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GcReason {
    /// The holder's pod is gone, or another pod (UID) has its name: its DEL was missed.
    PodGone,
    /// The holder's pod is being deleted on a node that is gone or not ready past the node
    /// grace: its daemon cannot DEL it.
    NodeLost,
    /// A pinned address nobody holds, whose release rule fired while no daemon applied it.
    RuleFired,
    /// CNI GC: the node's runtime no longer lists the attachment (its sandbox is gone).
    NotListed,
}

impl GcReason {
    /// `pod-gone`, `node-lost`, `rule-fired`, `not-listed`: for metrics, logs and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            GcReason::PodGone => "pod-gone",
            GcReason::NodeLost => "node-lost",
            GcReason::RuleFired => "rule-fired",
            GcReason::NotListed => "not-listed",
        }
    }
}

/// What a finding is about: one holder of an address, or the address itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Holder {
        container_id: String,
        ifname: String,
    },
    Release,
}

/// One finding's key: an address and what about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub pool: String,
    pub ip: IpAddr,
    pub subject: Subject,
}

/// Something that looks leaked.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    pub key: Key,
    /// The address's revision when it was found.
    pub revision: Revision,
    pub reason: GcReason,
    /// How long it must keep looking so.
    pub grace: Duration,
    /// The pod or identity, for logs and Events.
    pub workload: String,
}

struct Seen {
    first: Instant,
    finding: Finding,
}

/// Findings and when each was first made.
#[derive(Default)]
pub(crate) struct Suspects {
    seen: Mutex<HashMap<Key, Seen>>,
}

impl Suspects {
    /// Records `findings` made at `now`; returns those made before, on the same revision and
    /// for the same reason, at least their grace ago. With `whole` (a look at everything),
    /// what this look did not find is forgotten.
    pub fn observe(&self, findings: Vec<Finding>, now: Instant, whole: bool) -> Vec<Finding> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ready = Vec::new();
        let mut found = std::collections::HashSet::with_capacity(findings.len());
        for f in findings {
            found.insert(f.key.clone());
            match seen.get_mut(&f.key) {
                Some(s) if s.finding.revision == f.revision && s.finding.reason == f.reason => {
                    if now.saturating_duration_since(s.first) >= f.grace {
                        ready.push(f.clone());
                    }
                    s.finding = f;
                }
                _ => {
                    seen.insert(
                        f.key.clone(),
                        Seen {
                            first: now,
                            finding: f,
                        },
                    );
                }
            }
        }
        if whole {
            seen.retain(|k, _| found.contains(k));
        }
        ready
    }

    /// Forgets one finding (it was acted on, or did not hold on a fresh read).
    pub fn forget(&self, key: &Key) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Forgets every finding about an address (it was written).
    pub fn forget_address(&self, pool: &str, ip: IpAddr) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| !(k.pool == pool && k.ip == ip));
    }

    /// Forgets everything: the next findings wait their full grace again.
    pub fn clear(&self) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// How many findings wait.
    pub fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// What waits, for `/v1/gc`.
    pub fn report(&self, now: Instant) -> Vec<tether_api::GcSuspect> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = seen
            .values()
            .map(|s| tether_api::GcSuspect {
                address: format!("{}/{}", s.finding.key.pool, s.finding.key.ip),
                reason: s.finding.reason.as_str().to_owned(),
                workload: s.finding.workload.clone(),
                seen_secs: now.saturating_duration_since(s.first).as_secs(),
                grace_secs: s.finding.grace.as_secs(),
            })
            .collect();
        out.sort_by(|a, b| (&a.address, &a.workload).cmp(&(&b.address, &b.workload)));
        out
    }
}

/// The grace of an allocation's findings.
pub(crate) fn grace_of(a: &Allocation, settings: &GcSettings) -> Duration {
    match &a.owner {
        // An IPAMClaim stands for a VM's interface (KubeVirt's ipam-extensions).
        Owner::Pinned {
            kind: IdentityKind::VirtualMachine | IdentityKind::IpamClaim,
            ..
        } => settings.vm_grace,
        _ => settings.grace,
    }
}

/// The identity of a pinned allocation, for messages: `virtual-machine ns/vm`.
pub(crate) fn identity_of(a: &Allocation) -> String {
    match &a.owner {
        Owner::Pinned { identity, kind, .. } => format!("{kind} {identity}"),
        Owner::Ephemeral => "an ephemeral pod".to_owned(),
    }
}

/// A holder finding.
pub(crate) fn holder_finding(
    a: &Allocation,
    h: &Holder,
    reason: GcReason,
    settings: &GcSettings,
) -> Finding {
    Finding {
        key: Key {
            pool: a.pool.clone(),
            ip: a.ip,
            subject: Subject::Holder {
                container_id: h.attachment.container_id.clone(),
                ifname: h.attachment.ifname.clone(),
            },
        },
        revision: a.revision,
        reason,
        grace: grace_of(a, settings),
        workload: match &a.owner {
            Owner::Ephemeral => h.attachment.describe(),
            Owner::Pinned { .. } => format!("{} of {}", h.attachment.describe(), identity_of(a)),
        },
    }
}

/// Whether a node counts as lost: gone, or not ready for at least the node grace.
pub(crate) fn node_lost(state: NodeState, settings: &GcSettings) -> bool {
    match state {
        NodeState::Gone => true,
        NodeState::NotReadyFor(s) => s >= settings.node_grace.as_secs(),
        NodeState::Ready | NodeState::Unknown => false,
    }
}

/// Whether `pod` (as listed or read) is not the holder's pod: none, or one with another UID
/// (both known).
pub(crate) fn not_the_holders(h: &Holder, pod: Option<&PodMeta>) -> bool {
    match pod {
        None => true,
        Some(p) => {
            !p.uid.is_empty()
                && !h.attachment.pod_uid.is_empty()
                && p.uid != h.attachment.pod_uid
                && p.mirror_of != h.attachment.pod_uid
        }
    }
}

/// Judges a holder on a fresh read of its pod (and node): why it is leaked, or `None` when
/// it is not known to be (a failed read is not known).
pub(crate) fn confirm_holder(
    view: &dyn WorkloadView,
    h: &Holder,
    settings: &GcSettings,
) -> Option<GcReason> {
    if h.attachment.pod.is_empty() {
        return None;
    }
    let pod = match view.read_pod(&h.attachment.namespace, &h.attachment.pod) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pod = %format!("{}/{}", h.attachment.namespace, h.attachment.pod), "garbage collection keeps the address: the pod could not be read: {e}");
            return None;
        }
    };
    if not_the_holders(h, pod.as_ref()) {
        return Some(GcReason::PodGone);
    }
    if pod.is_some_and(|p| p.terminating)
        && !h.node.is_empty()
        && node_lost(view.node_state(&h.node), settings)
    {
        return Some(GcReason::NodeLost);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(revision: Revision, reason: GcReason, grace: u64) -> Finding {
        Finding {
            key: Key {
                pool: "p".into(),
                ip: "10.0.0.1".parse().expect("ip"),
                subject: Subject::Release,
            },
            revision,
            reason,
            grace: Duration::from_secs(grace),
            workload: "w".into(),
        }
    }

    #[test]
    fn a_finding_is_ready_only_when_made_again_after_its_grace() {
        let s = Suspects::default();
        let t0 = Instant::now();
        assert!(
            s.observe(vec![finding(1, GcReason::RuleFired, 10)], t0, true)
                .is_empty()
        );
        let t9 = t0 + Duration::from_secs(9);
        assert!(
            s.observe(vec![finding(1, GcReason::RuleFired, 10)], t9, true)
                .is_empty()
        );
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(
            s.observe(vec![finding(1, GcReason::RuleFired, 10)], t10, true)
                .len(),
            1
        );
    }

    #[test]
    fn a_change_of_revision_or_reason_or_a_miss_starts_the_wait_over() {
        let s = Suspects::default();
        let t0 = Instant::now();
        let later = |n| t0 + Duration::from_secs(n);
        s.observe(vec![finding(1, GcReason::PodGone, 10)], t0, true);
        // Another revision: waits again from now.
        assert!(
            s.observe(vec![finding(2, GcReason::PodGone, 10)], later(11), true)
                .is_empty()
        );
        assert!(
            s.observe(vec![finding(2, GcReason::PodGone, 10)], later(20), true)
                .is_empty()
        );
        assert_eq!(
            s.observe(vec![finding(2, GcReason::PodGone, 10)], later(21), true)
                .len(),
            1
        );
        // Another reason: waits again.
        assert!(
            s.observe(vec![finding(2, GcReason::NodeLost, 10)], later(40), true)
                .is_empty()
        );
        // A whole look that does not find it forgets it.
        s.observe(Vec::new(), later(41), true);
        assert_eq!(s.len(), 0);
        assert!(
            s.observe(vec![finding(2, GcReason::NodeLost, 10)], later(60), true)
                .is_empty()
        );
        // A partial look (CNI GC) forgets nothing.
        s.observe(Vec::new(), later(61), false);
        assert_eq!(s.len(), 1);
    }
}
