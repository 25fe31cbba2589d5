//! CLaaS's Tinker-only routes: `GET /v1/sampler/status` and `POST /v1/sampler/refresh`
//! (inventory §1.14). They answer 404 unless the inference backend is Tinker's sampler.
//! Each LoRA is always sampled at its current version; refresh only chooses what requests
//! naming the base model sample, for every tenant, so it takes an admin key.

use axum::extract::State;
use axum::Json;
use serde_json::Value;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody, Errors, JsonBody};
use crate::AppState;

/// `POST /v1/sampler/refresh`'s body.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"model_path": "tinker://run-1/sampler_weights/v3-ab12"}))]
pub struct RefreshRequest {
    /// A `tinker://…/sampler_weights/…` checkpoint; null: the base model.
    #[serde(default)]
    pub model_path: Option<String>,
}

/// What the base model's requests sample.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SamplerStatus {
    /// The checkpoint last chosen by refresh; null: the base model.
    pub model_path: Option<String>,
    pub base_model: String,
}

/// The refresh's outcome.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RefreshResponse {
    pub status: String,
    pub model_path: Option<String>,
}

fn not_tinker() -> ApiError {
    ApiError::not_found("the sampler routes exist with mode: tinker (Tinker's sampler serves chat)")
}

/// What requests naming the base model sample (Tinker mode).
#[utoipa::path(
    get,
    path = "/v1/sampler/status",
    tag = "inference",
    responses((status = 200, body = SamplerStatus), (status = 404, body = ErrorBody), Errors)
)]
pub async fn status(State(state): State<AppState>, _caller: Caller) -> ApiResult<Json<Value>> {
    let backend = state.inference().map_err(|_| not_tinker())?;
    backend
        .sampler_status()
        .await
        .map(Json)
        .ok_or_else(not_tinker)
}

/// Samples requests naming the base model from `model_path` (Tinker mode; admin key).
#[utoipa::path(
    post,
    path = "/v1/sampler/refresh",
    tag = "inference",
    request_body = RefreshRequest,
    responses(
        (status = 200, body = RefreshResponse),
        (status = 404, body = ErrorBody),
        (status = 502, body = ErrorBody),
        Errors
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req, _): JsonBody<RefreshRequest>,
) -> ApiResult<Json<Value>> {
    let backend = state.inference().map_err(|_| not_tinker())?;
    if backend.clone().sampler_status().await.is_none() {
        return Err(not_tinker());
    }
    if !caller.is_admin() {
        return Err(ApiError::forbidden(
            "refresh changes what every tenant's base-model requests sample: it needs an admin key",
        ));
    }
    let answer = backend.sampler_refresh(req.model_path).await?;
    answer.map(Json).ok_or_else(not_tinker)
}
