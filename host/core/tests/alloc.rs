//! The allocator: the seed's scenarios step by step, then random sequences that must never
//! hand one address to two owners nor lose one.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use proptest::prelude::*;
use tether_core::alloc::{
    AddRequest, AllocError, Attachment, Ipam, Liveness, Owner, PoolInputs, PoolSource, select_pools,
};
use tether_core::pool::{IpPoolSpec, Pool};
use tether_core::{Decision, IdentityKind, ObjectKey, Pinned, ReleaseCondition};

fn pool(name: &str, subnet: &str, ips: &[&str]) -> Pool {
    Pool::new(
        name,
        &IpPoolSpec {
            subnet: subnet.into(),
            ips: ips.iter().map(|s| (*s).into()).collect(),
            ..IpPoolSpec::default()
        },
    )
    .expect("valid pool")
}

fn seed_pool() -> Pool {
    pool("test-ippool", "10.6.0.0/16", &["10.6.168.101-10.6.168.110"])
}

fn att(container: &str, pod: &str, uid: &str) -> Attachment {
    Attachment {
        container_id: container.into(),
        ifname: "eth0".into(),
        namespace: "default".into(),
        pod: pod.into(),
        pod_uid: uid.into(),
    }
}

fn vm_key() -> ObjectKey {
    ObjectKey {
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachine".into(),
        namespace: "default".into(),
        name: "vm-cirros".into(),
    }
}

fn vm_decision(may_share: bool) -> Decision {
    Decision::Pinned(Pinned {
        identity: "default/vm-cirros".into(),
        kind: IdentityKind::VirtualMachine,
        release: vec![ReleaseCondition::OwnerDeleted(vm_key())],
        may_share,
        pools: vec![],
    })
}

fn add(
    ipam: &mut Ipam,
    a: Attachment,
    d: &Decision,
    pools: &[&str],
    live: &dyn Fn(&Attachment) -> Liveness,
) -> Result<Vec<IpAddr>, AllocError> {
    let req = AddRequest {
        attachment: a,
        network: "macvlan-net".into(),
        decision: d,
        pools: pools.iter().map(|s| (*s).into()).collect(),
        requested: vec![],
        now: 1000,
    };
    let plan = ipam.plan_add(&req, live)?;
    ipam.apply(&plan.changes);
    ipam.check().expect("invariants hold");
    Ok(plan.assigned.iter().map(|a| a.ip).collect())
}

fn del(ipam: &mut Ipam, container: &str) {
    let plan = ipam.plan_del(container, "eth0", 2000);
    ipam.apply(&plan.changes);
    ipam.check().expect("invariants hold");
}

fn all_live(_: &Attachment) -> Liveness {
    Liveness::Live
}

fn none_live(_: &Attachment) -> Liveness {
    Liveness::Gone
}

#[test]
fn seed_vm_keeps_its_address_through_restart_recreation_and_migration() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let pools = ["test-ippool"];
    let ip = add(
        &mut ipam,
        att("c1", "virt-launcher-vm-cirros-aaaaa", "u1"),
        &vm_decision(false),
        &pools,
        &all_live,
    )
    .expect("first")[0];

    // Pod deleted (DEL), recreated under a new name: same address.
    del(&mut ipam, "c1");
    let a = ipam.get("test-ippool", ip).expect("still pinned");
    assert!(a.holders.is_empty() && a.idle_since == Some(2000));
    let again = add(
        &mut ipam,
        att("c2", "virt-launcher-vm-cirros-bbbbb", "u2"),
        &vm_decision(false),
        &pools,
        &all_live,
    )
    .expect("recreated");
    assert_eq!(again, vec![ip]);

    // Live migration: the target shares the address with the source; the source's DEL keeps it.
    let target = add(
        &mut ipam,
        att("c3", "virt-launcher-vm-cirros-ccccc", "u3"),
        &vm_decision(true),
        &pools,
        &all_live,
    )
    .expect("target");
    assert_eq!(target, vec![ip]);
    assert_eq!(ipam.get("test-ippool", ip).expect("a").holders.len(), 2);
    del(&mut ipam, "c2");
    let a = ipam.get("test-ippool", ip).expect("kept for the target");
    assert_eq!(a.holders.len(), 1);
    assert_eq!(a.holders[0].attachment.container_id, "c3");

    // A release check while a pod still holds it does nothing; after the last DEL it frees.
    let vm_gone =
        |c: &ReleaseCondition| matches!(c, ReleaseCondition::OwnerDeleted(k) if *k == vm_key());
    assert!(ipam.plan_release(3000, &vm_gone).changes.is_empty());
    del(&mut ipam, "c3");
    let nothing_fired = |_: &ReleaseCondition| false;
    assert!(ipam.plan_release(3000, &nothing_fired).changes.is_empty());
    let plan = ipam.plan_release(3000, &vm_gone);
    ipam.apply(&plan.changes);
    ipam.check().expect("invariants");
    assert!(ipam.get("test-ippool", ip).is_none());
    assert_eq!(ipam.usage()[0].allocated, 0);
}

