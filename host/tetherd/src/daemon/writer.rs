//! The single writer: plans against the in-memory state, applies, and commits to the store in
//! groups. Requests that arrive while a commit is in flight are planned together and made
//! durable by one commit (group commit); each caller gets its answer only once its changes
//! are durable.
//!
//! # Guarantees
//!
//! - Readers never see uncommitted state: the state stays write-locked from planning until
//!   the commit's outcome is known.
//! - A failed commit leaves nothing of it in memory: the batch's changes are undone, then the
//!   state is re-read from the store (a failed commit may still have reached the disk). If
//!   that read fails too, the writer stops: every later call answers "try again later",
//!   `/readyz` fails, and a restart loads the state from the store.
//! - A caller that gave up (its connection closed) before its ADD was committed gets
//!   nothing: the ADD is skipped, or rolled back before anyone else can see it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tether_core::alloc::{AddRequest, AllocError, Assigned, Attachment, Change, Ipam, Liveness};
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
    pub liveness: Box<dyn Fn(&Attachment) -> Liveness + Send>,
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
    #[error("the writer has stopped (tetherd is shutting down, or its store failed)")]
    Stopped,
    #[error("the caller gave up before the change was committed; nothing was allocated")]
    Abandoned,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, WriteError>>,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Job>,
    healthy: Arc<AtomicBool>,
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
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let handle = std::thread::Builder::new()
            .name("tether-writer".into())
            .spawn(move || {
                // However the loop ends (a panic included), the writer is no longer healthy.
                struct Down(Arc<AtomicBool>);
                impl Drop for Down {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::SeqCst);
                    }
                }
                let _down = Down(h.clone());
                run(rx, ipam, store, revisions, metrics, &h)
            })?;
        Ok((Writer { tx, healthy }, handle))
    }

    /// Whether the writer runs and its last commit succeeded: what `/readyz` reports.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
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
            let plan = ipam.plan_add(&req, &*a.liveness)?;
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
    healthy: &AtomicBool,
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
        let mut undo: Vec<Vec<Change>> = Vec::new();
        let mut answers = Vec::with_capacity(jobs.len());
        for job in jobs {
            // An ADD whose caller already gave up is not planned at all.
            if matches!(job.op, Op::Add(_)) && job.reply.is_closed() {
                tracing::info!("ADD abandoned by its caller before it was planned");
                continue;
            }
            let rollback = match &job.op {
                Op::Add(a) => Some((a.attachment.clone(), a.now)),
                _ => None,
            };
            match plan(job.op, &mut state) {
                Ok((c, outcome)) => {
                    undo.push(state.apply_undoable(&c));
                    let made = !c.is_empty();
                    changes.extend(c);
                    answers.push((job.reply, Ok(outcome), rollback.filter(|_| made)));
                }
                Err(e) => answers.push((job.reply, Err(WriteError::Alloc(e)), None)),
            }
        }
        metrics.batch_size.observe(answers.len() as f64);
        if !changes.is_empty() {
            let started = Instant::now();
            match commit(&*store, &mut revisions, &changes) {
                Ok(()) => {
                    healthy.store(true, Ordering::SeqCst);
                    metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    healthy.store(false, Ordering::SeqCst);
                    tracing::error!(
                        "store commit failed; undoing the batch and re-reading the store: {e}"
                    );
                    for u in undo.iter().rev() {
                        state.apply(u);
                    }
                    let msg = e.to_string();
                    for (_, a, rollback) in answers.iter_mut() {
                        if a.is_ok() {
                            *a = Err(WriteError::Store(StoreError::Backend(msg.clone())));
                            *rollback = None;
                        }
                    }
                    // The commit may have reached the disk after all: the store is the truth.
                    match resync(&*store, &mut state) {
                        Ok(revs) => revisions = revs,
                        Err(e2) => {
                            tracing::error!(
                                "re-reading the store failed too; the writer stops (restart tetherd): {e2}"
                            );
                            drop(state);
                            for (reply, answer, _) in answers {
                                let _ = reply.send(answer);
                            }
                            return;
                        }
                    }
                }
            }
        }
        // Callers that gave up while their ADD was committed: undo it before anyone sees it
        // (the state is still locked), as their DEL would.
        let gone: Vec<(Attachment, u64)> = answers
            .iter()
            .filter(|(reply, a, _)| a.is_ok() && reply.is_closed())
            .filter_map(|(_, _, rollback)| rollback.clone())
            .collect();
        if !gone.is_empty() {
            let mut back = Vec::new();
            let mut back_undo = Vec::new();
            for (att, now) in &gone {
                let c = state.plan_del(&att.container_id, &att.ifname, *now).changes;
                back_undo.push(state.apply_undoable(&c));
                back.extend(c);
                tracing::info!(container_id = %att.container_id, ifname = %att.ifname, "ADD abandoned by its caller while it was committed; rolling it back");
            }
            if let Err(e) = commit(&*store, &mut revisions, &back) {
                // The ADDs stay allocated, as on disk, until their DEL or a CNI GC.
                for u in back_undo.iter().rev() {
                    state.apply(u);
                }
                tracing::warn!(
                    "rolling back abandoned ADDs failed; they stay allocated until their DEL or a CNI GC: {e}"
                );
                if let Ok(revs) = resync(&*store, &mut state) {
                    revisions = revs;
                }
            }
            for (reply, answer, _) in answers.iter_mut() {
                if answer.is_ok() && reply.is_closed() {
                    *answer = Err(WriteError::Abandoned);
                }
            }
        }
        drop(state);
        for (reply, answer, _) in answers {
            let _ = reply.send(answer);
        }
    }
    tracing::debug!("writer stopped");
}

/// Commits changes against the revisions the state was planned on, moving them on.
fn commit(
    store: &dyn Store,
    revisions: &mut BTreeMap<String, u64>,
    changes: &[Change],
) -> Result<(), StoreError> {
    let bs = batches(changes, |p| revisions.get(p).copied().unwrap_or(0));
    let revs = store.commit(&bs)?;
    for (b, r) in bs.iter().zip(revs) {
        revisions.insert(b.pool.clone(), r);
    }
    Ok(())
}

/// Replaces the state with what the store holds, keeping the pools in force.
fn resync(store: &dyn Store, state: &mut Ipam) -> Result<BTreeMap<String, u64>, StoreError> {
    let snap = store.snapshot()?;
    let pools: Vec<Pool> = state.pools().cloned().collect();
    let fresh = Ipam::new(pools, snap.allocations)
        .map_err(|e| StoreError::Backend(format!("rebuilding the state: {e}")))?;
    *state = fresh;
    Ok(snap.revisions)
}
