//! Kubernetes mode at scale: eight `tetherd --kubernetes` processes as eight nodes against one
//! kube-apiserver (v1.20.2, loopback) allocate addresses for N pods (default 2,000) from one
//! shared pool concurrently, through the shipped `tether` plugin, then release them. Checks
//! zero duplicates and zero leaks; measures allocations per second, ADD latency (p50, p99),
//! store conflicts per allocation, apiserver requests per allocation and daemon memory. In the
//! same run it measures the ceiling: a plain client creating as many small objects (address
//! objects, as the daemons write) with the same number of concurrent callers.
//! Prints a Markdown section for docs/benchmarks.md.
//!
//!   kube-bench [PODS] [NODES] [CALLERS_PER_NODE]     (default 2000 8 4)

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Pod as KPod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tether_core::alloc::{Allocation, Attachment, Holder, Owner};
use tether_e2e::cluster::Cluster;
use tether_e2e::{Daemon, Ipam, Pod};
use tether_kube::crd::{IPAllocation, IPPool};

const POOL: &str = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: shared}\nspec: {subnet: 10.20.0.0/16, ips: [10.20.0.1-10.20.31.254]}\n";

fn rss_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| field.to_owned())?;
    Ok(kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sum of a Prometheus counter's samples in a /metrics text.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `work` for every item with `callers` threads per group; returns each item's latency.
fn run_calls<T: Sync>(
    groups: &[(usize, Vec<T>)],
    callers: usize,
    work: &(dyn Fn(usize, &T) -> Result<()> + Sync),
) -> Result<Vec<Duration>> {
    let lat = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (g, items) in groups {
            let chunk = items.len().div_ceil(callers).max(1);
            for part in items.chunks(chunk) {
                let (lat, errors) = (&lat, &errors);
                s.spawn(move || {
                    for item in part {
                        let t = Instant::now();
                        match work(*g, item) {
                            Ok(()) => lat
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(t.elapsed()),
                            Err(e) => errors
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(format!("{e:#}")),
                        }
                    }
                });
            }
        }
    });
    let errors = errors.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = errors.first() {
        bail!("{} calls failed; first: {e}", errors.len());
    }
    let mut v = lat.into_inner().unwrap_or_else(|e| e.into_inner());
    v.sort();
    Ok(v)
}

