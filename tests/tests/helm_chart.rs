//! The Helm chart (charts/tether) with the real helm: lint, render with several value sets,
//! every rendered manifest validated strictly against the Kubernetes schemas
//! (`kubernetes-validate --strict`) and the IPPool against its CRD's schema, the values schema
//! refusing each kind of mistake, the README's parameter table in step with values.yaml, the
//! policy ConfigMaps byte-identical to the built policies; and `helm install` into a real
//! kube-apiserver, tetherd run as the rendered DaemonSet runs it with the chart's
//! ServiceAccount token, `helm upgrade` and `helm uninstall`.
//!
//! helm and kubernetes-validate come from `scripts/setup.sh` (under /var/cache/tether-testenv);
//! `TETHER_HELM` and `TETHER_KUBERNETES_VALIDATE` point elsewhere.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod as KPod, Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tether_e2e::cluster::{Cluster, TestCluster, repo_root};
use tether_e2e::{Ipam, Pod, bin_dir, skip_or_fail, within};
use tether_kube::crd::{IPAllocation, IPPool, PinnedIdentity};

const TESTENV: &str = "/var/cache/tether-testenv";

fn chart() -> PathBuf {
    repo_root().join("charts/tether")
}

/// A tool from the environment variable `var`, else the test environment's copy; `None` (after
/// [`skip_or_fail`]) when it is not there.
fn tool(test: &str, var: &str, cached: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(TESTENV).join(cached));
    if path.is_file() {
        Some(path)
    } else {
        skip_or_fail(
            test,
            &format!(
                "{} is missing: run scripts/setup.sh (or set {var})",
                path.display()
            ),
        );
        None
    }
}

fn helm(test: &str) -> Option<PathBuf> {
    tool(test, "TETHER_HELM", "bin/helm")
}

fn validator(test: &str) -> Option<PathBuf> {
    tool(
        test,
        "TETHER_KUBERNETES_VALIDATE",
        "venv/bin/kubernetes-validate",
    )
}

/// `helm template` of the chart with `args` (value flags): the manifests, or helm's error.
fn render(helm: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm)
        .args(["template", "tether"])
        .arg(chart())
        .args(["--namespace", "tether-system"])
        .args(args)
        .output()
        .expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The documents of a multi-document YAML stream (empty ones left out).
