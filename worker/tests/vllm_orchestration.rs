//! The candle executor driving a fake vLLM (the wire formats of research/vllm-api.md): the
//! order of calls around a real training step, the reload from the new version's own
//! directory between a weights-only and a full wake, a drain that times out without
//! sleeping vLLM, and a reload failure that still wakes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use claas_core::testing::{job, TestDb, TEST_BASE_MODEL};
use claas_core::types::{Job, NewLora};
use claas_fake_vllm::{FakeVllm, Options};
use claas_testutil::{tempdir, TempDir};
use claas_worker::testing::{cpu_options, tiny_checkpoint};
use claas_worker::{CandleExecutor, CandleOptions, VllmOptions, Worker, WorkerOptions};
use tokio::sync::watch;

/// Runs a worker over `db` with `exec` until the returned sender says stop.
fn spawn_worker(
    db: &TestDb,
    exec: CandleExecutor,
    opts: WorkerOptions,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<claas_core::Result<()>>,
) {
    let (stop, rx) = watch::channel(false);
    let worker = Worker::new(db.store.clone(), exec, opts);
    (stop, tokio::spawn(async move { worker.run(rx).await }))
}

/// A candle executor on a fresh tiny checkpoint whose vLLM is `fake`.
async fn executor(
    fake: &FakeVllm,
    lora_root: &Path,
    drain_timeout: Duration,
    pause: bool,
) -> CandleExecutor {
    executor_with(fake, lora_root, drain_timeout, pause, None).await
}

async fn executor_with(
    fake: &FakeVllm,
    lora_root: &Path,
    drain_timeout: Duration,
    pause: bool,
    api_key: Option<&str>,
) -> CandleExecutor {
    let model_dir = tempdir("model");
    tiny_checkpoint(&model_dir, 3).await;
    // Host residency reads the checkpoint here, so its files may go when this returns.
    CandleExecutor::new(CandleOptions {
        vllm: Some(VllmOptions {
            url: fake.url.clone(),
            api_key: api_key.map(str::to_owned),
            drain_timeout,
            drain_poll: Duration::from_millis(20),
            min_free_vram_gb: 20.0,
            vram_timeout: Duration::from_secs(1),
            pause_instead_of_sleep: pause,
            reload_attempts: 2,
            reload_backoff: Duration::from_millis(10),
        }),
        ..cpu_options(TEST_BASE_MODEL, &model_dir, lora_root)
    })
    .expect("executor")
}

/// Runs one job for LoRA `a` through a worker whose executor drives `fake`; returns the
/// finished job and the LoRA root.
/// Where a run left its files: the LoRA root, and version 1 as recorded (if published).
struct Stored {
    root: TempDir,
    v1: Option<PathBuf>,
}

async fn run_job(fake: &FakeVllm, drain_timeout: Duration, pause: bool) -> (Job, Stored) {
    run_job_with(fake, drain_timeout, pause, None).await
}

