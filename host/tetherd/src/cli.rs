//! Command-line interface (clap derive; every flag also reads an environment variable).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tether_policy::RuntimeConfig;

/// Tether IPAM node daemon and tools.
#[derive(Debug, Parser)]
#[command(name = "tetherd", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the daemon (standalone mode: embedded store, pools and workloads from manifests).
    Run(RunArgs),
    /// List the pools of a running daemon, like `kubectl get spiderippool`.
    Pools(SocketArgs),
    /// List the allocations of a running daemon: address, owner, identity, holders.
    Allocations(AllocationsArgs),
    /// Release one address by hand, whatever its owner: for a pinned address whose release
    /// rule cannot fire, or (with --force) one held by pods gone for good.
    Release(ReleaseArgs),
    /// Show garbage collection on a running daemon (Kubernetes mode): what its last pass
    /// freed and why, what looks leaked and how long until it may be freed, or why it is
    /// paused.
    Gc(SocketArgs),
    /// Wait until a daemon answers on its socket and is ready (polls /readyz): for scripts
    /// that start `tetherd run` in the background.
    Wait(WaitArgs),
    /// Author and inspect policies: build, test, inspect, export.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the CustomResourceDefinitions of Kubernetes mode (IPPool, IPAllocation,
    /// PinnedIdentity) as YAML, for `kubectl apply -f -`.
    Crd,
    /// Install the `tether` CNI plugin into the CNI bin directory atomically (copied beside
    /// it, synced, then renamed over it: a runtime running the old binary keeps it). The
    /// chart's init container runs this.
    InstallCni(InstallCniArgs),
}

