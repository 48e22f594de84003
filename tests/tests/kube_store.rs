//! The Kubernetes store against the store contract, on a real kube-apiserver (v1.20.2): the
//! same functions the embedded store's tests call. One control plane for all of them; the
//! address objects are removed between functions (each expects an empty store).

use std::sync::Arc;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tether_core::alloc::Change;
use tether_e2e::cluster::TestCluster;
use tether_kube::crd::{IPAllocation, crds};
use tether_kube::store::KubeStore;
use tether_store::{Event, Store, contract};

/// One function of the contract suite.
type ContractFn = fn(&dyn Store);

#[test]
fn the_kubernetes_store_keeps_the_store_contract() {
    let test = "the_kubernetes_store_keeps_the_store_contract";
    let Some((cluster, rt, client)) = TestCluster::bare(test, false) else {
        return;
    };
    rt.block_on(async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crds() {
            api.create(&PostParams::default(), &crd).await.expect("CRD");
        }
        // Established takes a moment: wait until the address objects can be listed.
        let objects: Api<IPAllocation> = Api::all(client.clone());
        for _ in 0..100 {
            if objects.list(&ListParams::default()).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the IPAllocation CRD never served");
    });
    let fresh = || {
        rt.block_on(async {
            let objects: Api<IPAllocation> = Api::all(client.clone());
            objects
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
                .expect("clear the address objects");
        });
        Arc::new(KubeStore::new(client.clone(), rt.handle().clone()))
    };
    let steps: [(&str, ContractFn); 7] = [
        ("starts_empty", contract::starts_empty),
        ("commit_round_trips", contract::commit_round_trips),
        ("create_is_a_claim", contract::create_is_a_claim),
        (
            "claims_are_per_address_across_pools",
            contract::claims_are_per_address_across_pools,
        ),
        (
            "stale_revisions_conflict",
            contract::stale_revisions_conflict,
        ),
        (
            "groups_are_atomic_and_independent",
            contract::groups_are_atomic_and_independent,
        ),
        (
            "refiles_are_conditional_and_undone",
            contract::refiles_are_conditional_and_undone,
        ),
    ];
    for (name, step) in steps {
        eprintln!("contract: {name}");
        step(&*fresh());
    }
    eprintln!("contract: racing_claims_one_wins");
    contract::racing_claims_one_wins(fresh());
    eprintln!("contract: subscribers_see_applied_changes");
    contract::subscribers_see_applied_changes(&*fresh());

    // An object this version cannot read (a newer version's owner kind, a hand-made object)
    // neither stops the store from loading nor frees its address: it is reserved.
    let store = fresh();
    let bad: IPAllocation = serde_json::from_value(serde_json::json!({
        "apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPAllocation",
        "metadata": {"name": "10-6-168-105"},
        "spec": {"pool": "test-ippool", "address": "10.6.168.105", "network": "net",
                 "interface": "eth0", "owner": {"kind": "FromTheFuture", "name": "ns/x"}}
    }))
    .expect("object");
    rt.block_on(Api::<IPAllocation>::all(client.clone()).create(&PostParams::default(), &bad))
        .expect("create");
    let snap = store
        .snapshot()
        .expect("an unreadable object does not stop the load");
    assert_eq!(snap.allocations.len(), 1, "{:?}", snap.allocations);
    let a = &snap.allocations[0];
    assert_eq!(a.ip.to_string(), "10.6.168.105");
    assert!(a.holders.is_empty());
    match &a.owner {
        tether_core::alloc::Owner::Pinned {
            identity, release, ..
        } => {
            assert!(
                identity.contains("unreadable IPAllocation 10-6-168-105"),
                "{identity}"
            );
            assert_eq!(release, &[tether_core::ReleaseCondition::Never]);
        }
        other => panic!("not reserved: {other:?}"),
    }
    assert_eq!(store.get(a.ip).expect("get").len(), 1);

    // An identity's addresses are found by their label, for a daemon whose watch lags.
    let store = fresh();
    let pinned = |ip: &str, identity: &str| tether_core::alloc::Allocation {
        pool: "test-ippool".into(),
        ip: ip.parse().expect("ip"),
        network: "net".into(),
        interface: "eth0".into(),
        owner: tether_core::alloc::Owner::Pinned {
            identity: identity.into(),
            kind: tether_core::IdentityKind::VirtualMachine,
            release: vec![tether_core::ReleaseCondition::Never],
        },
        holders: Vec::new(),
        idle_since: None,
        revision: 0,
    };
    let outcomes = store
        .commit(&[
            vec![tether_core::alloc::Change::Put(pinned(
                "10.6.168.101",
                "default/vm-a",
            ))],
            vec![tether_core::alloc::Change::Put(pinned(
                "10.6.168.102",
                "default/vm-b",
            ))],
        ])
        .expect("commit");
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let found = store
        .pinned_to(tether_core::IdentityKind::VirtualMachine, "default/vm-a")
        .expect("list")
        .expect("the Kubernetes store answers");
    assert_eq!(
        found.iter().map(|a| a.ip.to_string()).collect::<Vec<_>>(),
        ["10.6.168.101"]
    );
    assert!(
        store
            .pinned_to(tether_core::IdentityKind::StatefulSetPod, "default/vm-a")
            .expect("list")
            .expect("answers")
            .is_empty(),
        "another kind of the same name is another identity"
    );

    // A re-file (the delete of the record under the old pool name, then its creation under
    // the new one, as the planner writes it when a pool was renamed while a pod holds the
    // address) is one write of one object: it never disappears, so no other daemon can claim
    // the address in between.
    let store = fresh();
    let feed = store.subscribe();
    let uid = |ip: &str| {
        rt.block_on(
            Api::<IPAllocation>::all(client.clone())
                .get(&tether_kube::crd::allocation_name(ip.parse().expect("ip"))),
        )
        .expect("object")
        .metadata
        .uid
        .expect("uid")
    };
    let mut a = pinned("10.6.168.110", "default/vm-c");
    let out = store
        .commit(&[vec![Change::Put(a.clone())]])
        .expect("create");
    a.revision = out[0].clone().expect("created")[0];
    let before = uid("10.6.168.110");
    let mut moved = a.clone();
    moved.pool = "renamed".into();
    moved.revision = 0;
    let out = store
        .commit(&[vec![Change::delete(&a), Change::Put(moved)]])
        .expect("re-file");
    let revs = out[0].clone().expect("re-filed");
    assert_eq!(revs.len(), 2, "one revision per change: {revs:?}");
    assert_eq!(revs[0], 0, "the delete's");
    assert!(revs[1] > a.revision, "{revs:?}");
    let now = store.get(a.ip).expect("get");
    assert_eq!(now.len(), 1);
    assert_eq!(
        (now[0].pool.as_str(), now[0].revision),
        ("renamed", revs[1])
    );
    assert_eq!(
        uid("10.6.168.110"),
        before,
        "the object was deleted and made again"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut events = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(e) = feed.recv_timeout(std::time::Duration::from_millis(100)) {
            events.push(e);
        }
    }
    // The feed may announce the old record's deletion (under the old pool name) before the
    // new one, never the new record's.
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Deleted { pool, .. } if pool == "renamed")),
        "the feed freed the re-filed address: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Put(p) if p.pool == "renamed" && p.revision == revs[1])),
        "the watch never showed the re-filed record: {events:?}"
    );
    drop(cluster);
}
