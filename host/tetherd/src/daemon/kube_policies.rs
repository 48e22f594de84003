//! The policy chain of `tetherd run`, wired: a fixed chain (built-in and file policies), or,
//! when the chain names `configmap:` policies (Kubernetes mode), a chain that waits for its
//! ConfigMaps and is replaced whenever one changes ([`tether_kube::policies`]).

use std::sync::Arc;

use tether_engine::Metrics;
use tether_engine::ports::{Decide, PolicyChain, SwappableChain};
use tether_kube::policies::{ChainSpec, ConfigMapPolicies, Slot};
use tether_policy::{Chain, Runtime};
use tokio::task::JoinHandle;

use crate::cli::RunArgs;

/// The daemon's policies: what decides, and the ConfigMap watch feeding it, if any.
pub struct Policies {
    pub decide: Arc<dyn Decide>,
    pub watch: Option<JoinHandle<()>>,
}

/// The policy names the enable switches leave out of the chain.
pub fn disabled(args: &RunArgs) -> Vec<String> {
    let mut out = Vec::new();
    if !args.enable_kubevirt_static_ip {
        out.push("kubevirt".to_owned());
    }
    if !args.enable_statefulset {
        out.push("statefulset".to_owned());
    }
    out
}

/// The chain of `slots` on `runtime`. With `configmap:` places it needs `client` (Kubernetes
/// mode) and starts the watch of the policy ConfigMaps in `--policy-namespace` (default: the
/// client's namespace); the chain is not ready until each has loaded once.
pub fn start(
    args: &RunArgs,
    runtime: Arc<Runtime>,
    slots: Vec<Slot>,
    client: Option<kube::Client>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Policies> {
    let spec = ChainSpec {
        slots,
        disabled: disabled(args),
    };
    let names = spec.configmaps();
    if names.is_empty() {
        let entries = spec
            .slots
            .into_iter()
            .filter_map(|s| match s {
                Slot::Fixed(e) => Some(e),
                Slot::ConfigMap { .. } => None,
            })
            .collect();
        return Ok(Policies {
            decide: Arc::new(PolicyChain {
                runtime,
                chain: Chain::new(entries)?,
            }),
            watch: None,
        });
    }
    let (Some(client), Some(node)) = (client, args.node_name.as_deref()) else {
        anyhow::bail!(
            "the chain names policies from ConfigMaps ({}); those need Kubernetes mode (--kubernetes)",
            names.join(", ")
        );
    };
    let namespace = args
        .policy_namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_owned());
    tracing::info!(namespace = %namespace, configmaps = ?names, "policies from ConfigMaps: not ready until each has loaded");
    let chain = Arc::new(SwappableChain::waiting(runtime, "starting"));
    let source = ConfigMapPolicies::new(client, &namespace, node, spec, chain.clone(), metrics);
    Ok(Policies {
        decide: chain,
        watch: Some(tokio::spawn(source.run())),
    })
}
