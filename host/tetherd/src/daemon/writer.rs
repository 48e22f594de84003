//! The single writer: plans against the in-memory state, applies, and commits to the store in
//! groups. Requests that arrive while a commit is in flight are planned together and made
//! durable by one commit (group commit); each caller gets its answer only once its changes
//! are durable.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tether_core::alloc::{AddRequest, AllocError, Assigned, Attachment, Change, Ipam};
use tether_core::pool::Pool;
use tether_core::{Decision, ReleaseCondition};
use tether_store::{Store, StoreError, batches};
use tokio::sync::oneshot;

use super::metrics::Metrics;

/// Most requests planned into one commit.
const MAX_BATCH: usize = 256;
/// How long a batch waits for company under concurrent load.
const GATHER: std::time::Duration = std::time::Duration::from_micros(500);

/// One ADD, with everything decided before it reaches the writer.
pub struct AddOp {
    pub attachment: Attachment,
    pub network: String,
    pub decision: Decision,
    pub pools: Vec<String>,
    pub requested: Vec<std::net::IpAddr>,
    pub now: u64,
    pub is_live: Box<dyn Fn(&Attachment) -> bool + Send>,
}

pub enum Op {
    Add(Box<AddOp>),
    Del {
        container_id: String,
        ifname: String,
        now: u64,
    },
    Gc {
        network: String,
        valid: HashSet<(String, String)>,
        now: u64,
    },
    Release {
        now: u64,
        fires: Box<dyn Fn(&ReleaseCondition) -> bool + Send>,
    },
    /// One address released by hand.
    Free {
        pool: String,
        ip: std::net::IpAddr,
        force: bool,
    },
}

pub enum Outcome {
    Added(Vec<Assigned>),
    Changed(Vec<Change>),
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the writer has stopped (tetherd is shutting down)")]
    Stopped,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, WriteError>>,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Job>,
}

impl Writer {
    /// Starts the writer over a loaded state.
    pub fn start(
        ipam: Arc<RwLock<Ipam>>,
        store: Arc<dyn Store>,
        revisions: BTreeMap<String, u64>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = channel();
        let handle = std::thread::Builder::new()
            .name("tether-writer".into())
            .spawn(move || run(rx, ipam, store, revisions, metrics))?;
        Ok((Writer { tx }, handle))
    }

    /// Submits an operation and waits until it is durable.
    pub async fn submit(&self, op: Op) -> Result<Outcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { op, reply })
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

fn plan(op: Op, ipam: &mut Ipam) -> Result<(Vec<Change>, Outcome), AllocError> {
    match op {
        Op::Add(a) => {
            let req = AddRequest {
                attachment: a.attachment,
                network: a.network,
                decision: &a.decision,
                pools: a.pools,
                requested: a.requested,
                now: a.now,
            };
            let plan = ipam.plan_add(&req, &*a.is_live)?;
            Ok((plan.changes, Outcome::Added(plan.assigned)))
        }
        Op::Del {
            container_id,
            ifname,
            now,
        } => {
            let changes = ipam.plan_del(&container_id, &ifname, now).changes;
            Ok((changes.clone(), Outcome::Changed(changes)))
        }
        Op::Gc {
            network,
            valid,
            now,
        } => {
            let changes = ipam.plan_gc(&network, &valid, now).changes;
            Ok((changes.clone(), Outcome::Changed(changes)))
        }
        Op::Release { now, fires } => {
            let changes = ipam.plan_release(now, &*fires).changes;
            Ok((changes.clone(), Outcome::Changed(changes)))
        }
        Op::Free { pool, ip, force } => {
            let changes = ipam.plan_free(&pool, ip, force)?.changes;
            Ok((changes.clone(), Outcome::Changed(changes)))
        }
    }
}

fn run(
    rx: Receiver<Job>,
    ipam: Arc<RwLock<Ipam>>,
    store: Arc<dyn Store>,
    mut revisions: BTreeMap<String, u64>,
    metrics: Arc<Metrics>,
) {
    let mut concurrent = false;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        // Under concurrent load (the previous batch had company), wait a moment for more
        // requests so that one fsync serves them all; a lone caller never waits.
        if concurrent {
            let deadline = Instant::now() + GATHER;
            while jobs.len() < MAX_BATCH {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
        }
        concurrent = jobs.len() > 1;
        // Readers wait while a batch is planned and committed: they only ever see durable state.
        let mut state = ipam
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changes = Vec::new();
        let mut answers = Vec::with_capacity(jobs.len());
        for job in jobs {
            match plan(job.op, &mut state) {
                Ok((c, outcome)) => {
                    state.apply(&c);
                    changes.extend(c);
                    answers.push((job.reply, Ok(outcome)));
                }
                Err(e) => answers.push((job.reply, Err(WriteError::Alloc(e)))),
            }
        }
        metrics.batch_size.observe(answers.len() as f64);
        if !changes.is_empty() {
            let started = Instant::now();
            let bs = batches(&changes, |p| revisions.get(p).copied().unwrap_or(0));
            match store.commit(&bs) {
                Ok(revs) => {
                    for (b, r) in bs.iter().zip(revs) {
                        revisions.insert(b.pool.clone(), r);
                    }
                    metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    tracing::error!("store commit failed, reloading state from the store: {e}");
                    match store.snapshot() {
                        Ok(snap) => {
                            let pools: Vec<Pool> = state.pools().cloned().collect();
                            *state = Ipam::new(pools, snap.allocations);
                            revisions = snap.revisions;
                        }
                        Err(e2) => tracing::error!("reloading from the store failed too: {e2}"),
                    }
                    let msg = e.to_string();
                    for (_, a) in answers.iter_mut() {
                        if a.is_ok() {
                            *a = Err(WriteError::Store(StoreError::Backend(msg.clone())));
                        }
                    }
                }
            }
        }
        drop(state);
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }
    tracing::debug!("writer stopped");
}
