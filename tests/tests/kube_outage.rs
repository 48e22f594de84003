//! API server and etcd outages under churn, on a real kube-apiserver (v1.20.2) and etcd, with
//! two node daemons (`tetherd run --kubernetes`) called through the real `tether` plugin.
//!
//! Four workers churn (ADDs of new ephemeral pods, DELs of added ones, sandbox restarts of
//! StatefulSet pods whose addresses are pinned) while the control plane goes away and comes
//! back. What is decided, and checked here:
//!
//! - an ADD that needs a new claim while the API server (or etcd) is down answers code 11
//!   ("try again later") within [`REFUSAL_BOUND`], far below the kubelet's CNI timeout
//!   (its runtime request timeout, 2 min), never hangs;
//! - a pinned identity's re-ADD during the outage (a sandbox restart, or its pod recreated)
//!   answers code 11 too: its address is known, but the holder cannot be written, and an
//!   address is never handed out without a durable record of who holds it;
//! - a DEL during the outage that has something to release fails (code 11, the store does
//!   not answer): it is never answered success without the release carried out, and the
//!   kubelet's retry after the outage carries it out;
//! - once the control plane is back, every daemon serves again (its ADDs succeed, `/readyz`),
//!   its allocations match the IPAllocation objects and the pool status counts them; then
//!   the invariants hold on the objects: no address for two identities, every ADD answered
//!   success (and not DELed) still allocated to its container, every pinned identity keeps
//!   its address, every DEL answered success freed, nothing left for a pod the test deleted.
//!
//! The API server outage also changes objects while the daemons cannot see them, through a
//! second apiserver over the same etcd (a StatefulSet pod recreated with a new UID, a
//! StatefulSet deleted, an address object deleted), and moves etcd's revision on: when the
//! daemons' apiserver returns, its watch cache starts at a newer revision than their watches
//! resumed from, so those watches expire (410 Gone, read from the daemons' logs) and re-list,
//! and what changed in the gap is seen.
//!
//! A partition is the third scenario: one node's daemon, the elected releaser, cut off from
//! the API server (its traffic black-holed by a proxy) while the other node's daemon serves
//! every call, takes the releasers' Lease over and applies a release rule; after the heal both
//! converge.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod as KPod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tether_e2e::cluster::{Cluster, TestCluster};
use tether_e2e::{CniOutcome, Daemon, Ipam, Pod, Rng, within};
use tether_kube::crd::{IPAllocation, IPPool};

/// The longest a refused ADD may take. The kubelet gives a sandbox's network set-up its
/// runtime request timeout (2 min by default); the plugin itself gives up after 60 s.
const REFUSAL_BOUND: Duration = Duration::from_secs(10);
/// How long the control plane stays down at least.
const OUTAGE: Duration = Duration::from_secs(6);
/// A worker's pause between two calls.
const PACE: Duration = Duration::from_millis(120);
/// Churn before and after the outage.
const CHURN: Duration = Duration::from_secs(3);
/// Ephemeral pods made up front (the workers take new ones from them).
const EPHEMERAL: usize = 60;
/// StatefulSet pods: one per worker.
const WORKERS: usize = 4;
const NODES: [&str; 2] = ["node-a", "node-b"];

const POOL: &str = r#"apiVersion: ipam.tether.dev/v1alpha1
kind: IPPool
metadata:
  name: outage
spec:
  subnet: 10.7.0.0/16
  ips: ["10.7.0.10-10.7.0.250"]
  gateway: 10.7.0.1
"#;

struct Env {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

fn pod_json(name: &str, node: &str, owner: Option<&serde_json::Value>) -> KPod {
    let mut meta = json!({"name": name, "namespace": "default"});
    if let Some(o) = owner {
        meta["ownerReferences"] = json!([o]);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"nodeName": node, "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "pause"}]}
    }))
    .expect("pod")
}

impl Env {
    fn start(test: &str) -> Option<Env> {
        let TestCluster {
            cluster,
            rt,
            client,
        } = TestCluster::with_pool(test, POOL)?;
        Some(Env {
            cluster,
            rt,
            client,
        })
    }

    fn daemon(&self, node: &str) -> Daemon {
        self.daemon_via(node, &self.cluster.kubeconfig)
    }

    /// The daemon of `node`, reaching the API server through `kubeconfig`.
    fn daemon_via(&self, node: &str, kubeconfig: &std::path::Path) -> Daemon {
        let kubeconfig = kubeconfig.display().to_string();
        Daemon::start(
            "",
            &[
                "--kubernetes",
                "--node-name",
                node,
                "--kubeconfig",
                &kubeconfig,
                "--lease-namespace",
                "default",
                // Nothing is freed behind the test's back: a DEL answered success must have
                // freed its address itself.
                "--gc-interval-secs",
                "0",
            ],
        )
        .expect("tetherd --kubernetes")
    }

