//! `tetherd policy ...` run as a user would: the built binary, real files, JSON on stdout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn workload(name: &str) -> String {
    root()
        .join("tests/workloads")
        .join(name)
        .display()
        .to_string()
}

fn tetherd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tetherd"))
        .args(args)
        .output()
        .expect("tetherd runs")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn test_pod(pod: &str, extra: &[&str]) -> (Output, Value) {
    let (p, vm, sts) = (
        workload(pod),
        workload("vm-cirros.yaml"),
        workload("statefulset.yaml"),
    );
    let mut args = vec![
        "policy", "test", "--pod", &p, "--object", &vm, "--object", &sts,
    ];
    args.extend_from_slice(extra);
    let out = tetherd(&args);
    let v = json(&out);
    (out, v)
}

#[test]
fn default_chain_on_the_seed_workloads() {
    let (out, v) = test_pod("virt-launcher-pod.yaml", &[]);
    assert!(out.status.success());
    assert_eq!(v["decidedBy"], "kubevirt");
    assert_eq!(v["decision"]["identity"], "default/vm-cirros");
    assert_eq!(v["decision"]["mayShare"], false);
    assert_eq!(
        v["owners"],
        serde_json::json!([
            "VirtualMachineInstance/vm-cirros",
            "VirtualMachine/vm-cirros"
        ])
    );

    let (_, v) = test_pod("virt-launcher-migration-target.yaml", &[]);
    assert_eq!(v["decision"]["identity"], "default/vm-cirros");
    assert_eq!(v["decision"]["mayShare"], true);

    let (_, v) = test_pod("statefulset-pod.yaml", &[]);
    assert_eq!(v["decidedBy"], "statefulset");
    assert_eq!(v["decision"]["identity"], "default/web-1");
    assert_eq!(v["decision"]["release"][1]["scaledBelow"]["ordinal"], 1);

    let (_, v) = test_pod("deployment-pod.yaml", &[]);
    assert_eq!(v["decidedBy"], "stateless");
    assert_eq!(v["decision"]["type"], "ephemeral");
    // No stdout noise besides the JSON document, no logs on stdout.
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim_start()
            .starts_with('{')
    );
}

#[test]
fn chain_without_kubevirt_makes_vm_pods_stateless() {
    let (out, v) = test_pod(
        "virt-launcher-pod.yaml",
        &[
            "--policy",
            "builtin:statefulset",
            "--policy",
            "builtin:stateless",
        ],
    );
    assert!(out.status.success());
    assert_eq!(v["decision"]["type"], "ephemeral");
    assert_eq!(v["chain"], serde_json::json!(["statefulset", "stateless"]));
}

#[test]
fn example_policy_file_in_front_of_the_builtins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("label-identity.wasm");
    std::fs::write(&file, tether_builtins::fixtures::LABEL_IDENTITY).expect("write");
    let f = file.display().to_string();
    let (out, v) = test_pod(
        "deployment-pod.yaml",
        &["--policy", &f, "--policy", "builtin:stateless"],
    );
    assert!(out.status.success(), "{v}");
    assert_eq!(v["decidedBy"], "label-identity");
    assert_eq!(v["decision"]["identity"], "default/cart-primary");
    let (_, v) = test_pod(
        "deployment-pod.yaml",
        &[
            "--policy",
            &f,
            "--setting",
            "label=app",
            "--setting",
            "idle-seconds=30",
        ],
    );
    assert_eq!(v["decision"]["identity"], "default/cart");
    assert_eq!(v["decision"]["release"][0]["idleForSeconds"], 30);
}

#[test]
fn hostile_policy_fails_fast_with_a_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hostile.wasm");
    std::fs::write(&file, tether_builtins::fixtures::HOSTILE).expect("write");
    let f = file.display().to_string();
    let started = Instant::now();
    let (out, v) = test_pod(
        "deployment-pod.yaml",
        &[
            "--policy",
            &f,
            "--setting",
            "mode=loop",
            "--policy-timeout-ms",
            "50",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["error"]["reason"], "timeout");
    assert_eq!(v["error"]["policy"], "hostile");
}

