//! Concurrency through the real `tether` plugin: 64 parallel ADD/CHECK/DEL streams on one
//! node, and 64 across 8 node daemons sharing one pool too small for all of them (Kubernetes
//! mode, real kube-apiserver); and daemon restarts while calls are in flight. Each checks that
//! no address is answered to two pods at once, that nothing is left allocated once every pod
//! is gone, and that every call is answered (a deadlock shows as calls timing out). Latencies
//! are printed (p50/p99/max), not asserted: docs/reliability.md carries a run's figures.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod as KPod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tether_e2e::cluster::TestCluster;
use tether_e2e::{CniOutcome, Daemon, Ipam, Pod};
use tether_kube::crd::IPAllocation;

const STREAMS: usize = 64;
/// tether's code for an exhausted pool.
const POOL_EXHAUSTED: u64 = 100;
const TRY_AGAIN: u64 = 11;

/// Latencies of one kind of call.
#[derive(Default)]
struct Latencies(Mutex<Vec<Duration>>);

impl Latencies {
    fn timed(&self, f: impl FnOnce() -> anyhow::Result<CniOutcome>) -> anyhow::Result<CniOutcome> {
        let t = Instant::now();
        let o = f();
        self.0.lock().expect("lock").push(t.elapsed());
        o
    }

    fn report(&self, what: &str) -> String {
        let mut v = self.0.lock().expect("lock").clone();
        if v.is_empty() {
            return format!("{what}: none");
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        format!(
            "{what}: {} calls, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.len(),
            at(0.50).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        )
    }
}

/// The addresses answered and not yet DELed, by holder: an address answered while in here for
/// another pod was handed out twice.
#[derive(Default)]
struct Held(Mutex<HashMap<String, String>>);

impl Held {
    fn take(&self, ip: &str, who: &str, problems: &Mutex<Vec<String>>) {
        if let Some(other) = self
            .0
            .lock()
            .expect("lock")
            .insert(ip.to_owned(), who.to_owned())
            .filter(|o| o != who)
        {
            problems
                .lock()
                .expect("lock")
                .push(format!("{ip} answered to {who} while {other} holds it"));
        }
    }

