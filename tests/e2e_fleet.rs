//! End to end: the real `claas api` and two `claas worker` processes on Postgres. A worker
//! dies (SIGKILL) or freezes past its lease (SIGSTOP/SIGCONT) in the middle of a job; every
//! job still ends `succeeded` exactly once and each training batch publishes exactly one
//! version.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use claas_core::queue::{JobFilter, SharedStore};
use claas_core::testing::{lora, TestDb, TEST_BASE_MODEL};
use claas_core::types::{Job, JobStatus, Phase};
use common::{env, eventually, feedback, free_port, spawn, wait_http, Proc};

const LORAS: [&str; 4] = ["team/a", "team/b", "team/c", "team/d"];
const JOBS_PER_LORA: usize = 4;

struct Fleet {
    base: String,
    api: Proc,
    workers: Vec<Proc>,
    /// Removed after the processes above are killed (fields drop in order).
    _adapters: claas_testutil::TempDir,
}

fn worker_env(db_url: &str, id: &str, adapters: &std::path::Path) -> Vec<(String, String)> {
    env(&[
        ("DATABASE_URL", db_url),
        ("CLAAS_WORKER_ID", id),
        ("CLAAS_WORKER_BASE_MODELS", TEST_BASE_MODEL),
        ("CLAAS_WORKER_EXECUTOR", "simulated"),
        // Each phase takes 300 ms, so a job is mid-flight for ~2 s: room to kill it.
        ("CLAAS_SIMULATED_STEP_MS", "300"),
        // A 2 s lease: a dead worker's job comes back within ~3 s.
        ("FEEDBACK_LOCK_TIMEOUT_S", "2"),
        ("CLAAS_QUEUE_POLL_INTERVAL_MS", "200"),
        ("CLAAS_RETRY_BASE_S", "0.1"),
        ("CLAAS_RETRY_MAX_S", "0.5"),
        ("CLAAS_JOB_MAX_ATTEMPTS", "5"),
        ("CLAAS_LORA_ROOT", adapters.to_str().unwrap_or_default()),
    ])
}

async fn start_fleet(db: &TestDb) -> Fleet {
    for id in LORAS {
        db.store.create_lora(&lora(id)).await.expect("lora");
    }
    let port = free_port().to_string();
    let api = spawn(
        "api",
        &["api"],
        &env(&[
            ("DATABASE_URL", &db.url),
            ("CLAAS_API_HOST", "127.0.0.1"),
            ("CLAAS_API_PORT", &port),
            ("CLAAS_JOB_MAX_ATTEMPTS", "5"),
        ]),
    );
    let adapters = claas_testutil::tempdir("e2e");
    let workers = ["w1", "w2"]
        .iter()
        .map(|id| spawn(id, &["worker"], &worker_env(&db.url, id, &adapters)))
        .collect();
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;
    Fleet {
        base,
        api,
        workers,
        _adapters: adapters,
    }
}

async fn submit_all(base: &str) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for round in 0..JOBS_PER_LORA {
        for id in LORAS {
            let resp = client
                .post(format!("{base}/v1/feedback"))
                .header("prefer", "respond-async")
                .json(&feedback(id, &format!("round {round}: be more concise")))
                .send()
                .await
                .expect("post feedback");
            assert_eq!(resp.status(), 202);
            let body: serde_json::Value = resp.json().await.expect("json");
            ids.push(body["job_id"].as_str().expect("job_id").to_string());
        }
    }
    ids
}

async fn all_jobs(store: &SharedStore) -> Vec<Job> {
    let filter = JobFilter {
        limit: 1000,
        ..Default::default()
    };
    store.list_jobs(&filter).await.expect("list")
}

/// Waits for a job that `worker` is running in one of `phases`.
async fn job_of(store: &SharedStore, worker: &str, phases: &[Phase]) -> Job {
    eventually(
        Duration::from_secs(30),
        "a job mid-flight on w1",
        || async {
            all_jobs(store).await.into_iter().find(|j| {
                j.status == JobStatus::Running
                    && j.worker_id.as_deref() == Some(worker)
                    && phases.contains(&j.phase)
            })
        },
    )
    .await
}

/// Waits for every job to finish while checking, each time, that no LoRA runs twice.
async fn wait_all_finished(store: &SharedStore, n: usize) -> Vec<Job> {
    eventually(Duration::from_secs(90), "every job to finish", || async {
        let jobs = all_jobs(store).await;
        let mut running = HashSet::new();
        for j in jobs.iter().filter(|j| j.status == JobStatus::Running) {
            assert!(
                running.insert(j.lora_id.clone()),
                "two running jobs for {}",
                j.lora_id
            );
        }
        (jobs.len() == n && jobs.iter().all(|j| j.status.is_terminal())).then_some(jobs)
    })
    .await
}

