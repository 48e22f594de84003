//! Kubernetes mode's adapters, wired: the store of IPAllocation objects, workloads from watch
//! caches, and pools from IPPool objects, watched.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tether_core::pool::{Pool, check_disjoint, from_manifest};
use tether_engine::Engine;
use tether_kube::crd::{IPPool, IPPoolStatus};
use tether_kube::store::KubeStore;
use tether_kube::workloads::KubeWorkloads;

/// How long the pools may keep changing before they are put in force.
const POOL_DEBOUNCE: Duration = Duration::from_millis(200);

/// What `tetherd run --kubernetes` runs on.
pub struct KubeMode {
    pub client: kube::Client,
    pub store: KubeStore,
    pub workloads: KubeWorkloads,
    pub pools: Vec<Pool>,
    /// What became of each IPPool, for the status writer.
    pub verdicts: Arc<Mutex<Verdicts>>,
    /// The runtime the client's connections, the store's calls and the workload watches run
    /// on (see [`connect`]).
    pub runtime: tokio::runtime::Runtime,
}

/// Connects (in-cluster config, or KUBECONFIG, as kube infers it), starts the workload
/// watches of `node`, and reads the pools.
pub async fn connect(
    node: &str,
    kubeconfig: Option<&Path>,
    metrics: Arc<tether_engine::Metrics>,
) -> anyhow::Result<KubeMode> {
    // kube's TLS is rustls; the process picks its crypto provider once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    // The store and the workload view are synchronous and block on API calls from the
    // engine's writer thread, which holds the state's lock meanwhile; the daemon's own async
    // workers may be waiting for that lock. API traffic therefore runs on a runtime of its
    // own, whose workers never wait for the engine, or a commit could wait forever for a
    // response no free worker is left to read.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tetherd-kube")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the Kubernetes API runtime: {e}"))?;
    //
    // Two clients, so two connection pools: a connection is driven by the runtime it was
    // opened on, and one opened by a task of the daemon's runtime (the pool watch, the
    // election, the status writer) and then reused by the writer's commit would wait for
    // workers that may be waiting for the writer. The store and the workload watches use
    // `engine_client`, whose connections are all opened on the API runtime; the daemon's own
    // tasks use `client`.
    let clients = async {
        let engine_client = {
            let _on = runtime.enter();
            kube::Client::try_from(config.clone())
                .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?
        };
        let client = kube::Client::try_from(config)
            .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
        let api: Api<IPPool> = Api::all(client.clone());
        let list = api.list(&Default::default()).await.map_err(|e| {
            anyhow::anyhow!(
                "listing IPPools (are the CRDs installed? `tetherd crd | kubectl apply -f -`): {e}"
            )
        })?;
        anyhow::Ok((engine_client, client, list))
    };
    let (engine_client, client, list) = match clients.await {
        Ok(c) => c,
        Err(e) => {
            // Dropping a runtime inside this one panics: the error would be lost in it.
            runtime.shutdown_background();
            return Err(e);
        }
    };
    let (pools, verdicts) = serving(&list.items);
    let workloads = KubeWorkloads::start_with_metrics(
        engine_client.clone(),
        runtime.handle().clone(),
        node,
        Some(metrics.clone()),
    );
    Ok(KubeMode {
        verdicts: Arc::new(Mutex::new(verdicts)),
        // One view of the API server's health: a failure either sees makes ADDs answer "try
        // again later" at once, and store calls fail at once, until a probe gets an answer.
        store: KubeStore::new(engine_client, runtime.handle().clone())
            .with_metrics(metrics)
            .with_health(workloads.health()),
        workloads,
        client,
        pools,
        runtime,
    })
}

/// Why an IPPool serves nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `Invalid` or `Overlaps` (the Ready condition's reason).
    pub reason: &'static str,
    pub message: String,
}

/// What became of each IPPool object at the last evaluation, by name.
pub type Verdicts = BTreeMap<String, Option<Refusal>>;

