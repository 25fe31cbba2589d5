//! The unchanged CLaaS client contract over a real training step: a feedback request with
//! no `Prefer` header, on a server whose default wait is set, answers 200 with
//! `distill_result.metadata.total_loss` from the candle SDPO step, and the published
//! version holds a changed adapter.

#[path = "common/trainer_models.rs"]
mod trainer_models;

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::Device;
use claas_api::{router, ApiOptions, AppState};
use claas_core::queue::SharedStore;
use claas_core::testing::TestDb;
use claas_testutil::http::{call, post};
use claas_testutil::tempdir;
use claas_trainer::template::{ChatTokenizer, Message};
use claas_trainer::LoraAdapter;
use claas_worker::testing::tiny_executor;
use claas_worker::{Worker, WorkerOptions};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceExt;

/// Where version `n` of `lora_id` is stored, as recorded.
async fn version_dir(app: &claas_api::App, lora_id: &str, n: usize) -> PathBuf {
    let (_, versions) = call(
        app,
        Request::get(format!("/v1/lora/{lora_id}/versions"))
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    let uri = versions["versions"][n]["storage_uri"]
        .as_str()
        .unwrap_or_default();
    claas_core::types::local_path(uri).expect("a local version")
}

async fn export_status(app: &claas_api::App, lora_id: &str, version: i32) -> StatusCode {
    let req = Request::get(format!(
        "/v1/lora/export?lora_id={lora_id}&version={version}"
    ))
    .body(Body::empty())
    .expect("req");
    app.clone().oneshot(req).await.expect("answer").status()
}

async fn contract(db: &TestDb) {
    let model_dir = tempdir("model");
    let lora_root = tempdir("loras");
    let data_dir = tempdir("data");
    // The base model is named by its checkpoint directory, so init writes version 0 itself.
    let base_model = model_dir.display().to_string();
    let exec = tiny_executor(&base_model, &model_dir, &lora_root, 5).await;
    let store: SharedStore = db.store.clone();
    let (stop, rx) = watch::channel(false);
    let worker = Worker::new(
        store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::new("trained-test", vec![base_model.clone()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });
    let app = router(trainer_models::with_trainer_models(AppState::new(
        store,
        ApiOptions {
            max_body_bytes: 1 << 20,
            feedback_default_wait_s: 60,
            feedback_max_wait_s: 60,
            max_attempts: 3,
            default_base_model: base_model.clone(),
            allowed_init_base_models: vec![base_model.clone()],
            lora_root: lora_root.display().to_string(),
            data_dir: data_dir.to_path_buf(),
            max_lora_rank: None,
        },
    )));

    let (status, body) = call(
        &app,
        post(
            "/v1/lora/init",
            &json!({"lora_id": "u/a", "lora_r": 8, "lora_alpha": 16}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A LoRA whose id looks like a version directory of the first: their files never meet.
    let (status, body) = call(
        &app,
        post("/v1/lora/init", &json!({"lora_id": "u/a/v1", "lora_r": 8})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v0_file = version_dir(&app, "u/a", 0)
        .await
        .join("adapter_model.safetensors");
    assert!(v0_file.is_file(), "init wrote version 0");
    let v0_sha = claas_trainer::storage::sha256_file(&v0_file).expect("sha");

    let tok = ChatTokenizer::from_dir(&model_dir).expect("tokenizer");
    let system = "You are a helpful assistant.";
    let prompt_text = tok
        .render(
            &[
                Message::new("system", system),
                Message::new("user", "Say hi"),
            ],
            true,
            &Default::default(),
        )
        .expect("render");
    let prompt_ids = tok.encode(&prompt_text).expect("ids");
    let response_ids = tok.encode("Hello! 😀 Great to see you!").expect("ids");
    let request = json!({"requests": [{
        "lora_id": "u/a",
        "prompt": "Say hi",
        "response": "Hello! 😀 Great to see you!",
        "feedback": "no emoji",
        "prompt_token_ids": prompt_ids,
        "response_token_ids": response_ids,
        "response_logprobs": vec![-5.0; response_ids.len()],
        "system_prompt": system,
        "training": {"learning_rate": 1e-3},
    }]});
    // No Prefer header: the server's default wait applies and the answer is CLaaS's 200.
    let (status, body) = call(&app, post("/v1/feedback", &request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["vllm"],
        json!({"slept": false, "woke": false}),
        "no vLLM is configured, so none was slept or woken"
    );
    let meta = &body["distill_result"]["metadata"];
    let loss = meta["total_loss"].as_f64().expect("total_loss");
    assert!(loss.is_finite() && loss > 0.0, "a real SDPO loss: {meta}");
    assert_eq!(meta["tokens_processed"], json!(response_ids.len()));
    assert!(meta["grad_norm"].as_f64().expect("grad_norm") > 0.0);

    let (_, versions) = call(
        &app,
        Request::get("/v1/lora/u/a/versions")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(versions["current_version"], 1);
    assert_eq!(versions["versions"][0]["sha256"], json!(v0_sha));
    assert_eq!(
        versions["versions"][1]["metrics"]["total_loss"].as_f64(),
        Some(loss)
    );
    let cfg = claas_trainer::Qwen3Config::from_dir(&model_dir).expect("config");
    let v1_dir = version_dir(&app, "u/a", 1).await;
    let v0 = LoraAdapter::load(v0_file.parent().expect("dir"), &cfg, &Device::Cpu).expect("v0");
    let v1 = LoraAdapter::load(&v1_dir, &cfg, &Device::Cpu).expect("v1");
    assert!(v1_dir.join("optimizer_state.safetensors").is_file());
    let moved = v0.params().iter().any(|(k, a)| {
        let b = &v1.params()[k];
        (a.as_tensor() - b.as_tensor())
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .map(|d| d > 0.0)
            .unwrap_or(false)
    });
    assert!(moved, "version 1 differs from version 0");

    // Export: a zip of version 1's PEFT files, checked against the recorded sha256.
    let resp = app
        .clone()
        .oneshot(
            Request::get("/v1/lora/export?lora_id=u/a&version=1")
                .body(Body::empty())
                .expect("req"),
        )
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"u__a-v1.zip\""
    );
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).expect("zip");
    let mut names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.to_string()).expect("entry name"))
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    // On request, the AdamW moments too (CLaaS's export can carry them).
    let resp = app
        .clone()
        .oneshot(
            Request::get("/v1/lora/export?lora_id=u/a&version=1&include_optimizer=true")
                .body(Body::empty())
                .expect("req"),
        )
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let with = resp.into_body().collect().await.expect("body").to_bytes();
    let with = zip::ZipArchive::new(std::io::Cursor::new(with.to_vec())).expect("zip");
    let names: Vec<String> = with
        .file_names()
        .map(|n| n.map(|n| n.to_string()).expect("entry name"))
        .collect();
    assert!(
        names.iter().any(|n| n == "optimizer_state.safetensors"),
        "{names:?}"
    );
    let mut weights = Vec::new();
    std::io::Read::read_to_end(
        &mut archive.by_name("adapter_model.safetensors").expect("entry"),
        &mut weights,
    )
    .expect("read");
    assert_eq!(
        versions["versions"][1]["sha256"],
        json!(hex_sha256(&weights)),
        "the exported weights are the published ones"
    );
    let (status, body) = call(
        &app,
        Request::get("/v1/lora/export?lora_id=u/a&version=7")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Corrupted storage is refused, not exported.
    std::fs::write(&v0_file, b"not the weights").expect("tamper");
    let (status, body) = call(
        &app,
        Request::get("/v1/lora/export?lora_id=u/a&version=0")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not match its recorded sha256"),
        "{body}"
    );

    // `overwrite`: the trained LoRA starts afresh, with new parameters, as version 2; the
    // trained version stays in the history, and the next feedback trains from the fresh one.
    let (status, body) = call(
        &app,
        post(
            "/v1/lora/init",
            &json!({"lora_id": "u/a", "lora_r": 4, "lora_alpha": 8, "overwrite": true}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["overwritten"].clone(), body["current_version"].clone()),
        (json!(true), json!(2))
    );
    let (status, body) = call(
        &app,
        post(
            "/v1/lora/init",
            &json!({"lora_id": "u/a", "lora_r": 4, "lora_alpha": 8}),
        ),
    )
    .await;
    assert_eq!(
        (status, body["created"].clone()),
        (StatusCode::OK, json!(false)),
        "{body}"
    );
    let (status, body) = call(&app, post("/v1/feedback", &request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, versions) = call(
        &app,
        Request::get("/v1/lora/u/a/versions")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(versions["current_version"], 3, "{versions}");
    let v2 = &versions["versions"][2];
    assert_eq!(v2["metrics"]["reinitialized"], true, "{v2}");
    let fresh = version_dir(&app, "u/a", 3)
        .await
        .join("adapter_config.json");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&fresh).expect("v3 config")).expect("json");
    assert_eq!(
        config["r"], 4,
        "version 3 was trained from the rank-4 restart"
    );

    // Rollback: version 1 (trained, rank 8) becomes current again as version 4, with the
    // same files; clients using CLaaS's `-latest` alias reach it too.
    let (status, body) = call(&app, post("/v1/lora/u/a/pin", &json!({"version": 1}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(
        &app,
        post("/v1/lora/u/a-latest/rollback", &json!({"version": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["current_version"].clone(),
            body["rolled_back_to"].clone()
        ),
        (json!(4), json!(1))
    );
    let (_, versions) = call(
        &app,
        Request::get("/v1/lora/u/a-latest/versions")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(versions["current_version"], 4);
    let v = &versions["versions"];
    assert_eq!(v[4]["storage_uri"], v[1]["storage_uri"], "{versions}");
    assert_eq!(v[4]["metrics"]["rollback_of"], 1);
    assert_eq!(v[1]["pinned"], true);
    let (_, list) = call(
        &app,
        Request::get("/v1/lora?prefix=u/")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(
        list["items"][0]["rank"], 8,
        "the LoRA has version 1's shape again"
    );
    let (status, _) = call(&app, post("/v1/lora/u/a/rollback", &json!({"version": 99}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&app, post("/v1/lora/u/a/rollback", &json!({"version": 4}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "already current");
    // Feedback sent to the alias trains the LoRA, from the rolled-back version.
    let mut aliased = request.clone();
    aliased["requests"][0]["lora_id"] = json!("u/a-latest");
    let (status, body) = call(&app, post("/v1/feedback", &aliased)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            version_dir(&app, "u/a", 5)
                .await
                .join("adapter_config.json"),
        )
        .expect("v5 config"),
    )
    .expect("json");
    assert_eq!(
        config["r"], 8,
        "version 5 was trained from version 1's rank-8 adapter"
    );

    // Five versions of `u/a` later, and after deleting it, `u/a/v1` keeps its own files.
    assert_eq!(export_status(&app, "u/a/v1", 0).await, StatusCode::OK);
    let resp = app
        .clone()
        .oneshot(
            Request::delete("/v1/lora?lora_id=u/a")
                .body(Body::empty())
                .expect("req"),
        )
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!v1_dir.exists(), "the deleted LoRA's files are gone");
    assert_eq!(export_status(&app, "u/a/v1", 0).await, StatusCode::OK);

    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claas_client_contract_with_a_real_step_sqlite() {
    let db = TestDb::sqlite().await;
    contract(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claas_client_contract_with_a_real_step_postgres() {
    let db = TestDb::postgres().await;
    contract(&db).await;
    db.cleanup().await;
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
