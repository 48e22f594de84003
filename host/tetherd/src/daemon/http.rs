//! The HTTP/JSON API on the unix socket. Errors are translated to CNI codes here, once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tether_api::{CniRequest, ErrorBody, codes};
use tether_core::alloc::AllocError;
use tether_store::StoreError;

use tether_engine::writer::WriteError;
use tether_engine::{Engine, EngineError};

type AppState = Arc<Engine>;

/// The error answer of every route.
pub struct ApiError(StatusCode, ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn body(code: u32, msg: String) -> ErrorBody {
    ErrorBody {
        code,
        msg,
        details: String::new(),
    }
}

impl From<&EngineError> for ApiError {
    fn from(e: &EngineError) -> Self {
        let msg = e.to_string();
        let (status, code) = match e {
            EngineError::Write(WriteError::Alloc(a)) => match a {
                AllocError::PoolExhausted { .. } => (StatusCode::CONFLICT, codes::POOL_EXHAUSTED),
                AllocError::UnknownPool { .. }
                | AllocError::PoolNotAllowed { .. }
                | AllocError::NoPool
                | AllocError::AddressNotInPool { .. }
                | AllocError::BadAnnotation { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, codes::BAD_POOL_SELECTION)
                }
                AllocError::AddressInUse { .. } | AllocError::StillHeld { .. } => {
                    (StatusCode::CONFLICT, codes::ADDRESS_IN_USE)
                }
                AllocError::NotAllocated { .. } => {
                    (StatusCode::NOT_FOUND, codes::UNKNOWN_CONTAINER)
                }
                AllocError::IdentityBusy { .. } | AllocError::SelectorUnknown { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, codes::TRY_AGAIN)
                }
                AllocError::NoDecision => (StatusCode::INTERNAL_SERVER_ERROR, codes::POLICY_FAILED),
            },
            // The store does not answer now: the kubelet's retry will do (code 11).
            EngineError::Write(WriteError::Store(StoreError::Unavailable(_))) => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::TRY_AGAIN)
            }
            EngineError::Write(WriteError::Store(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, codes::STORE_FAILURE)
            }
            EngineError::Write(
                WriteError::Stopped | WriteError::Abandoned | WriteError::Contended { .. },
            )
            | EngineError::NotSynced
            | EngineError::WorkloadUnknown(_)
            | EngineError::PoliciesNotLoaded(_)
            | EngineError::Changed(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::TRY_AGAIN),
            EngineError::Policy(_) => (StatusCode::UNPROCESSABLE_ENTITY, codes::POLICY_FAILED),
            EngineError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::INVALID_CONFIG),
            EngineError::MissingEnv(_) => (StatusCode::BAD_REQUEST, codes::INVALID_ENV),
            EngineError::Unknown(_) => (StatusCode::NOT_FOUND, codes::UNKNOWN_CONTAINER),
            EngineError::Mismatch(_) => (StatusCode::CONFLICT, codes::CHECK_MISMATCH),
            EngineError::Unavailable(_) | EngineError::NotElected(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::NOT_AVAILABLE)
            }
        };
        ApiError(status, body(code, msg))
    }
}

/// Decodes a request body whatever its Content-Type says (curl users forget it).
fn decode<T: serde::de::DeserializeOwned>(raw: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            body(
                codes::DECODE_FAILURE,
                format!("request body is not {what}: {e}"),
            ),
        )
    })
}

const CNI_REQUEST: &str = "a CNI request";

fn done<T>(svc: &Engine, command: &str, r: Result<T, EngineError>) -> Result<T, ApiError> {
    match r {
        Ok(v) => {
            svc.metrics.call(command, "ok");
            Ok(v)
        }
        Err(e) => {
            svc.metrics.call(command, e.reason());
            tracing::warn!(command, reason = e.reason(), "{e}");
            Err(ApiError::from(&e))
        }
    }
}

async fn add(
    State(s): State<AppState>,
    raw: Bytes,
) -> Result<Json<tether_api::CniResult>, ApiError> {
    let req: CniRequest = decode(&raw, CNI_REQUEST)?;
    let r = s.add(req).await;
    done(&s, "add", r).map(Json)
}

async fn del(State(s): State<AppState>, raw: Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let req: CniRequest = decode(&raw, CNI_REQUEST)?;
    let r = s.del(req).await;
    done(&s, "del", r).map(|_| Json(serde_json::json!({})))
}

async fn check(State(s): State<AppState>, raw: Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let req: CniRequest = decode(&raw, CNI_REQUEST)?;
    let r = s.check(&req);
    done(&s, "check", r).map(|_| Json(serde_json::json!({})))
}

async fn gc(State(s): State<AppState>, raw: Bytes) -> Result<Json<tether_api::GcResult>, ApiError> {
    let req: CniRequest = decode(&raw, CNI_REQUEST)?;
    let r = s.gc(req).await;
    done(&s, "gc", r).map(Json)
}

#[derive(Deserialize)]
struct StatusQuery {
    #[serde(default)]
    pools: String,
}

async fn status(
    State(s): State<AppState>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let pools: Vec<String> = q
        .pools
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let r = s.status(&pools);
    done(&s, "status", r).map(|_| Json(serde_json::json!({})))
}

