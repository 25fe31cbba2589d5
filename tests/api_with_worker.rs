//! The HTTP contract, through the real router, on both stores.

// The API's test helpers (options, a server on a real socket, a JSON client).
#[path = "../api/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use claas_api::{router, ApiOptions, AppState};
use claas_core::queue::{RetryPolicy, SharedStore};
use claas_core::testing::{lora, TestDb, TEST_BASE_MODEL};
use claas_testutil::http::{call, get, post, post_raw};
use claas_worker::{SimulatedExecutor, Worker, WorkerOptions};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;

/// The API's options, its directories under `dir` (the test's own, held while it runs).
fn options(dir: &Path) -> ApiOptions {
    ApiOptions {
        max_body_bytes: 64 * 1024,
        feedback_default_wait_s: 0,
        feedback_max_wait_s: 30,
        max_attempts: 3,
        default_base_model: TEST_BASE_MODEL.into(),
        allowed_init_base_models: vec![TEST_BASE_MODEL.into()],
        lora_root: dir.join("loras").display().to_string(),
        data_dir: dir.join("data"),
        max_lora_rank: None,
    }
}

fn app(store: &SharedStore, opts: ApiOptions) -> claas_api::App {
    router(AppState::new(store.clone(), opts))
}

fn item(lora_id: &str, feedback: &str) -> Value {
    json!({
        "lora_id": lora_id,
        "prompt": "Write a haiku about rust",
        "response": "Iron turns to red",
        "feedback": feedback,
        "prompt_token_ids": [1, 2, 3],
        "response_token_ids": [4, 5, 6],
        "response_logprobs": [-0.1, -0.2, -0.3],
        "system_prompt": "You are a poet."
    })
}

fn batch(items: Vec<Value>) -> Value {
    json!({ "requests": items })
}

fn without(mut v: Value, keys: &[&str]) -> Value {
    if let Some(obj) = v.as_object_mut() {
        for k in keys {
            obj.remove(*k);
        }
    }
    v
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, needle: &str) {
    assert_eq!(status, want, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        body["error"]["code"].is_string(),
        "envelope has a code: {body}"
    );
    assert!(
        msg.contains(needle),
        "message {msg:?} should contain {needle:?}"
    );
    // CLaaS clients read FastAPI's `detail`: the same message beside our envelope.
    assert_eq!(body["detail"].as_str(), Some(msg), "CLaaS's detail: {body}");
}

/// Runs an in-process worker with the simulated executor, its versions under `dir`'s
/// LoRA root (as [`options`]), until the returned sender fires.
fn start_worker(store: &SharedStore, dir: &Path) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    let worker = Worker::new(
        store.clone(),
        Arc::new(SimulatedExecutor {
            step: Duration::from_millis(1),
            root: dir.join("loras"),
        }),
        WorkerOptions {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            retry: RetryPolicy {
                base: Duration::from_millis(10),
                max: Duration::from_millis(20),
            },
            ..WorkerOptions::new(
                format!("test-{}", uuid::Uuid::new_v4().simple()),
                vec![TEST_BASE_MODEL.into()],
            )
        },
    );
    tokio::spawn(async move { worker.run(rx).await });
    tx
}

claas_core::both_stores!(
    feedback_is_accepted_with_a_pollable_job,
    feedback_validation_matches_claas,
    oversized_and_malformed_bodies_get_the_envelope,
    idempotency_key_replays_or_rejects,
    prefer_wait_returns_claas_feedback_response,
    default_wait_serves_unchanged_claas_clients,
    failed_job_never_answers_200,
    cancel_and_list_jobs,
    health_reports_database_and_workers,
    lora_init_registers_and_lists_versions,
    hostile_lora_ids_are_rejected_before_touching_storage,
    loras_are_listed_by_literal_prefix,
    metrics_report_queue_jobs_phases_losses_workers_and_requests,
    waiting_requests_past_the_limit_get_503_and_enqueue_nothing,
);

