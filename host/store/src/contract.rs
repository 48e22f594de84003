//! The behaviour every [`Store`](crate::Store) backend must show. Each function panics with a
//! message when the backend misbehaves; a backend's test suite calls them all with fresh,
//! empty stores.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Barrier};

use tether_core::alloc::{Allocation, Attachment, Change, Holder, Owner};

use crate::{Conflict, Event, GroupOutcome, Snapshot, Store, StoreError};

/// A store that forwards to another, with switches a test flips: `down` makes every read and
/// commit fail as a store that does not answer does (the API server gone); `panic_on_commit`
/// makes commits panic (a bug in a backend: the writer's thread dies).
pub struct Switched<S> {
    /// The store forwarded to.
    pub inner: S,
    /// Every read and commit fails with [`StoreError::Unavailable`].
    pub down: AtomicBool,
    /// Every commit panics.
    pub panic_on_commit: AtomicBool,
}

impl<S: Store> Switched<S> {
    /// Forwards to `inner`, both switches off.
    pub fn new(inner: S) -> Self {
        Switched {
            inner,
            down: AtomicBool::new(false),
            panic_on_commit: AtomicBool::new(false),
        }
    }

    fn answers(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the test took it down".into()));
        }
        Ok(())
    }
}

impl<S: Store> Store for Switched<S> {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.answers()?;
        self.inner.snapshot()
    }

    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError> {
        self.answers()?;
        self.inner.get(ip)
    }

    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        assert!(
            !self.panic_on_commit.load(Ordering::SeqCst),
            "commit panics on purpose"
        );
        self.answers()?;
        self.inner.commit(groups)
    }

    fn subscribe(&self) -> Receiver<Event> {
        self.inner.subscribe()
    }
}

/// An ephemeral allocation for tests (revision 0: not stored).
pub fn allocation(pool: &str, ip: &str, container: &str) -> Allocation {
    Allocation {
        pool: pool.into(),
        ip: ip.parse::<IpAddr>().expect("test address"),
        network: "net".into(),
        interface: "eth0".into(),
        owner: Owner::Ephemeral,
        holders: vec![Holder {
            attachment: Attachment {
                container_id: container.into(),
                ifname: "eth0".into(),
                namespace: "default".into(),
                pod: container.into(),
                pod_uid: format!("uid-{container}"),
            },
            shared: false,
            node: String::new(),
            since: 1,
        }],
        idle_since: None,
        revision: 0,
    }
}

fn put(a: &Allocation) -> Vec<Change> {
    vec![Change::Put(a.clone())]
}

/// Commits one group that must apply; returns its revisions.
fn apply(store: &dyn Store, group: Vec<Change>) -> Vec<u64> {
    let mut out = store.commit(&[group]).expect("commit");
    out.pop()
        .expect("one outcome per group")
        .expect("the group applies")
}

/// The one record of an address.
fn one(mut v: Vec<Allocation>) -> Allocation {
    assert_eq!(v.len(), 1, "one record per address: {v:?}");
    v.remove(0)
}

fn sorted(mut v: Vec<Allocation>) -> Vec<Allocation> {
    v.sort_by_key(|a| (a.pool.clone(), a.ip));
    v
}

/// A new store is empty.
pub fn starts_empty(store: &dyn Store) {
    let s = store.snapshot().expect("snapshot");
    assert!(s.allocations.is_empty(), "a new store holds allocations");
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    assert_eq!(store.get(ip).expect("get"), vec![]);
}

