//! `GET /metrics` in Prometheus text format. Queue, job, LoRA and worker numbers are read
//! from the store at scrape time (indexed queries over live jobs and the last hour), so
//! every API replica reports the same fleet-wide values; HTTP request counts and latencies
//! are this process's own.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::deferred::DeferredWait;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Finished jobs older than this are not looked at.
const WINDOW: Duration = Duration::from_secs(3600);

const PHASE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// This process's HTTP metrics.
pub struct HttpMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl HttpMetrics {
    pub fn new() -> HttpMetrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "claas_http_requests_total",
                "HTTP requests answered by this API process",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "claas_http_request_duration_seconds",
                "Time to answer an HTTP request (streams: until the headers)",
            )
            .buckets(PHASE_BUCKETS.to_vec()),
            &["method", "route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("register");
        registry
            .register(Box::new(latency.clone()))
            .expect("register");
        HttpMetrics {
            registry,
            requests,
            latency,
        }
    }
}

impl HttpMetrics {
    /// One answered request: its count by status, and its time since `started`.
    pub fn count(&self, method: &str, route: &str, status: StatusCode, started: Instant) {
        self.requests
            .with_label_values(&[method, route, status.as_str()])
            .inc();
        self.latency
            .with_label_values(&[method, route])
            .observe(started.elapsed().as_secs_f64());
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics::new()
    }
}

/// Middleware: counts and times every request by its route pattern (not its path, so ids
/// do not blow up the label space).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    // A request that goes on waiting outside the router is counted when it answers.
    if DeferredWait::count_when_answered(&resp, started) {
        return resp;
    }
    state
        .http_metrics
        .count(&method, &route, resp.status(), started);
    resp
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> ApiResult<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels).map_err(internal)?;
    r.register(Box::new(g.clone())).map_err(internal)?;
    Ok(g)
}

fn internal(e: prometheus::Error) -> ApiError {
    ApiError::internal(format!("metrics: {e}"))
}

/// Prometheus metrics: queue, jobs, LoRAs and workers fleet-wide, and this replica's HTTP
/// traffic. Needs an admin key or the metrics token when keys are on.
#[utoipa::path(
    get,
    path = "/metrics",
    tags = ["ops", "admin"],
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 401, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody),
    )
)]
// Long: the Prometheus text, one block per metric family.
pub async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    let snap = state.store.metrics_snapshot(WINDOW).await?;
    let workers = state.store.list_workers().await?;
    let cache_up = state.cache.ping().await.is_ok();

    let r = Registry::new();
    let jobs = gauge_vec(
        &r,
        "claas_jobs",
        "Jobs queued, running, or joined to a running batch",
        &["status"],
    )?;
    for s in ["queued", "running", "coalesced"] {
        jobs.with_label_values(&[s]).set(0.0);
    }
    for (s, n) in &snap.live {
        jobs.with_label_values(&[s.as_str()]).set(*n as f64);
    }
    let oldest = gauge_vec(
        &r,
        "claas_queue_oldest_age_seconds",
        "Age of the oldest queued job (0 when none)",
        &[],
    )?;
    oldest
        .with_label_values(&[] as &[&str])
        .set(snap.oldest_queued_s.unwrap_or(0.0));
    let finished = gauge_vec(
        &r,
        "claas_jobs_finished_last_hour",
        "Jobs that ended in the last hour, by outcome",
        &["outcome"],
    )?;
    for s in ["succeeded", "failed", "cancelled"] {
        finished.with_label_values(&[s]).set(0.0);
    }
    for (s, n) in &snap.finished {
        finished.with_label_values(&[s.as_str()]).set(*n as f64);
    }
    let phases = HistogramVec::new(
        HistogramOpts::new(
            "claas_job_phase_duration_seconds",
            "Time per job phase, over jobs that succeeded in the last hour",
        )
        .buckets(PHASE_BUCKETS.to_vec()),
        &["phase"],
    )
    .map_err(internal)?;
    r.register(Box::new(phases.clone())).map_err(internal)?;
    for timings in &snap.phase_ms {
        for (phase, ms) in timings {
            phases
                .with_label_values(&[phase.as_str()])
                .observe(*ms as f64 / 1000.0);
        }
    }
    let loss = gauge_vec(
        &r,
        "claas_lora_last_loss",
        "Training loss of the step that made each LoRA's current version",
        &["lora_id"],
    )?;
    for (id, l) in &snap.last_loss {
        loss.with_label_values(&[id.as_str()]).set(*l);
    }
    let by_state = gauge_vec(
        &r,
        "claas_workers",
        "Registered workers by state",
        &["state"],
    )?;
    for s in ["idle", "training", "draining", "sleeping", "stopped"] {
        by_state.with_label_values(&[s]).set(0.0);
    }
    let beat = gauge_vec(
        &r,
        "claas_worker_heartbeat_age_seconds",
        "Seconds since each worker's last heartbeat",
        &["worker", "state"],
    )?;
    let now = Utc::now();
    for w in &workers {
        by_state.with_label_values(&[w.state.as_str()]).inc();
        beat.with_label_values(&[w.id.as_str(), w.state.as_str()])
            .set((now - w.heartbeat_at).num_milliseconds() as f64 / 1000.0);
    }
    let up = IntGaugeVec::new(
        Opts::new(
            "claas_completion_cache_up",
            "Whether the completion cache answers",
        ),
        &["backend"],
    )
    .map_err(internal)?;
    r.register(Box::new(up.clone())).map_err(internal)?;
    up.with_label_values(&[state.cache.backend()])
        .set(i64::from(cache_up));

    let mut families = r.gather();
    families.extend(state.http_metrics.registry.gather());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}
