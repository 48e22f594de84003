//! The seed's walkthrough (Spiderpool's KubeVirt page, on Tether): a VM keeps its address
//! across pod restart, VMI recreation and live migration; a StatefulSet pod keeps its address
//! per name; a Deployment pod gets a fresh one; deleting the VM frees its address; the pool
//! can run out with a clear error; VM pinning can be switched off.
//!
//! It runs on the embedded default (standalone tetherd, embedded store). With real interfaces
//! (root), every pod is a network namespace wired by Debian's macvlan plugin, which delegates
//! to `tether`, and the VM's namespace pings another pod's.

use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::{Lab, Wiring};
use crate::{CniOutcome, Daemon, Ipam, Pod, SEED_POOL, manifests};

/// One line of the walkthrough's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub step: String,
    pub pod: String,
    pub ip: String,
    pub promise: String,
    pub held: bool,
}

fn ip_of(o: &CniOutcome) -> Result<String> {
    o.ip().with_context(|| format!("ADD failed: {}", o.out))
}

/// Runs the walkthrough; `report` sees each row as it happens.
pub fn run(real_interfaces: bool, report: &mut dyn FnMut(&Row)) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut row =
        |step: &str, pod: &str, ip: &str, promise: &str, held: bool, rows: &mut Vec<Row>| {
            let r = Row {
                step: step.into(),
                pod: pod.into(),
                ip: ip.into(),
                promise: promise.into(),
                held,
            };
            report(&r);
            rows.push(r);
        };
    let d = Daemon::start(SEED_POOL, &[])?;
    let mut net = if real_interfaces {
        let lab = Lab::new("tthr")?;
        let conf = lab.network("macvlan", &d.socket, "1.0.0", &["test-ippool"]);
        Wiring::Real {
            lab: Arc::new(lab),
            conf,
        }
    } else {
        Wiring::Ipam(Ipam::new(
            &d.socket,
            "macvlan-net",
            "1.0.0",
            &["test-ippool"],
        )?)
    };

    // 1. The VM starts: VirtualMachine, VMI, virt-launcher pod.
    let (vm_uid, vmi1) = ("vm-uid-1", "vmi-uid-1");
    d.put_manifest("vm", &manifests::vm("vm-cirros", vm_uid))?;
    d.put_manifest("vmi", &manifests::vmi("vm-cirros", vmi1, vm_uid))?;
    let a = Pod::new("default", "virt-launcher-vm-cirros-rg6fs", 1);
    d.put_manifest("pod-a", &manifests::launcher(&a, "vm-cirros", vmi1, None))?;
    let vm_ip = ip_of(&net.add(&a)?)?;
    let in_pool = vm_ip.starts_with("10.6.168.");
    row(
        "VM vm-cirros starts",
        &a.name,
        &vm_ip,
        "gets an address of test-ippool",
        in_pool,
        &mut rows,
    );

    // 2. The virt-launcher pod is deleted and recreated under a new name.
    net.del(&a)?;
    d.remove_manifest("pod-a")?;
    let b = Pod::new("default", "virt-launcher-vm-cirros-x2mqv", 2);
    d.put_manifest("pod-b", &manifests::launcher(&b, "vm-cirros", vmi1, None))?;
    let ip = ip_of(&net.add(&b)?)?;
    row(
        "virt-launcher pod recreated",
        &b.name,
        &ip,
        "same IP as before",
        ip == vm_ip,
        &mut rows,
    );

    // 3. The VMI is deleted and recreated (new uid), with a new pod.
    net.del(&b)?;
    d.remove_manifest("pod-b")?;
    d.remove_manifest("vmi")?;
    let vmi2 = "vmi-uid-2";
    d.put_manifest("vmi", &manifests::vmi("vm-cirros", vmi2, vm_uid))?;
    let c = Pod::new("default", "virt-launcher-vm-cirros-k8d4w", 3);
    d.put_manifest("pod-c", &manifests::launcher(&c, "vm-cirros", vmi2, None))?;
    let ip = ip_of(&net.add(&c)?)?;
    row(
        "VMI deleted and recreated",
        &c.name,
        &ip,
        "same IP as before",
        ip == vm_ip,
        &mut rows,
    );

    // 4. Live migration: the target pod starts while the source still runs.
    let t = Pod::new("default", "virt-launcher-vm-cirros-tgt9z", 4);
    d.put_manifest(
        "pod-t",
        &manifests::launcher(&t, "vm-cirros", vmi2, Some("mig-uid-1")),
    )?;
    let ip = ip_of(&net.add(&t)?)?;
    let holders = holders_of(&d, &vm_ip)?;
    row(
        "live migration: target pod starts",
        &t.name,
        &ip,
        "source and target hold the IP together",
        ip == vm_ip && holders == 2,
        &mut rows,
    );
    net.del(&c)?;
    d.remove_manifest("pod-c")?;
    let holders = holders_of(&d, &vm_ip)?;
    row(
        "live migration: source pod deleted",
        &c.name,
        &vm_ip,
        "the source's DEL keeps the IP for the target",
        holders == 1,
        &mut rows,
    );

    // 5. A Deployment pod: a fresh address; the VM talks to it over macvlan.
    let e = Pod::new("default", "cart-7d9f8b6c5-q2x8z", 5);
    d.put_manifest("pod-e", &manifests::deployment_pod(&e))?;
    let (before, _) = d.usage("test-ippool")?;
    let dep_ip = ip_of(&net.add(&e)?)?;
    row(
        "Deployment pod starts",
        &e.name,
        &dep_ip,
        "gets a fresh IP",
        dep_ip != vm_ip,
        &mut rows,
    );
    if let Some(ok) = net.ping(&t, &dep_ip) {
        row(
            "VM pings the Deployment pod",
            &t.name,
            &dep_ip,
            "underlay connectivity over macvlan",
            ok,
            &mut rows,
        );
    }
    net.del(&e)?;
    d.remove_manifest("pod-e")?;
    let (after, _) = d.usage("test-ippool")?;
    row(
        "Deployment pod deleted",
        &e.name,
        &dep_ip,
        "its IP is released",
        after == before,
        &mut rows,
    );

    // 6. A StatefulSet replica recreated under the same name keeps its address.
    d.put_manifest("sts", &manifests::statefulset("web", 1))?;
    let w1 = Pod::new("default", "web-0", 6);
    d.put_manifest("pod-web", &manifests::sts_pod(&w1, "web"))?;
    let sts_ip = ip_of(&net.add(&w1)?)?;
    net.del(&w1)?;
    let w2 = Pod::new("default", "web-0", 7);
    d.put_manifest("pod-web", &manifests::sts_pod(&w2, "web"))?;
    let ip = ip_of(&net.add(&w2)?)?;
    row(
        "StatefulSet pod web-0 recreated",
        &w2.name,
        &ip,
        "same IP per pod name",
        ip == sts_ip,
        &mut rows,
    );

    // 7. The VM is deleted: its address is released. (This daemon judges the workloads at
    // once, `--workloads-settle-secs 0` being `Daemon`'s default; tetherd's own default would
    // release it once the directory has been left alone for 5 s.)
    net.del(&t)?;
    for m in ["pod-t", "vmi", "vm"] {
        d.remove_manifest(m)?;
    }
    let released = d.reconcile()?;
    let freed = released.iter().any(|r| r.ends_with(&format!("/{vm_ip}")));
    row(
        "VM deleted",
        "-",
        &vm_ip,
        "its IP is released",
        freed,
        &mut rows,
    );

    // 8. The pool runs out: a clear error, then everything is given back.
    let (used, total) = d.usage("test-ippool")?;
    let mut fillers = Vec::new();
    for i in 0..(total - used) {
        let p = Pod::new("default", &format!("filler-{i}"), 100 + i as u32);
        let o = net.add(&p)?;
        ip_of(&o)?;
        fillers.push(p);
    }
    let extra = Pod::new("default", "one-too-many", 200);
    let o = net.add(&extra)?;
    let msg = o.out["msg"].as_str().unwrap_or("").to_owned();
    row(
        "pool exhausted",
        &extra.name,
        "-",
        "ADD fails with code 100 and says the pool is exhausted",
        !o.ok && o.code() == Some(100) && msg.contains("exhausted"),
        &mut rows,
    );
    for p in &fillers {
        net.del(p)?;
    }
    net.del(&extra)?;
    net.del(&w2)?;

    // 9. VM pinning switched off (ipam.enableKubevirtStaticIP=false): VM pods are stateless.
    let dir = d.stop()?;
    let d = Daemon::start_in(dir, SEED_POOL, &["--enable-kubevirt-static-ip=false"])?;
    net = net.with_ipam(Ipam::new(
        &d.socket,
        "macvlan-net",
        "1.0.0",
        &["test-ippool"],
    )?);
    d.put_manifest("vm", &manifests::vm("vm-cirros", vm_uid))?;
    d.put_manifest("vmi", &manifests::vmi("vm-cirros", "vmi-uid-3", vm_uid))?;
    let g = Pod::new("default", "virt-launcher-vm-cirros-off01", 8);
    d.put_manifest(
        "pod-g",
        &manifests::launcher(&g, "vm-cirros", "vmi-uid-3", None),
    )?;
    let (before, _) = d.usage("test-ippool")?;
    let ip = ip_of(&net.add(&g)?)?;
    let owner = d
        .allocations()?
        .iter()
        .find(|a| a["ip"] == ip.as_str())
        .map(|a| a["owner"]["type"].clone())
        .unwrap_or(Value::Null);
    net.del(&g)?;
    let (used, _) = d.usage("test-ippool")?;
    row(
        "VM pinning off: VM pod starts and is deleted",
        &g.name,
        &ip,
        "the VM pod is stateless: ephemeral, released on DEL",
        owner == "ephemeral" && used == before,
        &mut rows,
    );
    Ok(rows)
}

fn holders_of(d: &Daemon, ip: &str) -> Result<usize> {
    Ok(d.allocations()?
        .iter()
        .find(|a| a["ip"] == ip)
        .and_then(|a| a["holders"].as_array().map(Vec::len))
        .unwrap_or(0))
}
