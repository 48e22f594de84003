//! Policy decisions and their validation.
//!
//! A decision comes from untrusted code; [`Decision::validate`] is the gate it passes before the
//! allocator sees it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest accepted identity key, in bytes.
pub const MAX_IDENTITY_LEN: usize = 512;
/// Most release conditions one decision may carry.
pub const MAX_RELEASE_CONDITIONS: usize = 16;
/// Most pool hints one decision may carry.
pub const MAX_POOL_HINTS: usize = 16;

/// Names an object without its uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectKey {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What an identity stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityKind {
    /// A KubeVirt VirtualMachine (or a VMI without one).
    VirtualMachine,
    /// A StatefulSet replica, by pod name.
    StatefulSetPod,
    /// An IPAMClaim.
    IpamClaim,
    /// Anything a custom policy defines.
    Custom,
}

impl IdentityKind {
    /// The contract's name: `virtual-machine`, `stateful-set-pod`, `ipam-claim`, `custom`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::VirtualMachine => "virtual-machine",
            IdentityKind::StatefulSetPod => "stateful-set-pod",
            IdentityKind::IpamClaim => "ipam-claim",
            IdentityKind::Custom => "custom",
        }
    }
}

impl std::fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One condition that frees a pinned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReleaseCondition {
    /// Never released automatically.
    Never,
    /// Released when the object no longer exists.
    OwnerDeleted(ObjectKey),
    /// Released when the StatefulSet has fewer than `ordinal + 1` replicas.
    #[serde(rename_all = "camelCase")]
    ScaledBelow {
        /// The StatefulSet.
        owner: ObjectKey,
        /// The pod's ordinal.
        ordinal: u32,
    },
    /// Released after no pod held the address for this many seconds.
    IdleForSeconds(u64),
}

/// A pinned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pinned {
    /// Stable identity key.
    pub identity: String,
    /// What the identity stands for.
    pub kind: IdentityKind,
    /// Release conditions (any fires).
    pub release: Vec<ReleaseCondition>,
    /// May share the address with another pod of the identity (live migration target).
    pub may_share: bool,
    /// Pool hints.
    pub pools: Vec<String>,
}

/// What a policy decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Decision {
    /// The next policy decides.
    Abstain,
    /// A fresh address, released with the pod.
    Ephemeral,
    /// A pinned address.
    Pinned(Pinned),
}

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecisionError {
    /// Identity empty.
    #[error("pinned decision has an empty identity")]
    EmptyIdentity,
    /// Identity too long.
    #[error("identity is {len} bytes long; the limit is {MAX_IDENTITY_LEN}")]
    IdentityTooLong {
        /// Its length.
        len: usize,
    },
    /// Identity has control characters.
    #[error("identity contains control characters")]
    IdentityControlChars,
    /// No release condition.
    #[error(
        "pinned decision has no release condition (use `never` to keep it until an operator frees it)"
    )]
    NoReleaseCondition,
    /// Too many conditions.
    #[error(
        "pinned decision has {count} release conditions; the limit is {MAX_RELEASE_CONDITIONS}"
    )]
    TooManyReleaseConditions {
        /// How many.
        count: usize,
    },
    /// Too many pool hints.
    #[error("pinned decision has {count} pool hints; the limit is {MAX_POOL_HINTS}")]
    TooManyPoolHints {
        /// How many.
        count: usize,
    },
    /// Malformed pool name.
    #[error("pool hint {name:?} is not a valid pool name")]
    BadPoolHint {
        /// The name, cut to 64 bytes.
        name: String,
    },
}

impl Decision {
    /// Checks what untrusted policy code returned.
    pub fn validate(&self) -> Result<(), DecisionError> {
        let Decision::Pinned(p) = self else {
            return Ok(());
        };
        if p.identity.is_empty() {
            return Err(DecisionError::EmptyIdentity);
        }
        if p.identity.len() > MAX_IDENTITY_LEN {
            return Err(DecisionError::IdentityTooLong {
                len: p.identity.len(),
            });
        }
        if p.identity.chars().any(char::is_control) {
            return Err(DecisionError::IdentityControlChars);
        }
        if p.release.is_empty() {
            return Err(DecisionError::NoReleaseCondition);
        }
        if p.release.len() > MAX_RELEASE_CONDITIONS {
            return Err(DecisionError::TooManyReleaseConditions {
                count: p.release.len(),
            });
        }
        if p.pools.len() > MAX_POOL_HINTS {
            return Err(DecisionError::TooManyPoolHints {
                count: p.pools.len(),
            });
        }
        if let Some(bad) = p.pools.iter().find(|n| !is_dns_label_ish(n)) {
            return Err(DecisionError::BadPoolHint {
                name: bad.chars().take(64).collect(),
            });
        }
        Ok(())
    }

    /// A short word for logs and metrics.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Decision::Abstain => "abstain",
            Decision::Ephemeral => "ephemeral",
            Decision::Pinned(_) => "pinned",
        }
    }
}

/// A Kubernetes object name: `[a-z0-9.-]`, 1 to 253 bytes.
pub fn is_dns_label_ish(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(identity: &str) -> Pinned {
        Pinned {
            identity: identity.into(),
            kind: IdentityKind::Custom,
            release: vec![ReleaseCondition::Never],
            may_share: false,
            pools: vec![],
        }
    }

    #[test]
    fn validation() {
        assert_eq!(Decision::Pinned(pinned("ns/a")).validate(), Ok(()));
        assert_eq!(
            Decision::Pinned(pinned("")).validate(),
            Err(DecisionError::EmptyIdentity)
        );
        assert_eq!(
            Decision::Pinned(pinned(&"x".repeat(513))).validate(),
            Err(DecisionError::IdentityTooLong { len: 513 })
        );
        assert_eq!(
            Decision::Pinned(pinned("a\nb")).validate(),
            Err(DecisionError::IdentityControlChars)
        );
        let mut p = pinned("ns/a");
        p.release.clear();
        assert_eq!(
            Decision::Pinned(p).validate(),
            Err(DecisionError::NoReleaseCondition)
        );
        let mut p = pinned("ns/a");
        p.pools = vec!["Bad Pool".into()];
        assert!(matches!(
            Decision::Pinned(p).validate(),
            Err(DecisionError::BadPoolHint { .. })
        ));
        assert_eq!(Decision::Ephemeral.validate(), Ok(()));
    }

    #[test]
    fn json_shape() {
        let d = Decision::Pinned(Pinned {
            identity: "default/vm-cirros".into(),
            kind: IdentityKind::VirtualMachine,
            release: vec![ReleaseCondition::ScaledBelow {
                owner: ObjectKey {
                    api_version: "apps/v1".into(),
                    kind: "StatefulSet".into(),
                    namespace: "default".into(),
                    name: "web".into(),
                },
                ordinal: 2,
            }],
            may_share: true,
            pools: vec![],
        });
        let v = serde_json::to_value(&d).expect("serializable");
        assert_eq!(v["type"], "pinned");
        assert_eq!(v["kind"], "virtual-machine");
        for kind in [
            IdentityKind::VirtualMachine,
            IdentityKind::StatefulSetPod,
            IdentityKind::IpamClaim,
            IdentityKind::Custom,
        ] {
            assert_eq!(serde_json::to_value(kind).expect("kind"), kind.as_str());
        }
        assert_eq!(v["mayShare"], true);
        assert_eq!(v["release"][0]["scaledBelow"]["ordinal"], 2);
    }
}
