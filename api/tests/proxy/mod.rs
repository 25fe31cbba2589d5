//! What the proxy's test files share: an API on a real socket in front of the fake vLLM,
//! on SQLite with one LoRA, and the requests they send it.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use claas_api::cache::{CompletionCache, MemoryCache};
use claas_api::upstream::Upstream;
use claas_api::{ApiOptions, AppState};
use claas_core::testing::{TestDb, TEST_BASE_MODEL};
use claas_fake_vllm::{FakeVllm, Options};
use claas_testutil::TempDir;
use serde_json::{json, Value};

use crate::common;

pub struct Env {
    pub api: String,
    pub fake: FakeVllm,
    pub db: TestDb,
    pub http: reqwest::Client,
    /// The API's directories and the LoRAs' files, removed when the test ends.
    pub dir: TempDir,
}

/// The options of the proxy's API, its directories under `dir`.
pub fn options(dir: &Path) -> ApiOptions {
    ApiOptions {
        max_lora_rank: Some(32),
        ..common::options(dir)
    }
}

pub async fn start_with(fake_opts: Options, cache: Arc<dyn CompletionCache>) -> Env {
    let key = fake_opts.api_key.clone();
    let fake = FakeVllm::start(Options {
        served_model_name: TEST_BASE_MODEL.into(),
        ..fake_opts
    })
    .await;
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("proxy");
    let state = AppState::new(db.store.clone(), options(&dir))
        .with_cache(cache)
        .with_upstream(Some(Upstream::new(&fake.url, key, Duration::from_secs(30))));
    let api = common::serve(state).await;
    Env {
        api,
        fake,
        db,
        http: reqwest::Client::new(),
        dir,
    }
}

pub async fn start() -> Env {
    let env = start_with(
        Options {
            api_key: Some("vllm-secret".into()),
            ..Options::default()
        },
        Arc::new(MemoryCache::new(
            claas_api::cache::Bounds::new(100, 10_000),
            Duration::from_secs(3600),
        )),
    )
    .await;
    make_lora(&env, "me/a", 8).await;
    env
}

impl Env {
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        common::post_json(&self.http, &format!("{}{path}", self.api), body).await
    }

    /// Claims the queued job `job_id` as a worker would and returns what it would train.
    pub async fn job_payload(&self, job_id: &str) -> Value {
        let claimed = common::claim_one(&self.db.store, TEST_BASE_MODEL).await;
        assert_eq!(claimed.job.id.to_string(), job_id);
        serde_json::to_value(&claimed.payload).expect("payload")
    }
}

pub fn chat(model: Option<&str>, user: &str) -> Value {
    let mut b = json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": user}]});
    if let Some(m) = model {
        b["model"] = json!(m);
    }
    b
}

pub fn feedback(lora: &str, response: &str) -> Value {
    json!({"requests": [{"lora_id": lora, "prompt": "Say hi", "response": response,
        "feedback": "shorter please"}]})
}

pub async fn make_lora(env: &Env, lora_id: &str, rank: u32) -> std::path::PathBuf {
    common::local_lora(&env.db.store, &env.dir, lora_id, rank).await
}
