//! The plugin's logic, free of process globals so tests can drive it.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tether_api::client::{Client, ClientError};
use tether_api::{Attachment, CniRequest, CniResult, DEFAULT_SOCKET, codes};

/// Versions this plugin speaks.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request sent to tetherd. The daemon reads at most 2 MB of a body (axum's default)
/// and answers more with 413 while the plugin is still writing, which the plugin could only
/// report as a broken pipe; a config that big is a mistake, refused here with a reason.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest network config read from stdin: 16 times what can be sent on (the main plugin's
/// own fields are not forwarded), so no real config comes near it, while a runaway writer
/// cannot grow the plugin without bound.
pub const MAX_STDIN_BYTES: usize = 16 << 20;

/// Reads the network config, at most [`MAX_STDIN_BYTES`] of it: `Err` is the error answer to
/// print (7 when there is more, 5 when reading fails).
pub fn read_config(r: impl std::io::Read) -> Result<Vec<u8>, Output> {
    use std::io::Read;
    let mut buf = Vec::new();
    let cap = u64::try_from(MAX_STDIN_BYTES + 1).unwrap_or(u64::MAX);
    match r.take(cap).read_to_end(&mut buf) {
        Err(e) => Err(Output::error(
            "",
            codes::IO_FAILURE,
            format!("reading stdin: {e}"),
            String::new(),
        )),
        Ok(_) if buf.len() > MAX_STDIN_BYTES => Err(Output::error(
            "",
            codes::INVALID_CONFIG,
            format!("the network config on stdin is over the limit of {MAX_STDIN_BYTES} bytes"),
            String::new(),
        )),
        Ok(_) => Ok(buf),
    }
}

/// What `tether` says when run by hand (no CNI_COMMAND), on stderr, as the reference plugins do.
pub fn about() -> String {
    format!(
        "CNI tether plugin v{}: IPAM that delegates to tetherd\nCNI protocol versions supported: {}\n",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED.join(", ")
    )
}

/// What to print and how to exit. JSON on stdout ends with a newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// What to print on stdout: the result or the spec's error JSON, or nothing.
    pub stdout: String,
    /// The exit status: 0, or 1 with an error on stdout.
    pub exit: u8,
}

impl Output {
    fn ok(v: Value) -> Self {
        Output {
            stdout: format!("{v}\n"),
            exit: 0,
        }
    }

    fn empty() -> Self {
        Output {
            stdout: String::new(),
            exit: 0,
        }
    }

    /// The spec's error JSON.
    pub fn error(version: &str, code: u32, msg: String, details: String) -> Self {
        let mut v = json!({"cniVersion": if version.is_empty() { "1.1.0" } else { version }, "code": code, "msg": msg});
        if !details.is_empty() {
            v["details"] = Value::String(details);
        }
        Output {
            stdout: format!("{v}\n"),
            exit: 1,
        }
    }
}

/// The `ipam` section: unknown fields are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IpamConfig {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    pools: Vec<String>,
    #[serde(default)]
    log_file: Option<String>,
}

