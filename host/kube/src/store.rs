//! The Kubernetes store: one [`IPAllocation`] object per allocated address, named by the
//! address alone, so the API server itself refuses a second claim of an address.
//!
//! How the [`Store`] contract maps onto the API:
//!
//! - a record's revision is its object's `resourceVersion` (etcd's revision: a number that
//!   changes on every write and is never reused);
//! - a `Put` at revision 0 is a create: `409 AlreadyExists` is the conflict;
//! - any other `Put` is a replace carrying the revision as `resourceVersion`; a `Delete` is a
//!   delete with a `resourceVersion` precondition: `409 Conflict` (changed since) and `404`
//!   (gone since) are conflicts;
//! - the groups of one commit are written concurrently (they touch different addresses);
//!   a group's changes are written one by one; when one conflicts, the ones already made are
//!   undone (each undo itself conditional), then the conflict is reported. A failure of the
//!   API (not a conflict) is a [`StoreError::Backend`] (or [`StoreError::Unavailable`]):
//!   re-read before trusting anything;
//! - a group's delete of an address followed by its create (a re-file under a renamed pool)
//!   is one conditional replace of the object, so the address is never free in between.
//! - the change feed is a watch of the objects.
//!
//! The trait is synchronous (the engine's writer is a plain thread); calls run on the tokio
//! runtime handle the store is given, so they must not be made from inside that runtime.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher;
use tether_core::alloc::{Allocation, Change, Revision};
use tether_store::{Conflict, Event, GroupOutcome, Snapshot, Store, StoreError};
use tokio::runtime::Handle;

use crate::crd::{IPAllocation, allocation_name};
use crate::health::ApiHealth;

/// How many groups of one commit are in flight at once.
const CONCURRENT_GROUPS: usize = 32;
/// The longest one store call (a snapshot, a read, a commit) may wait for the API server.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest one API request of a store call may take. With etcd down the API server
/// answers a write only after 34 s and a read after 60 s (its own timeouts); the writer,
/// which holds the state's lock meanwhile, gives up sooner, and the API server is then
/// known down (see [`crate::health`]).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Allocations as custom resources.
pub struct KubeStore {
    api: Api<IPAllocation>,
    rt: Handle,
    subscribers: std::sync::Arc<Mutex<Vec<Sender<Event>>>>,
    watching: Mutex<bool>,
    metrics: Option<std::sync::Arc<tether_engine::Metrics>>,
    /// The API server's health: calls fail at once while it is down, and a failure that says
    /// it is down marks it so.
    health: Option<ApiHealth>,
    /// What the subscribers may hold a record of, and the watch's re-list in progress.
    feed: std::sync::Arc<Mutex<Feed>>,
}

/// Turns the watch's events into the change feed's.
///
/// It keeps every address the subscribers may hold a record of, with its pool and revision
/// (`known`): what the watch showed, and what the store's own writes made and reads returned
/// (a re-read of the whole store while the watch is down shows objects the watch never did).
/// An object that shows up under another pool than known (re-filed after a pool was renamed:
/// one object per address, replaced in place) is announced as the old record's deletion, then
/// the new record.
/// A re-list reports those it no longer finds as [`Event::Stale`], so that an object deleted
/// while the watch was down leaves the subscribers' state even if only a read had shown it.
/// (A write that lands after the re-list's snapshot is reported stale too: a needless re-read,
/// never a lost one.)
#[derive(Default)]
struct Feed {
    known: HashMap<IpAddr, (String, Revision)>,
    /// While the watch re-lists: the addresses the list has shown so far.
    relisted: Option<HashSet<IpAddr>>,
}

impl Feed {
    /// Notes a record at `revision` unless a newer one of its address is known.
    fn remember(&mut self, pool: &str, ip: IpAddr, revision: Revision) {
        if self.known.get(&ip).is_none_or(|(_, r)| *r < revision) {
            self.known.insert(ip, (pool.to_owned(), revision));
        }
    }

    /// The watch starts a (re-)list.
    fn relist_started(&mut self) {
        self.relisted = Some(HashSet::new());
    }

