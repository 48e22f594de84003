//! The cluster lifecycle in the engine, against a fake API server.
//!
//! Garbage collection's rules, each on its own: nothing is freed on one look, a grace period
//! (longer for VMs) must pass between two findings on the same revision, a fresh read must
//! confirm it, unknown is never gone, a pass that cannot look forgets what it found, a lost
//! node frees its pods being deleted, and CNI GC on a node touches only that node's holders.
//!
//! IPAMClaims: a pod's claim reference makes the claim its identity whatever the policy says,
//! a claim's addresses are requested, a missing claim is "try again", an unserved API leaves
//! the policies to decide, and each outcome is reported for the claim's status.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_api::CniRequest;
use tether_core::alloc::Liveness;
use tether_core::manifest::ObjectIndex;
use tether_core::pool::{IpPoolSpec, Pool};
use tether_core::{
    Decision, IdentityKind, Object, OwnerReference, Pinned, PolicyRequest, ReleaseCondition,
    Workload,
};
use tether_engine::ports::{
    ClaimInfo, ClaimLookup, Decide, NodeState, PodMeta, WorkloadSource, WorkloadView,
};
use tether_engine::{Engine, EngineError, GcSettings, Metrics, NodeInfo, Ports};
use tether_policy::{ChainOutcome, PolicyError};
use tether_store::contract::Switched;
use tether_store::embedded::EmbeddedStore;
use tether_store::{Store, StoreError};

/// What the API server holds, and how the source fails.
#[derive(Default)]
struct World {
    /// Pods that exist, by (namespace, name).
    pods: HashMap<(String, String), (Workload, PodMeta)>,
    /// What the pod list shows instead of `pods` (a list that lags).
    listed: Option<HashMap<(String, String), PodMeta>>,
    objects: ObjectIndex,
    nodes: HashMap<String, NodeState>,
    /// Release rules fire.
    fired: bool,
    read_fails: bool,
    list_fails: bool,
    unreachable: bool,
    unsynced: bool,
    /// IPAMClaims by name (namespace `default`); `None`: the API is not served.
    claims: Option<HashMap<String, ClaimInfo>>,
}

#[derive(Clone, Default)]
struct Cluster(Arc<Mutex<World>>);

impl Cluster {
    fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.0.lock().expect("world"))
    }

    fn add_pod(&self, namespace: &str, name: &str, uid: &str, owner: Option<OwnerReference>) {
        let w = Workload {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            owner_references: owner.into_iter().collect(),
            ..Workload::default()
        };
        let meta = PodMeta {
            uid: uid.into(),
            terminating: false,
            mirror_of: String::new(),
        };
        self.with(|c| {
            c.pods
                .insert((namespace.to_owned(), name.to_owned()), (w, meta))
        });
    }

    fn remove_pod(&self, namespace: &str, name: &str) {
        self.with(|c| c.pods.remove(&(namespace.to_owned(), name.to_owned())));
    }
}

impl WorkloadView for Cluster {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Workload>, String> {
        Ok(self.with(|c| {
            c.pods
                .get(&(namespace.to_owned(), name.to_owned()))
                .map(|p| p.0.clone())
        }))
    }

    fn owner_chain(
        &self,
        namespace: &str,
        owners: &[OwnerReference],
    ) -> Result<Vec<Object>, String> {
        Ok(self.with(|c| c.objects.owner_chain(namespace, owners)))
    }

    fn namespace_annotations(&self, _: &str) -> Result<Vec<(String, String)>, String> {
        Ok(Vec::new())
    }

    fn namespace_labels(&self, _: &str) -> Result<Option<Vec<(String, String)>>, String> {
        Ok(None)
    }

    fn pod_liveness(&self, namespace: &str, name: &str, uid: &str) -> Liveness {
        self.with(|c| {
            if c.read_fails {
                return Liveness::Unknown;
            }
            match c.pods.get(&(namespace.to_owned(), name.to_owned())) {
                Some(p) if p.1.uid == uid => Liveness::Live,
                _ => Liveness::Gone,
            }
        })
    }

    fn fires(&self, c: &ReleaseCondition) -> bool {
        !matches!(c, ReleaseCondition::Never) && self.with(|w| w.fired)
    }