/// Every job succeeded; each batch lead published exactly one version; versions per LoRA
/// are 1..=n with no gaps; every member carries its lead's version.
async fn assert_exactly_once(store: &SharedStore, jobs: &[Job]) {
    for j in jobs {
        assert_eq!(
            j.status,
            JobStatus::Succeeded,
            "job {} ended {:?}: {:?}",
            j.id,
            j.status,
            j.error
        );
    }
    let by_id: HashMap<_, _> = jobs.iter().map(|j| (j.id, j)).collect();
    for lora_id in LORAS {
        let versions = store.lora_versions(lora_id).await.expect("versions");
        let numbers: Vec<i32> = versions.iter().map(|v| v.version).collect();
        let expected: Vec<i32> = (0..i32::try_from(versions.len()).unwrap_or(0)).collect();
        assert_eq!(numbers, expected, "contiguous versions for {lora_id}");
        let leads: Vec<_> = jobs
            .iter()
            .filter(|j| j.lora_id == lora_id && j.trained_by.is_none())
            .collect();
        assert_eq!(
            versions.len() - 1,
            leads.len(),
            "one version per trained batch of {lora_id}"
        );
        let makers: HashSet<_> = versions.iter().filter_map(|v| v.job_id).collect();
        assert_eq!(
            makers.len(),
            leads.len(),
            "no batch published twice for {lora_id}"
        );
        for lead in leads {
            assert!(makers.contains(&lead.id));
        }
        let lora = store.get_lora(lora_id).await.expect("get").expect("lora");
        assert_eq!(lora.current_version as usize, versions.len() - 1);
    }
    for j in jobs.iter().filter(|j| j.trained_by.is_some()) {
        let lead = by_id
            .get(&j.trained_by.unwrap_or_default())
            .expect("lead exists");
        assert_eq!(
            j.published_version, lead.published_version,
            "member {} follows its lead",
            j.id
        );
    }
}