    /// Creates pod `name` on `node` through `client`; the plugin's view of it.
    fn pod_via(
        &self,
        client: &kube::Client,
        name: &str,
        node: &str,
        owner: Option<&serde_json::Value>,
    ) -> Pod {
        let created = self
            .rt
            .block_on(
                Api::<KPod>::namespaced(client.clone(), "default")
                    .create(&PostParams::default(), &pod_json(name, node, owner)),
            )
            .expect("create pod");
        let uid = created.metadata.uid.expect("uid");
        let mut pod = Pod::new("default", name, 0);
        pod.container_id = format!("ctr-{name}-{}", &uid[..8]);
        pod.uid = uid;
        pod
    }

    fn delete_pod_via(&self, client: &kube::Client, name: &str) {
        self.rt
            .block_on(
                Api::<KPod>::namespaced(client.clone(), "default")
                    .delete(name, &DeleteParams::default().grace_period(0)),
            )
            .expect("delete pod");
    }

    /// StatefulSet `name` with `replicas`; the owner reference its pods carry.
    fn statefulset(&self, name: &str, replicas: u32) -> serde_json::Value {
        let sts: StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicas": replicas, "serviceName": name,
                     "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "pause"}]}}}
        }))
        .expect("sts");
        let sts = self
            .rt
            .block_on(
                Api::<StatefulSet>::namespaced(self.client.clone(), "default")
                    .create(&PostParams::default(), &sts),
            )
            .expect("create sts");
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
               "uid": sts.metadata.uid.expect("uid"), "controller": true})
    }

    fn objects(&self) -> Vec<IPAllocation> {
        self.rt
            .block_on(Api::<IPAllocation>::all(self.client.clone()).list(&ListParams::default()))
            .expect("list IPAllocations")
            .items
    }
}

/// One CNI call as a worker saw it.
#[derive(Debug, Clone)]
struct Call {
    add: bool,
    /// The node whose daemon was called.
    node: usize,
    pod: String,
    container: String,
    started: Instant,
    took: Duration,
    ok: bool,
    code: Option<u64>,
    message: String,
    /// A pinned identity's (re-)ADD.
    pinned: bool,
}

/// A StatefulSet pod a worker restarts the sandbox of.
#[derive(Debug, Clone)]
struct StsPod {
    pod: Pod,
    node: usize,
    /// Its pinned address (from its first ADD).
    ip: String,
    /// Whether its current container holds its address (its last ADD succeeded and no DEL
    /// of it succeeded since).
    attached: bool,
    /// Containers whose DEL failed (the kubelet retries those).
    undeleted: Vec<String>,
}

/// What the workers did and what is left to retry.
#[derive(Default)]
struct World {
    /// Ephemeral pods made, not yet ADDed.
    fresh: Vec<(Pod, usize)>,
    /// ADD answered success, no DEL answered success since.
    added: Vec<(Pod, usize, String)>,
    /// Pods whose last ADD was refused (back in `fresh`): the kubelet retries them.
    refused: HashSet<String>,
    /// DEL failed: the kubelet retries.
    undeleted: Vec<(Pod, usize)>,
    /// DEL answered success: (pod, container).
    deleted: Vec<(Pod, usize)>,
    sts: Vec<StsPod>,
    calls: Vec<Call>,
}

fn call(ipam: &Ipam, node: usize, add: bool, pod: &Pod, pinned: bool) -> (Call, CniOutcome) {
    let started = Instant::now();
    let out = if add { ipam.add(pod) } else { ipam.del(pod) }.expect("run the plugin");
    let took = started.elapsed();
    let c = Call {
        add,
        node,
        pod: pod.name.clone(),
        container: pod.container_id.clone(),
        started,
        took,
        ok: out.ok,
        code: out.code(),
        message: out.out["msg"].as_str().unwrap_or_default().to_owned(),
        pinned,
    };
    (c, out)
}

