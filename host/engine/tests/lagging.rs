//! Two daemons share a store, and one of them hears nothing of the other's writes (its change
//! feed lags, as a Kubernetes watch can): before it gives a pinned identity its first
//! address it asks the store whether the identity has one already, and reuses it.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};

use tether_api::CniRequest;
use tether_core::alloc::{Allocation, Change, Owner};
use tether_core::pool::{IpPoolSpec, Pool};
use tether_core::{Decision, IdentityKind, Pinned, PolicyRequest, ReleaseCondition};
use tether_engine::ports::{Decide, NoWorkloads};
use tether_engine::{Engine, Metrics, Ports};
use tether_policy::{ChainOutcome, PolicyError};
use tether_store::embedded::EmbeddedStore;
use tether_store::{GroupOutcome, Snapshot, Store, StoreError};

/// The shared store as a lagging daemon sees it: no change feed; `pinned_to` reads the
/// records, as the Kubernetes store lists an identity's objects (unless `blind`).
struct Lagging {
    inner: Arc<EmbeddedStore>,
    blind: bool,
}

impl Store for Lagging {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.inner.snapshot()
    }

    fn get(&self, ip: IpAddr) -> Result<Vec<Allocation>, StoreError> {
        self.inner.get(ip)
    }

    fn commit(&self, groups: &[Vec<Change>]) -> Result<Vec<GroupOutcome>, StoreError> {
        self.inner.commit(groups)
    }

    fn subscribe(&self) -> Receiver<tether_store::Event> {
        // A feed that never brings anything.
        let (tx, rx) = channel();
        std::mem::forget(tx);
        rx
    }

    fn pinned_to(
        &self,
        kind: IdentityKind,
        identity: &str,
    ) -> Result<Option<Vec<Allocation>>, StoreError> {
        if self.blind {
            return Ok(None);
        }
        Ok(Some(
            self.inner
                .snapshot()?
                .allocations
                .into_iter()
                .filter(|a| {
                    matches!(&a.owner, Owner::Pinned { identity: i, kind: k, .. }
                        if i == identity && *k == kind)
                })
                .collect(),
        ))
    }
}

/// Every pod pinned under `default/db`.
struct PinAll;

impl Decide for PinAll {
    fn decide(&self, _: &PolicyRequest) -> Result<ChainOutcome, PolicyError> {
        Ok(ChainOutcome {
            decision: Decision::Pinned(Pinned {
                identity: "default/db".into(),
                kind: IdentityKind::Custom,
                release: vec![ReleaseCondition::Never],
                may_share: false,
                pools: vec![],
            }),
            decided_by: Some("pin-all".into()),
            steps: Vec::new(),
        })
    }

    fn names(&self) -> Vec<String> {
        vec!["pin-all".into()]
    }
}

fn engine(store: Arc<dyn Store>) -> Arc<Engine> {
    let pool = Pool::new(
        "p",
        &IpPoolSpec {
            subnet: "10.0.0.0/24".into(),
            ips: vec!["10.0.0.1-10.0.0.9".into()],
            ..IpPoolSpec::default()
        },
    )
    .expect("pool");
    let (engine, _thread) = Engine::start(
        Ports {
            store,
            workloads: (Arc::new(NoWorkloads), false),
            policies: Arc::new(PinAll),
        },
        vec![pool],
        Arc::new(Metrics::new()),
    )
    .expect("engine");
    Arc::new(engine)
}

fn req(container: &str, pod: &str) -> CniRequest {
    CniRequest {
        container_id: container.into(),
        ifname: "eth0".into(),
        network: "net".into(),
        cni_version: "1.1.0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), pod.into()),
        ],
        pools: vec!["p".into()],
        ..CniRequest::default()
    }
}

async fn add(e: &Arc<Engine>, container: &str, pod: &str) -> String {
    let r = e.add(req(container, pod)).await.expect("add");
    r.ips[0].address.clone()
}

async fn run(blind: bool) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
    let a = engine(Arc::new(Lagging {
        inner: shared.clone(),
        blind,
    }));
    let b = engine(Arc::new(Lagging {
        inner: shared.clone(),
        blind,
    }));
    // Each searches its own part of the pool, as nodes do.
    a.spread_cursors(1);
    b.spread_cursors(2);
    // On A the identity gets its address; its pod goes (the pin stays, unheld).
    let first = add(&a, "c1", "db-a").await;
    a.del(req("c1", "db-a")).await.expect("del");
    // B, which heard nothing of it, serves the identity's next pod.
    let second = add(&b, "c2", "db-b").await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_daemon_reuses_the_identitys_address() {
    let (first, second) = run(false).await;
    assert_eq!(second, first, "the identity got a second address");
}

/// The check above can fail: a store that cannot list an identity's addresses (`None`, as
/// one with no other writers says) lets the lagging daemon hand out a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_asking_the_store_a_lagging_daemon_gives_a_second_address() {
    let (first, second) = run(true).await;
    assert_ne!(second, first);
}