#[derive(Debug, Args)]
pub struct InstallCniArgs {
    /// The plugin binary to install.
    #[arg(long, env = "TETHER_CNI_SOURCE", default_value = "/usr/bin/tether")]
    pub source: PathBuf,
    /// The CNI bin directory (in a pod: where the host's is mounted).
    #[arg(long, env = "TETHER_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub dest_dir: PathBuf,
    /// The installed plugin's name: the `type` that network configurations name.
    #[arg(long, default_value = "tether")]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// The daemon's socket.
    #[arg(long, env = "TETHER_SOCKET", default_value = tether_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct AllocationsArgs {
    /// Only this pool's.
    #[arg(long)]
    pub pool: Option<String>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Give up after this many seconds (exit 1).
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The address as POOL/IP (as `/v1/allocations` and the reconcile log name it).
    #[arg(value_name = "POOL/IP")]
    pub address: String,
    /// Release it even though pods still hold it: only when they are gone for good (a lost
    /// node), or the address is handed out twice.
    #[arg(long)]
    pub force: bool,
    /// Instead of releasing it, re-file it under the IPAMClaim NAMESPACE/NAME (a pinned address
    /// no pod holds): the address stays, pinned to the claim from now on. For moving a stopped
    /// VM from the `kubevirt` policy to KubeVirt's IPAMClaims without an address change.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "force")]
    pub to_claim: Option<String>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kubernetes mode: allocations as IPAllocation objects, pools from IPPool objects,
    /// workloads from the API server (in-cluster config, or KUBECONFIG). Needs --node-name.
    /// --pools, --workloads and the embedded store are not used.
    #[arg(long, env = "TETHER_KUBERNETES")]
    pub kubernetes: bool,
    /// This node's name, as the API server knows it (Kubernetes mode): the daemon watches the
    /// pods bound to it.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's labels, `key=value,...`, for pools with a `nodeSelector` (standalone mode;
    /// Kubernetes mode reads the Node object's labels).
    #[arg(long, env = "TETHER_NODE_LABELS", default_value = "", value_parser = parse_labels)]
    pub node_labels: Labels,
    /// The kubeconfig to use (Kubernetes mode); without it, the in-cluster config or
    /// KUBECONFIG, as kubectl finds them.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the releasers' Lease (`tether-releaser`, Kubernetes mode): the daemon
    /// holding it applies release rules and writes pool status. The chart sets it to the
    /// daemon's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tether-system")]
    pub lease_namespace: String,
    /// Where the embedded store lives (standalone mode; accepted in both).
    #[arg(long, env = "TETHER_STATE_DIR", default_value = "/var/lib/tether")]
    pub state_dir: PathBuf,
    /// IPPool manifests: a file or a directory. Reloaded when a file changes, and on SIGHUP.
    /// (Standalone mode.)
    #[arg(long, env = "TETHER_POOLS", default_value = "/etc/tether/pools")]
    pub pools: PathBuf,
    /// Seconds between checks of the pool files for changes (0: reload on SIGHUP only).
    #[arg(long, env = "TETHER_POOLS_WATCH_INTERVAL", default_value_t = 2)]
    pub pools_watch_interval_secs: u64,
    /// Kubernetes manifests (Pods, VMIs, VMs, StatefulSets, Namespaces) describing the workloads,
    /// looked up by the K8S_POD_NAMESPACE/K8S_POD_NAME CNI args. Re-read when files change.
    #[arg(long, env = "TETHER_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// Seconds that must pass after the newest change in the --workloads directory (the
    /// directory, its subdirectories, its manifest files; the inode change time, which `cp -p`
    /// or `touch -d` cannot set back) before anything missing from it counts as deleted and
    /// release rules fire: a file may be caught half-written, or between a delete and a
    /// create. 0 judges at once.
    #[arg(long, env = "TETHER_WORKLOADS_SETTLE", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub workloads_settle_secs: u64,
    /// Directory that relative policy paths in --chain are resolved against.
    #[arg(long, env = "TETHER_POLICIES")]
    pub policies: Option<PathBuf>,
    /// The policy chain, in order: `builtin:NAME`, a .wasm path, or (Kubernetes mode)
    /// `configmap:NAME`, a ConfigMap labelled `ipam.tether.dev/policy` in --policy-namespace.
    #[arg(
        long,
        env = "TETHER_CHAIN",
        default_value = "builtin:kubevirt,builtin:statefulset,builtin:stateless"
    )]
    pub chain: String,
    /// The namespace of the policy ConfigMaps the chain names (Kubernetes mode). Default: the
    /// client's namespace (in a pod: its own, from the service account; with a kubeconfig:
    /// the context's, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub policy_namespace: Option<String>,
    /// Pin KubeVirt VM addresses (false leaves the policy named kubevirt out of the chain,
    /// built in or from a ConfigMap).
    #[arg(long, env = "TETHER_ENABLE_KUBEVIRT_STATIC_IP", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_kubevirt_static_ip: bool,
    /// Pin StatefulSet pod addresses (false leaves the policy named statefulset out of the
    /// chain, built in or from a ConfigMap).
    #[arg(long, env = "TETHER_ENABLE_STATEFULSET", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_statefulset: bool,
    /// A setting for one policy of the chain, POLICY:KEY=VALUE. Repeatable.
    #[arg(long = "policy-setting", value_name = "POLICY:KEY=VALUE")]
    pub policy_settings: Vec<String>,
    /// The API socket (mode 0600).
    #[arg(long, env = "TETHER_SOCKET", default_value = tether_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Also serve the read-only endpoints `/metrics`, `/healthz` and `/readyz` over TCP at
    /// this address (e.g. `0.0.0.0:9721` for Prometheus, `127.0.0.1:9721` for probes alone).
    /// Nothing that allocates or releases is ever served there. Off by default.
    #[arg(long, env = "TETHER_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Standalone mode: seconds between checks of the release rules of pinned addresses (0:
    /// only on request). In Kubernetes mode garbage collection applies them, with its grace
    /// periods (--gc-*).
    #[arg(long, env = "TETHER_RECONCILE_INTERVAL", default_value_t = 30)]
    pub reconcile_interval_secs: u64,
    /// Kubernetes mode: seconds between garbage collection passes of the elected daemon (0:
    /// garbage collection off; CNI GC still frees this node's attachments by its rules).
    #[arg(long, env = "TETHER_GC_INTERVAL", default_value_t = 30)]
    pub gc_interval_secs: u64,
    /// Kubernetes mode: seconds an address or holder must keep looking leaked (its pod gone,
    /// its release rule fired) before garbage collection frees it.
    #[arg(long, env = "TETHER_GC_GRACE", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub gc_grace_secs: u64,
    /// Kubernetes mode: the same for a VM's pinned address (a VM's pod may be recreated
    /// slowly).
    #[arg(long, env = "TETHER_GC_VM_GRACE", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub gc_vm_grace_secs: u64,
    /// Kubernetes mode: seconds a node must be not ready (or gone) before its pods that are
    /// being deleted count as gone; their daemon cannot DEL them.
    #[arg(long, env = "TETHER_GC_NODE_GRACE", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub gc_node_grace_secs: u64,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `tether_policy=debug`. The
    /// default shows warnings, errors and the line saying the daemon is ready.
    #[arg(long, env = "TETHER_LOG", default_value = DEFAULT_LOG, global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The target of the one line `tetherd run` logs once it serves, shown by the default filter.