    fn all_pods(&self) -> Result<Option<HashMap<(String, String), PodMeta>>, String> {
        self.with(|c| {
            if c.list_fails {
                return Err("listing pods: timed out".into());
            }
            Ok(Some(c.listed.clone().unwrap_or_else(|| {
                c.pods
                    .iter()
                    .map(|(k, v)| (k.clone(), v.1.clone()))
                    .collect()
            })))
        })
    }

    fn read_pod(&self, namespace: &str, name: &str) -> Result<Option<PodMeta>, String> {
        self.with(|c| {
            if c.read_fails {
                return Err("reading the pod: timed out".into());
            }
            Ok(c.pods
                .get(&(namespace.to_owned(), name.to_owned()))
                .map(|p| p.1.clone()))
        })
    }

    fn ipam_claim(&self, _: &str, name: &str) -> Result<ClaimLookup, String> {
        Ok(self.with(|c| match &c.claims {
            None => ClaimLookup::NotServed,
            Some(m) => m
                .get(name)
                .cloned()
                .map_or(ClaimLookup::Missing, ClaimLookup::Found),
        }))
    }

    fn node_state(&self, node: &str) -> NodeState {
        self.with(|c| c.nodes.get(node).copied().unwrap_or(NodeState::Gone))
    }
}

impl WorkloadSource for Cluster {
    fn synced(&self) -> bool {
        !self.with(|c| c.unsynced)
    }

    fn view(&self) -> Arc<dyn WorkloadView> {
        Arc::new(self.clone())
    }

    fn reachable(&self) -> Result<(), String> {
        if self.with(|c| c.unreachable) {
            Err("the API server is unreachable".into())
        } else {
            Ok(())
        }
    }
}

/// Pods named `vm-*` are pinned to VM `default/vm` (released when it is deleted), `db-*` to
/// a custom identity of that name; the others are ephemeral.
struct Policy;

impl Decide for Policy {
    fn decide(&self, request: &PolicyRequest) -> Result<ChainOutcome, PolicyError> {
        let name = &request.workload.name;
        let pinned = |identity: &str, kind| {
            Decision::Pinned(Pinned {
                identity: identity.into(),
                kind,
                release: vec![ReleaseCondition::OwnerDeleted(tether_core::ObjectKey {
                    api_version: "kubevirt.io/v1".into(),
                    kind: "VirtualMachine".into(),
                    namespace: "default".into(),
                    name: "vm".into(),
                })],
                may_share: true,
                pools: vec![],
            })
        };
        let decision = if name.starts_with("vm-") {
            pinned("default/vm", IdentityKind::VirtualMachine)
        } else if name.starts_with("db-") {
            pinned(&format!("default/{name}"), IdentityKind::Custom)
        } else {
            Decision::Ephemeral
        };
        Ok(ChainOutcome {
            decision,
            decided_by: Some("test".into()),
            steps: Vec::new(),
        })
    }

    fn names(&self) -> Vec<String> {
        vec!["test".into()]
    }
}

const GRACE: Duration = Duration::from_secs(60);
const VM_GRACE: Duration = Duration::from_secs(300);

struct Env {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    cluster: Cluster,
    t0: Instant,
}

impl Env {
    fn new() -> Env {
        Env::with_pools(vec![pool("p", "10.0.0.0/24", "10.0.0.1-10.0.0.9")])
    }

