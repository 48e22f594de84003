//! The embedded backend against the store contract, plus what only a file can show:
//! durability across reopen and atomicity across pools.

use std::sync::Arc;

use tether_core::alloc::Change;
use tether_store::contract::{self, allocation};
use tether_store::embedded::EmbeddedStore;
use tether_store::{Batch, Store, StoreError};

fn fresh() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("open");
    (dir, store)
}

#[test]
fn contract_starts_empty() {
    contract::starts_empty(&fresh().1);
}

#[test]
fn contract_commit_round_trips() {
    contract::commit_round_trips(&fresh().1);
}

#[test]
fn contract_stale_revision_conflicts() {
    contract::stale_revision_conflicts(&fresh().1);
}

#[test]
fn contract_pools_are_independent() {
    contract::pools_are_independent(&fresh().1);
}

#[test]
fn contract_racing_writers_one_wins() {
    let (_dir, store) = fresh();
    contract::racing_writers_one_wins(Arc::new(store));
}

#[test]
fn contract_mixed_batches_are_refused() {
    contract::mixed_batches_are_refused(&fresh().1);
}

#[test]
fn commits_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let a = allocation("p", "10.0.0.1", "a");
    {
        let s = EmbeddedStore::open(&path).expect("open");
        s.commit(&[Batch {
            pool: "p".into(),
            expected: 0,
            changes: vec![Change::Put(a.clone())],
        }])
        .expect("commit");
    }
    let s = EmbeddedStore::open(&path).expect("reopen");
    let snap = s.snapshot().expect("snapshot");
    assert_eq!(snap.allocations, vec![a]);
    assert_eq!(snap.revision("p"), 1);
}

#[test]
fn multi_pool_commit_is_atomic() {
    let (_dir, s) = fresh();
    s.commit(&[Batch {
        pool: "q".into(),
        expected: 0,
        changes: vec![Change::Put(allocation("q", "10.1.0.1", "x"))],
    }])
    .expect("q moves to 1");
    let both = [
        Batch {
            pool: "p".into(),
            expected: 0,
            changes: vec![Change::Put(allocation("p", "10.0.0.1", "a"))],
        },
        Batch {
            pool: "q".into(),
            expected: 0,
            changes: vec![Change::Put(allocation("q", "10.1.0.2", "b"))],
        },
    ];
    assert!(matches!(s.commit(&both), Err(StoreError::Conflict { .. })));
    let snap = s.snapshot().expect("snapshot");
    assert_eq!(
        snap.revision("p"),
        0,
        "the p batch was rolled back with the q conflict"
    );
    assert_eq!(snap.allocations.len(), 1);
}

#[test]
fn unreadable_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    std::fs::write(&path, b"this is not a database").expect("write");
    let e = EmbeddedStore::open(&path).err().expect("refused");
    assert!(e.to_string().contains("state.redb"), "{e}");
}
