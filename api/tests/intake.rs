//! Intake refuses what the trainer would (both stores): a sample with no prompt ids, one
//! over the trainer's maximum length, or token ids outside the base model's vocabulary is a
//! 422 naming it, and nothing is enqueued.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use claas_api::{router, AppState};
use claas_core::testing::{lora, TestDb};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

claas_core::both_stores!(a_sample_the_trainer_would_refuse_is_a_422_naming_it,);

fn inline(lora_id: &str, prompt_ids: Value, response_ids: Value) -> Value {
    let n = response_ids.as_array().map_or(0, Vec::len);
    json!({"requests": [
        {"lora_id": lora_id, "prompt": "p", "response": "r", "feedback": "fine"},
        {"lora_id": lora_id, "prompt": "p", "response": "r", "feedback": "shorter",
         "prompt_token_ids": prompt_ids, "response_token_ids": response_ids,
         "response_logprobs": vec![-0.5; n], "system_prompt": "s"}]})
}

async fn post(app: &claas_api::App, body: &Value) -> (StatusCode, String) {
    let req = Request::post("/v1/feedback")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("answer");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (
        status,
        v["error"]["message"].as_str().unwrap_or("").to_owned(),
    )
}

async fn a_sample_the_trainer_would_refuse_is_a_422_naming_it(db: &TestDb) {
    let dir = claas_testutil::tempdir("intake");
    // A base checkpoint on this machine with a 1,000-token vocabulary.
    let base = dir.join("base");
    std::fs::create_dir_all(&base).expect("dir");
    std::fs::write(
        base.join("config.json"),
        json!({"vocab_size": 1000}).to_string(),
    )
    .expect("config");
    let mut l = lora("a");
    l.base_model = base.display().to_string();
    db.store.create_lora(&l).await.expect("lora");
    let app = router(
        AppState::new(db.store.clone(), common::options(&dir))
            .with_max_seq_len(8)
            .with_base_models(Some(std::sync::Arc::new(Vocabulary(base.clone())))),
    );
    // The first item is inline too (so no cache lookup): give it a valid rollout.
    let with_first = |mut body: Value| {
        body["requests"][0] = body["requests"][1].clone();
        body["requests"][0]["prompt_token_ids"] = json!([1, 2]);
        body["requests"][0]["response_token_ids"] = json!([3]);
        body["requests"][0]["response_logprobs"] = json!([-0.1]);
        body
    };
    let cases = [
        (
            inline("a", json!([]), json!([5])),
            "requests[1]: the prompt has no token ids",
        ),
        (
            inline("a", json!([4000000000u64]), json!([5])),
            "requests[1]: token id 4000000000 is outside",
        ),
        (
            inline("a", json!([1, 2]), json!([999, 1000])),
            "token id 1000 is outside the base model's vocabulary (size 1000)",
        ),
        (
            inline("a", json!([1, 2, 3, 4, 5]), json!([6, 7, 8, 9])),
            "requests[1]: prompt + response are 9 tokens",
        ),
    ];
    for (body, want) in cases {
        let (status, message) = post(&app, &with_first(body)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{want}: {message}"
        );
        assert!(message.contains(want), "{want:?} not in {message:?}");
    }
    let counts = db.store.status_counts().await.expect("counts");
    assert_eq!(
        counts.iter().map(|c| c.1).sum::<i64>(),
        0,
        "nothing was enqueued"
    );
    let (status, message) = post(&app, &with_first(inline("a", json!([1, 2]), json!([999])))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{message}");
}

#[tokio::test]
async fn unknown_training_fields_are_ignored_as_claas_does() {
    let dir = claas_testutil::tempdir("intake");
    let db = TestDb::sqlite().await;
    db.store.create_lora(&lora("a")).await.expect("lora");
    let app = router(AppState::new(db.store.clone(), common::options(&dir)));
    let mut body = inline("a", json!([1, 2]), json!([3]));
    body["requests"] = json!([body["requests"][1].clone()]);
    body["requests"][0]["training"] = json!({"learning_rate": 1e-5, "a_future_knob": 3});
    let (status, message) = post(&app, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{message}");
    let claimed = common::claim_one(&db.store, claas_core::testing::TEST_BASE_MODEL).await;
    assert_eq!(
        claimed.payload.training.learning_rate, 1e-5,
        "the known field is kept"
    );
    // A known field out of range is still refused.
    body["requests"][0]["training"] = json!({"alpha": 7, "a_future_knob": 3});
    let (status, _) = post(&app, &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    db.cleanup().await;
}

/// Base models as the API sees them through its seam: the checkpoint at one directory has
/// the vocabulary its `config.json` names (claas-engine's `TrainerModels` reads it the same
/// way; `engine/tests` checks that one).
struct Vocabulary(std::path::PathBuf);

impl claas_api::in_process::BaseModels for Vocabulary {
    fn vocab_size(&self, base_model: &str) -> Option<u64> {
        if std::path::Path::new(base_model) != self.0 {
            return None;
        }
        let text = std::fs::read_to_string(self.0.join("config.json")).ok()?;
        serde_json::from_str::<Value>(&text).ok()?["vocab_size"].as_u64()
    }

    fn write_initial_adapter(
        &self,
        _dir: &std::path::Path,
        _lora: &claas_core::types::NewLora,
    ) -> Result<Option<String>, String> {
        Ok(None)
    }
}
