//! The engine, the compile cache and one evaluation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use tether_core::{Decision, PolicyRequest};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, Trap,
};

use crate::bindings::{Level, Policy, PolicyPre, tether};
use crate::digest::sha256_hex;
use crate::error::{PolicyError, truncate};
use crate::semaphore::Semaphore;
use crate::{Settings, convert};

/// The contract version this host speaks (wit/policy.wit).
pub const CONTRACT_VERSION: &str = "0.1.0";
const PACKAGE: &str = "tether:policy";
/// Interfaces a policy may import: the contract's own.
const ALLOWED_IMPORTS: &[&str] = &["types", "host"];
/// Longest log line kept from a guest.
const MAX_LOG_LINE: usize = 4096;
/// Lines kept from a guest per evaluation.
const MAX_LOG_LINES: u32 = 64;
/// Longest refusal message kept from a guest.
const MAX_REFUSAL: usize = 1024;

/// Limits and sizing of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Time limit (wall clock) of one evaluation.
    pub timeout: Duration,
    /// Most linear memory one evaluation may use, in bytes.
    pub memory_limit: usize,
    /// Most evaluations at once; more wait.
    pub max_concurrent: usize,
    /// How often the epoch advances: the deadline's resolution.
    pub epoch_tick: Duration,
    /// Pre-reserve instance slots (pooling allocator) for faster instantiation.
    pub pooling: bool,
    /// Bytes of each pooled linear memory reset in place (instead of returned to the kernel)
    /// between evaluations.
    pub keep_resident: usize,
    /// Opt-in (default off): reset pooled memory with Linux's `PAGEMAP_SCAN` ioctl, which finds
    /// the pages an evaluation dirtied and resets only those, so a policy whose memory grows
    /// keeps more of it resident. Used only where the kernel has it (Linux 6.7+); elsewhere
    /// the setting does nothing.
    ///
    /// **Risk: only for nodes without swap.** The scan looks for dirty pages that are
    /// *present*; a dirty page that was swapped out between two evaluations is neither reset
    /// nor released (an open wasmtime report), so the next evaluation in that slot can read
    /// what the previous one wrote, which breaks the promise of a fresh instance per
    /// evaluation. wasmtime itself ships it off by default and calls it still under
    /// evaluation.
    pub pagemap_scan: bool,
    /// Largest component accepted, in bytes: a bigger one is refused before it is compiled
    /// ([`PolicyError::TooLarge`]). The default, 1 MiB, is also the most a ConfigMap holds;
    /// the built-in policies are about 40 KiB.
    pub max_component_bytes: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            timeout: Duration::from_millis(100),
            memory_limit: 16 << 20,
            max_concurrent: 16,
            epoch_tick: Duration::from_millis(5),
            pooling: true,
            // Covers a policy built as this repository builds them (64 KiB shadow stack, data,
            // the SDK's 64 KiB arena): reset in place, never faulted in again.
            keep_resident: 1024 << 10,
            pagemap_scan: false,
            max_component_bytes: 1 << 20,
        }
    }
}

impl RuntimeConfig {
    /// Whether this kernel offers the `PAGEMAP_SCAN` ioctl, i.e. whether
    /// [`pagemap_scan`](Self::pagemap_scan) would take effect here.
    pub fn pagemap_scan_available() -> bool {
        PoolingAllocationConfig::is_pagemap_scan_available()
    }
}

/// What a policy says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyMetadata {
    /// Name, unique in a chain.
    pub name: String,
    /// Its own version.
    pub version: String,
    /// What it does.
    pub description: String,
}

/// A compiled, checked, pre-instantiated policy.
pub struct LoadedPolicy {
    /// Its metadata.
    pub metadata: PolicyMetadata,
    /// sha256 of the component bytes, hex.
    pub sha256: String,
    /// The contract version it exports.
    pub contract: String,
    pre: PolicyPre<HostState>,
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("metadata", &self.metadata)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// A request converted to the contract's types once, for several evaluations.
pub struct Prepared(crate::bindings::wit::Request);

impl Prepared {
    /// Converts a request.
    pub fn new(request: &PolicyRequest) -> Self {
        Prepared(convert::request(request, &[]))
    }
}

/// Per-evaluation host state.
struct HostState {
    policy: String,
    memory_limit: usize,
    memory_requested: Option<usize>,
    log_lines: u32,
    last_error: Option<String>,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_requested = Some(desired);
            return Err(wasmtime::format_err!(
                "memory limit of {} bytes reached",
                self.memory_limit
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl tether::policy::types::Host for HostState {}

impl tether::policy::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        if self.log_lines >= MAX_LOG_LINES {
            return;
        }
        self.log_lines += 1;
        let message = truncate(&message, MAX_LOG_LINE);
        let policy = self.policy.as_str();
        match level {
            Level::Debug => tracing::debug!(policy, "{message}"),
            Level::Info => tracing::info!(policy, "{message}"),
            Level::Warn => tracing::warn!(policy, "{message}"),
            Level::Error => {
                tracing::error!(policy, "{message}");
                self.last_error = Some(message);
            }
        }
    }
}

/// Advances the engine's epoch while evaluations run, until dropped. While none runs it
/// sleeps on the semaphore, so an idle daemon does not wake every tick.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration, slots: Arc<Semaphore>) -> Result<Self, PolicyError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tether-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if !slots.wait_busy(Duration::from_millis(200)) {
                        continue;
                    }
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| PolicyError::Engine(format!("starting the epoch thread: {e}")))?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The policy runtime. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    deadline_ticks: u64,
    cache: Mutex<HashMap<String, Arc<LoadedPolicy>>>,
    slots: Arc<Semaphore>,
    _ticker: Ticker,
}

