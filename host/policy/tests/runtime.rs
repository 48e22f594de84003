//! The runtime against real components: the built-ins, the example custom policy, and hostile
//! fixtures that must be contained.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_builtins::{BUILTINS, builtin, fixtures};
use tether_core::samples::{deployment_request, sts_request, vm_request};
use tether_core::{Decision, IdentityKind, ReleaseCondition};
use tether_policy::{Chain, ChainEntry, LoadedPolicy, PolicyError, Runtime, RuntimeConfig};

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

fn load(rt: &Runtime, name: &str) -> Arc<LoadedPolicy> {
    let b = builtin(name).expect("builtin exists");
    rt.load(&format!("builtin:{name}"), b.wasm)
        .expect("builtin loads")
}

fn chain(rt: &Runtime, names: &[&str]) -> Chain {
    Chain::new(
        names
            .iter()
            .map(|n| ChainEntry {
                policy: load(rt, n),
                settings: vec![],
            })
            .collect(),
    )
    .expect("chain")
}

fn pinned(d: &Decision) -> &tether_core::Pinned {
    match d {
        Decision::Pinned(p) => p,
        other => panic!("expected pinned, got {other:?}"),
    }
}

#[test]
fn builtins_load_with_metadata() {
    let rt = runtime();
    for b in BUILTINS {
        let p = rt.load(b.name, b.wasm).expect("loads");
        assert_eq!(p.metadata.name, b.name);
        assert_eq!(p.contract, tether_policy::CONTRACT_VERSION);
        assert_eq!(p.sha256.len(), 64);
        assert!(!p.metadata.description.is_empty());
    }
}

