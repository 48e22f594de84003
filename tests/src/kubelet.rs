//! A kubelet that plays along, for tests on the real apiserver (no kubelet runs here): for
//! every pod bound to its node it calls CNI ADD through the real `tether` binary and reports
//! the pod Running and Ready with its IP, as a kubelet does once the sandbox is up; for a pod
//! being deleted it calls DEL and then removes the object (the kubelet's last word on a
//! graceful delete). A failed ADD is retried every second while the pod exists, as the
//! kubelet retries sandbox creation; the last failure is kept for the test to read.
//!
//! The [`Wiring`] says how: `tether` called directly, or (root) real macvlan interfaces, a
//! network namespace per pod, removed after its DEL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod as KPod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::runtime::Handle;

use crate::netns::Wiring;
use crate::{CniOutcome, Ipam, Pod};

/// What happened to one pod's network.
#[derive(Debug, Clone, Default)]
pub struct PodNet {
    /// The pod as the plugin saw it.
    pub pod: Option<Pod>,
    /// Its address, once ADD succeeded.
    pub ip: Option<String>,
    /// The last failed ADD's answer.
    pub failure: Option<CniOutcome>,
    /// DEL was called.
    pub torn_down: bool,
}

type Nets = Arc<Mutex<HashMap<String, PodNet>>>;

/// The wiring in use; replaced when the node's daemon restarts.
type Current = Arc<Mutex<Arc<Wiring>>>;

/// One node's kubelet.
pub struct Kubelet {
    pub node: String,
    nets: Nets,
    wiring: Current,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The plugin's view of a pod: its container is named after its UID.
fn cni_pod(p: &KPod) -> Option<Pod> {
    let uid = p.metadata.uid.clone()?;
    Some(Pod {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone()?,
        container_id: format!("k-{}", uid.replace('-', "")),
        uid,
        ifname: "eth0".into(),
    })
}

impl Kubelet {
    /// Starts playing `node`'s kubelet on `rt`, wiring pods by `wiring` (through the node's
    /// tetherd socket).
    pub fn start(rt: &Handle, client: kube::Client, node: &str, wiring: Wiring) -> Kubelet {
        let nets: Nets = Arc::default();
        let wiring = Arc::new(Mutex::new(Arc::new(wiring)));
        let task = rt.spawn(run(client, node.to_owned(), nets.clone(), wiring.clone()));
        Kubelet {
            node: node.to_owned(),
            nets,
            wiring,
            task,
        }
    }

    /// Stops, as a kubelet that dies: pods deleted from now on are never torn down (no DEL).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Points the kubelet at another daemon (after a restart); the wiring stays.
    pub fn set_ipam(&self, ipam: Ipam) {
        let mut w = lock(&self.wiring);
        *w = Arc::new(w.with_ipam(ipam));
    }

    /// What happened to the pod `namespace/name` of UID `uid`.
    pub fn net(&self, uid: &str) -> Option<PodNet> {
        lock(&self.nets).get(uid).cloned()
    }

    /// Whether the pod of UID `uid` reaches `ip` from its namespace; `None` when pods are not
    /// wired for real, or this kubelet never saw the pod.
    pub fn ping(&self, uid: &str, ip: &str) -> Option<bool> {
        let pod = self.net(uid)?.pod?;
        let wiring = lock(&self.wiring).clone();
        wiring.ping(&pod, ip)
    }

