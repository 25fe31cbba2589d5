//! The newcomer's loop on the embedded default, through the real `claas dev` binary: no
//! Postgres, no vLLM, no GPU. Chat, give feedback on the answer, chat again: the adapter
//! changed and answers differently.

mod common;

use std::time::Duration;

use common::start_dev;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_feedback_chat_on_claas_dev() {
    let (_dev, base, dir) = start_dev("dev").await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value, wait: bool| {
        let mut r = http.post(format!("{base}{path}")).json(&body);
        if wait {
            r = r.header("Prefer", "wait=60");
        }
        async move {
            let r = r.send().await.expect("answer");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    let (status, body) = post("/v1/lora/init", json!({"lora_id": "me/assistant"}), false).await;
    assert!(status == 200 || status == 201, "{body}");

    let ask = json!({"model": "me/assistant", "temperature": 0, "max_tokens": 16,
        "logprobs": true,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Explain recursion"}]});
    let (status, first) = post("/v1/chat/completions", ask.clone(), false).await;
    assert_eq!(status, 200, "{first}");
    let text = first["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();

    let (status, body) = post(
        "/v1/feedback",
        json!({"requests": [{"lora_id": "me/assistant", "prompt": "Explain recursion",
            "response": text, "feedback": "too long",
            "training": {"learning_rate": 0.01}}]}),
        true,
    )
    .await;
    assert_eq!(status, 200, "the step ran: {body}");
    // The step's record, as CLaaS writes it, under the data directory.
    let log = body["feedback_log_path"]
        .as_str()
        .expect("feedback_log_path");
    assert!(
        std::path::Path::new(log).starts_with(dir.join("feedback")),
        "{log}"
    );
    let record: Value =
        serde_json::from_slice(&std::fs::read(log).expect("the record exists")).expect("json");
    assert_eq!(record["status"], "ok", "{record}");
    let scored = &record["distill_result"]["metadata"]["teacher_scored_texts"][0];
    assert!(
        scored.as_str().is_some_and(|t| t.contains("too long")),
        "the teacher's prompt carries the feedback: {scored}"
    );
    let versions: Value = http
        .get(format!("{base}/v1/lora/me/assistant/versions"))
        .send()
        .await
        .expect("versions")
        .json()
        .await
        .expect("json");
    assert_eq!(versions["current_version"], 1, "{versions}");

    let (status, second) = post("/v1/chat/completions", ask, false).await;
    assert_eq!(status, 200, "{second}");
    let lps = |v: &Value| -> Vec<f64> {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["logprob"].as_f64()).collect())
            .unwrap_or_default()
    };
    assert_ne!(
        lps(&first),
        lps(&second),
        "version 1 answers, not version 0"
    );
}

/// `CLAAS_BASE_MODEL_ID` names a Hub model that is not on this machine: the first `claas dev`
/// downloads it into the Hugging Face cache (from `HF_ENDPOINT`, here the fake Hub) and
/// answers from it; the second start finds it there and asks the Hub nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claas_dev_downloads_a_hub_model_once() {
    let dir = claas_testutil::tempdir("hub-e2e");
    claas_worker::testing::tiny_checkpoint(&dir.join("served"), 5).await;
    let hub =
        claas_fake_vllm::hub::FakeHub::start("tiny-org/tiny-qwen3", dir.join("served"), None).await;
    let data = dir.join("data").display().to_string();
    let cache = dir.join("hf-cache").display().to_string();
    let start = |port: &str| {
        common::spawn(
            "dev-hub",
            &["dev"],
            &common::env(&[
                ("CLAAS_API_PORT", port),
                ("CLAAS_DATA_DIR", &data),
                ("DATABASE_URL", &format!("sqlite://{data}/claas.db")),
                ("CLAAS_WORKER_EXECUTOR", "candle"),
                ("CLAAS_BASE_MODEL_ID", "tiny-org/tiny-qwen3"),
                ("HF_ENDPOINT", &hub.url),
                ("HF_HUB_CACHE", &cache),
            ]),
        )
    };
    let http = reqwest::Client::new();
    let ask = json!({"model": "tiny-org/tiny-qwen3", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]});
    let mut asked = 0;
    for round in 0..2 {
        let port = common::free_port().to_string();
        let mut dev = start(&port);
        let base = format!("http://127.0.0.1:{port}");
        common::wait_http(&base).await;
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&ask)
            .send()
            .await
            .expect("chat");
        assert_eq!(r.status(), 200, "round {round}: {}", dev.log_text());
        if round == 0 {
            asked = hub.requests();
            assert!(asked > 0, "the first start downloads: {}", dev.log_text());
            assert!(dev.log_text().contains("base model downloaded"));
        } else {
            assert_eq!(
                hub.requests(),
                asked,
                "the second start asks the Hub nothing"
            );
        }
        dev.signal("TERM");
        dev.wait_exit(Duration::from_secs(20));
    }
}
