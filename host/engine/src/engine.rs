//! What each API call does: resolve the workload, ask the policy chain, check that a pinned
//! decision claims the pod's own identity, select pools, hand the allocation to the writer;
//! and the reconciler, which plans releases on a look at the state and has the writer delete
//! only what is unchanged since.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tether_api::{
    CniRequest, CniResult, GcRelease, GcReport, GcResult, IpConfig, OrphanInfo, PoolInfo, PoolList,
    ReconcileResult, RouteConfig,
};
use tether_core::alloc::{AllocError, Assigned, Attachment, Change, Ipam, Liveness};
use tether_core::net::Family;
use tether_core::pool::Requester;
use tether_core::pool::{Pool, PoolError};
use tether_core::select::{PoolInputs, admit, select_pools};
use tether_core::{Decision, PolicyRequest, Workload};
use tether_policy::PolicyError;
use tether_store::Store;

use crate::StartError;
use crate::gc::{
    Finding, GcReason, GcSettings, Key, Subject, Suspects, confirm_holder, holder_finding,
    identity_of, node_lost, not_the_holders,
};
use crate::metrics::{Metrics, PolicyLabels, PoolLabels};
use crate::ports::{Decide, WorkloadSource, WorkloadView};
use crate::writer::{AddOp, Op, Outcome, WriteError, Writer};

/// Why a call failed; mapped to a CNI error code once, at the API boundary.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The writer refused or failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A policy failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A CNI variable is missing.
    #[error("{0}")]
    MissingEnv(String),
    /// The container holds nothing.
    #[error("{0}")]
    Unknown(String),
    /// The engine cannot serve now.
    #[error("{0}")]
    Unavailable(String),
    /// The workload source has not seen everything yet.
    #[error("the workload caches have not synced yet; try again")]
    NotSynced,
    /// The workload source could not tell something the decision needs (an API read failed
    /// or timed out, or its cache still shows a previous pod of the name): deciding anyway
    /// could pin the wrong way or pick the wrong pool.
    #[error("{0}; not deciding on a guess, try again")]
    WorkloadUnknown(String),
    /// The policy chain is not in force yet.
    #[error("the policy chain is not loaded yet ({0}); try again")]
    PoliciesNotLoaded(String),
    /// The allocation changed between the look and the write.
    #[error("{0}")]
    Changed(String),
    /// CHECK: the attachment holds other addresses than prevResult lists.
    #[error("{0}")]
    Mismatch(String),
    /// Another daemon applies the release rules.
    #[error("{0}")]
    NotElected(String),
}

impl From<AllocError> for EngineError {
    fn from(e: AllocError) -> Self {
        EngineError::Write(WriteError::Alloc(e))
    }
}

impl EngineError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            EngineError::Write(WriteError::Alloc(e)) => match e {
                AllocError::PoolExhausted { .. } => "pool_exhausted",
                AllocError::UnknownPool { .. } => "unknown_pool",
                AllocError::PoolNotAllowed { .. } => "pool_not_allowed",
                AllocError::SelectorUnknown { .. } => "selector_unknown",
                AllocError::NoPool => "no_pool",
                AllocError::AddressNotInPool { .. } => "address_not_in_pool",
                AllocError::AddressInUse { .. } => "address_in_use",
                AllocError::IdentityBusy { .. } => "identity_busy",
                AllocError::BadAnnotation { .. } => "bad_annotation",
                AllocError::NoDecision => "no_decision",
                AllocError::StillHeld { .. } => "still_held",
                AllocError::NotAllocated { .. } => "not_allocated",
            },
            EngineError::Write(WriteError::Store(_)) => "store",
            EngineError::Write(WriteError::Stopped) => "stopping",
            EngineError::Write(WriteError::Abandoned) => "abandoned",
            EngineError::Write(WriteError::Contended { .. }) => "contended",
            EngineError::NotSynced => "not_synced",
            EngineError::WorkloadUnknown(_) => "workload_unknown",
            EngineError::PoliciesNotLoaded(_) => "policies_not_loaded",
            EngineError::Changed(_) => "changed",
            EngineError::Policy(_) => "policy",
            EngineError::BadRequest(_) => "bad_request",
            EngineError::MissingEnv(_) => "missing_env",
            EngineError::Unknown(_) => "unknown_container",
            EngineError::Unavailable(_) => "unavailable",
            EngineError::Mismatch(_) => "mismatch",
            EngineError::NotElected(_) => "not_elected",
        }
    }
}

/// The engine: one per daemon, whatever the store, workload source and policies.
pub struct Engine {
    policies: Arc<dyn Decide>,
    workloads: Arc<dyn WorkloadSource>,
    /// Whether the workload source can judge pods gone (a source of no workloads cannot).
    judges: bool,
    ipam: Arc<RwLock<Ipam>>,
    writer: Writer,
    /// Why the last pool reload was refused, if it was.
    reload_error: std::sync::Mutex<Option<String>>,
    /// Whether this daemon may apply release rules now (see [`Engine::set_release_gate`]).
    release_gate: std::sync::RwLock<Option<ReleaseGate>>,
    /// This node, as pools' node selectors see it (see [`Engine::set_node`]).
    node: std::sync::RwLock<NodeInfo>,
    /// The store, for reads outside the writer (see [`Engine::confirm_pin`]).
    store: Arc<dyn Store>,
    /// Where ADDs of pods with an IPAMClaim report to.
    claim_reporter: std::sync::RwLock<Option<ClaimReporter>>,
    /// Garbage collection's findings, waiting for their grace.
    suspects: Suspects,
    /// Garbage collection's grace periods.
    gc_settings: std::sync::RwLock<GcSettings>,
    /// CNI GC's findings, by network.
    node_suspects: std::sync::Mutex<std::collections::HashMap<String, Arc<Suspects>>>,
    /// Where garbage collection reports what it freed.
    gc_reporter: std::sync::RwLock<Option<GcReporter>>,
    /// Garbage collection's last pass.
    gc_last: std::sync::Mutex<GcReport>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// This node's name and labels (`None`: not known).
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its labels; `None` until known, and then no pool with a node selector serves here.
    pub labels: Option<Vec<(String, String)>>,
    /// Other nodes' daemons share the store (Kubernetes mode): the state holds their pods'
    /// holders too, and a CNI GC here drops only holders added on this node.
    pub shared: bool,
}

/// An IPAMClaim an attachment refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// Its namespace (the pod's).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The addresses its status holds.
    pub ips: Vec<IpAddr>,
    /// The pod is a migration's target (KubeVirt's label): it may share the address with the
    /// source. Any other pod waits until the address is free of live pods.
    pub migration_target: bool,
}

