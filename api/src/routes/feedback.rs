//! `POST /v1/feedback`: validate a CLaaS feedback batch, resolve each item's rollout,
//! enqueue one job, and answer 202 at once (or wait, per `Prefer`).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::types::{
    validate_lora_id, Job, JobPayload, JobStatus, NewJob, Orchestration, Rollout, Sample,
    TrainingConfig,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Caller;
use crate::deferred::DeferredWait;
use crate::thinking::content_hash;

use crate::error::{ApiError, ApiResult, ErrorBody, Errors, JsonBody};
use crate::timeouts::WAIT_MARGIN;
use crate::AppState;

/// Most items one request may carry.
const MAX_ITEMS: usize = 256;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// CLaaS `FeedbackBatchRequest`: one LoRA and one training config per batch.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({
    "requests": [{
        "lora_id": "demo/assistant",
        "prompt": "Write a haiku about rain.",
        "response": "Rain on the window",
        "feedback": "Too short; add imagery.",
        "prompt_token_ids": [1, 2, 3],
        "response_token_ids": [4, 5],
        "response_logprobs": [-0.5, -0.25],
        "system_prompt": "You are helpful."
    }]
}))]
pub struct FeedbackBatchRequest {
    #[schema(min_items = 1, max_items = 256)]
    pub requests: Vec<FeedbackItem>,
    #[serde(default)]
    pub orchestration: Orchestration,
}

/// CLaaS `FeedbackItem`, plus the optional inline rollout.
#[derive(Debug, Deserialize, ToSchema)]
pub struct FeedbackItem {
    #[schema(example = "demo/assistant")]
    pub lora_id: String,
    #[schema(min_length = 1)]
    pub prompt: String,
    /// The answer as the client saw it (it names the cached completion).
    #[schema(min_length = 1)]
    pub response: String,
    #[schema(min_length = 1)]
    pub feedback: String,
    #[serde(default)]
    pub training: TrainingConfig,
    /// Inline rollout: when all three token fields are present the completion cache is
    /// not consulted (clients that generate elsewhere, tests, replays).
    pub prompt_token_ids: Option<Vec<u32>>,
    pub response_token_ids: Option<Vec<u32>>,
    pub response_logprobs: Option<Vec<f32>>,
    pub system_prompt: Option<String>,
}

/// 202: the feedback is queued as a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackAccepted {
    pub job_id: Uuid,
    pub status: JobStatus,
    /// Poll this for the job.
    pub status_url: String,
}

/// CLaaS's `FeedbackResponse`: the job succeeded within the wait.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackResponse {
    /// Always `ok`.
    pub status: String,
    /// The job id without dashes (CLaaS's request id).
    pub request_id: String,
    pub job_id: Uuid,
    pub lora_id: String,
    pub distill_result: DistillResult,
    /// Whether the worker slept and woke its vLLM: `{slept, woke}`.
    pub vllm: serde_json::Value,
    pub timing_ms: FeedbackTiming,
    pub batch_size: i32,
    /// Samples trained in the step (more than `batch_size` when jobs were coalesced).
    pub trained_batch_size: serde_json::Value,
    pub feedback_log_path: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DistillResult {
    pub lora_id: String,
    /// The training step's metrics (loss, grad norm, ...).
    pub metadata: serde_json::Value,
}

/// Milliseconds per stage, in CLaaS's names.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackTiming {
    pub sleep: u64,
    pub distill: u64,
    pub save: u64,
    pub wake: u64,
    pub logprobs: u64,
    pub total: u64,
}

/// How long the caller wants to wait for the job (RFC 7240 `Prefer`).
fn requested_wait(headers: &HeaderMap, default_s: u64, max_s: u64) -> ApiResult<Duration> {
    let mut wait = None;
    let mut respond_async = false;
    for value in headers.get_all("prefer") {
        let value = value
            .to_str()
            .map_err(|_| ApiError::bad_request("Prefer header is not ASCII"))?;
        for pref in value.split(',').map(str::trim) {
            let (name, arg) = match pref.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (pref, None),
            };
            if name.eq_ignore_ascii_case("respond-async") {
                respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") {
                let secs: u64 = arg.and_then(|a| a.parse().ok()).ok_or_else(|| {
                    ApiError::bad_request("Prefer: wait must be a whole number of seconds")
                })?;
                wait = Some(secs);
            }
        }
    }
    let secs = match (wait, respond_async) {
        (Some(w), _) => w,
        (None, true) => 0,
        (None, false) => default_s,
    };
    Ok(Duration::from_secs(secs.min(max_s)))
}

