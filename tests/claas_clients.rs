//! CLaaS's own clients, call for call, against `claas dev`: the eval harness
//! (`claas/eval/runner.py` and its metrics: init, score with `messages` + `completion`, chat
//! through the proxy, feedback with no `Prefer` header) and the OpenClaw plugin
//! (`plugins/claas-feedback`: chat as `openclaw-assistant-latest`, feedback naming
//! `openclaw/assistant-latest`). Each reads every field that client reads.

mod common;

use common::start_dev;
use serde_json::{json, Value};

/// CLaaS's vLLM adapter name for a LoRA id:
/// `re.sub(r"[^a-zA-Z0-9._-]+", "-", lora_id.strip("/")).strip("-") or "lora"`.
fn vllm_name(lora_id: &str) -> String {
    let mut out = String::new();
    let mut in_run = false;
    for c in lora_id.trim_matches('/').chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('-');
            in_run = true;
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "lora".into()
    } else {
        out
    }
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    // As the clients send it: JSON, no Prefer header.
    let r = http.post(url).json(&body).send().await.expect("answer");
    let status = r.status().as_u16();
    (status, r.json::<Value>().await.expect("json body"))
}

fn number(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claas_eval_harness_and_openclaw_plugin_run_unchanged() {
    let (_dev, base, _) = start_dev("claas-clients").await;
    let http = reqwest::Client::new();

    // --- The eval harness (mode=local, no openclaw_url). ---
    let (status, init) = post(
        &http,
        format!("{base}/v1/lora/init"),
        json!({"lora_id": "eval/no_emoji", "base_model": "tiny"}),
    )
    .await;
    assert!((200..300).contains(&status), "{init}");
    let actual = init["lora_id"].as_str().expect("lora_id").to_owned();
    let model = vllm_name(&actual);
    assert_eq!(model, "eval-no_emoji");
    let system = json!({"role": "system", "content": "You are a helpful assistant."});
    let user = json!({"role": "user", "content": "Tell me a joke"});
    // LogprobMetric: two scores per pair.
    for completion in ["Why did the chicken cross the road?", "😀 chicken 😀"] {
        let (status, score) = post(
            &http,
            format!("{base}/v1/score"),
            json!({"model": model, "messages": [system, user], "completion": completion}),
        )
        .await;
        assert_eq!(status, 200, "{score}");
        number(&score["logprob_sum"], "logprob_sum");
    }
    // _generate_response through the proxy.
    let (status, chat) = post(
        &http,
        format!("{base}/v1/chat/completions"),
        json!({"model": model, "messages": [system, user], "temperature": 0, "max_tokens": 12}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let content = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    // _submit_feedback: FeedbackBatchRequest.model_dump(), no Prefer header.
    let (status, fb) = post(
        &http,
        format!("{base}/v1/feedback"),
        json!({"requests": [{"lora_id": actual, "prompt": "Tell me a joke",
            "response": content, "feedback": "No emoji please",
            "training": {"learning_rate": 3e-5, "alpha": 0.5, "is_clip": 5.0,
                "max_grad_norm": 1.0, "kl_reg_weight": 0.0, "teacher_top_k": 100}}],
            "orchestration": {"sleep_before": false, "wake_after": false,
                "wake_on_failure": true, "sleep_level": 1}}),
    )
    .await;
    assert_eq!(status, 200, "the harness reads a finished step: {fb}");
    let meta = &fb["distill_result"]["metadata"];
    for key in ["distill_loss", "kl_reg", "mean_is_ratio", "clip_fraction"] {
        number(&meta[key], key);
    }

    // --- The OpenClaw plugin: its init step created openclaw/assistant (-latest alias). ---
    let (status, init) = post(
        &http,
        format!("{base}/v1/lora/init"),
        json!({"lora_id": "openclaw/assistant"}),
    )
    .await;
    assert!((200..300).contains(&status), "{init}");
    let (status, chat) = post(
        &http,
        format!("{base}/v1/chat/completions"),
        // OpenClaw sends its agent's system prompt with every turn (CLaaS, like claas-rs,
        // refuses feedback on an answer cached without one).
        json!({"model": "openclaw-assistant-latest", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "system", "content": "You are OpenClaw, a personal assistant."},
                         {"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let content = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    let (status, fb) = post(
        &http,
        format!("{base}/v1/feedback"),
        json!({"requests": [{"lora_id": "openclaw/assistant-latest", "prompt": "hello",
            "response": content, "feedback": "be warmer", "training": {}}],
            "orchestration": {"sleep_before": true, "wake_after": true,
                "wake_on_failure": true, "sleep_level": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{fb}");
    // FeedbackResult, every field the plugin reads.
    assert_eq!(fb["status"], "ok");
    assert!(
        fb["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{fb}"
    );
    assert_eq!(fb["lora_id"], "openclaw/assistant");
    assert_eq!(fb["batch_size"], 1);
    for key in ["total", "distill", "sleep", "wake"] {
        number(&fb["timing_ms"][key], key);
    }
    let meta = &fb["distill_result"]["metadata"];
    for key in [
        "total_loss",
        "distill_loss",
        "tokens_processed",
        "grad_norm",
        "batch_size",
    ] {
        number(&meta[key], key);
    }
}
