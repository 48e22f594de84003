//! A pinned decision may claim only the pod's own identity: a VM's pin only from a pod the VM
//! owns, a StatefulSet pod's only from that pod, anything else only inside the pod's namespace.
//! The engine checks every pinned decision before the writer plans it, whatever the policy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tether_api::CniRequest;
use tether_core::alloc::Liveness;
use tether_core::manifest::ObjectIndex;
use tether_core::pool::{IpPoolSpec, Pool};
use tether_core::{
    Decision, IdentityKind, Object, OwnerReference, Pinned, PolicyRequest, ReleaseCondition,
    Workload,
};
use tether_engine::ports::{Decide, NoWorkloads, WorkloadSource, WorkloadView};
use tether_engine::{Engine, EngineError, Metrics, Ports};
use tether_policy::{ChainOutcome, PolicyError};
use tether_store::embedded::EmbeddedStore;

/// Pods and owner objects, as a manifest directory or an informer cache would hold them.
#[derive(Default)]
struct Cluster {
    pods: HashMap<(String, String), Workload>,
    objects: ObjectIndex,
    /// A lookup that fails, as an API read that times out: `pod`, `owners` or `namespace`.
    unreadable: Option<&'static str>,
}

impl Cluster {
    fn fail(&self, what: &str) -> Result<(), String> {
        match self.unreadable {
            Some(w) if w == what => Err(format!("reading the {what}: timed out")),
            _ => Ok(()),
        }
    }
}

impl WorkloadView for Cluster {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Workload>, String> {
        self.fail("pod")?;
        Ok(self
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned())
    }

    fn owner_chain(
        &self,
        namespace: &str,
        owners: &[OwnerReference],
    ) -> Result<Vec<Object>, String> {
        self.fail("owners")?;
        Ok(self.objects.owner_chain(namespace, owners))
    }

    fn namespace_annotations(&self, _: &str) -> Result<Vec<(String, String)>, String> {
        self.fail("namespace")?;
        Ok(Vec::new())
    }

    fn namespace_labels(&self, _: &str) -> Result<Option<Vec<(String, String)>>, String> {
        Ok(None)
    }

    fn pod_liveness(&self, namespace: &str, name: &str, _uid: &str) -> Liveness {
        if self.pod(namespace, name).is_ok_and(|p| p.is_some()) {
            Liveness::Live
        } else {
            Liveness::Unknown
        }
    }

    fn fires(&self, _: &ReleaseCondition) -> bool {
        false
    }
}

struct Source(Arc<Cluster>);

impl WorkloadSource for Source {
    fn synced(&self) -> bool {
        true
    }

    fn view(&self) -> Arc<dyn WorkloadView> {
        self.0.clone()
    }
}

type Rule = dyn Fn(&PolicyRequest) -> Decision + Send + Sync;

/// A policy chain of one policy, `custom`, deciding by `rule`.
struct Custom(Box<Rule>);

impl Decide for Custom {
    fn decide(&self, request: &PolicyRequest) -> Result<ChainOutcome, PolicyError> {
        Ok(ChainOutcome {
            decision: (self.0)(request),
            decided_by: Some("custom".into()),
            steps: Vec::new(),
        })
    }

    fn names(&self) -> Vec<String> {
        vec!["custom".into()]
    }
}

fn controller(api_version: &str, kind: &str, name: &str) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: name.into(),
        uid: format!("uid-{kind}-{name}"),
        controller: true,
    }
}

fn object(api_version: &str, kind: &str, namespace: &str, name: &str) -> Object {
    Object {
        api_version: api_version.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{kind}-{name}"),
        ..Object::default()
    }
}

fn pod(namespace: &str, name: &str, owner: Option<OwnerReference>) -> Workload {
    Workload {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        owner_references: owner.into_iter().collect(),
        ..Workload::default()
    }
}

