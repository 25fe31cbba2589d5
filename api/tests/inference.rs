//! The inference proxy against the fake vLLM: what the client sees, what the completion
//! cache keeps, and feedback resolved from it — on a real socket, as clients call it.

mod common;
mod proxy;

use std::sync::atomic::Ordering;
use std::time::Duration;

use claas_api::upstream::{Backends, Upstream};
use claas_api::AppState;
use claas_core::testing::{TestDb, TEST_BASE_MODEL};
use claas_core::types::{WorkerInfo, WorkerState};
use claas_fake_vllm::{decode, encode, logprob, FakeVllm, Options, IM_END};
use serde_json::{json, Value};

use proxy::{chat, feedback, make_lora, options, start};

/// The ids and log-probs the fake sampled for `model` answering `user`.
fn expected_rollout(fake: &FakeVllm, model: &str, user: &str, think: bool) -> (Vec<u32>, Vec<f32>) {
    let mut text = fake.reply_for(model, user);
    if think {
        text = format!("<think>\nThe user wants a reply.\n</think>\n\n{text}");
    }
    let mut ids = encode(&text);
    ids.push(IM_END);
    let lps = ids
        .iter()
        .enumerate()
        .map(|(k, id)| logprob(model, *id, k) as f32)
        .collect();
    (ids, lps)
}

#[tokio::test]
async fn chat_shows_the_answer_without_thinking_and_feedback_trains_on_the_sampled_tokens() {
    let env = start().await;
    env.fake.knobs().think.store(true, Ordering::SeqCst);
    let (status, answer) = env
        .post("/v1/chat/completions", &chat(None, "Say hi"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let visible = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert_eq!(visible, format!("[{TEST_BASE_MODEL}] You said: Say hi"));
    // The client asked for neither log-probs nor token ids, so it gets neither.
    assert_eq!(answer["choices"][0]["logprobs"], Value::Null);
    assert_eq!(answer["choices"][0]["token_ids"], Value::Null);
    assert_eq!(answer["prompt_token_ids"], Value::Null);
    // vLLM was asked for both.
    let sent = env.fake.last_request().expect("request");
    assert_eq!(sent["logprobs"], true);
    assert_eq!(sent["return_token_ids"], true);

    // Feedback names the answer by its visible text, however the client reflowed it.
    let reflowed = visible.replace(' ', "\n  ");
    let (status, body) = env.post("/v1/feedback", &feedback("me/a", &reflowed)).await;
    assert_eq!(status, 202, "{body}");
    let payload = env
        .job_payload(body["job_id"].as_str().expect("job_id"))
        .await;
    let sample = &payload["samples"][0];
    let (ids, lps) = expected_rollout(&env.fake, TEST_BASE_MODEL, "Say hi", true);
    assert_eq!(sample["rollout"]["response_token_ids"], json!(ids));
    assert_eq!(sample["rollout"]["response_logprobs"], json!(lps));
    assert_eq!(
        sample["rollout"]["prompt_token_ids"],
        json!(encode("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"))
    );
    assert_eq!(sample["rollout"]["system_prompt"], "You are terse.");
    // The trainer sees the answer as generated, thinking included.
    assert!(sample["response"]
        .as_str()
        .is_some_and(|r| r.starts_with("<think>")));
}

#[tokio::test]
async fn a_streamed_answer_is_relayed_without_thinking_and_cached_like_a_whole_one() {
    let env = start().await;
    env.fake.knobs().think.store(true, Ordering::SeqCst);
    let mut req = chat(Some(TEST_BASE_MODEL), "Stream it");
    req["stream"] = json!(true);
    req["logprobs"] = json!(true);
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.api))
        .json(&req)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let text = resp.text().await.expect("events");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let mut shown = String::new();
    let mut logprob_entries = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk is JSON");
        assert!(
            v.get("prompt_token_ids").is_none(),
            "ids were not asked for"
        );
        shown.push_str(
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
        logprob_entries += v["choices"][0]["logprobs"]["content"]
            .as_array()
            .map_or(0, Vec::len);
    }
    assert_eq!(shown, format!("[{TEST_BASE_MODEL}] You said: Stream it"));
    let (ids, lps) = expected_rollout(&env.fake, TEST_BASE_MODEL, "Stream it", true);
    assert_eq!(logprob_entries, ids.len(), "the client asked for log-probs");

    let (status, body) = env.post("/v1/feedback", &feedback("me/a", &shown)).await;
    assert_eq!(status, 202, "{body}");
    let payload = env
        .job_payload(body["job_id"].as_str().expect("job_id"))
        .await;
    assert_eq!(
        payload["samples"][0]["rollout"]["response_token_ids"],
        json!(ids)
    );
    assert_eq!(
        payload["samples"][0]["rollout"]["response_logprobs"],
        json!(lps)
    );
}

