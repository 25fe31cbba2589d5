//! `GET /v1/health`: open to everyone, says whether the database, the completion cache and
//! the vLLM answer and which workers were seen recently. 200 when the database is up (the
//! body says `degraded` when the cache or vLLM is not), 503 when it is not.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::Duration;

use chrono::Utc;

use crate::AppState;

/// A worker counts as alive when it heartbeated within this window.
pub const WORKER_ALIVE_S: i64 = 30;

pub async fn health(State(state): State<AppState>, caller: crate::auth::Caller) -> Response {
    let database = state.store.ping().await;
    if matches!(caller, crate::auth::Caller::Anonymous) {
        // Keys are on and none was given: up or down, nothing about the fleet.
        let up = database.is_ok();
        let status = if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::json!({"status": if up { "ok" } else { "unavailable" }});
        return (status, Json(body)).into_response();
    }
    let workers = match &database {
        Ok(()) => state.store.list_workers().await.ok(),
        Err(_) => None,
    };
    let alive = workers.as_ref().map(|ws| {
        ws.iter()
            .filter(|w| {
                w.state != "stopped" && (Utc::now() - w.heartbeat_at).num_seconds() < WORKER_ALIVE_S
            })
            .count()
    });
    let up = database.is_ok();
    let cache = state.cache.ping().await;
    let mut vllm = Vec::new();
    for u in state.backends.iter().flat_map(|b| b.all()) {
        let ok = tokio::time::timeout(Duration::from_secs(2), u.get("/health"))
            .await
            .is_ok_and(|r| r.is_ok());
        vllm.push(serde_json::json!({"url": u.base_url(), "up": ok}));
    }
    let degraded = cache.is_err() || vllm.iter().any(|v| v["up"] == false);
    let body = serde_json::json!({
        "status": match (up, degraded) {
            (false, _) => "unavailable",
            (true, true) => "degraded",
            (true, false) => "ok",
        },
        "database": {"backend": state.store.backend(), "up": up},
        "cache": {"backend": state.cache.backend(), "up": cache.is_ok()},
        "vllm": vllm,
        "workers": {"alive": alive},
    });
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
