//! Built-in policy `statefulset`: a StatefulSet replica keeps its address per pod name.
//!
//! A pod whose controller owner is an `apps` StatefulSet is pinned under `namespace/pod-name`.
//! The address is released when the StatefulSet is deleted, or when it is scaled below the pod's
//! ordinal, unless the StatefulSet carries the annotation
//! `ipam.tether.dev/keep-ips-on-scale-down: "true"` (addresses then survive a scale-down and
//! come back with the replicas).
//!
//! Every other pod: abstain.

use tether_policy_sdk::{
    Decision, IdentityKind, Metadata, ObjectKey, Pinned, Policy, ReleaseCondition, Request,
    ScaleDown, statefulset_ordinal,
};

/// The annotation on a StatefulSet that keeps addresses across scale-down.
pub const KEEP_ON_SCALE_DOWN: &str = "ipam.tether.dev/keep-ips-on-scale-down";

/// The policy.
pub struct StatefulSet;

impl Policy for StatefulSet {
    fn metadata() -> Metadata {
        Metadata::new(
            "statefulset",
            env!("CARGO_PKG_VERSION"),
            "Pins a StatefulSet pod's address under namespace/pod-name; released when the \
             StatefulSet is deleted or scaled below the pod's ordinal (unless annotated \
             ipam.tether.dev/keep-ips-on-scale-down: \"true\").",
        )
    }

    fn evaluate(req: &Request) -> Result<Decision, String> {
        decide(req)
    }
}

tether_policy_sdk::export!(StatefulSet);

/// The decision, as a plain function for native tests.
pub fn decide(req: &Request) -> Result<Decision, String> {
    let w = &req.workload;
    let Some(sts_ref) = w.controller().filter(|r| r.is("apps", "StatefulSet")) else {
        return Ok(Decision::Abstain);
    };
    let ordinal = statefulset_ordinal(&sts_ref.name, &w.name).ok_or_else(|| {
        format!(
            "pod {} is owned by StatefulSet {} but its name does not end in -<ordinal>",
            w.key(),
            sts_ref.name
        )
    })?;
    let sts_key = ObjectKey::from_reference(&w.namespace, sts_ref);
    let keep = req
        .owner(sts_ref)
        .and_then(|sts| sts.annotation(KEEP_ON_SCALE_DOWN))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let mut release = vec![ReleaseCondition::OwnerDeleted(sts_key.clone())];
    if !keep {
        release.push(ReleaseCondition::ScaledBelow(ScaleDown {
            owner: sts_key,
            ordinal,
        }));
    }
    Ok(Decision::Pinned(Pinned {
        identity: w.key(),
        kind: IdentityKind::StatefulSetPod,
        release,
        may_share: false,
        pools: vec![],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_policy_sdk::testing::{controller, object, request, workload};

    fn replica(name: &str) -> tether_policy_sdk::Workload {
        let mut w = workload("db", name);
        w.owner_references
            .push(controller("apps/v1", "StatefulSet", "web"));
        w
    }

    #[test]
    fn pinned_per_pod_name_with_scale_down_release() {
        let mut sts = object("apps/v1", "StatefulSet", "db", "web");
        sts.replicas = Some(3);
        let Ok(Decision::Pinned(p)) = decide(&request(replica("web-2"), vec![sts.clone()])) else {
            panic!("pinned");
        };
        assert_eq!(p.identity, "db/web-2");
        assert_eq!(p.kind, IdentityKind::StatefulSetPod);
        assert_eq!(
            p.release,
            vec![
                ReleaseCondition::OwnerDeleted(sts.key()),
                ReleaseCondition::ScaledBelow(ScaleDown {
                    owner: sts.key(),
                    ordinal: 2
                }),
            ]
        );
    }

    #[test]
    fn annotation_keeps_addresses_across_scale_down() {
        let mut sts = object("apps/v1", "StatefulSet", "db", "web");
        sts.annotations
            .push((KEEP_ON_SCALE_DOWN.into(), "true".into()));
        let Ok(Decision::Pinned(p)) = decide(&request(replica("web-0"), vec![sts.clone()])) else {
            panic!("pinned");
        };
        assert_eq!(p.release, vec![ReleaseCondition::OwnerDeleted(sts.key())]);
    }

    #[test]
    fn bad_pod_name_is_an_error() {
        let e = decide(&request(replica("web-x"), vec![])).expect_err("no ordinal");
        assert!(e.contains("db/web-x"), "{e}");
    }

    #[test]
    fn others_abstain() {
        let mut w = workload("db", "web-abc12");
        w.owner_references
            .push(controller("apps/v1", "ReplicaSet", "web-abc"));
        assert_eq!(decide(&request(w, vec![])), Ok(Decision::Abstain));
    }
}
