//! Version management: `POST /v1/lora/{lora_id}/rollback` makes an older kept version
//! current again (recorded as a new version that points at the same files, then loaded into
//! every vLLM), `POST /v1/lora/{lora_id}/pin` keeps a version from retention.

use axum::extract::State;
use axum::Json;
use claas_core::types::NewLora;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::lora_id::LoraPath;
use crate::error::{ApiError, ApiResult, ErrorBody, Errors, JsonBody};
use crate::AppState;

/// Which version a rollback returns to, or a pin keeps.
#[derive(Debug, Deserialize, ToSchema)]
pub struct VersionBody {
    #[schema(example = 0)]
    pub version: i32,
    /// For `pin`: false unpins. Default true.
    #[serde(default = "yes")]
    pub pinned: bool,
}

fn yes() -> bool {
    true
}

/// The LoRA after a rollback.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolledBack {
    pub lora_id: String,
    /// The new version, pointing at the files of `rolled_back_to`.
    pub current_version: i32,
    pub rolled_back_to: i32,
}

/// A version's pin after `pin`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pinned {
    pub lora_id: String,
    pub version: i32,
    pub pinned: bool,
}

/// Makes an older kept version current again, as a new version (loaded into every vLLM).
#[utoipa::path(
    post,
    path = "/v1/lora/{lora_id}/rollback",
    tag = "lora",
    params(("lora_id" = String, Path, description = "The LoRA (a `/` in it may be sent raw or as %2F)", example = "demo/assistant")),
    request_body = VersionBody,
    responses(
        (status = 200, body = RolledBack),
        (status = 409, body = ErrorBody, description = "Already current, or no longer stored"),
        Errors,
    )
)]
pub async fn rollback(
    State(state): State<AppState>,
    LoraPath(id): LoraPath,
    JsonBody(body, _): JsonBody<VersionBody>,
) -> ApiResult<Json<RolledBack>> {
    roll_back(&state, &id, body.version).await.map(Json)
}

/// Keeps a version whatever the retention says (`pinned: false` releases it).
#[utoipa::path(
    post,
    path = "/v1/lora/{lora_id}/pin",
    tag = "lora",
    params(("lora_id" = String, Path, description = "The LoRA (a `/` in it may be sent raw or as %2F)", example = "demo/assistant")),
    request_body = VersionBody,
    responses(
        (status = 200, body = Pinned),
        Errors,
    )
)]
pub async fn pin(
    State(state): State<AppState>,
    LoraPath(id): LoraPath,
    JsonBody(body, _): JsonBody<VersionBody>,
) -> ApiResult<Json<Pinned>> {
    if state.store.get_lora(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("LoRA not found: {id}")));
    }
    if !state
        .store
        .pin_version(&id, body.version, body.pinned)
        .await?
    {
        return Err(ApiError::not_found(format!(
            "LoRA {id} has no version {}",
            body.version
        )));
    }
    Ok(Json(Pinned {
        lora_id: id,
        version: body.version,
        pinned: body.pinned,
    }))
}

async fn roll_back(state: &AppState, id: &str, to: i32) -> ApiResult<RolledBack> {
    let id = id.to_owned();
    let lora = state
        .store
        .get_lora(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("LoRA not found: {id}")))?;
    let versions = state.store.lora_versions(&id).await?;
    let target = versions
        .iter()
        .find(|v| v.version == to)
        .ok_or_else(|| ApiError::not_found(format!("LoRA {id} has no version {to}")))?;
    if to == lora.current_version {
        return Err(ApiError::conflict(format!(
            "version {to} of {id} is already current"
        )));
    }
    if target.pruned_at.is_some() {
        return Err(ApiError::version_pruned(&id, to));
    }
    // The LoRA takes that version's shape again (an overwrite may have changed it since).
    let shape = claas_core::types::local_path(&target.storage_uri)
        .and_then(|d| std::fs::read(d.join("adapter_config.json")).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let rank = shape
        .as_ref()
        .and_then(|c| c["r"].as_i64())
        .and_then(|r| i32::try_from(r).ok())
        .unwrap_or(lora.rank);
    let alpha = shape
        .as_ref()
        .and_then(|c| c["lora_alpha"].as_f64())
        .unwrap_or(lora.alpha);
    let target_modules = shape
        .as_ref()
        .and_then(|c| serde_json::from_value::<Vec<String>>(c["target_modules"].clone()).ok())
        .unwrap_or_else(|| lora.target_modules.clone());
    let record = NewLora {
        lora_id: id.clone(),
        base_model: lora.base_model.clone(),
        rank,
        alpha,
        target_modules,
        initial_uri: target.storage_uri.clone(),
        initial_sha256: target.sha256.clone(),
    };
    let updated = state
        .store
        .reinit_lora(
            &record,
            lora.current_version,
            &serde_json::json!({"rollback_of": to}),
        )
        .await?;
    crate::routes::lora::serve_in_vllm(state, &id, &target.storage_uri, &target.sha256, true).await;
    Ok(RolledBack {
        lora_id: id,
        current_version: updated.current_version,
        rolled_back_to: to,
    })
}
