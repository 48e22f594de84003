//! The single writer: plans against the in-memory state, applies, and commits to the store in
//! groups. Requests that arrive while a commit is in flight are planned together and made
//! durable by one commit (group commit); each caller gets its answer only once its changes
//! are durable.
//!
//! # Expected flow
//!
//! ADD and DEL are planned here, on the current state. Work planned elsewhere on a look at
//! the state (the reconciler's releases, CNI GC, a release by hand) comes as
//! [`Op::Apply`]: each of its changes is applied only if its allocation is still at the
//! revision it was planned on, so nothing that changed since is released.
//!
//! # Guarantees
//!
//! - Every write is conditional on one address's revision ([`tether_store`]): an address
//!   another writer claimed first is never handed out twice. Such a conflict is normal: the
//!   writer re-reads the address and plans the request again, up to [`MAX_ATTEMPTS`] times,
//!   then answers [`WriteError::Contended`] ("try again later"). The first re-plan is
//!   immediate (the address it lost is known now, and the search moves elsewhere); from the
//!   second on, the request waits a random moment of up to [`JITTER_CAP`], doubling with
//!   each attempt, so that writers that keep running into each other fall out of step.
//! - Readers never see uncommitted state: the state stays write-locked from planning until
//!   the commit's outcome is known and applied.
//! - A failed commit leaves nothing of it in memory: the batch's changes are undone, then the
//!   state is re-read from the store (a failed commit may still have reached the disk). If
//!   that read fails too (the store is unreachable: an API server outage), the state is
//!   stale: nothing is planned on it, every operation fails with the store's error and
//!   `/readyz` fails, until a re-read succeeds (tried before each batch, and while idle every
//!   [`RESYNC_MIN`], doubling up to [`RESYNC_MAX`]).
//! - A caller that gave up (its connection closed) before its ADD was committed gets
//!   nothing: the ADD is skipped, or rolled back before anyone else can see it.
//! - Changes other writers make to the store reach the state through the store's feed
//!   before each batch is planned.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tether_core::Decision;
use tether_core::alloc::{AddRequest, AllocError, Assigned, Attachment, Change, Ipam, Liveness};
use tether_core::pool::Pool;
use tether_store::{Event, GroupOutcome, Store, StoreError};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// Most requests planned into one commit.
const MAX_BATCH: usize = 256;
/// How long a batch waits for company under concurrent load.
const GATHER: std::time::Duration = std::time::Duration::from_micros(500);
/// How often one request is planned again after its commit conflicted.
pub const MAX_ATTEMPTS: u32 = 8;
/// The longest a conflicted request waits before it is planned again.
pub const JITTER_CAP: std::time::Duration = std::time::Duration::from_millis(32);
/// How often an idle writer applies what other writers committed (the change feed), so that
/// reads (`/v1/pools`, a retried ADD, the reconciler's plan, pool status) see it without
/// waiting for this daemon's next request.
const IDLE_ABSORB: std::time::Duration = std::time::Duration::from_millis(100);
/// How soon an idle writer whose state is stale first tries to re-read the store.
pub const RESYNC_MIN: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest an idle writer whose state is stale waits between two re-reads.
pub const RESYNC_MAX: std::time::Duration = std::time::Duration::from_secs(8);

/// One ADD, with everything decided before it reaches the writer.
pub struct AddOp {
    /// Who asks.
    pub attachment: Attachment,
    /// CNI network name.
    pub network: String,
    /// The policy chain's decision.
    pub decision: Decision,
    /// Candidate pools, in order.
    pub pools: Vec<String>,
    /// Addresses asked for.
    pub requested: Vec<IpAddr>,
    /// The node asking (see [`tether_core::alloc::Holder::node`]).
    pub node: String,
    /// Now, unix seconds.
    pub now: u64,
    /// Whether a current holder's pod still exists.
    pub liveness: Box<dyn Fn(&Attachment) -> Liveness + Send>,
}