    fn with_pools(pools: Vec<Pool>) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
        Env::with_store(dir, store, pools)
    }

    fn with_store(dir: tempfile::TempDir, store: Arc<dyn Store>, pools: Vec<Pool>) -> Env {
        let cluster = Cluster::default();
        cluster.with(|c| {
            let vmi = Object {
                api_version: "kubevirt.io/v1".into(),
                kind: "VirtualMachineInstance".into(),
                namespace: "default".into(),
                name: "vm".into(),
                uid: "uid-vmi".into(),
                ..Object::default()
            };
            c.objects.insert(vmi);
        });
        let (engine, _thread) = Engine::start(
            Ports {
                store,
                workloads: (Arc::new(cluster.clone()), true),
                policies: Arc::new(Policy),
            },
            pools,
            Arc::new(Metrics::new()),
        )
        .expect("engine");
        let engine = Arc::new(engine);
        engine.set_gc_settings(GcSettings {
            grace: GRACE,
            vm_grace: VM_GRACE,
            node_grace: Duration::from_secs(300),
        });
        engine.set_node(NodeInfo {
            name: "n1".into(),
            labels: Some(Vec::new()),
            shared: true,
        });
        Env {
            _dir: dir,
            engine,
            cluster,
            t0: Instant::now(),
        }
    }

    /// Creates the pod in the cluster and ADDs it on node `node`.
    async fn pod(&self, name: &str, node: &str) -> IpAddr {
        let owner = name.starts_with("vm-").then(|| OwnerReference {
            api_version: "kubevirt.io/v1".into(),
            kind: "VirtualMachineInstance".into(),
            name: "vm".into(),
            uid: "uid-vmi".into(),
            controller: true,
        });
        self.cluster
            .add_pod("default", name, &format!("uid-{name}"), owner);
        self.engine.set_node(NodeInfo {
            name: node.into(),
            labels: Some(Vec::new()),
            shared: true,
        });
        let r = self.engine.add(req(name)).await.expect("add");
        self.engine.set_node(NodeInfo {
            name: "n1".into(),
            labels: Some(Vec::new()),
            shared: true,
        });
        r.ips[0]
            .address
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("address")
    }

    /// One pass `secs` seconds after the start; what it freed, as `ADDRESS ACTION REASON`.
    async fn pass(&self, secs: u64) -> Vec<String> {
        let r = self
            .engine
            .gc_pass_at(self.t0 + Duration::from_secs(secs))
            .await
            .expect("gc pass");
        r.released
            .iter()
            .map(|r| format!("{} {} {}", r.address, r.action, r.reason))
            .collect()
    }

    /// The holders of `ip`, by pod name; `None` when it is free.
    fn holders(&self, ip: IpAddr) -> Option<Vec<String>> {
        self.engine
            .allocations()
            .into_iter()
            .find(|a| a.ip == ip)
            .map(|a| a.holders.iter().map(|h| h.attachment.pod.clone()).collect())
    }

    /// The pinned identity of `ip` (`None`: ephemeral); panics when it is free.
    fn identity(&self, ip: IpAddr) -> Option<String> {
        self.engine
            .allocations()
            .into_iter()
            .find(|a| a.ip == ip)
            .expect("allocated")
            .identity()
            .map(str::to_owned)
    }
}

fn pool(name: &str, subnet: &str, ips: &str) -> Pool {
    Pool::new(
        name,
        &IpPoolSpec {
            subnet: subnet.into(),
            ips: vec![ips.into()],
            ..IpPoolSpec::default()
        },
    )
    .expect("pool")
}

fn req(name: &str) -> CniRequest {
    CniRequest {
        container_id: format!("ctr-{name}"),
        ifname: "eth0".into(),
        network: "net".into(),
        cni_version: "1.1.0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), name.into()),
            ("K8S_POD_UID".into(), format!("uid-{name}")),
        ],
        pools: vec!["p".into()],
        ..CniRequest::default()
    }
}

fn gc_request(valid: &[&str]) -> CniRequest {
    CniRequest {
        network: "net".into(),
        cni_version: "1.1.0".into(),
        valid_attachments: Some(
            valid
                .iter()
                .map(|name| tether_api::Attachment {
                    container_id: format!("ctr-{name}"),
                    ifname: "eth0".into(),
                })
                .collect(),
        ),
        ..CniRequest::default()
    }
}

