//! The allocator: the seed's scenarios step by step, then random sequences that must never
//! hand one address to two owners nor lose one.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use proptest::prelude::*;
use tether_core::alloc::{
    AddRequest, AllocError, Allocation, Attachment, Change, Holder, Ipam, Liveness, Owner,
};
use tether_core::pool::{IpPoolSpec, Pool, PoolError};
use tether_core::select::{PoolInputs, PoolSource, select_pools};
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
        node: String::new(),
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

/// `may-share` is for a live migration: its source and one target. A third live pod of the
/// identity waits, whatever the policy says.
#[test]
fn sharing_stops_at_two_live_holders() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let pools = ["test-ippool"];
    let share = vm_decision(true);
    let ip = add(
        &mut ipam,
        att("c1", "vm-pod-1", "u1"),
        &share,
        &pools,
        &all_live,
    )
    .expect("source")[0];
    let target = add(
        &mut ipam,
        att("c2", "vm-pod-2", "u2"),
        &share,
        &pools,
        &all_live,
    )
    .expect("migration target");
    assert_eq!(target, vec![ip]);
    let e = add(
        &mut ipam,
        att("c3", "vm-pod-3", "u3"),
        &share,
        &pools,
        &all_live,
    )
    .expect_err("a third live pod");
    assert!(matches!(&e, AllocError::IdentityBusy { .. }), "{e}");
    assert_eq!(ipam.get("test-ippool", ip).expect("a").holders.len(), 2);
    // The source is gone: the third pod joins the target.
    let source_gone = |a: &Attachment| {
        if a.pod == "vm-pod-1" {
            Liveness::Gone
        } else {
            Liveness::Live
        }
    };
    let got = add(
        &mut ipam,
        att("c3", "vm-pod-3", "u3"),
        &share,
        &pools,
        &source_gone,
    )
    .expect("after the source went");
    assert_eq!(got, vec![ip]);
    assert_eq!(ipam.get("test-ippool", ip).expect("a").holders.len(), 2);
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
    // Same name, new UID, old DEL not seen yet, and the workload source cannot tell (no
    // source, a cache not synced): the old incarnation cannot exist any more.
    let unknown = |_: &Attachment| Liveness::Unknown;
    let got = add(
        &mut ipam,
        att("c2", "web-0", "u2"),
        &d,
        &["test-ippool"],
        &unknown,
    )
    .expect("recreated");
    assert_eq!(got, vec![ip]);
    // Once more, the source knowing the old UID gone: taken over as well.
    let got = add(
        &mut ipam,
        att("c3", "web-0", "u3"),
        &d,
        &["test-ippool"],
        &none_live,
    )
    .expect("recreated again");
    assert_eq!(got, vec![ip]);
    let a = ipam.get("test-ippool", ip).expect("pin");
    assert_eq!(a.holders.len(), 1);
    assert_eq!(a.holders[0].attachment.container_id, "c3");
}

fn web_0() -> Decision {
    Decision::Pinned(Pinned {
        identity: "default/web-0".into(),
        kind: IdentityKind::StatefulSetPod,
        release: vec![ReleaseCondition::Never],
        may_share: false,
        pools: vec![],
    })
}

/// Defect B: an ADD for a StatefulSet pod's name without a pod UID dropped the live holder
/// of the name's pinned address, and both pods used it. An empty UID is no evidence that
/// the pod was recreated: only a holder known to be gone is taken over.
#[test]
fn add_without_a_uid_never_drops_a_live_holder() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let ip = add(
        &mut ipam,
        att("c1", "web-0", "u1"),
        &web_0(),
        &["test-ippool"],
        &all_live,
    )
    .expect("first")[0];
    let unknown = |_: &Attachment| Liveness::Unknown;
    for (live, what) in [
        (&all_live as &dyn Fn(&Attachment) -> Liveness, "live"),
        (&unknown, "unknown"),
    ] {
        let e = add(
            &mut ipam,
            att("c2", "web-0", ""),
            &web_0(),
            &["test-ippool"],
            live,
        )
        .expect_err("a holder that may be live keeps the address");
        assert!(
            matches!(&e, AllocError::IdentityBusy { holder, .. } if holder.contains("c1")),
            "{what}: {e}"
        );
        let a = ipam.get("test-ippool", ip).expect("pin");
        assert_eq!(a.holders.len(), 1, "{what}: {:?}", a.holders);
        assert_eq!(a.holders[0].attachment.container_id, "c1");
    }
    // The old holder known gone: taken over.
    let got = add(
        &mut ipam,
        att("c2", "web-0", ""),
        &web_0(),
        &["test-ippool"],
        &none_live,
    )
    .expect("gone holder is replaced");
    assert_eq!(got, vec![ip]);
    // A holder without a UID is not replaced by a pod with one either, while it may be live.
    let e = add(
        &mut ipam,
        att("c3", "web-0", "u3"),
        &web_0(),
        &["test-ippool"],
        &all_live,
    )
    .expect_err("busy");
    assert!(matches!(e, AllocError::IdentityBusy { .. }), "{e}");
}

/// Defect B: a pod of the same name with another UID took the address over even when the
/// workload source said the holder's UID is live. Both UIDs set and different is evidence
/// only when the source does not say otherwise.
#[test]
fn recreated_pod_never_takes_over_from_a_holder_the_source_says_is_live() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let ip = add(
        &mut ipam,
        att("c1", "web-0", "u1"),
        &web_0(),
        &["test-ippool"],
        &all_live,
    )
    .expect("first")[0];
    let e = add(
        &mut ipam,
        att("c2", "web-0", "u2"),
        &web_0(),
        &["test-ippool"],
        &all_live,
    )
    .expect_err("the source says u1 is live");
    assert!(
        matches!(&e, AllocError::IdentityBusy { holder, ip: busy, .. } if holder.contains("c1") && *busy == ip),
        "{e}"
    );
    assert!(e.to_string().contains("is held by"), "{e}");
    let a = ipam.get("test-ippool", ip).expect("pin");
    assert_eq!(a.holders.len(), 1);
    assert_eq!(a.holders[0].attachment.container_id, "c1");
    assert!(ipam.held_by("c2", "eth0").is_empty());
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