    /// The addresses on the interface of the pod of UID `uid`, in its namespace; `None` when
    /// pods are not wired for real, or this kubelet never saw the pod.
    pub fn addresses(&self, uid: &str) -> Option<anyhow::Result<String>> {
        let pod = self.net(uid)?.pod?;
        let wiring = lock(&self.wiring).clone();
        wiring.addresses(&pod)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: kube::Client, node: String, nets: Nets, wiring: Current) {
    let api: Api<KPod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(Event::Apply(p) | Event::InitApply(p)) => p,
            Ok(Event::Delete(p)) => {
                // Gone without a graceful delete (grace period 0): tear down if not done.
                if let Some(cp) = cni_pod(&p) {
                    teardown(&nets, &wiring, &cp).await;
                }
                continue;
            }
            _ => continue,
        };
        let Some(cp) = cni_pod(&pod) else { continue };
        if pod.metadata.deletion_timestamp.is_some() {
            teardown(&nets, &wiring, &cp).await;
            let api: Api<KPod> = Api::namespaced(client.clone(), &cp.namespace);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(cp.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let _ = api.delete(&cp.name, &dp).await;
            continue;
        }
        let new = {
            let mut n = lock(&nets);
            if n.contains_key(&cp.uid) {
                false
            } else {
                n.insert(
                    cp.uid.clone(),
                    PodNet {
                        pod: Some(cp.clone()),
                        ..PodNet::default()
                    },
                );
                true
            }
        };
        if new {
            tokio::spawn(sandbox(client.clone(), nets.clone(), wiring.clone(), cp));
        }
    }
}

/// ADD until it works or the pod is gone, then reports the pod Running and Ready.
async fn sandbox(client: kube::Client, nets: Nets, wiring: Current, cp: Pod) {
    let api: Api<KPod> = Api::namespaced(client, &cp.namespace);
    for _ in 0..120 {
        let still = api.get_opt(&cp.name).await.ok().flatten().is_some_and(|p| {
            p.metadata.uid.as_deref() == Some(cp.uid.as_str())
                && p.metadata.deletion_timestamp.is_none()
        });
        if !still || lock(&nets).get(&cp.uid).is_some_and(|n| n.torn_down) {
            return;
        }
        let plugin = lock(&wiring).clone();
        let (p, pod) = (plugin.clone(), cp.clone());
        let out = tokio::task::spawn_blocking(move || p.add(&pod)).await;
        match out {
            Ok(Ok(o)) if o.ok => {
                let ip = o.ip().unwrap_or_default();
                let torn_down = match lock(&nets).get_mut(&cp.uid) {
                    Some(n) if !n.torn_down => {
                        n.ip = Some(ip.clone());
                        n.failure = None;
                        false
                    }
                    _ => true,
                };
                if torn_down {
                    // Torn down while ADD ran: DEL again, as a runtime does for a sandbox
                    // set up after its pod was gone.
                    let pod = cp.clone();
                    let _ = tokio::task::spawn_blocking(move || plugin.del(&pod)).await;
                    return;
                }
                let status = json!({"status": {
                    "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                    "conditions": [
                        {"type": "Initialized", "status": "True"},
                        {"type": "ContainersReady", "status": "True"},
                        {"type": "Ready", "status": "True"},
                        {"type": "PodScheduled", "status": "True"}]}});
                let _ = api
                    .patch_status(&cp.name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
                return;
            }
            Ok(Ok(o)) => {
                if let Some(n) = lock(&nets).get_mut(&cp.uid) {
                    n.failure = Some(o);
                }
            }
            Ok(Err(e)) => note(&format!("ADD {}: {e:#}", cp.name)),
            Err(e) => note(&format!("ADD task {}: {e}", cp.name)),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// DEL once per pod (the runtime may call it again; once is what the kubelet guarantees).
async fn teardown(nets: &Nets, wiring: &Current, cp: &Pod) {
    let first = {
        let mut n = lock(nets);
        let e = n.entry(cp.uid.clone()).or_insert_with(|| PodNet {
            pod: Some(cp.clone()),
            ..PodNet::default()
        });
        !std::mem::replace(&mut e.torn_down, true)
    };
    if first {
        let plugin = lock(wiring).clone();
        let pod = cp.clone();
        match tokio::task::spawn_blocking(move || plugin.del(&pod)).await {
            Ok(Ok(o)) if o.ok => {}
            Ok(Ok(o)) => note(&format!("DEL {}: {}", cp.name, o.out)),
            Ok(Err(e)) => note(&format!("DEL {}: {e:#}", cp.name)),
            Err(e) => note(&format!("DEL task {}: {e}", cp.name)),
        }
    }
}

fn note(msg: &str) {
    eprintln!("kubelet: {msg}");
}
