//! Whose pin a pinned decision may claim.
//!
//! [`Decision::validate`] checks a decision's shape; [`check`] checks that the identity it
//! claims belongs to the pod it was made for, from what the host knows of the pod (its
//! namespace, name and owner references) and its resolved owner chain, never from what the
//! policy says. Pins are keyed by identity *and* kind, so the rules are per kind:
//!
//! | kind | the identity must be | and the pod |
//! |---|---|---|
//! | `virtual-machine` | `<pod namespace>/<vm>` | is controlled by the `kubevirt.io` VirtualMachineInstance `<vm>`, or its owner chain holds that VMI or the VirtualMachine `<vm>` |
//! | `stateful-set-pod` | `<pod namespace>/<pod name>` | is controlled by an `apps` StatefulSet |
//! | `ipam-claim`, `custom` | `<pod namespace>/<anything>` | |
//!
//! So a policy cannot put a pod on another workload's address: not a running VM's (the
//! reviewer's duplicate address, a second holder through `may_share`), not another
//! StatefulSet replica's, not another namespace's. Where the host knows no owner of the pod (a
//! standalone daemon without a workload directory sees only CNI arguments), a
//! `virtual-machine` or `stateful-set-pod` claim cannot be verified and is refused; the
//! built-in `kubevirt` and `statefulset` policies abstain for such a pod anyway, as they decide
//! from the same owner references.
//!
//! [`Decision::validate`]: crate::Decision::validate

use thiserror::Error;

use crate::decision::{Decision, IdentityKind, Pinned};
use crate::manifest::api_group;
use crate::workload::{PolicyRequest, Workload};

/// KubeVirt's API group.
pub const KUBEVIRT_GROUP: &str = "kubevirt.io";

/// The label KubeVirt puts on a migration's target launcher pod.
pub const MIGRATION_JOB_LABEL: &str = "kubevirt.io/migrationJobUID";

/// Why a pinned decision may not claim its identity for this pod.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClaimError {
    /// The identity is not under the pod's namespace.
    #[error(
        "{kind} identity {identity:?} is not in pod {pod}'s namespace: a pod can only be pinned under \"{namespace}/...\""
    )]
    OtherNamespace {
        /// The pod, `namespace/name`.
        pod: String,
        /// The identity claimed.
        identity: String,
        /// Its kind.
        kind: IdentityKind,
        /// The pod's namespace.
        namespace: String,
    },
    /// A `virtual-machine` identity for a pod no VM of that name owns.
    #[error(
        "virtual-machine identity {identity:?} is not pod {pod}'s: the pod is not controlled by a kubevirt.io VirtualMachineInstance {name:?}, and no VirtualMachineInstance or VirtualMachine of that name is in its owner chain{}",
        no_owners_hint(*owners_known)
    )]
    NotTheVirtualMachine {
        /// The pod, `namespace/name`.
        pod: String,
        /// The identity claimed.
        identity: String,
        /// The VM name it names.
        name: String,
        /// Whether the host knows any owner reference of the pod.
        owners_known: bool,
    },
    /// An IPAMClaim whose controller (its VM) does not own the pod that refers to it.
    #[error(
        "IPAMClaim {claim} belongs to {owner}, which does not own pod {pod}: only that VM's launcher pods may use its addresses"
    )]
    NotTheClaimOwner {
        /// The pod, `namespace/name`.
        pod: String,
        /// The claim, `namespace/name`.
        claim: String,
        /// Its controller, `Kind name`.
        owner: String,
    },
    /// A `stateful-set-pod` identity other than the pod's own `namespace/name`.
    #[error(
        "stateful-set-pod identity {identity:?} is not pod {pod}'s: a StatefulSet pod is pinned under its own namespace/name, {pod:?}"
    )]
    NotThisStatefulSetPod {
        /// The pod, `namespace/name`.
        pod: String,
        /// The identity claimed.
        identity: String,
    },
    /// A `stateful-set-pod` identity for a pod no StatefulSet controls.
    #[error(
        "stateful-set-pod identity {identity:?} is not pod {pod}'s: the pod is not controlled by an apps StatefulSet{}",
        no_owners_hint(*owners_known)
    )]
    NotAStatefulSetPod {
        /// The pod, `namespace/name`.
        pod: String,
        /// The identity claimed.
        identity: String,
        /// Whether the host knows any owner reference of the pod.
        owners_known: bool,
    },
}