/// What the writer is asked to do.
pub enum Op {
    /// CNI ADD.
    Add(Box<AddOp>),
    /// CNI DEL.
    Del {
        /// CNI_CONTAINERID.
        container_id: String,
        /// CNI_IFNAME.
        ifname: String,
        /// Now, unix seconds.
        now: u64,
    },
    /// Changes planned elsewhere, each applied only if its allocation is unchanged since.
    Apply(Vec<Change>),
    /// Re-read these addresses from the store into the state (records the change feed has
    /// not brought yet, found by asking the store directly).
    Refresh(Vec<IpAddr>),
}

/// What an operation did.
#[derive(Debug)]
pub enum Outcome {
    /// The ADD's addresses.
    Added(Vec<Assigned>),
    /// The changes applied (for `Apply`: those whose allocation was unchanged).
    Changed(Vec<Change>),
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Planning refused it.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer is gone.
    #[error("the writer has stopped (tetherd is shutting down, or its store failed)")]
    Stopped,
    /// The caller went away before its ADD was committed.
    #[error("the caller gave up before the change was committed; nothing was allocated")]
    Abandoned,
    /// Other writers kept claiming the same addresses first.
    #[error(
        "other writers changed the addresses this request needed {attempts} times in a row; try again"
    )]
    Contended {
        /// How often it was planned.
        attempts: u32,
    },
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, WriteError>>,
    attempts: u32,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Job>,
    healthy: Arc<AtomicBool>,
    /// False once the writer's thread has ended (a panic included): nothing is served again
    /// until the daemon restarts.
    running: Arc<AtomicBool>,
    /// True while the state may differ from the store (see [`Writer::stale`]).
    stale: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer over a state loaded from `store`. `events` is the store's change
    /// feed, subscribed to *before* the state was read, so that nothing another writer
    /// commits in between is missed (what the state already holds is recognised by its
    /// revision and skipped).
    pub fn start(
        ipam: Arc<RwLock<Ipam>>,
        store: Arc<dyn Store>,
        events: Receiver<Event>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let running = Arc::new(AtomicBool::new(true));
        let stale = Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        let r = running.clone();
        let st = stale.clone();
        let handle = std::thread::Builder::new()
            .name("tether-writer".into())
            .spawn(move || {
                // However the loop ends (a panic included), the writer is no longer healthy,
                // nor running.
                struct Down(Arc<AtomicBool>, Arc<AtomicBool>);
                impl Drop for Down {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::SeqCst);
                        self.1.store(false, Ordering::SeqCst);
                    }
                }
                let _down = Down(h.clone(), r);
                let mut w = Loop {
                    rx,
                    events,
                    ipam,
                    store,
                    metrics,
                    healthy: h,
                    stale_flag: st,
                    carried: VecDeque::new(),
                    deferred: Vec::new(),
                    rng: seed(),
                    stale: None,
                };
                w.run();
            })?;
        Ok((
            Writer {
                tx,
                healthy,
                running,
                stale,
            },
            handle,
        ))
    }

    /// Submits an operation and waits until it is durable.
    pub async fn submit(&self, op: Op) -> Result<Outcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                op,
                reply,
                attempts: 0,
            })
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Whether the writer runs and its last commit succeeded: what `/readyz` reports.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Whether the state may differ from the store (a commit or a re-read failed and the
    /// store has not been re-read since): nothing may be answered from it then, not even a
    /// retried ADD or a CHECK; the writer answers every request code 11 until it re-reads.
    pub fn stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    /// Whether the writer's thread still runs (a failed commit or a store outage leaves it
    /// running; a panic does not): what `/healthz` reports.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

/// A job planned into the batch: its changes form one group, or (for `Apply`) one group
/// each.
struct Planned {
    job: Job,
    answer: Result<Outcome, WriteError>,
    /// Indices into the batch's groups.
    groups: Vec<usize>,
    /// Who to roll back if the caller gives up while it is committed (ADDs that changed
    /// something).
    rollback: Option<(Attachment, u64)>,
}

struct Loop {
    rx: Receiver<Job>,
    events: Receiver<Event>,
    ipam: Arc<RwLock<Ipam>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
    /// Jobs that touched an address already written in the batch, or whose commit
    /// conflicted: planned first in the next batch.
    carried: VecDeque<Job>,
    /// Jobs that conflicted more than once, waiting until their moment (see [`jitter`]).
    deferred: Vec<(Instant, Job)>,
    /// State of the jitter's random numbers.
    rng: u64,
    /// Set while the state may differ from the store (a commit failed, and so did re-reading
    /// the store): when an idle writer tries to re-read it next, and the wait after that.
    stale: Option<(Instant, std::time::Duration)>,
    /// Mirrors `stale.is_some()` for [`Writer::stale`].
    stale_flag: Arc<AtomicBool>,
}

/// The unit of a claim: an address, whatever pool names it.
type Key = IpAddr;

fn key(c: &Change) -> Key {
    c.ip()
}

fn plan(op: &Op, ipam: &Ipam) -> Result<(Vec<Change>, Option<Vec<Assigned>>), AllocError> {
    match op {
        Op::Add(a) => {
            let req = AddRequest {
                attachment: a.attachment.clone(),
                network: a.network.clone(),
                decision: &a.decision,
                pools: a.pools.clone(),
                requested: a.requested.clone(),
                node: a.node.clone(),
                now: a.now,
            };
            let plan = ipam.plan_add(&req, &*a.liveness)?;
            Ok((plan.changes, Some(plan.assigned)))
        }
        Op::Del {
            container_id,
            ifname,
            now,
        } => Ok((ipam.plan_del(container_id, ifname, *now).changes, None)),
        Op::Refresh(_) => Ok((Vec::new(), None)),
        Op::Apply(changes) => Ok((
            changes
                .iter()
                .filter(|c| {
                    let current = ipam.get(c.pool(), c.ip()).map_or(0, |a| a.revision);
                    current == c.revision()
                })
                .cloned()
                .collect(),
            None,
        )),
    }
}

impl Loop {
    fn run(&mut self) {
        let mut concurrent = false;
        loop {
            let Some(jobs) = self.gather(&mut concurrent) else {
                break;
            };
            if !self.batch(jobs) {
                break;
            }
        }
        tracing::debug!("writer stopped");
    }

    /// Moves the deferred jobs whose moment has come to `jobs`; returns when the next one's
    /// comes.
    fn due(&mut self, jobs: &mut Vec<Job>) -> Option<Instant> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.deferred.len() {
            if self.deferred[i].0 <= now {
                jobs.push(self.deferred.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        self.deferred.iter().map(|(at, _)| *at).min()
    }

    /// The next batch: carried jobs first, then deferred ones whose moment has come, then
    /// what arrives.
    fn gather(&mut self, concurrent: &mut bool) -> Option<Vec<Job>> {
        let mut jobs: Vec<Job> = self.carried.drain(..).collect();
        let mut next = self.due(&mut jobs);
        while jobs.is_empty() {
            let wait = next.map_or(IDLE_ABSORB, |at| {
                at.saturating_duration_since(Instant::now())
                    .min(IDLE_ABSORB)
            });
            match self.rx.recv_timeout(wait) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout) => {
                    next = self.due(&mut jobs);
                    if jobs.is_empty() {
                        self.absorb_idle();
                        self.resync_idle();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if self.deferred.is_empty() {
                        return None;
                    }
                    // Let the deferred jobs finish before stopping.
                    std::thread::sleep(wait);
                    next = self.due(&mut jobs);
                }
            }
        }
        while jobs.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Under concurrent load (the previous batch had company), wait a moment for more
        // requests so that one fsync serves them all; a lone caller never waits.
        if *concurrent {
            let deadline = Instant::now() + GATHER;
            while jobs.len() < MAX_BATCH {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(j) => jobs.push(j),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        *concurrent = jobs.len() > 1;
        Some(jobs)
    }

    /// Plans, commits and answers one batch. False when the writer must stop.
    fn batch(&mut self, jobs: Vec<Job>) -> bool {
        let ipam = self.ipam.clone();
        // Readers wait while a batch is planned and committed: they only ever see durable
        // state.
        let mut state = ipam
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.absorb_events(&mut state);
        if self.stale.is_some()
            && let Err(e) = self.resync_stale(&mut state)
        {
            drop(state);
            let msg = format!(
                "the state is re-read from the store after a failed commit, and the store does not answer: {e}"
            );
            for job in jobs {
                let _ = job
                    .reply
                    .send(Err(WriteError::Store(StoreError::Unavailable(msg.clone()))));
            }
            return true;
        }

        let mut groups: Vec<Vec<Change>> = Vec::new();
        let mut undo: Vec<Vec<Change>> = Vec::new();
        let mut touched: HashSet<Key> = HashSet::new();
        let mut planned: Vec<Planned> = Vec::with_capacity(jobs.len());
        // Re-reads first, before anything of this batch is planned: a re-read replaces what
        // the state holds for an address, which must not be a change still to be committed.
        let (refreshes, jobs): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| matches!(j.op, Op::Refresh(_)));
        for job in refreshes {
            let mut answer = Ok(Outcome::Changed(Vec::new()));
            if let Op::Refresh(ips) = &job.op {
                for ip in ips {
                    if let Err(e) = refresh(&*self.store, &mut state, *ip) {
                        answer = Err(WriteError::Store(e));
                        break;
                    }
                }
            }
            planned.push(Planned {
                job,
                answer,
                groups: Vec::new(),
                rollback: None,
            });
        }
        for job in jobs {
            // An ADD whose caller already gave up is not planned at all.
            if matches!(job.op, Op::Add(_)) && job.reply.is_closed() {
                tracing::info!("ADD abandoned by its caller before it was planned");
                continue;
            }
            let (changes, assigned) = match plan(&job.op, &state) {
                Ok(p) => p,
                Err(e) => {
                    planned.push(Planned {
                        job,
                        answer: Err(WriteError::Alloc(e)),
                        groups: Vec::new(),
                        rollback: None,
                    });
                    continue;
                }
            };
            // A plan on an address already written in this batch would carry its old
            // revision: plan it again after this commit.
            if changes.iter().any(|c| touched.contains(&key(c))) {
                self.carried.push_back(job);
                continue;
            }
            touched.extend(changes.iter().map(key));
            let rollback = match &job.op {
                Op::Add(a) if !changes.is_empty() => Some((a.attachment.clone(), a.now)),
                _ => None,
            };
            let mut mine = Vec::new();
            match &job.op {
                Op::Apply(_) => {
                    for c in &changes {
                        mine.push(groups.len());
                        undo.push(state.apply_undoable(std::slice::from_ref(c)));
                        groups.push(vec![c.clone()]);
                    }
                }
                _ if !changes.is_empty() => {
                    mine.push(groups.len());
                    undo.push(state.apply_undoable(&changes));
                    groups.push(changes.clone());
                }
                _ => {}
            }
            let answer = match assigned {
                Some(a) => Ok(Outcome::Added(a)),
                None => Ok(Outcome::Changed(changes)),
            };
            planned.push(Planned {
                job,
                answer,
                groups: mine,
                rollback,
            });
        }
        self.metrics.batch_size.observe(planned.len() as f64);

        if !groups.is_empty() {
            let started = Instant::now();
            match self.store.commit(&groups) {
                Ok(outcomes) => {
                    self.healthy.store(true, Ordering::SeqCst);
                    self.metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.settle(&mut state, &groups, &undo, &outcomes, &mut planned);
                }
                Err(e) => {
                    self.healthy.store(false, Ordering::SeqCst);
                    tracing::error!(
                        "store commit failed; undoing the batch and re-reading the store: {e}"
                    );
                    for u in undo.iter().rev() {
                        state.apply(u);
                    }
                    let msg = e.to_string();
                    let unavailable = matches!(e, StoreError::Unavailable(_));
                    for p in planned.iter_mut() {
                        if p.answer.is_ok() && !p.groups.is_empty() {
                            let e = if unavailable {
                                StoreError::Unavailable(msg.clone())
                            } else {
                                StoreError::Backend(msg.clone())
                            };
                            p.answer = Err(WriteError::Store(e));
                            p.rollback = None;
                        }
                    }
                    // The commit may have reached the disk after all: the store is the truth.
                    if let Err(e2) = resync(&*self.store, &mut state) {
                        tracing::error!(
                            "re-reading the store failed too; nothing is planned until it can be re-read: {e2}"
                        );
                        self.set_stale(Some((Instant::now() + RESYNC_MIN, RESYNC_MIN)));
                        drop(state);
                        for p in planned {
                            let _ = p.job.reply.send(p.answer);
                        }
                        return true;
                    }
                }
            }
        }

        if !self.roll_back_abandoned(&mut state, &mut planned) {
            self.set_stale(Some((Instant::now() + RESYNC_MIN, RESYNC_MIN)));
            drop(state);
            for p in planned {
                let _ = p.job.reply.send(p.answer);
            }
            return true;
        }
        drop(state);
        for p in planned {
            if let Some(job) = p.requeue() {
                if job.attempts < 2 {
                    self.carried.push_back(job);
                } else {
                    let wait = jitter(&mut self.rng, job.attempts);
                    self.metrics.conflict_waits.inc();
                    self.deferred.push((Instant::now() + wait, job));
                }
            }
        }
        true
    }

    /// Applies a commit's outcomes: new revisions for what was written; for each conflict,
    /// the group undone, its address re-read, and its job planned again (or, for `Apply`,
    /// the change dropped).
    fn settle(
        &self,
        state: &mut Ipam,
        groups: &[Vec<Change>],
        undo: &[Vec<Change>],
        outcomes: &[GroupOutcome],
        planned: &mut [Planned],
    ) {
        let mut conflicted = vec![false; groups.len()];
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Ok(revs) => {
                    for (c, r) in groups[i].iter().zip(revs) {
                        if let Change::Put(a) = c {
                            state.set_revision(&a.pool, a.ip, *r);
                        }
                    }
                }
                Err(conflict) => {
                    conflicted[i] = true;
                    state.apply(&undo[i]);
                    tracing::debug!(%conflict, "another writer changed the address first; re-reading it");
                    self.metrics.conflicts.inc();
                    if let Err(e) = refresh(&*self.store, state, conflict.ip) {
                        tracing::warn!("re-reading {}/{}: {e}", conflict.pool, conflict.ip);
                    }
                    // Another writer is taking addresses right here: search elsewhere.
                    state.scatter(conflict.ip);
                }
            }
        }
        for p in planned.iter_mut() {
            if !p.groups.iter().any(|g| conflicted[*g]) {
                continue;
            }
            match (&p.job.op, &mut p.answer) {
                (Op::Apply(_), Ok(Outcome::Changed(applied))) => {
                    // Only the changes whose group went through were applied.
                    let kept: Vec<Change> = p
                        .groups
                        .iter()
                        .filter(|g| !conflicted[**g])
                        .map(|g| groups[*g][0].clone())
                        .collect();
                    *applied = kept;
                }
                _ => {
                    p.rollback = None;
                    p.answer = Err(WriteError::Contended {
                        attempts: p.job.attempts + 1,
                    });
                }
            }
        }
    }

    /// Callers that gave up while their ADD was committed: undo it before anyone sees it (the
    /// state is still locked), as their DEL would. False when the state can no longer be
    /// trusted (the rollback's commit failed and so did re-reading the store): it is stale
    /// until the store can be re-read.
    fn roll_back_abandoned(&mut self, state: &mut Ipam, planned: &mut [Planned]) -> bool {
        let gone: Vec<usize> = planned
            .iter()
            .enumerate()
            .filter(|(_, p)| p.answer.is_ok() && p.rollback.is_some() && p.job.reply.is_closed())
            .map(|(i, _)| i)
            .collect();
        if gone.is_empty() {
            return true;
        }
        let mut groups = Vec::new();
        let mut undo = Vec::new();
        for &i in &gone {
            let Some((att, now)) = &planned[i].rollback else {
                continue;
            };
            let c = state.plan_del(&att.container_id, &att.ifname, *now).changes;
            tracing::info!(container_id = %att.container_id, ifname = %att.ifname, "ADD abandoned by its caller while it was committed; rolling it back");
            undo.push(state.apply_undoable(&c));
            groups.push(c);
            planned[i].answer = Err(WriteError::Abandoned);
        }
        match self.store.commit(&groups) {
            Ok(outcomes) => {
                self.healthy.store(true, Ordering::SeqCst);
                for (i, o) in outcomes.iter().enumerate() {
                    match o {
                        Ok(revs) => {
                            for (c, r) in groups[i].iter().zip(revs) {
                                if let Change::Put(a) = c {
                                    state.set_revision(&a.pool, a.ip, *r);
                                }
                            }
                        }
                        Err(conflict) => {
                            state.apply(&undo[i]);
                            let _ = refresh(&*self.store, state, conflict.ip);
                        }
                    }
                }
            }
            Err(e) => {
                // The ADDs stay allocated, as on disk, until their DEL or a CNI GC.
                self.healthy.store(false, Ordering::SeqCst);
                for u in undo.iter().rev() {
                    state.apply(u);
                }
                tracing::warn!(
                    "rolling back abandoned ADDs failed; they stay allocated until their DEL or a CNI GC: {e}"
                );
                if let Err(e2) = resync(&*self.store, state) {
                    tracing::error!(
                        "re-reading the store failed too; nothing is planned until it can be re-read: {e2}"
                    );
                    return false;
                }
            }
        }
        true
    }

    /// Marks the state stale (`Some`: when to re-read next, and the wait before that) or
    /// fresh (`None`).
    fn set_stale(&mut self, stale: Option<(Instant, std::time::Duration)>) {
        self.stale_flag.store(stale.is_some(), Ordering::SeqCst);
        self.stale = stale;
    }

    /// Re-reads the store into a stale state; clears the staleness (and the writer is
    /// healthy again) when it could.
    fn resync_stale(&mut self, state: &mut Ipam) -> Result<(), StoreError> {
        match resync(&*self.store, state) {
            Ok(()) => {
                self.set_stale(None);
                self.healthy.store(true, Ordering::SeqCst);
                tracing::info!("the store answers again; the state is re-read from it");
                Ok(())
            }
            Err(e) => {
                let wait = self
                    .stale
                    .map_or(RESYNC_MIN, |(_, w)| (w * 2).min(RESYNC_MAX));
                self.set_stale(Some((Instant::now() + wait, wait)));
                Err(e)
            }
        }
    }

    /// While idle with a stale state: re-reads the store when its moment has come.
    fn resync_idle(&mut self) {
        match self.stale {
            Some((at, _)) if at <= Instant::now() => {}
            _ => return,
        }
        let ipam = self.ipam.clone();
        let mut state = ipam
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = self.resync_stale(&mut state) {
            tracing::debug!("re-reading the store: {e}");
        }
    }

    /// Brings in what other writers committed (and the echo of this writer's own commits,
    /// which the state already holds).
    fn absorb_events(&mut self, state: &mut Ipam) {
        let events: Vec<Event> = self.events.try_iter().collect();
        self.absorb_all(state, events);
    }

    /// While idle: applies what the change feed brought, if anything (the state's lock is
    /// taken only then).
    fn absorb_idle(&mut self) {
        let Ok(first) = self.events.try_recv() else {
            return;
        };
        let ipam = self.ipam.clone();
        let mut state = ipam
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut events = vec![first];
        events.extend(self.events.try_iter());
        self.absorb_all(&mut state, events);
    }

    /// Applies feed events; the state is stale (re-read whole before anything is planned on
    /// it) when one could not be applied.
    fn absorb_all(&mut self, state: &mut Ipam, events: Vec<Event>) {
        for e in events {
            if !absorb(&*self.store, state, e) && self.stale.is_none() {
                self.set_stale(Some((Instant::now(), RESYNC_MIN)));
                self.healthy.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Applies one change-feed event unless the state already has it (or something newer); an
/// address the feed may have missed changes of is read again from the store. False when
/// that read failed: the state may hold a record the store no longer has (a ghost, which a
/// retried ADD would answer), and must be re-read before it is trusted again.
fn absorb(store: &dyn Store, state: &mut Ipam, e: Event) -> bool {
    match e {
        Event::Stale { ip } => {
            if let Err(e) = refresh(store, state, ip) {
                tracing::warn!(%ip, "re-reading an address the change feed lost track of: {e}; the whole state is re-read before anything is planned on it");
                return false;
            }
        }
        Event::Put(a) => {
            if state
                .get(&a.pool, a.ip)
                .is_none_or(|cur| cur.revision < a.revision)
            {
                state.apply_foreign(&[Change::Put(a)]);
            }
        }
        Event::Deleted { pool, ip, revision } => {
            if state
                .get(&pool, ip)
                .is_some_and(|cur| cur.revision <= revision)
            {
                state.apply_foreign(&[Change::Delete { pool, ip, revision }]);
            }
        }
    }
    true
}

impl Planned {
    /// Answers the caller, or hands the job back to be planned again after a conflict.
    fn requeue(self) -> Option<Job> {
        match self.answer {
            Err(WriteError::Contended { attempts })
                if attempts < MAX_ATTEMPTS && !self.job.reply.is_closed() =>
            {
                let mut job = self.job;
                job.attempts = attempts;
                Some(job)
            }
            answer => {
                let _ = self.job.reply.send(answer);
                None
            }
        }
    }
}

/// How long a request that conflicted `attempts` times waits before it is planned again:
/// uniformly random below 2^(attempts - 1) ms, at most [`JITTER_CAP`].
fn jitter(rng: &mut u64, attempts: u32) -> std::time::Duration {
    // xorshift64: enough to put contending writers out of step.
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let cap = JITTER_CAP
        .as_micros()
        .min(1000u128 << attempts.saturating_sub(1).min(16));
    let cap = u64::try_from(cap).unwrap_or(u64::MAX).max(1);
    std::time::Duration::from_micros(*rng % cap)
}

/// A seed for [`jitter`] that differs between processes and threads.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() | 1
}

/// Re-reads one address from the store into the state: every allocation of it the state
/// holds, under whatever pool name, is replaced by what the store has.
fn refresh(store: &dyn Store, state: &mut Ipam, ip: IpAddr) -> Result<(), StoreError> {
    let stored = store.get(ip)?;
    let known: Vec<Change> = state.at(ip).into_iter().map(Change::delete).collect();
    state.apply_foreign(&known);
    let fresh: Vec<Change> = stored.into_iter().map(Change::Put).collect();
    state.apply_foreign(&fresh);
    Ok(())
}

/// Replaces the state with what the store holds, keeping the pools in force.
fn resync(store: &dyn Store, state: &mut Ipam) -> Result<(), StoreError> {
    let snap = store.snapshot()?;
    let pools: Vec<Pool> = state.pools().cloned().collect();
    let mut fresh = Ipam::new(pools, snap.allocations)
        .map_err(|e| StoreError::Backend(format!("rebuilding the state: {e}")))?;
    if let Some(seed) = state.spread() {
        fresh.spread_cursors(seed);
    }
    *state = fresh;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_grows_with_attempts_up_to_the_cap_and_varies() {
        let mut rng = seed();
        for attempts in 2..=MAX_ATTEMPTS + 8 {
            let cap = JITTER_CAP.min(std::time::Duration::from_millis(1 << (attempts - 1)));
            let draws: HashSet<std::time::Duration> =
                (0..64).map(|_| jitter(&mut rng, attempts)).collect();
            assert!(draws.iter().all(|d| *d < cap), "{attempts}: {draws:?}");
            assert!(
                draws.len() > 16,
                "{attempts}: too few distinct waits: {draws:?}"
            );
        }
    }
}
