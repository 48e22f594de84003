//! The daemon as an operator sees it: a failing policy changes no state, `tetherd pools`,
//! metrics, readiness, graceful shutdown with state kept, and the periodic release of pinned
//! addresses when a StatefulSet is scaled down or deleted.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, bin_dir, manifests};

#[test]
fn failing_policy_fails_the_call_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("hostile.wasm");
    std::fs::write(&policy, tether_builtins::fixtures::HOSTILE).expect("write");
    let chain = format!("{},builtin:stateless", policy.display());
    let d = Daemon::start(
        SEED_POOL,
        &["--chain", &chain, "--policy-setting", "hostile:mode=panic"],
    )
    .expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let o = ipam.add(&Pod::new("default", "p", 1)).expect("add");
    assert_eq!(o.code(), Some(101), "{}", o.out);
    let msg = o.out["msg"].as_str().expect("msg");
    assert!(
        msg.contains("hostile") && msg.contains("panics on purpose"),
        "{msg}"
    );
    assert_eq!(
        d.usage("test-ippool").expect("usage").0,
        0,
        "nothing was allocated"
    );
    assert!(d.allocations().expect("allocations").is_empty());
    let metrics = d.client().get_text("/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"tether_cni_requests_total{command="add",result="policy"} 1"#),
        "{metrics}"
    );
}

#[test]
fn pools_table_metrics_and_restart() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    for i in 0..3 {
        assert!(
            ipam.add(&Pod::new("default", &format!("p{i}"), i))
                .expect("add")
                .ok
        );
    }
    let out = Command::new(bin_dir().expect("bins").join("tetherd"))
        .args(["pools", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("tetherd pools");
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "DEFAULT"
        ]
    );
    let row: Vec<&str> = lines.next().expect("row").split_whitespace().collect();
    assert_eq!(row, ["test-ippool", "10.6.0.0/16", "3", "10", "false"]);

    let metrics = d.client().get_text("/metrics").expect("metrics");
    for needle in [
        r#"tether_cni_requests_total{command="add",result="ok"} 3"#,
        r#"tether_pool_addresses_total{pool="test-ippool"} 10"#,
        r#"tether_pool_addresses_allocated{pool="test-ippool"} 3"#,
        r#"tether_policy_evaluation_seconds_count{policy="stateless"} 3"#,
        "tether_store_commit_seconds_count",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    // SIGTERM: a clean stop, the socket removed, the state kept for the next start.
    let socket = d.socket.clone();
    let dir = d.stop().expect("stops on SIGTERM");
    assert!(!socket.exists(), "socket removed on shutdown");
    let d = Daemon::start_in(dir, SEED_POOL, &[]).expect("restart");
    assert_eq!(d.usage("test-ippool").expect("usage").0, 3);
    assert!(d.log().contains("ready, listening on"));
}

#[test]
fn bad_pools_stop_start_up_with_a_clear_message() {
    let bad = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p}\nspec: {subnet: 10.0.0.0/24, ips: [10.0.1.1]}\n";
    let e = Daemon::start(bad, &[]).err().expect("refused").to_string();
    assert!(
        e.contains("ips 10.0.1.1 is outside subnet 10.0.0.0/24"),
        "{e}"
    );
}