/// What is committed is in the next snapshot and `get`, with the revision the commit
/// returned; revisions are never reused; deletes remove.
pub fn commit_round_trips(store: &dyn Store) {
    let mut a = allocation("p", "10.0.0.1", "a");
    let mut b = allocation("p", "10.0.0.2", "b");
    a.revision = apply(store, put(&a))[0];
    b.revision = apply(store, put(&b))[0];
    assert!(a.revision > 0 && b.revision > 0 && a.revision != b.revision);
    assert_eq!(
        sorted(store.snapshot().expect("snapshot").allocations),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(store.get(a.ip).expect("get"), vec![a.clone()]);
    // Update: a new revision.
    let mut a2 = a.clone();
    a2.holders.clear();
    a2.idle_since = Some(5);
    let r2 = apply(store, put(&a2))[0];
    assert!(r2 != a.revision && r2 != b.revision, "revision reused");
    a2.revision = r2;
    assert_eq!(store.get(a.ip).expect("get"), vec![a2.clone()]);
    // Delete, then create again: yet another revision.
    apply(store, vec![Change::delete(&a2)]);
    assert_eq!(store.get(a.ip).expect("get"), vec![]);
    assert_eq!(store.snapshot().expect("snapshot").allocations, vec![b]);
    let r3 = apply(store, put(&allocation("p", "10.0.0.1", "a")))[0];
    let a3 = one(store.get(a.ip).expect("get"));
    assert_eq!(a3.revision, r3);
    assert!(
        ![a.revision, r2].contains(&r3),
        "a re-created record got an old revision"
    );
}

/// Creating is claiming: a second create of one address conflicts and changes nothing.
pub fn create_is_a_claim(store: &dyn Store) {
    let a = allocation("p", "10.0.0.1", "a");
    let rev = apply(store, put(&a))[0];
    let rival = allocation("p", "10.0.0.1", "b");
    let out = store.commit(&[put(&rival)]).expect("commit");
    assert_eq!(
        out,
        vec![Err(Conflict {
            pool: "p".into(),
            ip: a.ip,
            expected: 0,
            found: rev,
        })],
        "a second claim of one address must conflict"
    );
    let held = one(store.get(a.ip).expect("get"));
    assert_eq!(held.holders[0].attachment.container_id, "a");
}

/// The unit of a claim is the address, not the pool: a create of an address held under
/// another pool name (a pool renamed on one node and not yet on another, or two overlapping
/// pools) conflicts; so does an update or delete of it under a pool name it does not have.
/// Moving a record to a new pool name is a delete under the old one and a create under the
/// new one, in one group, in that order.
pub fn claims_are_per_address_across_pools(store: &dyn Store) {
    let mut a = allocation("old", "10.0.0.1", "a");
    a.revision = apply(store, put(&a))[0];
    // Another writer, knowing the pool by its new name, claims the same address.
    let rival = allocation("new", "10.0.0.1", "b");
    let out = store.commit(&[put(&rival)]).expect("commit");
    assert_eq!(
        out,
        vec![Err(Conflict {
            pool: "new".into(),
            ip: a.ip,
            expected: 0,
            found: a.revision,
        })],
        "a claim of an address held under another pool name must conflict"
    );
    // An update or delete naming the wrong pool, even with the record's revision, is refused.
    let mut wrong = a.clone();
    wrong.pool = "new".into();
    let out = store
        .commit(&[put(&wrong), vec![Change::delete(&wrong)]])
        .expect("commit");
    assert!(out.iter().all(|o| o.is_err()), "{out:?}");
    assert_eq!(store.get(a.ip).expect("get"), vec![a.clone()]);
    // Create first, then delete: the create conflicts and the group leaves nothing behind.
    let mut moved = a.clone();
    moved.pool = "new".into();
    moved.revision = 0;
    let out = store
        .commit(&[vec![Change::Put(moved.clone()), Change::delete(&a)]])
        .expect("commit");
    assert!(out[0].is_err(), "{out:?}");
    assert_eq!(store.get(a.ip).expect("get"), vec![a.clone()]);
    // Delete first, then create: the record moves.
    let revs = apply(store, vec![Change::delete(&a), Change::Put(moved.clone())]);
    moved.revision = revs[1];
    assert_eq!(store.get(a.ip).expect("get"), vec![moved.clone()]);
    assert_eq!(store.snapshot().expect("snapshot").allocations, vec![moved]);
}

/// A move to a new pool name (a re-file) is conditional like any write: planned on an old
/// revision it conflicts and the record stays as it is; in a group whose later change
/// conflicts it is undone, and the record is back under its old pool name, held as before.
/// Either way the address is never left without its record.
pub fn refiles_are_conditional_and_undone(store: &dyn Store) {
    let mut a = allocation("old", "10.0.0.1", "a");
    a.revision = apply(store, put(&a))[0];
    let mut newer = a.clone();
    newer.idle_since = Some(7);
    newer.revision = apply(store, put(&newer))[0];
    let moved = |from: &Allocation| {
        let mut m = from.clone();
        m.pool = "new".into();
        m.revision = 0;
        m
    };
    // Planned on the first revision: refused, and the newer record stays.
    let out = store
        .commit(&[vec![Change::delete(&a), Change::Put(moved(&a))]])
        .expect("commit");
    assert!(
        out[0].is_err(),
        "a re-file on an old revision applied: {out:?}"
    );
    assert_eq!(store.get(a.ip).expect("get"), vec![newer.clone()]);
    // On the current revision, but the group's next change claims a held address: the
    // re-file is undone.
    let mut other = allocation("p", "10.0.0.9", "b");
    other.revision = apply(store, put(&other))[0];
    let out = store
        .commit(&[vec![
            Change::delete(&newer),
            Change::Put(moved(&newer)),
            Change::Put(allocation("p", "10.0.0.9", "c")),
        ]])
        .expect("commit");
    assert!(out[0].is_err(), "the conflicting group applied: {out:?}");
    // Back as it was (an undo may be a write of its own, with a new revision).
    let back = one(store.get(a.ip).expect("get"));
    assert_eq!(
        (
            back.pool.as_str(),
            &back.owner,
            &back.holders,
            back.idle_since
        ),
        ("old", &newer.owner, &newer.holders, newer.idle_since),
        "the re-file was not undone"
    );
    assert_eq!(store.get(other.ip).expect("get"), vec![other.clone()]);
    // What the store lists is what `get` says: one record of each address.
    let listed = sorted(store.snapshot().expect("snapshot").allocations);
    assert_eq!(listed, sorted(vec![back.clone(), other]));
    // And the record can still be moved, from what the store holds now.
    let revs = apply(
        store,
        vec![Change::delete(&back), Change::Put(moved(&back))],
    );
    let now = one(store.get(a.ip).expect("get"));
    assert_eq!((now.pool.as_str(), now.revision), ("new", revs[1]));
}

/// An update or a delete planned on an old revision conflicts and changes nothing; so does
/// one of a record that is gone.
pub fn stale_revisions_conflict(store: &dyn Store) {
    let mut a = allocation("p", "10.0.0.1", "a");
    a.revision = apply(store, put(&a))[0];
    let mut newer = a.clone();
    newer.idle_since = Some(9);
    newer.revision = apply(store, put(&newer))[0];
    // Planned on the first revision: both refused.
    let mut stale = a.clone();
    stale.holders.clear();
    let out = store
        .commit(&[put(&stale), vec![Change::delete(&a)]])
        .expect("commit");
    assert!(
        out.iter().all(|o| o.is_err()),
        "stale update or delete applied: {out:?}"
    );
    assert_eq!(store.get(a.ip).expect("get"), vec![newer.clone()]);
    // The record deleted: an update planned on it does not bring it back.
    apply(store, vec![Change::delete(&newer)]);
    let out = store.commit(&[put(&newer)]).expect("commit");
    assert!(out[0].is_err(), "an update re-created a deleted record");
    assert_eq!(store.get(a.ip).expect("get"), vec![]);
}

/// A group applies whole or not at all; groups are independent.
pub fn groups_are_atomic_and_independent(store: &dyn Store) {
    let mut held = allocation("p", "10.0.0.1", "a");
    held.revision = apply(store, put(&held))[0];
    let fine = put(&allocation("p", "10.0.0.2", "b"));
    // The second change of this group claims a held address: the first must not apply.
    let doomed = vec![
        Change::Put(allocation("p", "10.0.0.3", "c")),
        Change::Put(allocation("p", "10.0.0.1", "c")),
    ];
    let out = store.commit(&[doomed, fine]).expect("commit");
    assert!(out[0].is_err(), "the conflicting group applied");
    assert!(out[1].is_ok(), "an independent group was dropped: {out:?}");
    let ips: Vec<String> = sorted(store.snapshot().expect("snapshot").allocations)
        .iter()
        .map(|a| a.ip.to_string())
        .collect();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2"], "half a group was applied");
}

/// Of many writers claiming one address at once, exactly one wins.
pub fn racing_claims_one_wins(store: Arc<dyn Store>) {
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                let a = allocation("p", "10.0.0.1", &format!("c{i}"));
                barrier.wait();
                let out = store.commit(&[put(&a)]).expect("commit");
                out[0].is_ok()
            })
        })
        .collect();
    let wins = handles
        .into_iter()
        .map(|h| h.join().expect("writer thread"))
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1, "exactly one claim of an address may win");
    assert_eq!(store.snapshot().expect("snapshot").allocations.len(), 1);
}

