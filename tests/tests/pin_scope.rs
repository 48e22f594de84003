//! A policy cannot pin a pod under an identity that is not the pod's: through `tetherd run`
//! and the `tether` plugin, a custom policy (the `hostile` fixture in `mode=pin`, which pins
//! every pod under the identity its settings name) claiming a running VM's identity, or
//! another namespace's, fails the ADD with code 101 and leaves the pin alone.

use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, manifests};

/// Starts tetherd with `builtin:kubevirt, hostile (mode=pin, the settings), builtin:stateless`.
fn daemon(settings: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("hostile.wasm");
    std::fs::write(&policy, tether_builtins::fixtures::HOSTILE).expect("write");
    let chain = format!("builtin:kubevirt,{},builtin:stateless", policy.display());
    let mut flags = vec!["--chain".to_owned(), chain];
    for s in std::iter::once("mode=pin").chain(settings.iter().copied()) {
        flags.push("--policy-setting".into());
        flags.push(format!("hostile:{s}"));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d = Daemon::start(SEED_POOL, &flags).expect("daemon");
    (dir, d)
}

/// The holders of the allocations of `identity`.
fn holders_of(d: &Daemon, identity: &str) -> Vec<String> {
    d.allocations()
        .expect("allocations")
        .iter()
        .filter(|a| a["owner"]["identity"] == identity)
        .flat_map(|a| a["holders"].as_array().cloned().unwrap_or_default())
        .map(|h| h["attachment"]["containerId"].to_string())
        .collect()
}

/// The reviewer's defect: the policy returned `Pinned{default/vm-cirros, VirtualMachine,
/// may_share}` for unrelated pods, which joined the running VM's address as second holders
/// (a duplicate address).
#[test]
fn a_policy_cannot_put_an_unrelated_pod_on_a_vms_address() {
    let (_dir, d) = daemon(&[
        "identity=default/vm-cirros",
        "kind=virtual-machine",
        "may-share=true",
    ]);
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    d.put_manifest("vm", &manifests::vm("vm-cirros", "vm-1"))
        .expect("vm");
    d.put_manifest("vmi", &manifests::vmi("vm-cirros", "vmi-1", "vm-1"))
        .expect("vmi");
    let launcher = Pod::new("default", "virt-launcher-vm-cirros-abcde", 1);
    d.put_manifest(
        "launcher",
        &manifests::launcher(&launcher, "vm-cirros", "vmi-1", None),
    )
    .expect("launcher");
    let vm = ipam.add(&launcher).expect("add");
    assert!(vm.ok, "the VM's own pod: {}", vm.out);

    // A pod of another namespace, unknown to the workload directory (CNI arguments only),
    // and a Deployment's pod of the VM's own namespace.
    let other = Pod::new("tenant-b", "intruder", 2);
    let cart = Pod::new("default", "cart-7d9f8b6c5-q2x8z", 3);
    d.put_manifest("cart", &manifests::deployment_pod(&cart))
        .expect("cart");
    for p in [&other, &cart] {
        let o = ipam.add(p).expect("add");
        assert!(
            !o.ok,
            "{} joined the VM's address {:?}: {}",
            p.name,
            vm.ip(),
            o.out
        );
        assert_eq!(o.code(), Some(101), "{}", o.out);
        let msg = o.out["msg"].as_str().expect("msg");
        assert!(
            msg.contains("hostile") && msg.contains("default/vm-cirros"),
            "the error names the policy and the identity: {msg}"
        );
    }
    assert_eq!(
        holders_of(&d, "default/vm-cirros").len(),
        1,
        "{:?}",
        d.allocations()
    );
    assert_eq!(d.usage("test-ippool").expect("usage").0, 1);
}

/// A custom identity stays in its namespace: `a/x` pins pods of `a`, never a pod of `b`.
#[test]
fn a_custom_identity_is_scoped_to_its_namespace() {
    let (_dir, d) = daemon(&["identity=a/x", "kind=custom"]);
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let mine = ipam.add(&Pod::new("a", "p1", 1)).expect("add");
    assert!(mine.ok, "a pod of a: {}", mine.out);
    let o = ipam.add(&Pod::new("b", "p2", 2)).expect("add");
    assert!(!o.ok, "a pod of b was pinned under a/x: {}", o.out);
    assert_eq!(o.code(), Some(101), "{}", o.out);
    let msg = o.out["msg"].as_str().expect("msg");
    assert!(msg.contains("a/x") && msg.contains("\"b/"), "{msg}");
    assert_eq!(holders_of(&d, "a/x").len(), 1);
}
