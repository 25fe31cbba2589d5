//! claas-api: the stateless HTTP service. Any replica can serve any request: all state
//! lives in the queue store (and, with its issue, the shared completion cache).

pub mod error;
pub mod routes;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use claas_core::config::Config;
use claas_core::queue::SharedStore;
use tower_http::trace::TraceLayer;

/// What handlers need from the configuration.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub max_body_bytes: usize,
    pub feedback_default_wait_s: u64,
    pub feedback_max_wait_s: u64,
    pub max_attempts: i32,
    /// Base model of `POST /v1/lora/init` when the request names none.
    pub default_base_model: String,
    pub allowed_init_base_models: Vec<String>,
    /// Where version 0 of a new LoRA is recorded to live.
    pub lora_root: String,
    /// Where random preset models live (`<data_dir>/models/<preset>`).
    pub data_dir: std::path::PathBuf,
    /// The vLLM's `--max-lora-rank` when a vLLM serves the adapters.
    pub max_lora_rank: Option<i32>,
}

impl ApiOptions {
    pub fn from_config(cfg: &Config) -> Self {
        ApiOptions {
            max_body_bytes: cfg.server.max_body_bytes,
            feedback_default_wait_s: cfg.server.feedback_default_wait_s,
            feedback_max_wait_s: cfg.server.feedback_max_wait_s,
            max_attempts: cfg.queue.max_attempts,
            default_base_model: cfg.model.base_model_id.clone(),
            allowed_init_base_models: cfg.model.allowed_init_base_models.clone(),
            lora_root: cfg.storage.lora_root.display().to_string(),
            data_dir: cfg.data_dir.clone(),
            max_lora_rank: cfg.vllm.base_url.as_ref().map(|_| cfg.vllm.max_lora_rank),
        }
    }
}

/// Shared handler state.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub options: Arc<ApiOptions>,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let limit = state.options.max_body_bytes;
    Router::new()
        .route("/v1/feedback", post(routes::feedback::submit))
        .route("/v1/jobs", get(routes::jobs::list))
        .route("/v1/jobs/{id}", get(routes::jobs::get))
        .route("/v1/jobs/{id}/cancel", post(routes::jobs::cancel))
        .route("/v1/lora", get(routes::lora::list))
        .route("/v1/lora/init", post(routes::lora::init))
        .route("/v1/lora/export", get(routes::lora::export))
        .route("/v1/lora/{*rest}", get(routes::lora::versions))
        .route("/v1/health", get(routes::health::health))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves the router on `listener` until `shutdown` resolves, then drains connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
