//! Every HTTP status the API answers with is decided here: refusals by the named
//! constructors of [`ApiError`] (its `new` is private to this file), successes by the
//! functions at the end. Every error leaves in one envelope: `{"error": {"code", "message"}}`
//! (plus `job_id`/`phase` where a job failed) and CLaaS's `detail`. `api/tests/statuses.rs`
//! fails if a `StatusCode::` appears anywhere else in `api/src` (but `upstream.rs`, which
//! reads vLLM's).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::Error as CoreError;

/// An API error: a status, a stable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Option<serde_json::Value>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }

    /// Malformed syntax: the body is not JSON, a header cannot be parsed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Well-formed but invalid: a field out of range, a missing field.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 415: a JSON route got a body that does not say `Content-Type: application/json`.
    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the body must be JSON sent as Content-Type: application/json (got {got:?})"),
        )
    }

    /// 403: an open API was reached under a name it does not answer to (DNS rebinding).
    pub fn host_not_allowed(host: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "this API has no keys and answers only its own host names, not {host:?}; \
                 add the name to server.allowed_hosts (CLAAS_ALLOWED_HOSTS) or create an API key"
            ),
        )
    }

    /// 403: a state-changing request to an open API from another site's page.
    pub fn origin_not_allowed(origin: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "this API has no keys and refuses changes requested by another site's page \
                 (Origin {origin:?})"
            ),
        )
    }

    /// 503: this process already holds `limit` feedback requests open while their jobs run.
    pub fn too_many_waiting(limit: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_waiting_requests",
            format!(
                "this API process already holds {limit} feedback requests open \
                 (server.max_waiting_feedback); nothing was enqueued: retry, or send \
                 Prefer: respond-async and poll the job"
            ),
        )
        .with_retry_after(5)
    }

    /// 409: a new LoRA's vLLM adapter name (its id with `/` as `-`) is another LoRA's.
    pub fn adapter_name_taken(lora_id: &str, name: &str, other: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "adapter_name_taken",
            format!(
                "LoRA '{lora_id}' would be served as '{name}', which already names LoRA \
                 '{other}' (CLaaS clients address LoRAs by that name); choose another id"
            ),
        )
    }

    /// 504: the answer did not start within the route's limit.
    pub fn answer_timed_out(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the request did not finish within {} s (a dependency is slow; retry later)",
                limit.as_secs_f64()
            ),
        )
    }

    /// 408: the request body did not arrive within `limit`.
    pub fn body_timed_out(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s (server.request_body_timeout_s)",
                limit.as_secs_f64()
            ),
        )
    }

    /// 429: this key created or overwrote its hourly share of LoRAs; retry after `wait_s`.
    pub fn too_many_lora_inits(wait_s: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_lora_inits",
            format!(
                "this API key has created or overwritten its limit of LoRAs for the hour \
                 (server.max_lora_inits_per_key_per_hour); retry in {wait_s} s"
            ),
        )
        .with_retry_after(wait_s)
    }

    /// 429: this address failed to log in to the dashboard too often; retry after `wait_s`.
    pub fn too_many_login_failures(wait_s: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_login_failures",
            format!("too many failed logins from this address; retry in {wait_s} s"),
        )
        .with_retry_after(wait_s)
    }

    /// 401: no key, or one that is unknown or revoked (with `WWW-Authenticate: Bearer`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the caller's key does not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 403: `POST /v1/lora/init` of a base model outside `allowed_init_base_models`.
    pub fn base_model_not_allowed(base: &str, allowed: &[String]) -> Self {
        let mut sorted = allowed.to_vec();
        sorted.sort();
        Self::new(
            StatusCode::FORBIDDEN,
            "base_model_not_allowed",
            format!(
                "base_model '{base}' is not allowed for initialization. Allowed models: {}",
                sorted.join(", ")
            ),
        )
    }

    /// 409: the request conflicts with the current state; `message` says how.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 409: a LoRA of that id exists with other parameters.
    pub fn lora_exists(lora_id: &str, differences: &[String]) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "lora_exists",
            format!(
                "LoRA {lora_id} already exists with different parameters: {}",
                differences.join("; ")
            ),
        )
    }

    /// 409: a rollback to a version retention has removed.
    pub fn version_pruned(lora_id: &str, version: i32) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "version_pruned",
            format!(
                "version {version} of {lora_id} is no longer stored \
                 (storage.adapter_versions_keep); pin versions you may want to return to"
            ),
        )
    }

    /// 429: this key has `queued` jobs waiting, at its limit.
    pub fn too_many_queued_jobs(
        queued: impl std::fmt::Display,
        limit: impl std::fmt::Display,
    ) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_queued_jobs",
            format!(
                "this API key has {queued} jobs queued (limit {limit}, \
                 server.max_queued_jobs_per_key); retry when some have run"
            ),
        )
    }

    /// 503: no inference backend is configured for chat, completions or score.
    pub fn no_inference_backend() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_inference_backend",
            "no inference server is configured: set VLLM_BASE_URL (vllm.base_url)",
        )
    }

    /// 503: every vLLM is training or asleep, and stayed so for `waited`.
    pub fn backends_busy(waited: std::time::Duration) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backends_busy",
            format!(
                "every inference server is training or asleep; waited {:.0} s \
                 (vllm.unavailable_wait_s)",
                waited.as_secs_f64()
            ),
        )
    }

    /// 503: the LoRA is being loaded into this vLLM by its node's worker.
    pub fn adapter_loading(model: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "adapter_loading",
            format!(
                "LoRA '{model}' is being loaded into this inference server by its \
                 node's worker (its versions are in object storage); retry shortly"
            ),
        )
    }

    /// 503: the completion cache could not be read; the feedback was not accepted.
    pub fn cache_unavailable(error: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cache_unavailable",
            format!("{error}; the feedback was not accepted, retry"),
        )
    }

    /// Tinker's sampler failed: 503 with `Retry-After` when trying again may help (a 5xx,
    /// a future that timed out, an ended session), else 502. The message names the call
    /// and carries Tinker's.
    pub fn sampler_failed(retryable: bool, message: impl std::fmt::Display) -> Self {
        let message = format!("Tinker's sampler failed: {message}");
        if retryable {
            let mut e = Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sampler_unavailable",
                message,
            );
            e.retry_after = Some(1);
            e
        } else {
            Self::new(StatusCode::BAD_GATEWAY, "sampler_error", message)
        }
    }

    /// 502: the inference server did not answer.
    pub fn upstream_unreachable(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            format!("the inference server did not answer: {detail}"),
        )
    }

    /// vLLM answered `status` with `message`: its client errors are the caller's (unknown
    /// model, bad parameter) and pass on as they are; its server errors are a 502.
    pub fn upstream_answered(status: u16, message: String) -> Self {
        match StatusCode::from_u16(status) {
            Ok(s) if s.is_client_error() => Self::new(s, "upstream_rejected", message),
            _ => Self::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("the inference server failed ({status}): {message}"),
            ),
        }
    }

    /// A feedback job that ended without success: 409 when cancelled, 422 when its input
    /// was refused at training time, 500 otherwise.
    pub fn job_ended(cancelled: bool, invalid_input: bool, message: String) -> Self {
        let (status, code) = match (cancelled, invalid_input) {
            (true, _) => (StatusCode::CONFLICT, "job_cancelled"),
            (_, true) => (StatusCode::UNPROCESSABLE_ENTITY, "job_failed"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "job_failed"),
        };
        Self::new(status, code, message)
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(extra);
        self
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound(m) => ApiError::not_found(m),
            CoreError::IdempotencyKeyReused(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                m,
            ),
            CoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            CoreError::Invalid(m) => ApiError::invalid(m),
            CoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the queue database is unavailable; retry shortly",
                )
            }
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({"code": self.code, "message": self.message});
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.extra, error.as_object_mut())
        {
            obj.extend(extra);
        }
        // `detail` is what CLaaS (FastAPI) answers errors with; its clients read it.
        let body = serde_json::json!({ "error": error, "detail": self.message });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

