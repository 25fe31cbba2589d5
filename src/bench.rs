//! `claas bench queue`: burn down N no-op jobs over M LoRAs with W concurrent claimers
//! through the real claim/complete path (per-LoRA exclusivity, coalescing and fencing on),
//! and print throughput and claim latency. The last line is machine-readable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use claas_core::queue::{ClaimRequest, PgStore, SharedStore, SqliteStore};
use claas_core::types::{JobPayload, JobStatus, NewJob, NewLora, Rollout, Sample, TrainingConfig};
use clap::{Args, Subcommand};
use sqlx::Connection;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Queue throughput and claim latency.
    Queue(QueueBench),
    /// Fixed-rate load on `POST /v1/feedback` of a running API.
    Api(ApiBench),
    /// One SDPO step's time, tokens/s and peak memory on a checkpoint.
    Step(crate::train::StepBench),
    /// Embedded inference: time to first token and greedy decode tokens/s.
    Decode(crate::train::DecodeBench),
    /// Checkpoint load time on the CPU in f32 (`Qwen3::load`), per run and the median.
    Load(LoadBench),
}

#[derive(Args)]
pub struct LoadBench {
    /// Checkpoint directory (e.g. from `claas model random`).
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Args)]
pub struct QueueBench {
    /// `postgres://…` (a throwaway schema is created in it and dropped after) or `sqlite:FILE`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    #[arg(long, default_value_t = 1_000)]
    loras: usize,
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Samples per training batch (`feedback_max_batch_size`); 1 turns coalescing off.
    #[arg(long, default_value_t = 8)]
    batch_size: i32,
    /// Database connections shared by the claimers (default: one per claimer, as in a fleet).
    #[arg(long)]
    connections: Option<u32>,
}

const BASE_MODEL: &str = "bench/base";

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Queue(b) => queue(b).await,
        BenchCommand::Api(b) => api(b).await,
        BenchCommand::Step(b) => {
            tokio::task::spawn_blocking(move || crate::train::bench_step(b)).await?
        }
        BenchCommand::Decode(b) => {
            tokio::task::spawn_blocking(move || crate::train::bench_decode(b)).await?
        }
        BenchCommand::Load(b) => tokio::task::spawn_blocking(move || load(b)).await?,
    }
}

/// `claas bench load`: wall time of `Qwen3::load` on the CPU in f32, each run dropping the
/// model before the next (the page cache stays warm after the first).
fn load(b: LoadBench) -> Result<()> {
    use candle_core::{DType, Device};
    if b.runs == 0 {
        bail!("--runs must be > 0");
    }
    let mut secs = Vec::with_capacity(b.runs);
    for run in 1..=b.runs {
        let started = Instant::now();
        let model = claas_trainer::model::Qwen3::load(&b.model, &Device::Cpu, DType::F32)?;
        let s = started.elapsed().as_secs_f64();
        drop(model);
        println!("run {run}: {s:.3} s");
        secs.push(s);
    }
    secs.sort_by(f64::total_cmp);
    println!(
        "candle: load {} median {:.3} s over {} runs ({} threads)",
        b.model.display(),
        secs[secs.len() / 2],
        b.runs,
        candle_core::utils::get_num_threads()
    );
    Ok(())
}

async fn queue(b: QueueBench) -> Result<()> {
    if b.jobs == 0 || b.loras == 0 || b.workers == 0 {
        bail!("--jobs, --loras and --workers must be > 0");
    }
    let pool_size = if b.database_url.starts_with("sqlite:") {
        1 // the SQLite store serialises on one connection
    } else {
        b.connections
            .unwrap_or_else(|| u32::try_from(b.workers).unwrap_or(u32::MAX))
    };
    let (store, schema): (SharedStore, Option<String>) = if b.database_url.starts_with("sqlite:") {
        let s = SqliteStore::connect(&b.database_url).await?;
        (Arc::new(s), None)
    } else {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&b.database_url)
            .await
            .context("connecting to the benchmark database")?;
        sqlx::query(&format!("create schema {schema}"))
            .execute(&mut conn)
            .await?;
        let s = PgStore::connect(&b.database_url, Some(&schema), pool_size).await?;
        (Arc::new(s), Some(schema))
    };
    store.migrate().await?;
    let outcome = burn_down(&store, &b, pool_size).await;
    drop(store);
    if let Some(schema) = schema {
        let mut conn = sqlx::PgConnection::connect(&b.database_url).await?;
        sqlx::query(&format!("drop schema {schema} cascade"))
            .execute(&mut conn)
            .await?;
    }
    outcome
}

fn noop_job(lora: &str) -> NewJob {
    let sample = Sample {
        prompt: "p".into(),
        response: "r".into(),
        feedback: "f".into(),
        rollout: Rollout {
            prompt_token_ids: vec![1],
            response_token_ids: vec![2],
            response_logprobs: vec![-1.0],
            system_prompt: String::new(),
        },
    };
    NewJob::new(
        lora,
        JobPayload {
            samples: vec![sample],
            training: TrainingConfig::default(),
        },
    )
}

