//! The writer against real and misbehaving stores: conflicts re-planned, two engines on one
//! store, failed commits undone, a writer that cannot resync waits for the store, callers
//! that gave up get nothing.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tether_core::Decision;
use tether_core::alloc::{AllocError, Allocation, Attachment, Change, Ipam, Liveness};
use tether_core::pool::{IpPoolSpec, Pool};
use tether_engine::Metrics;
use tether_engine::writer::{AddOp, MAX_ATTEMPTS, Op, Outcome, WriteError, Writer};
use tether_store::embedded::EmbeddedStore;
use tether_store::{Conflict, Event, GroupOutcome, Snapshot, Store, StoreError};

fn pool(ips: &str) -> Pool {
    pool_named("p", ips)
}

fn pool_named(name: &str, ips: &str) -> Pool {
    Pool::new(
        name,
        &IpPoolSpec {
            subnet: "10.0.0.0/24".into(),
            ips: vec![ips.into()],
            ..IpPoolSpec::default()
        },
    )
    .expect("pool")
}

fn add(container: &str) -> Op {
    add_in(container, "p")
}

fn add_in(container: &str, pool: &str) -> Op {
    Op::Add(Box::new(AddOp {
        attachment: Attachment {
            container_id: container.into(),
            ifname: "eth0".into(),
            namespace: "default".into(),
            pod: container.into(),
            pod_uid: format!("uid-{container}"),
        },
        network: "net".into(),
        decision: Decision::Ephemeral,
        pools: vec![pool.into()],
        requested: vec![],
        node: String::new(),
        now: 1,
        liveness: Box::new(|_: &Attachment| Liveness::Unknown),
    }))
}

fn del(container: &str) -> Op {
    Op::Del {
        container_id: container.into(),
        ifname: "eth0".into(),
        now: 2,
    }
}

fn ip_of(o: Result<Outcome, WriteError>) -> Result<IpAddr, WriteError> {
    match o? {
        Outcome::Added(a) => Ok(a[0].ip),
        Outcome::Changed(_) => panic!("ADD answered with changes"),
    }
}

struct Engine {
    writer: Writer,
    ipam: Arc<RwLock<Ipam>>,
    metrics: Arc<Metrics>,
    _thread: std::thread::JoinHandle<()>,
}

fn engine(store: Arc<dyn Store>, pools: Vec<Pool>) -> Engine {
    let events = store.subscribe();
    let snap = store.snapshot().expect("snapshot");
    let ipam = Arc::new(RwLock::new(
        Ipam::new(pools, snap.allocations).expect("pools"),
    ));
    let metrics = Arc::new(Metrics::new());
    let (writer, thread) =
        Writer::start(ipam.clone(), store, events, metrics.clone()).expect("writer");
    Engine {
        writer,
        ipam,
        metrics,
        _thread: thread,
    }
}

fn embedded() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
    (dir, store)
}

/// A store that forwards to another, with switches to break it.
struct Faulty {
    inner: Arc<dyn Store>,
    /// No change feed: this writer's view goes stale.
    deaf: bool,
    fail_commit: AtomicBool,
    /// Commits panic (a bug in a backend): the writer thread dies.
    panic_commit: AtomicBool,
    fail_snapshot: AtomicBool,
    /// Every group conflicts.
    always_conflict: AtomicBool,
    /// The next this many commits conflict.
    conflicts_left: AtomicUsize,
    /// While closed, commits wait.
    closed: Mutex<bool>,
    opened: Condvar,
    commits: AtomicUsize,
}

impl Faulty {
    fn new(inner: Arc<dyn Store>) -> Faulty {
        Faulty {
            inner,
            deaf: false,
            fail_commit: AtomicBool::new(false),
            panic_commit: AtomicBool::new(false),
            fail_snapshot: AtomicBool::new(false),
            always_conflict: AtomicBool::new(false),
            conflicts_left: AtomicUsize::new(0),
            closed: Mutex::new(false),
            opened: Condvar::new(),
            commits: AtomicUsize::new(0),
        }
    }
}