fn no_owners_hint(owners_known: bool) -> &'static str {
    if owners_known {
        ""
    } else {
        " (tetherd knows no owner of this pod: without a workload source, or without the pod's \
         manifest, it sees only the CNI arguments, so this kind of pin cannot be verified)"
    }
}

/// Checks that a decision claims only what belongs to the pod of `request`: see the
/// [module documentation](self). `Ephemeral` and `Abstain` claim nothing.
pub fn check(decision: &Decision, request: &PolicyRequest) -> Result<(), ClaimError> {
    match decision {
        Decision::Pinned(p) => check_pinned(p, request),
        Decision::Abstain | Decision::Ephemeral => Ok(()),
    }
}

/// [`check`] for a pinned decision.
pub fn check_pinned(p: &Pinned, request: &PolicyRequest) -> Result<(), ClaimError> {
    let w = &request.workload;
    let name = p
        .identity
        .strip_prefix(w.namespace.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|rest| !rest.is_empty())
        .ok_or_else(|| ClaimError::OtherNamespace {
            pod: w.key(),
            identity: p.identity.clone(),
            kind: p.kind,
            namespace: w.namespace.clone(),
        })?;
    match p.kind {
        IdentityKind::VirtualMachine => {
            if owned_by_vm(request, name) {
                Ok(())
            } else {
                Err(ClaimError::NotTheVirtualMachine {
                    pod: w.key(),
                    identity: p.identity.clone(),
                    name: name.to_owned(),
                    owners_known: !w.owner_references.is_empty(),
                })
            }
        }
        IdentityKind::StatefulSetPod => {
            if !controlled_by(w, "apps", "StatefulSet") {
                Err(ClaimError::NotAStatefulSetPod {
                    pod: w.key(),
                    identity: p.identity.clone(),
                    owners_known: !w.owner_references.is_empty(),
                })
            } else if name != w.name {
                Err(ClaimError::NotThisStatefulSetPod {
                    pod: w.key(),
                    identity: p.identity.clone(),
                })
            } else {
                Ok(())
            }
        }
        IdentityKind::IpamClaim | IdentityKind::Custom => Ok(()),
    }
}

/// Whether the pod's controller is `kind` of API group `group`.
fn controlled_by(w: &Workload, group: &str, kind: &str) -> bool {
    w.controller()
        .is_some_and(|r| r.kind == kind && api_group(&r.api_version) == group)
}