async fn run_job_with(
    fake: &FakeVllm,
    drain_timeout: Duration,
    pause: bool,
    api_key: Option<&str>,
) -> (Job, Stored) {
    let db = TestDb::sqlite().await;
    let lora_root = tempdir("loras");
    let exec = executor_with(fake, &lora_root, drain_timeout, pause, api_key).await;
    db.store
        .create_lora(&NewLora {
            lora_id: "a".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            initial_uri: lora_root.join("a/@v0-init").display().to_string(),
            initial_sha256: String::new(),
        })
        .await
        .expect("lora");
    let mut j = job("a", 1);
    j.max_attempts = 1;
    db.store.enqueue(&j).await.expect("enqueue");
    let (stop, handle) = spawn_worker(
        &db,
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::new("vllm-test", vec![TEST_BASE_MODEL.into()])
        },
    );
    let started = Instant::now();
    let done = loop {
        let cur = db.store.get_job(j.id).await.expect("get").expect("job");
        if cur.status.is_terminal() {
            break cur;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "job never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
    let v1 = db
        .store
        .lora_versions("a")
        .await
        .expect("versions")
        .into_iter()
        .find(|v| v.version == 1)
        .and_then(|v| claas_core::types::local_path(&v.storage_uri));
    db.cleanup().await;
    (
        done,
        Stored {
            root: lora_root,
            v1,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sleep_train_then_reload_between_a_weights_and_a_full_wake() {
    let fake = FakeVllm::start(Options::default()).await;
    fake.knobs().busy_polls.store(2, Ordering::SeqCst);
    let (j, stored) = run_job(&fake, Duration::from_secs(10), false).await;
    assert_eq!(
        j.status,
        claas_core::types::JobStatus::Succeeded,
        "{:?}",
        j.error
    );
    let v1 = stored.v1.expect("version 1 recorded");
    assert!(v1.join("adapter_model.safetensors").is_file());
    assert_eq!(
        fake.calls(),
        [
            // A vLLM left asleep by a crashed worker is woken at start-up.
            "wake_up ".to_string(),
            "metrics".into(),
            "metrics".into(),
            "metrics".into(),
            "sleep level=1".into(),
            "wake_up tags=weights".into(),
            "unload a".into(),
            format!("load a {} inplace=false", v1.display()),
            "wake_up ".into(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_fails_without_sleeping_vllm() {
    let fake = FakeVllm::start(Options::default()).await;
    fake.knobs().busy_polls.store(usize::MAX, Ordering::SeqCst);
    let (j, _) = run_job(&fake, Duration::from_millis(200), false).await;
    assert_eq!(j.status, claas_core::types::JobStatus::Failed);
    assert_eq!(
        j.error.as_ref().map(|e| e.code.as_str()),
        Some("drain_timeout")
    );
    assert!(
        fake.calls().iter().skip(1).all(|c| c == "metrics"),
        "after the start-up wake, only polled: {:?}",
        fake.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_failure_is_retried_then_fails_as_published_but_not_loaded_and_wakes_vllm() {
    let fake = FakeVllm::start(Options::default()).await;
    fake.knobs().fail_load.store(true, Ordering::SeqCst);
    let (j, _) = run_job(&fake, Duration::from_secs(10), false).await;
    // The feedback was trained into version 1 (never again); only serving it failed,
    // after every try, and the job says so.
    assert_eq!(j.status, claas_core::types::JobStatus::Failed);
    assert_eq!(j.published_version, Some(1));
    let err = j.error.expect("error");
    assert_eq!(err.code, "reload_failed");
    assert!(
        err.message
            .starts_with("version 1 is published but not loaded into vLLM:"),
        "{}",
        err.message
    );
    let loads = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("load a"))
        .count();
    assert!(loads >= 2, "the reload was retried: {:?}", fake.calls());
    assert_eq!(fake.calls().last().map(String::as_str), Some("wake_up "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_mode_pauses_and_resumes_instead_of_sleeping() {
    let fake = FakeVllm::start(Options::default()).await;
    let (j, stored) = run_job(&fake, Duration::from_secs(10), true).await;
    assert_eq!(
        j.status,
        claas_core::types::JobStatus::Succeeded,
        "{:?}",
        j.error
    );
    assert_eq!(
        fake.calls(),
        [
            "resume".to_string(),
            "metrics".into(),
            "pause".into(),
            "unload a".into(),
            format!(
                "load a {} inplace=false",
                stored.v1.expect("version 1 recorded").display()
            ),
            "resume".into(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_swaps_a_stale_adapter_in_its_vllm_to_the_current_version() {
    let fake = FakeVllm::start(Options::default()).await;
    let db = TestDb::sqlite().await;
    let lora_root = tempdir("loras");
    // vLLM serves "b" from an old directory (another node published since, or this vLLM
    // restarted with a stale --lora-modules); the store says the current one is `current`.
    let (stale, current) = (lora_root.join("b/old"), lora_root.join("b/current"));
    for d in [&stale, &current] {
        std::fs::create_dir_all(d).expect("dir");
        std::fs::write(d.join("adapter_config.json"), r#"{"r": 4}"#).expect("config");
    }
    reqwest::Client::new()
        .post(format!("{}/v1/load_lora_adapter", fake.url))
        .json(&serde_json::json!({"lora_name": "b", "lora_path": stale.display().to_string()}))
        .send()
        .await
        .expect("load")
        .error_for_status()
        .expect("loaded");
    db.store
        .create_lora(&NewLora {
            lora_id: "b".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: format!("file://{}", current.display()),
            initial_sha256: String::new(),
        })
        .await
        .expect("lora");
    let exec = executor(&fake, &lora_root, Duration::from_secs(5), false).await;
    let (stop, handle) = spawn_worker(
        &db,
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::new("reconcile-test", vec![TEST_BASE_MODEL.into()])
        },
    );
    let want = vec![("b".to_string(), current.display().to_string())];
    let started = Instant::now();
    while fake.loras() != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reconciled: {:?}",
            fake.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fake.calls()
            .contains(&format!("load b {} inplace=true", current.display())),
        "swapped in place, without an unload: {:?}",
        fake.calls()
    );
    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_that_fails_fails_the_job_before_training_and_wakes_vllm() {
    let fake = FakeVllm::start(Options::default()).await;
    fake.knobs().fail_sleep.store(true, Ordering::SeqCst);
    let (j, stored) = run_job(&fake, Duration::from_secs(10), false).await;
    assert_eq!(j.status, claas_core::types::JobStatus::Failed);
    let err = j.error.expect("error");
    assert_eq!(err.phase, Some(claas_core::types::Phase::Sleep));
    assert!(
        err.message.contains("--enable-sleep-mode"),
        "{}",
        err.message
    );
    assert!(
        err.message.ends_with("(vLLM was slept and woken again)"),
        "the job says what became of vLLM: {}",
        err.message
    );
    assert!(stored.v1.is_none(), "nothing was published");
    let written: Vec<_> = std::fs::read_dir(stored.root.join("a"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        written
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("@v1")),
        "nothing was trained: {written:?}"
    );
    assert_eq!(j.published_version, None);
    // Whatever state the failed sleep left vLLM in, it is woken.
    assert_eq!(fake.calls().last().map(String::as_str), Some("wake_up "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_api_key_is_sent_on_the_guarded_lora_calls() {
    let fake = FakeVllm::start(Options {
        api_key: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    let (j, _) = run_job_with(&fake, Duration::from_secs(10), false, Some("s3cret")).await;
    assert_eq!(
        j.status,
        claas_core::types::JobStatus::Succeeded,
        "{:?}",
        j.error
    );
    assert_eq!(
        fake.loras().len(),
        1,
        "loaded through the guarded /v1 route"
    );

    let fake = FakeVllm::start(Options {
        api_key: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    let (j, _) = run_job_with(&fake, Duration::from_secs(10), false, None).await;
    assert_eq!(j.status, claas_core::types::JobStatus::Failed);
    assert!(
        j.error.is_some_and(|e| e.message.contains("401")),
        "without the key vLLM refuses the load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_storage_an_idle_worker_serves_the_current_version_from_the_bucket() {
    use claas_core::adapter_store::AdapterStore;
    let Some(s3) = claas_core::testing::S3Server::start() else {
        eprintln!("skipped: CLAAS_TEST_PYTHON is not set (make test sets it)");
        return;
    };
    let url = format!("s3://{}/adapters", s3.bucket());
    // Another node trained and published version 1 of "b".
    let node_a_cache = tempdir("node-a");
    let elsewhere = AdapterStore::s3(&url, &node_a_cache).expect("store");
    let name = AdapterStore::version_name(1, "elsewhere");
    let v1 = elsewhere.local_dir("b", &name);
    std::fs::create_dir_all(&v1).expect("dir");
    std::fs::write(v1.join("adapter_config.json"), r#"{"r": 4}"#).expect("config");
    let uri = elsewhere.publish("b", &name).await.expect("publish");

    // This node's vLLM still serves an old directory.
    let fake = FakeVllm::start(Options::default()).await;
    let stale = tempdir("stale");
    std::fs::create_dir_all(&stale).expect("dir");
    std::fs::write(stale.join("adapter_config.json"), r#"{"r": 4}"#).expect("config");
    reqwest::Client::new()
        .post(format!("{}/v1/load_lora_adapter", fake.url))
        .json(&serde_json::json!({"lora_name": "b", "lora_path": stale.display().to_string()}))
        .send()
        .await
        .expect("load")
        .error_for_status()
        .expect("loaded");
    let db = TestDb::sqlite().await;
    db.store
        .create_lora(&NewLora {
            lora_id: "b".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: uri,
            initial_sha256: "published".into(),
        })
        .await
        .expect("lora");
    let cache = tempdir("node-b");
    let here = AdapterStore::s3(&url, &cache).expect("store");
    let exec = executor(&fake, &cache, Duration::from_secs(5), false).await;
    let (stop, handle) = spawn_worker(
        &db,
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(50),
            store: Some(here.clone()),
            ..WorkerOptions::new("s3-reconcile", vec![TEST_BASE_MODEL.into()])
        },
    );
    let want = vec![(
        "b".to_string(),
        here.local_dir("b", &name).display().to_string(),
    )];
    let started = Instant::now();
    while fake.loras() != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reconciled: {:?}",
            fake.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(here
        .local_dir("b", &name)
        .join("adapter_config.json")
        .is_file());
    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_claims_nothing_while_its_vllm_is_unhealthy() {
    let fake = FakeVllm::start(Options::default()).await;
    fake.knobs().unhealthy.store(true, Ordering::SeqCst);
    let watcher = {
        let fake_calls = {
            let fake = &fake;
            move || fake.calls()
        };
        // While /health says 503 the worker claims nothing (no drain: no /metrics poll)
        // and touches vLLM only to wake it at start-up; then vLLM recovers.
        let deadline = Instant::now() + Duration::from_millis(800);
        async move {
            while Instant::now() < deadline {
                let calls = fake_calls();
                assert!(
                    calls.iter().all(|c| c.starts_with("wake_up")),
                    "the worker acted: {calls:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let recover = async {
        watcher.await;
        fake.knobs().unhealthy.store(false, Ordering::SeqCst);
    };
    // One attempt only: against a vLLM that is really down, a claim would fail the drain
    // and spend it.
    let ((j, _), ()) = tokio::join!(run_job(&fake, Duration::from_secs(5), false), recover);
    assert_eq!(
        j.status,
        claas_core::types::JobStatus::Succeeded,
        "{:?}",
        j.error
    );
    assert_eq!(j.attempt, 1);
}
