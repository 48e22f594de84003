//! `tetherd run --kubernetes` on a real kube-apiserver (v1.20.2), two nodes, each its own
//! daemon, through the real `tether` plugin: addresses are IPAllocation objects shared by
//! both, pools are IPPool objects, and pods and their owners come from the API server.
//!
//! No controller-manager runs here: the test creates the pods as the controllers would (with
//! their owner references) and plays each node's kubelet (CNI ADD/DEL).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event as KEvent;
use k8s_openapi::api::core::v1::{Pod as KPod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_e2e::cluster::{Cluster, TestCluster};
use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, within};
use tether_kube::crd::{IPAllocation, IPPool, IPPoolStatus, PinnedIdentity, allocation_name};

/// The apiserver, a runtime to talk to it, and a client.
struct Env {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Env {
    fn start(test: &str) -> Option<Env> {
        let TestCluster {
            cluster,
            rt,
            client,
        } = TestCluster::with_pool(test, SEED_POOL)?;
        Some(Env {
            cluster,
            rt,
            client,
        })
    }

    /// A tetherd for node `node`.
    fn daemon(&self, node: &str) -> Daemon {
        self.daemon_with(node, &[])
    }

    /// A tetherd for node `node`, with more flags.
    fn daemon_with(&self, node: &str, extra: &[&str]) -> Daemon {
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
        args.extend_from_slice(extra);
        Daemon::start("", &args).expect("tetherd --kubernetes")
    }

    /// Creates a pod bound to `node` (as the scheduler leaves it), owned by `owner` if given;
    /// returns it as the plugin's caller sees it (with the API server's UID).
    fn pod(&self, ns: &str, name: &str, node: &str, owner: Option<serde_json::Value>) -> Pod {
        self.pod_annotated(ns, name, node, owner, json!({}))
    }

    /// [`Env::pod`] with annotations.
    fn pod_annotated(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        owner: Option<serde_json::Value>,
        annotations: serde_json::Value,
    ) -> Pod {
        let mut meta = json!({"name": name, "namespace": ns, "annotations": annotations});
        if let Some(o) = owner {
            meta["ownerReferences"] = json!([o]);
        }
        let p: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "pause"}]}
        }))
        .expect("pod");
        let created = self
            .rt
            .block_on(
                Api::<KPod>::namespaced(self.client.clone(), ns).create(&PostParams::default(), &p),
            )
            .expect("create pod");
        let uid = created.metadata.uid.expect("uid");
        let mut pod = Pod::new(ns, name, 0);
        pod.container_id = format!("ctr-{name}-{}", &uid[..8]);
        pod.uid = uid;
        pod
    }

    fn delete_pod(&self, ns: &str, name: &str) {
        self.rt
            .block_on(
                Api::<KPod>::namespaced(self.client.clone(), ns)
                    .delete(name, &DeleteParams::default().grace_period(0)),
            )
            .expect("delete pod");
    }

    /// The node whose daemon holds the releasers' Lease (waits for one to).
    fn leader(&self) -> String {
        let api = Api::<Lease>::namespaced(self.client.clone(), "default");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let holder = self
                .rt
                .block_on(api.get_opt("tether-releaser"))
                .expect("lease")
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
                .filter(|h| !h.is_empty());
            match holder {
                Some(h) => return h,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                None => panic!("no daemon took the releasers' Lease"),
            }
        }
    }

    /// Waits until IPPool `name`'s status satisfies `want`; returns it.
    fn pool_status(&self, name: &str, want: impl Fn(&IPPoolStatus) -> bool) -> IPPoolStatus {
        let api = Api::<IPPool>::all(self.client.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self
                .rt
                .block_on(api.get(name))
                .expect("pool")
                .status
                .unwrap_or_default();
            if want(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "IPPool {name} status never as expected: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn create_pool(&self, yaml: &str) {
        let pool: IPPool = yaml_serde::from_str(yaml).expect("pool yaml");
        self.rt
            .block_on(Api::<IPPool>::all(self.client.clone()).create(&PostParams::default(), &pool))
            .expect("create IPPool");
    }

    /// Waits until the PinnedIdentity record `ns/name` (None: its absence) satisfies `want`;
    /// returns it.
    fn pin(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        want: impl Fn(Option<&PinnedIdentity>) -> bool,
    ) -> Option<PinnedIdentity> {
        let api = Api::<PinnedIdentity>::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.rt.block_on(api.get_opt(name)).expect("get record");
            if want(o.as_ref()) {
                return o;
            }
            assert!(
                Instant::now() < deadline,
                "PinnedIdentity {ns}/{name} never {what}: {o:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates StatefulSet `default/name` with `replicas`; its API and the owner reference
    /// its pods carry.
    fn statefulset(&self, name: &str, replicas: u32) -> (Api<StatefulSet>, serde_json::Value) {
        let sts: StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicas": replicas, "serviceName": name,
                     "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "pause"}]}}}
        }))
        .expect("sts");
        let api = Api::<StatefulSet>::namespaced(self.client.clone(), "default");
        let sts = self
            .rt
            .block_on(api.create(&PostParams::default(), &sts))
            .expect("create sts");
        let owner = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
            "uid": sts.metadata.uid.expect("uid"), "controller": true});
        (api, owner)
    }

    /// Starts KubeVirt VM `name` (its VM and VMI objects).
    fn vm(&self, name: &str) -> tether_e2e::kubevirt::Vm {
        self.rt
            .block_on(tether_e2e::kubevirt::Vm::start(
                &self.client,
                name,
                json!({}),
            ))
            .expect("vm")
    }

    /// Creates a launcher pod of `vm` on `node` (a migration target with `migration`), with
    /// `extra` annotations; its name.
    fn launch(
        &self,
        vm: &mut tether_e2e::kubevirt::Vm,
        node: &str,
        migration: Option<(&str, &str)>,
        extra: serde_json::Value,
    ) -> String {
        self.rt
            .block_on(vm.launch_with(node, migration, extra))
            .expect("launcher")
    }

    /// The IPAllocation objects, by name.
    fn objects(&self) -> Vec<IPAllocation> {
        self.rt
            .block_on(Api::<IPAllocation>::all(self.client.clone()).list(&ListParams::default()))
            .expect("list")
            .items
    }
}