/// The pools that serve: every valid IPPool that shares no address with an older one. An
/// invalid pool, or one overlapping an older pool (by creation time, then name), serves
/// nothing (logged, and reported in its status by the elected daemon); the others are
/// unaffected, so a pool created by mistake over a serving one never takes it down.
pub fn serving(objects: &[IPPool]) -> (Vec<Pool>, Verdicts) {
    let mut verdicts = Verdicts::new();
    let mut valid = Vec::with_capacity(objects.len());
    for o in objects {
        let name = o.metadata.name.clone().unwrap_or_default();
        let mut v = serde_json::to_value(o).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), tether_core::pool::API_VERSION.into());
            m.insert("kind".into(), tether_core::pool::KIND.into());
        }
        match from_manifest(&v) {
            Ok(p) => valid.push((o.metadata.creation_timestamp.clone().map(|t| t.0), p)),
            Err(e) => {
                tracing::error!(pool = %name, "IPPool invalid; it serves nothing: {e}");
                verdicts.insert(
                    name,
                    Some(Refusal {
                        reason: "Invalid",
                        message: e.to_string(),
                    }),
                );
            }
        }
    }
    valid.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    let mut out: Vec<Pool> = Vec::with_capacity(valid.len());
    for (_, p) in valid {
        let older: Vec<&str> = out
            .iter()
            .filter(|q| check_disjoint(&[(*q).clone(), p.clone()]).is_err())
            .map(|q| q.name.as_str())
            .collect();
        if older.is_empty() {
            verdicts.insert(p.name.clone(), None);
            out.push(p);
        } else {
            let message = format!(
                "shares addresses with {}, which is older; it serves nothing until changed",
                older.join(", ")
            );
            tracing::error!(pool = %p.name, "IPPool {message}");
            verdicts.insert(
                p.name.clone(),
                Some(Refusal {
                    reason: "Overlaps",
                    message,
                }),
            );
        }
    }
    (out, verdicts)
}

/// IPPools by name, as last listed and watched.
type Objects = BTreeMap<String, IPPool>;

/// Applies one watch event; returns whether the pools in `objects` changed.
fn apply(
    event: Result<watcher::Event<IPPool>, watcher::Error>,
    objects: &mut Objects,
    listing: &mut Option<Objects>,
) -> bool {
    let name = |o: &IPPool| o.metadata.name.clone().unwrap_or_default();
    match event {
        Ok(watcher::Event::Init) => {
            *listing = Some(Objects::new());
            false
        }
        Ok(watcher::Event::InitApply(o)) => {
            if let Some(l) = listing.as_mut() {
                l.insert(name(&o), o);
            }
            false
        }
        Ok(watcher::Event::InitDone) => {
            *objects = listing.take().unwrap_or_default();
            true
        }
        Ok(watcher::Event::Apply(o)) => {
            objects.insert(name(&o), o);
            true
        }
        Ok(watcher::Event::Delete(o)) => objects.remove(&name(&o)).is_some(),
        Err(e) if tether_kube::health::is_expired(&e) => {
            tracing::info!(resource = "IPPool", error = %e, "watch expired (410 Gone); re-listing");
            false
        }
        Err(e) => {
            tracing::warn!("IPPool watch failed; retrying: {e}");
            false
        }
    }
}

