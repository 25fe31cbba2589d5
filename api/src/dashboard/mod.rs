//! The ops dashboard: server-rendered HTML over the queue tables, at `/v1/dashboard`.
//!
//! Pages work without JavaScript (a small script only refreshes the overview and job lists
//! in place). With API keys on, only admins get in: a bearer admin key, or a login form that
//! sets a signed, HttpOnly, SameSite=Strict session cookie. Every action (cancel, retry,
//! delete) is a POST carrying a CSRF token and is recorded in the job's timeline and in the
//! audit log.

pub mod evals;
mod login;
pub mod session;
pub mod throttle;
pub mod views;

pub use login::gate;

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use claas_core::queue::{AuditEntry, CancelOutcome, JobFilter};
use claas_core::types::JobStatus;
use minijinja::value::Serde;
use minijinja::{context, Environment, Value};
use serde::Deserialize;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, QueryParams};
use crate::{routes, AppState};
use session::{cookie, set_cookie, NONCE_COOKIE, SESSION_COOKIE, SESSION_TTL_S};
use views::{JobRow, WorkerView};

/// Every dashboard path starts with this.
pub const PREFIX: &str = "/v1/dashboard";
/// The eval runs and their plots: admin pages like the dashboard's.
const EVALS: &str = "/v1/eval";

/// Whether `path` is a page behind the dashboard's login (admin keys or a session).
pub fn is_gated(path: &str) -> bool {
    [PREFIX, EVALS].iter().any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}
const LOGIN: &str = "/v1/dashboard/login";
/// Rows per jobs page.
const PAGE: i64 = 50;

/// The dashboard's routes (HTML for browsers, documented with the rest of the API).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(overview))
        .routes(routes!(login::login_form, login::login))
        .routes(routes!(login::logout))
        .routes(routes!(jobs))
        .routes(routes!(job))
        .routes(routes!(act))
        .routes(routes!(loras))
        .routes(routes!(lora))
        .routes(routes!(evals::list))
        .routes(routes!(evals::plot))
}

/// The errors a page answers with: an HTML page for browsers, or the JSON envelope for a
/// request the API layer refused before the page (a bad query string, a missing key).
pub struct PageErrors;

impl utoipa::IntoResponses for PageErrors {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        [
            (400, "Malformed: a bad query string or id"),
            (401, "No valid key or session (JSON for bearer requests)"),
            (403, "Not an admin key, or a missing CSRF token"),
            (404, "No such job, LoRA, run or plot"),
            (503, "The queue database is unavailable"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let html = ContentBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build();
            let json = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("text/html", html)
                .content("application/json", json)
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
    }
}

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in [
            ("base.html", include_str!("templates/base.html")),
            ("overview.html", include_str!("templates/overview.html")),
            ("jobs.html", include_str!("templates/jobs.html")),
            ("job.html", include_str!("templates/job.html")),
            ("loras.html", include_str!("templates/loras.html")),
            ("lora.html", include_str!("templates/lora.html")),
            ("login.html", include_str!("templates/login.html")),
            ("error.html", include_str!("templates/error.html")),
            ("evals.html", include_str!("templates/evals.html")),
            ("job_rows.html", include_str!("templates/job_rows.html")),
            ("refresh.html", include_str!("templates/refresh.html")),
        ] {
            env.add_template(name, source)
                .expect("the dashboard's templates parse");
        }
        env
    })
}

/// An error shown as a page (the JSON envelope's status and message).
pub struct PageError(ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = templates()
            .get_template("error.html")
            .and_then(|t| {
                t.render(context! {
                    status => self.0.status.as_u16(),
                    reason => self.0.status.canonical_reason().unwrap_or(""),
                    message => self.0.message,
                })
            })
            .unwrap_or_else(|e| format!("template error: {e}"));
        let mut resp = (self.0.status, Html(body)).into_response();
        if let Some(s) = self.0.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        resp
    }
}

pub(crate) type PageResult = Result<Response, PageError>;

/// The cookie this browser's forms are bound to: its session, else its CSRF nonce.
fn bound_cookie(headers: &HeaderMap) -> Option<&str> {
    cookie(headers, SESSION_COOKIE).or_else(|| cookie(headers, NONCE_COOKIE))
}