/// A dual-stack ADD whose commit was cut short (the Kubernetes store wrote the IPv4 object,
/// then the API server stopped answering) leaves the attachment one family. The kubelet's
/// retry must not be answered that alone: it plans the missing family and keeps the other.
#[test]
fn a_retried_add_holding_one_family_of_two_gets_the_other() {
    let mut ipam = Ipam::new(
        vec![pool("v4", "10.0.0.0/24", &[]), pool("v6", "fd00::/64", &[])],
        vec![],
    )
    .expect("disjoint pools");
    let first = add(
        &mut ipam,
        att("c1", "p1", "u1"),
        &Decision::Ephemeral,
        &["v4"],
        &all_live,
    )
    .expect("IPv4 only")[0];
    let retried = add(
        &mut ipam,
        att("c1", "p1", "u1"),
        &Decision::Ephemeral,
        &["v4", "v6"],
        &all_live,
    )
    .expect("retry");
    assert_eq!(retried.len(), 2, "{retried:?}");
    assert_eq!(retried[0], first, "the IPv4 address is kept");
    assert!(retried[1].is_ipv6(), "{retried:?}");
    // Retried again: the same two, nothing new planned.
    let req = AddRequest {
        attachment: att("c1", "p1", "u1"),
        network: "macvlan-net".into(),
        decision: &Decision::Ephemeral,
        pools: vec!["v4".into(), "v6".into()],
        requested: vec![],
        node: String::new(),
        now: 1000,
    };
    let plan = ipam.plan_add(&req, &all_live).expect("plan");
    assert!(plan.changes.is_empty(), "{:?}", plan.changes);
    assert_eq!(
        plan.assigned.iter().map(|a| a.ip).collect::<Vec<_>>(),
        retried
    );
    assert_eq!(ipam.usage().iter().map(|u| u.allocated).sum::<u128>(), 2);
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
        node: String::new(),
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
    let plan = ipam.plan_gc("macvlan-net", &valid, None, 5);
    assert_eq!(plan.changes.len(), 2);
    ipam.apply(&plan.changes);
    assert_eq!(ipam.usage()[0].allocated, 1);
    assert!(
        ipam.plan_gc("other-net", &HashSet::new(), None, 5)
            .changes
            .is_empty()
    );
}

/// With a node, a CNI GC looks only at holders added on that node: a runtime lists only its
/// own attachments, and other nodes' pods must not look stale to it.
#[test]
fn gc_on_one_node_leaves_other_nodes_holders() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    for (c, node) in [
        ("a1", "node-a"),
        ("a2", "node-a"),
        ("b1", "node-b"),
        ("old", ""),
    ] {
        let req = AddRequest {
            attachment: att(c, c, c),
            network: "macvlan-net".into(),
            decision: &Decision::Ephemeral,
            pools: vec!["test-ippool".into()],
            requested: vec![],
            node: node.into(),
            now: 1000,
        };
        let plan = ipam.plan_add(&req, &all_live).expect("add");
        ipam.apply(&plan.changes);
    }
    let valid: HashSet<(String, String)> = [("a2".to_owned(), "eth0".to_owned())].into();
    let plan = ipam.plan_gc("macvlan-net", &valid, Some("node-a"), 5);
    let freed: Vec<String> = plan
        .changes
        .iter()
        .map(|c| match c {
            Change::Delete { ip, .. } => ip.to_string(),
            Change::Put(a) => panic!("kept {a:?}"),
        })
        .collect();
    assert_eq!(freed.len(), 1, "only node-a's stale a1: {freed:?}");
    ipam.apply(&plan.changes);
    assert_eq!(ipam.usage()[0].allocated, 3, "a2, b1 and old stay");
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
        ipam.plan_release_by_hand("test-ippool", unused, false)
            .err(),
        Some(AllocError::NotAllocated {
            pool: "test-ippool".into(),
            ip: unused
        })
    );
    assert_eq!(
        ipam.plan_release_by_hand("other", vm, true).err(),
        Some(AllocError::NotAllocated {
            pool: "other".into(),
            ip: vm
        })
    );
    // Held: refused, naming the holder; forced: freed.
    match ipam.plan_release_by_hand("test-ippool", pod, false) {
        Err(AllocError::StillHeld { ip, holder }) => {
            assert_eq!(ip, pod);
            assert!(holder.contains("default/cart"), "{holder}");
        }
        other => panic!("expected StillHeld, got {other:?}"),
    }
    let plan = ipam
        .plan_release_by_hand("test-ippool", pod, true)
        .expect("forced");
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
        .plan_release_by_hand("test-ippool", vm, false)
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

