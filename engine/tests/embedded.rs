//! Embedded inference (no vLLM): chat, streaming, text completions and scoring served in
//! process by candle with the tiny model, the LoRA named by `model` at its current
//! version, and the rollout cached for feedback exactly as sampled.

// The API's test helpers (options, a server on a real socket, a JSON client).
#[path = "../../api/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use claas_api::{ApiOptions, AppState};
use claas_core::testing::TestDb;
use claas_core::types::NewLora;
use claas_engine::Engine;
use claas_testutil::{tempdir, TempDir};
use claas_trainer::{AdapterConfig, ChatTokenizer, LoraAdapter, Message, Qwen3};
use claas_worker::testing::{tiny_checkpoint, tiny_executor};
use serde_json::{json, Value};

const BASE: &str = "tiny-test";

struct Env {
    api: String,
    db: TestDb,
    http: reqwest::Client,
    model: Arc<Qwen3>,
    tok: Arc<ChatTokenizer>,
    /// The model, the LoRAs and the API's data; removed when the test ends.
    root: TempDir,
}

async fn start() -> Env {
    let root = tempdir("embedded");
    let dir = root.join("model");
    tiny_checkpoint(&dir, 21).await;
    let model = Arc::new(Qwen3::load(&dir, &Device::Cpu, DType::F32).expect("model"));
    let tok = Arc::new(ChatTokenizer::from_dir(&dir).expect("tokenizer"));
    let db = TestDb::sqlite().await;
    let engine = Engine::new(model.clone(), tok.clone(), BASE.into(), db.store.clone());
    let opts = ApiOptions {
        default_base_model: BASE.into(),
        allowed_init_base_models: vec![BASE.into()],
        ..common::options(&root)
    };
    let state = AppState::new(db.store.clone(), opts).with_engine(Some(Arc::new(engine)));
    let api = common::serve(state).await;
    db.store.create_lora(&lora("me/a", "")).await.expect("lora");
    Env {
        api,
        db,
        http: reqwest::Client::new(),
        model,
        tok,
        root,
    }
}

fn lora(id: &str, uri: &str) -> NewLora {
    NewLora {
        lora_id: id.into(),
        base_model: BASE.into(),
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        initial_uri: uri.into(),
        initial_sha256: String::new(),
    }
}

impl Env {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        common::post_json(&self.http, &format!("{}{path}", self.api), body).await
    }

    fn prompt_ids(&self, user: &str) -> Vec<u32> {
        let text = self
            .tok
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", user),
                ],
                true,
                &Default::default(),
            )
            .expect("render");
        self.tok.encode(&text).expect("encode")
    }
}

fn chat(model: &str, user: &str) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 10,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]})
}

