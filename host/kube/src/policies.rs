//! Kubernetes mode's policy source: policy components shipped in ConfigMaps, compiled and put
//! in force without a restart.
//!
//! # What a policy ConfigMap holds
//!
//! A ConfigMap in the daemon's namespace, labelled [`POLICY_LABEL`] (any value; `tetherd
//! policy export --configmaps` writes the policy's name), with the component's bytes under
//! `binaryData.policy.wasm` ([`COMPONENT_KEY`]) and, optionally, their sha256 as 64 hex digits
//! under `data.sha256` ([`SHA256_KEY`]). The chain names it `configmap:NAME`; its order, the
//! settings and the VM and StatefulSet switches stay daemon configuration.
//!
//! # Expected flow
//!
//! One watch of the labelled ConfigMaps of the namespace. For each version of a ConfigMap the
//! chain names: check the digest when one is given, compile the component (once per sha256:
//! the runtime's cache; an unchanged component is not compiled again), assemble the chain with
//! it and put the chain in force ([`SwappableChain::replace`]). Evaluations that started on the
//! previous chain finish on it.
//!
//! # Guarantees
//!
//! - The daemon is not ready, and an ADD answers "try again later", until every ConfigMap of
//!   the chain has been loaded once ([`SwappableChain`]'s [`Decide::unready`]).
//! - A version that cannot be used (no component, a digest that does not match, bytes that are
//!   not a component, precompiled code, too large, an import beyond the contract, another
//!   contract version, a name already in the chain) is refused: a Warning Event on the
//!   ConfigMap, an error in the log and `tether_policy_reloads_total{source,result}` name it,
//!   and the chain in force keeps serving.
//! - Precompiled code is never accepted: the bytes must be a WebAssembly component, compiled
//!   here ([`tether_policy::Runtime::load`]).
//!
//! # Caveats
//!
//! A ConfigMap deleted after it was loaded leaves its last loaded version in force (logged):
//! removing a policy is a change of the chain, i.e. of the daemon's configuration. A version
//! is judged once, by its `resourceVersion`: a refused one is not retried until it changes.
//!
//! [`Decide::unready`]: tether_engine::ports::Decide::unready

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tether_engine::Metrics;
use tether_engine::ports::SwappableChain;
use tether_policy::digest::sha256_hex;
use tether_policy::{Chain, ChainEntry, LoadedPolicy, PolicyError, Settings};
use thiserror::Error;

/// The label that marks a policy ConfigMap (the watch selects on it).
pub const POLICY_LABEL: &str = "ipam.tether.dev/policy";
/// The `binaryData` key of the component.
pub const COMPONENT_KEY: &str = "policy.wasm";
/// The `data` key of the component's sha256 (optional).
pub const SHA256_KEY: &str = "sha256";
/// The controller named by the Events this source posts.
pub const EVENT_CONTROLLER: &str = "ipam.tether.dev/tetherd";
/// Longest Event note the API accepts.
const MAX_NOTE: usize = 1024;

/// Why a version of a policy ConfigMap was refused.
#[derive(Debug, Error)]
pub enum ConfigMapError {
    /// No component under `binaryData.policy.wasm`.
    #[error(
        "no binaryData key {COMPONENT_KEY:?} (found binaryData keys {binary:?}, data keys {data:?}); \
         the component goes in binaryData, e.g. `kubectl create configmap NAME --from-file={COMPONENT_KEY}=policy.wasm`"
    )]
    MissingComponent {
        /// The `binaryData` keys found.
        binary: Vec<String>,
        /// The `data` keys found.
        data: Vec<String>,
    },
    /// `data.sha256` is not a sha256.
    #[error("data.{SHA256_KEY} {declared:?} is not a sha256 (64 hex digits)")]
    BadDigest {
        /// What it says.
        declared: String,
    },
    /// The component's bytes are not the ones `data.sha256` names.
    #[error("the component's sha256 is {actual}, but data.{SHA256_KEY} says {declared}: refused")]
    DigestMismatch {
        /// What `data.sha256` says.
        declared: String,
        /// The component's.
        actual: String,
    },
    /// The runtime refused the component, or the chain refused the policy.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl ConfigMapError {
    /// A stable short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigMapError::MissingComponent { .. } => "missing_component",
            ConfigMapError::BadDigest { .. } => "bad_sha256",
            ConfigMapError::DigestMismatch { .. } => "sha256_mismatch",
            ConfigMapError::Policy(e) => e.reason(),
        }
    }
}

