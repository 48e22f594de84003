//! The PinnedIdentity records: one namespaced object per pinned identity (a VM, a StatefulSet
//! pod, an IPAMClaim, a custom policy's identity), named after it in its namespace, so that a
//! tenant sees their VMs' and replicas' addresses with `kubectl get pinnedidentities -n NS`.
//!
//! The address objects are the truth; the records are derived from them. The elected daemon
//! (the holder of the releasers' Lease) compares, every few seconds, the records the address
//! objects call for with the records that exist, and creates, replaces or deletes the
//! difference: a record edited or deleted by hand is repaired, one whose addresses are all
//! released is removed. Every replace and delete carries the resourceVersion the daemon
//! looked at, so a record changed meanwhile is left for the next round.
//!
//! # Names
//!
//! An identity `namespace/name` gets the record `name` in `namespace`. Two identities of
//! different kinds with the same name in one namespace (a VM and a StatefulSet pod both
//! called `web-0`) cannot share it: the first kind in the order VirtualMachine,
//! StatefulSetPod, IPAMClaim, Custom gets the plain name, the others `name.<kind>`
//! (`web-0.statefulsetpod`). An identity that is not `namespace/name` with valid object names
//! (a custom policy may key on anything) gets no record; its address objects still show it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tether_core::alloc::{Allocation, Owner};
use tether_core::decision::IdentityKind;
use tether_engine::Engine;
use tether_kube::crd::{PinnedAddress, PinnedIdentity, PinnedIdentitySpec, kind_name};

/// How long a write is trusted to show up in the cache before the record is looked at again.
const PENDING_FOR: Duration = Duration::from_secs(10);

/// A record's place: namespace and name.
type Key = (String, String);

/// Keeps the PinnedIdentity records in line with the address objects, while elected.
pub struct Pins {
    client: kube::Client,
    cache: Store<PinnedIdentity>,
    /// What this daemon wrote (`None`: deleted), when, and its cache has not shown yet: not
    /// written again meanwhile, for at most [`PENDING_FOR`] (the record may have changed
    /// again before the cache showed the write).
    pending: HashMap<Key, (Instant, Option<PinnedIdentitySpec>)>,
}

impl Pins {
    /// Starts watching the records (on the daemon's runtime), so that the cache is warm by
    /// the time this daemon is elected.
    pub fn start(client: kube::Client) -> Pins {
        let (cache, writer) = reflector::store();
        let api: Api<PinnedIdentity> = Api::all(client.clone());
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api, watcher::Config::default()).default_backoff(),
        );
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!("PinnedIdentity watch failed; retrying: {e}");
                }
            }
        });
        Pins {
            client,
            cache,
            pending: HashMap::new(),
        }
    }

    /// Forgets what was written (on losing or winning the election: the cache is the truth).
    pub fn reset(&mut self) {
        self.pending.clear();
    }

    /// One round: writes the difference between the records the engine's allocations call
    /// for and the records that exist. Returns the number of writes attempted.
    pub async fn reconcile(&mut self, service: &Arc<Engine>) -> usize {
        if self.cache.wait_until_ready().now_or_never().is_none() {
            return 0;
        }
        let desired = desired(&service.allocations());
        let existing: BTreeMap<Key, Arc<PinnedIdentity>> = self
            .cache
            .state()
            .into_iter()
            .filter_map(|o| {
                let key = (o.metadata.namespace.clone()?, o.metadata.name.clone()?);
                Some((key, o))
            })
            .collect();
        // What the cache now shows, or has not shown for too long, is no longer pending.
        self.pending.retain(|key, (at, wrote)| {
            at.elapsed() < PENDING_FOR
                && match wrote {
                    Some(spec) => existing.get(key).is_none_or(|o| &o.spec != spec),
                    None => existing.contains_key(key),
                }
        });
        let pending = |key: &Key, want: Option<&PinnedIdentitySpec>| {
            self.pending
                .get(key)
                .is_some_and(|(_, wrote)| wrote.as_ref() == want)
        };

        let mut writes = Vec::new();
        for (key, spec) in &desired {
            if pending(key, Some(spec)) {
                continue;
            }
            match existing.get(key) {
                Some(o) if &o.spec == spec => {}
                Some(o) => writes.push(Write::Replace(key.clone(), spec.clone(), o.clone())),
                None => writes.push(Write::Create(key.clone(), spec.clone())),
            }
        }
        for (key, o) in &existing {
            if !desired.contains_key(key) && !pending(key, None) {
                writes.push(Write::Delete(key.clone(), o.clone()));
            }
        }
        let n = writes.len();
        let client = self.client.clone();
        let metrics = service.metrics.clone();
        let done: Vec<(Key, Option<Option<PinnedIdentitySpec>>)> =
            futures::stream::iter(writes.into_iter().map(|w| {
                let client = client.clone();
                let metrics = metrics.clone();
                async move { w.apply(client, &metrics).await }
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        for (key, wrote) in done {
            match wrote {
                Some(w) => self.pending.insert(key, (Instant::now(), w)),
                None => self.pending.remove(&key),
            };
        }
        n
    }
}

/// Labels the pinned address objects written before objects carried their identity
/// ([`tether_kube::crd::IDENTITY_LABEL`], which a daemon lists before an identity's first
/// address on its node). Run by a newly elected releaser, once: one LIST of the objects
/// without the label, and a patch of the label onto each pinned one (the labels only: the
/// allocation is untouched). Returns how many were labelled.
pub async fn label_old_pins(client: kube::Client) -> usize {
    use kube::api::{ListParams, Patch, PatchParams};
    use tether_kube::crd::{IDENTITY_LABEL, IPAllocation, identity_label};
    let api: Api<IPAllocation> = Api::all(client);
    let list = match api
        .list(&ListParams::default().labels(&format!("!{IDENTITY_LABEL}")))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "listing address objects without an identity label: {e}; the next election tries again"
            );
            return 0;
        }
    };
    let mut n = 0;
    for o in list.items {
        let Ok(a) = o.to_allocation() else { continue };
        let Owner::Pinned { identity, kind, .. } = &a.owner else {
            continue;
        };
        let name = o.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({"metadata": {"labels": {IDENTITY_LABEL: identity_label(*kind, identity)}}});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => n += 1,
            Err(e) => {
                tracing::warn!(object = %name, "labelling an address object with its identity: {e}")
            }
        }
    }
    if n > 0 {
        tracing::info!(labelled = n, "address objects labelled with their identity");
    }
    n
}

