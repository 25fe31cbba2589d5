//! What the SDK sends before and around CLaaS's calls (§2, §6.1, §6.2, §6.12, §6.17): client
//! config, sessions and their heartbeats, telemetry, and server capabilities.

use axum::body::Bytes;
use axum::extract::Path;
use serde::Deserialize;

use crate::*;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/client/config", post(client_config))
        .route(
            "/api/v1/client/dynamic_config",
            post(|| async { ok(json!({})) }),
        )
        .route("/api/v1/create_session", post(create_session))
        .route("/api/v1/session_heartbeat", post(heartbeat))
        .route("/api/v1/sessions/{id}/finish", post(finish))
        .route(
            "/api/v1/telemetry",
            post(|| async { ok(json!({"status": "accepted"})) }),
        )
        .route("/api/v1/get_server_capabilities", get(server_capabilities))
}

/// `{"status": "ok"}`, or 503 while [`crate::Knobs::unhealthy`] is set.
pub(crate) async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    if s.knobs.unhealthy.load(std::sync::atomic::Ordering::SeqCst) {
        return detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "the fake is down (unhealthy knob)",
        );
    }
    ok(json!({"status": "ok"}))
}

/// Every flag at its default except the transport: plain httpx, no pyqwest (§1.4, §11.2).
async fn client_config() -> Response {
    ok(json!({"use_pyqwest_transport": false}))
}

async fn create_session(State(s): State<Arc<Shared>>) -> Response {
    let mut world = s.world();
    let id = format!("fake-session-{}", world.fresh_id());
    world.sessions.insert(id.clone(), Session::default());
    ok(json!({"session_id": id, "type": "create_session"}))
}

#[derive(Deserialize)]
struct SessionRef {
    session_id: String,
}

/// 410 for an expired session stops the SDK's heartbeat loop (§5.4).
async fn heartbeat(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: SessionRef = parse(&body)?;
    let mut world = s.world();
    world.live_session(&req.session_id)?;
    if let Some(session) = world.sessions.get_mut(&req.session_id) {
        session.heartbeats += 1;
    }
    Ok(ok(json!({"type": "session_heartbeat"})))
}

async fn finish(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.world().sessions.get_mut(&id) {
        None => detail(StatusCode::NOT_FOUND, &format!("session {id} not found")),
        Some(session) => {
            session.expired = true;
            ok(json!({}))
        }
    }
}

async fn server_capabilities(State(s): State<Arc<Shared>>) -> Response {
    let models: Vec<Value> = s
        .opts
        .base_models
        .iter()
        .map(|m| json!({"model_name": m, "trainable": true, "sampleable": true}))
        .collect();
    ok(json!({ "supported_models": models }))
}