/// The component of a policy ConfigMap and its sha256, checked against `data.sha256` when
/// the ConfigMap gives one.
pub fn component(cm: &ConfigMap) -> Result<(&[u8], String), ConfigMapError> {
    let Some(bytes) = cm.binary_data.as_ref().and_then(|b| b.get(COMPONENT_KEY)) else {
        return Err(ConfigMapError::MissingComponent {
            binary: keys(cm.binary_data.as_ref()),
            data: keys(cm.data.as_ref()),
        });
    };
    let actual = sha256_hex(&bytes.0);
    if let Some(declared) = cm.data.as_ref().and_then(|d| d.get(SHA256_KEY)) {
        let declared = declared.trim();
        let normal = declared.to_ascii_lowercase();
        let hex = normal.len() == 64 && normal.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex {
            return Err(ConfigMapError::BadDigest {
                declared: declared.chars().take(80).collect(),
            });
        }
        if normal != actual {
            return Err(ConfigMapError::DigestMismatch {
                declared: normal,
                actual,
            });
        }
    }
    Ok((&bytes.0, actual))
}

fn keys<V>(m: Option<&BTreeMap<String, V>>) -> Vec<String> {
    m.map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// One place of the chain.
#[derive(Debug, Clone)]
pub enum Slot {
    /// A policy loaded at start (built in, or from a file).
    Fixed(ChainEntry),
    /// The policy of ConfigMap `name`, with its settings.
    ConfigMap {
        /// The ConfigMap's name.
        name: String,
        /// The policy's settings.
        settings: Settings,
    },
}

/// What the chain is made of.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    /// The places of the chain, in order.
    pub slots: Vec<Slot>,
    /// Policy names left out of the chain whatever their source (`--enable-kubevirt-static-ip
    /// false` leaves out `kubevirt`, also when it comes from a ConfigMap).
    pub disabled: Vec<String>,
}

impl ChainSpec {
    /// The ConfigMaps the chain names, in order.
    pub fn configmaps(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::ConfigMap { name, .. } => Some(name.as_str()),
                Slot::Fixed(_) => None,
            })
            .collect()
    }

    /// The chain, with each ConfigMap's policy taken from `loaded`; `Ok(Err(missing))` names
    /// the ConfigMaps not loaded yet.
    pub fn assemble(
        &self,
        loaded: &HashMap<String, Arc<LoadedPolicy>>,
    ) -> Result<Result<Chain, Vec<String>>, PolicyError> {
        let mut entries = Vec::with_capacity(self.slots.len());
        let mut missing = Vec::new();
        for slot in &self.slots {
            match slot {
                Slot::Fixed(e) => entries.push(e.clone()),
                Slot::ConfigMap { name, settings } => match loaded.get(name) {
                    Some(p) if self.disabled.contains(&p.metadata.name) => {}
                    Some(p) => entries.push(ChainEntry {
                        policy: p.clone(),
                        settings: settings.clone(),
                    }),
                    None => missing.push(name.clone()),
                },
            }
        }
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        Chain::new(entries).map(Ok)
    }
}

/// Where the policies come from and what they feed.
pub struct ConfigMapPolicies {
    client: kube::Client,
    api: Api<ConfigMap>,
    namespace: String,
    /// The Events' reporting instance: the node.
    node: String,
    spec: ChainSpec,
    chain: Arc<SwappableChain>,
    metrics: Arc<Metrics>,
    /// The last good policy of each ConfigMap.
    loaded: HashMap<String, Arc<LoadedPolicy>>,
    /// The `resourceVersion` last judged, per ConfigMap.
    judged: HashMap<String, String>,
}