/// VM `default/vm-cirros` (VM, VMI, launcher pod), StatefulSet `default/web` with pod
/// `web-0`, a Deployment pod `default/cart-1`, and a bare pod `b/intruder`.
fn cluster() -> Cluster {
    let mut c = Cluster::default();
    let mut vmi = object(
        "kubevirt.io/v1",
        "VirtualMachineInstance",
        "default",
        "vm-cirros",
    );
    vmi.owner_references
        .push(controller("kubevirt.io/v1", "VirtualMachine", "vm-cirros"));
    c.objects.insert(vmi);
    c.objects.insert(object(
        "kubevirt.io/v1",
        "VirtualMachine",
        "default",
        "vm-cirros",
    ));
    let mut sts = object("apps/v1", "StatefulSet", "default", "web");
    sts.replicas = Some(2);
    c.objects.insert(sts);
    for w in [
        pod(
            "default",
            "virt-launcher-vm-cirros-abcde",
            Some(controller(
                "kubevirt.io/v1",
                "VirtualMachineInstance",
                "vm-cirros",
            )),
        ),
        pod(
            "default",
            "web-0",
            Some(controller("apps/v1", "StatefulSet", "web")),
        ),
        pod(
            "default",
            "cart-1",
            Some(controller("apps/v1", "ReplicaSet", "cart-7d9f")),
        ),
        pod("b", "intruder", None),
    ] {
        c.pods.insert((w.namespace.clone(), w.name.clone()), w);
    }
    c
}

fn pinned(identity: &str, kind: IdentityKind, may_share: bool) -> Decision {
    Decision::Pinned(Pinned {
        identity: identity.into(),
        kind,
        release: vec![ReleaseCondition::Never],
        may_share,
        pools: vec![],
    })
}

/// An engine on a fresh embedded store and pool `p`, deciding by `rule`; `cluster: None` is a
/// standalone daemon without workloads (CNI arguments only).
fn engine(
    cluster: Option<Cluster>,
    rule: impl Fn(&PolicyRequest) -> Decision + Send + Sync + 'static,
) -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
    let workloads: (Arc<dyn WorkloadSource>, bool) = match cluster {
        Some(c) => (Arc::new(Source(Arc::new(c))), true),
        None => (Arc::new(NoWorkloads), false),
    };
    let pool = Pool::new(
        "p",
        &IpPoolSpec {
            subnet: "10.0.0.0/24".into(),
            ips: vec!["10.0.0.1-10.0.0.9".into()],
            ..IpPoolSpec::default()
        },
    )
    .expect("pool");
    let (engine, _thread) = Engine::start(
        Ports {
            store,
            workloads,
            policies: Arc::new(Custom(Box::new(rule))),
        },
        vec![pool],
        Arc::new(Metrics::new()),
    )
    .expect("engine");
    (dir, Arc::new(engine))
}

fn req(namespace: &str, name: &str) -> CniRequest {
    CniRequest {
        container_id: format!("ctr-{namespace}-{name}"),
        ifname: "eth0".into(),
        network: "net".into(),
        cni_version: "1.1.0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), namespace.into()),
            ("K8S_POD_NAME".into(), name.into()),
            ("K8S_POD_UID".into(), format!("uid-{name}")),
        ],
        pools: vec!["p".into()],
        ..CniRequest::default()
    }
}

async fn add(e: &Arc<Engine>, namespace: &str, name: &str) -> Result<IpAddr, EngineError> {
    add_req(e, req(namespace, name)).await
}

async fn add_req(e: &Arc<Engine>, req: CniRequest) -> Result<IpAddr, EngineError> {
    let r = e.add(req).await?;
    let address = &r.ips[0].address;
    Ok(address
        .split('/')
        .next()
        .unwrap_or(address)
        .parse()
        .expect("an address"))
}

/// Expects the claim to be refused as a policy failure (CNI code 101) naming the policy and
/// the identity, with nothing allocated to the pod.
fn assert_refused(r: Result<IpAddr, EngineError>, identity: &str) -> String {
    let err = match r {
        Ok(ip) => panic!("the claim of {identity} was accepted: the pod got {ip}"),
        Err(err) => err,
    };
    assert_eq!(err.reason(), "policy", "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("policy custom") && msg.contains(identity),
        "the refusal names the policy and the identity: {msg}"
    );
    msg
}

fn holders(e: &Arc<Engine>, ip: IpAddr) -> Vec<String> {
    e.allocations()
        .iter()
        .filter(|a| a.ip == ip)
        .flat_map(|a| a.holders.iter().map(|h| h.attachment.describe()))
        .collect()
}