#[tokio::test]
async fn chat_answers_in_process_with_the_sampled_tokens_and_raw_logprobs() {
    let env = start().await;
    let mut req = chat("me/a", "Say hi");
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(2);
    req["return_token_ids"] = json!(true);
    let (status, a) = env.post("/v1/chat/completions", &req).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], "me/a");
    let prompt = env.prompt_ids("Say hi");
    assert_eq!(a["prompt_token_ids"], json!(prompt));
    let ids: Vec<u32> = serde_json::from_value(a["choices"][0]["token_ids"].clone()).expect("ids");
    assert_eq!(a["usage"]["completion_tokens"], ids.len());
    let entries = a["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("entries");
    assert_eq!(entries.len(), ids.len());
    assert!(entries
        .iter()
        .all(|e| e["top_logprobs"].as_array().map(Vec::len) == Some(2)));
    // Exactly what the trainer computes for these tokens (the LoRA is still initial, so
    // it answers as the base model).
    let all: Vec<u32> = prompt.iter().copied().chain(ids.iter().copied()).collect();
    let want =
        claas_trainer::generate::token_logprobs(&env.model, &all, prompt.len(), None).expect("lp");
    for (e, w) in entries.iter().zip(&want) {
        let got = e["logprob"].as_f64().expect("logprob") as f32;
        assert!((got - w).abs() < 1e-4, "{got} vs {w}");
    }

    // Feedback on the answer trains on those very tokens.
    let text = a["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let (status, body) = env
        .post(
            "/v1/feedback",
            &json!({"requests": [{"lora_id": "me/a", "prompt": "Say hi", "response": text,
                "feedback": "shorter"}]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let claimed = common::claim_one(&env.db.store, BASE).await;
    let rollout = &claimed.payload.samples[0].rollout;
    assert_eq!(rollout.prompt_token_ids, prompt);
    assert_eq!(rollout.response_token_ids, ids);
    assert_eq!(rollout.system_prompt, "Be brief.");
}

#[tokio::test]
async fn streaming_gives_the_same_answer_and_seeds_reproduce() {
    let env = start().await;
    let (_, whole) = env
        .post("/v1/chat/completions", &chat(BASE, "Tell me"))
        .await;
    let mut req = chat(BASE, "Tell me");
    req["stream"] = json!(true);
    let text = env
        .http
        .post(format!("{}/v1/chat/completions", env.api))
        .json(&req)
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("events");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).expect("chunk");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        streamed,
        whole["choices"][0]["message"]["content"]
            .as_str()
            .expect("text")
    );

    let mut seeded = chat(BASE, "Tell me");
    seeded["temperature"] = json!(1.0);
    seeded["seed"] = json!(42);
    seeded["return_token_ids"] = json!(true);
    seeded["max_tokens"] = json!(16);
    let (_, x) = env.post("/v1/chat/completions", &seeded).await;
    let (_, y) = env.post("/v1/chat/completions", &seeded).await;
    assert_eq!(x["choices"][0]["token_ids"], y["choices"][0]["token_ids"]);
}

#[tokio::test]
async fn a_new_version_is_served_from_the_next_request() {
    let env = start().await;
    let mut req = chat("me/a", "Hello");
    req["logprobs"] = json!(true);
    req["return_token_ids"] = json!(true);
    let (_, before) = env.post("/v1/chat/completions", &req).await;
    // Publish a version whose adapter changes the model (B not zero).
    let cfg = AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        use_rslora: false,
        base_model_name_or_path: Some(BASE.into()),
    };
    let adapter = LoraAdapter::init(&env.model.config, cfg, 5).expect("adapter");
    for (name, var) in adapter.params() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).expect("noise"))
                .expect("set");
        }
    }
    let dir = env.root.join("loras/me/a/v1");
    adapter.save(&dir).expect("save");
    let mut next = lora("me/a", &format!("file://{}", dir.display()));
    next.initial_sha256 = "published".into();
    env.db
        .store
        .reinit_lora(&next, 0, &json!({"test": true}))
        .await
        .expect("new version");
    let (_, after) = env.post("/v1/chat/completions", &req).await;
    let lp = |v: &Value| v["choices"][0]["logprobs"]["content"][0]["logprob"].clone();
    assert_ne!(
        lp(&before),
        lp(&after),
        "the new adapter answers: {before} / {after}"
    );
}

#[tokio::test]
async fn completions_score_models_and_errors() {
    let env = start().await;
    let (status, c) = env
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["completion_tokens"], 5);
    assert_eq!(c["choices"][0]["finish_reason"], "length");

    let messages = json!([{"role": "user", "content": "Q"}]);
    let (status, s) = env
        .post(
            "/v1/score",
            &json!({"model": "me/a", "messages": messages, "completion": "ok"}),
        )
        .await;
    assert_eq!(status, 200, "{s}");
    let n = s["completion_tokens"].as_u64().expect("n") as usize;
    assert_eq!(s["logprobs"].as_array().map(Vec::len), Some(n));
    assert!(n >= 2, "the completion and the end of turn");

    let models: Value = env
        .http
        .get(format!("{}/v1/models", env.api))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    // Adapters under the names CLaaS's vLLM shows (and its clients send), ids beside them.
    assert_eq!(ids, [BASE, "me-a"]);
    assert_eq!(models["data"][1]["lora_id"], "me/a");

    let (status, e) = env.post("/v1/chat/completions", &chat("nobody", "x")).await;
    assert_eq!(status, 404, "{e}");
    let mut bad = chat(BASE, "x");
    bad["temperature"] = json!(9);
    let (status, e) = env.post("/v1/chat/completions", &bad).await;
    assert_eq!(status, 422, "{e}");
    let mut bad = chat(BASE, "x");
    bad["logprobs"] = json!(true);
    bad["top_logprobs"] = json!(50);
    let (status, _) = env.post("/v1/chat/completions", &bad).await;
    assert_eq!(status, 422);
    // A prompt past the engine's context is refused before it takes the one turn.
    let long = "x".repeat(9_000);
    let (status, e) = env.post("/v1/chat/completions", &chat(BASE, &long)).await;
    assert_eq!(status, 422, "{e}");
    assert!(e.to_string().contains("context of 8192 tokens"), "{e}");
    let scored = json!({"model": "me/a", "messages": messages, "completion": long});
    let (status, e) = env.post("/v1/score", &scored).await;
    assert_eq!(status, 422, "{e}");
}

