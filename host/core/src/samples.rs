//! Canonical sample workloads (the seed's VM, a StatefulSet replica, a Deployment pod) for
//! tests and benchmarks across the workspace. Not part of the public API: compiled only for
//! this crate's tests and with the `samples` feature, which other crates enable from their
//! `[dev-dependencies]`.

use crate::workload::{Object, OwnerReference, PolicyRequest, Workload};

/// A controller owner reference.
pub fn controller(api_version: &str, kind: &str, name: &str) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: name.into(),
        uid: format!("uid-{kind}-{name}"),
        controller: true,
    }
}

/// A bare pod on `node-1`, interface `eth0`.
pub fn pod(namespace: &str, name: &str) -> Workload {
    Workload {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        node: "node-1".into(),
        network: "macvlan-net".into(),
        interface: "eth0".into(),
        container_id: format!("ctr-{name}"),
        ..Workload::default()
    }
}

/// A bare owner object.
pub fn object(api_version: &str, kind: &str, namespace: &str, name: &str) -> Object {
    Object {
        api_version: api_version.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{kind}-{name}"),
        ..Object::default()
    }
}

/// A virt-launcher pod of VM `default/vm-cirros`, with its VMI and VM resolved. `migration`
/// marks it as the target pod of a live migration.
pub fn vm_request(pod_name: &str, migration: bool) -> PolicyRequest {
    let mut w = pod("default", pod_name);
    w.labels
        .push(("kubevirt.io".into(), "virt-launcher".into()));
    if migration {
        w.labels
            .push(("kubevirt.io/migrationJobUID".into(), "mig-1".into()));
    }
    w.owner_references.push(controller(
        "kubevirt.io/v1",
        "VirtualMachineInstance",
        "vm-cirros",
    ));
    let mut vmi = object(
        "kubevirt.io/v1",
        "VirtualMachineInstance",
        "default",
        "vm-cirros",
    );
    vmi.owner_references
        .push(controller("kubevirt.io/v1", "VirtualMachine", "vm-cirros"));
    let vm = object("kubevirt.io/v1", "VirtualMachine", "default", "vm-cirros");
    PolicyRequest {
        workload: w,
        owners: vec![vmi, vm],
    }
}

/// Replica `pod_name` of StatefulSet `db/web` (3 replicas); `keep` sets the annotation that
/// keeps addresses across scale-down.
pub fn sts_request(pod_name: &str, keep: bool) -> PolicyRequest {
    let mut w = pod("db", pod_name);
    w.owner_references
        .push(controller("apps/v1", "StatefulSet", "web"));
    let mut sts = object("apps/v1", "StatefulSet", "db", "web");
    sts.replicas = Some(3);
    if keep {
        sts.annotations.push((
            "ipam.tether.dev/keep-ips-on-scale-down".into(),
            "true".into(),
        ));
    }
    PolicyRequest {
        workload: w,
        owners: vec![sts],
    }
}

/// A Deployment's pod in namespace `shop` (owned by a ReplicaSet that is not resolved).
pub fn deployment_request(pod_name: &str) -> PolicyRequest {
    let mut w = pod("shop", pod_name);
    w.owner_references
        .push(controller("apps/v1", "ReplicaSet", "cart-7d9f"));
    PolicyRequest {
        workload: w,
        owners: vec![],
    }
}