fn add(ipam: &Ipam, pod: &Pod) -> String {
    let out = ipam.add(pod).expect("add");
    assert!(out.ok, "ADD {}: {}", pod.name, out.out);
    out.ip().expect("an address")
}

#[test]
fn two_nodes_share_the_pool_through_the_api_server() {
    let test = "two_nodes_share_the_pool_through_the_api_server";
    let Some(env) = Env::start(test) else {
        return;
    };
    // Elected garbage collection off: CNI GC alone frees node-a's stale attachments below.
    let gc = ["--gc-interval-secs", "0", "--gc-grace-secs", "2"];
    let a = env.daemon_with("node-a", &gc);
    let b = env.daemon_with("node-b", &gc);
    let ipam_a = Ipam::new(&a.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let ipam_b = Ipam::new(&b.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    // One of them is elected to apply release rules; the other refuses to.
    let (lead, other, other_ipam, other_node) = match env.leader().as_str() {
        "node-a" => (&a, &b, &ipam_b, "node-b"),
        "node-b" => (&b, &a, &ipam_a, "node-a"),
        h => panic!("the Lease is held by {h:?}"),
    };
    let refused = other
        .reconcile()
        .expect_err("a daemon not elected applied release rules");
    assert!(refused.to_string().contains("Lease"), "{refused:#}");

    // A stateless pod on each node: distinct addresses, each an object named by its address.
    let p1 = env.pod("default", "web-1", "node-a", None);
    let p2 = env.pod("default", "web-2", "node-b", None);
    let ip1 = add(&ipam_a, &p1);
    let ip2 = add(&ipam_b, &p2);
    assert_ne!(ip1, ip2, "two nodes handed out one address");
    let names: HashSet<String> = env
        .objects()
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    for ip in [&ip1, &ip2] {
        let name = allocation_name(ip.parse().expect("ip"));
        assert!(
            names.contains(&name),
            "no object {name} for {ip}: {names:?}"
        );
    }
    // DEL frees the object; the other node may then hand the address out.
    assert!(ipam_a.del(&p1).expect("del").ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.objects().len() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.objects().len(), 1, "web-1's object outlived its DEL");

    // A StatefulSet pod keeps its address across nodes: db-0 on node-a, then recreated on
    // node-b (new UID), gets the same address from the other daemon.
    let (sts_api, owner) = env.statefulset("db", 1);
    let db0 = env.pod("default", "db-0", "node-a", Some(owner.clone()));
    let db_ip = add(&ipam_a, &db0);
    assert!(ipam_a.del(&db0).expect("del").ok);
    env.delete_pod("default", "db-0");
    let db0_again = env.pod("default", "db-0", "node-b", Some(owner));
    assert_eq!(
        add(&ipam_b, &db0_again),
        db_ip,
        "db-0 recreated on another node lost its address"
    );

    // db-0's PinnedIdentity record, derived from its address object by the elected daemon:
    // its address and its holder; repaired when deleted or edited by hand.
    let addresses = |o: &PinnedIdentity| -> Vec<String> {
        o.spec
            .addresses
            .iter()
            .map(|a| a.address.to_string())
            .collect()
    };
    let record = env
        .pin("default", "db-0", "shows db-0 holding its address", |o| {
            o.is_some_and(|o| addresses(o) == [db_ip.clone()] && o.spec.holders == ["db-0"])
        })
        .expect("record");
    assert_eq!(record.spec.kind, "StatefulSetPod");
    assert_eq!(record.spec.identity, "default/db-0");
    let pins = Api::<PinnedIdentity>::namespaced(env.client.clone(), "default");
    env.rt
        .block_on(pins.delete("db-0", &DeleteParams::default()))
        .expect("delete the record by hand");
    let again = env
        .pin(
            "default",
            "db-0",
            "re-created after a delete by hand",
            |o| {
                o.is_some_and(|o| {
                    o.metadata.uid != record.metadata.uid && addresses(o) == [db_ip.clone()]
                })
            },
        )
        .expect("record");
    env.rt
        .block_on(pins.patch(
            "db-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"addresses": [], "holders": ["nobody"]}})),
        ))
        .expect("edit the record by hand");
    env.pin("default", "db-0", "repaired after an edit by hand", |o| {
        o.is_some_and(|o| {
            o.metadata.uid == again.metadata.uid
                && addresses(o) == [db_ip.clone()]
                && o.spec.holders == ["db-0"]
        })
    });
    assert!(ipam_b.del(&db0_again).expect("del").ok);
    env.delete_pod("default", "db-0");
    env.pin("default", "db-0", "shows no holder after DEL", |o| {
        o.is_some_and(|o| addresses(o) == [db_ip.clone()] && o.spec.holders.is_empty())
    });

    // Scaled to zero: the release rule fires, from the API server's word.
    assert!(
        lead.reconcile().expect("reconcile").is_empty(),
        "released while the StatefulSet still wants db-0"
    );
    env.rt
        .block_on(sts_api.patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        ))
        .expect("scale to 0");
    // The daemon's cache may lag the patch by a moment; the API server has the last word.
    let deadline = Instant::now() + Duration::from_secs(10);
    let released = loop {
        let released = lead.reconcile().expect("reconcile");
        if !released.is_empty() || Instant::now() > deadline {
            break released;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(released, [format!("test-ippool/{db_ip}")], "{}", lead.log());
    env.pin(
        "default",
        "db-0",
        "removed once its address was released",
        |o| o.is_none(),
    );

    // Both nodes at once, four pods each, competing for the same free addresses.
    let pods_a: Vec<Pod> = (0..4)
        .map(|i| env.pod("default", &format!("a-{i}"), "node-a", None))
        .collect();
    let pods_b: Vec<Pod> = (0..4)
        .map(|i| env.pod("default", &format!("b-{i}"), "node-b", None))
        .collect();
    let (ips_a, ips_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| pods_a.iter().map(|p| add(&ipam_a, p)).collect::<Vec<_>>());
        let tb = s.spawn(|| pods_b.iter().map(|p| add(&ipam_b, p)).collect::<Vec<_>>());
        (ta.join().expect("node-a"), tb.join().expect("node-b"))
    });
    let all: Vec<&String> = ips_a.iter().chain(&ips_b).chain([&ip2]).collect();
    let distinct: HashSet<&&String> = all.iter().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "an address handed out twice: {all:?}"
    );
    assert_eq!(env.objects().len(), all.len(), "one object per address");

    // Metrics for the API calls, the caches and their sync state.
    let text = a.client().get_text("/metrics").expect("metrics");
    for want in [
        "tether_kube_api_calls_total{verb=\"create\",result=\"ok\"}",
        "tether_kube_cache_synced{resource=\"v1/Pod\"} 1",
        "tether_kube_cache_objects{resource=\"apps/v1/StatefulSet\"} 1",
    ] {
        assert!(text.contains(want), "no {want} in:\n{text}");
    }

    // The elected daemon writes the pool's counts, as `kubectl get ippools` shows them,
    // including what the other daemon allocated after the elected one last did anything.
    let extra = env.pod("default", "extra", other_node, None);
    let extra_ip = add(other_ipam, &extra);
    let mut all = all;
    all.push(&extra_ip);
    let used = i64::try_from(all.len()).expect("count");
    let ready = |s: &IPPoolStatus, status: &str, reason: &str| {
        s.conditions
            .first()
            .is_some_and(|c| c.type_ == "Ready" && c.status == status && c.reason == reason)
    };
    env.pool_status("test-ippool", |s| {
        s.allocated_ip_count == used && s.total_ip_count == 10 && ready(s, "True", "Serving")
    });

    // An invalid pool serves nothing and says why, with an Event.
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: bad}\nspec: {subnet: 10.7.0.0/16, ips: [10.8.0.1-10.8.0.9]}\n",
    );
    let bad = env.pool_status("bad", |s| ready(s, "False", "Invalid"));
    assert!(!bad.conditions[0].message.is_empty());
    let events = Api::<KEvent>::namespaced(env.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env
        .rt
        .block_on(events.list(&ListParams::default()))
        .expect("events")
        .items
        .iter()
        .any(|e| {
            e.involved_object.name.as_deref() == Some("bad")
                && e.reason.as_deref() == Some("Invalid")
        })
    {
        assert!(Instant::now() < deadline, "no Event for the invalid pool");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A pool created over a serving one serves nothing; the older one keeps serving.
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: shadow}\nspec: {subnet: 10.6.0.0/16, ips: [10.6.168.110-10.6.168.120]}\n",
    );
    env.pool_status("shadow", |s| ready(s, "False", "Overlaps"));
    env.pool_status("test-ippool", |s| ready(s, "True", "Serving"));
    // The pool is full; the extra pod goes, and its address is free again for anyone.
    assert!(other_ipam.del(&extra).expect("del").ok);
    all.pop();
    let late = env.pod("default", "late", "node-a", None);
    let late_ip = add(&ipam_a, &late);
    assert!(!all.contains(&&late_ip), "{late_ip} handed out twice");

    // CNI GC on node-a, whose runtime lists only `late`. Pods a-0..a-2 and b-0..b-3 were
    // deleted without their DELs; a-3's pod still exists (its sandbox is not listed, and no
    // other sandbox of it is: the list alone frees nothing).
    for p in ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2", "b-3"] {
        env.delete_pod("default", p);
    }
    let mut conf = ipam_a.conf.clone();
    conf["cniVersion"] = json!("1.1.0");
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": late.container_id, "ifname": "eth0"}]);
    let left = || -> HashSet<String> {
        env.objects()
            .iter()
            .map(|o| o.spec.address.to_string())
            .collect()
    };
    let before = left();
    // The first GC only finds them: nothing is freed on one look.
    let o = tether_e2e::cni_exec(&ipam_a.plugin, "GC", &conf, &[], "").expect("gc");
    assert!(o.ok, "{}", o.out);
    assert_eq!(left(), before, "CNI GC freed on its first look");
    // A grace period (2 s here) later, node-a's unlisted attachments whose pods are gone are
    // freed; a-3 is kept, node-b's are not node-a's to judge, and `late` is listed.
    std::thread::sleep(Duration::from_millis(2200));
    let o = tether_e2e::cni_exec(&ipam_a.plugin, "GC", &conf, &[], "").expect("gc");
    assert!(o.ok, "{}", o.out);
    let want: HashSet<String> = ips_b
        .iter()
        .chain([&ip2, &late_ip, &ips_a[3]])
        .cloned()
        .collect();
    assert_eq!(
        left(),
        want,
        "node-a's GC freed another node's address, a live pod's or a listed one, or kept its own stale ones"
    );
    // An Event for each, posted a moment after.
    within(10, "an Event for each address CNI GC freed", || {
        let events = env.gc_events();
        ips_a[..3].iter().all(|ip| {
            events
                .iter()
                .any(|(r, m)| r == "AddressReleased" && m.contains(&format!("/{ip} (pod-gone)")))
        })
    });
    drop((a, b));
}