/// Polls `look` every 100 ms until `done` holds of what it returns, or 15 s pass; returns the
/// last look (the caller asserts on it, so a timeout shows what was seen).
fn poll<T>(look: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = look();
        if done(&got) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether each StatefulSet pod's identity holds a pinned address, once it matches `want` (or
/// after the timeout).
fn wait_pins(d: &Daemon, want: &[(&str, bool)]) -> Vec<(String, bool)> {
    let look = || {
        let allocs = d.allocations().expect("allocations");
        want.iter()
            .map(|(pod, _)| {
                let identity = format!("default/{pod}");
                let held = allocs
                    .iter()
                    .any(|a| a["owner"]["identity"] == identity.as_str());
                ((*pod).to_owned(), held)
            })
            .collect::<Vec<_>>()
    };
    poll(look, |got| {
        got.iter().zip(want).all(|((_, g), (_, w))| g == w)
    })
}

#[test]
fn statefulset_scaled_down_then_deleted_releases_its_pins() {
    // The periodic reconcile (every second here) applies the release rules without being asked.
    let d = Daemon::start(SEED_POOL, &["--reconcile-interval-secs", "1"]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    d.put_manifest("sts", &manifests::statefulset("db", 3))
        .expect("sts");
    let mut pods = Vec::new();
    let mut ips = Vec::new();
    for i in 0..3u32 {
        let p = Pod::new("default", &format!("db-{i}"), 10 + i);
        d.put_manifest(&p.name, &manifests::sts_pod(&p, "db"))
            .expect("pod");
        let o = ipam.add(&p).expect("add");
        assert!(o.ok, "{}", o.out);
        ips.push(o.ip().expect("ip"));
        pods.push(p);
    }
    assert_eq!(d.usage("test-ippool").expect("usage").0, 3);

    // Scale 3 -> 1: the controller deletes db-2, then db-1 (their DELs keep the pins), and the
    // StatefulSet now says replicas: 1. Their addresses are released; db-0 keeps its own.
    d.put_manifest("sts", &manifests::statefulset("db", 1))
        .expect("scale");
    for p in pods[1..].iter().rev() {
        assert!(ipam.del(p).expect("del").ok);
        d.remove_manifest(&p.name).expect("pod gone");
    }
    let got = wait_pins(&d, &[("db-0", true), ("db-1", false), ("db-2", false)]);
    assert_eq!(
        got,
        [
            ("db-0".into(), true),
            ("db-1".into(), false),
            ("db-2".into(), false)
        ],
        "only the replicas above the new scale lose their pins: {}",
        d.log()
    );
    assert_eq!(d.usage("test-ippool").expect("usage").0, 1);

    // A replica still running keeps its pin even when its ordinal is above the scale (the
    // address is released only once no pod holds it).
    d.put_manifest("sts", &manifests::statefulset("db", 0))
        .expect("scale to 0");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(wait_pins(&d, &[("db-0", true)]), [("db-0".into(), true)]);
    assert!(ipam.del(&pods[0]).expect("del db-0").ok);

    // Deleting the StatefulSet releases what is left.
    d.remove_manifest("sts").expect("delete sts");
    assert_eq!(
        wait_pins(&d, &[("db-0", false)]),
        [("db-0".into(), false)],
        "{}",
        d.log()
    );
    assert_eq!(d.usage("test-ippool").expect("usage").0, 0);
    assert!(
        d.log().contains("released pinned addresses"),
        "the release is logged"
    );
}

/// `(name, allocated, total)` of every pool, once `ok` holds of them (or after the timeout).
fn wait_pools(d: &Daemon, ok: impl Fn(&[(String, u64, u64)]) -> bool) -> Vec<(String, u64, u64)> {
    let look = || {
        let list: tether_api::PoolList = d.client().get("/v1/pools").expect("pools");
        list.pools
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.allocated.parse().expect("allocated"),
                    p.total.parse().expect("total"),
                )
            })
            .collect::<Vec<_>>()
    };
    poll(look, |got| ok(got))
}