/// A store written before overlapping pools were refused may hold an address twice: a VM's
/// stopped pin under pool `b` and a running pod under pool `a`. The VM's pod coming back must
/// not be put on the address while the other record stands.
#[test]
fn a_pin_on_an_address_held_twice_by_an_old_store_is_not_handed_out() {
    let a = pool("a", "10.9.0.0/24", &["10.9.0.10-10.9.0.11"]);
    let b = pool("b", "10.9.1.0/24", &["10.9.1.10"]);
    // The old store: the pod under `a` and the VM's idle pin under `b`, one address.
    let mut ipam = Ipam::new(vec![a.clone()], vec![]).expect("pool");
    let vm = add(
        &mut ipam,
        att("c1", "vm-pod", "u1"),
        &vm_decision(false),
        &["a"],
        &all_live,
    )
    .expect("pinned add");
    del(&mut ipam, "c1");
    let mut records: Vec<_> = ipam.allocations().cloned().collect();
    let mut pod = records[0].clone();
    pod.owner = tether_core::alloc::Owner::Ephemeral;
    pod.holders = vec![tether_core::alloc::Holder {
        attachment: att("c9", "other-pod", "u9"),
        shared: false,
        node: String::new(),
        since: 1,
    }];
    pod.idle_since = None;
    records[0].pool = "b".into();
    records.push(pod);
    // `b` now names the VM's record; both pools in force (they do not overlap).
    let mut ipam = Ipam::new(vec![a, b], records).expect("rebuild from the old store");
    let err = add(
        &mut ipam,
        att("c2", "vm-pod-2", "u2"),
        &vm_decision(false),
        &["a"],
        &all_live,
    )
    .expect_err("the address is held by another record");
    assert!(
        matches!(&err, AllocError::AddressInUse { ip, holder } if *ip == vm[0] && holder.contains("other-pod")),
        "{err}"
    );
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
    let plan = ipam.plan_gc("macvlan-net", &HashSet::new(), None, 5000);
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
                    let req = AddRequest { attachment: a, network: "n".into(), decision: &d, pools: names.iter().map(|s| (*s).into()).collect(), requested: vec![], node: String::new(), now: 1 };
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
                    let plan = ipam.plan_gc("n", &valid, None, 4);
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

// ---- Random pool reloads, migrations, identity kinds and liveness (issue 7) ----
//
// A second random walk for the defects of issue 7: pools are renamed, removed, re-added,
// shrunk, grown and reloaded with overlaps; pinned identities of three kinds share one identity
// text and migrate (two holders); a liveness model the steps change answers for every holder.
// After every step the state is checked through the public API against a model the test
// keeps.

const CONTAINERS: u8 = 8;
const POOL_NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const KINDS: [IdentityKind; 3] = [
    IdentityKind::VirtualMachine,
    IdentityKind::StatefulSetPod,
    IdentityKind::Custom,
];
/// The owner kind each identity kind's release rule names.
const OWNER_KINDS: [&str; 3] = ["VirtualMachine", "StatefulSet", "Thing"];
const NETWORKS: [&str; 2] = ["n", "m"];
const LIVENESS: [Liveness; 3] = [Liveness::Live, Liveness::Gone, Liveness::Unknown];
/// The pools of these walks take one range out of 10.0.0.1-10.0.0.LAST.
const LAST: u8 = 16;

/// A pool as the model knows it: a name and one range of 10.0.0.x.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolDef {
    name: String,
    start: u8,
    end: u8,
}

impl PoolDef {
    fn new(name: u8, start: u8, len: u8) -> Self {
        PoolDef {
            name: POOL_NAMES[usize::from(name) % POOL_NAMES.len()].into(),
            start,
            end: start.saturating_add(len.max(1) - 1).min(LAST),
        }
    }

    fn pool(&self) -> Pool {
        pool(
            &self.name,
            "10.0.0.0/24",
            &[&format!("10.0.0.{}-10.0.0.{}", self.start, self.end)],
        )
    }

    fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        (self.start..=self.end).map(|n| IpAddr::from([10, 0, 0, n]))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.addresses().any(|a| a == ip)
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// An ADD, ephemeral or pinned as (identity, kind, may_share), with candidate pools given
    /// as indices into the pools in force (all of them when empty).
    Add {
        container: u8,
        pin: Option<(u8, u8, bool)>,
        network: u8,
        pools: Vec<u8>,
    },
    Del(u8),
    Gc {
        network: u8,
        valid: Vec<u8>,
    },
    /// The owner of (identity, kind) is deleted.
    Release {
        identity: u8,
        kind: u8,
    },
    /// `tetherd release` of one allocation (by index in (pool, ip) order).
    Free {
        pick: u8,
        force: bool,
    },
    SetLiveness {
        container: u8,
        liveness: u8,
    },
    /// A reload with any pools (often overlapping or with a name twice: refused).
    SetPools(Vec<(u8, u8, u8)>),
    Rename {
        pool: u8,
        name: u8,
    },
    Remove(u8),
    /// A pool removed or renamed earlier comes back.
    ReAdd(u8),
    Resize {
        pool: u8,
        start: i8,
        end: i8,
    },
    /// A new pool sharing an address with a pool in force (always refused).
    Overlap {
        pool: u8,
        name: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    use proptest::collection::vec;
    prop_oneof![
        8 => (
            0..CONTAINERS,
            proptest::option::weighted(0.7, (0u8..2, 0u8..3, any::<bool>())),
            prop_oneof![4 => Just(0u8), 1 => Just(1u8)],
            prop_oneof![3 => Just(vec![]), 2 => vec(0u8..5, 1..3)],
        )
            .prop_map(|(container, pin, network, pools)| Step::Add {
                container,
                pin,
                network,
                pools
            }),
        2 => (0..CONTAINERS).prop_map(Step::Del),
        2 => (0u8..2, vec(0..CONTAINERS, 0..4))
            .prop_map(|(network, valid)| Step::Gc { network, valid }),
        1 => (0u8..2, 0u8..3).prop_map(|(identity, kind)| Step::Release { identity, kind }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(pick, force)| Step::Free { pick, force }),
        3 => (0..CONTAINERS, 0u8..3)
            .prop_map(|(container, liveness)| Step::SetLiveness { container, liveness }),
        3 => pool_step(),
    ]
}

/// A live migration: a pod of a pinned identity, then a second one that may share.
fn migration() -> impl Strategy<Value = Vec<Step>> {
    (0..CONTAINERS, 0..CONTAINERS, 0u8..2, 0u8..3).prop_map(|(from, to, identity, kind)| {
        [(from, false), (to, true)]
            .into_iter()
            .map(|(container, share)| Step::Add {
                container,
                pin: Some((identity, kind, share)),
                network: 0,
                pools: vec![],
            })
            .collect()
    })
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let one = prop_oneof![5 => step().prop_map(|s| vec![s]), 1 => migration()];
    proptest::collection::vec(one, 1..70).prop_map(|v| v.into_iter().flatten().collect())
}

/// A reload, about one step in eight: rare enough that pins live to migrate and be collected.
fn pool_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        proptest::collection::vec((0u8..5, 1..=LAST, 1u8..8), 0..4).prop_map(Step::SetPools),
        (0u8..5, 0u8..5).prop_map(|(pool, name)| Step::Rename { pool, name }),
        (0u8..5).prop_map(Step::Remove),
        (0u8..5).prop_map(Step::ReAdd),
        (0u8..5, -3i8..=3, -3i8..=3).prop_map(|(pool, start, end)| Step::Resize {
            pool,
            start,
            end
        }),
        (0u8..5, 0u8..5).prop_map(|(pool, name)| Step::Overlap { pool, name }),
    ]
}

