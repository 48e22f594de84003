//! The embedded backend: one redb file, crash-safe (copy-on-write B-trees with checksums) and
//! durable at every commit (fsync before `commit` returns).
//!
//! Records are keyed by their address alone, so one address has one record whatever pool it
//! was allocated under: a create (revision 0) of an address held under any pool name
//! conflicts. A value is a format byte (1), the record's revision (8 bytes, little-endian) and
//! the allocation as JSON. Revisions come from one counter per file, bumped by every write,
//! so none is ever reused.
//!
//! Older files keyed records `pool/ip` and stored plain JSON (revision 1). Opening such a file
//! re-keys every record by its address. Two records of one address (written by a release that
//! let overlapping pools both hand it out) cannot share a key: the second goes to the
//! `doubles` table, keyed `ip/pool`, keeps its address taken, and is promoted to the address's
//! key when the first one is deleted. Nothing is dropped. An older release started on a file
//! again (a downgrade) may write a record of an address already held under the *same* pool
//! name; the engine could keep only one of those, so opening refuses the file, changing
//! nothing, and says how to resolve it ([`StoreError::Twice`]).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};
use tether_core::alloc::{Allocation, Change, Revision};

use crate::{Conflict, Event, GroupOutcome, Snapshot, Store, StoreError};

/// Allocations by address.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");
/// Further records of an address held twice in an old file, by `ip/pool`.
const DOUBLES: TableDefinition<&str, &[u8]> = TableDefinition::new("doubles");
/// Counters: `revision`, the last revision handed out; `layout`, 2 once keyed by address.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_REVISION: &str = "revision";
const LAYOUT: &str = "layout";
/// The layout keyed by address.
const BY_ADDRESS: u64 = 2;
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

fn main_key(ip: IpAddr) -> String {
    ip.to_string()
}

fn double_key(ip: IpAddr, pool: &str) -> String {
    format!("{ip}/{pool}")
}

/// The `doubles` keys of one address lie in `[ip/, ip0)` ('0' follows '/').
fn double_range(ip: IpAddr) -> (String, String) {
    (format!("{ip}/"), format!("{ip}0"))
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

/// Where a change lands: the address's key, or a double's.
enum Slot {
    /// The address's key; `current` is what it holds.
    Main { current: Option<Allocation> },
    /// A double of the change's pool.
    Double { key: String, current: Allocation },
    /// The address is held under another pool name: any change of this pool conflicts.
    Foreign { current: Allocation },
}

type Tables<'t> = (
    Table<'t, &'static str, &'static [u8]>,
    Table<'t, &'static str, &'static [u8]>,
);

