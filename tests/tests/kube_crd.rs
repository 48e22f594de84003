//! The CRDs on a real kube-apiserver (v1.20.2): they install and become Established, the
//! seed's pool reads back with the seed's columns (the server renders the printer columns, as
//! `kubectl get ippools` shows them), and an address object is a claim: a second create of
//! one address is refused with 409 AlreadyExists, whatever pool it names.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use tether_core::alloc::{Allocation, Attachment, Holder, Owner};
use tether_e2e::cluster::Cluster;
use tether_kube::crd::{IPAllocation, IPPool, IPPoolSpec, crds};

fn cluster(test: &str) -> Option<Cluster> {
    match Cluster::start(false) {
        Ok(c) => Some(c),
        Err(e) => {
            tether_e2e::skip_or_fail(test, &format!("no test apiserver: {e:#}"));
            None
        }
    }
}

async fn install_crds(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        let name = crd.metadata.name.clone().expect("named");
        api.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|e| panic!("creating CRD {name}: {e}"));
        let mut established = false;
        for _ in 0..100 {
            let got = api.get(&name).await.expect("get CRD");
            established = got
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(established, "CRD {name} never became Established");
    }
}

fn allocation(pool: &str, ip: &str, pod: &str) -> Allocation {
    Allocation {
        pool: pool.into(),
        ip: ip.parse().expect("ip"),
        network: "macvlan-net".into(),
        interface: "eth0".into(),
        owner: Owner::Ephemeral,
        holders: vec![Holder {
            attachment: Attachment {
                container_id: format!("c-{pod}"),
                ifname: "eth0".into(),
                namespace: "default".into(),
                pod: pod.into(),
                pod_uid: format!("uid-{pod}"),
            },
            shared: false,
            node: String::new(),
            since: 1,
        }],
        idle_since: None,
        revision: 0,
    }
}

#[tokio::test]
async fn crds_install_and_the_pool_reads_like_the_seed() {
    let test = "crds_install_and_the_pool_reads_like_the_seed";
    let Some(c) = cluster(test) else { return };
    let client = c.client().await.expect("client");
    install_crds(&client).await;

    // The seed's pool, as its YAML is written for standalone mode.
    let spec: serde_json::Value = yaml_serde::from_str::<serde_json::Value>(tether_e2e::SEED_POOL)
        .expect("seed yaml")["spec"]
        .clone();
    let spec: IPPoolSpec = serde_json::from_value(spec).expect("the standalone spec is the CRD's");
    let pools: Api<IPPool> = Api::all(client.clone());
    pools
        .create(&PostParams::default(), &IPPool::new("test-ippool", spec))
        .await
        .expect("create the pool");

    // What `kubectl get ippools` shows: the server's table for the printer columns.
    let req = http::Request::get("/apis/ipam.tether.dev/v1alpha1/ippools")
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .expect("request");
    let table: serde_json::Value = client.request(req).await.expect("table");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "DEFAULT",
            "AGE"
        ],
        "{table}"
    );
    let row = &table["rows"][0]["cells"];
    assert_eq!(row[0], "test-ippool", "{table}");
    assert_eq!(row[1], "10.6.0.0/16", "{table}");
}

#[tokio::test]
async fn an_address_object_is_a_claim() {
    let test = "an_address_object_is_a_claim";
    let Some(c) = cluster(test) else { return };
    let client = c.client().await.expect("client");
    install_crds(&client).await;
    let api: Api<IPAllocation> = Api::all(client.clone());
    let first = IPAllocation::from_allocation(&allocation("test-ippool", "10.6.168.101", "a"));
    let made = api
        .create(&PostParams::default(), &first)
        .await
        .expect("the first claim");
    assert_eq!(made.metadata.name.as_deref(), Some("10-6-168-101"));
    let back = made.to_allocation().expect("reads back");
    assert!(back.revision > 0, "the resourceVersion is the revision");
    assert_eq!(
        back,
        Allocation {
            revision: back.revision,
            ..allocation("test-ippool", "10.6.168.101", "a")
        }
    );
    // A second claim of the address, even under another pool name: refused by the server.
    for pool in ["test-ippool", "renamed-pool"] {
        let rival = IPAllocation::from_allocation(&allocation(pool, "10.6.168.101", "b"));
        match api.create(&PostParams::default(), &rival).await {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 409, "{e:?}"),
            other => panic!("a second claim of one address under {pool}: {other:?}"),
        }
    }
}
