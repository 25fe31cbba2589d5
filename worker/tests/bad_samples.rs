//! One bad sample fails only its own feedback (both stores): a worker that meets it in a
//! coalesced batch fails that job alone and trains the rest, whether the bad sample is a
//! member's or the lead's own.

use std::sync::Arc;
use std::time::Duration;

use claas_core::queue::{RetryPolicy, SharedStore};
use claas_core::testing::{lora, sample, TestDb, TEST_BASE_MODEL};
use claas_core::types::{JobPayload, JobStatus, NewJob, TrainingConfig};
use claas_worker::{SimulatedExecutor, Worker, WorkerOptions};
use tokio::sync::watch;

claas_core::both_stores!(
    a_members_bad_sample_fails_only_that_member,
    a_leads_bad_sample_fails_only_the_lead,
);

fn feedback(lora_id: &str, text: &str) -> NewJob {
    NewJob::new(
        lora_id,
        JobPayload {
            samples: vec![sample(text)],
            training: TrainingConfig::default(),
        },
    )
}

/// Enqueues `texts` as one-sample jobs (so they coalesce into one batch), runs a worker
/// until every job has finished, and returns each job's status, error and version.
async fn run(store: &SharedStore, texts: &[&str]) -> Vec<(JobStatus, Option<String>, Option<i32>)> {
    store.create_lora(&lora("a")).await.expect("lora");
    let jobs: Vec<NewJob> = texts.iter().map(|t| feedback("a", t)).collect();
    for j in &jobs {
        store.enqueue(j).await.expect("enqueue");
    }
    let (stop, rx) = watch::channel(false);
    let root = claas_testutil::tempdir("bad-samples");
    let worker = Worker::new(
        store.clone(),
        Arc::new(SimulatedExecutor {
            step: Duration::from_millis(1),
            root: root.to_path_buf(),
        }),
        WorkerOptions {
            poll_interval: Duration::from_millis(20),
            retry: RetryPolicy {
                base: Duration::from_millis(10),
                max: Duration::from_millis(20),
            },
            ..WorkerOptions::new("w", vec![TEST_BASE_MODEL.into()])
        },
    );
    let running = tokio::spawn(async move { worker.run(rx).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let finished = loop {
        let mut all = Vec::new();
        for j in &jobs {
            all.push(store.get_job(j.id).await.expect("get").expect("exists"));
        }
        if all.iter().all(|j| j.status.is_terminal()) {
            break all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs did not finish: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = stop.send(true);
    let _ = running.await;
    finished
        .into_iter()
        .map(|j| (j.status, j.error.map(|e| e.code), j.published_version))
        .collect()
}

async fn a_members_bad_sample_fails_only_that_member(db: &TestDb) {
    let got = run(&db.store, &["good", "bad [simulate:fatal]", "also good"]).await;
    assert_eq!(got[1].0, JobStatus::Failed, "{got:?}");
    assert_eq!(got[1].1.as_deref(), Some("invalid_input"));
    assert_eq!(got[1].2, None, "the bad job trained nothing");
    for i in [0, 2] {
        assert_eq!(got[i].0, JobStatus::Succeeded, "{got:?}");
        assert_eq!(got[i].2, Some(1), "trained together, in one step");
    }
    let versions = db.store.lora_versions("a").await.expect("versions");
    assert_eq!(versions.len(), 2, "version 0 and the one batch's version");
}

async fn a_leads_bad_sample_fails_only_the_lead(db: &TestDb) {
    let got = run(&db.store, &["bad [simulate:fatal]", "good", "also good"]).await;
    assert_eq!(got[0].0, JobStatus::Failed, "{got:?}");
    assert_eq!(got[0].1.as_deref(), Some("invalid_input"));
    for i in [1, 2] {
        assert_eq!(got[i].0, JobStatus::Succeeded, "{got:?}");
        assert_eq!(
            got[i].2,
            Some(1),
            "the members trained in the next batch: {got:?}"
        );
    }
}
