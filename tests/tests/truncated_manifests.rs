//! A workload manifest caught half-written, through `tetherd run` and the `tether` plugin:
//! `kubectl get vm db -o yaml > workloads/vm.yaml` empties the file first, and the file still
//! parses, as nothing or as another object; a delete-then-create (git checkout, install(1))
//! can be caught between the two. Neither may read as "the VM is gone": the VM's idle pinned
//! address survives a reconcile while the workloads directory or one of its files changed
//! within the settle period (`--workloads-settle-secs`), and is released once the directory
//! has been left alone that long.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, manifests};

/// A daemon with that settle period whose workloads hold a VM (vm.yaml) whose launcher pod
/// took a pinned address, then went away (DEL, manifest removed): the address is idle, kept
/// for the VM.
fn idle_vm_address(settle_secs: &str) -> (Daemon, String) {
    let d = Daemon::start(SEED_POOL, &["--workloads-settle-secs", settle_secs]).expect("daemon");
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

/// Reconciles until something is released or `within` has passed since `t0`; returns what
/// was released and when.
fn released_within(d: &Daemon, t0: Instant, within: Duration) -> (Vec<String>, Duration) {
    loop {
        let released = d.reconcile().expect("reconcile");
        let at = t0.elapsed();
        if !released.is_empty() || at > within {
            return (released, at);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The file's timestamp may lag the clock by a kernel tick.
const SLACK: Duration = Duration::from_millis(100);

#[test]
fn a_truncated_or_deleted_vm_manifest_keeps_the_vm_address_until_the_directory_settles() {
    // tetherd's default settle period.
    const SETTLE: Duration = Duration::from_secs(5);
    let (d, ip) = idle_vm_address("5");
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
    let kept = |what: &str| {
        assert_eq!(
            d.reconcile().expect("reconcile"),
            Vec::<String>::new(),
            "{what}: nothing released"
        );
        assert_eq!(
            d.usage("test-ippool").expect("usage").0,
            1,
            "{what}: the VM keeps {ip}"
        );
    };
    for (what, text) in cuts {
        truncate_vm(&d, text);
        kept(&format!("truncated {what}"));
        // `cp -p` and `touch -d` set an old modification time after writing: still recent.
        set_old_mtime(&d.workloads);
        kept(&format!("truncated {what}, modification time set back"));
    }
    // Deleted: maybe the first half of a delete-then-create, while the directory is recent.
    d.remove_manifest("vm").expect("vm gone");
    let t0 = Instant::now();
    kept("deleted a moment ago");
    set_old_mtime(&d.workloads);
    kept("deleted a moment ago, modification times set back");
    // The directory left alone for the settle period: the VM is deleted.
    let (released, at) = released_within(&d, t0, 4 * SETTLE);
    assert!(at + SLACK >= SETTLE, "released {at:?} after the deletion");
    assert_eq!(released, [format!("test-ippool/{ip}")], "{}", d.log());
}

/// Sets the modification time of `dir` and of the files in it an hour back, as `cp -p`,
/// `rsync -t` or `touch -d` may.
fn set_old_mtime(dir: &Path) {
    let t = SystemTime::now() - Duration::from_secs(3600);
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        std::fs::File::options()
            .write(true)
            .open(entry.path())
            .and_then(|f| f.set_modified(t))
            .expect("set file mtime");
    }
    std::fs::File::open(dir)
        .and_then(|f| f.set_modified(t))
        .expect("set directory mtime");
}

#[test]
fn a_truncated_vm_manifest_left_alone_counts_as_deleted_after_the_settle_period() {
    const SETTLE: Duration = Duration::from_secs(3);
    let (d, ip) = idle_vm_address("3");
    let t0 = Instant::now();
    truncate_vm(&d, "");
    // Within the settle period: kept (a daemon judging at once would release it here).
    assert_eq!(
        d.reconcile().expect("reconcile"),
        Vec::<String>::new(),
        "released {:?} after the truncation, within the settle period: {}",
        t0.elapsed(),
        d.log()
    );
    let (released, at) = released_within(&d, t0, Duration::from_secs(20));
    assert!(
        released.is_empty() || at + SLACK >= SETTLE,
        "released {at:?} after the truncation, before the settle period"
    );
    assert_eq!(released, [format!("test-ippool/{ip}")], "{}", d.log());
}
