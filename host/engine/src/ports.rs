//! What the engine needs from the outside, as traits: where workloads come from, and who
//! decides. The store is [`tether_store::Store`].
//!
//! Standalone mode implements [`WorkloadSource`] with a directory of manifests and
//! [`Decide`] with [`PolicyChain`] over built-in and file policies; Kubernetes mode with
//! informer caches and, when the chain names ConfigMaps, a [`SwappableChain`] replaced as
//! they change.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tether_core::alloc::Liveness;
use tether_core::{Object, OwnerReference, PolicyRequest, ReleaseCondition, Workload};
use tether_policy::{Chain, ChainOutcome, PolicyError, Runtime};

/// Where pods and their owners come from.
pub trait WorkloadSource: Send + Sync {
    /// Whether the source has seen everything once (Kubernetes: every informer's first list).
    /// Until then an ADD answers "try again later" rather than guess.
    fn synced(&self) -> bool;

    /// A consistent view for one request or one reconcile pass.
    fn view(&self) -> Arc<dyn WorkloadView>;

    /// Whether the source can reach what it reads from now (Kubernetes: the API server
    /// answers); `Err` says why not. Garbage collection pauses while it cannot.
    fn reachable(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A pod as garbage collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// Its UID.
    pub uid: String,
    /// It is being deleted (a deletion timestamp is set); on a lost node nobody finishes it.
    pub terminating: bool,
    /// For a static pod's mirror pod, the static pod's UID (what the plugin was given);
    /// empty otherwise.
    pub mirror_of: String,
}

/// An `IPAMClaim` (k8s.cni.cncf.io/v1alpha1), as the engine reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimInfo {
    /// `spec.network`: the CNI network it was made for.
    pub network: String,
    /// `status.ips`: the addresses written for it (CIDRs), empty until some IPAM wrote them.
    pub ips: Vec<String>,
    /// Its controller (ipam-extensions: the VM): only pods it owns may use the claim.
    pub owner: Option<OwnerReference>,
}

/// What looking up an `IPAMClaim` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimLookup {
    /// The IPAMClaim API is not served: a claim reference means nothing, the policies decide.
    NotServed,
    /// No such claim (yet).
    Missing,
    /// The claim.
    Found(ClaimInfo),
}

/// A node, as garbage collection judges node loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Ready, as far as the source knows.
    Ready,
    /// Not ready (its Ready condition False or Unknown) for this many seconds.
    NotReadyFor(u64),
    /// No Node of that name exists.
    Gone,
    /// The source cannot tell.
    Unknown,
}

/// What one view of the workloads answers.
pub trait WorkloadView: Send + Sync {
    /// A pod by namespace and name: `Ok(None)` when the source knows there is none, `Err`
    /// (why) when it cannot tell (an API read failed): the caller must not guess then.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Workload>, String>;

    /// The owner chain of an object: its controller, the controller's controller, ... up to
    /// the first owner that does not exist; `Err` when an owner could not be read.
    fn owner_chain(
        &self,
        namespace: &str,
        owners: &[OwnerReference],
    ) -> Result<Vec<Object>, String>;

    /// A namespace's annotations (none when there is no such namespace); `Err` when it could
    /// not be read.
    fn namespace_annotations(&self, namespace: &str) -> Result<Vec<(String, String)>, String>;

    /// A namespace's labels; `Ok(None)` when the source does not know the namespace, `Err`
    /// when it could not be read.
    fn namespace_labels(&self, namespace: &str) -> Result<Option<Vec<(String, String)>>, String>;

    /// Whether the pod `namespace/name` with `uid` exists: [`Liveness::Live`] when the source
    /// has a pod of that name whose UID is `uid` (or either UID is empty);
    /// [`Liveness::Gone`] only when the source knows there is none (the name is missing, or
    /// has another UID, both set); [`Liveness::Unknown`] when it cannot tell.
    fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness;

    /// Whether a release condition is known to have fired (its owner known to be gone, or
    /// known to be scaled below the ordinal). Unknown never fires.
    fn fires(&self, condition: &ReleaseCondition) -> bool;

    /// Every pod the source knows, by namespace and name, for one garbage collection pass:
    /// `Ok(None)` when the source cannot list pods (GC then asks [`Self::pod_liveness`] for
    /// each holder), `Err` when the list failed (the pass is abandoned).
    #[allow(clippy::type_complexity)]
    fn all_pods(&self) -> Result<Option<HashMap<(String, String), PodMeta>>, String> {
        Ok(None)
    }

    /// A fresh read of one pod, bypassing any cache: `Ok(None)` when there is none, `Err`
    /// when the source cannot tell. What garbage collection confirms a release with.
    fn read_pod(&self, namespace: &str, name: &str) -> Result<Option<PodMeta>, String> {
        let _ = (namespace, name);
        Err("this workload source cannot read pods".into())
    }