/// `policy test` refuses, as the daemon does, a decision that pins the pod under another
/// workload's identity: here a Deployment pod under the VM's.
#[test]
fn a_claim_of_another_workloads_identity_fails_the_test() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hostile.wasm");
    std::fs::write(&file, tether_builtins::fixtures::HOSTILE).expect("write");
    let f = file.display().to_string();
    let settings = [
        "mode=pin",
        "identity=default/vm-cirros",
        "kind=virtual-machine",
        "may-share=true",
    ];
    let mut args = vec!["--policy", f.as_str()];
    for s in &settings {
        args.extend(["--setting", s]);
    }
    let (out, v) = test_pod("deployment-pod.yaml", &args);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["error"]["reason"], "foreign_identity", "{v}");
    assert_eq!(v["error"]["policy"], "hostile");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("default/vm-cirros"), "{msg}");
    // The VM's own launcher pod may claim it.
    let (out, v) = test_pod("virt-launcher-pod.yaml", &args);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["decision"]["identity"], "default/vm-cirros");
}

#[test]
fn inspect_reports_and_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tetherd(&["policy", "export", &dir.path().display().to_string()]);
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    for b in tether_builtins::BUILTINS {
        let path = dir.path().join(format!("{}.wasm", b.name));
        assert_eq!(std::fs::read(&path).expect("exported"), b.wasm);
        assert!(listing.contains(&path.display().to_string()));
        let out = tetherd(&["policy", "inspect", &path.display().to_string()]);
        assert!(out.status.success());
        let v = json(&out);
        assert_eq!(v["metadata"]["name"], b.name);
        assert_eq!(v["contract"], "0.1.0");
        assert_eq!(v["sha256"].as_str().map(str::len), Some(64));
        assert!(listing.contains(v["sha256"].as_str().expect("sha")));
    }

    let wasi = dir.path().join("wasi.wasm");
    std::fs::write(&wasi, tether_builtins::fixtures::WASI_IMPORT).expect("write");
    let out = tetherd(&["policy", "inspect", &wasi.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert!(
        v["imports"]
            .as_array()
            .expect("imports")
            .iter()
            .any(|i| i == "wasi:cli/environment@0.2.0")
    );
    assert!(
        v["loadError"]
            .as_str()
            .expect("error")
            .contains("wasi:cli/environment@0.2.0")
    );

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").expect("write");
    let out = tetherd(&["policy", "inspect", &junk.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("magic bytes"));
}

#[test]
fn bad_input_gets_actionable_errors() {
    let out = tetherd(&[
        "policy",
        "test",
        "--pod",
        &workload("deployment-pod.yaml"),
        "--policy",
        "builtin:nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown built-in policy \"nope\"")
            && err.contains("kubevirt, statefulset, stateless"),
        "{err}"
    );

    let out = tetherd(&["policy", "test", "--pod", &workload("vm-cirros.yaml")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Pod in the file"));

    let out = tetherd(&["policy", "test", "--pod", "/nonexistent/pod.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pod.yaml"));
}

/// The authoring guide's one command: build the example crate into a component that loads.
#[test]
fn policy_build_makes_a_loadable_component() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("label-identity.wasm");
    let manifest = root().join("policies/examples/label-identity/Cargo.toml");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("wasm-policies");
    let out = tetherd(&[
        "policy",
        "build",
        "--manifest-path",
        &manifest.display().to_string(),
        "--target-dir",
        &target_dir.display().to_string(),
        "-o",
        &output.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["metadata"]["name"], "label-identity");
    assert_eq!(
        v["imports"],
        serde_json::json!(["tether:policy/host@0.1.0", "tether:policy/types@0.1.0"])
    );
    assert!(output.exists());
}