/// One write to a record.
enum Write {
    Create(Key, PinnedIdentitySpec),
    Replace(Key, PinnedIdentitySpec, Arc<PinnedIdentity>),
    Delete(Key, Arc<PinnedIdentity>),
}

impl Write {
    /// Writes; returns the key and, when it worked, what is now there (`None`: deleted).
    async fn apply(
        self,
        client: kube::Client,
        metrics: &tether_engine::Metrics,
    ) -> (Key, Option<Option<PinnedIdentitySpec>>) {
        let api = |ns: &str| Api::<PinnedIdentity>::namespaced(client.clone(), ns);
        let (verb, key, result) = match self {
            Write::Create(key, spec) => {
                let mut o = PinnedIdentity::new(&key.1, spec.clone());
                o.metadata.namespace = Some(key.0.clone());
                let r = api(&key.0).create(&PostParams::default(), &o).await;
                ("create", key, r.map(|_| Some(spec)))
            }
            Write::Replace(key, spec, old) => {
                let mut o = (*old).clone();
                o.spec = spec.clone();
                let r = api(&key.0)
                    .replace(&key.1, &PostParams::default(), &o)
                    .await;
                ("replace", key, r.map(|_| Some(spec)))
            }
            Write::Delete(key, old) => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: old.metadata.uid.clone(),
                        resource_version: old.metadata.resource_version.clone(),
                    }),
                    ..DeleteParams::default()
                };
                let r = api(&key.0).delete(&key.1, &dp).await;
                ("delete", key, r.map(|_| None))
            }
        };
        match result {
            Ok(now) => {
                metrics.kube_api_call(verb, "ok");
                tracing::debug!(namespace = %key.0, name = %key.1, verb, "PinnedIdentity written");
                (key, Some(now))
            }
            Err(e) => {
                let result = match &e {
                    kube::Error::Api(s) if s.code == 409 => "conflict",
                    kube::Error::Api(s) if s.code == 404 => "not_found",
                    _ => "error",
                };
                metrics.kube_api_call(verb, result);
                tracing::info!(namespace = %key.0, name = %key.1, verb, "PinnedIdentity not written; the next round looks again: {e}");
                (key, None)
            }
        }
    }
}

/// The order in which kinds get a contested name.
fn rank(kind: IdentityKind) -> u8 {
    match kind {
        IdentityKind::VirtualMachine => 0,
        IdentityKind::StatefulSetPod => 1,
        IdentityKind::IpamClaim => 2,
        IdentityKind::Custom => 3,
    }
}