#[test]
fn pools_reload_when_their_file_changes_and_keep_allocations() {
    let d = Daemon::start(SEED_POOL, &["--pools-watch-interval-secs", "1"]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let first = ipam.add(&Pod::new("default", "p0", 0)).expect("add");
    assert!(first.ok, "{}", first.out);
    let pools_file = d.dir.path().join("pools.yaml");

    // Grow test-ippool and add a pool: both in force without a restart, the allocation kept.
    let grown = format!(
        "{}---\n{}",
        SEED_POOL.replace("10.6.168.110", "10.6.168.120"),
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: extra}\nspec: {subnet: 10.7.0.0/24}\n"
    );
    assert_ne!(grown, SEED_POOL, "the seed pool's range end changed");
    std::fs::write(&pools_file, &grown).expect("write pools");
    let got = wait_pools(&d, |p| p.len() == 2);
    assert_eq!(
        got,
        [("extra".into(), 0, 254), ("test-ippool".into(), 1, 20)],
        "{}",
        d.log()
    );
    let extra = Ipam::new(&d.socket, "net2", "1.0.0", &["extra"]).expect("ipam");
    let o = extra
        .add(&Pod::new("default", "p1", 1))
        .expect("add from the new pool");
    assert!(
        o.ok && o.ip().expect("ip").starts_with("10.7.0."),
        "{}",
        o.out
    );
    assert!(d.log().contains("pools reloaded"), "{}", d.log());

    // A broken file is refused: the pools in force stay, and the error is logged.
    std::fs::write(&pools_file, "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: x}\nspec: {subnet: nonsense}\n").expect("write");
    let log = poll(|| d.log(), |l| l.contains("pools not reloaded"));
    assert!(log.contains("pools not reloaded"), "{log}");
    assert_eq!(wait_pools(&d, |_| true).len(), 2, "the previous pools stay");
    let metrics = d.client().get_text("/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"tether_pool_reloads_total{result="error"} 1"#),
        "{metrics}"
    );

    // Removing a pool that still has an allocation keeps the allocation (an orphan, logged).
    std::fs::write(&pools_file, SEED_POOL).expect("write");
    let got = wait_pools(&d, |p| p.len() == 1);
    assert_eq!(got, [("test-ippool".into(), 1, 10)], "{}", d.log());
    assert!(
        d.allocations()
            .expect("allocations")
            .iter()
            .any(|a| a["pool"] == "extra"),
        "the extra pool's allocation is kept"
    );
    assert!(
        d.log()
            .contains("allocation outside every current pool is kept")
    );
    let metrics = d.client().get_text("/metrics").expect("metrics");
    assert!(
        !metrics.contains(r#"pool="extra""#),
        "a removed pool's gauges go: {metrics}"
    );
}

#[test]
fn sighup_reloads_pools_when_watching_is_off() {
    let d = Daemon::start(SEED_POOL, &["--pools-watch-interval-secs", "0"]).expect("daemon");
    let grown = SEED_POOL.replace("10.6.168.110", "10.6.168.120");
    std::fs::write(d.dir.path().join("pools.yaml"), grown).expect("write pools");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        wait_pools(&d, |_| true),
        [("test-ippool".into(), 0, 10)],
        "no watching: nothing changes by itself"
    );
    d.signal("HUP").expect("SIGHUP");
    assert_eq!(
        wait_pools(&d, |p| p.first().is_some_and(|p| p.2 == 20)),
        [("test-ippool".into(), 0, 20)],
        "{}",
        d.log()
    );
}

