//! Adapters in an S3-compatible store (moto's server, started here): the API and a worker
//! on different "nodes" (separate local caches) share versions only through the bucket.
//! Init publishes version 0, the worker trains from it and publishes version 1, the API
//! exports version 1 it never wrote, a delete removes the objects, and the id created again
//! never meets the deleted LoRA's files in any node's cache.

// The API's test helpers (options, a server on a real socket, a JSON client).
#[path = "../api/tests/common/mod.rs"]
mod common;

#[path = "common/trainer_models.rs"]
mod trainer_models;

use std::path::PathBuf;
use std::time::Duration;

use claas_api::AppState;
use claas_core::adapter_store::AdapterStore;
use claas_core::testing::{S3Server, TestDb};
use claas_testutil::tempdir;
use claas_trainer::template::{ChatTokenizer, Message};
use claas_worker::testing::{cpu_options, tiny_checkpoint};
use claas_worker::{CandleExecutor, CandleOptions, Worker, WorkerOptions};
use serde_json::{json, Value};

/// Each test starts its own S3 server and points the AWS environment at it: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where a cache under `cache` keeps the version `uri` names, in the bucket at `url`.
fn cached(cache: &std::path::Path, url: &str, uri: &Value) -> PathBuf {
    let key = uri.as_str().unwrap_or_default();
    cache.join(key.strip_prefix(&format!("{url}/")).unwrap_or(key))
}

