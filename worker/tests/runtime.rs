//! The phase walk against a scripted executor: which vLLM calls a job makes when a phase
//! fails, before or after publish, and with wake-on-failure on or off.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use claas_core::testing::{job, lora, TestDb, TEST_BASE_MODEL};
use claas_core::types::{Job, JobStatus, Sample, TrainingConfig};
use claas_worker::executor::PhaseResult;
use claas_worker::{
    AdapterSource, Distilled, JobContext, PhaseError, ServedVersion, Serving, StoredAdapter,
    Trainer, Worker, WorkerOptions,
};
use tokio::sync::watch;

/// Records each phase it runs and fails the one named in `fail_in` (retryable or not).
#[derive(Default)]
struct Scripted {
    calls: Mutex<Vec<&'static str>>,
    fail_in: Option<(&'static str, bool)>,
}

impl Scripted {
    fn failing(phase: &'static str, retryable: bool) -> Self {
        Scripted {
            calls: Mutex::default(),
            fail_in: Some((phase, retryable)),
        }
    }

    fn run(&self, phase: &'static str) -> PhaseResult<()> {
        self.calls.lock().expect("lock").push(phase);
        match self.fail_in {
            Some((p, true)) if p == phase => Err(PhaseError::retryable("scripted", phase)),
            Some((p, false)) if p == phase => Err(PhaseError::fatal("scripted", phase)),
            _ => Ok(()),
        }
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("lock").clone()
    }
}

#[async_trait]
impl Trainer for Scripted {
    async fn wait_vram(&self, _: &JobContext) -> PhaseResult<()> {
        self.run("vram")
    }
    async fn distill(
        &self,
        _: &JobContext,
        _: &AdapterSource,
        _: &[Sample],
        _: &TrainingConfig,
    ) -> PhaseResult<Distilled> {
        self.run("distill")?;
        Ok(Distilled {
            metrics: serde_json::json!({"total_loss": 0.25}),
            artifact: Box::new(()),
        })
    }
    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        _: Distilled,
    ) -> PhaseResult<StoredAdapter> {
        self.run("store")?;
        Ok(StoredAdapter {
            uri: format!("file:///loras/{}/v{version}", job.lora_id),
            sha256: "cd".repeat(32),
        })
    }
}

#[async_trait]
impl Serving for Scripted {
    fn controls_vllm(&self) -> bool {
        true
    }
    async fn drain(&self, _: &JobContext) -> PhaseResult<()> {
        self.run("drain")
    }
    async fn sleep(&self, _: &JobContext) -> PhaseResult<()> {
        self.run("sleep")
    }
    async fn reload(&self, _: &JobContext, _: &ServedVersion) -> PhaseResult<()> {
        self.run("reload")
    }
    async fn wake(&self, _: &JobContext) -> PhaseResult<()> {
        self.run("wake")
    }
}

fn options(wake_on_failure: bool) -> WorkerOptions {
    WorkerOptions {
        poll_interval: Duration::from_millis(50),
        wake_on_failure,
        ..WorkerOptions::new("runtime-test", vec![TEST_BASE_MODEL.into()])
    }
}

