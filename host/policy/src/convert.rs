//! Conversions between the domain types of tether-core and the generated WIT types.

use tether_core::{Decision, IdentityKind, ObjectKey, Pinned, PolicyRequest, ReleaseCondition};

use crate::bindings::wit;

fn owner_ref(r: &tether_core::OwnerReference) -> wit::OwnerReference {
    wit::OwnerReference {
        api_version: r.api_version.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
        uid: r.uid.clone(),
        controller: r.controller,
    }
}

fn object(o: &tether_core::Object) -> wit::Object {
    wit::Object {
        api_version: o.api_version.clone(),
        kind: o.kind.clone(),
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        uid: o.uid.clone(),
        labels: o.labels.clone(),
        annotations: o.annotations.clone(),
        owner_references: o.owner_references.iter().map(owner_ref).collect(),
        replicas: o.replicas,
        deleting: o.deleting,
    }
}

pub(crate) fn request(req: &PolicyRequest, settings: &[(String, String)]) -> wit::Request {
    let w = &req.workload;
    wit::Request {
        workload: wit::Workload {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            uid: w.uid.clone(),
            labels: w.labels.clone(),
            annotations: w.annotations.clone(),
            owner_references: w.owner_references.iter().map(owner_ref).collect(),
            node: w.node.clone(),
            network: w.network.clone(),
            interface: w.interface.clone(),
            container_id: w.container_id.clone(),
            cni_args: w.cni_args.clone(),
        },
        owners: req.owners.iter().map(object).collect(),
        settings: settings.to_vec(),
    }
}

fn key(k: wit::ObjectKey) -> ObjectKey {
    ObjectKey {
        api_version: k.api_version,
        kind: k.kind,
        namespace: k.namespace,
        name: k.name,
    }
}

pub(crate) fn decision(d: wit::Decision) -> Decision {
    match d {
        wit::Decision::Abstain => Decision::Abstain,
        wit::Decision::Ephemeral => Decision::Ephemeral,
        wit::Decision::Pinned(p) => Decision::Pinned(Pinned {
            identity: p.identity,
            kind: match p.kind {
                wit::IdentityKind::VirtualMachine => IdentityKind::VirtualMachine,
                wit::IdentityKind::StatefulSetPod => IdentityKind::StatefulSetPod,
                wit::IdentityKind::IpamClaim => IdentityKind::IpamClaim,
                wit::IdentityKind::Custom => IdentityKind::Custom,
            },
            release: p
                .release
                .into_iter()
                .map(|c| match c {
                    wit::ReleaseCondition::Never => ReleaseCondition::Never,
                    wit::ReleaseCondition::OwnerDeleted(k) => {
                        ReleaseCondition::OwnerDeleted(key(k))
                    }
                    wit::ReleaseCondition::ScaledBelow(s) => ReleaseCondition::ScaledBelow {
                        owner: key(s.owner),
                        ordinal: s.ordinal,
                    },
                    wit::ReleaseCondition::IdleFor(secs) => ReleaseCondition::IdleForSeconds(secs),
                })
                .collect(),
            may_share: p.may_share,
            pools: p.pools,
        }),
    }
}
