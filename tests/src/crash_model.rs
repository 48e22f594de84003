//! What the crash tests know (`crash.rs` for the embedded store, `kube_crash.rs` for
//! Kubernetes mode), and the checks they make after every kill.
//!
//! Callers churn attachments in storms; a storm's answered ADDs and DELs go into the
//! [`Model`] as they are answered. After the kill and the restart, [`Model::check_and_adopt`]
//! compares what the store holds ([`Seen`]) with the model:
//! - no address is in two records, no container holds two addresses and no pinned identity
//!   has two;
//! - every ADD answered before the kill (and not DELed since) still holds its address;
//! - no DEL answered before the kill was undone;
//! - no pin moved;
//! - no ephemeral address is left without a holder;
//! - every allocated address is one the callers were answered, or one a call in flight at the
//!   kill committed (adopted from what the store says, as the kubelet's retry would).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use crate::{CniOutcome, Pod, Rng};

/// How an attachment's address is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Freed with the attachment.
    Ephemeral,
    /// Kept for this identity (a StatefulSet pod's name, a VM) across its pods.
    Pinned(String),
}

/// One attachment a storm created and has not seen go.
#[derive(Debug, Clone)]
pub struct Att {
    /// The pod.
    pub pod: Pod,
    /// How its address is kept.
    pub kind: Kind,
    /// The node (daemon) its calls go to.
    pub node: usize,
    /// The caller it belongs to.
    pub worker: usize,
    /// `Some(ip)`: its ADD was answered `ip`, and no DEL was sent since. `None`: a call for it
    /// was in flight at the kill (committed or not: the restarted store says which).
    pub ip: Option<String>,
    /// The ADD's answer, for a CHECK's prevResult (none for a call adopted after a kill).
    pub added: Option<serde_json::Value>,
}

impl Att {
    /// A new attachment, no call made yet.
    pub fn new(pod: Pod, kind: Kind, node: usize, worker: usize) -> Att {
        Att {
            pod,
            kind,
            node,
            worker,
            ip: None,
            added: None,
        }
    }

    /// For messages.
    pub fn who(&self) -> String {
        format!(
            "pod {}/{} on node-{} (container {})",
            self.pod.namespace, self.pod.name, self.node, self.pod.container_id
        )
    }

    /// Who holds its address: itself, or its identity's pin.
    pub fn owner(&self) -> String {
        match &self.kind {
            Kind::Ephemeral => self.who(),
            Kind::Pinned(identity) => pin_owner(identity),
        }
    }
}

fn pin_owner(identity: &str) -> String {
    format!("the pin of {identity}")
}

/// What one caller did in one storm.
#[derive(Default)]
pub struct Storm {
    /// Its attachments at the end (those with a call in flight at the kill have no address).
    pub atts: Vec<Att>,
    /// Containers whose DEL was answered.
    pub gone: Vec<String>,
    /// Answered ADDs.
    pub adds: usize,
    /// Answered DELs.
    pub dels: usize,
    /// Answered CHECKs.
    pub checks: usize,
    /// Live migrations whose target's ADD and source's DEL were both answered.
    pub migrations: usize,
    /// What went wrong.
    pub failures: Vec<String>,
}

impl Storm {
    /// Notes a failed call: a failure unless the daemon was being killed (`stopped`).
    pub fn failed(&mut self, stopped: bool, what: String) {
        if !stopped {
            self.failures.push(what);
        }
    }
}

/// A round's storms, summed up.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Answered ADDs.
    pub adds: usize,
    /// Answered DELs.
    pub dels: usize,
    /// Answered CHECKs.
    pub checks: usize,
    /// Completed live migrations.
    pub migrations: usize,
    /// Calls in flight at the kill.
    pub in_flight: usize,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        self.adds += o.adds;
        self.dels += o.dels;
        self.checks += o.checks;
        self.migrations += o.migrations;
        self.in_flight += o.in_flight;
    }
}

/// One allocated address, as the store shows it after a restart.
#[derive(Debug)]
pub struct Seen {
    /// The address.
    pub ip: String,
    /// Its pinned identity; `None`: ephemeral.
    pub identity: Option<String>,
    /// The containers holding it.
    pub holders: Vec<String>,
    /// The whole record, for messages.
    pub describe: String,
}