#[tokio::test]
async fn a_pod_deleted_without_del_is_freed_only_after_two_looks_a_grace_apart() {
    let env = Env::new();
    let ip = env.pod("cart", "n1").await;
    let live = env.pod("live", "n2").await;
    env.cluster.remove_pod("default", "cart");
    assert!(env.pass(0).await.is_empty(), "freed on one look");
    let report = env.engine.gc_report();
    assert_eq!(report.suspects.len(), 1, "{report:?}");
    assert_eq!(report.suspects[0].reason, "pod-gone");
    assert!(env.pass(59).await.is_empty(), "freed before the grace");
    assert_eq!(
        env.pass(60).await,
        vec![format!("p/{ip} released pod-gone")]
    );
    assert_eq!(env.holders(ip), None);
    assert_eq!(env.holders(live), Some(vec!["live".to_owned()]));
    let text = env.engine.metrics_text();
    assert!(
        text.contains(r#"tether_gc_released_total{reason="pod-gone",action="released"} 1"#),
        "{text}"
    );
    // Nothing more to do, and nothing live touched on later passes.
    assert!(env.pass(200).await.is_empty());
    assert_eq!(env.holders(live), Some(vec!["live".to_owned()]));
}

#[tokio::test]
async fn a_pod_recreated_under_its_name_with_another_uid_is_gone() {
    let env = Env::new();
    let ip = env.pod("cart", "n1").await;
    env.cluster.add_pod("default", "cart", "uid-other", None);
    env.pass(0).await;
    assert_eq!(
        env.pass(60).await,
        vec![format!("p/{ip} released pod-gone")]
    );
}

#[tokio::test]
async fn a_list_that_lags_is_not_enough_a_fresh_read_must_confirm() {
    let env = Env::new();
    let ip = env.pod("cart", "n1").await;
    // The list does not show the pod (it lags), but the pod exists.
    env.cluster.with(|c| c.listed = Some(HashMap::new()));
    env.pass(0).await;
    assert!(env.pass(60).await.is_empty(), "freed a live pod's address");
    assert_eq!(env.holders(ip), Some(vec!["cart".to_owned()]));
    // The finding that did not hold was forgotten: the wait starts over.
    assert_eq!(env.engine.gc_report().suspects.len(), 0);
}

#[tokio::test]
async fn unknown_is_never_gone() {
    let env = Env::new();
    let ip = env.pod("cart", "n1").await;
    env.cluster.remove_pod("default", "cart");
    env.cluster.with(|c| c.read_fails = true);
    env.pass(0).await;
    assert!(env.pass(60).await.is_empty());
    assert!(env.pass(120).await.is_empty());
    assert_eq!(env.holders(ip), Some(vec!["cart".to_owned()]));
    // Once the pod can be read again, the finding of 120 (the one of 60 did not hold and
    // was forgotten) is confirmed.
    env.cluster.with(|c| c.read_fails = false);
    assert_eq!(
        env.pass(180).await,
        vec![format!("p/{ip} released pod-gone")]
    );
}

#[tokio::test]
async fn a_pass_that_cannot_look_forgets_what_it_found() {
    for pause in ["unreachable", "unsynced", "list"] {
        let env = Env::new();
        let ip = env.pod("cart", "n1").await;
        env.cluster.remove_pod("default", "cart");
        env.pass(0).await;
        env.cluster.with(|c| match pause {
            "unreachable" => c.unreachable = true,
            "unsynced" => c.unsynced = true,
            _ => c.list_fails = true,
        });
        assert!(env.pass(30).await.is_empty(), "{pause}");
        let report = env.engine.gc_report();
        assert!(report.paused.is_some(), "{pause}: {report:?}");
        assert!(report.suspects.is_empty(), "{pause}: {report:?}");
        env.cluster.with(|c| {
            c.unreachable = false;
            c.unsynced = false;
            c.list_fails = false;
        });
        // Found again at 61: a grace after the first finding, but the wait started over.
        assert!(
            env.pass(61).await.is_empty(),
            "{pause}: freed without a fresh wait"
        );
        assert!(env.pass(120).await.is_empty(), "{pause}");
        assert_eq!(
            env.pass(121).await,
            vec![format!("p/{ip} released pod-gone")],
            "{pause}"
        );
    }
}

#[tokio::test]
async fn a_vm_address_waits_the_vm_grace_and_is_kept_until_its_rule_fires() {
    let env = Env::new();
    let ip = env.pod("vm-launcher-a", "n1").await;
    env.cluster.remove_pod("default", "vm-launcher-a");
    env.pass(0).await;
    assert!(
        env.pass(60).await.is_empty(),
        "a VM's holder dropped after the short grace"
    );
    assert!(env.pass(299).await.is_empty());
    assert_eq!(
        env.pass(300).await,
        vec![format!("p/{ip} holder-dropped pod-gone")]
    );
    // Kept for the VM, nobody holding it.
    assert_eq!(env.holders(ip), Some(Vec::new()));
    assert!(
        env.pass(1000).await.is_empty(),
        "released while the VM exists"
    );
    env.cluster.with(|c| c.fired = true);
    env.pass(1001).await;
    assert!(
        env.pass(1100).await.is_empty(),
        "released before the VM grace"
    );
    assert_eq!(
        env.pass(1301).await,
        vec![format!("p/{ip} released rule-fired")]
    );
    assert_eq!(env.holders(ip), None);
}

#[tokio::test]
async fn a_change_to_the_address_starts_the_wait_over() {
    let env = Env::new();
    let ip = env.pod("vm-launcher-a", "n1").await;
    env.cluster.remove_pod("default", "vm-launcher-a");
    env.pass(0).await;
    // Another pod of the VM joins (a migration target) while the first one's liveness is
    // unknown, so it stays a holder: the address's revision changes, the stale holder's
    // finding stays the same but was made on an older revision.
    env.cluster.with(|c| c.read_fails = true);
    env.pod("vm-launcher-b", "n1").await;
    env.cluster.with(|c| c.read_fails = false);
    assert_eq!(
        env.holders(ip),
        Some(vec!["vm-launcher-a".to_owned(), "vm-launcher-b".to_owned()])
    );
    env.pass(100).await;
    assert!(
        env.pass(300).await.is_empty(),
        "freed on a finding made on an older revision"
    );
    assert_eq!(
        env.pass(400).await,
        vec![format!("p/{ip} holder-dropped pod-gone")]
    );
    assert_eq!(env.holders(ip), Some(vec!["vm-launcher-b".to_owned()]));
}

#[tokio::test]
async fn a_lost_nodes_pods_being_deleted_go_once_the_node_is_gone_long_enough() {
    let env = Env::new();
    let ip = env.pod("cart", "n2").await;
    let terminating = |env: &Env| {
        env.cluster.with(|c| {
            if let Some(p) = c.pods.get_mut(&("default".to_owned(), "cart".to_owned())) {
                p.1.terminating = true;
            }
        })
    };
    // Being deleted on a ready node: its kubelet will DEL it.
    terminating(&env);
    env.cluster
        .with(|c| c.nodes.insert("n2".into(), NodeState::Ready));
    env.pass(0).await;
    assert!(env.pass(100).await.is_empty());
    // Not ready, but not for long enough.
    env.cluster
        .with(|c| c.nodes.insert("n2".into(), NodeState::NotReadyFor(299)));
    env.pass(200).await;
    assert!(env.pass(300).await.is_empty());
    // Not ready past the node grace: found, then freed a grace later.
    env.cluster
        .with(|c| c.nodes.insert("n2".into(), NodeState::NotReadyFor(300)));
    assert!(env.pass(400).await.is_empty());
    assert_eq!(
        env.pass(460).await,
        vec![format!("p/{ip} released node-lost")]
    );
    // A pod on a lost node that is not being deleted is kept.
    let kept = env.pod("other", "n2").await;
    env.pass(500).await;
    assert!(env.pass(900).await.is_empty());
    assert_eq!(env.holders(kept), Some(vec!["other".to_owned()]));
}

#[tokio::test]
async fn gc_is_for_the_elected_daemon_only() {
    let env = Env::new();
    env.pod("cart", "n1").await;
    env.cluster.remove_pod("default", "cart");
    env.pass(0).await;
    env.engine
        .set_release_gate(Arc::new(|| Err("not the holder of the Lease".into())));
    let r = env
        .engine
        .gc_pass_at(env.t0 + Duration::from_secs(60))
        .await;
    assert!(matches!(r, Err(EngineError::NotElected(_))), "{r:?}");
    // Elected again: the findings of before were forgotten.
    env.engine.set_release_gate(Arc::new(|| Ok(())));
    assert!(env.pass(61).await.is_empty());
}

#[tokio::test]
async fn cni_gc_frees_this_nodes_unlisted_attachments_by_the_same_rules() {
    let env = Env::new();
    env.engine.set_gc_settings(GcSettings {
        grace: Duration::from_secs(10),
        vm_grace: Duration::from_secs(10),
        node_grace: Duration::from_secs(10),
    });
    // Not elected: its passes must not make CNI GC forget what it found.
    env.engine
        .set_release_gate(Arc::new(|| Err("not the holder of the Lease".into())));
    let gone = env.pod("cart", "n1").await;
    let alive = env.pod("kept", "n1").await;
    let theirs = env.pod("away", "n2").await;
    let listed = env.pod("listed", "n1").await;
    let back = env.pod("back", "n1").await;
    // `two` was given a new sandbox (its first one's DEL lost): two addresses.
    let old_sandbox = env.pod("two", "n1").await;
    let mut second = req("two");
    second.container_id = "ctr-two-b".into();
    env.engine.add(second).await.expect("new sandbox");
    env.cluster.remove_pod("default", "cart");
    // Back on the first call; later calls list `back` again.
    let first = gc_request(&["listed", "two-b"]);
    let later = gc_request(&["listed", "back", "two-b"]);
    let gc = |req: &CniRequest, secs: u64| {
        let (engine, at) = (env.engine.clone(), env.t0 + Duration::from_secs(secs));
        let req = req.clone();
        async move { engine.gc_at(req, at).await.expect("gc").released }
    };
    assert!(gc(&first, 0).await.is_empty(), "freed on the first look");
    assert!(env.engine.gc_pass().await.is_err(), "elected?");
    assert!(gc(&later, 5).await.is_empty());
    assert!(env.engine.gc_pass().await.is_err(), "elected?");
    let mut freed = gc(&first, 10).await;
    freed.sort();
    // `cart` (its pod gone), `two`'s old sandbox (the pod's new one is listed).
    let mut want = vec![format!("p/{gone}"), format!("p/{old_sandbox}")];
    want.sort();
    assert_eq!(freed, want);
    assert_eq!(
        env.holders(alive),
        Some(vec!["kept".to_owned()]),
        "a pod that exists, with no other sandbox listed: the list alone frees nothing"
    );
    assert_eq!(
        env.holders(theirs),
        Some(vec!["away".to_owned()]),
        "another node's holder"
    );
    assert_eq!(env.holders(listed), Some(vec!["listed".to_owned()]));
    assert_eq!(
        env.holders(back),
        Some(vec!["back".to_owned()]),
        "freed although listed in between"
    );
}

/// `name` annotated as ipam-extensions' webhook leaves a launcher pod: interface `eth0`'s
/// element (the primary network) refers to `claim`.
fn with_claim(env: &Env, name: &str, claim: &str) {
    env.cluster.with(|c| {
        if let Some(p) = c.pods.get_mut(&("default".to_owned(), name.to_owned())) {
            p.0.annotations.push((
                tether_core::netsel::DEFAULT_NETWORK_ANNOTATION.into(),
                format!(r#"{{"name":"net","ipam-claim-reference":"{claim}"}}"#),
            ));
        }
    });
}

/// Creates the pod in the cluster with a claim reference, then ADDs it.
async fn claim_pod(env: &Env, name: &str, claim: &str) -> Result<IpAddr, EngineError> {
    env.cluster
        .add_pod("default", name, &format!("uid-{name}"), None);
    with_claim(env, name, claim);
    let r = env.engine.add(req(name)).await?;
    Ok(r.ips[0]
        .address
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("address"))
}

fn reports(env: &Env) -> Arc<Mutex<Vec<tether_engine::ClaimReport>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    env.engine
        .set_claim_reporter(Arc::new(move |r| s.lock().expect("reports").push(r)));
    seen
}

fn claims(env: &Env, entries: &[(&str, &[&str])]) {
    env.cluster.with(|c| {
        c.claims = Some(
            entries
                .iter()
                .map(|(n, ips)| {
                    (
                        (*n).to_owned(),
                        ClaimInfo {
                            network: "net".into(),
                            ips: ips.iter().map(|s| (*s).to_owned()).collect(),
                            owner: None,
                        },
                    )
                })
                .collect(),
        )
    });
}

#[tokio::test]
async fn a_claim_is_the_identity_whatever_the_policy_and_its_pods_share_it() {
    let env = Env::new();
    let seen = reports(&env);
    claims(&env, &[("vm1.net", &[])]);
    // The policy would make `cart-*` pods ephemeral.
    let ip = claim_pod(&env, "cart-a", "vm1.net").await.expect("add");
    assert_eq!(env.identity(ip), Some("default/vm1.net".to_owned()));
    // Another pod of the claim waits while the first lives.
    let busy = claim_pod(&env, "cart-b", "vm1.net").await;
    assert!(
        matches!(
            busy,
            Err(EngineError::Write(
                tether_engine::writer::WriteError::Alloc(
                    tether_core::alloc::AllocError::IdentityBusy { .. }
                )
            ))
        ),
        "{busy:?}"
    );
    // A migration's target shares it.
    env.cluster.add_pod("default", "cart-c", "uid-cart-c", None);
    with_claim(&env, "cart-c", "vm1.net");
    env.cluster.with(|c| {
        if let Some(p) = c.pods.get_mut(&("default".to_owned(), "cart-c".to_owned())) {
            p.0.labels.push((
                tether_core::claim::MIGRATION_JOB_LABEL.into(),
                "mig-1".into(),
            ));
        }
    });
    env.engine
        .add(req("cart-c"))
        .await
        .expect("migration target");
    assert_eq!(
        env.holders(ip),
        Some(vec!["cart-a".to_owned(), "cart-c".to_owned()])
    );
    // The pod that waited left the claim's status alone.
    let seen = seen.lock().expect("reports");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].name, "vm1.net");
    assert_eq!(seen[0].pod, "cart-a");
    assert_eq!(seen[0].outcome, Ok(vec![format!("{ip}/24")]));
}