/// Puts the IPPools in force whenever they change, once they have been still for
/// [`POOL_DEBOUNCE`]. A set the engine refuses leaves the pools in force, logged and counted.
pub async fn watch_pools(
    service: Arc<Engine>,
    client: kube::Client,
    verdicts: Arc<Mutex<Verdicts>>,
) {
    let api: Api<IPPool> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut objects = Objects::new();
    let mut listing: Option<Objects> = None;
    loop {
        let Some(event) = stream.next().await else {
            return;
        };
        if !apply(event, &mut objects, &mut listing) {
            continue;
        }
        loop {
            match tokio::time::timeout(POOL_DEBOUNCE, stream.next()).await {
                Err(_) => break,
                Ok(None) => return,
                Ok(Some(event)) => {
                    apply(event, &mut objects, &mut listing);
                }
            }
        }
        if listing.is_some() {
            // Re-listing: put in force what the list ends with.
            continue;
        }
        let (pools, judged) = serving(&objects.values().cloned().collect::<Vec<_>>());
        *verdicts.lock().unwrap_or_else(PoisonError::into_inner) = judged;
        let svc = service.clone();
        match tokio::task::spawn_blocking(move || svc.replace_pools(pools)).await {
            Ok(Ok(diff)) => {
                service.set_reload_error(None);
                service.metrics.pool_reload("ok");
                if !diff.is_empty() {
                    tracing::info!(added = ?diff.added, removed = ?diff.removed, changed = ?diff.changed, "pools changed");
                }
            }
            Ok(Err(e)) => {
                service.set_reload_error(Some(e.to_string()));
                service.metrics.pool_reload("error");
                tracing::error!("pools not changed, the previous ones stay in force: {e}");
            }
            Err(e) => tracing::error!("pool change task: {e}"),
        }
    }
}

/// Keeps the engine's view of this node's labels (for pools' node selectors) in line with
/// its Node object. Until the Node is seen, and after it is deleted, the labels are unknown
/// and no pool with a node selector serves here.
pub async fn watch_node(service: Arc<Engine>, client: kube::Client, node: String) {
    use k8s_openapi::api::core::v1::Node;
    let api: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let set = |labels: Option<Vec<(String, String)>>| {
        service.set_node(tether_engine::NodeInfo {
            name: node.clone(),
            labels,
            shared: true,
        });
    };
    // Whether the current (re-)list has shown the Node.
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                listed = true;
                let labels: Vec<(String, String)> =
                    n.metadata.labels.unwrap_or_default().into_iter().collect();
                tracing::debug!(node = %node, ?labels, "node labels");
                set(Some(labels));
            }
            Ok(watcher::Event::Delete(_)) => set(None),
            Ok(watcher::Event::Init) => listed = false,
            Ok(watcher::Event::InitDone) => {
                if !listed {
                    tracing::warn!(node = %node, "no Node object of this name: pools with a nodeSelector do not serve here");
                    set(None);
                }
            }
            Err(e) => tracing::warn!(node = %node, "Node watch failed; retrying: {e}"),
        }
    }
}

/// The Lease whose holder applies release rules and writes pool status.
pub const RELEASER_LEASE: &str = "tether-releaser";
/// How often the elected daemon looks at the pools' status.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// Every this many rounds the elected daemon writes every pool's status again, whatever it
/// last wrote: another daemon (a leader that had not yet seen it lost the Lease) may have
/// written over it.
const STATUS_REASSERT_ROUNDS: u32 = 15;

/// How long before its Lease expires (by the renewal time the API server shows) a releaser
/// stops acting: room for clock skew between nodes and for a release in progress. (The lease
/// manager renews 5 s before expiry, so a healthy holder never reaches it.)
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// The longest one round's status and PinnedIdentity work may take.
const ROUND_BOUND: Duration = Duration::from_secs(8);

/// What a read of the releasers' Lease says of this daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseRead {
    /// It names this daemon, which may act until then.
    Mine(std::time::Instant),
    /// It names another daemon, none, or has expired (or is within [`LEASE_MARGIN`] of it):
    /// this daemon must not act, whatever it confirmed before.
    NotMine,
    /// The API server did not answer within 4 s: what was confirmed before still holds,
    /// until it runs out.
    NoAnswer,
}

/// The releasers' Lease, as the API server shows it now: whether it names `identity`, and
/// until when (its expiry by the last renewal less [`LEASE_MARGIN`]). The lease manager's own
/// flag lags behind: after an API server outage it kept saying "elected" for half a minute
/// after the Lease had expired and another daemon had taken it. Both must agree before this
/// daemon acts as the releaser.
async fn read_lease(client: &kube::Client, namespace: &str, identity: &str) -> LeaseRead {
    use k8s_openapi::api::coordination::v1::Lease;
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(Duration::from_secs(4), api.get_opt(RELEASER_LEASE)).await {
        Ok(Ok(lease)) => lease
            .and_then(|l| l.spec)
            .and_then(|s| lease_left(&s, identity, k8s_openapi::jiff::Timestamp::now()))
            .map_or(LeaseRead::NotMine, |left| {
                LeaseRead::Mine(std::time::Instant::now() + left)
            }),
        Ok(Err(_)) | Err(_) => LeaseRead::NoAnswer,
    }
}