/// What [`Model::check_and_adopt`] found.
pub struct Checked {
    /// Invariants broken.
    pub problems: Vec<String>,
    /// Calls in flight at the kill that committed (their attachment now has its address).
    pub committed: usize,
    /// Attachments whose call in flight did not commit: out of the model, gone.
    pub uncommitted: Vec<Att>,
}

/// What the test knows, carried from round to round.
#[derive(Default)]
pub struct Model {
    /// Attachments by container id.
    pub atts: BTreeMap<String, Att>,
    /// Container ids whose DEL was answered, or seen uncommitted after a kill: never to hold
    /// an address again.
    pub gone: HashSet<String>,
    /// The addresses held right now, by whom (an attachment, or a pin). An ADD's address goes
    /// in once it is answered, and an ephemeral one comes out before its DEL is sent: a
    /// correct daemon never answers an address that is in it.
    held: Mutex<HashMap<String, String>>,
    /// Pinned identity -> its address.
    pins: Mutex<BTreeMap<String, String>>,
}

impl Model {
    /// Hands the attachments out to `workers` callers for the next storm.
    pub fn hand_out(&mut self, workers: usize) -> Vec<Vec<Att>> {
        let mut mine: Vec<Vec<Att>> = vec![Vec::new(); workers];
        for a in std::mem::take(&mut self.atts).into_values() {
            mine[a.worker].push(a);
        }
        mine
    }

    /// Books an ADD answered `ip`: the pin must not move and the address must not be another's.
    pub fn answered(&self, a: &mut Att, ip: String, added: serde_json::Value, out: &mut Storm) {
        out.adds += 1;
        if let Kind::Pinned(identity) = &a.kind {
            let mut pins = self.pins.lock().expect("lock");
            let pin = pins.entry(identity.clone()).or_insert_with(|| ip.clone());
            if *pin != ip {
                out.failures.push(format!(
                    "{identity}'s pin moved: {} was answered {ip}, the pin is {pin}",
                    a.who()
                ));
            }
        }
        let owner = a.owner();
        let other = self
            .held
            .lock()
            .expect("lock")
            .insert(ip.clone(), owner.clone());
        if let Some(other) = other.filter(|o| *o != owner) {
            out.failures.push(format!(
                "{ip} handed out twice: answered to {} while {other} holds it",
                a.who()
            ));
        }
        a.ip = Some(ip);
        a.added = Some(added);
    }

    /// Before a DEL is sent: the attachment has no answered address any more, and an
    /// ephemeral one is no longer held (the daemon may hand it out from now on).
    pub fn releasing(&self, a: &mut Att) {
        let ip = a.ip.take();
        a.added = None;
        if a.kind == Kind::Ephemeral
            && let Some(ip) = ip
        {
            self.held.lock().expect("lock").remove(&ip);
        }
    }

    /// Takes in a round's storms: their attachments and answered DELs. Returns their totals
    /// and failures.
    pub fn take(&mut self, storms: Vec<Storm>) -> (Totals, Vec<String>) {
        let mut t = Totals::default();
        let mut failures = Vec::new();
        for st in storms {
            t.adds += st.adds;
            t.dels += st.dels;
            t.checks += st.checks;
            t.migrations += st.migrations;
            t.in_flight += st.atts.iter().filter(|a| a.ip.is_none()).count();
            failures.extend(st.failures);
            self.gone.extend(st.gone);
            for a in st.atts {
                self.atts.insert(a.pod.container_id.clone(), a);
            }
        }
        (t, failures)
    }

