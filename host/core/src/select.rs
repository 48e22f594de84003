//! Pool selection: which pools an ADD draws from, by the first source that names any (pod
//! annotation, policy hints, namespace annotation, CNI config, pools marked default). It reads
//! annotations and lists; the allocator never sees where the names came from.

use serde::{Deserialize, Serialize};

use crate::alloc::AllocError;
use crate::pool::{Pool, Requester};

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

/// The pools of `chosen` that may serve `who` (see [`Pool::refuses`]). A pool named for the
/// pod (by its annotation, its policy, its namespace or its CNI config) that may not serve it
/// is an error: the pod asked for something it cannot have. Default pools that may not serve
/// it are passed over; when none is left, the error names why each was. Names that are not
/// pools pass through for the allocator to report.
pub fn admit<'p>(
    chosen: Vec<String>,
    source: PoolSource,
    pool: impl Fn(&str) -> Option<&'p Pool>,
    who: &Requester<'_>,
) -> Result<Vec<String>, AllocError> {
    let error = |pool: String, reason: String, soon: bool| {
        if soon {
            AllocError::SelectorUnknown { pool, reason }
        } else {
            AllocError::PoolNotAllowed { pool, reason }
        }
    };
    let mut refused: Vec<(String, String, bool)> = Vec::new();
    let mut out = Vec::with_capacity(chosen.len());
    for name in chosen {
        match pool(&name).and_then(|p| p.refuses(who)) {
            None => out.push(name),
            Some((reason, soon)) if source != PoolSource::ClusterDefault => {
                return Err(error(name, reason, soon));
            }
            Some((reason, soon)) => refused.push((name, reason, soon)),
        }
    }
    if out.is_empty()
        && let Some((first, _, _)) = refused.first()
    {
        return Err(error(
            first.clone(),
            refused
                .iter()
                .map(|(p, r, _)| format!("default pool {p:?}: {r}"))
                .collect::<Vec<_>>()
                .join("; "),
            refused.iter().any(|(_, _, soon)| *soon),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, spec: serde_json::Value) -> Pool {
        crate::pool::from_manifest(&serde_json::json!({
            "apiVersion": crate::pool::API_VERSION, "kind": crate::pool::KIND,
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("pool")
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_decide_which_pools_may_serve() {
        let pools = [
            pool(
                "zoned",
                serde_json::json!({"subnet": "10.1.0.0/24", "default": true,
                    "nodeSelector": {"matchLabels": {"zone": "b"}}}),
            ),
            pool(
                "tenants",
                serde_json::json!({"subnet": "10.2.0.0/24", "default": true,
                    "namespaceSelector": {"matchLabels": {"tenant": "yes"}}}),
            ),
            pool("open", serde_json::json!({"subnet": "10.3.0.0/24"})),
        ];
        let lookup = |n: &str| pools.iter().find(|p| p.name == n);
        let node_a = pairs(&[("zone", "a")]);
        let ns = pairs(&[]);
        let who = Requester {
            node: "node-a",
            node_labels: Some(&node_a),
            namespace: "ns",
            namespace_labels: Some(&ns),
        };
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // Named for the pod: an error that says which selector and what.
        for (p, want) in [
            (
                "zoned",
                "its nodeSelector (zone=b) does not match node \"node-a\"",
            ),
            (
                "tenants",
                "its namespaceSelector (tenant=yes) does not match namespace \"ns\"",
            ),
        ] {
            match admit(names(&[p, "open"]), PoolSource::CniConfig, lookup, &who) {
                Err(AllocError::PoolNotAllowed { pool, reason }) => {
                    assert_eq!(pool, p);
                    assert_eq!(reason, want);
                }
                other => panic!("{p}: {other:?}"),
            }
        }
        // Defaults: passed over; when none is left, each one's reason.
        assert_eq!(
            admit(
                names(&["zoned", "tenants", "open"]),
                PoolSource::ClusterDefault,
                lookup,
                &who
            ),
            Ok(names(&["open"]))
        );
        let e = admit(
            names(&["zoned", "tenants"]),
            PoolSource::ClusterDefault,
            lookup,
            &who,
        )
        .expect_err("no default may serve");
        assert!(e.to_string().contains("default pool \"zoned\""), "{e}");
        assert!(e.to_string().contains("default pool \"tenants\""), "{e}");
        // Matching labels admit; unknown labels admit no pool with a selector.
        let node_b = pairs(&[("zone", "b")]);
        let tenant = pairs(&[("tenant", "yes")]);
        let fits = Requester {
            node_labels: Some(&node_b),
            namespace_labels: Some(&tenant),
            ..who
        };
        let all = names(&["zoned", "tenants", "open"]);
        assert_eq!(
            admit(all.clone(), PoolSource::PodAnnotation, lookup, &fits),
            Ok(all.clone())
        );
        let unknown = Requester {
            node_labels: None,
            namespace_labels: None,
            ..who
        };
        let e = admit(
            names(&["zoned"]),
            PoolSource::PodAnnotation,
            lookup,
            &unknown,
        )
        .expect_err("unknown node labels");
        assert!(
            matches!(e, AllocError::SelectorUnknown { .. }),
            "unknown node labels may be known in a moment: {e:?}"
        );
        assert!(e.to_string().contains("cannot be checked yet"), "{e}");
        let e = admit(
            names(&["tenants"]),
            PoolSource::PodAnnotation,
            lookup,
            &unknown,
        )
        .expect_err("unknown namespace");
        assert!(matches!(e, AllocError::PoolNotAllowed { .. }), "{e:?}");
        // Unknown names pass through for the allocator to report.
        assert_eq!(
            admit(names(&["nope"]), PoolSource::CniConfig, lookup, &who),
            Ok(names(&["nope"]))
        );
    }

    #[test]
    fn a_pool_with_a_malformed_selector_is_refused() {
        let e = crate::pool::from_manifest(&serde_json::json!({
            "apiVersion": crate::pool::API_VERSION, "kind": crate::pool::KIND,
            "metadata": {"name": "bad"},
            "spec": {"subnet": "10.1.0.0/24",
                "nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        }))
        .expect_err("refused");
        assert!(e.to_string().contains("nodeSelector"), "{e}");
    }
}