/// Which pools an ADD draws from, in Kubernetes mode: the pod's annotation (read from the API
/// server, not the CNI call), then the namespace's, then the CNI config, then the pools marked
/// default.
#[test]
fn pools_are_chosen_by_pod_and_namespace_annotations_cni_config_and_default() {
    let test = "pools_are_chosen_by_pod_and_namespace_annotations_cni_config_and_default";
    let Some(env) = Env::start(test) else {
        return;
    };
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: other}\nspec: {subnet: 10.7.0.0/16, ips: [10.7.0.1-10.7.0.9]}\n",
    );
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: fallback}\nspec: {subnet: 10.8.0.0/16, ips: [10.8.0.1-10.8.0.9], default: true}\n",
    );
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({
        "metadata": {"name": "special", "annotations": {"ipam.tether.dev/default-ippool": "other"}}
    }))
    .expect("namespace");
    env.rt
        .block_on(
            Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone())
                .create(&PostParams::default(), &ns),
        )
        .expect("create namespace");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
    env.rt
        .block_on(
            Api::<ServiceAccount>::namespaced(env.client.clone(), "special")
                .create(&PostParams::default(), &sa),
        )
        .expect("ServiceAccount");
    // A pinned address object as a version before identity labels wrote it: the elected
    // daemon labels it, so that a lagging node's identity check can find it.
    let old: IPAllocation = serde_json::from_value(json!({
        "apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPAllocation",
        "metadata": {"name": "10-7-0-9"},
        "spec": {"pool": "other", "address": "10.7.0.9", "network": "net", "interface": "eth0",
                 "owner": {"kind": "VirtualMachine", "name": "default/old-vm", "release": ["never"]}}
    }))
    .expect("old object");
    env.rt
        .block_on(Api::<IPAllocation>::all(env.client.clone()).create(&PostParams::default(), &old))
        .expect("create the old object");
    let d = env.daemon("node-a");
    // Wait until the pools are in force (the watch puts them in 200 ms after they settle).
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.usage("fallback").is_err() || d.usage("other").is_err() {
        assert!(
            Instant::now() < deadline,
            "pools never in force: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let with_config = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let without = Ipam::new(&d.socket, "net", "1.0.0", &[]).expect("ipam");

    let annotated = env.pod_annotated(
        "default",
        "annotated",
        "node-a",
        None,
        json!({"ipam.tether.dev/ippool": "other"}),
    );
    assert!(
        add(&with_config, &annotated).starts_with("10.7.0."),
        "pod annotation"
    );
    let plain = env.pod("default", "plain", "node-a", None);
    assert!(
        add(&with_config, &plain).starts_with("10.6.168."),
        "CNI config"
    );
    let in_special = env.pod("special", "in-special", "node-a", None);
    assert!(
        add(&with_config, &in_special).starts_with("10.7.0."),
        "namespace annotation over CNI config"
    );
    let bare = env.pod("default", "bare", "node-a", None);
    let bare_ip = add(&without, &bare);
    assert!(bare_ip.starts_with("10.8.0."), "the pool marked default");

    // Selectors: a pool with a nodeSelector serves only the nodes it matches (from the Node
    // object's labels, watched); one with a namespaceSelector only the namespaces it
    // matches; a default pool that may not serve a pod is passed over.
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: zoned}\nspec: {subnet: 10.9.0.0/16, ips: [10.9.0.1-10.9.0.9], nodeSelector: {matchLabels: {zone: b}}}\n",
    );
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: tenants}\nspec: {subnet: 10.10.0.0/16, ips: [10.10.0.1-10.10.0.9], namespaceSelector: {matchExpressions: [{key: tenant, operator: In, values: [blue, green]}]}}\n",
    );
    env.create_pool(
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: a-zoned-default}\nspec: {subnet: 10.11.0.0/16, ips: [10.11.0.1-10.11.0.9], default: true, nodeSelector: {matchLabels: {zone: c}}}\n",
    );
    env.cluster.add_node("node-a").expect("node-a");
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(env.client.clone());
    let label_node = |zone: &str| {
        env.rt
            .block_on(nodes.patch(
                "node-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"zone": zone}}})),
            ))
            .expect("label node-a");
    };
    label_node("a");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ["zoned", "tenants", "a-zoned-default"]
        .iter()
        .any(|p| d.usage(p).is_err())
    {
        assert!(
            Instant::now() < deadline,
            "pools never in force: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Refused, as long as it does not match; served once it does (the daemon watches).
    let refused_until = |pod: &Pod, want: &str, fix: &dyn Fn()| -> String {
        let out = with_config.add(pod).expect("add");
        assert_eq!(out.code(), Some(102), "{}", out.out);
        let msg = out.out["msg"].as_str().unwrap_or_default().to_owned();
        assert!(msg.contains(want), "{msg}");
        fix();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = with_config.add(pod).expect("add");
            if out.ok {
                return out.ip().expect("ip");
            }
            assert!(Instant::now() < deadline, "never served: {}", out.out);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let zoned = env.pod_annotated(
        "default",
        "zoned",
        "node-a",
        None,
        json!({"ipam.tether.dev/ippool": "zoned"}),
    );
    let ip = refused_until(
        &zoned,
        "its nodeSelector (zone=b) does not match node \"node-a\"",
        &|| label_node("b"),
    );
    assert!(ip.starts_with("10.9.0."), "{ip}");
    let tenant = env.pod_annotated(
        "special",
        "tenant",
        "node-a",
        None,
        json!({"ipam.tether.dev/ippool": "tenants"}),
    );
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone());
    let ip = refused_until(
        &tenant,
        "its namespaceSelector (tenant in (blue,green)) does not match namespace \"special\"",
        &|| {
            env.rt
                .block_on(namespaces.patch(
                    "special",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"tenant": "green"}}})),
                ))
                .expect("label namespace");
        },
    );
    assert!(ip.starts_with("10.10.0."), "{ip}");
    // Two default pools; the first by name (a-zoned-default) wants zone c: passed over.
    let bare2 = env.pod("default", "bare2", "node-a", None);
    let bare2_ip = add(&without, &bare2);
    assert!(bare2_ip.starts_with("10.8.0."), "{bare2_ip}");

    // `tetherd pools` and `tetherd allocations` read a Kubernetes-mode daemon as they read a
    // standalone one.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(tether_e2e::bin_dir().expect("bin").join("tetherd"))
            .args(args)
            .arg("--socket")
            .arg(&d.socket)
            .output()
            .expect("run tetherd");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pools = cli(&["pools"]);
    for name in ["test-ippool", "other", "fallback"] {
        assert!(
            pools.contains(name),
            "{name} missing from `tetherd pools`:\n{pools}"
        );
    }
    let want = tether_kube::crd::identity_label(
        tether_core::IdentityKind::VirtualMachine,
        "default/old-vm",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let labels = env
            .rt
            .block_on(Api::<IPAllocation>::all(env.client.clone()).get("10-7-0-9"))
            .expect("old object")
            .metadata
            .labels
            .unwrap_or_default();
        if labels.get(tether_kube::crd::IDENTITY_LABEL) == Some(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old object was never labelled: {labels:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let allocations = cli(&["allocations"]);
    assert!(
        allocations.contains(&bare_ip),
        "`tetherd allocations`:\n{allocations}"
    );
}

/// The plugin's view of a pod that exists (created by a helper): its UID from the API server.
fn existing(env: &Env, name: &str) -> Pod {
    let p = env
        .rt
        .block_on(Api::<KPod>::namespaced(env.client.clone(), "default").get(name))
        .expect("get pod");
    let uid = p.metadata.uid.expect("uid");
    let mut pod = Pod::new("default", name, 0);
    pod.container_id = format!("ctr-{name}-{}", &uid[..8]);
    pod.uid = uid;
    pod
}

impl Env {
    /// The addresses that have an object.
    fn addresses(&self) -> HashSet<String> {
        self.objects()
            .iter()
            .map(|o| o.spec.address.to_string())
            .collect()
    }

    /// The holders of `ip`'s object by pod name; `None` when it has none.
    fn holders_of(&self, ip: &str) -> Option<Vec<String>> {
        self.objects()
            .into_iter()
            .find(|o| o.spec.address.to_string() == ip)
            .map(|o| o.spec.holders.iter().map(|h| h.pod.clone()).collect())
    }

    /// The Events garbage collection left, as (reason, message).
    fn gc_events(&self) -> Vec<(String, String)> {
        self.rt
            .block_on(
                Api::<KEvent>::namespaced(self.client.clone(), "default")
                    .list(&ListParams::default()),
            )
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.involved_object.kind.as_deref() == Some("IPAllocation"))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    /// Marks Node `name` not ready since now, as the node lifecycle controller does when its
    /// kubelet stops posting status.
    fn node_not_ready(&self, name: &str) {
        use k8s_openapi::api::core::v1::Node;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        self.rt
            .block_on(Api::<Node>::all(self.client.clone()).patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown",
                    "reason": "NodeStatusUnknown", "lastHeartbeatTime": now, "lastTransitionTime": now}]}})),
            ))
            .expect("node status");
    }

    /// Deletes a pod gracefully: on a node whose kubelet is gone it stays, being deleted.
    fn delete_pod_gracefully(&self, name: &str) {
        self.rt
            .block_on(
                Api::<KPod>::namespaced(self.client.clone(), "default")
                    .delete(name, &DeleteParams::default()),
            )
            .expect("delete pod");
    }
}