fn env_get<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn parse_cni_args(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Writes one line to `logFile`. Without one, only failures go to stderr (the runtime keeps
/// the plugin's stderr with the error); a successful call stays silent. Only a regular file
/// (or a path where nothing is yet) is written: a FIFO would block the call on open, and a
/// device or a directory is no log; then the line goes to stderr as if there were no
/// `logFile`.
fn log(file: Option<&str>, failed: bool, line: &str) {
    let opened = file.and_then(|path| {
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                eprintln!("tether: logFile {path} is not a regular file; not writing to it");
                return None;
            }
            _ => {}
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    let Some(mut f) = opened else {
        if failed {
            eprintln!("tether: {line}");
        }
        return;
    };
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let _ = writeln!(f, "{ts:.3} {line}");
}

/// Whether CNI version `version` is `min` or later, in semver order; a version that is not
/// semver (never one of [`SUPPORTED`], which the caller's version is checked against first)
/// is not.
fn at_least(version: &str, min: &str) -> bool {
    match (semver::Version::parse(version), semver::Version::parse(min)) {
        (Ok(v), Ok(min)) => v >= min,
        _ => false,
    }
}

/// Renders a result for `version`.
pub fn render(version: &str, r: &CniResult) -> Value {
    let legacy = !at_least(version, "1.0.0");
    let ips: Vec<Value> = r
        .ips
        .iter()
        .map(|ip| {
            let mut v = json!({"address": ip.address});
            if let Some(g) = &ip.gateway {
                v["gateway"] = json!(g);
            }
            if legacy {
                v["version"] = json!(if ip.address.contains(':') { "6" } else { "4" });
            }
            v
        })
        .collect();
    let routes: Vec<Value> = r
        .routes
        .iter()
        .map(|rt| {
            let mut v = json!({"dst": rt.dst});
            if let Some(g) = &rt.gw {
                v["gw"] = json!(g);
            }
            v
        })
        .collect();
    json!({"cniVersion": version, "ips": ips, "routes": routes, "dns": {}})
}

fn client_error(version: &str, e: ClientError, down_code: u32) -> Output {
    match e {
        ClientError::Api { body, .. } => Output::error(version, body.code, body.msg, body.details),
        // Something that is not a socket where the socket should be will not become one by
        // trying again: a config error, not "try again later".
        ClientError::Connect { socket, source }
            if std::fs::metadata(&socket).is_ok_and(|m| !m.file_type().is_socket()) =>
        {
            let what = match std::fs::metadata(&socket).map(|m| m.file_type()) {
                Ok(t) if t.is_dir() => "a directory",
                Ok(t) if t.is_file() => "a regular file",
                Ok(t) if t.is_fifo() => "a FIFO",
                _ => "something else",
            };
            Output::error(
                version,
                codes::INVALID_CONFIG,
                format!(
                    "ipam.socket {} is {what}, not tetherd's socket ({source})",
                    socket.display()
                ),
                String::new(),
            )
        }
        // Not reached, cut off before the answer, or no answer in time: the daemon is down,
        // restarting or stuck, and every call is idempotent, so the runtime should retry.
        ClientError::Connect { .. } | ClientError::Closed { .. } | ClientError::Io(_) => {
            Output::error(version, down_code, e.to_string(), String::new())
        }
        other => Output::error(version, codes::IO_FAILURE, other.to_string(), String::new()),
    }
}

fn requested_ips(conf: &Value, args: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for ptr in ["/args/cni/ips", "/runtimeConfig/ips"] {
        if let Some(list) = conf.pointer(ptr).and_then(Value::as_array) {
            out.extend(list.iter().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    for (k, v) in args {
        if k == "IP" {
            out.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    out.dedup();
    out
}

/// A `prevResult` that is not a result.
#[derive(Debug, PartialEq, Eq)]
enum PrevResultError {
    NotAnObject,
    IpsNotAList,
    NoAddress(usize),
}

impl std::fmt::Display for PrevResultError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrevResultError::NotAnObject => f.write_str("prevResult is not a JSON object"),
            PrevResultError::IpsNotAList => f.write_str("prevResult.ips is not a list"),
            PrevResultError::NoAddress(i) => write!(f, "prevResult.ips[{i}] has no address"),
        }
    }
}

/// The addresses of `prevResult` (`ips[].address`, alike in every result version from 0.3.0
/// on), as given; `None` when the config has no prevResult.
fn prev_ips(conf: &Value) -> Result<Option<Vec<String>>, PrevResultError> {
    let Some(prev) = conf.get("prevResult").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let prev = prev.as_object().ok_or(PrevResultError::NotAnObject)?;
    let ips = match prev.get("ips") {
        None | Some(Value::Null) => return Ok(Some(Vec::new())),
        Some(Value::Array(ips)) => ips,
        Some(_) => return Err(PrevResultError::IpsNotAList),
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            ip.get("address")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or(PrevResultError::NoAddress(i))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Runs one CNI call and logs its outcome (every call to `logFile`; failures to stderr when
/// there is none).
pub fn run(env: &[(String, String)], stdin: &[u8]) -> Output {
    let command = env_get(env, "CNI_COMMAND");
    if command == "VERSION" {
        return Output::ok(json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}));
    }
    let started = std::time::Instant::now();
    let mut log_file = None;
    let out = execute(env, stdin, &mut log_file);
    log(
        log_file.as_deref(),
        out.exit != 0,
        &format!(
            "{command} container={} ifname={} exit={} took={:?} out={}",
            env_get(env, "CNI_CONTAINERID"),
            env_get(env, "CNI_IFNAME"),
            out.exit,
            started.elapsed(),
            out.stdout.trim_end()
        ),
    );
    out
}

/// The CNI command of a [`Call`] (VERSION is answered before any parsing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// ADD.
    Add,
    /// DEL.
    Del,
    /// CHECK.
    Check,
    /// GC.
    Gc,
    /// STATUS.
    Status,
}

/// A CNI call, parsed and checked from the environment and the network config, before any
/// I/O: what the plugin sends to tetherd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The command.
    pub command: Command,
    /// The caller's `cniVersion` (one of [`SUPPORTED`]).
    pub version: String,
    /// The daemon's socket (`ipam.socket`, else [`DEFAULT_SOCKET`]).
    pub socket: String,
    /// The request sent to the daemon (for STATUS, its `pools` only).
    pub request: CniRequest,
}

/// Parses one CNI call (the `CNI_*` environment, `CNI_ARGS` and the network config on
/// stdin) without touching the socket or any file: `Err` is the error answer to print.
/// `log_file` is set as soon as the config names one, so a refusal is logged there too.
/// The fuzz target `cni_parse` drives this.
pub fn parse(
    env: &[(String, String)],
    stdin: &[u8],
    log_file: &mut Option<String>,
) -> Result<Call, Output> {
    let command = env_get(env, "CNI_COMMAND").to_owned();
    let conf: Value = match serde_json::from_slice(stdin) {
        Ok(v) => v,
        Err(e) => {
            return Err(Output::error(
                "",
                codes::DECODE_FAILURE,
                format!("network config on stdin is not JSON: {e}"),
                String::new(),
            ));
        }
    };
    let version = match conf.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        None => String::new(),
        Some(other) => {
            return Err(Output::error(
                "",
                codes::INVALID_CONFIG,
                format!("cniVersion must be a string such as \"1.1.0\", not {other}"),
                String::new(),
            ));
        }
    };
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(Output::error(
            "",
            codes::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported; this plugin speaks {}",
                SUPPORTED.join(", ")
            ),
            String::new(),
        ));
    }
    let ipam: IpamConfig = match conf.get("ipam").cloned().map(serde_json::from_value) {
        Some(Ok(i)) => i,
        Some(Err(e)) => {
            return Err(Output::error(
                &version,
                codes::INVALID_CONFIG,
                format!("ipam config: {e}"),
                "fields: type, socket, pools, logFile".into(),
            ));
        }
        None => {
            return Err(Output::error(
                &version,
                codes::INVALID_CONFIG,
                "network config has no ipam section".into(),
                String::new(),
            ));
        }
    };
    // Paths relative to whatever directory the runtime runs the plugin in mean nothing.
    for (field, path) in [("socket", &ipam.socket), ("logFile", &ipam.log_file)] {
        if let Some(p) = path.as_deref().filter(|p| !p.starts_with('/')) {
            return Err(Output::error(
                &version,
                codes::INVALID_CONFIG,
                format!("ipam.{field} {p:?} is not an absolute path"),
                String::new(),
            ));
        }
    }
    log_file.clone_from(&ipam.log_file);
    if ipam.kind != "tether" {
        return Err(Output::error(
            &version,
            codes::INVALID_CONFIG,
            format!("ipam type is {:?}, not \"tether\"", ipam.kind),
            String::new(),
        ));
    }
    let network = conf
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if network.is_empty() && command != "STATUS" {
        return Err(Output::error(
            &version,
            codes::INVALID_CONFIG,
            "network config has no name".into(),
            String::new(),
        ));
    }
    let socket = ipam.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
    let args = parse_cni_args(env_get(env, "CNI_ARGS"));
    let mut req = CniRequest {
        container_id: env_get(env, "CNI_CONTAINERID").to_owned(),
        ifname: env_get(env, "CNI_IFNAME").to_owned(),
        netns: env_get(env, "CNI_NETNS").to_owned(),
        network,
        cni_version: version.clone(),
        requested_ips: requested_ips(&conf, &args),
        args,
        pools: ipam.pools,
        valid_attachments: None,
        prev_ips: Vec::new(),
    };
    let need = |names: &[(&str, &str)]| -> Result<(), Output> {
        let missing: Vec<&str> = names
            .iter()
            .filter(|(_, v)| v.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Output::error(
            &version,
            codes::INVALID_ENV,
            format!("{} must be set for {command}", missing.join(", ")),
            String::new(),
        ))
    };
    // Commands newer than the caller's cniVersion.
    let too_old = |min: &str| -> Result<(), Output> {
        if at_least(&version, min) {
            return Ok(());
        }
        Err(Output::error(
            &version,
            codes::INCOMPATIBLE_VERSION,
            format!("{command} needs cniVersion {min} or later"),
            String::new(),
        ))
    };
    let command = match command.as_str() {
        "ADD" => {
            need(&[
                ("CNI_CONTAINERID", &req.container_id),
                ("CNI_IFNAME", &req.ifname),
                ("CNI_NETNS", &req.netns),
            ])?;
            Command::Add
        }
        "DEL" => {
            need(&[
                ("CNI_CONTAINERID", &req.container_id),
                ("CNI_IFNAME", &req.ifname),
            ])?;
            Command::Del
        }
        "CHECK" => {
            too_old("0.4.0")?;
            need(&[
                ("CNI_CONTAINERID", &req.container_id),
                ("CNI_IFNAME", &req.ifname),
            ])?;
            // The spec: the runtime must send the ADD's result as prevResult, and CHECK must
            // consult it; the reference main plugins refuse a CHECK without one.
            req.prev_ips = match prev_ips(&conf) {
                Ok(Some(ips)) => ips,
                Ok(None) => {
                    return Err(Output::error(
                        &version,
                        codes::INVALID_CONFIG,
                        "CHECK needs prevResult (the result of the ADD), which the runtime sends from cniVersion 0.4.0 on".into(),
                        String::new(),
                    ));
                }
                Err(e) => {
                    return Err(Output::error(
                        &version,
                        codes::DECODE_FAILURE,
                        e.to_string(),
                        String::new(),
                    ));
                }
            };
            Command::Check
        }
        "GC" => {
            too_old("1.1.0")?;
            // A missing list is not an empty one: read as "nothing is valid", it would free
            // every address of the network.
            let Some(valid) = conf
                .get("cni.dev/valid-attachments")
                .filter(|v| !v.is_null())
                .cloned()
            else {
                return Err(Output::error(
                    &version,
                    codes::INVALID_CONFIG,
                    "GC needs cni.dev/valid-attachments, which the runtime sends (CNI 1.1); refusing to free anything".into(),
                    String::new(),
                ));
            };
            req.valid_attachments = match serde_json::from_value::<Vec<Attachment>>(valid) {
                Ok(v) => Some(v),
                Err(e) => {
                    return Err(Output::error(
                        &version,
                        codes::INVALID_CONFIG,
                        format!("cni.dev/valid-attachments: {e}"),
                        String::new(),
                    ));
                }
            };
            Command::Gc
        }
        "STATUS" => {
            too_old("1.1.0")?;
            Command::Status
        }
        other => {
            return Err(Output::error(
                &version,
                codes::INVALID_ENV,
                format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
                String::new(),
            ));
        }
    };
    let size = serde_json::to_vec(&req).map_or(usize::MAX, |b| b.len());
    if size > MAX_REQUEST_BYTES {
        return Err(Output::error(
            &version,
            codes::INVALID_CONFIG,
            format!(
                "the request to tetherd would be {size} bytes, over the limit of {MAX_REQUEST_BYTES}: ipam.pools, the requested ips, prevResult or CNI_ARGS are far too long"
            ),
            String::new(),
        ));
    }
    Ok(Call {
        command,
        version,
        socket,
        request: req,
    })
}

/// One CNI call; `log_file` is set as soon as the config names one.
fn execute(env: &[(String, String)], stdin: &[u8], log_file: &mut Option<String>) -> Output {
    let call = match parse(env, stdin, log_file) {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let version = call.version.as_str();
    let req = &call.request;
    let client = Client::new(&call.socket, TIMEOUT);
    match call.command {
        Command::Add => match client.post::<_, CniResult>("/v1/cni/add", req) {
            Ok(r) => Output::ok(render(version, &r)),
            Err(e) => client_error(version, e, codes::TRY_AGAIN),
        },
        Command::Del => match client.post::<_, Value>("/v1/cni/del", req) {
            Ok(_) => Output::empty(),
            Err(e) => client_error(version, e, codes::TRY_AGAIN),
        },
        Command::Check => match client.post::<_, Value>("/v1/cni/check", req) {
            Ok(_) => Output::empty(),
            Err(e) => client_error(version, e, codes::TRY_AGAIN),
        },
        Command::Gc => match client.post::<_, tether_api::GcResult>("/v1/cni/gc", req) {
            Ok(r) => {
                log(
                    log_file.as_deref(),
                    false,
                    &format!("GC network={} released={:?}", req.network, r.released),
                );
                Output::empty()
            }
            Err(e) => client_error(version, e, codes::TRY_AGAIN),
        },
        Command::Status => {
            let path = format!("/v1/cni/status?pools={}", req.pools.join(","));
            match client.get::<Value>(&path) {
                Ok(_) => Output::empty(),
                Err(e) => client_error(version, e, codes::NOT_AVAILABLE),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::{IpConfig, RouteConfig};

    /// A config over 16 MiB on stdin, or one that never ends, is refused with code 7 after
    /// reading at most one byte past the limit; one of exactly the limit is read whole.
    #[test]
    fn stdin_is_read_up_to_its_limit() {
        use std::io::Read;
        let at_limit = std::io::repeat(b' ').take(MAX_STDIN_BYTES as u64);
        assert_eq!(
            read_config(at_limit).expect("at the limit").len(),
            MAX_STDIN_BYTES
        );
        for over in [
            Box::new(std::io::repeat(b' ').take(MAX_STDIN_BYTES as u64 + 1))
                as Box<dyn std::io::Read>,
            Box::new(std::io::repeat(b'{')),
        ] {
            let out = read_config(over).expect_err("over the limit");
            assert_eq!(out.exit, 1);
            let v: Value = serde_json::from_str(&out.stdout).expect("error JSON");
            assert_eq!(v["code"], 7, "{v}");
            assert!(
                v["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("over the limit of 16777216 bytes")),
                "{v}"
            );
        }
    }

    #[test]
    fn versions_in_semver_order() {
        for (v, min, want) in [
            ("0.3.1", "0.4.0", false),
            ("0.4.0", "0.4.0", true),
            ("1.0.0", "0.4.0", true),
            ("1.1.0", "1.0.0", true),
            ("0.10.0", "0.4.0", true),
            ("0.4.0", "1.0.0", false),
            ("", "0.4.0", false),
            ("junk", "0.4.0", false),
        ] {
            assert_eq!(at_least(v, min), want, "{v} >= {min}");
        }
        // Every supported version parses, in ascending order.
        assert!(
            SUPPORTED
                .windows(2)
                .all(|w| at_least(w[1], w[0]) && !at_least(w[0], w[1]))
        );
    }

    fn result() -> CniResult {
        CniResult {
            ips: vec![
                IpConfig {
                    address: "10.6.168.101/16".into(),
                    gateway: Some("10.6.0.1".into()),
                },
                IpConfig {
                    address: "fd00::5/64".into(),
                    gateway: None,
                },
            ],
            routes: vec![RouteConfig {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.6.0.1".into()),
            }],
        }
    }

    #[test]
    fn results_per_version() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let r = render(v, &result());
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0]["version"], "4");
            assert_eq!(r["ips"][1]["version"], "6");
            assert!(r["ips"][1].get("gateway").is_none());
        }
        for v in ["1.0.0", "1.1.0"] {
            let r = render(v, &result());
            assert!(
                r["ips"][0].get("version").is_none(),
                "{v} has no version field"
            );
            assert_eq!(r["ips"][0]["address"], "10.6.168.101/16");
            assert_eq!(r["routes"][0]["gw"], "10.6.0.1");
        }
    }

    fn env(cmd: &str) -> Vec<(String, String)> {
        vec![("CNI_COMMAND".into(), cmd.into())]
    }

    fn code(o: &Output) -> u64 {
        serde_json::from_str::<Value>(&o.stdout).expect("json")["code"]
            .as_u64()
            .expect("code")
    }

    #[test]
    fn config_errors_have_codes() {
        let o = run(&env("ADD"), b"not json");
        assert_eq!((o.exit, code(&o)), (1, 6));
        let o = run(
            &env("ADD"),
            br#"{"cniVersion":"9.9.9","name":"n","ipam":{"type":"tether"}}"#,
        );
        assert_eq!(code(&o), 1);
        let o = run(
            &env("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"tether","pool":"x"}}"#,
        );
        assert_eq!(code(&o), 7);
        assert!(o.stdout.contains("unknown field `pool`"), "{}", o.stdout);
        let o = run(
            &env("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local"}}"#,
        );
        assert_eq!(code(&o), 7);
        let o = run(
            &env("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"tether"}}"#,
        );
        assert_eq!(code(&o), 4, "missing CNI_CONTAINERID etc.");
        assert!(
            o.stdout.contains("CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS"),
            "{}",
            o.stdout
        );
        let o = run(
            &env("GC"),
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"tether"}}"#,
        );
        assert_eq!(code(&o), 1);
        let o = run(
            &env("FOO"),
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"tether"}}"#,
        );
        assert_eq!(code(&o), 4);
    }

    #[test]
    fn daemon_down_is_try_again_or_not_available() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("none.sock");
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","ipam":{{"type":"tether","socket":"{}"}}}}"#,
            sock.display()
        );
        let mut e = env("ADD");
        e.extend([
            ("CNI_CONTAINERID".into(), "c".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_NETNS".into(), "/x".into()),
        ]);
        let o = run(&e, conf.as_bytes());
        assert_eq!(code(&o), 11);
        assert!(o.stdout.contains("is tetherd running?"), "{}", o.stdout);
        let o = run(&env("STATUS"), conf.as_bytes());
        assert_eq!(code(&o), 50);
    }

    fn down_socket_conf(version: &str, extra: Value) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conf = json!({
            "cniVersion": version,
            "name": "n",
            "ipam": {"type": "tether", "socket": dir.path().join("none.sock")},
        });
        if let (Some(c), Value::Object(extra)) = (conf.as_object_mut(), extra) {
            c.extend(extra);
        }
        (dir, conf.to_string().into_bytes())
    }

    fn attachment_env(cmd: &str) -> Vec<(String, String)> {
        let mut e = env(cmd);
        e.extend([
            ("CNI_CONTAINERID".into(), "c".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_NETNS".into(), "/x".into()),
        ]);
        e
    }

    #[test]
    fn gc_without_valid_attachments_is_refused_before_the_daemon() {
        // The socket does not exist: reaching the daemon would answer 11, not 7.
        for missing in [json!({}), json!({"cni.dev/valid-attachments": null})] {
            let (_dir, conf) = down_socket_conf("1.1.0", missing);
            let o = run(&env("GC"), &conf);
            assert_eq!((o.exit, code(&o)), (1, 7), "{}", o.stdout);
            assert!(
                o.stdout
                    .contains("GC needs cni.dev/valid-attachments, which the runtime sends (CNI 1.1); refusing to free anything"),
                "{}",
                o.stdout
            );
        }
        // An explicit empty list is a valid list (nothing is valid): it goes to the daemon.
        let (_dir, conf) = down_socket_conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
        assert_eq!(code(&run(&env("GC"), &conf)), 11);
        let (_dir, conf) = down_socket_conf(
            "1.1.0",
            json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]}),
        );
        assert_eq!(
            code(&run(&env("GC"), &conf)),
            7,
            "an entry without containerID"
        );
    }

    #[test]
    fn prev_result_addresses_in_every_result_version() {
        let legacy = json!({"prevResult": {
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [
                {"version": "4", "address": "10.6.168.101/16", "gateway": "10.6.0.1", "interface": 0},
                {"version": "6", "address": "fd00::5/64"}
            ],
        }});
        assert_eq!(
            prev_ips(&legacy),
            Ok(Some(vec![
                "10.6.168.101/16".to_owned(),
                "fd00::5/64".to_owned()
            ]))
        );
        let v04 = json!({"prevResult": {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.6.168.102/16"}]}});
        assert_eq!(prev_ips(&v04), Ok(Some(vec!["10.6.168.102/16".to_owned()])));
        let v1 = json!({"prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.6.168.103/16", "interface": 2}], "dns": {}}});
        assert_eq!(prev_ips(&v1), Ok(Some(vec!["10.6.168.103/16".to_owned()])));
        assert_eq!(
            prev_ips(&json!({"prevResult": {"cniVersion": "1.0.0"}})),
            Ok(Some(vec![]))
        );
        assert_eq!(prev_ips(&json!({})), Ok(None));
        assert_eq!(prev_ips(&json!({"prevResult": null})), Ok(None));
        assert_eq!(
            prev_ips(&json!({"prevResult": "x"})),
            Err(PrevResultError::NotAnObject)
        );
        assert_eq!(
            prev_ips(&json!({"prevResult": {"ips": {}}})),
            Err(PrevResultError::IpsNotAList)
        );
        assert_eq!(
            prev_ips(
                &json!({"prevResult": {"ips": [{"address": "10.0.0.1/8"}, {"version": "4"}]}})
            ),
            Err(PrevResultError::NoAddress(1))
        );
    }

    #[test]
    fn check_needs_a_prev_result() {
        let (_dir, conf) = down_socket_conf("1.0.0", json!({}));
        let o = run(&attachment_env("CHECK"), &conf);
        assert_eq!(code(&o), 7, "{}", o.stdout);
        assert!(o.stdout.contains("CHECK needs prevResult"), "{}", o.stdout);
        let (_dir, conf) = down_socket_conf("1.0.0", json!({"prevResult": {"ips": [7]}}));
        assert_eq!(code(&run(&attachment_env("CHECK"), &conf)), 6);
        // With one, the call goes to the daemon (down here: 11).
        let (_dir, conf) = down_socket_conf(
            "0.4.0",
            json!({"prevResult": {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.1/8"}]}}),
        );
        assert_eq!(code(&run(&attachment_env("CHECK"), &conf)), 11);
        // Below 0.4.0 there is no CHECK at all.
        let (_dir, conf) = down_socket_conf("0.3.1", json!({}));
        assert_eq!(code(&run(&attachment_env("CHECK"), &conf)), 1);
    }

    fn conf_with(ipam: Value) -> Vec<u8> {
        let mut i = json!({"type": "tether"});
        if let (Some(i), Value::Object(extra)) = (i.as_object_mut(), ipam) {
            i.extend(extra);
        }
        json!({"cniVersion": "1.0.0", "name": "n", "ipam": i})
            .to_string()
            .into_bytes()
    }

    fn msg(o: &Output) -> String {
        serde_json::from_str::<Value>(&o.stdout).expect("json")["msg"]
            .as_str()
            .expect("msg")
            .to_owned()
    }

    #[test]
    fn wrong_types_and_deep_nesting_get_their_codes() {
        let e = attachment_env("ADD");
        for (conf, want, text) in [
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"tether","pools":"x"}}"#
                    .to_owned(),
                7,
                r#"ipam config: invalid type: string "x", expected a sequence"#,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":"tether"}"#.to_owned(),
                7,
                r#"ipam config: invalid type: string "tether", expected struct IpamConfig"#,
            ),
            (
                r#"{"cniVersion":1,"name":"n","ipam":{"type":"tether"}}"#.to_owned(),
                7,
                r#"cniVersion must be a string such as "1.1.0", not 1"#,
            ),
            (
                r#"{"name":"n","ipam":{"type":"tether"}}"#.to_owned(),
                1,
                r#"cniVersion "" is not supported"#,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":7,"ipam":{"type":"tether"}}"#.to_owned(),
                7,
                "network config has no name",
            ),
            (
                format!("{}1{}", r#"{"a":"#.repeat(200_000), "}".repeat(200_000)),
                6,
                "network config on stdin is not JSON: recursion limit exceeded",
            ),
        ] {
            let o = run(&e, conf.as_bytes());
            assert_eq!(code(&o), want, "{}", o.stdout);
            assert!(msg(&o).starts_with(text), "{}", o.stdout);
        }
    }

    #[test]
    fn relative_socket_and_log_paths_are_refused() {
        for (field, path) in [("socket", "run/tether.sock"), ("logFile", "tether.log")] {
            let o = run(&attachment_env("ADD"), &conf_with(json!({field: path})));
            assert_eq!(code(&o), 7, "{}", o.stdout);
            assert_eq!(
                msg(&o),
                format!("ipam.{field} {path:?} is not an absolute path")
            );
        }
        // `..` in an absolute path is an ordinary path: here, to no socket (11).
        let o = run(
            &attachment_env("ADD"),
            &conf_with(json!({"socket": "/nonexistent/../nonexistent/tether.sock"})),
        );
        assert_eq!(code(&o), 11, "{}", o.stdout);
    }

    #[test]
    fn a_config_too_big_for_the_daemon_is_refused_before_sending() {
        let (_dir, conf) = down_socket_conf("1.0.0", json!({}));
        let mut conf: Value = serde_json::from_slice(&conf).expect("json");
        // 1.5 MB of pool names: the daemon would cut the connection at 2 MB; at 1 MiB the
        // plugin refuses.
        conf["ipam"]["pools"] = json!(vec!["p".repeat(1000); 1500]);
        let o = run(&attachment_env("ADD"), conf.to_string().as_bytes());
        assert_eq!(code(&o), 7, "{}", &o.stdout[..200.min(o.stdout.len())]);
        assert!(
            msg(&o).contains(&format!("over the limit of {MAX_REQUEST_BYTES}")),
            "{}",
            msg(&o)
        );
        // Under the limit it goes to the daemon (down here: 11).
        conf["ipam"]["pools"] = json!(vec!["p".repeat(1000); 500]);
        assert_eq!(
            code(&run(&attachment_env("ADD"), conf.to_string().as_bytes())),
            11
        );
    }

    #[test]
    fn a_socket_path_that_is_no_socket_is_a_config_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        for (path, what) in [
            (dir.path(), "a directory"),
            (file.as_path(), "a regular file"),
        ] {
            let o = run(&attachment_env("ADD"), &conf_with(json!({"socket": path})));
            assert_eq!(code(&o), 7, "{}", o.stdout);
            assert!(
                msg(&o).starts_with(&format!(
                    "ipam.socket {} is {what}, not tetherd's socket (",
                    path.display()
                )),
                "{}",
                o.stdout
            );
        }
        assert_eq!(std::fs::read(&file).expect("read"), b"x", "left as it was");
    }

    #[test]
    fn a_log_file_that_is_a_fifo_or_a_directory_neither_blocks_nor_fails_the_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let sock = dir.path().join("none.sock");
        for log in [fifo.clone(), dir.path().to_owned()] {
            let conf = conf_with(json!({"socket": sock, "logFile": log}));
            // Opening a FIFO nobody reads blocks: the call runs on a thread with a deadline.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(run(&attachment_env("ADD"), &conf));
            });
            let o = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("the call hung on logFile {}", log.display()));
            assert_eq!(code(&o), 11, "{}", o.stdout);
        }
    }

    #[test]
    fn json_on_stdout_ends_with_a_newline() {
        let ok = run(&env("VERSION"), b"");
        assert!(ok.stdout.ends_with("}\n"), "{:?}", ok.stdout);
        let err = run(&env("ADD"), b"not json");
        assert!(err.stdout.ends_with("}\n"), "{:?}", err.stdout);
        assert_eq!(err.stdout.matches('\n').count(), 1);
    }

    #[test]
    fn about_names_the_plugin_and_its_versions() {
        let a = about();
        assert!(a.starts_with("CNI tether plugin v"), "{a}");
        assert!(a.contains(env!("CARGO_PKG_VERSION")), "{a}");
        assert!(
            a.contains("CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
            "{a}"
        );
    }

    #[test]
    fn version_and_args() {
        let o = run(&env("VERSION"), b"");
        let v: Value = serde_json::from_str(&o.stdout).expect("json");
        assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(5));
        assert_eq!(
            parse_cni_args(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IP=10.0.0.5"
            ),
            vec![
                ("IgnoreUnknown".to_owned(), "1".to_owned()),
                ("K8S_POD_NAMESPACE".to_owned(), "default".to_owned()),
                ("K8S_POD_NAME".to_owned(), "web-0".to_owned()),
                ("IP".to_owned(), "10.0.0.5".to_owned()),
            ]
        );
        let conf = json!({"runtimeConfig": {"ips": ["10.0.0.9/24"]}});
        assert_eq!(
            requested_ips(&conf, &[("IP".into(), "10.0.0.5".into())]),
            vec!["10.0.0.9/24", "10.0.0.5"]
        );
    }
}
