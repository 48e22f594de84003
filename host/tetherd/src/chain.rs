//! Chain configuration: which policies, from where, in which order, with which settings.
//!
//! A policy reference is `builtin:NAME` (a policy embedded in tetherd), `configmap:NAME` (a
//! policy ConfigMap in the daemon's namespace, Kubernetes mode; see
//! [`tether_kube::policies`]) or a path to a `.wasm` component. Switching a built-in behaviour
//! off (VM pinning, StatefulSet pinning) is leaving its policy out of the chain: there is no
//! code branch for it.

use std::path::PathBuf;

use tether_kube::policies::Slot;
use tether_policy::{Chain, ChainEntry, PolicyError, Runtime, Settings};
use thiserror::Error;

/// The default chain.
pub const DEFAULT_CHAIN: &[&str] = &[
    "builtin:kubevirt",
    "builtin:statefulset",
    "builtin:stateless",
];

/// Where a policy's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Builtin(String),
    File(PathBuf),
    /// A policy ConfigMap, by name (Kubernetes mode).
    ConfigMap(String),
}

impl PolicySource {
    pub fn parse(s: &str) -> Self {
        if let Some(name) = s.strip_prefix("builtin:") {
            PolicySource::Builtin(name.to_owned())
        } else if let Some(name) = s.strip_prefix("configmap:") {
            PolicySource::ConfigMap(name.to_owned())
        } else {
            PolicySource::File(PathBuf::from(s))
        }
    }

    fn describe(&self) -> String {
        match self {
            PolicySource::Builtin(n) => format!("builtin:{n}"),
            PolicySource::File(p) => p.display().to_string(),
            PolicySource::ConfigMap(n) => format!("configmap:{n}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum ChainError {
    #[error("unknown built-in policy {name:?}; the built-ins are {known}")]
    UnknownBuiltin { name: String, known: String },
    #[error("reading policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "policy configmap:{name}: policies from ConfigMaps need Kubernetes mode (--kubernetes)"
    )]
    NeedsKubernetes { name: String },
    #[error("policy configmap:{name:?}: not a ConfigMap name (a DNS subdomain: a-z, 0-9, - and .)")]
    BadConfigMapName { name: String },
    #[error("policy {policy} appears twice in the chain")]
    Twice { policy: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Loads the policies and builds the chain; a `configmap:` policy is refused (only the
/// daemon in Kubernetes mode has ConfigMaps: [`slots`]).
pub fn build(rt: &Runtime, sources: &[(PolicySource, Settings)]) -> Result<Chain, ChainError> {
    let mut entries = Vec::with_capacity(sources.len());
    for slot in slots(rt, sources)? {
        match slot {
            Slot::Fixed(e) => entries.push(e),
            Slot::ConfigMap { name, .. } => return Err(ChainError::NeedsKubernetes { name }),
        }
    }
    Ok(Chain::new(entries)?)
}

/// Whether `name` is a valid ConfigMap name (an RFC 1123 DNS subdomain).
fn is_configmap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// Loads the built-in and file policies, in order, and leaves a place for each ConfigMap's:
/// what [`tether_kube::policies::ChainSpec`] assembles once the ConfigMaps have loaded. The
/// built-in and file policies must make a valid chain by themselves (unique names).
pub fn slots(rt: &Runtime, sources: &[(PolicySource, Settings)]) -> Result<Vec<Slot>, ChainError> {
    let mut slots = Vec::with_capacity(sources.len());
    for (i, (source, settings)) in sources.iter().enumerate() {
        if sources[..i].iter().any(|(s, _)| s == source) {
            return Err(ChainError::Twice {
                policy: source.describe(),
            });
        }
        let policy = match source {
            PolicySource::ConfigMap(name) => {
                if !is_configmap_name(name) {
                    return Err(ChainError::BadConfigMapName { name: name.clone() });
                }
                slots.push(Slot::ConfigMap {
                    name: name.clone(),
                    settings: settings.clone(),
                });
                continue;
            }
            PolicySource::Builtin(name) => {
                let b =
                    tether_builtins::builtin(name).ok_or_else(|| ChainError::UnknownBuiltin {
                        name: name.clone(),
                        known: tether_builtins::BUILTINS
                            .iter()
                            .map(|b| b.name)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                rt.load(&source.describe(), b.wasm)?
            }
            PolicySource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| ChainError::Read {
                    path: path.clone(),
                    source: e,
                })?;
                rt.load(&source.describe(), &bytes)?
            }
        };
        slots.push(Slot::Fixed(ChainEntry {
            policy,
            settings: settings.clone(),
        }));
    }
    let fixed: Vec<ChainEntry> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Fixed(e) => Some(e.clone()),
            Slot::ConfigMap { .. } => None,
        })
        .collect();
    Chain::new(fixed)?;
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configmap_references_parse_and_are_checked() {
        assert_eq!(
            PolicySource::parse("configmap:label-identity"),
            PolicySource::ConfigMap("label-identity".into())
        );
        assert_eq!(
            PolicySource::parse("builtin:stateless"),
            PolicySource::Builtin("stateless".into())
        );
        assert_eq!(
            PolicySource::parse("p/x.wasm"),
            PolicySource::File("p/x.wasm".into())
        );
        assert!(is_configmap_name("tether-policy.kubevirt"));
        for bad in ["", "Upper", "-x", "x-", "a..b", "a_b"] {
            assert!(!is_configmap_name(bad), "{bad:?}");
        }
        let rt = Runtime::new(tether_policy::RuntimeConfig::default()).expect("runtime");
        let cm = |n: &str| (PolicySource::parse(n), Settings::new());
        let two = slots(&rt, &[cm("configmap:a"), cm("builtin:stateless")]).expect("slots");
        assert!(matches!(&two[0], Slot::ConfigMap { name, .. } if name == "a"));
        assert!(matches!(&two[1], Slot::Fixed(e) if e.policy.metadata.name == "stateless"));
        assert!(matches!(
            slots(&rt, &[cm("configmap:a"), cm("configmap:a")]),
            Err(ChainError::Twice { .. })
        ));
        assert!(matches!(
            slots(&rt, &[cm("configmap:A")]),
            Err(ChainError::BadConfigMapName { .. })
        ));
        assert!(matches!(
            build(&rt, &[cm("configmap:a")]),
            Err(ChainError::NeedsKubernetes { .. })
        ));
    }
}