impl Runtime {
    /// Builds the engine and starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, PolicyError> {
        if config.max_concurrent == 0 || config.epoch_tick.is_zero() || config.timeout.is_zero() {
            return Err(PolicyError::Engine(
                "max_concurrent, epoch_tick and timeout must be above zero".into(),
            ));
        }
        let mut wc = Config::new();
        wc.wasm_component_model(true).epoch_interruption(true);
        if config.pooling {
            let n = u32::try_from(config.max_concurrent)
                .map_err(|_| PolicyError::Engine("max_concurrent is too large".into()))?;
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(n)
                .total_core_instances(n * 4)
                .total_memories(n * 2)
                .total_tables(n * 4)
                .max_memory_size(config.memory_limit)
                .linear_memory_keep_resident(config.keep_resident)
                // Off by default: the first `keep_resident` bytes are cleared in place and the
                // rest is released to the kernel, whatever the pages' state (see the field).
                .pagemap_scan(if config.pagemap_scan {
                    Enabled::Auto
                } else {
                    Enabled::No
                })
                .table_keep_resident(64 << 10);
            wc.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            if config.pagemap_scan {
                tracing::warn!(
                    available = RuntimeConfig::pagemap_scan_available(),
                    "policy memory is reset with PAGEMAP_SCAN: safe only on nodes without swap"
                );
            }
        }
        let engine = Engine::new(&wc).map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        Policy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
        let tick = config.epoch_tick.as_nanos().max(1);
        let deadline_ticks = u64::try_from(config.timeout.as_nanos().div_ceil(tick))
            .unwrap_or(u64::MAX)
            .max(1);
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        let ticker = Ticker::start(engine.clone(), config.epoch_tick, slots.clone())?;
        Ok(Runtime {
            slots,
            engine,
            linker,
            config,
            deadline_ticks,
            cache: Mutex::new(HashMap::new()),
            _ticker: ticker,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles, checks and pre-instantiates a component, once per sha256. `source` names it in
    /// errors until its metadata is known (a file name, `builtin:kubevirt`, a ConfigMap key).
    /// A component over [`RuntimeConfig::max_component_bytes`] is refused before anything else.
    pub fn load(&self, source: &str, bytes: &[u8]) -> Result<Arc<LoadedPolicy>, PolicyError> {
        if bytes.len() > self.config.max_component_bytes {
            return Err(PolicyError::TooLarge {
                policy: source.to_owned(),
                size: bytes.len(),
                limit: self.config.max_component_bytes,
            });
        }
        let sha256 = sha256_hex(bytes);
        if let Some(p) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&sha256)
        {
            return Ok(p.clone());
        }
        let component = compile(&self.engine, source, bytes)?;
        // The contract first: a component of another contract version imports that version's
        // interfaces too, and "built against 0.2.0" says more than "imports host@0.2.0".
        let contract = check_exports(&self.engine, &component, source)?;
        check_imports(&self.engine, &component, source)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(PolicyPre::new)
            .map_err(|e| PolicyError::ContractMismatch {
                policy: source.to_owned(),
                found: format!("{PACKAGE}@{contract} with other shapes ({e:#})"),
                supported: CONTRACT_VERSION.to_owned(),
            })?;
        let metadata = self.call_metadata(source, &pre)?;
        let policy = Arc::new(LoadedPolicy {
            metadata,
            sha256: sha256.clone(),
            contract,
            pre,
        });
        tracing::info!(
            policy = %policy.metadata.name,
            version = %policy.metadata.version,
            sha256 = %policy.sha256,
            source,
            "policy loaded"
        );
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sha256, policy.clone());
        Ok(policy)
    }

    /// Whether the component of this sha256 is compiled and cached: [`load`](Self::load)
    /// would return it without compiling.
    pub fn is_cached(&self, sha256: &str) -> bool {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(sha256)
    }