/// How long a request's body may take to arrive: set per request by the deadline middleware
/// (`timeouts.rs`), read by [`JsonBody`].
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

/// The JSON body of a request, with decoding failures in the error envelope: 413 over the
/// size limit, 400 for broken JSON, 422 for JSON of the wrong shape.
pub struct JsonBody<T>(pub T, pub axum::body::Bytes);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?"));
        if !content_type.is_some_and(is_json) {
            return Err(ApiError::unsupported_media_type(
                content_type.unwrap_or("none"),
            ));
        }
        let limit = req
            .extensions()
            .get::<BodyDeadline>()
            .map_or(std::time::Duration::from_secs(30), |d| d.0);
        let read = axum::body::Bytes::from_request(req, state);
        let bytes = tokio::time::timeout(limit, read)
            .await
            .map_err(|_| ApiError::body_timed_out(limit))?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "request body exceeds the configured limit (server.max_body_bytes)",
                    )
                } else {
                    ApiError::bad_request(rejection.body_text())
                }
            })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        // Fields a body type does not know (and does not refuse) are dropped, as CLaaS
        // (pydantic) drops them, and named in the log.
        let mut ignored = Vec::new();
        let mut note = |path: serde_ignored::Path<'_>| ignored.push(path.to_string());
        let de = serde_ignored::Deserializer::new(&mut de, &mut note);
        let value = serde_path_to_error::deserialize(de).map_err(|e| {
            let inner = e.inner();
            let path = e.path().to_string();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::bad_request(format!("malformed JSON: {inner}"))
            } else if path == "." {
                ApiError::invalid(format!("invalid request body: {inner}"))
            } else {
                ApiError::invalid(format!("invalid request body at {path}: {inner}"))
            }
        })?;
        if !ignored.is_empty() {
            tracing::info!(fields = ?ignored, "request fields this API does not use are ignored");
        }
        Ok(JsonBody(value, bytes))
    }
}