/// One worker: until `stop`, ADDs a new ephemeral pod, DELs an added one, or restarts the
/// sandbox of its StatefulSet pod (DEL, then ADD with a new container ID).
fn worker(me: usize, ipams: Vec<Ipam>, world: Arc<Mutex<World>>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut restarts = 0u32;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(PACE);
        let roll = rng.below(10);
        if roll < 5 {
            let Some((pod, node)) = world.lock().expect("world").fresh.pop() else {
                continue;
            };
            let (c, out) = call(&ipams[node], node, true, &pod, false);
            let mut w = world.lock().expect("world");
            match out.ip().filter(|_| out.ok) {
                Some(ip) => {
                    w.refused.remove(&pod.name);
                    w.added.push((pod, node, ip));
                }
                None => {
                    // The kubelet tries again later (here: when the pod comes round again).
                    w.refused.insert(pod.name.clone());
                    w.fresh.insert(0, (pod, node));
                }
            }
            w.calls.push(c);
        } else if roll < 8 {
            let picked = {
                let mut w = world.lock().expect("world");
                if w.added.is_empty() {
                    None
                } else {
                    let i = rng.below(w.added.len() as u64) as usize;
                    Some(w.added.swap_remove(i))
                }
            };
            let Some((pod, node, _)) = picked else {
                continue;
            };
            let (c, out) = call(&ipams[node], node, false, &pod, false);
            let mut w = world.lock().expect("world");
            if out.ok {
                w.deleted.push((pod.clone(), node));
                // The pod gets a new sandbox later (a new container ID).
                let mut again = pod;
                again.container_id = format!("ctr-{}-s{}", again.name, w.calls.len());
                w.fresh.insert(0, (again, node));
            } else {
                // Still allocated as far as the test knows; the kubelet retries the DEL.
                w.undeleted.push((pod.clone(), node));
            }
            w.calls.push(c);
        } else {
            let mut s = world.lock().expect("world").sts[me].clone();
            if s.attached {
                let (c, out) = call(&ipams[s.node], s.node, false, &s.pod, true);
                world.lock().expect("world").calls.push(c);
                if out.ok {
                    s.attached = false;
                } else {
                    s.undeleted.push(s.pod.container_id.clone());
                    // The kubelet would retry the DEL before a new sandbox: try later.
                    world.lock().expect("world").sts[me] = s;
                    continue;
                }
            }
            restarts += 1;
            s.pod.container_id = format!("ctr-{}-r{me}-{restarts}", s.pod.name);
            let (c, out) = call(&ipams[s.node], s.node, true, &s.pod, true);
            if out.ok {
                assert_eq!(
                    out.ip().as_deref(),
                    Some(s.ip.as_str()),
                    "{} lost its pinned address on a sandbox restart: {}",
                    s.pod.name,
                    out.out
                );
                s.attached = true;
            }
            let mut w = world.lock().expect("world");
            w.calls.push(c);
            w.sts[me] = s;
        }
    }
}

/// Retries `op` as the kubelet would (code 11 and other failures alike) until it succeeds;
/// panics after `secs`.
fn retry(ipam: &Ipam, add: bool, pod: &Pod, secs: u64) -> CniOutcome {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = if add { ipam.add(pod) } else { ipam.del(pod) }.expect("run the plugin");
        if out.ok {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} still failing {secs}s after the outage: {}",
            if add { "ADD" } else { "DEL" },
            pod.name,
            out.out
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Prints the daemons' logs when the test fails (they are deleted with the daemons).
struct LogsOnPanic<'a>(&'a [Daemon], &'a Mutex<World>);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, d) in self.0.iter().enumerate() {
                eprintln!("==== log of the daemon of {}\n{}", NODES[i], d.log());
            }
            if let Ok(w) = self.1.lock() {
                for c in &w.calls {
                    eprintln!("CALL {c:?}");
                }
            }
        }
    }
}

/// What one scenario measured.
struct Figures {
    outage: Duration,
    adds_refused: usize,
    first_to_find: usize,
    max_refusal: Duration,
    max_del: Duration,
    dels_failed: usize,
    pinned_refused: usize,
    calls: usize,
    served_again: Duration,
    converged: Duration,
}

