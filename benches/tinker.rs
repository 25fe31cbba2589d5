//! What a Tinker job costs beyond Tinker's own time, and how many requests a worker keeps
//! in flight to Tinker.
//!
//! Runs jobs one at a time through the real worker with the Tinker trainer against the fake
//! Tinker (in process, on loopback), on Postgres (`DATABASE_URL`, default
//! postgres://postgres@localhost/test) and on SQLite. Per job: overhead = its time from
//! claim to done (`started_at` to `finished_at`, as recorded) minus the time the client had
//! at least one request in flight to Tinker during it (HTTP round trips included, so the fake's own work and the
//! loopback are both subtracted). Each job carries SAMPLES samples (default 4), which the
//! teacher scores concurrently.
//!
//! cargo bench --bench tinker [-- JOBS [SAMPLES]]

mod common;

use std::sync::Arc;
use std::time::Duration;

use claas_core::testing::{job, TestDb, TEST_BASE_MODEL};
use claas_core::types::NewLora;
use claas_fake_tinker::{FakeTinker, Options};
use claas_tinker::{Config, TinkerClient};
use claas_worker::testing::tiny_checkpoint;
use claas_worker::{Executor, TinkerTrainer, Worker, WorkerOptions};
use tokio::sync::watch;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(db: TestDb, jobs: usize, samples: usize) -> anyhow::Result<()> {
    let backend = db.store.backend();
    let dir = claas_testutil::tempdir("bench-tinker");
    tiny_checkpoint(&dir, 3).await;
    let fake = FakeTinker::start(Options {
        base_models: vec![TEST_BASE_MODEL.into()],
        ..Options::default()
    })
    .await;
    let client = TinkerClient::new(Config::new(&fake.url, "tml-bench"))?;
    let trainer = TinkerTrainer::from_tokenizer_dir(client.clone(), TEST_BASE_MODEL, &dir)?;
    let exec: Executor = Arc::new(trainer).into();
    db.store
        .create_lora(&NewLora {
            lora_id: "bench".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            initial_uri: String::new(),
            initial_sha256: String::new(),
        })
        .await?;
    let (stop, rx) = watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(20),
            ..WorkerOptions::new("bench", vec![TEST_BASE_MODEL.into()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });
    let (mut overhead, mut tinker, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut requests = Vec::new();
    for i in 0..jobs + 2 {
        let j = job("bench", samples);
        let before = client.stats();
        let done = common::run_to_end(&db.store, &j).await?;
        let after = client.stats();
        if i < 2 {
            continue; // warm-up: the session opens, the first model is created
        }
        let (claimed, ended) = (done.started_at, done.finished_at);
        let span = match (claimed, ended) {
            (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            _ => anyhow::bail!("job {} has no claim or end time", j.id),
        };
        let busy = (after.busy - before.busy).as_secs_f64() * 1000.0;
        overhead.push((span - busy).max(0.0));
        tinker.push(busy);
        total.push(span);
        requests.push((after.requests - before.requests) as f64);
    }
    let max_in_flight = client.stats().max_in_flight;
    stop.send(true)?;
    handle.await??;
    for v in [&mut overhead, &mut tinker, &mut total, &mut requests] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{backend}: {jobs} jobs of {samples} samples: overhead beyond Tinker p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         Tinker busy p50 {:.1} ms; job (claim to done) p50 {:.1} ms; HTTP requests per job p50 {:.0}; \
         most requests in flight at once {max_in_flight}",
        percentile(&overhead, 0.5),
        percentile(&overhead, 0.99),
        overhead.last().copied().unwrap_or(0.0),
        percentile(&tinker, 0.5),
        percentile(&total, 0.5),
        percentile(&requests, 0.5),
    );
    db.cleanup().await;
    drop(dir);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let jobs = numbers
        .first()
        .copied()
        .unwrap_or(if full { 200 } else { 3 });
    let samples = numbers.get(1).copied().unwrap_or(4);
    run(TestDb::postgres().await, jobs, samples).await?;
    run(TestDb::sqlite().await, jobs, samples).await?;
    Ok(())
}