/// Until when this daemon may act as the releaser, from what it confirmed `before` and what
/// the lease manager (`elected`) and a read of the Lease (`read`, made only while elected)
/// say now.
fn releaser_until(
    before: Option<std::time::Instant>,
    elected: bool,
    read: Option<LeaseRead>,
) -> Option<std::time::Instant> {
    match (elected, read) {
        (true, Some(LeaseRead::Mine(until))) => Some(until),
        (true, Some(LeaseRead::NoAnswer)) => before,
        _ => None,
    }
}

/// Whether a releaser confirmed `until` may act now.
fn acting(until: Option<std::time::Instant>) -> bool {
    until.is_some_and(|u| std::time::Instant::now() < u)
}

/// How long from `now` a Lease with `spec` lets `identity` act: until [`LEASE_MARGIN`] before
/// it expires by its last renewal. `None`: another holder, no renewal or duration, or
/// expired (or within the margin).
fn lease_left(
    spec: &k8s_openapi::api::coordination::v1::LeaseSpec,
    identity: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<Duration> {
    let (holder, renewed, secs) = (
        spec.holder_identity.as_deref()?,
        spec.renew_time.as_ref()?,
        spec.lease_duration_seconds?,
    );
    if holder != identity {
        return None;
    }
    let expires = renewed
        .0
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
            secs,
        )))
        .ok()?;
    let margin = k8s_openapi::jiff::SignedDuration::try_from(LEASE_MARGIN).ok()?;
    let left = now.duration_until(expires).checked_sub(margin)?;
    // Negative (expired, or inside the margin) does not convert.
    Duration::try_from(left).ok().filter(|d| !d.is_zero())
}

