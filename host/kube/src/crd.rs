//! The custom resources, from Rust types. `tetherd crd` prints [`crds`] as YAML; the Helm
//! chart's CRDs are generated from the same function, never copied by hand.

use std::net::IpAddr;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tether_core::alloc::{Allocation, Attachment, Holder, Owner};
use tether_core::decision::{IdentityKind, ReleaseCondition};
use thiserror::Error;

/// The API group of every Tether resource.
pub const GROUP: &str = "ipam.tether.dev";
/// The version served.
pub const VERSION: &str = "v1alpha1";

/// A pool of addresses (`kind: IPPool`), cluster-scoped. The spec is the one standalone pool
/// files use, plus optional node and namespace selectors.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ipam.tether.dev",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    status = "IPPoolStatus",
    category = "tether",
    printcolumn = r#"{"name":"SUBNET","type":"string","jsonPath":".spec.subnet"}"#,
    printcolumn = r#"{"name":"ALLOCATED-IP-COUNT","type":"integer","jsonPath":".status.allocatedIPCount"}"#,
    printcolumn = r#"{"name":"TOTAL-IP-COUNT","type":"integer","jsonPath":".status.totalIPCount"}"#,
    printcolumn = r#"{"name":"DEFAULT","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// The subnet, e.g. `10.6.0.0/16`.
    pub subnet: String,
    /// Allocatable addresses: `10.6.168.101`, `10.6.168.101-10.6.168.110`, `10.6.168.0/28`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Addresses never allocated.
    #[serde(default, rename = "excludeIPs", skip_serializing_if = "Vec::is_empty")]
    pub exclude_ips: Vec<String>,
    /// The gateway given to pods (never allocated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Routes given to pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IPPoolRoute>,
    /// A cluster default pool: used when nothing else names a pool.
    #[serde(default)]
    pub default: bool,
    /// Only nodes whose labels match serve this pool (all nodes when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Only pods of namespaces whose labels match may use this pool (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// A route of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct IPPoolRoute {
    /// Destination CIDR.
    pub dst: String,
    /// Gateway; the pool's gateway when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// What the elected daemon reports about a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct IPPoolStatus {
    /// Addresses allocated (objects of the pool).
    #[serde(rename = "allocatedIPCount", default)]
    pub allocated_ip_count: i64,
    /// Allocatable addresses (at most 2^63 - 1 shown for larger IPv6 pools).
    #[serde(rename = "totalIPCount", default)]
    pub total_ip_count: i64,
    /// `Ready` (the pool serves) with reason `Invalid` or `Overlaps` when it does not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One allocated address (`kind: IPAllocation`), cluster-scoped, named by the address alone
/// ([`allocation_name`]): creating it is the claim.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipam.tether.dev",
    version = "v1alpha1",
    kind = "IPAllocation",
    plural = "ipallocations",
    shortname = "ipa",
    category = "tether",
    printcolumn = r#"{"name":"POOL","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"ADDRESS","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"OWNER-KIND","type":"string","jsonPath":".spec.owner.kind"}"#,
    printcolumn = r#"{"name":"OWNER","type":"string","jsonPath":".spec.owner.name"}"#,
    printcolumn = r#"{"name":"HOLDERS","type":"string","jsonPath":".spec.holders[*].pod"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPAllocationSpec {
    /// The pool it was allocated from.
    pub pool: String,
    /// The address.
    pub address: IpAddr,
    /// The CNI network.
    pub network: String,
    /// The interface (CNI_IFNAME) it was allocated for.
    pub interface: String,
    /// Who owns it.
    pub owner: AllocationOwner,
    /// Pods holding it now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<AllocationHolder>,
    /// Since when no pod holds it (pinned only; unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<u64>,
}

/// The owner of an allocation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationOwner {
    /// `Ephemeral`, or the pinned identity's kind: `VirtualMachine`, `StatefulSetPod`,
    /// `IPAMClaim`, `Custom`.
    pub kind: String,
    /// The pinned identity (`namespace/name`); for an ephemeral address, its pod (absent
    /// once no pod holds it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// When a pinned address is released (any fires), as the policy contract writes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "any_items")]
    pub release: Vec<serde_json::Value>,
}

