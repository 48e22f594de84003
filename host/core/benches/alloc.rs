//! Allocation in huge pools: a /8 (2^24 addresses) with a million in use, packed and
//! fragmented, and a /64 IPv6 pool. One iteration = plan an ADD, apply it, plan the DEL,
//! apply it. scripts/bench.sh reports the medians in docs/benchmarks.md.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tether_core::Decision;
use tether_core::alloc::{AddRequest, Allocation, Attachment, Holder, Ipam, Owner};
use tether_core::net::{Family, from_u128};
use tether_core::pool::{IpPoolSpec, Pool};

fn pool(subnet: &str) -> Pool {
    Pool::new(
        "big",
        &IpPoolSpec {
            subnet: subnet.into(),
            ..IpPoolSpec::default()
        },
    )
    .expect("pool")
}

fn allocation(family: Family, n: u128) -> Allocation {
    Allocation {
        pool: "big".into(),
        ip: from_u128(family, n),
        network: "net".into(),
        interface: "eth0".into(),
        owner: Owner::Ephemeral,
        holders: vec![Holder {
            attachment: Attachment {
                container_id: format!("c{n}"),
                ifname: "eth0".into(),
                namespace: String::new(),
                pod: String::new(),
                pod_uid: String::new(),
            },
            shared: false,
            node: String::new(),
            since: 0,
        }],
        idle_since: None,
        revision: 0,
    }
}

/// A pool with `used` addresses allocated, every `stride`-th address from the start.
fn ipam(subnet: &str, used: u128, stride: u128) -> Ipam {
    let p = pool(subnet);
    let first = p.ranges[0].0;
    let fam = p.family();
    let allocs = (0..used)
        .map(|i| allocation(fam, first + i * stride))
        .collect();
    Ipam::new(vec![p], allocs).expect("one pool")
}

fn add_del(ipam: &mut Ipam) {
    let d = Decision::Ephemeral;
    let req = AddRequest {
        attachment: Attachment {
            container_id: "bench".into(),
            ifname: "eth0".into(),
            namespace: String::new(),
            pod: String::new(),
            pod_uid: String::new(),
        },
        network: "net".into(),
        decision: &d,
        pools: vec!["big".into()],
        requested: vec![],
        node: String::new(),
        now: 0,
    };
    let plan = ipam
        .plan_add(black_box(&req), &|_| tether_core::alloc::Liveness::Live)
        .expect("free address");
    ipam.apply(&plan.changes);
    let del = ipam.plan_del("bench", "eth0", 0);
    ipam.apply(&del.changes);
}

fn huge_pools(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocate");
    let mut packed = ipam("10.0.0.0/8", 1_000_000, 1);
    g.bench_function("v4-slash8-1M-used-packed", |b| {
        b.iter(|| add_del(&mut packed))
    });
    let mut fragmented = ipam("10.0.0.0/8", 1_000_000, 2);
    g.bench_function("v4-slash8-1M-used-fragmented", |b| {
        b.iter(|| add_del(&mut fragmented))
    });
    let mut v6 = ipam("fd00::/64", 1_000_000, 3);
    g.bench_function("v6-slash64-1M-used-fragmented", |b| {
        b.iter(|| add_del(&mut v6))
    });
    let mut small = ipam("10.6.0.0/24", 100, 1);
    g.bench_function("v4-slash24-100-used", |b| b.iter(|| add_del(&mut small)));
    g.finish();
}

criterion_group!(benches, huge_pools);
criterion_main!(benches);