/// The common part of the scenarios: churn, `outage` (which cuts the daemons of the nodes in
/// `cut` off the control plane, does what it wants meanwhile, and returns once they reach it
/// again), retries, convergence and the invariants. The other nodes' daemons must answer every
/// call meanwhile as usual.
fn churn_through_outage(
    env: &Env,
    daemons: &[Daemon],
    world: &Arc<Mutex<World>>,
    cut: &[usize],
    outage: impl FnOnce(&Env, &Arc<Mutex<World>>) -> (Instant, Instant),
    after: impl FnOnce(&Env, &[Daemon]),
) -> Figures {
    let ipams: Vec<Ipam> = daemons
        .iter()
        .map(|d| Ipam::new(&d.socket, "net", "1.0.0", &["outage"]).expect("ipam"))
        .collect();
    let _logs = LogsOnPanic(daemons, world);
    let stop = Arc::new(AtomicBool::new(false));
    let seed = Rng::seed_from_env("TETHER_OUTAGE_SEED");
    let workers: Vec<_> = (0..WORKERS)
        .map(|me| {
            let (ipams, world, stop) = (ipams.clone(), world.clone(), stop.clone());
            std::thread::spawn(move || worker(me, ipams, world, stop, seed + me as u64))
        })
        .collect();
    std::thread::sleep(CHURN);
    let (down, up) = outage(env, world);
    std::thread::sleep(CHURN);
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("a worker panicked");
    }

    // During the outage: every ADD was refused, fast, with code 11 (but for those already
    // committing when the control plane went away: the store's failure, 104); every DEL
    // that had something to release failed; no call hung.
    let (during, beside): (Vec<Call>, Vec<Call>) = world
        .lock()
        .expect("world")
        .calls
        .iter()
        .filter(|c| c.started >= down && c.started < up)
        .cloned()
        .partition(|c| cut.contains(&c.node));
    // The nodes still connected: served as usual, every call answered success, in time.
    assert!(
        cut.len() == NODES.len() || beside.len() >= 4,
        "too few calls to the connected nodes during the outage to judge: {beside:#?}"
    );
    for c in &beside {
        assert!(
            c.ok && c.took <= REFUSAL_BOUND,
            "{} of {} ({}) on connected node {} failed during another node's outage: {c:?}",
            if c.add { "ADD" } else { "DEL" },
            c.pod,
            c.container,
            NODES[c.node]
        );
    }
    let adds: Vec<&Call> = during.iter().filter(|c| c.add).collect();
    // No call that overlapped the outage hung, whenever it started.
    let overlapping: Vec<Call> = world
        .lock()
        .expect("world")
        .calls
        .iter()
        .filter(|c| cut.contains(&c.node) && c.started < up && c.started + c.took > down)
        .cloned()
        .collect();
    for c in &overlapping {
        assert!(
            c.took <= REFUSAL_BOUND,
            "{} of {} ({}) took {:?} during the outage: {c:?}",
            if c.add { "ADD" } else { "DEL" },
            c.pod,
            c.container,
            c.took
        );
    }
    assert!(
        adds.iter().filter(|c| !c.pinned).count() >= 4,
        "too few ADDs of new pods during the outage to judge: {during:#?}"
    );
    let mut first_to_find = 0;
    for c in &adds {
        assert!(
            !c.ok,
            "ADD of {} answered success during the outage: {c:?}",
            c.pod
        );
        if c.code == Some(104) {
            first_to_find += 1;
        }
        assert_eq!(
            c.code,
            Some(11),
            "ADD of {} ({}) during the outage answered {:?}",
            c.pod,
            c.container,
            c.message
        );
    }
    assert_eq!(
        first_to_find, 0,
        "ADDs answered 104 (the store's failure) during the outage, not 11"
    );
    let dels: Vec<&Call> = during
        .iter()
        .filter(|c| !c.add && c.started + c.took <= up)
        .collect();
    for c in &dels {
        assert!(
            !c.ok,
            "DEL of {} ({}) answered success during the outage: {c:?}",
            c.pod, c.container
        );
    }
    let max_refusal = adds.iter().map(|c| c.took).max().unwrap_or_default();
    let max_del = dels.iter().map(|c| c.took).max().unwrap_or_default();

    // The kubelet retries: refused ADDs, failed DELs, StatefulSet pods left without a sandbox.
    let retried = Instant::now();
    let (refused, undeleted, sts) = {
        let mut w = world.lock().expect("world");
        let names = std::mem::take(&mut w.refused);
        let (refused, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut w.fresh)
            .into_iter()
            .partition(|(p, _)| names.contains(&p.name));
        w.fresh = fresh;
        (refused, std::mem::take(&mut w.undeleted), w.sts.clone())
    };
    // The first ADD that needed a new claim and succeeded after the control plane was back.
    let served_again = world
        .lock()
        .expect("world")
        .calls
        .iter()
        .filter(|c| c.add && c.ok && !c.pinned && c.started >= up && cut.contains(&c.node))
        .map(|c| c.started + c.took - up)
        .min();
    for (i, (pod, node)) in refused.into_iter().enumerate() {
        if i % 2 == 0 {
            // A runtime that retries the ADD of the same sandbox: whatever a refused ADD
            // left committed is its answer.
            let out = retry(&ipams[node], true, &pod, 60);
            let ip = out.ip().expect("an address");
            world.lock().expect("world").added.push((pod, node, ip));
            continue;
        }
        // The kubelet tears the failed sandbox down (a DEL of its container) and ADDs a new
        // one: whatever a refused ADD left committed must go with that DEL, or it leaks.
        retry(&ipams[node], false, &pod, 60);
        let mut again = pod.clone();
        again.container_id = format!("{}-retry", pod.container_id);
        let out = retry(&ipams[node], true, &again, 60);
        let ip = out.ip().expect("an address");
        let mut w = world.lock().expect("world");
        w.deleted.push((pod, node));
        w.added.push((again, node, ip));
    }
    for (pod, node) in undeleted {
        retry(&ipams[node], false, &pod, 60);
        world.lock().expect("world").deleted.push((pod, node));
    }
    for (i, mut s) in sts.into_iter().enumerate() {
        for old in std::mem::take(&mut s.undeleted) {
            let mut p = s.pod.clone();
            // A failed DEL of the attached sandbox, retried now: the pod then needs an ADD.
            if old == s.pod.container_id {
                s.attached = false;
            }
            p.container_id = old;
            retry(&ipams[s.node], false, &p, 60);
        }
        if !s.attached {
            let out = retry(&ipams[s.node], true, &s.pod, 60);
            assert_eq!(out.ip().as_deref(), Some(s.ip.as_str()), "{}", s.pod.name);
            s.attached = true;
        }
        world.lock().expect("world").sts[i] = s;
    }
    eprintln!(
        "retries done {:?} after the start of the retries",
        retried.elapsed()
    );
    after(env, daemons);

    // Convergence: every daemon ready, its allocations those of the API server, the pool's
    // status counting them.
    let converged = converge(env, daemons, Instant::now());
    check_invariants(env, &world.lock().expect("world"));
    let w = world.lock().expect("world");
    Figures {
        outage: up - down,
        adds_refused: adds.iter().filter(|c| !c.pinned).count(),
        first_to_find,
        max_del,
        pinned_refused: adds.iter().filter(|c| c.pinned).count(),
        max_refusal,
        dels_failed: dels.len(),
        calls: w.calls.len(),
        served_again: served_again.unwrap_or_default(),
        converged,
    }
}