    /// Drops the compiled policies whose sha256 `keep` refuses, so that a daemon whose
    /// policies are replaced again and again does not keep every version compiled. A policy
    /// still in a chain stays alive through its `Arc`; it is only compiled again if loaded again.
    pub fn retain_cached(&self, keep: impl Fn(&str) -> bool) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|sha256, _| keep(sha256));
    }

    fn store(&self, policy: &str) -> Store<HostState> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                policy: policy.to_owned(),
                memory_limit: self.config.memory_limit,
                memory_requested: None,
                log_lines: 0,
                last_error: None,
            },
        );
        store.limiter(|s| s);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        store
    }

    fn call_metadata(
        &self,
        source: &str,
        pre: &PolicyPre<HostState>,
    ) -> Result<PolicyMetadata, PolicyError> {
        let _permit = self.slots.acquire();
        let mut store = self.store(source);
        let meta = pre
            .instantiate(&mut store)
            .and_then(|p| p.tether_policy_evaluator().call_metadata(&mut store))
            .map_err(|e| self.classify(e, store.data()))?;
        let name = meta.name;
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(PolicyError::BadMetadata {
                policy: source.to_owned(),
                reason: format!(
                    "metadata name {:?} must be 1-63 characters of a-z, 0-9 and -",
                    truncate(&name, 80)
                ),
            });
        }
        Ok(PolicyMetadata {
            name,
            version: truncate(&meta.version, 64),
            description: truncate(&meta.description, 1024),
        })
    }

    /// Evaluates one policy for one workload in a fresh instance.
    pub fn evaluate(
        &self,
        policy: &LoadedPolicy,
        request: &PolicyRequest,
        settings: &Settings,
    ) -> Result<Decision, PolicyError> {
        let mut input = Prepared::new(request);
        self.evaluate_prepared(policy, &mut input, settings)
    }

    /// Evaluates with an input already converted to the contract's types, so a chain converts
    /// the workload once for all its policies.
    pub fn evaluate_prepared(
        &self,
        policy: &LoadedPolicy,
        input: &mut Prepared,
        settings: &Settings,
    ) -> Result<Decision, PolicyError> {
        let name = &policy.metadata.name;
        input.0.settings.clone_from(settings);
        let _permit = self.slots.acquire();
        let mut store = self.store(name);
        let outcome = policy.pre.instantiate(&mut store).and_then(|p| {
            p.tether_policy_evaluator()
                .call_evaluate(&mut store, &input.0)
        });
        match outcome {
            Ok(Ok(d)) => {
                let d = convert::decision(d);
                d.validate().map_err(|e| PolicyError::InvalidDecision {
                    policy: name.clone(),
                    reason: e.to_string(),
                })?;
                Ok(d)
            }
            Ok(Err(message)) => Err(PolicyError::Refused {
                policy: name.clone(),
                message: truncate(&message, MAX_REFUSAL),
            }),
            Err(e) => Err(self.classify(e, store.data())),
        }
    }

    /// Turns a wasmtime error into a typed one, using what the host state saw.
    fn classify(&self, e: wasmtime::Error, state: &HostState) -> PolicyError {
        let policy = state.policy.clone();
        if let Some(requested) = state.memory_requested {
            return PolicyError::MemoryLimit {
                policy,
                requested,
                limit: self.config.memory_limit,
            };
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PolicyError::Timeout {
                policy,
                limit: self.config.timeout,
            },
            Some(trap) => PolicyError::Trap {
                policy,
                trap: trap.to_string(),
                message: state.last_error.clone(),
            },
            None => PolicyError::Trap {
                policy,
                trap: truncate(&format!("{e:#}"), MAX_REFUSAL),
                message: state.last_error.clone(),
            },
        }
    }
}

