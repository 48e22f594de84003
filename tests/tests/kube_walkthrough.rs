//! The seed's walkthrough in Kubernetes mode, on a real kube-apiserver v1.20.2 with its
//! controller-manager and scheduler, two nodes, each with its own `tetherd --kubernetes` and a
//! kubelet played by the test (`tether_e2e::kubelet`), KubeVirt's controllers emulated
//! (`tether_e2e::kubevirt`): a VM keeps its address when its launcher pod is recreated on the
//! other node, when its VMI is recreated, and across a live migration between the nodes; a
//! Deployment pod gets another, and the VM pings it over macvlan; a StatefulSet pod keeps its
//! address when the real controller recreates it, and frees it when scaled down, unless the
//! StatefulSet keeps addresses across scale-down (then it frees it when deleted); deleting the
//! VM frees its address; the pool runs out with code 100; a daemon restarts without losing
//! anything; VM pinning switched off makes a VM's pod ephemeral.
//!
//! As root, every pod is a network namespace wired by Debian's macvlan plugin, which delegates
//! to `tether`; both nodes' pods share one L2 segment. Without root the kubelets call `tether`
//! directly and nothing is pinged (in CI that is a failure).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod as KPod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_e2e::cluster::{Cluster, TestCluster};
use tether_e2e::kubelet::Kubelet;
use tether_e2e::kubevirt::{self, Vm};
use tether_e2e::netns::{self, Lab, Wiring};
use tether_e2e::{Daemon, Ipam, SEED_POOL};
use tether_kube::crd::{IPAllocation, IPPool, PinnedIdentity};

struct Node {
    name: &'static str,
    /// None only while it restarts.
    daemon: Option<Daemon>,
    kubelet: Kubelet,
}

struct Env {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    nodes: Vec<Node>,
    /// The pods' namespaces and L2 segment, with real interfaces.
    lab: Option<Arc<Lab>>,
}

const WAIT: Duration = Duration::from_secs(60);

/// Garbage collection at its most eager all through the walkthrough: every step must hold
/// with it looking every second and acting after two seconds (four for VMs).
const GC: [&str; 8] = [
    "--gc-interval-secs",
    "1",
    "--gc-grace-secs",
    "2",
    "--gc-vm-grace-secs",
    "4",
    "--gc-node-grace-secs",
    "2",
];

impl Env {
    fn daemon(&self, node: &str, extra: &[&str]) -> Daemon {
        let kubeconfig = self.cluster.kubeconfig.display().to_string();
        let mut args = vec![
            "--kubernetes",
            "--node-name",
            node,
            "--kubeconfig",
            &kubeconfig,
            "--lease-namespace",
            "default",
        ];
        args.extend_from_slice(&GC);
        args.extend_from_slice(extra);
        Daemon::start("", &args).expect("tetherd --kubernetes")
    }

    fn ipam(d: &Daemon) -> Ipam {
        Ipam::new(&d.socket, "macvlan-net", "1.0.0", &["test-ippool"]).expect("ipam")
    }