#[test]
fn second_pod_of_an_identity_waits_unless_it_may_share_or_the_holder_is_gone() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let pools = ["test-ippool"];
    let ip = add(
        &mut ipam,
        att("c1", "vm-pod-1", "u1"),
        &vm_decision(false),
        &pools,
        &all_live,
    )
    .expect("first")[0];
    let e = add(
        &mut ipam,
        att("c2", "vm-pod-2", "u2"),
        &vm_decision(false),
        &pools,
        &all_live,
    )
    .expect_err("busy");
    assert!(
        matches!(&e, AllocError::IdentityBusy { holder, .. } if holder.contains("vm-pod-1")),
        "{e}"
    );
    // The first pod is gone without a DEL (crashed node): the newcomer takes over.
    let got = add(
        &mut ipam,
        att("c2", "vm-pod-2", "u2"),
        &vm_decision(false),
        &pools,
        &none_live,
    )
    .expect("takeover");
    assert_eq!(got, vec![ip]);
    assert_eq!(ipam.get("test-ippool", ip).expect("a").holders.len(), 1);
}

#[test]
fn statefulset_pod_recreated_under_the_same_name_takes_over() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let d = Decision::Pinned(Pinned {
        identity: "default/web-0".into(),
        kind: IdentityKind::StatefulSetPod,
        release: vec![ReleaseCondition::Never],
        may_share: false,
        pools: vec![],
    });
    let ip = add(
        &mut ipam,
        att("c1", "web-0", "u1"),
        &d,
        &["test-ippool"],
        &all_live,
    )
    .expect("first")[0];
    // Same name, new UID, old DEL not seen yet: the old incarnation cannot exist any more.
    let got = add(
        &mut ipam,
        att("c2", "web-0", "u2"),
        &d,
        &["test-ippool"],
        &all_live,
    )
    .expect("recreated");
    assert_eq!(got, vec![ip]);
}

#[test]
fn ephemeral_lifecycle_retry_and_exhaustion() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let pools = ["test-ippool"];
    let first = add(
        &mut ipam,
        att("c0", "p0", "u0"),
        &Decision::Ephemeral,
        &pools,
        &all_live,
    )
    .expect("ok");
    // A retried ADD returns what the attachment holds and changes nothing.
    assert_eq!(
        add(
            &mut ipam,
            att("c0", "p0", "u0"),
            &Decision::Ephemeral,
            &pools,
            &all_live
        )
        .expect("retry"),
        first
    );
    for i in 1..10 {
        add(
            &mut ipam,
            att(&format!("c{i}"), &format!("p{i}"), "u"),
            &Decision::Ephemeral,
            &pools,
            &all_live,
        )
        .expect("fits");
    }
    let e = add(
        &mut ipam,
        att("c10", "p10", "u"),
        &Decision::Ephemeral,
        &pools,
        &all_live,
    )
    .expect_err("full");
    assert!(matches!(e, AllocError::PoolExhausted { .. }));
    assert!(e.to_string().contains("exhausted"), "{e}");
    del(&mut ipam, "c3");
    del(&mut ipam, "c3"); // idempotent
    assert!(
        add(
            &mut ipam,
            att("c10", "p10", "u"),
            &Decision::Ephemeral,
            &pools,
            &all_live
        )
        .is_ok()
    );
    assert_eq!(ipam.usage()[0].allocated, 10);
}