#[tokio::test]
async fn the_same_text_from_two_adapters_is_cached_apart_and_feedback_finds_its_own() {
    let env = start().await;
    env.fake.set_reply(Some("Same words."));
    for lora in ["u/one", "u/two"] {
        make_lora(&env, lora, 8).await;
    }
    for lora in ["u/one", "u/two"] {
        let (status, a) = env
            .post("/v1/chat/completions", &chat(Some(lora), "hi"))
            .await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["choices"][0]["message"]["content"], "Same words.");
    }
    for lora in ["u/one", "u/two"] {
        let (status, body) = env
            .post("/v1/feedback", &feedback(lora, "Same words."))
            .await;
        assert_eq!(status, 202, "{body}");
        let payload = env
            .job_payload(body["job_id"].as_str().expect("job_id"))
            .await;
        let (_, lps) = expected_rollout(&env.fake, lora, "hi", false);
        assert_eq!(
            payload["samples"][0]["rollout"]["response_logprobs"],
            json!(lps),
            "{lora} trains on its own answer's log-probs"
        );
    }
    // An answer the base model gave is found for any LoRA on that base.
    env.fake.set_reply(Some("From the base."));
    let (status, _) = env.post("/v1/chat/completions", &chat(None, "hi")).await;
    assert_eq!(status, 200);
    let (status, body) = env
        .post("/v1/feedback", &feedback("u/one", "From the base."))
        .await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn one_tenants_answers_can_neither_be_trained_on_nor_planted_by_another() {
    let env = start().await;
    for lora in ["alice/a", "bob/b"] {
        make_lora(&env, lora, 8).await;
    }
    let (_, alice) = common::create_key(&env.db, "alice", &["alice"], false).await;
    let (_, bob) = common::create_key(&env.db, "bob", &["bob"], false).await;
    let post = |key: String, path: &'static str, body: Value| {
        let (http, url) = (env.http.clone(), format!("{}{path}", env.api));
        async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("API answers");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // Bob's answer from the shared base model is not Alice's to train on.
    env.fake.set_reply(Some("Shared words."));
    let (status, _) = post(
        bob.clone(),
        "/v1/chat/completions",
        chat(None, "bob asks privately"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        alice.clone(),
        "/v1/feedback",
        feedback("alice/a", "Shared words."),
    )
    .await;
    assert_eq!(status, 404, "alice resolved bob's rollout: {body}");
    // Alice answering the same text afterwards does not replace what Bob's feedback trains on.
    let (status, _) = post(
        alice.clone(),
        "/v1/chat/completions",
        chat(None, "alice plants this"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        bob.clone(),
        "/v1/feedback",
        feedback("bob/b", "Shared words."),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let payload = env
        .job_payload(body["job_id"].as_str().expect("job_id"))
        .await;
    let ids: Vec<u32> =
        serde_json::from_value(payload["samples"][0]["rollout"]["prompt_token_ids"].clone())
            .expect("prompt ids");
    let prompt = decode(&ids);
    assert!(
        prompt.contains("bob asks privately"),
        "bob trains on his own prompt: {prompt}"
    );
    assert!(!prompt.contains("alice plants this"), "{prompt}");
}

#[tokio::test]
async fn feedback_on_an_unknown_or_unusable_answer_is_refused_with_the_reason() {
    let env = start().await;
    let (status, body) = env
        .post("/v1/feedback", &feedback("me/a", "never served"))
        .await;
    assert_eq!(status, 404);
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with("No cached completion for content_hash="),
        "{msg}"
    );

    // No system message: the teacher would score under another context (CLaaS: 422).
    let (status, a) = env
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "no system"}]}),
        )
        .await;
    assert_eq!(status, 200);
    let text = a["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    let (status, body) = env.post("/v1/feedback", &feedback("me/a", text)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("no system prompt")));
}

#[tokio::test]
async fn an_older_vllm_without_token_ids_is_retokenised_and_aligned() {
    let env = start().await;
    env.fake.knobs().no_token_ids.store(true, Ordering::SeqCst);
    let (status, a) = env.post("/v1/chat/completions", &chat(None, "old")).await;
    assert_eq!(status, 200, "{a}");
    let text = a["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    let (status, body) = env.post("/v1/feedback", &feedback("me/a", text)).await;
    assert_eq!(status, 202, "{body}");
    let payload = env
        .job_payload(body["job_id"].as_str().expect("job_id"))
        .await;
    let (ids, lps) = expected_rollout(&env.fake, TEST_BASE_MODEL, "old", false);
    assert_eq!(
        payload["samples"][0]["rollout"]["response_token_ids"],
        json!(ids)
    );
    assert_eq!(
        payload["samples"][0]["rollout"]["response_logprobs"],
        json!(lps)
    );
}

#[tokio::test]
async fn an_adapter_vllm_does_not_know_is_loaded_from_its_current_version_then_served() {
    let env = start().await;
    let dir = make_lora(&env, "u/fresh", 8).await;
    assert!(env.fake.loras().is_empty());
    let (status, a) = env
        .post("/v1/chat/completions", &chat(Some("u/fresh"), "hi"))
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["model"], "u/fresh");
    assert_eq!(
        env.fake.loras(),
        vec![("u/fresh".to_string(), dir.display().to_string())]
    );
    // A model nobody knows stays vLLM's 404.
    let (status, body) = env
        .post("/v1/chat/completions", &chat(Some("nobody"), "hi"))
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("does not exist")));
}

