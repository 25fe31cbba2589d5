//! Job polling and control: `GET /v1/jobs/{id}`, `GET /v1/jobs`, `POST /v1/jobs/{id}/cancel`.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::queue::{CancelOutcome, JobFilter};
use claas_core::types::{Job, JobEvent, JobStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody, Errors, QueryParams};
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

/// A job with its timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: Job,
    pub events: Vec<JobEvent>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<Uuid>,
}

/// One job: status, phase, attempt, timings per phase, result or error, the job that
/// trained it when it was coalesced, and its timeline.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses((status = 200, body = JobDetail), Errors)
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<JobDetail>> {
    let job = find(&state, &id).await?;
    caller.check(&job.lora_id)?;
    let events = state.store.job_events(job.id).await?;
    Ok(Json(JobDetail { job, events }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this LoRA's jobs.
    lora_id: Option<String>,
    /// `queued`, `running`, `coalesced`, `succeeded`, `failed`, `cancelled`.
    status: Option<String>,
    /// Jobs a worker ran or runs.
    worker_id: Option<String>,
    /// Page size, 1 to 500 (default 50).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Jobs newest first (only the caller's LoRAs'); `next_cursor` continues the listing.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses((status = 200, body = JobPage), Errors)
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<JobPage>> {
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
    // The store limits the rows to the caller's prefixes by whole path segments
    // (`types::prefix_covers`), before the limit, so every page is full.
    let jobs = state
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
    let next_cursor = (jobs.len() as i64 == limit)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// Cancels a queued job at once (200) or asks a running one to stop (202); a job past the
/// point where it can stop answers 409.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses(
        (status = 200, body = Job, description = "Cancelled"),
        (status = 202, body = Job, description = "Cancel requested; the worker stops at its next phase boundary"),
        (status = 409, body = ErrorBody, description = "Finished, or too late to cancel"),
        Errors,
    )
)]
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
        CancelOutcome::Cancelled(job) => Json(job).into_response(),
        CancelOutcome::Requested(job) => crate::error::accepted(Json(job)),
    })
}