#[test]
fn dual_stack_gets_one_address_per_family() {
    let mut ipam = Ipam::new(
        vec![pool("v4", "10.0.0.0/24", &[]), pool("v6", "fd00::/64", &[])],
        vec![],
    )
    .expect("disjoint pools");
    let ips = add(
        &mut ipam,
        att("c1", "p1", "u1"),
        &Decision::Ephemeral,
        &["v4", "v6"],
        &all_live,
    )
    .expect("ok");
    assert_eq!(ips.len(), 2);
    assert!(ips[0].is_ipv4() && ips[1].is_ipv6());
    del(&mut ipam, "c1");
    assert!(ipam.usage().iter().all(|u| u.allocated == 0));
}

#[test]
fn requested_addresses_and_unknown_pools() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let req = |ip: &str, c: &str| AddRequest {
        attachment: att(c, c, c),
        network: "n".into(),
        decision: &Decision::Ephemeral,
        pools: vec!["test-ippool".into()],
        requested: vec![ip.parse().expect("ip")],
        now: 0,
    };
    let plan = ipam
        .plan_add(&req("10.6.168.105", "a"), &all_live)
        .expect("free");
    assert_eq!(plan.assigned[0].ip.to_string(), "10.6.168.105");
    ipam.apply(&plan.changes);
    let e = ipam
        .plan_add(&req("10.6.168.105", "b"), &all_live)
        .expect_err("taken");
    assert!(matches!(e, AllocError::AddressInUse { .. }), "{e}");
    let e = ipam
        .plan_add(&req("10.6.168.200", "b"), &all_live)
        .expect_err("outside");
    assert!(matches!(e, AllocError::AddressNotInPool { .. }), "{e}");
    let e = add(
        &mut ipam,
        att("x", "x", "x"),
        &Decision::Ephemeral,
        &["nope"],
        &all_live,
    )
    .expect_err("unknown");
    assert_eq!(
        e.to_string(),
        "pool \"nope\" does not exist; known pools: test-ippool"
    );
    let e = add(
        &mut ipam,
        att("x", "x", "x"),
        &Decision::Ephemeral,
        &[],
        &all_live,
    )
    .expect_err("none");
    assert!(matches!(e, AllocError::NoPool));
}

#[test]
fn pin_moves_when_the_pod_selects_another_pool() {
    let mut ipam = Ipam::new(vec![seed_pool(), pool("other", "10.7.0.0/24", &[])], vec![])
        .expect("disjoint pools");
    let old = add(
        &mut ipam,
        att("c1", "vm-1", "u1"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("first")[0];
    del(&mut ipam, "c1");
    let new = add(
        &mut ipam,
        att("c2", "vm-2", "u2"),
        &vm_decision(false),
        &["other"],
        &all_live,
    )
    .expect("moved")[0];
    assert_ne!(old, new);
    assert!(
        ipam.get("test-ippool", old).is_none(),
        "the old pinned address is released"
    );
    // Back in a pool that has it: reused while pinned.
    del(&mut ipam, "c2");
    assert_eq!(
        add(
            &mut ipam,
            att("c3", "vm-3", "u3"),
            &vm_decision(false),
            &["other", "test-ippool"],
            &all_live
        )
        .expect("kept")[0],
        new
    );
}

#[test]
fn gc_frees_what_is_not_valid() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    for c in ["a", "b", "c"] {
        add(
            &mut ipam,
            att(c, c, c),
            &Decision::Ephemeral,
            &["test-ippool"],
            &all_live,
        )
        .expect("ok");
    }
    let valid: HashSet<(String, String)> = [("b".to_owned(), "eth0".to_owned())].into();
    let plan = ipam.plan_gc("macvlan-net", &valid, 5);
    assert_eq!(plan.changes.len(), 2);
    ipam.apply(&plan.changes);
    assert_eq!(ipam.usage()[0].allocated, 1);
    assert!(
        ipam.plan_gc("other-net", &HashSet::new(), 5)
            .changes
            .is_empty()
    );
}

#[test]
fn idle_release() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let d = Decision::Pinned(Pinned {
        identity: "default/x".into(),
        kind: IdentityKind::Custom,
        release: vec![ReleaseCondition::IdleForSeconds(60)],
        may_share: false,
        pools: vec![],
    });
    add(
        &mut ipam,
        att("c", "x", "u"),
        &d,
        &["test-ippool"],
        &all_live,
    )
    .expect("ok");
    del(&mut ipam, "c"); // idle since 2000
    let never = |_: &ReleaseCondition| false;
    assert!(ipam.plan_release(2059, &never).changes.is_empty());
    assert_eq!(ipam.plan_release(2060, &never).changes.len(), 1);
}