    /// The watch shows an object (listed or changed).
    fn applied(&mut self, a: Allocation) -> Vec<Event> {
        if let Some(seen) = self.relisted.as_mut() {
            seen.insert(a.ip);
        }
        let mut events = Vec::with_capacity(2);
        // Older than what is known of the address (this daemon's own later write): stale,
        // not passed on (a late one under a re-filed address's old pool name would put the
        // old record back beside the new).
        if self.known.get(&a.ip).is_some_and(|(_, r)| *r > a.revision) {
            return events;
        }
        if let Some((pool, r)) = self.known.get(&a.ip)
            && *pool != a.pool
            && *r < a.revision
        {
            events.push(Event::Deleted {
                pool: pool.clone(),
                ip: a.ip,
                revision: *r,
            });
        }
        self.remember(&a.pool, a.ip, a.revision);
        events.push(Event::Put(a));
        events
    }

    /// The watch shows the deletion, at revision `deleted_at`, of the object of `ip`.
    fn deleted(&mut self, pool: &str, ip: IpAddr, deleted_at: Revision) -> Vec<Event> {
        match self.known.get(&ip) {
            // A newer object already holds this address (created after this deletion, by
            // this daemon's own write): the event is of an older one and must not take the
            // newer one away.
            Some((_, r)) if *r > deleted_at => Vec::new(),
            _ => {
                // The revision the record had (the delete event's own is newer).
                let revision = self.known.remove(&ip).map_or(deleted_at, |(_, r)| r);
                vec![Event::Deleted {
                    pool: pool.to_owned(),
                    ip,
                    revision,
                }]
            }
        }
    }

    /// The (re-)list is complete: what it did not show was deleted in the gap, perhaps after
    /// a write this watch never showed (whose revision a delete event could not match), and
    /// no delete event will announce it. The subscribers read those again.
    fn relist_done(&mut self) -> Vec<Event> {
        let Some(seen) = self.relisted.take() else {
            return Vec::new();
        };
        let gone: Vec<IpAddr> = self
            .known
            .keys()
            .filter(|ip| !seen.contains(ip))
            .copied()
            .collect();
        gone.into_iter()
            .map(|ip| {
                self.known.remove(&ip);
                Event::Stale { ip }
            })
            .collect()
    }
}

fn backend(op: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{op}: {e}"))
}

fn lock(feed: &Mutex<Feed>) -> std::sync::MutexGuard<'_, Feed> {
    feed.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The HTTP status of an API error, if the call got that far.
