//! Kubernetes mode's workload source: watch caches of this node's pods and of the objects the
//! policies look at (Namespaces, StatefulSets, ReplicaSets, Deployments, and KubeVirt's
//! VirtualMachines, VirtualMachineInstances and VirtualMachineInstanceMigrations once their
//! CRDs exist), answering the engine's [`WorkloadView`].
//!
//! # What is kept
//!
//! Only what the policy contract carries: an object's identity, labels, annotations, owner
//! references, `spec.replicas` and whether it is being deleted; a pod's node. Each event is
//! converted as it arrives and the API's object dropped, so memory grows with the number of
//! objects, not their size.
//!
//! # What counts as gone
//!
//! The engine asks two questions whose wrong answer costs an address: is this pod gone (so
//! another pod of its identity may take its address over), and has this release rule fired
//! (so a pinned address is freed). A cache can lag the API server by a moment, and this
//! node's pod cache does not hold the pods of other nodes (a migration's source, a VM's
//! launcher pod recreated elsewhere). So the caches answer only "it is there"; "it is gone"
//! and "it was scaled down" are confirmed by a read from the API server (`404`, or another
//! UID), and anything the API server cannot answer is unknown, never gone. Until every
//! cache has listed once, the source is not synced and an ADD is answered "try again later".
//!
//! The engine calls the view from blocking threads (the writer thread, `spawn_blocking`);
//! API reads run on the runtime handle the source was started with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::ListParams;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::discovery::{ApiCapabilities, Scope};
use kube::error::DiscoveryError;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tether_core::alloc::Liveness;
use tether_core::manifest::{api_group, object_from_value, workload_from_pod};
use tether_core::workload::Pairs;
use tether_core::{Object, ObjectKey, OwnerReference, ReleaseCondition, Workload};
use tether_engine::ports::{
    ClaimInfo, ClaimLookup, NodeState, PodMeta, WorkloadSource, WorkloadView,
};
use tokio::runtime::Handle;

use crate::health::ApiHealth;

/// How long one confirming read may take before the answer is "unknown".
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the KubeVirt CRDs are looked for while they are missing.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(15);
/// Owner chains deeper than this are cut (a loop of owner references).
const MAX_OWNER_DEPTH: usize = 8;
/// The annotation of a static pod's mirror pod: the static pod's UID (the one the kubelet
/// gives the runtime, and the plugin records).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Pods per page when garbage collection lists every pod.
const PAGE: u32 = 500;

/// What a watch feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Feeds {
    /// This node's pods.
    Pods,
    /// Namespaces' annotations.
    Namespaces,
    /// Owner objects.
    Owners,
}

/// One watched resource.
#[derive(Clone)]
struct Watched {
    resource: ApiResource,
    feeds: Feeds,
}

impl Watched {
    fn label(&self) -> String {
        format!("{}/{}", self.resource.api_version, self.resource.kind)
    }
}

/// The built-in kinds: always watched.
fn builtin_kinds() -> Vec<Watched> {
    let r = |group: &str, version: &str, kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    };
    vec![
        Watched {
            resource: r("", "v1", "Pod", "pods"),
            feeds: Feeds::Pods,
        },
        Watched {
            resource: r("", "v1", "Namespace", "namespaces"),
            feeds: Feeds::Namespaces,
        },
        Watched {
            resource: r("apps", "v1", "StatefulSet", "statefulsets"),
            feeds: Feeds::Owners,
        },
        Watched {
            resource: r("apps", "v1", "ReplicaSet", "replicasets"),
            feeds: Feeds::Owners,
        },
        Watched {
            resource: r("apps", "v1", "Deployment", "deployments"),
            feeds: Feeds::Owners,
        },
    ]
}

/// KubeVirt's kinds, watched once their CRDs are served.
const KUBEVIRT_GROUP_VERSION: &str = "kubevirt.io/v1";
const KUBEVIRT_KINDS: [&str; 3] = [
    "VirtualMachine",
    "VirtualMachineInstance",
    "VirtualMachineInstanceMigration",
];

/// A resource found by discovery, and whether it is namespaced.
type Resolved = Option<(ApiResource, bool)>;

/// Objects of one kind by (namespace, name).
type Objects = HashMap<(String, String), Object>;

