//! `tetherd run`: the daemon. Standalone mode: an embedded store, pools from manifests,
//! workloads from a manifest directory, policies built in or from files. Kubernetes mode
//! (`--kubernetes`): IPAllocation objects, IPPool objects, workloads from the API server.

mod http;
mod kube;
mod kube_policies;
mod peer;
mod pins;
mod pools;
mod workloads;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tether_engine::ports::{NoWorkloads, WorkloadSource};
use tether_engine::{Engine, Metrics, Ports};
use tether_policy::Runtime;
use tether_store::Store;
use tether_store::embedded::EmbeddedStore;

use crate::chain::{self, PolicySource};
use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tetherd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tetherd: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// The chain the flags describe: `--chain`, minus what the enable switches turn off.
fn chain_sources(args: &RunArgs) -> anyhow::Result<Vec<(PolicySource, tether_policy::Settings)>> {
    let mut out = Vec::new();
    for item in args
        .chain
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let mut source = PolicySource::parse(item);
        if let (PolicySource::File(p), Some(dir)) = (&source, &args.policies)
            && p.is_relative()
        {
            source = PolicySource::File(dir.join(p));
        }
        let off = match &source {
            PolicySource::Builtin(n) => {
                (n == "kubevirt" && !args.enable_kubevirt_static_ip)
                    || (n == "statefulset" && !args.enable_statefulset)
            }
            PolicySource::File(_) | PolicySource::ConfigMap(_) => false,
        };
        if off {
            tracing::info!(policy = item, "left out of the chain by configuration");
            continue;
        }
        out.push((source, Vec::new()));
    }
    for s in &args.policy_settings {
        let (policy, kv) = s
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--policy-setting {s:?} is not POLICY:KEY=VALUE"))?;
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--policy-setting {s:?} is not POLICY:KEY=VALUE"))?;
        let entry = out
            .iter_mut()
            .find(|(src, _)| match src {
                PolicySource::Builtin(n) => n == policy,
                PolicySource::File(p) => p.file_stem().and_then(|x| x.to_str()) == Some(policy),
                PolicySource::ConfigMap(n) => n == policy,
            })
            .ok_or_else(|| {
                anyhow::anyhow!("--policy-setting names {policy:?}, which is not in the chain")
            })?;
        entry.1.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Binds the API socket so that nobody but root can reach it at any instant: it is bound
/// inside a fresh 0700 directory (whatever the umask), made 0600, and only then renamed to its
/// path.
fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt as _;
        // Only a socket is ours to replace: a file, directory or link there is somebody
        // else's (a mistyped --socket must not delete it).
        if !m.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: refusing to replace it (choose another --socket)",
                socket.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!("{} is in use: another tetherd is running", socket.display());
        }
        std::fs::remove_file(socket)
            .map_err(|e| anyhow::anyhow!("removing stale {}: {e}", socket.display()))?;
    }
    let private = dir.join(format!(".tetherd-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", private.display()))?;
    let staged = private.join("tether.sock");
    let bound = (|| {
        let l = tokio::net::UnixListener::bind(&staged)
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", socket.display()))?;
        // Root-only: whoever can talk to the socket can take addresses.
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, socket)
            .map_err(|e| anyhow::anyhow!("moving the socket to {}: {e}", socket.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Reloads the pools when a file changes (checked every `every`; never when zero) and on
/// SIGHUP. A load that fails is logged and counted, and the pools in force stay.
async fn watch_pools(service: Arc<Engine>, files: pools::PoolFiles, every: Duration) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP (pool reloads on file changes only): {e}");
            None
        }
    };
    let mut tick = (!every.is_zero()).then(|| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let files = Arc::new(std::sync::Mutex::new(files));
    loop {
        let force = tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => false,
        };
        // Off the async workers: loading reads files, and putting the pools in force waits for
        // the writer's batch and rebuilds the free sets (a pass over every allocation).
        let f = files.clone();
        let svc = service.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let path = f.path().display().to_string();
            let Some(loaded) = f.reload(force) else {
                return; // nothing changed
            };
            match loaded {
                Ok(pools) => match svc.replace_pools(pools) {
                    Ok(diff) => {
                        svc.set_reload_error(None);
                        svc.metrics.pool_reload("ok");
                        if diff.is_empty() {
                            tracing::debug!(path = %path, "pools unchanged");
                        } else {
                            tracing::info!(path = %path, added = ?diff.added, removed = ?diff.removed, changed = ?diff.changed, "pools reloaded");
                        }
                    }
                    Err(e) => {
                        svc.set_reload_error(Some(e.to_string()));
                        svc.metrics.pool_reload("error");
                        tracing::error!(path = %path, "pools not reloaded, the previous ones stay in force: {e}");
                    }
                },
                Err(e) => {
                    svc.set_reload_error(Some(format!("{e:#}")));
                    svc.metrics.pool_reload("error");
                    tracing::error!(path = %path, "pools not reloaded, the previous ones stay in force: {e:#}");
                }
            }
        })
        .await;
        if let Err(e) = done {
            tracing::error!("pool reload task: {e}");
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down: no new requests; finishing those in flight");
}

