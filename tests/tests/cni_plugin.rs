//! The `tether` plugin spawned as a runtime would, against a running tetherd: every supported
//! cniVersion, CHECK with prevResult, idempotent DEL, GC with (and without) valid attachments,
//! STATUS, a retried ADD, static addresses, the bridge plugin as a second main plugin, and the
//! plugin run by hand (crash safety: crash.rs).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_e2e::{CniOutcome, Daemon, Ipam, Pod, SEED_POOL, bin_dir, cni_exec, netns};

fn check(ipam: &Ipam, pod: &Pod, prev: &Value) -> CniOutcome {
    ipam.check(pod, prev).expect("check")
}

/// The plugin's raw exit status, stdout and stderr, with `env` only and `stdin` written then
/// closed (`None`: stdin left open, so a plugin that reads it would hang until the deadline).
fn plugin_raw(env: &[(&str, &str)], stdin: Option<&[u8]>) -> (Option<i32>, String, String) {
    let mut child = Command::new(bin_dir().expect("bin dir").join("tether"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether");
    let mut input = child.stdin.take();
    if let (Some(mut i), Some(bytes)) = (input.take(), stdin) {
        i.write_all(bytes).expect("write stdin");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(input);
    let o = child.wait_with_output().expect("output");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn results_in_every_supported_version() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let ipam = Ipam::new(&d.socket, "net", v, &["test-ippool"]).expect("ipam");
        let pod = Pod::new("default", &format!("p{i}"), i as u32);
        let o = ipam.add(&pod).expect("add");
        assert!(o.ok, "{v}: {}", o.out);
        assert_eq!(o.out["cniVersion"], *v);
        let legacy = v.starts_with("0.");
        assert_eq!(
            o.out["ips"][0].get("version").is_some(),
            legacy,
            "{v}: {}",
            o.out
        );
        assert_eq!(o.out["ips"][0]["gateway"], "10.6.0.1");
        assert_eq!(o.out["routes"][0]["dst"], "0.0.0.0/0");
        assert!(
            o.out["ips"][0]["address"]
                .as_str()
                .expect("address")
                .ends_with("/16")
        );
        // A retried ADD for the same container and interface returns the same address.
        let again = ipam.add(&pod).expect("retry");
        assert_eq!(again.ip(), o.ip(), "{v}");
        if *v != "0.3.0" && *v != "0.3.1" {
            let c = check(&ipam, &pod, &o.out);
            assert!(c.ok, "{v}: CHECK {}", c.out);
            let c = ipam.call("CHECK", &pod).expect("check without prevResult");
            assert_eq!(
                c.code(),
                Some(7),
                "{v}: CHECK without prevResult: {}",
                c.out
            );
        }
        assert!(ipam.del(&pod).expect("del").ok);
        assert!(ipam.del(&pod).expect("del again").ok, "DEL is idempotent");
        if *v != "0.3.0" && *v != "0.3.1" {
            let c = check(&ipam, &pod, &o.out);
            assert!(!c.ok && c.code() == Some(3), "{v}: {}", c.out);
        }
    }
    assert_eq!(d.usage("test-ippool").expect("usage").0, 0);
}

#[test]
fn gc_frees_what_the_runtime_no_longer_lists() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "gc-net", "1.1.0", &["test-ippool"]).expect("ipam");
    let pods: Vec<Pod> = (0..3)
        .map(|i| Pod::new("default", &format!("g{i}"), i))
        .collect();
    let mut results = Vec::new();
    for p in &pods {
        let o = ipam.add(p).expect("add");
        assert!(o.ok);
        results.push(o.out);
    }
    let mut conf = ipam.conf.clone();
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[1].container_id, "ifname": "eth0"}]);
    let o = cni_exec(&ipam.plugin, "GC", &conf, &[], "").expect("gc");
    assert!(o.ok, "{}", o.out);
    assert_eq!(
        d.usage("test-ippool").expect("usage").0,
        1,
        "only the valid attachment keeps its address"
    );
    let c = check(&ipam, &pods[1], &results[1]);
    assert!(c.ok, "{}", c.out);
}