/// What ties this browser's forms to it: [`bound_cookie`], or a new nonce cookie (set
/// here on the first page when there is neither).
fn csrf_binding(headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    if let Some(b) = bound_cookie(headers) {
        return (b.to_owned(), None);
    }
    let nonce = session::new_nonce();
    let set = set_cookie(headers, NONCE_COOKIE, &nonce, SESSION_TTL_S);
    (nonce, Some(set))
}

/// Renders `name` inside the layout, with the CSRF token and who is logged in.
pub(crate) fn render(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    name: &str,
    ctx: minijinja::Value,
) -> PageResult {
    let (binding, set) = csrf_binding(headers);
    let csrf = state.sessions.csrf_token(&binding);
    let who = match caller {
        Caller::Key(k) => k.name.clone(),
        _ => String::new(),
    };
    let body = templates()
        .get_template(name)
        .and_then(|t| t.render(context! { csrf => csrf, who => who, ..ctx }))
        .map_err(|e| ApiError::internal(format!("dashboard template {name}: {e}")))?;
    let mut resp = Html(body).into_response();
    if let Some(set) = set {
        resp.headers_mut().append(header::SET_COOKIE, set);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// 403 unless the form carries the CSRF token of this browser's cookie.
fn check_csrf(state: &AppState, headers: &HeaderMap, token: &str) -> Result<(), PageError> {
    if state
        .sessions
        .csrf_ok(bound_cookie(headers).unwrap_or(""), token)
    {
        return Ok(());
    }
    Err(PageError(ApiError::forbidden(
        "missing or invalid CSRF token: reload the page and try again",
    )))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Queue depth, throughput, failures and workers.
#[utoipa::path(get, path = "/v1/dashboard", tags = ["dashboard", "admin"],
    responses((status = 200, description = "The overview page", content_type = "text/html", body = String),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), PageErrors))]
async fn overview(State(state): State<AppState>, headers: HeaderMap, caller: Caller) -> PageResult {
    let now = Utc::now();
    let snap = state
        .store
        .metrics_snapshot(Duration::from_secs(3600))
        .await?;
    let count = |list: &[(JobStatus, i64)], s: JobStatus| {
        list.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n)
    };
    let (succeeded, failed, cancelled) = (
        count(&snap.finished, JobStatus::Succeeded),
        count(&snap.finished, JobStatus::Failed),
        count(&snap.finished, JobStatus::Cancelled),
    );
    let failure_rate = (succeeded + failed > 0).then(|| {
        format!(
            "{:.1} %",
            100.0 * failed as f64 / (succeeded + failed) as f64
        )
    });
    let workers: Vec<WorkerView> = state
        .store
        .list_workers()
        .await?
        .iter()
        .map(|w| WorkerView::new(w, now))
        .collect();
    let audit = state.store.recent_audit(10).await?;
    let audit: Vec<_> = audit
        .iter()
        .map(|a| {
            context! {
                at => views::time(a.at), actor => a.actor.clone(), action => a.action.clone(),
                job_id => a.job_id.map(|j| j.to_string()), detail => a.detail.clone(),
            }
        })
        .collect();
    render(
        &state,
        &headers,
        &caller,
        "overview.html",
        context! {
            queued => count(&snap.live, JobStatus::Queued),
            running => count(&snap.live, JobStatus::Running),
            coalesced => count(&snap.live, JobStatus::Coalesced),
            oldest_queued_s => snap.oldest_queued_s.map(|s| s.round() as i64),
            succeeded, failed, cancelled,
            throughput_per_min => format!("{:.2}", (succeeded + failed + cancelled) as f64 / 60.0),
            failure_rate,
            phases => Value::from(Serde(views::phase_latencies(&snap.phase_ms))),
            workers => Value::from(Serde(&workers)),
            audit,
            now => views::time(now),
        },
    )
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    status: Option<String>,
    lora_id: Option<String>,
    worker: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
}

fn some(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Jobs with filters, newest first.
#[utoipa::path(get, path = "/v1/dashboard/jobs", tags = ["dashboard", "admin"], params(JobsQuery),
    responses((status = 200, description = "The jobs page", content_type = "text/html", body = String),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), PageErrors))]