#[tokio::test]
async fn a_claims_addresses_are_requested() {
    let env = Env::new();
    claims(&env, &[("vm1.net", &["10.0.0.7/24"])]);
    assert_eq!(
        claim_pod(&env, "vm-a", "vm1.net").await.expect("add"),
        "10.0.0.7".parse::<IpAddr>().expect("ip")
    );
}

#[tokio::test]
async fn a_missing_claim_is_try_again_and_an_unserved_api_leaves_it_to_the_policies() {
    let env = Env::new();
    claims(&env, &[]);
    let r = claim_pod(&env, "cart-a", "vm1.net").await;
    assert!(matches!(r, Err(EngineError::WorkloadUnknown(_))), "{r:?}");
    env.cluster.with(|c| c.claims = None);
    let ip = claim_pod(&env, "cart-b", "vm1.net").await.expect("add");
    assert_eq!(env.identity(ip), None, "the policy's decision (ephemeral)");
}

#[tokio::test]
async fn failures_are_reported_with_ovn_kubernetes_reasons() {
    let env = Env::new();
    let seen = reports(&env);
    claims(&env, &[("vm1.net", &[]), ("vm2.net", &["10.0.0.1/24"])]);
    // vm2's address is someone else's.
    let first = env.pod("cart-0", "n1").await;
    assert_eq!(first, "10.0.0.1".parse::<IpAddr>().expect("ip"));
    assert!(claim_pod(&env, "vm-b", "vm2.net").await.is_err());
    // The pool full: nothing for vm1.
    for i in 1..9 {
        env.pod(&format!("cart-{i}"), "n1").await;
    }
    assert!(claim_pod(&env, "vm-a", "vm1.net").await.is_err());
    let seen = seen.lock().expect("reports");
    let reasons: Vec<(String, String)> = seen
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.outcome.clone().err().map(|e| e.0).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("vm2.net".to_owned(), "IPAddressConflict".to_owned()),
            ("vm1.net".to_owned(), "SubnetExhausted".to_owned())
        ]
    );
}