fn status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn revision_of(o: &IPAllocation) -> Revision {
    o.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The allocation an object describes; one that describes none reserves its address (see
/// [`IPAllocation::to_allocation_or_reserved`]), logged: one bad object must neither stop
/// every daemon from starting nor let its address be handed out.
fn read(o: &IPAllocation) -> Allocation {
    let (a, error) = o.to_allocation_or_reserved();
    if let Some(e) = error {
        tracing::warn!(address = %a.ip, "address object not readable; its address stays reserved until the object is fixed or deleted: {e}");
    }
    a
}

/// What a write did, to undo it if a later change of its group conflicts.
enum Done {
    Created {
        name: String,
        revision: Revision,
    },
    Replaced {
        before: Allocation,
        revision: Revision,
    },
    Deleted {
        before: Allocation,
    },
}

impl KubeStore {
    /// A store over `client`, running its calls on `rt`.
    pub fn new(client: kube::Client, rt: Handle) -> KubeStore {
        KubeStore {
            api: Api::all(client),
            rt,
            subscribers: std::sync::Arc::default(),
            watching: Mutex::new(false),
            metrics: None,
            health: None,
            feed: std::sync::Arc::default(),
        }
    }

    /// Notes what a write made (see [`Feed`]).
    fn remember_write(&self, a: &Allocation, revision: Revision) {
        lock(&self.feed).remember(&a.pool, a.ip, revision);
    }

    /// Notes what a read returned (see [`Feed`]).
    fn remember(&self, read: &[Allocation]) {
        let mut feed = lock(&self.feed);
        for a in read {
            feed.remember(&a.pool, a.ip, a.revision);
        }
    }

    /// Shares `health` (see [`crate::health`]): while the API server is down, calls fail at
    /// once instead of waiting for [`CALL_TIMEOUT`].
    pub fn with_health(mut self, health: ApiHealth) -> KubeStore {
        self.health = Some(health);
        self
    }

    /// The error of a failed API call of `op`; notes an outage in the health.
    fn failed(&self, op: &str, e: kube::Error) -> StoreError {
        if let Some(h) = &self.health {
            h.failed(op, &e);
        }
        if crate::health::is_outage(&e) {
            return StoreError::Unavailable(format!("{op}: {e}"));
        }
        backend(op, e)
    }

    /// Counts the store's API calls in `metrics` (`tether_kube_api_calls_total`).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<tether_engine::Metrics>) -> KubeStore {
        self.metrics = Some(metrics);
        self
    }

    /// One API request of `op`, bounded by [`REQUEST_TIMEOUT`]; `Err` at once while the API
    /// server is known down, and when it does not answer in time (it is then known down).
    async fn timed<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, StoreError> {
        if let Some(Err(why)) = self.health.as_ref().map(ApiHealth::check) {
            return Err(StoreError::Unavailable(format!("{op}: {why}")));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
            Ok(r) => Ok(r),
            Err(_) => {
                let why = format!("no answer within {}s", REQUEST_TIMEOUT.as_secs());
                if let Some(h) = &self.health {
                    h.down(op, &why);
                }
                Err(StoreError::Unavailable(format!(
                    "{op}: no answer from the API server within {}s",
                    REQUEST_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// [`KubeStore::timed`], any API error a failure.
    async fn request<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, StoreError> {
        self.timed(op, f).await?.map_err(|e| self.failed(op, e))
    }

    async fn current(&self, ip: IpAddr) -> Result<Option<IPAllocation>, StoreError> {
        self.request("reading an address", self.api.get_opt(&allocation_name(ip)))
            .await
    }

    /// The conflict of a change, with the revision the address's record has now.
    async fn conflict(&self, c: &Change) -> Result<Conflict, StoreError> {
        let found = self.current(c.ip()).await?.map_or(0, |o| revision_of(&o));
        Ok(Conflict {
            pool: c.pool().to_owned(),
            ip: c.ip(),
            expected: c.revision(),
            found,
        })
    }

    /// Applies one change; `Ok(Err(conflict))` when the record was not as planned.
    async fn apply(&self, c: &Change) -> Result<Result<(Done, Revision), Conflict>, StoreError> {
        let name = allocation_name(c.ip());
        match c {
            Change::Put(a) if a.revision == 0 => {
                match self
                    .timed(
                        "creating an address",
                        self.api
                            .create(&PostParams::default(), &IPAllocation::from_allocation(a)),
                    )
                    .await?
                {
                    Ok(o) => {
                        let r = revision_of(&o);
                        self.remember_write(a, r);
                        Ok(Ok((Done::Created { name, revision: r }, r)))
                    }
                    Err(e) if status(&e) == Some(409) => Ok(Err(self.conflict(c).await?)),
                    Err(e) => Err(self.failed("creating an address", e)),
                }
            }
            Change::Put(a) => self.replace(c, a, &a.pool, a.revision).await,
            Change::Delete { pool, ip, revision } => {
                let before = match self.current(*ip).await? {
                    Some(o) if revision_of(&o) == *revision && &o.spec.pool == pool => read(&o),
                    _ => return Ok(Err(self.conflict(c).await?)),
                };
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(revision.to_string()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                match self
                    .timed("deleting an address", self.api.delete(&name, &dp))
                    .await?
                {
                    Ok(_) => Ok(Ok((Done::Deleted { before }, 0))),
                    Err(e) if matches!(status(&e), Some(409 | 404)) => {
                        Ok(Err(self.conflict(c).await?))
                    }
                    Err(e) => Err(self.failed("deleting an address", e)),
                }
            }
        }
    }

    /// Replaces the record of `a.ip`, which must be at `revision` in pool `pool`, with `a`
    /// (`c` is the change, for its conflict). With another pool than `a.pool` it re-files the
    /// address in one write: the object is named by the address alone.
    async fn replace(
        &self,
        c: &Change,
        a: &Allocation,
        pool: &str,
        revision: Revision,
    ) -> Result<Result<(Done, Revision), Conflict>, StoreError> {
        let before = match self.current(a.ip).await? {
            Some(o) if revision_of(&o) == revision && o.spec.pool == pool => read(&o),
            _ => return Ok(Err(self.conflict(c).await?)),
        };
        let mut o = IPAllocation::from_allocation(a);
        o.metadata.resource_version = Some(revision.to_string());
        match self
            .timed(
                "updating an address",
                self.api
                    .replace(&allocation_name(a.ip), &PostParams::default(), &o),
            )
            .await?
        {
            Ok(o) => {
                let r = revision_of(&o);
                self.remember_write(a, r);
                Ok(Ok((
                    Done::Replaced {
                        before,
                        revision: r,
                    },
                    r,
                )))
            }
            Err(e) if matches!(status(&e), Some(409 | 404)) => Ok(Err(self.conflict(c).await?)),
            Err(e) => Err(self.failed("updating an address", e)),
        }
    }

    /// Undoes a group's writes, newest first, each conditional on what it wrote.
    async fn undo(&self, done: Vec<Done>) -> Result<(), StoreError> {
        for d in done.into_iter().rev() {
            let undone = match d {
                Done::Created { name, revision } => {
                    let dp = DeleteParams {
                        preconditions: Some(Preconditions {
                            resource_version: Some(revision.to_string()),
                            uid: None,
                        }),
                        ..DeleteParams::default()
                    };
                    self.request("undoing part of a group", self.api.delete(&name, &dp))
                        .await
                        .map(|_| ())
                }
                Done::Replaced { before, revision } => {
                    let mut o = IPAllocation::from_allocation(&before);
                    o.metadata.resource_version = Some(revision.to_string());
                    self.request(
                        "undoing part of a group",
                        self.api
                            .replace(&allocation_name(before.ip), &PostParams::default(), &o),
                    )
                    .await
                    .map(|_| ())
                }
                Done::Deleted { before } => self
                    .request(
                        "undoing part of a group",
                        self.api.create(
                            &PostParams::default(),
                            &IPAllocation::from_allocation(&before),
                        ),
                    )
                    .await
                    .map(|_| ()),
            };
            undone?;
        }
        Ok(())
    }

    /// Commits the groups concurrently (at most [`CONCURRENT_GROUPS`] at once): they touch
    /// different addresses (the engine's writer never batches two groups on one address), so
    /// their order does not matter, and a batch costs one API round trip, not one per group.
    async fn commit_async(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        futures::stream::iter(groups.iter().map(|g| self.commit_group(g)))
            .buffered(CONCURRENT_GROUPS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// One group: its changes in order; a conflict undoes what the group wrote.
    ///
    /// A re-file (the delete of an address's record followed by its creation under another
    /// pool, as the planner writes it when a pool was renamed) is one conditional replace:
    /// as two requests, the address would be free in between, for another daemon to claim
    /// while a pod still holds it.
    async fn commit_group(&self, group: &[Change]) -> Result<GroupOutcome, StoreError> {
        let mut done = Vec::with_capacity(group.len());
        let mut revs = Vec::with_capacity(group.len());
        let mut changes = group.iter().peekable();
        while let Some(c) = changes.next() {
            let refiled = match (c, changes.peek()) {
                (Change::Delete { pool, ip, revision }, Some(Change::Put(a)))
                    if a.ip == *ip && a.revision == 0 =>
                {
                    changes.next();
                    Some((pool, *revision, a))
                }
                _ => None,
            };
            let applied = match refiled {
                Some((pool, revision, a)) => self.replace(c, a, pool, revision).await,
                None => self.apply(c).await,
            };
            if let Some(m) = &self.metrics {
                let verb = match c {
                    _ if refiled.is_some() => "replace",
                    Change::Put(a) if a.revision == 0 => "create",
                    Change::Put(_) => "replace",
                    Change::Delete { .. } => "delete",
                };
                let result = match &applied {
                    Ok(Ok(_)) => "ok",
                    Ok(Err(_)) => "conflict",
                    Err(_) => "error",
                };
                m.kube_api_call(verb, result);
            }
            match applied? {
                Ok((d, r)) => {
                    done.push(d);
                    if refiled.is_some() {
                        // The delete's outcome.
                        revs.push(0);
                    }
                    revs.push(r);
                }
                Err(x) => {
                    self.undo(done).await?;
                    return Ok(Err(x));
                }
            }
        }
        Ok(Ok(revs))
    }

    /// Starts the watch that feeds subscribers, once.
    fn watch(&self) {
        let mut watching = self
            .watching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *watching {
            return;
        }
        *watching = true;
        let api = self.api.clone();
        let subs = self.subscribers.clone();
        let health = self.health.clone();
        let feed = self.feed.clone();
        self.rt.spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let events = match ev {
                    Ok(watcher::Event::Init) => {
                        lock(&feed).relist_started();
                        continue;
                    }
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        lock(&feed).applied(read(&o))
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        lock(&feed).deleted(&o.spec.pool, o.spec.address, revision_of(&o))
                    }
                    Ok(watcher::Event::InitDone) => lock(&feed).relist_done(),
                    Err(e) if crate::health::is_expired(&e) => {
                        // The watch resumed from a resourceVersion the API server no longer
                        // has: the watcher re-lists (Init .. InitDone above), and what was
                        // deleted in the gap is reported stale then.
                        tracing::info!(resource = "IPAllocation", error = %e, "watch expired (410 Gone); re-listing");
                        continue;
                    }
                    Err(e) => {
                        if let Some(h) = &health {
                            h.watch_failed("IPAllocation", &e);
                        }
                        tracing::warn!("watching address objects: {e}; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let mut live = subs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                live.retain(|s| events.iter().all(|e| s.send(e.clone()).is_ok()));
                // The store is gone and so is every subscriber: nobody to watch for.
                if live.is_empty() && std::sync::Arc::strong_count(&subs) == 1 {
                    break;
                }
            }
        });
    }
}

impl KubeStore {
    /// Runs a store call on the API runtime, bounded by [`CALL_TIMEOUT`]: the engine's
    /// writer waits for it with the state locked, so an API server that stops answering must
    /// not hold it forever. A call that times out fails; what it may have written anyway is
    /// read back by the writer's resync.
    fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if let Some(Err(why)) = self.health.as_ref().map(ApiHealth::check) {
            return Err(StoreError::Unavailable(format!("{what}: {why}")));
        }
        self.rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, f).await })
            .unwrap_or_else(|_| {
                let why = format!("no answer within {}s", CALL_TIMEOUT.as_secs());
                if let Some(h) = &self.health {
                    h.down(what, &why);
                }
                Err(StoreError::Unavailable(format!(
                    "{what}: no answer from the API server within {}s",
                    CALL_TIMEOUT.as_secs()
                )))
            })
    }
}

impl Store for KubeStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.bounded("listing addresses", async {
            let list = self
                .request("listing addresses", self.api.list(&ListParams::default()))
                .await?;
            let allocations: Vec<Allocation> = list.items.iter().map(read).collect();
            self.remember(&allocations);
            Ok(Snapshot { allocations })
        })
    }

    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError> {
        self.bounded("reading an address", async {
            let found: Vec<Allocation> = self
                .current(ip)
                .await?
                .map(|o| read(&o))
                .into_iter()
                .collect();
            self.remember(&found);
            Ok(found)
        })
    }

    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        self.bounded("committing", self.commit_async(groups))
    }

    fn pinned_to(
        &self,
        kind: tether_core::IdentityKind,
        identity: &str,
    ) -> Result<Option<Vec<Allocation>>, StoreError> {
        let selector = format!(
            "{}={}",
            crate::crd::IDENTITY_LABEL,
            crate::crd::identity_label(kind, identity)
        );
        self.bounded("listing an identity's addresses", async {
            let list = self
                .request(
                    "listing an identity's addresses",
                    self.api.list(&ListParams::default().labels(&selector)),
                )
                .await?;
            let found: Vec<Allocation> = list
                .items
                .iter()
                .map(read)
                .filter(|a| {
                    matches!(&a.owner, tether_core::alloc::Owner::Pinned { identity: i, kind: k, .. }
                        if i == identity && *k == kind)
                })
                .collect();
            self.remember(&found);
            Ok(Some(found))
        })
    }

    fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tx);
        self.watch();
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str, revision: Revision) -> Allocation {
        let mut a = tether_store::contract::allocation("p", ip, "c");
        a.revision = revision;
        a
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// The CI failure of e0f48d9: the daemon deletes an address's object and creates a new one
    /// there; the old object's delete event arrives after the new write. It must not take the
    /// new record away (with the new revision, the subscriber would drop a live allocation).
    #[test]
    fn a_late_delete_of_an_older_object_is_ignored() {
        let mut feed = Feed::default();
        feed.applied(at("10.0.0.1", 10));
        // This daemon deleted revision 10 (at 11) and created the new object at 12.
        feed.remember("p", ip("10.0.0.1"), 12);
        assert_eq!(feed.deleted("p", ip("10.0.0.1"), 11), Vec::new());
        // The new object's own deletion does get through, with the revision it had.
        assert_eq!(
            feed.deleted("p", ip("10.0.0.1"), 13),
            vec![Event::Deleted {
                pool: "p".into(),
                ip: ip("10.0.0.1"),
                revision: 12,
            }]
        );
    }

    /// A delete event carries the revision the record had, not the deletion's.
    #[test]
    fn a_delete_carries_the_records_revision() {
        let mut feed = Feed::default();
        feed.applied(at("10.0.0.1", 10));
        assert_eq!(
            feed.deleted("p", ip("10.0.0.1"), 11),
            vec![Event::Deleted {
                pool: "p".into(),
                ip: ip("10.0.0.1"),
                revision: 10,
            }]
        );
        // Never shown: the deletion's own revision (the subscriber has nothing newer).
        assert_eq!(
            feed.deleted("p", ip("10.0.0.2"), 20),
            vec![Event::Deleted {
                pool: "p".into(),
                ip: ip("10.0.0.2"),
                revision: 20,
            }]
        );
    }

    /// A late event of an older object does not lower what is known of the address.
    #[test]
    fn an_older_apply_does_not_replace_a_newer_record() {
        let mut feed = Feed::default();
        feed.remember("p", ip("10.0.0.1"), 12);
        assert_eq!(feed.applied(at("10.0.0.1", 10)), Vec::new(), "passed on");
        assert_eq!(feed.deleted("p", ip("10.0.0.1"), 11), Vec::new());
    }

    /// An object re-filed under another pool (replaced in place: the watch shows no delete)
    /// is announced as the old record's deletion, then the new record; this daemon's own
    /// re-file (already known under the new pool) is just the new record.
    #[test]
    fn a_re_filed_object_deletes_the_old_record_first() {
        let mut feed = Feed::default();
        feed.applied(at("10.0.0.1", 10));
        let mut moved = at("10.0.0.1", 14);
        moved.pool = "renamed".into();
        assert_eq!(
            feed.applied(moved.clone()),
            vec![
                Event::Deleted {
                    pool: "p".into(),
                    ip: ip("10.0.0.1"),
                    revision: 10,
                },
                Event::Put(moved.clone()),
            ]
        );
        let mut mine = Feed::default();
        mine.applied(at("10.0.0.1", 10));
        mine.remember("renamed", ip("10.0.0.1"), 14);
        assert_eq!(mine.applied(moved.clone()), vec![Event::Put(moved)]);
    }

    /// A re-list reports what it no longer finds (deleted while the watch was away, seen by
    /// the watch or only by a read) as stale, once; what it finds is not.
    #[test]
    fn a_relist_reports_what_it_did_not_find() {
        let mut feed = Feed::default();
        feed.applied(at("10.0.0.1", 10));
        feed.applied(at("10.0.0.2", 11));
        feed.remember("p", ip("10.0.0.3"), 12);
        feed.relist_started();
        feed.applied(at("10.0.0.2", 11));
        let mut stale = feed.relist_done();
        stale.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            stale,
            vec![
                Event::Stale { ip: ip("10.0.0.1") },
                Event::Stale { ip: ip("10.0.0.3") },
            ]
        );
        // Reported once: a second re-list that finds nothing has nothing left to report.
        feed.relist_started();
        assert_eq!(
            feed.relist_done(),
            vec![Event::Stale { ip: ip("10.0.0.2") }]
        );
        // No re-list in progress: nothing to report.
        assert_eq!(feed.relist_done(), Vec::new());
    }
}