/// Whether `s` is a valid object name (a DNS subdomain) and, with `label`, a namespace's (a
/// DNS label).
fn valid_name(s: &str, label: bool) -> bool {
    let max = if label { 63 } else { 253 };
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (!label && b == b'.')
        })
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// The records the allocations call for, by namespace and name.
pub fn desired(allocations: &[Allocation]) -> BTreeMap<Key, PinnedIdentitySpec> {
    // Per identity (kind, namespace, name): its addresses and holders.
    let mut by_identity: BTreeMap<(u8, String, String), PinnedIdentitySpec> = BTreeMap::new();
    for a in allocations {
        let Owner::Pinned { identity, kind, .. } = &a.owner else {
            continue;
        };
        let Some((ns, name)) = identity.split_once('/') else {
            continue;
        };
        if !valid_name(ns, true) || !valid_name(name, false) {
            continue;
        }
        let spec = by_identity
            .entry((rank(*kind), ns.to_owned(), name.to_owned()))
            .or_insert_with(|| PinnedIdentitySpec {
                kind: kind_name(*kind).into(),
                identity: identity.clone(),
                addresses: Vec::new(),
                holders: Vec::new(),
            });
        spec.addresses.push(PinnedAddress {
            pool: a.pool.clone(),
            address: a.ip,
            network: a.network.clone(),
            interface: a.interface.clone(),
        });
        for h in &a.holders {
            spec.holders.push(h.attachment.pod.clone());
        }
    }
    let mut out: BTreeMap<Key, PinnedIdentitySpec> = BTreeMap::new();
    // Ordered by rank first: the first kind to ask for a name gets it.
    let mut ordered: Vec<_> = by_identity.into_iter().collect();
    ordered.sort_by(|a, b| (a.0.0, &a.0.1, &a.0.2).cmp(&(b.0.0, &b.0.1, &b.0.2)));
    for ((_, ns, name), mut spec) in ordered {
        spec.addresses
            .sort_by_key(|a| (a.network.clone(), a.interface.clone(), a.address));
        spec.holders.sort();
        spec.holders.dedup();
        let plain = (ns.clone(), name.clone());
        let key = if out.contains_key(&plain) {
            (ns, format!("{name}.{}", spec.kind.to_ascii_lowercase()))
        } else {
            plain
        };
        if key.1.len() <= 253 {
            out.insert(key, spec);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_core::alloc::{Attachment, Holder};

    fn pinned(ip: &str, kind: IdentityKind, identity: &str, pods: &[&str]) -> Allocation {
        Allocation {
            pool: "p".into(),
            ip: ip.parse().expect("ip"),
            network: "net".into(),
            interface: "eth0".into(),
            owner: Owner::Pinned {
                identity: identity.into(),
                kind,
                release: Vec::new(),
            },
            holders: pods
                .iter()
                .map(|p| Holder {
                    attachment: Attachment {
                        container_id: format!("c-{p}"),
                        ifname: "eth0".into(),
                        namespace: "default".into(),
                        pod: (*p).into(),
                        pod_uid: format!("u-{p}"),
                    },
                    shared: false,
                    node: String::new(),
                    since: 1,
                })
                .collect(),
            idle_since: None,
            revision: 1,
        }
    }

    #[test]
    fn one_record_per_identity_with_its_addresses_and_holders() {
        let mut eth1 = pinned("10.0.0.9", IdentityKind::VirtualMachine, "ns/vm", &["l-1"]);
        eth1.interface = "eth1".into();
        let allocs = vec![
            pinned(
                "10.0.0.2",
                IdentityKind::VirtualMachine,
                "ns/vm",
                &["l-2", "l-1"],
            ),
            eth1,
            pinned("10.0.0.3", IdentityKind::StatefulSetPod, "ns/web-0", &[]),
            Allocation {
                owner: Owner::Ephemeral,
                ..pinned("10.0.0.4", IdentityKind::Custom, "ns/x", &["p"])
            },
        ];
        let d = desired(&allocs);
        assert_eq!(d.len(), 2, "{d:?}");
        let vm = &d[&("ns".to_owned(), "vm".to_owned())];
        assert_eq!(vm.kind, "VirtualMachine");
        assert_eq!(vm.identity, "ns/vm");
        assert_eq!(
            vm.addresses
                .iter()
                .map(|a| a.address.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.2", "10.0.0.9"]
        );
        assert_eq!(vm.holders, ["l-1", "l-2"]);
        let web = &d[&("ns".to_owned(), "web-0".to_owned())];
        assert_eq!(web.kind, "StatefulSetPod");
        assert!(web.holders.is_empty());
    }

    #[test]
    fn a_contested_name_goes_to_the_first_kind_and_the_other_gets_a_suffix() {
        let allocs = vec![
            pinned("10.0.0.3", IdentityKind::StatefulSetPod, "ns/web-0", &[]),
            pinned("10.0.0.2", IdentityKind::VirtualMachine, "ns/web-0", &[]),
        ];
        let d = desired(&allocs);
        assert_eq!(
            d[&("ns".to_owned(), "web-0".to_owned())].kind,
            "VirtualMachine"
        );
        assert_eq!(
            d[&("ns".to_owned(), "web-0.statefulsetpod".to_owned())].kind,
            "StatefulSetPod"
        );
    }

    #[test]
    fn identities_that_are_not_object_names_get_no_record() {
        let allocs = vec![
            pinned("10.0.0.2", IdentityKind::Custom, "no-slash", &[]),
            pinned("10.0.0.3", IdentityKind::Custom, "ns/Upper", &[]),
            pinned("10.0.0.4", IdentityKind::Custom, "a.b/x", &[]),
            pinned("10.0.0.5", IdentityKind::Custom, "ns/ok.name", &[]),
        ];
        let d = desired(&allocs);
        assert_eq!(
            d.keys().cloned().collect::<Vec<_>>(),
            [("ns".to_owned(), "ok.name".to_owned())]
        );
    }
}