#[tokio::test]
async fn an_idle_pin_is_refiled_under_a_claim_and_kept() {
    let env = Env::new();
    let ip = env.pod("db-0", "n1").await;
    let refile = |force| tether_api::ReleaseRequest {
        pool: "p".into(),
        ip: ip.to_string(),
        force,
        to_claim: Some("default/vm1.net".into()),
    };
    // Held: refused.
    claims(&env, &[("vm1.net", &[])]);
    assert!(env.engine.release(refile(false)).await.is_err());
    env.engine.del(req("db-0")).await.expect("del");
    // A claim that does not exist: refused (it would be judged deleted).
    let missing = tether_api::ReleaseRequest {
        to_claim: Some("default/nope".into()),
        ..refile(false)
    };
    assert!(env.engine.release(missing).await.is_err());
    env.engine.release(refile(false)).await.expect("re-file");
    assert_eq!(env.identity(ip), Some("default/vm1.net".to_owned()));
    // The claim's pod gets it.
    assert_eq!(claim_pod(&env, "vm-a", "vm1.net").await.expect("add"), ip);
}

#[tokio::test]
async fn a_claim_of_a_vm_serves_only_that_vms_pods() {
    let env = Env::new();
    env.cluster.with(|c| {
        c.claims = Some(
            [(
                "vm.net".to_owned(),
                ClaimInfo {
                    network: "net".into(),
                    ips: Vec::new(),
                    owner: Some(OwnerReference {
                        api_version: "kubevirt.io/v1".into(),
                        kind: "VirtualMachineInstance".into(),
                        name: "vm".into(),
                        uid: "uid-vmi".into(),
                        controller: true,
                    }),
                },
            )]
            .into_iter()
            .collect(),
        )
    });
    // A pod the VM does not own names its claim: refused, nothing allocated.
    let r = claim_pod(&env, "intruder", "vm.net").await;
    assert!(
        matches!(
            &r,
            Err(EngineError::Policy(PolicyError::ForeignIdentity { .. }))
        ),
        "{r:?}"
    );
    assert!(env.engine.allocations().is_empty());
    // The VM's launcher pod (owned by the VMI) may.
    env.cluster.add_pod(
        "default",
        "vm-launcher",
        "uid-vm-launcher",
        Some(OwnerReference {
            api_version: "kubevirt.io/v1".into(),
            kind: "VirtualMachineInstance".into(),
            name: "vm".into(),
            uid: "uid-vmi".into(),
            controller: true,
        }),
    );
    with_claim(&env, "vm-launcher", "vm.net");
    env.engine
        .add(req("vm-launcher"))
        .await
        .expect("the VM's pod");
}