async fn lora_init_registers_and_lists_versions(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    let app = app(&db.store, options(&dir));
    let (status, body) = call(&app, post("/v1/lora/init", &json!({"lora_id": "user/new"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["lora_id"], "user/new");
    assert_eq!(body["created"], true);
    // CLaaS clients init blindly on every start: the same parameters answer 200.
    let (status, body) = call(&app, post("/v1/lora/init", &json!({"lora_id": "user/new"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["lora_id"].clone(), body["created"].clone()),
        (json!("user/new"), json!(false))
    );
    let changed = json!({"lora_id": "user/new", "lora_r": 16});
    let (status, body) = call(&app, post("/v1/lora/init", &changed)).await;
    assert_error(
        status,
        &body,
        StatusCode::CONFLICT,
        "lora_r 32 (requested 16)",
    );
    let other = json!({"lora_id": "user/x", "base_model": "Qwen/Qwen3-32B"});
    let (status, body) = call(&app, post("/v1/lora/init", &other)).await;
    assert_error(
        status,
        &body,
        StatusCode::FORBIDDEN,
        "Allowed models: test/base",
    );
    // With a vLLM that serves ranks up to 32, a rank it would refuse is a 422 naming both.
    let vllm_app = self::app(
        &db.store,
        ApiOptions {
            max_lora_rank: Some(32),
            ..options(&dir)
        },
    );
    let big = json!({"lora_id": "user/big", "lora_r": 64});
    let (status, body) = call(&vllm_app, post("/v1/lora/init", &big)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "lora_r 64 is above the vLLM's --max-lora-rank 32",
    );
    let bad_r = json!({"lora_id": "user/y", "lora_r": 2});
    let (status, body) = call(&app, post("/v1/lora/init", &bad_r)).await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "lora_r");
    let (status, body) = call(&app, get("/v1/lora/user/new/versions")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current_version"], 0);
    assert_eq!(body["versions"][0]["version"], 0);
    let (status, body) = call(&app, get("/v1/lora/user/none/versions")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "LoRA not found");
    let lora = db
        .store
        .get_lora("user/new")
        .await
        .expect("get")
        .expect("lora");
    assert_eq!(
        (lora.rank, lora.alpha, lora.target_modules.len()),
        (32, 64.0, 7)
    );
}

async fn hostile_lora_ids_are_rejected_before_touching_storage(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    let app = app(&db.store, options(&dir));
    let long = "x".repeat(129);
    let hostile: [&str; 15] = [
        "..",
        "../etc",
        "a/../../b",
        "/etc/passwd",
        "a\\b",
        "a\u{0}b",
        "%2e%2e/x",
        "a/%2F/b",
        "C:\\x",
        "a/./b",
        " a",
        "a/",
        "",
        "ü",
        &long,
    ];
    for id in hostile {
        let (status, resp) = call(&app, post("/v1/lora/init", &json!({ "lora_id": id }))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id:?}: {resp}");
        assert!(
            resp["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("lora_id"),
            "{id:?}: {resp}"
        );
    }
    let all = db.store.list_loras("").await.expect("list");
    assert!(all.is_empty(), "nothing was recorded: {all:?}");
}

async fn loras_are_listed_by_literal_prefix(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    let app = app(&db.store, options(&dir));
    for id in ["alice/a", "alice/b", "alice2/x", "bob/a", "a_b/x", "aXb/y"] {
        let (status, body) = call(&app, post("/v1/lora/init", &json!({"lora_id": id}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = call(&app, get("/v1/lora?prefix=alice/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["loras"], json!(["alice/a", "alice/b"]));
    assert_eq!(body["items"][0]["current_version"], 0);
    assert_eq!(body["items"][0]["base_model"], TEST_BASE_MODEL);
    let (_, body) = call(&app, get("/v1/lora?prefix=alice")).await;
    assert_eq!(body["loras"], json!(["alice/a", "alice/b", "alice2/x"]));
    // `_` is not a wildcard.
    let (_, body) = call(&app, get("/v1/lora?prefix=a_")).await;
    assert_eq!(body["loras"], json!(["a_b/x"]));
    let (_, body) = call(&app, get("/v1/lora")).await;
    assert_eq!(body["loras"].as_array().map(Vec::len), Some(6));
}

async fn feedback_is_accepted_with_a_pollable_job(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("user/a")).await.expect("lora");
    let app = app(&db.store, options(&dir));
    let req = post("/v1/feedback", &batch(vec![item("user/a", "too long")]));
    let (status, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued");
    let id = body["job_id"].as_str().expect("job id").to_string();
    assert_eq!(body["status_url"], format!("/v1/jobs/{id}"));
    let (status, job) = call(&app, get(&format!("/v1/jobs/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["lora_id"], "user/a");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["phase"], "queued");
    assert_eq!(job["attempt"], 0);
    assert_eq!(job["sample_count"], 1);
    assert_eq!(job["events"][0]["phase"], "queued");
    assert!(job.get("payload").is_none(), "token ids stay in the store");
}

async fn feedback_validation_matches_claas(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    db.store.create_lora(&lora("b")).await.expect("lora");
    let app = app(&db.store, options(&dir));
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let cases: Vec<(Value, StatusCode, &str)> =
        vec![
        (
            batch(vec![with(item("a", "x"), "training", json!({"alpha": 1.5, "is_clip": -1}))]),
            unprocessable,
            "invalid training config: alpha must be within [0, 1]; is_clip must be within [1, 20]",
        ),
        (
            batch(vec![with(item("a", "x"), "training", json!({"teacher_top_k": 5}))]),
            unprocessable,
            "teacher_top_k must be within [10, 100]",
        ),
        (
            batch(vec![item("a", "x"), item("b", "y")]),
            StatusCode::BAD_REQUEST,
            "all requests must use the same lora_id",
        ),
        (
            batch(vec![item("a", "x"), with(item("a", "y"), "training", json!({"is_clip": 7.0}))]),
            StatusCode::BAD_REQUEST,
            "all requests must use the same training config",
        ),
        (batch(vec![]), unprocessable, "at least one item"),
        (
            batch(vec![without(item("a", "x"), &["feedback"])]),
            unprocessable,
            "missing field `feedback`",
        ),
        (
            batch(vec![with(item("a", "x"), "feedback", json!(""))]),
            unprocessable,
            "feedback must not be empty",
        ),
        (batch(vec![item("missing", "x")]), StatusCode::NOT_FOUND, "LoRA not found: missing"),
        (batch(vec![item("../etc", "x")]), unprocessable, "invalid lora_id"),
        (
            batch(vec![without(
                item("a", "x"),
                &["prompt_token_ids", "response_token_ids", "response_logprobs"],
            )]),
            StatusCode::NOT_FOUND,
            "No cached completion for content_hash=",
        ),
        (
            batch(vec![with(item("a", "x"), "response_logprobs", json!([-0.1]))]),
            unprocessable,
            "1 entries for 3 response tokens",
        ),
        (
            batch(vec![without(item("a", "x"), &["response_logprobs"])]),
            unprocessable,
            "together",
        ),
        (
            json!({"requests": [item("a", "x")], "orchestration": {"sleep_level": 3}}),
            unprocessable,
            "sleep_level",
        ),
        // Level 2 discards vLLM's weights, which vLLM with LoRA cannot reload: it would
        // serve from garbage after the job. Refused, naming the level that works.
        (
            json!({"requests": [item("a", "x")], "orchestration": {"sleep_level": 2}}),
            unprocessable,
            "use sleep_level 1",
        ),
    ];
    for (body, want, needle) in cases {
        let (status, answer) = call(&app, post("/v1/feedback", &body)).await;
        assert_error(status, &answer, want, needle);
    }
    let counts = db.store.status_counts().await.expect("counts");
    assert!(
        counts.is_empty(),
        "no rejected request enqueued anything: {counts:?}"
    );
}

async fn oversized_and_malformed_bodies_get_the_envelope(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    let app = app(&db.store, options(&dir));
    let huge = "x".repeat(100 * 1024);
    let (status, body) = call(&app, post_raw("/v1/feedback", huge, &[])).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "exceeds");
    let (status, body) = call(&app, post_raw("/v1/feedback", "{not json".into(), &[])).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed JSON");
    let (status, body) = call(&app, get("/v1/nowhere")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "no such route");
    let (status, body) = call(&app, get("/v1/jobs/not-a-uuid")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "not a job id");
    let missing = format!("/v1/jobs/{}", uuid::Uuid::now_v7());
    let (status, body) = call(&app, get(&missing)).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "job not found");
    let empty = batch(vec![]).to_string();
    let (status, body) = call(
        &app,
        post_raw("/v1/feedback", empty, &[("prefer", "wait=soon")]),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "Prefer");
}

async fn idempotency_key_replays_or_rejects(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    let app = app(&db.store, options(&dir));
    let body = batch(vec![item("a", "no emoji")]).to_string();
    let key = [("idempotency-key", "k-1")];
    let (s1, first) = call(&app, post_raw("/v1/feedback", body.clone(), &key)).await;
    let (s2, again) = call(&app, post_raw("/v1/feedback", body, &key)).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["job_id"], again["job_id"]);
    let other = batch(vec![item("a", "something else")]).to_string();
    let (status, body) = call(&app, post_raw("/v1/feedback", other, &key)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "different request body",
    );
    let counts = db.store.status_counts().await.expect("counts");
    assert_eq!(
        counts.iter().map(|c| c.1).sum::<i64>(),
        1,
        "one job for one key"
    );
}

async fn prefer_wait_returns_claas_feedback_response(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    let stop = start_worker(&db.store, &dir);
    let app = app(&db.store, options(&dir));
    let body = batch(vec![
        item("a", "good recursive solution"),
        item("a", "shorter"),
    ])
    .to_string();
    let wait = [("prefer", "wait=20")];
    let (status, resp) = call(&app, post_raw("/v1/feedback", body.clone(), &wait)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["status"], "ok");
    assert_eq!(resp["lora_id"], "a");
    assert_eq!(resp["request_id"].as_str().map(str::len), Some(32));
    assert_eq!(resp["batch_size"], 2);
    assert_eq!(resp["distill_result"]["lora_id"], "a");
    assert!(
        resp["distill_result"]["metadata"]["total_loss"].is_number(),
        "{resp}"
    );
    assert_eq!(resp["vllm"], json!({"slept": true, "woke": true}));
    for k in ["sleep", "distill", "save", "wake", "logprobs", "total"] {
        assert!(resp["timing_ms"][k].is_u64(), "timing_ms.{k} in {resp}");
    }
    assert_eq!(resp["feedback_log_path"], "");
    // The wait happens outside the router's layers; the request is still counted once,
    // with the status it answered.
    let text = metrics_text(&app).await;
    let series = |status: &str| {
        format!("claas_http_requests_total{{method=\"POST\",route=\"/v1/feedback\",status=\"{status}\"}}")
    };
    assert_eq!(sample(&text, &series("200")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &series("202")), None, "{text}");
    let asynchronous = [("prefer", "respond-async")];
    let (status, resp) = call(&app, post_raw("/v1/feedback", body, &asynchronous)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    let _ = stop.send(true);
    let versions = db.store.lora_versions("a").await.expect("versions");
    assert!(versions.len() >= 2, "the first job published a version");
}

async fn default_wait_serves_unchanged_claas_clients(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    let stop = start_worker(&db.store, &dir);
    let opts = ApiOptions {
        feedback_default_wait_s: 20,
        ..options(&dir)
    };
    let app = app(&db.store, opts);
    let (status, resp) = call(
        &app,
        post("/v1/feedback", &batch(vec![item("a", "too long")])),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "no Prefer header: the default wait applies: {resp}"
    );
    assert_eq!(resp["status"], "ok");
    let _ = stop.send(true);
}

async fn failed_job_never_answers_200(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    let stop = start_worker(&db.store, &dir);
    let app = app(&db.store, options(&dir));
    let body = batch(vec![item("a", "[simulate:fatal]")]).to_string();
    let (status, resp) = call(
        &app,
        post_raw("/v1/feedback", body, &[("prefer", "wait=20")]),
    )
    .await;
    let needle = "Feedback update failed in phase 'distill'";
    assert_error(status, &resp, StatusCode::UNPROCESSABLE_ENTITY, needle);
    assert_eq!(resp["error"]["phase"], "distill");
    let id = resp["error"]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let (_, job) = call(&app, get(&format!("/v1/jobs/{id}"))).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "invalid_input");
    let _ = stop.send(true);
}

async fn cancel_and_list_jobs(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    let app = app(&db.store, options(&dir));
    let mut ids = Vec::new();
    for n in 0..3 {
        let req = post("/v1/feedback", &batch(vec![item("a", &format!("f{n}"))]));
        let (_, b) = call(&app, req).await;
        ids.push(b["job_id"].as_str().expect("id").to_string());
    }
    let cancel = format!("/v1/jobs/{}/cancel", ids[0]);
    let (status, body) = call(&app, post(&cancel, &json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    let (status, body) = call(&app, post(&cancel, &json!({}))).await;
    assert_error(status, &body, StatusCode::CONFLICT, "already finished");
    let (status, page) = call(&app, get("/v1/jobs?lora_id=a&limit=2")).await;
    assert_eq!(status, StatusCode::OK);
    let got: Vec<_> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(got, [ids[2].clone(), ids[1].clone()]);
    let cursor = page["next_cursor"].as_str().expect("cursor");
    let (_, page2) = call(
        &app,
        get(&format!("/v1/jobs?lora_id=a&limit=2&cursor={cursor}")),
    )
    .await;
    assert_eq!(page2["jobs"][0]["id"], ids[0].as_str());
    assert_eq!(page2["next_cursor"], Value::Null);
    let (_, cancelled) = call(&app, get("/v1/jobs?status=cancelled")).await;
    assert_eq!(cancelled["jobs"].as_array().map(Vec::len), Some(1));
    let (status, body) = call(&app, get("/v1/jobs?status=sideways")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "unknown job status");
}

async fn health_reports_database_and_workers(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    let app = app(&db.store, options(&dir));
    let (status, body) = call(&app, get("/v1/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["database"]["up"], true);
    assert_eq!(body["workers"]["alive"], 0);
    let stop = start_worker(&db.store, &dir);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = call(&app, get("/v1/health")).await;
    assert_eq!(body["workers"]["alive"], 1);
    let _ = stop.send(true);
}

async fn metrics_text(app: &claas_api::App) -> String {
    let resp = app
        .clone()
        .oneshot(get("/metrics"))
        .await
        .expect("router answers");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

async fn metrics_report_queue_jobs_phases_losses_workers_and_requests(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    let app = app(&db.store, options(&dir));
    db.store.create_lora(&lora("m/a")).await.expect("lora");
    for i in 0..3 {
        let (status, body) = call(
            &app,
            post(
                "/v1/feedback",
                &json!({"requests": [item("m/a", &format!("f{i}"))]}),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let text = metrics_text(&app).await;
    assert_eq!(
        sample(&text, "claas_jobs{status=\"queued\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "claas_jobs{status=\"running\"}"), Some(0.0));
    assert!(sample(&text, "claas_queue_oldest_age_seconds").is_some_and(|a| a >= 0.0));
    assert_eq!(
        sample(
            &text,
            "claas_http_requests_total{method=\"POST\",route=\"/v1/feedback\",status=\"202\"}"
        ),
        Some(3.0),
        "{text}"
    );

    let stop = start_worker(&db.store, &dir);
    let started = std::time::Instant::now();
    let text = loop {
        let text = metrics_text(&app).await;
        let done = sample(
            &text,
            "claas_jobs_finished_last_hour{outcome=\"succeeded\"}",
        );
        if done.unwrap_or(0.0) >= 1.0 && sample(&text, "claas_jobs{status=\"queued\"}") == Some(0.0)
        {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "jobs never finished: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let trained = sample(
        &text,
        "claas_job_phase_duration_seconds_count{phase=\"distill\"}",
    )
    .expect("distill histogram");
    assert!(trained >= 1.0, "{text}");
    assert!(
        sample(&text, "claas_lora_last_loss{lora_id=\"m/a\"}").is_some_and(f64::is_finite),
        "{text}"
    );
    assert!(
        sample(&text, "claas_workers{state=\"idle\"}").is_some_and(|n| n >= 1.0)
            || sample(&text, "claas_workers{state=\"training\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "claas_completion_cache_up{backend=\"memory\"}"),
        Some(1.0)
    );
    let _ = stop.send(true);
}

async fn waiting_requests_past_the_limit_get_503_and_enqueue_nothing(db: &TestDb) {
    let dir = claas_testutil::tempdir("api");
    db.store.create_lora(&lora("a")).await.expect("lora");
    // No worker: a waiting request stays open for its whole wait.
    let state = AppState::new(db.store.clone(), options(&dir)).with_max_waiting(1);
    let app = router(state);
    let wait = [("prefer", "wait=3")];
    let first = {
        let (app, body) = (app.clone(), batch(vec![item("a", "first")]).to_string());
        tokio::spawn(async move { call(&app, post_raw("/v1/feedback", body, &wait)).await })
    };
    // Until the first request holds its place, a second could take it.
    let queued = || async {
        let counts = db.store.status_counts().await.expect("counts");
        counts.iter().map(|c| c.1).sum::<i64>()
    };
    for _ in 0..100 {
        if queued().await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let second = batch(vec![item("a", "second")]).to_string();
    let req = post_raw("/v1/feedback", second.clone(), &wait);
    let resp = app.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert_eq!(queued().await, 1, "the refused request enqueued nothing");
    // Asking not to wait needs no place.
    let asynchronous = [("prefer", "respond-async")];
    let (status, _) = call(&app, post_raw("/v1/feedback", second, &asynchronous)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = first.await.expect("first request");
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the first waited, then got its job"
    );
    // Its place is free again.
    let third = batch(vec![item("a", "third")]).to_string();
    let (status, _) = call(
        &app,
        post_raw("/v1/feedback", third, &[("prefer", "wait=1")]),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}
