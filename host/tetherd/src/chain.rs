//! Chain configuration: which policies, from where, in which order, with which settings.
//!
//! A policy reference is `builtin:NAME` (a policy embedded in tetherd) or a path to a `.wasm`
//! component. Switching a built-in behaviour off (VM pinning, StatefulSet pinning) is leaving
//! its policy out of the chain: there is no code branch for it.

use std::path::PathBuf;

use tether_policy::{Chain, ChainEntry, PolicyError, Runtime, Settings};
use thiserror::Error;

/// The default chain.
pub const DEFAULT_CHAIN: &[&str] = &[
    "builtin:kubevirt",
    "builtin:statefulset",
    "builtin:stateless",
];

/// Where a policy's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Builtin(String),
    File(PathBuf),
}

impl PolicySource {
    pub fn parse(s: &str) -> Self {
        match s.strip_prefix("builtin:") {
            Some(name) => PolicySource::Builtin(name.to_owned()),
            None => PolicySource::File(PathBuf::from(s)),
        }
    }

    fn describe(&self) -> String {
        match self {
            PolicySource::Builtin(n) => format!("builtin:{n}"),
            PolicySource::File(p) => p.display().to_string(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ChainError {
    #[error("unknown built-in policy {name:?}; the built-ins are {known}")]
    UnknownBuiltin { name: String, known: String },
    #[error("reading policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Loads the policies and builds the chain.
pub fn build(rt: &Runtime, sources: &[(PolicySource, Settings)]) -> Result<Chain, ChainError> {
    let mut entries = Vec::with_capacity(sources.len());
    for (source, settings) in sources {
        let policy = match source {
            PolicySource::Builtin(name) => {
                let b =
                    tether_builtins::builtin(name).ok_or_else(|| ChainError::UnknownBuiltin {
                        name: name.clone(),
                        known: tether_builtins::BUILTINS
                            .iter()
                            .map(|b| b.name)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                rt.load(&source.describe(), b.wasm)?
            }
            PolicySource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| ChainError::Read {
                    path: path.clone(),
                    source: e,
                })?;
                rt.load(&source.describe(), &bytes)?
            }
        };
        entries.push(ChainEntry {
            policy,
            settings: settings.clone(),
        });
    }
    Ok(Chain::new(entries)?)
}
