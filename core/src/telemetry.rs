//! Logging and tracing shared by every subcommand: `RUST_LOG`-style filtering (default
//! `info`), human-readable lines on stderr, and, when an OTLP endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`), every span exported over OTLP/HTTP (JSON) with W3C trace
//! context propagation. A job carries the trace context of the request that enqueued it
//! ([`current_context`]), and the worker's job span continues that trace
//! ([`set_parent`]), so a feedback request and every phase of its job share one trace id.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"))
}

/// Installs the global subscriber once; later calls are no-ops (tests start many services).
/// With `otlp_endpoint` (the collector's base URL, e.g. `http://otel-collector:4318`), spans
/// are also exported as `service` to `<endpoint>/v1/traces`.
pub fn init(otlp_endpoint: Option<&str>, service: &'static str) {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter());
    let otel = otlp_endpoint
        .filter(|e| !e.is_empty())
        .and_then(|endpoint| match provider(endpoint, service) {
            Ok(p) => {
                let tracer = p.tracer("claas");
                let _ = PROVIDER.set(p);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(filter()),
                )
            }
            Err(e) => {
                eprintln!("telemetry.otlp_endpoint: traces are off: {e}");
                None
            }
        });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
}

/// The exporter's HTTP client blocks, so it is built on a thread outside any async runtime
/// (building or dropping it inside one panics); the batch processor exports from a thread
/// of its own.
fn provider(endpoint: &str, service: &'static str) -> Result<SdkTracerProvider, String> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    std::thread::spawn(move || {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(url)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build())
    })
    .join()
    .map_err(|_| "the exporter could not be built".to_string())?
}

/// Exports every span ended so far (blocks until the collector answered or timed out).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

/// Flushes and stops the exporter; call once before the process exits.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// The current span's trace context as W3C headers (`traceparent`, `tracestate`), for a
/// job to carry; `None` when there is no trace (tracing off or no span).
pub fn current_context() -> Option<serde_json::Value> {
    let cx = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    (!carrier.is_empty()).then(|| serde_json::json!(carrier))
}

/// Makes `span` continue the trace a job carries (from [`current_context`]).
pub fn set_parent(span: &tracing::Span, carried: Option<&serde_json::Value>) {
    let Some(obj) = carried.and_then(|v| v.as_object()) else {
        return;
    };
    continue_trace(
        span,
        obj.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
    );
}

/// Makes `span` continue the trace of an incoming request's `traceparent` header, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &[(&str, &str)]) {
    continue_trace(
        span,
        headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect(),
    );
}

/// Parents `span` on the W3C context in `carrier`, when it has a `traceparent`.
fn continue_trace(span: &tracing::Span, carrier: HashMap<String, String>) {
    if carrier.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(cx);
    }
}