impl ClaimRef {
    /// The pin a claim stands for: identity `namespace/name`, shared only with a migration's
    /// target, released when the claim is deleted.
    pub fn pin(&self) -> tether_core::Pinned {
        tether_core::Pinned {
            identity: format!("{}/{}", self.namespace, self.name),
            kind: tether_core::IdentityKind::IpamClaim,
            release: vec![tether_core::ReleaseCondition::OwnerDeleted(
                tether_core::ObjectKey {
                    api_version: IPAMCLAIM_API_VERSION.into(),
                    kind: "IPAMClaim".into(),
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                },
            )],
            may_share: self.migration_target,
            pools: Vec::new(),
        }
    }
}

/// The IPAMClaim API.
pub const IPAMCLAIM_API_VERSION: &str = "k8s.cni.cncf.io/v1alpha1";

/// The outcome of an ADD of a pod with an IPAMClaim, for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimReport {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// The pod.
    pub pod: String,
    /// The addresses (CIDRs), or why none: (`SubnetExhausted`, `IPAddressConflict` or
    /// `PoolNotFound`, the message).
    pub outcome: Result<Vec<String>, (String, String)>,
}

/// Receives what garbage collection freed.
pub type GcReporter = Arc<dyn Fn(Vec<GcRelease>) + Send + Sync>;

/// Receives [`ClaimReport`]s.
pub type ClaimReporter = Arc<dyn Fn(ClaimReport) + Send + Sync>;

/// Says whether this daemon may apply release rules now, or why not.
pub type ReleaseGate = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the engine is built from.
pub struct Ports {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The workload source, and whether it can judge pods gone.
    pub workloads: (Arc<dyn WorkloadSource>, bool),
    /// The policy chain.
    pub policies: Arc<dyn Decide>,
}

/// A policy decision, the candidate pools, and the view of the workloads it was made on.
type Decided = (Decision, Vec<String>, Arc<dyn WorkloadView>);

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn render(assigned: &[Assigned]) -> CniResult {
    let mut routes: Vec<RouteConfig> = Vec::new();
    for a in assigned {
        for r in &a.routes {
            let rc = RouteConfig {
                dst: r.dst.to_string(),
                gw: r.gw.map(|g| g.to_string()),
            };
            if !routes.contains(&rc) {
                routes.push(rc);
            }
        }
    }
    CniResult {
        ips: assigned
            .iter()
            .map(|a| IpConfig {
                address: format!("{}/{}", a.ip, a.prefix),
                gateway: a.gateway.map(|g| g.to_string()),
            })
            .collect(),
        routes,
    }
}

fn addresses(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Delete { pool, ip, .. } => Some(format!("{pool}/{ip}")),
            Change::Put(_) => None,
        })
        .collect()
}

impl Engine {
    /// Loads the state from the store with `pools` in force and starts the writer. Returns
    /// the writer thread's handle: it ends once the engine is dropped.
    pub fn start(
        ports: Ports,
        pools: Vec<Pool>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), StartError> {
        // Subscribed first: what another writer commits while the snapshot is read is not
        // lost (its echo of what the snapshot holds is skipped by revision).
        let events = ports.store.subscribe();
        let snapshot = ports.store.snapshot()?;
        let ipam = Ipam::new(pools, snapshot.allocations)?;
        crate::warn_orphans(&ipam);
        let ipam = Arc::new(RwLock::new(ipam));
        let store = ports.store.clone();
        let (writer, thread) = Writer::start(ipam.clone(), ports.store, events, metrics.clone())
            .map_err(StartError::Thread)?;
        Ok((
            Engine {
                policies: ports.policies,
                workloads: ports.workloads.0,
                judges: ports.workloads.1,
                ipam,
                writer,
                reload_error: std::sync::Mutex::new(None),
                release_gate: std::sync::RwLock::new(None),
                node: std::sync::RwLock::new(NodeInfo::default()),
                store,
                claim_reporter: std::sync::RwLock::new(None),
                suspects: Suspects::default(),
                gc_settings: std::sync::RwLock::new(GcSettings::default()),
                node_suspects: std::sync::Mutex::default(),
                gc_reporter: std::sync::RwLock::new(None),
                gc_last: std::sync::Mutex::new(GcReport::default()),
                metrics,
            },
            thread,
        ))
    }

    /// The policies, in order.
    pub fn chain_names(&self) -> Vec<String> {
        self.policies.names()
    }

    fn attachment(req: &CniRequest) -> Result<Attachment, EngineError> {
        if req.container_id.is_empty() {
            return Err(EngineError::MissingEnv("CNI_CONTAINERID is empty".into()));
        }
        if req.ifname.is_empty() {
            return Err(EngineError::MissingEnv("CNI_IFNAME is empty".into()));
        }
        Ok(Attachment {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            namespace: req.arg("K8S_POD_NAMESPACE").unwrap_or_default().to_owned(),
            pod: req.arg("K8S_POD_NAME").unwrap_or_default().to_owned(),
            pod_uid: req.arg("K8S_POD_UID").unwrap_or_default().to_owned(),
        })
    }

