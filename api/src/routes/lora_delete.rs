//! `DELETE /v1/lora?lora_id=`: idempotent. The LoRA stops taking feedback at once; its
//! queued jobs are cancelled and a running one is asked to stop; when nothing of it runs
//! any more, every vLLM unloads it, its version files are removed, and the id may be
//! created again as a new LoRA. Its jobs stay in the history.

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use claas_core::queue::JobFilter;
use claas_core::types::{local_path, JobStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, Errors, QueryParams};
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    #[param(example = "demo/scratch")]
    pub lora_id: String,
}

/// What a delete did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    /// False when there was no such LoRA (CLaaS answers 200 then too).
    pub deleted: bool,
    pub lora_id: String,
    /// Jobs of it that were cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled_jobs: Option<usize>,
    /// `deleted`, or `stopping` while a running job of it stops (202).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
}

/// Deletes a LoRA: cancels its jobs, removes its versions' files and unloads it from vLLM.
#[utoipa::path(
    delete,
    path = "/v1/lora",
    tag = "lora",
    params(DeleteQuery),
    responses(
        (status = 200, body = Deleted),
        (status = 202, body = Deleted, description = "A running job of it is still stopping; the clean-up finishes in the background"),
        Errors,
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    QueryParams(q): QueryParams<DeleteQuery>,
) -> ApiResult<Response> {
    let mut q = q;
    q.lora_id = crate::routes::lora_id::lora_for(&state, &caller, &q.lora_id).await?;
    // The versions to remove, read before their rows are dropped.
    let uris: Vec<String> = state
        .store
        .lora_versions(&q.lora_id)
        .await?
        .into_iter()
        .map(|v| v.storage_uri)
        .collect();
    let Some(token) = state.store.delete_lora(&q.lora_id).await? else {
        return Ok(Json(Deleted {
            deleted: false,
            lora_id: q.lora_id,
            cancelled_jobs: None,
            status: None,
        })
        .into_response());
    };
    let cancelled = state.store.cancel_jobs_of_lora(&q.lora_id).await?;
    let cleanup = tokio::spawn(clean_up(state.clone(), q.lora_id.clone(), token, uris));
    let body = |done: bool| Deleted {
        deleted: true,
        lora_id: q.lora_id.clone(),
        cancelled_jobs: Some(cancelled),
        status: Some(if done { "deleted" } else { "stopping" }),
    };
    // A running job stops at its next phase boundary; wait for it as long as a request may
    // wait on a job (server.feedback_max_wait_s), then answer 202: the clean-up still
    // completes in the background.
    let wait = Duration::from_secs(state.options.feedback_max_wait_s);
    match tokio::time::timeout(wait, cleanup).await {
        Ok(Ok(Ok(()))) => Ok(Json(body(true)).into_response()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(join)) => Err(ApiError::internal(format!(
            "delete clean-up panicked: {join}"
        ))),
        // A running job is still stopping; it finishes in the background.
        Err(_) => Ok(crate::error::accepted(Json(body(false)))),
    }
}

/// Waits until no job of the LoRA runs, unloads it from every vLLM, removes its files and
/// drops its versions (the rows stay if the id was created again meanwhile).
async fn clean_up(
    state: AppState,
    lora_id: String,
    token: DateTime<Utc>,
    uris: Vec<String>,
) -> ApiResult<()> {
    loop {
        let running = state
            .store
            .list_jobs(&JobFilter {
                lora_id: Some(lora_id.clone()),
                status: Some(JobStatus::Running),
                limit: 1,
                ..JobFilter::default()
            })
            .await?;
        if running.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for up in state.backends.iter().flat_map(|b| b.all()) {
        if let Err(e) = up.unload_adapter(&lora_id).await {
            let e: ApiError = e.into();
            tracing::warn!(lora_id, vllm = up.base_url(), error = %e.message, "could not unload a deleted LoRA");
        }
    }
    // Versions published after `uris` was read are in the purge's answer. Created again
    // since: the new LoRA's files have URIs of their own (see `AdapterStore`), so the old
    // ones still go.
    let purged = state.store.purge_lora(&lora_id, token).await?;
    let mut uris = uris;
    uris.extend(purged.unwrap_or_default());
    uris.sort();
    uris.dedup();
    let backend = state.inference().ok();
    for uri in &uris {
        if let Some(b) = &backend {
            match b.clone().remove_version(uri).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%uri, error = %e.message, "could not remove a deleted version");
                    continue;
                }
            }
        }
        if let Err(e) = state.adapters.remove(uri).await {
            tracing::warn!(%uri, error = %e, "could not remove a deleted version");
        }
        // The LoRA's own local directory, once empty (remove_dir refuses a non-empty one).
        if let Some(parent) = local_path(uri).as_deref().and_then(std::path::Path::parent) {
            let _ = tokio::fs::remove_dir(parent).await;
        }
    }
    tracing::info!(lora_id, "LoRA deleted");
    Ok(())
}
