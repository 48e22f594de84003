//! Pool selection: which pools an ADD draws from, by the first source that names any (pod
//! annotation, policy hints, namespace annotation, CNI config, pools marked default). It reads
//! annotations and lists; the allocator never sees where the names came from.

use serde::{Deserialize, Serialize};

use crate::alloc::AllocError;

/// Pod annotation naming the pools of every interface: `pool-a` or `pool-v4,pool-v6`.
pub const ANNOTATION_POOL: &str = "ipam.tether.dev/ippool";
/// Pod annotation naming pools per interface:
/// `[{"interface": "net1", "pools": ["pool-a", "pool-b"]}]`.
pub const ANNOTATION_POOLS: &str = "ipam.tether.dev/ippools";
/// Namespace annotation naming the namespace's default pools.
pub const ANNOTATION_NS_DEFAULT: &str = "ipam.tether.dev/default-ippool";

/// Where the pools of an ADD came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolSource {
    /// `ipam.tether.dev/ippools` or `ipam.tether.dev/ippool` on the pod.
    PodAnnotation,
    /// The policy's pool hints.
    Policy,
    /// `ipam.tether.dev/default-ippool` on the namespace.
    NamespaceAnnotation,
    /// `pools` in the CNI config.
    CniConfig,
    /// Pools marked `default: true`.
    ClusterDefault,
}

/// What pool selection looks at.
#[derive(Debug, Clone, Default)]
pub struct PoolInputs<'a> {
    /// The pod's annotations.
    pub pod_annotations: &'a [(String, String)],
    /// The interface being configured.
    pub ifname: &'a str,
    /// The policy decision's pool hints.
    pub policy_hints: &'a [String],
    /// The namespace's annotations.
    pub namespace_annotations: &'a [(String, String)],
    /// `pools` of the CNI config.
    pub cni_pools: &'a [String],
    /// Pools marked default.
    pub cluster_defaults: &'a [String],
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterfacePools {
    interface: String,
    pools: Vec<String>,
}

/// Chooses the candidate pools: pod annotation (per interface, then for all interfaces) >
/// policy hints > namespace annotation > CNI config > pools marked default. The first source
/// that names any pool decides alone.
pub fn select_pools(inputs: &PoolInputs<'_>) -> Result<(Vec<String>, PoolSource), AllocError> {
    if let Some(raw) = get(inputs.pod_annotations, ANNOTATION_POOLS) {
        let list: Vec<InterfacePools> =
            serde_json::from_str(raw).map_err(|e| AllocError::BadAnnotation {
                annotation: ANNOTATION_POOLS,
                reason: format!(
                    "{e}; expected e.g. [{{\"interface\": \"net1\", \"pools\": [\"pool-a\"]}}]"
                ),
            })?;
        if let Some(entry) = list.into_iter().find(|e| e.interface == inputs.ifname)
            && !entry.pools.is_empty()
        {
            return Ok((entry.pools, PoolSource::PodAnnotation));
        }
    }
    let layers: [(Vec<String>, PoolSource); 5] = [
        (
            get(inputs.pod_annotations, ANNOTATION_POOL)
                .map(split_list)
                .unwrap_or_default(),
            PoolSource::PodAnnotation,
        ),
        (inputs.policy_hints.to_vec(), PoolSource::Policy),
        (
            get(inputs.namespace_annotations, ANNOTATION_NS_DEFAULT)
                .map(split_list)
                .unwrap_or_default(),
            PoolSource::NamespaceAnnotation,
        ),
        (inputs.cni_pools.to_vec(), PoolSource::CniConfig),
        (inputs.cluster_defaults.to_vec(), PoolSource::ClusterDefault),
    ];
    layers
        .into_iter()
        .find(|(pools, _)| !pools.is_empty())
        .ok_or(AllocError::NoPool)
}
