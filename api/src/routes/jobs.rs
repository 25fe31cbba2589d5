//! Job polling and control: `GET /v1/jobs/{id}`, `GET /v1/jobs`, `POST /v1/jobs/{id}/cancel`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::queue::{CancelOutcome, JobFilter};
use claas_core::types::{Job, JobStatus};
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Default and largest page of `GET /v1/jobs`.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

pub(crate) fn parse_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request(format!("'{raw}' is not a job id (a UUID)")))
}

/// The job a path names: 400 for a malformed id, 404 for an unknown one.
pub(crate) async fn find(state: &AppState, raw: &str) -> ApiResult<Job> {
    let id = parse_id(raw)?;
    state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job not found: {id}")))
}

/// One job with its timeline.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = find(&state, &id).await?;
    caller.check(&job.lora_id)?;
    let events = state.store.job_events(job.id).await?;
    let mut body =
        serde_json::to_value(&job).map_err(|e| ApiError::from(claas_core::Error::from(e)))?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert(
            "events".into(),
            serde_json::to_value(events).unwrap_or_default(),
        );
    }
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    lora_id: Option<String>,
    status: Option<String>,
    /// Jobs a worker ran or runs.
    worker_id: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Jobs newest first; `next_cursor` continues the listing.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be within [1, {MAX_LIMIT}]"
        )));
    }
    let status = q
        .status
        .as_deref()
        .map(|s| s.parse::<JobStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let before = q.cursor.as_deref().map(parse_id).transpose()?;
    if let Some(id) = &q.lora_id {
        caller.check(id)?;
    }
    let mut jobs = state
        .store
        .list_jobs(&JobFilter {
            lora_id: q.lora_id,
            lora_prefixes: caller.prefixes(),
            status,
            worker_id: q.worker_id,
            before,
            after: None,
            limit,
        })
        .await?;
    // The store filters by plain prefix; a key's prefix covers whole path segments.
    jobs.retain(|j| caller.covers(&j.lora_id));
    let next_cursor = (jobs.len() as i64 == limit)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    Ok(Json(
        serde_json::json!({"jobs": jobs, "next_cursor": next_cursor}),
    ))
}

/// Cancels a queued job at once (200) or asks a running one to stop (202).
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    if let Some(job) = state.store.get_job(id).await? {
        caller.check(&job.lora_id)?;
    }
    Ok(match state.store.cancel(id).await? {
        CancelOutcome::Cancelled(job) => (StatusCode::OK, Json(job)).into_response(),
        CancelOutcome::Requested(job) => (StatusCode::ACCEPTED, Json(job)).into_response(),
    })
}