/// The reviewer's defect: a custom policy pins an unrelated pod under the running VM's
/// identity with `may_share`, and the pod joined the VM's address as a second holder.
#[tokio::test]
async fn an_unrelated_pod_cannot_join_a_vms_pin() {
    let (_dir, e) = engine(Some(cluster()), |_| {
        pinned("default/vm-cirros", IdentityKind::VirtualMachine, true)
    });
    let vm_ip = add(&e, "default", "virt-launcher-vm-cirros-abcde")
        .await
        .expect("the launcher pod is the VM's");
    // Another namespace's pod: the identity is not in its namespace.
    let r = add(&e, "b", "intruder").await;
    let msg = assert_refused(r, "default/vm-cirros");
    assert!(msg.contains("\"b/...\""), "{msg}");
    // Pods of the VM's namespace that the VM does not own.
    for name in ["cart-1", "web-0"] {
        let r = add(&e, "default", name).await;
        let msg = assert_refused(r, "default/vm-cirros");
        assert!(
            msg.contains("VirtualMachineInstance \"vm-cirros\""),
            "{msg}"
        );
    }
    assert_eq!(holders(&e, vm_ip).len(), 1, "{:?}", holders(&e, vm_ip));
    assert_eq!(e.allocations().len(), 1);
}

/// A pod of namespace `b` cannot claim a custom identity of namespace `a`; a pod of `a` can.
#[tokio::test]
async fn a_custom_identity_stays_in_its_namespace() {
    let mut c = cluster();
    let w = pod("a", "owner-pod", None);
    c.pods.insert(("a".into(), "owner-pod".into()), w);
    let (_dir, e) = engine(Some(c), |_| pinned("a/x", IdentityKind::Custom, true));
    let ip = add(&e, "a", "owner-pod").await.expect("a pod of a");
    let r = add(&e, "b", "intruder").await;
    let msg = assert_refused(r, "a/x");
    assert!(
        msg.contains("\"b/"),
        "the message says what is allowed: {msg}"
    );
    assert_eq!(holders(&e, ip).len(), 1);
}

/// A StatefulSet pod cannot claim the VirtualMachine kind, not even for its own name; it can
/// claim its own StatefulSetPod identity, not a sibling's.
#[tokio::test]
async fn a_statefulset_pod_claims_only_its_own_statefulset_pin() {
    let (_dir, e) = engine(Some(cluster()), |r| {
        let kind = match r.workload.cni_args.iter().find(|(k, _)| k == "KIND") {
            Some((_, v)) if v == "vm" => IdentityKind::VirtualMachine,
            _ => IdentityKind::StatefulSetPod,
        };
        let name = r
            .workload
            .cni_args
            .iter()
            .find(|(k, _)| k == "CLAIM")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        pinned(&name, kind, false)
    });
    let with = |claim: &str, kind: &str| {
        let mut r = req("default", "web-0");
        r.args.push(("CLAIM".into(), claim.into()));
        r.args.push(("KIND".into(), kind.into()));
        r
    };
    let r = add_req(&e, with("default/web-0", "vm")).await;
    let msg = assert_refused(r, "default/web-0");
    assert!(msg.contains("VirtualMachine"), "{msg}");
    let r = add_req(&e, with("default/web-1", "sts")).await;
    assert_refused(r, "default/web-1");
    assert!(e.allocations().is_empty());
    add_req(&e, with("default/web-0", "sts"))
        .await
        .expect("its own StatefulSetPod identity");
}

/// Without a workload source (only CNI arguments) no owner is known: a VirtualMachine or
/// StatefulSetPod claim cannot be verified and is refused, saying why; a custom identity in
/// the pod's namespace still works.
#[tokio::test]
async fn without_workloads_owned_kinds_are_refused() {
    let (_dir, e) = engine(None, |r| {
        if r.workload.namespace == "default" {
            pinned("default/vm-cirros", IdentityKind::VirtualMachine, true)
        } else {
            pinned("c/x", IdentityKind::Custom, false)
        }
    });
    let r = add(&e, "default", "virt-launcher-vm-cirros-abcde").await;
    let msg = assert_refused(r, "default/vm-cirros");
    assert!(msg.contains("owner"), "{msg}");
    add(&e, "c", "p").await.expect("custom in its namespace");
}

/// When the workload source cannot tell something the decision needs (the pod, an owner of
/// its chain, its namespace: an API read failed), the ADD is answered "try again" and nothing
/// is allocated: a guess could pin a VM's pod as ephemeral, or pick the wrong pool.
#[tokio::test]
async fn an_unreadable_workload_is_never_guessed() {
    for what in ["pod", "owners", "namespace"] {
        let mut c = cluster();
        c.unreadable = Some(what);
        let (_dir, e) = engine(Some(c), |_| Decision::Ephemeral);
        let err = add(&e, "default", "virt-launcher-vm-cirros-abcde")
            .await
            .expect_err(what);
        assert_eq!(err.reason(), "workload_unknown", "{what}: {err}");
        assert!(err.to_string().contains("try again"), "{err}");
        assert!(
            e.allocations().is_empty(),
            "{what}: something was allocated"
        );
    }
}