fn inline_rollout(item: &FeedbackItem, index: usize) -> ApiResult<Option<Rollout>> {
    match (&item.prompt_token_ids, &item.response_token_ids, &item.response_logprobs) {
        (Some(p), Some(r), Some(l)) => {
            if r.is_empty() {
                return Err(ApiError::invalid(format!(
                    "requests[{index}].response_token_ids must not be empty"
                )));
            }
            if l.len() != r.len() {
                return Err(ApiError::invalid(format!(
                    "requests[{index}].response_logprobs has {} entries for {} response tokens",
                    l.len(),
                    r.len()
                )));
            }
            if l.iter().any(|v| !v.is_finite() || *v > 0.0) {
                return Err(ApiError::invalid(format!(
                    "requests[{index}].response_logprobs must be finite and <= 0"
                )));
            }
            Ok(Some(Rollout {
                prompt_token_ids: p.clone(),
                response_token_ids: r.clone(),
                response_logprobs: l.clone(),
                system_prompt: item.system_prompt.clone().unwrap_or_default(),
            }))
        }
        (None, None, None) => Ok(None),
        _ => Err(ApiError::invalid(format!(
            "requests[{index}]: an inline rollout needs prompt_token_ids, response_token_ids and response_logprobs together"
        ))),
    }
}

/// The models whose answers feedback for `lora_id` may be about, in lookup order: the
/// LoRA itself, then its base model (an answer given before the LoRA served anything).
/// Also returns the base model the LoRA trains on.
async fn lookup_scopes(state: &AppState, lora_id: &str) -> ApiResult<(Vec<String>, String)> {
    let mut scopes = vec![lora_id.to_owned()];
    let base = match state.store.get_lora(lora_id).await? {
        Some(l) => l.base_model,
        None => state.options.default_base_model.clone(),
    };
    scopes.push(base.clone());
    scopes.push(state.options.default_base_model.clone());
    scopes.dedup();
    Ok((scopes, base))
}

/// The vocabulary size of `base_model` when its checkpoint is on this machine (read from
/// its `config.json`); `None` when it is not, and the worker checks the ids instead.
fn vocab_size(state: &AppState, base_model: &str) -> Option<u64> {
    state.base_models.as_ref()?.vocab_size(base_model)
}

/// What the trainer would refuse in a rollout, checked at intake so a bad sample is a 422
/// naming it instead of a failed job: empty prompt ids, a sequence over the trainer's
/// `max_seq_len`, token ids outside the base model's vocabulary (when it is known here).
fn check_rollout(
    r: &Rollout,
    index: usize,
    max_seq_len: usize,
    vocab: Option<u64>,
) -> ApiResult<()> {
    if r.prompt_token_ids.is_empty() {
        return Err(ApiError::invalid(format!(
            "requests[{index}]: the prompt has no token ids"
        )));
    }
    let len = r.prompt_token_ids.len() + r.response_token_ids.len();
    if len > max_seq_len {
        return Err(ApiError::invalid(format!(
            "requests[{index}]: prompt + response are {len} tokens, over the trainer's maximum \
             sequence length {max_seq_len} (trainer.max_seq_len)"
        )));
    }
    let ids = r.prompt_token_ids.iter().chain(&r.response_token_ids);
    if let Some((v, id)) = vocab.and_then(|v| {
        ids.clone()
            .find(|&&id| u64::from(id) >= v)
            .map(|id| (v, id))
    }) {
        return Err(ApiError::invalid(format!(
            "requests[{index}]: token id {id} is outside the base model's vocabulary (size {v})"
        )));
    }
    Ok(())
}

