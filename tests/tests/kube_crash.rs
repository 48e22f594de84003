//! Crash safety in Kubernetes mode: several node daemons (`tetherd run --kubernetes`) share one
//! pool through a real kube-apiserver while callers churn through the real `tether` plugin:
//! ADD, CHECK and DEL of ephemeral pods; StatefulSet pods recreated with a new UID on any
//! node (their address is pinned to the pod name); and KubeVirt VMs whose virt-launcher pods
//! restart and live-migrate between nodes (the target shares the VM's address with the
//! source until the source goes). At a random instant the test SIGKILLs one
//! daemon, the one holding the releasers' Lease, several at once, or all of them; restarts
//! them; and checks the API server's IPAllocation objects (the truth every daemon shares):
//! - no container holds two addresses and no pinned identity has two;
//! - every ADD answered before the kill (and not DELed since) still holds its address;
//! - no DEL answered before the kill was undone;
//! - no pin moved;
//! - every allocated address is one the callers were answered, or one a call in flight at the
//!   kill committed (adopted from what the API server says, as the kubelet's retry would);
//! - a retried ADD answers the address already held.
//!
//! At the end every pod and the StatefulSet are deleted without a DEL (a node lost with its
//! pods): garbage collection must free every address, and nothing else is left.
//!
//! `TETHER_KUBE_CRASH_ROUNDS` sets the number of rounds (default 40); `TETHER_KUBE_CRASH_SEED`
//! replays a run's random choices (thread timing still varies).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod as KPod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tether_e2e::cluster::{Cluster, TestCluster};
use tether_e2e::crash_model::{Att, Kind, Model, Seen, Storm, Totals};
use tether_e2e::{Daemon, Ipam, Pod, Rng};
use tether_kube::crd::IPAllocation;

const NODES: usize = 4;
/// Parallel callers; caller `w` runs its ephemeral pods on node `w % NODES` and owns the
/// StatefulSet pod `db-w`, which each recreation puts on a random node; callers below VMS
/// also run VM `vm-w`.
const WORKERS: usize = 8;
const VMS: usize = 3;
/// 64 addresses: the callers hold at most WORKERS * 5 at once.
const POOL: &str = "apiVersion: ipam.tether.dev/v1alpha1\nkind: IPPool\nmetadata: {name: crash}\nspec: {subnet: 10.30.0.0/24, ips: [10.30.0.10-10.30.0.73]}\n";
/// The kill comes this long after the storm starts: uniform in [min, max) milliseconds.
const KILL_AFTER_MS: (u64, u64) = (100, 1500);
/// Garbage collection as fast as it goes, so that a wrong release would show within a round.
const GC: &[&str] = &[
    "--gc-interval-secs",
    "1",
    "--gc-grace-secs",
    "1",
    "--gc-node-grace-secs",
    "1",
    "--gc-vm-grace-secs",
    "1",
];

struct Env {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    sts_uid: String,
}