async fn versions(http: &reqwest::Client, api: &str, lora_id: &str) -> Value {
    http.get(format!("{api}/v1/lora/{lora_id}/versions"))
        .send()
        .await
        .expect("versions")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_travel_through_the_bucket_between_api_and_worker() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(s3) = S3Server::start() else {
        eprintln!("skipped: CLAAS_TEST_PYTHON is not set (make test sets it)");
        return;
    };
    let url = format!("s3://{}/adapters", s3.bucket());
    let model_dir = tempdir("model");
    tiny_checkpoint(&model_dir, 9).await;
    let base = model_dir.display().to_string();
    let (api_cache, worker_cache) = (tempdir("api"), tempdir("worker"));
    let db = TestDb::sqlite().await;

    let worker_store = AdapterStore::s3(&url, &worker_cache).expect("store");
    let exec = CandleExecutor::new(CandleOptions {
        store: Some(worker_store.clone()),
        ..cpu_options(&base, &model_dir, &worker_cache)
    })
    .expect("executor");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            store: Some(worker_store),
            ..WorkerOptions::new("s3-worker", vec![base.clone()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });

    let options = claas_api::ApiOptions {
        default_base_model: base.clone(),
        allowed_init_base_models: vec![base.clone()],
        lora_root: api_cache.display().to_string(),
        feedback_default_wait_s: 60,
        feedback_max_wait_s: 60,
        ..common::options(&api_cache)
    };
    let state = trainer_models::with_trainer_models(AppState::new(db.store.clone(), options))
        .with_adapters(AdapterStore::s3(&url, &api_cache).expect("store"));
    let api = common::serve(state).await;
    let http = reqwest::Client::new();

    let (status, body) = common::post_json(
        &http,
        &format!("{api}/v1/lora/init"),
        &json!({"lora_id": "u/a", "lora_r": 4, "lora_alpha": 8}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first = versions(&http, &api, "u/a").await;
    let v0_uri = first["versions"][0]["storage_uri"].clone();
    assert!(
        v0_uri
            .as_str()
            .is_some_and(|u| u.starts_with(&format!("{url}/u/a/@v0-"))),
        "version 0 is in the bucket: {first}"
    );

    let tok = ChatTokenizer::from_dir(&model_dir).expect("tokenizer");
    let prompt = tok
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            true,
            &Default::default(),
        )
        .expect("render");
    let response = tok.encode("Hello there!").expect("ids");
    let feedback = json!({"requests": [{"lora_id": "u/a", "prompt": "Hi",
        "response": "Hello there!", "feedback": "shorter", "system_prompt": "Be brief.",
        "prompt_token_ids": tok.encode(&prompt).expect("ids"),
        "response_token_ids": response,
        "response_logprobs": vec![-1.0; response.len()]}]});
    let (status, body) = common::post_json(&http, &format!("{api}/v1/feedback"), &feedback).await;
    assert_eq!(
        status, 200,
        "the worker trained from the bucket's version 0: {body}"
    );
    assert!(
        cached(&worker_cache, &url, &v0_uri)
            .join("adapter_model.safetensors")
            .is_file(),
        "the worker read version 0 through its own cache"
    );
    let v1_uri = versions(&http, &api, "u/a").await["versions"][1]["storage_uri"].clone();

    // The API exports version 1, which only the worker wrote: through the bucket.
    let r = http
        .get(format!("{api}/v1/lora/export?lora_id=u/a&version=1"))
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200);
    let zip = r.bytes().await.expect("zip");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec())).expect("zip");
    assert!(archive.by_name("adapter_model.safetensors").is_ok());
    assert!(cached(&api_cache, &url, &v1_uri)
        .join("adapter_config.json")
        .is_file());

    // Delete removes the objects: a fresh cache finds nothing.
    let r = http
        .delete(format!("{api}/v1/lora?lora_id=u/a"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let fresh_cache = tempdir("fresh");
    let fresh = AdapterStore::s3(&url, &fresh_cache).expect("store");
    let dir = fresh
        .materialize(v1_uri.as_str().unwrap_or_default())
        .await
        .expect("materialize");
    assert!(
        !dir.join("adapter_config.json").exists(),
        "version 1 is gone from the bucket"
    );

    // Created again, at another rank: the worker, whose cache still holds the deleted
    // LoRA's files, trains the new one from its own version 0.
    let (status, body) = common::post_json(
        &http,
        &format!("{api}/v1/lora/init"),
        &json!({"lora_id": "u/a", "lora_r": 8, "lora_alpha": 16}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = common::post_json(&http, &format!("{api}/v1/feedback"), &feedback).await;
    assert_eq!(status, 200, "{body}");
    let again = versions(&http, &api, "u/a").await;
    assert_ne!(again["versions"][0]["storage_uri"], v0_uri, "{again}");
    let trained = cached(&worker_cache, &url, &again["versions"][1]["storage_uri"]);
    let config: Value = serde_json::from_slice(
        &std::fs::read(trained.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(
        config["r"], 8,
        "trained from the new LoRA's version 0, not a cached copy of the old one"
    );

    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
    db.cleanup().await;
}

/// A chat for a LoRA whose current version is only in the bucket, sent to a vLLM that never
/// served it: the API cannot hand vLLM a path (it has no copy on that node), so it asks the
/// node's worker through the store; the worker materialises the version in its cache and
/// loads it, and the chat is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_that_never_served_an_s3_adapter_gets_it_from_its_nodes_worker() {
    use claas_core::testing::TEST_BASE_MODEL;
    use claas_core::types::NewLora;
    use claas_fake_vllm::{FakeVllm, Options};
    use claas_worker::VllmOptions;

    let _one_at_a_time = SERIAL.lock().await;
    let Some(s3) = S3Server::start() else {
        eprintln!("skipped: CLAAS_TEST_PYTHON is not set (make test sets it)");
        return;
    };
    let url = format!("s3://{}/adapters", s3.bucket());
    // Some node trained and published version 1 of "u/b".
    let node_a_cache = tempdir("node-a");
    let elsewhere = AdapterStore::s3(&url, &node_a_cache).expect("store");
    let name = AdapterStore::version_name(1, "elsewhere");
    let v1 = elsewhere.local_dir("u/b", &name);
    std::fs::create_dir_all(&v1).expect("dir");
    std::fs::write(v1.join("adapter_config.json"), r#"{"r": 4}"#).expect("config");
    let uri = elsewhere.publish("u/b", &name).await.expect("publish");
    let db = TestDb::sqlite().await;
    db.store
        .create_lora(&NewLora {
            lora_id: "u/b".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: uri,
            initial_sha256: "published".into(),
        })
        .await
        .expect("lora");

    // Node B: a vLLM that has never seen "u/b", and its worker.
    let fake = FakeVllm::start(Options::default()).await;
    let model_dir = tempdir("model");
    tiny_checkpoint(&model_dir, 3).await;
    let node_cache = tempdir("node-b");
    let node_store = AdapterStore::s3(&url, &node_cache).expect("store");
    let exec = CandleExecutor::new(CandleOptions {
        store: Some(node_store.clone()),
        vllm: Some(VllmOptions {
            url: fake.url.clone(),
            api_key: None,
            drain_timeout: Duration::from_secs(5),
            drain_poll: Duration::from_millis(20),
            min_free_vram_gb: 20.0,
            vram_timeout: Duration::from_secs(1),
            pause_instead_of_sleep: false,
            reload_attempts: 2,
            reload_backoff: Duration::from_millis(10),
        }),
        ..cpu_options(TEST_BASE_MODEL, &model_dir, &node_cache)
    })
    .expect("executor");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            vllm_url: Some(fake.url.clone()),
            store: Some(node_store.clone()),
            ..WorkerOptions::new("node-b", vec![TEST_BASE_MODEL.into()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });

    // The API runs elsewhere, with its own (empty) cache.
    let base = model_dir.display().to_string();
    let api_cache = tempdir("api");
    let options = claas_api::ApiOptions {
        default_base_model: base.clone(),
        allowed_init_base_models: vec![base.clone()],
        lora_root: api_cache.display().to_string(),
        ..common::options(&api_cache)
    };
    let state = trainer_models::with_trainer_models(AppState::new(db.store.clone(), options))
        .with_adapters(AdapterStore::s3(&url, &api_cache).expect("store"))
        .with_upstream(Some(claas_api::upstream::Upstream::new(
            &fake.url,
            None,
            Duration::from_secs(30),
        )));
    let api = common::serve(state).await;
    let (status, body) = common::post_json(
        &reqwest::Client::new(),
        &format!("{api}/v1/chat/completions"),
        &json!({"model": "u/b", "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let dir = node_store.local_dir("u/b", &name);
    assert_eq!(
        fake.loras(),
        vec![("u/b".to_string(), dir.display().to_string())],
        "the node's worker loaded version 1 from its own cache"
    );
    assert!(dir.join("adapter_config.json").is_file());
    assert!(db
        .store
        .take_adapter_requests(&fake.url)
        .await
        .expect("take")
        .is_empty());

    // A new LoRA's version 0, written to the bucket by the API, is loaded by the node's
    // worker too, without waiting for a request to name it.
    let (status, body) = common::post_json(
        &reqwest::Client::new(),
        &format!("{api}/v1/lora/init"),
        &json!({"lora_id": "u/c", "lora_r": 4, "lora_alpha": 8}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let created = versions(&reqwest::Client::new(), &api, "u/c").await;
    let v0 = cached(&node_cache, &url, &created["versions"][0]["storage_uri"])
        .display()
        .to_string();
    let started = std::time::Instant::now();
    while !fake
        .loras()
        .iter()
        .any(|(name, path)| name == "u/c" && *path == v0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the node never loaded u/c: {:?}",
            fake.loras()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
    db.cleanup().await;
}