async fn jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    QueryParams(q): QueryParams<JobsQuery>,
) -> PageResult {
    let bad = |m: String| PageError(ApiError::bad_request(m));
    let status = some(&q.status)
        .map(str::parse::<JobStatus>)
        .transpose()
        .map_err(|e| bad(e.to_string()))?;
    let time = |raw: Option<&str>, name: &str| -> Result<Option<Uuid>, PageError> {
        raw.map(|r| {
            views::parse_time(r).map(views::uuid_floor).ok_or_else(|| {
                bad(format!(
                    "{name}: '{r}' is not a time (use 2026-12-02T10:30, UTC, or RFC 3339)"
                ))
            })
        })
        .transpose()
    };
    let after = time(some(&q.since), "since")?;
    let until = time(some(&q.until), "until")?;
    let cursor = some(&q.cursor)
        .map(|c| Uuid::parse_str(c).map_err(|_| bad(format!("cursor: '{c}' is not a job id"))))
        .transpose()?;
    let before = match (cursor, until) {
        (Some(c), Some(u)) => Some(c.min(u)),
        (c, u) => c.or(u),
    };
    let list = state
        .store
        .list_jobs(&JobFilter {
            lora_id: some(&q.lora_id).map(str::to_owned),
            lora_prefixes: None,
            status,
            worker_id: some(&q.worker).map(str::to_owned),
            before,
            after,
            limit: PAGE,
        })
        .await?;
    let next = (list.len() as i64 == PAGE)
        .then(|| list.last().map(|j| j.id.to_string()))
        .flatten();
    let filters = [
        ("status", some(&q.status)),
        ("lora_id", some(&q.lora_id)),
        ("worker", some(&q.worker)),
        ("since", some(&q.since)),
        ("until", some(&q.until)),
    ];
    let keep: String = filters
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("&{k}={}", urlencode(v))))
        .collect();
    render(
        &state,
        &headers,
        &caller,
        "jobs.html",
        context! {
            jobs => Value::from(Serde(list.iter().map(JobRow::new).collect::<Vec<_>>())),
            next_cursor => next,
            keep,
            statuses => JobStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            f_status => some(&q.status).unwrap_or(""),
            f_lora => some(&q.lora_id).unwrap_or(""),
            f_worker => some(&q.worker).unwrap_or(""),
            f_since => some(&q.since).unwrap_or(""),
            f_until => some(&q.until).unwrap_or(""),
        },
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One job: timeline, samples, metrics and actions.
#[utoipa::path(get, path = "/v1/dashboard/jobs/{id}", tags = ["dashboard", "admin"],
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses((status = 200, description = "The job page", content_type = "text/html", body = String),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), PageErrors))]
async fn job(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Path(id): Path<String>,
) -> PageResult {
    let job = routes::jobs::find(&state, &id).await?;
    let id = job.id;
    let events = state.store.job_events(id).await?;
    let samples = state
        .store
        .job_payload(id)
        .await?
        .map(|p| p.samples)
        .unwrap_or_default();
    let live = !job.status.is_terminal();
    render(
        &state,
        &headers,
        &caller,
        "job.html",
        context! {
            job => Value::from(Serde(JobRow::new(&job))),
            trained_by => job.trained_by.map(|t| t.to_string()),
            published_version => job.published_version,
            cancel_requested => job.cancel_requested,
            created => views::time(job.created_at),
            started => job.started_at.map(views::time),
            finished => job.finished_at.map(views::time),
            timings => Value::from(Serde(&job.timings_ms.iter().collect::<Vec<_>>())),
            metrics => Value::from(Serde(views::job_numbers(job.result.as_ref()))),
            error => job.error.as_ref().map(|e| format!("{}: {}", e.code, e.message)),
            events => events.iter().map(|e| context! {
                at => views::time(e.at), phase => e.phase.clone(), message => e.message.clone(),
            }).collect::<Vec<_>>(),
            samples => samples.iter().map(|s| context! {
                prompt => s.prompt.clone(), response => s.response.clone(),
                feedback => s.feedback.clone(),
            }).collect::<Vec<_>>(),
            scored_texts => views::teacher_scored_texts(job.result.as_ref()),
            can_cancel => live,
            can_retry => job.status == JobStatus::Failed && job.published_version.is_none(),
            can_delete => !live,
        },
    )
}

/// Cancels, retries or deletes a job (a form with its CSRF token); recorded in the audit log.
#[utoipa::path(post, path = "/v1/dashboard/jobs/{id}/{action}", tags = ["dashboard", "admin"],
    params(("id" = String, Path, description = "The job id (a UUID)"),
        ("action" = String, Path, description = "`cancel`, `retry` or `delete`")),
    request_body(content = CsrfForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Done: to the job (or the jobs list after a delete)", headers(("Location" = String))),
        (status = 409, description = "The job is not in a state the action applies to", content_type = "text/html", body = String),
        (status = 415, description = "Not a form", content_type = "text/plain", body = String),
        (status = 422, description = "The form cannot be read", content_type = "text/plain", body = String),
        PageErrors,
    ))]
