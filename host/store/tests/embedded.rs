//! The embedded backend against the store contract, plus what only a file can show:
//! durability across reopen, and records written before revisions existed.

use std::sync::Arc;

use tether_core::alloc::Change;
use tether_store::Store;
use tether_store::contract::{self, allocation};
use tether_store::embedded::EmbeddedStore;

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
fn contract_create_is_a_claim() {
    contract::create_is_a_claim(&fresh().1);
}

#[test]
fn contract_stale_revisions_conflict() {
    contract::stale_revisions_conflict(&fresh().1);
}

#[test]
fn contract_groups_are_atomic_and_independent() {
    contract::groups_are_atomic_and_independent(&fresh().1);
}

#[test]
fn contract_claims_are_per_address_across_pools() {
    contract::claims_are_per_address_across_pools(&fresh().1);
}

#[test]
fn contract_refiles_are_conditional_and_undone() {
    contract::refiles_are_conditional_and_undone(&fresh().1);
}

#[test]
fn contract_racing_claims_one_wins() {
    let (_dir, store) = fresh();
    contract::racing_claims_one_wins(Arc::new(store));
}

#[test]
fn contract_subscribers_see_applied_changes() {
    contract::subscribers_see_applied_changes(&fresh().1);
}

#[test]
fn commits_survive_reopen_and_revisions_are_not_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let mut a = allocation("p", "10.0.0.1", "a");
    {
        let s = EmbeddedStore::open(&path).expect("open");
        let out = s.commit(&[vec![Change::Put(a.clone())]]).expect("commit");
        a.revision = out[0].clone().expect("applied")[0];
    }
    let s = EmbeddedStore::open(&path).expect("reopen");
    let snap = s.snapshot().expect("snapshot");
    assert_eq!(snap.allocations, vec![a.clone()]);
    let b = allocation("p", "10.0.0.2", "b");
    let out = s.commit(&[vec![Change::Put(b)]]).expect("commit");
    assert!(out[0].clone().expect("applied")[0] > a.revision);
}

#[test]
fn records_from_before_revisions_read_as_revision_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let a = allocation("p", "10.0.0.1", "a");
    {
        // The layout of the previous release: JSON values, a per-pool revision table.
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("txn");
        {
            let allocs: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("allocations");
            let revs: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("revisions");
            let mut t = txn.open_table(allocs).expect("table");
            let v = serde_json::to_vec(&a).expect("json");
            t.insert("p/10.0.0.1", v.as_slice()).expect("insert");
            txn.open_table(revs)
                .expect("table")
                .insert("p", 7)
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let s = EmbeddedStore::open(&path).expect("open an old file");
    let got = s.snapshot().expect("snapshot").allocations;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].revision, 1);
    // It can be updated (planned on revision 1) and gets a new revision.
    let mut upd = got[0].clone();
    upd.holders.clear();
    let out = s.commit(&[vec![Change::Put(upd)]]).expect("commit");
    assert!(out[0].clone().expect("applied")[0] > 1);
}

#[test]
fn unreadable_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    std::fs::write(&path, b"this is not a database").expect("write");
    let e = EmbeddedStore::open(&path).err().expect("refused");
    assert!(e.to_string().contains("state.redb"), "{e}");
}

