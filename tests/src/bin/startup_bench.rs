//! tetherd with a million addresses in use: fills an embedded store directly (as a long-lived
//! node would have it), then measures what an operator feels: the time from `tetherd run` to
//! ready, the daemon's resident memory, and CNI ADD+DEL latency through the plugin while the
//! pool holds that many allocations. Prints a Markdown section for docs/benchmarks.md.
//!
//!   startup-bench [ALLOCATIONS]      (default 1,000,000)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tether_core::alloc::{Allocation, Attachment, Change, Holder, Owner};
use tether_e2e::{Daemon, bin_dir, cni_exec};
use tether_store::Store;
use tether_store::embedded::EmbeddedStore;

const POOL: &str = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: big}\nspec: {subnet: 10.0.0.0/8}\n";
const CHUNK: usize = 50_000;

/// The n-th allocation: every other address of 10.0.0.0/8 (a fragmented pool), ephemeral,
/// held by one container.
fn allocation(n: u32) -> Allocation {
    let ip = std::net::Ipv4Addr::from(0x0a00_0002 + 2 * n);
    let id = format!("container-{n:08x}");
    Allocation {
        pool: "big".into(),
        ip: ip.into(),
        network: "bench".into(),
        interface: "eth0".into(),
        owner: Owner::Ephemeral,
        holders: vec![Holder {
            attachment: Attachment {
                container_id: id,
                ifname: "eth0".into(),
                namespace: "default".into(),
                pod: format!("pod-{n}"),
                pod_uid: format!("uid-{n}"),
            },
            shared: false,
            node: String::new(),
            since: 1_700_000_000,
        }],
        idle_since: None,
        revision: 0,
    }
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

fn main() -> Result<()> {
    let n: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    let fill_started = Instant::now();
    {
        let store = EmbeddedStore::open(&state.join("tether.redb"))?;
        let mut done = 0u32;
        while done < n {
            let upto = (done + CHUNK as u32).min(n);
            // One group per allocation, one transaction per chunk.
            let groups: Vec<Vec<Change>> = (done..upto)
                .map(|i| vec![Change::Put(allocation(i))])
                .collect();
            let out = store.commit(&groups)?;
            if let Some(conflict) = out.into_iter().find_map(Result::err) {
                bail!("filling the store: {conflict}");
            }
            done = upto;
            eprint!("\rfilling the store: {done}/{n}");
        }
        eprintln!();
    }
    let fill = fill_started.elapsed();
    let file_mib = std::fs::metadata(state.join("tether.redb"))?.len() as f64 / (1 << 20) as f64;

    let started = Instant::now();
    let d = Daemon::start_in(dir, POOL, &["--log-level", "warn"])?;
    let ready = started.elapsed();
    let rss = rss_mib(d.pid())?;
    let (used, total) = d.usage("big")?;
    if used != u64::from(n) {
        bail!("the daemon loaded {used} allocations, not {n}");
    }

    let plugin = std::env::var_os("TETHER_CNI_PLUGIN")
        .map(PathBuf::from)
        .map_or_else(|| bin_dir().map(|d| d.join("tether")), Ok)?;
    let conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
        "ipam": {"type": "tether", "socket": d.socket, "pools": ["big"]}});
    let mut adds = Vec::new();
    for i in 0..200 {
        let id = format!("probe-{i}");
        let env = [
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/bench"),
        ];
        let t = Instant::now();
        let o = cni_exec(&plugin, "ADD", &conf, &env, "/usr/lib/cni")?;
        adds.push(t.elapsed());
        if !o.ok {
            bail!("ADD failed: {}", o.out);
        }
        let o = cni_exec(&plugin, "DEL", &conf, &env, "/usr/lib/cni")?;
        if !o.ok {
            bail!("DEL failed: {}", o.out);
        }
    }
    adds.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    println!("## A node with {n} addresses in use\n");
    println!("An embedded store filled with {n} ephemeral allocations (every other address of");
    println!(
        "10.0.0.0/8, so the free space is {n} separate intervals), then `tetherd run` (release) on it."
    );
    println!("Single run (`startup-bench {n}`).\n");
    println!("| what | measured |");
    println!("|---|---|");
    println!(
        "| filling the store ({} commits of {CHUNK}) | {:.1} s |",
        n.div_ceil(CHUNK as u32),
        fill.as_secs_f64()
    );
    println!("| store file | {file_mib:.0} MiB |");
    println!(
        "| `tetherd run` to ready (load, index, compile policies, bind) | {:.2} s |",
        ready.as_secs_f64()
    );
    println!("| tetherd resident memory once ready | {rss:.0} MiB |");
    println!("| pool usage reported | {used} of {total} |");
    println!(
        "| CNI ADD through the plugin, median of 200 (p90) | {:.2} ms ({:.2} ms) |",
        ms(adds[adds.len() / 2]),
        ms(adds[adds.len() * 9 / 10])
    );
    Ok(())
}
