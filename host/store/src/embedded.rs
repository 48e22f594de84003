//! The embedded backend: one redb file, crash-safe (copy-on-write B-trees with checksums) and
//! durable at every commit (fsync before `commit` returns).
//!
//! Records are keyed `pool/ip`; a value is a format byte (1), the record's revision (8 bytes,
//! little-endian) and the allocation as JSON. Values written before revisions existed (plain
//! JSON, starting with `{`) read as revision 1. Revisions come from one counter per file,
//! bumped by every write, so none is ever reused.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tether_core::alloc::{Allocation, Change, Revision};

use crate::{Conflict, Event, GroupOutcome, Snapshot, Store, StoreError};

/// Allocations by `pool/ip`.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");
/// Counters: `revision`, the last revision handed out.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_REVISION: &str = "revision";
/// The format byte of a value with a revision.
const FORMAT: u8 = 1;

/// redb's page cache.
const CACHE_BYTES: usize = 32 << 20;

/// A redb-backed store.
pub struct EmbeddedStore {
    db: Database,
    subscribers: Mutex<Vec<Sender<Event>>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn key(pool: &str, ip: IpAddr) -> String {
    format!("{pool}/{ip}")
}

fn encode(a: &Allocation, revision: Revision) -> Result<Vec<u8>, StoreError> {
    let mut v = Vec::with_capacity(256);
    v.push(FORMAT);
    v.extend_from_slice(&revision.to_le_bytes());
    serde_json::to_writer(&mut v, a).map_err(backend)?;
    Ok(v)
}

fn decode(key: &str, v: &[u8]) -> Result<Allocation, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let (revision, json) = match v.first() {
        Some(&FORMAT) if v.len() > 9 => {
            let mut r = [0u8; 8];
            r.copy_from_slice(&v[1..9]);
            (u64::from_le_bytes(r), &v[9..])
        }
        Some(b'{') => (1, v),
        _ => return Err(corrupt("unknown record format".into())),
    };
    let mut a: Allocation = serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?;
    a.revision = revision;
    Ok(a)
}

fn revision_of(v: Option<&[u8]>) -> Revision {
    match v {
        None => 0,
        Some(v) if v.first() == Some(&FORMAT) && v.len() > 9 => {
            let mut r = [0u8; 8];
            r.copy_from_slice(&v[1..9]);
            u64::from_le_bytes(r)
        }
        Some(_) => 1,
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb caches up to 1 GiB by default. The daemon reads the whole store once, at
        // start-up, and then only writes small commits: a small cache serves that, and keeps a
        // node with a million allocations from holding the file in memory twice.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(ALLOCATIONS).map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            // Records from before revisions read as revision 1: start the counter above it.
            if meta.get(LAST_REVISION).map_err(backend)?.is_none() {
                meta.insert(LAST_REVISION, 1).map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)?;
        Ok(EmbeddedStore {
            db,
            subscribers: Mutex::new(Vec::new()),
        })
    }

    fn publish(subs: &mut Vec<Sender<Event>>, events: &[Event]) {
        subs.retain(|s| events.iter().all(|e| s.send(e.clone()).is_ok()));
    }
}

impl Store for EmbeddedStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut snap = Snapshot::default();
        let allocs = txn.open_table(ALLOCATIONS).map_err(backend)?;
        for row in allocs.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            snap.allocations.push(decode(k.value(), v.value())?);
        }
        Ok(snap)
    }

    fn get(&self, pool: &str, ip: IpAddr) -> Result<Option<Allocation>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let allocs = txn.open_table(ALLOCATIONS).map_err(backend)?;
        let k = key(pool, ip);
        let row = allocs.get(k.as_str()).map_err(backend)?;
        row.map(|v| decode(&k, v.value())).transpose()
    }

    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        // Held from the transaction to the publishing of its events, so subscribers see
        // commits in the order they were made.
        let mut subs = self
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let txn = self.db.begin_write().map_err(backend)?;
        let mut out = Vec::with_capacity(groups.len());
        let mut events = Vec::new();
        {
            let mut allocs = txn.open_table(ALLOCATIONS).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            let mut last = meta
                .get(LAST_REVISION)
                .map_err(backend)?
                .map_or(1, |v| v.value());
            for group in groups {
                // Check the whole group first (reads see the earlier groups' writes), so a
                // conflict leaves nothing of it behind.
                let mut conflict = None;
                for c in group {
                    let k = key(c.pool(), c.ip());
                    let found = revision_of(
                        allocs
                            .get(k.as_str())
                            .map_err(backend)?
                            .as_ref()
                            .map(|v| v.value()),
                    );
                    if found != c.revision() {
                        conflict = Some(Conflict {
                            pool: c.pool().to_owned(),
                            ip: c.ip(),
                            expected: c.revision(),
                            found,
                        });
                        break;
                    }
                }
                if let Some(c) = conflict {
                    out.push(Err(c));
                    continue;
                }
                let mut revs = Vec::with_capacity(group.len());
                for c in group {
                    let k = key(c.pool(), c.ip());
                    match c {
                        Change::Put(a) => {
                            last += 1;
                            allocs
                                .insert(k.as_str(), encode(a, last)?.as_slice())
                                .map_err(backend)?;
                            let mut written = a.clone();
                            written.revision = last;
                            events.push(Event::Put(written));
                            revs.push(last);
                        }
                        Change::Delete { pool, ip, revision } => {
                            allocs.remove(k.as_str()).map_err(backend)?;
                            events.push(Event::Deleted {
                                pool: pool.clone(),
                                ip: *ip,
                                revision: *revision,
                            });
                            revs.push(0);
                        }
                    }
                }
                out.push(Ok(revs));
            }
            meta.insert(LAST_REVISION, last).map_err(backend)?;
        }
        if events.is_empty() {
            // Nothing applied: no fsync needed.
            txn.abort().map_err(backend)?;
            return Ok(out);
        }
        txn.commit().map_err(backend)?;
        Self::publish(&mut subs, &events);
        Ok(out)
    }

    fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tx);
        rx
    }
}
