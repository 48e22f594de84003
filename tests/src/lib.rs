//! End-to-end harness: start `tetherd run` on a temporary state, call the `tether` plugin the
//! way a runtime or a main plugin does, write workload manifests, and (as root) wire real
//! macvlan interfaces in network namespaces.
//!
//! The binaries are looked up next to the running executable (cargo puts test and demo
//! binaries in `target/<profile>/deps` and `target/<profile>`); build the workspace first.

#![allow(missing_docs)] // a test harness: the module docs say what each piece is for

pub mod cluster;
pub mod crash_model;
pub mod kubelet;
pub mod kubevirt;
pub mod netns;
pub mod proxy;
pub mod walkthrough;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The directory holding `tetherd` and `tether`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TETHER_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        if dir.join("tetherd").is_file() && dir.join("tether").is_file() {
            return Ok(dir.to_owned());
        }
    }
    bail!(
        "tetherd and tether are not next to {}: run `cargo build --workspace` first (or set TETHER_BIN_DIR)",
        exe.display()
    )
}

/// Whether this process is root (network namespaces and macvlan need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether this runs in CI: `CI` is set to a non-empty value other than `0` or `false` (CI
/// systems set `CI=true`). There every test must really run: a missing setup is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Polls `done` every 200 ms until it holds; panics with `what` once `secs` have passed.
/// Returns how long it took.
pub fn within(secs: u64, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// For a test that cannot run its real setup here (no root, a tool missing): in CI it fails
/// with `why`; elsewhere it prints `SKIPPED <test>: <why>` and the caller returns (a pass), so
/// a developer without root can still run the rest.
pub fn skip_or_fail(test: &str, why: &str) {
    if in_ci() {
        panic!(
            "{test} cannot run its real setup, and in CI (CI is set) every test must run: {why}"
        );
    }
    eprintln!("SKIPPED {test}: {why} (with CI set, this is a failure)");
}

/// A small deterministic random source (SplitMix64) for tests that print their seed, so that a
/// failing run's choices can be replayed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The seed in the environment variable `var` (to replay a run), else one from the clock.
    /// Printed, with how to replay it.
    pub fn seed_from_env(var: &str) -> u64 {
        let seed = std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            });
        eprintln!("seed {seed} (replay with {var}={seed})");
        seed
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is negligible for small `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The seed's pool: `test-ippool`, 10 addresses of 10.6.0.0/16.
pub const SEED_POOL: &str = r#"apiVersion: ipam.tether.dev/v1alpha1
kind: IPPool
metadata:
  name: test-ippool
spec:
  subnet: 10.6.0.0/16
  ips: ["10.6.168.101-10.6.168.110"]
  gateway: 10.6.0.1
  routes: [{dst: 0.0.0.0/0}]
"#;

/// A running tetherd on a temporary state.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub workloads: PathBuf,
    child: Child,
    /// Run under a wrapper (strace) in its own process group: signals go to the group, or
    /// killing the wrapper alone would leave tetherd running detached.
    group: bool,
}

/// Sends a signal by name (`HUP`, `TERM`, `KILL`, `INT`) to a process, or to the process
/// group it leads.
pub fn send_signal(pid: u32, name: &str, group: bool) -> Result<()> {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let signal = match name {
        "HUP" => Signal::HUP,
        "TERM" => Signal::TERM,
        "KILL" => Signal::KILL,
        "INT" => Signal::INT,
        other => bail!("no such signal here: {other}"),
    };
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .context("not a process id")?;
    if group {
        kill_process_group(pid, signal)
    } else {
        kill_process(pid, signal)
    }
    .with_context(|| format!("kill -{name} {pid:?}"))
}

/// `[flag, value]` unless `extra` sets the flag itself.
fn default_flag<'a>(extra: &[&str], flag: &'a str, value: &'a str) -> Vec<&'a str> {
    if extra.contains(&flag) {
        Vec::new()
    } else {
        vec![flag, value]
    }
}

impl Daemon {
    /// Starts tetherd with `pools_yaml` and extra flags; waits until it serves.
    pub fn start(pools_yaml: &str, extra: &[&str]) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        Self::start_in(dir, pools_yaml, extra)
    }

    /// Starts tetherd in an existing directory (state survives a restart).
    pub fn start_in(dir: tempfile::TempDir, pools_yaml: &str, extra: &[&str]) -> Result<Daemon> {
        Self::start_wrapped(dir, pools_yaml, extra, &[])
    }

    /// Starts tetherd under a wrapper command (e.g. `strace ... --`), in its own process group,
    /// in an existing directory; an empty wrapper runs it directly.
    pub fn start_wrapped(
        dir: tempfile::TempDir,
        pools_yaml: &str,
        extra: &[&str],
        wrapper: &[&str],
    ) -> Result<Daemon> {
        use std::os::unix::process::CommandExt as _;
        let socket = dir.path().join("tether.sock");
        let workloads = dir.path().join("workloads");
        std::fs::create_dir_all(&workloads)?;
        std::fs::write(dir.path().join("pools.yaml"), pools_yaml)?;
        let log = std::fs::File::create(dir.path().join("tetherd.log"))?;
        let tetherd = bin_dir()?.join("tetherd");
        let group = !wrapper.is_empty();
        let mut cmd = match wrapper.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(&tetherd).process_group(0);
                c
            }
            None => Command::new(&tetherd),
        };
        let child = cmd
            .arg("run")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--pools")
            .arg(dir.path().join("pools.yaml"))
            .arg("--workloads")
            .arg(&workloads)
            .arg("--socket")
            .arg(&socket)
            // Defaults a test may override: release rules only when asked, workloads judged
            // as soon as they change (no settle period), info logs.
            .args(default_flag(extra, "--reconcile-interval-secs", "0"))
            .args(default_flag(extra, "--workloads-settle-secs", "0"))
            .args(default_flag(extra, "--log-level", "info"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tetherd")?;
        let mut d = Daemon {
            dir,
            socket,
            workloads,
            child,
            group,
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = tether_api::client::Client::new(&self.socket, Duration::from_secs(5));
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("tetherd exited with {status}: {}", self.log());
            }
            if client.get::<Value>("/readyz").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("tetherd did not become ready: {}", self.log())
    }

    /// CPU time the daemon has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Result<Duration> {
        // utime and stime: fields 14 and 15 of /proc/PID/stat.
        proc_cpu_time(&format!("/proc/{}/stat", self.child.id()), 14)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tetherd.log")).unwrap_or_default()
    }

    /// An API client.
    pub fn client(&self) -> tether_api::client::Client {
        tether_api::client::Client::new(&self.socket, Duration::from_secs(30))
    }

    /// Writes a workload manifest (as a user would before the CNI call).
    pub fn put_manifest(&self, name: &str, yaml: &str) -> Result<()> {
        let tmp = self.workloads.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.workloads.join(format!("{name}.yaml")))?;
        Ok(())
    }

    /// Removes a workload manifest (the object is deleted).
    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.workloads.join(format!("{name}.yaml")))?;
        Ok(())
    }

    /// Asks for the release rules to be applied now.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        let r: tether_api::ReconcileResult = self.client().post("/v1/reconcile", &json!({}))?;
        Ok(r.released)
    }

    /// `(allocated, total)` of a pool.
    pub fn usage(&self, pool: &str) -> Result<(u64, u64)> {
        let list: tether_api::PoolList = self.client().get("/v1/pools")?;
        let p = list
            .pools
            .iter()
            .find(|p| p.name == pool)
            .with_context(|| format!("no pool {pool}"))?;
        Ok((p.allocated.parse()?, p.total.parse()?))
    }

    /// Every allocation, as JSON.
    pub fn allocations(&self) -> Result<Vec<Value>> {
        Ok(self.client().get("/v1/allocations")?)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the daemon.
    pub fn signal(&self, name: &str) -> Result<()> {
        send_signal(self.child.id(), name, self.group)
    }

    /// SIGTERM, then wait; returns the directory for a restart.
    pub fn stop(mut self) -> Result<tempfile::TempDir> {
        self.signal("TERM")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                let dir = tempfile::tempdir()?;
                let old = std::mem::replace(&mut self.dir, dir);
                return Ok(old);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("tetherd did not stop on SIGTERM")
    }

    /// SIGKILL: a crash at an arbitrary instant.
    pub fn kill(mut self) -> Result<tempfile::TempDir> {
        if self.group {
            send_signal(self.child.id(), "KILL", true)?;
        } else {
            self.child.kill()?;
        }
        self.child.wait()?;
        let dir = tempfile::tempdir()?;
        Ok(std::mem::replace(&mut self.dir, dir))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.group {
            let _ = send_signal(self.child.id(), "KILL", true);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) from two consecutive fields of a /proc stat file, starting at
/// 1-based field `first` (14: the process itself; 16: its waited-for children). USER_HZ (10 ms)
/// resolution: meaningful over many calls only.
pub fn proc_cpu_time(path: &str, first: usize) -> Result<Duration> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name's ')' start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: field {n} missing"))
    };
    Ok(Duration::from_millis(
        (field(first)? + field(first + 1)?) * 10,
    ))
}

/// The CPU time of this process's finished children (the plugin processes a harness ran).
pub fn children_cpu_time() -> Result<Duration> {
    proc_cpu_time("/proc/self/stat", 16)
}

/// A CNI call's outcome: the plugin's stdout as JSON (a result, or an error with a code).
#[derive(Debug, Clone)]
pub struct CniOutcome {
    pub ok: bool,
    pub out: Value,
    pub stderr: String,
}

impl CniOutcome {
    /// The first address of a successful ADD, without prefix.
    pub fn ip(&self) -> Option<String> {
        self.out["ips"][0]["address"]
            .as_str()
            .map(|a| a.split('/').next().unwrap_or(a).to_owned())
    }

    /// The error code of a failed call.
    pub fn code(&self) -> Option<u64> {
        self.out["code"].as_u64()
    }
}

/// Runs a CNI plugin binary as a runtime would.
pub fn cni_exec(
    plugin: &Path,
    command: &str,
    conf: &Value,
    env: &[(&str, &str)],
    cni_path: &str,
) -> Result<CniOutcome> {
    use std::io::Write;
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", cni_path)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let o = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let out = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("plugin stdout is not JSON: {text:?}"))?
    };
    Ok(CniOutcome {
        ok: o.status.success(),
        out,
        stderr: String::from_utf8_lossy(&o.stderr).to_string(),
    })
}

/// One pod's CNI identity.
#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub ifname: String,
}

impl Pod {
    pub fn new(namespace: &str, name: &str, n: u32) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("6a1f9e0e-0000-4000-8000-{n:012}"),
            container_id: format!("ctr-{name}-{n}"),
            ifname: "eth0".into(),
        }
    }

    /// CNI_ARGS as the kubelet sets them.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

/// Calls the `tether` plugin directly, as a main plugin delegating to its IPAM would.
#[derive(Debug, Clone)]
pub struct Ipam {
    pub plugin: PathBuf,
    pub conf: Value,
}

impl Ipam {
    /// A network config for `socket` with `pools`.
    pub fn new(socket: &Path, network: &str, version: &str, pools: &[&str]) -> Result<Ipam> {
        Ok(Ipam {
            plugin: bin_dir()?.join("tether"),
            conf: json!({
                "cniVersion": version,
                "name": network,
                "type": "macvlan",
                "ipam": {"type": "tether", "socket": socket, "pools": pools},
            }),
        })
    }

    pub fn call(&self, command: &str, pod: &Pod) -> Result<CniOutcome> {
        let args = pod.cni_args();
        cni_exec(
            &self.plugin,
            command,
            &self.conf,
            &[
                ("CNI_CONTAINERID", &pod.container_id),
                ("CNI_IFNAME", &pod.ifname),
                ("CNI_NETNS", "/var/run/netns/none"),
                ("CNI_ARGS", &args),
            ],
            "",
        )
    }

    pub fn add(&self, pod: &Pod) -> Result<CniOutcome> {
        self.call("ADD", pod)
    }

    pub fn del(&self, pod: &Pod) -> Result<CniOutcome> {
        self.call("DEL", pod)
    }

    /// CHECK as a runtime sends it: the config carries the ADD's result as `prevResult`.
    pub fn check(&self, pod: &Pod, prev: &Value) -> Result<CniOutcome> {
        let mut conf = self.conf.clone();
        conf["prevResult"] = prev.clone();
        Ipam {
            plugin: self.plugin.clone(),
            conf,
        }
        .call("CHECK", pod)
    }
}

/// Manifests of the seed's objects.
pub mod manifests {
    use super::Pod;

    pub fn vm(name: &str, uid: &str) -> String {
        format!(
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: default\n  uid: {uid}\nspec:\n  runStrategy: Always\n"
        )
    }

    pub fn vmi(name: &str, uid: &str, vm_uid: &str) -> String {
        format!(
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: {name}\n  namespace: default\n  uid: {uid}\n  ownerReferences:\n  - {{apiVersion: kubevirt.io/v1, kind: VirtualMachine, name: {name}, uid: {vm_uid}, controller: true}}\n"
        )
    }

    pub fn launcher(pod: &Pod, vmi: &str, vmi_uid: &str, migration: Option<&str>) -> String {
        let mig = migration
            .map(|m| format!("    kubevirt.io/migrationJobUID: {m}\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels:\n    kubevirt.io: virt-launcher\n    vm.kubevirt.io/name: {vmi}\n{mig}  annotations:\n    ipam.tether.dev/ippool: test-ippool\n  ownerReferences:\n  - {{apiVersion: kubevirt.io/v1, kind: VirtualMachineInstance, name: {vmi}, uid: {vmi_uid}, controller: true}}\n",
            pod.name, pod.namespace, pod.uid
        )
    }

    pub fn statefulset(name: &str, replicas: u32) -> String {
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: {name}\n  namespace: default\n  uid: sts-{name}\nspec:\n  replicas: {replicas}\n"
        )
    }

    pub fn sts_pod(pod: &Pod, sts: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: StatefulSet, name: {sts}, uid: sts-{sts}, controller: true}}\n",
            pod.name, pod.namespace, pod.uid
        )
    }

    pub fn deployment_pod(pod: &Pod) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: ReplicaSet, name: cart-7d9f8b6c5, uid: rs-1, controller: true}}\n",
            pod.name, pod.namespace, pod.uid
        )
    }
}
