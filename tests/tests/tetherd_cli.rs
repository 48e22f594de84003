//! `tetherd` as a person or a script meets it: `tetherd run` started in the background and
//! `tetherd wait` until it serves (the README tour), the one "ready" line at the default log
//! level, errors printed once, colours only on a terminal.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tether_e2e::{SEED_POOL, bin_dir};

fn tetherd() -> Command {
    Command::new(bin_dir().expect("bin dir").join("tetherd"))
}

fn wait(socket: &Path, timeout_secs: u64) -> Output {
    tetherd()
        .arg("wait")
        .arg("--socket")
        .arg(socket)
        .args(["--timeout-secs", &timeout_secs.to_string()])
        .env_remove("TETHER_SOCKET")
        .output()
        .expect("tetherd wait")
}

/// Kills the daemon when the test ends, whatever happens.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn wait_returns_once_the_daemon_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("tether.sock");
    std::fs::write(dir.path().join("pools.yaml"), SEED_POOL).expect("pools");

    // Nothing there: a clear message once the timeout passes.
    let started = Instant::now();
    let o = wait(&socket, 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains("not ready after 1s") && err.contains(&socket.display().to_string()),
        "{err}"
    );

    // Started in the background at the default log level, waited for, then used at once.
    let log = dir.path().join("tetherd.log");
    let _daemon = Running(
        tetherd()
            .arg("run")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--pools")
            .arg(dir.path().join("pools.yaml"))
            .arg("--socket")
            .arg(&socket)
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("tetherd run"),
    );
    let o = wait(&socket, 60);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("tetherd is ready at {}", socket.display())
    );
    let pools: tether_api::PoolList =
        tether_api::client::Client::new(&socket, Duration::from_secs(5))
            .get("/v1/pools")
            .expect("serving once wait returned");
    assert_eq!(pools.pools.len(), 1);

    // The default level shows the one ready line, and a log file gets no colours.
    let text = std::fs::read_to_string(&log).expect("log");
    let ready = format!("ready, listening on {}", socket.display());
    assert_eq!(text.matches(&ready).count(), 1, "{text}");
    assert_eq!(
        text.lines().count(),
        1,
        "nothing else at the default level: {text}"
    );
    assert!(
        !text.contains('\x1b'),
        "no ANSI escapes in a file: {text:?}"
    );
}

#[test]
fn errors_are_printed_once_and_coloured_only_on_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |d: &Path| -> Vec<String> {
        vec![
            "run".into(),
            "--state-dir".into(),
            d.join("state").display().to_string(),
            "--pools".into(),
            d.join("missing.yaml").display().to_string(),
            "--socket".into(),
            d.join("tether.sock").display().to_string(),
        ]
    };
    let o = tetherd()
        .args(args(dir.path()))
        .env_remove("TETHER_LOG")
        .env_remove("NO_COLOR")
        .output()
        .expect("tetherd run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error, printed once: {err}");
    assert!(
        lines[0].contains("ERROR") && lines[0].contains("missing.yaml"),
        "{err}"
    );
    assert!(
        !err.contains('\x1b'),
        "no colours when stderr is not a terminal: {err:?}"
    );

    // On a terminal (script(1) provides one): coloured, unless NO_COLOR says otherwise.
    if Command::new("script").arg("--version").output().is_err() {
        tether_e2e::skip_or_fail(
            "errors_are_printed_once_and_coloured_only_on_a_terminal (the terminal half)",
            "script(1) is missing (Debian's bsdutils)",
        );
        return;
    }
    let cmd = std::iter::once(
        bin_dir()
            .expect("bin dir")
            .join("tetherd")
            .display()
            .to_string(),
    )
    .chain(args(dir.path()))
    .map(|a| format!("'{a}'"))
    .collect::<Vec<_>>()
    .join(" ");
    let on_tty = |no_color: Option<&str>| -> String {
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env_remove("TETHER_LOG")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null());
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        let o = c.output().expect("script");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let tty = on_tty(None);
    assert!(tty.contains("missing.yaml"), "{tty:?}");
    assert!(tty.contains("\x1b["), "coloured on a terminal: {tty:?}");
    let plain = on_tty(Some("1"));
    assert!(plain.contains("missing.yaml"), "{plain:?}");
    assert!(!plain.contains("\x1b["), "NO_COLOR: {plain:?}");
}

/// A log filter that does not parse is not dropped in silence: the daemon says so, and logs
/// with the default filter (its error is still printed).
#[test]
fn an_invalid_log_filter_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let o = tetherd()
        .arg("run")
        .arg("--state-dir")
        .arg(d.join("state"))
        .arg("--pools")
        .arg(d.join("missing.yaml"))
        .arg("--socket")
        .arg(d.join("tether.sock"))
        .args(["--log-level", "tether_engine=loud"])
        .env_remove("TETHER_LOG")
        .output()
        .expect("tetherd run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("WARN")
            && err.contains("the log filter")
            && err.contains("tether_engine=loud"),
        "the invalid filter was not reported: {err}"
    );
    assert!(err.contains("missing.yaml"), "{err}");
}

/// A `--socket` naming something that is not a socket (a mistyped path onto a file, a
/// directory, a symbolic link) is refused, and what is there is left as it was.
#[test]
fn a_socket_path_onto_something_else_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, SEED_POOL).expect("pools");
    let file = dir.path().join("precious");
    std::fs::write(&file, "keep me").expect("file");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let sub = dir.path().join("a-directory");
    std::fs::create_dir(&sub).expect("dir");
    for target in [&file, &link, &sub] {
        let out = tetherd()
            .arg("run")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--pools")
            .arg(&pools)
            .arg("--socket")
            .arg(target)
            .output()
            .expect("tetherd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {stderr}", target.display());
        assert!(stderr.contains("is not a socket"), "{stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "keep me"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert!(sub.is_dir());
}
