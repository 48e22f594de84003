//! Hostile input at a running tetherd (docs/reliability.md, "Hostile input"): request bodies
//! that are not what the socket API expects, sent as raw HTTP the way any local client could,
//! each answered with its status and CNI code, and none of them changing any state or
//! stopping the daemon; and the plugin's `logFile` path tricks against the real binary.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tether_e2e::{Daemon, Ipam, Pod, SEED_POOL};

/// One request on a fresh connection; the answer's status and body (JSON, or the text as a
/// JSON string).
fn raw(socket: &Path, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: tetherd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("head");
    // The daemon may answer (413) and close before reading a body it refuses.
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let (status, body) = tether_api::client::parse_response(&answer).expect("an HTTP answer");
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, body)
}

/// What is sent, and what must come back: (what, path, body, HTTP status, CNI code, message).
type Case = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    Option<u64>,
    &'static str,
);

fn add_body(container: &str) -> Value {
    json!({"containerId": container, "ifname": "eth0", "netns": "/x", "network": "net",
        "cniVersion": "1.1.0", "pools": ["test-ippool"],
        "args": [["K8S_POD_NAMESPACE", "default"], ["K8S_POD_NAME", container]]})
}

#[test]
fn bad_request_bodies_get_their_codes_and_change_nothing() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let with = |patch: Value| -> Vec<u8> {
        let mut b = add_body("c-bad");
        if let (Some(b), Value::Object(p)) = (b.as_object_mut(), patch) {
            b.extend(p);
        }
        b.to_string().into_bytes()
    };
    // One address allocated first: a bad body that a lax decoder let through (a release with
    // a misspelt field, say) would free it, and the check at the end would see that.
    let (status, kept) = raw(
        &d.socket,
        "/v1/cni/add",
        &add_body("c-keep").to_string().into_bytes(),
    );
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["ips"][0]["address"], "10.6.168.101/16");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // Just over the 2 MB the daemon reads of a body.
    let huge = with(json!({"pools": vec!["p".repeat(1000); 2100]}));
    assert!(huge.len() > 2 << 20);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "/v1/cni/add",
            b"not json".to_vec(),
            400,
            Some(6),
            "request body is not a CNI request: expected ident at line 1 column 2",
        ),
        (
            "a wrong type",
            "/v1/cni/add",
            with(json!({"containerId": 5})),
            400,
            Some(6),
            "request body is not a CNI request: invalid type: integer `5`, expected a string",
        ),
        (
            "a missing field",
            "/v1/cni/add",
            b"{}".to_vec(),
            400,
            Some(6),
            "request body is not a CNI request: missing field `containerId`",
        ),
        (
            "nesting past serde's limit",
            "/v1/cni/add",
            deep.into_bytes(),
            400,
            Some(6),
            "request body is not a CNI request: invalid type: sequence",
        ),
        (
            "an unknown field of a release",
            "/v1/release",
            br#"{"pool":"test-ippool","ip":"10.6.168.101","forced":true}"#.to_vec(),
            400,
            Some(6),
            "unknown field `forced`, expected one of `pool`, `ip`, `force`, `toClaim`",
        ),
        (
            "a requested address that is no address",
            "/v1/cni/add",
            with(json!({"requestedIps": ["10.6.168.999"]})),
            400,
            Some(7),
            r#"requested address "10.6.168.999" is not an IP address"#,
        ),
        (
            "a prevResult address that is no address",
            "/v1/cni/check",
            with(json!({"prevIps": ["x/24"]})),
            404,
            Some(3),
            "container c-bad (eth0) holds no address",
        ),
        (
            "an empty container ID",
            "/v1/cni/add",
            with(json!({"containerId": ""})),
            400,
            Some(4),
            "CNI_CONTAINERID is empty",
        ),
        (
            "a GC without the runtime's list",
            "/v1/cni/gc",
            with(json!({})),
            400,
            Some(7),
            "GC needs cni.dev/valid-attachments",
        ),
        (
            "an unknown pool",
            "/v1/cni/add",
            with(json!({"pools": ["nope"]})),
            422,
            Some(102),
            "known pools: test-ippool",
        ),
        (
            "a body over 2 MB",
            "/v1/cni/add",
            huge,
            413,
            None,
            "Failed to buffer the request body: length limit exceeded",
        ),
    ];
    for (what, path, body, status, code, msg) in cases {
        let (got, answer) = raw(&d.socket, path, &body);
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["code"].as_u64(), code, "{what}: {answer}");
        let text = answer["msg"]
            .as_str()
            .or(answer.as_str())
            .unwrap_or_default();
        assert!(text.contains(msg), "{what}: {text:?} does not say {msg:?}");
    }
    assert_eq!(
        d.usage("test-ippool").expect("usage").0,
        1,
        "nothing allocated or freed: {:?}",
        d.allocations()
    );
    let (status, still) = raw(
        &d.socket,
        "/v1/cni/check",
        &json!({"containerId": "c-keep", "ifname": "eth0", "netns": "/x", "network": "net",
            "cniVersion": "1.1.0", "pools": ["test-ippool"], "prevIps": ["10.6.168.101/16"],
            "args": [["K8S_POD_NAMESPACE", "default"], ["K8S_POD_NAME", "c-keep"]]})
        .to_string()
        .into_bytes(),
    );
    assert_eq!(status, 200, "c-keep lost its address: {still}");
    // Unknown fields of a CNI request are ignored (a newer plugin may send more): it is served.
    let (status, answer) = raw(&d.socket, "/v1/cni/add", &with(json!({"bogus": 1})));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ips"][0]["address"], "10.6.168.102/16");
    // And the daemon serves the plugin as before.
    let ipam = Ipam::new(&d.socket, "net", "1.1.0", &["test-ippool"]).expect("ipam");
    let o = ipam.add(&Pod::new("default", "after", 1)).expect("add");
    assert!(o.ok, "{}", o.out);
    assert_eq!(d.usage("test-ippool").expect("usage").0, 3);
}