/// Garbage collection on the real API server, two nodes: a pod force-deleted without its DEL
/// is freed after the grace period and not before; node-b lost (its daemon killed, its Node
/// not ready) with a VM, an ephemeral pod and a StatefulSet replica on it: the ephemeral
/// address is freed, the VM's is kept and follows the VM to node-a, the replica scaled down
/// meanwhile is freed; live pods, on node-a and on the lost node, keep theirs. Each release
/// leaves an Event, a log line and a count.
#[test]
fn garbage_collection_frees_what_no_pod_uses_and_nothing_live() {
    let test = "garbage_collection_frees_what_no_pod_uses_and_nothing_live";
    let Some(env) = Env::start(test) else {
        return;
    };
    env.rt
        .block_on(tether_e2e::kubevirt::install(&env.client))
        .expect("KubeVirt CRDs");
    for n in ["node-a", "node-b"] {
        env.cluster.add_node(n).expect("node");
    }
    const GRACE: u64 = 4;
    let gc = [
        "--gc-interval-secs",
        "1",
        "--gc-grace-secs",
        "4",
        "--gc-vm-grace-secs",
        "8",
        "--gc-node-grace-secs",
        "3",
    ];
    // node-a first, so that it holds the Lease and keeps it when node-b is lost.
    let a = env.daemon_with("node-a", &gc);
    assert_eq!(env.leader(), "node-a");
    let b = env.daemon_with("node-b", &gc);
    let ipam_a = Ipam::new(&a.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let ipam_b = Ipam::new(&b.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");

    // Live pods on both nodes, never to be freed.
    let live_a = env.pod("default", "live-a", "node-a", None);
    let live_a_ip = add(&ipam_a, &live_a);
    let live_b = env.pod("default", "live-b", "node-b", None);
    let live_b_ip = add(&ipam_b, &live_b);

    // 1. A pod force-deleted, its DEL never sent: freed a grace period after it is first
    // found gone, not before.
    let cart = env.pod("default", "cart", "node-a", None);
    let cart_ip = add(&ipam_a, &cart);
    env.delete_pod("default", "cart");
    let took = within(30, "the missed DEL's address freed", || {
        !env.addresses().contains(&cart_ip)
    });
    assert!(
        took >= Duration::from_secs(GRACE),
        "freed {took:?} after the pod was deleted, before the {GRACE}s grace"
    );
    within(10, "an Event naming the pod", || {
        env.gc_events().iter().any(|(r, m)| {
            r == "AddressReleased"
                && m.contains(&cart_ip)
                && m.contains("default/cart")
                && m.contains("pod-gone")
        })
    });
    assert!(a.log().contains("garbage collection freed"), "{}", a.log());

    // 2. On node-b: a VM, an ephemeral pod, two StatefulSet replicas (db-0 on node-a).
    let mut vm = env.vm("vm1");
    let launcher = env.launch(&mut vm, "node-b", None, json!({}));
    let vm_ip = add(&ipam_b, &existing(&env, &launcher));
    let web = env.pod("default", "web-b", "node-b", None);
    let web_ip = add(&ipam_b, &web);
    let (sts_api, owner) = env.statefulset("db", 2);
    let db0 = env.pod("default", "db-0", "node-a", Some(owner.clone()));
    let db0_ip = add(&ipam_a, &db0);
    let db1 = env.pod("default", "db-1", "node-b", Some(owner));
    let db1_ip = add(&ipam_b, &db1);

    // node-b is lost: its daemon dies, its Node goes not ready. The StatefulSet is scaled
    // down and its replica on node-b force-deleted; the VM's and web-b's pods are deleted
    // but stay, being deleted, as nobody on node-b finishes them.
    b.kill().expect("kill node-b's daemon");
    env.node_not_ready("node-b");
    env.rt
        .block_on(sts_api.patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        ))
        .expect("scale to 1");
    env.delete_pod("default", "db-1");
    env.delete_pod_gracefully(&launcher);
    env.delete_pod_gracefully("web-b");

    // The ephemeral pod's address is freed (node lost); the VM's loses its holder and stays.
    within(40, "web-b's address freed", || {
        !env.addresses().contains(&web_ip)
    });
    within(40, "the VM's address without its lost holder", || {
        env.holders_of(&vm_ip) == Some(Vec::new())
    });
    // db-1: its holder dropped (pod gone), then its address released (scaled below).
    within(40, "db-1's address released", || {
        !env.addresses().contains(&db1_ip)
    });
    // The VM, restarted on node-a, gets its address back.
    let relaunched = env.launch(&mut vm, "node-a", None, json!({}));
    assert_eq!(add(&ipam_a, &existing(&env, &relaunched)), vm_ip);

    // Nothing live was freed: live-a, live-b (on the lost node, not being deleted), db-0.
    let left = env.addresses();
    for (what, ip) in [
        ("live-a", &live_a_ip),
        ("live-b", &live_b_ip),
        ("db-0", &db0_ip),
        ("vm1", &vm_ip),
    ] {
        assert!(left.contains(ip), "{what}'s address {ip} was freed");
    }
    assert_eq!(env.holders_of(&live_b_ip), Some(vec!["live-b".to_owned()]));
    let text = a.client().get_text("/metrics").expect("metrics");
    for want in [
        r#"tether_gc_released_total{reason="pod-gone",action="released"} 1"#,
        r#"tether_gc_released_total{reason="node-lost",action="released"} 1"#,
        r#"tether_gc_released_total{reason="node-lost",action="holder-dropped"} 1"#,
        r#"tether_gc_released_total{reason="pod-gone",action="holder-dropped"} 1"#,
        r#"tether_gc_released_total{reason="rule-fired",action="released"} 1"#,
    ] {
        assert!(text.contains(want), "no {want} in:\n{text}");
    }
    let report: tether_api::GcReport = a.client().get("/v1/gc").expect("gc report");
    assert_eq!(report.paused, None, "{report:?}");
    drop(a);
}

/// The elected daemon killed while garbage collection waits out its grace, or is freeing:
/// the other daemon takes the Lease over and frees what is leaked, each address once, and
/// never an address a live pod holds, including pods given freed addresses meanwhile.
#[test]
fn the_leader_killed_mid_gc_hands_over_and_nothing_is_freed_twice() {
    let test = "the_leader_killed_mid_gc_hands_over_and_nothing_is_freed_twice";
    let Some(env) = Env::start(test) else {
        return;
    };
    let gc = ["--gc-interval-secs", "1", "--gc-grace-secs", "3"];
    let a = env.daemon_with("node-a", &gc);
    assert_eq!(env.leader(), "node-a");
    let b = env.daemon_with("node-b", &gc);
    let ipam_a = Ipam::new(&a.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let ipam_b = Ipam::new(&b.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    // The pool (10 addresses) full: 4 live pods and 6 whose DELs will be missed.
    let live: Vec<(Pod, String)> = (0..4)
        .map(|i| {
            let (node, ipam) = if i < 2 {
                ("node-a", &ipam_a)
            } else {
                ("node-b", &ipam_b)
            };
            let p = env.pod("default", &format!("live-{i}"), node, None);
            let ip = add(ipam, &p);
            (p, ip)
        })
        .collect();
    let stale: Vec<String> = (0..6)
        .map(|i| {
            let (node, ipam) = if i % 2 == 0 {
                ("node-a", &ipam_a)
            } else {
                ("node-b", &ipam_b)
            };
            let p = env.pod("default", &format!("gone-{i}"), node, None);
            add(ipam, &p)
        })
        .collect();
    for i in 0..6 {
        env.delete_pod("default", &format!("gone-{i}"));
    }
    // Killed at a random moment of the grace or of the releases.
    let seed = tether_e2e::Rng::seed_from_env("TETHER_GC_KILL_SEED");
    let wait = 1000 + tether_e2e::Rng::new(seed).below(3500);
    eprintln!(
        "{test}: killing the leader {wait} ms after the pods went (TETHER_GC_KILL_SEED={seed})"
    );
    std::thread::sleep(Duration::from_millis(wait));
    a.kill().expect("kill the leader");
    // node-b takes over once the Lease expires, and frees the rest; new pods on node-b take
    // the freed addresses as they come free (the pool is full otherwise).
    let mut newcomers: Vec<String> = Vec::new();
    let start = Instant::now();
    while newcomers.len() < stale.len() {
        if env.addresses().len() < 10 {
            let p = env.pod(
                "default",
                &format!("new-{}", newcomers.len()),
                "node-b",
                None,
            );
            newcomers.push(add(&ipam_b, &p));
            continue;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not all leaked addresses freed: {stale:?}, newcomers {newcomers:?}\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut got, mut want) = (newcomers.clone(), stale.clone());
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the newcomers did not get exactly the leaked addresses"
    );
    // node-b holds the Lease once the killed leader's expires (the leader may have freed
    // everything itself before it died).
    within(40, "node-b takes the releasers' Lease", || {
        env.leader() == "node-b"
    });
    // Give node-b's collector a few more passes to do something wrong.
    std::thread::sleep(Duration::from_secs(5));
    let left = env.addresses();
    for (p, ip) in &live {
        assert!(left.contains(ip), "{}'s address {ip} was freed", p.name);
    }
    for ip in &newcomers {
        assert!(left.contains(ip), "a newcomer's address {ip} was freed");
    }
    let holders: Vec<String> = env
        .objects()
        .iter()
        .flat_map(|o| o.spec.holders.iter().map(|h| h.pod.clone()))
        .collect();
    let distinct: HashSet<&String> = holders.iter().collect();
    assert_eq!(
        distinct.len(),
        holders.len(),
        "a pod holds two addresses: {holders:?}"
    );
    // Each leaked address was released once, by one daemon or the other (an Event may be
    // lost with the daemon killed right after its release; node-b's are there).
    let events = env.gc_events();
    assert!(
        events.iter().any(|(r, _)| r == "AddressReleased"),
        "no release Event at all: {events:?}"
    );
    for ip in &stale {
        let times = events
            .iter()
            .filter(|(r, m)| r == "AddressReleased" && m.contains(&format!("/{ip} ")))
            .count();
        assert!(times <= 1, "{ip} released {times} times: {events:?}");
    }
    drop(b);
}

/// The IPAMClaim resource, as k8snetworkplumbingwg/ipamclaims defines it.
fn ipamclaims() -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("k8s.cni.cncf.io", "v1alpha1", "IPAMClaim"),
        "ipamclaims",
    )
}

impl Env {
    /// Installs the upstream IPAMClaim CRD (tests/fixtures) and waits until it serves.
    fn install_ipamclaims(&self) {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let path = tether_e2e::cluster::repo_root().join("tests/fixtures/ipamclaims.crd.yaml");
        let text = std::fs::read_to_string(&path).expect("CRD fixture");
        let crd: CustomResourceDefinition = yaml_serde::from_str(&text).expect("CRD yaml");
        self.rt
            .block_on(
                Api::<CustomResourceDefinition>::all(self.client.clone())
                    .create(&PostParams::default(), &crd),
            )
            .expect("create the IPAMClaim CRD");
        within(20, "the IPAMClaim CRD serves", || {
            self.rt
                .block_on(self.claims().list(&ListParams::default()))
                .is_ok()
        });
    }

    fn claims(&self) -> Api<kube::api::DynamicObject> {
        Api::namespaced_with(self.client.clone(), "default", &ipamclaims())
    }

    /// Creates the IPAMClaim of VM `vm`'s interface on logical network `network` exactly as
    /// kubevirt/ipam-extensions does: named `<vmi>.<network>`, owned by the VM (controller,
    /// blockOwnerDeletion), with its finalizer and VM label, `spec.network` the CNI network.
    fn claim_for(&self, vm: &tether_e2e::kubevirt::Vm, network: &str, cni_network: &str) -> String {
        let name = format!("{}.{network}", vm.name);
        let claim: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1alpha1", "kind": "IPAMClaim",
            "metadata": {"name": name, "namespace": "default",
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "name": vm.name, "uid": vm.uid, "controller": true, "blockOwnerDeletion": true}],
                "finalizers": ["kubevirt.io/persistent-ipam"],
                "labels": {"kubevirt.io/vm": vm.name}},
            // ipam-extensions leaves `interface` empty, which the v1.20 API server reads as
            // null and refuses (the schema wants a string): the launcher pod's interface.
            "spec": {"network": cni_network, "interface": "net1"}
        }))
        .expect("claim");
        self.rt
            .block_on(self.claims().create(&PostParams::default(), &claim))
            .expect("create IPAMClaim");
        name
    }

    /// The status of IPAMClaim `name` once `want` holds.
    fn claim_status(
        &self,
        name: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        within(
            20,
            &format!("IPAMClaim {name}'s status as expected"),
            || {
                last = self
                    .rt
                    .block_on(self.claims().get(name))
                    .expect("claim")
                    .data
                    .get("status")
                    .cloned()
                    .unwrap_or_default();
                want(&last)
            },
        );
        last
    }
}

