//! `tetherd policy inspect`: what a component is, without trusting it.

use serde::Serialize;

use crate::digest::sha256_hex;
use crate::runtime::{compile, split_name};
use crate::{PolicyError, PolicyMetadata, Runtime};

/// What inspection found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// sha256 of the bytes, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: usize,
    /// Contract version of its `tether:policy/evaluator` export, if any.
    pub contract: Option<String>,
    /// Its imports.
    pub imports: Vec<String>,
    /// Its exports.
    pub exports: Vec<String>,
    /// Its metadata, when it loads.
    pub metadata: Option<PolicyMetadata>,
    /// Why it does not load, when it does not.
    pub load_error: Option<String>,
}

/// Inspects a component. Fails only when the bytes are not a component at all.
pub fn inspect(rt: &Runtime, source: &str, bytes: &[u8]) -> Result<Inspection, PolicyError> {
    let component = compile(rt.engine(), source, bytes)?;
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(rt.engine()).map(|(n, _)| n.to_owned()).collect();
    let exports: Vec<String> = ty.exports(rt.engine()).map(|(n, _)| n.to_owned()).collect();
    let contract = exports.iter().find_map(|n| match split_name(n) {
        Some(("tether:policy", "evaluator", v)) => Some(v.to_owned()),
        _ => None,
    });
    let (metadata, load_error) = match rt.load(source, bytes) {
        Ok(p) => (Some(p.metadata.clone()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(Inspection {
        sha256: sha256_hex(bytes),
        size: bytes.len(),
        contract,
        imports,
        exports,
        metadata,
        load_error,
    })
}