fn read(
    t: &Table<'_, &'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Allocation>, StoreError> {
    t.get(key)
        .map_err(backend)?
        .map(|v| decode(key, v.value()))
        .transpose()
}

fn slot(t: &Tables<'_>, pool: &str, ip: IpAddr) -> Result<Slot, StoreError> {
    let current = read(&t.0, &main_key(ip))?;
    match current {
        Some(c) if c.pool != pool => {
            let key = double_key(ip, pool);
            Ok(match read(&t.1, &key)? {
                Some(d) => Slot::Double { key, current: d },
                None => Slot::Foreign { current: c },
            })
        }
        current => Ok(Slot::Main { current }),
    }
}

/// A write undone if a later change of its group conflicts: (in `doubles`?, key, old value).
type Undo = (bool, String, Option<Vec<u8>>);

fn write(
    t: &mut Tables<'_>,
    undo: &mut Vec<Undo>,
    doubles: bool,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    let table = if doubles { &mut t.1 } else { &mut t.0 };
    let old = match value {
        Some(v) => table.insert(key, v).map_err(backend)?,
        None => table.remove(key).map_err(backend)?,
    }
    .map(|g| g.value().to_vec());
    undo.push((doubles, key.to_owned(), old));
    Ok(())
}

fn restore(t: &mut Tables<'_>, undo: Vec<Undo>) -> Result<(), StoreError> {
    for (doubles, key, old) in undo.into_iter().rev() {
        let table = if doubles { &mut t.1 } else { &mut t.0 };
        match old {
            Some(v) => table.insert(key.as_str(), v.as_slice()).map_err(backend)?,
            None => table.remove(key.as_str()).map_err(backend)?,
        };
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file; re-keys a file of an older layout by address.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb caches up to 1 GiB by default. The daemon reads the whole store once, at
        // start-up, and then only writes small commits: a small cache serves that, and keeps a
        // node with a million allocations from holding the file in memory twice.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            // Records from before revisions read as revision 1: start the counter above it.
            if meta.get(LAST_REVISION).map_err(backend)?.is_none() {
                meta.insert(LAST_REVISION, 1).map_err(backend)?;
            }
            let mut t = (
                txn.open_table(ALLOCATIONS).map_err(backend)?,
                txn.open_table(DOUBLES).map_err(backend)?,
            );
            // Every open, not only the first: an older release started on this file again
            // (a downgrade) writes `pool/ip` keys, which must not stay unseen.
            if rekey(&mut t)? > 0 || meta.get(LAYOUT).map_err(backend)?.is_none() {
                meta.insert(LAYOUT, BY_ADDRESS).map_err(backend)?;
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

/// Moves records keyed `pool/ip` (older layouts) to their address's key, or to `doubles`
/// when the address already has a record under another pool name; refuses one that would
/// make a second record under the same pool name ([`StoreError::Twice`]). Returns how many
/// it moved. Reads keys only, so a
/// store of a million records costs a fraction of a second.
fn rekey(t: &mut Tables<'_>) -> Result<usize, StoreError> {
    let mut old = Vec::new();
    for row in t.0.iter().map_err(backend)? {
        let (k, v) = row.map_err(backend)?;
        if k.value().contains('/') {
            old.push((k.value().to_owned(), v.value().to_vec()));
        }
    }
    let moved = old.len();
    for (k, v) in old {
        let a = decode(&k, &v)?;
        t.0.remove(k.as_str()).map_err(backend)?;
        let main = main_key(a.ip);
        let double = double_key(a.ip, &a.pool);
        match read(&t.0, &main)? {
            None => {
                t.0.insert(main.as_str(), v.as_slice()).map_err(backend)?;
            }
            Some(c) if c.pool != a.pool && read(&t.1, &double)?.is_none() => {
                tracing::warn!(pool = %a.pool, ip = %a.ip, held_under = %c.pool, "the store holds this address twice (written before overlapping pools were refused); both records are kept until released");
                t.1.insert(double.as_str(), v.as_slice()).map_err(backend)?;
            }
            // The same pool name twice: refused (the caller's transaction, aborted, changes
            // nothing), never one record written over the other.
            Some(c) => {
                let first = match c.pool == a.pool {
                    true => c,
                    false => read(&t.1, &double)?.unwrap_or(c),
                };
                return Err(StoreError::Twice {
                    ip: a.ip,
                    pool: a.pool.clone(),
                    first: holders(&first),
                    second: holders(&a),
                });
            }
        }
    }
    Ok(moved)
}

/// Who holds a record, for messages.
fn holders(a: &Allocation) -> String {
    match (&a.owner, a.holders.is_empty()) {
        (_, false) => a
            .holders
            .iter()
            .map(|h| h.attachment.describe())
            .collect::<Vec<_>>()
            .join(", "),
        (tether_core::alloc::Owner::Pinned { identity, .. }, true) => {
            format!("kept for {identity}")
        }
        (tether_core::alloc::Owner::Ephemeral, true) => "no holder".to_owned(),
    }
}

impl Store for EmbeddedStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut snap = Snapshot::default();
        for table in [ALLOCATIONS, DOUBLES] {
            let t = txn.open_table(table).map_err(backend)?;
            for row in t.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                snap.allocations.push(decode(k.value(), v.value())?);
            }
        }
        Ok(snap)
    }

    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let allocs = txn.open_table(ALLOCATIONS).map_err(backend)?;
        let key = main_key(ip);
        let Some(main) = allocs.get(key.as_str()).map_err(backend)? else {
            return Ok(Vec::new());
        };
        let mut out = vec![decode(&key, main.value())?];
        let doubles = txn.open_table(DOUBLES).map_err(backend)?;
        let (from, to) = double_range(ip);
        for row in doubles.range(from.as_str()..to.as_str()).map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
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
            let mut t = (
                txn.open_table(ALLOCATIONS).map_err(backend)?,
                txn.open_table(DOUBLES).map_err(backend)?,
            );
            let mut meta = txn.open_table(META).map_err(backend)?;
            let mut last = meta
                .get(LAST_REVISION)
                .map_err(backend)?
                .map_or(1, |v| v.value());
            for group in groups {
                // Each change is checked against the records as the group's earlier changes
                // left them (a re-filed address: delete under the old pool, create under the
                // new), and written at once; a conflict undoes what the group wrote.
                let mut undo = Vec::new();
                let mut revs = Vec::with_capacity(group.len());
                let mut group_events = Vec::with_capacity(group.len());
                let mut conflict = None;
                for c in group {
                    let (pool, ip) = (c.pool(), c.ip());
                    let slot = slot(&t, pool, ip)?;
                    let found = match &slot {
                        Slot::Main { current } => current.as_ref().map_or(0, |a| a.revision),
                        Slot::Double { current, .. } | Slot::Foreign { current } => {
                            current.revision
                        }
                    };
                    if matches!(slot, Slot::Foreign { .. }) || found != c.revision() {
                        conflict = Some(Conflict {
                            pool: pool.to_owned(),
                            ip,
                            expected: c.revision(),
                            found,
                        });
                        break;
                    }
                    let (doubles, key) = match &slot {
                        Slot::Double { key, .. } => (true, key.clone()),
                        _ => (false, main_key(ip)),
                    };
                    match c {
                        Change::Put(a) => {
                            last += 1;
                            let v = encode(a, last)?;
                            write(&mut t, &mut undo, doubles, &key, Some(v.as_slice()))?;
                            let mut written = a.clone();
                            written.revision = last;
                            group_events.push(Event::Put(written));
                            revs.push(last);
                        }
                        Change::Delete { pool, ip, revision } => {
                            write(&mut t, &mut undo, doubles, &key, None)?;
                            if !doubles {
                                promote_double(&mut t, &mut undo, *ip)?;
                            }
                            group_events.push(Event::Deleted {
                                pool: pool.clone(),
                                ip: *ip,
                                revision: *revision,
                            });
                            revs.push(0);
                        }
                    }
                }
                match conflict {
                    Some(c) => {
                        restore(&mut t, undo)?;
                        out.push(Err(c));
                    }
                    None => {
                        events.extend(group_events);
                        out.push(Ok(revs));
                    }
                }
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

/// After the record of an address was deleted: a double of it (an old file's second record)
/// takes the address's key, unchanged, so the address stays taken.
fn promote_double(t: &mut Tables<'_>, undo: &mut Vec<Undo>, ip: IpAddr) -> Result<(), StoreError> {
    let (from, to) = double_range(ip);
    let first =
        t.1.range(from.as_str()..to.as_str())
            .map_err(backend)?
            .next()
            .transpose()
            .map_err(backend)?
            .map(|(k, v)| (k.value().to_owned(), v.value().to_vec()));
    if let Some((key, value)) = first {
        write(t, undo, true, &key, None)?;
        write(t, undo, false, &main_key(ip), Some(value.as_slice()))?;
    }
    Ok(())
}