#[derive(Default)]
struct State {
    /// This node's pods by (namespace, name).
    pods: HashMap<(String, String), Workload>,
    /// Owner objects by (group, kind).
    owners: HashMap<(String, String), Objects>,
    /// Namespaces' labels and annotations by name.
    namespaces: HashMap<String, NsMeta>,
    /// Each watched resource, and whether it has listed once.
    listed: HashMap<String, bool>,
    /// Whether the KubeVirt CRDs have been looked for once.
    discovered: bool,
}

struct Shared {
    metrics: Option<Arc<tether_engine::Metrics>>,
    client: Client,
    rt: Handle,
    node: String,
    state: RwLock<State>,
    /// Resources resolved by discovery, by (apiVersion, kind): only kinds found served.
    resolved: Mutex<HashMap<(String, String), Resolved>>,
    /// The API server's health: not synced while it is down (see [`crate::health`]).
    health: ApiHealth,
    /// Owner kinds no policy reads that the API server refused to let this daemon read, by
    /// (group, kind), and when: for [`FORBIDDEN_MEMO`] their references stand for themselves
    /// without asking again (a node running CronJobs would make one refused read per ADD).
    forbidden: Mutex<HashMap<(String, String), std::time::Instant>>,
}

/// How long a refusal to read an owner kind is remembered: a grant added meanwhile (a chart
/// upgrade) is used after at most this long.
const FORBIDDEN_MEMO: Duration = Duration::from_secs(300);

/// Workloads from the API server (see the module documentation).
#[derive(Clone)]
pub struct KubeWorkloads {
    shared: Arc<Shared>,
}

impl KubeWorkloads {
    /// Starts the watches of node `node` on `rt`. The source is synced once every watch has
    /// listed and the KubeVirt CRDs have been looked for.
    pub fn start(client: Client, rt: Handle, node: &str) -> KubeWorkloads {
        Self::start_with_metrics(client, rt, node, None)
    }

    /// [`KubeWorkloads::start`], keeping `metrics` up to date: objects per cache, whether each
    /// has listed, and the API reads made to confirm what a cache does not show.
    pub fn start_with_metrics(
        client: Client,
        rt: Handle,
        node: &str,
        metrics: Option<Arc<tether_engine::Metrics>>,
    ) -> KubeWorkloads {
        let shared = Arc::new(Shared {
            metrics,
            client: client.clone(),
            rt: rt.clone(),
            node: node.to_owned(),
            state: RwLock::default(),
            resolved: Mutex::default(),
            health: ApiHealth::new(client.clone(), rt.clone()),
            forbidden: Mutex::default(),
        });
        for w in builtin_kinds() {
            spawn_watch(&shared, w);
        }
        rt.spawn(discover_kubevirt(shared.clone()));
        KubeWorkloads { shared }
    }

    /// The API server's health this source judges by, to share with the store.
    pub fn health(&self) -> ApiHealth {
        self.shared.health.clone()
    }
}

impl Shared {
    /// Updates the cache gauges of `w`'s resource.
    fn gauge(&self, w: &Watched) {
        let Some(m) = &self.metrics else { return };
        let (count, listed) = {
            let s = self.read();
            let count = match w.feeds {
                Feeds::Pods => s.pods.len(),
                Feeds::Namespaces => s.namespaces.len(),
                Feeds::Owners => s.owners.get(&kind_key(w)).map_or(0, HashMap::len),
            };
            (count, s.listed.get(&w.label()).copied().unwrap_or(false))
        };
        let labels = tether_engine::metrics::ResourceLabels {
            resource: w.label(),
        };
        m.kube_cache_objects
            .get_or_create(&labels)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        m.kube_cache_synced
            .get_or_create(&labels)
            .set(i64::from(listed));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one API call by its outcome (`None`: timed out).
    fn count<T>(&self, verb: &str, got: Option<Result<Option<T>, &kube::Error>>) {
        if let Some(m) = &self.metrics {
            let result = match got {
                None | Some(Err(_)) => "error",
                Some(Ok(None)) => "not_found",
                Some(Ok(Some(_))) => "ok",
            };
            m.kube_api_call(verb, result);
        }
    }

    /// Runs an API read on the runtime, bounded by [`READ_TIMEOUT`]; `None` on timeout.
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        self.rt
            .block_on(async { tokio::time::timeout(READ_TIMEOUT, f).await.ok() })
    }

