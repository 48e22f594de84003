//! KubeVirt, emulated on the real apiserver for tests: its three CRDs (VirtualMachine,
//! VirtualMachineInstance, VirtualMachineInstanceMigration, `kubevirt.io/v1`, schemaless) and
//! what virt-controller does with them, object for object: a VM owns a VMI of its name; a VMI
//! owns its virt-launcher pod, labelled `kubevirt.io=virt-launcher`,
//! `kubevirt.io/created-by=<VMI uid>`, `vm.kubevirt.io/name=<VMI name>`, annotated
//! `kubevirt.io/domain=<VMI name>`; a migration's target pod adds the label
//! `kubevirt.io/migrationJobUID=<migration uid>` and the annotation
//! `kubevirt.io/migrationJobName`. Pods are bound to a node by name, as the scheduler would.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod as KPod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

/// The three kinds: (kind, plural, short name).
const KINDS: [(&str, &str, &str); 3] = [
    ("VirtualMachine", "virtualmachines", "vm"),
    ("VirtualMachineInstance", "virtualmachineinstances", "vmi"),
    (
        "VirtualMachineInstanceMigration",
        "virtualmachineinstancemigrations",
        "vmim",
    ),
];

fn resource(kind: &str) -> ApiResource {
    let plural = KINDS.iter().find(|k| k.0 == kind).map_or("", |k| k.1);
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
}

/// Installs the CRDs and waits until they serve.
pub async fn install(client: &kube::Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (kind, plural, short) in KINDS {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.kubevirt.io")},
            "spec": {"group": "kubevirt.io", "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "shortNames": [short]},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
        }))?;
        api.create(&PostParams::default(), &crd)
            .await
            .with_context(|| format!("creating the {kind} CRD"))?;
    }
    for (kind, _, _) in KINDS {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "default", &resource(kind));
        let mut ok = false;
        for _ in 0..100 {
            if api.list(&Default::default()).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::ensure!(ok, "the {kind} CRD never served");
    }
    Ok(())
}

/// Creates a namespaced object of `kind` in `default`; returns its UID.
async fn create(client: &kube::Client, kind: &str, name: &str, extra: Value) -> Result<String> {
    let mut obj = json!({"apiVersion": "kubevirt.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": "default"}});
    merge(&mut obj, extra);
    let o: DynamicObject = serde_json::from_value(obj)?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource(kind));
    let created = api
        .create(&PostParams::default(), &o)
        .await
        .with_context(|| format!("creating {kind} {name}"))?;
    created.metadata.uid.context("no uid")
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// One VM, as virt-controller would run it.
pub struct Vm {
    client: kube::Client,
    pub name: String,
    pub uid: String,
    /// The current VMI's UID.
    pub vmi_uid: String,
    /// Pods created so far, to make names unique.
    launched: u32,
}

fn owner(kind: &str, name: &str, uid: &str) -> Value {
    json!({"apiVersion": "kubevirt.io/v1", "kind": kind, "name": name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true})
}

impl Vm {
    /// Creates the VirtualMachine (`runStrategy: Always`) and its VMI.
    pub async fn start(client: &kube::Client, name: &str, annotations: Value) -> Result<Vm> {
        let uid = create(
            client,
            "VirtualMachine",
            name,
            json!({"spec": {"runStrategy": "Always"}}),
        )
        .await?;
        let mut vm = Vm {
            client: client.clone(),
            name: name.to_owned(),
            uid,
            vmi_uid: String::new(),
            launched: 0,
        };
        vm.vmi_uid = vm.create_vmi(annotations).await?;
        Ok(vm)
    }

    async fn create_vmi(&self, annotations: Value) -> Result<String> {
        create(
            &self.client,
            "VirtualMachineInstance",
            &self.name,
            json!({"metadata": {"annotations": annotations,
                "ownerReferences": [owner("VirtualMachine", &self.name, &self.uid)]}}),
        )
        .await
    }

    /// Creates a virt-launcher pod of the current VMI on `node` (a migration target when
    /// `migration` names one: (name, uid)); returns its name.
    pub async fn launch(&mut self, node: &str, migration: Option<(&str, &str)>) -> Result<String> {
        self.launch_with(node, migration, json!({})).await
    }

    /// [`Vm::launch`] with more annotations on the pod (what ipam-extensions' webhook adds:
    /// network selection elements carrying `ipam-claim-reference`).
    pub async fn launch_with(
        &mut self,
        node: &str,
        migration: Option<(&str, &str)>,
        extra: Value,
    ) -> Result<String> {
        self.launched += 1;
        let name = format!("virt-launcher-{}-{:05}", self.name, self.launched);
        let mut labels = json!({"kubevirt.io": "virt-launcher",
            "kubevirt.io/created-by": self.vmi_uid, "vm.kubevirt.io/name": self.name});
        let mut annotations = json!({"kubevirt.io/domain": self.name});
        if let Some((mname, muid)) = migration {
            labels["kubevirt.io/migrationJobUID"] = json!(muid);
            annotations["kubevirt.io/migrationJobName"] = json!(mname);
        }
        if let (Some(a), Some(more)) = (annotations.as_object_mut(), extra.as_object()) {
            a.extend(more.clone());
        }
        let pod: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels,
                "annotations": annotations,
                "ownerReferences": [owner("VirtualMachineInstance", &self.name, &self.vmi_uid)]},
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                "containers": [{"name": "compute", "image": "virt-launcher"}]}
        }))?;
        Api::<KPod>::namespaced(self.client.clone(), "default")
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating {name}"))?;
        Ok(name)
    }

    /// Starts a migration: the VirtualMachineInstanceMigration object; returns (name, uid).
    pub async fn migration(&self) -> Result<(String, String)> {
        let name = format!("{}-migration-{}", self.name, self.launched);
        let uid = create(
            &self.client,
            "VirtualMachineInstanceMigration",
            &name,
            json!({"spec": {"vmiName": self.name}}),
        )
        .await?;
        Ok((name, uid))
    }

    /// Deletes the VMI (its pods first, as virt-controller stops them) and creates it again:
    /// a new UID.
    pub async fn recreate_vmi(&mut self, pods: &[&str], annotations: Value) -> Result<()> {
        for p in pods {
            delete_pod(&self.client, p).await?;
        }
        self.delete_kind("VirtualMachineInstance", &self.name.clone())
            .await?;
        self.vmi_uid = self.create_vmi(annotations).await?;
        Ok(())
    }

    /// Deletes the VM, its VMI and `pods`.
    pub async fn delete(self, pods: &[&str]) -> Result<()> {
        for p in pods {
            delete_pod(&self.client, p).await?;
        }
        let name = self.name.clone();
        self.delete_kind("VirtualMachineInstance", &name).await?;
        self.delete_kind("VirtualMachine", &name).await
    }

    async fn delete_kind(&self, kind: &str, name: &str) -> Result<()> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), "default", &resource(kind));
        api.delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting {kind} {name}"))?;
        // Wait until it is gone (the garbage collector may hold it for its dependents).
        for _ in 0..100 {
            if api.get_opt(name).await?.is_none() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!("{kind} {name} was not deleted")
    }
}

/// Deletes a pod gracefully (the kubelet harness tears it down and removes it); waits until
/// it is gone.
pub async fn delete_pod(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<KPod> = Api::namespaced(client.clone(), "default");
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("deleting pod {name}")),
    }
    for _ in 0..300 {
        if api.get_opt(name).await?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("pod {name} was not deleted (is a kubelet playing its node?)")
}
