//! `GET /v1/health`: open to everyone, says whether the database, the completion cache and
//! the vLLM answer and which workers were seen recently. 200 when the database is up (the
//! body says `degraded` when the cache or vLLM is not), 503 when it is not.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use std::time::Duration;

use chrono::Utc;

use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;

/// What `/v1/health` says. Without a key (when keys are on) only `status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `degraded` (cache or a vLLM down) or `unavailable` (database down).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<Component>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<Component>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vllm: Option<Vec<VllmHealth>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkersHealth>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Component {
    pub backend: &'static str,
    pub up: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VllmHealth {
    pub url: String,
    pub up: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkersHealth {
    /// Workers that heartbeated in the last 30 s; null when the database is down.
    pub alive: Option<usize>,
}

/// A worker counts as alive when it heartbeated within this window.
pub const WORKER_ALIVE_S: i64 = 30;

/// Database, cache, vLLM and workers; open to everyone (only up or down without a key).
#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "ops",
    security((), ("bearer" = [])),
    responses(
        (status = 200, body = Health, description = "The database is up"),
        (status = 503, body = Health, description = "The database is down"),
    )
)]
pub async fn health(State(state): State<AppState>, caller: crate::auth::Caller) -> Response {
    let database = state.store.ping().await;
    if matches!(caller, crate::auth::Caller::Anonymous) {
        // Keys are on and none was given: up or down, nothing about the fleet.
        let up = database.is_ok();
        let body = Health {
            status: if up { "ok" } else { "unavailable" },
            database: None,
            cache: None,
            vllm: None,
            workers: None,
        };
        return crate::error::health(up, Json(body));
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
        vllm.push(VllmHealth {
            url: u.base_url().to_owned(),
            up: ok,
        });
    }
    let degraded = cache.is_err() || vllm.iter().any(|v| !v.up);
    let body = Health {
        status: match (up, degraded) {
            (false, _) => "unavailable",
            (true, true) => "degraded",
            (true, false) => "ok",
        },
        database: Some(Component {
            backend: state.store.backend(),
            up,
        }),
        cache: Some(Component {
            backend: state.cache.backend(),
            up: cache.is_ok(),
        }),
        vllm: Some(vllm),
        workers: Some(WorkersHealth { alive }),
    };
    crate::error::health(up, Json(body))
}