/// The rollout of one item: inline, or the cached completion its response names.
async fn resolve_rollout(
    state: &AppState,
    owner: &str,
    scopes: &[String],
    item: &FeedbackItem,
    index: usize,
) -> ApiResult<(Rollout, Option<String>)> {
    if let Some(r) = inline_rollout(item, index)? {
        return Ok((r, None));
    }
    let hash = content_hash(&item.response);
    let short = &hash[..16];
    let mut found = None;
    for scope in scopes {
        let entry = state
            .cache
            .get(owner, scope, &hash)
            .await
            .map_err(ApiError::cache_unavailable)?;
        if entry.is_some() {
            found = entry;
            break;
        }
    }
    let Some(entry) = found else {
        return Err(ApiError::not_found(format!(
            "No cached completion for content_hash={short}… (requests[{index}].response must be the text of an answer served through /v1/chat/completions within cache.completion_cache_ttl_s)"
        )));
    };
    let Some(logprobs) = entry.response_logprobs else {
        return Err(ApiError::invalid(format!(
            "Cached completion has no logprobs (content_hash={short}…)"
        )));
    };
    if entry.system_prompt.is_empty() {
        return Err(ApiError::invalid(format!(
            "Cached completion has no system prompt (content_hash={short}…). The chat completion request must include a system message so the teacher can score under the same context as the student."
        )));
    }
    Ok((
        Rollout {
            prompt_token_ids: entry.prompt_token_ids,
            response_token_ids: entry.response_token_ids,
            response_logprobs: logprobs,
            system_prompt: entry.system_prompt,
        },
        Some(entry.response),
    ))
}

/// Checks the batch in CLaaS's order, resolves each item's rollout among `caller`'s own
/// cached answers (or takes it inline), and builds the job's payload.
// Long: one check per CLaaS validation rule, in CLaaS's order.
async fn validate(
    state: &AppState,
    caller: &Caller,
    req: &FeedbackBatchRequest,
) -> ApiResult<JobPayload> {
    let Some(first) = req.requests.first() else {
        return Err(ApiError::invalid("requests must contain at least one item"));
    };
    if req.requests.len() > MAX_ITEMS {
        return Err(ApiError::invalid(format!(
            "requests has {} items; at most {MAX_ITEMS} are accepted per call",
            req.requests.len()
        )));
    }
    for (i, item) in req.requests.iter().enumerate() {
        for (name, v) in [
            ("prompt", &item.prompt),
            ("response", &item.response),
            ("feedback", &item.feedback),
        ] {
            if v.is_empty() {
                return Err(ApiError::invalid(format!(
                    "requests[{i}].{name} must not be empty"
                )));
            }
        }
        let problems = item.training.violations();
        if !problems.is_empty() {
            return Err(ApiError::invalid(format!(
                "invalid training config: {}",
                problems.join("; ")
            )));
        }
    }
    match req.orchestration.sleep_level {
        1 => {}
        // Level 2 discards the weights; waking does not bring them back, and vLLM with
        // LoRA enabled crashes reloading them (vllm-project/vllm#39934), so after the job
        // it would answer from uninitialised memory.
        2 => {
            return Err(ApiError::invalid(
                "orchestration.sleep_level 2 discards vLLM's weights, which vLLM cannot \
                 reload with LoRA enabled (vllm-project/vllm#39934): use sleep_level 1",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "orchestration.sleep_level must be 1 (2 is refused: see the README)",
            ))
        }
    }
    validate_lora_id(&first.lora_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    if req.requests.iter().any(|i| i.lora_id != first.lora_id) {
        return Err(ApiError::bad_request(
            "all requests must use the same lora_id",
        ));
    }
    if req.requests.iter().any(|i| i.training != first.training) {
        return Err(ApiError::bad_request(
            "all requests must use the same training config",
        ));
    }
    let (scopes, base_model) = lookup_scopes(state, &first.lora_id).await?;
    let vocab = vocab_size(state, &base_model);
    let mut samples = Vec::with_capacity(req.requests.len());
    for (i, item) in req.requests.iter().enumerate() {
        let (rollout, raw_response) = resolve_rollout(state, caller.id(), &scopes, item, i).await?;
        check_rollout(&rollout, i, state.max_seq_len, vocab)?;
        samples.push(Sample {
            prompt: item.prompt.clone(),
            // The answer as generated (thinking included) when it came from the cache.
            response: raw_response.unwrap_or_else(|| item.response.clone()),
            feedback: item.feedback.clone(),
            rollout,
        });
    }
    Ok(JobPayload {
        samples,
        training: first.training.clone(),
    })
}

/// Validates a CLaaS feedback batch, resolves each item's rollout (inline, or the cached
/// completion its `response` names), and queues one training job.
#[utoipa::path(
    post,
    path = "/v1/feedback",
    tag = "feedback",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The same key and body from the same caller return the same job; the same key with another body is a 422"),
        ("Prefer" = Option<String>, Header, description = "`respond-async` answers 202 at once; `wait=N` waits up to N seconds (capped by server.feedback_max_wait_s) for the job", pattern = "^(respond-async|wait=[0-9]{1,3})$"),
    ),
    request_body = FeedbackBatchRequest,
    responses(
        (status = 200, body = FeedbackResponse, description = "The job succeeded within the wait"),
        (status = 202, body = FeedbackAccepted, description = "Queued (or still running after the wait)",
            headers(("Location" = String, description = "The job's status URL"))),
        (status = 409, body = ErrorBody, description = "The job was cancelled during the wait"),
        (status = 429, body = ErrorBody, description = "The key has too many queued jobs",
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, body = ErrorBody, description = "The job failed during the wait"),
        (status = 503, body = ErrorBody, description = "Too many feedback requests are waiting on this process (nothing was enqueued), or the database is unavailable",
            headers(("Retry-After" = u64, description = "Seconds"))),
        Errors,
    )
)]
pub async fn submit(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    headers: HeaderMap,
    JsonBody(req, body): JsonBody<FeedbackBatchRequest>,
) -> ApiResult<Response> {
    let wait = requested_wait(
        &headers,
        state.options.feedback_default_wait_s,
        state.options.feedback_max_wait_s,
    )?;
    // A request that will wait takes its place first, so one refused enqueues nothing.
    let slot = if wait.is_zero() {
        None
    } else {
        let slots = &state.waiting;
        let permit = slots.permits.clone().try_acquire_owned();
        Some(permit.map_err(|_| ApiError::too_many_waiting(slots.limit))?)
    };
    // The enqueueing runs boxed: its state (the batch, the statements' futures) is freed
    // before the wait.
    let enqueued = Box::pin(enqueue_batch(&state, caller, headers, req, body)).await?;
    match slot {
        Some(slot) if !enqueued.status.is_terminal() => {
            // The wait happens outside the router (`crate::deferred`), holding neither the
            // feedback nor the job: thousands may wait at once.
            let wait = DeferredWait::new(enqueued.id, enqueued.status, wait, slot, |s, id, st| {
                Box::pin(answer_now(s, id, st))
            });
            let mut resp = accepted(enqueued.id, enqueued.status);
            wait.attach(&mut resp);
            Ok(resp)
        }
        _ => Ok(answer(enqueued)),
    }
}

