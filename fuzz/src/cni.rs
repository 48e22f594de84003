//! The CNI plugin's config and environment parsing. Input: `KEY=VALUE` lines (the
//! environment: CNI_COMMAND, CNI_CONTAINERID, CNI_ARGS, ...), an empty line, then the network
//! config as the runtime writes it on stdin.

use serde_json::Value;
use tether_api::{CniRequest, CniResult, IpConfig, RouteConfig};
use tether_cni::plugin::{self, Command, Output, SUPPORTED};

/// One input.
pub fn one(data: &[u8]) {
    let (env, stdin) = crate::split_env(data);
    let command = env
        .iter()
        .find(|(k, _)| k == "CNI_COMMAND")
        .map(|(_, v)| v.as_str());
    if command == Some("VERSION") {
        // Answered before any parsing, with no I/O.
        let out = plugin::run(&env, stdin);
        assert_eq!(out.exit, 0, "{out:?}");
        return;
    }
    let mut log_file = None;
    match plugin::parse(&env, stdin, &mut log_file) {
        Ok(call) => accepted(&call),
        Err(out) => refused(&out),
    }
}

fn accepted(call: &plugin::Call) {
    let req = &call.request;
    assert!(SUPPORTED.contains(&call.version.as_str()), "{call:?}");
    assert_eq!(req.cni_version, call.version);
    match call.command {
        Command::Add => assert!(
            !req.container_id.is_empty() && !req.ifname.is_empty() && !req.netns.is_empty(),
            "ADD without its environment: {call:?}"
        ),
        Command::Del | Command::Check => assert!(
            !req.container_id.is_empty() && !req.ifname.is_empty(),
            "{call:?}"
        ),
        // A GC without the runtime's list would free every address of the network.
        Command::Gc => assert!(req.valid_attachments.is_some(), "{call:?}"),
        Command::Status => {}
    }
    if call.command != Command::Status {
        assert!(!req.network.is_empty(), "{call:?}");
    }
    // What goes over the socket decodes to the same request on the daemon's side.
    let wire = serde_json::to_vec(req).expect("a request encodes");
    let back: CniRequest = serde_json::from_slice(&wire).expect("the daemon decodes it");
    assert_eq!(&back, req);
    // A result carrying whatever text the caller asked for renders in its version.
    let result = CniResult {
        ips: req
            .requested_ips
            .iter()
            .chain(&req.prev_ips)
            .map(|a| IpConfig {
                address: a.clone(),
                gateway: Some(a.clone()),
            })
            .collect(),
        routes: req
            .pools
            .iter()
            .map(|p| RouteConfig {
                dst: p.clone(),
                gw: None,
            })
            .collect(),
    };
    let rendered = plugin::render(&call.version, &result);
    assert_eq!(rendered["cniVersion"], Value::String(call.version.clone()));
}

fn refused(out: &Output) {
    assert_eq!(out.exit, 1, "{out:?}");
    // One line of JSON, the spec's error: a code and a message.
    assert!(out.stdout.ends_with('\n'), "{out:?}");
    assert_eq!(out.stdout.matches('\n').count(), 1, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).expect("the error is JSON");
    let code = v["code"].as_u64().expect("the error has a code");
    assert!(
        matches!(code, 1 | 4 | 6 | 7),
        "parsing answers only codes 1, 4, 6, 7: {out:?}"
    );
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{out:?}");
    assert!(v["cniVersion"].is_string(), "{out:?}");
}