#[test]
fn release_by_hand_frees_a_pin_no_rule_can_release() {
    // A VM's pin stays while its VirtualMachine exists (and, without --workloads, forever:
    // the owner-deleted rule cannot be judged). The operator can release it by hand.
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
    let web = Pod::new("default", "web", 2);
    let web_ip = ipam.add(&web).expect("add").ip().expect("web ip");

    let release = |address: &str, force: bool| {
        let mut cmd = Command::new(bin_dir().expect("bins").join("tetherd"));
        cmd.args(["release", address, "--socket"]).arg(&d.socket);
        if force {
            cmd.arg("--force");
        }
        cmd.output().expect("tetherd release")
    };

    // `tetherd allocations` shows who holds what, with the POOL/IP that `release` takes.
    let out = Command::new(bin_dir().expect("bins").join("tetherd"))
        .args(["allocations", "--pool", "test-ippool", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("tetherd allocations");
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["ADDRESS", "NETWORK", "OWNER", "IDENTITY", "HELD-BY"],
            vec![
                &format!("test-ippool/{vm_ip}"),
                "net",
                "pinned",
                "default/vm-cirros",
                "default/virt-launcher-vm-cirros-abcde",
                "(eth0)"
            ],
            vec![
                &format!("test-ippool/{web_ip}"),
                "net",
                "ephemeral",
                "-",
                "default/web",
                "(eth0)"
            ],
        ],
        "{table}"
    );

    // Held by a running pod: refused, saying by whom and what to do.
    let o = release(&format!("test-ippool/{vm_ip}"), false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("virt-launcher-vm-cirros-abcde") && err.contains("force"),
        "{err}"
    );

    // The VM's pod is gone: its pin stays (the VM still exists), then is released by hand.
    assert!(ipam.del(&launcher).expect("del").ok);
    assert!(d.reconcile().expect("reconcile").is_empty());
    let o = release(&format!("test-ippool/{vm_ip}"), false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("released test-ippool/{vm_ip}")
    );

    // A pod gone for good without its DEL: --force frees its address.
    let o = release(&format!("test-ippool/{web_ip}"), true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.usage("test-ippool").expect("usage").0, 0);

    // Mistakes get a clear message.
    let o = release(&format!("test-ippool/{web_ip}"), false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is not allocated"),
        "{err}"
    );
    let o = release("10.6.168.101", false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is not POOL/IP"), "{err}");
    assert!(
        d.log().contains("released by hand"),
        "the release is logged"
    );
}

#[test]
fn pools_reloaded_under_load_never_hand_out_an_address_twice() {
    // Pool "load" flips between 10.8.0.10-10.8.0.59 and 10.8.0.10-10.8.0.39 every 50 ms while
    // 8 callers ADD and DEL: shrinking strands allocations outside the pool (orphans), growing
    // brings them back, and a narrow pool may be exhausted. No address may ever be handed to a
    // pod while another pod holds it, and DEL must free everything in the end.
    let wide = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: load}\nspec: {subnet: 10.8.0.0/24, ips: [10.8.0.10-10.8.0.59]}\n";
    let narrow = wide.replace("10.8.0.59", "10.8.0.39");
    let d = Daemon::start(wide, &["--pools-watch-interval-secs", "1"]).expect("daemon");
    let pools_file = d.dir.path().join("pools.yaml");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["load"]).expect("ipam");
    // The addresses held right now, by whom: shared by every caller. An ADD's address goes in
    // once it is answered, and comes out before its DEL is sent, so a correct daemon never
    // answers an address that is in it.
    let held: Mutex<HashMap<String, String>> = Mutex::new(HashMap::new());
    let hand_out = |ip: String, pod: &Pod| {
        let other = held
            .lock()
            .expect("lock")
            .insert(ip.clone(), pod.name.clone());
        assert!(
            other.is_none(),
            "{ip} handed out twice: answered to {} while {} holds it",
            pod.name,
            other.unwrap_or_default()
        );
    };
    // 35 long-lived pods hold 10.8.0.10-44: every narrow reload strands 40-44.
    let long_lived: Vec<Pod> = (0..35u32)
        .map(|i| Pod::new("default", &format!("long-{i}"), 500 + i))
        .collect();
    for p in &long_lived {
        let o = ipam.add(p).expect("add");
        assert!(o.ok, "{}", o.out);
        hand_out(o.ip().expect("ip"), p);
    }
    let stop = AtomicBool::new(false);
    let flips = AtomicUsize::new(0);
    let added = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut flip = false;
            while !stop.load(Ordering::Relaxed) {
                std::fs::write(&pools_file, if flip { &narrow } else { wide }).expect("write");
                d.signal("HUP").expect("SIGHUP");
                flips.fetch_add(1, Ordering::Relaxed);
                flip = !flip;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let callers: Vec<_> = (0..8u32)
            .map(|t| {
                let (ipam, held, hand_out, flips, added) =
                    (&ipam, &held, &hand_out, &flips, &added);
                s.spawn(move || {
                    // At least 12 rounds each, and until the pool has flipped 8 times.
                    let mut i = 0u32;
                    while i < 12 || flips.load(Ordering::Relaxed) < 8 {
                        i += 1;
                        let pod = Pod::new("default", &format!("p{t}-{i}"), 10_000 * (t + 1) + i);
                        let o = ipam.add(&pod).expect("add");
                        // Exhaustion while the pool is narrow is allowed; anything else is not.
                        assert!(o.ok || o.code() == Some(100), "{}", o.out);
                        let ip = o.ip();
                        if let Some(ip) = &ip {
                            hand_out(ip.clone(), &pod);
                            added.fetch_add(1, Ordering::Relaxed);
                            held.lock().expect("lock").remove(ip);
                        }
                        assert!(ipam.del(&pod).expect("del").ok);
                    }
                })
            })
            .collect();
        // Stop the flipper before reporting a caller's failure: the scope waits for it.
        let ended: Vec<_> = callers.into_iter().map(|c| c.join()).collect();
        stop.store(true, Ordering::Relaxed);
        for e in ended {
            if let Err(panic) = e {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let log = d.log();
    let reloads = log.matches("pools reloaded").count();
    let orphaned = log
        .matches("allocation outside every current pool is kept")
        .count();
    assert!(
        orphaned >= 1,
        "allocations were stranded by a narrow reload"
    );
    assert!(
        reloads >= 6,
        "the pools were reloaded under load ({reloads} times)"
    );
    assert!(
        added.load(Ordering::Relaxed) > 0,
        "the callers got addresses"
    );
    // What the daemon holds is what the long-lived pods were answered.
    let mut allocated: Vec<String> = d
        .allocations()
        .expect("allocations")
        .iter()
        .filter_map(|a| a["ip"].as_str().map(str::to_owned))
        .collect();
    let mut expected: Vec<String> = held.lock().expect("lock").keys().cloned().collect();
    allocated.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        allocated, expected,
        "only the long-lived pods hold addresses"
    );
    for p in &long_lived {
        assert!(ipam.del(p).expect("del").ok);
    }
    assert!(
        d.allocations().expect("allocations").is_empty(),
        "every DEL freed its address, orphans included"
    );
}

/// Standalone, a pool's nodeSelector is matched against `--node-labels` and its
/// namespaceSelector against the Namespace manifests in --workloads: a pod named into a pool
/// that may not serve it gets code 102 saying which selector did not match.
#[test]
fn pool_selectors_standalone() {
    let pools = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: zoned}\nspec: {subnet: 10.9.0.0/24, nodeSelector: {matchLabels: {zone: b}}}\n---\napiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: tenants}\nspec: {subnet: 10.10.0.0/24, namespaceSelector: {matchLabels: {tenant: blue}}}\n";
    let d = Daemon::start(
        pools,
        &["--node-name", "n1", "--node-labels", "zone=a,rack=1"],
    )
    .expect("daemon");
    d.put_manifest(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: blue, labels: {tenant: blue}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: red, labels: {tenant: red}}\n",
    )
    .expect("namespaces");
    let zoned = Ipam::new(&d.socket, "net", "1.0.0", &["zoned"]).expect("ipam");
    let o = zoned.add(&Pod::new("blue", "p", 1)).expect("add");
    assert_eq!(o.code(), Some(102), "{}", o.out);
    assert!(
        o.out["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("nodeSelector (zone=b) does not match node \"n1\""),
        "{}",
        o.out
    );
    let tenants = Ipam::new(&d.socket, "net", "1.0.0", &["tenants"]).expect("ipam");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok = loop {
        // The manifests are read when they change: wait for them.
        let o = tenants.add(&Pod::new("blue", "p", 1)).expect("add");
        if o.ok || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        ok.ip().is_some_and(|ip| ip.starts_with("10.10.0.")),
        "{}",
        ok.out
    );
    for ns in ["red", "elsewhere"] {
        let o = tenants.add(&Pod::new(ns, "q", 2)).expect("add");
        assert_eq!(o.code(), Some(102), "{ns}: {}", o.out);
    }
    drop(d);
    let d = Daemon::start(pools, &["--node-labels", "zone=b"]).expect("daemon");
    let zoned = Ipam::new(&d.socket, "net", "1.0.0", &["zoned"]).expect("ipam");
    let o = zoned.add(&Pod::new("blue", "p", 1)).expect("add");
    assert!(o.ok, "{}", o.out);
}