impl Store for Faulty {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        if self.fail_snapshot.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("snapshot broken on purpose".into()));
        }
        self.inner.snapshot()
    }

    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError> {
        self.inner.get(ip)
    }

    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        let mut closed = self.closed.lock().expect("gate");
        while *closed {
            closed = self.opened.wait(closed).expect("gate");
        }
        drop(closed);
        assert!(
            !self.panic_commit.load(Ordering::SeqCst),
            "commit panics on purpose"
        );
        if self.fail_commit.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("commit broken on purpose".into()));
        }
        let counted = self
            .conflicts_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if counted || self.always_conflict.load(Ordering::SeqCst) {
            return Ok(groups
                .iter()
                .map(|g| {
                    Err(Conflict {
                        pool: g[0].pool().to_owned(),
                        ip: g[0].ip(),
                        expected: g[0].revision(),
                        found: 999,
                    })
                })
                .collect());
        }
        self.inner.commit(groups)
    }

    fn subscribe(&self) -> Receiver<Event> {
        if self.deaf {
            channel().1
        } else {
            self.inner.subscribe()
        }
    }
}

/// An engine whose view is stale (it never hears of the other's commits) claims an address
/// the other holds: the store refuses, it re-reads that address and plans again.
#[tokio::test]
async fn a_conflicting_claim_is_planned_again() {
    let (_dir, store) = embedded();
    let a = engine(store.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    let mut deaf = Faulty::new(store.clone());
    deaf.deaf = true;
    let b = engine(Arc::new(deaf), vec![pool("10.0.0.1-10.0.0.4")]);
    let first = ip_of(a.writer.submit(add("a1")).await).expect("a1");
    let second = ip_of(b.writer.submit(add("b1")).await).expect("b1 after a re-plan");
    assert_ne!(first, second, "one address handed out by two engines");
    assert_eq!(b.metrics.conflicts.get(), 1, "b's first claim conflicted");
    // b now knows a's address from the re-read.
    let b_state = b.ipam.read().expect("state");
    assert!(
        b_state.get("p", first).is_some(),
        "the conflict's address was re-read"
    );
    let stored = store.snapshot().expect("snapshot").allocations;
    assert_eq!(stored.len(), 2);
}

/// The unit of a claim is the address, not the pool: an engine that knows the pool by a new
/// name (renamed in its file, the other engine not reloaded yet) and has a stale view claims
/// an address the other holds under the old name. The store refuses; it re-reads the address
/// and takes another.
#[tokio::test]
async fn a_claim_under_another_pool_name_conflicts_and_is_planned_again() {
    let (_dir, store) = embedded();
    let a = engine(store.clone(), vec![pool_named("old", "10.0.0.1-10.0.0.4")]);
    let mut deaf = Faulty::new(store.clone());
    deaf.deaf = true;
    let b = engine(Arc::new(deaf), vec![pool_named("new", "10.0.0.1-10.0.0.4")]);
    let first = ip_of(a.writer.submit(add_in("a1", "old")).await).expect("a1");
    let second = ip_of(b.writer.submit(add_in("b1", "new")).await).expect("b1 after a re-plan");
    assert_ne!(first, second, "one address handed out under two pool names");
    assert_eq!(b.metrics.conflicts.get(), 1, "b's first claim conflicted");
    // b re-read the address: it holds it as an orphan of the old name, reserved.
    let b_state = b.ipam.read().expect("state");
    assert_eq!(
        b_state.at(first).len(),
        1,
        "the conflict's address was re-read"
    );
    b_state.check().expect("b's state is consistent");
}

/// Two engines, one of which knows the pool by another name and never hears of the other's
/// commits (its watch lags behind), on a pool of sixteen: each of four callers keeps two pods
/// (an ADD, then the DEL of its older pod), so addresses stay held while others are handed
/// out. No address is ever held by two pods, and nothing is left at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_with_a_renamed_pool_never_hand_out_an_address_twice() {
    let (_dir, store) = embedded();
    let names = ["old", "new"];
    let mut deaf = Faulty::new(store.clone());
    deaf.deaf = true;
    let stores: [Arc<dyn Store>; 2] = [store.clone(), Arc::new(deaf)];
    let engines: Vec<Arc<Engine>> = names
        .iter()
        .zip(stores)
        .map(|(n, s)| Arc::new(engine(s, vec![pool_named(n, "10.0.0.1-10.0.0.16")])))
        .collect();
    let held: Arc<Mutex<HashMap<IpAddr, String>>> = Arc::default();
    let granted = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (n, e) in engines.iter().enumerate() {
        for t in 0..2 {
            let (e, held, name, granted) = (e.clone(), held.clone(), names[n], granted.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine: VecDeque<(String, IpAddr)> = VecDeque::new();
                for i in 0..40 {
                    let c = format!("e{n}-t{t}-{i}");
                    match ip_of(e.writer.submit(add_in(&c, name)).await) {
                        Ok(ip) => {
                            granted.fetch_add(1, Ordering::SeqCst);
                            if let Some(other) = held.lock().expect("held").insert(ip, c.clone()) {
                                panic!("{ip} handed to {c} while {other} holds it");
                            }
                            mine.push_back((c, ip));
                        }
                        Err(WriteError::Contended { .. })
                        | Err(WriteError::Alloc(AllocError::PoolExhausted { .. })) => {}
                        Err(other) => panic!("{c}: {other}"),
                    }
                    while mine.len() > 1 {
                        let Some((old, ip)) = mine.pop_front() else {
                            break;
                        };
                        held.lock().expect("held").remove(&ip);
                        e.writer.submit(del(&old)).await.expect("DEL");
                    }
                }
                for (old, ip) in mine {
                    held.lock().expect("held").remove(&ip);
                    e.writer.submit(del(&old)).await.expect("DEL");
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("caller task");
    }
    assert!(
        granted.load(Ordering::SeqCst) >= 4 * 40 / 2,
        "most requests should get an address: {}",
        granted.load(Ordering::SeqCst)
    );
    assert!(
        store.snapshot().expect("snapshot").allocations.is_empty(),
        "leaked"
    );
}

/// A request that keeps conflicting is answered "contended" after a bounded number of tries.
#[tokio::test]
async fn endless_conflicts_give_up_with_a_clear_error() {
    let (_dir, store) = embedded();
    let faulty = Arc::new(Faulty::new(store.clone()));
    faulty.always_conflict.store(true, Ordering::SeqCst);
    let e = engine(faulty.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    match e.writer.submit(add("c")).await {
        Err(WriteError::Contended { attempts }) => assert_eq!(attempts, MAX_ATTEMPTS),
        other => panic!("expected contended, got {other:?}"),
    }
    assert_eq!(faulty.commits.load(Ordering::SeqCst), MAX_ATTEMPTS as usize);
    assert_eq!(e.ipam.read().expect("state").allocations().count(), 0);
    assert!(store.snapshot().expect("snapshot").allocations.is_empty());
}

/// A request that conflicts again and again is planned again, from its second conflict on
/// after a jittered wait (counted), and is served once the conflicts stop.
#[tokio::test]
async fn repeated_conflicts_wait_and_then_succeed() {
    let (_dir, store) = embedded();
    let faulty = Arc::new(Faulty::new(store.clone()));
    faulty
        .conflicts_left
        .store(MAX_ATTEMPTS as usize - 2, Ordering::SeqCst);
    let e = engine(faulty.clone(), vec![pool("10.0.0.1-10.0.0.8")]);
    match e.writer.submit(add("c")).await {
        Ok(Outcome::Added(a)) => assert_eq!(a.len(), 1),
        other => panic!("expected an address, got {other:?}"),
    }
    assert_eq!(
        faulty.commits.load(Ordering::SeqCst),
        MAX_ATTEMPTS as usize - 1
    );
    assert_eq!(store.snapshot().expect("snapshot").allocations.len(), 1);
    // The first re-plan is at once; every later one waited its jittered moment.
    assert_eq!(e.metrics.conflict_waits.get(), MAX_ATTEMPTS as u64 - 3);
}

/// Two engines on one store, four callers each, ADD and DEL in a loop on a pool of eight:
/// no address is ever held by two pods, every request is answered, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_share_a_small_pool_without_duplicates_or_losses() {
    let (_dir, store) = embedded();
    let engines: Vec<Arc<Engine>> = (0..2)
        .map(|_| Arc::new(engine(store.clone(), vec![pool("10.0.0.1-10.0.0.8")])))
        .collect();
    let held: Arc<Mutex<HashMap<IpAddr, String>>> = Arc::default();
    let answered = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (n, e) in engines.iter().enumerate() {
        for t in 0..4 {
            let (e, held, answered, granted) =
                (e.clone(), held.clone(), answered.clone(), granted.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..40 {
                    let c = format!("e{n}-t{t}-{i}");
                    let got = e.writer.submit(add(&c)).await;
                    answered.fetch_add(1, Ordering::SeqCst);
                    match ip_of(got) {
                        Ok(ip) => {
                            granted.fetch_add(1, Ordering::SeqCst);
                            if let Some(other) = held.lock().expect("held").insert(ip, c.clone()) {
                                panic!("{ip} handed to {c} while {other} holds it");
                            }
                            tokio::task::yield_now().await;
                            held.lock().expect("held").remove(&ip);
                            e.writer.submit(del(&c)).await.expect("DEL");
                        }
                        Err(WriteError::Contended { .. })
                        | Err(WriteError::Alloc(AllocError::PoolExhausted { .. })) => {}
                        Err(other) => panic!("{c}: {other}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("caller task");
    }
    assert_eq!(
        answered.load(Ordering::SeqCst),
        2 * 4 * 40,
        "a request got no answer"
    );
    assert!(
        granted.load(Ordering::SeqCst) >= 2 * 4 * 40 / 2,
        "most requests should get an address: {}",
        granted.load(Ordering::SeqCst)
    );
    assert!(
        store.snapshot().expect("snapshot").allocations.is_empty(),
        "leaked"
    );
    // Each engine, once it has absorbed the other's commits, agrees: nothing allocated.
    for e in &engines {
        let _ = e.writer.submit(del("nobody")).await;
        assert_eq!(e.ipam.read().expect("state").allocations().count(), 0);
    }
    eprintln!(
        "conflicts re-planned: {} and {}",
        engines[0].metrics.conflicts.get(),
        engines[1].metrics.conflicts.get()
    );
}

/// A failed commit leaves nothing in memory, fails readiness, and the next good commit
/// restores it.
#[tokio::test]
async fn a_failed_commit_is_undone_and_fails_readiness() {
    let (_dir, store) = embedded();
    let faulty = Arc::new(Faulty::new(store.clone()));
    let e = engine(faulty.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    faulty.fail_commit.store(true, Ordering::SeqCst);
    let r = e.writer.submit(add("c1")).await;
    assert!(matches!(r, Err(WriteError::Store(_))), "{r:?}");
    assert_eq!(
        e.ipam.read().expect("state").allocations().count(),
        0,
        "an uncommitted allocation stayed in memory"
    );
    assert!(
        !e.writer.healthy(),
        "readiness must fail while the store cannot write"
    );
    assert!(
        e.writer.running(),
        "a failed commit is no reason to restart the daemon"
    );
    // A retried ADD is not answered from memory with an address that is not on disk.
    let r = e.writer.submit(add("c1")).await;
    assert!(r.is_err());
    faulty.fail_commit.store(false, Ordering::SeqCst);
    let ip = ip_of(e.writer.submit(add("c1")).await).expect("store back");
    assert!(e.writer.healthy());
    let stored = store.snapshot().expect("snapshot").allocations;
    assert_eq!(stored.iter().map(|a| a.ip).collect::<Vec<_>>(), vec![ip]);
}

/// When neither committing nor re-reading the store works (an API server outage), nothing is
/// planned on the state: callers get the store's error and readiness stays failed, until the
/// store can be read again; then the writer re-reads it and serves, without a restart.
#[tokio::test]
async fn a_writer_that_cannot_resync_waits_for_the_store() {
    let (_dir, store) = embedded();
    let faulty = Arc::new(Faulty::new(store.clone()));
    let e = engine(faulty.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    faulty.fail_commit.store(true, Ordering::SeqCst);
    faulty.fail_snapshot.store(true, Ordering::SeqCst);
    assert!(matches!(
        e.writer.submit(add("c1")).await,
        Err(WriteError::Store(_))
    ));
    // Nothing is planned while the state cannot be re-read: not even a commit is tried.
    let commits = faulty.commits.load(Ordering::SeqCst);
    let r = e.writer.submit(add("c2")).await;
    assert!(matches!(r, Err(WriteError::Store(_))), "{r:?}");
    assert_eq!(
        faulty.commits.load(Ordering::SeqCst),
        commits,
        "a batch was planned on a state that could not be re-read"
    );
    assert!(!e.writer.healthy());
    // Nothing of the failed commit stayed in memory (the store could not be re-read, so
    // only the undo can have removed it).
    assert_eq!(
        e.ipam.read().expect("state").allocations().count(),
        0,
        "an uncommitted allocation stayed in memory"
    );
    // The store is back: the state is re-read and the writer serves again.
    faulty.fail_commit.store(false, Ordering::SeqCst);
    faulty.fail_snapshot.store(false, Ordering::SeqCst);
    let ip = ip_of(e.writer.submit(add("c2")).await).expect("the writer serves again");
    assert!(e.writer.healthy());
    let stored = store.snapshot().expect("snapshot").allocations;
    assert_eq!(stored.iter().map(|a| a.ip).collect::<Vec<_>>(), vec![ip]);
}

/// A writer thread that dies (a panic in a backend) fails readiness, and callers are told it
/// stopped.
#[tokio::test]
async fn a_writer_that_panics_fails_readiness() {
    let (_dir, store) = embedded();
    let faulty = Arc::new(Faulty::new(store));
    let e = engine(faulty.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    assert!(e.writer.healthy());
    faulty.panic_commit.store(true, Ordering::SeqCst);
    assert!(e.writer.submit(add("c1")).await.is_err());
    for _ in 0..100 {
        if !e.writer.healthy() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!e.writer.healthy(), "a dead writer still reports healthy");
    assert!(!e.writer.running(), "a dead writer still reports running");
    assert!(matches!(
        e.writer.submit(add("c2")).await,
        Err(WriteError::Stopped)
    ));
}

/// A caller that gives up while its ADD is being committed gets nothing: the ADD is rolled
/// back before anyone can see it. One that gives up while queued is never planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_gave_up_get_nothing() {
    let (_dir, store) = embedded();
    let faulty = Arc::new(Faulty::new(store.clone()));
    *faulty.closed.lock().expect("gate") = true;
    let e = Arc::new(engine(faulty.clone(), vec![pool("10.0.0.1-10.0.0.4")]));
    let w = e.writer.clone();
    let first = tokio::spawn(async move { w.submit(add("gives-up")).await });
    let mut waited = 0;
    while faulty.commits.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
        assert!(waited < 2000, "the first commit never started");
    }
    // While the first commit is in flight, a second ADD queues; its caller gives up too.
    let w = e.writer.clone();
    let second = tokio::spawn(async move { w.submit(add("gives-up-queued")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.abort();
    second.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    *faulty.closed.lock().expect("gate") = false;
    faulty.opened.notify_all();
    // A caller that stays: the only allocation left is its own.
    ip_of(e.writer.submit(add("stays")).await).expect("stays");
    let stored = store.snapshot().expect("snapshot").allocations;
    let holders: Vec<String> = stored
        .iter()
        .map(|a| a.holders[0].attachment.container_id.clone())
        .collect();
    assert_eq!(holders, ["stays"], "abandoned ADDs left allocations");
    assert_eq!(e.ipam.read().expect("state").allocations().count(), 1);
    // The first ADD, its rollback, and the last ADD: the queued one was never planned.
    assert_eq!(faulty.commits.load(Ordering::SeqCst), 3);
}

/// A store whose change feed the test writes itself.
struct Fed {
    inner: Arc<dyn Store>,
    feed: Mutex<Option<Receiver<Event>>>,
    /// Reads of one address fail (the API server not answering yet).
    fail_get: AtomicBool,
    /// Reads of the whole store fail too.
    fail_snapshot: AtomicBool,
}

impl Fed {
    /// Over `inner`, with `feed` as the change feed.
    fn new(inner: Arc<dyn Store>, feed: Receiver<Event>) -> Arc<Fed> {
        Arc::new(Fed {
            inner,
            feed: Mutex::new(Some(feed)),
            fail_get: AtomicBool::new(false),
            fail_snapshot: AtomicBool::new(false),
        })
    }
}

impl Store for Fed {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        if self.fail_snapshot.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the test says so".into()));
        }
        self.inner.snapshot()
    }

    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError> {
        if self.fail_get.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the test says so".into()));
        }
        self.inner.get(ip)
    }

    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        self.inner.commit(groups)
    }

    fn subscribe(&self) -> Receiver<Event> {
        self.feed
            .lock()
            .expect("feed")
            .take()
            .unwrap_or_else(|| channel().1)
    }
}

/// ADDs container `c` and returns its address.
async fn added_c(e: &Engine) -> IpAddr {
    match e.writer.submit(add("c")).await {
        Ok(Outcome::Added(a)) => a[0].ip,
        other => panic!("{other:?}"),
    }
}

/// Another writer deletes `ip`'s record; the feed says nothing of it.
fn delete_behind_the_feed(store: &EmbeddedStore, ip: IpAddr) {
    let stored = store.get(ip).expect("get").remove(0);
    let outcomes = store
        .commit(&[vec![Change::delete(&stored)]])
        .expect("delete");
    assert!(outcomes[0].is_ok());
}

/// Waits up to `secs` seconds for `done`; panics with `what` otherwise.
async fn eventually(secs: u64, what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number of allocations in the engine's state.
fn held(e: &Engine) -> usize {
    e.ipam.read().expect("state").allocations().count()
}

/// An address deleted while the feed was not looking (a watch that re-listed after a gap and
/// no longer finds it, after a write it never showed) is read again on `Stale`: the state
/// drops it. Without the event it would stay, a ghost, until a restart.
#[tokio::test]
async fn a_stale_address_is_read_again() {
    let (_dir, store) = embedded();
    let (tx, rx) = channel();
    let e = engine(Fed::new(store.clone(), rx), vec![pool("10.0.0.1-10.0.0.4")]);
    let ip = added_c(&e).await;
    delete_behind_the_feed(&store, ip);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        held(&e),
        1,
        "without word from the feed the state still has it"
    );
    tx.send(Event::Stale { ip }).expect("feed");
    eventually(5, "the stale address was never read again", || {
        held(&e) == 0
    })
    .await;
}

/// When the re-read a `Stale` event asks for fails (the watch re-listed a moment before the
/// API server was known up again), the event is spent: the whole state is re-read instead.
/// Without that, the deleted address would stay in the state, a ghost a retried ADD would
/// answer while another node hands it out.
#[tokio::test]
async fn a_stale_address_that_cannot_be_read_makes_the_state_re_read_whole() {
    let (_dir, store) = embedded();
    let (tx, rx) = channel();
    let fed = Fed::new(store.clone(), rx);
    let e = engine(fed.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    let ip = added_c(&e).await;
    delete_behind_the_feed(&store, ip);
    fed.fail_get.store(true, Ordering::SeqCst);
    tx.send(Event::Stale { ip }).expect("feed");
    eventually(
        5,
        "the deleted address stayed in the state after its re-read failed",
        || held(&e) == 0,
    )
    .await;
}

/// A record re-filed under another pool name (a pool renamed while a pod held the address)
/// arrives as the old record's deletion, then the new record (the Kubernetes store's feed
/// announces it so): the state ends with the new record alone.
#[tokio::test]
async fn a_record_re_filed_under_another_pool_replaces_the_old_one() {
    let (_dir, store) = embedded();
    let (tx, rx) = channel();
    let e = engine(Fed::new(store.clone(), rx), vec![pool("10.0.0.1-10.0.0.4")]);
    let ip = added_c(&e).await;
    let old = store.get(ip).expect("get").remove(0);
    let mut moved = old.clone();
    moved.pool = "renamed".into();
    moved.revision += 100;
    tx.send(Event::Deleted {
        pool: old.pool.clone(),
        ip,
        revision: old.revision,
    })
    .expect("feed");
    tx.send(Event::Put(moved)).expect("feed");
    let pools = |e: &Engine| -> Vec<String> {
        let state = e.ipam.read().expect("state");
        state.at(ip).into_iter().map(|a| a.pool.clone()).collect()
    };
    eventually(
        5,
        &format!("{ip} is not recorded under `renamed` alone"),
        || pools(&e) == vec!["renamed".to_owned()],
    )
    .await;
    // The old record is gone for good, not just hidden: one address, one allocation.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(held(&e), 1);
}

/// While the state cannot be re-read after a failed `Stale` re-read, the writer says so
/// (`stale`, which keeps the engine from answering retried ADDs and CHECKs from memory) and
/// is not ready; once the store answers, the state is re-read and both clear.
#[tokio::test]
async fn a_state_that_cannot_be_re_read_is_flagged_stale_until_it_is() {
    let (_dir, store) = embedded();
    let (tx, rx) = channel();
    let fed = Fed::new(store.clone(), rx);
    let e = engine(fed.clone(), vec![pool("10.0.0.1-10.0.0.4")]);
    let ip = added_c(&e).await;
    assert!(!e.writer.stale());
    delete_behind_the_feed(&store, ip);
    fed.fail_get.store(true, Ordering::SeqCst);
    fed.fail_snapshot.store(true, Ordering::SeqCst);
    tx.send(Event::Stale { ip }).expect("feed");
    eventually(5, "never flagged stale", || e.writer.stale()).await;
    assert!(!e.writer.healthy(), "ready while the state is a guess");
    // The ghost is still in memory; nothing may be answered from it.
    assert_eq!(held(&e), 1);
    assert!(matches!(
        e.writer.submit(add("d")).await,
        Err(WriteError::Store(StoreError::Unavailable(_)))
    ));
    fed.fail_snapshot.store(false, Ordering::SeqCst);
    eventually(10, "never re-read", || {
        !e.writer.stale() && e.writer.healthy()
    })
    .await;
    assert_eq!(held(&e), 0);
}