pub const READY_TARGET: &str = "tetherd::ready";
const DEFAULT_LOG: &str = "warn,tetherd::ready=info";

/// Logs go to stderr: stdout carries command output (and, for the CNI plugin, the protocol).
/// Colours only on a terminal, and never when NO_COLOR is set (https://no-color.org).
pub fn init_tracing(args: &LogArgs) {
    use std::io::IsTerminal;
    // A filter that does not parse is not silently replaced: the default is used and the
    // first thing logged says so.
    let (filter, invalid) = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new(DEFAULT_LOG), Some(e)),
    };
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(e) = invalid {
        tracing::warn!(filter = %args.log_level, default = DEFAULT_LOG, error = %e, "the log filter (--log-level, TETHER_LOG) is not valid; logging with the default filter");
    }
}

/// Limits of the policy sandbox.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Time limit (wall clock) of one policy evaluation, in milliseconds.
    #[arg(long, env = "TETHER_POLICY_TIMEOUT_MS", default_value_t = 100)]
    pub policy_timeout_ms: u64,
    /// Memory limit of one policy evaluation, in MiB.
    #[arg(long, env = "TETHER_POLICY_MEMORY_MIB", default_value_t = 16)]
    pub policy_memory_mib: usize,
    /// Reset a policy's memory between evaluations with the kernel's PAGEMAP_SCAN (only the
    /// pages it dirtied). Off by default: wasmtime still evaluates it, and a dirty page that
    /// was swapped out is neither reset nor released, so the next evaluation could read it.
    /// Only for nodes without swap: refused where swap is in use when tetherd starts. Measured
    /// gain for the built-in policies: none.
    #[arg(long, env = "TETHER_POLICY_PAGEMAP_SCAN", default_value_t = false)]
    pub policy_pagemap_scan: bool,
    /// Largest policy component accepted, in KiB: a bigger one is refused before it is
    /// compiled. The default is also the most a ConfigMap can hold.
    #[arg(long, env = "TETHER_POLICY_MAX_KIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub policy_max_kib: u64,
}

impl SandboxArgs {
    /// The runtime's settings; refuses `--policy-pagemap-scan` on a machine with swap.
    pub fn runtime_config(&self) -> anyhow::Result<RuntimeConfig> {
        if self.policy_pagemap_scan {
            let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
            if let Some(why) = pagemap_scan_refused(&meminfo) {
                anyhow::bail!("{why}");
            }
        }
        Ok(RuntimeConfig {
            timeout: Duration::from_millis(self.policy_timeout_ms.max(1)),
            memory_limit: self.policy_memory_mib.max(1) << 20,
            pagemap_scan: self.policy_pagemap_scan,
            max_component_bytes: usize::try_from(self.policy_max_kib << 10).unwrap_or(usize::MAX),
            ..RuntimeConfig::default()
        })
    }
}

/// Why `--policy-pagemap-scan` is refused on a machine whose /proc/meminfo reads so: any
/// swap, or no way to tell.
fn pagemap_scan_refused(meminfo: &str) -> Option<String> {
    let found = match swap_total_kib(meminfo) {
        Some(0) => return None,
        Some(kib) => format!("this machine has {kib} KiB of swap"),
        None => "cannot read SwapTotal from /proc/meminfo".to_owned(),
    };
    Some(format!(
        "--policy-pagemap-scan is only safe without swap ({found}): a policy's page swapped out \
         during an evaluation is not reset, and the next evaluation could read it. Turn swap off \
         or leave --policy-pagemap-scan unset."
    ))
}

