//! What each API call does: resolve the workload, ask the policy chain, select pools, hand the
//! allocation to the writer.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tether_api::{
    CniRequest, CniResult, GcResult, IpConfig, PoolInfo, PoolList, ReconcileResult, RouteConfig,
};
use tether_core::alloc::{
    AllocError, Assigned, Attachment, Change, Ipam, Liveness, PoolInputs, select_pools,
};
use tether_core::{Decision, PolicyRequest, Workload};
use tether_policy::{Chain, PolicyError, Runtime};

use super::metrics::{Metrics, PolicyLabels, PoolLabels};
use super::workloads::{WorkloadDir, WorkloadIndex};
use super::writer::{AddOp, Op, Outcome, WriteError, Writer};

/// Why a call failed; mapped to a CNI error code once, in `http.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    MissingEnv(String),
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Mismatch(String),
}

impl From<AllocError> for ServiceError {
    fn from(e: AllocError) -> Self {
        ServiceError::Write(WriteError::Alloc(e))
    }
}

impl ServiceError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ServiceError::Write(WriteError::Alloc(e)) => match e {
                AllocError::PoolExhausted { .. } => "pool_exhausted",
                AllocError::UnknownPool { .. } => "unknown_pool",
                AllocError::NoPool => "no_pool",
                AllocError::AddressNotInPool { .. } => "address_not_in_pool",
                AllocError::AddressInUse { .. } => "address_in_use",
                AllocError::IdentityBusy { .. } => "identity_busy",
                AllocError::BadAnnotation { .. } => "bad_annotation",
                AllocError::NoDecision => "no_decision",
                AllocError::StillHeld { .. } => "still_held",
                AllocError::NotAllocated { .. } => "not_allocated",
            },
            ServiceError::Write(WriteError::Store(_)) => "store",
            ServiceError::Write(WriteError::Stopped) => "stopping",
            ServiceError::Write(WriteError::Abandoned) => "abandoned",
            ServiceError::Policy(_) => "policy",
            ServiceError::BadRequest(_) => "bad_request",
            ServiceError::MissingEnv(_) => "missing_env",
            ServiceError::Unknown(_) => "unknown_container",
            ServiceError::Unavailable(_) => "unavailable",
            ServiceError::Mismatch(_) => "mismatch",
        }
    }
}

pub struct Service {
    runtime: Runtime,
    chain: Chain,
    workloads: Option<Mutex<WorkloadDir>>,
    ipam: Arc<RwLock<Ipam>>,
    writer: Writer,
    pub metrics: Arc<Metrics>,
}

fn now() -> u64 {
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
            Change::Delete { pool, ip } => Some(format!("{pool}/{ip}")),
            Change::Put(_) => None,
        })
        .collect()
}

impl Service {
    pub fn new(
        runtime: Runtime,
        chain: Chain,
        workloads: Option<WorkloadDir>,
        ipam: Arc<RwLock<Ipam>>,
        writer: Writer,
        metrics: Arc<Metrics>,
    ) -> Self {
        Service {
            runtime,
            chain,
            workloads: workloads.map(Mutex::new),
            ipam,
            writer,
            metrics,
        }
    }

    pub fn chain_names(&self) -> Vec<&str> {
        self.chain.names()
    }

    fn index(&self) -> Arc<WorkloadIndex> {
        match &self.workloads {
            Some(w) => w.lock().unwrap_or_else(PoisonError::into_inner).refresh(),
            None => Arc::new(WorkloadIndex::default()),
        }
    }