#[test]
fn gc_without_valid_attachments_frees_nothing() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "gc-net", "1.1.0", &["test-ippool"]).expect("ipam");
    let pods: Vec<Pod> = (0..2)
        .map(|i| Pod::new("default", &format!("keep{i}"), i))
        .collect();
    for p in &pods {
        assert!(ipam.add(p).expect("add").ok);
    }
    // A runtime that sends no list (or a hand-made config): refused, nothing freed.
    let o = cni_exec(&ipam.plugin, "GC", &ipam.conf, &[], "").expect("gc");
    assert!(!o.ok);
    assert_eq!(o.code(), Some(7), "{}", o.out);
    assert_eq!(
        o.out["msg"],
        "GC needs cni.dev/valid-attachments, which the runtime sends (CNI 1.1); refusing to free anything"
    );
    assert_eq!(
        d.usage("test-ippool").expect("usage").0,
        2,
        "the daemon still holds every allocation"
    );
    // An explicit empty list is a list: nothing is valid, everything of the network goes.
    let mut conf = ipam.conf.clone();
    conf["cni.dev/valid-attachments"] = json!([]);
    let o = cni_exec(&ipam.plugin, "GC", &conf, &[], "").expect("gc []");
    assert!(o.ok, "{}", o.out);
    assert_eq!(d.usage("test-ippool").expect("usage").0, 0);
}

#[test]
fn run_by_hand_the_plugin_says_what_it_is() {
    // No CNI_COMMAND, stdin left open: skel's behaviour, the about text on stderr, exit 0.
    let (code, out, err) = plugin_raw(&[], None);
    assert_eq!(code, Some(0), "stdout {out:?} stderr {err:?}");
    assert!(out.is_empty(), "stdout is the protocol channel: {out:?}");
    assert!(
        err.starts_with(&format!("CNI tether plugin v{}", env!("CARGO_PKG_VERSION"))),
        "{err}"
    );
    assert!(
        err.contains("CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
        "{err}"
    );
    let (code, _, err) = plugin_raw(&[("CNI_COMMAND", "")], None);
    assert_eq!(code, Some(0), "an empty CNI_COMMAND is unset: {err}");
}

#[test]
fn stdout_json_ends_with_a_newline() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let conf = ipam.conf.to_string();
    let env = [
        ("CNI_CONTAINERID", "nl"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/none"),
    ];
    let with = |cmd: &'static str| -> Vec<(&str, &str)> {
        let mut e = vec![("CNI_COMMAND", cmd)];
        e.extend(env);
        e
    };
    let (code, out, err) = plugin_raw(&with("ADD"), Some(conf.as_bytes()));
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        out.ends_with("}\n") && out.matches('\n').count() == 1,
        "{out:?}"
    );
    let (code, out, _) = plugin_raw(&with("VERSION"), Some(b""));
    assert_eq!(code, Some(0));
    assert!(out.ends_with("}\n"), "{out:?}");
    let (code, out, _) = plugin_raw(&with("ADD"), Some(b"not json"));
    assert_eq!(code, Some(1));
    assert!(out.ends_with("}\n"), "{out:?}");
}

#[test]
fn status_reports_whether_add_can_succeed() {
    let one = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: tiny}\nspec: {subnet: 10.9.0.0/24, ips: [10.9.0.10]}\n";
    let d = Daemon::start(one, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.1.0", &["tiny"]).expect("ipam");
    let s = cni_exec(&ipam.plugin, "STATUS", &ipam.conf, &[], "").expect("status");
    assert!(s.ok, "{}", s.out);
    assert!(ipam.add(&Pod::new("default", "only", 1)).expect("add").ok);
    let s = cni_exec(&ipam.plugin, "STATUS", &ipam.conf, &[], "").expect("status");
    assert_eq!(s.code(), Some(50), "exhausted: {}", s.out);
    let e = ipam.add(&Pod::new("default", "second", 2)).expect("add");
    assert_eq!(e.code(), Some(100));
    assert!(e.out["msg"].as_str().expect("msg").contains("exhausted"));
    drop(d);
    let s = cni_exec(&ipam.plugin, "STATUS", &ipam.conf, &[], "").expect("status");
    assert_eq!(s.code(), Some(50), "daemon down: {}", s.out);
    let e = ipam.add(&Pod::new("default", "third", 3)).expect("add");
    assert_eq!(
        e.code(),
        Some(11),
        "daemon down is try-again-later: {}",
        e.out
    );
}

