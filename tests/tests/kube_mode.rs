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
use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL};
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
        } = TestCluster::start(test, false)?;
        // The ServiceAccount admission wants the namespace's `default` account, which the
        // controller-manager (not running here) would create.
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
        rt.block_on(
            Api::<ServiceAccount>::namespaced(client.clone(), "default")
                .create(&PostParams::default(), &sa),
        )
        .expect("ServiceAccount");
        let pool: IPPool = yaml_serde::from_str(SEED_POOL).expect("seed pool");
        rt.block_on(Api::<IPPool>::all(client.clone()).create(&PostParams::default(), &pool))
            .expect("IPPool");
        Some(Env {
            cluster,
            rt,
            client,
        })
    }

    /// A tetherd for node `node`.
    fn daemon(&self, node: &str) -> Daemon {
        let kubeconfig = self.cluster.kubeconfig.display().to_string();
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
            ],
        )
        .expect("tetherd --kubernetes")
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
    let a = env.daemon("node-a");
    let b = env.daemon("node-b");
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
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}},
                              "spec": {"containers": [{"name": "c", "image": "pause"}]}}}
    }))
    .expect("sts");
    let sts_api = Api::<StatefulSet>::namespaced(env.client.clone(), "default");
    let sts = env
        .rt
        .block_on(sts_api.create(&PostParams::default(), &sts))
        .expect("create sts");
    let owner = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
        "uid": sts.metadata.uid.clone().expect("uid"), "controller": true});
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

    // CNI GC on node-a, whose runtime lists only `late`: node-a's other pods (a-0..a-3, their
    // DELs missed) are freed; node-b's pods are not node-a's to judge and keep theirs.
    let mut conf = ipam_a.conf.clone();
    conf["cniVersion"] = json!("1.1.0");
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": late.container_id, "ifname": "eth0"}]);
    let o = tether_e2e::cni_exec(&ipam_a.plugin, "GC", &conf, &[], "").expect("gc");
    assert!(o.ok, "{}", o.out);
    let left: HashSet<String> = env
        .objects()
        .iter()
        .map(|o| o.spec.address.to_string())
        .collect();
    let want: HashSet<String> = ips_b.iter().chain([&ip2, &late_ip]).cloned().collect();
    assert_eq!(
        left, want,
        "node-a's GC freed another node's address, or kept its own stale ones"
    );
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