    /// How a node's kubelet wires its pods, through the node's daemon `d`.
    fn wiring(&self, d: &Daemon) -> Wiring {
        match &self.lab {
            Some(lab) => Wiring::Real {
                conf: lab.network("macvlan", &d.socket, "1.0.0", &["test-ippool"]),
                lab: lab.clone(),
            },
            None => Wiring::Ipam(Env::ipam(d)),
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    /// The kubelet of the node pod `name` is bound to, and the pod's UID.
    fn placed(&self, name: &str) -> (&Kubelet, String) {
        let pod = self
            .rt
            .block_on(Api::<KPod>::namespaced(self.client.clone(), "default").get(name))
            .expect("get pod");
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        (
            &self.node(&node).kubelet,
            pod.metadata.uid.unwrap_or_default(),
        )
    }

    /// Whether pod `name` reaches `ip` from its namespace; `None` without real interfaces.
    fn ping(&self, name: &str, ip: &str) -> Option<bool> {
        let (kubelet, uid) = self.placed(name);
        kubelet.ping(&uid, ip)
    }

    /// The addresses on pod `name`'s interface; `None` without real interfaces.
    fn addresses(&self, name: &str) -> Option<String> {
        let (kubelet, uid) = self.placed(name);
        kubelet
            .addresses(&uid)
            .map(|a| a.expect("the pod's addresses"))
    }

    /// The address the kubelet of the pod's node got for the pod `name` (its current UID);
    /// waits for it.
    fn ip(&self, name: &str) -> String {
        let api = Api::<KPod>::namespaced(self.client.clone(), "default");
        let deadline = Instant::now() + WAIT;
        loop {
            let pod = self.rt.block_on(api.get_opt(name)).expect("get pod");
            if let Some(p) = &pod {
                let node = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(n) = self.nodes.iter().find(|n| n.name == node)
                    && let Some(net) = n.kubelet.net(&uid)
                {
                    if let Some(ip) = net.ip {
                        return ip;
                    }
                    if let Some(f) = &net.failure
                        && Instant::now() > deadline
                    {
                        panic!("ADD of {name} failed: {}", f.out);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "pod {name} never got an address: {pod:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last failed ADD of pod `name` on `node`, waiting for one.
    fn failure(&self, name: &str, node: &str) -> tether_e2e::CniOutcome {
        let api = Api::<KPod>::namespaced(self.client.clone(), "default");
        let deadline = Instant::now() + WAIT;
        loop {
            let uid = self
                .rt
                .block_on(api.get_opt(name))
                .expect("get pod")
                .and_then(|p| p.metadata.uid)
                .unwrap_or_default();
            if let Some(f) = self.node(node).kubelet.net(&uid).and_then(|n| n.failure) {
                return f;
            }
            assert!(Instant::now() < deadline, "pod {name}'s ADD never failed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Holders of the address object of `ip`.
    fn holders(&self, ip: &str) -> usize {
        let name = tether_kube::crd::allocation_name(ip.parse().expect("ip"));
        self.rt
            .block_on(Api::<IPAllocation>::all(self.client.clone()).get_opt(&name))
            .expect("get")
            .map_or(0, |o| o.spec.holders.len())
    }

    /// Whether the address object of `ip` exists.
    fn allocated(&self, ip: &str) -> bool {
        let name = tether_kube::crd::allocation_name(ip.parse().expect("ip"));
        self.rt
            .block_on(Api::<IPAllocation>::all(self.client.clone()).get_opt(&name))
            .expect("get")
            .is_some()
    }

    /// The PinnedIdentity record `default/name`.
    fn pin(&self, name: &str) -> Option<PinnedIdentity> {
        self.rt
            .block_on(
                Api::<PinnedIdentity>::namespaced(self.client.clone(), "default").get_opt(name),
            )
            .expect("get record")
    }

    fn objects(&self) -> usize {
        self.rt
            .block_on(Api::<IPAllocation>::all(self.client.clone()).list(&ListParams::default()))
            .expect("list")
            .items
            .len()
    }

    /// Waits until `f` holds.
    fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The elected daemon's reconcile, until it releases something (or a while passes).
    fn release(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for n in &self.nodes {
                if let Some(Ok(r)) = n.daemon.as_ref().map(Daemon::reconcile)
                    && !r.is_empty()
                {
                    return r;
                }
            }
            if Instant::now() > deadline {
                return Vec::new();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every daemon's reconcile, again and again for `period`: how many answers were not an
    /// error (the elected daemon's), and everything they released.
    fn reconcile_for(&self, period: Duration) -> (usize, Vec<String>) {
        let deadline = Instant::now() + period;
        let (mut answered, mut released) = (0, Vec::new());
        while Instant::now() < deadline {
            for n in &self.nodes {
                if let Some(Ok(r)) = n.daemon.as_ref().map(Daemon::reconcile) {
                    answered += 1;
                    released.extend(r);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        (answered, released)
    }

    /// Waits until no pod holds `ip`, then has the daemons reconcile for a while: at least
    /// one (the elected) must answer, and none may release anything.
    fn kept_while_unheld(&self, ip: &str, when: &str) {
        self.until(&format!("{ip} unheld {when}"), || self.holders(ip) == 0);
        let (answered, released) = self.reconcile_for(Duration::from_secs(3));
        assert!(
            answered > 0,
            "no daemon's reconcile answered: none elected?"
        );
        assert!(
            released.is_empty(),
            "{ip} was released {when}: {released:?}"
        );
    }

    /// Waits until no pod `name` exists.
    fn gone(&self, name: &str) {
        let api = Api::<KPod>::namespaced(self.client.clone(), "default");
        self.until(&format!("{name} is gone"), || {
            self.rt.block_on(api.get_opt(name)).expect("get").is_none()
        });
    }

    fn delete_pod(&self, name: &str) {
        self.rt
            .block_on(kubevirt::delete_pod(&self.client, name))
            .expect("delete pod");
    }

    /// Deletes pod `name` and waits until one of that name with another UID exists.
    fn recreated(&self, name: &str) {
        let api = Api::<KPod>::namespaced(self.client.clone(), "default");
        let uid = |o: Option<KPod>| o.and_then(|p| p.metadata.uid);
        let before = uid(self.rt.block_on(api.get_opt(name)).expect("get"));
        self.rt
            .block_on(api.delete(name, &DeleteParams::default()))
            .expect("delete");
        self.until(&format!("{name} recreated"), || {
            let now = uid(self.rt.block_on(api.get_opt(name)).expect("get"));
            now.is_some() && now != before
        });
    }
}

#[test]
fn the_seed_walkthrough_on_two_nodes() {
    let test = "the_seed_walkthrough_on_two_nodes";
    let real = netns::real_or_fallback(
        test,
        "the kubelets call tether directly and the VM's ping is not checked",
    );
    let Some(TestCluster {
        cluster,
        rt,
        client,
    }) = TestCluster::start(test, true)
    else {
        return;
    };
    rt.block_on(kubevirt::install(&client))
        .expect("KubeVirt CRDs");
    let pool: IPPool = yaml_serde::from_str(SEED_POOL).expect("seed pool");
    rt.block_on(Api::<IPPool>::all(client.clone()).create(&PostParams::default(), &pool))
        .expect("IPPool");
    let mut env = Env {
        cluster,
        rt,
        client,
        nodes: Vec::new(),
        lab: real.then(|| Arc::new(Lab::new("tkw").expect("lab"))),
    };
    for name in ["node-a", "node-b"] {
        env.cluster.add_node(name).expect("node");
        let daemon = env.daemon(name, &[]);
        let kubelet = Kubelet::start(
            env.rt.handle(),
            env.client.clone(),
            name,
            env.wiring(&daemon),
        );
        env.nodes.push(Node {
            name,
            daemon: Some(daemon),
            kubelet,
        });
    }
    let c = env.client.clone();

    // 1. The VM starts on node-a.
    let mut vm = env
        .rt
        .block_on(Vm::start(&c, "vm-cirros", json!({})))
        .expect("vm");
    let p1 = env
        .rt
        .block_on(vm.launch("node-a", None))
        .expect("launcher");
    let vm_ip = env.ip(&p1);
    assert!(vm_ip.starts_with("10.6.168."), "{vm_ip}");

    // 2. Its launcher pod deleted and recreated (another name), on node-b. In between, no
    // pod holds the address, and the elected daemon's reconcile keeps it: the VM exists.
    env.delete_pod(&p1);
    env.kept_while_unheld(&vm_ip, "while its launcher pod was down");
    let p2 = env
        .rt
        .block_on(vm.launch("node-b", None))
        .expect("launcher");
    assert_eq!(env.ip(&p2), vm_ip, "launcher recreated on the other node");

    // 3. The VMI deleted and recreated (new UID), a new pod on node-a.
    env.rt
        .block_on(vm.recreate_vmi(&[&p2], json!({})))
        .expect("recreate vmi");
    env.kept_while_unheld(&vm_ip, "when its VMI was recreated");
    let p3 = env
        .rt
        .block_on(vm.launch("node-a", None))
        .expect("launcher");
    assert_eq!(env.ip(&p3), vm_ip, "VMI recreated");

    // 4. Live migration from node-a to node-b: both pods hold it, the source's DEL keeps it.
    let (mname, muid) = env.rt.block_on(vm.migration()).expect("migration");
    let target = env
        .rt
        .block_on(vm.launch("node-b", Some((&mname, &muid))))
        .expect("target");
    assert_eq!(env.ip(&target), vm_ip, "migration target");
    assert_eq!(env.holders(&vm_ip), 2, "source and target hold it together");
    env.delete_pod(&p3);
    env.until("the source's DEL leaves the target holding it", || {
        env.holders(&vm_ip) == 1
    });
    // The tenant's view: `kubectl get pinnedidentities -n default` shows the VM, its
    // address and the pod holding it now (the migration target).
    env.until(
        "the VM's PinnedIdentity record shows the target holding its address",
        || {
            env.pin("vm-cirros").is_some_and(|p| {
                p.spec.kind == "VirtualMachine"
                    && p.spec
                        .addresses
                        .iter()
                        .map(|a| a.address.to_string())
                        .collect::<Vec<_>>()
                        == [vm_ip.clone()]
                    && p.spec.holders == [target.clone()]
            })
        },
    );

    // 5. A Deployment's pod (real controllers, real scheduler): another address, which the VM
    // (its migration target) reaches over macvlan; freed with the pod.
    let dep: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "cart", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cart"}},
            "template": {"metadata": {"labels": {"app": "cart"}},
                "spec": {"automountServiceAccountToken": false,
                         "containers": [{"name": "c", "image": "cart"}]}}}
    }))
    .expect("deployment");
    let deps = Api::<Deployment>::namespaced(c.clone(), "default");
    env.rt
        .block_on(deps.create(&PostParams::default(), &dep))
        .expect("create deployment");
    let pods = Api::<KPod>::namespaced(c.clone(), "default");
    let mut cart = String::new();
    env.until("the Deployment's pod exists", || {
        let l = env
            .rt
            .block_on(pods.list(&ListParams::default().labels("app=cart")))
            .expect("list");
        match l.items.first().and_then(|p| p.metadata.name.clone()) {
            Some(n) => {
                cart = n;
                true
            }
            None => false,
        }
    });
    let cart = cart;
    let cart_ip = env.ip(&cart);
    assert_ne!(cart_ip, vm_ip, "a Deployment pod got the VM's address");
    if real {
        for (pod, ip) in [(&cart, &cart_ip), (&target, &vm_ip)] {
            let on_eth0 = env.addresses(pod).expect("wired for real");
            assert!(
                on_eth0.contains(&format!(" {ip}/")),
                "{pod}'s eth0 does not have {ip}: {on_eth0:?}"
            );
        }
        assert_eq!(
            env.ping(&target, &cart_ip),
            Some(true),
            "the VM's pod {target} pings cart at {cart_ip} over macvlan"
        );
    }
    let before = env.objects();
    env.rt
        .block_on(deps.delete("cart", &DeleteParams::foreground()))
        .expect("delete deployment");
    env.until("the Deployment pod's address is freed", || {
        env.objects() == before - 1
    });

    // 6. A StatefulSet (real controller): web-0 recreated keeps its address; scaled to 0, freed.
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 1, "serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"automountServiceAccountToken": false,
                         "containers": [{"name": "c", "image": "web"}]}}}
    }))
    .expect("sts");
    let stss = Api::<StatefulSet>::namespaced(c.clone(), "default");
    env.rt
        .block_on(stss.create(&PostParams::default(), &sts))
        .expect("create sts");
    let web_ip = env.ip("web-0");
    env.recreated("web-0");
    assert_eq!(env.ip("web-0"), web_ip, "web-0 recreated by its controller");
    env.rt
        .block_on(stss.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        ))
        .expect("scale to 0");
    env.gone("web-0");
    assert_eq!(
        env.release(),
        [format!("test-ippool/{web_ip}")],
        "scaled below web-0"
    );

    // 7. A StatefulSet that keeps addresses across scale-down (real controller): scaled to 0,
    // keep-0's address stays; scaled back to 1, keep-0 has it again; deleted, it is freed.
    let keep: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "keep", "namespace": "default",
            "annotations": {"ipam.tether.dev/keep-ips-on-scale-down": "true"}},
        "spec": {"replicas": 1, "serviceName": "keep", "selector": {"matchLabels": {"app": "keep"}},
            "template": {"metadata": {"labels": {"app": "keep"}},
                "spec": {"automountServiceAccountToken": false,
                         "containers": [{"name": "c", "image": "keep"}]}}}
    }))
    .expect("sts");
    env.rt
        .block_on(stss.create(&PostParams::default(), &keep))
        .expect("create sts");
    let keep_ip = env.ip("keep-0");
    let scale = |replicas: i32| {
        env.rt
            .block_on(stss.patch(
                "keep",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            ))
            .expect("scale keep");
    };
    scale(0);
    env.gone("keep-0");
    env.until("keep-0's DEL leaves its address unheld", || {
        env.holders(&keep_ip) == 0
    });
    let (answered, released) = env.reconcile_for(Duration::from_secs(5));
    assert!(
        answered > 0,
        "no daemon's reconcile answered: none elected?"
    );
    assert!(
        released.is_empty(),
        "scaled to 0, a StatefulSet that keeps addresses across scale-down lost keep-0's \
         {keep_ip}: released {released:?}"
    );
    assert!(
        env.allocated(&keep_ip),
        "keep-0's {keep_ip} is not allocated"
    );
    scale(1);
    assert_eq!(env.ip("keep-0"), keep_ip, "keep-0 back after a scale to 0");
    env.rt
        .block_on(stss.delete("keep", &DeleteParams::default()))
        .expect("delete sts");
    env.gone("keep-0");
    assert_eq!(
        env.release(),
        [format!("test-ippool/{keep_ip}")],
        "StatefulSet keep deleted"
    );