/// `application/json` or `application/<anything>+json`, with any parameters (`charset`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// 404 for unknown routes, in the envelope.
pub async fn route_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route")
}

/// 405 for a known route with the wrong method, in the envelope.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The query string, decoded into `T`, with failures in the error envelope (400) instead of
/// axum's plain-text rejection.
pub struct QueryParams<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| QueryParams(q))
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
    }
}

/// The error envelope as the OpenAPI document describes it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The message again, where CLaaS (FastAPI) puts it, for CLaaS's clients.
    pub detail: String,
}

/// One error: a stable code, a human message, and where a job failed, which one.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `invalid_request`, `not_found`, `forbidden`, ...
    pub code: String,
    pub message: String,
    /// The job, when the error is a job's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<uuid::Uuid>,
    /// The phase a failed job failed in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_url: Option<String>,
}

/// The errors any route may answer with, for the OpenAPI document (each route adds its own).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Errors {
    /// Malformed: broken JSON, a bad query string or header, an id that is not one.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid API key (keys are configured).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key may not act on this LoRA or the route needs an admin key (open API: a foreign `Host` or `Origin`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The body did not arrive within `server.request_body_timeout_s`.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// The body is over `server.max_body_bytes`.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// A body that is not sent as `Content-Type: application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Well-formed but invalid: a field of the wrong type or out of range.
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// The queue database is unreachable; retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The answer did not start within the route's time limit (a dependency is slow).
    #[response(status = 504)]
    Timeout(ErrorBody),
}

// --- Successes -----------------------------------------------------------------------------

/// 201 with `body`.
pub fn created<T: IntoResponse>(body: T) -> Response {
    (StatusCode::CREATED, body).into_response()
}

/// 202 with `body`: accepted, finishing in the background.
pub fn accepted<T: IntoResponse>(body: T) -> Response {
    (StatusCode::ACCEPTED, body).into_response()
}

/// 204.
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// Health: 200 while the API can take work, 503 while it cannot (load balancers read it).
pub fn health(up: bool, body: impl IntoResponse) -> Response {
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

/// The dashboard's login form refused a key: 403 for a valid key that is not an admin's,
/// 401 for one that is unknown or revoked; the form is shown again with the reason.
pub fn login_refused(valid_key: bool) -> (StatusCode, &'static str) {
    if valid_key {
        (
            StatusCode::FORBIDDEN,
            "this key is not an admin key; the dashboard needs one",
        )
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "the key is not valid (unknown or revoked)",
        )
    }
}

/// 303 to `to`: a browser form's answer (the dashboard's actions, login and logout).
pub fn see_other(to: &str) -> Response {
    axum::response::Redirect::to(to).into_response()
}