    /// CNI ADD.
    pub async fn add(self: &Arc<Self>, req: CniRequest) -> Result<CniResult, EngineError> {
        let attachment = Self::attachment(&req)?;
        if !self.workloads.synced() {
            return Err(EngineError::NotSynced);
        }
        if let Some(why) = self.policies.unready() {
            return Err(EngineError::PoliciesNotLoaded(why));
        }
        let requested = req
            .requested_ips
            .iter()
            .map(|s| {
                let ip = s.split('/').next().unwrap_or(s);
                ip.parse::<IpAddr>().map_err(|_| {
                    EngineError::BadRequest(format!("requested address {s:?} is not an IP address"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A retried ADD answers from the state, without asking the policies again, once the
        // attachment holds an address of every family the pools have. (One that holds one
        // family of two, from a dual-stack commit a store outage cut short, is planned again:
        // the writer keeps what it holds and adds the rest.)
        {
            self.fresh_state()?;
            let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            let held = ipam.held_by(&attachment.container_id, &attachment.ifname);
            // The families of the pools the network names (of every pool when it names none:
            // annotations choose then).
            let complete = !held.is_empty()
                && ipam
                    .pools()
                    .filter(|p| req.pools.is_empty() || req.pools.contains(&p.name))
                    .all(|p| held.iter().any(|a| Family::of(a.ip) == p.family()));
            if complete {
                let assigned: Vec<Assigned> = held.iter().map(|a| ipam.assigned(a)).collect();
                return Ok(render(&assigned));
            }
        }
        let this = self.clone();
        let req2 = req.clone();
        let att2 = attachment.clone();
        let (claim, decided) = tokio::task::spawn_blocking(move || this.decide(&req2, &att2))
            .await
            .map_err(|e| EngineError::Unavailable(format!("policy evaluation task: {e}")))?;
        let result = match decided {
            Ok((decision, pools, view)) => {
                let requested = match &claim {
                    // The claim's addresses, when some IPAM wrote them and the runtime asks
                    // for none: reused, never replaced.
                    Some(c) if requested.is_empty() => c.ips.clone(),
                    _ => requested,
                };
                self.add_decided(&req, attachment.clone(), decision, pools, view, requested)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Some(c) = claim {
            self.report_claim(&c, &attachment, &result);
        }
        result
    }

    /// CNI ADD, once decided: the writer allocates.
    async fn add_decided(
        &self,
        req: &CniRequest,
        attachment: Attachment,
        decision: Decision,
        pools: Vec<String>,
        view: Arc<dyn WorkloadView>,
        requested: Vec<IpAddr>,
    ) -> Result<CniResult, EngineError> {
        if let Decision::Pinned(p) = &decision {
            self.confirm_pin(p, &req.network, &attachment.ifname)
                .await?;
        }
        let liveness = move |a: &Attachment| {
            if a.pod.is_empty() {
                Liveness::Unknown
            } else {
                view.pod_liveness(&a.namespace, &a.pod, &a.pod_uid)
            }
        };
        let op = Op::Add(Box::new(AddOp {
            attachment,
            network: req.network.clone(),
            decision,
            pools,
            requested,
            node: self
                .node
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .name
                .clone(),
            now: now(),
            liveness: Box::new(liveness),
        }));
        match self.writer.submit(op).await? {
            Outcome::Added(assigned) => Ok(render(&assigned)),
            Outcome::Changed(_) => Err(EngineError::Unavailable(
                "writer answered out of turn".into(),
            )),
        }
    }

    /// The IPAMClaim an attachment refers to (found once its pod is read, even when the ADD
    /// fails later), and the workload, decision and pool candidates (blocking: runs the
    /// policies).
    fn decide(
        &self,
        req: &CniRequest,
        attachment: &Attachment,
    ) -> (Option<ClaimRef>, Result<Decided, EngineError>) {
        let mut claim = None;
        let decided = self.decide_into(req, attachment, &mut claim);
        (claim, decided)
    }

    fn decide_into(
        &self,
        req: &CniRequest,
        attachment: &Attachment,
        claim: &mut Option<ClaimRef>,
    ) -> Result<Decided, EngineError> {
        let view = self.workloads.view();
        let found = view
            .pod(&attachment.namespace, &attachment.pod)
            .map_err(EngineError::WorkloadUnknown)?;
        // In Kubernetes mode a watch cache can still show the previous pod of a name (a
        // StatefulSet pod recreated): its owners and annotations may not be this pod's.
        let cached_elsewhere = self
            .node
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .shared;
        if let Some(w) = &found
            && cached_elsewhere
            && !w.uid.is_empty()
            && !attachment.pod_uid.is_empty()
            && w.uid != attachment.pod_uid
        {
            return Err(EngineError::WorkloadUnknown(format!(
                "the workload source still shows pod {}/{} with UID {}, not the caller's {}",
                w.namespace, w.name, w.uid, attachment.pod_uid
            )));
        }
        let mut workload = found.unwrap_or_else(|| Workload {
            namespace: attachment.namespace.clone(),
            name: if attachment.pod.is_empty() {
                attachment.container_id.clone()
            } else {
                attachment.pod.clone()
            },
            uid: attachment.pod_uid.clone(),
            ..Workload::default()
        });
        if workload.uid.is_empty() {
            workload.uid = attachment.pod_uid.clone();
        }
        workload.network = req.network.clone();
        workload.interface = req.ifname.clone();
        workload.container_id = req.container_id.clone();
        workload.cni_args = req.args.clone();
        let owners = view
            .owner_chain(&workload.namespace, &workload.owner_references)
            .map_err(EngineError::WorkloadUnknown)?;
        *claim = self.claim_of(&*view, &workload, &owners, req)?;
        let request = PolicyRequest { workload, owners };
        let outcome = match claim.as_ref() {
            // The claim is the pod's identity, whatever the policies say.
            Some(c) => tether_policy::ChainOutcome {
                decision: Decision::Pinned(c.pin()),
                decided_by: Some(format!("IPAMClaim {}/{}", c.namespace, c.name)),
                steps: Vec::new(),
            },
            None => self.policies.decide(&request)?,
        };
        for step in &outcome.steps {
            self.metrics
                .policy_seconds
                .get_or_create(&PolicyLabels {
                    policy: step.policy.clone(),
                })
                .observe(step.micros as f64 / 1e6);
        }
        tracing::info!(
            pod = %request.workload.key(),
            container_id = %req.container_id,
            ifname = %req.ifname,
            decided_by = outcome.decided_by.as_deref().unwrap_or("(none)"),
            decision = outcome.decision.kind_str(),
            identity = match &outcome.decision { Decision::Pinned(p) => p.identity.as_str(), _ => "" },
            "policy decision"
        );
        // Whatever the policy, it may pin the pod only under the pod's own identity.
        outcome.check_claim(&request)?;
        let hints: Vec<String> = match &outcome.decision {
            Decision::Pinned(p) => p.pools.clone(),
            _ => Vec::new(),
        };
        let ns_annotations = view
            .namespace_annotations(&request.workload.namespace)
            .map_err(EngineError::WorkloadUnknown)?;
        let defaults = self
            .ipam
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .default_pools();
        let (pools, source) = select_pools(&PoolInputs {
            pod_annotations: &request.workload.annotations,
            ifname: &req.ifname,
            policy_hints: &hints,
            namespace_annotations: &ns_annotations,
            cni_pools: &req.pools,
            cluster_defaults: &defaults,
        })?;
        // The namespace's labels are looked up only for a pool that selects by them (in
        // Kubernetes mode a lookup the cache misses is an API read).
        let selects_namespaces = {
            let state = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            pools.iter().any(|n| {
                state
                    .pool(n)
                    .is_some_and(|p| p.spec.namespace_selector.is_some())
            })
        };
        let ns_labels = if selects_namespaces {
            view.namespace_labels(&request.workload.namespace)
                .map_err(EngineError::WorkloadUnknown)?
        } else {
            None
        };
        let node = self
            .node
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let who = Requester {
            node: &node.name,
            node_labels: node.labels.as_deref(),
            namespace: &request.workload.namespace,
            namespace_labels: ns_labels.as_deref(),
        };
        let pools = {
            let state = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            admit(pools, source, |n| state.pool(n), &who)?
        };
        tracing::debug!(?pools, ?source, "pools selected");
        Ok((outcome.decision, pools, view))
    }

    /// The IPAMClaim the attachment refers to, when its pod's network selection names one
    /// and the IPAMClaim API is served. A claim that does not exist (yet) answers "try
    /// again": ipam-extensions creates it with the VM, and the pod must not get an address
    /// the claim would not keep.
    fn claim_of(
        &self,
        view: &dyn WorkloadView,
        workload: &Workload,
        owners: &[tether_core::Object],
        req: &CniRequest,
    ) -> Result<Option<ClaimRef>, EngineError> {
        let name =
            tether_core::netsel::claim_reference(&workload.annotations, &req.network, &req.ifname)
                .map_err(|reason| {
                    EngineError::from(AllocError::BadAnnotation {
                        annotation: tether_core::netsel::NETWORKS_ANNOTATION,
                        reason,
                    })
                })?;
        let Some(name) = name else {
            return Ok(None);
        };
        let namespace = workload.namespace.clone();
        match view
            .ipam_claim(&namespace, &name)
            .map_err(EngineError::WorkloadUnknown)?
        {
            crate::ports::ClaimLookup::NotServed => {
                tracing::warn!(pod = %workload.key(), claim = %name, "the pod refers to an IPAMClaim, but the IPAMClaim API (k8s.cni.cncf.io/v1alpha1) is not served: the policies decide");
                Ok(None)
            }
            crate::ports::ClaimLookup::Missing => Err(EngineError::WorkloadUnknown(format!(
                "IPAMClaim {namespace}/{name}, which pod {} refers to, does not exist",
                workload.key()
            ))),
            crate::ports::ClaimLookup::Found(info) => {
                // A claim made for a VM serves only that VM's pods: any other pod naming it
                // could take a running VM's address. The pod's controller chain, as the API
                // server resolves it (each owner read and its UID checked), must reach the
                // claim's controller.
                if let Some(o) = &info.owner {
                    let owned = owners.iter().any(|x| {
                        x.kind == o.kind
                            && x.name == o.name
                            && (x.uid.is_empty() || o.uid.is_empty() || x.uid == o.uid)
                    });
                    if !owned {
                        return Err(EngineError::Policy(PolicyError::ForeignIdentity {
                            policy: "ipam-claim-reference".into(),
                            error: tether_core::ClaimError::NotTheClaimOwner {
                                pod: workload.key(),
                                claim: format!("{namespace}/{name}"),
                                owner: format!("{} {}", o.kind, o.name),
                            },
                        }));
                    }
                }
                if !info.network.is_empty() && info.network != req.network {
                    tracing::warn!(claim = %format!("{namespace}/{name}"), claim_network = %info.network, network = %req.network, "the IPAMClaim was made for another network");
                }
                let ips = info
                    .ips
                    .iter()
                    .filter_map(|c| c.split('/').next()?.parse::<IpAddr>().ok())
                    .collect();
                Ok(Some(ClaimRef {
                    namespace,
                    name,
                    ips,
                    migration_target: workload
                        .labels
                        .iter()
                        .any(|(k, _)| k == tether_core::claim::MIGRATION_JOB_LABEL),
                }))
            }
        }
    }

    /// Makes every ADD of a pod with an IPAMClaim report its outcome to `reporter`
    /// (Kubernetes mode: the claim's status is written from it).
    pub fn set_claim_reporter(&self, reporter: ClaimReporter) {
        *self
            .claim_reporter
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(reporter);
    }

    fn report_claim(
        &self,
        claim: &ClaimRef,
        attachment: &Attachment,
        result: &Result<CniResult, EngineError>,
    ) {
        let outcome = match result {
            Ok(r) => Ok(r.ips.iter().map(|i| i.address.clone()).collect()),
            Err(e) => {
                let reason = match e {
                    EngineError::Write(WriteError::Alloc(a)) => match a {
                        AllocError::PoolExhausted { .. } => Some("SubnetExhausted"),
                        // (IdentityBusy is not: another pod of the claim still holds the
                        // address, and this one waits, code 11, until it is gone.)
                        AllocError::AddressInUse { .. } | AllocError::AddressNotInPool { .. } => {
                            Some("IPAddressConflict")
                        }
                        AllocError::UnknownPool { .. }
                        | AllocError::NoPool
                        | AllocError::PoolNotAllowed { .. } => Some("PoolNotFound"),
                        _ => None,
                    },
                    // Transient (caches, store, contention): the next try decides.
                    _ => None,
                };
                match reason {
                    Some(r) => Err((r.to_owned(), e.to_string())),
                    None => return,
                }
            }
        };
        let reporter = self
            .claim_reporter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(report) = reporter {
            report(ClaimReport {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                pod: attachment.pod.clone(),
                outcome,
            });
        }
    }

    /// Before a pinned identity is given its first address here, asks the store whether it
    /// has one already that the state does not show yet (in Kubernetes mode the state follows
    /// a watch, which may lag: without this a VM whose launcher pod comes to a lagging node
    /// would get a second address). What the store has is read into the state first. An
    /// identity the state knows, or a store with no other writers, costs nothing.
    async fn confirm_pin(
        &self,
        p: &tether_core::Pinned,
        network: &str,
        ifname: &str,
    ) -> Result<(), EngineError> {
        let known = self
            .ipam
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .has_pin(&p.identity, p.kind, network, ifname);
        if known {
            return Ok(());
        }
        let store = self.store.clone();
        let (kind, identity) = (p.kind, p.identity.clone());
        let found = tokio::task::spawn_blocking(move || store.pinned_to(kind, &identity))
            .await
            .map_err(|e| EngineError::Unavailable(format!("store read task: {e}")))?
            .map_err(|e| {
                EngineError::WorkloadUnknown(format!(
                    "cannot confirm with the store that {} has no address yet: {e}",
                    p.identity
                ))
            })?;
        let ips: Vec<IpAddr> = found
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.network == network && a.interface == ifname)
            .map(|a| a.ip)
            .collect();
        if !ips.is_empty() {
            tracing::info!(identity = %p.identity, ?ips, "the identity's addresses were not in the state yet (the change feed lags); read them from the store");
            self.writer.submit(Op::Refresh(ips)).await?;
        }
        Ok(())
    }

    /// CNI DEL: idempotent.
    pub async fn del(&self, req: CniRequest) -> Result<(), EngineError> {
        let a = Self::attachment(&req)?;
        self.writer
            .submit(Op::Del {
                container_id: a.container_id,
                ifname: a.ifname,
                now: now(),
            })
            .await?;
        Ok(())
    }

    /// CNI CHECK: the attachment still holds its addresses, and they are exactly the ones
    /// of the runtime's prevResult (when it sent one).
    pub fn check(&self, req: &CniRequest) -> Result<(), EngineError> {
        let a = Self::attachment(req)?;
        self.fresh_state()?;
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
        let held = ipam.held_by(&a.container_id, &a.ifname);
        if held.is_empty() {
            return Err(EngineError::Unknown(format!(
                "container {} ({}) holds no address",
                a.container_id, a.ifname
            )));
        }
        if req.prev_ips.is_empty() {
            return Ok(());
        }
        let mut expected: Vec<String> = held
            .iter()
            .map(|h| {
                let s = ipam.assigned(h);
                format!("{}/{}", s.ip, s.prefix)
            })
            .collect();
        let mut given = Vec::with_capacity(req.prev_ips.len());
        for p in &req.prev_ips {
            let (ip, prefix) = p.split_once('/').unwrap_or((p, ""));
            let ip: IpAddr = ip.parse().map_err(|_| {
                EngineError::BadRequest(format!("prevResult address {p:?} is not an IP address"))
            })?;
            given.push(if prefix.is_empty() {
                ip.to_string()
            } else {
                format!("{ip}/{prefix}")
            });
        }
        expected.sort();
        given.sort();
        if expected != given {
            return Err(EngineError::Mismatch(format!(
                "container {} ({}) holds {} but prevResult lists {}",
                a.container_id,
                a.ifname,
                expected.join(", "),
                given.join(", ")
            )));
        }
        Ok(())
    }

    /// CNI GC: frees what the runtime no longer lists. Without the list nothing is freed: a
    /// missing list is not an empty one.
    pub async fn gc(self: &Arc<Self>, req: CniRequest) -> Result<GcResult, EngineError> {
        self.gc_at(req, Instant::now()).await
    }

    /// [`Self::gc`] as if it ran at `now` (tests move the clock).
    pub async fn gc_at(
        self: &Arc<Self>,
        req: CniRequest,
        now: Instant,
    ) -> Result<GcResult, EngineError> {
        let Some(list) = &req.valid_attachments else {
            return Err(EngineError::BadRequest(
                "GC needs cni.dev/valid-attachments, which the runtime sends (CNI 1.1); refusing to free anything".into(),
            ));
        };
        let valid: HashSet<(String, String)> = list
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let scope = {
            let node = self.node.read().unwrap_or_else(PoisonError::into_inner);
            node.shared.then(|| node.name.clone())
        };
        if let Some(node) = scope {
            return self.gc_node(&req.network, &valid, node, now).await;
        }
        // Standalone: the runtime's list is the only witness. Planned on a look at the state;
        // the writer applies each change only if its allocation is unchanged since (a holder
        // that came back meanwhile is kept; the next GC looks again).
        let planned = self
            .ipam
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .plan_gc(&req.network, &valid, None, crate::engine::now())
            .changes;
        let applied = self.apply(planned).await?;
        Ok(GcResult {
            released: addresses(&applied),
        })
    }

    /// CNI GC on a node of a cluster, by garbage collection's rules ([`crate::gc`]): this
    /// node's holders of `network` (of pods) that the runtime does not list are findings:
    /// `not-listed` when the runtime lists another sandbox of the same pod and interface (the
    /// pod was given a new one), else `pod-gone`, which also needs a fresh read saying the
    /// pod is gone. One found again by a GC call at least the grace period later, on the same
    /// revision, is dropped after the address is read again from the store, by a conditional
    /// write; a call that lists it again starts its wait over. The runtime's list alone never
    /// frees a holder (another client of the network on the node, a meta-plugin's list that
    /// omits its attachments), and other nodes' holders are never looked at.
    async fn gc_node(
        self: &Arc<Self>,
        network: &str,
        valid: &HashSet<(String, String)>,
        node: String,
        now: Instant,
    ) -> Result<GcResult, EngineError> {
        let settings = *self
            .gc_settings
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let findings: Vec<Finding> = {
            let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            let mine = || {
                ipam.allocations()
                    .filter(|a| a.network == network)
                    .flat_map(|a| a.holders.iter().map(move |h| (a, h)))
                    .filter(|(_, h)| h.node == node && !h.attachment.pod.is_empty())
            };
            let listed = |h: &tether_core::alloc::Holder| {
                valid.contains(&(
                    h.attachment.container_id.clone(),
                    h.attachment.ifname.clone(),
                ))
            };
            // Pods (UID known) whose interface has a sandbox the runtime lists.
            let sandboxed: HashSet<(&str, &str)> = mine()
                .filter(|(_, h)| listed(h) && !h.attachment.pod_uid.is_empty())
                .map(|(_, h)| (h.attachment.pod_uid.as_str(), h.attachment.ifname.as_str()))
                .collect();
            mine()
                .filter(|(_, h)| !listed(h))
                .map(|(a, h)| {
                    let resandboxed = sandboxed
                        .contains(&(h.attachment.pod_uid.as_str(), h.attachment.ifname.as_str()));
                    // An unlisted sandbox of a pod with a listed one is the runtime's word
                    // alone; any other unlisted holder goes only once its pod is gone.
                    let reason = if resandboxed {
                        GcReason::NotListed
                    } else {
                        GcReason::PodGone
                    };
                    holder_finding(a, h, reason, &settings)
                })
                .collect()
        };
        let suspects = self.node_suspects(network);
        let ready = suspects.observe(findings, now, true);
        if ready.is_empty() {
            return Ok(GcResult::default());
        }
        let this = self.clone();
        let planned = tokio::task::spawn_blocking(move || {
            let view = this.workloads.view();
            this.gc_confirm(&*view, &suspects, ready, &settings)
        })
        .await
        .map_err(|e| EngineError::Unavailable(format!("GC task: {e}")))?;
        let released = self.gc_apply(planned).await?;
        Ok(GcResult {
            released: released
                .into_iter()
                .filter(|r| r.action == "released")
                .map(|r| r.address)
                .collect(),
        })
    }

    /// CNI GC's findings on `network` (kept apart from the elected passes', which a daemon
    /// that is not elected forgets at every pass).
    fn node_suspects(&self, network: &str) -> Arc<Suspects> {
        self.node_suspects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(network.to_owned())
            .or_default()
            .clone()
    }

    /// Makes garbage collection (the elected passes and CNI GC) report what it freed to
    /// `reporter` (Kubernetes mode: an Event each).
    pub fn set_gc_reporter(&self, reporter: GcReporter) {
        *self
            .gc_reporter
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(reporter);
    }

    /// Sets garbage collection's grace periods (CNI GC on a node of a cluster uses them too).
    pub fn set_gc_settings(&self, settings: GcSettings) {
        *self
            .gc_settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = settings;
    }

    /// One pass of garbage collection (Kubernetes mode: the elected daemon, every
    /// `--gc-interval-secs`); see [`crate::gc`] for its rules. A pass that cannot look
    /// (not elected, caches not synced, API server unreachable) frees nothing and forgets
    /// its findings; the report says why.
    pub async fn gc_pass(self: &Arc<Self>) -> Result<GcReport, EngineError> {
        self.gc_pass_at(Instant::now()).await
    }

    /// [`Self::gc_pass`] as if it ran at `now` (tests move the clock).
    pub async fn gc_pass_at(self: &Arc<Self>, now: Instant) -> Result<GcReport, EngineError> {
        let gate = self
            .release_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(gate) = gate
            && let Err(why) = gate()
        {
            self.gc_paused(why.clone(), "not-elected", now);
            return Err(EngineError::NotElected(why));
        }
        if !self.judges {
            return Ok(self.gc_paused(
                "the workload source cannot tell a pod gone".into(),
                "cannot-judge",
                now,
            ));
        }
        if !self.workloads.synced() {
            return Ok(self.gc_paused(
                "the workload caches have not synced".into(),
                "not-synced",
                now,
            ));
        }
        let settings = *self
            .gc_settings
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let this = self.clone();
        let looked = tokio::task::spawn_blocking(move || {
            let view = this.workloads.view();
            let findings = this.gc_look(&*view, &settings)?;
            let ready = this.suspects.observe(findings, now, true);
            Ok::<_, String>(this.gc_confirm(&*view, &this.suspects, ready, &settings))
        })
        .await
        .map_err(|e| EngineError::Unavailable(format!("GC task: {e}")))?;
        let planned = match looked {
            Ok(p) => p,
            Err(why) => return Ok(self.gc_paused(why, "unreachable", now)),
        };
        let released = self.gc_apply(planned).await?;
        self.metrics.gc_pass("ok");
        self.metrics.gc_suspects.set(self.suspects.len() as i64);
        let report = GcReport {
            paused: None,
            at: crate::engine::now(),
            released,
            suspects: self.suspects.report(now),
        };
        *self.gc_last.lock().unwrap_or_else(PoisonError::into_inner) = report.clone();
        Ok(report)
    }

    /// The last pass's report, its suspects brought up to date (`/v1/gc`).
    pub fn gc_report(&self) -> GcReport {
        let mut r = self
            .gc_last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = Instant::now();
        r.suspects = self.suspects.report(now);
        // CNI GC's findings on this node too.
        for s in self
            .node_suspects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            r.suspects.extend(s.report(now));
        }
        r
    }

    /// A pass that could not look: forgets every finding, so that each waits its whole grace
    /// again once passes can look.
    fn gc_paused(&self, why: String, result: &str, now: Instant) -> GcReport {
        if self.suspects.len() > 0 {
            tracing::info!(why = %why, "garbage collection paused; its findings are forgotten");
        } else {
            tracing::debug!(why = %why, "garbage collection paused");
        }
        self.suspects.clear();
        self.metrics.gc_pass(result);
        self.metrics.gc_suspects.set(0);
        let report = GcReport {
            paused: Some(why),
            at: crate::engine::now(),
            released: Vec::new(),
            suspects: self.suspects.report(now),
        };
        *self.gc_last.lock().unwrap_or_else(PoisonError::into_inner) = report.clone();
        report
    }

    /// One look at everything: what looks leaked now. `Err` when it cannot look.
    fn gc_look(
        &self,
        view: &dyn WorkloadView,
        settings: &GcSettings,
    ) -> Result<Vec<Finding>, String> {
        self.workloads.reachable()?;
        // Listed before the state is read: a pod created after the list whose holder is in
        // the state looks gone once, and is listed by the next look.
        let pods = view.all_pods()?;
        let mut findings = Vec::new();
        // Holders whose pod is being deleted, to judge by their node (read outside the lock).
        let mut terminating: Vec<(Finding, String)> = Vec::new();
        // Without a pod list: holders to ask about one by one (outside the lock).
        let mut each: Vec<(Finding, tether_core::alloc::Holder)> = Vec::new();
        let candidates = {
            let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            for a in ipam.allocations() {
                for h in a.holders.iter().filter(|h| !h.attachment.pod.is_empty()) {
                    match &pods {
                        Some(pods) => {
                            let p = pods
                                .get(&(h.attachment.namespace.clone(), h.attachment.pod.clone()));
                            if not_the_holders(h, p) {
                                findings.push(holder_finding(a, h, GcReason::PodGone, settings));
                            } else if p.is_some_and(|p| p.terminating) && !h.node.is_empty() {
                                terminating.push((
                                    holder_finding(a, h, GcReason::NodeLost, settings),
                                    h.node.clone(),
                                ));
                            }
                        }
                        None => each
                            .push((holder_finding(a, h, GcReason::PodGone, settings), h.clone())),
                    }
                }
            }
            ipam.release_candidates()
        };
        for (f, h) in each {
            if view.pod_liveness(
                &h.attachment.namespace,
                &h.attachment.pod,
                &h.attachment.pod_uid,
            ) == Liveness::Gone
            {
                findings.push(f);
            }
        }
        let mut nodes = std::collections::HashMap::new();
        for (f, node) in terminating {
            let state = *nodes
                .entry(node.clone())
                .or_insert_with(|| view.node_state(&node));
            if node_lost(state, settings) {
                findings.push(f);
            }
        }
        let now_wall = now();
        for a in candidates {
            let fires = |c: &tether_core::ReleaseCondition| view.fires(c);
            if !tether_core::alloc::plan_release_of(std::slice::from_ref(&a), now_wall, &fires)
                .changes
                .is_empty()
            {
                findings.push(Finding {
                    key: Key {
                        pool: a.pool.clone(),
                        ip: a.ip,
                        subject: Subject::Release,
                    },
                    revision: a.revision,
                    reason: GcReason::RuleFired,
                    grace: crate::gc::grace_of(&a, settings),
                    workload: identity_of(&a),
                });
            }
        }
        Ok(findings)
    }

    /// Confirms findings whose grace has passed on fresh reads (the address from the store,
    /// the workload from the source, uncached), and plans one conditional change per
    /// address. Findings that do not hold are forgotten.
    fn gc_confirm(
        &self,
        view: &dyn WorkloadView,
        suspects: &Suspects,
        ready: Vec<Finding>,
        settings: &GcSettings,
    ) -> Vec<(Change, Vec<GcRelease>)> {
        let mut by_address: std::collections::BTreeMap<(String, IpAddr), Vec<Finding>> =
            std::collections::BTreeMap::new();
        for f in ready {
            by_address
                .entry((f.key.pool.clone(), f.key.ip))
                .or_default()
                .push(f);
        }
        let now_wall = now();
        let mut planned = Vec::new();
        for ((pool, ip), findings) in by_address {
            let fresh = match self.store.get(ip) {
                Ok(v) => v.into_iter().find(|a| a.pool == pool),
                Err(e) => {
                    tracing::warn!(pool = %pool, ip = %ip, "garbage collection keeps the address: it could not be read again: {e}");
                    continue;
                }
            };
            let Some(fresh) = fresh.filter(|a| findings.iter().all(|f| f.revision == a.revision))
            else {
                // Gone or changed since it was found: nothing to free, or look again.
                for f in &findings {
                    suspects.forget(&f.key);
                }
                continue;
            };
            let mut dropped: Vec<(String, String)> = Vec::new();
            let mut released = Vec::new();
            let mut release = false;
            for f in findings {
                let confirmed = match &f.key.subject {
                    Subject::Holder {
                        container_id,
                        ifname,
                    } => fresh
                        .holders
                        .iter()
                        .find(|h| {
                            &h.attachment.container_id == container_id
                                && &h.attachment.ifname == ifname
                        })
                        .and_then(|h| match f.reason {
                            // The runtime's word, made twice a grace apart; the holder is
                            // still in the record read again.
                            GcReason::NotListed => Some(GcReason::NotListed),
                            _ => confirm_holder(view, h, settings),
                        })
                        .inspect(|_| dropped.push((container_id.clone(), ifname.clone()))),
                    Subject::Release => {
                        let fires = |c: &tether_core::ReleaseCondition| view.fires(c);
                        (!tether_core::alloc::plan_release_of(
                            std::slice::from_ref(&fresh),
                            now_wall,
                            &fires,
                        )
                        .changes
                        .is_empty())
                        .then(|| {
                            release = true;
                            GcReason::RuleFired
                        })
                    }
                };
                match confirmed {
                    Some(reason) => released.push(GcRelease {
                        address: format!("{pool}/{ip}"),
                        reason: reason.as_str().to_owned(),
                        action: String::new(),
                        workload: f.workload.clone(),
                    }),
                    None => {
                        tracing::info!(pool = %pool, ip = %ip, workload = %f.workload, reason = f.reason.as_str(), "garbage collection keeps the address: a fresh read does not confirm it is leaked");
                        suspects.forget(&f.key);
                    }
                }
            }
            let change = if !dropped.is_empty() {
                tether_core::alloc::drop_holders(
                    &fresh,
                    |h| {
                        dropped.iter().any(|(c, i)| {
                            &h.attachment.container_id == c && &h.attachment.ifname == i
                        })
                    },
                    now_wall,
                )
            } else if release {
                Change::delete(&fresh)
            } else {
                continue;
            };
            let action = match &change {
                Change::Delete { .. } => "released",
                Change::Put(_) => "holder-dropped",
            };
            for r in &mut released {
                r.action = action.to_owned();
            }
            planned.push((change, released));
        }
        planned
    }

    /// Has the writer apply garbage collection's changes (each only if its address is
    /// unchanged since it was read); counts, logs and returns what was freed.
    async fn gc_apply(
        &self,
        planned: Vec<(Change, Vec<GcRelease>)>,
    ) -> Result<Vec<GcRelease>, EngineError> {
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        let (changes, infos): (Vec<Change>, Vec<Vec<GcRelease>>) = planned.into_iter().unzip();
        let applied = self.apply(changes.clone()).await?;
        let mut out = Vec::new();
        for (change, infos) in changes.iter().zip(infos) {
            let key = (change.pool().to_owned(), change.ip());
            if !applied.iter().any(|c| (c.pool().to_owned(), c.ip()) == key) {
                tracing::info!(pool = %key.0, ip = %key.1, "garbage collection did not free the address: it changed before the write");
                continue;
            }
            for r in infos {
                self.metrics
                    .gc_released
                    .get_or_create(&crate::metrics::GcLabels {
                        reason: r.reason.clone(),
                        action: r.action.clone(),
                    })
                    .inc();
                tracing::warn!(address = %r.address, reason = %r.reason, action = %r.action, workload = %r.workload, "garbage collection freed");
                out.push(r);
            }
        }
        // What was acted on waits no more.
        for c in &applied {
            let (pool, ip) = (c.pool().to_owned(), c.ip());
            self.suspects.forget_address(&pool, ip);
            for s in self
                .node_suspects
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                s.forget_address(&pool, ip);
            }
        }
        let reporter = self
            .gc_reporter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(report) = reporter
            && !out.is_empty()
        {
            report(out.clone());
        }
        Ok(out)
    }

    /// Has the writer apply changes planned on a look at the state, each only if its
    /// allocation is unchanged since; returns those applied.
    async fn apply(&self, changes: Vec<Change>) -> Result<Vec<Change>, EngineError> {
        if changes.is_empty() {
            return Ok(changes);
        }
        match self.writer.submit(Op::Apply(changes)).await? {
            Outcome::Changed(c) => Ok(c),
            Outcome::Added(_) => Err(EngineError::Unavailable(
                "writer answered out of turn".into(),
            )),
        }
    }

    /// CNI STATUS: can an ADD on this network succeed?
    pub fn status(&self, cni_pools: &[String]) -> Result<(), EngineError> {
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
        let names = if cni_pools.is_empty() {
            ipam.default_pools()
        } else {
            cni_pools.to_vec()
        };
        if names.is_empty() {
            return Ok(()); // pods may name their pools; nothing to judge here
        }
        let usage = ipam.usage();
        let free = names
            .iter()
            .any(|n| usage.iter().any(|u| &u.name == n && u.allocated < u.total));
        if free {
            Ok(())
        } else {
            Err(EngineError::Unavailable(format!(
                "pools {names:?} have no free address"
            )))
        }
    }

    /// Spreads the searches for free addresses (see
    /// [`tether_core::alloc::Ipam::spread_cursors`]): for daemons sharing pools, each with its
    /// own `seed` (its node's name, hashed).
    pub fn spread_cursors(&self, seed: u64) {
        self.ipam
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .spread_cursors(seed);
    }

    /// Sets this node's name and labels, which pools' node selectors are matched against.
    pub fn set_node(&self, node: NodeInfo) {
        *self.node.write().unwrap_or_else(PoisonError::into_inner) = node;
    }

    /// Makes the reconciler ask `gate` first (Kubernetes mode: only the daemon holding the
    /// releasers' Lease applies release rules). Releases by hand are not gated.
    pub fn set_release_gate(&self, gate: ReleaseGate) {
        *self
            .release_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(gate);
    }

    /// The reconciler: releases pinned addresses whose release condition is known to have
    /// fired. It plans on a look at the state and the workloads, then deletes only what is
    /// unchanged since it looked (a pod that took the address back meanwhile keeps it).
    pub async fn reconcile(self: &Arc<Self>) -> Result<ReconcileResult, EngineError> {
        let gate = self
            .release_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(gate) = gate {
            gate().map_err(EngineError::NotElected)?;
        }
        if !self.workloads.synced() {
            return Err(EngineError::NotSynced);
        }
        let this = self.clone();
        let planned = tokio::task::spawn_blocking(move || {
            let view = this.workloads.view();
            let judges = this.judges;
            let fires = move |c: &tether_core::ReleaseCondition| judges && view.fires(c);
            // Judged after letting go of the state: a rule may be confirmed by an API read,
            // and the writer must not wait for it.
            let candidates = this
                .ipam
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .release_candidates();
            tether_core::alloc::plan_release_of(&candidates, now(), &fires).changes
        })
        .await
        .map_err(|e| EngineError::Unavailable(format!("reconcile task: {e}")))?;
        let released = addresses(&self.apply(planned).await?);
        if !released.is_empty() {
            tracing::info!(?released, "released pinned addresses");
        }
        Ok(ReconcileResult { released })
    }

    /// Releases one address by hand (`tetherd release`).
    pub async fn release(
        &self,
        req: tether_api::ReleaseRequest,
    ) -> Result<ReconcileResult, EngineError> {
        let ip: IpAddr = req
            .ip
            .parse()
            .map_err(|_| EngineError::BadRequest(format!("{:?} is not an IP address", req.ip)))?;
        // Acted on as the store has it: in Kubernetes mode the state follows a watch, which
        // may not show yet what another node just wrote.
        self.writer.submit(Op::Refresh(vec![ip])).await?;
        if let Some(claim) = &req.to_claim {
            return self.refile(&req.pool, ip, claim).await;
        }
        let planned = self
            .ipam
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .plan_release_by_hand(&req.pool, ip, req.force)?
            .changes;
        let released = addresses(&self.apply(planned).await?);
        if released.is_empty() {
            return Err(EngineError::Changed(format!(
                "{}/{ip} changed while it was being released; look at it again (`tetherd allocations`)",
                req.pool
            )));
        }
        tracing::warn!(?released, force = req.force, "released by hand");
        Ok(ReconcileResult { released })
    }

    /// Re-files a pinned address no pod holds under the IPAMClaim `claim` (`namespace/name`):
    /// `tetherd release POOL/IP --to-claim NS/NAME`.
    async fn refile(
        &self,
        pool: &str,
        ip: IpAddr,
        claim: &str,
    ) -> Result<ReconcileResult, EngineError> {
        let Some((namespace, name)) = claim
            .split_once('/')
            .filter(|(n, c)| !n.is_empty() && !c.is_empty() && !c.contains('/'))
        else {
            return Err(EngineError::BadRequest(format!(
                "{claim:?} is not an IPAMClaim as NAMESPACE/NAME"
            )));
        };
        // A claim that is not there would be judged deleted and the address released.
        let view = self.workloads.view();
        let (ns, n) = (namespace.to_owned(), name.to_owned());
        let found = tokio::task::spawn_blocking(move || view.ipam_claim(&ns, &n))
            .await
            .map_err(|e| EngineError::Unavailable(format!("claim lookup task: {e}")))?
            .map_err(EngineError::WorkloadUnknown)?;
        if !matches!(found, crate::ports::ClaimLookup::Found(_)) {
            return Err(EngineError::BadRequest(format!(
                "IPAMClaim {claim} does not exist (or the IPAMClaim API is not served): create it first, or the address would be released as the claim's"
            )));
        }
        let pin = ClaimRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ips: Vec::new(),
            migration_target: false,
        }
        .pin();
        let owner = tether_core::alloc::Owner::Pinned {
            identity: pin.identity,
            kind: pin.kind,
            release: pin.release,
        };
        let planned = self
            .ipam
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .plan_refile(pool, ip, owner)?
            .changes;
        if self.apply(planned).await?.is_empty() {
            return Err(EngineError::Changed(format!(
                "{pool}/{ip} changed while it was being re-filed; look at it again (`tetherd allocations`)"
            )));
        }
        tracing::warn!(address = %format!("{pool}/{ip}"), claim = %claim, "re-filed under an IPAMClaim by hand");
        Ok(ReconcileResult::default())
    }

    /// The pools with their usage (`tetherd pools`), the allocations held under pools no
    /// longer in force, and the last refused reload.
    pub fn pools(&self) -> PoolList {
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
        let mut orphans: Vec<OrphanInfo> = ipam
            .orphans()
            .into_iter()
            .map(|o| OrphanInfo {
                address: format!("{}/{}", o.pool, o.ip),
                reserved_in: ipam
                    .pools()
                    .find(|p| p.contains(o.ip))
                    .map(|p| p.name.clone()),
            })
            .collect();
        orphans.sort_by(|a, b| a.address.cmp(&b.address));
        PoolList {
            pools: ipam
                .usage()
                .into_iter()
                .map(|u| PoolInfo {
                    name: u.name,
                    subnet: u.subnet,
                    allocated: u.allocated.to_string(),
                    total: u.total.to_string(),
                    default: u.default,
                })
                .collect(),
            orphans,
            reload_error: self
                .reload_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Records the outcome of a pool reload: the error of a refused one, or none.
    pub fn set_reload_error(&self, error: Option<String>) {
        *self
            .reload_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    /// `Err` (code 11) while the writer's state may differ from the store: nothing is answered
    /// from it then (a record the store no longer has would be a ghost address).
    fn fresh_state(&self) -> Result<(), EngineError> {
        if self.writer.stale() {
            return Err(EngineError::Write(WriteError::Store(
                tether_store::StoreError::Unavailable(
                    "the state is being re-read from the store (it did not answer); try again"
                        .into(),
                ),
            )));
        }
        Ok(())
    }

    /// Whether the engine is alive: its writer's thread runs (a panic ends it, and only a
    /// restart brings it back). What `/healthz` reports; a store outage or a failed commit
    /// makes the engine unready, not dead.
    pub fn alive(&self) -> bool {
        self.writer.running()
    }

    /// Whether the engine can serve: the writer can write, the workload source has synced
    /// and the policy chain is in force. What `/readyz` reports.
    pub fn ready(&self) -> bool {
        self.unready_reason().is_none()
    }

    /// Why the engine cannot serve, if it cannot.
    pub fn unready_reason(&self) -> Option<String> {
        if !self.writer.healthy() {
            return Some("the writer cannot commit to the store (see the log)".into());
        }
        if !self.workloads.synced() {
            return Some("the workload caches have not synced yet".into());
        }
        self.policies
            .unready()
            .map(|why| format!("the policy chain is not loaded yet: {why}"))
    }

    /// Puts new pool definitions in force between two writer batches. Every allocation is
    /// kept: one outside every new pool stays (an orphan, logged) until it is released.
    /// Overlapping pools are refused and the pools in force stay.
    pub fn replace_pools(&self, pools: Vec<Pool>) -> Result<crate::PoolDiff, PoolError> {
        let mut ipam = self.ipam.write().unwrap_or_else(PoisonError::into_inner);
        let diff = crate::PoolDiff::between(&ipam.pools().collect::<Vec<_>>(), &pools);
        if !diff.is_empty() {
            ipam.set_pools(pools)?;
            for name in &diff.removed {
                let l = PoolLabels { pool: name.clone() };
                self.metrics.pool_total.remove(&l);
                self.metrics.pool_allocated.remove(&l);
            }
            crate::warn_orphans(&ipam);
        }
        Ok(diff)
    }

    /// Every allocation, by pool and address (`tetherd allocations`).
    pub fn allocations(&self) -> Vec<tether_core::alloc::Allocation> {
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = ipam.allocations().cloned().collect();
        v.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
        v
    }

    /// The metrics, pool gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        {
            let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            for u in ipam.usage() {
                let l = PoolLabels {
                    pool: u.name.clone(),
                };
                self.metrics
                    .pool_total
                    .get_or_create(&l)
                    .set(u.total as f64);
                self.metrics
                    .pool_allocated
                    .get_or_create(&l)
                    .set(u.allocated as f64);
            }
        }
        self.metrics.encode()
    }
}