/// Where pools come from.
enum PoolSource {
    Files(pools::PoolFiles),
    Kube(
        ::kube::Client,
        Arc<std::sync::Mutex<kube::Verdicts>>,
        tokio::runtime::Runtime,
    ),
}

/// A node's seed for spreading its searches: a stable hash of its name.
fn node_seed(node: &str) -> u64 {
    // FNV-1a: stable across releases and processes.
    node.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The store, workload source and pools of one mode.
struct Adapters {
    store: Arc<dyn Store>,
    workloads: (Arc<dyn WorkloadSource>, bool),
    pools: Vec<tether_core::pool::Pool>,
    pool_source: PoolSource,
    /// For the start-up log.
    store_name: String,
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    // Kubernetes mode keeps nothing on the node: its root filesystem may be read-only.
    if !args.kubernetes {
        std::fs::create_dir_all(&args.state_dir)
            .map_err(|e| anyhow::anyhow!("creating state dir {}: {e}", args.state_dir.display()))?;
    }
    let runtime = Arc::new(Runtime::new(args.sandbox.runtime_config()?)?);
    let slots = chain::slots(&runtime, &chain_sources(&args)?)?;
    let metrics = Arc::new(Metrics::new());
    let adapters = if args.kubernetes {
        let Some(node) = args.node_name.as_deref().filter(|n| !n.is_empty()) else {
            anyhow::bail!("--kubernetes needs the node's name: --node-name or NODE_NAME");
        };
        let k = kube::connect(node, args.kubeconfig.as_deref(), metrics.clone()).await?;
        Adapters {
            store: Arc::new(k.store),
            workloads: (Arc::new(k.workloads), true),
            pools: k.pools,
            pool_source: PoolSource::Kube(k.client, k.verdicts, k.runtime),
            store_name: "IPAllocation objects".to_owned(),
        }
    } else {
        let store_path = args.state_dir.join("tether.redb");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&store_path)?);
        let (pool_files, pools) = pools::PoolFiles::open(&args.pools)?;
        let workloads: (Arc<dyn WorkloadSource>, bool) = match &args.workloads {
            Some(d) => (
                Arc::new(
                    workloads::WorkloadFiles::new(
                        d.clone(),
                        std::time::Duration::from_secs(args.workloads_settle_secs),
                    )
                    .map_err(|e| anyhow::anyhow!("workloads dir {}: {e}", d.display()))?,
                ),
                true,
            ),
            None => (Arc::new(NoWorkloads), false),
        };
        Adapters {
            store,
            workloads,
            pools,
            pool_source: PoolSource::Files(pool_files),
            store_name: store_path.display().to_string(),
        }
    };
    let Adapters {
        store,
        workloads,
        pools,
        pool_source,
        store_name,
    } = adapters;
    let client = match &pool_source {
        PoolSource::Kube(c, ..) => Some(c.clone()),
        PoolSource::Files(_) => None,
    };
    let policies = kube_policies::start(&args, runtime, slots, client, metrics.clone())?;
    let ports = Ports {
        store,
        workloads,
        policies: policies.decide,
    };
    // Off the async workers: the Kubernetes store's reads block on this runtime.
    let (service, writer_thread) =
        tokio::task::spawn_blocking(move || Engine::start(ports, pools, metrics))
            .await
            .map_err(|e| anyhow::anyhow!("starting the engine: {e}"))?
            .map_err(|e| anyhow::anyhow!("pools: {e}"))?;
    let service = Arc::new(service);
    let listener = peer::PeerChecked::new(
        bind(&args.socket)?,
        peer::Allowed::root_and_self(),
        service.metrics.clone(),
    );
    let public = match args.metrics_address {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("binding --metrics-address {addr}: {e}"))?;
            tracing::info!(address = %addr, "serving /metrics, /healthz and /readyz over TCP");
            let router = http::public_router(service.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, router).await {
                    tracing::error!(address = %addr, "the metrics listener stopped: {e}");
                }
            }))
        }
        None => None,
    };
    tracing::info!(
        socket = %args.socket.display(),
        store = %store_name,
        chain = ?service.chain_names(),
        pools = service.pools().pools.len(),
        "tetherd started"
    );

    service.set_gc_settings(tether_engine::GcSettings {
        grace: Duration::from_secs(args.gc_grace_secs),
        vm_grace: Duration::from_secs(args.gc_vm_grace_secs),
        node_grace: Duration::from_secs(args.gc_node_grace_secs),
    });
    // In Kubernetes mode release rules are applied by garbage collection, with its grace
    // periods; `tetherd reconcile` still applies them at once.
    let reconciler = if args.reconcile_interval_secs > 0 && !args.kubernetes {
        let svc = service.clone();
        let every = Duration::from_secs(args.reconcile_interval_secs);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match svc.reconcile().await {
                    Ok(_) => {}
                    Err(tether_engine::EngineError::NotElected(why)) => {
                        tracing::debug!("periodic reconcile skipped: {why}");
                    }
                    Err(e) => tracing::warn!("periodic reconcile: {e}"),
                }
            }
        }))
    } else {
        None
    };

    let mut kube_runtime = None;
    let pool_watcher = match pool_source {
        PoolSource::Files(files) => {
            service.set_node(tether_engine::NodeInfo {
                name: args.node_name.clone().unwrap_or_default(),
                labels: Some(args.node_labels.clone()),
                shared: false,
            });
            tokio::spawn(watch_pools(
                service.clone(),
                files,
                Duration::from_secs(args.pools_watch_interval_secs),
            ))
        }
        PoolSource::Kube(client, verdicts, runtime) => {
            kube_runtime = Some(runtime);
            // Each node searches its own part of a shared pool: nodes rarely race for one
            // address.
            service.spread_cursors(node_seed(args.node_name.as_deref().unwrap_or_default()));
            // No release rule is applied before this daemon knows it is elected.
            service.set_release_gate(Arc::new(|| {
                Err("this daemon has not joined the releasers' Lease yet".to_owned())
            }));
            tokio::spawn(kube::cluster_duties(
                service.clone(),
                client.clone(),
                args.lease_namespace.clone(),
                args.node_name.clone().unwrap_or_default(),
                verdicts.clone(),
            ));
            // Known before the first ADD: every holder records its node.
            service.set_node(tether_engine::NodeInfo {
                name: args.node_name.clone().unwrap_or_default(),
                labels: None,
                shared: true,
            });
            service.set_claim_reporter(kube::claim_status_writer(
                client.clone(),
                tokio::runtime::Handle::current(),
            ));
            service.set_gc_reporter(kube::gc_event_poster(
                client.clone(),
                tokio::runtime::Handle::current(),
            ));
            if args.gc_interval_secs > 0 {
                tokio::spawn(kube::collect_garbage(
                    service.clone(),
                    Duration::from_secs(args.gc_interval_secs),
                ));
            } else {
                tracing::warn!(
                    "garbage collection is off (--gc-interval-secs 0): missed DELs and lost nodes leak addresses until released by hand, and release rules (VM deleted, StatefulSet scaled down, IPAMClaim deleted) are applied only by `tetherd reconcile`"
                );
            }
            tokio::spawn(kube::watch_node(
                service.clone(),
                client.clone(),
                args.node_name.clone().unwrap_or_default(),
            ));
            tokio::spawn(kube::watch_pools(service.clone(), client, verdicts))
        }
    };

    tracing::info!(target: crate::cli::READY_TARGET, "ready, listening on {}", args.socket.display());
    axum::serve(listener, http::router(service.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    if let Some(r) = reconciler {
        r.abort();
    }
    pool_watcher.abort();
    if let Some(p) = public {
        p.abort();
    }
    if let Some(w) = policies.watch {
        w.abort();
    }
    drop(service);
    let _ = std::fs::remove_file(&args.socket);
    // The writer ends once the last handle is gone, after finishing its batch.
    let joined = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || writer_thread.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("the writer did not stop within 10s");
    }
    if let Some(rt) = kube_runtime {
        // Dropping a runtime may not block inside another one.
        rt.shutdown_background();
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// With the most permissive umask, the socket never shows up at its path with a mode
    /// wider than 0600, not even between its bind and its chmod: a poller stats the path
    /// without pause while the daemon binds it again and again.
    #[tokio::test]
    async fn socket_is_never_reachable_by_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run").join("tether.sock");
        let old = rustix::process::umask(rustix::fs::Mode::empty());
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut wide = Vec::new();
                let mut seen = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(m) = std::fs::symlink_metadata(&path)
                        && m.file_type().is_socket()
                    {
                        seen += 1;
                        if m.permissions().mode() & 0o777 != 0o600 {
                            wide.push(m.permissions().mode() & 0o777);
                        }
                    }
                }
                (wide, seen)
            })
        };
        for _ in 0..300 {
            let l = bind(&path).expect("bind");
            drop(l);
            std::fs::remove_file(&path).expect("remove");
        }
        stop.store(true, Ordering::SeqCst);
        let (wide, seen) = poller.join().expect("poller");
        rustix::process::umask(old);
        assert!(seen > 0, "the poller never saw the socket");
        let wide: Vec<String> = wide.iter().map(|m| format!("{m:o}")).collect();
        assert!(
            wide.is_empty(),
            "socket seen with modes {wide:?} ({seen} looks)"
        );
        // Nothing is left behind but the socket's directory.
        let left: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("read dir")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
