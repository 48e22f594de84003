//! Policy chains: policies evaluated in order, first non-abstain decision wins.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tether_core::{Decision, PolicyRequest};

use crate::{LoadedPolicy, PolicyError, Prepared, Runtime, Settings};

/// One policy of a chain with its settings.
#[derive(Debug, Clone)]
pub struct ChainEntry {
    /// The policy.
    pub policy: Arc<LoadedPolicy>,
    /// Its settings.
    pub settings: Settings,
}

/// An ordered list of policies. Switching a behaviour off (say VM pinning) is leaving its
/// policy out of the chain.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    entries: Vec<ChainEntry>,
}

/// What one policy of the chain said.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Policy name.
    pub policy: String,
    /// `abstain`, `ephemeral`, `pinned`, or `error`.
    pub decision: &'static str,
    /// Wall time of the evaluation, microseconds.
    pub micros: u64,
}

/// The chain's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainOutcome {
    /// The decision: never `Abstain`.
    pub decision: Decision,
    /// The policy that decided; `None` when every policy abstained.
    pub decided_by: Option<String>,
    /// What each evaluated policy said, in order.
    pub steps: Vec<Step>,
}

impl ChainOutcome {
    /// Checks that the decision claims only the pod's own identity
    /// ([`tether_core::claim::check`]); a claim of another workload's is the deciding policy's
    /// failure, [`PolicyError::ForeignIdentity`].
    pub fn check_claim(&self, request: &PolicyRequest) -> Result<(), PolicyError> {
        tether_core::claim::check(&self.decision, request).map_err(|error| {
            PolicyError::ForeignIdentity {
                policy: self.decided_by.clone().unwrap_or_else(|| "(none)".into()),
                error,
            }
        })
    }
}

impl Chain {
    /// Builds a chain; policy names must be unique in it.
    pub fn new(entries: Vec<ChainEntry>) -> Result<Self, PolicyError> {
        for (i, e) in entries.iter().enumerate() {
            let name = &e.policy.metadata.name;
            if entries[..i].iter().any(|o| &o.policy.metadata.name == name) {
                return Err(PolicyError::BadMetadata {
                    policy: name.clone(),
                    reason: "appears twice in the chain".into(),
                });
            }
        }
        Ok(Chain { entries })
    }

    /// The policy names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .map(|e| e.policy.metadata.name.as_str())
            .collect()
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    /// Evaluates the chain. An error of any policy ends the evaluation: a broken policy must
    /// not silently hand its pods to the next one.
    pub fn evaluate(
        &self,
        rt: &Runtime,
        request: &PolicyRequest,
    ) -> Result<ChainOutcome, PolicyError> {
        let mut steps = Vec::with_capacity(self.entries.len());
        let mut input = Prepared::new(request);
        for entry in &self.entries {
            let name = &entry.policy.metadata.name;
            let started = Instant::now();
            let result = rt.evaluate_prepared(&entry.policy, &mut input, &entry.settings);
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let decision = match result {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(policy = %name, pod = %request.workload.key(), reason = e.reason(), micros, "policy failed: {e}");
                    return Err(e);
                }
            };
            tracing::debug!(policy = %name, pod = %request.workload.key(), decision = decision.kind_str(), micros, "policy evaluated");
            steps.push(Step {
                policy: name.clone(),
                decision: decision.kind_str(),
                micros,
            });
            if decision != Decision::Abstain {
                return Ok(ChainOutcome {
                    decision,
                    decided_by: Some(name.clone()),
                    steps,
                });
            }
        }
        Ok(ChainOutcome {
            decision: Decision::Ephemeral,
            decided_by: None,
            steps,
        })
    }
}