/// Checks the batch and the caller's rights and limits, and enqueues its job.
async fn enqueue_batch(
    state: &AppState,
    caller: Caller,
    headers: HeaderMap,
    mut req: FeedbackBatchRequest,
    body: axum::body::Bytes,
) -> ApiResult<Job> {
    // CLaaS's `<id>-latest` names the LoRA `<id>`.
    if let Some(first) = req.requests.first().map(|i| i.lora_id.clone()) {
        let resolved = crate::routes::lora_id::resolve_alias(state, &first).await?;
        for item in req.requests.iter_mut().filter(|i| i.lora_id == first) {
            item.lora_id = resolved.clone();
        }
    }
    for item in &req.requests {
        caller.check(&item.lora_id)?;
    }
    // Backpressure per key: one tenant cannot flood the queue; nothing accepted is dropped.
    let limit = state.auth.max_queued_per_key;
    if limit > 0 && !caller.id().is_empty() {
        let queued = state.store.queued_jobs_of(caller.id()).await?;
        if queued >= limit {
            return Err(ApiError::too_many_queued_jobs(queued, limit).with_retry_after(30));
        }
    }
    let payload = validate(state, &caller, &req).await?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ))
                })?;
            Some(key.to_string())
        }
    };
    let mut job = NewJob::new(req.requests[0].lora_id.clone(), payload);
    // The worker continues this request's trace from the job.
    job.trace_context = claas_core::telemetry::current_context();
    job.caller = caller.id().to_owned();
    job.orchestration = req.orchestration;
    job.max_attempts = state.options.max_attempts;
    job.request_hash = idempotency_key
        .as_ref()
        .map(|_| hex::encode(Sha256::digest(&body)));
    job.idempotency_key = idempotency_key;
    Ok(state.store.enqueue(&job).await?.job)
}