#[test]
fn release_by_hand_refuses_held_addresses_unless_forced() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let vm = add(
        &mut ipam,
        att("c1", "virt-launcher-a", "u1"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("vm")[0];
    let pod = add(
        &mut ipam,
        att("c2", "cart", "u2"),
        &Decision::Ephemeral,
        &["test-ippool"],
        &all_live,
    )
    .expect("pod")[0];
    let unused: IpAddr = "10.6.168.110".parse().expect("ip");
    assert_eq!(
        ipam.plan_free("test-ippool", unused, false).err(),
        Some(AllocError::NotAllocated {
            pool: "test-ippool".into(),
            ip: unused
        })
    );
    assert_eq!(
        ipam.plan_free("other", vm, true).err(),
        Some(AllocError::NotAllocated {
            pool: "other".into(),
            ip: vm
        })
    );
    // Held: refused, naming the holder; forced: freed.
    match ipam.plan_free("test-ippool", pod, false) {
        Err(AllocError::StillHeld { ip, holder }) => {
            assert_eq!(ip, pod);
            assert!(holder.contains("default/cart"), "{holder}");
        }
        other => panic!("expected StillHeld, got {other:?}"),
    }
    let plan = ipam.plan_free("test-ippool", pod, true).expect("forced");
    ipam.apply(&plan.changes);
    ipam.check().expect("invariants hold");
    assert!(ipam.held_by("c2", "eth0").is_empty());
    // The VM's pin after its pod is gone: no holder, so no force needed; the address is free
    // again and the next pod of the VM gets a fresh one.
    del(&mut ipam, "c1");
    assert!(
        ipam.get("test-ippool", vm).is_some(),
        "the pin outlives the pod"
    );
    let plan = ipam
        .plan_free("test-ippool", vm, false)
        .expect("unheld pin");
    ipam.apply(&plan.changes);
    ipam.check().expect("invariants hold");
    assert!(ipam.get("test-ippool", vm).is_none());
    let usage = ipam.usage();
    assert_eq!(usage[0].allocated, 0);
}

#[test]
fn pool_selection_order() {
    let pod = vec![("ipam.tether.dev/ippool".to_owned(), "a, b".to_owned())];
    let ns = vec![("ipam.tether.dev/default-ippool".to_owned(), "n".to_owned())];
    let hints = vec!["h".to_owned()];
    let cni = vec!["c".to_owned()];
    let defaults = vec!["d".to_owned()];
    let mut i = PoolInputs {
        pod_annotations: &pod,
        ifname: "eth0",
        policy_hints: &hints,
        namespace_annotations: &ns,
        cni_pools: &cni,
        cluster_defaults: &defaults,
    };
    assert_eq!(
        select_pools(&i),
        Ok((vec!["a".into(), "b".into()], PoolSource::PodAnnotation))
    );
    i.pod_annotations = &[];
    assert_eq!(select_pools(&i), Ok((hints.clone(), PoolSource::Policy)));
    i.policy_hints = &[];
    assert_eq!(
        select_pools(&i),
        Ok((vec!["n".into()], PoolSource::NamespaceAnnotation))
    );
    i.namespace_annotations = &[];
    assert_eq!(select_pools(&i), Ok((cni.clone(), PoolSource::CniConfig)));
    i.cni_pools = &[];
    assert_eq!(
        select_pools(&i),
        Ok((defaults.clone(), PoolSource::ClusterDefault))
    );
    i.cluster_defaults = &[];
    assert_eq!(select_pools(&i), Err(AllocError::NoPool));

    let per_if = vec![
        (
            "ipam.tether.dev/ippools".to_owned(),
            r#"[{"interface": "net1", "pools": ["x"]}]"#.to_owned(),
        ),
        ("ipam.tether.dev/ippool".to_owned(), "y".to_owned()),
    ];
    i.pod_annotations = &per_if;
    i.ifname = "net1";
    assert_eq!(
        select_pools(&i),
        Ok((vec!["x".into()], PoolSource::PodAnnotation))
    );
    i.ifname = "eth0";
    assert_eq!(
        select_pools(&i),
        Ok((vec!["y".into()], PoolSource::PodAnnotation))
    );
    let bad = vec![("ipam.tether.dev/ippools".to_owned(), "not json".to_owned())];
    i.pod_annotations = &bad;
    assert!(matches!(
        select_pools(&i),
        Err(AllocError::BadAnnotation { .. })
    ));
}

#[test]
fn rebuilt_state_matches_and_orphans_are_kept() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    for c in ["a", "b"] {
        add(
            &mut ipam,
            att(c, c, c),
            &Decision::Ephemeral,
            &["test-ippool"],
            &all_live,
        )
        .expect("ok");
    }
    let allocs: Vec<_> = ipam.allocations().cloned().collect();
    let rebuilt = Ipam::new(vec![seed_pool()], allocs.clone()).expect("disjoint pools");
    rebuilt.check().expect("invariants");
    assert_eq!(rebuilt.usage(), ipam.usage());
    // The pool shrinks under an allocation: the allocation is kept and reported.
    let shrunk = Ipam::new(
        vec![pool("test-ippool", "10.6.0.0/16", &["10.6.168.110"])],
        allocs,
    )
    .expect("disjoint pools");
    shrunk.check().expect("invariants");
    assert_eq!(shrunk.orphans().len(), 2);
}

