//! The review's defects, reproduced through `tetherd run` and the `tether` plugin as they
//! were found (issue 7). Each of these failed on the daemon before its fix.

use std::time::Duration;

use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, bin_dir, manifests};

/// `tetherd CMD --socket S`: (stdout, stderr).
fn tetherd(d: &Daemon, cmd: &str) -> (String, String) {
    let out = std::process::Command::new(bin_dir().expect("bins").join("tetherd"))
        .args([cmd, "--socket"])
        .arg(&d.socket)
        .output()
        .expect("tetherd");
    assert!(out.status.success(), "tetherd {cmd}: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const OVERLAPPING: &str = r#"apiVersion: ipam.tether.dev/v1alpha1
kind: IPPool
metadata: {name: a}
spec: {subnet: 10.9.0.0/24, ips: ["10.9.0.10"]}
---
apiVersion: ipam.tether.dev/v1alpha1
kind: IPPool
metadata: {name: b}
spec: {subnet: 10.9.0.0/24, ips: ["10.9.0.10-10.9.0.11"]}
"#;

/// Defect 1: pools `a` = .10 and `b` = .10-.11 gave both pods .10. Now the daemon refuses to
/// start on them, naming both pools and the overlap.
#[test]
fn overlapping_pools_stop_start_up_naming_both() {
    let err = match Daemon::start(OVERLAPPING, &[]) {
        Ok(d) => {
            // Started anyway: show what it does with them.
            let a = Ipam::new(&d.socket, "net", "1.0.0", &["a"]).expect("ipam");
            let b = Ipam::new(&d.socket, "net", "1.0.0", &["b"]).expect("ipam");
            let ip_a = a.add(&Pod::new("default", "pa", 1)).expect("add").ip();
            let ip_b = b.add(&Pod::new("default", "pb", 2)).expect("add").ip();
            panic!(
                "tetherd started on overlapping pools: pod in a got {ip_a:?}, pod in b got {ip_b:?}"
            );
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("pools a and b overlap at 10.9.0.10-10.9.0.10"),
        "the refusal names both pools and the overlap: {err}"
    );
}

/// Defect 1, at reload: an edit that makes two pools overlap is refused and the pools in
/// force keep serving.
#[test]
fn overlapping_pools_are_refused_at_reload() {
    let d = Daemon::start(SEED_POOL, &["--pools-watch-interval-secs", "0"]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let first = ipam.add(&Pod::new("default", "p1", 1)).expect("add");
    assert!(first.ok, "{}", first.out);
    let overlapping = format!(
        "{SEED_POOL}---\napiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {{name: twin}}\nspec: {{subnet: 10.6.0.0/16, ips: [\"10.6.168.105-10.6.168.120\"]}}\n"
    );
    std::fs::write(d.dir.path().join("pools.yaml"), overlapping).expect("write pools");
    d.signal("HUP").expect("SIGHUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.log().contains("pools not reloaded") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = d.log();
    assert!(
        log.contains("pools test-ippool and twin overlap at 10.6.168.105-10.6.168.110"),
        "reload refused naming both: {log}"
    );
    let pools: tether_api::PoolList = d.client().get("/v1/pools").expect("pools");
    let names: Vec<&str> = pools.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["test-ippool"], "the pools in force stay");
    let second = ipam.add(&Pod::new("default", "p2", 2)).expect("add");
    assert!(second.ok, "still serving: {}", second.out);
    // `tetherd pools` says the files were refused, not only the log.
    let (_, notes) = tetherd(&d, "pools");
    assert!(
        notes.contains("refused at the last reload") && notes.contains("twin"),
        "{notes}"
    );
}

/// Defect 2: a pool renamed in its file (same range) handed out an address still held under
/// the old name.
#[test]
fn renamed_pool_never_hands_out_an_address_held_under_the_old_name() {
    let small = |name: &str| {
        format!(
            "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{subnet: 10.9.0.0/24, ips: [\"10.9.0.10-10.9.0.11\"]}}\n"
        )
    };
    let d = Daemon::start(&small("old"), &["--pools-watch-interval-secs", "0"]).expect("daemon");
    let old = Ipam::new(&d.socket, "net", "1.0.0", &["old"]).expect("ipam");
    let held = old.add(&Pod::new("default", "p1", 1)).expect("add");
    assert!(held.ok, "{}", held.out);
    std::fs::write(d.dir.path().join("pools.yaml"), small("new")).expect("rename");
    d.signal("HUP").expect("SIGHUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.usage("new").is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        d.usage("new").expect("renamed pool").0,
        1,
        "the held address counts as allocated"
    );
    let new = Ipam::new(&d.socket, "net", "1.0.0", &["new"]).expect("ipam");
    let p2 = new.add(&Pod::new("default", "p2", 2)).expect("add");
    assert!(p2.ok, "{}", p2.out);
    assert_ne!(
        p2.ip(),
        held.ip(),
        "the renamed pool handed out a held address"
    );
    // The pool is now full: the third pod is refused rather than given the held address.
    let p3 = new.add(&Pod::new("default", "p3", 3)).expect("add");
    assert!(!p3.ok, "pool of two gave a third address: {}", p3.out);
    assert!(
        d.log().contains("stays reserved in pool new"),
        "{}",
        d.log()
    );
    // `tetherd pools` and `tetherd allocations` say so too.
    let held = format!("old/{}", held.ip().expect("ip"));
    for cmd in ["pools", "allocations"] {
        let (_, notes) = tetherd(&d, cmd);
        assert!(
            notes.contains(&format!("{held} is held under a pool no longer in force"))
                && notes.contains("reserved in pool new"),
            "tetherd {cmd}: {notes}"
        );
    }
}

/// Defect 6: a VM manifest that does not parse (half-written during an update) read as "VM
/// deleted", so a reconcile released the VM's address. Now nothing is judged gone while any
/// manifest is unreadable.
#[test]
fn unreadable_manifest_never_releases_a_vm_address() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
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
    let vm_ip = ipam.add(&launcher).expect("add").ip().expect("vm ip");
    assert!(ipam.del(&launcher).expect("del").ok);
    d.remove_manifest("pod").expect("pod gone");
    // The VM's file is caught half-written.
    d.put_manifest(
        "vm",
        "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: vm-cir",
    )
    .expect("half-written vm");
    assert_eq!(
        d.reconcile().expect("reconcile"),
        Vec::<String>::new(),
        "nothing released"
    );
    assert_eq!(
        d.usage("test-ippool").expect("usage").0,
        1,
        "the VM keeps its address"
    );
    // Another launcher of the VM while the old holder's manifest situation is unknown is not
    // the point here; the VM coming back gets its address.
    d.put_manifest("vm", &manifests::vm("vm-cirros", "vm-uid"))
        .expect("vm fixed");
    let again = Pod::new("default", "virt-launcher-vm-cirros-fghij", 2);
    d.put_manifest(
        "pod",
        &manifests::launcher(&again, "vm-cirros", "vmi-uid", None),
    )
    .expect("pod");
    assert_eq!(ipam.add(&again).expect("add").ip(), Some(vm_ip.clone()));
    // Deleting the VM (every manifest readable) does release it once no pod holds it.
    assert!(ipam.del(&again).expect("del").ok);
    d.remove_manifest("pod").expect("pod gone");
    d.remove_manifest("vmi").expect("vmi gone");
    d.remove_manifest("vm").expect("vm gone");
    let released = d.reconcile().expect("reconcile");
    assert_eq!(released, [format!("test-ippool/{vm_ip}")]);
}

/// Defect 6, takeover: while the manifest of the pod holding a VM's address cannot be read,
/// a second launcher pod of the VM must not take the address over.
#[test]
fn unknown_holder_is_not_taken_over() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    d.put_manifest("vm", &manifests::vm("vm-cirros", "vm-uid"))
        .expect("vm");
    d.put_manifest("vmi", &manifests::vmi("vm-cirros", "vmi-uid", "vm-uid"))
        .expect("vmi");
    let first = Pod::new("default", "virt-launcher-vm-cirros-abcde", 1);
    d.put_manifest(
        "pod-a",
        &manifests::launcher(&first, "vm-cirros", "vmi-uid", None),
    )
    .expect("pod");
    assert!(ipam.add(&first).expect("add").ok);
    // The first pod's manifest is caught half-written; a second launcher asks.
    d.put_manifest(
        "pod-a",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: virt-launcher-vm",
    )
    .expect("half-written pod");
    let second = Pod::new("default", "virt-launcher-vm-cirros-fghij", 2);
    d.put_manifest(
        "pod-b",
        &manifests::launcher(&second, "vm-cirros", "vmi-uid", None),
    )
    .expect("pod");
    let out = ipam.add(&second).expect("add");
    assert!(
        !out.ok,
        "took over from a holder that may be live: {}",
        out.out
    );
    assert_eq!(out.code(), Some(11), "try again later: {}", out.out);
    // Once the manifests say the first pod is gone, the second takes over.
    d.remove_manifest("pod-a").expect("pod-a gone");
    let out = ipam.add(&second).expect("add");
    assert!(out.ok, "{}", out.out);
}

fn request(container: &str, network: &str) -> tether_api::CniRequest {
    tether_api::CniRequest {
        container_id: container.into(),
        ifname: "eth0".into(),
        network: network.into(),
        cni_version: "1.1.0".into(),
        pools: vec!["test-ippool".into()],
        ..Default::default()
    }
}

/// Defect 4, daemon side: a GC request without the valid-attachments list (from any client,
/// not only the plugin) frees nothing and says why.
#[test]
fn gc_without_the_list_frees_nothing_at_the_daemon() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let c = d.client();
    let _: tether_api::CniResult = c.post("/v1/cni/add", &request("c1", "net")).expect("add");
    let err = c
        .post::<_, tether_api::GcResult>("/v1/cni/gc", &request("", "net"))
        .expect_err("refused");
    assert!(
        err.to_string().contains("cni.dev/valid-attachments"),
        "{err}"
    );
    assert_eq!(d.usage("test-ippool").expect("usage").0, 1, "nothing freed");
    let mut empty = request("", "net");
    empty.valid_attachments = Some(vec![]);
    let r: tether_api::GcResult = c.post("/v1/cni/gc", &empty).expect("gc");
    assert_eq!(
        r.released.len(),
        1,
        "an explicit empty list frees the network"
    );
}

/// CHECK verifies prevResult: the addresses it lists must be the ones the attachment holds.
#[test]
fn check_verifies_prev_result_against_the_state() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let c = d.client();
    let added: tether_api::CniResult = c.post("/v1/cni/add", &request("c1", "net")).expect("add");
    let address = added.ips[0].address.clone();
    let mut check = request("c1", "net");
    check.prev_ips = vec![address.clone()];
    let _: serde_json::Value = c
        .post("/v1/cni/check", &check)
        .expect("matching prevResult");
    check.prev_ips = vec!["10.6.168.109/16".into()];
    let err = c
        .post::<_, serde_json::Value>("/v1/cni/check", &check)
        .expect_err("a prevResult with another address fails CHECK");
    let msg = err.to_string();
    assert!(
        msg.contains("105") || msg.contains("prevResult lists"),
        "{msg}"
    );
    assert!(msg.contains(&address), "names what it holds: {msg}");
    check.prev_ips = vec![address, "10.6.168.110/16".into()];
    assert!(
        c.post::<_, serde_json::Value>("/v1/cni/check", &check)
            .is_err(),
        "an extra address in prevResult fails CHECK"
    );
}

