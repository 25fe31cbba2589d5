//! `GET /v1/health`: open to everyone, says whether the database answers and which workers
//! were seen recently. 200 when the database is up, 503 when it is not.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;

use crate::AppState;

/// A worker counts as alive when it heartbeated within this window.
const WORKER_ALIVE_S: i64 = 30;

pub async fn health(State(state): State<AppState>) -> Response {
    let database = state.store.ping().await;
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
    let body = serde_json::json!({
        "status": if up { "ok" } else { "unavailable" },
        "database": {"backend": state.store.backend(), "up": up},
        "workers": {"alive": alive},
    });
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
