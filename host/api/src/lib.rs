//! The HTTP/JSON API tetherd serves on its unix socket (default `/run/tether/tether.sock`,
//! mode 0600), shared by the daemon and the `tether` CNI plugin. Only serde here, so the
//! plugin stays small and starts fast.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/v1/cni/add` | [`CniRequest`] | [`CniResult`] |
//! | POST | `/v1/cni/del` | [`CniRequest`] | `{}` |
//! | POST | `/v1/cni/check` | [`CniRequest`] with `prev_ips` | `{}` |
//! | POST | `/v1/cni/gc` | [`CniRequest`] with `valid_attachments` | [`GcResult`] |
//! | GET | `/v1/cni/status` | | `{}` or an error with code 50 |
//! | GET | `/v1/pools` | | [`PoolList`] |
//! | GET | `/v1/allocations` | | list of allocations |
//! | POST | `/v1/reconcile` | | [`ReconcileResult`] |
//! | GET | `/readyz`, `/healthz` | | 200 or 503 |
//! | GET | `/metrics` | | Prometheus text |
//!
//! Every error is an [`ErrorBody`] carrying the CNI error code the plugin reports.

pub mod client;

use serde::{Deserialize, Serialize};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/tether/tether.sock";

/// CNI error codes (CNI spec 1.1, "Error"), plus Tether's own from 100.
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// Plugin not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
    /// Every candidate pool of a family is exhausted.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// A policy failed (timeout, trap, memory, invalid decision) or refused the pod.
    pub const POLICY_FAILED: u32 = 101;
    /// The pod's pool selection is wrong: unknown pool, bad annotation, address not in pool.
    pub const BAD_POOL_SELECTION: u32 = 102;
    /// A requested address is held by someone else.
    pub const ADDRESS_IN_USE: u32 = 103;
    /// The store failed.
    pub const STORE_FAILURE: u32 = 104;
    /// CHECK: the attachment holds other addresses than the runtime's prevResult lists.
    pub const CHECK_MISMATCH: u32 = 105;
    /// The caller is not allowed to use the daemon's socket (its uid, read with SO_PEERCRED,
    /// is not root's).
    pub const PERMISSION_DENIED: u32 = 106;
}

/// What the plugin forwards of a CNI call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniRequest {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS (empty on DEL/GC when gone).
    #[serde(default)]
    pub netns: String,
    /// The network config's `name`.
    pub network: String,
    /// The caller's `cniVersion`.
    pub cni_version: String,
    /// CNI_ARGS, split into pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, IP, ...).
    #[serde(default)]
    pub args: Vec<(String, String)>,
    /// `ipam.pools` of the network config.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Addresses asked for by `ipam.ips`, `args.cni.ips`, runtimeConfig `ips` or CNI_ARGS `IP=`.
    #[serde(default)]
    pub requested_ips: Vec<String>,
    /// GC: the attachments that are still valid (`cni.dev/valid-attachments`). `None`: the
    /// runtime sent no list, so nothing is known to be valid and nothing may be freed;
    /// `Some(vec![])`: the runtime listed none, every attachment of the network is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// CHECK: the addresses of `prevResult`'s `ips[].address` (CIDR, as the runtime gave them):
    /// what the attachment is expected to hold.
    #[serde(default)]
    pub prev_ips: Vec<String>,
}

impl CniRequest {
    /// A CNI_ARGS value.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// One address in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `10.6.168.101/16`.
    pub address: String,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// One route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// Destination CIDR.
    pub dst: String,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// The version-neutral ADD result; the plugin renders it in the caller's `cniVersion`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Addresses, one per family.
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// The answer to a GC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResult {
    /// Addresses released.
    pub released: Vec<String>,
}

/// `POST /v1/release`: free one address by hand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The pool.
    pub pool: String,
    /// The address.
    pub ip: String,
    /// Also when pods still hold it (they are gone for good).
    #[serde(default)]
    pub force: bool,
    /// Instead of releasing it, re-file it (pinned, no pod holding it) under the IPAMClaim
    /// `namespace/name`: the address stays, its identity changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_claim: Option<String>,
}

/// The answer to a reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileResult {
    /// Pinned addresses released because a release condition fired.
    pub released: Vec<String>,
}

/// What garbage collection did on its last pass and what it is watching (`/v1/gc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    /// Why the last pass did nothing (not elected, caches not synced, API server
    /// unreachable), if it did nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// When the last pass ran (unix seconds; 0: never).
    #[serde(default)]
    pub at: u64,
    /// What it freed.
    #[serde(default)]
    pub released: Vec<GcRelease>,
    /// What looks leaked and waits for its grace period to pass.
    #[serde(default)]
    pub suspects: Vec<GcSuspect>,
}

/// One thing garbage collection freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRelease {
    /// POOL/IP.
    pub address: String,
    /// `pod-gone`, `node-lost` or `rule-fired`.
    pub reason: String,
    /// `released` (the address is free) or `holder-dropped` (a pinned address lost a stale
    /// holder and stays with its identity).
    pub action: String,
    /// The pod or identity it belonged to.
    pub workload: String,
}

/// One address that looks leaked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcSuspect {
    /// POOL/IP.
    pub address: String,
    /// Why it looks leaked.
    pub reason: String,
    /// The pod or identity.
    pub workload: String,
    /// Seconds since it was first seen so.
    pub seen_secs: u64,
    /// Seconds it must stay so before it is freed.
    pub grace_secs: u64,
}

/// One pool in `/v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolInfo {
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: String,
    /// Allocated addresses (as text: a pool may hold more than 2^64).
    pub allocated: String,
    /// Allocatable addresses.
    pub total: String,
    /// Cluster default.
    pub default: bool,
}

/// `/v1/pools`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolList {
    /// Pools by name.
    pub pools: Vec<PoolInfo>,
    /// Allocations held under a pool name that no longer covers their address (the pool was
    /// removed, renamed or shrunk): each stays until released.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<OrphanInfo>,
    /// Why the pool files were refused at the last reload: the pools above are the ones in
    /// force before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_error: Option<String>,
}

/// An allocation held under a pool name no longer in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanInfo {
    /// `POOL/IP`, as `tetherd release` takes it.
    pub address: String,
    /// The current pool that covers the address, where it stays reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_in: Option<String>,
}

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The CNI error code.
    pub code: u32,
    /// One line a person can act on.
    pub msg: String,
    /// More context.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_valid_attachments_list_is_not_an_empty_one() {
        let missing: CniRequest = serde_json::from_str(
            r#"{"containerId":"","ifname":"","network":"n","cniVersion":"1.1.0"}"#,
        )
        .expect("decode");
        assert_eq!(missing.valid_attachments, None);
        assert!(missing.prev_ips.is_empty());
        let text = serde_json::to_string(&missing).expect("encode");
        assert!(!text.contains("validAttachments"), "{text}");

        let empty = CniRequest {
            valid_attachments: Some(Vec::new()),
            prev_ips: vec!["10.6.168.101/16".into()],
            ..missing
        };
        let text = serde_json::to_string(&empty).expect("encode");
        assert!(text.contains(r#""validAttachments":[]"#), "{text}");
        assert!(text.contains(r#""prevIps":["10.6.168.101/16"]"#), "{text}");
        let back: CniRequest = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, empty);
    }
}