/// The job's timeline shows the lease ran out and the job went back to the queue; it then
/// succeeded (alone or in another job's batch).
async fn assert_requeued_after_lease_loss(store: &SharedStore, job: &Job) {
    let events = store.job_events(job.id).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.phase == "queued" && e.message.contains("stopped renewing its lease")),
        "timeline of {}: {events:?}",
        job.id
    );
    let done = store.get_job(job.id).await.expect("get").expect("job");
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.error, None, "a later success clears the old error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_loses_no_job_and_trains_nothing_twice() {
    let db = TestDb::postgres().await;
    let mut fleet = start_fleet(&db).await;
    let ids = submit_all(&fleet.base).await;
    let victim = job_of(
        &db.store,
        "w1",
        &[Phase::Sleep, Phase::Vram, Phase::Distill],
    )
    .await;
    fleet.workers[0].signal("KILL");
    let jobs = wait_all_finished(&db.store, ids.len()).await;
    assert_exactly_once(&db.store, &jobs).await;
    assert_requeued_after_lease_loss(&db.store, &victim).await;
    assert!(fleet.api.is_running() && fleet.workers[1].is_running());
    drop(fleet);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_cannot_finish_or_publish_after_its_lease() {
    let db = TestDb::postgres().await;
    let mut fleet = start_fleet(&db).await;
    let ids = submit_all(&fleet.base).await;
    // Freeze w1 in distill: its next step would be publishing a version.
    let frozen = job_of(&db.store, "w1", &[Phase::Distill]).await;
    fleet.workers[0].signal("STOP");
    let taken_over = eventually(
        Duration::from_secs(30),
        "w2 to take over the frozen job",
        || async {
            let j = db.store.get_job(frozen.id).await.expect("get")?;
            (j.worker_id.as_deref() == Some("w2") || j.status.is_terminal()).then_some(j)
        },
    )
    .await;
    assert!(taken_over.worker_id.as_deref() != Some("w1"));
    fleet.workers[0].signal("CONT");
    let jobs = wait_all_finished(&db.store, ids.len()).await;
    // Give the thawed worker time to try its late heartbeat, publish and completion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_exactly_once(&db.store, &jobs).await;
    assert_requeued_after_lease_loss(&db.store, &frozen).await;
    let log = fleet.workers[0].log_text();
    assert!(
        log.contains("lease lost") || log.contains("LeaseLost"),
        "w1 noticed it lost the lease:\n{log}"
    );
    assert!(
        fleet.workers[0].is_running(),
        "the thawed worker keeps serving"
    );
    drop(fleet);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_job_back_within_the_grace_period() {
    let db = TestDb::postgres().await;
    db.store.create_lora(&lora("team/a")).await.expect("lora");
    let adapters = claas_testutil::tempdir("e2e");
    let mut vars = worker_env(&db.url, "w-term", &adapters);
    vars.push(("CLAAS_WORKER_SHUTDOWN_GRACE_S".into(), "0.5".into()));
    vars.push(("CLAAS_SIMULATED_STEP_MS".into(), "2000".into()));
    let mut w = spawn("w-term", &["worker"], &vars);
    let job = claas_core::testing::job("team/a", 1);
    db.store.enqueue(&job).await.expect("enqueue");
    job_of(&db.store, "w-term", &[Phase::Drain, Phase::Sleep]).await;
    w.signal("TERM");
    let status = w
        .wait_exit(Duration::from_secs(10))
        .expect("worker exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let back = db.store.get_job(job.id).await.expect("get").expect("job");
    assert_eq!(
        back.status,
        JobStatus::Queued,
        "handed back, not left running: {back:?}"
    );
    assert_eq!(
        back.max_attempts,
        job.max_attempts + 1,
        "the hand-back cost no attempt"
    );
    let workers = db.store.list_workers().await.expect("workers");
    assert_eq!(workers[0].state, "stopped");
    drop(w);
    db.cleanup().await;
}

/// The stalled-writer race: a worker frozen in the middle of saving a version (SIGSTOP)
/// loses its lease, another worker trains and publishes that version, then the first
/// thaws and its save runs to the end. The published version's files stay what was
/// recorded: the late save lands beside them, its publish is refused, and it removes what
/// it wrote (or retention does, if it dies first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_frozen_mid_save_never_changes_a_published_version() {
    let db = TestDb::postgres().await;
    db.store.create_lora(&lora("team/a")).await.expect("lora");
    let adapters = claas_testutil::tempdir("e2e");
    // The simulated save spends its phase time between writing and renaming, in a
    // blocking thread that outlives the lease, as the trainer's save does.
    let mut slow = worker_env(&db.url, "w1", &adapters);
    slow.push(("CLAAS_SIMULATED_STEP_MS".into(), "1500".into()));
    let mut w1 = spawn("w1", &["worker"], &slow);
    let job = claas_core::testing::job("team/a", 1);
    db.store.enqueue(&job).await.expect("enqueue");
    job_of(&db.store, "w1", &[Phase::Publish]).await;
    w1.signal("STOP");

    let mut w2 = spawn("w2", &["worker"], &worker_env(&db.url, "w2", &adapters));
    let done = eventually(
        Duration::from_secs(60),
        "w2 to train and publish the job",
        || async {
            let j = db.store.get_job(job.id).await.expect("get")?;
            j.status.is_terminal().then_some(j)
        },
    )
    .await;
    assert_eq!(done.status, JobStatus::Succeeded, "{:?}", done.error);
    w1.signal("CONT");
    eventually(
        Duration::from_secs(20),
        "the thawed w1 to notice its lost lease",
        || async {
            let log = w1.log_text();
            (log.contains("lease lost") || log.contains("LeaseLost")).then_some(())
        },
    )
    .await;

    let versions = db.store.lora_versions("team/a").await.expect("versions");
    assert_eq!(versions.len(), 2, "one version trained: {versions:?}");
    let v1 = &versions[1];
    let path = claas_core::types::local_path(&v1.storage_uri).expect("local");
    assert_eq!(
        claas_trainer::storage::sha256_file(&path).expect("the published file"),
        v1.sha256,
        "the published version is what was recorded, not the late writer's"
    );
    assert!(w1.is_running() && w2.is_running());
    drop((w1, w2));
    db.cleanup().await;
}

/// A worker whose object store is misconfigured stops at start-up naming the setting,
/// instead of running on and keeping (or pruning) versions on local disk no other node sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_bad_storage_url_stops_at_start_up() {
    let db = TestDb::postgres().await;
    let adapters = claas_testutil::tempdir("e2e");
    let mut vars = worker_env(&db.url, "w-bad-s3", &adapters);
    vars.push(("CLAAS_STORAGE_BACKEND".into(), "s3".into()));
    vars.push(("CLAAS_STORAGE_URL".into(), "s3:///no-bucket".into()));
    let mut w = spawn("w-bad-s3", &["worker"], &vars);
    let status = w.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the worker must stop with an error, not run on: {status:?}"
    );
    assert!(
        w.log_text().contains("storage.url"),
        "the error names the setting:\n{}",
        w.log_text()
    );
    db.cleanup().await;
}