/// A pod holding an address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationHolder {
    /// CNI_CONTAINERID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    /// Joined while another pod held the address (a migration target).
    pub shared: bool,
    /// The node whose daemon added it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Since when (unix seconds).
    pub since: u64,
}

/// An array whose items are kept as written (release conditions are strings or objects).
fn any_items(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": { "x-kubernetes-preserve-unknown-fields": true }
    })
}

/// A pinned identity's record (`kind: PinnedIdentity`), namespaced and named after the
/// identity (the VM's name, the StatefulSet pod's name). Derived from the address objects,
/// which are the truth.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipam.tether.dev",
    version = "v1alpha1",
    kind = "PinnedIdentity",
    plural = "pinnedidentities",
    shortname = "pin",
    namespaced,
    category = "tether",
    printcolumn = r#"{"name":"KIND","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"ADDRESSES","type":"string","jsonPath":".spec.addresses[*].address"}"#,
    printcolumn = r#"{"name":"HOLDERS","type":"string","jsonPath":".spec.holders"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PinnedIdentitySpec {
    /// `VirtualMachine`, `StatefulSetPod`, `IPAMClaim` or `Custom`.
    pub kind: String,
    /// The identity (`namespace/name`).
    pub identity: String,
    /// Its addresses, one per network and interface.
    #[serde(default)]
    pub addresses: Vec<PinnedAddress>,
    /// Pods holding them now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
}

/// One address of a pinned identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PinnedAddress {
    /// Pool.
    pub pool: String,
    /// Address.
    pub address: IpAddr,
    /// CNI network.
    pub network: String,
    /// Interface.
    pub interface: String,
}

/// Every Tether CRD.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![IPPool::crd(), IPAllocation::crd(), PinnedIdentity::crd()]
}

/// Why the CRDs cannot be printed.
#[derive(Debug, Error)]
#[error("serializing the CRDs: {0}")]
pub struct CrdError(String);

/// The CRDs as one YAML stream, ready for `kubectl apply -f -`.
pub fn crds_yaml() -> Result<String, CrdError> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&yaml_serde::to_string(&crd).map_err(|e| CrdError(e.to_string()))?);
    }
    Ok(out)
}

/// The label on a pinned address's object naming its identity (a hash: identities need not
/// be label values), so that a daemon can list an identity's addresses.
pub const IDENTITY_LABEL: &str = "ipam.tether.dev/identity";

/// The [`IDENTITY_LABEL`] value of `identity` of `kind`: 32 hex digits of the SHA-256 of
/// `kind/identity`.
pub fn identity_label(kind: IdentityKind, identity: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}/{identity}", kind_name(kind)).as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of an address's object: the address alone, IPv4 dotted with dashes
/// (`10-6-168-101`), IPv6 as its eight groups without leading zeros, with dashes
/// (`fd00-0-0-0-0-0-0-1`): always a valid object name, never ambiguous.
pub fn allocation_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4
            .octets()
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join("-"),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    }
}

/// The resource's name for an identity kind.
pub fn kind_name(kind: IdentityKind) -> &'static str {
    match kind {
        IdentityKind::VirtualMachine => "VirtualMachine",
        IdentityKind::StatefulSetPod => "StatefulSetPod",
        IdentityKind::IpamClaim => "IPAMClaim",
        IdentityKind::Custom => "Custom",
    }
}

fn kind_from_name(name: &str) -> Option<IdentityKind> {
    Some(match name {
        "VirtualMachine" => IdentityKind::VirtualMachine,
        "StatefulSetPod" => IdentityKind::StatefulSetPod,
        "IPAMClaim" => IdentityKind::IpamClaim,
        "Custom" => IdentityKind::Custom,
        _ => return None,
    })
}

/// An address object that does not describe an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    /// The object's name is not its address's.
    #[error("IPAllocation {name}: the name of address {address} is {expected}")]
    Name {
        /// The object's name.
        name: String,
        /// Its address.
        address: IpAddr,
        /// The name it should have.
        expected: String,
    },
    /// Unknown owner kind.
    #[error("IPAllocation {name}: unknown owner kind {kind:?}")]
    OwnerKind {
        /// The object.
        name: String,
        /// The kind.
        kind: String,
    },
    /// A release condition that does not parse.
    #[error("IPAllocation {name}: release condition {condition}: {reason}")]
    Release {
        /// The object.
        name: String,
        /// The condition.
        condition: String,
        /// Why.
        reason: String,
    },
    /// No resourceVersion, or not a number.
    #[error("IPAllocation {name}: resourceVersion {version:?} is not a number")]
    Version {
        /// The object.
        name: String,
        /// What it has.
        version: Option<String>,
    },
}

