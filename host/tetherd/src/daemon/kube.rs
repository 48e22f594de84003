//! Kubernetes mode's adapters, wired: the store of IPAllocation objects, workloads from watch
//! caches, and pools from IPPool objects, watched.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tether_core::pool::{Pool, check_disjoint, from_manifest};
use tether_engine::Engine;
use tether_kube::crd::IPPool;
use tether_kube::store::KubeStore;
use tether_kube::workloads::KubeWorkloads;
use tokio::runtime::Handle;

/// How long the pools may keep changing before they are put in force.
const POOL_DEBOUNCE: Duration = Duration::from_millis(200);

/// What `tetherd run --kubernetes` runs on.
pub struct KubeMode {
    pub client: kube::Client,
    pub store: KubeStore,
    pub workloads: KubeWorkloads,
    pub pools: Vec<Pool>,
}

/// Connects (in-cluster config, or KUBECONFIG, as kube infers it), starts the workload
/// watches of `node`, and reads the pools.
pub async fn connect(node: &str, kubeconfig: Option<&Path>) -> anyhow::Result<KubeMode> {
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
    let client = kube::Client::try_from(config)
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    let api: Api<IPPool> = Api::all(client.clone());
    let list = api.list(&Default::default()).await.map_err(|e| {
        anyhow::anyhow!(
            "listing IPPools (are the CRDs installed? `tetherd crd | kubectl apply -f -`): {e}"
        )
    })?;
    let pools = serving(&list.items);
    Ok(KubeMode {
        store: KubeStore::new(client.clone(), Handle::current()),
        workloads: KubeWorkloads::start(client.clone(), Handle::current(), node),
        client,
        pools,
    })
}

/// The pools that serve: every valid IPPool that overlaps no other. An invalid pool, or two
/// pools sharing an address, serve nothing (each logged); the others are unaffected.
pub fn serving(objects: &[IPPool]) -> Vec<Pool> {
    let mut valid = Vec::with_capacity(objects.len());
    for o in objects {
        let name = o.metadata.name.clone().unwrap_or_default();
        let mut v = serde_json::to_value(o).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), tether_core::pool::API_VERSION.into());
            m.insert("kind".into(), tether_core::pool::KIND.into());
        }
        match from_manifest(&v) {
            Ok(p) => valid.push(p),
            Err(e) => tracing::error!(pool = %name, "IPPool invalid; it serves nothing: {e}"),
        }
    }
    let overlapping: Vec<bool> = (0..valid.len())
        .map(|i| {
            (0..valid.len())
                .any(|j| i != j && check_disjoint(&[valid[i].clone(), valid[j].clone()]).is_err())
        })
        .collect();
    let mut out = Vec::with_capacity(valid.len());
    for (p, overlaps) in valid.into_iter().zip(overlapping) {
        if overlaps {
            tracing::error!(pool = %p.name, "IPPool overlaps another; neither serves until one is changed");
        } else {
            out.push(p);
        }
    }
    out
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
        Err(e) => {
            tracing::warn!("IPPool watch failed; retrying: {e}");
            false
        }
    }
}

/// Puts the IPPools in force whenever they change, once they have been still for
/// [`POOL_DEBOUNCE`]. A set the engine refuses leaves the pools in force, logged and counted.
pub async fn watch_pools(service: Arc<Engine>, client: kube::Client) {
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
        let pools = serving(&objects.values().cloned().collect::<Vec<_>>());
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
