//! The behaviour every [`Store`](crate::Store) backend must show. Each function panics with a
//! message when the backend misbehaves; a backend's test suite calls them all with fresh,
//! empty stores.

use std::net::IpAddr;
use std::sync::{Arc, Barrier};

use tether_core::alloc::{Allocation, Attachment, Change, Holder, Owner};

use crate::{Batch, Store, StoreError};

/// An ephemeral allocation for tests.
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
            since: 1,
        }],
        idle_since: None,
    }
}

fn put(a: &Allocation, expected: u64) -> Batch {
    Batch {
        pool: a.pool.clone(),
        expected,
        changes: vec![Change::Put(a.clone())],
    }
}

/// A new store is empty, every pool at revision 0.
pub fn starts_empty(store: &dyn Store) {
    let s = store.snapshot().expect("snapshot");
    assert!(s.allocations.is_empty(), "a new store holds allocations");
    assert_eq!(s.revision("any"), 0);
}

/// What is committed is in the next snapshot; deletes remove; revisions count commits.
pub fn commit_round_trips(store: &dyn Store) {
    let a = allocation("p", "10.0.0.1", "a");
    let b = allocation("p", "10.0.0.2", "b");
    assert_eq!(store.commit(&[put(&a, 0)]).expect("first commit"), vec![1]);
    assert_eq!(store.commit(&[put(&b, 1)]).expect("second commit"), vec![2]);
    let s = store.snapshot().expect("snapshot");
    assert_eq!(s.revision("p"), 2);
    let mut got = s.allocations.clone();
    got.sort_by_key(|x| x.ip);
    assert_eq!(got, vec![a.clone(), b.clone()]);
    let del = Batch {
        pool: "p".into(),
        expected: 2,
        changes: vec![Change::Delete {
            pool: "p".into(),
            ip: a.ip,
        }],
    };
    assert_eq!(store.commit(&[del]).expect("delete"), vec![3]);
    assert_eq!(store.snapshot().expect("snapshot").allocations, vec![b]);
}

/// A commit against a stale revision fails with `Conflict` and changes nothing.
pub fn stale_revision_conflicts(store: &dyn Store) {
    let a = allocation("p", "10.0.0.1", "a");
    store.commit(&[put(&a, 0)]).expect("first commit");
    let b = allocation("p", "10.0.0.2", "b");
    match store.commit(&[put(&b, 0)]) {
        Err(StoreError::Conflict {
            pool,
            expected,
            actual,
        }) => {
            assert_eq!((pool.as_str(), expected, actual), ("p", 0, 1));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let s = store.snapshot().expect("snapshot");
    assert_eq!(s.allocations, vec![a]);
    assert_eq!(s.revision("p"), 1);
}

/// Pools have independent revisions: a commit to one does not move another.
pub fn pools_are_independent(store: &dyn Store) {
    store
        .commit(&[put(&allocation("p", "10.0.0.1", "a"), 0)])
        .expect("p");
    store
        .commit(&[put(&allocation("q", "10.1.0.1", "b"), 0)])
        .expect("q at 0");
    let s = store.snapshot().expect("snapshot");
    assert_eq!((s.revision("p"), s.revision("q")), (1, 1));
}

/// Of many writers racing with the same expected revision, exactly one wins.
pub fn racing_writers_one_wins(store: Arc<dyn Store>) {
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                let a = allocation("p", &format!("10.0.0.{}", i + 1), &format!("c{i}"));
                barrier.wait();
                store.commit(&[put(&a, 0)]).is_ok()
            })
        })
        .collect();
    let wins = handles
        .into_iter()
        .map(|h| h.join().expect("writer thread"))
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1, "exactly one writer may win a race on one revision");
    assert_eq!(store.snapshot().expect("snapshot").allocations.len(), 1);
}

/// A batch whose changes name another pool is refused whole.
pub fn mixed_batches_are_refused(store: &dyn Store) {
    let bad = Batch {
        pool: "p".into(),
        expected: 0,
        changes: vec![Change::Put(allocation("q", "10.1.0.1", "a"))],
    };
    assert!(matches!(
        store.commit(&[bad]),
        Err(StoreError::MixedBatch { .. })
    ));
    assert!(store.snapshot().expect("snapshot").allocations.is_empty());
}