/// Whether VM `name` owns the pod: the pod's controller is the VMI `name` (what the built-in
/// `kubevirt` policy reads, resolved or not), or its owner chain holds the VMI or VM `name`.
fn owned_by_vm(request: &PolicyRequest, name: &str) -> bool {
    let w = &request.workload;
    let vm_kind = |kind: &str| kind == "VirtualMachineInstance" || kind == "VirtualMachine";
    let by_controller = w.controller().is_some_and(|r| {
        r.kind == "VirtualMachineInstance"
            && api_group(&r.api_version) == KUBEVIRT_GROUP
            && r.name == name
    });
    by_controller
        || request.owners.iter().any(|o| {
            vm_kind(&o.kind)
                && api_group(&o.api_version) == KUBEVIRT_GROUP
                && o.namespace == w.namespace
                && o.name == name
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::ReleaseCondition;
    use crate::samples::{controller, deployment_request, pod, sts_request, vm_request};

    fn pin(identity: &str, kind: IdentityKind) -> Decision {
        Decision::Pinned(Pinned {
            identity: identity.into(),
            kind,
            release: vec![ReleaseCondition::Never],
            may_share: true,
            pools: vec![],
        })
    }

    fn bare(namespace: &str, name: &str) -> PolicyRequest {
        PolicyRequest {
            workload: pod(namespace, name),
            owners: vec![],
        }
    }

    #[test]
    fn the_builtins_claims_pass() {
        // kubevirt: resolved chain, migration target, unresolved VMI.
        let vm = pin("default/vm-cirros", IdentityKind::VirtualMachine);
        assert_eq!(
            check(&vm, &vm_request("virt-launcher-vm-cirros-a", false)),
            Ok(())
        );
        assert_eq!(
            check(&vm, &vm_request("virt-launcher-vm-cirros-t", true)),
            Ok(())
        );
        let mut unresolved = vm_request("virt-launcher-vm-cirros-a", false);
        unresolved.owners.clear();
        assert_eq!(check(&vm, &unresolved), Ok(()));
        // statefulset: namespace/pod-name.
        let sts = pin("db/web-2", IdentityKind::StatefulSetPod);
        assert_eq!(check(&sts, &sts_request("web-2", false)), Ok(()));
        // label-identity: namespace/<label value>.
        let custom = pin("shop/cart-primary", IdentityKind::Custom);
        assert_eq!(check(&custom, &deployment_request("cart-7d9f-x2")), Ok(()));
        assert_eq!(check(&Decision::Ephemeral, &bare("a", "b")), Ok(()));
    }

    #[test]
    fn an_unrelated_pod_cannot_claim_a_vm() {
        let vm = pin("default/vm-cirros", IdentityKind::VirtualMachine);
        for r in [
            bare("default", "intruder"),
            deployment_request("cart"),
            sts_request("web-0", false),
        ] {
            assert!(check(&vm, &r).is_err(), "{}", r.workload.key());
        }
        // In the VM's namespace, the error says what is missing.
        let e = check(&vm, &bare("default", "intruder")).expect_err("not the VM's");
        assert!(
            matches!(&e, ClaimError::NotTheVirtualMachine { name, owners_known: false, .. } if name == "vm-cirros"),
            "{e:?}"
        );
        assert!(e.to_string().contains("knows no owner"), "{e}");
        // Another VM's launcher pod.
        let mut other = vm_request("virt-launcher-vm-other-a", false);
        other.workload.owner_references = vec![controller(
            "kubevirt.io/v1",
            "VirtualMachineInstance",
            "vm-other",
        )];
        other.owners.clear();
        assert!(check(&vm, &other).is_err());
        // A look-alike group does not count.
        let mut fake = bare("default", "p");
        fake.workload.owner_references = vec![controller(
            "example.com/v1",
            "VirtualMachineInstance",
            "vm-cirros",
        )];
        assert!(check(&vm, &fake).is_err());
    }

    #[test]
    fn a_vm_is_known_by_its_chain_too() {
        // A pod whose controller is not the VMI, but whose resolved chain holds the VM.
        let mut r = vm_request("helper", false);
        r.workload.owner_references = vec![controller("kubevirt.io/v1", "Helper", "h")];
        let vm = pin("default/vm-cirros", IdentityKind::VirtualMachine);
        assert_eq!(check(&vm, &r), Ok(()));
        // The chain's objects count only in the pod's namespace.
        for o in &mut r.owners {
            o.namespace = "elsewhere".into();
        }
        assert!(check(&vm, &r).is_err());
    }

    #[test]
    fn a_statefulset_pod_claims_only_its_own_name_and_kind() {
        let r = sts_request("web-0", false);
        assert!(matches!(
            check(&pin("db/web-0", IdentityKind::VirtualMachine), &r),
            Err(ClaimError::NotTheVirtualMachine {
                owners_known: true,
                ..
            })
        ));
        assert!(matches!(
            check(&pin("db/web-1", IdentityKind::StatefulSetPod), &r),
            Err(ClaimError::NotThisStatefulSetPod { .. })
        ));
        assert!(matches!(
            check(
                &pin("db/web-0", IdentityKind::StatefulSetPod),
                &bare("db", "web-0")
            ),
            Err(ClaimError::NotAStatefulSetPod {
                owners_known: false,
                ..
            })
        ));
        assert!(matches!(
            check(
                &pin("db/cart", IdentityKind::StatefulSetPod),
                &deployment_request("cart")
            ),
            Err(ClaimError::OtherNamespace { .. })
        ));
    }

    #[test]
    fn other_kinds_stay_in_the_pods_namespace() {
        for kind in [IdentityKind::Custom, IdentityKind::IpamClaim] {
            assert_eq!(check(&pin("b/x", kind), &bare("b", "p")), Ok(()));
            for identity in ["a/x", "x", "b/", "bb/x", "/x", "b"] {
                let e = check(&pin(identity, kind), &bare("b", "p")).expect_err(identity);
                assert!(matches!(e, ClaimError::OtherNamespace { .. }), "{e:?}");
                assert!(e.to_string().contains("\"b/...\""), "{e}");
            }
        }
        // A pod whose namespace is unknown (no K8S_POD_NAMESPACE) keeps to the empty one.
        assert_eq!(
            check(&pin("/x", IdentityKind::Custom), &bare("", "c")),
            Ok(())
        );
        assert!(check(&pin("a/x", IdentityKind::Custom), &bare("", "c")).is_err());
    }
}
