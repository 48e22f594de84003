//! Example custom policy: pin any pod that carries the label `ipam.tether.dev/identity` under
//! `namespace/<label value>`. Pods without the label: abstain, so the rest of the chain decides.
//!
//! Settings (from the chain configuration):
//! - `label`: the label to read (default `ipam.tether.dev/identity`);
//! - `idle-seconds`: release the address after no pod held it this long (default: never).
//!
//! docs/policy-authoring.md walks through this file.

use tether_policy_sdk::{
    Decision, IdentityKind, Metadata, Pinned, Policy, ReleaseCondition, Request,
};

/// The label read when the settings name none.
pub const DEFAULT_LABEL: &str = "ipam.tether.dev/identity";

/// The policy.
pub struct LabelIdentity;

impl Policy for LabelIdentity {
    fn metadata() -> Metadata {
        Metadata::new(
            "label-identity",
            env!("CARGO_PKG_VERSION"),
            "Pins pods carrying the ipam.tether.dev/identity label under namespace/<value>.",
        )
    }

    fn evaluate(req: &Request) -> Result<Decision, String> {
        let label = req.setting("label").unwrap_or(DEFAULT_LABEL);
        let Some(value) = req.workload.label(label) else {
            return Ok(Decision::Abstain);
        };
        let release = match req.setting("idle-seconds") {
            None => ReleaseCondition::Never,
            Some(s) => ReleaseCondition::IdleFor(
                s.parse()
                    .map_err(|_| format!("setting idle-seconds={s:?} is not a whole number"))?,
            ),
        };
        Ok(Decision::Pinned(Pinned {
            identity: format!("{}/{}", req.workload.namespace, value),
            kind: IdentityKind::Custom,
            release: vec![release],
            may_share: false,
            pools: vec![],
        }))
    }
}

tether_policy_sdk::export!(LabelIdentity);

#[cfg(test)]
mod tests {
    use super::*;
    use tether_policy_sdk::testing::{request, workload};

    #[test]
    fn pins_by_label() {
        let mut w = workload("shop", "cart-7d9f-x2");
        w.labels.push((DEFAULT_LABEL.into(), "cart-primary".into()));
        let Ok(Decision::Pinned(p)) = LabelIdentity::evaluate(&request(w, vec![])) else {
            panic!("pinned");
        };
        assert_eq!(p.identity, "shop/cart-primary");
        assert_eq!(p.release, vec![ReleaseCondition::Never]);
    }

    #[test]
    fn settings_change_label_and_release() {
        let mut w = workload("shop", "cart");
        w.labels.push(("team/id".into(), "x".into()));
        let mut r = request(w, vec![]);
        r.settings = vec![
            ("label".into(), "team/id".into()),
            ("idle-seconds".into(), "60".into()),
        ];
        let Ok(Decision::Pinned(p)) = LabelIdentity::evaluate(&r) else {
            panic!("pinned")
        };
        assert_eq!(p.release, vec![ReleaseCondition::IdleFor(60)]);
        r.settings[1].1 = "soon".into();
        assert!(
            LabelIdentity::evaluate(&r)
                .expect_err("bad setting")
                .contains("idle-seconds")
        );
    }

    #[test]
    fn unlabelled_abstains() {
        assert_eq!(
            LabelIdentity::evaluate(&request(workload("a", "b"), vec![])),
            Ok(Decision::Abstain)
        );
    }
}