async fn reconcile(
    State(s): State<AppState>,
) -> Result<Json<tether_api::ReconcileResult>, ApiError> {
    let r = s.reconcile().await;
    done(&s, "reconcile", r).map(Json)
}

async fn release(
    State(s): State<AppState>,
    raw: Bytes,
) -> Result<Json<tether_api::ReconcileResult>, ApiError> {
    let req = decode(&raw, r#"{"pool": ..., "ip": ..., "force": false}"#)?;
    let r = s.release(req).await;
    done(&s, "release", r).map(Json)
}

async fn gc_report(State(s): State<AppState>) -> Json<tether_api::GcReport> {
    Json(s.gc_report())
}

async fn pools(State(s): State<AppState>) -> Json<tether_api::PoolList> {
    Json(s.pools())
}

async fn allocations(State(s): State<AppState>) -> Json<Vec<tether_core::alloc::Allocation>> {
    Json(s.allocations())
}

/// Ready while the writer runs and its last commit succeeded, the workload caches have
/// synced and the policy chain is in force: otherwise 503 with the reason, so the kubelet (or
/// `tetherd wait`) sees it.
async fn ready(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let unready = s.unready_reason();
    let ready = unready.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({"ready": ready, "chain": s.chain_names()});
    if let Some(why) = unready {
        body["reason"] = why.into();
    }
    (status, Json(body))
}

/// Alive while the engine's writer thread runs: 503 once it has ended (a panic), so the
/// kubelet's liveness probe restarts the daemon. A store outage only makes it unready.
async fn healthz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.alive() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the writer has stopped (see the log); restart tetherd",
        )
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics_text(),
    )
}

/// The read-only endpoints `--metrics-address` serves over TCP: probes and metrics, nothing
/// that allocates, releases or lists allocations.
pub fn public_router(s: AppState) -> Router {
    Router::new()
        .route("/readyz", get(ready))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(s)
}

pub fn router(s: AppState) -> Router {
    Router::new()
        .route("/v1/cni/add", post(add))
        .route("/v1/cni/del", post(del))
        .route("/v1/cni/check", post(check))
        .route("/v1/cni/gc", post(gc))
        .route("/v1/cni/status", get(status))
        .route("/v1/reconcile", post(reconcile))
        .route("/v1/release", post(release))
        .route("/v1/pools", get(pools))
        .route("/v1/gc", get(gc_report))
        .route("/v1/allocations", get(allocations))
        .route("/readyz", get(ready))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    use tether_core::decision::Decision;
    use tether_core::pool::{IpPoolSpec, Pool};
    use tether_core::workload::PolicyRequest;
    use tether_engine::ports::{Decide, NoWorkloads};
    use tether_engine::{Metrics, Ports};
    use tether_policy::{ChainOutcome, PolicyError};
    use tether_store::contract::Switched;
    use tether_store::embedded::EmbeddedStore;

    struct Fresh;

    impl Decide for Fresh {
        fn decide(&self, _: &PolicyRequest) -> Result<ChainOutcome, PolicyError> {
            Ok(ChainOutcome {
                decision: Decision::Ephemeral,
                decided_by: Some("fresh".into()),
                steps: Vec::new(),
            })
        }
        fn names(&self) -> Vec<String> {
            vec!["fresh".into()]
        }
    }

    fn add(container: &str) -> CniRequest {
        CniRequest {
            container_id: container.into(),
            ifname: "eth0".into(),
            network: "net".into(),
            cni_version: "1.1.0".into(),
            pools: vec!["p".into()],
            ..CniRequest::default()
        }
    }

    /// `/healthz` answers 200 while the writer runs and 503 once its thread has died (so that
    /// the kubelet restarts the daemon); `/readyz` fails with it.
    #[tokio::test]
    async fn healthz_fails_once_the_writer_has_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Switched::new(
            EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"),
        ));
        let pool = Pool::new(
            "p",
            &IpPoolSpec {
                subnet: "10.0.0.0/24".into(),
                ips: vec!["10.0.0.1-10.0.0.9".into()],
                ..IpPoolSpec::default()
            },
        )
        .expect("pool");
        let (engine, _thread) = Engine::start(
            Ports {
                store: store.clone(),
                workloads: (Arc::new(NoWorkloads), false),
                policies: Arc::new(Fresh),
            },
            vec![pool],
            Arc::new(Metrics::new()),
        )
        .expect("engine");
        let engine = Arc::new(engine);
        engine.add(add("c1")).await.expect("an ADD while healthy");
        assert_eq!(healthz(State(engine.clone())).await.0, StatusCode::OK);
        assert_eq!(ready(State(engine.clone())).await.0, StatusCode::OK);

        store.panic_on_commit.store(true, Ordering::SeqCst);
        assert!(engine.add(add("c2")).await.is_err());
        let mut status = StatusCode::OK;
        for _ in 0..200 {
            status = healthz(State(engine.clone())).await.0;
            if status != StatusCode::OK {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "a dead writer still answers /healthz 200"
        );
        assert_eq!(
            ready(State(engine.clone())).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