// Long: a benchmark script: start the fleet, enqueue, time the burn-down, print.
async fn burn_down(store: &SharedStore, b: &QueueBench, pool_size: u32) -> Result<()> {
    for l in 0..b.loras {
        store
            .create_lora(&NewLora {
                lora_id: format!("bench/l{l}"),
                base_model: BASE_MODEL.into(),
                rank: 8,
                alpha: 16.0,
                target_modules: vec!["q_proj".into()],
                initial_uri: "bench://v0".into(),
                initial_sha256: String::new(),
            })
            .await?;
    }
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..b.workers {
        let (store, next, jobs, loras) = (store.clone(), next.clone(), b.jobs, b.loras);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return Ok::<_, claas_core::Error>(());
                }
                store
                    .enqueue(&noop_job(&format!("bench/l{}", i % loras)))
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let enqueue_s = started.elapsed().as_secs_f64();
    println!(
        "enqueued {} jobs over {} LoRAs in {enqueue_s:.2}s ({:.0} jobs/s)",
        b.jobs,
        b.loras,
        b.jobs as f64 / enqueue_s
    );

    let done = Arc::new(AtomicUsize::new(0));
    let claims = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // A claimer that fails ends the run at once (dropping the set aborts the others): its
    // job would stay running until its lease ran out, and the rest would wait for it.
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..b.workers {
        let (store, done, claims, total) = (store.clone(), done.clone(), claims.clone(), b.jobs);
        let req = ClaimRequest {
            worker_id: format!("bench-{w}"),
            base_models: vec![BASE_MODEL.into()],
            lease: Duration::from_secs(60),
            max_batch_samples: b.batch_size,
        };
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut completes = Vec::new();
            while done.load(Ordering::Relaxed) < total {
                let t0 = Instant::now();
                let claimed = store.claim(&req).await?;
                let Some(c) = claimed else {
                    // Everything left is running elsewhere; look again shortly.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
                claims.fetch_add(1, Ordering::Relaxed);
                let t1 = Instant::now();
                let completed = store
                    .complete(&c.lease(), &serde_json::json!({}), None)
                    .await?;
                completes.push(t1.elapsed().as_secs_f64() * 1000.0);
                if !completed {
                    return Err(claas_core::Error::Conflict(
                        "lease lost during the benchmark".into(),
                    ));
                }
                done.fetch_add(1 + c.members.len(), Ordering::Relaxed);
            }
            Ok((latencies, completes))
        });
    }
    let mut latencies = Vec::new();
    let mut completes = Vec::new();
    while let Some(t) = tasks.join_next().await {
        let (l, c) = t??;
        latencies.extend(l);
        completes.extend(c);
    }
    let secs = started.elapsed().as_secs_f64();
    let counts = store.status_counts().await?;
    if counts != vec![(JobStatus::Succeeded, b.jobs as i64)] {
        bail!("not every job succeeded exactly once: {counts:?}");
    }
    latencies.sort_by(f64::total_cmp);
    completes.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    let n_claims = claims.load(Ordering::Relaxed);
    println!(
        "backend={} jobs={} loras={} workers={} connections={} batch_size={} claims={} seconds={secs:.3}",
        store.backend(), b.jobs, b.loras, b.workers, pool_size, b.batch_size, n_claims
    );
    println!(
        "complete_p50_ms={:.2} complete_p99_ms={:.2}",
        pct(&completes, 0.50),
        pct(&completes, 0.99)
    );
    println!(
        "jobs_per_s={:.0} claim_p50_ms={:.2} claim_p99_ms={:.2}",
        b.jobs as f64 / secs,
        pct(&latencies, 0.50),
        pct(&latencies, 0.99)
    );
    Ok(())
}

/// `claas bench api`: an open-loop load generator for `POST /v1/feedback`. Requests leave
/// on a fixed schedule whether or not earlier ones have answered, and each latency is
/// measured from its scheduled start, so a stalled server cannot hide its queueing.
#[derive(Args)]
pub struct ApiBench {
    /// Base URL of a running `claas api`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Requests rotate over LoRAs `bench/l0` … `bench/l{N-1}` (created first if missing).
    #[arg(long, default_value_t = 100)]
    loras: usize,
}

fn feedback_body(lora: &str, i: u64) -> String {
    serde_json::json!({"requests": [{
        "lora_id": lora,
        "prompt": "Explain recursion in one paragraph.",
        "response": "Recursion is when a function calls itself on a smaller input until a base case.",
        "feedback": format!("too long ({i})"),
        "prompt_token_ids": (0..64).collect::<Vec<u32>>(),
        "response_token_ids": (100..164).collect::<Vec<u32>>(),
        "response_logprobs": vec![-0.5f32; 64],
        "system_prompt": "You are a concise teacher."
    }]})
    .to_string()
}

pub async fn api(b: ApiBench) -> Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    for l in 0..b.loras {
        let resp = client
            .post(format!("{}/v1/lora/init", b.url))
            .header("content-type", "application/json")
            .body(serde_json::json!({"lora_id": format!("bench/l{l}")}).to_string())
            .send()
            .await?;
        if !(resp.status().is_success() || resp.status() == 409) {
            bail!("creating bench/l{l}: {}", resp.status());
        }
    }
    let total = u64::from(b.rate) * b.seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(b.rate.max(1)));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let client = client.clone();
        let url = format!("{}/v1/feedback", b.url);
        let body = feedback_body(&format!("bench/l{}", i % b.loras as u64), i);
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .header("content-type", "application/json")
                .header("prefer", "respond-async")
                .body(body)
                .send()
                .await;
            let ok = matches!(&resp, Ok(r) if r.status() == 202);
            (ok, due.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut failures = 0usize;
    for t in tasks {
        let (ok, ms) = t.await?;
        if !ok {
            failures += 1;
        }
        latencies.push(ms);
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "requests={} failures={failures} seconds={secs:.1} achieved_rps={:.0}",
        latencies.len(),
        latencies.len() as f64 / secs
    );
    println!(
        "p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
