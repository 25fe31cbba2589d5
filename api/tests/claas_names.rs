//! CLaaS clients name a LoRA by its vLLM adapter name (`eval/no_emoji` → `eval-no_emoji`),
//! with or without `-latest`, everywhere they name one: score, chat, feedback, versions.
//! Against the fake vLLM, on a real socket, as CLaaS's eval harness and OpenClaw plugin call.

mod common;

use std::time::Duration;

use claas_api::upstream::Upstream;
use claas_api::AppState;
use claas_core::testing::{TestDb, TEST_BASE_MODEL};
use claas_fake_vllm::{FakeVllm, Options};
use serde_json::{json, Value};

async fn send(
    http: &reqwest::Client,
    url: String,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = match body {
        Some(b) => http.post(url).json(&b),
        None => http.get(url),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("API answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn claas_clients_reach_loras_by_their_vllm_adapter_names() {
    let fake = FakeVllm::start(Options {
        served_model_name: TEST_BASE_MODEL.into(),
        ..Options::default()
    })
    .await;
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("names");
    common::local_lora(&db.store, &dir, "eval/no_emoji", 8).await;
    common::local_lora(&db.store, &dir, "openclaw/assistant", 8).await;
    let state = AppState::new(db.store.clone(), common::options(&dir)).with_upstream(Some(
        Upstream::new(&fake.url, None, Duration::from_secs(30)),
    ));
    let api = common::serve(state).await;
    let http = reqwest::Client::new();
    let at = |path: &str| format!("{api}{path}");
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);

    // The eval harness's first metric: score under the adapter name.
    let score = json!({"model": "eval-no_emoji", "messages": messages, "completion": "Hello"});
    let (status, body) = send(&http, at("/v1/score"), None, Some(score)).await;
    assert_eq!(status, 200, "score by adapter name: {body}");
    // Chat, then feedback on that answer, both by adapter name: the job is the LoRA's.
    let chat = json!({"model": "eval-no_emoji", "messages": messages});
    let (status, answer) = send(&http, at("/v1/chat/completions"), None, Some(chat)).await;
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_owned();
    // vLLM itself knows the LoRA by its id: the proxy asks for `eval/no_emoji`, under the name
    // the API loaded it (and a worker's reload replaces it) by.
    let sent = fake.last_request().expect("vLLM was asked");
    assert_eq!(sent["model"], "eval/no_emoji", "{sent}");
    assert!(
        fake.loras().iter().any(|(name, _)| name == "eval/no_emoji"),
        "{:?}",
        fake.loras()
    );
    assert!(!fake.loras().iter().any(|(name, _)| name == "eval-no_emoji"));
    let feedback = json!({"requests": [{"lora_id": "eval-no_emoji", "prompt": "Hi",
        "response": text, "feedback": "no emoji"}]});
    let (status, job) = send(&http, at("/v1/feedback"), None, Some(feedback)).await;
    assert_eq!(status, 202, "{job}");
    let job_id = job["job_id"].as_str().expect("job id");
    let (_, job) = send(&http, at(&format!("/v1/jobs/{job_id}")), None, None).await;
    assert_eq!(job["lora_id"], "eval/no_emoji");
    let (status, versions) = send(&http, at("/v1/lora/eval-no_emoji/versions"), None, None).await;
    assert_eq!(status, 200, "{versions}");
    // OpenClaw's plugin: the adapter name with CLaaS's -latest alias.
    let chat = json!({"model": "openclaw-assistant-latest", "messages": messages});
    let (status, body) = send(&http, at("/v1/chat/completions"), None, Some(chat)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "openclaw/assistant", "{body}");

    // One name, one LoRA: a new id whose adapter name is taken is refused, naming the other.
    let (status, body) = send(
        &http,
        at("/v1/lora/init"),
        None,
        Some(json!({"lora_id": "eval-no_emoji"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "adapter_name_taken");
    assert!(body.to_string().contains("eval/no_emoji"), "{body}");

    // Tenancy holds through names: alice cannot reach eval/no_emoji as eval-no_emoji.
    let (_, alice) = common::create_key(&db, "alice", &["alice"], false).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let chat = json!({"model": "eval-no_emoji", "messages": messages});
    let (status, _) = send(&http, at("/v1/chat/completions"), Some(&alice), Some(chat)).await;
    assert_eq!(status, 403);
    let score = json!({"model": "eval-no_emoji", "messages": messages, "completion": "x"});
    let (status, _) = send(&http, at("/v1/score"), Some(&alice), Some(score)).await;
    assert_eq!(status, 403);
    let (status, _) = send(
        &http,
        at("/v1/lora/eval-no_emoji/versions"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(status, 403);
}