#[tokio::test]
async fn upstream_failures_and_bad_requests_get_clear_errors() {
    let env = start().await;
    let (status, body) = env
        .post("/v1/chat/completions", &json!({"messages": []}))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = env.post("/v1/chat/completions", &json!([1, 2])).await;
    assert_eq!(status, 422);
    env.fake
        .knobs()
        .drop_connection
        .store(true, Ordering::SeqCst);
    let (status, body) = env.post("/v1/chat/completions", &chat(None, "x")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unreachable");

    // No inference server configured: 503 that says how to configure one.
    let db = TestDb::sqlite().await;
    let url = common::serve(AppState::new(db.store.clone(), options(&env.dir))).await;
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat(None, "x"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("VLLM_BASE_URL")));
}

#[tokio::test]
async fn models_completions_and_score_are_proxied() {
    let env = start().await;
    let r: Value = env
        .http
        .get(format!("{}/v1/models", env.api))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(r["data"][0]["id"], TEST_BASE_MODEL);
    let h: Value = env
        .http
        .get(format!("{}/v1/health", env.api))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["cache"]["up"], true);
    assert_eq!(h["vllm"][0]["up"], true);

    let (status, c) = env
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["finish_reason"], "length");

    let messages = json!([{"role": "user", "content": "Q"}]);
    let (status, s) = env
        .post(
            "/v1/score",
            &json!({"model": TEST_BASE_MODEL, "messages": messages, "completion": "ok"}),
        )
        .await;
    assert_eq!(status, 200, "{s}");
    // The completion's tokens in the template: "o", "k", <|im_end|>, "\n".
    let prompt_len = encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n").len();
    let full = encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n");
    assert_eq!(s["prompt_tokens"], prompt_len);
    assert_eq!(s["completion_tokens"], full.len() - prompt_len);
    assert_eq!(s["tokens"], json!(["o", "k", "<|im_end|>", "\n"]));
    let expected: Vec<f64> = full[prompt_len..]
        .iter()
        .enumerate()
        .map(|(k, id)| logprob(TEST_BASE_MODEL, *id, prompt_len + k))
        .collect();
    assert_eq!(s["logprobs"], json!(expected));
    let (status, _) = env
        .post(
            "/v1/score",
            &json!({"model": TEST_BASE_MODEL, "messages": messages}),
        )
        .await;
    assert_eq!(status, 422, "completion is required");
}

/// The python `openai` client, unchanged, against the proxy (needs `CLAAS_TEST_PYTHON`:
/// a python with `openai` installed; `make test` provides one).
#[tokio::test]
async fn the_python_openai_client_works_against_the_proxy() {
    let Ok(python) = std::env::var("CLAAS_TEST_PYTHON") else {
        eprintln!("skipped: CLAAS_TEST_PYTHON is not set (make test sets it)");
        return;
    };
    let env = start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/openai_client_check.py"
    );
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("{}/v1", env.api))
        .arg(TEST_BASE_MODEL)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "openai client check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply = format!("[{TEST_BASE_MODEL}] You said: Say hi");
    assert!(stdout.contains(&format!("chat: {reply}")), "{stdout}");
    assert!(stdout.contains(&format!("stream: {reply}")), "{stdout}");
    // Feedback on what the python client was shown resolves from the cache.
    let (status, body) = env.post("/v1/feedback", &feedback("me/a", &reply)).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn when_every_node_is_asleep_chat_waits_then_gets_503_with_retry_after() {
    let fake = FakeVllm::start(Options {
        served_model_name: TEST_BASE_MODEL.into(),
        ..Options::default()
    })
    .await;
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("asleep");
    db.store
        .register_worker(&WorkerInfo {
            id: "node".into(),
            hostname: "node".into(),
            gpu: None,
            // As the worker has it; the API's list may differ by a trailing slash.
            vllm_url: Some(format!("{}/", fake.url)),
            base_models: vec![TEST_BASE_MODEL.into()],
            version: "test".into(),
        })
        .await
        .expect("register");
    db.store
        .worker_heartbeat("node", WorkerState::Sleeping, None)
        .await
        .expect("state");
    let backends = Backends::new(
        vec![Upstream::new(&fake.url, None, Duration::from_secs(5))],
        Duration::from_millis(300),
    );
    let state = AppState::new(db.store.clone(), options(&dir)).with_backends(Some(backends));
    let api = common::serve(state).await;
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{api}/v1/chat/completions"))
        .json(&chat(None, "anyone?"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited first"
    );
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5")
    );
    assert_eq!(
        fake.generations(),
        0,
        "nothing was sent to the sleeping vLLM"
    );

    // The node wakes up while a request waits: it is answered.
    let waiting = tokio::spawn({
        let (http, api) = (http.clone(), api.clone());
        async move {
            http.post(format!("{api}/v1/chat/completions"))
                .json(&chat(None, "now?"))
                .send()
                .await
                .expect("answer")
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.store
        .worker_heartbeat("node", WorkerState::Idle, None)
        .await
        .expect("state");
    assert_eq!(waiting.await.expect("join"), 200);
}