/// Joins the election for [`RELEASER_LEASE`] in `namespace` as `identity`, makes the
/// engine's reconciler wait for it, and while elected writes pool status and keeps the
/// PinnedIdentity records in line with the address objects ([`super::pins`]).
pub async fn cluster_duties(
    service: Arc<Engine>,
    client: kube::Client,
    namespace: String,
    identity: String,
    verdicts: Arc<Mutex<Verdicts>>,
) {
    let mut pins = super::pins::Pins::start(client.clone());
    let manager = loop {
        match kube_lease_manager::LeaseManagerBuilder::new(client.clone(), RELEASER_LEASE)
            .with_namespace(namespace.clone())
            .with_identity(identity.clone())
            .with_duration(15)
            .with_grace(5)
            .with_field_manager(format!("tetherd-{identity}"))
            .build()
            .await
        {
            Ok(m) => break m,
            Err(e) => {
                tracing::warn!(lease = %format!("{namespace}/{RELEASER_LEASE}"), "joining the releasers' election; no release rule is applied here until it works: {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let (elected, _task) = manager.watch().await;
    // The lease manager says elected and the Lease itself, read this round, agrees: until
    // when this daemon may act as the releaser. Every release checks it at that moment.
    let confirmed: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
    let gate = confirmed.clone();
    let lease = format!("{namespace}/{RELEASER_LEASE}");
    service.set_release_gate(Arc::new(move || {
        if acting(*gate.lock().unwrap_or_else(PoisonError::into_inner)) {
            Ok(())
        } else {
            Err(format!(
                "this daemon does not hold the releasers' Lease {lease}; the holder applies release rules"
            ))
        }
    }));
    let mut written: BTreeMap<String, IPPoolStatus> = BTreeMap::new();
    let mut was_elected = false;
    let mut rounds = 0u32;
    loop {
        tokio::time::sleep(STATUS_INTERVAL).await;
        let is_elected = *elected.borrow();
        let read = if is_elected {
            Some(read_lease(&client, &namespace, &identity).await)
        } else {
            None
        };
        let until = {
            let mut last = confirmed.lock().unwrap_or_else(PoisonError::into_inner);
            *last = releaser_until(*last, is_elected, read);
            *last
        };
        let now = acting(until);
        if now != was_elected {
            tracing::info!(lease = %format!("{namespace}/{RELEASER_LEASE}"), elected = now, "releasers' election");
            was_elected = now;
            written.clear();
            pins.reset();
            if now {
                tokio::spawn(super::pins::label_old_pins(client.clone()));
            }
        }
        if !now {
            continue;
        }
        rounds = rounds.wrapping_add(1);
        let reassert = rounds.is_multiple_of(STATUS_REASSERT_ROUNDS);
        // Bounded, so that a stuck call cannot outlast the Lease this round relies on.
        let work = async {
            write_status(&service, &client, &verdicts, &mut written, reassert).await;
            pins.reconcile(&service).await;
        };
        if tokio::time::timeout(ROUND_BOUND, work).await.is_err() {
            tracing::warn!(bound = ?ROUND_BOUND, "pool status and PinnedIdentity round took too long; left for the next round");
        }
    }
}

/// Writes each IPPool's status where it changed since it was last written, or every one with
/// `reassert` (another daemon may have written over it), keeping the transition times.
async fn write_status(
    service: &Arc<Engine>,
    client: &kube::Client,
    verdicts: &Arc<Mutex<Verdicts>>,
    written: &mut BTreeMap<String, IPPoolStatus>,
    reassert: bool,
) {
    let verdicts = verdicts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let usage = service.pools();
    let api: Api<IPPool> = Api::all(client.clone());
    for (name, verdict) in verdicts {
        let count = |s: &str| {
            s.parse::<u128>()
                .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX))
        };
        let (allocated, total) = usage
            .pools
            .iter()
            .find(|p| p.name == name)
            .map_or((0, 0), |p| (count(&p.allocated), count(&p.total)));
        let (status, reason, message) = match &verdict {
            // Never empty: the v1.20 API server reads an empty string there as null and
            // refuses the status.
            None => ("True", "Serving", "the pool hands out addresses".to_owned()),
            Some(r) => ("False", r.reason, r.message.clone()),
        };
        let previous = written.get(&name);
        let transition = previous
            .and_then(|p| p.conditions.first())
            .filter(|c| c.status == status && c.reason == reason)
            .map(|c| c.last_transition_time.clone());
        let desired = IPPoolStatus {
            allocated_ip_count: allocated,
            total_ip_count: total,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: message.clone(),
                observed_generation: None,
                last_transition_time: transition
                    .clone()
                    .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now())),
            }],
        };
        if previous == Some(&desired) && !reassert {
            continue;
        }
        let patch = serde_json::json!({ "status": desired });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(o) => {
                if transition.is_none() && verdict.is_some() {
                    event(client, &o, reason, &message).await;
                }
                written.insert(name, desired);
            }
            Err(e) => {
                tracing::warn!(pool = %name, "writing IPPool status: {e}");
                written.remove(&name);
            }
        }
    }
}

/// Posts a Warning Event on an IPPool (cluster-scoped: the Event lives in `default`).
async fn event(client: &kube::Client, pool: &IPPool, reason: &str, message: &str) {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let involved = ObjectReference {
        api_version: Some(tether_core::pool::API_VERSION.into()),
        kind: Some(tether_core::pool::KIND.into()),
        name: Some(name.clone()),
        uid: pool.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    post_event(client, involved, "Warning", reason, message).await;
}

/// Runs garbage collection every `every` while this daemon holds the releasers' Lease (the
/// engine refuses otherwise).
pub async fn collect_garbage(service: Arc<Engine>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match service.gc_pass().await {
            Ok(report) => {
                if let Some(why) = &report.paused {
                    tracing::info!(why = %why, "garbage collection paused");
                }
            }
            Err(tether_engine::EngineError::NotElected(why)) => {
                tracing::debug!("garbage collection skipped: {why}");
            }
            Err(e) => tracing::warn!("garbage collection pass failed: {e}"),
        }
    }
}