pub(crate) fn compile(
    engine: &Engine,
    source: &str,
    bytes: &[u8],
) -> Result<Component, PolicyError> {
    let invalid = |reason: String| PolicyError::InvalidModule {
        policy: source.to_owned(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(invalid(
            "the file does not start with the WebAssembly magic bytes (precompiled .cwasm files are never accepted)".into(),
        ));
    }
    if !wasmtime::wasmparser::Parser::is_component(bytes) {
        return Err(invalid(
            "this is a core WebAssembly module, not a component: wrap it with `wasm-tools component new` (see docs/policy-authoring.md)".into(),
        ));
    }
    Component::new(engine, bytes).map_err(|e| invalid(format!("{e:#}")))
}

/// Splits `tether:policy/host@0.1.0` into (`tether:policy`, `host`, `0.1.0`).
pub(crate) fn split_name(name: &str) -> Option<(&str, &str, &str)> {
    let (path, version) = name.split_once('@')?;
    let (package, iface) = path.split_once('/')?;
    Some((package, iface, version))
}

/// Same semver class as [`CONTRACT_VERSION`]: equal major, and equal minor while major is 0.
/// A version that is not semver is not compatible.
fn compatible(version: &str) -> bool {
    match (
        semver::Version::parse(version),
        semver::Version::parse(CONTRACT_VERSION),
    ) {
        (Ok(v), Ok(ours)) => v.major == ours.major && (ours.major != 0 || v.minor == ours.minor),
        _ => false,
    }
}

fn check_imports(engine: &Engine, c: &Component, source: &str) -> Result<(), PolicyError> {
    for (name, _item) in c.component_type().imports(engine) {
        let allowed = split_name(name).is_some_and(|(pkg, iface, v)| {
            pkg == PACKAGE && ALLOWED_IMPORTS.contains(&iface) && compatible(v)
        });
        if !allowed {
            return Err(PolicyError::ForbiddenImport {
                policy: source.to_owned(),
                import: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// Finds the `tether:policy/evaluator@X` export and checks X.
fn check_exports(engine: &Engine, c: &Component, source: &str) -> Result<String, PolicyError> {
    let mut found = Vec::new();
    for (name, item) in c.component_type().exports(engine) {
        if let Some((PACKAGE, "evaluator", version)) = split_name(name) {
            if matches!(item.ty, ComponentItem::ComponentInstance(_)) && version == CONTRACT_VERSION
            {
                return Ok(version.to_owned());
            }
            if compatible(version) {
                // Same contract class, other patch: bindings look up the exact name, so say so.
                found.push(format!(
                    "{name} (this tetherd looks up @{CONTRACT_VERSION})"
                ));
            } else {
                found.push(name.to_owned());
            }
        }
    }
    Err(PolicyError::ContractMismatch {
        policy: source.to_owned(),
        found: if found.is_empty() {
            "nothing (no tether:policy/evaluator export)".into()
        } else {
            found.join(", ")
        },
        supported: CONTRACT_VERSION.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        assert_eq!(
            split_name("tether:policy/host@0.1.0"),
            Some(("tether:policy", "host", "0.1.0"))
        );
        assert_eq!(
            split_name("wasi:cli/environment@0.2.0"),
            Some(("wasi:cli", "environment", "0.2.0"))
        );
        assert_eq!(split_name("log"), None);
        assert!(compatible("0.1.0"));
        assert!(compatible("0.1.7"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("1.1.0"));
        assert!(compatible("0.1.2-rc.1+build"));
        assert!(!compatible("junk"));
        assert!(!compatible("0.1"), "WIT package versions are full semver");
    }

    #[test]
    fn bad_bytes_are_invalid_modules() {
        let rt = Runtime::new(RuntimeConfig::default()).expect("runtime");
        for bytes in [&b""[..], b"garbage!", b"\x7fELF\x02\x01\x01\0\0\0\0\0"] {
            let e = rt.load("x.wasm", bytes).expect_err("refused");
            assert!(matches!(e, PolicyError::InvalidModule { .. }), "{e}");
        }
        // A valid core module (not a component) gets the hint to wrap it.
        let core = b"\0asm\x01\0\0\0";
        let e = rt.load("core.wasm", core).expect_err("refused");
        assert!(e.to_string().contains("not a component"), "{e}");
    }

    #[test]
    fn oversized_components_are_refused_before_compiling() {
        let rt = Runtime::new(RuntimeConfig {
            max_component_bytes: 16,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let mut big = b"\0asm\x0d\0\x01\0".to_vec();
        big.resize(17, 0);
        let e = rt.load("big.wasm", &big).expect_err("refused");
        assert!(
            matches!(
                e,
                PolicyError::TooLarge {
                    size: 17,
                    limit: 16,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.reason(), "too_large");
        assert!(!rt.is_cached(&sha256_hex(&big)));
    }

    /// A policy's log is bounded: 64 lines per evaluation, each cut to 4 096 bytes; the rest
    /// is dropped (the last error line kept for the failure message is among the first 64).
    #[test]
    fn a_policy_log_is_bounded() {
        use tether::policy::host::Host as _;
        let mut h = HostState {
            policy: "p".into(),
            memory_limit: 1 << 20,
            memory_requested: None,
            log_lines: 0,
            last_error: None,
        };
        h.log(Level::Error, "x".repeat(10_000));
        assert!(
            h.last_error
                .as_ref()
                .is_some_and(|m| m.len() <= MAX_LOG_LINE + 32),
            "{:?}",
            h.last_error.as_ref().map(String::len)
        );
        for i in 1..200 {
            h.log(Level::Error, format!("line {i}"));
        }
        assert_eq!(h.log_lines, MAX_LOG_LINES);
        assert_eq!(
            h.last_error.as_deref(),
            Some(format!("line {}", MAX_LOG_LINES - 1).as_str())
        );
    }
}