async fn act(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> PageResult {
    check_csrf(&state, &headers, &form.csrf)?;
    let id = routes::jobs::parse_id(&id)?;
    let actor = match caller.id() {
        "" => "open API".to_owned(),
        key => key.to_owned(),
    };
    let (detail, to) = match action.as_str() {
        "cancel" => {
            let job = match state.store.cancel(id).await? {
                CancelOutcome::Cancelled(j) => j,
                CancelOutcome::Requested(j) => j,
            };
            let detail = format!("cancel by {actor} from the dashboard");
            state
                .store
                .add_job_event(id, job.phase.as_str(), &detail)
                .await?;
            (detail, format!("{PREFIX}/jobs/{id}"))
        }
        "retry" => {
            let detail = format!("retried by {actor} from the dashboard");
            state.store.retry_job(id, &detail).await?;
            (detail, format!("{PREFIX}/jobs/{id}"))
        }
        "delete" => {
            let job = state.store.delete_job(id).await?;
            (
                format!(
                    "deleted by {actor} from the dashboard ({} job of LoRA {})",
                    job.status.as_str(),
                    job.lora_id
                ),
                format!("{PREFIX}/jobs"),
            )
        }
        other => {
            return Err(PageError(ApiError::not_found(format!(
                "unknown action '{other}' (cancel, retry, delete)"
            ))))
        }
    };
    state
        .store
        .record_audit(&AuditEntry {
            at: Utc::now(),
            actor,
            action,
            job_id: Some(id),
            detail,
        })
        .await?;
    Ok(crate::error::see_other(&to))
}

/// Every LoRA with its current version.
#[utoipa::path(get, path = "/v1/dashboard/loras", tags = ["dashboard", "admin"],
    responses((status = 200, description = "The LoRAs page", content_type = "text/html", body = String),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), PageErrors))]
async fn loras(State(state): State<AppState>, headers: HeaderMap, caller: Caller) -> PageResult {
    let list = state.store.list_loras("").await?;
    let rows: Vec<_> = list
        .iter()
        .map(|l| {
            context! {
                lora_id => l.lora_id.clone(), base_model => l.base_model.clone(), rank => l.rank,
                current_version => l.current_version, created => views::time(l.created_at),
            }
        })
        .collect();
    render(
        &state,
        &headers,
        &caller,
        "loras.html",
        context! { loras => rows },
    )
}

/// One LoRA: versions, loss chart and recent jobs.
#[utoipa::path(get, path = "/v1/dashboard/loras/{lora_id}", tags = ["dashboard", "admin"],
    params(("lora_id" = String, Path, description = "The LoRA (a `/` in it may be sent raw or as %2F)", example = "demo/assistant")),
    responses((status = 200, description = "The LoRA page", content_type = "text/html", body = String),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), PageErrors))]
async fn lora(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Path(lora_id): Path<String>,
) -> PageResult {
    let l = state
        .store
        .get_lora(&lora_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("LoRA not found: {lora_id}")))?;
    let versions = state.store.lora_versions(&lora_id).await?;
    let recent = state
        .store
        .list_jobs(&JobFilter {
            lora_id: Some(lora_id.clone()),
            limit: 20,
            ..Default::default()
        })
        .await?;
    render(
        &state,
        &headers,
        &caller,
        "lora.html",
        context! {
            lora_id => l.lora_id, base_model => l.base_model, rank => l.rank, alpha => l.alpha,
            current_version => l.current_version,
            chart => Value::from(Serde(views::loss_chart(&versions))),
            versions => versions.iter().rev().map(|v| context! {
                version => v.version,
                created => views::time(v.created_at),
                job_id => v.job_id.map(|j| j.to_string()),
                metrics => Value::from(Serde(views::numbers(v.metrics.as_ref()))),
                pinned => v.pinned,
                pruned => v.pruned_at.is_some(),
                current => v.version == l.current_version,
            }).collect::<Vec<_>>(),
            jobs => Value::from(Serde(recent.iter().map(JobRow::new).collect::<Vec<_>>())),
        },
    )
}
