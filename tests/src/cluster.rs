//! A real control plane for tests: etcd and kube-apiserver v1.20.2 on loopback, started with
//! `scripts/kube-apiserver.sh` (which builds them once from Debian's source package and caches
//! them under /var/cache/tether-testenv). No kubelet runs: tests play the node.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A running etcd + kube-apiserver; stopped on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The admin kubeconfig (token auth, TLS to 127.0.0.1).
    pub kubeconfig: PathBuf,
}

/// The repository's root (this crate is `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A free loopback port with the two after it free too (the script puts etcd's client and
/// peer ports there).
fn free_ports() -> Result<u16> {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        drop(l);
        if port < 65000 && (1..=2).all(|i| TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no three free loopback ports in a row")
}

impl Cluster {
    /// Starts a fresh control plane (with the controller-manager and scheduler when
    /// `controllers`). Fails when the binaries cannot be built or the apiserver does not
    /// become ready; the message says why.
    pub fn start(controllers: bool) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let port = free_ports()?;
        let script = repo_root().join("scripts/kube-apiserver.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("start")
            .arg(dir.path())
            .arg(port.to_string());
        if controllers {
            cmd.env("WITH_CONTROLLERS", "1");
        }
        let out = cmd.output().context("running scripts/kube-apiserver.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/kube-apiserver.sh start failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let kubeconfig = dir.path().join("kubeconfig");
        Ok(Cluster { dir, kubeconfig })
    }

    /// A kube client for the admin user.
    pub async fn client(&self) -> Result<kube::Client> {
        // rustls needs one crypto provider chosen before the first TLS connection.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Installs Tether's CRDs and waits until they serve.
    pub async fn install_crds(&self, client: &kube::Client) -> Result<()> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::api::{Api, ListParams, PostParams};
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in tether_kube::crd::crds() {
            api.create(&PostParams::default(), &crd)
                .await
                .context("creating a CRD")?;
        }
        // Established takes a moment: wait until every kind can be listed.
        let pools: Api<tether_kube::crd::IPPool> = Api::all(client.clone());
        let objects: Api<tether_kube::crd::IPAllocation> = Api::all(client.clone());
        for _ in 0..100 {
            if pools.list(&ListParams::default()).await.is_ok()
                && objects.list(&ListParams::default()).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        bail!("the CRDs never served")
    }

    /// Registers a schedulable node.
    pub fn add_node(&self, name: &str) -> Result<()> {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/kube-apiserver.sh"))
            .arg("node")
            .arg(self.dir.path())
            .arg(name)
            .output()?;
        if !out.status.success() {
            bail!(
                "adding node {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The apiserver's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }

    /// Runs a subcommand of scripts/kube-apiserver.sh on this control plane; its stdout.
    fn script(&self, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/kube-apiserver.sh"))
            .arg(args[0])
            .arg(self.dir.path())
            .args(&args[1..])
            .envs(env.iter().copied())
            .output()
            .context("running scripts/kube-apiserver.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/kube-apiserver.sh {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the apiserver only (etcd keeps running, and its data); returns once it has exited.
    pub fn stop_apiserver(&self) -> Result<()> {
        self.script(&["apiserver-stop"], &[]).map(drop)
    }

    /// Starts the apiserver again on its port, over the same etcd, with `extra` flags added to
    /// those it was started with; returns once it is ready.
    pub fn start_apiserver(&self, extra: &[&str]) -> Result<()> {
        let args = extra.join(" ");
        self.script(&["apiserver-start"], &[("APISERVER_ARGS", &args)])
            .map(drop)
    }

    /// Starts a second apiserver `name` over the same etcd, on a free port; returns its
    /// kubeconfig. [`Cluster::stop_apiserver_named`] stops it, as does dropping the cluster.
    pub fn start_second_apiserver(&self, name: &str) -> Result<PathBuf> {
        let port = free_ports()?.to_string();
        self.script(&["apiserver-start", name, &port], &[])
            .map(PathBuf::from)
    }

    /// Stops the second apiserver `name`.
    pub fn stop_apiserver_named(&self, name: &str) -> Result<()> {
        self.script(&["apiserver-stop", name], &[]).map(drop)
    }

    /// Stops etcd only (the apiserver keeps running); returns once it has exited.
    pub fn stop_etcd(&self) -> Result<()> {
        self.script(&["etcd-stop"], &[]).map(drop)
    }

    /// Starts etcd again on its data directory; returns once it is healthy.
    pub fn start_etcd(&self) -> Result<()> {
        self.script(&["etcd-start"], &[]).map(drop)
    }

    /// Writes a key straight into etcd (no apiserver needed): moves etcd's revision on, so
    /// that a watch resumed after an apiserver restart from an older resourceVersion expires.
    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        self.script(&["etcd-put", key, value], &[]).map(drop)
    }

    /// Compacts etcd at its current revision; returns the revision.
    pub fn etcd_compact(&self) -> Result<u64> {
        let rev = self.script(&["etcd-compact"], &[])?;
        rev.parse()
            .with_context(|| format!("etcd-compact printed {rev:?}"))
    }

    /// A kube client for the admin user through `kubeconfig` (e.g. a second apiserver's).
    pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/kube-apiserver.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// A control plane with Tether's CRDs installed, a runtime to talk to it, and an admin client.
pub struct TestCluster {
    pub cluster: Cluster,
    pub rt: tokio::runtime::Runtime,
    pub client: kube::Client,
}

impl TestCluster {
    /// A control plane without Tether's CRDs (for a test that installs them its own way), a
    /// runtime and an admin client; `None` after [`crate::skip_or_fail`] when it cannot start.
    pub fn bare(
        test: &str,
        controllers: bool,
    ) -> Option<(Cluster, tokio::runtime::Runtime, kube::Client)> {
        let cluster = match Cluster::start(controllers) {
            Ok(c) => c,
            Err(e) => {
                crate::skip_or_fail(test, &format!("no test control plane: {e:#}"));
                return None;
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt.block_on(cluster.client()).expect("client");
        Some((cluster, rt, client))
    }

    /// Starts one for `test` (with the controller-manager and scheduler when `controllers`);
    /// `None` after [`crate::skip_or_fail`] when it cannot start.
    pub fn start(test: &str, controllers: bool) -> Option<TestCluster> {
        let (cluster, rt, client) = Self::bare(test, controllers)?;
        rt.block_on(cluster.install_crds(&client)).expect("CRDs");
        if controllers {
            // Pods need their namespace's `default` ServiceAccount, which the controller-manager
            // makes a moment after it starts (later on a loaded machine): wait for it.
            rt.block_on(wait_for_default_service_account(&client))
                .expect("the default ServiceAccount");
        }
        Some(TestCluster {
            cluster,
            rt,
            client,
        })
    }

    /// Starts one without controllers for `test` (see [`TestCluster::start`]), with namespace
    /// default's `default` ServiceAccount and the IPPool `pool` (YAML).
    pub fn with_pool(test: &str, pool: &str) -> Option<TestCluster> {
        let tc = Self::start(test, false)?;
        tc.default_service_account();
        tc.create_pool(pool);
        Some(tc)
    }

    /// Makes namespace default's `default` ServiceAccount, which the ServiceAccount admission
    /// wants and the controller-manager (not running without `controllers`) would make.
    pub fn default_service_account(&self) {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let sa = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.rt
            .block_on(
                kube::Api::<ServiceAccount>::namespaced(self.client.clone(), "default")
                    .create(&kube::api::PostParams::default(), &sa),
            )
            .expect("ServiceAccount");
    }

    /// Creates the IPPool `pool` (YAML).
    pub fn create_pool(&self, pool: &str) {
        use tether_kube::crd::IPPool;
        let pool: IPPool = yaml_serde::from_str(pool).expect("IPPool YAML");
        self.rt
            .block_on(
                kube::Api::<IPPool>::all(self.client.clone())
                    .create(&kube::api::PostParams::default(), &pool),
            )
            .expect("IPPool");
    }
}

/// Waits (60 s at most) until namespace `default` has its `default` ServiceAccount.
async fn wait_for_default_service_account(client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let api: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), "default");
    for _ in 0..600 {
        if api.get_opt("default").await?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bail!(
        "the controller-manager made no `default` ServiceAccount in namespace default within 60 s"
    )
}