/// Runs a worker until the job is no longer queued or running; returns the job.
async fn run_one(db: &TestDb, exec: Arc<Scripted>, opts: WorkerOptions, orch_wake: bool) -> Job {
    db.store.create_lora(&lora("a")).await.expect("lora");
    let mut j = job("a", 1);
    j.orchestration.wake_on_failure = orch_wake;
    j.max_attempts = 1;
    db.store.enqueue(&j).await.expect("enqueue");
    let (stop, rx) = watch::channel(false);
    let worker = Worker::new(db.store.clone(), exec, opts);
    let handle = tokio::spawn(async move { worker.run(rx).await });
    let start = Instant::now();
    let done = loop {
        let cur = db.store.get_job(j.id).await.expect("get").expect("job");
        if cur.status.is_terminal() {
            break cur;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "job never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_sleep_wakes_vllm() {
    let db = TestDb::sqlite().await;
    let exec = Arc::new(Scripted::failing("vram", false));
    let j = run_one(&db, exec.clone(), options(true), true).await;
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(exec.calls(), ["drain", "sleep", "vram", "wake"]);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_on_failure_off_leaves_vllm_asleep() {
    let db = TestDb::sqlite().await;
    let exec = Arc::new(Scripted::failing("distill", false));
    let j = run_one(&db, exec.clone(), options(false), false).await;
    assert_eq!(j.status, JobStatus::Failed);
    let msg = j.error.map(|e| e.message).unwrap_or_default();
    assert!(
        msg.ends_with("(vLLM was slept and is left asleep (wake_on_failure is off))"),
        "{msg}"
    );
    assert_eq!(exec.calls(), ["drain", "sleep", "vram", "distill"]);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_failure_after_publish_fails_keeping_the_version_and_wakes() {
    let db = TestDb::sqlite().await;
    let exec = Arc::new(Scripted::failing("reload", false));
    let j = run_one(&db, exec.clone(), options(true), true).await;
    assert_eq!(j.status, JobStatus::Failed, "version 1 is not served");
    assert_eq!(j.published_version, Some(1), "but the feedback trained it");
    let err = j.error.expect("error");
    assert_eq!(err.code, "reload_failed");
    assert!(err
        .message
        .starts_with("version 1 is published but not loaded"));
    let lora = db.store.get_lora("a").await.expect("get").expect("lora");
    assert_eq!(lora.current_version, 1);
    assert_eq!(
        exec.calls(),
        ["drain", "sleep", "vram", "distill", "store", "reload", "wake"]
    );
    db.cleanup().await;
}

/// The records in a feedback log directory, with no temporary file beside them.
fn log_records(dir: &std::path::Path) -> Vec<(std::path::PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("log dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            name.ends_with(".json") && !name.starts_with('.'),
            "stray file {name}"
        );
        let text = std::fs::read(&path).expect("read");
        out.push((
            path,
            serde_json::from_slice(&text).expect("a whole JSON record"),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_job_leaves_one_feedback_log_record_and_its_result_names_it() {
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("flog");
    let opts = WorkerOptions {
        feedback_log_dir: Some(dir.to_path_buf()),
        ..options(true)
    };
    let j = run_one(&db, Arc::new(Scripted::default()), opts, true).await;
    assert_eq!(j.status, JobStatus::Succeeded);
    let records = log_records(&dir);
    assert_eq!(records.len(), 1);
    let (path, rec) = &records[0];
    let named = j
        .result
        .as_ref()
        .and_then(|r| r["feedback_log_path"].as_str());
    assert_eq!(named, Some(path.display().to_string().as_str()));
    assert_eq!(rec["status"], "ok");
    assert_eq!(rec["request_id"], j.id.simple().to_string());
    assert_eq!(rec["lora_id"], "a");
    assert_eq!(rec["phase"], "wake");
    assert_eq!(rec["distill_result"]["metadata"]["total_loss"], 0.25);
    assert_eq!(rec["error"], serde_json::Value::Null);
    let sample = &rec["batch_samples"][0];
    assert!(sample["response_token_ids"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));
    assert!(sample["response_logprobs"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));
    assert!(rec["timing_ms"]["total"].as_u64().is_some());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_leaves_an_error_record_naming_its_phase() {
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("flog");
    let opts = WorkerOptions {
        feedback_log_dir: Some(dir.to_path_buf()),
        ..options(true)
    };
    let j = run_one(
        &db,
        Arc::new(Scripted::failing("distill", false)),
        opts,
        true,
    )
    .await;
    assert_eq!(j.status, JobStatus::Failed);
    let records = log_records(&dir);
    assert_eq!(records.len(), 1);
    let rec = &records[0].1;
    assert_eq!(rec["status"], "error");
    assert_eq!(rec["phase"], "distill");
    assert!(
        rec["error"].as_str().is_some_and(|e| e.contains("distill")),
        "{rec}"
    );
    assert_eq!(rec["distill_result"], serde_json::Value::Null);
    db.cleanup().await;
}
