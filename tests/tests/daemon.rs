//! The daemon as an operator sees it: a failing policy changes no state, `tetherd pools`,
//! metrics, readiness, graceful shutdown with state kept.

use std::process::Command;

use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL, bin_dir};

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
    assert!(d.log().contains("tetherd ready"));
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