#[tokio::test]
async fn a_deleted_claims_address_waits_the_vm_grace() {
    let env = Env::new();
    claims(&env, &[("vm1.net", &[])]);
    let ip = claim_pod(&env, "vm-a", "vm1.net").await.expect("add");
    env.engine.del(req("vm-a")).await.expect("del");
    env.cluster.remove_pod("default", "vm-a");
    // The claim is deleted (the fake fires every rule once `fired`).
    env.cluster.with(|c| c.fired = true);
    env.pass(0).await;
    assert!(
        env.pass(60).await.is_empty(),
        "a claim's address released after the short grace"
    );
    assert_eq!(
        env.pass(300).await,
        vec![format!("p/{ip} released rule-fired")]
    );
}

/// A dual-stack ADD whose commit was cut short (the IPv4 record written, then the store
/// stopped answering) leaves the attachment one family. The kubelet's retry is not answered
/// that alone from the state: it gets the missing family too, and keeps the other.
#[tokio::test]
async fn a_retried_add_holding_one_family_of_two_gets_the_other() {
    let env = Env::with_pools(vec![
        pool("p", "10.0.0.0/24", "10.0.0.1-10.0.0.9"),
        pool("p6", "fd00::/64", "fd00::1-fd00::9"),
    ]);
    env.cluster.add_pod("default", "x", "uid-x", None);
    // What a cut-short commit leaves: the IPv4 address alone.
    let first = env.engine.add(req("x")).await.expect("add");
    assert_eq!(first.ips.len(), 1, "{first:?}");
    let mut both = req("x");
    both.pools = vec!["p".into(), "p6".into()];
    let retried = env.engine.add(both.clone()).await.expect("retried add");
    let addresses: Vec<&str> = retried.ips.iter().map(|i| i.address.as_str()).collect();
    assert_eq!(addresses.len(), 2, "{addresses:?}");
    assert_eq!(
        addresses[0], first.ips[0].address,
        "the IPv4 address is kept"
    );
    assert!(addresses[1].starts_with("fd00::"), "{addresses:?}");
    // Retried again: the same two, from the state.
    let again = env.engine.add(both).await.expect("add again");
    assert_eq!(again.ips, retried.ips);
    assert_eq!(env.engine.allocations().len(), 2);
}

