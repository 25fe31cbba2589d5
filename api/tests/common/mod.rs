//! What the API test files share: options, a store-parametrised test macro, and a JSON
//! client for an API on a real socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use claas_api::{ApiOptions, AppState};
use claas_core::testing::TEST_BASE_MODEL;
use serde_json::Value;

/// Options on the test base model, with the LoRAs and the data under `dir` (a test's
/// own [`claas_testutil::tempdir`], held while the API runs).
pub fn options(dir: &Path) -> ApiOptions {
    ApiOptions {
        max_body_bytes: 1 << 20,
        feedback_default_wait_s: 0,
        feedback_max_wait_s: 5,
        max_attempts: 3,
        default_base_model: TEST_BASE_MODEL.into(),
        allowed_init_base_models: vec![TEST_BASE_MODEL.into()],
        lora_root: dir.join("loras").display().to_string(),
        data_dir: dir.join("data"),
        max_lora_rank: None,
    }
}

/// Serves `state` on a free loopback port; returns its base URL.
pub async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(claas_api::serve(listener, state, std::future::pending()));
    url
}

/// POSTs JSON; returns the status and the body (JSON, or the text as a string).
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.expect("API answers");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Claims the next queued job for `base_model` as a worker would (one sample per batch).
pub async fn claim_one(
    store: &claas_core::queue::SharedStore,
    base_model: &str,
) -> claas_core::queue::Claimed {
    store
        .claim(&claas_core::queue::ClaimRequest {
            worker_id: "inspector".into(),
            base_models: vec![base_model.into()],
            lease: std::time::Duration::from_secs(60),
            max_batch_samples: 1,
        })
        .await
        .expect("claim")
        .expect("a queued job")
}

/// Stores an API key limited to `prefixes` (none: every LoRA); returns its id and secret.
pub async fn create_key(
    db: &claas_core::testing::TestDb,
    name: &str,
    prefixes: &[&str],
    admin: bool,
) -> (String, String) {
    let (id, secret) = claas_api::auth::new_secret();
    db.store
        .create_api_key(
            &claas_core::types::ApiKey {
                id: id.clone(),
                name: name.into(),
                prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
                admin,
                created_at: chrono::Utc::now(),
                revoked_at: None,
            },
            &claas_api::auth::secret_hash(&secret),
        )
        .await
        .expect("key");
    (id, secret)
}

/// Registers LoRA `lora_id` on the test base model with version 0 in a fresh directory
/// under `under` (a test's tempdir) holding only its `adapter_config.json` (what the proxy
/// needs to load it into a fake vLLM); returns that directory.
pub async fn local_lora(
    store: &claas_core::queue::SharedStore,
    under: &Path,
    lora_id: &str,
    rank: u32,
) -> PathBuf {
    let dir = under.join(format!("lora-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::json!({"r": rank, "lora_alpha": 16, "peft_type": "LORA"}).to_string(),
    )
    .expect("config");
    store
        .create_lora(&claas_core::types::NewLora {
            lora_id: lora_id.into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: rank as i32,
            alpha: 16.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: format!("file://{}", dir.display()),
            initial_sha256: String::new(),
        })
        .await
        .expect("lora");
    dir
}

/// A one-item feedback batch for `lora_id` with its rollout inline (no cache lookup).
pub fn inline_feedback(lora_id: &str) -> Value {
    serde_json::json!({"requests": [{
        "lora_id": lora_id, "prompt": "p", "response": "r", "feedback": "f",
        "prompt_token_ids": [1, 2], "response_token_ids": [3], "response_logprobs": [-0.5],
        "system_prompt": "s"}]})
}