    /// The `IPAMClaim` `namespace/name`; `Err` when it cannot be read.
    fn ipam_claim(&self, namespace: &str, name: &str) -> Result<ClaimLookup, String> {
        let _ = (namespace, name);
        Ok(ClaimLookup::NotServed)
    }

    /// A node's readiness, read fresh.
    fn node_state(&self, node: &str) -> NodeState {
        let _ = node;
        NodeState::Unknown
    }
}

/// No workload source: pods are known only by their CNI arguments. Nothing is ever judged
/// gone, so pinned addresses are released only by hand and holders only by their DEL.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWorkloads;

impl WorkloadSource for NoWorkloads {
    fn synced(&self) -> bool {
        true
    }

    fn view(&self) -> Arc<dyn WorkloadView> {
        Arc::new(NoWorkloads)
    }
}

impl WorkloadView for NoWorkloads {
    fn pod(&self, _: &str, _: &str) -> Result<Option<Workload>, String> {
        Ok(None)
    }

    fn owner_chain(&self, _: &str, _: &[OwnerReference]) -> Result<Vec<Object>, String> {
        Ok(Vec::new())
    }

    fn namespace_labels(&self, _: &str) -> Result<Option<Vec<(String, String)>>, String> {
        Ok(None)
    }

    fn namespace_annotations(&self, _: &str) -> Result<Vec<(String, String)>, String> {
        Ok(Vec::new())
    }

    fn pod_liveness(&self, _: &str, _: &str, _: &str) -> Liveness {
        Liveness::Unknown
    }

    fn fires(&self, _: &ReleaseCondition) -> bool {
        false
    }
}

/// Who decides whether a pod's address is ephemeral or pinned, and under which identity.
pub trait Decide: Send + Sync {
    /// Evaluates the policies for one pod.
    fn decide(&self, request: &PolicyRequest) -> Result<ChainOutcome, PolicyError>;

    /// The policies, in order.
    fn names(&self) -> Vec<String>;

    /// Why the policies cannot decide yet (Kubernetes mode: a ConfigMap of the chain not
    /// loaded once); `None` once they can. Until then an ADD answers "try again later" and the
    /// daemon is not ready.
    fn unready(&self) -> Option<String> {
        None
    }
}

/// A chain of Wasm policies on one runtime.
pub struct PolicyChain {
    /// The runtime the policies run on.
    pub runtime: Arc<Runtime>,
    /// The policies.
    pub chain: Chain,
}

impl Decide for PolicyChain {
    fn decide(&self, request: &PolicyRequest) -> Result<ChainOutcome, PolicyError> {
        self.chain.evaluate(&self.runtime, request)
    }

    fn names(&self) -> Vec<String> {
        self.chain.names().into_iter().map(str::to_owned).collect()
    }
}

/// A chain that can be replaced while it serves: each evaluation takes the chain in force
/// when it starts and finishes on it, while [`replace`](Self::replace) puts the next one in
/// force for the evaluations after. Until a first chain is in force it is not ready
/// ([`Decide::unready`]) and says what it waits for.
pub struct SwappableChain {
    runtime: Arc<Runtime>,
    current: RwLock<Current>,
}

enum Current {
    Waiting(String),
    Serving(Arc<Chain>),
}

impl SwappableChain {
    /// No chain yet: waiting for what `why` says.
    pub fn waiting(runtime: Arc<Runtime>, why: impl Into<String>) -> Self {
        SwappableChain {
            runtime,
            current: RwLock::new(Current::Waiting(why.into())),
        }
    }

    /// The runtime the chains run on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Puts `chain` in force.
    pub fn replace(&self, chain: Chain) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
            Current::Serving(Arc::new(chain));
    }

    /// While no chain is in force, says what it now waits for; once one is, does nothing.
    pub fn still_waiting(&self, why: impl Into<String>) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if let Current::Waiting(w) = &mut *current {
            *w = why.into();
        }
    }

    /// The chain in force, if there is one.
    pub fn chain(&self) -> Option<Arc<Chain>> {
        match &*self.current.read().unwrap_or_else(PoisonError::into_inner) {
            Current::Serving(c) => Some(c.clone()),
            Current::Waiting(_) => None,
        }
    }
}

impl Decide for SwappableChain {
    fn decide(&self, request: &PolicyRequest) -> Result<ChainOutcome, PolicyError> {
        match self.chain() {
            Some(chain) => chain.evaluate(&self.runtime, request),
            None => Err(PolicyError::Engine(format!(
                "no policy chain in force yet: {}",
                self.unready().unwrap_or_default()
            ))),
        }
    }

    fn names(&self) -> Vec<String> {
        self.chain().map_or_else(Vec::new, |c| {
            c.names().into_iter().map(str::to_owned).collect()
        })
    }

    fn unready(&self) -> Option<String> {
        match &*self.current.read().unwrap_or_else(PoisonError::into_inner) {
            Current::Waiting(why) => Some(why.clone()),
            Current::Serving(_) => None,
        }
    }
}
