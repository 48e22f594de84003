//! Policy components. Input: the bytes of a policy file or ConfigMap value, given to
//! [`tether_policy::inspect`] as `tetherd policy inspect` does: it compiles them (refusing
//! anything that is not a component: a core module, a precompiled `.cwasm`), lists their
//! imports and exports, then runs [`Runtime::load`] as the daemon does for its chain (size
//! limit, contract export, no import beyond the contract's, `metadata` called in the sandbox).
//! Whatever loads is then evaluated once for a sample pod, under the default limits.

use std::sync::OnceLock;

use tether_core::{OwnerReference, PolicyRequest, Workload};
use tether_policy::{Runtime, RuntimeConfig, inspect};

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Runtime::new(RuntimeConfig::default()).expect("the policy runtime"))
}

fn request() -> PolicyRequest {
    PolicyRequest {
        workload: Workload {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: "u1".into(),
            labels: vec![("app".into(), "web".into())],
            owner_references: vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: "web".into(),
                uid: "s1".into(),
                controller: true,
            }],
            network: "net1".into(),
            interface: "eth0".into(),
            container_id: "c1".into(),
            ..Workload::default()
        },
        owners: Vec::new(),
    }
}

/// One input.
pub fn one(data: &[u8]) {
    let rt = runtime();
    let Ok(found) = inspect(rt, "fuzz.wasm", data) else {
        // Not a component at all: refused before anything ran.
        return;
    };
    assert_eq!(found.size, data.len());
    let foreign = found
        .imports
        .iter()
        .find(|i| !i.starts_with("tether:policy/"));
    match (&found.metadata, &found.load_error) {
        (Some(meta), None) => {
            // Loaded: no ambient authority, a contract export, a valid name.
            assert!(foreign.is_none(), "loaded with import {foreign:?}");
            assert!(
                found.contract.is_some(),
                "loaded without the contract export"
            );
            assert!(
                !meta.name.is_empty()
                    && meta.name.len() <= 63
                    && meta
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{meta:?}"
            );
            if let Ok(policy) = rt.load("fuzz.wasm", data) {
                // Any outcome but a crash or a hang is fine: the sandbox bounds it.
                let _ = rt.evaluate(&policy, &request(), &Vec::new());
            }
        }
        (None, Some(e)) => assert!(!e.is_empty()),
        other => panic!("inspect answered both or neither: {other:?}"),
    }
    // Nothing compiled stays: a long run would otherwise keep every mutant that loaded.
    rt.retain_cached(|_| false);
}
