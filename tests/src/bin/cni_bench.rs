//! CNI ADD+DEL through the `tether` binary against Debian's host-local, in one harness and one
//! run: each call spawns the plugin as a runtime would (stdin config, CNI_* environment).
//! Sequential, then 16 callers in parallel. Prints a Markdown section for docs/benchmarks.md.
//!
//!   cni-bench [ITERATIONS]      (default 300 per mode and plugin, over 5 interleaved rounds)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tether_e2e::{Daemon, bin_dir, children_cpu_time, cni_exec};

const PARALLEL: usize = 16;
const ROUNDS: usize = 5;

struct Plugin {
    name: &'static str,
    path: PathBuf,
    conf: Value,
}

fn call(p: &Plugin, command: &str, id: &str) -> Result<Duration> {
    let started = Instant::now();
    let o = cni_exec(
        &p.path,
        command,
        &p.conf,
        &[
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/bench"),
            ("CNI_ARGS", "IgnoreUnknown=1"),
        ],
        "/usr/lib/cni",
    )?;
    let took = started.elapsed();
    if !o.ok {
        bail!("{} {command} failed: {}", p.name, o.out);
    }
    Ok(took)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

struct Run {
    add: Duration,
    del: Duration,
    ops_per_sec: f64,
}

fn sequential(p: &Plugin, n: usize) -> Result<Run> {
    let (mut adds, mut dels) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let started = Instant::now();
    for i in 0..n {
        let id = format!("seq-{i}");
        adds.push(call(p, "ADD", &id)?);
        dels.push(call(p, "DEL", &id)?);
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Run {
        add: median(&mut adds),
        del: median(&mut dels),
        ops_per_sec: (2 * n) as f64 / secs,
    })
}

fn parallel(p: Arc<Plugin>, n: usize) -> Result<Run> {
    let per = n.div_ceil(PARALLEL);
    let started = Instant::now();
    let handles: Vec<_> = (0..PARALLEL)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || -> Result<(Vec<Duration>, Vec<Duration>)> {
                let (mut adds, mut dels) = (Vec::new(), Vec::new());
                for i in 0..per {
                    let id = format!("par-{t}-{i}");
                    adds.push(call(&p, "ADD", &id)?);
                    dels.push(call(&p, "DEL", &id)?);
                }
                Ok((adds, dels))
            })
        })
        .collect();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for h in handles {
        let (a, d) = h
            .join()
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
        adds.extend(a);
        dels.extend(d);
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Run {
        add: median(&mut adds),
        del: median(&mut dels),
        ops_per_sec: (2 * per * PARALLEL) as f64 / secs,
    })
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(300);
    let host_local = Path::new("/usr/lib/cni/host-local");
    if !host_local.exists() {
        bail!(
            "{} is missing: install containernetworking-plugins",
            host_local.display()
        );
    }
    let pool = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: bench}\nspec: {subnet: 10.20.0.0/16}\n";
    let d = Daemon::start(pool, &["--log-level", "warn"])?;
    let data = tempfile::tempdir()?;
    // The plugin as shipped: scripts/bench.sh points TETHER_CNI_PLUGIN at the static build.
    let tether_path = std::env::var_os("TETHER_CNI_PLUGIN")
        .map(PathBuf::from)
        .map_or_else(|| bin_dir().map(|d| d.join("tether")), Ok)?;
    let tether = Plugin {
        name: "tether",
        path: tether_path,
        conf: json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
            "ipam": {"type": "tether", "socket": d.socket, "pools": ["bench"]}}),
    };
    let hl = Plugin {
        name: "host-local",
        path: host_local.to_owned(),
        conf: json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.21.0.0/16"}]], "dataDir": data.path()}}),
    };
    // Warm both (page cache, first socket connection).
    for p in [&tether, &hl] {
        for i in 0..10 {
            call(p, "ADD", &format!("warm-{i}")).context("warm-up")?;
            call(p, "DEL", &format!("warm-{i}"))?;
        }
    }
    // Interleaved rounds: each round measures both plugins back to back, so a change in the
    // machine's load affects both sides of every ratio alike.
    let (tether, hl) = (Arc::new(tether), Arc::new(hl));
    let per_round = n.div_ceil(ROUNDS);
    let mut rounds: Vec<[Run; 4]> = Vec::with_capacity(ROUNDS);
    let (mut daemon_cpu, mut tether_cpu, mut hl_cpu) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    // CPU of the plugin processes, summed over the calls of one plugin.
    let measured = |cpu: &mut Duration, f: &mut dyn FnMut() -> Result<Run>| -> Result<Run> {
        let before = children_cpu_time()?;
        let r = f()?;
        *cpu += children_cpu_time()?.saturating_sub(before);
        Ok(r)
    };
    for _ in 0..ROUNDS {
        let ts = measured(&mut tether_cpu, &mut || sequential(&tether, per_round))?;
        let hs = measured(&mut hl_cpu, &mut || sequential(&hl, per_round))?;
        let cpu_before = d.cpu_time()?;
        let tp = measured(&mut tether_cpu, &mut || parallel(tether.clone(), per_round))?;
        daemon_cpu += d.cpu_time()?.saturating_sub(cpu_before);
        let hp = measured(&mut hl_cpu, &mut || parallel(hl.clone(), per_round))?;
        rounds.push([ts, hs, tp, hp]);
    }
    let par_calls = (2 * per_round.div_ceil(PARALLEL) * PARALLEL * ROUNDS) as f64;
    let all_calls = par_calls + (2 * per_round * ROUNDS) as f64;
    let med = |f: &dyn Fn(&[Run; 4]) -> f64| -> f64 {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |f: &dyn Fn(&[Run; 4]) -> f64| -> String {
        let v: Vec<f64> = rounds.iter().map(f).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}x–{hi:.2}x")
    };
    let d_ms = |d: Duration| d.as_secs_f64() * 1e3;

    println!("## CNI ADD+DEL: tether vs host-local\n");
    println!("Each call spawns the plugin binary as a runtime would (network config on stdin,");
    println!(
        "CNI_* environment), from one harness in one run (`cni-bench {n}`): {ROUNDS} interleaved rounds,"
    );
    println!(
        "each measuring both plugins with {per_round} ADD+DEL pairs one after another, then {per_round} pairs"
    );
    println!(
        "from {PARALLEL} callers at once. tether talks to a standalone tetherd (release build) that"
    );
    println!(
        "commits every allocation durably (redb, fsync) before answering; the plugin is the shipped"
    );
    println!(
        "build (static, musl). host-local is Debian's containernetworking-plugins build, writing its files"
    );
    println!(
        "under a lock. Values are medians over the rounds (latencies: the median call of a round);"
    );
    println!("the last column gives the ratio's range over the rounds.\n");
    println!("| mode | metric | tether | host-local | ratio (median) | ratio (range) |");
    println!("|---|---|---|---|---|---|");
    let lat = |name: &str,
               mode: &str,
               t: &dyn Fn(&[Run; 4]) -> Duration,
               h: &dyn Fn(&[Run; 4]) -> Duration| {
        println!(
            "| {mode} | {name} median | {:.2} ms | {:.2} ms | {:.2}x faster | {} |",
            med(&|r| d_ms(t(r))),
            med(&|r| d_ms(h(r))),
            med(&|r| h(r).as_secs_f64() / t(r).as_secs_f64()),
            spread(&|r| h(r).as_secs_f64() / t(r).as_secs_f64())
        );
    };
    lat("ADD", "sequential", &|r| r[0].add, &|r| r[1].add);
    lat("DEL", "sequential", &|r| r[0].del, &|r| r[1].del);
    println!(
        "| sequential | throughput | {:.0}/s | {:.0}/s | {:.2}x | {} |",
        med(&|r| r[0].ops_per_sec),
        med(&|r| r[1].ops_per_sec),
        med(&|r| r[0].ops_per_sec / r[1].ops_per_sec),
        spread(&|r| r[0].ops_per_sec / r[1].ops_per_sec)
    );
    let par = format!("{PARALLEL} in parallel");
    lat("ADD", &par, &|r| r[2].add, &|r| r[3].add);
    lat("DEL", &par, &|r| r[2].del, &|r| r[3].del);
    println!(
        "| {par} | throughput | {:.0}/s | {:.0}/s | {:.2}x | {} |",
        med(&|r| r[2].ops_per_sec),
        med(&|r| r[3].ops_per_sec),
        med(&|r| r[2].ops_per_sec / r[3].ops_per_sec),
        spread(&|r| r[2].ops_per_sec / r[3].ops_per_sec)
    );
    println!(
        "\nCPU time per call (user + system, USER_HZ resolution, averaged over every call):\n"
    );
    println!("| process | tether | host-local |");
    println!("|---|---|---|");
    println!(
        "| the plugin process | {:.2} ms | {:.2} ms |",
        d_ms(tether_cpu) / all_calls,
        d_ms(hl_cpu) / all_calls
    );
    println!(
        "| tetherd (parallel runs) | {:.2} ms | — |",
        d_ms(daemon_cpu) / par_calls
    );
    let metrics = d.client().get_text("/metrics")?;
    let batches = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tether_store_batch_requests_sum")
                || l.starts_with("tether_store_batch_requests_count")
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect::<Vec<_>>();
    if let [sum, count] = batches[..] {
        println!(
            "\ntetherd made {count:.0} durable commits for {sum:.0} requests (group commit: {:.2} requests per commit on average).",
            sum / count
        );
    }
    Ok(())
}