    /// The resource of `api_version`/`kind`, from discovery (cached); `None` when the API
    /// server does not serve it, `Err` when it cannot tell.
    fn resource(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Result<Option<(ApiResource, bool)>, String> {
        let key = (api_version.to_owned(), kind.to_owned());
        if let Some(r) = self
            .resolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(r.clone());
        }
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let found = match self.block_on(kube::discovery::pinned_kind(&self.client, &gvk)) {
            None => return Err(format!("discovery of {api_version} {kind}: timed out")),
            Some(Ok((ar, caps))) => Some((ar, is_namespaced(&caps))),
            // The group or the kind is not served: no such object can exist.
            Some(Err(kube::Error::Api(s))) if s.code == 404 => None,
            Some(Err(kube::Error::Discovery(
                DiscoveryError::MissingKind(_)
                | DiscoveryError::MissingResource(_)
                | DiscoveryError::MissingApiGroup(_),
            ))) => None,
            Some(Err(e)) => return Err(format!("discovery of {api_version} {kind}: {e}")),
        };
        // Only what is served is remembered: a kind missing now may be served later (its
        // CRD installed or reinstalled).
        if found.is_some() {
            self.resolved
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, found.clone());
        }
        Ok(found)
    }

    /// Reads one object from the API server: `Ok(None)` when it does not exist (or its kind
    /// is not served), `Err` when the API server cannot tell.
    fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, String> {
        self.fetch(api_version, kind, namespace, name)
            .map_err(|e| e.message)
    }

    /// [`Shared::get`], telling a read this daemon is not allowed to make apart.
    fn fetch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, ReadError> {
        let Some((ar, namespaced)) = self.resource(api_version, kind).map_err(ReadError::other)?
        else {
            return Ok(None);
        };
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(self.client.clone(), namespace, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        };
        if let Err(why) = self.health.check() {
            return Err(ReadError::other(format!(
                "reading {kind} {namespace}/{name}: {why}"
            )));
        }
        let got = self.block_on(api.get_opt(name));
        match &got {
            None => self.health.down(
                &format!("reading {kind}"),
                &format!("no answer within {}s", READ_TIMEOUT.as_secs()),
            ),
            Some(Err(e)) => self.health.failed(&format!("reading {kind}"), e),
            Some(Ok(_)) => {}
        }
        if let Some(m) = &self.metrics {
            let result = match &got {
                Some(Err(kube::Error::Api(s))) if s.code == 403 => "forbidden",
                None | Some(Err(_)) => "error",
                Some(Ok(None)) => "not_found",
                Some(Ok(Some(_))) => "ok",
            };
            m.kube_api_call("get", result);
        }
        match got {
            None => Err(ReadError::other(format!(
                "reading {kind} {namespace}/{name}: timed out"
            ))),
            Some(Err(e)) => Err(ReadError {
                forbidden: matches!(&e, kube::Error::Api(s) if s.code == 403),
                message: format!("reading {kind} {namespace}/{name}: {e}"),
            }),
            Some(Ok(None)) => Ok(None),
            Some(Ok(Some(o))) => Ok(Some(to_value(&ar, &o))),
        }
    }

    /// An owner object: from the cache, else (not there, or there with another UID: the
    /// cache may lag a recreation) from the API server. `Ok(None)` when no such owner exists:
    /// an object whose UID is not the reference's (a stale reference to a recreated owner)
    /// is not that owner. `Err` when the API server cannot tell.
    fn owner(&self, namespace: &str, r: &OwnerReference) -> Result<Option<Object>, String> {
        let same = |o: &Object| r.uid.is_empty() || o.uid.is_empty() || r.uid == o.uid;
        let cached = self
            .read()
            .owners
            .get(&(api_group(&r.api_version).to_owned(), r.kind.clone()))
            .and_then(|m| m.get(&(namespace.to_owned(), r.name.clone())))
            .cloned();
        if let Some(o) = cached.filter(same) {
            return Ok(Some(o));
        }
        // The chain ends with the reference itself (see below).
        let as_referenced = || Object {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: namespace.to_owned(),
            name: r.name.clone(),
            uid: r.uid.clone(),
            ..Object::default()
        };
        let kind = (api_group(&r.api_version).to_owned(), r.kind.clone());
        let refused_lately = self
            .forbidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&kind)
            .is_some_and(|at| at.elapsed() < FORBIDDEN_MEMO);
        if refused_lately {
            return Ok(Some(as_referenced()));
        }
        let o = match self.fetch(&r.api_version, &r.kind, namespace, &r.name) {
            Ok(Some(v)) => object_from_value(&v)
                .map_err(|e| format!("owner {} {namespace}/{}: {e}", r.kind, r.name))?,
            Ok(None) => return Ok(None),
            // A kind this daemon may not read, and does not watch (its RBAC grants the kinds
            // the policies use: a Job or a DaemonSet is not one): the reference itself names
            // the owner, and the chain ends there. Nothing is judged gone for it. A refusal
            // for a kind the policies use fails closed below: its labels and its own owner
            // decide pins and release rules.
            Err(e) if e.forbidden && !is_policy_kind(&r.api_version, &r.kind) => {
                tracing::debug!(owner = %format!("{} {namespace}/{}", r.kind, r.name), memo = ?FORBIDDEN_MEMO, "owner kind not readable (RBAC): the chain ends with the reference, and this kind is not asked for again for a while: {}", e.message);
                self.forbidden
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(kind, std::time::Instant::now());
                return Ok(Some(as_referenced()));
            }
            Err(e) => {
                tracing::warn!(owner = %format!("{} {namespace}/{}", r.kind, r.name), "owner not in the caches and not readable: {}", e.message);
                return Err(e.message);
            }
        };
        Ok(same(&o).then_some(o))
    }
}