fn pod_of(c: u8) -> Attachment {
    // Five pod names for eight containers: some containers are a recreated pod (same name,
    // other UID), whose old holder gives way unless the source says it is live. The last
    // container asks without a UID (no evidence of anything).
    let uid = if c == CONTAINERS - 1 {
        String::new()
    } else {
        format!("u{c}")
    };
    att(&format!("c{c}"), &format!("p{}", c % 5), &uid)
}

fn identity_text(identity: u8) -> String {
    format!("ns/id-{identity}")
}

fn pinned_kind(identity: u8, kind: u8, share: bool) -> Decision {
    Decision::Pinned(Pinned {
        identity: identity_text(identity),
        kind: KINDS[usize::from(kind)],
        release: vec![ReleaseCondition::OwnerDeleted(ObjectKey {
            api_version: "v1".into(),
            kind: OWNER_KINDS[usize::from(kind)].into(),
            namespace: "ns".into(),
            name: format!("id-{identity}"),
        })],
        may_share: share,
        pools: vec![],
    })
}

fn pin_of(a: &Allocation) -> Option<(&str, IdentityKind)> {
    match &a.owner {
        Owner::Pinned { identity, kind, .. } => Some((identity, *kind)),
        Owner::Ephemeral => None,
    }
}

/// The allocator's rule for a holder that a new pod replaces although it is not known gone:
/// the same attachment, or the same pod name with another UID (both set) while the source
/// does not say the holder is live.
fn stale_for(h: &Attachment, new: &Attachment, liveness: Liveness) -> bool {
    (h.container_id == new.container_id && h.ifname == new.ifname)
        || (!new.pod.is_empty()
            && h.namespace == new.namespace
            && h.pod == new.pod
            && !h.pod_uid.is_empty()
            && !new.pod_uid.is_empty()
            && h.pod_uid != new.pod_uid
            && liveness != Liveness::Live)
}

fn sorted_allocations(ipam: &Ipam) -> Vec<Allocation> {
    let mut v: Vec<Allocation> = ipam.allocations().cloned().collect();
    v.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
    v
}

fn holders_by_ip(ipam: &Ipam) -> HashMap<IpAddr, Vec<Attachment>> {
    ipam.allocations()
        .map(|a| {
            let hs = a.holders.iter().map(|h| h.attachment.clone()).collect();
            (a.ip, hs)
        })
        .collect()
}

/// Whether `ip` is in `pool`'s free set, asked the public way: an ADD requesting it.
fn probe_free(ipam: &Ipam, pool: &str, ip: IpAddr) -> Result<bool, TestCaseError> {
    let req = AddRequest {
        attachment: att("probe", "probe", "probe"),
        network: "probe".into(),
        decision: &Decision::Ephemeral,
        pools: vec![pool.into()],
        requested: vec![ip],
        node: String::new(),
        now: 0,
    };
    match ipam.plan_add(&req, &all_live) {
        Ok(_) => Ok(true),
        Err(AllocError::AddressInUse { .. }) => Ok(false),
        Err(e) => Err(TestCaseError::fail(format!(
            "probing {ip} in pool {pool}: {e}"
        ))),
    }
}

/// What the test knows independently of the allocator.
#[derive(Default)]
struct Model {
    /// The pools in force.
    defs: Vec<PoolDef>,
    /// Pools removed or renamed away, to bring back.
    removed: Vec<PoolDef>,
    /// Liveness per container (Live unless a step said otherwise).
    liveness: HashMap<String, Liveness>,
    /// (identity, kind, network) -> its pinned address.
    pins: HashMap<(u8, u8, u8), IpAddr>,
    /// Container -> the owner and network of its last ADD (what any allocation it holds must be).
    joined: HashMap<String, (Option<(String, IdentityKind)>, String)>,
}

impl Model {
    fn liveness(&self, a: &Attachment) -> Liveness {
        self.liveness
            .get(&a.container_id)
            .copied()
            .unwrap_or(Liveness::Live)
    }
}

