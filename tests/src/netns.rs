//! Real interfaces: network namespaces as pods, a veth link as the macvlan master, Debian's
//! containernetworking-plugins as the main plugins delegating to `tether`. Root only.
//! [`Wiring`] is how a harness gives its pods their interfaces: so, or by calling `tether`
//! directly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{CniOutcome, Ipam, Pod, bin_dir, cni_exec};

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

/// Whether `test` wires real interfaces: true when it can; otherwise it fails in CI and,
/// elsewhere, prints a note and goes on without them (false): `without` says what it does then.
pub fn real_or_fallback(test: &str, without: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if crate::in_ci() => {
            panic!("{test} cannot wire real interfaces, and in CI (CI is set) it must: {why}")
        }
        Some(why) => {
            eprintln!(
                "NOTE {test}: no real interfaces ({why}); {without} (with CI set, this is a failure)"
            );
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

/// A set of namespaces and a master link, removed on drop. Shareable between threads: pods
/// of several nodes may get their namespaces at once, on one L2 segment (the master).
pub struct Lab {
    tag: String,
    pub master: String,
    namespaces: Mutex<Vec<String>>,
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
            namespaces: Mutex::default(),
            cni_path,
        })
    }

    /// A new namespace (a pod sandbox), replacing one of the same name; returns its path.
    pub fn netns(&self, name: &str) -> Result<PathBuf> {
        let ns = format!("{}-{name}", self.tag);
        let _ = ip(&["netns", "del", &ns]);
        {
            let mut known = self.known();
            if !known.contains(&ns) {
                known.push(ns.clone());
            }
        }
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(self.netns_path(name))
    }

    /// The path namespace `name` has, whether or not it exists.
    pub fn netns_path(&self, name: &str) -> PathBuf {
        PathBuf::from("/var/run/netns").join(format!("{}-{name}", self.tag))
    }

    /// Removes namespace `name` and the interfaces in it; one this lab did not make is left.
    pub fn remove_netns(&self, name: &str) -> Result<()> {
        let ns = format!("{}-{name}", self.tag);
        let known = {
            let mut known = self.known();
            let before = known.len();
            known.retain(|n| n != &ns);
            known.len() != before
        };
        if known {
            ip(&["netns", "del", &ns])
        } else {
            Ok(())
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
        for ns in self.known().iter() {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.master]);
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// How pods get their interfaces.
#[derive(Clone)]
pub enum Wiring {
    /// `tether` called directly, as a main plugin delegating to its IPAM would.
    Ipam(Ipam),
    /// Real interfaces: per pod a namespace of `lab` (named after the pod's UID), wired by the
    /// main plugin of `conf`, which delegates to `tether`.
    Real { lab: Arc<Lab>, conf: Value },
}

impl Wiring {
    /// The same wiring, its IPAM now `ipam`'s (another daemon's socket, after a restart): for
    /// real interfaces, the main plugin's `ipam` section.
    pub fn with_ipam(&self, ipam: Ipam) -> Wiring {
        match self {
            Wiring::Ipam(_) => Wiring::Ipam(ipam),
            Wiring::Real { lab, conf } => {
                let mut conf = conf.clone();
                conf["ipam"] = ipam.conf["ipam"].clone();
                Wiring::Real {
                    lab: lab.clone(),
                    conf,
                }
            }
        }
    }

    /// The namespace of `pod`: short and unique, the last 12 hex digits of its UID.
    fn sandbox(pod: &Pod) -> String {
        let hex: Vec<char> = pod.uid.chars().filter(char::is_ascii_hexdigit).collect();
        let tail: String = hex[hex.len().saturating_sub(12)..].iter().collect();
        format!("p{tail}")
    }

    /// ADD: for real interfaces, in a new namespace (replacing one left by a failed ADD).
    pub fn add(&self, pod: &Pod) -> Result<CniOutcome> {
        match self {
            Wiring::Ipam(i) => i.add(pod),
            Wiring::Real { lab, conf } => {
                let ns = lab.netns(&Self::sandbox(pod))?;
                lab.exec(conf, "ADD", pod, &ns)
            }
        }
    }

    /// DEL: for real interfaces, in the pod's namespace, which is then removed.
    pub fn del(&self, pod: &Pod) -> Result<CniOutcome> {
        match self {
            Wiring::Ipam(i) => i.del(pod),
            Wiring::Real { lab, conf } => {
                let name = Self::sandbox(pod);
                let out = lab.exec(conf, "DEL", pod, &lab.netns_path(&name));
                lab.remove_netns(&name)?;
                out
            }
        }
    }

    /// Whether `from`'s namespace reaches `to`; `None` without real interfaces.
    pub fn ping(&self, from: &Pod, to: &str) -> Option<bool> {
        match self {
            Wiring::Ipam(_) => None,
            Wiring::Real { lab, .. } => Some(lab.ping(&lab.netns_path(&Self::sandbox(from)), to)),
        }
    }

    /// The addresses of `pod`'s interface in its namespace; `None` without real interfaces.
    pub fn addresses(&self, pod: &Pod) -> Option<Result<String>> {
        match self {
            Wiring::Ipam(_) => None,
            Wiring::Real { lab, .. } => {
                Some(lab.addresses(&lab.netns_path(&Self::sandbox(pod)), &pod.ifname))
            }
        }
    }
}
