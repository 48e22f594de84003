//! Defect A, through `tetherd run` and the `tether` plugin: a workload manifest caught
//! truncated in place (`kubectl get vm db -o yaml > workloads/vm.yaml` empties the file
//! first) still parses, as nothing or as another object. It must not read as "the VM is
//! gone": the VM's idle pinned address survives a reconcile, and is released once the file
//! is deleted (a deliberate act), or once the directory has been left alone for the settle
//! period (`--workloads-settle-secs`).

use std::time::{Duration, Instant};

use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, manifests};

/// A daemon whose workloads hold a VM (vm.yaml) whose launcher pod took a pinned address,
/// then went away (DEL, manifest removed): the address is idle, kept for the VM.
fn idle_vm_address(extra: &[&str]) -> (Daemon, String) {
    let d = Daemon::start(SEED_POOL, extra).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    d.put_manifest("vm", &manifests::vm("vm-cirros", "vm-uid"))
        .expect("vm");
    d.put_manifest("vmi", &manifests::vmi("vm-cirros", "vmi-uid", "vm-uid"))
        .expect("vmi");
    let launcher = Pod::new("default", "virt-launcher-vm-cirros-abcde", 1);
    d.put_manifest(
        "pod",
        &manifests::launcher(&launcher, "vm-cirros", "vmi-uid", None),
    )
    .expect("pod");
    let out = ipam.add(&launcher).expect("add");
    assert!(out.ok, "{}", out.out);
    let ip = out.ip().expect("vm ip");
    assert!(ipam.del(&launcher).expect("del").ok);
    d.remove_manifest("pod").expect("pod gone");
    d.remove_manifest("vmi").expect("vmi gone");
    (d, ip)
}

/// Writes vm.yaml in place (truncate, then write), as a shell redirection does.
fn truncate_vm(d: &Daemon, text: &str) {
    std::fs::write(d.workloads.join("vm.yaml"), text).expect("write vm.yaml in place");
}

#[test]
fn a_truncated_vm_manifest_keeps_the_vm_address_until_the_file_is_deleted() {
    // A settle period far longer than the test: only the deletion may release.
    let (d, ip) = idle_vm_address(&["--workloads-settle-secs", "600"]);
    let cuts = [
        ("to 0 bytes", ""),
        (
            "inside metadata",
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm-cir",
        ),
        (
            "before namespace",
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm-cirros\n",
        ),
    ];
    for (what, text) in cuts {
        truncate_vm(&d, text);
        assert_eq!(
            d.reconcile().expect("reconcile"),
            Vec::<String>::new(),
            "truncated {what}: nothing released"
        );
        assert_eq!(
            d.usage("test-ippool").expect("usage").0,
            1,
            "truncated {what}: the VM keeps {ip}"
        );
    }
    // Deleting the file is deliberate: released at once.
    d.remove_manifest("vm").expect("vm gone");
    assert_eq!(
        d.reconcile().expect("reconcile"),
        [format!("test-ippool/{ip}")],
        "{}",
        d.log()
    );
}

#[test]
fn a_truncated_vm_manifest_left_alone_counts_as_deleted_after_the_settle_period() {
    let (d, ip) = idle_vm_address(&["--workloads-settle-secs", "1"]);
    truncate_vm(&d, "");
    let deadline = Instant::now() + Duration::from_secs(20);
    let released = loop {
        let released = d.reconcile().expect("reconcile");
        if !released.is_empty() || Instant::now() > deadline {
            break released;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(released, [format!("test-ippool/{ip}")], "{}", d.log());
}