    fn give_back(&self, ip: &str) {
        self.0.lock().expect("lock").remove(ip);
    }
}

fn problem(problems: &Mutex<Vec<String>>, p: String) {
    problems.lock().expect("lock").push(p);
}

/// 64 streams of ADD, CHECK, DEL on one standalone daemon, each pod new.
#[test]
fn sixty_four_streams_on_one_node_hand_out_no_address_twice_and_leak_none() {
    const CYCLES: usize = 6;
    let pool = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: busy}\nspec: {subnet: 10.40.0.0/24, ips: [10.40.0.10-10.40.0.105]}\n";
    let d = Daemon::start(pool, &["--chain", "builtin:stateless"]).expect("daemon");
    let ipam = Ipam::new(&d.socket, "busy-net", "1.1.0", &["busy"]).expect("ipam");
    let (add_lat, del_lat, check_lat) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let held = Held::default();
    let problems = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..STREAMS {
            let (ipam, held, problems) = (&ipam, &held, &problems);
            let (add_lat, del_lat, check_lat) = (&add_lat, &del_lat, &check_lat);
            s.spawn(move || {
                for c in 0..CYCLES {
                    let pod = Pod::new("default", &format!("s{w}-c{c}"), (w * 1000 + c) as u32);
                    let who = format!("{}/{}", pod.name, pod.container_id);
                    let o = add_lat.timed(|| ipam.add(&pod)).expect("ADD");
                    let Some(ip) = o.ip().filter(|_| o.ok) else {
                        problem(problems, format!("ADD for {who}: {}", o.out));
                        return;
                    };
                    held.take(&ip, &who, problems);
                    let o = check_lat.timed(|| ipam.check(&pod, &o.out)).expect("CHECK");
                    if !o.ok {
                        problem(problems, format!("CHECK for {who} ({ip}): {}", o.out));
                    }
                    held.give_back(&ip);
                    let o = del_lat.timed(|| ipam.del(&pod)).expect("DEL");
                    if !o.ok {
                        problem(problems, format!("DEL for {who} ({ip}): {}", o.out));
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let problems = problems.into_inner().expect("lock");
    assert!(problems.is_empty(), "{problems:#?}\n{}", d.log());
    let (allocated, total) = d.usage("busy").expect("usage");
    assert_eq!(
        (allocated, total),
        (0, 96),
        "addresses left allocated once every pod was DELed: {:?}",
        d.allocations()
    );
    eprintln!(
        "{STREAMS} streams x {CYCLES} cycles on one node in {elapsed:?} ({:.0} ADDs/s)\n{}\n{}\n{}",
        (STREAMS * CYCLES) as f64 / elapsed.as_secs_f64(),
        add_lat.report("ADD"),
        check_lat.report("CHECK"),
        del_lat.report("DEL")
    );
}

/// Restarts (SIGKILL or SIGTERM) while 16 streams ADD and DEL: every call answers success or
/// code 11, and the retry of a failed one succeeds once the daemon is back.
#[test]
fn a_restart_with_calls_in_flight_answers_11_and_the_retry_succeeds() {
    const CALLERS: usize = 16;
    let pool = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: busy}\nspec: {subnet: 10.41.0.0/24, ips: [10.41.0.10-10.41.0.105]}\n";
    let flags = ["--chain", "builtin:stateless"];
    let d = Daemon::start(pool, &flags).expect("daemon");
    let ipam = Ipam::new(&d.socket, "busy-net", "1.1.0", &["busy"]).expect("ipam");
    let held = Held::default();
    let problems = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let (try_again, cut_off, answered) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    // Calls `op` until it succeeds; every failure must be code 11.
    let retried = |op: &str, pod: &Pod| -> Option<CniOutcome> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = ipam.call(op, pod).expect("plugin");
            if o.ok {
                answered.fetch_add(1, Ordering::SeqCst);
                return Some(o);
            }
            if o.code() != Some(TRY_AGAIN) {
                problem(
                    &problems,
                    format!("{op} for {} answered {} (not 11)", pod.name, o.out),
                );
                return None;
            }
            try_again.fetch_add(1, Ordering::SeqCst);
            if o.out["msg"]
                .as_str()
                .is_some_and(|m| m.contains("closed the connection"))
            {
                cut_off.fetch_add(1, Ordering::SeqCst);
            }
            if Instant::now() > deadline {
                problem(&problems, format!("{op} for {} never succeeded", pod.name));
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut restarts = Vec::new();
    let d = std::thread::scope(|s| {
        for w in 0..CALLERS {
            let (held, problems, stop, retried) = (&held, &problems, &stop, &retried);
            s.spawn(move || {
                let mut c = 0;
                while !stop.load(Ordering::SeqCst) {
                    c += 1;
                    let pod = Pod::new("default", &format!("r{w}-c{c}"), (w * 100_000 + c) as u32);
                    let who = pod.name.clone();
                    let Some(ip) = retried("ADD", &pod).and_then(|o| o.ip()) else {
                        return;
                    };
                    held.take(&ip, &who, problems);
                    // The kubelet's retry of an ADD (as after a call cut off by a kill)
                    // answers the address the pod holds, not another.
                    let Some(again) = retried("ADD", &pod).and_then(|o| o.ip()) else {
                        return;
                    };
                    if again != ip {
                        problem(
                            problems,
                            format!("a repeated ADD for {who} answered {again}, not its {ip}"),
                        );
                    }
                    held.give_back(&ip);
                    if retried("DEL", &pod).is_none() {
                        return;
                    }
                }
            });
        }
        let mut d = d;
        for (i, how) in ["KILL", "TERM", "KILL", "TERM", "KILL", "KILL"]
            .into_iter()
            .enumerate()
        {
            std::thread::sleep(Duration::from_millis(400 + 150 * i as u64));
            let before = answered.load(Ordering::SeqCst);
            let dir = if how == "KILL" {
                d.kill().expect("kill")
            } else {
                d.stop().expect("stop")
            };
            std::thread::sleep(Duration::from_millis(200));
            d = Daemon::start_in(dir, pool, &flags).expect("restart");
            restarts.push((how, before));
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        d
    });
    let problems = problems.into_inner().expect("lock");
    assert!(problems.is_empty(), "{problems:#?}\n{}", d.log());
    let (allocated, _) = d.usage("busy").expect("usage");
    assert_eq!(
        allocated,
        0,
        "left allocated after every DEL succeeded: {:?}",
        d.allocations()
    );
    let (try_again, cut_off, answered) = (
        try_again.into_inner(),
        cut_off.into_inner(),
        answered.into_inner(),
    );
    eprintln!(
        "{} restarts: {answered} calls answered success, {try_again} answered 11 and retried ({cut_off} of them cut off mid-call)",
        restarts.len()
    );
    assert!(
        try_again > 0,
        "no call met a restart: the test proves nothing"
    );
    assert!(
        cut_off > 0,
        "no call was cut off mid-call by a SIGKILL: the test proves nothing about calls in flight"
    );
}

/// 64 streams across 8 Kubernetes-mode daemons on one pool of 24 addresses: some ADDs find it
/// exhausted (code 100) and retry; none is answered an address another pod holds, and once
/// every pod is gone no IPAllocation object is left.
#[test]
fn sixty_four_streams_across_eight_nodes_share_a_small_pool() {
    const NODES: usize = 8;
    const CYCLES: usize = 4;
    let test = "sixty_four_streams_across_eight_nodes_share_a_small_pool";
    let Some(TestCluster {
        cluster,
        rt,
        client,
    }) = TestCluster::with_pool(
        test,
        "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: small}\nspec: {subnet: 10.42.0.0/24, ips: [10.42.0.10-10.42.0.33]}\n",
    )
    else {
        return;
    };
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let daemons: Vec<Daemon> = std::thread::scope(|s| {
        let started: Vec<_> = (0..NODES)
            .map(|n| {
                let kubeconfig = &kubeconfig;
                s.spawn(move || {
                    let node = format!("node-{n}");
                    Daemon::start(
                        "",
                        &[
                            "--kubernetes",
                            "--node-name",
                            &node,
                            "--kubeconfig",
                            kubeconfig,
                            "--lease-namespace",
                            "default",
                        ],
                    )
                    .expect("tetherd --kubernetes")
                })
            })
            .collect();
        started
            .into_iter()
            .map(|h| h.join().expect("start"))
            .collect()
    });
    let ipams: Vec<Ipam> = daemons
        .iter()
        .map(|d| Ipam::new(&d.socket, "small-net", "1.1.0", &["small"]).expect("ipam"))
        .collect();
    let pods = Api::<KPod>::namespaced(client.clone(), "default");
    let (add_lat, del_lat) = (Latencies::default(), Latencies::default());
    let held = Held::default();
    let problems = Mutex::new(Vec::new());
    let exhausted = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..STREAMS {
            let (ipams, held, problems, exhausted, rt, pods) =
                (&ipams, &held, &problems, &exhausted, &rt, &pods);
            let (add_lat, del_lat) = (&add_lat, &del_lat);
            s.spawn(move || {
                let node = w % NODES;
                for c in 0..CYCLES {
                    let name = format!("s{w}-c{c}");
                    let p: KPod = serde_json::from_value(json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": "default"},
                        "spec": {"nodeName": format!("node-{node}"),
                                 "automountServiceAccountToken": false,
                                 "containers": [{"name": "c", "image": "pause"}]}
                    }))
                    .expect("pod");
                    let created = rt
                        .block_on(pods.create(&PostParams::default(), &p))
                        .expect("create pod");
                    let uid = created.metadata.uid.expect("uid");
                    let mut pod = Pod::new("default", &name, 0);
                    pod.container_id = format!("ctr-{name}-{}", &uid[..8]);
                    pod.uid = uid;
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let (ip, added) = loop {
                        let o = add_lat.timed(|| ipams[node].add(&pod)).expect("ADD");
                        if let Some(ip) = o.ip().filter(|_| o.ok) {
                            break (ip, o.out);
                        }
                        // Exhausted (100), or "try again" (11: writers on other nodes kept
                        // taking the addresses this one planned): the kubelet retries both.
                        if !matches!(o.code(), Some(POOL_EXHAUSTED | TRY_AGAIN))
                            || Instant::now() > deadline
                        {
                            problem(
                                problems,
                                format!("ADD for {name} on node-{node}: {}", o.out),
                            );
                            return;
                        }
                        exhausted.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                    };
                    held.take(&ip, &name, problems);
                    let o = ipams[node].check(&pod, &added).expect("CHECK");
                    if !o.ok {
                        problem(problems, format!("CHECK for {name} ({ip}): {}", o.out));
                    }
                    held.give_back(&ip);
                    let o = del_lat.timed(|| ipams[node].del(&pod)).expect("DEL");
                    if !o.ok {
                        problem(problems, format!("DEL for {name} ({ip}): {}", o.out));
                    }
                    rt.block_on(pods.delete(&name, &DeleteParams::default().grace_period(0)))
                        .expect("delete pod");
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let logs = || {
        daemons
            .iter()
            .map(|d| d.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let problems = problems.into_inner().expect("lock");
    assert!(problems.is_empty(), "{problems:#?}\n{}", logs());
    let left = rt
        .block_on(Api::<IPAllocation>::all(client.clone()).list(&ListParams::default()))
        .expect("list")
        .items;
    assert!(
        left.is_empty(),
        "addresses left once every pod was DELed: {:?}",
        left.iter().map(|o| &o.spec).collect::<Vec<_>>()
    );
    let exhausted = exhausted.into_inner();
    eprintln!(
        "{STREAMS} streams x {CYCLES} cycles across {NODES} nodes on 24 addresses in {elapsed:?} ({:.0} allocations/s); {exhausted} ADDs were refused (pool exhausted, or contended) and retried\n{}\n{}",
        (STREAMS * CYCLES) as f64 / elapsed.as_secs_f64(),
        add_lat.report("ADD"),
        del_lat.report("DEL")
    );
    assert!(
        exhausted > 0,
        "no ADD found the pool exhausted: the streams never contended for it"
    );
}
