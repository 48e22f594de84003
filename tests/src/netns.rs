//! Real interfaces: network namespaces as pods, a veth link as the macvlan master, Debian's
//! containernetworking-plugins as the main plugins delegating to `tether`. Root only.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{CniOutcome, Pod, bin_dir, cni_exec};

/// Where Debian installs the reference plugins.
pub const CNI_BIN: &str = "/usr/lib/cni";

/// Why real interfaces cannot be wired here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("not root: network namespaces and macvlan need root".into());
    }
    for p in ["macvlan", "bridge"] {
        if !Path::new(CNI_BIN).join(p).exists() {
            return Some(format!(
                "{CNI_BIN}/{p} is missing: install Debian's containernetworking-plugins (scripts/setup.sh does)"
            ));
        }
    }
    if Command::new("ping").arg("-V").output().is_err() {
        return Some("ping is missing: install iputils-ping".into());
    }
    None
}

/// Whether `test` can wire real interfaces: true when it can; otherwise, through
/// [`crate::skip_or_fail`], a failure in CI and a printed SKIPPED (false: return) elsewhere.
pub fn require_real_setup(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            crate::skip_or_fail(test, &why);
            false
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// A set of namespaces and a master link, removed on drop.
pub struct Lab {
    tag: String,
    pub master: String,
    namespaces: Vec<String>,
    cni_path: tempfile::TempDir,
}

impl Lab {
    /// `tag` keeps names unique between tests (at most 8 characters).
    pub fn new(tag: &str) -> Result<Lab> {
        let master = format!("{tag}m0");
        let peer = format!("{tag}m1");
        let _ = ip(&["link", "del", &master]);
        ip(&[
            "link", "add", &master, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &master, "up"])?;
        ip(&["link", "set", &peer, "up"])?;
        let cni_path = tempfile::tempdir()?;
        std::os::unix::fs::symlink(bin_dir()?.join("tether"), cni_path.path().join("tether"))?;
        Ok(Lab {
            tag: tag.to_owned(),
            master,
            namespaces: Vec::new(),
            cni_path,
        })
    }

    /// A new namespace (a pod sandbox); returns its path.
    pub fn netns(&mut self, name: &str) -> Result<PathBuf> {
        let ns = format!("{}-{name}", self.tag);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.namespaces.push(ns.clone());
        Ok(PathBuf::from("/var/run/netns").join(ns))
    }

    /// The Linux bridge the bridge plugin creates for this lab.
    pub fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// CNI_PATH holding `tether` and the reference plugins.
    pub fn cni_path(&self) -> String {
        format!("{}:{CNI_BIN}", self.cni_path.path().display())
    }

    /// A network config: `plugin` (macvlan on the master, or bridge on a bridge of its own),
    /// IPAM by tether.
    pub fn network(&self, plugin: &str, socket: &Path, version: &str, pools: &[&str]) -> Value {
        let mut conf = json!({
            "cniVersion": version,
            "name": format!("{plugin}-net"),
            "type": plugin,
            "master": self.master,
            "ipam": {"type": "tether", "socket": socket, "pools": pools},
        });
        match plugin {
            "macvlan" => conf["mode"] = json!("bridge"),
            "bridge" => {
                conf["bridge"] = json!(self.bridge());
                conf["isGateway"] = json!(false);
                conf["ipMasq"] = json!(false);
                if let Some(o) = conf.as_object_mut() {
                    o.remove("master");
                }
            }
            _ => {}
        }
        conf
    }

    /// Runs the main plugin for a pod in `netns`.
    pub fn exec(&self, conf: &Value, command: &str, pod: &Pod, netns: &Path) -> Result<CniOutcome> {
        let plugin = Path::new(CNI_BIN).join(conf["type"].as_str().unwrap_or("macvlan"));
        let args = pod.cni_args();
        let ns = netns.display().to_string();
        cni_exec(
            &plugin,
            command,
            conf,
            &[
                ("CNI_CONTAINERID", &pod.container_id),
                ("CNI_IFNAME", &pod.ifname),
                ("CNI_NETNS", &ns),
                ("CNI_ARGS", &args),
            ],
            &self.cni_path(),
        )
    }

    /// The addresses of `ifname` inside a namespace.
    pub fn addresses(&self, netns: &Path, ifname: &str) -> Result<String> {
        let name = netns
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let o = Command::new("ip")
            .args(["-n", name, "-o", "addr", "show", "dev", ifname])
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    }

    /// One ping from a namespace; true when it was answered.
    pub fn ping(&self, from: &Path, to: &str) -> bool {
        let name = from
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        Command::new("ip")
            .args([
                "netns", "exec", name, "ping", "-c", "2", "-W", "2", "-i", "0.2", to,
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.master]);
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}