impl ConfigMapPolicies {
    /// A source of the ConfigMaps `spec` names, in `namespace`, feeding `chain` (which waits
    /// until each has loaded once). `node` names this daemon in the Events it posts.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        node: &str,
        spec: ChainSpec,
        chain: Arc<SwappableChain>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let source = ConfigMapPolicies {
            api: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            spec,
            chain,
            metrics,
            loaded: HashMap::new(),
            judged: HashMap::new(),
        };
        source
            .chain
            .still_waiting(source.waiting_for(&source.missing()));
        source
    }

    fn missing(&self) -> Vec<String> {
        self.spec
            .configmaps()
            .into_iter()
            .filter(|n| !self.loaded.contains_key(*n))
            .map(str::to_owned)
            .collect()
    }

    fn waiting_for(&self, missing: &[String]) -> String {
        format!(
            "waiting for the policy ConfigMaps {} in namespace {} (labelled {POLICY_LABEL})",
            missing.join(", "),
            self.namespace
        )
    }

    /// Watches the labelled ConfigMaps until the watch ends (never, short of the runtime).
    pub async fn run(mut self) {
        let config = watcher::Config::default().labels(POLICY_LABEL);
        let mut stream = watcher::watcher(self.api.clone(), config)
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Apply(cm) | Event::InitApply(cm)) => self.judge(cm).await,
                Ok(Event::Delete(cm)) => self.deleted(&cm),
                Ok(Event::InitDone) => {
                    let missing = self.missing();
                    if !missing.is_empty() {
                        let why = self.waiting_for(&missing);
                        tracing::warn!(namespace = %self.namespace, missing = ?missing, "not ready: {why}");
                    }
                }
                Ok(Event::Init) => {}
                Err(e) => {
                    tracing::warn!(namespace = %self.namespace, "policy ConfigMap watch failed; retrying: {e}");
                }
            }
        }
    }

    fn deleted(&mut self, cm: &ConfigMap) {
        let name = cm.metadata.name.clone().unwrap_or_default();
        self.judged.remove(&name);
        if self.loaded.contains_key(&name) {
            tracing::warn!(
                configmap = %name,
                namespace = %self.namespace,
                "policy ConfigMap deleted (or unlabelled); its last loaded version stays in the chain"
            );
        }
    }

    /// Judges one version of a ConfigMap: puts the chain with it in force, or refuses it.
    async fn judge(&mut self, cm: ConfigMap) {
        let name = cm.metadata.name.clone().unwrap_or_default();
        if !self.spec.configmaps().contains(&name.as_str()) {
            tracing::debug!(configmap = %name, "policy ConfigMap not in the chain; ignored");
            return;
        }
        let version = cm.metadata.resource_version.clone().unwrap_or_default();
        if self.judged.get(&name) == Some(&version) {
            return;
        }
        self.judged.insert(name.clone(), version.clone());
        let source = format!("configmap:{name}");
        match self.try_load(&name, &source, &cm).await {
            Ok((policy, chain, compiled)) => {
                self.metrics.policy_reload(&source, "ok");
                let missing = self.missing_after(&name);
                self.loaded.insert(name.clone(), policy.clone());
                match chain {
                    Some(chain) => {
                        let names: Vec<String> =
                            chain.names().into_iter().map(str::to_owned).collect();
                        self.chain.replace(chain);
                        self.forget_unused();
                        tracing::info!(
                            configmap = %name,
                            resource_version = %version,
                            policy = %policy.metadata.name,
                            sha256 = %policy.sha256,
                            compiled,
                            chain = ?names,
                            "policy chain put in force"
                        );
                    }
                    None => {
                        self.chain.still_waiting(self.waiting_for(&missing));
                        tracing::info!(
                            configmap = %name,
                            policy = %policy.metadata.name,
                            sha256 = %policy.sha256,
                            missing = ?missing,
                            "policy loaded; the chain waits for the other ConfigMaps"
                        );
                    }
                }
            }
            Err(e) => {
                self.metrics.policy_reload(&source, e.reason());
                tracing::error!(
                    configmap = %name,
                    namespace = %self.namespace,
                    resource_version = %version,
                    reason = e.reason(),
                    "policy ConfigMap refused; the chain in force keeps serving: {e}"
                );
                self.post_refusal(&cm, &e).await;
            }
        }
    }

    /// The ConfigMaps still missing once `name` is loaded.
    fn missing_after(&self, name: &str) -> Vec<String> {
        self.missing().into_iter().filter(|n| n != name).collect()
    }

    /// Checks and compiles the ConfigMap's component and assembles the chain with it: the
    /// policy, the chain when nothing else is missing, and whether it was compiled (not cached).
    async fn try_load(
        &self,
        name: &str,
        source: &str,
        cm: &ConfigMap,
    ) -> Result<(Arc<LoadedPolicy>, Option<Chain>, bool), ConfigMapError> {
        let (bytes, sha256) = component(cm)?;
        let runtime = self.chain.runtime().clone();
        let compiled = !runtime.is_cached(&sha256);
        let bytes = bytes.to_vec();
        let label = source.to_owned();
        // Compiling takes a while (Cranelift): off the async workers.
        let policy = tokio::task::spawn_blocking(move || runtime.load(&label, &bytes))
            .await
            .map_err(|e| PolicyError::Engine(format!("compiling task: {e}")))??;
        let mut loaded = self.loaded.clone();
        loaded.insert(name.to_owned(), policy.clone());
        let chain = self.spec.assemble(&loaded)?.ok();
        Ok((policy, chain, compiled))
    }

    /// Drops compiled versions no longer in any ConfigMap's last good policy. Fixed policies
    /// stay cached: they are never loaded again, and live on in the chain.
    fn forget_unused(&self) {
        let mut keep: HashSet<&str> = self.loaded.values().map(|p| p.sha256.as_str()).collect();
        for slot in &self.spec.slots {
            if let Slot::Fixed(e) = slot {
                keep.insert(e.policy.sha256.as_str());
            }
        }
        self.chain
            .runtime()
            .retain_cached(|sha256| keep.contains(sha256));
    }

    /// Posts a Warning Event on the ConfigMap (events.k8s.io/v1). A failure to post is logged.
    async fn post_refusal(&self, cm: &ConfigMap, e: &ConfigMapError) {
        let name = cm.metadata.name.clone().unwrap_or_default();
        let event = refusal_event(cm, &self.node, e);
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Err(err) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(configmap = %name, namespace = %self.namespace, "posting the refusal Event: {err}");
        }
    }
}