/// Chat keeps answering while the same process trains on the same weights, and never mixes
/// versions: every answer is version 0's until the publish, then version 1's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_while_a_job_trains_in_the_same_process_sees_one_version_or_the_next() {
    use claas_worker::{Worker, WorkerOptions};

    let root = tempdir("embedded-train");
    let dir = root.join("model");
    let db = TestDb::sqlite().await;
    let exec = tiny_executor(BASE, &dir, root.join("loras"), 23).await;
    let (model, tok) = exec.inference_parts();
    let engine = Engine::new(model.expect("resident"), tok, BASE.into(), db.store.clone());
    let opts = ApiOptions {
        default_base_model: BASE.into(),
        allowed_init_base_models: vec![BASE.into()],
        ..common::options(&root)
    };
    let state = AppState::new(db.store.clone(), opts).with_engine(Some(Arc::new(engine)));
    let api = common::serve(state).await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::new("w", vec![BASE.into()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });
    let http = reqwest::Client::new();
    let (status, _) = (
        http.post(format!("{api}/v1/lora/init"))
            .json(&json!({"lora_id": "me/a", "lora_r": 8, "lora_alpha": 16}))
            .send()
            .await
            .expect("init")
            .status(),
        (),
    );
    assert!(status.is_success());
    let mut ask = chat("me/a", "Explain recursion");
    ask["return_token_ids"] = json!(true);
    ask["max_tokens"] = json!(24);
    let answer = |http: reqwest::Client, api: String, ask: Value| async move {
        let r = http
            .post(format!("{api}/v1/chat/completions"))
            .json(&ask)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.expect("json")
    };
    let v0 = answer(http.clone(), api.clone(), ask.clone()).await;
    let text = v0["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    let r = http
        .post(format!("{api}/v1/feedback"))
        .json(
            &json!({"requests": [{"lora_id": "me/a", "prompt": "Explain recursion",
            "response": text, "feedback": "too long", "training": {"learning_rate": 0.05}}]}),
        )
        .send()
        .await
        .expect("feedback");
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.expect("json");
    let job_id = uuid::Uuid::parse_str(job["job_id"].as_str().expect("id")).expect("uuid");

    let mut seen: Vec<Value> = vec![v0["choices"][0]["token_ids"].clone()];
    let mut answers = 0;
    loop {
        let a = answer(http.clone(), api.clone(), ask.clone()).await;
        answers += 1;
        let ids = a["choices"][0]["token_ids"].clone();
        if seen.last() != Some(&ids) {
            seen.push(ids);
        }
        let j = db.store.get_job(job_id).await.expect("get").expect("job");
        if j.status.is_terminal() {
            assert_eq!(
                j.status,
                claas_core::types::JobStatus::Succeeded,
                "{:?}",
                j.error
            );
            break;
        }
    }
    // One more after the publish is certainly version 1's.
    let v1 = answer(http.clone(), api.clone(), ask.clone()).await;
    if seen.last() != Some(&v1["choices"][0]["token_ids"]) {
        seen.push(v1["choices"][0]["token_ids"].clone());
    }
    assert!(
        seen.len() <= 2,
        "answers went v0 → v1 only ({answers} while training): {seen:?}"
    );
    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
}