/// A caller that gives up (the plugin killed on the runtime's timeout) gets nothing: tetherd
/// runs under strace with every fsync delayed by 1.5 s, the caller closes its connection
/// 300 ms into its ADD, and the ADD is rolled back rather than left allocated.
#[test]
fn an_add_whose_caller_gave_up_is_rolled_back() {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    let test = "an_add_whose_caller_gave_up_is_rolled_back";
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        tether_e2e::skip_or_fail(
            test,
            "strace is not installed (scripts/setup.sh installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, SEED_POOL).expect("pools");
    let socket = dir.path().join("t.sock");
    let log = std::fs::File::create(dir.path().join("log")).expect("log");
    let mut child = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=fsync,fdatasync",
        ])
        .args(["-e", "inject=fsync,fdatasync:delay_enter=1500000"])
        .arg(bin_dir().expect("bins").join("tetherd"))
        .arg("run")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--pools")
        .arg(&pools)
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "info", "--chain", "builtin:stateless"])
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("strace tetherd");
    // Killing strace alone would leave tetherd running detached: kill the process group.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = tether_e2e::send_signal(self.0.id(), "KILL", true);
            let _ = self.0.wait();
        }
    }
    let client = tether_api::client::Client::new(&socket, Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.get::<serde_json::Value>("/readyz").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "tetherd did not start"
        );
        assert!(child.try_wait().expect("wait").is_none(), "tetherd exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _guard = Kill(child);
    let body = serde_json::to_vec(&request("gives-up", "net")).expect("json");
    let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    write!(
        s,
        "POST /v1/cni/add HTTP/1.1\r\nHost: tetherd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("head");
    s.write_all(&body).expect("body");
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    // The commit (1.5 s) and the rollback's (1.5 s) finish; then nothing is allocated.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (allocations, log) = loop {
        std::thread::sleep(Duration::from_millis(200));
        let a: Vec<serde_json::Value> = client.get("/v1/allocations").expect("allocations");
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        let settled = log.contains("ADD abandoned by its caller") && a.is_empty();
        if settled || std::time::Instant::now() > deadline {
            break (a, log);
        }
    };
    assert!(
        allocations.is_empty(),
        "the abandoned ADD stayed allocated: {allocations:?}\n{log}"
    );
    assert!(log.contains("ADD abandoned by its caller"), "{log}");
    // A caller that waits gets its address (the pool was given back).
    let ok: tether_api::CniResult = client
        .post("/v1/cni/add", &request("stays", "net"))
        .expect("add");
    assert_eq!(ok.ips.len(), 1);
}
