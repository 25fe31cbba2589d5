//! A Tinker fleet end to end: the real `claas api` and two `claas worker` processes in
//! `mode: tinker` on Postgres, against the fake Tinker. 50 feedback jobs over 5 LoRAs all
//! succeed, each trained batch publishes exactly one version (a Tinker checkpoint), and no
//! LoRA ever has two jobs training at once across the two workers.

mod common;

use std::time::Duration;

use claas_core::queue::JobFilter;
use claas_core::testing::TestDb;
use claas_core::types::{Job, JobStatus};
use claas_fake_tinker::{FakeTinker, Options};
use common::{env, eventually, feedback, free_port, spawn, wait_http};

const LORAS: [&str; 5] = ["fleet/a", "fleet/b", "fleet/c", "fleet/d", "fleet/e"];
const JOBS_PER_LORA: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tinker_workers_train_fifty_jobs_one_lora_at_a_time() {
    let db = TestDb::postgres().await;
    // The base model is the tiny checkpoint's directory: its tokenizer renders prompts,
    // and Tinker (the fake) knows it by that name.
    let model = claas_testutil::tempdir("tinker-fleet-model");
    claas_worker::testing::tiny_checkpoint(&model, 6).await;
    let base_model = model.display().to_string();
    let tinker = FakeTinker::start(Options {
        base_models: vec![base_model.clone()],
        sample_vocab: 97..123,
        ..Options::default()
    })
    .await;
    let scratch = claas_testutil::tempdir("tinker-fleet");
    let common_env = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("DATABASE_URL", db.url.as_str()),
            ("CLAAS_DISTILL_EXECUTION_MODE", "tinker"),
            ("CLAAS_TINKER_BASE_MODEL", base_model.as_str()),
            ("TINKER_API_KEY", "tml-fleet"),
            ("TINKER_BASE_URL", tinker.url.as_str()),
            ("CLAAS_DATA_DIR", scratch.to_str().unwrap_or_default()),
            ("CLAAS_QUEUE_POLL_INTERVAL_MS", "200"),
        ];
        pairs.extend_from_slice(extra);
        env(&pairs)
    };
    let port = free_port().to_string();
    let _api = spawn(
        "api",
        &["api"],
        &common_env(&[("CLAAS_API_HOST", "127.0.0.1"), ("CLAAS_API_PORT", &port)]),
    );
    let workers: Vec<_> = ["t1", "t2"]
        .iter()
        .map(|id| spawn(id, &["worker"], &common_env(&[("CLAAS_WORKER_ID", id)])))
        .collect();
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;
    let http = reqwest::Client::new();
    for id in LORAS {
        let r = http
            .post(format!("{base}/v1/lora/init"))
            .json(&serde_json::json!({"lora_id": id}))
            .send()
            .await
            .expect("init");
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
    }
    for round in 0..JOBS_PER_LORA {
        for id in LORAS {
            let r = http
                .post(format!("{base}/v1/feedback"))
                .header("prefer", "respond-async")
                .json(&feedback(id, &format!("round {round}: shorter")))
                .send()
                .await
                .expect("feedback");
            assert_eq!(r.status(), 202);
        }
    }
    let n = LORAS.len() * JOBS_PER_LORA;
    let jobs: Vec<Job> = eventually(
        Duration::from_secs(120),
        "all 50 jobs to finish",
        || async {
            let filter = JobFilter {
                limit: 1000,
                ..Default::default()
            };
            let jobs = db.store.list_jobs(&filter).await.expect("jobs");
            (jobs.len() == n && jobs.iter().all(|j| j.status.is_terminal())).then_some(jobs)
        },
    )
    .await;
    for j in &jobs {
        let log = || {
            workers
                .iter()
                .map(|w| w.log_text())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(j.status, JobStatus::Succeeded, "{:?}\n{}", j.error, log());
    }
    let by_worker = |w: &str| {
        jobs.iter()
            .filter(|j| j.trained_by.is_none() && j.worker_id.as_deref() == Some(w))
            .count()
    };
    assert!(
        by_worker("t1") > 0 && by_worker("t2") > 0,
        "both workers trained"
    );

    for id in LORAS {
        let leads: Vec<&Job> = jobs
            .iter()
            .filter(|j| j.lora_id == id && j.trained_by.is_none())
            .collect();
        // Never two at once: the leads' training spans of one LoRA do not overlap.
        let mut spans: Vec<_> = leads
            .iter()
            .map(|j| {
                (
                    j.started_at.expect("started"),
                    j.finished_at.expect("finished"),
                )
            })
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{id}: two jobs trained at once: {w:?}");
        }
        let versions = db.store.lora_versions(id).await.expect("versions");
        let numbers: Vec<i32> = versions.iter().map(|v| v.version).collect();
        let want: Vec<i32> = (0..=leads.len() as i32).collect();
        assert_eq!(numbers, want, "one version per trained batch of {id}");
        assert!(versions[1..]
            .iter()
            .all(|v| v.storage_uri.starts_with("tinker://")));
    }
    db.cleanup().await;
}