/// While the writer's state may differ from the store (a commit and the re-read after it
/// failed), nothing is answered from memory: a retried ADD and a CHECK of a pod that held an
/// address answer "try again" (code 11) instead of an address the store may no longer hold.
#[tokio::test]
async fn nothing_is_answered_from_a_stale_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flaky = Arc::new(Switched::new(
        EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"),
    ));
    let env = Env::with_store(
        dir,
        flaky.clone(),
        vec![pool("p", "10.0.0.0/24", "10.0.0.1-10.0.0.9")],
    );
    env.cluster.add_pod("default", "x", "uid-x", None);
    env.cluster.add_pod("default", "y", "uid-y", None);
    let first = env.engine.add(req("x")).await.expect("add");
    flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    // A commit fails and so does the re-read after it: the state is stale.
    assert!(env.engine.add(req("y")).await.is_err());
    let retried = env.engine.add(req("x")).await;
    // "Try again later": code 11 at the socket API.
    let try_again = |e: Option<&EngineError>| {
        matches!(
            e,
            Some(EngineError::Write(
                tether_engine::writer::WriteError::Store(StoreError::Unavailable(_))
            ))
        )
    };
    assert!(
        try_again(retried.as_ref().err()),
        "answered from a stale state: {retried:?}"
    );
    let mut check = req("x");
    check.prev_ips = vec![first.ips[0].address.clone()];
    assert!(try_again(env.engine.check(&check).as_ref().err()));
    // The store answers again: so does the engine, after re-reading it.
    flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match env.engine.add(req("x")).await {
            Ok(r) => {
                assert_eq!(r.ips, first.ips);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never served again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