    /// Checks what the store holds after a restart against the model (see the module), then
    /// adopts what it says about the calls in flight at the kill.
    pub fn check_and_adopt(&mut self, seen: &[Seen]) -> Checked {
        let mut problems = Vec::new();
        let mut by_ip: HashMap<&str, &Seen> = HashMap::new();
        let mut holding: HashMap<&str, &str> = HashMap::new();
        let mut identities: BTreeMap<&str, &str> = BTreeMap::new();
        for s in seen {
            let ip = s.ip.as_str();
            if by_ip.insert(ip, s).is_some() {
                problems.push(format!("{ip} is in two records"));
            }
            match &s.identity {
                None if s.holders.is_empty() => {
                    problems.push(format!(
                        "{ip}: an ephemeral address nobody holds: {}",
                        s.describe
                    ));
                }
                None => {}
                Some(identity) => {
                    if let Some(other) = identities.insert(identity, ip) {
                        problems.push(format!("identity {identity} holds both {other} and {ip}"));
                    }
                }
            }
            for ctr in &s.holders {
                if let Some(other) = holding.insert(ctr, ip) {
                    problems.push(format!("container {ctr} holds both {other} and {ip}"));
                }
                if !self.atts.contains_key(ctr) {
                    problems.push(if self.gone.contains(ctr) {
                        format!("{ip} is held by container {ctr}, whose DEL was answered (or which was seen uncommitted) before")
                    } else {
                        format!("{ip} is held by container {ctr}, which the storm never created")
                    });
                }
            }
        }
        let describe = |ip: &str| {
            by_ip
                .get(ip)
                .map_or("free", |s| s.describe.as_str())
                .to_owned()
        };
        // Every answered ADD survived.
        for a in self.atts.values() {
            let Some(ip) = &a.ip else { continue };
            if holding.get(a.pod.container_id.as_str()) != Some(&ip.as_str()) {
                problems.push(format!(
                    "lost an answered ADD: {} was answered {ip}; after the restart {ip} is {}",
                    a.who(),
                    describe(ip)
                ));
            }
        }
        let held = self.held.get_mut().expect("lock");
        let pins = self.pins.get_mut().expect("lock");
        // Pins stay where they are.
        for (identity, ip) in pins.iter() {
            if identities.get(identity.as_str()) != Some(&ip.as_str()) {
                problems.push(format!(
                    "lost a pin: {identity} had {ip}; after the restart {ip} is {}, the identity has {:?}",
                    describe(ip),
                    identities.get(identity.as_str())
                ));
            }
        }
        // Adopt the calls in flight at the kill.
        let uncertain: Vec<String> = self
            .atts
            .values()
            .filter(|a| a.ip.is_none())
            .map(|a| a.pod.container_id.clone())
            .collect();
        let mut committed = 0;
        let mut uncommitted = Vec::new();
        for ctr in uncertain {
            let Some(ip) = holding.get(ctr.as_str()) else {
                uncommitted.extend(self.atts.remove(&ctr));
                self.gone.insert(ctr);
                continue;
            };
            let a = self.atts.get_mut(&ctr).expect("listed");
            let owner = a.owner();
            if let Some(other) = held
                .insert((*ip).to_owned(), owner.clone())
                .filter(|o| *o != owner)
            {
                problems.push(format!(
                    "{ip} is held by {} (in flight at the kill) while {other} holds it",
                    a.who()
                ));
            }
            a.ip = Some((*ip).to_owned());
            committed += 1;
        }
        for (identity, ip) in &identities {
            let pin = pins
                .entry((*identity).to_owned())
                .or_insert_with(|| (*ip).to_owned());
            if pin != ip {
                problems.push(format!("{identity} has two pins: {pin} and {ip}"));
            }
            held.entry((*ip).to_owned())
                .or_insert_with(|| pin_owner(identity));
        }
        // Now every allocated address is known, and nothing else.
        let mut allocated: Vec<&str> = by_ip.keys().copied().collect();
        let mut known: Vec<&str> = held.keys().map(String::as_str).collect();
        allocated.sort_unstable();
        known.sort_unstable();
        if allocated != known {
            problems.push(format!(
                "allocated after the restart: {allocated:?}; answered or adopted: {known:?}"
            ));
        }
        Checked {
            problems,
            committed,
            uncommitted,
        }
    }

    /// A running attachment at random, for a retried ADD ([`Model::retried`]).
    pub fn any_running(&self, rng: &mut Rng) -> Option<&Att> {
        let running: Vec<&Att> = self.atts.values().filter(|a| a.ip.is_some()).collect();
        (!running.is_empty()).then(|| running[rng.below(running.len() as u64) as usize])
    }

    /// A retried ADD of a running attachment must answer its address.
    pub fn retried(a: &Att, o: &CniOutcome) -> Option<String> {
        (o.ip() != a.ip).then(|| {
            format!(
                "a retried ADD for {} answered {:?}, not its {:?}: {}",
                a.who(),
                o.ip(),
                a.ip,
                o.out
            )
        })
    }
}
