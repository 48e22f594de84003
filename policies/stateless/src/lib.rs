//! Built-in policy `stateless`: every workload gets an ephemeral address. It ends the default
//! chain so that the chain's answer is explicit; a chain without it ends in ephemeral anyway.

use tether_policy_sdk::{Decision, Metadata, Policy, Request};

/// The policy.
pub struct Stateless;

impl Policy for Stateless {
    fn metadata() -> Metadata {
        Metadata::new(
            "stateless",
            env!("CARGO_PKG_VERSION"),
            "Gives every workload a fresh address, released when its pod goes away.",
        )
    }

    fn evaluate(_req: &Request) -> Result<Decision, String> {
        Ok(Decision::Ephemeral)
    }
}

tether_policy_sdk::export!(Stateless);

#[cfg(test)]
mod tests {
    use super::*;
    use tether_policy_sdk::testing::{request, workload};

    #[test]
    fn always_ephemeral() {
        let r = request(workload("a", "b"), vec![]);
        assert_eq!(Stateless::evaluate(&r), Ok(Decision::Ephemeral));
    }
}