/// Leaves an Event on the IPAllocation of each address garbage collection (an elected pass or
/// CNI GC) freed or took a stale holder from.
pub fn gc_event_poster(
    client: kube::Client,
    rt: tokio::runtime::Handle,
) -> tether_engine::GcReporter {
    Arc::new(move |released| {
        let client = client.clone();
        rt.spawn(async move {
            for r in released {
                let Some(ip) = r
                    .address
                    .rsplit_once('/')
                    .and_then(|(_, ip)| ip.parse::<std::net::IpAddr>().ok())
                else {
                    continue;
                };
                let involved = ObjectReference {
                    api_version: Some(tether_core::pool::API_VERSION.into()),
                    kind: Some("IPAllocation".into()),
                    name: Some(tether_kube::crd::allocation_name(ip)),
                    ..ObjectReference::default()
                };
                let (reason, what) = if r.action == "released" {
                    ("AddressReleased", "released")
                } else {
                    ("HolderDropped", "dropped a stale holder of")
                };
                let message = format!(
                    "garbage collection {what} {} ({}): {}",
                    r.address, r.reason, r.workload
                );
                post_event(&client, involved, "Normal", reason, &message).await;
            }
        });
    })
}

/// Posts an Event about a cluster-scoped object (it lives in `default`).
async fn post_event(
    client: &kube::Client,
    involved: ObjectReference,
    type_: &str,
    reason: &str,
    message: &str,
) {
    let name = involved.name.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let e = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        involved_object: involved,
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(type_.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        source: Some(EventSource {
            component: Some("tetherd".into()),
            host: None,
        }),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    if let Err(e) = api.create(&Default::default(), &e).await {
        tracing::warn!(object = %name, "posting an Event: {e}");
    }
}

/// Writes each IPAMClaim's status from the outcome of its pods' ADDs, as OVN-Kubernetes does:
/// `status.ips`, `status.ownerPod.name` and the condition `IPsAllocated` (`True`,
/// `SuccessfulAllocation`; or `False` with `SubnetExhausted`, `IPAddressConflict` or
/// `PoolNotFound`). Addresses a claim already holds are never replaced by others. The write
/// carries the resourceVersion read and is retried on a conflict.
pub fn claim_status_writer(
    client: kube::Client,
    rt: tokio::runtime::Handle,
) -> tether_engine::ClaimReporter {
    Arc::new(move |report| {
        let client = client.clone();
        rt.spawn(async move { write_claim_status(&client, report).await });
    })
}

async fn write_claim_status(client: &kube::Client, report: tether_engine::ClaimReport) {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("k8s.cni.cncf.io", "v1alpha1", "IPAMClaim"),
        "ipamclaims",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &report.namespace, &ar);
    let claim = format!("{}/{}", report.namespace, report.name);
    for attempt in 1..=5u32 {
        let mut obj = match api.get_opt(&report.name).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(claim = %claim, attempt, "reading the IPAMClaim to write its status: {e}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                continue;
            }
        };
        let current = obj
            .data
            .get("status")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let Some(desired) = claim_status(&current, &report, &now) else {
            return;
        };
        obj.data["status"] = desired;
        match api
            .replace_status(&report.name, &PostParams::default(), &obj)
            .await
        {
            Ok(_) => {
                tracing::info!(claim = %claim, pod = %report.pod, "IPAMClaim status written");
                return;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                tracing::warn!(claim = %claim, attempt, "writing the IPAMClaim's status: {e}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    }
    tracing::warn!(claim = %claim, "gave up writing the IPAMClaim's status");
}

/// Whether two CIDRs name the same address.
fn same_address(a: &str, b: &str) -> bool {
    let ip = |s: &str| {
        s.split('/')
            .next()
            .and_then(|i| i.parse::<std::net::IpAddr>().ok())
    };
    match (ip(a), ip(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The status `report` calls for, given the claim's `current` one; `None` when it already
/// says so. Addresses the claim holds are never replaced (its addresses are its promise): a
/// pod that got others leaves them, and the condition says so.
fn claim_status(
    current: &serde_json::Value,
    report: &tether_engine::ClaimReport,
    now: &str,
) -> Option<serde_json::Value> {
    use serde_json::{Value, json};
    let held: Vec<String> = current
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (ips, owner, status, reason, message) = match &report.outcome {
        // Addresses of a family the claim had none of may be added; one it holds is never
        // replaced. Compared as addresses: `10.0.0.9/24` written by another IPAM is
        // `10.0.0.9/16` here.
        Ok(ips) if held.iter().all(|h| ips.iter().any(|i| same_address(h, i))) => (
            ips.clone(),
            Some(json!({"name": report.pod})),
            "True",
            "SuccessfulAllocation",
            format!("allocated by tether: {}", ips.join(", ")),
        ),
        Ok(ips) => {
            tracing::warn!(claim = %format!("{}/{}", report.namespace, report.name), held = ?held, allocated = ?ips, "the pod got other addresses than the IPAMClaim holds; its addresses are left as they are");
            (
                held,
                current.get("ownerPod").cloned(),
                "False",
                "IPAddressConflict",
                format!(
                    "pod {} got {} (addresses the runtime asked for), not the claim's",
                    report.pod,
                    ips.join(", ")
                ),
            )
        }
        Err((reason, message)) => (
            held,
            current.get("ownerPod").cloned(),
            "False",
            reason.as_str(),
            message.chars().take(1024).collect(),
        ),
    };
    let mut conditions: Vec<Value> = current
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let old = conditions
        .iter()
        .position(|c| c.get("type").and_then(Value::as_str) == Some("IPsAllocated"));
    let since = old
        .map(|i| &conditions[i])
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    let condition = json!({"type": "IPsAllocated", "status": status, "reason": reason,
        "message": message, "lastTransitionTime": since});
    match old {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    let mut desired = json!({"ips": ips, "conditions": conditions});
    if let Some(o) = owner {
        desired["ownerPod"] = o;
    }
    (&desired != current).then_some(desired)
}

#[cfg(test)]
mod claim_tests {
    use super::*;
    use serde_json::json;

    fn report(outcome: Result<Vec<String>, (String, String)>) -> tether_engine::ClaimReport {
        tether_engine::ClaimReport {
            namespace: "default".into(),
            name: "vm1.tenant".into(),
            pod: "virt-launcher-vm1-abcde".into(),
            outcome,
        }
    }

    #[test]
    fn a_successful_allocation_writes_ips_owner_and_condition_once() {
        let ok = report(Ok(vec!["10.0.0.5/24".into()]));
        let s = claim_status(&json!({}), &ok, "2026-12-01T00:00:00Z").expect("a status");
        assert_eq!(s["ips"], json!(["10.0.0.5/24"]));
        assert_eq!(s["ownerPod"], json!({"name": "virt-launcher-vm1-abcde"}));
        assert_eq!(s["conditions"][0]["type"], "IPsAllocated");
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["conditions"][0]["reason"], "SuccessfulAllocation");
        // Already so: nothing to write (the transition time is kept).
        assert_eq!(claim_status(&s, &ok, "2026-12-01T00:05:00Z"), None);
    }

    #[test]
    fn addresses_held_are_never_replaced_only_completed() {
        let held = json!({"ips": ["10.0.0.9/24"], "ownerPod": {"name": "old"}});
        let s =
            claim_status(&held, &report(Ok(vec!["10.0.0.5/24".into()])), "t").expect("a status");
        assert_eq!(s["ips"], json!(["10.0.0.9/24"]));
        assert_eq!(s["ownerPod"], json!({"name": "old"}));
        assert_eq!(s["conditions"][0]["reason"], "IPAddressConflict");
        // Dual-stack: the claim's IPv4 address kept, an IPv6 one added.
        let both = vec!["10.0.0.9/24".to_owned(), "fd00::9/64".to_owned()];
        let s = claim_status(&held, &report(Ok(both.clone())), "t").expect("a status");
        assert_eq!(s["ips"], json!(both));
        assert_eq!(s["conditions"][0]["reason"], "SuccessfulAllocation");
        // Another IPAM's prefix for the same address: the same address.
        let s =
            claim_status(&held, &report(Ok(vec!["10.0.0.9/16".into()])), "t").expect("a status");
        assert_eq!(s["conditions"][0]["reason"], "SuccessfulAllocation");
    }

    #[test]
    fn a_failure_sets_the_condition_and_keeps_the_addresses() {
        let held = json!({"ips": ["10.0.0.9/24"], "ownerPod": {"name": "old"}});
        let s = claim_status(
            &held,
            &report(Err(("SubnetExhausted".into(), "pool p is full".into()))),
            "t",
        )
        .expect("a status");
        assert_eq!(s["ips"], json!(["10.0.0.9/24"]));
        assert_eq!(s["ownerPod"], json!({"name": "old"}));
        assert_eq!(s["conditions"][0]["status"], "False");
        assert_eq!(s["conditions"][0]["reason"], "SubnetExhausted");
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    fn spec(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    /// A releaser acts only while the Lease, as read, names it and is more than the margin
    /// from its expiry: a stale leader (another holder, or its own Lease run out, as after an
    /// API server outage the lease manager did not notice) closes its gate.
    #[test]
    fn the_lease_read_decides_how_long_a_releaser_may_act() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let ago = |s: i64| now.checked_sub(SignedDuration::from_secs(s)).expect("time");
        // Renewed 3 s ago for 15 s: 12 s to expiry, 10 s to act.
        assert_eq!(
            lease_left(&spec("me", ago(3), 15), "me", now),
            Some(Duration::from_secs(10))
        );
        // Another daemon holds it: nothing, however fresh.
        assert_eq!(lease_left(&spec("other", now, 15), "me", now), None);
        // Its own, but expired, or inside the margin (1 s to expiry), or just at it.
        assert_eq!(lease_left(&spec("me", ago(33), 15), "me", now), None);
        assert_eq!(lease_left(&spec("me", ago(14), 15), "me", now), None);
        assert_eq!(lease_left(&spec("me", ago(13), 15), "me", now), None);
        // Fields missing: nothing.
        let mut s = spec("me", now, 15);
        s.renew_time = None;
        assert_eq!(lease_left(&s, "me", now), None);
        let mut s = spec("me", now, 15);
        s.lease_duration_seconds = None;
        assert_eq!(lease_left(&s, "me", now), None);
        let mut s = spec("me", now, 15);
        s.holder_identity = None;
        assert_eq!(lease_left(&s, "me", now), None);
    }

    /// A Lease read that names another holder (or none, or has run out) closes the gate at
    /// once, whatever was confirmed before; only an unanswered read keeps the last deadline;
    /// and nothing opens it while the lease manager says "not elected".
    #[test]
    fn only_an_unanswered_read_keeps_the_last_deadline() {
        let before = Some(std::time::Instant::now() + Duration::from_secs(10));
        let later = std::time::Instant::now() + Duration::from_secs(12);
        assert_eq!(
            releaser_until(before, true, Some(LeaseRead::Mine(later))),
            Some(later)
        );
        assert_eq!(releaser_until(before, true, Some(LeaseRead::NotMine)), None);
        assert_eq!(
            releaser_until(before, true, Some(LeaseRead::NoAnswer)),
            before
        );
        assert_eq!(releaser_until(None, true, Some(LeaseRead::NoAnswer)), None);
        assert_eq!(releaser_until(before, false, None), None);
        assert_eq!(
            releaser_until(before, false, Some(LeaseRead::Mine(later))),
            None
        );
    }
}