/// Whether the policies read objects of this kind (the kinds this daemon watches): a refusal
/// to read one is an error, never a reason to go on without it.
fn is_policy_kind(api_version: &str, kind: &str) -> bool {
    let group = api_group(api_version);
    builtin_kinds()
        .iter()
        .any(|w| w.resource.group == group && w.resource.kind == kind)
        || (group == api_group(KUBEVIRT_GROUP_VERSION) && KUBEVIRT_KINDS.contains(&kind))
}

/// A read the API server did not answer with the object or its absence.
struct ReadError {
    /// 403: this daemon's RBAC does not allow it.
    forbidden: bool,
    message: String,
}

impl ReadError {
    fn other(message: impl Into<String>) -> Self {
        Self {
            forbidden: false,
            message: message.into(),
        }
    }
}

fn is_namespaced(caps: &ApiCapabilities) -> bool {
    matches!(caps.scope, Scope::Namespaced)
}

/// An object as the manifest readers take it: list items come without apiVersion and kind.
fn to_value(ar: &ApiResource, o: &DynamicObject) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(ar.api_version.clone()));
        m.insert("kind".into(), Value::String(ar.kind.clone()));
    }
    v
}

/// One converted object of a watch.
enum Entry {
    Pod(Workload),
    Namespace(String, NsMeta),
    Owner(Object),
}

/// What is kept of a Namespace.
#[derive(Clone, Debug, Default)]
struct NsMeta {
    labels: Pairs,
    annotations: Pairs,
}

impl NsMeta {
    fn of(o: Object) -> NsMeta {
        NsMeta {
            labels: o.labels,
            annotations: o.annotations,
        }
    }
}

fn convert(w: &Watched, o: &DynamicObject) -> Result<Entry, String> {
    let v = to_value(&w.resource, o);
    match w.feeds {
        Feeds::Pods => workload_from_pod(&v)
            .map(Entry::Pod)
            .map_err(|e| e.to_string()),
        Feeds::Namespaces => {
            let o = object_from_value(&v).map_err(|e| e.to_string())?;
            Ok(Entry::Namespace(o.name.clone(), NsMeta::of(o)))
        }
        Feeds::Owners => object_from_value(&v)
            .map(Entry::Owner)
            .map_err(|e| e.to_string()),
    }
}

/// What one watch has seen since its last (re-)list began.
#[derive(Default)]
struct Listing {
    pods: HashMap<(String, String), Workload>,
    namespaces: HashMap<String, NsMeta>,
    owners: Objects,
}

impl State {
    fn apply(&mut self, w: &Watched, e: Entry) {
        match e {
            Entry::Pod(p) => {
                self.pods.insert((p.namespace.clone(), p.name.clone()), p);
            }
            Entry::Namespace(n, a) => {
                self.namespaces.insert(n, a);
            }
            Entry::Owner(o) => {
                self.owners
                    .entry(kind_key(w))
                    .or_default()
                    .insert((o.namespace.clone(), o.name.clone()), o);
            }
        }
    }