/// The Warning Event that says why a version of `cm` was refused, reported by `node`.
pub fn refusal_event(cm: &ConfigMap, node: &str, e: &ConfigMapError) -> KubeEvent {
    let name = cm.metadata.name.clone().unwrap_or_default();
    let mut note = format!(
        "{e} (reason {}); the chain in force keeps serving",
        e.reason()
    );
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    KubeEvent {
        metadata: ObjectMeta {
            // As kubectl shows Events: the object's name and a unique suffix (the API server
            // refuses a `generateName` ending in a dot).
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: cm.metadata.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some("PolicyRefused".into()),
        action: Some("LoadPolicy".into()),
        note: Some(note),
        reporting_controller: Some(EVENT_CONTROLLER.into()),
        reporting_instance: Some(node.chars().take(128).collect()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(name),
            namespace: cm.metadata.namespace.clone(),
            uid: cm.metadata.uid.clone(),
            resource_version: cm.metadata.resource_version.clone(),
            ..ObjectReference::default()
        }),
        ..KubeEvent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn cm(bytes: Option<&[u8]>, sha: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("tether-system".into()),
                ..ObjectMeta::default()
            },
            binary_data: bytes
                .map(|b| BTreeMap::from([(COMPONENT_KEY.to_owned(), ByteString(b.to_vec()))])),
            data: sha.map(|s| BTreeMap::from([(SHA256_KEY.to_owned(), s.to_owned())])),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn the_component_is_checked_against_its_digest() {
        let sha = sha256_hex(b"abc");
        let plain = cm(Some(b"abc"), None);
        let (bytes, found) = component(&plain).expect("no digest");
        assert_eq!((bytes, found.as_str()), (&b"abc"[..], sha.as_str()));
        component(&cm(Some(b"abc"), Some(&sha))).expect("matching digest");
        component(&cm(
            Some(b"abc"),
            Some(&format!(" {}\n", sha.to_uppercase())),
        ))
        .expect("a digest as sha256sum or a person writes it");
        let e = component(&cm(Some(b"abd"), Some(&sha))).expect_err("mismatch");
        assert_eq!(e.reason(), "sha256_mismatch");
        assert!(e.to_string().contains(&sha), "{e}");
        let e = component(&cm(Some(b"abc"), Some("sha256:abc"))).expect_err("not a digest");
        assert_eq!(e.reason(), "bad_sha256");
    }

    #[test]
    fn a_component_outside_binary_data_is_refused_with_a_hint() {
        let mut c = cm(None, None);
        c.data = Some(BTreeMap::from([(
            COMPONENT_KEY.to_owned(),
            "AGFzbQ==".into(),
        )]));
        let e = component(&c).expect_err("missing");
        assert_eq!(e.reason(), "missing_component");
        let text = e.to_string();
        assert!(
            text.contains("data keys [\"policy.wasm\"]") && text.contains("--from-file"),
            "{text}"
        );
    }

    #[test]
    fn refusal_events_name_the_configmap_and_fit_the_api() {
        let mut c = cm(Some(b"x"), None);
        c.metadata.uid = Some("u-1".into());
        let e = ConfigMapError::Policy(PolicyError::Refused {
            policy: "p".into(),
            message: "é".repeat(800),
        });
        let ev = refusal_event(&c, "node-a", &e);
        let regarding = ev.regarding.expect("regarding");
        assert_eq!(
            (regarding.kind.as_deref(), regarding.name.as_deref()),
            (Some("ConfigMap"), Some("p"))
        );
        assert_eq!(regarding.uid.as_deref(), Some("u-1"));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert!(ev.note.expect("note").len() <= MAX_NOTE);
        assert_eq!(ev.metadata.namespace.as_deref(), Some("tether-system"));
    }

    fn builtin(rt: &tether_policy::Runtime, name: &str) -> Arc<LoadedPolicy> {
        let b = tether_builtins::builtin(name).expect("built-in");
        rt.load(name, b.wasm).expect("loads")
    }

    #[test]
    fn the_chain_waits_for_every_configmap_and_honours_the_switches() {
        let rt =
            tether_policy::Runtime::new(tether_policy::RuntimeConfig::default()).expect("runtime");
        let fixed = |name: &str| {
            Slot::Fixed(ChainEntry {
                policy: builtin(&rt, name),
                settings: Vec::new(),
            })
        };
        let from = |name: &str| Slot::ConfigMap {
            name: name.into(),
            settings: vec![("k".into(), "v".into())],
        };
        let spec = ChainSpec {
            slots: vec![from("vm"), fixed("statefulset"), from("custom")],
            disabled: vec!["kubevirt".into()],
        };
        assert_eq!(spec.configmaps(), ["vm", "custom"]);
        let mut loaded = HashMap::new();
        let missing = spec.assemble(&loaded).expect("no error");
        assert_eq!(missing.expect_err("waits"), ["vm", "custom"]);
        loaded.insert("vm".to_owned(), builtin(&rt, "kubevirt"));
        loaded.insert("custom".to_owned(), builtin(&rt, "stateless"));
        let chain = spec.assemble(&loaded).expect("no error").expect("complete");
        assert_eq!(
            chain.names(),
            ["statefulset", "stateless"],
            "kubevirt is switched off"
        );
        assert_eq!(
            chain.entries()[1].settings,
            [("k".to_owned(), "v".to_owned())]
        );
        // A ConfigMap whose policy has a name already in the chain is refused.
        loaded.insert("custom".to_owned(), builtin(&rt, "statefulset"));
        let e = spec.assemble(&loaded).expect_err("duplicate");
        assert_eq!(e.reason(), "bad_metadata");
    }
}
