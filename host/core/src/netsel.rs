//! The multi-network selection annotations of a pod, as far as IPAM needs them: which
//! `IPAMClaim` (if any) an attachment refers to.
//!
//! KubeVirt's ipam-extensions puts `ipam-claim-reference` on a launcher pod's network selection
//! elements (`k8s.v1.cni.cncf.io/networks`, JSON form) for networks with persistent IPs, and on
//! `v1.multus-cni.io/default-network` for the primary network. The plugin is called once per
//! attachment with the network's CNI name and the interface; the element is found by its
//! interface (`interface`, or Multus's default `net<N>` for the N-th element), and else by its
//! name when only one element has it.

use serde::Deserialize;

/// Secondary networks of a pod.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
/// The pod's primary network, when Multus is told to use another than the cluster default.
pub const DEFAULT_NETWORK_ANNOTATION: &str = "v1.multus-cni.io/default-network";
/// The interface name of the primary network.
pub const PRIMARY_INTERFACE: &str = "eth0";

/// One network selection element (only what IPAM reads).
#[derive(Debug, Clone, Default, Deserialize)]
struct Element {
    #[serde(default)]
    name: String,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default, rename = "ipam-claim-reference")]
    ipam_claim_reference: Option<String>,
}

/// The IPAMClaim name the attachment `(network, ifname)` of a pod with `annotations` refers
/// to, if any; `Err` when the annotation it would be in is not valid JSON of the form Multus
/// reads (Multus itself would have refused the pod).
pub fn claim_reference(
    annotations: &[(String, String)],
    network: &str,
    ifname: &str,
) -> Result<Option<String>, String> {
    let get = |key: &str| {
        annotations
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim())
    };
    if ifname == PRIMARY_INTERFACE
        && let Some(v) = get(DEFAULT_NETWORK_ANNOTATION)
        && (v.starts_with('{') || v.starts_with('['))
    {
        let elements = parse(v, DEFAULT_NETWORK_ANNOTATION)?;
        if let Some(e) = elements.first() {
            return Ok(reference(e));
        }
    }
    let Some(v) = get(NETWORKS_ANNOTATION) else {
        return Ok(None);
    };
    // The comma-separated form (`net-a,ns/net-b@eth1`) cannot carry a claim.
    if !v.starts_with('[') && !v.starts_with('{') {
        return Ok(None);
    }
    let elements = parse(v, NETWORKS_ANNOTATION)?;
    let by_interface: Vec<&Element> = elements
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            e.interface
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("net{}", i + 1))
                == ifname
        })
        .map(|(_, e)| e)
        .collect();
    if let [e] = by_interface.as_slice() {
        return Ok(reference(e));
    }
    let by_name: Vec<&Element> = elements
        .iter()
        .filter(|e| e.name.rsplit('/').next() == Some(network))
        .collect();
    Ok(match by_name.as_slice() {
        [e] => reference(e),
        _ => None,
    })
}

fn reference(e: &Element) -> Option<String> {
    e.ipam_claim_reference.clone().filter(|r| !r.is_empty())
}

fn parse(v: &str, key: &str) -> Result<Vec<Element>, String> {
    let parsed = if v.starts_with('[') {
        serde_json::from_str::<Vec<Element>>(v)
    } else {
        serde_json::from_str::<Element>(v).map(|e| vec![e])
    };
    parsed.map_err(|e| format!("annotation {key} is not a valid network selection: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(key: &str, value: &str) -> Vec<(String, String)> {
        vec![(key.to_owned(), value.to_owned())]
    }

    #[test]
    fn the_element_of_the_interface_names_the_claim() {
        // As ipam-extensions' webhook leaves a launcher pod with two secondary networks.
        let a = pod(
            NETWORKS_ANNOTATION,
            r#"[{"name":"tenant-a","namespace":"default","ipam-claim-reference":"vm1.tenant-a"},
                {"name":"storage","namespace":"default","interface":"pod9a3f"}]"#,
        );
        assert_eq!(
            claim_reference(&a, "tenant-a-net", "net1"),
            Ok(Some("vm1.tenant-a".into()))
        );
        assert_eq!(claim_reference(&a, "storage", "pod9a3f"), Ok(None));
        assert_eq!(claim_reference(&a, "other", "net7"), Ok(None));
        // Not on the primary interface.
        assert_eq!(claim_reference(&a, "tenant-a-net", "eth0"), Ok(None));
    }

    #[test]
    fn an_element_is_found_by_its_name_when_the_interface_does_not_say() {
        let a = pod(
            NETWORKS_ANNOTATION,
            r#"[{"name":"tenant-a","interface":"eth1","ipam-claim-reference":"vm1.tenant-a"}]"#,
        );
        assert_eq!(
            claim_reference(&a, "tenant-a", "net5"),
            Ok(Some("vm1.tenant-a".into()))
        );
    }

    #[test]
    fn the_primary_network_reads_the_default_network_annotation() {
        let a = pod(
            DEFAULT_NETWORK_ANNOTATION,
            r#"{"name":"primary-udn","namespace":"default","ipam-claim-reference":"vm1.pod"}"#,
        );
        assert_eq!(
            claim_reference(&a, "primary-udn", "eth0"),
            Ok(Some("vm1.pod".into()))
        );
        assert_eq!(claim_reference(&a, "primary-udn", "net1"), Ok(None));
        // The plain form names a network, no claim.
        let plain = pod(DEFAULT_NETWORK_ANNOTATION, "default/primary-udn");
        assert_eq!(claim_reference(&plain, "primary-udn", "eth0"), Ok(None));
    }

    #[test]
    fn the_comma_form_and_no_annotation_carry_no_claim() {
        assert_eq!(
            claim_reference(&pod(NETWORKS_ANNOTATION, "a,b/c@eth1"), "a", "net1"),
            Ok(None)
        );
        assert_eq!(claim_reference(&[], "a", "net1"), Ok(None));
    }

    #[test]
    fn a_malformed_selection_is_an_error() {
        let e = claim_reference(&pod(NETWORKS_ANNOTATION, "[{\"name\": 3}"), "a", "net1");
        assert!(e.is_err_and(|e| e.contains(NETWORKS_ANNOTATION)));
    }
}