/// (address, container IDs holding it), sorted.
type View = Vec<(String, Vec<String>)>;

fn api_view(env: &Env) -> View {
    let mut v: View = env
        .objects()
        .into_iter()
        .map(|o| {
            let mut h: Vec<String> = o
                .spec
                .holders
                .iter()
                .map(|h| h.container_id.clone())
                .collect();
            h.sort();
            (o.spec.address.to_string(), h)
        })
        .collect();
    v.sort();
    v
}

fn daemon_view(d: &Daemon) -> Option<View> {
    let all = d.allocations().ok()?;
    let mut v: View = all
        .iter()
        .map(|a| {
            let mut h: Vec<String> = a["holders"]
                .as_array()
                .map(|hs| {
                    hs.iter()
                        .filter_map(|h| h["attachment"]["containerId"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            h.sort();
            (a["ip"].as_str().unwrap_or_default().to_owned(), h)
        })
        .collect();
    v.sort();
    Some(v)
}

/// Waits until every daemon is ready and shows the API server's allocations, and the pool's
/// status counts them; how long after `from` that was.
fn converge(env: &Env, daemons: &[Daemon], from: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let api = api_view(env);
        let ready = daemons
            .iter()
            .all(|d| d.client().get::<serde_json::Value>("/readyz").is_ok());
        let views: Vec<Option<View>> = daemons.iter().map(daemon_view).collect();
        let status = env
            .rt
            .block_on(Api::<IPPool>::all(env.client.clone()).get("outage"))
            .ok()
            .and_then(|p| p.status)
            .map(|s| s.allocated_ip_count);
        if ready
            && views.iter().all(|v| v.as_ref() == Some(&api))
            && status == Some(api.len() as i64)
        {
            return from.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the daemons never converged: ready {ready}, pool status {status:?}, API {api:?}, daemons {views:?}\n{}",
            daemons
                .iter()
                .map(Daemon::log)
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The invariants, on the IPAllocation objects.
fn check_invariants(env: &Env, w: &World) {
    let objects = env.objects();
    let mut by_ip: HashMap<String, &IPAllocation> = HashMap::new();
    let mut holder_of: HashMap<String, String> = HashMap::new();
    for o in &objects {
        let ip = o.spec.address.to_string();
        assert!(
            by_ip.insert(ip.clone(), o).is_none(),
            "two objects for {ip}"
        );
        // One identity per address: an ephemeral address has one holder; a pinned one only
        // holders of its identity (a StatefulSet pod's identity is its name).
        if o.spec.owner.kind == "Ephemeral" {
            assert!(o.spec.holders.len() <= 1, "{ip} held twice: {o:?}");
        } else {
            for h in &o.spec.holders {
                assert_eq!(
                    format!("{}/{}", h.namespace, h.pod),
                    o.spec.owner.name,
                    "{ip} held outside its identity: {o:?}"
                );
            }
        }
        for h in &o.spec.holders {
            assert!(
                holder_of
                    .insert(h.container_id.clone(), ip.clone())
                    .is_none(),
                "container {} holds two addresses",
                h.container_id
            );
        }
    }
    // Every ADD answered success and not DELed: still allocated to its container.
    for (pod, _, ip) in &w.added {
        assert_eq!(
            holder_of.get(&pod.container_id),
            Some(ip),
            "{} ({}) answered {ip} but does not hold it",
            pod.name,
            pod.container_id
        );
    }
    // Every pinned identity keeps its address, held by its current container.
    for s in &w.sts {
        let o = by_ip
            .get(&s.ip)
            .unwrap_or_else(|| panic!("{} lost its pinned address {}", s.pod.name, s.ip));
        assert_eq!(o.spec.owner.name, format!("default/{}", s.pod.name));
        assert_eq!(
            holder_of.get(&s.pod.container_id),
            Some(&s.ip),
            "{} not held by its current container",
            s.pod.name
        );
    }
    // Every DEL answered success freed: its container holds nothing.
    for (pod, _) in &w.deleted {
        assert!(
            !holder_of.contains_key(&pod.container_id),
            "{} ({}) was DELed with success but still holds {:?}",
            pod.name,
            pod.container_id,
            holder_of.get(&pod.container_id)
        );
    }
    // Nothing else: exactly the added pods' and the StatefulSet pods' addresses.
    let expected: HashSet<&String> = w
        .added
        .iter()
        .map(|(_, _, ip)| ip)
        .chain(w.sts.iter().map(|s| &s.ip))
        .collect();
    let found: HashSet<&String> = by_ip.keys().collect();
    assert_eq!(found, expected, "leftover or missing addresses");
}

/// Sets up the StatefulSet pods (ADDed once, so pinned) and the ephemeral pods, on the
/// daemons of [`NODES`] (started directly on the API server unless given).
fn setup(
    env: &Env,
    daemons: Option<Vec<Daemon>>,
) -> (Vec<Daemon>, Arc<Mutex<World>>, serde_json::Value) {
    let daemons: Vec<Daemon> =
        daemons.unwrap_or_else(|| NODES.iter().map(|n| env.daemon(n)).collect());
    let ipams: Vec<Ipam> = daemons
        .iter()
        .map(|d| Ipam::new(&d.socket, "net", "1.0.0", &["outage"]).expect("ipam"))
        .collect();
    // db-0 .. db-{WORKERS-1} are the workers'; db-{WORKERS} is left to the scenario.
    let owner = env.statefulset("db", WORKERS as u32 + 1);
    let mut world = World::default();
    for i in 0..=WORKERS {
        let node = i % NODES.len();
        let pod = env.pod_via(&env.client, &format!("db-{i}"), NODES[node], Some(&owner));
        let out = retry(&ipams[node], true, &pod, 30);
        world.sts.push(StsPod {
            pod,
            node,
            ip: out.ip().expect("an address"),
            attached: true,
            undeleted: Vec::new(),
        });
    }
    for i in 0..EPHEMERAL {
        let node = i % NODES.len();
        let pod = env.pod_via(&env.client, &format!("web-{i}"), NODES[node], None);
        world.fresh.push((pod, node));
    }
    (daemons, Arc::new(Mutex::new(world)), owner)
}

fn report(what: &str, f: &Figures) {
    eprintln!(
        "FIGURES {what}: {} CNI calls; during the outage ({:?}): {} ADDs of new pods and {} pinned re-ADDs refused ({} of them with 104, having met the outage in the store; the rest 11), slowest {:?}; {} DELs failed, slowest {:?}; first new ADD served {:?} after the control plane was back; after the kubelet's retries, converged within {:?}",
        f.calls,
        f.outage,
        f.adds_refused,
        f.pinned_refused,
        f.first_to_find,
        f.max_refusal,
        f.dels_failed,
        f.max_del,
        f.served_again,
        f.converged
    );
}

#[test]
fn an_apiserver_outage_mid_churn_refuses_fast_and_loses_nothing() {
    let test = "an_apiserver_outage_mid_churn_refuses_fast_and_loses_nothing";
    let Some(env) = Env::start(test) else {
        return;
    };
    let (daemons, world, _owner) = setup(&env, None);
    // A StatefulSet deleted while the daemons cannot see it: its pod's pinned address must
    // be released once they can.
    let gone_owner = env.statefulset("gone", 1);
    let gone = env.pod_via(&env.client, "gone-0", NODES[0], Some(&gone_owner));
    let ipam0 = Ipam::new(&daemons[0].socket, "net", "1.0.0", &["outage"]).expect("ipam");
    let gone_ip = retry(&ipam0, true, &gone, 30).ip().expect("an address");
    assert!(ipam0.del(&gone).expect("del").ok);
    // An ephemeral pod whose address object is deleted in the gap (a release by hand through
    // another apiserver): every daemon must drop it from its state once it can see again.
    let moved = env.pod_via(&env.client, "moved", NODES[1], None);
    let ipam1 = Ipam::new(&daemons[1].socket, "net", "1.0.0", &["outage"]).expect("ipam");
    let moved_ip = retry(&ipam1, true, &moved, 30).ip().expect("an address");

    let figures = churn_through_outage(
        &env,
        &daemons,
        &world,
        &[0, 1],
        |env, world| {
            env.cluster.stop_apiserver().expect("stop the apiserver");
            let down = Instant::now();
            // Changes the daemons cannot see, through a second apiserver over the same etcd.
            let other = env
                .cluster
                .start_second_apiserver("b")
                .expect("a second apiserver");
            let b = env
                .rt
                .block_on(Cluster::client_for(&other))
                .expect("client of the second apiserver");
            // db-4 recreated (a new UID) while its node's daemon cannot see it, as the kubelet
            // and the StatefulSet controller do it: DEL of its old sandbox (fails: nothing can be
            // released), the pod deleted and made again, ADD of the new one (refused, code 11).
            // After the outage the kubelet's retries carry both out, and it keeps its address.
            let mut s = world.lock().expect("world").sts[WORKERS].clone();
            let ipam =
                Ipam::new(&daemons[s.node].socket, "net", "1.0.0", &["outage"]).expect("ipam");
            let (c, out) = call(&ipam, s.node, false, &s.pod, true);
            world.lock().expect("world").calls.push(c);
            if !out.ok {
                s.undeleted.push(s.pod.container_id.clone());
            }
            env.delete_pod_via(&b, &s.pod.name);
            let owner = env
                .rt
                .block_on(Api::<StatefulSet>::namespaced(b.clone(), "default").get("db"))
                .expect("db");
            let owner = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
            "uid": owner.metadata.uid.expect("uid"), "controller": true});
            s.pod = env.pod_via(&b, &s.pod.name, NODES[s.node], Some(&owner));
            s.attached = false;
            let (c, _) = call(&ipam, s.node, true, &s.pod, true);
            world.lock().expect("world").calls.push(c);
            world.lock().expect("world").sts[WORKERS] = s;
            env.rt
                .block_on(
                    Api::<StatefulSet>::namespaced(b.clone(), "default")
                        .delete("gone", &DeleteParams::default()),
                )
                .expect("delete StatefulSet gone");
            env.delete_pod_via(&b, "gone-0");
            env.rt
                .block_on(Api::<IPAllocation>::all(b.clone()).delete(
                    &tether_kube::crd::allocation_name(moved_ip.parse().expect("ip")),
                    &DeleteParams::default(),
                ))
                .expect("delete moved's address object");
            env.delete_pod_via(&b, "moved");
            env.cluster
                .stop_apiserver_named("b")
                .expect("stop the second apiserver");
            // Whatever else happened, etcd's revision moves on before the daemons' apiserver
            // returns: each watch resumes from an older one and expires.
            env.cluster
                .etcd_put("/tether-test/bump", "1")
                .expect("write to etcd");
            let left = OUTAGE.saturating_sub(down.elapsed());
            std::thread::sleep(left);
            let up = Instant::now();
            env.cluster
                .start_apiserver(&[])
                .expect("restart the apiserver");
            (down, up)
        },
        |_, daemons| {
            // StatefulSet `gone` was deleted in the gap: its release rule fires.
            let want = format!("outage/{gone_ip}");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let released: Vec<String> = daemons
                    .iter()
                    .filter_map(|d| d.reconcile().ok())
                    .flatten()
                    .collect();
                if released.contains(&want) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{want} of StatefulSet gone (deleted during the outage) never released: {released:?}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        },
    );
    report("apiserver outage", &figures);

    if std::env::var_os("TETHER_OUTAGE_LOGS").is_some() {
        for d in &daemons {
            eprintln!("==== daemon log\n{}", d.log());
        }
    }
    // Every daemon's watches expired when they resumed (410 Gone) and re-listed.
    for d in &daemons {
        let log = d.log();
        assert!(
            log.contains("watch expired (410 Gone); re-listing"),
            "no watch of this daemon expired: {log}"
        );
    }
}

#[test]
fn an_etcd_restart_mid_churn_refuses_fast_and_loses_nothing() {
    let test = "an_etcd_restart_mid_churn_refuses_fast_and_loses_nothing";
    let Some(env) = Env::start(test) else {
        return;
    };
    let (daemons, world, _owner) = setup(&env, None);
    let figures = churn_through_outage(
        &env,
        &daemons,
        &world,
        &[0, 1],
        |env, _| {
            env.cluster.stop_etcd().expect("stop etcd");
            let down = Instant::now();
            std::thread::sleep(OUTAGE);
            let up = Instant::now();
            env.cluster.start_etcd().expect("start etcd");
            (down, up)
        },
        |_, _| {},
    );
    report("etcd restart", &figures);
    if std::env::var_os("TETHER_OUTAGE_LOGS").is_some() {
        for d in &daemons {
            eprintln!("==== daemon log\n{}", d.log());
        }
    }
}

/// The holder of the releasers' Lease, as the API server shows it.
fn lease_holder(env: &Env) -> Option<String> {
    env.rt
        .block_on(
            Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
                env.client.clone(),
                "default",
            )
            .get_opt("tether-releaser"),
        )
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// One node cut off from the API server (its traffic black-holed, the others' untouched),
/// and it is the elected releaser: its calls are refused fast with code 11 while the other
/// node serves every call as usual; the other daemon takes the Lease over once it expires and
/// applies a release rule the cut-off one cannot; after the partition heals, both converge
/// with nothing lost or doubled, and the cut-off node's pods keep their addresses.
#[test]
fn a_node_cut_off_from_the_apiserver_refuses_fast_and_loses_nothing() {
    let test = "a_node_cut_off_from_the_apiserver_refuses_fast_and_loses_nothing";
    let Some(env) = Env::start(test) else {
        return;
    };
    // node-a reaches the API server through a proxy the test can cut.
    let kubeconfig = std::fs::read_to_string(&env.cluster.kubeconfig).expect("kubeconfig");
    let at = kubeconfig
        .find("https://127.0.0.1:")
        .expect("the API server's address")
        + "https://127.0.0.1:".len();
    let port: String = kubeconfig[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let proxy = tether_e2e::proxy::Proxy::start(port.parse().expect("port")).expect("proxy");
    let proxied = env.cluster.kubeconfig.with_file_name("kubeconfig-node-a");
    std::fs::write(
        &proxied,
        kubeconfig.replace(
            &format!("https://127.0.0.1:{port}"),
            &format!("https://127.0.0.1:{}", proxy.port),
        ),
    )
    .expect("write node-a's kubeconfig");
    // node-a is the releaser: started first, and holding the Lease before node-b starts.
    let a = env.daemon_via(NODES[0], &proxied);
    within(30, "node-a elected", || {
        lease_holder(&env).as_deref() == Some(NODES[0])
    });
    let b = env.daemon(NODES[1]);
    let (daemons, world, _owner) = setup(&env, Some(vec![a, b]));
    // A StatefulSet whose pod ran on node-a, deleted while node-a is cut off: its pinned
    // address is for the releaser to free, and node-a cannot.
    let gone_owner = env.statefulset("gone", 1);
    let gone = env.pod_via(&env.client, "gone-0", NODES[0], Some(&gone_owner));
    let ipam0 = Ipam::new(&daemons[0].socket, "net", "1.0.0", &["outage"]).expect("ipam");
    let gone_ip = retry(&ipam0, true, &gone, 30).ip().expect("an address");
    assert!(ipam0.del(&gone).expect("del").ok);
    let gone_object = tether_kube::crd::allocation_name(gone_ip.parse().expect("ip"));

    let mut took_over = Duration::ZERO;
    let mut released = Duration::ZERO;
    let figures = churn_through_outage(
        &env,
        &daemons,
        &world,
        &[0],
        |env, _| {
            proxy.cut();
            let down = Instant::now();
            env.rt
                .block_on(
                    Api::<StatefulSet>::namespaced(env.client.clone(), "default")
                        .delete("gone", &DeleteParams::default()),
                )
                .expect("delete StatefulSet gone");
            env.delete_pod_via(&env.client, "gone-0");
            // The Lease lasts 15 s from node-a's last renewal: node-b takes it over after.
            within(40, "node-b took the releasers' Lease over", || {
                lease_holder(env).as_deref() == Some(NODES[1])
            });
            took_over = down.elapsed();
            // (Release rules run at each garbage collection pass, off here: a reconcile is
            // one pass, asked of node-b.)
            let want = format!("outage/{gone_ip}");
            within(30, "node-b released gone-0's address", || {
                let by_b = daemons[1].reconcile().unwrap_or_default();
                by_b.contains(&want)
                    && env
                        .rt
                        .block_on(
                            Api::<IPAllocation>::all(env.client.clone()).get_opt(&gone_object),
                        )
                        .expect("read gone-0's address object")
                        .is_none()
            });
            released = down.elapsed();
            let up = Instant::now();
            proxy.heal();
            (down, up)
        },
        |env, daemons| {
            // node-a, back, does not act as the releaser: node-b holds the Lease.
            within(30, "node-a's daemon ready again", || {
                daemons[0]
                    .client()
                    .get::<serde_json::Value>("/readyz")
                    .is_ok()
            });
            assert_eq!(lease_holder(env).as_deref(), Some(NODES[1]));
            let r = daemons[0].reconcile();
            assert!(
                r.as_ref()
                    .is_err_and(|e| format!("{e:#}").contains("releasers' Lease")),
                "node-a acted as the releaser after the heal while node-b holds the Lease: {r:?}"
            );
        },
    );
    report("node-a cut off", &figures);
    eprintln!(
        "FIGURES node-a cut off: node-b held the Lease {took_over:?} after the cut, and had released gone-0's address {released:?} after it"
    );
}
