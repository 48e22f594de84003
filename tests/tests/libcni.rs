//! The plugins driven through libcni (Debian's golang-github-appc-cni-dev), the library
//! containerd and cnitool use: a conflist with macvlan delegating to tether, ADD, CHECK with
//! the cached result, DEL, in real network namespaces. Root only.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tether_e2e::{Daemon, Pod, SEED_POOL, bin_dir, manifests, netns};

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/libcni/harness.go");

/// Why the harness is not there.
enum NoHarness {
    /// The setup lacks something (libcni, go): a skip outside CI, a failure in CI.
    Missing(String),
    /// The harness did not build: always a failure.
    Broken(String),
}

/// Builds the Go harness once (GOPATH mode, offline, against Debian's libcni).
fn harness() -> Result<PathBuf, NoHarness> {
    let out = bin_dir()
        .map_err(|e| NoHarness::Broken(e.to_string()))?
        .join("libcni-harness");
    let fresh = |p: &Path| -> bool {
        let (Ok(a), Ok(b)) = (std::fs::metadata(p), std::fs::metadata(SOURCE)) else {
            return false;
        };
        matches!((a.modified(), b.modified()), (Ok(x), Ok(y)) if x >= y)
    };
    if fresh(&out) {
        return Ok(out);
    }
    if !Path::new("/usr/share/gocode/src/github.com/containernetworking/cni/libcni").exists() {
        return Err(NoHarness::Missing(
            "libcni is missing: install golang-github-appc-cni-dev (scripts/setup.sh does)".into(),
        ));
    }
    let gocache = std::env::temp_dir().join("tether-gocache");
    let o = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(SOURCE)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", &gocache)
        .env("GOFLAGS", "")
        .output()
        .map_err(|e| NoHarness::Missing(format!("go is missing ({e}): install golang-go")))?;
    if !o.status.success() {
        return Err(NoHarness::Broken(format!(
            "building the libcni harness: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(out)
}

fn run(h: &Path, cni_path: &str, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(h)
        .args(args)
        .env("CNI_PATH", cni_path)
        .output()
        .expect("harness runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn libcni_add_check_del_with_macvlan() {
    if !netns::require_real_setup("libcni_add_check_del_with_macvlan") {
        return;
    }
    let h = match harness() {
        Ok(h) => h,
        Err(NoHarness::Missing(why)) => {
            tether_e2e::skip_or_fail("libcni_add_check_del_with_macvlan", &why);
            return;
        }
        Err(NoHarness::Broken(e)) => panic!("{e}"),
    };
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let lab = netns::Lab::new("tlib").expect("lab");
    let plugin = lab.network("macvlan", &d.socket, "1.0.0", &["test-ippool"]);
    let conflist = json!({"cniVersion": "1.0.0", "name": "macvlan-net", "plugins": [plugin]});
    let dir = tempfile::tempdir().expect("tempdir");
    let conf_path = dir.path().join("10-macvlan.conflist");
    std::fs::write(&conf_path, conflist.to_string()).expect("write conflist");
    let conf = conf_path.display().to_string();
    let cni_path = lab.cni_path();

    // A StatefulSet pod: pinned, so its address survives DEL and comes back for the new pod.
    d.put_manifest("sts", &manifests::statefulset("db", 1))
        .expect("sts");
    let p1 = Pod::new("default", "db-0", 1);
    d.put_manifest("pod", &manifests::sts_pod(&p1, "db"))
        .expect("pod");
    let ns1 = lab.netns("a").expect("netns").display().to_string();
    let (ok, out, err) = run(
        &h,
        &cni_path,
        &["add", &conf, &ns1, &p1.container_id, "eth0", &p1.cni_args()],
    );
    assert!(ok, "libcni ADD failed: {err}");
    let result: Value = serde_json::from_str(&out).expect("result JSON");
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let ip = addr.split('/').next().expect("ip").to_owned();
    assert!(ip.starts_with("10.6.168."), "{result}");
    assert!(
        lab.addresses(Path::new(&ns1), "eth0")
            .expect("addr")
            .contains(&addr),
        "macvlan configured the address"
    );

    let (ok, _, err) = run(
        &h,
        &cni_path,
        &[
            "check",
            &conf,
            &ns1,
            &p1.container_id,
            "eth0",
            &p1.cni_args(),
        ],
    );
    assert!(ok, "libcni CHECK failed: {err}");
    let (ok, _, err) = run(
        &h,
        &cni_path,
        &["del", &conf, &ns1, &p1.container_id, "eth0", &p1.cni_args()],
    );
    assert!(ok, "libcni DEL failed: {err}");

    let p2 = Pod::new("default", "db-0", 2);
    d.put_manifest("pod", &manifests::sts_pod(&p2, "db"))
        .expect("pod");
    let ns2 = lab.netns("b").expect("netns").display().to_string();
    let (ok, out, err) = run(
        &h,
        &cni_path,
        &["add", &conf, &ns2, &p2.container_id, "eth0", &p2.cni_args()],
    );
    assert!(ok, "libcni ADD failed: {err}");
    let again: Value = serde_json::from_str(&out).expect("result JSON");
    assert_eq!(
        again["ips"][0]["address"],
        addr.as_str(),
        "the recreated StatefulSet pod keeps its address"
    );
    let (ok, _, err) = run(
        &h,
        &cni_path,
        &["del", &conf, &ns2, &p2.container_id, "eth0", &p2.cni_args()],
    );
    assert!(ok, "{err}");
    // Ephemeral pod through libcni: released on DEL.
    let p3 = Pod::new("default", "cart-x", 3);
    let ns3 = lab.netns("c").expect("netns").display().to_string();
    let (ok, _, err) = run(
        &h,
        &cni_path,
        &["add", &conf, &ns3, &p3.container_id, "eth0", &p3.cni_args()],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        &h,
        &cni_path,
        &["del", &conf, &ns3, &p3.container_id, "eth0", &p3.cni_args()],
    );
    assert!(ok, "{err}");
    assert_eq!(
        d.usage("test-ippool").expect("usage").0,
        1,
        "only the pinned StatefulSet address stays"
    );
}
