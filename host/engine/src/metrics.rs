//! Prometheus metrics: CNI calls and allocation failures by reason, policy latency and
//! reloads, store commits, pool capacity and usage.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of a CNI call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `add`, `del`, ...
    pub command: String,
    /// `ok` or the failure reason.
    pub result: String,
}

/// Labels of a policy evaluation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The policy.
    pub policy: String,
}

/// Labels of a pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The pool.
    pub pool: String,
}

/// Labels of a pool reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of a policy reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyReloadLabels {
    /// Where the policy came from, as the chain names it (`configmap:NAME`).
    pub source: String,
    /// `ok`, or why it was refused (`invalid_module`, `sha256_mismatch`, ...).
    pub result: String,
}

/// Labels of a watched Kubernetes resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// `apiVersion/Kind`, e.g. `v1/Pod`.
    pub resource: String,
}

/// Labels of a Kubernetes API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// `create`, `replace`, `delete`, `get`.
    pub verb: String,
    /// `ok`, `conflict`, `not_found` or `error`.
    pub result: String,
}

/// Labels of what garbage collection freed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcLabels {
    /// `pod-gone`, `node-lost` or `rule-fired`.
    pub reason: String,
    /// `released` or `holder-dropped`.
    pub action: String,
}

/// Labels of a garbage collection pass.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcPassLabels {
    /// `ok`, `not-elected`, `not-synced`, `unreachable` or `cannot-judge`.
    pub result: String,
}

/// Every metric the daemon exports, registered under the `tether_` prefix.
pub struct Metrics {
    registry: Registry,
    /// Pool reloads by result (`ok`, `error`).
    pub pool_reloads: Family<ReloadLabels, Counter>,
    /// Policy reloads (Kubernetes mode: a ConfigMap of the chain changed) by source and result.
    pub policy_reloads: Family<PolicyReloadLabels, Counter>,
    /// CNI calls by command and result (`ok` or the failure reason).
    pub calls: Family<CallLabels, Counter>,
    /// Policy evaluation latency.
    pub policy_seconds: Family<PolicyLabels, Histogram>,
    /// Store commit latency.
    pub commit_seconds: Histogram,
    /// Requests per store commit.
    pub batch_size: Histogram,
    /// Writes that found their address changed by another writer (and were planned again).
    pub conflicts: Counter,
    /// Re-plans after a conflict that waited a jittered moment first.
    pub conflict_waits: Counter,
    /// Allocatable addresses per pool.
    pub pool_total: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// Allocated addresses per pool.
    pub pool_allocated: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// Kubernetes mode: objects in each watch cache.
    pub kube_cache_objects: Family<ResourceLabels, Gauge>,
    /// Kubernetes mode: 1 once a watch cache has listed, by resource.
    pub kube_cache_synced: Family<ResourceLabels, Gauge>,
    /// Kubernetes mode: API calls of the store and the workload source by verb and result.
    pub kube_api_calls: Family<ApiLabels, Counter>,
    /// Garbage collection: what it freed, by reason and action.
    pub gc_released: Family<GcLabels, Counter>,
    /// Garbage collection passes by result.
    pub gc_passes: Family<GcPassLabels, Counter>,
    /// Garbage collection: findings waiting for their grace period.
    pub gc_suspects: Gauge,
    /// Connections to the API socket refused because the peer's uid (SO_PEERCRED) is not
    /// allowed.
    pub api_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "cni_requests",
            "CNI calls by command and result",
            calls.clone(),
        );
        let policy_seconds = Family::<PolicyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(5e-6, 2.0, 16))
        });
        registry.register(
            "policy_evaluation_seconds",
            "Policy evaluation latency",
            policy_seconds.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(5e-5, 2.0, 16));
        registry.register(
            "store_commit_seconds",
            "Durable store commit latency",
            commit_seconds.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register(
            "store_batch_requests",
            "Requests per store commit",
            batch_size.clone(),
        );
        let pool_total = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "pool_addresses_total",
            "Allocatable addresses per pool",
            pool_total.clone(),
        );
        let pool_allocated = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "pool_addresses_allocated",
            "Allocated addresses per pool",
            pool_allocated.clone(),
        );
        let pool_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "pool_reloads",
            "Reloads of the pool manifests by result",
            pool_reloads.clone(),
        );
        let policy_reloads = Family::<PolicyReloadLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Loads of a policy of the chain from its source (a ConfigMap) by source and result",
            policy_reloads.clone(),
        );
        let conflicts = Counter::default();
        registry.register(
            "store_conflicts",
            "Writes that found their address changed by another writer first",
            conflicts.clone(),
        );
        let conflict_waits = Counter::default();
        registry.register(
            "store_conflict_waits",
            "Requests that conflicted again and waited a random moment before their next plan",
            conflict_waits.clone(),
        );
        let kube_cache_objects = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "kube_cache_objects",
            "Objects in each watch cache (Kubernetes mode)",
            kube_cache_objects.clone(),
        );
        let kube_cache_synced = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "kube_cache_synced",
            "1 once a watch cache has listed (Kubernetes mode)",
            kube_cache_synced.clone(),
        );
        let kube_api_calls = Family::<ApiLabels, Counter>::default();
        registry.register(
            "kube_api_calls",
            "Kubernetes API calls of the store and the workload source by verb and result",
            kube_api_calls.clone(),
        );
        let gc_released = Family::<GcLabels, Counter>::default();
        registry.register(
            "gc_released",
            "What garbage collection freed, by reason and action",
            gc_released.clone(),
        );
        let gc_passes = Family::<GcPassLabels, Counter>::default();
        registry.register(
            "gc_passes",
            "Garbage collection passes by result",
            gc_passes.clone(),
        );
        let gc_suspects = Gauge::default();
        registry.register(
            "gc_suspects",
            "Addresses or holders that look leaked and wait for their grace period",
            gc_suspects.clone(),
        );
        let api_refused = Counter::default();
        registry.register(
            "api_refused_connections",
            "Connections to the API socket refused because the peer (SO_PEERCRED) is not root",
            api_refused.clone(),
        );
        Metrics {
            registry,
            api_refused,
            gc_released,
            gc_passes,
            gc_suspects,
            kube_cache_objects,
            kube_cache_synced,
            kube_api_calls,
            conflicts,
            conflict_waits,
            pool_reloads,
            policy_reloads,
            calls,
            policy_seconds,
            commit_seconds,
            batch_size,
            pool_total,
            pool_allocated,
        }
    }

    /// Counts one CNI call.
    pub fn call(&self, command: &str, result: &str) {
        self.calls
            .get_or_create(&CallLabels {
                command: command.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one pool reload.
    pub fn pool_reload(&self, result: &str) {
        self.pool_reloads
            .get_or_create(&ReloadLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one policy reload from `source`: `ok` or the reason it was refused.
    pub fn policy_reload(&self, source: &str, result: &str) {
        self.policy_reloads
            .get_or_create(&PolicyReloadLabels {
                source: source.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one Kubernetes API call.
    pub fn kube_api_call(&self, verb: &str, result: &str) {
        self.kube_api_calls
            .get_or_create(&ApiLabels {
                verb: verb.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one garbage collection pass.
    pub fn gc_pass(&self, result: &str) {
        self.gc_passes
            .get_or_create(&GcPassLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}