#[test]
fn bad_input_gets_the_right_codes() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["nope"]).expect("ipam");
    let o = ipam.add(&Pod::new("default", "p", 1)).expect("add");
    assert_eq!(o.code(), Some(102), "{}", o.out);
    assert!(
        o.out["msg"]
            .as_str()
            .expect("msg")
            .contains("known pools: test-ippool")
    );
    // A static address outside the pool, and one already taken.
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let mut conf = ipam.conf.clone();
    conf["runtimeConfig"] = json!({"ips": ["10.6.168.105/16"]});
    let static_ipam = Ipam {
        plugin: ipam.plugin.clone(),
        conf,
    };
    let o = static_ipam.add(&Pod::new("default", "s1", 2)).expect("add");
    assert_eq!(o.ip().as_deref(), Some("10.6.168.105"), "{}", o.out);
    let o = static_ipam.add(&Pod::new("default", "s2", 3)).expect("add");
    assert_eq!(o.code(), Some(103), "{}", o.out);
    let mut conf = ipam.conf.clone();
    conf["runtimeConfig"] = json!({"ips": ["10.7.0.1"]});
    let o = Ipam {
        plugin: ipam.plugin.clone(),
        conf,
    }
    .add(&Pod::new("default", "s3", 4))
    .expect("add");
    assert_eq!(o.code(), Some(102), "{}", o.out);
}

#[test]
fn bridge_delegates_too() {
    if !netns::require_real_setup("bridge_delegates_too") {
        return;
    }
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let lab = netns::Lab::new("tbr").expect("lab");
    let conf = lab.network("bridge", &d.socket, "1.0.0", &["test-ippool"]);
    let a = Pod::new("default", "br-a", 1);
    let b = Pod::new("default", "br-b", 2);
    let (na, nb) = (lab.netns("a").expect("ns"), lab.netns("b").expect("ns"));
    let oa = lab.exec(&conf, "ADD", &a, &na).expect("add a");
    let ob = lab.exec(&conf, "ADD", &b, &nb).expect("add b");
    assert!(oa.ok && ob.ok, "{} {}", oa.out, ob.out);
    let ipa = oa.ip().expect("ip");
    assert!(lab.addresses(&na, "eth0").expect("addr").contains(&ipa));
    assert!(lab.ping(&nb, &ipa), "pods on the bridge reach each other");
    assert!(lab.exec(&conf, "DEL", &a, &na).expect("del").ok);
    assert!(lab.exec(&conf, "DEL", &b, &nb).expect("del").ok);
    assert_eq!(d.usage("test-ippool").expect("usage").0, 0);
}

#[test]
fn logs_every_call_to_log_file_and_only_failures_to_stderr() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let mut ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let pod = Pod::new("default", "quiet", 0);
    let ok = ipam.add(&pod).expect("add");
    assert!(ok.ok, "{}", ok.out);
    assert!(
        ok.stderr.is_empty(),
        "a successful call is silent: {:?}",
        ok.stderr
    );
    let mut bad = Pod::new("default", "loud", 1);
    bad.ifname = String::new();
    let failed = ipam.add(&bad).expect("add without CNI_IFNAME");
    assert!(!failed.ok);
    assert!(
        failed.stderr.starts_with("tether: ADD") && failed.stderr.contains("exit=1"),
        "a failed call leaves one line on stderr: {:?}",
        failed.stderr
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("tether-cni.log");
    ipam.conf["ipam"]["logFile"] = json!(log);
    let pod2 = Pod::new("default", "logged", 2);
    let o = ipam.add(&pod2).expect("add with logFile");
    assert!(o.ok && o.stderr.is_empty(), "{:?}", o.stderr);
    assert!(ipam.del(&pod2).expect("del").ok);
    let text = std::fs::read_to_string(&log).expect("log file written");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("ADD container=") && lines[0].contains(&o.ip().expect("ip")));
    assert!(lines[1].contains("DEL container="));
}