fn main() -> Result<()> {
    let arg = |i: usize, d: usize| -> Result<usize> {
        std::env::args()
            .nth(i)
            .map_or(Ok(d), |s| s.parse().context("a number"))
    };
    let (pods, nodes, callers) = (arg(1, 2000)?, arg(2, 8)?, arg(3, 4)?);
    let cluster = Cluster::start(false)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(cluster.install_crds(&client))?;
    let pool: IPPool = yaml_serde::from_str(POOL)?;
    rt.block_on(Api::<IPPool>::all(client.clone()).create(&PostParams::default(), &pool))?;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    rt.block_on(
        Api::<ServiceAccount>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &sa),
    )?;
    let objects: Api<IPAllocation> = Api::all(client.clone());
    let total_callers = nodes * callers;

    // The ceiling: the same number of callers creating (then deleting) small objects.
    let ceiling = rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..total_callers {
            let api = objects.clone();
            let per = pods.div_ceil(total_callers);
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    let n = c * per + i;
                    let ip = std::net::Ipv4Addr::from(0x0a15_0000 + n as u32);
                    let o = IPAllocation::from_allocation(&Allocation {
                        pool: "ceiling".into(),
                        ip: ip.into(),
                        network: "bench".into(),
                        interface: "eth0".into(),
                        owner: Owner::Ephemeral,
                        holders: vec![Holder {
                            attachment: Attachment {
                                container_id: format!("ceiling-{n}"),
                                ifname: "eth0".into(),
                                namespace: "default".into(),
                                pod: format!("ceiling-{n}"),
                                pod_uid: format!("uid-{n}"),
                            },
                            shared: false,
                            node: String::new(),
                            since: 1_700_000_000,
                        }],
                        idle_since: None,
                        revision: 0,
                    });
                    api.create(&PostParams::default(), &o).await?;
                }
                anyhow::Ok(per)
            }));
        }
        let mut created = 0;
        for t in tasks {
            created += t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        objects
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        anyhow::Ok(created as f64 / secs)
    })?;

    // The pods, bound to their nodes (not timed), then one daemon per node.
    let node_names: Vec<String> = (0..nodes).map(|i| format!("node-{i}")).collect();
    let mut by_node: Vec<(usize, Vec<Pod>)> = (0..nodes).map(|i| (i, Vec::new())).collect();
    rt.block_on(async {
        let api: Api<KPod> = Api::namespaced(client.clone(), "default");
        let mut tasks = Vec::new();
        for c in 0..total_callers {
            let api = api.clone();
            let names = node_names.clone();
            let per = pods.div_ceil(total_callers);
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (c * per)..((c + 1) * per).min(pods) {
                    let node = i % names.len();
                    let p: KPod = serde_json::from_value(json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": format!("p-{i}"), "namespace": "default"},
                        "spec": {"nodeName": names[node], "automountServiceAccountToken": false,
                                 "containers": [{"name": "c", "image": "x"}]}}))?;
                    let created = api.create(&PostParams::default(), &p).await?;
                    let uid = created.metadata.uid.context("uid")?;
                    let mut pod = Pod::new("default", &format!("p-{i}"), 0);
                    pod.container_id = format!("k-{}", uid.replace('-', ""));
                    pod.uid = uid;
                    out.push((node, pod));
                }
                anyhow::Ok(out)
            }));
        }
        for t in tasks {
            for (node, pod) in t.await?? {
                by_node[node].1.push(pod);
            }
        }
        anyhow::Ok(())
    })?;
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let daemons: Vec<Daemon> = node_names
        .iter()
        .map(|n| {
            Daemon::start(
                "",
                &[
                    "--kubernetes",
                    "--node-name",
                    n,
                    "--kubeconfig",
                    &kubeconfig,
                    "--lease-namespace",
                    "default",
                    "--log-level",
                    "warn",
                ],
            )
        })
        .collect::<Result<_>>()?;
    let mut ipams: Vec<Ipam> = daemons
        .iter()
        .map(|d| Ipam::new(&d.socket, "bench", "1.0.0", &["shared"]))
        .collect::<Result<_>>()?;
    // The plugin as shipped (scripts/dist.sh), when given.
    if let Some(p) = std::env::var_os("TETHER_CNI_PLUGIN") {
        for i in &mut ipams {
            i.plugin = p.clone().into();
        }
    }
    let api_metrics = || -> Result<f64> {
        let text =
            rt.block_on(client.request_text(http::Request::get("/metrics").body(Vec::new())?))?;
        Ok(counter(&text, "apiserver_request_total"))
    };
    let conflicts = || -> Result<f64> {
        let mut sum = 0.0;
        for d in &daemons {
            sum += counter(
                &d.client().get_text("/metrics")?,
                "tether_store_conflicts_total",
            );
        }
        Ok(sum)
    };
    let rss_before: f64 = daemons
        .iter()
        .map(|d| rss_mib(d.pid(), "VmRSS:"))
        .sum::<Result<f64>>()?;

    // Allocate.
    let (req0, conf0) = (api_metrics()?, conflicts()?);
    let started = Instant::now();
    let add_lat = run_calls(&by_node, callers, &|g, pod: &Pod| {
        let o = ipams[g].add(pod)?;
        ensure!(o.ok, "ADD {}: {}", pod.name, o.out);
        Ok(())
    })?;
    let add_secs = started.elapsed().as_secs_f64();
    let (req1, conf1) = (api_metrics()?, conflicts()?);
    let list = rt.block_on(objects.list(&ListParams::default()))?.items;
    let distinct: HashSet<std::net::IpAddr> = list.iter().map(|o| o.spec.address).collect();
    ensure!(list.len() == pods, "{} objects for {pods} pods", list.len());
    ensure!(
        distinct.len() == pods,
        "duplicates: {} distinct addresses for {pods} pods",
        distinct.len()
    );
    let rss: Vec<f64> = daemons
        .iter()
        .map(|d| rss_mib(d.pid(), "VmRSS:"))
        .collect::<Result<_>>()?;
    let hwm: Vec<f64> = daemons
        .iter()
        .map(|d| rss_mib(d.pid(), "VmHWM:"))
        .collect::<Result<_>>()?;

    // Release.
    let started = Instant::now();
    let del_lat = run_calls(&by_node, callers, &|g, pod: &Pod| {
        let o = ipams[g].del(pod)?;
        ensure!(o.ok, "DEL {}: {}", pod.name, o.out);
        Ok(())
    })?;
    let del_secs = started.elapsed().as_secs_f64();
    let left = rt
        .block_on(objects.list(&ListParams::default()))?
        .items
        .len();
    ensure!(left == 0, "{left} address objects leaked after every DEL");

    let n = pods as f64;
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let rate = n / add_secs;
    println!("## Kubernetes mode: {nodes} nodes, one shared pool, {total_callers} callers\n");
    println!(
        "`kube-bench {pods} {nodes} {callers}`: {nodes} `tetherd --kubernetes` processes (release) as {nodes} nodes against one kube-apiserver v1.20.2 with etcd (`--unsafe-no-fsync`) on loopback, all on this machine. {pods} pods exist (bound to the nodes, in each daemon's cache); {callers} caller{} per node run{} the shipped plugin (`ADD`, then `DEL`) for that node's pods, {total_callers} at once. The ceiling is a plain kube-rs client creating {pods} address objects with {total_callers} concurrent callers, in the same run.\n",
        if callers == 1 { "" } else { "s" },
        if callers == 1 { "s" } else { "" }
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| allocations per second (ADD, all nodes) | {rate:.0} |");
    println!("| ceiling: plain creates per second, same concurrency | {ceiling:.0} |");
    println!("| allocations / ceiling | {:.2} |", rate / ceiling);
    println!(
        "| ADD latency p50 / p99 | {} / {} |",
        ms(percentile(&add_lat, 0.5)),
        ms(percentile(&add_lat, 0.99))
    );
    println!("| releases per second (DEL) | {:.0} |", n / del_secs);
    println!(
        "| DEL latency p50 / p99 | {} / {} |",
        ms(percentile(&del_lat, 0.5)),
        ms(percentile(&del_lat, 0.99))
    );
    println!(
        "| store conflicts per allocation | {:.3} |",
        (conf1 - conf0) / n
    );
    println!(
        "| apiserver requests per allocation (all clients) | {:.2} |",
        (req1 - req0) / n
    );
    println!(
        "| daemon memory after the ADDs, max of {nodes} (RSS / peak) | {:.1} MiB / {:.1} MiB |",
        max(&rss),
        max(&hwm)
    );
    println!(
        "| daemon memory before, mean | {:.1} MiB |",
        rss_before / nodes as f64
    );
    println!("| duplicates / leaked objects | 0 / 0 (checked) |");
    println!();
    drop(daemons);
    Ok(())
}
