//! Typed policy failures. Each names the policy; the daemon maps them to CNI errors once.

use std::time::Duration;

use tether_core::ClaimError;
use thiserror::Error;

/// Why a policy could not be loaded or evaluated.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// The evaluation ran past its deadline.
    #[error("policy {policy}: did not decide within its {limit:?} time limit")]
    Timeout {
        /// Policy name.
        policy: String,
        /// The deadline.
        limit: Duration,
    },
    /// The guest tried to grow its memory past the limit.
    #[error(
        "policy {policy}: tried to grow its memory to {requested} bytes, over its limit of {limit} bytes"
    )]
    MemoryLimit {
        /// Policy name.
        policy: String,
        /// Requested size.
        requested: usize,
        /// Limit.
        limit: usize,
    },
    /// The guest trapped (panic, unreachable, stack overflow, ...).
    #[error("policy {policy}: trapped: {trap}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Trap {
        /// Policy name.
        policy: String,
        /// The trap, e.g. "call stack exhausted".
        trap: String,
        /// The last error the policy logged before trapping (its panic message).
        message: Option<String>,
    },
    /// Not a valid WebAssembly component.
    #[error("policy {policy}: not a valid WebAssembly component: {reason}")]
    InvalidModule {
        /// Policy name (the file name when the policy never loaded).
        policy: String,
        /// What is wrong.
        reason: String,
    },
    /// The component is larger than the runtime accepts.
    #[error("policy {policy}: the component is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Policy name (its source: the policy never loaded).
        policy: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The component imports something the host does not provide.
    #[error(
        "policy {policy}: imports `{import}`; policies may import only tether:policy/host (no WASI, no network, no files)"
    )]
    ForbiddenImport {
        /// Policy name.
        policy: String,
        /// The import.
        import: String,
    },
    /// The component was built against a contract this host does not speak.
    #[error(
        "policy {policy}: built against contract {found}; this tetherd supports tether:policy@{supported}"
    )]
    ContractMismatch {
        /// Policy name.
        policy: String,
        /// What the component exports.
        found: String,
        /// What the host supports.
        supported: String,
    },
    /// The component returned a decision that breaks the contract's rules.
    #[error("policy {policy}: returned an invalid decision: {reason}")]
    InvalidDecision {
        /// Policy name.
        policy: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The decision pins the pod under an identity that is not the pod's (another namespace's,
    /// a VM's that does not own the pod, another StatefulSet pod's): refused by the host
    /// ([`tether_core::claim::check`]) before anything is allocated.
    #[error("policy {policy}: cannot pin this pod: {error}")]
    ForeignIdentity {
        /// Policy name.
        policy: String,
        /// What the claim breaks.
        error: ClaimError,
    },
    /// The policy refused the workload (`err` from `evaluate`).
    #[error("policy {policy}: refused the workload: {message}")]
    Refused {
        /// Policy name.
        policy: String,
        /// Its message (cut to 1 KiB).
        message: String,
    },
    /// Metadata the host cannot accept (bad name, duplicate name in a chain).
    #[error("policy {policy}: {reason}")]
    BadMetadata {
        /// Policy name.
        policy: String,
        /// What is wrong.
        reason: String,
    },
    /// The engine itself failed (configuration, out of slots).
    #[error("policy runtime: {0}")]
    Engine(String),
}

impl PolicyError {
    /// The policy this error is about, when there is one.
    pub fn policy(&self) -> Option<&str> {
        match self {
            PolicyError::Timeout { policy, .. }
            | PolicyError::MemoryLimit { policy, .. }
            | PolicyError::Trap { policy, .. }
            | PolicyError::InvalidModule { policy, .. }
            | PolicyError::TooLarge { policy, .. }
            | PolicyError::ForbiddenImport { policy, .. }
            | PolicyError::ContractMismatch { policy, .. }
            | PolicyError::InvalidDecision { policy, .. }
            | PolicyError::ForeignIdentity { policy, .. }
            | PolicyError::Refused { policy, .. }
            | PolicyError::BadMetadata { policy, .. } => Some(policy),
            PolicyError::Engine(_) => None,
        }
    }

    /// A stable short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::Timeout { .. } => "timeout",
            PolicyError::MemoryLimit { .. } => "memory_limit",
            PolicyError::Trap { .. } => "trap",
            PolicyError::InvalidModule { .. } => "invalid_module",
            PolicyError::TooLarge { .. } => "too_large",
            PolicyError::ForbiddenImport { .. } => "forbidden_import",
            PolicyError::ContractMismatch { .. } => "contract_mismatch",
            PolicyError::InvalidDecision { .. } => "invalid_decision",
            PolicyError::ForeignIdentity { .. } => "foreign_identity",
            PolicyError::Refused { .. } => "refused",
            PolicyError::BadMetadata { .. } => "bad_metadata",
            PolicyError::Engine(_) => "engine",
        }
    }
}

/// Cuts text coming from a guest to `max` bytes on a char boundary, saying how much was cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &s[..end], s.len() - end)
}