// ---- random sequences ----

// ---- Defects found in review (issue 7): each test failed before its fix. ----

/// Defect 1: two pools whose ranges overlap would both hand out the shared addresses.
#[test]
fn overlapping_pools_are_refused_naming_both_and_the_overlap() {
    let a = pool("a", "10.9.0.0/24", &["10.9.0.10"]);
    let b = pool("b", "10.9.0.0/24", &["10.9.0.10-10.9.0.11"]);
    let err = Ipam::new(vec![a.clone(), b.clone()], vec![]).expect_err("overlap refused");
    let msg = err.to_string();
    assert!(
        msg.contains("pools a and b overlap at 10.9.0.10-10.9.0.10"),
        "{msg}"
    );
    // A reload that brings an overlap keeps the pools in force.
    let mut ipam = Ipam::new(vec![a.clone()], vec![]).expect("one pool");
    assert!(ipam.set_pools(vec![a.clone(), b]).is_err());
    assert_eq!(ipam.pool_names(), vec!["a".to_owned()]);
    // Same subnet, disjoint ranges: fine. Other family, same numbers: fine.
    let c = pool("c", "10.9.0.0/24", &["10.9.0.12-10.9.0.20"]);
    let v6 = pool("v6", "::/96", &["::a09:a-::a09:b"]);
    Ipam::new(vec![a, c, v6], vec![]).expect("disjoint pools are fine");
    // Nested ranges (one inside another's span) are caught too, not only neighbours.
    let wide = pool("wide", "10.8.0.0/24", &["10.8.0.1-10.8.0.100"]);
    let inner = pool("inner", "10.8.0.0/24", &["10.8.0.50"]);
    let tail = pool("tail", "10.8.0.0/24", &["10.8.0.60-10.8.0.70"]);
    let err = Ipam::new(vec![inner, wide, tail], vec![]).expect_err("nested overlap");
    assert!(err.to_string().contains("overlap"), "{err}");
}