impl IPAllocation {
    /// The object for an allocation (no resourceVersion: the store sets it for updates).
    pub fn from_allocation(a: &Allocation) -> IPAllocation {
        let owner = match &a.owner {
            Owner::Ephemeral => AllocationOwner {
                kind: "Ephemeral".into(),
                name: a
                    .holders
                    .first()
                    .map(|h| format!("{}/{}", h.attachment.namespace, h.attachment.pod))
                    .unwrap_or_default(),
                release: Vec::new(),
            },
            Owner::Pinned {
                identity,
                kind,
                release,
            } => AllocationOwner {
                kind: kind_name(*kind).into(),
                name: identity.clone(),
                release: release
                    .iter()
                    .filter_map(|r| serde_json::to_value(r).ok())
                    .collect(),
            },
        };
        let spec = IPAllocationSpec {
            pool: a.pool.clone(),
            address: a.ip,
            network: a.network.clone(),
            interface: a.interface.clone(),
            owner,
            holders: a
                .holders
                .iter()
                .map(|h| AllocationHolder {
                    container_id: h.attachment.container_id.clone(),
                    ifname: h.attachment.ifname.clone(),
                    namespace: h.attachment.namespace.clone(),
                    pod: h.attachment.pod.clone(),
                    pod_uid: h.attachment.pod_uid.clone(),
                    shared: h.shared,
                    node: h.node.clone(),
                    since: h.since,
                })
                .collect(),
            idle_since: a.idle_since,
        };
        let mut o = IPAllocation::new(&allocation_name(a.ip), spec);
        if let Owner::Pinned { identity, kind, .. } = &a.owner {
            o.metadata.labels = Some(
                [(IDENTITY_LABEL.to_owned(), identity_label(*kind, identity))]
                    .into_iter()
                    .collect(),
            );
        }
        o
    }

    /// The allocation an object describes; an object that does not describe one (made by
    /// hand, or by a newer version with a kind or rule this one does not know) reserves its
    /// address instead: held by nobody, pinned to an identity that names the object, never
    /// released by a rule (`tetherd release --force`, or deleting the object, frees it).
    /// Either way the address is never handed out while the object exists. The error says
    /// why the object was not read as written.
    pub fn to_allocation_or_reserved(&self) -> (Allocation, Option<RecordError>) {
        match self.to_allocation() {
            Ok(a) => (a, None),
            Err(e) => {
                let name = self.metadata.name.clone().unwrap_or_default();
                let a = Allocation {
                    pool: self.spec.pool.clone(),
                    ip: self.spec.address,
                    network: self.spec.network.clone(),
                    interface: self.spec.interface.clone(),
                    owner: Owner::Pinned {
                        identity: format!("(unreadable IPAllocation {name})"),
                        kind: IdentityKind::Custom,
                        release: vec![ReleaseCondition::Never],
                    },
                    holders: Vec::new(),
                    idle_since: None,
                    revision: self
                        .metadata
                        .resource_version
                        .as_deref()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                };
                (a, Some(e))
            }
        }
    }

