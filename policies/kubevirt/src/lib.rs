//! Built-in policy `kubevirt`: a KubeVirt VM keeps its address.
//!
//! A virt-launcher pod (controller owner: a `VirtualMachineInstance` of `kubevirt.io`) is pinned
//! under the VM's `namespace/name`, so the address survives the pod being recreated under a new
//! name and the VMI being deleted and recreated. It is released when the `VirtualMachine` is
//! deleted, or the VMI when no VM owns it. The target pod of a live migration (KubeVirt labels it
//! `kubevirt.io/migrationJobUID`) may hold the address together with the source pod.
//!
//! Every other pod: abstain.

use tether_policy_sdk::{
    Decision, IdentityKind, Level, Metadata, ObjectKey, Pinned, Policy, ReleaseCondition, Request,
    log,
};

/// KubeVirt's API group.
pub const KUBEVIRT_GROUP: &str = "kubevirt.io";
/// The label KubeVirt sets on the target pod of a live migration.
pub const MIGRATION_JOB_LABEL: &str = "kubevirt.io/migrationJobUID";

/// The policy.
pub struct KubeVirt;

impl Policy for KubeVirt {
    fn metadata() -> Metadata {
        Metadata::new(
            "kubevirt",
            env!("CARGO_PKG_VERSION"),
            "Pins a KubeVirt VM's address under namespace/vm-name across pod restarts, VMI \
             recreation and live migration; released when the VirtualMachine is deleted.",
        )
    }

    fn evaluate(req: &Request) -> Result<Decision, String> {
        Ok(decide(req))
    }
}

tether_policy_sdk::export!(KubeVirt);

/// The decision, as a plain function for native tests.
pub fn decide(req: &Request) -> Decision {
    let w = &req.workload;
    let Some(vmi_ref) = w
        .controller()
        .filter(|r| r.is(KUBEVIRT_GROUP, "VirtualMachineInstance"))
    else {
        return Decision::Abstain;
    };
    let vmi_key = ObjectKey::from_reference(&w.namespace, vmi_ref);
    let release_on = match req.owner(vmi_ref) {
        Some(vmi) => match vmi
            .controller()
            .filter(|r| r.is(KUBEVIRT_GROUP, "VirtualMachine"))
        {
            Some(vm_ref) => ObjectKey::from_reference(&vmi.namespace, vm_ref),
            None => vmi.key(),
        },
        None => {
            log(
                Level::Warn,
                &format!(
                    "VirtualMachineInstance {}/{} was not resolved; the address is released with the VMI",
                    w.namespace, vmi_ref.name
                ),
            );
            vmi_key
        }
    };
    // KubeVirt names the VMI after its VM, so the identity is the same whether or not a VM
    // owns it; only the release rule differs.
    Decision::Pinned(Pinned {
        identity: format!("{}/{}", w.namespace, vmi_ref.name),
        kind: IdentityKind::VirtualMachine,
        release: vec![ReleaseCondition::OwnerDeleted(release_on)],
        may_share: w.label(MIGRATION_JOB_LABEL).is_some(),
        pools: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_policy_sdk::testing::{controller, object, request, workload};

    fn launcher(pod: &str, migration: bool) -> tether_policy_sdk::Workload {
        let mut w = workload("default", pod);
        w.labels
            .push(("kubevirt.io".into(), "virt-launcher".into()));
        if migration {
            w.labels.push((MIGRATION_JOB_LABEL.into(), "mig-1".into()));
        }
        w.owner_references.push(controller(
            "kubevirt.io/v1",
            "VirtualMachineInstance",
            "vm-cirros",
        ));
        w
    }

    fn vmi_owned_by_vm() -> tether_policy_sdk::Object {
        let mut vmi = object(
            "kubevirt.io/v1",
            "VirtualMachineInstance",
            "default",
            "vm-cirros",
        );
        vmi.owner_references
            .push(controller("kubevirt.io/v1", "VirtualMachine", "vm-cirros"));
        vmi
    }

    fn pinned(d: Decision) -> Pinned {
        match d {
            Decision::Pinned(p) => p,
            other => panic!("expected pinned, got {other:?}"),
        }
    }

    #[test]
    fn vm_pod_is_pinned_under_vm_and_released_with_vm() {
        let vm = object("kubevirt.io/v1", "VirtualMachine", "default", "vm-cirros");
        let p = pinned(decide(&request(
            launcher("virt-launcher-vm-cirros-abcde", false),
            vec![vmi_owned_by_vm(), vm.clone()],
        )));
        assert_eq!(p.identity, "default/vm-cirros");
        assert_eq!(p.kind, IdentityKind::VirtualMachine);
        assert_eq!(p.release, vec![ReleaseCondition::OwnerDeleted(vm.key())]);
        assert!(!p.may_share);
    }

    #[test]
    fn new_launcher_pod_gets_same_identity() {
        let a = pinned(decide(&request(
            launcher("virt-launcher-vm-cirros-aaaaa", false),
            vec![vmi_owned_by_vm()],
        )));
        let b = pinned(decide(&request(
            launcher("virt-launcher-vm-cirros-bbbbb", false),
            vec![vmi_owned_by_vm()],
        )));
        assert_eq!(a.identity, b.identity);
    }

    #[test]
    fn migration_target_may_share() {
        let p = pinned(decide(&request(
            launcher("virt-launcher-vm-cirros-zzzzz", true),
            vec![vmi_owned_by_vm()],
        )));
        assert!(p.may_share);
        assert_eq!(p.identity, "default/vm-cirros");
    }

    #[test]
    fn standalone_vmi_released_with_vmi() {
        let vmi = object(
            "kubevirt.io/v1",
            "VirtualMachineInstance",
            "default",
            "vm-cirros",
        );
        let p = pinned(decide(&request(
            launcher("virt-launcher-vm-cirros-q", false),
            vec![vmi.clone()],
        )));
        assert_eq!(p.release, vec![ReleaseCondition::OwnerDeleted(vmi.key())]);
    }

    #[test]
    fn unresolved_vmi_released_with_vmi() {
        let p = pinned(decide(&request(
            launcher("virt-launcher-vm-cirros-q", false),
            vec![],
        )));
        assert_eq!(p.identity, "default/vm-cirros");
        let ReleaseCondition::OwnerDeleted(k) = &p.release[0] else {
            panic!("owner-deleted")
        };
        assert_eq!(k.kind, "VirtualMachineInstance");
    }

    #[test]
    fn other_pods_abstain() {
        assert_eq!(
            decide(&request(workload("default", "web-0"), vec![])),
            Decision::Abstain
        );
        let mut w = workload("default", "imposter");
        w.owner_references
            .push(controller("example.com/v1", "VirtualMachineInstance", "x"));
        assert_eq!(decide(&request(w, vec![])), Decision::Abstain);
        // A VMI that owns the pod without being its controller does not count.
        let mut w = launcher("p", false);
        w.owner_references[0].controller = false;
        assert_eq!(decide(&request(w, vec![])), Decision::Abstain);
    }
}