impl Env {
    fn start(test: &str) -> Option<Env> {
        let TestCluster {
            cluster,
            rt,
            client,
        } = TestCluster::with_pool(test, POOL)?;
        let sts: StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"replicas": WORKERS, "serviceName": "db",
                     "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "c", "image": "pause"}]}}}
        }))
        .expect("sts");
        let sts = rt
            .block_on(
                Api::<StatefulSet>::namespaced(client.clone(), "default")
                    .create(&PostParams::default(), &sts),
            )
            .expect("create sts");
        let sts_uid = sts.metadata.uid.expect("uid");
        rt.block_on(tether_e2e::kubevirt::install(&client))
            .expect("KubeVirt CRDs");
        Some(Env {
            cluster,
            rt,
            client,
            sts_uid,
        })
    }

    fn daemon_args(&self, node: usize) -> Vec<String> {
        let mut args: Vec<String> = [
            "--kubernetes",
            "--node-name",
            &format!("node-{node}"),
            "--kubeconfig",
            &self.cluster.kubeconfig.display().to_string(),
            "--lease-namespace",
            "default",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(GC.iter().map(|s| s.to_string()));
        args
    }

    fn start_daemon(&self, node: usize, dir: tempfile::TempDir) -> Daemon {
        let args = self.daemon_args(node);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_in(dir, "", &args).expect("tetherd --kubernetes")
    }

    /// Creates pod `name` bound to `node`, owned by the StatefulSet when `sts`; returns it as
    /// the plugin's caller sees it.
    fn create_pod(&self, name: &str, node: usize, sts: bool) -> Result<Pod, kube::Error> {
        let mut meta = json!({"name": name, "namespace": "default"});
        if sts {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet",
                "name": "db", "uid": self.sts_uid, "controller": true}]);
        }
        let p: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": format!("node-{node}"), "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "pause"}]}
        }))
        .expect("pod");
        let created = self.rt.block_on(
            Api::<KPod>::namespaced(self.client.clone(), "default")
                .create(&PostParams::default(), &p),
        )?;
        let uid = created.metadata.uid.unwrap_or_default();
        let mut pod = Pod::new("default", name, 0);
        pod.container_id = format!("ctr-{name}-{}", &uid[..8.min(uid.len())]);
        pod.uid = uid;
        Ok(pod)
    }

    /// Pod `name` as the plugin's caller sees it.
    fn existing(&self, name: &str) -> Result<Pod, kube::Error> {
        let p = self
            .rt
            .block_on(Api::<KPod>::namespaced(self.client.clone(), "default").get(name))?;
        let uid = p.metadata.uid.unwrap_or_default();
        let mut pod = Pod::new("default", name, 0);
        pod.container_id = format!("ctr-{name}-{}", &uid[..8.min(uid.len())]);
        pod.uid = uid;
        Ok(pod)
    }

    /// Deletes pod `name` now (no kubelet here to wait for); gone already is fine.
    fn delete_pod(&self, name: &str) -> Result<(), kube::Error> {
        let r = self.rt.block_on(
            Api::<KPod>::namespaced(self.client.clone(), "default")
                .delete(name, &DeleteParams::default().grace_period(0)),
        );
        match r {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn objects(&self) -> Vec<IPAllocation> {
        self.rt
            .block_on(Api::<IPAllocation>::all(self.client.clone()).list(&ListParams::default()))
            .expect("list IPAllocations")
            .items
    }

    /// The node index whose daemon holds the releasers' Lease, if one does.
    fn leader(&self) -> Option<usize> {
        let api = Api::<Lease>::namespaced(self.client.clone(), "default");
        self.rt
            .block_on(api.get_opt("tether-releaser"))
            .expect("lease")
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .and_then(|h| h.strip_prefix("node-").and_then(|n| n.parse().ok()))
    }
}

/// The end of a storm: set when the round's victims are about to be killed.
struct Stop {
    flag: AtomicBool,
    victims: Vec<usize>,
}

impl Stop {
    fn new(victims: Vec<usize>) -> Stop {
        Stop {
            flag: AtomicBool::new(false),
            victims,
        }
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Whether a failed call to `node`'s daemon is the kill's doing: only a victim's calls
    /// may fail, and only once the kill is under way. A daemon that was not killed answers
    /// every call.
    fn excuses(&self, node: usize) -> bool {
        self.is_set() && self.victims.contains(&node)
    }
}

/// One caller's storm: ADDs, CHECKs and DELs until `stop`.
#[allow(clippy::too_many_arguments)]
fn storm(
    w: usize,
    round: usize,
    mut rng: Rng,
    mut mine: Vec<Att>,
    env: &Env,
    ipams: &[Ipam],
    model: &Model,
    stop: &Stop,
    mut vm: Option<&mut tether_e2e::kubevirt::Vm>,
) -> Storm {
    let mut out = Storm::default();
    let mut n = 0u32;
    while !stop.is_set() {
        n += 1;
        let sts_identity = format!("default/db-{w}");
        let pinned = mine
            .iter()
            .position(|a| a.kind == Kind::Pinned(sts_identity.clone()));
        let ephemeral: Vec<usize> = (0..mine.len())
            .filter(|&i| mine[i].kind == Kind::Ephemeral)
            .collect();
        let roll = rng.below(10);
        if roll == 9
            && let Some(vm) = vm.as_deref_mut()
        {
            match vm_step(
                w, &mut rng, vm, &mut mine, env, ipams, model, stop, &mut out,
            ) {
                Ok(()) => continue,
                Err(()) => break,
            }
        }
        let checkable: Vec<usize> = (0..mine.len())
            .filter(|&i| mine[i].added.is_some())
            .collect();
        if roll == 0 && !checkable.is_empty() {
            // CHECK a running attachment.
            let a = &mine[checkable[rng.below(checkable.len() as u64) as usize]];
            let o = ipams[a.node].check(&a.pod, a.added.as_ref().expect("checkable"));
            if !o.as_ref().is_ok_and(|o| o.ok) {
                if !stop.excuses(a.node) {
                    out.failures
                        .push(format!("CHECK for {} failed (not killed): {o:?}", a.who()));
                }
                break;
            }
            out.checks += 1;
            continue;
        }
        let del = if (1..=2).contains(&roll) {
            match pinned {
                Some(i) => Some(i),
                None => {
                    // The StatefulSet pod comes back, a new pod on any node.
                    let node = rng.below(NODES as u64) as usize;
                    match env.create_pod(&format!("db-{w}"), node, true) {
                        Ok(pod) => {
                            mine.push(Att::new(pod, Kind::Pinned(sts_identity.clone()), node, w))
                        }
                        Err(e) => {
                            out.failures.push(format!("creating pod db-{w}: {e}"));
                            break;
                        }
                    }
                    None
                }
            }
        } else if ephemeral.len() < 2 || (ephemeral.len() < 4 && rng.below(2) == 0) {
            let node = w % NODES;
            match env.create_pod(&format!("e{w}-r{round}-{n}"), node, false) {
                Ok(pod) => mine.push(Att::new(pod, Kind::Ephemeral, node, w)),
                Err(e) => {
                    out.failures.push(format!("creating a pod: {e}"));
                    break;
                }
            }
            None
        } else {
            Some(ephemeral[rng.below(ephemeral.len() as u64) as usize])
        };
        match del {
            None => {
                let a = mine.last_mut().expect("just pushed");
                let o = ipams[a.node].add(&a.pod);
                let Some((ip, added)) = o
                    .as_ref()
                    .ok()
                    .filter(|o| o.ok)
                    .and_then(|o| Some((o.ip()?, o.out.clone())))
                else {
                    if !stop.excuses(a.node) {
                        out.failures
                            .push(format!("ADD for {} failed (not killed): {o:?}", a.who()));
                    }
                    break; // in flight at the kill: a.ip stays None
                };
                model.answered(a, ip, added, &mut out);
            }
            Some(i) => {
                let a = &mut mine[i];
                model.releasing(a);
                let o = ipams[a.node].del(&a.pod);
                if !o.as_ref().is_ok_and(|o| o.ok) {
                    if !stop.excuses(a.node) {
                        out.failures
                            .push(format!("DEL for {} failed (not killed): {o:?}", a.who()));
                    }
                    break; // in flight at the kill: a.ip stays None
                }
                out.dels += 1;
                if let Err(e) = env.delete_pod(&a.pod.name) {
                    out.failures.push(format!("deleting {}: {e}", a.who()));
                }
                out.gone.push(mine.remove(i).pod.container_id);
            }
        }
    }
    out.atts = mine;
    out
}

/// One step of VM `vm-w`'s life: a launcher pod starts on a random node, restarts, or
/// live-migrates to another node (one step ADDs the target, a later one DELs the source). `Err` ends the
/// storm: a call failed (at the kill, or a failure recorded).
#[allow(clippy::too_many_arguments)]
fn vm_step(
    w: usize,
    rng: &mut Rng,
    vm: &mut tether_e2e::kubevirt::Vm,
    mine: &mut Vec<Att>,
    env: &Env,
    ipams: &[Ipam],
    model: &Model,
    stop: &Stop,
    out: &mut Storm,
) -> Result<(), ()> {
    let identity = format!("default/vm-{w}");
    let launchers: Vec<usize> = (0..mine.len())
        .filter(|&i| mine[i].kind == Kind::Pinned(identity.clone()))
        .collect();
    // A failure: of a call to a node's daemon (`Some(node)`), or of the API server.
    let fail = |out: &mut Storm, (node, what): (Option<usize>, String)| {
        if !node.is_some_and(|n| stop.excuses(n)) {
            out.failures.push(what);
        }
        Err(())
    };
    // DEL a launcher and delete its pod.
    let del =
        |i: usize, mine: &mut Vec<Att>, out: &mut Storm| -> Result<(), (Option<usize>, String)> {
            let a = &mut mine[i];
            model.releasing(a);
            let o = ipams[a.node].del(&a.pod);
            if !o.as_ref().is_ok_and(|o| o.ok) {
                return Err((
                    Some(a.node),
                    format!("DEL for {} failed (not killed): {o:?}", a.who()),
                ));
            }
            out.dels += 1;
            env.delete_pod(&a.pod.name)
                .map_err(|e| (None, format!("deleting {}: {e}", a.who())))?;
            out.gone.push(mine.remove(i).pod.container_id);
            Ok(())
        };
    // Launch a pod (a migration target with `migration`) and ADD it.
    let launch = |vm: &mut tether_e2e::kubevirt::Vm,
                  node: usize,
                  migration: Option<(String, String)>,
                  mine: &mut Vec<Att>,
                  out: &mut Storm|
     -> Result<(), (Option<usize>, String)> {
        let name = env
            .rt
            .block_on(vm.launch(
                &format!("node-{node}"),
                migration.as_ref().map(|(n, u)| (n.as_str(), u.as_str())),
            ))
            .map_err(|e| (None, format!("launching vm-{w}: {e:#}")))?;
        let pod = env
            .existing(&name)
            .map_err(|e| (None, format!("{name}: {e}")))?;
        mine.push(Att::new(pod, Kind::Pinned(identity.clone()), node, w));
        let a = mine.last_mut().expect("just pushed");
        let o = ipams[node].add(&a.pod);
        let Some((ip, added)) = o
            .as_ref()
            .ok()
            .filter(|o| o.ok)
            .and_then(|o| Some((o.ip()?, o.out.clone())))
        else {
            return Err((
                Some(node),
                format!("ADD for {} failed (not killed): {o:?}", a.who()),
            ));
        };
        model.answered(a, ip, added, out);
        Ok(())
    };
    let r = match launchers[..] {
        [] => launch(vm, rng.below(NODES as u64) as usize, None, mine, out),
        [i] if rng.below(2) == 0 => {
            // Live migration to another node.
            let from = mine[i].node;
            let to = (from + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
            match env.rt.block_on(vm.migration()) {
                // Source and target both hold the address until a later step (or a
                // later round: a kill may come in between) DELs the source.
                Ok(m) => launch(vm, to, Some(m), mine, out),
                Err(e) => Err((None, format!("migration of vm-{w}: {e:#}"))),
            }
        }
        // The launcher pod restarts (a new pod of the same VMI).
        [i] => del(i, mine, out),
        // A migration ends: the source (launched first: container ids sort by launch) goes.
        [source, ..] => del(source, mine, out).map(|()| out.migrations += 1),
    };
    r.or_else(|e| fail(out, e))
}

/// Checks the API server's allocations against the model and adopts what they say about the
/// calls in flight at the kill (see [`Model::check_and_adopt`]): the pod of one that did not
/// commit is deleted, as the kubelet would after a failed ADD or a DEL that went through.
/// Then a retried ADD of a running pod must answer its address. Returns the problems found
/// and how many calls in flight committed.
fn check_and_adopt(
    env: &Env,
    ipams: &[Ipam],
    model: &mut Model,
    rng: &mut Rng,
) -> (Vec<String>, usize) {
    let seen: Vec<Seen> = env
        .objects()
        .iter()
        .map(|o| Seen {
            ip: o.spec.address.to_string(),
            identity: (o.spec.owner.kind != "Ephemeral").then(|| o.spec.owner.name.clone()),
            holders: o
                .spec
                .holders
                .iter()
                .map(|h| h.container_id.clone())
                .collect(),
            describe: format!("{:?} held by {:?}", o.spec.owner, o.spec.holders),
        })
        .collect();
    let mut checked = model.check_and_adopt(&seen);
    for a in &checked.uncommitted {
        if let Err(e) = env.delete_pod(&a.pod.name) {
            checked.problems.push(format!("deleting {}: {e}", a.who()));
        }
    }
    if let Some(a) = model.any_running(rng) {
        let o = ipams[a.node].add(&a.pod).expect("retried ADD");
        checked.problems.extend(Model::retried(a, &o));
    }
    (checked.problems, checked.committed)
}

/// Which daemons a round kills.
fn victims(env: &Env, rng: &mut Rng) -> (Vec<usize>, &'static str) {
    match rng.below(4) {
        0 => (vec![rng.below(NODES as u64) as usize], "one daemon"),
        1 => match env.leader() {
            Some(l) => (vec![l], "the elected daemon"),
            None => (
                vec![rng.below(NODES as u64) as usize],
                "one daemon (none elected)",
            ),
        },
        2 => {
            let mut all: Vec<usize> = (0..NODES).collect();
            let k = 2 + rng.below(NODES as u64 - 2) as usize;
            let mut picked = Vec::new();
            for _ in 0..k {
                picked.push(all.remove(rng.below(all.len() as u64) as usize));
            }
            picked.sort_unstable();
            (picked, "several daemons at once")
        }
        _ => ((0..NODES).collect(), "every daemon"),
    }
}

#[test]
fn daemons_killed_at_random_instants_keep_every_answer_in_the_api_server() {
    let test = "daemons_killed_at_random_instants_keep_every_answer_in_the_api_server";
    let Some(env) = Env::start(test) else {
        return;
    };
    let rounds: usize = std::env::var("TETHER_KUBE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed = Rng::seed_from_env("TETHER_KUBE_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut daemons: Vec<Option<Daemon>> = (0..NODES)
        .map(|n| Some(env.start_daemon(n, tempfile::tempdir().expect("tempdir"))))
        .collect();
    let ipams: Vec<Ipam> = daemons
        .iter()
        .map(|d| {
            let d = d.as_ref().expect("started");
            Ipam::new(&d.socket, "crash-net", "1.0.0", &["crash"]).expect("ipam")
        })
        .collect();
    let mut vms: Vec<tether_e2e::kubevirt::Vm> = (0..VMS)
        .map(|w| {
            env.rt
                .block_on(tether_e2e::kubevirt::Vm::start(
                    &env.client,
                    &format!("vm-{w}"),
                    json!({}),
                ))
                .expect("VM")
        })
        .collect();
    let mut model = Model::default();
    let mut total = Totals::default();
    let (mut kills, mut leader_kills) = (0, 0);
    for round in 0..rounds {
        let mine = model.hand_out(WORKERS);
        let rngs: Vec<Rng> = (0..WORKERS).map(|_| Rng::new(rng.next_u64())).collect();
        let kill_after =
            Duration::from_millis(KILL_AFTER_MS.0 + rng.below(KILL_AFTER_MS.1 - KILL_AFTER_MS.0));
        let (victims, how) = victims(&env, &mut rng);
        let leader = env.leader();
        let stop = Stop::new(victims.clone());
        let mut dirs: Vec<Option<tempfile::TempDir>> = (0..NODES).map(|_| None).collect();
        let storms = std::thread::scope(|s| {
            let mut vm_of = vms.iter_mut();
            let callers: Vec<_> = mine
                .into_iter()
                .zip(rngs)
                .enumerate()
                .map(|(w, (mine, r))| {
                    let (env, ipams, model, stop) = (&env, &ipams, &model, &stop);
                    let vm = if w < VMS { vm_of.next() } else { None };
                    s.spawn(move || storm(w, round, r, mine, env, ipams, model, stop, vm))
                })
                .collect();
            std::thread::sleep(kill_after);
            stop.flag.store(true, Ordering::SeqCst);
            for &v in &victims {
                let d = daemons[v].take().expect("running");
                dirs[v] = Some(d.kill().expect("SIGKILL"));
            }
            callers
                .into_iter()
                .map(|c| c.join().expect("caller"))
                .collect::<Vec<Storm>>()
        });
        kills += victims.len();
        if leader.is_some_and(|l| victims.contains(&l)) {
            leader_kills += 1;
        }
        let (done, mut failures) = model.take(storms);
        total += done;
        std::thread::scope(|s| {
            let restarted: Vec<_> = victims
                .iter()
                .map(|&v| {
                    let env = &env;
                    let dir = dirs[v].take().expect("killed");
                    s.spawn(move || (v, env.start_daemon(v, dir)))
                })
                .collect();
            for r in restarted {
                let (v, d) = r.join().expect("restart");
                daemons[v] = Some(d);
            }
        });
        let (problems, committed) = check_and_adopt(&env, &ipams, &mut model, &mut rng);
        failures.extend(problems);
        eprintln!(
            "round {round}: killed {how} {victims:?} (leader {leader:?}) after {kill_after:?}: {} ADDs and {} DELs answered, {} unanswered ({committed} of them committed); {} attachments running",
            done.adds,
            done.dels,
            done.in_flight,
            model.atts.len()
        );
        assert!(
            failures.is_empty(),
            "round {round} (seed {seed}, replay with TETHER_KUBE_CRASH_SEED={seed}; killed {how} {victims:?} {kill_after:?} into the storm):\n{}\nlogs:\n{}",
            failures.join("\n"),
            daemons
                .iter()
                .flatten()
                .map(|d| d.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    let Totals {
        adds,
        dels,
        checks,
        migrations,
        in_flight,
    } = total;
    eprintln!(
        "{rounds} rounds, {kills} daemons killed ({leader_kills} times the elected one) in {:?}: {adds} ADDs, {dels} DELs and {checks} CHECKs answered, {migrations} live migrations, {in_flight} calls in flight at a kill",
        started.elapsed()
    );
    if rounds >= 4 {
        assert!(
            adds > 0 && dels > 0,
            "the storms did work ({adds} ADDs, {dels} DELs answered)"
        );
        assert!(in_flight > 0, "some kills landed with calls in flight");
        assert!(migrations > 0, "no live migration completed");
    }

    // The node is lost with its pods: every pod and the StatefulSet go without a DEL, and
    // garbage collection frees every address.
    for a in model.atts.values() {
        env.delete_pod(&a.pod.name).expect("delete pod");
    }
    env.rt
        .block_on(
            Api::<StatefulSet>::namespaced(env.client.clone(), "default")
                .delete("db", &DeleteParams::default()),
        )
        .expect("delete sts");
    for vm in vms {
        env.rt.block_on(vm.delete(&[])).expect("delete VM");
    }
    let gone = Instant::now();
    let deadline = gone + Duration::from_secs(90);
    loop {
        let left = env.objects();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garbage collection left {} addresses: {:?}\nlogs:\n{}",
            left.len(),
            left.iter().map(|o| &o.spec).collect::<Vec<_>>(),
            daemons
                .iter()
                .flatten()
                .map(|d| d.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "garbage collection freed every address {:?} after the pods went",
        gone.elapsed()
    );
}
