//! Inference on Tinker's sampler (`mode: tinker`) against the fake Tinker, through the API:
//! a LoRA is sampled at its current version's sampler checkpoint with the tokens and
//! log-probs Tinker returned, score reads Tinker's prompt log-probs, Tinker's faults answer
//! 503 with `Retry-After` (a 5xx) or are survived (an ended session), and CLaaS's sampler
//! routes answer as CLaaS's do, refresh only for an admin.

#[path = "../../api/tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use claas_api::{ApiOptions, AppState};
use claas_core::testing::TestDb;
use claas_core::types::NewLora;
use claas_engine::TinkerSampler;
use claas_fake_tinker::{FakeTinker, Options};
use claas_testutil::{tempdir, TempDir};
use claas_tinker::{Config, RetryPolicy, SamplerSource, TinkerClient};
use claas_trainer::{ChatTokenizer, Message};
use claas_worker::testing::tiny_checkpoint;
use claas_worker::TinkerTrainer;
use serde_json::{json, Value};

const BASE: &str = "tiny-tinker";

struct Env {
    api: String,
    db: TestDb,
    fake: FakeTinker,
    http: reqwest::Client,
    tok: Arc<ChatTokenizer>,
    /// A key for LoRAs under `me/`, not an admin's (with [`start_with_keys`]).
    tenant: Option<String>,
    _root: TempDir,
}

/// A client of `fake` that tries each call twice, at once.
fn client(fake: &FakeTinker) -> TinkerClient {
    TinkerClient::new(Config {
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        },
        ..Config::new(&fake.url, "tml-test")
    })
    .expect("client")
}

async fn start() -> Env {
    start_inner(false).await
}

/// [`start`] with API keys in use: a tenant's key exists before the API starts.
async fn start_with_keys() -> Env {
    start_inner(true).await
}

async fn start_inner(keys: bool) -> Env {
    let root = tempdir("tinker-sampler");
    let dir = root.join("model");
    tiny_checkpoint(&dir, 4).await;
    let tok = Arc::new(ChatTokenizer::from_dir(&dir).expect("tokenizer"));
    let fake = FakeTinker::start(Options {
        base_models: vec![BASE.into()],
        sample_vocab: 97..123,
        ..Options::default()
    })
    .await;
    let db = TestDb::sqlite().await;
    let tenant = match keys {
        true => Some(common::create_key(&db, "tenant", &["me/"], false).await.1),
        false => None,
    };
    let sampler = TinkerSampler::new(client(&fake), BASE, tok.clone(), db.store.clone());
    let opts = ApiOptions {
        default_base_model: BASE.into(),
        allowed_init_base_models: vec![BASE.into()],
        ..common::options(&root)
    };
    let state = AppState::new(db.store.clone(), opts).with_engine(Some(Arc::new(sampler)));
    Env {
        api: common::serve(state).await,
        db,
        fake,
        http: reqwest::Client::new(),
        tok,
        tenant,
        _root: root,
    }
}

impl Env {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        common::post_json(&self.http, &format!("{}{path}", self.api), body).await
    }

    /// LoRA `id` whose current version is the Tinker checkpoint `uri` (empty: none yet).
    async fn lora(&self, id: &str, uri: &str) {
        let lora = NewLora {
            lora_id: id.into(),
            base_model: BASE.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: uri.into(),
            initial_sha256: String::new(),
        };
        self.db.store.create_lora(&lora).await.expect("lora");
    }

    fn prompt_ids(&self, user: &str) -> Vec<i32> {
        let text = self
            .tok
            .render(&[Message::new("user", user)], true, &Default::default())
            .expect("render");
        let ids = self.tok.encode(&text).expect("encode");
        ids.into_iter().map(|t| t as i32).collect()
    }

    /// What Tinker's `compute_logprobs` gives `ids` on the sampler checkpoint `path`.
    async fn tinker_logprobs(&self, path: &str, ids: &[i32]) -> Vec<Option<f32>> {
        let c = client(&self.fake);
        let session = c.create_session().await.expect("session");
        let source = SamplerSource::ModelPath(path.parse().expect("path"));
        let sampler = c
            .create_sampling_session(&session, 0, &source)
            .await
            .expect("sampler");
        c.compute_logprobs(&sampler, 0, ids)
            .await
            .expect("logprobs")
    }
}

