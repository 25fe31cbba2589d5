//! What orchestration costs a job: everything but training and vLLM's own work.
//!
//! Runs jobs one at a time through the real worker with the candle executor (tiny model,
//! CPU) against the fake vLLM with every phase on (drain, sleep, vram, distill, publish,
//! reload, wake), on Postgres (`DATABASE_URL`, default postgres://postgres@localhost/test)
//! and on SQLite. Per job: overhead = the sum of its phase timings minus its distill time;
//! the fake answers sleep, wake and load in microseconds, so nothing else is subtracted.
//!
//! cargo bench --bench orchestration [-- JOBS]   (CLAAS_WORKER_DRAIN_GRACE_MS: default 50)

mod common;

use std::time::Duration;

use claas_core::testing::{job, TestDb, TEST_BASE_MODEL};
use claas_core::types::NewLora;
use claas_fake_vllm::{FakeVllm, Options};
use claas_worker::testing::{cpu_options, tiny_checkpoint};
use claas_worker::{CandleExecutor, CandleOptions, VllmOptions, Worker, WorkerOptions};
use tokio::sync::watch;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(db: TestDb, jobs: usize) -> anyhow::Result<()> {
    let backend = db.store.backend();
    let dir = claas_testutil::tempdir("bench-orch");
    let model_dir = dir.join("model");
    let lora_root = dir.join("loras");
    tiny_checkpoint(&model_dir, 3).await;
    let fake = FakeVllm::start(Options::default()).await;
    let exec = CandleExecutor::new(CandleOptions {
        vllm: Some(VllmOptions {
            url: fake.url.clone(),
            api_key: None,
            drain_timeout: Duration::from_secs(10),
            drain_poll: Duration::from_millis(250),
            min_free_vram_gb: 20.0,
            vram_timeout: Duration::from_secs(5),
            pause_instead_of_sleep: false,
            reload_attempts: 3,
            reload_backoff: Duration::from_secs(1),
        }),
        ..cpu_options(TEST_BASE_MODEL, model_dir, lora_root.clone())
    })?;
    db.store
        .create_lora(&NewLora {
            lora_id: "bench".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            initial_uri: format!("file://{}", lora_root.join("bench/v0").display()),
            initial_sha256: String::new(),
        })
        .await?;
    let (stop, rx) = watch::channel(false);
    // The fleet defaults (drain grace 50 ms included), polling fast only so the next job
    // starts at once; the poll wait is between jobs, not inside one.
    let worker = Worker::new(
        db.store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(20),
            drain_grace: Duration::from_millis(
                std::env::var("CLAAS_WORKER_DRAIN_GRACE_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(50),
            ),
            ..WorkerOptions::new("bench", vec![TEST_BASE_MODEL.into()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });
    let mut overhead = Vec::with_capacity(jobs);
    let mut distill = Vec::with_capacity(jobs);
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..jobs + 2 {
        let j = job("bench", 1);
        let done = common::run_to_end(&db.store, &j).await?;
        if i < 2 {
            continue; // warm-up: version 0 is written, caches fill
        }
        let total: u64 = done.timings_ms.values().sum();
        let d = done.timings_ms.get("distill").copied().unwrap_or(0);
        overhead.push((total - d) as f64);
        distill.push(d as f64);
        for (k, v) in &done.timings_ms {
            phases.entry(k.clone()).or_default().push(*v as f64);
        }
    }
    stop.send(true)?;
    handle.await??;
    for v in [&mut overhead, &mut distill] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{backend}: {jobs} jobs, orchestration overhead (total - distill) p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; distill p50 {:.0} ms",
        percentile(&overhead, 0.5),
        percentile(&overhead, 0.99),
        overhead.last().copied().unwrap_or(0.0),
        percentile(&distill, 0.5),
    );
    let line: Vec<String> = phases
        .iter_mut()
        .map(|(k, v)| {
            v.sort_by(f64::total_cmp);
            format!("{k} {:.0}", percentile(v, 0.5))
        })
        .collect();
    println!("{backend}: phase p50 (ms): {}", line.join(", "));
    db.cleanup().await;
    drop(dir);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let jobs: usize =
        args.iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(if full { 100 } else { 3 });
    run(TestDb::postgres().await, jobs).await?;
    run(TestDb::sqlite().await, jobs).await?;
    Ok(())
}