/// The invariants that hold after every step, through the public API only.
fn check_state(ipam: &Ipam, m: &Model) -> Result<(), TestCaseError> {
    // The pools in force are the model's.
    let mut want: Vec<(String, Vec<(u128, u128)>)> = m
        .defs
        .iter()
        .map(|d| (d.name.clone(), d.pool().ranges))
        .collect();
    want.sort();
    let have: Vec<(String, Vec<(u128, u128)>)> = ipam
        .pools()
        .map(|p| (p.name.clone(), p.ranges.clone()))
        .collect();
    prop_assert_eq!(have, want, "pools in force");
    // No address in two pools (so in two pools' free sets).
    for n in 1..=LAST {
        let ip = IpAddr::from([10, 0, 0, n]);
        let pools: Vec<&str> = ipam
            .pools()
            .filter(|p| p.contains(ip))
            .map(|p| p.name.as_str())
            .collect();
        prop_assert!(pools.len() <= 1, "{} is in pools {:?}", ip, pools);
    }
    // No address in two allocations, under any pool name.
    let allocs = sorted_allocations(ipam);
    let mut by_ip: HashMap<IpAddr, &Allocation> = HashMap::new();
    for a in &allocs {
        if let Some(other) = by_ip.insert(a.ip, a) {
            prop_assert!(
                false,
                "{} is in two allocations: {:?} and {:?}",
                a.ip,
                other,
                a
            );
        }
    }
    // Every address of a pool is free xor allocated (under whatever pool name), and usage
    // counts exactly the allocations the pool covers.
    let usage = ipam.usage();
    for p in ipam.pools() {
        let def = m
            .defs
            .iter()
            .find(|d| d.name == p.name)
            .expect("pool in the model");
        for ip in def.addresses() {
            let free = probe_free(ipam, &p.name, ip)?;
            let held = by_ip.get(&ip);
            prop_assert!(
                free != held.is_some(),
                "{} in pool {}: free {}, allocated {:?}",
                ip,
                p.name,
                free,
                held
            );
        }
        let covered = allocs.iter().filter(|a| p.contains(a.ip)).count() as u128;
        let used = usage
            .iter()
            .find(|u| u.name == p.name)
            .expect("usage of every pool");
        prop_assert_eq!(used.allocated, covered, "usage of pool {}", &p.name);
    }
    // Orphans: exactly the allocations whose pool name no longer covers their address; each
    // allocation is counted once, in its covering pool's usage or as uncovered.
    let mut orphans: Vec<(String, IpAddr)> = ipam
        .orphans()
        .iter()
        .map(|a| (a.pool.clone(), a.ip))
        .collect();
    orphans.sort();
    let want: Vec<(String, IpAddr)> = allocs
        .iter()
        .filter(|a| !m.defs.iter().any(|d| d.name == a.pool && d.contains(a.ip)))
        .map(|a| (a.pool.clone(), a.ip))
        .collect();
    prop_assert_eq!(orphans, want, "orphans");
    let uncovered = allocs
        .iter()
        .filter(|a| !m.defs.iter().any(|d| d.contains(a.ip)))
        .count() as u128;
    prop_assert_eq!(
        usage.iter().map(|u| u.allocated).sum::<u128>() + uncovered,
        allocs.len() as u128,
        "allocations counted once"
    );
    // Every holder joined as the allocation's owner on its network: pods of different
    // identities, or of one identity text under different kinds, never share an address.
    for a in &allocs {
        for h in &a.holders {
            let joined = m.joined.get(&h.attachment.container_id);
            let owner = pin_of(a).map(|(i, k)| (i.to_owned(), k));
            prop_assert_eq!(
                joined,
                Some(&(owner, a.network.clone())),
                "{} holds {} as another owner or network: {:?}",
                h.attachment.describe(),
                a.ip,
                a
            );
        }
    }
    // Pins are the model's: every (identity, kind, network) keeps its address, owned by it, and
    // no other pinned allocation exists.
    for (&(i, k, n), ip) in &m.pins {
        let a = by_ip.get(ip);
        let owner = a.and_then(|a| pin_of(a));
        let text = identity_text(i);
        prop_assert_eq!(
            owner,
            Some((text.as_str(), KINDS[usize::from(k)])),
            "pin of {} ({:?}) on {}: {} is now {:?}",
            identity_text(i),
            KINDS[usize::from(k)],
            NETWORKS[usize::from(n)],
            ip,
            a
        );
        prop_assert_eq!(
            a.map(|a| a.network.as_str()),
            Some(NETWORKS[usize::from(n)]),
            "network of the pin at {}",
            ip
        );
    }
    let pinned = allocs.iter().filter(|a| pin_of(a).is_some()).count();
    prop_assert_eq!(
        pinned,
        m.pins.len(),
        "pinned allocations the model does not know"
    );
    prop_assert_eq!(ipam.check(), Ok(()), "the allocator's own invariants");
    Ok(())
}

/// A reload: accepted exactly when names are unique and ranges disjoint; a refused one leaves
/// every pool and allocation as it was.
fn reload(ipam: &mut Ipam, m: &mut Model, defs: Vec<PoolDef>) -> Result<(), TestCaseError> {
    let unique = defs
        .iter()
        .enumerate()
        .all(|(i, d)| defs[..i].iter().all(|e| e.name != d.name));
    let disjoint = defs
        .iter()
        .enumerate()
        .all(|(i, d)| defs[..i].iter().all(|e| e.end < d.start || d.end < e.start));
    let snapshot = |ipam: &Ipam| {
        let pools: Vec<(String, Vec<(u128, u128)>)> = ipam
            .pools()
            .map(|p| (p.name.clone(), p.ranges.clone()))
            .collect();
        (pools, ipam.usage(), sorted_allocations(ipam))
    };
    let before = snapshot(ipam);
    let res = ipam.set_pools(defs.iter().map(PoolDef::pool).collect());
    if unique && disjoint {
        prop_assert!(res.is_ok(), "{:?} refused: {:?}", defs, res);
        for d in &m.defs {
            if !defs.contains(d) && !m.removed.contains(d) {
                m.removed.push(d.clone());
            }
        }
        m.defs = defs;
    } else {
        prop_assert!(
            matches!(
                res,
                Err(PoolError::Overlap { .. } | PoolError::Duplicate(_))
            ),
            "{:?} (unique names {}, disjoint {}) gave {:?}",
            defs,
            unique,
            disjoint,
            res
        );
        prop_assert!(
            before == snapshot(ipam),
            "a refused reload changed the state"
        );
    }
    Ok(())
}