/// Defect 2: a pool renamed in its file (same range) handed out an address still held under
/// the old name.
#[test]
fn renamed_pool_keeps_addresses_held_under_the_old_name() {
    let old = pool("old", "10.9.0.0/24", &["10.9.0.10-10.9.0.11"]);
    let new = pool("new", "10.9.0.0/24", &["10.9.0.10-10.9.0.11"]);
    let mut ipam = Ipam::new(vec![old], vec![]).expect("pool");
    let first = add(
        &mut ipam,
        att("c1", "p1", "u1"),
        &Decision::Ephemeral,
        &["old"],
        &all_live,
    )
    .expect("add");
    let vm = add(
        &mut ipam,
        att("c2", "vm-pod", "u2"),
        &vm_decision(false),
        &["old"],
        &all_live,
    )
    .expect("pinned add");
    ipam.set_pools(vec![new.clone()]).expect("rename");
    ipam.check().expect("invariants after rename");
    // Both addresses stay reserved: the renamed pool is full.
    assert_eq!(ipam.usage()[0].allocated, 2);
    assert_eq!(
        ipam.orphans().len(),
        2,
        "held under a pool name no longer in force"
    );
    let err = add(
        &mut ipam,
        att("c3", "p3", "u3"),
        &Decision::Ephemeral,
        &["new"],
        &all_live,
    )
    .expect_err("nothing free");
    assert!(matches!(err, AllocError::PoolExhausted { .. }), "{err}");
    // The same happens when the state is rebuilt from the store (a restart).
    let allocs: Vec<_> = ipam.allocations().cloned().collect();
    let rebuilt = Ipam::new(vec![new.clone()], allocs).expect("rebuild");
    rebuilt.check().expect("invariants after rebuild");
    assert_eq!(rebuilt.usage()[0].allocated, 2);
    // The VM's pod comes back selecting the renamed pool: same address, re-filed under it.
    del(&mut ipam, "c2");
    let again = add(
        &mut ipam,
        att("c4", "vm-pod-2", "u4"),
        &vm_decision(false),
        &["new"],
        &all_live,
    )
    .expect("pinned re-add");
    assert_eq!(again, vm);
    assert_eq!(ipam.get("new", vm[0]).map(|a| a.pool.as_str()), Some("new"));
    assert!(ipam.get("old", vm[0]).is_none());
    // Releasing the old-name allocation frees its address in the new pool.
    del(&mut ipam, "c1");
    let next = add(
        &mut ipam,
        att("c5", "p5", "u5"),
        &Decision::Ephemeral,
        &["new"],
        &all_live,
    )
    .expect("freed address is reusable");
    assert_eq!(next, first);
}