    /// The allocation an object describes, its revision the object's resourceVersion.
    pub fn to_allocation(&self) -> Result<Allocation, RecordError> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let s = &self.spec;
        let expected = allocation_name(s.address);
        if name != expected {
            return Err(RecordError::Name {
                name,
                address: s.address,
                expected,
            });
        }
        let owner = if s.owner.kind == "Ephemeral" {
            Owner::Ephemeral
        } else {
            let kind = kind_from_name(&s.owner.kind).ok_or_else(|| RecordError::OwnerKind {
                name: name.clone(),
                kind: s.owner.kind.clone(),
            })?;
            let release = s
                .owner
                .release
                .iter()
                .map(|v| {
                    serde_json::from_value::<ReleaseCondition>(v.clone()).map_err(|e| {
                        RecordError::Release {
                            name: name.clone(),
                            condition: v.to_string(),
                            reason: e.to_string(),
                        }
                    })
                })
                .collect::<Result<_, _>>()?;
            Owner::Pinned {
                identity: s.owner.name.clone(),
                kind,
                release,
            }
        };
        let version = self.metadata.resource_version.clone();
        let revision = version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(RecordError::Version { name, version })?;
        Ok(Allocation {
            pool: s.pool.clone(),
            ip: s.address,
            network: s.network.clone(),
            interface: s.interface.clone(),
            owner,
            holders: s
                .holders
                .iter()
                .map(|h| Holder {
                    attachment: Attachment {
                        container_id: h.container_id.clone(),
                        ifname: h.ifname.clone(),
                        namespace: h.namespace.clone(),
                        pod: h.pod.clone(),
                        pod_uid: h.pod_uid.clone(),
                    },
                    shared: h.shared,
                    node: h.node.clone(),
                    since: h.since,
                })
                .collect(),
            idle_since: s.idle_since,
            revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart carries the CRDs as `tetherd crd` prints them: a change to the Rust types
    /// that is not regenerated into the chart fails here.
    #[test]
    fn the_charts_crds_are_the_generated_ones() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../charts/tether/crds/tether.yaml");
        let chart = std::fs::read_to_string(&path).expect("the chart's CRDs");
        assert!(
            chart == crds_yaml().expect("CRDs"),
            "{} differs from the Rust types: run `tetherd crd > charts/tether/crds/tether.yaml`",
            path.display()
        );
    }

    #[test]
    fn allocation_names_are_valid_and_unambiguous() {
        let cases = [
            ("10.6.168.101", "10-6-168-101"),
            ("fd00::1", "fd00-0-0-0-0-0-0-1"),
            ("::ffff:10.0.0.1", "0-0-0-0-0-ffff-a00-1"),
            ("::", "0-0-0-0-0-0-0-0"),
        ];
        for (ip, name) in cases {
            let got = allocation_name(ip.parse().expect("ip"));
            assert_eq!(got, name);
            assert!(
                got.len() <= 253
                    && got
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !got.starts_with('-')
                    && !got.ends_with('-'),
                "{got} is not a valid object name"
            );
        }
    }

    #[test]
    fn an_allocation_round_trips_through_its_object() {
        let a = Allocation {
            pool: "test-ippool".into(),
            ip: "10.6.168.101".parse().expect("ip"),
            network: "macvlan-net".into(),
            interface: "eth0".into(),
            owner: Owner::Pinned {
                identity: "default/vm-cirros".into(),
                kind: IdentityKind::VirtualMachine,
                release: vec![
                    ReleaseCondition::Never,
                    ReleaseCondition::IdleForSeconds(30),
                ],
            },
            holders: vec![Holder {
                attachment: Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                    namespace: "default".into(),
                    pod: "virt-launcher-vm-cirros-rg6fs".into(),
                    pod_uid: "u1".into(),
                },
                shared: false,
                node: String::new(),
                since: 7,
            }],
            idle_since: None,
            revision: 0,
        };
        let mut o = IPAllocation::from_allocation(&a);
        assert_eq!(o.metadata.name.as_deref(), Some("10-6-168-101"));
        assert!(
            o.to_allocation().is_err(),
            "no resourceVersion: no revision"
        );
        o.metadata.resource_version = Some("4711".into());
        let back = o.to_allocation().expect("round trip");
        assert_eq!(
            back,
            Allocation {
                revision: 4711,
                ..a
            }
        );
    }

    #[test]
    fn crds_print_with_the_seed_columns() {
        let yaml = crds_yaml().expect("yaml");
        for needle in [
            "name: ippools.ipam.tether.dev",
            "name: ipallocations.ipam.tether.dev",
            "name: pinnedidentities.ipam.tether.dev",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "scope: Cluster",
            "scope: Namespaced",
        ] {
            assert!(yaml.contains(needle), "{needle} missing from:\n{yaml}");
        }
        // The API server refuses a schema whose default does not match its type.
        assert!(!yaml.contains("default: null"), "{yaml}");
    }
}