/// `SwapTotal` of a /proc/meminfo text, in KiB.
fn swap_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Evaluate policies for a pod described by manifests; prints the decision as JSON.
    Test(TestArgs),
    /// Print a component's metadata, contract version, imports, exports and sha256 as JSON.
    Inspect(InspectArgs),
    /// Write the built-in policies to DIR as kubevirt.wasm, statefulset.wasm, stateless.wasm;
    /// or, with --configmaps, print them as policy ConfigMap manifests (YAML) for Kubernetes
    /// mode's `--chain configmap:NAME`.
    Export(ExportArgs),
    /// Build a policy crate into a component: cargo build for wasm32-unknown-unknown, then
    /// wrap the module as a component and check that tetherd accepts it.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The policy crate's Cargo.toml.
    #[arg(long, default_value = "Cargo.toml")]
    pub manifest_path: PathBuf,
    /// The package, when the manifest is a workspace.
    #[arg(long, short)]
    pub package: Option<String>,
    /// Where to write the component. Default: ./<crate>.wasm
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Cargo's target directory.
    #[arg(long, env = "CARGO_TARGET_DIR")]
    pub target_dir: Option<PathBuf>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// A policy: a .wasm component file or `builtin:NAME`. Repeat to test a chain, in order.
    /// Default: the built-in chain (kubevirt, statefulset, stateless).
    #[arg(long = "policy", value_name = "FILE|builtin:NAME")]
    pub policies: Vec<String>,
    /// The Pod manifest (YAML or JSON; the first Pod in the file).
    #[arg(long)]
    pub pod: PathBuf,
    /// Owner objects (VMI, VM, StatefulSet, ...): files of one or more YAML documents.
    #[arg(long = "object", value_name = "FILE")]
    pub objects: Vec<PathBuf>,
    /// A setting passed to every policy under test, KEY=VALUE. Repeatable.
    #[arg(long = "setting", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    /// CNI network name the pod asks on.
    #[arg(long, default_value = "default")]
    pub network: String,
    /// Interface name inside the pod.
    #[arg(long, default_value = "eth0")]
    pub interface: String,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The component file.
    pub file: PathBuf,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Directory to write into (created if missing).
    #[arg(required_unless_present = "configmaps", conflicts_with = "configmaps")]
    pub dir: Option<PathBuf>,
    /// Print ConfigMap manifests instead (YAML on stdout; the same bytes on every run), one
    /// per built-in policy, named tether-policy-NAME, labelled, with their sha256.
    #[arg(long)]
    pub configmaps: bool,
    /// The manifests' namespace (with --configmaps). Default: none, for `kubectl apply -n`.
    #[arg(long, requires = "configmaps")]
    pub namespace: Option<String>,
}

/// Labels given on the command line.
pub type Labels = Vec<(String, String)>;

/// Parses `key=value,key2=value2` (empty: none).
fn parse_labels(s: &str) -> Result<Labels, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("{t:?} is not key=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{pagemap_scan_refused, swap_total_kib};

    #[test]
    fn pagemap_scan_is_refused_with_swap_or_when_swap_is_unknown() {
        assert_eq!(pagemap_scan_refused("SwapTotal:        0 kB\n"), None);
        let with = pagemap_scan_refused("SwapTotal:   262140 kB\n").expect("refused with swap");
        assert!(with.contains("262140 KiB of swap"), "{with}");
        assert!(
            pagemap_scan_refused("").is_some(),
            "unknown swap must be refused"
        );
    }

    #[test]
    fn swap_total_is_read_from_meminfo() {
        let text = "MemTotal:       24576000 kB\nSwapCached:            0 kB\nSwapTotal:        262140 kB\nSwapFree:         262140 kB\n";
        assert_eq!(swap_total_kib(text), Some(262_140));
        assert_eq!(swap_total_kib("SwapTotal:        0 kB\n"), Some(0));
        assert_eq!(swap_total_kib("MemTotal: 1 kB\n"), None);
    }
}
