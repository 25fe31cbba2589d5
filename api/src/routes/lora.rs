//! LoRA registration and versions. `POST /v1/lora/init` records a LoRA (version 0) so
//! feedback can target it; writing the initial adapter files arrives with the adapter
//! issue, which extends this handler. `GET /v1/lora/{lora_id}/versions` lists versions.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::types::{validate_lora_id, NewLora};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult, JsonBody};
use crate::AppState;

/// The projections CLaaS adapts by default: attention and MLP.
const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// CLaaS `LoraInitRequest`.
#[derive(Debug, Deserialize)]
pub struct LoraInitRequest {
    pub lora_id: String,
    pub base_model: Option<String>,
    #[serde(default = "default_r")]
    pub lora_r: i32,
    #[serde(default = "default_alpha")]
    pub lora_alpha: i32,
    pub target_modules: Option<Vec<String>>,
}

fn default_r() -> i32 {
    32
}

fn default_alpha() -> i32 {
    64
}

pub async fn init(
    State(state): State<AppState>,
    JsonBody(req, _): JsonBody<LoraInitRequest>,
) -> ApiResult<Response> {
    validate_lora_id(&req.lora_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !(4..=128).contains(&req.lora_r) {
        return Err(ApiError::invalid("lora_r must be within [4, 128]"));
    }
    if !(8..=256).contains(&req.lora_alpha) {
        return Err(ApiError::invalid("lora_alpha must be within [8, 256]"));
    }
    let base = req
        .base_model
        .clone()
        .unwrap_or_else(|| state.options.default_base_model.clone());
    let allowed = &state.options.allowed_init_base_models;
    if !allowed.contains(&base) {
        let mut sorted = allowed.clone();
        sorted.sort();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "base_model_not_allowed",
            format!(
                "base_model '{base}' is not allowed for initialization. Allowed models: {}",
                sorted.join(", ")
            ),
        ));
    }
    let targets = req
        .target_modules
        .unwrap_or_else(|| DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect());
    if let Some(bad) = targets
        .iter()
        .find(|t| !DEFAULT_TARGETS.contains(&t.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "unsupported target module '{bad}' (supported: {})",
            DEFAULT_TARGETS.join(", ")
        )));
    }
    let lora = state
        .store
        .create_lora(&NewLora {
            lora_id: req.lora_id.clone(),
            base_model: base,
            rank: req.lora_r,
            alpha: f64::from(req.lora_alpha),
            target_modules: targets,
            initial_uri: format!("{}/{}/v0", state.options.lora_root, req.lora_id),
            initial_sha256: String::new(),
        })
        .await?;
    Ok((
        StatusCode::OK, // as CLaaS answers; its clients check for success, not 201
        Json(serde_json::json!({"lora_id": lora.lora_id})),
    )
        .into_response())
}

/// `GET /v1/lora/{lora_id}/versions` (lora ids contain '/', so the route is a wildcard).
pub async fn versions(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let Some(lora_id) = rest.strip_suffix("/versions") else {
        return Err(ApiError::not_found("no such route"));
    };
    let lora = state
        .store
        .get_lora(lora_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("LoRA not found: {lora_id}")))?;
    let versions = state.store.lora_versions(lora_id).await?;
    Ok(Json(serde_json::json!({
        "lora_id": lora.lora_id,
        "current_version": lora.current_version,
        "versions": versions,
    })))
}
