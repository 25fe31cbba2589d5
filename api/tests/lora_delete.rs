//! Deleting a LoRA the proxy serves: its jobs are cancelled (a running one is waited for),
//! vLLM unloads it, its files go and its id is free again.

mod common;
mod proxy;

use std::time::Duration;

use claas_core::queue::ClaimRequest;
use claas_core::testing::TEST_BASE_MODEL;
use serde_json::{json, Value};

use proxy::{chat, feedback, make_lora, start};

#[tokio::test]
async fn delete_cancels_the_loras_jobs_unloads_it_removes_its_files_and_frees_the_id() {
    let env = start().await;
    let dir = make_lora(&env, "u/gone", 8).await;
    // vLLM serves it (loaded on first use), and it has queued feedback.
    let (status, _) = env
        .post("/v1/chat/completions", &chat(Some("u/gone"), "hi"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(env.fake.loras().len(), 1);
    let text = "[u/gone] You said: hi";
    let (status, queued) = env.post("/v1/feedback", &feedback("u/gone", text)).await;
    assert_eq!(status, 202, "{queued}");

    let del = |id: &str| {
        let http = env.http.clone();
        let url = format!("{}/v1/lora?lora_id={id}", env.api);
        async move {
            let r = http.delete(url).send().await.expect("delete");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        }
    };
    let (status, body) = del("u/gone").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(body["cancelled_jobs"], 1);
    let job_id = uuid::Uuid::parse_str(queued["job_id"].as_str().expect("id")).expect("uuid");
    let job = env
        .db
        .store
        .get_job(job_id)
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(job.status, claas_core::types::JobStatus::Cancelled);
    assert!(env.fake.loras().is_empty(), "unloaded from vLLM");
    assert!(!dir.exists(), "its files are gone");
    // Feedback for it is refused; a second delete finds nothing.
    let (status, _) = env.post("/v1/feedback", &feedback("u/gone", text)).await;
    assert_eq!(status, 404);
    let (status, body) = del("u/gone").await;
    assert_eq!((status, body["deleted"].clone()), (200, json!(false)));
    let (status, _) = del("..%2Fetc").await;
    assert_eq!(status, 400);
    // The id starts afresh.
    make_lora(&env, "u/gone", 16).await;
    let lora = env
        .db
        .store
        .get_lora("u/gone")
        .await
        .expect("get")
        .expect("new");
    assert_eq!((lora.rank, lora.current_version), (16, 0));
}

#[tokio::test]
async fn delete_waits_for_the_running_job_to_stop() {
    let env = start().await;
    make_lora(&env, "u/busy", 8).await;
    let text = "[u/busy] You said: hi";
    let (status, _) = env
        .post("/v1/chat/completions", &chat(Some("u/busy"), "hi"))
        .await;
    assert_eq!(status, 200);
    let (status, queued) = env.post("/v1/feedback", &feedback("u/busy", text)).await;
    assert_eq!(status, 202, "{queued}");
    // A worker has it.
    let claimed = env
        .db
        .store
        .claim(&ClaimRequest {
            worker_id: "w".into(),
            base_models: vec![TEST_BASE_MODEL.into()],
            lease: Duration::from_secs(60),
            max_batch_samples: 1,
        })
        .await
        .expect("claim")
        .expect("job");
    let url = format!("{}/v1/lora?lora_id=u/busy", env.api);
    let pending = tokio::spawn(env.http.delete(url).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "the delete waits while the job runs"
    );
    let job = env
        .db
        .store
        .get_job(claimed.job.id)
        .await
        .expect("get")
        .expect("job");
    assert!(job.cancel_requested, "the running job was asked to stop");
    // The worker sees the request at its next phase boundary and stops.
    assert!(env
        .db
        .store
        .finish_cancelled(&claimed.lease(), "cancelled by request")
        .await
        .expect("stop"));
    let r = pending.await.expect("join").expect("answer");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["status"], "deleted");
}
