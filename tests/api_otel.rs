//! OpenTelemetry end to end: a small OTLP/HTTP receiver stands in for the collector, the
//! process exports to it (`telemetry::init` with its URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`
//! does), a feedback request is served and its job run by an in-process worker, and the
//! receiver must hold the request's span and one span per job phase, all in one trace.
//! (One test in this binary: the tracing subscriber is global to the process.)

// The API's test helpers (options, a server on a real socket, a JSON client).
#[path = "../api/tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use claas_api::AppState;
use claas_core::testing::{lora, TestDb, TEST_BASE_MODEL};
use claas_worker::{SimulatedExecutor, Worker, WorkerOptions};
use serde_json::{json, Value};

/// Every span the receiver got: (trace id, span id, parent span id, name).
type Spans = Arc<Mutex<Vec<(String, String, String, String)>>>;

async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let mut got = sink.lock().expect("spans");
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
                            got.push((
                                text("traceId"),
                                text("spanId"),
                                text("parentSpanId"),
                                text("name"),
                            ));
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feedback_request_and_every_phase_of_its_job_share_one_trace() {
    let (collector, spans) = receiver().await;
    claas_core::telemetry::init(Some(&collector), "claas-test");

    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("otel");
    db.store.create_lora(&lora("traced")).await.expect("lora");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        Arc::new(SimulatedExecutor {
            step: Duration::from_millis(1),
            // The API's LoRA root (`common::options`).
            root: dir.join("loras"),
        }),
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::new("otel-worker", vec![TEST_BASE_MODEL.into()])
        },
    );
    let run = tokio::spawn(async move { worker.run(rx).await });
    let base = common::serve(AppState::new(db.store.clone(), common::options(&dir))).await;

    let body = json!({"requests": [{
        "lora_id": "traced", "prompt": "Write a haiku", "response": "Leaves fall",
        "feedback": "shorter", "prompt_token_ids": [1, 2, 3], "response_token_ids": [4, 5],
        "response_logprobs": [-0.5, -0.25], "system_prompt": "You are terse."
    }]});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/feedback"))
        .header("prefer", "wait=30")
        .json(&body)
        .send()
        .await
        .expect("feedback");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let _ = stop.send(true);
    let _ = run.await;

    // Export what has ended, then find the request's trace.
    let mut found = Vec::new();
    for _ in 0..50 {
        tokio::task::spawn_blocking(claas_core::telemetry::flush)
            .await
            .expect("flush");
        found = spans.lock().expect("spans").clone();
        if found.iter().any(|s| s.3 == "publish") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = found
        .iter()
        .find(|s| s.3 == "POST /v1/feedback")
        .unwrap_or_else(|| panic!("no span for the feedback request in {found:?}"));
    let trace = &request.0;
    assert_eq!(trace.len(), 32, "a W3C trace id: {trace}");
    let job = found
        .iter()
        .find(|s| s.3 == "job")
        .unwrap_or_else(|| panic!("no job span in {found:?}"));
    assert_eq!(&job.0, trace, "the job continues the request's trace");
    for phase in ["distill", "publish"] {
        let span = found
            .iter()
            .find(|s| s.3 == phase)
            .unwrap_or_else(|| panic!("no {phase} span in {found:?}"));
        assert_eq!(&span.0, trace, "{phase} is in the request's trace");
        assert_eq!(span.2, job.1, "{phase} is a child of the job span");
    }
    db.cleanup().await;
}
