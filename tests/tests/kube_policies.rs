//! Policies from ConfigMaps on a real kube-apiserver (v1.20.2): `tetherd run --kubernetes
//! --chain configmap:NAME,...` waits for its ConfigMaps, puts a changed one in force without a
//! restart, refuses a broken one (an Event on the ConfigMap, a log line, a metric) while the
//! chain in force keeps serving; and `tetherd policy export --configmaps` prints the built-ins
//! as ConfigMaps that load, the same bytes on every run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod as KPod};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tether_builtins::fixtures;
use tether_e2e::cluster::{Cluster, TestCluster};
use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL};

/// The namespace the daemons take their policies from.
const NS: &str = "tether-system";

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
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": NS}})).expect("namespace");
        rt.block_on(Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns))
            .expect("create namespace");
        Some(Env {
            cluster,
            rt,
            client,
        })
    }

    /// The flags of a tetherd for node `node` with the policy chain `chain`.
    fn flags(&self, node: &str, chain: &str) -> Vec<String> {
        [
            "--kubernetes",
            "--node-name",
            node,
            "--kubeconfig",
            &self.cluster.kubeconfig.display().to_string(),
            "--policy-namespace",
            NS,
            "--chain",
            chain,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Creates or replaces the policy ConfigMap `name` with `bytes` and, if given, `sha256`.
    fn put_policy(&self, name: &str, bytes: &[u8], sha256: Option<&str>) {
        let api = self.configmaps();
        let mut cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([(
                    tether_kube::policies::POLICY_LABEL.to_owned(),
                    "custom".to_owned(),
                )])),
                ..Default::default()
            },
            binary_data: Some(BTreeMap::from([(
                "policy.wasm".to_owned(),
                ByteString(bytes.to_vec()),
            )])),
            data: sha256.map(|s| BTreeMap::from([("sha256".to_owned(), s.to_owned())])),
            ..Default::default()
        };
        let existing = self.rt.block_on(api.get_opt(name)).expect("get ConfigMap");
        match existing {
            Some(old) => {
                cm.metadata.resource_version = old.metadata.resource_version;
                self.rt
                    .block_on(api.replace(name, &PostParams::default(), &cm))
                    .expect("replace ConfigMap");
            }
            None => {
                self.rt
                    .block_on(api.create(&PostParams::default(), &cm))
                    .expect("create ConfigMap");
            }
        }
    }

    /// The notes of the Warning Events about ConfigMap `name`.
    fn refusals(&self, name: &str) -> Vec<String> {
        let events: Api<KubeEvent> = Api::namespaced(self.client.clone(), NS);
        self.rt
            .block_on(events.list(&ListParams::default()))
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("ConfigMap") && r.name.as_deref() == Some(name)
                }) && e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("PolicyRefused")
            })
            .filter_map(|e| e.note)
            .collect()
    }

    /// Creates pod `name` bound to `node` with `labels`; returns it as the plugin's caller
    /// sees it.
    fn pod(&self, name: &str, node: &str, labels: serde_json::Value) -> Pod {
        let p: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "pause"}]}
        }))
        .expect("pod");
        let created = self
            .rt
            .block_on(
                Api::<KPod>::namespaced(self.client.clone(), "default")
                    .create(&PostParams::default(), &p),
            )
            .expect("create pod");
        let uid = created.metadata.uid.expect("uid");
        let mut pod = Pod::new("default", name, 0);
        pod.container_id = format!("ctr-{name}-{}", &uid[..8]);
        pod.uid = uid;
        pod
    }

    fn delete_pod(&self, name: &str) {
        self.rt
            .block_on(
                Api::<KPod>::namespaced(self.client.clone(), "default")
                    .delete(name, &DeleteParams::default().grace_period(0)),
            )
            .expect("delete pod");
    }
}

fn sha256(bytes: &[u8]) -> String {
    tether_policy::digest::sha256_hex(bytes)
}