/// The network selection ipam-extensions' webhook leaves on a launcher pod: the interface on
/// network `tenant` refers to `claim`.
fn claim_selection(claim: &str) -> serde_json::Value {
    json!({"k8s.v1.cni.cncf.io/networks":
        json!([{"name": "tenant", "namespace": "default", "ipam-claim-reference": claim}]).to_string()})
}

/// IPAMClaim interop on the real API server with the upstream CRD: a VM whose launcher pods
/// refer to a claim created as ipam-extensions does keeps the claim's address across a pod
/// restart (on the other node), a VMI recreate and a migration, whatever the policies say;
/// the claim's status says so; a pod's deletion keeps it; the claim's deletion (once its
/// finalizer is removed) frees it. A claim whose pod selects a missing pool, and one holding
/// an address someone else has, report why in their condition, and held addresses are never
/// overwritten.
#[test]
fn an_ipamclaim_is_the_identity_of_its_vms_interface() {
    let test = "an_ipamclaim_is_the_identity_of_its_vms_interface";
    let Some(env) = Env::start(test) else {
        return;
    };
    env.rt
        .block_on(tether_e2e::kubevirt::install(&env.client))
        .expect("KubeVirt CRDs");
    env.install_ipamclaims();
    let gc = [
        "--gc-interval-secs",
        "1",
        "--gc-grace-secs",
        "2",
        "--gc-vm-grace-secs",
        "3",
    ];
    let a = env.daemon_with("node-a", &gc);
    let b = env.daemon_with("node-b", &gc);
    let net_a = Ipam::new(&a.socket, "tenant-net", "1.0.0", &["test-ippool"]).expect("ipam");
    let net_b = Ipam::new(&b.socket, "tenant-net", "1.0.0", &["test-ippool"]).expect("ipam");
    let on = |pod: &str| {
        let mut p = existing(&env, pod);
        p.ifname = "net1".into();
        p
    };

    let mut vm = env.vm("vm1");
    let claim = env.claim_for(&vm, "tenant", "tenant-net");
    assert_eq!(claim, "vm1.tenant");
    let p1 = env.launch(&mut vm, "node-a", None, claim_selection(&claim));
    let ip = add(&net_a, &on(&p1));
    let status = env.claim_status(&claim, |s| s["ownerPod"]["name"] == p1.as_str());
    assert_eq!(status["ips"], json!([format!("{ip}/16")]), "{status}");
    let c = &status["conditions"][0];
    assert_eq!(
        (&c["type"], &c["status"], &c["reason"]),
        (
            &json!("IPsAllocated"),
            &json!("True"),
            &json!("SuccessfulAllocation")
        ),
        "{status}"
    );
    // The claim is the identity, not the VM (whose policy would pin it too).
    let object = env
        .objects()
        .into_iter()
        .find(|o| o.spec.address.to_string() == ip)
        .expect("the address object");
    assert_eq!(
        (
            object.spec.owner.kind.as_str(),
            object.spec.owner.name.as_str()
        ),
        ("IPAMClaim", "default/vm1.tenant")
    );

    // A pod the VM does not own, naming the VM's claim, gets nothing.
    let intruder = env.pod_annotated(
        "default",
        "intruder",
        "node-b",
        None,
        claim_selection(&claim),
    );
    let mut intruder = intruder;
    intruder.ifname = "net1".into();
    let refused = net_b.add(&intruder).expect("add");
    assert!(!refused.ok, "an intruder got the VM's address");
    assert!(
        refused.out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("belongs to VirtualMachine vm1")),
        "refused for another reason than the claim's owner: {}",
        refused.out
    );
    assert_eq!(env.holders_of(&ip), Some(vec![p1.clone()]));

    // Pod restart, on the other node: same address; the status names the new pod.
    assert!(net_a.del(&on(&p1)).expect("del").ok);
    env.delete_pod("default", &p1);
    let p2 = env.launch(&mut vm, "node-b", None, claim_selection(&claim));
    assert_eq!(add(&net_b, &on(&p2)), ip);
    env.claim_status(&claim, |s| s["ownerPod"]["name"] == p2.as_str());

    // VMI recreated: same address.
    assert!(net_b.del(&on(&p2)).expect("del").ok);
    env.delete_pod("default", &p2);
    env.rt
        .block_on(vm.recreate_vmi(&[], json!({})))
        .expect("recreate VMI");
    let p3 = env.launch(&mut vm, "node-a", None, claim_selection(&claim));
    assert_eq!(add(&net_a, &on(&p3)), ip);

    // Live migration: the target shares the address with the source, then keeps it.
    let (mname, muid) = env.rt.block_on(vm.migration()).expect("migration");
    let p4 = env.launch(
        &mut vm,
        "node-b",
        Some((&mname, &muid)),
        claim_selection(&claim),
    );
    assert_eq!(add(&net_b, &on(&p4)), ip);
    assert_eq!(
        {
            let mut h = env.holders_of(&ip).expect("held");
            h.sort();
            h
        },
        {
            let mut h = vec![p3.clone(), p4.clone()];
            h.sort();
            h
        }
    );
    assert!(net_a.del(&on(&p3)).expect("del").ok);
    env.delete_pod("default", &p3);

    // The pod goes: the address stays with the claim, through several GC passes.
    assert!(net_b.del(&on(&p4)).expect("del").ok);
    env.delete_pod("default", &p4);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        env.holders_of(&ip),
        Some(Vec::new()),
        "released with its pod"
    );

    // A claim whose pod selects a pool that does not exist says so.
    let mut vm2 = env.vm("vm2");
    let claim2 = env.claim_for(&vm2, "tenant", "tenant-net");
    let mut selection = claim_selection(&claim2);
    selection["ipam.tether.dev/ippool"] = json!("no-such-pool");
    let q = env.launch(&mut vm2, "node-a", None, selection);
    assert!(
        !net_a.add(&on(&q)).expect("add").ok,
        "an ADD from a missing pool"
    );
    let s2 = env.claim_status(&claim2, |s| s["conditions"][0]["reason"] == "PoolNotFound");
    assert_eq!(s2["conditions"][0]["status"], "False", "{s2}");

    // A claim holding an address someone else has: refused, its addresses left alone.
    let mut vm3 = env.vm("vm3");
    let claim3 = env.claim_for(&vm3, "tenant", "tenant-net");
    let taken = format!("{ip}/16");
    env.rt
        .block_on(env.claims().patch_status(
            &claim3,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ips": [taken], "ownerPod": {"name": "elsewhere"}}})),
        ))
        .expect("status");
    let r = env.launch(&mut vm3, "node-b", None, claim_selection(&claim3));
    assert!(
        !net_b.add(&on(&r)).expect("add").ok,
        "an address handed to two claims"
    );
    let s3 = env.claim_status(&claim3, |s| {
        s["conditions"][0]["reason"] == "IPAddressConflict"
    });
    assert_eq!(s3["ips"], json!([taken]), "{s3}");
    assert_eq!(s3["ownerPod"]["name"], "elsewhere", "{s3}");

    // From the `kubevirt` policy to a claim without an address change: vm4 runs without a
    // claim (pinned to the VM by the policy), stops, its address is re-filed under the claim
    // ipam-extensions made meanwhile, and its next launcher pod, referring to the claim, gets it.
    let mut vm4 = env.vm("vm4");
    let before = env.launch(&mut vm4, "node-a", None, json!({}));
    let vm4_ip = add(&net_a, &on(&before));
    let object = |ip: &str| {
        env.objects()
            .into_iter()
            .find(|o| o.spec.address.to_string() == ip)
            .expect("the address object")
    };
    assert_eq!(object(&vm4_ip).spec.owner.kind, "VirtualMachine");
    assert!(net_a.del(&on(&before)).expect("del").ok);
    env.delete_pod("default", &before);
    let claim4 = env.claim_for(&vm4, "tenant", "tenant-net");
    let refiled: Result<tether_api::ReconcileResult, _> = b.client().post(
        "/v1/release",
        &tether_api::ReleaseRequest {
            pool: "test-ippool".into(),
            ip: vm4_ip.clone(),
            force: false,
            to_claim: Some(format!("default/{claim4}")),
        },
    );
    if let Err(e) = refiled {
        panic!(
            "re-file: {e}\nnode-b's allocations: {:?}\nobjects: {:?}",
            b.allocations(),
            env.objects()
                .iter()
                .map(|o| (
                    o.spec.address.to_string(),
                    o.spec.owner.kind.clone(),
                    o.spec.holders.len()
                ))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(object(&vm4_ip).spec.owner.kind, "IPAMClaim");
    let after = env.launch(&mut vm4, "node-b", None, claim_selection(&claim4));
    assert_eq!(
        add(&net_b, &on(&after)),
        vm4_ip,
        "the address changed on the move"
    );
    env.claim_status(&claim4, |s| s["ips"] == json!([format!("{vm4_ip}/16")]));

    // The claim deleted: its finalizer holds it, and the address, until ipam-extensions
    // removes the finalizer (on the VM's deletion); then it is freed.
    env.rt
        .block_on(env.claims().delete(&claim, &DeleteParams::default()))
        .expect("delete claim");
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        env.addresses().contains(&ip),
        "freed while the claim is still there"
    );
    env.rt
        .block_on(env.claims().patch(
            &claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        ))
        .expect("remove the finalizer");
    within(30, "the claim's address freed", || {
        !env.addresses().contains(&ip)
    });
    drop((a, b));
}