fn chat(model: &str, user: &str) -> Value {
    json!({"model": model, "logprobs": true, "return_token_ids": true,
        "messages": [{"role": "user", "content": user}]})
}

/// A LoRA's initial checkpoint on the fake, as the worker's trainer writes it.
async fn initial_checkpoint(env: &Env) -> String {
    let dir = tempdir("tinker-sampler-tok");
    tiny_checkpoint(&dir, 4).await;
    let trainer =
        TinkerTrainer::from_tokenizer_dir(client(&env.fake), BASE, &dir).expect("trainer");
    trainer.init_lora(4).await.expect("init")
}

#[tokio::test]
async fn a_lora_is_sampled_at_its_versions_sampler_checkpoint_with_tinkers_numbers() {
    let env = start().await;
    let state = initial_checkpoint(&env).await;
    env.lora("me/a", &state).await;
    let (status, a) = env
        .post("/v1/chat/completions", &chat("me/a", "Say hi"))
        .await;
    assert_eq!(status, 200, "{a}");
    let prompt = env.prompt_ids("Say hi");
    assert_eq!(a["prompt_token_ids"], json!(prompt));
    let ids: Vec<i32> = serde_json::from_value(a["choices"][0]["token_ids"].clone()).expect("ids");
    assert!(
        !ids.is_empty() && ids.iter().all(|t| (97..123).contains(t)),
        "{ids:?}"
    );
    let entries = a["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs");
    assert_eq!(entries.len(), ids.len());
    // The log-probs are the sampler checkpoint's, as Tinker scores the same sequence.
    let sampler = state.replace("/weights/", "/sampler_weights/");
    let full: Vec<i32> = prompt.iter().chain(&ids).copied().collect();
    let want = env.tinker_logprobs(&sampler, &full).await;
    for (e, w) in entries.iter().zip(&want[prompt.len()..]) {
        let got = e["logprob"].as_f64().expect("logprob") as f32;
        assert_eq!(Some(got), *w);
    }
    let text: String = ids.iter().map(|&t| char::from(t as u8)).collect();
    assert_eq!(a["choices"][0]["message"]["content"], text);

    // top_logprobs: Tinker's top-k at each position, the sampled token first.
    let mut ask = chat("me/a", "Say hi");
    ask["top_logprobs"] = json!(3);
    let (status, t) = env.post("/v1/chat/completions", &ask).await;
    assert_eq!(status, 200, "{t}");
    let entries = t["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs");
    assert!(!entries.is_empty());
    for e in entries {
        let tops = e["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(tops.len(), 3, "{e}");
        assert_eq!(tops[0]["token"], e["token"], "{e}");
    }

    // Score: Tinker's log-probs of the completion's tokens after the prompt.
    let (status, s) = env
        .post(
            "/v1/score",
            &json!({"model": "me/a", "messages": [{"role": "user", "content": "Say hi"}],
                "completion": "abc"}),
        )
        .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        s["tokens"].as_array().map(Vec::len),
        s["completion_tokens"].as_u64().map(|n| n as usize)
    );
    assert!(s["logprobs"].as_array().is_some_and(|l| !l.is_empty() && l.iter().all(|v| v.as_f64().is_some_and(|x| x < 0.0))), "{s}");

    // A LoRA never trained, and no LoRA at all, sample the base model.
    env.lora("me/new", "").await;
    let (status, b) = env
        .post("/v1/chat/completions", &chat("me/new", "Say hi"))
        .await;
    assert_eq!(status, 200, "{b}");
    let (status, c) = env
        .post("/v1/chat/completions", &chat(BASE, "Say hi"))
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(b["choices"][0]["token_ids"], c["choices"][0]["token_ids"]);
    let (status, _) = env
        .post("/v1/chat/completions", &chat("me/none", "Say hi"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_tinker_5xx_is_a_503_to_retry_and_an_ended_session_is_reopened() {
    let env = start().await;
    env.fake.knobs().submit_errors.store(100, Ordering::SeqCst);
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.api))
        .json(&chat(BASE, "Say hi"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.expect("json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("asample"), "names the call: {body}");
    env.fake.knobs().submit_errors.store(0, Ordering::SeqCst);
    let (status, first) = env
        .post("/v1/chat/completions", &chat(BASE, "Say hi"))
        .await;
    assert_eq!(status, 200, "{first}");

    env.fake.expire_sessions();
    let (status, again) = env
        .post("/v1/chat/completions", &chat(BASE, "Say hi"))
        .await;
    assert_eq!(status, 200, "a new session answers: {again}");
    assert_eq!(
        first["choices"][0]["token_ids"],
        again["choices"][0]["token_ids"]
    );
}

#[tokio::test]
async fn sampler_routes_answer_as_claas_and_only_an_admin_refreshes() {
    let env = start().await;
    let status = |env: &Env| {
        let url = format!("{}/v1/sampler/status", env.api);
        let http = env.http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .expect("status")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    assert_eq!(
        status(&env).await,
        json!({"model_path": null, "base_model": BASE})
    );
    let (code, body) = env
        .post("/v1/sampler/refresh", &json!({"model_path": "not-a-path"}))
        .await;
    assert_eq!(code, 422, "{body}");
    let (code, body) = env
        .post(
            "/v1/sampler/refresh",
            &json!({"model_path": "tinker://nope/sampler_weights/x"}),
        )
        .await;
    assert_eq!(code, 502, "Tinker has no such checkpoint: {body}");
    assert_eq!(
        status(&env).await["model_path"],
        Value::Null,
        "a failed refresh changes nothing"
    );

    let state = initial_checkpoint(&env).await;
    let sampler = state.replace("/weights/", "/sampler_weights/");
    let (code, body) = env
        .post("/v1/sampler/refresh", &json!({"model_path": sampler}))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, json!({"status": "ok", "model_path": sampler}));
    assert_eq!(status(&env).await["model_path"], json!(sampler));
    let (code, body) = env.post("/v1/sampler/refresh", &json!({})).await;
    assert_eq!((code, &body["model_path"]), (200, &Value::Null), "{body}");
}

#[tokio::test]
async fn a_tenant_reads_the_sampler_status_but_cannot_refresh_everyones_base_model() {
    let env = start_with_keys().await;
    let tenant = env.tenant.clone().expect("a tenant key");
    let state = initial_checkpoint(&env).await;
    let sampler = state.replace("/weights/", "/sampler_weights/");
    let url = |path: &str| format!("{}{path}", env.api);
    let read = env
        .http
        .get(url("/v1/sampler/status"))
        .bearer_auth(&tenant)
        .send()
        .await
        .expect("status");
    assert_eq!(read.status(), 200);
    let refresh = env
        .http
        .post(url("/v1/sampler/refresh"))
        .bearer_auth(&tenant)
        .json(&json!({"model_path": sampler}))
        .send()
        .await
        .expect("refresh");
    assert_eq!(refresh.status(), 403);
    let after: Value = env
        .http
        .get(url("/v1/sampler/status"))
        .bearer_auth(&tenant)
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(after["model_path"], Value::Null);
}

/// Export reads adapter files; a version Tinker holds has none here. It used to fail with
/// 500 (the adapter store could not materialize a `tinker://` URI, nor the empty URI of a
/// LoRA never trained).
#[tokio::test]
async fn exporting_a_version_tinker_holds_is_a_clear_4xx_not_a_500() {
    let env = start().await;
    let state = initial_checkpoint(&env).await;
    env.lora("me/a", &state).await;
    env.lora("me/new", "").await;
    let export = |id: &str| {
        let url = format!("{}/v1/lora/export?lora_id={id}", env.api);
        let http = env.http.clone();
        async move {
            let r = http.get(url).send().await.expect("export");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or_default())
        }
    };
    let (status, body) = export("me/a").await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&state),
        "names where the weights are: {body}"
    );
    let (status, body) = export("me/new").await;
    assert_eq!(status, 404, "no files yet: {body}");
}