/// One HTTP/1.1 request over TCP, closed after the answer: (status code, body).
fn tcp_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

/// `--metrics-address` serves the probes and metrics over TCP (what the chart's kubelet
/// probes and Prometheus use) and nothing else: no ADD, no release, no allocation list.
#[test]
fn the_metrics_address_serves_probes_and_metrics_and_nothing_that_allocates() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(SEED_POOL, &["--metrics-address", &addr]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    assert!(ipam.add(&Pod::new("default", "p0", 0)).expect("add").ok);

    assert_eq!(tcp_request(&addr, "GET", "/healthz"), (200, "ok".into()));
    let (code, body) = tcp_request(&addr, "GET", "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""ready":true"#), "{body}");
    let (code, body) = tcp_request(&addr, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains(r#"tether_cni_requests_total{command="add",result="ok"} 1"#),
        "{body}"
    );
    for (method, path) in [
        ("POST", "/v1/cni/add"),
        ("POST", "/v1/cni/del"),
        ("POST", "/v1/release"),
        ("POST", "/v1/reconcile"),
        ("GET", "/v1/allocations"),
        ("GET", "/v1/pools"),
    ] {
        let (code, body) = tcp_request(&addr, method, path);
        assert_eq!(
            code, 404,
            "{method} {path} over TCP answered {code}: {body}"
        );
    }
    assert_eq!(d.allocations().expect("allocations").len(), 1);
}

/// A metrics address already in use stops the start with a message naming it.
#[test]
fn a_metrics_address_in_use_is_refused_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let e = Daemon::start(SEED_POOL, &["--metrics-address", &addr])
        .err()
        .expect("the daemon must not start");
    assert!(format!("{e:#}").contains("--metrics-address"), "{e:#}");
}
