//! The daemon's socket API. Input: one byte choosing the route, then the request body.
//!
//! The body is decoded as tetherd's http.rs `decode` does (`serde_json::from_slice` into the
//! route's type, whatever the Content-Type), then handed to the [`Engine`] the daemon serves:
//! its own checks (environment, addresses, the GC list) and, for what passes, the policy chain
//! (the built-in one) and the allocation, committed to an embedded store in a temporary
//! directory. State carries over from one input to the next, so sequences of ADD, DEL, CHECK,
//! GC and release are explored. After every call: the writer is healthy and no address is
//! recorded twice.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use tether_api::{CniRequest, ReleaseRequest};
use tether_core::pool::{Pool, from_manifest};
use tether_engine::ports::{NoWorkloads, PolicyChain};
use tether_engine::{Engine, Metrics, Ports};
use tether_policy::{Chain, ChainEntry, Runtime, RuntimeConfig};
use tether_store::embedded::EmbeddedStore;

struct Env {
    engine: Arc<Engine>,
    tokio: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn pools() -> Vec<Pool> {
    let manifests = [
        serde_json::json!({"apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "fuzz-v4"},
            "spec": {"subnet": "10.77.0.0/24", "gateway": "10.77.0.1", "default": true,
                "routes": [{"dst": "0.0.0.0/0"}]}}),
        serde_json::json!({"apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "fuzz-v6"},
            "spec": {"subnet": "fd77::/120", "default": true}}),
        serde_json::json!({"apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "fuzz-small"},
            "spec": {"subnet": "10.78.0.0/16", "ips": ["10.78.0.10-10.78.0.12"]}}),
    ];
    manifests
        .iter()
        .map(|m| from_manifest(m).expect("the fuzz pools are valid"))
        .collect()
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // scripts/fuzz.sh gives a directory it removes afterwards (libFuzzer exits without
        // dropping statics); else tmpfs when there is one: the store fsyncs every commit.
        let base = std::env::var_os("TETHER_FUZZ_TMP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let shm = std::path::Path::new("/dev/shm");
                if shm.is_dir() {
                    shm.to_owned()
                } else {
                    std::env::temp_dir()
                }
            });
        let dir = tempfile::Builder::new()
            .prefix("tether-fuzz-api")
            .tempdir_in(base)
            .expect("a temporary directory");
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("the store opens");
        let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).expect("the runtime"));
        let entries = tether_builtins::BUILTINS
            .iter()
            .map(|b| ChainEntry {
                policy: runtime
                    .load(&format!("builtin:{}", b.name), b.wasm)
                    .expect("a built-in loads"),
                settings: Vec::new(),
            })
            .collect();
        let chain = Chain::new(entries).expect("the built-in chain");
        let (engine, _writer) = Engine::start(
            Ports {
                store: Arc::new(store),
                workloads: (Arc::new(NoWorkloads), false),
                policies: Arc::new(PolicyChain { runtime, chain }),
            },
            pools(),
            Arc::new(Metrics::new()),
        )
        .expect("the engine starts");
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Env {
            engine: Arc::new(engine),
            tokio,
            _dir: dir,
        }
    })
}

/// One input.
pub fn one(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let env = env();
    let engine = &env.engine;
    // http.rs: a body that does not decode is answered 400 with code 6 before the engine.
    let outcome = env.tokio.block_on(async {
        match route % 5 {
            4 => match serde_json::from_slice::<ReleaseRequest>(body) {
                Ok(req) => engine.release(req).await.map(drop).map_err(Some),
                Err(_) => Err(None),
            },
            r => match serde_json::from_slice::<CniRequest>(body) {
                Ok(req) => match r {
                    0 => engine.add(req).await.map(|res| {
                        assert!(!res.ips.is_empty(), "an ADD answered no address");
                    }),
                    1 => engine.del(req).await,
                    2 => engine.check(&req),
                    _ => engine.gc(req).await.map(drop),
                }
                .map_err(Some),
                Err(_) => Err(None),
            },
        }
    });
    if let Err(Some(e)) = &outcome {
        // Every engine error maps to a CNI code and a message (http.rs `ApiError`).
        assert!(!e.to_string().is_empty());
        assert!(!e.reason().is_empty());
    }
    if let Some(why) = engine.unready_reason() {
        panic!("a request left the daemon unready: {why}");
    }
    let mut seen = HashSet::new();
    for a in engine.allocations() {
        assert!(
            seen.insert(a.ip),
            "address {} recorded twice (pool {})",
            a.ip,
            a.pool
        );
        assert!(
            a.holders.len() <= 2,
            "{} has {} holders",
            a.ip,
            a.holders.len()
        );
    }
}