fn walk_reloads_and_migrations(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut m = Model {
        defs: vec![PoolDef::new(0, 1, 6), PoolDef::new(1, 7, 6)],
        removed: vec![PoolDef::new(2, 13, 4)],
        ..Model::default()
    };
    let mut ipam =
        Ipam::new(m.defs.iter().map(PoolDef::pool).collect(), vec![]).expect("disjoint pools");
    for (now, step) in (10u64..).zip(steps) {
        let pick = |i: u8, len: usize| usize::from(i) % len.max(1);
        match step {
            Step::Add {
                container,
                pin,
                network,
                pools,
            } => {
                let attachment = pod_of(container);
                let cid = attachment.container_id.clone();
                let net = NETWORKS[usize::from(network)];
                let decision = match pin {
                    Some((i, k, share)) => pinned_kind(i, k, share),
                    None => Decision::Ephemeral,
                };
                let names: Vec<String> = if pools.is_empty() {
                    m.defs.iter().map(|d| d.name.clone()).collect()
                } else {
                    pools
                        .iter()
                        .filter(|_| !m.defs.is_empty())
                        .map(|&i| m.defs[pick(i, m.defs.len())].name.clone())
                        .fold(Vec::new(), |mut v, n| {
                            if !v.contains(&n) {
                                v.push(n);
                            }
                            v
                        })
                };
                let req = AddRequest {
                    attachment: attachment.clone(),
                    network: net.into(),
                    decision: &decision,
                    pools: names.clone(),
                    requested: vec![],
                    node: String::new(),
                    now,
                };
                let retried = !ipam.held_by(&cid, "eth0").is_empty();
                let before = holders_by_ip(&ipam);
                let liveness = |a: &Attachment| m.liveness(a);
                match ipam.plan_add(&req, &liveness) {
                    Ok(plan) if retried => {
                        prop_assert!(plan.changes.is_empty(), "a retried ADD changed {:?}", plan);
                    }
                    Ok(plan) => {
                        // A fresh address was free: only its own pin is ever rewritten.
                        for ch in &plan.changes {
                            if let Change::Put(new) = ch {
                                for old in ipam.allocations().filter(|a| a.ip == new.ip) {
                                    prop_assert!(
                                        pin_of(new).is_some() && pin_of(old) == pin_of(new),
                                        "{} changed owner: {:?} -> {:?}",
                                        new.ip,
                                        old,
                                        new
                                    );
                                }
                            }
                        }
                        ipam.apply(&plan.changes);
                        // Only a gone or stale holder loses its address to another pod's ADD.
                        let after = holders_by_ip(&ipam);
                        for (ip, hs) in &before {
                            for h in hs {
                                let kept = after.get(ip).is_some_and(|v| v.contains(h));
                                prop_assert!(
                                    kept || liveness(h) == Liveness::Gone
                                        || stale_for(h, &attachment, liveness(h)),
                                    "ADD of {} dropped {:?} holder {} of {}",
                                    attachment.describe(),
                                    liveness(h),
                                    h.describe(),
                                    ip
                                );
                            }
                        }
                        let ips: Vec<IpAddr> = plan.assigned.iter().map(|a| a.ip).collect();
                        prop_assert_eq!(ips.len(), 1, "one address for one family");
                        if let Some((i, k, _)) = pin {
                            let key = (i, k, network);
                            // The pin keeps its address while a candidate pool covers it.
                            if let Some(&old) = m.pins.get(&key)
                                && m.defs
                                    .iter()
                                    .any(|d| names.contains(&d.name) && d.contains(old))
                            {
                                prop_assert_eq!(
                                    &ips,
                                    &vec![old],
                                    "{} ({:?}) changed address",
                                    identity_text(i),
                                    KINDS[usize::from(k)]
                                );
                            }
                            m.pins.insert(key, ips[0]);
                        }
                        let owner = pin.map(|(i, k, _)| (identity_text(i), KINDS[usize::from(k)]));
                        m.joined.insert(cid, (owner, net.into()));
                    }
                    Err(AllocError::IdentityBusy { holder, .. }) => {
                        // Busy only for a holder of this very pin that is neither gone nor stale.
                        let (i, k, _) = pin.expect("only a pinned ADD is busy");
                        let owner = (identity_text(i), KINDS[usize::from(k)]);
                        let busy = ipam.allocations().any(|a| {
                            a.network == net
                                && pin_of(a) == Some((owner.0.as_str(), owner.1))
                                && a.holders.iter().any(|h| {
                                    h.attachment.describe() == holder
                                        && liveness(&h.attachment) != Liveness::Gone
                                        && !stale_for(
                                            &h.attachment,
                                            &attachment,
                                            liveness(&h.attachment),
                                        )
                                })
                        });
                        prop_assert!(busy, "busy for {} which may be replaced", holder);
                    }
                    Err(AllocError::PoolExhausted { pools, .. }) => {
                        for name in &pools {
                            let def = m.defs.iter().find(|d| &d.name == name);
                            for ip in def.into_iter().flat_map(PoolDef::addresses) {
                                prop_assert!(
                                    !probe_free(&ipam, name, ip)?,
                                    "{} exhausted with {} free",
                                    name,
                                    ip
                                );
                            }
                        }
                    }
                    Err(AllocError::NoPool) => {
                        prop_assert!(names.is_empty(), "no pool with pools {:?}", names);
                    }
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
            Step::Del(c) => {
                let cid = format!("c{c}");
                let plan = ipam.plan_del(&cid, "eth0", now);
                ipam.apply(&plan.changes);
                prop_assert!(
                    ipam.allocations()
                        .all(|a| a.holders.iter().all(|h| h.attachment.container_id != cid)),
                    "{} still holds an address after its DEL",
                    cid
                );
            }
            Step::Gc { network, valid } => {
                let net = NETWORKS[usize::from(network)];
                let valid: HashSet<(String, String)> = valid
                    .iter()
                    .map(|c| (format!("c{c}"), "eth0".to_owned()))
                    .collect();
                let is_valid = |h: &Holder| {
                    valid.contains(&(
                        h.attachment.container_id.clone(),
                        h.attachment.ifname.clone(),
                    ))
                };
                let before = sorted_allocations(&ipam);
                let plan = ipam.plan_gc(net, &valid, None, now);
                ipam.apply(&plan.changes);
                let after = sorted_allocations(&ipam);
                // No holder of the network is left that is not a live attachment.
                for a in after.iter().filter(|a| a.network == net) {
                    for h in &a.holders {
                        prop_assert!(
                            is_valid(h),
                            "after GC of {}, {} is still held by {} (valid: {:?})",
                            net,
                            a.ip,
                            h.attachment.describe(),
                            &valid
                        );
                    }
                }
                // Valid holders and other networks are untouched.
                for a in before.iter().filter(|a| a.network == net) {
                    for h in a.holders.iter().filter(|h| is_valid(h)) {
                        prop_assert!(
                            after.iter().any(|b| b.ip == a.ip && b.holders.contains(h)),
                            "GC dropped valid holder {} of {}",
                            h.attachment.describe(),
                            a.ip
                        );
                    }
                }
                let others = |v: &[Allocation]| {
                    v.iter()
                        .filter(|a| a.network != net)
                        .cloned()
                        .collect::<Vec<_>>()
                };
                prop_assert_eq!(
                    others(&before),
                    others(&after),
                    "GC touched another network"
                );
            }
            Step::Release { identity, kind } => {
                let name = format!("id-{identity}");
                let owner_kind = OWNER_KINDS[usize::from(kind)];
                let plan = ipam.plan_release(now, &|c| {
                    matches!(c, ReleaseCondition::OwnerDeleted(k) if k.name == name && k.kind == owner_kind)
                });
                let mut freed = Vec::new();
                for ch in &plan.changes {
                    let Change::Delete { pool, ip, .. } = ch else {
                        return Err(TestCaseError::fail(format!("release planned {ch:?}")));
                    };
                    let a = ipam.get(pool, *ip).expect("released allocation exists");
                    prop_assert!(a.holders.is_empty(), "released {:?} while held", a);
                    let text = identity_text(identity);
                    prop_assert_eq!(
                        pin_of(a),
                        Some((text.as_str(), KINDS[usize::from(kind)])),
                        "released another owner's {}",
                        ip
                    );
                    freed.push(*ip);
                }
                ipam.apply(&plan.changes);
                m.pins.retain(|_, ip| !freed.contains(ip));
            }
            Step::Free { pick: i, force } => {
                let allocs = sorted_allocations(&ipam);
                if let Some(a) = allocs.get(pick(i, allocs.len())) {
                    match ipam.plan_release_by_hand(&a.pool, a.ip, force) {
                        Ok(plan) => {
                            prop_assert!(force || a.holders.is_empty(), "freed held {:?}", a);
                            ipam.apply(&plan.changes);
                            m.pins.retain(|_, ip| *ip != a.ip);
                        }
                        Err(AllocError::StillHeld { .. }) => {
                            prop_assert!(!force && !a.holders.is_empty(), "refused {:?}", a);
                        }
                        Err(e) => prop_assert!(false, "unexpected error {}", e),
                    }
                }
            }
            Step::SetLiveness {
                container,
                liveness,
            } => {
                m.liveness
                    .insert(format!("c{container}"), LIVENESS[usize::from(liveness)]);
            }
            Step::SetPools(specs) => {
                let defs = specs
                    .iter()
                    .map(|&(name, start, len)| PoolDef::new(name, start, len))
                    .collect();
                reload(&mut ipam, &mut m, defs)?;
            }
            Step::Rename { pool, name } => {
                if !m.defs.is_empty() {
                    let mut defs = m.defs.clone();
                    let i = pick(pool, defs.len());
                    defs[i].name = POOL_NAMES[pick(name, POOL_NAMES.len())].into();
                    reload(&mut ipam, &mut m, defs)?;
                }
            }
            Step::Remove(pool) => {
                if !m.defs.is_empty() {
                    let mut defs = m.defs.clone();
                    defs.remove(pick(pool, defs.len()));
                    reload(&mut ipam, &mut m, defs)?;
                }
            }
            Step::ReAdd(j) => {
                if !m.removed.is_empty() {
                    let mut defs = m.defs.clone();
                    defs.push(m.removed[pick(j, m.removed.len())].clone());
                    reload(&mut ipam, &mut m, defs)?;
                }
            }
            Step::Resize { pool, start, end } => {
                if !m.defs.is_empty() {
                    let mut defs = m.defs.clone();
                    let d = &mut defs[pick(pool, m.defs.len())];
                    d.start = d.start.saturating_add_signed(start).clamp(1, LAST);
                    d.end = d.end.saturating_add_signed(end).clamp(d.start, LAST);
                    reload(&mut ipam, &mut m, defs)?;
                }
            }
            Step::Overlap { pool, name } => {
                if !m.defs.is_empty() {
                    let mut defs = m.defs.clone();
                    let over = defs[pick(pool, defs.len())].start;
                    defs.push(PoolDef {
                        name: POOL_NAMES[pick(name, POOL_NAMES.len())].into(),
                        start: over,
                        end: over,
                    });
                    let before = ipam.pool_names();
                    reload(&mut ipam, &mut m, defs)?;
                    prop_assert_eq!(ipam.pool_names(), before, "an overlapping reload was taken");
                }
            }
        }
        check_state(&ipam, &m)?;
    }
    // Nothing leaks: after every DEL only idle pins are left; once their owners are deleted,
    // every address of the pools in force is free and nothing is orphaned.
    for c in 0..CONTAINERS {
        let plan = ipam.plan_del(&format!("c{c}"), "eth0", 100_000);
        ipam.apply(&plan.changes);
    }
    for a in ipam.allocations() {
        prop_assert!(
            pin_of(a).is_some() && a.holders.is_empty(),
            "left after every DEL: {:?}",
            a
        );
    }
    let plan = ipam.plan_release(100_001, &|_| true);
    ipam.apply(&plan.changes);
    m.pins.clear();
    check_state(&ipam, &m)?;
    prop_assert_eq!(ipam.allocations().count(), 0);
    prop_assert!(ipam.orphans().is_empty());
    for p in ipam.pools() {
        let def = m
            .defs
            .iter()
            .find(|d| d.name == p.name)
            .expect("pool in the model");
        for ip in def.addresses() {
            prop_assert!(
                probe_free(&ipam, &p.name, ip)?,
                "{} leaked in {}",
                ip,
                &p.name
            );
        }
    }
    prop_assert!(ipam.usage().iter().all(|u| u.allocated == 0));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn random_reloads_migrations_kinds_and_liveness_keep_every_invariant(
        steps in steps()
    ) {
        walk_reloads_and_migrations(steps)?;
    }
}

/// Two writers (two nodes) sharing a pool, with different seeds, search different parts of
/// it; one's allocations, applied to the other as foreign, do not pull its search along.
#[test]
fn spread_writers_keep_to_their_parts_of_a_pool() {
    let shared = || pool("p", "10.0.0.0/16", &["10.0.0.1-10.0.3.254"]);
    let mut a = Ipam::new(vec![shared()], Vec::new()).expect("a");
    let mut b = Ipam::new(vec![shared()], Vec::new()).expect("b");
    a.spread_cursors(1);
    b.spread_cursors(2);
    let d = Decision::Ephemeral;
    let a1 = add(&mut a, att("ca1", "pa1", "ua1"), &d, &["p"], &all_live).expect("a1")[0];
    let b1 = add(&mut b, att("cb1", "pb1", "ub1"), &d, &["p"], &all_live).expect("b1")[0];
    assert_ne!(a1, b1, "two seeds, one starting point");
    // Each sees the other's allocation through the store.
    let from_a: Vec<Change> = a
        .allocations()
        .filter(|x| x.ip == a1)
        .cloned()
        .map(Change::Put)
        .collect();
    let from_b: Vec<Change> = b
        .allocations()
        .filter(|x| x.ip == b1)
        .cloned()
        .map(Change::Put)
        .collect();
    b.apply_foreign(&from_a);
    a.apply_foreign(&from_b);
    let a2 = add(&mut a, att("ca2", "pa2", "ua2"), &d, &["p"], &all_live).expect("a2")[0];
    let b2 = add(&mut b, att("cb2", "pb2", "ub2"), &d, &["p"], &all_live).expect("b2")[0];
    let next = |ip: IpAddr| match ip {
        IpAddr::V4(v) => IpAddr::V4((u32::from(v) + 1).into()),
        IpAddr::V6(_) => ip,
    };
    assert_eq!(a2, next(a1), "a goes on from its own last address");
    assert_eq!(b2, next(b1), "b goes on from its own last address");
    // Without spreading, both would have taken the pool's first address.
    let mut plain = Ipam::new(vec![shared()], Vec::new()).expect("plain");
    let first = add(&mut plain, att("c", "p", "u"), &d, &["p"], &all_live).expect("first")[0];
    assert_eq!(first.to_string(), "10.0.0.1");
}

/// A writer that lost a race moves its search elsewhere (when searches are spread); without
/// spreading, nothing moves.
#[test]
fn a_lost_race_scatters_a_spread_search() {
    let shared = || pool("p", "10.0.0.0/16", &["10.0.0.1-10.0.3.254"]);
    let d = Decision::Ephemeral;
    let mut a = Ipam::new(vec![shared()], Vec::new()).expect("a");
    a.spread_cursors(1);
    let first = add(&mut a, att("c1", "p1", "u1"), &d, &["p"], &all_live).expect("a1")[0];
    a.scatter(first);
    let after = add(&mut a, att("c2", "p2", "u2"), &d, &["p"], &all_live).expect("a2")[0];
    let next = |ip: IpAddr| match ip {
        IpAddr::V4(v) => IpAddr::V4((u32::from(v) + 1).into()),
        IpAddr::V6(_) => ip,
    };
    assert_ne!(after, next(first), "the search moved away");
    let mut plain = Ipam::new(vec![shared()], Vec::new()).expect("plain");
    let f = add(&mut plain, att("c1", "p1", "u1"), &d, &["p"], &all_live).expect("f")[0];
    plain.scatter(f);
    let g = add(&mut plain, att("c2", "p2", "u2"), &d, &["p"], &all_live).expect("g")[0];
    assert_eq!(g, next(f), "one writer: plain next-fit");
}

/// A pod given a new sandbox (its old sandbox's DEL lost) takes its pinned address over from
/// the old sandbox, though the pod, of course, is live; another pod of the identity does not.
#[test]
fn a_new_sandbox_of_the_same_pod_takes_over_from_the_old_one() {
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    let ip = add(
        &mut ipam,
        att("c1", "virt-launcher-a", "u1"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("first")[0];
    let again = add(
        &mut ipam,
        att("c2", "virt-launcher-a", "u1"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("the same pod's new sandbox");
    assert_eq!(again, vec![ip]);
    let a = ipam.get("test-ippool", ip).expect("pin");
    let holders: Vec<&str> = a
        .holders
        .iter()
        .map(|h| h.attachment.container_id.as_str())
        .collect();
    assert_eq!(holders, ["c2"]);
    // Another pod of the VM, live holder: waits.
    let e = add(
        &mut ipam,
        att("c3", "virt-launcher-b", "u2"),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect_err("another pod while the holder lives");
    assert!(matches!(e, AllocError::IdentityBusy { .. }), "{e}");
    // Without a UID nothing is known to be the same pod.
    let mut ipam = Ipam::new(vec![seed_pool()], vec![]).expect("disjoint pools");
    add(
        &mut ipam,
        att("c1", "virt-launcher-a", ""),
        &vm_decision(false),
        &["test-ippool"],
        &all_live,
    )
    .expect("first");
    assert!(
        add(
            &mut ipam,
            att("c2", "virt-launcher-a", ""),
            &vm_decision(false),
            &["test-ippool"],
            &all_live,
        )
        .is_err()
    );
}