/// The answer for job `id` as it is now, once its wait is over (`crate::deferred`). The
/// job is already accepted, so a database error reading it, or a read slower than
/// [`WAIT_MARGIN`] (the wait runs outside the router's deadline), answers 202 (the caller
/// polls) instead of failing a request whose feedback is safely queued.
async fn answer_now(state: &AppState, id: Uuid, status: JobStatus) -> Response {
    match tokio::time::timeout(WAIT_MARGIN, state.store.get_job(id)).await {
        Ok(Ok(Some(job))) => answer(job),
        Ok(Ok(None)) => accepted(id, status),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, job_id = %id, "could not read a waited-on job");
            accepted(id, status)
        }
        Err(_) => {
            tracing::warn!(job_id = %id, "reading a waited-on job took too long");
            accepted(id, status)
        }
    }
}

fn status_url(job_id: Uuid) -> String {
    format!("/v1/jobs/{job_id}")
}

/// 202 while the job is not finished; CLaaS's 200 `FeedbackResponse` once it succeeded;
/// an error with the job's error when it failed or was cancelled.
fn answer(job: Job) -> Response {
    match job.status {
        JobStatus::Succeeded => Json(feedback_response(&job)).into_response(),
        JobStatus::Failed | JobStatus::Cancelled => job_error(&job).into_response(),
        _ => accepted(job.id, job.status),
    }
}

/// 202 with where to poll.
fn accepted(job_id: Uuid, status: JobStatus) -> Response {
    let url = status_url(job_id);
    crate::error::accepted((
        [(header::LOCATION, url.clone())],
        Json(FeedbackAccepted {
            job_id,
            status,
            status_url: url,
        }),
    ))
}

fn job_error(job: &Job) -> ApiError {
    let cancelled = job.status == JobStatus::Cancelled;
    let invalid_input = job
        .error
        .as_ref()
        .is_some_and(|e| e.code == "invalid_input");
    let (message, phase) = match &job.error {
        Some(e) => (
            match e.phase {
                Some(p) => format!(
                    "Feedback update failed in phase '{}': {}",
                    p.as_str(),
                    e.message
                ),
                None => e.message.clone(),
            },
            e.phase,
        ),
        None => (
            format!("job {} ended {}", job.id, job.status.as_str()),
            None,
        ),
    };
    ApiError::job_ended(cancelled, invalid_input, message).with_extra(serde_json::json!({
        "job_id": job.id,
        "phase": phase,
        "status_url": status_url(job.id),
    }))
}

/// CLaaS's `FeedbackResponse` for a succeeded job.
fn feedback_response(job: &Job) -> FeedbackResponse {
    let result = job.result.clone().unwrap_or_default();
    let t = |k: &str| job.timings_ms.get(k).copied().unwrap_or(0);
    let total = job
        .finished_at
        .map(|f| (f - job.created_at).num_milliseconds().max(0))
        .unwrap_or(0);
    FeedbackResponse {
        status: "ok".into(),
        request_id: job.id.simple().to_string(),
        job_id: job.id,
        lora_id: job.lora_id.clone(),
        distill_result: DistillResult {
            lora_id: job.lora_id.clone(),
            metadata: result.get("metrics").cloned().unwrap_or_default(),
        },
        vllm: result
            .get("vllm")
            .cloned()
            .unwrap_or(serde_json::json!({"slept": false, "woke": false})),
        timing_ms: FeedbackTiming {
            sleep: t("drain") + t("sleep") + t("vram"),
            distill: t("distill"),
            save: t("publish"),
            wake: t("wake"),
            logprobs: 0,
            total: u64::try_from(total).unwrap_or(0),
        },
        batch_size: job.sample_count,
        trained_batch_size: result
            .get("batch_size")
            .cloned()
            .unwrap_or(job.sample_count.into()),
        // Written by the worker that finished the job, on its disk (README "Feedback log").
        feedback_log_path: result
            .get("feedback_log_path")
            .and_then(|p| p.as_str())
            .unwrap_or_default()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn prefer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("prefer", HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn prefer_header_picks_the_wait() {
        let none = HeaderMap::new();
        assert_eq!(
            requested_wait(&none, 7, 600).ok(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            requested_wait(&prefer("respond-async"), 7, 600).ok(),
            Some(Duration::ZERO)
        );
        assert_eq!(
            requested_wait(&prefer("wait=3"), 7, 600).ok(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            requested_wait(&prefer("respond-async, wait=9000"), 0, 600).ok(),
            Some(Duration::from_secs(600))
        );
        assert!(requested_wait(&prefer("wait=soon"), 0, 600).is_err());
    }
}