#[test]
fn log_file_tricks_neither_block_nor_misdirect_the_plugin() {
    let d = Daemon::start(SEED_POOL, &[]).expect("daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("real.log");
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let dotdot = dir.path().join("sub/../dotdot.log");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    let mut ipam = Ipam::new(&d.socket, "net", "1.1.0", &["test-ippool"]).expect("ipam");
    let mut n = 0;
    let mut add = |ipam: &Ipam| {
        n += 1;
        ipam.add(&Pod::new("default", &format!("log-{n}"), n))
            .expect("the plugin ran")
    };
    // Relative: refused before anything is written (7).
    ipam.conf["ipam"]["logFile"] = json!("tether.log");
    let o = add(&ipam);
    assert_eq!(o.code(), Some(7), "{}", o.out);
    assert_eq!(
        o.out["msg"],
        r#"ipam.logFile "tether.log" is not an absolute path"#
    );
    // `..` and a symlink are ordinary paths: the line lands where they lead.
    for (path, lands) in [
        (&dotdot, dir.path().join("dotdot.log")),
        (&link, target.clone()),
    ] {
        ipam.conf["ipam"]["logFile"] = json!(path);
        let o = add(&ipam);
        assert!(o.ok, "{}", o.out);
        let text = std::fs::read_to_string(&lands).expect("logged");
        assert!(text.contains("ADD container="), "{text}");
    }
    // A FIFO nobody reads and a directory: not opened, the call succeeds. A plugin blocked
    // in open would never answer: each call runs on a thread, with a deadline.
    for path in [fifo.clone(), dir.path().to_owned()] {
        ipam.conf["ipam"]["logFile"] = json!(path);
        let (tx, rx) = std::sync::mpsc::channel();
        let (ipam2, pod) = (ipam.clone(), Pod::new("default", "log-odd", 100));
        std::thread::spawn(move || {
            let _ = tx.send(ipam2.add(&pod).expect("the plugin ran"));
            let _ = ipam2.del(&pod);
        });
        let o = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the plugin hung on logFile {}", path.display()));
        assert!(o.ok, "{}: {}", path.display(), o.out);
        assert!(
            o.stderr
                .contains("is not a regular file; not writing to it"),
            "{:?}",
            o.stderr
        );
    }
}
