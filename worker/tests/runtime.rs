//! The phase walk against a scripted executor: which vLLM calls a job makes when a phase
//! fails, before or after publish, and with wake-on-failure on or off.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use claas_core::testing::{job, lora, TestDb, TEST_BASE_MODEL};
use claas_core::types::{Job, JobStatus, Sample, TrainingConfig};
use claas_worker::executor::PhaseResult;
use claas_worker::{
    AdapterSource, Distilled, Executor, JobContext, PhaseError, ServedVersion, StoredAdapter,
    Worker, WorkerOptions,
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
impl Executor for Scripted {
    async fn drain(&self, _: &JobContext) -> PhaseResult<()> {
        self.run("drain")
    }
    async fn sleep(&self, _: &JobContext) -> PhaseResult<()> {
        self.run("sleep")
    }
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