#[test]
fn load_is_cached_by_digest() {
    let rt = runtime();
    let a = load(&rt, "kubevirt");
    let b = rt
        .load(
            "another-name.wasm",
            builtin("kubevirt").expect("kubevirt").wasm,
        )
        .expect("loads");
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn kubevirt_through_the_runtime() {
    let rt = runtime();
    let p = load(&rt, "kubevirt");
    let d = rt
        .evaluate(
            &p,
            &vm_request("virt-launcher-vm-cirros-abcde", false),
            &vec![],
        )
        .expect("decides");
    let pin = pinned(&d);
    assert_eq!(pin.identity, "default/vm-cirros");
    assert_eq!(pin.kind, IdentityKind::VirtualMachine);
    assert!(!pin.may_share);
    let ReleaseCondition::OwnerDeleted(k) = &pin.release[0] else {
        panic!("owner-deleted")
    };
    assert_eq!(
        (k.kind.as_str(), k.name.as_str()),
        ("VirtualMachine", "vm-cirros")
    );
    // The recreated pod (new name) and the migration target get the same identity.
    let d2 = rt
        .evaluate(
            &p,
            &vm_request("virt-launcher-vm-cirros-fghij", false),
            &vec![],
        )
        .expect("decides");
    assert_eq!(pinned(&d2).identity, pin.identity);
    let d3 = rt
        .evaluate(
            &p,
            &vm_request("virt-launcher-vm-cirros-mig01", true),
            &vec![],
        )
        .expect("decides");
    assert!(pinned(&d3).may_share);
    assert_eq!(
        rt.evaluate(&p, &deployment_request("cart-7d9f-x"), &vec![])
            .expect("decides"),
        Decision::Abstain
    );
}

#[test]
fn statefulset_through_the_runtime() {
    let rt = runtime();
    let p = load(&rt, "statefulset");
    let d = rt
        .evaluate(&p, &sts_request("web-1", false), &vec![])
        .expect("decides");
    let pin = pinned(&d);
    assert_eq!(pin.identity, "db/web-1");
    assert_eq!(pin.release.len(), 2);
    assert!(matches!(
        pin.release[1],
        ReleaseCondition::ScaledBelow { ordinal: 1, .. }
    ));
    let keep = rt
        .evaluate(&p, &sts_request("web-1", true), &vec![])
        .expect("decides");
    assert_eq!(pinned(&keep).release.len(), 1);
    let e = rt
        .evaluate(&p, &sts_request("web-one", false), &vec![])
        .expect_err("refuses");
    assert!(
        matches!(&e, PolicyError::Refused { policy, message } if policy == "statefulset" && message.contains("db/web-one")),
        "{e}"
    );
}

#[test]
fn stateless_through_the_runtime() {
    let rt = runtime();
    let p = load(&rt, "stateless");
    for req in [
        vm_request("v", false),
        sts_request("web-0", false),
        deployment_request("d"),
    ] {
        assert_eq!(
            rt.evaluate(&p, &req, &vec![]).expect("decides"),
            Decision::Ephemeral
        );
    }
}

#[test]
fn default_chain_decides_each_kind_of_pod() {
    let rt = runtime();
    let c = chain(&rt, &["kubevirt", "statefulset", "stateless"]);
    let vm = c
        .evaluate(&rt, &vm_request("virt-launcher-vm-cirros-a", false))
        .expect("vm");
    assert_eq!(vm.decided_by.as_deref(), Some("kubevirt"));
    assert_eq!(vm.steps.len(), 1);
    let sts = c.evaluate(&rt, &sts_request("web-2", false)).expect("sts");
    assert_eq!(sts.decided_by.as_deref(), Some("statefulset"));
    assert_eq!(
        sts.steps.iter().map(|s| s.decision).collect::<Vec<_>>(),
        ["abstain", "pinned"]
    );
    let dep = c
        .evaluate(&rt, &deployment_request("cart-1"))
        .expect("deployment");
    assert_eq!(dep.decision, Decision::Ephemeral);
    assert_eq!(dep.decided_by.as_deref(), Some("stateless"));
}

#[test]
fn switching_vm_pinning_off_is_leaving_kubevirt_out_of_the_chain() {
    let rt = runtime();
    let c = chain(&rt, &["statefulset", "stateless"]);
    let vm = c
        .evaluate(&rt, &vm_request("virt-launcher-vm-cirros-a", false))
        .expect("vm");
    assert_eq!(vm.decision, Decision::Ephemeral);
    let c = chain(&rt, &["kubevirt", "stateless"]);
    let sts = c.evaluate(&rt, &sts_request("web-0", false)).expect("sts");
    assert_eq!(sts.decision, Decision::Ephemeral);
}

#[test]
fn empty_chain_and_all_abstain_end_in_ephemeral() {
    let rt = runtime();
    let out = Chain::default()
        .evaluate(&rt, &deployment_request("x"))
        .expect("empty chain");
    assert_eq!(out.decision, Decision::Ephemeral);
    assert_eq!(out.decided_by, None);
    let c = chain(&rt, &["kubevirt", "statefulset"]);
    let out = c
        .evaluate(&rt, &deployment_request("x"))
        .expect("all abstain");
    assert_eq!(
        (out.decision, out.decided_by, out.steps.len()),
        (Decision::Ephemeral, None, 2)
    );
}

#[test]
fn duplicate_names_in_a_chain_are_refused() {
    let rt = runtime();
    let p = load(&rt, "stateless");
    let e = Chain::new(vec![
        ChainEntry {
            policy: p.clone(),
            settings: vec![],
        },
        ChainEntry {
            policy: p,
            settings: vec![],
        },
    ])
    .expect_err("duplicate");
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn example_custom_policy_with_settings() {
    let rt = runtime();
    let p = rt
        .load("label-identity.wasm", fixtures::LABEL_IDENTITY)
        .expect("loads");
    assert_eq!(p.metadata.name, "label-identity");
    let mut req = deployment_request("cart-7d9f-x");
    req.workload
        .labels
        .push(("ipam.tether.dev/identity".into(), "cart-primary".into()));
    let d = rt.evaluate(&p, &req, &vec![]).expect("decides");
    assert_eq!(pinned(&d).identity, "shop/cart-primary");
    assert_eq!(pinned(&d).release, vec![ReleaseCondition::Never]);
    let d = rt
        .evaluate(&p, &req, &vec![("idle-seconds".into(), "300".into())])
        .expect("decides");
    assert_eq!(
        pinned(&d).release,
        vec![ReleaseCondition::IdleForSeconds(300)]
    );
    // In a chain in front of the built-ins, it takes the labelled pods and leaves the rest.
    let c = Chain::new(vec![
        ChainEntry {
            policy: p,
            settings: vec![],
        },
        ChainEntry {
            policy: load(&rt, "statefulset"),
            settings: vec![],
        },
        ChainEntry {
            policy: load(&rt, "stateless"),
            settings: vec![],
        },
    ])
    .expect("chain");
    assert_eq!(
        c.evaluate(&rt, &req).expect("x").decided_by.as_deref(),
        Some("label-identity")
    );
    assert_eq!(
        c.evaluate(&rt, &sts_request("web-0", false))
            .expect("x")
            .decided_by
            .as_deref(),
        Some("statefulset")
    );
}

// ---- hostile policies ----

/// The deadline is wall-clock time: tests that are not about it get a generous one, so a loaded
/// CI machine cannot turn a memory or trap test into a timeout.
fn hostile_runtime_with(timeout: Duration) -> (Runtime, Arc<LoadedPolicy>) {
    let rt = Runtime::new(RuntimeConfig {
        timeout,
        memory_limit: 32 << 20,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let p = rt
        .load("hostile.wasm", fixtures::HOSTILE)
        .expect("hostile loads: it only misbehaves on request");
    (rt, p)
}

fn hostile_runtime() -> (Runtime, Arc<LoadedPolicy>) {
    hostile_runtime_with(Duration::from_secs(10))
}

fn mode(m: &str) -> Vec<(String, String)> {
    vec![("mode".into(), m.into())]
}

/// After any failure the same runtime still serves a normal evaluation.
fn still_serves(rt: &Runtime) {
    let p = load(rt, "kubevirt");
    let d = rt
        .evaluate(
            &p,
            &vm_request("virt-launcher-vm-cirros-after", false),
            &vec![],
        )
        .expect("serves");
    assert_eq!(pinned(&d).identity, "default/vm-cirros");
}

#[test]
fn endless_loop_times_out() {
    let (rt, p) = hostile_runtime_with(Duration::from_millis(50));
    let started = Instant::now();
    let e = rt
        .evaluate(&p, &deployment_request("x"), &mode("loop"))
        .expect_err("times out");
    let took = started.elapsed();
    assert!(
        matches!(&e, PolicyError::Timeout { policy, limit } if policy == "hostile" && *limit == Duration::from_millis(50)),
        "{e}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    still_serves(&rt);
}

#[test]
fn memory_hog_hits_the_limit() {
    let (rt, p) = hostile_runtime();
    let e = rt
        .evaluate(&p, &deployment_request("x"), &mode("hog"))
        .expect_err("limited");
    assert!(
        matches!(&e, PolicyError::MemoryLimit { limit, requested, .. } if *limit == 32 << 20 && *requested > *limit),
        "{e}"
    );
    still_serves(&rt);
}

/// Recursion exhausts either the wasm call stack ("call stack exhausted") or, first, the
/// guest's shadow stack in linear memory; Rust places that stack at the bottom of memory, so
/// overflowing it is an out-of-bounds access, never a silent overwrite.
#[test]
fn deep_recursion_traps_as_stack_overflow() {
    let (rt, p) = hostile_runtime();
    let e = rt
        .evaluate(&p, &deployment_request("x"), &mode("recurse"))
        .expect_err("overflows");
    assert!(
        matches!(&e, PolicyError::Trap { trap, .. }
            if trap.contains("call stack exhausted") || trap.contains("out of bounds memory access")),
        "{e}"
    );
    still_serves(&rt);
}

#[test]
fn panic_traps_with_its_message() {
    let (rt, p) = hostile_runtime();
    let e = rt
        .evaluate(&p, &deployment_request("x"), &mode("panic"))
        .expect_err("traps");
    let PolicyError::Trap { message, .. } = &e else {
        panic!("trap, got {e}")
    };
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("panics on purpose")),
        "{e}"
    );
    still_serves(&rt);
}

#[test]
fn huge_identity_is_an_invalid_decision() {
    let (rt, p) = hostile_runtime();
    let e = rt
        .evaluate(&p, &deployment_request("x"), &mode("huge-identity"))
        .expect_err("invalid");
    assert!(
        matches!(&e, PolicyError::InvalidDecision { reason, .. } if reason.contains("8388608")),
        "{e}"
    );
    still_serves(&rt);
}

#[test]
fn huge_error_is_cut() {
    let (rt, p) = hostile_runtime();
    let e = rt
        .evaluate(&p, &deployment_request("x"), &mode("huge-error"))
        .expect_err("refused");
    let PolicyError::Refused { message, .. } = &e else {
        panic!("refused, got {e}")
    };
    assert!(message.len() < 1200, "message is {} bytes", message.len());
    assert!(message.ends_with("bytes cut)"), "{message}");
}

#[test]
fn hostile_failure_in_a_chain_stops_the_chain() {
    let (rt, p) = hostile_runtime();
    let c = Chain::new(vec![
        ChainEntry {
            policy: p,
            settings: mode("panic"),
        },
        ChainEntry {
            policy: load(&rt, "stateless"),
            settings: vec![],
        },
    ])
    .expect("chain");
    let e = c
        .evaluate(&rt, &deployment_request("x"))
        .expect_err("fails");
    assert_eq!(e.policy(), Some("hostile"));
    assert_eq!(e.reason(), "trap");
}

#[test]
fn wasi_import_is_refused_at_load_naming_the_import() {
    let rt = runtime();
    let e = rt
        .load("wasi-import.wasm", fixtures::WASI_IMPORT)
        .expect_err("refused");
    assert!(
        matches!(&e, PolicyError::ForbiddenImport { import, .. } if import == "wasi:cli/environment@0.2.0"),
        "{e}"
    );
    assert!(e.to_string().contains("wasi:cli/environment@0.2.0"));
}

#[test]
fn other_contract_versions_are_refused_naming_both() {
    let rt = runtime();
    let e = rt
        .load("future.wasm", fixtures::FUTURE_CONTRACT)
        .expect_err("refused");
    assert!(
        matches!(&e, PolicyError::ContractMismatch { found, supported, .. }
            if found.contains("tether:policy/evaluator@0.2.0") && supported == "0.1.0"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("this tetherd supports tether:policy@0.1.0"),
        "{e}"
    );
    still_serves(&rt);
}

#[test]
fn truncated_and_garbage_files_are_refused() {
    let rt = runtime();
    let whole = builtin("kubevirt").expect("kubevirt").wasm;
    let e = rt
        .load("truncated.wasm", &whole[..whole.len() / 2])
        .expect_err("truncated");
    assert!(matches!(e, PolicyError::InvalidModule { .. }), "{e}");
    let e = rt
        .load("garbage.wasm", b"\0asm\x0d\0\x01\0this is not a component")
        .expect_err("garbage");
    assert!(matches!(e, PolicyError::InvalidModule { .. }), "{e}");
    still_serves(&rt);
}

#[test]
fn concurrent_evaluations_share_the_runtime() {
    let rt = Arc::new(
        Runtime::new(RuntimeConfig {
            max_concurrent: 2,
            ..RuntimeConfig::default()
        })
        .expect("runtime"),
    );
    let p = load(&rt, "kubevirt");
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (rt, p) = (rt.clone(), p.clone());
            std::thread::spawn(move || {
                for j in 0..25 {
                    let d = rt
                        .evaluate(
                            &p,
                            &vm_request(&format!("virt-launcher-vm-cirros-{i}-{j}"), false),
                            &vec![],
                        )
                        .expect("decides");
                    assert_eq!(pinned(&d).identity, "default/vm-cirros");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
}

#[test]
fn inspect_reports_imports_and_contract() {
    let rt = runtime();
    let i = tether_policy::inspect(&rt, "kubevirt.wasm", builtin("kubevirt").expect("k").wasm)
        .expect("inspects");
    assert_eq!(i.contract.as_deref(), Some("0.1.0"));
    assert!(
        i.imports.iter().all(|n| n.starts_with("tether:policy/")),
        "{:?}",
        i.imports
    );
    assert!(
        i.exports
            .contains(&"tether:policy/evaluator@0.1.0".to_owned())
    );
    assert_eq!(i.metadata.expect("loads").name, "kubevirt");
    let i = tether_policy::inspect(&rt, "wasi.wasm", fixtures::WASI_IMPORT).expect("inspects");
    assert!(i.imports.contains(&"wasi:cli/environment@0.2.0".to_owned()));
    assert!(
        i.load_error
            .expect("does not load")
            .contains("wasi:cli/environment")
    );
}