    // 8. A daemon restarts: nothing is lost; the VM's address is still the VM's.
    let objects = env.objects();
    let idx = env
        .nodes
        .iter()
        .position(|n| n.name == "node-b")
        .expect("node-b");
    let old = env.nodes[idx].daemon.take().expect("node-b's daemon");
    old.stop().expect("stop node-b's daemon");
    let fresh = env.daemon("node-b", &[]);
    env.nodes[idx].kubelet.set_ipam(Env::ipam(&fresh));
    env.nodes[idx].daemon = Some(fresh);
    assert_eq!(
        env.objects(),
        objects,
        "the restart changed the address objects"
    );
    assert_eq!(env.holders(&vm_ip), 1);

    // 9. The VM deleted: its address is released by the elected daemon.
    env.rt.block_on(vm.delete(&[&target])).expect("delete vm");
    assert_eq!(
        env.release(),
        [format!("test-ippool/{vm_ip}")],
        "VM deleted"
    );
    assert_eq!(env.objects(), 0, "every address is back");
    env.until("the VM's PinnedIdentity record is removed", || {
        env.pin("vm-cirros").is_none()
    });

    // 10. The pool runs out: code 100, a message a person can act on.
    let total = 10;
    let mut fillers = Vec::new();
    for i in 0..total {
        let name = format!("filler-{i}");
        let p: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": if i % 2 == 0 { "node-a" } else { "node-b" },
                "automountServiceAccountToken": false, "containers": [{"name": "c", "image": "x"}]}
        }))
        .expect("pod");
        env.rt
            .block_on(pods.create(&PostParams::default(), &p))
            .expect("filler");
        fillers.push(name);
    }
    for f in &fillers {
        env.ip(f);
    }
    let p: KPod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "one-too-many", "namespace": "default"},
        "spec": {"nodeName": "node-a", "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "x"}]}
    }))
    .expect("pod");
    env.rt
        .block_on(pods.create(&PostParams::default(), &p))
        .expect("one too many");
    let f = env.failure("one-too-many", "node-a");
    assert_eq!(f.code(), Some(100), "{}", f.out);
    assert!(
        f.out["msg"].as_str().unwrap_or("").contains("exhausted"),
        "{}",
        f.out
    );
    for name in fillers.iter().chain([&"one-too-many".to_owned()]) {
        env.delete_pod(name);
    }
    env.until("every filler's address is back", || env.objects() == 0);

    // 11. VM pinning switched off (the chart's ipam.enableKubevirtStaticIP=false) on both
    // nodes: a VM's pod is stateless, its address freed with its pod.
    for idx in 0..env.nodes.len() {
        let old = env.nodes[idx].daemon.take().expect("daemon");
        old.stop().expect("stop");
        let fresh = env.daemon(env.nodes[idx].name, &["--enable-kubevirt-static-ip=false"]);
        env.nodes[idx].kubelet.set_ipam(Env::ipam(&fresh));
        env.nodes[idx].daemon = Some(fresh);
    }
    let mut vm = env
        .rt
        .block_on(Vm::start(&c, "vm-off", json!({})))
        .expect("vm");
    let g = env
        .rt
        .block_on(vm.launch("node-a", None))
        .expect("launcher");
    let g_ip = env.ip(&g);
    let name = tether_kube::crd::allocation_name(g_ip.parse().expect("ip"));
    let owner = env
        .rt
        .block_on(Api::<IPAllocation>::all(c.clone()).get(&name))
        .expect("object")
        .to_allocation()
        .expect("allocation")
        .owner;
    assert_eq!(
        owner,
        tether_core::alloc::Owner::Ephemeral,
        "VM pinning is off"
    );
    env.delete_pod(&g);
    env.until("the VM pod's address is freed with it", || {
        env.objects() == 0
    });
    env.rt.block_on(vm.delete(&[])).expect("delete vm");

    // 12. A missed DEL: node-b's kubelet dies with a pod on node-b, which is then
    // force-deleted; no DEL ever comes. The elected daemon's garbage collection frees its
    // address once it has looked gone for the grace period.
    let p: KPod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan", "namespace": "default"},
        "spec": {"nodeName": "node-b", "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "x"}]}
    }))
    .expect("pod");
    env.rt
        .block_on(pods.create(&PostParams::default(), &p))
        .expect("orphan");
    let orphan_ip = env.ip("orphan");
    env.node("node-b").kubelet.stop();
    let deleted = Instant::now();
    env.rt
        .block_on(pods.delete("orphan", &DeleteParams::default().grace_period(0)))
        .expect("force delete");
    env.until(
        "the orphan's address is freed by garbage collection",
        || !env.allocated(&orphan_ip),
    );
    assert!(
        deleted.elapsed() >= Duration::from_secs(2),
        "freed {:?} after its pod went, before the grace",
        deleted.elapsed()
    );
    drop(env);
}