/// The chain `/readyz` reports, or the error it answers.
fn readyz(socket: &Path) -> Result<Vec<String>, String> {
    let c = tether_api::client::Client::new(socket, Duration::from_secs(5));
    c.get::<serde_json::Value>("/readyz")
        .map(|v| {
            v["chain"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
        .map_err(|e| e.to_string())
}

/// Waits up to 30 s for `f` to hold.
fn eventually(what: &str, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 30s\n{}", log());
}

/// The pinned identity of the address `ip`, per the daemon.
fn identity_of(d: &Daemon, ip: &str) -> Option<String> {
    d.allocations()
        .expect("allocations")
        .into_iter()
        .find(|a| a["ip"] == ip)
        .and_then(|a| a["owner"]["identity"].as_str().map(str::to_owned))
}

#[test]
fn a_configmap_policy_is_swapped_in_and_a_broken_one_refused() {
    let test = "a_configmap_policy_is_swapped_in_and_a_broken_one_refused";
    let Some(env) = Env::start(test) else {
        return;
    };
    let kubevirt = tether_builtins::builtin("kubevirt").expect("kubevirt").wasm;

    // Started before its ConfigMap exists: not ready, and an ADD is told to try again later.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("tether.sock");
    let flags = env.flags("node-a", "configmap:custom,builtin:stateless");
    let starting = std::thread::spawn(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Daemon::start_in(dir, "", &flags)
    });
    let ipam = Ipam::new(&socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let early = env.pod("early", "node-a", json!({}));
    let mut refused_early = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    // (Once the workload caches have synced: until then /readyz names those.)
    while refused_early.is_none() && Instant::now() < deadline {
        match readyz(&socket) {
            Err(e) if e.contains("503") && e.contains("policy") => refused_early = Some(e),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let why = refused_early.expect("/readyz never said the daemon waits for its policies");
    assert!(why.contains("custom") && why.contains(NS), "{why}");
    let out = ipam.add(&early).expect("add");
    assert!(!out.ok, "ADD before the policies loaded: {}", out.out);
    assert_eq!(out.code(), Some(11), "{}", out.out);

    // The ConfigMap appears (with its digest): the chain loads, the daemon becomes ready.
    env.put_policy("custom", kubevirt, Some(&sha256(kubevirt)));
    let daemon = starting
        .join()
        .expect("start thread")
        .expect("tetherd becomes ready once its ConfigMap loads");
    assert_eq!(readyz(&socket).expect("ready"), ["kubevirt", "stateless"]);

    // A labelled pod: the chain has no label policy, so its address is ephemeral.
    let labels = json!({"ipam.tether.dev/identity": "cart"});
    let p1 = env.pod("cart-1", "node-a", labels.clone());
    let out = ipam.add(&p1).expect("add");
    assert!(out.ok, "{}", out.out);
    let ip1 = out.ip().expect("ip");
    assert_eq!(
        identity_of(&daemon, &ip1),
        None,
        "pinned before the label policy"
    );
    assert!(ipam.del(&p1).expect("del").ok);
    env.delete_pod("cart-1");

    // The ConfigMap now carries the label-pinning policy: in force without a restart.
    let label_identity = fixtures::LABEL_IDENTITY;
    env.put_policy("custom", label_identity, Some(&sha256(label_identity)));
    eventually(
        "the label policy in force",
        || readyz(&socket).is_ok_and(|c| c == ["label-identity", "stateless"]),
        || daemon.log(),
    );
    let p2 = env.pod("cart-2", "node-a", labels.clone());
    let out = ipam.add(&p2).expect("add");
    assert!(out.ok, "{}", out.out);
    let ip2 = out.ip().expect("ip");
    assert_eq!(identity_of(&daemon, &ip2).as_deref(), Some("default/cart"));

    // Broken updates: each refused with an Event naming why, counted, logged; the label
    // policy keeps serving.
    let wasi = fixtures::WASI_IMPORT;
    let broken: [(&str, &[u8], Option<String>, &str); 3] = [
        (
            "garbage",
            b"this is not WebAssembly",
            None,
            "invalid_module",
        ),
        (
            "wrong digest",
            kubevirt,
            Some(sha256(label_identity)),
            "sha256_mismatch",
        ),
        ("a WASI import", wasi, None, "forbidden_import"),
    ];
    for (what, bytes, digest, reason) in broken {
        env.put_policy("custom", bytes, digest.as_deref());
        eventually(
            &format!("an Event refusing {what}"),
            || env.refusals("custom").iter().any(|n| n.contains(reason)),
            || format!("events: {:?}\n{}", env.refusals("custom"), daemon.log()),
        );
        let metrics = daemon.client().get_text("/metrics").expect("metrics");
        let line = format!(
            "tether_policy_reloads_total{{source=\"configmap:custom\",result=\"{reason}\"}} 1"
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
        assert!(
            daemon.log().contains("policy ConfigMap refused") && daemon.log().contains(reason),
            "no log line for {what}: {}",
            daemon.log()
        );
        assert_eq!(
            readyz(&socket).expect("still ready"),
            ["label-identity", "stateless"],
            "{what} changed the chain"
        );
        let p = env.pod(
            &format!("cart-{reason}").replace('_', "-"),
            "node-a",
            json!({"ipam.tether.dev/identity": reason.replace('_', "-")}),
        );
        let out = ipam.add(&p).expect("add");
        assert!(out.ok, "after {what}: {}", out.out);
        assert_eq!(
            identity_of(&daemon, &out.ip().expect("ip")),
            Some(format!("default/{}", reason.replace('_', "-"))),
            "after {what}, the label policy no longer pins"
        );
    }

    // A good version after the refused ones is put in force again.
    env.put_policy("custom", kubevirt, None);
    eventually(
        "the chain back on kubevirt",
        || readyz(&socket).is_ok_and(|c| c == ["kubevirt", "stateless"]),
        || daemon.log(),
    );
    // A new version with the same component (its digest added): put in force from the
    // cache, not compiled again.
    env.put_policy("custom", kubevirt, Some(&sha256(kubevirt).to_uppercase()));
    eventually(
        "the same component in force again, from the cache",
        || daemon.log().contains("compiled=false"),
        || daemon.log(),
    );
    let metrics = daemon.client().get_text("/metrics").expect("metrics");
    let line = "tether_policy_reloads_total{source=\"configmap:custom\",result=\"ok\"} 4";
    assert!(metrics.contains(line), "no {line} in\n{metrics}");
}

/// Runs `tetherd policy export --configmaps --namespace NS`.
fn export() -> Vec<u8> {
    let out = std::process::Command::new(tether_e2e::bin_dir().expect("bins").join("tetherd"))
        .args(["policy", "export", "--configmaps", "--namespace", NS])
        .output()
        .expect("tetherd policy export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn exported_configmaps_are_reproducible_and_load() {
    let test = "exported_configmaps_are_reproducible_and_load";
    let first = export();
    assert_eq!(first, export(), "two runs printed different bytes");
    let Some(env) = Env::start(test) else {
        return;
    };
    let yaml = String::from_utf8(first).expect("utf-8");
    let api = env.configmaps();
    let mut names = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&yaml) {
        let cm: ConfigMap = serde::Deserialize::deserialize(doc).expect("a ConfigMap");
        names.push(cm.metadata.name.clone().expect("name"));
        env.rt
            .block_on(api.create(&PostParams::default(), &cm))
            .expect("the API server takes the manifest");
    }
    let chain: Vec<String> = names.iter().map(|n| format!("configmap:{n}")).collect();
    let mut flags = env.flags("node-a", &chain.join(","));
    // The switches apply to policies from ConfigMaps too.
    flags.extend(["--enable-statefulset".to_owned(), "false".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let daemon = Daemon::start("", &flags).expect("tetherd loads the exported ConfigMaps");
    assert_eq!(
        readyz(&daemon.socket).expect("ready"),
        ["kubevirt", "stateless"]
    );
    let ipam = Ipam::new(&daemon.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let p = env.pod("web", "node-a", json!({}));
    let out = ipam.add(&p).expect("add");
    assert!(out.ok, "{}", out.out);
    let metrics = daemon.client().get_text("/metrics").expect("metrics");
    for n in &names {
        let line =
            format!("tether_policy_reloads_total{{source=\"configmap:{n}\",result=\"ok\"}} 1");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}