    fn delete(&mut self, w: &Watched, o: &DynamicObject) {
        let ns = o.metadata.namespace.clone().unwrap_or_default();
        let name = o.metadata.name.clone().unwrap_or_default();
        match w.feeds {
            Feeds::Pods => {
                self.pods.remove(&(ns, name));
            }
            Feeds::Namespaces => {
                self.namespaces.remove(&name);
            }
            Feeds::Owners => {
                if let Some(m) = self.owners.get_mut(&kind_key(w)) {
                    m.remove(&(ns, name));
                }
            }
        }
    }

    /// A (re-)list finished: its objects replace the resource's (what was deleted in a gap of
    /// the watch leaves).
    fn replace(&mut self, w: &Watched, l: Listing) {
        match w.feeds {
            Feeds::Pods => self.pods = l.pods,
            Feeds::Namespaces => self.namespaces = l.namespaces,
            Feeds::Owners => {
                self.owners.insert(kind_key(w), l.owners);
            }
        }
        self.listed.insert(w.label(), true);
    }
}

fn kind_key(w: &Watched) -> (String, String) {
    (w.resource.group.clone(), w.resource.kind.clone())
}

fn spawn_watch(shared: &Arc<Shared>, w: Watched) {
    {
        let mut s = shared.write();
        if s.listed.contains_key(&w.label()) {
            return;
        }
        s.listed.insert(w.label(), false);
    }
    shared.rt.spawn(watch(shared.clone(), w));
}

/// Keeps one resource's cache (re-listing after a gap, with kube's backoff).
async fn watch(shared: Arc<Shared>, w: Watched) {
    let api: Api<DynamicObject> = Api::all_with(shared.client.clone(), &w.resource);
    let mut config = watcher::Config::default();
    if w.feeds == Feeds::Pods {
        config = config.fields(&format!("spec.nodeName={}", shared.node));
    }
    let label = w.label();
    let mut stream = watcher::watcher(api, config).boxed();
    let mut retry = crate::health::RetryDelay::default();
    let mut listing: Option<Listing> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => {
                retry.reset();
                e
            }
            Err(e) if crate::health::is_expired(&e) => {
                // Resumed from a resourceVersion the API server no longer has: the watcher
                // re-lists, and the list replaces the cache (what was deleted in the gap
                // leaves it).
                tracing::info!(resource = %label, error = %e, "watch expired (410 Gone); re-listing");
                continue;
            }
            Err(e) => {
                shared.health.watch_failed(&label, &e);
                let wait = retry.next_delay();
                tracing::warn!(resource = %label, retry_in_ms = wait.as_millis() as u64, "watch failed; retrying: {e}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        match event {
            Event::Init => listing = Some(Listing::default()),
            Event::InitApply(o) => match (convert(&w, &o), listing.as_mut()) {
                (Ok(Entry::Pod(p)), Some(l)) => {
                    l.pods.insert((p.namespace.clone(), p.name.clone()), p);
                }
                (Ok(Entry::Namespace(n, a)), Some(l)) => {
                    l.namespaces.insert(n, a);
                }
                (Ok(Entry::Owner(o)), Some(l)) => {
                    l.owners.insert((o.namespace.clone(), o.name.clone()), o);
                }
                (Ok(_), None) => {}
                (Err(e), _) => {
                    tracing::warn!(resource = %label, "object unreadable, left out: {e}")
                }
            },
            Event::InitDone => {
                let l = listing.take().unwrap_or_default();
                let count = l.pods.len() + l.namespaces.len() + l.owners.len();
                shared.write().replace(&w, l);
                tracing::info!(resource = %label, objects = count, "listed");
            }
            Event::Apply(o) => match convert(&w, &o) {
                Ok(e) => shared.write().apply(&w, e),
                Err(e) => tracing::warn!(resource = %label, "object unreadable, left out: {e}"),
            },
            Event::Delete(o) => shared.write().delete(&w, &o),
        }
        shared.gauge(&w);
    }
}