/// Defect 3: GC when both pods of a live migration are gone left one stale holder, so the VM's
/// address never went idle and was never released.
#[test]
fn gc_drops_every_stale_holder_of_a_migrating_vm() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("pool");
    let ip = add(
        &mut ipam,
        att("src", "launcher-a", "ua"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("source");
    let ip2 = add(
        &mut ipam,
        att("dst", "launcher-b", "ub"),
        &vm_decision(true),
        &["test-ippool"],
        &all_live,
    )
    .expect("migration target shares");
    assert_eq!(ip, ip2);
    let plan = ipam.plan_gc("macvlan-net", &HashSet::new(), 5000);
    ipam.apply(&plan.changes);
    ipam.check().expect("invariants");
    let a = ipam.get("test-ippool", ip[0]).expect("pin kept");
    assert!(a.holders.is_empty(), "stale holders left: {:?}", a.holders);
    assert_eq!(a.idle_since, Some(5000));
    // Now the VM's deletion releases it.
    let plan = ipam.plan_release(6000, &|c| matches!(c, ReleaseCondition::OwnerDeleted(_)));
    assert_eq!(
        plan.changes.len(),
        1,
        "released once idle and its VM is gone"
    );
}

/// Defect 5: a StatefulSet pod named like a stopped VM (same namespace) took the VM's pinned
/// address and overwrote its release rule.
#[test]
fn identities_of_different_kinds_never_share_a_pin() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("pool");
    let vm = add(
        &mut ipam,
        att("vm", "virt-launcher-db-0", "u1"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("vm");
    del(&mut ipam, "vm"); // the VM is stopped: its pin is idle
    let sts = Decision::Pinned(Pinned {
        identity: "default/vm-cirros".into(), // same key text as the VM's identity
        kind: IdentityKind::StatefulSetPod,
        release: vec![ReleaseCondition::Never],
        may_share: false,
        pools: vec![],
    });
    let pod = add(
        &mut ipam,
        att("sts", "vm-cirros", "u2"),
        &sts,
        &["test-ippool"],
        &all_live,
    )
    .expect("sts pod");
    assert_ne!(pod, vm, "the StatefulSet pod took the VM's address");
    let kept = ipam.get("test-ippool", vm[0]).expect("VM pin kept");
    match &kept.owner {
        Owner::Pinned { kind, release, .. } => {
            assert_eq!(*kind, IdentityKind::VirtualMachine);
            assert_eq!(release, &vec![ReleaseCondition::OwnerDeleted(vm_key())]);
        }
        other => panic!("VM pin became {other:?}"),
    }
    // And the VM comes back to its own address.
    let back = add(
        &mut ipam,
        att("vm2", "virt-launcher-db-0b", "u3"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("vm back");
    assert_eq!(back, vm);
}

/// Defect 6: a holder whose liveness is unknown (its manifest does not parse, a cache not
/// synced) must not be taken over; only a holder known to be gone is.
#[test]
fn only_a_gone_holder_is_taken_over() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("pool");
    let ip = add(
        &mut ipam,
        att("a", "launcher-a", "ua"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("first pod");
    let unknown = |_: &Attachment| Liveness::Unknown;
    let err = add(
        &mut ipam,
        att("b", "launcher-b", "ub"),
        &vm_decision(false),
        &["test-ippool"],
        &unknown,
    )
    .expect_err("unknown holder keeps the address");
    assert!(matches!(err, AllocError::IdentityBusy { .. }), "{err}");
    let got = add(
        &mut ipam,
        att("b", "launcher-b", "ub"),
        &vm_decision(false),
        &["test-ippool"],
        &none_live,
    )
    .expect("gone holder is replaced");
    assert_eq!(got, ip);
    let a = ipam.get("test-ippool", ip[0]).expect("pin");
    assert_eq!(a.holders.len(), 1);
    assert_eq!(a.holders[0].attachment.container_id, "b");
}

#[derive(Debug, Clone)]
enum Op {
    Ephemeral(u8),
    Pinned {
        container: u8,
        identity: u8,
        share: bool,
    },
    Del(u8),
    Release(u8),
    Gc(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12).prop_map(Op::Ephemeral),
        (0u8..12, 0u8..4, any::<bool>()).prop_map(|(container, identity, share)| Op::Pinned {
            container,
            identity,
            share
        }),
        (0u8..12).prop_map(Op::Del),
        (0u8..4).prop_map(Op::Release),
        proptest::collection::vec(0u8..12, 0..6).prop_map(Op::Gc),
    ]
}

fn pinned_as(identity: u8, share: bool) -> Decision {
    Decision::Pinned(Pinned {
        identity: format!("ns/id-{identity}"),
        kind: IdentityKind::Custom,
        release: vec![ReleaseCondition::OwnerDeleted(ObjectKey {
            api_version: "v1".into(),
            kind: "Thing".into(),
            namespace: "ns".into(),
            name: format!("id-{identity}"),
        })],
        may_share: share,
        pools: vec![],
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..80)) {
        let pools = vec![pool("v4", "10.0.0.0/29", &[]), pool("v6", "fd00::/125", &[])];
        let totals: u128 = pools.iter().map(|p| p.total).sum();
        let mut ipam = Ipam::new(pools, vec![]).expect("disjoint pools");
        let names = ["v4", "v6"];
        // Model: which identity owns which address while pinned.
        let mut pins: HashMap<u8, Vec<IpAddr>> = HashMap::new();
        for op in ops {
            match op {
                Op::Ephemeral(c) | Op::Pinned { container: c, .. } => {
                    let d = match op {
                        Op::Pinned { identity, share, .. } => pinned_as(identity, share),
                        _ => Decision::Ephemeral,
                    };
                    let a = att(&format!("c{c}"), &format!("p{c}"), &format!("u{c}"));
                    let req = AddRequest { attachment: a, network: "n".into(), decision: &d, pools: names.iter().map(|s| (*s).into()).collect(), requested: vec![], now: 1 };
                    let retried = !ipam.held_by(&format!("c{c}"), "eth0").is_empty();
                    match ipam.plan_add(&req, &all_live) {
                        Ok(plan) => {
                            // Every fresh address handed out was free: nobody else owns it.
                            for ch in &plan.changes {
                                if let tether_core::alloc::Change::Put(new) = ch
                                    && let Some(old) = ipam.get(&new.pool, new.ip)
                                {
                                    prop_assert_eq!(old.identity(), new.identity(), "address {} changed owner", new.ip);
                                    prop_assert!(new.identity().is_some(), "ephemeral {} handed out twice", new.ip);
                                }
                            }
                            ipam.apply(&plan.changes);
                            if let (Op::Pinned { identity, .. }, false) = (&op, retried) {
                                let ips: Vec<IpAddr> = plan.assigned.iter().map(|a| a.ip).collect();
                                if let Some(known) = pins.get(identity) {
                                    prop_assert_eq!(known, &ips, "identity {} changed address", identity);
                                }
                                pins.insert(*identity, ips);
                            }
                        }
                        Err(AllocError::IdentityBusy { .. } | AllocError::PoolExhausted { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Del(c) => {
                    let plan = ipam.plan_del(&format!("c{c}"), "eth0", 2);
                    ipam.apply(&plan.changes);
                }
                Op::Release(i) => {
                    let name = format!("id-{i}");
                    let plan = ipam.plan_release(3, &|c| matches!(c, ReleaseCondition::OwnerDeleted(k) if k.name == name));
                    let freed = !plan.changes.is_empty();
                    ipam.apply(&plan.changes);
                    if freed {
                        pins.remove(&i);
                    }
                }
                Op::Gc(valid) => {
                    let valid: HashSet<(String, String)> = valid.iter().map(|c| (format!("c{c}"), "eth0".to_owned())).collect();
                    let plan = ipam.plan_gc("n", &valid, 4);
                    ipam.apply(&plan.changes);
                }
            }
            prop_assert_eq!(ipam.check(), Ok(()));
            // One address, one owner: no two allocations of different identities share an IP
            // (the map key makes it structural), and every pinned identity has one address per family.
            let mut per_identity: HashMap<String, HashSet<IpAddr>> = HashMap::new();
            for a in ipam.allocations() {
                if let Owner::Pinned { identity, .. } = &a.owner {
                    prop_assert!(per_identity.entry(identity.clone()).or_default().insert(a.ip));
                }
            }
            for ips in per_identity.values() {
                prop_assert!(ips.iter().filter(|i| i.is_ipv4()).count() <= 1);
                prop_assert!(ips.iter().filter(|i| i.is_ipv6()).count() <= 1);
            }
        }
        // Nothing is lost: DEL everything, release every identity, and every address is free.
        for c in 0..12u8 {
            let plan = ipam.plan_del(&format!("c{c}"), "eth0", 9);
            ipam.apply(&plan.changes);
        }
        let plan = ipam.plan_release(10, &|_| true);
        ipam.apply(&plan.changes);
        prop_assert_eq!(ipam.check(), Ok(()));
        prop_assert_eq!(ipam.allocations().count(), 0);
        prop_assert_eq!(ipam.usage().iter().map(|u| u.total - u.allocated).sum::<u128>(), totals);
    }
}