fn documents(yaml: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// The daemon container's args.
fn daemon_args(docs: &[Value]) -> Vec<String> {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    serde_json::from_value(ds["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .expect("args")
}

/// The value sets the rendering tests use: defaults and the non-default sets of issue #10.
fn value_sets(dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let b64 = dir.join("team.wasm.b64");
    std::fs::write(
        &b64,
        serde_json::to_value(k8s_openapi::ByteString(
            tether_builtins::fixtures::LABEL_IDENTITY.to_vec(),
        ))
        .expect("base64")
        .as_str()
        .expect("a string"),
    )
    .expect("write base64");
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    vec![
        ("defaults", vec![]),
        (
            "VM pinning off",
            s(&["--set", "ipam.enableKubevirtStaticIP=false"]),
        ),
        (
            "a custom policy added",
            vec![
                "--set-file".into(),
                format!("policies.extra.team.wasm={}", b64.display()),
                "--set".into(),
                "policies.chain={team,kubevirt,statefulset,stateless}".into(),
                "--set-json".into(),
                r#"policies.settings=["team:label=tether.dev/identity","team:note=a #b: c"]"#
                    .into(),
            ],
        ),
        (
            "a default pool",
            s(&[
                "--set",
                "defaultPool.create=true,defaultPool.name=test-ippool,defaultPool.subnet=10.6.0.0/16,defaultPool.gateway=10.6.0.1",
                "--set-json",
                r#"defaultPool.ips=["10.6.168.101-10.6.168.110"]"#,
                "--set-json",
                r#"defaultPool.routes=[{"dst":"0.0.0.0/0"}]"#,
            ]),
        ),
        (
            "metrics off, SELinux type spc_t",
            s(&["--set", "metrics.enabled=false,seLinuxType=spc_t"]),
        ),
        (
            "no plugin install, an existing ServiceAccount, another socket",
            s(&[
                "--set",
                "cni.install=false,serviceAccount.create=false,serviceAccount.name=ops,socketPath=/var/run/tether-x/api.sock",
            ]),
        ),
        (
            "defaults removed with null",
            s(&[
                "--set",
                "resources=null,tolerations=null,nodeSelector=null,priorityClassName=null,updateStrategy=null",
            ]),
        ),
        (
            "a ServiceMonitor",
            s(&[
                "--set",
                "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=prom",
            ]),
        ),
    ]
}

#[test]
fn the_chart_lints_strictly_with_every_value_set() {
    let test = "the_chart_lints_strictly_with_every_value_set";
    let Some(helm) = helm(test) else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, args) in value_sets(dir.path()) {
        let out = Command::new(&helm)
            .args(["lint", "--strict"])
            .arg(chart())
            .args(&args)
            .output()
            .expect("helm lint");
        assert!(
            out.status.success(),
            "helm lint --strict ({name}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Validates `docs` (Kubernetes kinds) with kubernetes-validate --strict against the oldest and
/// the newest schemas it has; Err with its output when it refuses.
fn validate(validator: &Path, docs: &[Value], dir: &Path) -> Result<(), String> {
    let file = dir.join("manifests.yaml");
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| yaml_serde::to_string(d).expect("yaml"))
        .collect();
    std::fs::write(&file, yaml.join("---\n")).expect("write manifests");
    for version in ["1.25.0", "1.37.0"] {
        let out = Command::new(validator)
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate");
        if !out.status.success() {
            return Err(format!(
                "kubernetes-validate --strict -k {version}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// Validates an IPPool against the openAPIV3Schema of the chart's IPPool CRD (jsonschema, in
/// kubernetes-validate's Python); Err with the reason.
fn validate_pool(validator: &Path, pool: &Value, dir: &Path) -> Result<(), String> {
    let crds = std::fs::read_to_string(chart().join("crds/tether.yaml")).expect("crds");
    let crd = documents(&crds)
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == "IPPool")
        .expect("the IPPool CRD");
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    // Structural schemas allow no unknown fields (the apiserver prunes them): say so to
    // jsonschema, level by level.
    fn close(s: &mut Value) {
        if let Some(o) = s.as_object_mut() {
            if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            if o.remove("nullable") == Some(Value::Bool(true))
                && let Some(t) = o.get("type").cloned()
            {
                o.insert("type".into(), json!([t, "null"]));
            }
            for v in o.values_mut() {
                close(v);
            }
        } else if let Some(a) = s.as_array_mut() {
            a.iter_mut().for_each(close);
        }
    }
    close(&mut schema);
    // metadata is checked by the apiserver, not by the CRD's schema.
    schema["properties"]["metadata"] = json!({"type": "object"});
    schema["properties"]["apiVersion"] = json!({"const": "ipam.tether.dev/v1alpha1"});
    schema["properties"]["kind"] = json!({"const": "IPPool"});
    let python = validator.with_file_name("python3");
    let input = dir.join("pool-check.json");
    std::fs::write(&input, json!({"schema": schema, "doc": pool}).to_string()).expect("write");
    let out = Command::new(python)
        .args([
            "-c",
            "import json,sys,jsonschema\nd=json.load(open(sys.argv[1]))\njsonschema.validate(d['doc'], d['schema'])",
        ])
        .arg(&input)
        .output()
        .expect("python3");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_rendering_validates_strictly_against_the_kubernetes_schemas() {
    let test = "every_rendering_validates_strictly_against_the_kubernetes_schemas";
    let (Some(helm), Some(validator)) = (helm(test), validator(test)) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // The validator must be able to fail: an unknown field in a DaemonSet is refused.
    let defaults = documents(&render(&helm, &[]).expect("render"));
    let mut broken = defaults.clone();
    for d in broken.iter_mut().filter(|d| d["kind"] == "DaemonSet") {
        d["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    }
    assert!(
        validate(&validator, &broken, dir.path()).is_err(),
        "kubernetes-validate --strict accepted an unknown field"
    );
    let mut bad_pool = json!({"apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "p"}, "spec": {"subnet": "10.6.0.0/16", "exclude": ["10.6.0.9"]}});
    assert!(
        validate_pool(&validator, &bad_pool, dir.path()).is_err(),
        "the IPPool schema accepted an unknown field"
    );
    bad_pool["spec"] = json!({"ips": ["10.6.0.9"]});
    assert!(
        validate_pool(&validator, &bad_pool, dir.path()).is_err(),
        "the IPPool schema accepted a pool without a subnet"
    );

    for (name, args) in value_sets(dir.path()) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let docs = documents(&render(&helm, &args).unwrap_or_else(|e| panic!("{name}: {e}")));
        let (custom, core): (Vec<Value>, Vec<Value>) = docs.iter().cloned().partition(|d| {
            d["apiVersion"].as_str().is_some_and(|v| {
                v.starts_with("ipam.tether.dev/") || v.starts_with("monitoring.coreos.com/")
            })
        });
        validate(&validator, &core, dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        for pool in custom.iter().filter(|d| d["kind"] == "IPPool") {
            validate_pool(&validator, pool, dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let argv = daemon_args(&docs);
        let has = |a: &str| argv.iter().any(|x| x == a);
        match name {
            "defaults" => {
                assert!(has("--enable-kubevirt-static-ip=true"), "{argv:?}");
                assert!(has("--enable-statefulset=true"), "{argv:?}");
                assert!(
                    has(
                        "--chain=configmap:tether-policy-kubevirt,configmap:tether-policy-statefulset,configmap:tether-policy-stateless"
                    ),
                    "{argv:?}"
                );
                assert!(has("--metrics-address=0.0.0.0:9721"), "{argv:?}");
                assert!(custom.is_empty(), "no pool, no ServiceMonitor by default");
            }
            "VM pinning off" => assert!(has("--enable-kubevirt-static-ip=false"), "{argv:?}"),
            "a custom policy added" => {
                let cm = find(&docs, "ConfigMap", "tether-policy-team").expect("its ConfigMap");
                assert_eq!(cm["metadata"]["labels"]["ipam.tether.dev/policy"], "team");
                let cm: ConfigMap = serde_json::from_value(cm.clone()).expect("ConfigMap");
                let wasm = &cm.binary_data.expect("binaryData")["policy.wasm"].0;
                assert_eq!(wasm.as_slice(), tether_builtins::fixtures::LABEL_IDENTITY);
                assert!(
                    has(
                        "--chain=configmap:tether-policy-team,configmap:tether-policy-kubevirt,configmap:tether-policy-statefulset,configmap:tether-policy-stateless"
                    ),
                    "{argv:?}"
                );
                assert!(
                    has("--policy-setting=team:label=tether.dev/identity"),
                    "{argv:?}"
                );
                // Quoted: YAML neither cuts ` #b` as a comment nor reads `: c` as a map.
                assert!(has("--policy-setting=team:note=a #b: c"), "{argv:?}");
            }
            "a default pool" => {
                let pool = find(&custom, "IPPool", "test-ippool").expect("the pool");
                assert_eq!(pool["spec"]["subnet"], "10.6.0.0/16");
                assert_eq!(pool["spec"]["ips"], json!(["10.6.168.101-10.6.168.110"]));
                assert_eq!(
                    pool["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
                    "uninstall must not delete the pool"
                );
            }
            "metrics off, SELinux type spc_t" => {
                assert!(has("--metrics-address=127.0.0.1:9721"), "{argv:?}");
                let pod = &docs
                    .iter()
                    .find(|d| d["kind"] == "DaemonSet")
                    .expect("DaemonSet")["spec"]["template"]["spec"];
                for c in ["containers", "initContainers"] {
                    assert_eq!(
                        pod[c][0]["securityContext"]["seLinuxOptions"]["type"], "spc_t",
                        "{c}"
                    );
                }
            }
            "no plugin install, an existing ServiceAccount, another socket" => {
                let pod = &docs
                    .iter()
                    .find(|d| d["kind"] == "DaemonSet")
                    .expect("DaemonSet")["spec"]["template"]["spec"];
                assert!(pod["initContainers"].is_null(), "no install: {pod}");
                assert_eq!(pod["serviceAccountName"], "ops");
                assert_eq!(
                    pod["volumes"],
                    json!([{"name": "socket-dir",
                    "hostPath": {"path": "/var/run/tether-x", "type": "DirectoryOrCreate"}}])
                );
                assert!(has("--socket=/var/run/tether-x/api.sock"), "{argv:?}");
                for kind in [
                    "ServiceAccount",
                    "ClusterRole",
                    "Role",
                    "ClusterRoleBinding",
                    "RoleBinding",
                ] {
                    assert!(docs.iter().all(|d| d["kind"] != kind), "{kind} rendered");
                }
            }
            "a ServiceMonitor" => {
                let sm = custom
                    .iter()
                    .find(|d| d["kind"] == "ServiceMonitor")
                    .expect("a ServiceMonitor");
                assert_eq!(sm["metadata"]["labels"]["release"], "prom");
                let svc = find(&core, "Service", "tether-metrics").expect("its Service");
                // The ServiceMonitor finds the Service, and the Service the daemons' pods.
                let labels = |v: &Value| v.as_object().cloned().unwrap_or_default();
                let ds = docs
                    .iter()
                    .find(|d| d["kind"] == "DaemonSet")
                    .expect("DaemonSet");
                for (selector, of, what) in [
                    (
                        &sm["spec"]["selector"]["matchLabels"],
                        &svc["metadata"]["labels"],
                        "Service",
                    ),
                    (
                        &svc["spec"]["selector"],
                        &ds["spec"]["template"]["metadata"]["labels"],
                        "pods",
                    ),
                ] {
                    let (selector, of) = (labels(selector), labels(of));
                    assert!(!selector.is_empty());
                    for (k, v) in &selector {
                        assert_eq!(of.get(k), Some(v), "the selector misses the {what} on {k}");
                    }
                }
            }
            "defaults removed with null" => {
                let pod = &docs
                    .iter()
                    .find(|d| d["kind"] == "DaemonSet")
                    .expect("DaemonSet")["spec"]["template"]["spec"];
                assert!(
                    pod["tolerations"].is_null() && pod["nodeSelector"].is_null(),
                    "{pod}"
                );
            }
            other => panic!("unchecked value set {other}"),
        }
    }
}

/// The chart's policy files are the policies built from policies/ (CI rebuilds them), and
/// the ConfigMaps carry exactly those bytes with their digests.
#[test]
fn the_policy_configmaps_carry_the_policies_built_from_source() {
    let test = "the_policy_configmaps_carry_the_policies_built_from_source";
    let builtins: BTreeMap<&str, &[u8]> = tether_builtins::BUILTINS
        .iter()
        .map(|b| (b.name, b.wasm))
        .collect();
    for (name, wasm) in &builtins {
        let file = chart().join(format!("files/policies/{name}.wasm"));
        let shipped = std::fs::read(&file).expect("the chart's policy file");
        assert!(
            shipped == *wasm,
            "{} differs from the policy built from policies/: run `tetherd policy export {}`",
            file.display(),
            chart().join("files/policies").display()
        );
    }
    let Some(helm) = helm(test) else { return };
    let docs = documents(&render(&helm, &[]).expect("render"));
    let mut seen = HashSet::new();
    for d in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        let cm: ConfigMap = serde_json::from_value(d.clone()).expect("ConfigMap");
        let label = cm.metadata.labels.as_ref().expect("labels")["ipam.tether.dev/policy"].clone();
        let wasm = &cm.binary_data.as_ref().expect("binaryData")["policy.wasm"].0;
        assert_eq!(wasm.as_slice(), builtins[label.as_str()], "{label}");
        assert_eq!(
            cm.data.as_ref().expect("data")["sha256"],
            tether_policy::digest::sha256_hex(wasm)
        );
        seen.insert(label);
    }
    assert_eq!(
        seen.len(),
        builtins.len(),
        "a ConfigMap per built-in policy"
    );
}

/// Asserts that `helm template` with `args` fails, naming `expect` in its message.
fn refused(test: &str, args: &[&str], expect: &str) {
    let Some(helm) = helm(test) else { return };
    match render(&helm, args) {
        Ok(_) => panic!("helm accepted {args:?}"),
        Err(e) => assert!(
            e.contains(expect),
            "helm refused {args:?} without naming {expect:?}: {e}"
        ),
    }
}

#[test]
fn the_schema_refuses_a_misspelt_value() {
    refused(
        "the_schema_refuses_a_misspelt_value",
        &["--set", "ipam.enableKubevirtStaticIp=false"],
        "enableKubevirtStaticIp",
    );
}

#[test]
fn the_schema_refuses_a_value_of_the_wrong_type() {
    refused(
        "the_schema_refuses_a_value_of_the_wrong_type",
        &["--set-string", "ipam.enableKubevirtStaticIP=no"],
        "enableKubevirtStaticIP",
    );
}

#[test]
fn the_schema_refuses_a_number_out_of_range() {
    refused(
        "the_schema_refuses_a_number_out_of_range",
        &["--set", "metrics.port=70000"],
        "port",
    );
    refused(
        "the_schema_refuses_a_number_out_of_range",
        &["--set", "gc.graceSeconds=0"],
        "graceSeconds",
    );
}

#[test]
fn the_schema_refuses_a_choice_not_offered() {
    refused(
        "the_schema_refuses_a_choice_not_offered",
        &["--set", "log.format=yaml"],
        "format",
    );
    refused(
        "the_schema_refuses_a_choice_not_offered",
        &["--set", "image.pullPolicy=Sometimes"],
        "pullPolicy",
    );
}

#[test]
fn the_schema_refuses_an_empty_or_malformed_chain() {
    refused(
        "the_schema_refuses_an_empty_or_malformed_chain",
        &["--set-json", "policies.chain=[]"],
        "chain",
    );
    refused(
        "the_schema_refuses_an_empty_or_malformed_chain",
        &["--set", "policies.chain={kubevirt,Stateless}"],
        "chain",
    );
    refused(
        "the_schema_refuses_an_empty_or_malformed_chain",
        &["--set", "policies.chain={stateless,stateless}"],
        "chain",
    );
    refused(
        "the_schema_refuses_an_empty_or_malformed_chain",
        &["--set", "policies.settings={team-label}"],
        "settings",
    );
}

#[test]
fn the_schema_refuses_a_pool_without_a_valid_subnet() {
    refused(
        "the_schema_refuses_a_pool_without_a_valid_subnet",
        &["--set", "defaultPool.create=true"],
        "subnet",
    );
    refused(
        "the_schema_refuses_a_pool_without_a_valid_subnet",
        &[
            "--set",
            "defaultPool.create=true,defaultPool.subnet=10.6.0.0",
        ],
        "subnet",
    );
    refused(
        "the_schema_refuses_a_pool_without_a_valid_subnet",
        &[
            "--set",
            "defaultPool.create=true,defaultPool.subnet=10.6.0.0/16,defaultPool.gateway=gw",
        ],
        "gateway",
    );
}

#[test]
fn the_schema_refuses_an_extra_policy_that_is_not_a_component() {
    refused(
        "the_schema_refuses_an_extra_policy_that_is_not_a_component",
        &["--set", "policies.extra.team.sha256=abc"],
        "wasm",
    );
    refused(
        "the_schema_refuses_an_extra_policy_that_is_not_a_component",
        &["--set", "policies.extra.team.wasm=not*base64"],
        "wasm",
    );
    refused(
        "the_schema_refuses_an_extra_policy_that_is_not_a_component",
        &["--set", "policies.extra.kubevirt.wasm=AGFzbQ=="],
        "built-in",
    );
}

#[test]
fn the_schema_refuses_a_relative_path() {
    refused(
        "the_schema_refuses_a_relative_path",
        &["--set", "socketPath=run/tether.sock"],
        "socketPath",
    );
    refused(
        "the_schema_refuses_a_relative_path",
        &["--set", "cni.binDir=opt/cni/bin"],
        "binDir",
    );
}

/// A value left empty (or null) is missing, not zero: the schema names it. (With
/// `--reuse-values` from an older chart, a value the new chart added is missing the same way.)
#[test]
fn the_schema_refuses_a_value_left_empty() {
    let test = "the_schema_refuses_a_value_left_empty";
    let dir = tempfile::tempdir().expect("tempdir");
    for (yaml, name) in [
        ("gc:\n  graceSeconds:\n", "graceSeconds"),
        ("metrics:\n  port:\n", "port"),
        ("ipam:\n  enableStatefulSet:\n", "enableStatefulSet"),
        ("policies:\n  chain:\n", "chain"),
    ] {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, yaml).expect("write");
        let file = file.display().to_string();
        refused(test, &["-f", &file], name);
    }
}

#[test]
fn a_service_monitor_without_metrics_is_refused() {
    refused(
        "a_service_monitor_without_metrics_is_refused",
        &[
            "--set",
            "metrics.enabled=false,metrics.serviceMonitor.enabled=true",
        ],
        "metrics.serviceMonitor.enabled needs metrics.enabled",
    );
}

/// The parameters of values.yaml: every value under a `# --` comment, as (path, default as
/// JSON, description).
fn parameters() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml");
    let values: Value = yaml_serde::from_str(&text).expect("values.yaml parses");
    let mut out = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut comment: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(c) = trimmed.strip_prefix("# -- ") {
            comment = Some(c.to_owned());
            continue;
        }
        if let Some(c) = trimmed.strip_prefix("# ") {
            if let Some(doc) = comment.as_mut() {
                doc.push(' ');
                doc.push_str(c);
            }
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            comment = None;
            continue;
        }
        if trimmed.starts_with("- ") {
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        path.retain(|(i, _)| *i < indent);
        path.push((indent, key.to_owned()));
        if let Some(doc) = comment.take() {
            let keys: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
            let default = keys.iter().fold(&values, |v, k| &v[*k]);
            out.push((keys.join("."), default.to_string(), doc));
        }
    }
    out
}

/// Every value of values.yaml is documented, and the README's table lists exactly those, with
/// their defaults and descriptions (regenerate with TETHER_BLESS=1).
#[test]
fn the_readme_parameter_table_is_values_yaml() {
    let params = parameters();
    let text = std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml");
    let values: Value = yaml_serde::from_str(&text).expect("values.yaml parses");
    // Every leaf (and every map that is a value itself) is under a documented key.
    fn leaves(v: &Value, at: String, out: &mut Vec<String>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    leaves(x, p, out);
                }
            }
            _ => out.push(at),
        }
    }
    let mut all = Vec::new();
    leaves(&values, String::new(), &mut all);
    for leaf in &all {
        assert!(
            params
                .iter()
                .any(|(p, _, _)| leaf == p || leaf.starts_with(&format!("{p}."))),
            "values.yaml: {leaf} has no `# --` comment"
        );
    }
    let mut table = String::from("| parameter | default | description |\n|---|---|---|\n");
    for (p, d, doc) in &params {
        table.push_str(&format!(
            "| `{p}` | `{}` | {} |\n",
            d.replace('|', "\\|"),
            doc.replace('|', "\\|")
        ));
    }
    let readme_path = chart().join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let (begin, end) = ("<!-- parameters -->\n", "<!-- /parameters -->");
    let start = readme
        .find(begin)
        .expect("README.md has <!-- parameters -->")
        + begin.len();
    let stop = readme
        .find(end)
        .expect("README.md has <!-- /parameters -->");
    if readme[start..stop] != table {
        if std::env::var_os("TETHER_BLESS").is_some() {
            let updated = format!("{}{table}{}", &readme[..start], &readme[stop..]);
            std::fs::write(&readme_path, updated).expect("write README.md");
        } else {
            panic!(
                "charts/tether/README.md's table is not values.yaml's: run this test with TETHER_BLESS=1 to regenerate it.\nExpected:\n{table}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// helm install / upgrade / uninstall on the real apiserver.

struct Installed {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    admin: kube::Client,
    helm: PathBuf,
    dir: tempfile::TempDir,
}

impl Installed {
    /// Runs helm against the test apiserver; panics with its output when it fails.
    fn helm(&self, args: &[&str]) -> String {
        let out = Command::new(&self.helm)
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .output()
            .expect("helm");
        assert!(
            out.status.success(),
            "helm {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The release's DaemonSet as the apiserver stores it.
    fn daemonset(&self) -> DaemonSet {
        self.rt
            .block_on(
                Api::<DaemonSet>::namespaced(self.admin.clone(), "tether-system").get("tether"),
            )
            .expect("the release's DaemonSet")
    }

    /// A kubeconfig for the chart's ServiceAccount: a token from the TokenRequest API, the
    /// admin kubeconfig's server and CA.
    fn service_account_kubeconfig(&self, sa: &str) -> PathBuf {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        let req: TokenRequest = serde_json::from_value(json!({
            "spec": {"audiences": [], "expirationSeconds": 3600}
        }))
        .expect("TokenRequest");
        let token = self
            .rt
            .block_on(
                Api::<ServiceAccount>::namespaced(self.admin.clone(), "tether-system")
                    .create_token_request(sa, &PostParams::default(), &req),
            )
            .expect("TokenRequest for the chart's ServiceAccount")
            .status
            .expect("a token")
            .token;
        let admin: Value = yaml_serde::from_str(
            &std::fs::read_to_string(&self.cluster.kubeconfig).expect("kubeconfig"),
        )
        .expect("kubeconfig parses");
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": admin["clusters"][0]["cluster"].clone()}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa,
                          "namespace": "tether-system"}}],
            "current-context": "sa",
        });
        let path = self.dir.path().join(format!("{sa}.kubeconfig"));
        std::fs::write(&path, kc.to_string()).expect("write kubeconfig");
        path
    }

    /// Starts KubeVirt VM `name` (VM and VMI objects) and its launcher pod on node-a: the VM
    /// and the pod's name.
    fn vm(&self, name: &str) -> (tether_e2e::kubevirt::Vm, String) {
        let mut vm = self
            .rt
            .block_on(tether_e2e::kubevirt::Vm::start(
                &self.admin,
                name,
                json!({}),
            ))
            .expect("vm");
        let pod = self
            .rt
            .block_on(vm.launch("node-a", None))
            .expect("launcher");
        (vm, pod)
    }

    /// The policy ConfigMaps (labelled `ipam.tether.dev/policy`) in the release namespace.
    fn policy_configmaps(&self) -> Vec<ConfigMap> {
        self.rt
            .block_on(
                Api::<ConfigMap>::namespaced(self.admin.clone(), "tether-system")
                    .list(&ListParams::default().labels("ipam.tether.dev/policy")),
            )
            .expect("ConfigMaps")
            .items
    }

    fn client_for(&self, kubeconfig: &Path) -> kube::Client {
        self.rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .expect("config");
            kube::Client::try_from(config).expect("client")
        })
    }
}

/// tetherd started as the DaemonSet's container would start: its args, its env (the downward
/// API's values for this node), and, in place of the in-cluster config, a kubeconfig with the
/// ServiceAccount's token.
struct NodeDaemon {
    child: Child,
    log: PathBuf,
    probe: String,
}

impl NodeDaemon {
    fn start(ds: &DaemonSet, node: &str, kubeconfig: &Path, log: PathBuf) -> NodeDaemon {
        let spec = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec");
        let c = spec
            .containers
            .iter()
            .find(|c| c.name == "tetherd")
            .expect("the tetherd container");
        let mut cmd = Command::new(bin_dir().expect("bins").join("tetherd"));
        cmd.args(c.args.as_ref().expect("args"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .env_clear()
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        for e in c.env.as_ref().expect("env") {
            let value = match (
                &e.value,
                e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()),
            ) {
                (Some(v), _) => v.clone(),
                (None, Some(f)) if f.field_path == "spec.nodeName" => node.to_owned(),
                (None, Some(f)) if f.field_path == "metadata.namespace" => {
                    "tether-system".to_owned()
                }
                other => panic!("env {} from {other:?}: not emulated", e.name),
            };
            cmd.env(&e.name, value);
        }
        // The readiness probe, as the kubelet would send it.
        let probe = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP readiness probe");
        let port = match &probe.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            other => panic!("probe port {other:?}"),
        };
        let probe = format!(
            "{}:{port}|{}",
            probe.host.as_deref().expect("the probe's host"),
            probe.path.as_deref().expect("the probe's path")
        );
        let child = cmd.spawn().expect("tetherd");
        NodeDaemon { child, log, probe }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET of the readiness probe: (status, body).
    fn readiness(&self) -> Option<(u16, String)> {
        let path = self.probe.split_once('|')?.1;
        self.get(path)
    }

    /// GET `path` on the probes' listener: the status and the body.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let addr = self.probe.split_once('|')?.0;
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let code = raw.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, raw.split_once("\r\n\r\n")?.1.to_owned()))
    }

    /// Waits until the readiness probe passes; its body.
    fn wait_ready(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("tetherd exited with {status}: {}", self.log());
            }
            if let Some((200, body)) = self.readiness() {
                return serde_json::from_str(&body).expect("readyz JSON");
            }
            assert!(
                Instant::now() < deadline,
                "the readiness probe never passed ({:?}): {}",
                self.readiness(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(mut self) -> String {
        let _ = tether_e2e::send_signal(self.child.id(), "TERM", false);
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for NodeDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon was refused nothing by the API server (the API's refusals say "forbidden").
fn assert_not_refused(log: &str) {
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    assert!(
        refused.is_empty(),
        "tetherd was refused what it calls, with the chart's RBAC:\n{}",
        refused.join("\n")
    );
}

/// The pod `default/name` as the plugin's caller sees it.
fn existing(rt: &tokio::runtime::Runtime, client: &kube::Client, name: &str) -> Pod {
    let p = rt
        .block_on(Api::<KPod>::namespaced(client.clone(), "default").get(name))
        .expect("pod");
    let uid = p.metadata.uid.expect("uid");
    let mut pod = Pod::new("default", name, 0);
    pod.container_id = format!("ctr-{name}-{}", &uid[..8]);
    pod.uid = uid;
    pod
}

fn add(ipam: &Ipam, pod: &Pod) -> String {
    let out = ipam.add(pod).expect("add");
    assert!(out.ok, "ADD {}: {}", pod.name, out.out);
    out.ip().expect("an address")
}

/// `helm install` into the real apiserver; tetherd run as the rendered DaemonSet runs it, with
/// the chart's ServiceAccount token: it becomes ready (caches synced, the chart's policy
/// ConfigMaps loaded), serves the seed's VM pod and a Job's pod, writes what the elected
/// daemon writes; the same token is refused Secrets and writes to Pods. `helm upgrade`
/// (chain order, VM pinning off) takes effect with every allocation kept; `helm uninstall`
/// leaves the CRDs, the pool and the allocations (docs/install.md).
#[test]
fn helm_install_runs_tetherd_with_least_privilege_and_upgrade_keeps_addresses() {
    let test = "helm_install_runs_tetherd_with_least_privilege_and_upgrade_keeps_addresses";
    let Some(helm) = helm(test) else { return };
    let Some((cluster, rt, admin)) = TestCluster::bare(test, false) else {
        return;
    };
    cluster.add_node("node-a").expect("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let env = Installed {
        cluster,
        rt,
        admin,
        helm,
        dir,
    };
    // Without the controller-manager, namespaces get no `default` ServiceAccount: make it, as
    // the ServiceAccount admission wants one for pods.
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
    env.rt
        .block_on(
            Api::<ServiceAccount>::namespaced(env.admin.clone(), "default")
                .create(&PostParams::default(), &sa),
        )
        .expect("ServiceAccount");

    let socket = env.dir.path().join("run/tether.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let chart = chart().display().to_string();
    let common = [
        format!("socketPath={}", socket.display()),
        format!("metrics.port={port}"),
        // Probes and metrics on 127.0.0.1 only: this is a test machine.
        "metrics.enabled=false".to_owned(),
        "gc.intervalSeconds=1".to_owned(),
        "gc.graceSeconds=1".to_owned(),
        "gc.vmGraceSeconds=1".to_owned(),
        "defaultPool.create=true".to_owned(),
        "defaultPool.name=test-ippool".to_owned(),
        "defaultPool.subnet=10.6.0.0/16".to_owned(),
        "defaultPool.gateway=10.6.0.1".to_owned(),
    ]
    .join(",");
    env.helm(&[
        "install",
        "tether",
        &chart,
        "--namespace",
        "tether-system",
        "--create-namespace",
        "--set",
        &common,
        "--set-json",
        r#"defaultPool.ips=["10.6.168.101-10.6.168.110"]"#,
    ]);
    // What helm made: the CRDs (from crds/), the pool, the policy ConfigMaps.
    within(20, "the chart's IPPool is served", || {
        env.rt
            .block_on(Api::<IPPool>::all(env.admin.clone()).get_opt("test-ippool"))
            .ok()
            .flatten()
            .is_some()
    });
    let cms = env.policy_configmaps();
    assert_eq!(cms.len(), 3, "the chart's three policy ConfigMaps");
    env.rt
        .block_on(tether_e2e::kubevirt::install(&env.admin))
        .expect("KubeVirt's CRDs");

    let ds = env.daemonset();
    let sa = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .expect("the DaemonSet's ServiceAccount");
    let kubeconfig = env.service_account_kubeconfig(&sa);
    let mut daemon = NodeDaemon::start(&ds, "node-a", &kubeconfig, env.dir.path().join("a.log"));
    let ready = daemon.wait_ready();
    assert_eq!(
        ready["chain"],
        json!(["kubevirt", "statefulset", "stateless"]),
        "the chain from the chart's ConfigMaps"
    );

    // The seed's VM: its launcher pod gets an address of test-ippool, pinned to the VM.
    let ipam = Ipam::new(&socket, "macvlan-tether", "1.0.0", &["test-ippool"]).expect("ipam");
    let (_vm, launcher) = env.vm("vm-cirros");
    let vm_pod = existing(&env.rt, &env.admin, &launcher);
    let vm_ip = add(&ipam, &vm_pod);
    let objects = || -> Vec<IPAllocation> {
        env.rt
            .block_on(Api::<IPAllocation>::all(env.admin.clone()).list(&ListParams::default()))
            .expect("list")
            .items
    };
    let owner_of = |ip: &str| -> (String, String) {
        let o = objects()
            .into_iter()
            .find(|o| o.spec.address.to_string() == ip)
            .unwrap_or_else(|| panic!("no IPAllocation for {ip}"));
        (o.spec.owner.kind, o.spec.owner.name)
    };
    assert_eq!(
        owner_of(&vm_ip),
        ("VirtualMachine".to_owned(), "default/vm-cirros".to_owned()),
        "the VM's address is pinned to the VM"
    );
    // A Job's pod: the chart grants no access to Jobs, so its owner is known by reference.
    let job: Value = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "backup", "namespace": "default"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "pause"}]}}}});
    let jobs = Api::<kube::api::DynamicObject>::namespaced_with(
        env.admin.clone(),
        "default",
        &kube::api::ApiResource::erase::<k8s_openapi::api::batch::v1::Job>(&()),
    );
    let job = env
        .rt
        .block_on(jobs.create(
            &PostParams::default(),
            &serde_json::from_value(job).expect("job"),
        ))
        .expect("create Job");
    let job_pod: KPod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "backup-x7k2p", "namespace": "default",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "backup",
                "uid": job.metadata.uid.clone().expect("uid"), "controller": true}]},
        "spec": {"nodeName": "node-a", "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "pause"}]}}))
    .expect("pod");
    env.rt
        .block_on(
            Api::<KPod>::namespaced(env.admin.clone(), "default")
                .create(&PostParams::default(), &job_pod),
        )
        .expect("create the Job's pod");
    let job_ip = add(&ipam, &existing(&env.rt, &env.admin, "backup-x7k2p"));
    assert_ne!(job_ip, vm_ip);
    // Its DEL deletes its address object.
    let job_pod_args = existing(&env.rt, &env.admin, "backup-x7k2p");
    let out = ipam.del(&job_pod_args).expect("del");
    assert!(out.ok, "DEL: {}", out.out);
    // A new sandbox of the pod: the refusal to read Jobs is remembered, not asked again.
    let mut again = job_pod_args.clone();
    again.container_id = format!("{}-2", again.container_id);
    add(&ipam, &again);
    let out = ipam.del(&again).expect("del");
    assert!(out.ok, "DEL: {}", out.out);
    let (code, metrics) = daemon.get("/metrics").expect("the metrics");
    assert_eq!(code, 200, "{metrics}");
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.contains("kube_api_calls_total{")
                && l.contains(r#"verb="get""#)
                && l.contains(r#"result="forbidden""#)
        })
        .collect();
    assert_eq!(refused.len(), 1, "one counter of refused reads: {metrics}");
    assert!(
        refused[0].ends_with(" 1"),
        "two ADDs of the Job's pod: one refused read of its Job, not one each: {}",
        refused[0]
    );
    assert!(
        objects()
            .iter()
            .all(|o| o.spec.address.to_string() != job_ip),
        "the Job pod's address is freed by its DEL"
    );

    // A VM deleted: garbage collection frees its address (a conditional delete), leaves an
    // Event in namespace default and deletes its PinnedIdentity record.
    let (gone, gone_pod) = env.vm("vm-gone");
    let gone_ip = add(&ipam, &existing(&env.rt, &env.admin, &gone_pod));
    let pins = Api::<PinnedIdentity>::namespaced(env.admin.clone(), "default");
    within(30, "vm-gone's PinnedIdentity record", || {
        env.rt
            .block_on(pins.get_opt("vm-gone"))
            .ok()
            .flatten()
            .is_some()
    });
    let gone_object = objects()
        .into_iter()
        .find(|o| o.spec.address.to_string() == gone_ip)
        .and_then(|o| o.metadata.name)
        .expect("vm-gone's address object");
    // No kubelet runs: the pod is deleted at once (its DEL never comes; GC's business).
    env.rt
        .block_on(
            Api::<KPod>::namespaced(env.admin.clone(), "default").delete(
                &gone_pod,
                &kube::api::DeleteParams::default().grace_period(0),
            ),
        )
        .expect("delete the launcher pod");
    env.rt.block_on(gone.delete(&[])).expect("delete the VM");
    within(
        60,
        "garbage collection frees the deleted VM's address",
        || {
            objects()
                .iter()
                .all(|o| o.spec.address.to_string() != gone_ip)
        },
    );
    within(30, "the release Event in namespace default", || {
        env.rt
            .block_on(
                Api::<k8s_openapi::api::core::v1::Event>::namespaced(env.admin.clone(), "default")
                    .list(&ListParams::default()),
            )
            .map(|l| {
                l.items.iter().any(|e| {
                    e.involved_object.kind.as_deref() == Some("IPAllocation")
                        && e.involved_object.name.as_deref() == Some(gone_object.as_str())
                })
            })
            .unwrap_or(false)
    });
    within(30, "vm-gone's PinnedIdentity record is deleted", || {
        env.rt
            .block_on(pins.get_opt("vm-gone"))
            .ok()
            .flatten()
            .is_none()
    });

    // A broken update of a policy ConfigMap (its digest no longer matches) is refused with an
    // Event on the ConfigMap (events.k8s.io), and the chain in force keeps serving.
    let cm_api = Api::<ConfigMap>::namespaced(env.admin.clone(), "tether-system");
    let good_sha = env
        .rt
        .block_on(cm_api.get("tether-policy-stateless"))
        .expect("ConfigMap")
        .data
        .expect("data")["sha256"]
        .clone();
    let set_sha = |sha: &str| {
        env.rt
            .block_on(cm_api.patch(
                "tether-policy-stateless",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"sha256": sha}})),
            ))
            .expect("patch the ConfigMap");
    };
    set_sha(&"0".repeat(64));
    within(30, "the refusal Event on the ConfigMap", || {
        env.rt
            .block_on(
                Api::<k8s_openapi::api::events::v1::Event>::namespaced(
                    env.admin.clone(),
                    "tether-system",
                )
                .list(&ListParams::default()),
            )
            .map(|l| {
                l.items.iter().any(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("tether-policy-stateless")
                })
            })
            .unwrap_or(false)
    });
    let (code, body) = daemon.readiness().expect("readiness");
    assert_eq!(code, 200, "the last good chain keeps serving: {body}");
    // ...and decides: an ordinary pod still gets an ephemeral address from it.
    let plain: KPod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "plain", "namespace": "default"},
        "spec": {"nodeName": "node-a", "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "pause"}]}}))
    .expect("pod");
    env.rt
        .block_on(
            Api::<KPod>::namespaced(env.admin.clone(), "default")
                .create(&PostParams::default(), &plain),
        )
        .expect("create pod");
    let plain = existing(&env.rt, &env.admin, "plain");
    let plain_ip = add(&ipam, &plain);
    assert_eq!(owner_of(&plain_ip).0, "Ephemeral");
    assert!(ipam.del(&plain).expect("del").ok);
    set_sha(&good_sha);

    // An IPAMClaim made as KubeVirt's ipam-extensions makes it: the daemon reads the claim
    // the launcher pod names (get) and writes the claim's status (update).
    {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let text = std::fs::read_to_string(repo_root().join("tests/fixtures/ipamclaims.crd.yaml"))
            .expect("the IPAMClaim CRD fixture");
        let crd: CustomResourceDefinition = yaml_serde::from_str(&text).expect("CRD yaml");
        env.rt
            .block_on(
                Api::<CustomResourceDefinition>::all(env.admin.clone())
                    .create(&PostParams::default(), &crd),
            )
            .expect("create the IPAMClaim CRD");
        let claims = Api::<kube::api::DynamicObject>::namespaced_with(
            env.admin.clone(),
            "default",
            &kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk("k8s.cni.cncf.io", "v1alpha1", "IPAMClaim"),
                "ipamclaims",
            ),
        );
        within(20, "the IPAMClaim CRD serves", || {
            env.rt.block_on(claims.list(&ListParams::default())).is_ok()
        });
        let mut cvm = env
            .rt
            .block_on(tether_e2e::kubevirt::Vm::start(
                &env.admin,
                "vm-claimed",
                json!({}),
            ))
            .expect("vm");
        let claim: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1alpha1", "kind": "IPAMClaim",
            "metadata": {"name": "vm-claimed.tenant", "namespace": "default",
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "name": cvm.name, "uid": cvm.uid, "controller": true}],
                "labels": {"kubevirt.io/vm": cvm.name}},
            "spec": {"network": "tenant-net", "interface": "net1"}
        }))
        .expect("claim");
        env.rt
            .block_on(claims.create(&PostParams::default(), &claim))
            .expect("create the IPAMClaim");
        let selection = json!({"k8s.v1.cni.cncf.io/networks": json!([{"name": "tenant",
            "namespace": "default", "ipam-claim-reference": "vm-claimed.tenant"}]).to_string()});
        let pod = env
            .rt
            .block_on(cvm.launch_with("node-a", None, selection))
            .expect("launcher");
        let mut attachment = existing(&env.rt, &env.admin, &pod);
        attachment.ifname = "net1".into();
        let tenant = Ipam::new(&socket, "tenant-net", "1.0.0", &["test-ippool"]).expect("ipam");
        let claimed_ip = add(&tenant, &attachment);
        assert_eq!(
            owner_of(&claimed_ip),
            (
                "IPAMClaim".to_owned(),
                "default/vm-claimed.tenant".to_owned()
            )
        );
        within(30, "the claim's status carries the address", || {
            env.rt
                .block_on(claims.get("vm-claimed.tenant"))
                .ok()
                .and_then(|c| c.data.get("status").cloned())
                .is_some_and(|st| st["ips"] == json!([format!("{claimed_ip}/16")]))
        });
    }

    // What only the elected daemon writes, through the chart's RBAC: the Lease, the pool's
    // status, the VM's PinnedIdentity record.
    within(
        30,
        "the pool's status counts the two VMs' addresses",
        || {
            env.rt
                .block_on(Api::<IPPool>::all(env.admin.clone()).get("test-ippool"))
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.allocated_ip_count == 2)
        },
    );
    within(30, "the VM's PinnedIdentity record", || {
        env.rt
            .block_on(
                Api::<PinnedIdentity>::namespaced(env.admin.clone(), "default")
                    .get_opt("vm-cirros"),
            )
            .ok()
            .flatten()
            .is_some()
    });

    // The same token may not read Secrets or write Pods.
    let sa_client = env.client_for(&kubeconfig);
    let forbidden = |what: &str, r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what} with the chart's token: {other:?} (want 403 Forbidden)"),
    };
    forbidden(
        "listing Secrets in the release namespace",
        env.rt
            .block_on(
                Api::<Secret>::namespaced(sa_client.clone(), "tether-system")
                    .list(&ListParams::default()),
            )
            .map(drop),
    );
    forbidden(
        "listing Secrets cluster-wide",
        env.rt
            .block_on(Api::<Secret>::all(sa_client.clone()).list(&ListParams::default()))
            .map(drop),
    );
    let pods = Api::<KPod>::namespaced(sa_client.clone(), "default");
    forbidden(
        "patching a Pod",
        env.rt
            .block_on(pods.patch(
                &launcher,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            ))
            .map(drop),
    );
    forbidden(
        "deleting a Pod",
        env.rt
            .block_on(pods.delete(&launcher, &Default::default()))
            .map(drop),
    );
    forbidden(
        "creating a Pod",
        env.rt
            .block_on(pods.create(&PostParams::default(), &job_pod))
            .map(drop),
    );
    forbidden(
        "writing a policy ConfigMap",
        env.rt
            .block_on(
                Api::<ConfigMap>::namespaced(sa_client.clone(), "tether-system").patch(
                    "tether-policy-kubevirt",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"data": {"sha256": "0"}})),
                ),
            )
            .map(drop),
    );
    assert_not_refused(&daemon.log());

    // helm upgrade: the chain reordered and VM pinning off; the DaemonSet rolls, so the node's
    // daemon restarts with the new args. No allocation is lost.
    let before: Vec<String> = objects()
        .into_iter()
        .map(|o| {
            serde_json::to_string(&(&o.spec.address, &o.spec.owner, &o.spec.holders)).expect("json")
        })
        .collect();
    env.helm(&[
        "upgrade",
        "tether",
        &chart,
        "--namespace",
        "tether-system",
        "--reuse-values",
        "--set",
        "policies.chain={statefulset,kubevirt,stateless},ipam.enableKubevirtStaticIP=false",
    ]);
    let ds2 = env.daemonset();
    // An address object written without its identity label (as an older tetherd wrote them):
    // the newly elected daemon labels it (a patch).
    let vm_object = objects()
        .into_iter()
        .find(|o| o.spec.address.to_string() == vm_ip)
        .and_then(|o| o.metadata.name)
        .expect("the VM's address object");
    let allocations = Api::<IPAllocation>::all(env.admin.clone());
    let old_log = daemon.stop();
    env.rt
        .block_on(allocations.patch(
            &vm_object,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {tether_kube::crd::IDENTITY_LABEL: null}}}),
            ),
        ))
        .expect("unlabel");
    assert!(!old_log.contains("panicked"), "{old_log}");
    assert_not_refused(&old_log);
    let mut daemon = NodeDaemon::start(&ds2, "node-a", &kubeconfig, env.dir.path().join("a2.log"));
    let ready = daemon.wait_ready();
    assert_eq!(
        ready["chain"],
        json!(["statefulset", "stateless"]),
        "the new order, kubevirt left out"
    );
    let after: Vec<String> = objects()
        .into_iter()
        .map(|o| {
            serde_json::to_string(&(&o.spec.address, &o.spec.owner, &o.spec.holders)).expect("json")
        })
        .collect();
    assert_eq!(before, after, "the upgrade changed or lost an allocation");
    within(
        30,
        "the unlabelled address object is labelled again",
        || {
            env.rt
                .block_on(allocations.get(&vm_object))
                .ok()
                .and_then(|o| o.metadata.labels)
                .is_some_and(|l| l.contains_key(tether_kube::crd::IDENTITY_LABEL))
        },
    );
    // The running VM's pod keeps its address on a repeated ADD (the runtime's retry)...
    assert_eq!(add(&ipam, &vm_pod), vm_ip);
    // ...and a new VM's pod is now an ordinary pod: its address is ephemeral.
    let (_vm2, launcher2) = env.vm("vm-two");
    let vm2_ip = add(&ipam, &existing(&env.rt, &env.admin, &launcher2));
    assert_eq!(
        owner_of(&vm2_ip).0,
        "Ephemeral",
        "with VM pinning off a VM pod's address is not pinned"
    );

    // helm uninstall: the daemons, RBAC and policy ConfigMaps go; the CRDs, the pool and every
    // allocation stay (docs/install.md, "Uninstall").
    assert_not_refused(&daemon.stop());
    let held: HashSet<String> = objects()
        .into_iter()
        .map(|o| o.spec.address.to_string())
        .collect();
    env.helm(&["uninstall", "tether", "--namespace", "tether-system"]);
    within(20, "the DaemonSet is gone", || {
        env.rt
            .block_on(
                Api::<DaemonSet>::namespaced(env.admin.clone(), "tether-system").get_opt("tether"),
            )
            .ok()
            .flatten()
            .is_none()
    });
    let cms = env.policy_configmaps();
    assert!(cms.is_empty(), "the policy ConfigMaps go with the release");
    let kept: HashSet<String> = objects()
        .into_iter()
        .map(|o| o.spec.address.to_string())
        .collect();
    assert_eq!(kept, held, "uninstall must leave every allocation");
    assert!(
        env.rt
            .block_on(Api::<IPPool>::all(env.admin.clone()).get_opt("test-ippool"))
            .expect("get pool")
            .is_some(),
        "the pool stays (helm.sh/resource-policy: keep)"
    );
}
