//! Version management: `POST /v1/lora/{lora_id}/rollback` makes an older kept version
//! current again (recorded as a new version that points at the same files, then loaded into
//! every vLLM), `POST /v1/lora/{lora_id}/pin` keeps a version from retention. And CLaaS's
//! `-latest` alias: a client naming `<id>-latest` means `<id>`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::types::{validate_lora_id, NewLora};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult, JsonBody};
use crate::AppState;

/// CLaaS names a LoRA's newest version `<id>-latest`; clients written for it (OpenClaw's
/// plugin, the eval harness) send that name as `lora_id` and as the chat `model`. It means
/// `<id>` unless a LoRA really is called `<id>-latest`.
pub async fn resolve_alias(state: &AppState, id: &str) -> ApiResult<String> {
    let Some(base) = id.strip_suffix("-latest").filter(|b| !b.is_empty()) else {
        return Ok(id.to_owned());
    };
    if state.store.get_lora(id).await?.is_some() {
        return Ok(id.to_owned());
    }
    Ok(match state.store.get_lora(base).await? {
        Some(_) => base.to_owned(),
        None => id.to_owned(),
    })
}

#[derive(Debug, Deserialize)]
pub struct VersionBody {
    pub version: i32,
    /// For `pin`: false unpins. Default true.
    #[serde(default = "yes")]
    pub pinned: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/lora/{lora_id}/rollback` and `/pin` (ids contain '/': a wildcard route).
pub async fn action(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    Path(rest): Path<String>,
    JsonBody(body, _): JsonBody<VersionBody>,
) -> ApiResult<Response> {
    if let Some(id) = rest
        .strip_suffix("/rollback")
        .or_else(|| rest.strip_suffix("/pin"))
    {
        let id = resolve_alias(&state, id).await?;
        caller.check(&id)?;
    }
    if let Some(id) = rest.strip_suffix("/rollback") {
        return rollback(&state, id, body.version).await;
    }
    if let Some(id) = rest.strip_suffix("/pin") {
        return pin(&state, id, body.version, body.pinned).await;
    }
    Err(ApiError::not_found(format!(
        "no route POST /v1/lora/{rest}"
    )))
}

async fn rollback(state: &AppState, id: &str, to: i32) -> ApiResult<Response> {
    validate_lora_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id = resolve_alias(state, id).await?;
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
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("version {to} of {id} is already current"),
        ));
    }
    if target.pruned_at.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "version_pruned",
            format!(
                "version {to} of {id} is no longer stored (storage.adapter_versions_keep); \
                 pin versions you may want to return to"
            ),
        ));
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
    Ok(Json(serde_json::json!({
        "lora_id": id,
        "current_version": updated.current_version,
        "rolled_back_to": to,
    }))
    .into_response())
}

async fn pin(state: &AppState, id: &str, version: i32, pinned: bool) -> ApiResult<Response> {
    validate_lora_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id = resolve_alias(state, id).await?;
    if state.store.get_lora(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("LoRA not found: {id}")));
    }
    if !state.store.pin_version(&id, version, pinned).await? {
        return Err(ApiError::not_found(format!(
            "LoRA {id} has no version {version}"
        )));
    }
    Ok(
        Json(serde_json::json!({"lora_id": id, "version": version, "pinned": pinned}))
            .into_response(),
    )
}