#[test]
fn an_address_held_twice_in_an_old_file_stays_taken_until_both_are_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let p = allocation("p", "10.0.0.1", "a");
    let q = allocation("q", "10.0.0.1", "b");
    {
        // An old layout (keys `pool/ip`) holding one address twice, as overlapping pools
        // could leave it before they were refused.
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("txn");
        {
            let allocs: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("allocations");
            let mut t = txn.open_table(allocs).expect("table");
            for a in [&p, &q] {
                let v = serde_json::to_vec(a).expect("json");
                t.insert(format!("{}/{}", a.pool, a.ip).as_str(), v.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let s = EmbeddedStore::open(&path).expect("open an old file");
    let mut both = s.snapshot().expect("snapshot").allocations;
    both.sort_by_key(|a| a.pool.clone());
    assert_eq!(
        both.iter().map(|a| a.pool.as_str()).collect::<Vec<_>>(),
        ["p", "q"]
    );
    assert_eq!(s.get(p.ip).expect("get").len(), 2, "get shows both records");
    let claim = |pool: &str| {
        s.commit(&[vec![Change::Put(allocation(pool, "10.0.0.1", "c"))]])
            .expect("commit")[0]
            .is_ok()
    };
    assert!(!claim("r"), "an address held twice was claimed again");
    // Release one: the other keeps the address taken.
    let first = both[0].clone();
    let out = s.commit(&[vec![Change::delete(&first)]]).expect("commit");
    assert!(out[0].is_ok(), "{out:?}");
    assert_eq!(s.get(p.ip).expect("get"), vec![both[1].clone()]);
    assert!(
        !claim("r"),
        "the second record no longer kept the address taken"
    );
    // Reopened, still so.
    drop(s);
    let s = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(
        s.snapshot().expect("snapshot").allocations,
        vec![both[1].clone()]
    );
    let out = s.commit(&[vec![Change::delete(&both[1])]]).expect("commit");
    assert!(out[0].is_ok(), "{out:?}");
    let out = s
        .commit(&[vec![Change::Put(allocation("r", "10.0.0.1", "c"))]])
        .expect("commit");
    assert!(
        out[0].is_ok(),
        "a free address could not be claimed: {out:?}"
    );
}

/// An old file's second record of an address can be released first; and a group that
/// promotes it and then conflicts leaves both records as they were.
#[test]
fn the_second_record_of_an_address_can_go_first_and_a_failed_group_keeps_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let p = allocation("p", "10.0.0.1", "a");
    let q = allocation("q", "10.0.0.1", "b");
    {
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("txn");
        {
            let allocs: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("allocations");
            let mut t = txn.open_table(allocs).expect("table");
            for a in [&p, &q] {
                let v = serde_json::to_vec(a).expect("json");
                t.insert(format!("{}/{}", a.pool, a.ip).as_str(), v.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let s = EmbeddedStore::open(&path).expect("open an old file");
    let both = s.get(p.ip).expect("get");
    assert_eq!(both.len(), 2);
    let (main, double) = (both[0].clone(), both[1].clone());
    // A group that deletes the main record (promoting the double) and then conflicts: the
    // promotion is undone with the rest.
    let doomed = vec![
        Change::delete(&main),
        Change::Put(allocation("r", "10.0.0.2", "c")),
        Change::Put(allocation("r", "10.0.0.1", "c")),
    ];
    let out = s.commit(&[doomed]).expect("commit");
    assert!(out[0].is_err(), "{out:?}");
    assert_eq!(
        s.get(p.ip).expect("get"),
        vec![main.clone(), double.clone()]
    );
    // The second record released first: the first keeps the address taken.
    let out = s.commit(&[vec![Change::delete(&double)]]).expect("commit");
    assert!(
        out[0].is_ok(),
        "the second record cannot be released: {out:?}"
    );
    assert_eq!(s.get(p.ip).expect("get"), vec![main.clone()]);
    let out = s
        .commit(&[vec![Change::Put(allocation("r", "10.0.0.1", "c"))]])
        .expect("commit");
    assert!(out[0].is_err(), "the address was claimed while held");
}

/// A file an older release wrote to again after it was re-keyed (a downgrade and back): its
/// `pool/ip` records are re-keyed at the next open, not left unseen.
#[test]
fn records_written_by_an_older_release_after_the_rekey_are_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    drop(EmbeddedStore::open(&path).expect("create at the current layout"));
    let a = allocation("p", "10.0.0.1", "a");
    {
        let db = redb::Database::create(&path).expect("open");
        let txn = db.begin_write().expect("txn");
        {
            let allocs: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("allocations");
            let mut t = txn.open_table(allocs).expect("table");
            let v = serde_json::to_vec(&a).expect("json");
            t.insert("p/10.0.0.1", v.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let s = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(s.get(a.ip).expect("get").len(), 1, "the old record is seen");
    let out = s
        .commit(&[vec![Change::Put(allocation("p", "10.0.0.1", "b"))]])
        .expect("commit");
    assert!(
        out[0].is_err(),
        "an address an older release wrote was claimed again"
    );
}

/// Writes `records` into `path` as an older release did: keys `pool/ip`, plain JSON.
fn write_old_layout(path: &std::path::Path, records: &[&tether_core::alloc::Allocation]) {
    let db = redb::Database::create(path).expect("open");
    let txn = db.begin_write().expect("txn");
    {
        let allocs: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("allocations");
        let mut t = txn.open_table(allocs).expect("table");
        for a in records {
            let v = serde_json::to_vec(a).expect("json");
            t.insert(format!("{}/{}", a.pool, a.ip).as_str(), v.as_slice())
                .expect("insert");
        }
    }
    txn.commit().expect("commit");
}

/// After a downgrade, an older release may record an address a second time under the pool
/// name it is already held under. The engine keys an address by pool: it would see one of
/// the two, and hand the address back to the other's identity while that pod still has it.
/// Opening refuses the file, naming both holders, and changes nothing.
#[test]
fn an_address_recorded_twice_under_one_pool_name_is_refused_not_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let s = EmbeddedStore::open(&path).expect("create at the current layout");
    s.commit(&[vec![Change::Put(allocation("p", "10.0.0.1", "first"))]])
        .expect("commit")[0]
        .as_ref()
        .expect("claimed");
    drop(s);
    write_old_layout(&path, &[&allocation("p", "10.0.0.1", "second")]);
    for attempt in ["first open", "second open: nothing was changed"] {
        let err = match EmbeddedStore::open(&path) {
            Ok(_) => panic!("{attempt}: opened a file holding 10.0.0.1 twice under p"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("10.0.0.1")
                && err.contains("pool p")
                && err.contains("first")
                && err.contains("second"),
            "{attempt}: {err}"
        );
    }

    // The same through the doubles table: p and q hold the address (old layout), then an
    // older release writes q's record again.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    write_old_layout(
        &path,
        &[
            &allocation("p", "10.0.0.2", "one"),
            &allocation("q", "10.0.0.2", "two"),
        ],
    );
    let s = EmbeddedStore::open(&path).expect("both kept");
    assert_eq!(
        s.get("10.0.0.2".parse().expect("ip")).expect("get").len(),
        2
    );
    drop(s);
    write_old_layout(&path, &[&allocation("q", "10.0.0.2", "three")]);
    let err = EmbeddedStore::open(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("10.0.0.2")
            && err.contains("pool q")
            && err.contains("two")
            && err.contains("three"),
        "{err:?}"
    );
}