    fn attachment(req: &CniRequest) -> Result<Attachment, ServiceError> {
        if req.container_id.is_empty() {
            return Err(ServiceError::MissingEnv("CNI_CONTAINERID is empty".into()));
        }
        if req.ifname.is_empty() {
            return Err(ServiceError::MissingEnv("CNI_IFNAME is empty".into()));
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
    pub async fn add(self: &Arc<Self>, req: CniRequest) -> Result<CniResult, ServiceError> {
        let attachment = Self::attachment(&req)?;
        let requested = req
            .requested_ips
            .iter()
            .map(|s| {
                let ip = s.split('/').next().unwrap_or(s);
                ip.parse::<IpAddr>().map_err(|_| {
                    ServiceError::BadRequest(format!(
                        "requested address {s:?} is not an IP address"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A retried ADD answers from the state, without asking the policies again.
        {
            let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
            let held = ipam.held_by(&attachment.container_id, &attachment.ifname);
            if !held.is_empty() {
                let assigned: Vec<Assigned> = held.iter().map(|a| ipam.assigned(a)).collect();
                return Ok(render(&assigned));
            }
        }
        let this = self.clone();
        let req2 = req.clone();
        let att2 = attachment.clone();
        let (decision, pools, index) =
            tokio::task::spawn_blocking(move || this.decide(&req2, &att2))
                .await
                .map_err(|e| ServiceError::Unavailable(format!("policy evaluation task: {e}")))??;
        // Without a workload source nothing can be judged gone: a holder stays until its DEL.
        let judged = self.workloads.is_some();
        let liveness = move |a: &Attachment| {
            if judged && !a.pod.is_empty() {
                index.pod_liveness(&a.namespace, &a.pod)
            } else {
                Liveness::Unknown
            }
        };
        let op = Op::Add(Box::new(AddOp {
            attachment,
            network: req.network.clone(),
            decision,
            pools,
            requested,
            now: now(),
            liveness: Box::new(liveness),
        }));
        match self.writer.submit(op).await? {
            Outcome::Added(assigned) => Ok(render(&assigned)),
            Outcome::Changed(_) => Err(ServiceError::Unavailable(
                "writer answered out of turn".into(),
            )),
        }
    }

    /// Workload, chain decision and pool candidates (blocking: runs the policies).
    fn decide(
        &self,
        req: &CniRequest,
        attachment: &Attachment,
    ) -> Result<(Decision, Vec<String>, Arc<WorkloadIndex>), ServiceError> {
        let index = self.index();
        let mut workload = index
            .pods
            .get(&(attachment.namespace.clone(), attachment.pod.clone()))
            .cloned()
            .unwrap_or_else(|| Workload {
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
        let owners = index
            .objects
            .owner_chain(&workload.namespace, &workload.owner_references);
        let request = PolicyRequest { workload, owners };
        let outcome = self.chain.evaluate(&self.runtime, &request)?;
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
        let hints: Vec<String> = match &outcome.decision {
            Decision::Pinned(p) => p.pools.clone(),
            _ => Vec::new(),
        };
        let ns_annotations = index
            .namespaces
            .get(&request.workload.namespace)
            .cloned()
            .unwrap_or_default();
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
        tracing::debug!(?pools, ?source, "pools selected");
        Ok((outcome.decision, pools, index))
    }

    /// CNI DEL: idempotent.
    pub async fn del(&self, req: CniRequest) -> Result<(), ServiceError> {
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
    pub fn check(&self, req: &CniRequest) -> Result<(), ServiceError> {
        let a = Self::attachment(req)?;
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
        let held = ipam.held_by(&a.container_id, &a.ifname);
        if held.is_empty() {
            return Err(ServiceError::Unknown(format!(
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
                ServiceError::BadRequest(format!("prevResult address {p:?} is not an IP address"))
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
            return Err(ServiceError::Mismatch(format!(
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
    pub async fn gc(&self, req: CniRequest) -> Result<GcResult, ServiceError> {
        let Some(list) = &req.valid_attachments else {
            return Err(ServiceError::BadRequest(
                "GC needs cni.dev/valid-attachments, which the runtime sends (CNI 1.1); refusing to free anything".into(),
            ));
        };
        let valid: HashSet<(String, String)> = list
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        match self
            .writer
            .submit(Op::Gc {
                network: req.network.clone(),
                valid,
                now: now(),
            })
            .await?
        {
            Outcome::Changed(c) => Ok(GcResult {
                released: addresses(&c),
            }),
            Outcome::Added(_) => Ok(GcResult::default()),
        }
    }

    /// CNI STATUS: can an ADD on this network succeed?
    pub fn status(&self, cni_pools: &[String]) -> Result<(), ServiceError> {
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
            Err(ServiceError::Unavailable(format!(
                "pools {names:?} have no free address"
            )))
        }
    }

    /// Releases pinned addresses whose release condition fired.
    pub async fn reconcile(self: &Arc<Self>) -> Result<ReconcileResult, ServiceError> {
        let this = self.clone();
        let index = tokio::task::spawn_blocking(move || this.index())
            .await
            .map_err(|e| ServiceError::Unavailable(format!("reading workloads: {e}")))?;
        let judge = self.workloads.is_some();
        let fires = move |c: &tether_core::ReleaseCondition| judge && index.fires(c);
        match self
            .writer
            .submit(Op::Release {
                now: now(),
                fires: Box::new(fires),
            })
            .await?
        {
            Outcome::Changed(c) => {
                let released = addresses(&c);
                if !released.is_empty() {
                    tracing::info!(?released, "released pinned addresses");
                }
                Ok(ReconcileResult { released })
            }
            Outcome::Added(_) => Ok(ReconcileResult::default()),
        }
    }

    /// Releases one address by hand (`tetherd release`).
    pub async fn release(
        &self,
        req: tether_api::ReleaseRequest,
    ) -> Result<ReconcileResult, ServiceError> {
        let ip: IpAddr = req
            .ip
            .parse()
            .map_err(|_| ServiceError::BadRequest(format!("{:?} is not an IP address", req.ip)))?;
        match self
            .writer
            .submit(Op::Free {
                pool: req.pool,
                ip,
                force: req.force,
            })
            .await?
        {
            Outcome::Changed(c) => {
                let released = addresses(&c);
                tracing::warn!(?released, force = req.force, "released by hand");
                Ok(ReconcileResult { released })
            }
            Outcome::Added(_) => Ok(ReconcileResult::default()),
        }
    }

    pub fn pools(&self) -> PoolList {
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
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
        }
    }

    /// Whether the writer can write: what `/readyz` reports.
    pub fn ready(&self) -> bool {
        self.writer.healthy()
    }

    /// Puts new pool definitions in force between two writer batches. Every allocation is
    /// kept: one outside every new pool stays (an orphan, logged) until it is released.
    /// Overlapping pools are refused and the pools in force stay.
    pub fn replace_pools(
        &self,
        pools: Vec<tether_core::pool::Pool>,
    ) -> Result<super::pools::PoolDiff, tether_core::pool::PoolError> {
        let mut ipam = self.ipam.write().unwrap_or_else(PoisonError::into_inner);
        let diff = super::pools::PoolDiff::between(&ipam.pools().collect::<Vec<_>>(), &pools);
        if !diff.is_empty() {
            ipam.set_pools(pools)?;
            for name in &diff.removed {
                let l = PoolLabels { pool: name.clone() };
                self.metrics.pool_total.remove(&l);
                self.metrics.pool_allocated.remove(&l);
            }
            super::pools::warn_orphans(&ipam);
        }
        Ok(diff)
    }

    pub fn allocations(&self) -> Vec<tether_core::alloc::Allocation> {
        let ipam = self.ipam.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = ipam.allocations().cloned().collect();
        v.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
        v
    }

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