/// Watches KubeVirt's kinds once the API server serves them (looked for every
/// [`DISCOVERY_INTERVAL`] until they are).
async fn discover_kubevirt(shared: Arc<Shared>) {
    loop {
        match shared
            .client
            .list_api_group_resources(KUBEVIRT_GROUP_VERSION)
            .await
        {
            Ok(list) => {
                let mut all = true;
                for kind in KUBEVIRT_KINDS {
                    match list
                        .resources
                        .iter()
                        .find(|r| r.kind == kind && !r.name.contains('/'))
                    {
                        Some(r) => spawn_watch(
                            &shared,
                            Watched {
                                resource: ApiResource::from_gvk_with_plural(
                                    &GroupVersionKind::gvk("kubevirt.io", "v1", kind),
                                    &r.name,
                                ),
                                feeds: Feeds::Owners,
                            },
                        ),
                        None => all = false,
                    }
                }
                shared.write().discovered = true;
                if all {
                    return;
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                shared.write().discovered = true;
            }
            Err(e) => {
                // Not known either way: not synced until it can be told.
                tracing::warn!("looking for the KubeVirt API ({KUBEVIRT_GROUP_VERSION}): {e}");
            }
        }
        tokio::time::sleep(DISCOVERY_INTERVAL).await;
    }
}

impl WorkloadSource for KubeWorkloads {
    fn synced(&self) -> bool {
        let s = self.shared.read();
        s.discovered && s.listed.values().all(|done| *done)
    }

    fn view(&self) -> Arc<dyn WorkloadView> {
        Arc::new(self.clone())
    }

    fn reachable(&self) -> Result<(), String> {
        let got = self.shared.block_on(self.shared.client.apiserver_version());
        self.shared
            .count("version", got.as_ref().map(|r| r.as_ref().map(Some)));
        match got {
            None => Err(format!(
                "the API server did not answer within {}s",
                READ_TIMEOUT.as_secs()
            )),
            Some(Err(e)) => Err(format!("the API server is unreachable: {e}")),
            Some(Ok(_)) => Ok(()),
        }
    }
}

impl KubeWorkloads {
    /// A namespace, from the cache or else from the API server (`Ok(None)`: there is none;
    /// `Err`: it could not be read).
    fn namespace(&self, name: &str) -> Result<Option<NsMeta>, String> {
        if let Some(n) = self.shared.read().namespaces.get(name).cloned() {
            return Ok(Some(n));
        }
        match self.shared.get("v1", "Namespace", "", name)? {
            Some(v) => object_from_value(&v)
                .map(|o| Some(NsMeta::of(o)))
                .map_err(|e| format!("namespace {name}: {e}")),
            None => Ok(None),
        }
    }
}

impl WorkloadView for KubeWorkloads {
    /// While the API server is down (see [`crate::health`]) no pod is known: its cache may
    /// miss what changed meanwhile, and no claim could be written anyway. The ADD is then
    /// answered "try again later" (code 11) at once, before anything is planned.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Workload>, String> {
        self.shared.health.check()?;
        let cached = self
            .shared
            .read()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned();
        if cached.is_some() {
            return Ok(cached);
        }
        // An ADD may come a moment before the watch brings its pod.
        match self.shared.get("v1", "Pod", namespace, name) {
            Ok(Some(v)) => workload_from_pod(&v)
                .map(Some)
                .map_err(|e| format!("pod {namespace}/{name}: {e}")),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), "pod not in the cache and not readable: {e}");
                Err(e)
            }
        }
    }

    fn owner_chain(
        &self,
        namespace: &str,
        owners: &[OwnerReference],
    ) -> Result<Vec<Object>, String> {
        let mut chain: Vec<Object> = Vec::new();
        let mut next = owners.iter().find(|r| r.controller).cloned();
        while let Some(r) = next {
            if chain.len() >= MAX_OWNER_DEPTH {
                break;
            }
            let Some(o) = self.shared.owner(namespace, &r)? else {
                break;
            };
            if chain.iter().any(|c| c.kind == o.kind && c.name == o.name) {
                break;
            }
            next = o.controller().cloned();
            chain.push(o);
        }
        Ok(chain)
    }

    fn namespace_annotations(&self, namespace: &str) -> Result<Vec<(String, String)>, String> {
        Ok(self
            .namespace(namespace)?
            .map(|n| n.annotations)
            .unwrap_or_default())
    }

    fn namespace_labels(&self, namespace: &str) -> Result<Option<Vec<(String, String)>>, String> {
        Ok(self.namespace(namespace)?.map(|n| n.labels))
    }

    fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        let same = |other: &str| uid.is_empty() || other.is_empty() || uid == other;
        if let Some(p) = self
            .shared
            .read()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            && same(&p.uid)
        {
            return Liveness::Live;
        }
        // Not here (another node's pod, or a cache a moment behind): the API server decides.
        match self.shared.get("v1", "Pod", namespace, name) {
            Ok(None) => Liveness::Gone,
            Ok(Some(v)) => {
                let other = v
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if same(other) {
                    Liveness::Live
                } else {
                    Liveness::Gone
                }
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), "pod liveness unknown: {e}");
                Liveness::Unknown
            }
        }
    }

    fn all_pods(&self) -> Result<Option<HashMap<(String, String), PodMeta>>, String> {
        let api: Api<Pod> = Api::all(self.shared.client.clone());
        let mut out = HashMap::new();
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let got = self.shared.block_on(api.list_metadata(&params));
            self.shared
                .count("list", got.as_ref().map(|r| r.as_ref().map(Some)));
            let page = match got {
                None => return Err("listing pods: timed out".into()),
                Some(Err(e)) => return Err(format!("listing pods: {e}")),
                Some(Ok(page)) => page,
            };
            for p in page.items {
                let m = p.metadata;
                out.insert(
                    (m.namespace.unwrap_or_default(), m.name.unwrap_or_default()),
                    PodMeta {
                        uid: m.uid.unwrap_or_default(),
                        terminating: m.deletion_timestamp.is_some(),
                        mirror_of: m
                            .annotations
                            .and_then(|mut a| a.remove(MIRROR_ANNOTATION))
                            .unwrap_or_default(),
                    },
                );
            }
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => params = params.continue_token(&c),
                _ => break,
            }
        }
        Ok(Some(out))
    }

    fn read_pod(&self, namespace: &str, name: &str) -> Result<Option<PodMeta>, String> {
        Ok(self
            .shared
            .get("v1", "Pod", namespace, name)?
            .map(|v| PodMeta {
                uid: v
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                terminating: v
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|t| !t.is_null()),
                mirror_of: v
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(MIRROR_ANNOTATION))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            }))
    }

    fn ipam_claim(&self, namespace: &str, name: &str) -> Result<ClaimLookup, String> {
        let api_version = tether_engine::engine::IPAMCLAIM_API_VERSION;
        if self.shared.resource(api_version, "IPAMClaim")?.is_none() {
            return Ok(ClaimLookup::NotServed);
        }
        let Some(v) = self.shared.get(api_version, "IPAMClaim", namespace, name)? else {
            return Ok(ClaimLookup::Missing);
        };
        // A controller that cannot be read is not "no controller": the claim stays unusable.
        let owner = v
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .and_then(|refs| {
                refs.iter()
                    .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
            })
            .map(|r| serde_json::from_value::<OwnerReference>(r.clone()))
            .transpose()
            .map_err(|e| format!("IPAMClaim {namespace}/{name}: its controller reference: {e}"))?;
        Ok(ClaimLookup::Found(ClaimInfo {
            owner,
            network: v
                .pointer("/spec/network")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            ips: v
                .pointer("/status/ips")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    fn node_state(&self, node: &str) -> NodeState {
        let v = match self.shared.get("v1", "Node", "", node) {
            Ok(Some(v)) => v,
            Ok(None) => return NodeState::Gone,
            Err(e) => {
                tracing::warn!(node = %node, "node state unknown: {e}");
                return NodeState::Unknown;
            }
        };
        node_state_of(&v, k8s_openapi::jiff::Timestamp::now())
    }

    fn fires(&self, condition: &ReleaseCondition) -> bool {
        let owner = match condition {
            ReleaseCondition::OwnerDeleted(k) | ReleaseCondition::ScaledBelow { owner: k, .. } => k,
            ReleaseCondition::Never | ReleaseCondition::IdleForSeconds(_) => return false,
        };
        // The cache says "still there, not scaled below": it is not fired. Anything else is
        // confirmed by the API server.
        let cached = self
            .shared
            .read()
            .owners
            .get(&(api_group(&owner.api_version).to_owned(), owner.kind.clone()))
            .and_then(|m| m.get(&(owner.namespace.clone(), owner.name.clone())))
            .cloned();
        if let Some(o) = &cached
            && !holds(condition, Some(o))
        {
            return false;
        }
        match self.read_owner(owner) {
            Ok(o) => holds(condition, o.as_ref()),
            Err(e) => {
                tracing::warn!(owner = %format!("{} {}/{}", owner.kind, owner.namespace, owner.name), "release rule not judged: {e}");
                false
            }
        }
    }
}

impl KubeWorkloads {
    /// The owner a release rule names, read from the API server. A kind the API server does
    /// not serve (now) is not "deleted": its CRD may be on its way back (a reinstall), and
    /// every address pinned to an object of it would go. That is unknown.
    fn read_owner(&self, k: &ObjectKey) -> Result<Option<Object>, String> {
        if self.shared.resource(&k.api_version, &k.kind)?.is_none() {
            return Err(format!(
                "the API server does not serve {} {} now",
                k.api_version, k.kind
            ));
        }
        match self
            .shared
            .get(&k.api_version, &k.kind, &k.namespace, &k.name)?
        {
            None => Ok(None),
            Some(v) => object_from_value(&v).map(Some).map_err(|e| e.to_string()),
        }
    }
}

/// A Node's readiness from its Ready condition: not ready since the condition's last
/// transition when it is False or Unknown; unknown without one.
fn node_state_of(node: &Value, now: k8s_openapi::jiff::Timestamp) -> NodeState {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        });
    let Some(ready) = ready else {
        return NodeState::Unknown;
    };
    if ready.get("status").and_then(Value::as_str) == Some("True") {
        return NodeState::Ready;
    }
    let since = ready
        .get("lastTransitionTime")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
    match since {
        Some(t) => NodeState::NotReadyFor(
            u64::try_from(now.as_second().saturating_sub(t.as_second())).unwrap_or(0),
        ),
        // Not ready, since when unknown: not long enough to be judged lost.
        None => NodeState::NotReadyFor(0),
    }
}

/// Whether `condition` holds given the owner as it is (`None`: it does not exist).
fn holds(condition: &ReleaseCondition, owner: Option<&Object>) -> bool {
    match condition {
        ReleaseCondition::OwnerDeleted(_) => owner.is_none(),
        ReleaseCondition::ScaledBelow { ordinal, .. } => {
            owner.is_none_or(|o| o.replicas.is_some_and(|r| r <= *ordinal))
        }
        ReleaseCondition::Never | ReleaseCondition::IdleForSeconds(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only owners of kinds no policy reads may stand in for themselves when the daemon may
    /// not read them; a refused VM, VMI or StatefulSet fails the ADD (code 11).
    #[test]
    fn only_kinds_no_policy_reads_may_be_refused_and_passed_over() {
        for (v, k) in [
            ("kubevirt.io/v1", "VirtualMachineInstance"),
            ("kubevirt.io/v1", "VirtualMachine"),
            ("kubevirt.io/v1", "VirtualMachineInstanceMigration"),
            ("apps/v1", "StatefulSet"),
            ("apps/v1", "ReplicaSet"),
            ("apps/v1", "Deployment"),
        ] {
            assert!(is_policy_kind(v, k), "{v} {k}");
        }
        for (v, k) in [
            ("batch/v1", "Job"),
            ("apps/v1", "DaemonSet"),
            ("example.com/v1", "VirtualMachine"),
            ("v1", "StatefulSet"),
        ] {
            assert!(!is_policy_kind(v, k), "{v} {k}");
        }
    }

    #[test]
    fn a_node_is_not_ready_since_its_ready_condition_changed() {
        let now: k8s_openapi::jiff::Timestamp = "2026-12-01T12:10:00Z".parse().expect("time");
        let node = |status: &str| {
            serde_json::json!({"status": {"conditions": [
                {"type": "MemoryPressure", "status": "False", "lastTransitionTime": "2026-12-01T10:00:00Z"},
                {"type": "Ready", "status": status, "lastTransitionTime": "2026-12-01T12:00:00Z"},
            ]}})
        };
        assert_eq!(node_state_of(&node("True"), now), NodeState::Ready);
        assert_eq!(
            node_state_of(&node("False"), now),
            NodeState::NotReadyFor(600)
        );
        assert_eq!(
            node_state_of(&node("Unknown"), now),
            NodeState::NotReadyFor(600)
        );
        assert_eq!(
            node_state_of(&serde_json::json!({"status": {}}), now),
            NodeState::Unknown
        );
    }
}