/// Subscribers see every applied change with its new revision, and nothing that conflicted.
/// (A backend may deliver them a little later than `commit` returns, as a watch does: this
/// waits up to ten seconds for them. It may also ask for a re-read, [`Event::Stale`], which
/// is never wrong: a watch whose first list raced the first write does.)
pub fn subscribers_see_applied_changes(store: &dyn Store) {
    let feed = store.subscribe();
    let mut a = allocation("p", "10.0.0.1", "a");
    a.revision = apply(store, put(&a))[0];
    let out = store
        .commit(&[put(&allocation("p", "10.0.0.1", "b"))])
        .expect("commit");
    assert!(out[0].is_err());
    apply(store, vec![Change::delete(&a)]);
    let expected = vec![
        Event::Put(a.clone()),
        Event::Deleted {
            pool: "p".into(),
            ip: a.ip,
            revision: a.revision,
        },
    ];
    let mut events: Vec<Event> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while events.len() < expected.len() && std::time::Instant::now() < deadline {
        if let Ok(e) = feed.recv_timeout(std::time::Duration::from_millis(100)) {
            events.push(e);
        }
        events.retain(|e| !matches!(e, Event::Stale { .. }));
    }
    // Anything more (the conflicting claim) would show up by now.
    std::thread::sleep(std::time::Duration::from_millis(300));
    events.extend(feed.try_iter());
    events.retain(|e| !matches!(e, Event::Stale { .. }));
    assert_eq!(events, expected);
}
