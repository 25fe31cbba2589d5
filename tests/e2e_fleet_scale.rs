//! A fleet at the scale users reach, on a Postgres of its own with the default
//! `max_connections` (100): 200 workers, each with its own store (pool and listener) built
//! from the default settings exactly as `claas worker` builds it, and two `claas api`
//! processes, burn down 5,000 feedback jobs over 500 LoRAs while clients keep posting.
//! Every job succeeds once, no LoRA ever runs two jobs, no request or worker meets a
//! connection error, and the server's connection count and the claim latency are printed.
//!
//! A second case runs workers with no listener at all (`database.max_listeners = 0`, as
//! behind PgBouncer in transaction mode): they claim by polling.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claas_core::config::Config;
use claas_core::queue::{self, JobFilter, PoolSettings, SharedStore};
use claas_core::testing::{lora, TEST_BASE_MODEL};
use claas_core::types::{Job, JobStatus};
use claas_worker::{SimulatedExecutor, Worker, WorkerOptions};
use common::throwaway_pg::ThrowawayPg;
use common::{env, eventually, feedback, free_port, spawn, wait_http, Proc};
use sqlx::Connection;
use tokio::sync::watch;

/// The two cases run one after the other: each measures a fleet on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WORKERS: usize = 200;
const LORAS: usize = 500;
const JOBS: usize = 5_000;
const CLIENTS: usize = 16;
/// Each simulated phase (and the save) takes this long: one training is about 8 of them.
const STEP: Duration = Duration::from_millis(3000);

/// Warnings and errors the in-process workers log: a connection error would be one.
#[derive(Clone, Default)]
struct Complaints(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Complaints {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={v:?} ", f.name()));
            }
        }
        let mut text = Text(format!("{} ", event.metadata().target()));
        event.record(&mut text);
        if let Ok(mut all) = self.0.lock() {
            all.push(text.0);
        }
    }
}

fn complaints() -> Complaints {
    use tracing_subscriber::layer::SubscriberExt;
    static ONE: std::sync::OnceLock<Complaints> = std::sync::OnceLock::new();
    ONE.get_or_init(|| {
        let c = Complaints::default();
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(c.clone()));
        c
    })
    .clone()
}

/// What the server saw while the fleet ran.
#[derive(Default)]
struct Watch {
    peak_connections: AtomicUsize,
    /// (application, state, connections) when the peak was seen.
    at_peak: Mutex<Vec<(String, String, i64)>>,
    two_running: Mutex<Vec<String>>,
}

/// Samples the server every 100 ms through one connection of its own.
async fn watch_server(url: String, seen: Arc<Watch>, mut stop: watch::Receiver<bool>) {
    let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
    else {
        return;
    };
    while !*stop.borrow() {
        if let Ok(rows) = sqlx::query_as::<_, (String, String, i64)>(
            "select application_name || ' ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 50), \
             coalesce(state, ''), count(*) from pg_stat_activity \
             where backend_type = 'client backend' group by 1, 2 order by 3 desc limit 8",
        )
        .fetch_all(&pool)
        .await
        {
            let n: i64 = rows.iter().map(|r| r.2).sum();
            let n = usize::try_from(n).unwrap_or(0);
            if seen.peak_connections.fetch_max(n, Ordering::SeqCst) < n {
                if let Ok(mut at) = seen.at_peak.lock() {
                    *at = rows;
                }
            }
        }
        if let Ok(twice) = sqlx::query_scalar::<_, String>(
            "select lora_id from jobs where status = 'running' group by lora_id having count(*) > 1",
        )
        .fetch_all(&pool)
        .await
        {
            if let Ok(mut v) = seen.two_running.lock() {
                v.extend(twice);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => {}
        }
    }
}

fn api_env(url: &str, port: &str) -> Vec<(String, String)> {
    env(&[
        ("DATABASE_URL", url),
        ("CLAAS_API_HOST", "127.0.0.1"),
        ("CLAAS_API_PORT", port),
    ])
}

/// Two API processes on the cluster, the first of which migrates it.
async fn start_apis(url: &str) -> (Vec<Proc>, Vec<String>) {
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for i in 0..2 {
        let port = free_port().to_string();
        procs.push(spawn(&format!("api{i}"), &["api"], &api_env(url, &port)));
        let base = format!("http://127.0.0.1:{port}");
        wait_http(&base).await;
        bases.push(base);
    }
    (procs, bases)
}

/// `n` workers in this process, each with the store `claas worker` would open with the
/// default settings (pool, idle timeout, listener slots) and `listeners` slots.
async fn start_workers(
    url: &str,
    n: usize,
    listeners: u32,
    root: &std::path::Path,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>) {
    let defaults = Config::default().database;
    let (stop, rx) = watch::channel(false);
    let mut handles = Vec::new();
    for i in 0..n {
        let store = queue::connect_with(
            url,
            PoolSettings::worker(defaults.worker_max_connections, listeners),
        )
        .await
        .expect("store");
        let exec = Arc::new(SimulatedExecutor {
            step: STEP,
            root: root.to_path_buf(),
        });
        let worker = Worker::new(
            store,
            exec,
            WorkerOptions::new(format!("w{i}"), vec![TEST_BASE_MODEL.into()]),
        );
        let rx = rx.clone();
        handles.push(tokio::spawn(async move {
            if let Err(e) = worker.run(rx).await {
                tracing::error!(error = %e, "worker stopped");
            }
        }));
    }
    (stop, handles)
}

async fn all_jobs(store: &SharedStore) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .list_jobs(&JobFilter {
                limit: 1000,
                before,
                ..JobFilter::default()
            })
            .await
            .expect("list");
        let full = page.len() == 1000;
        before = page.last().map(|j| j.id);
        jobs.extend(page);
        if !full {
            return jobs;
        }
    }
}

/// Claim latency of jobs: from when each could run to when a worker claimed it.
fn claim_latency_ms(jobs: &[&Job]) -> Vec<f64> {
    let mut ms: Vec<f64> = jobs
        .iter()
        .filter_map(|j| {
            let ready = j.run_at.max(j.created_at);
            j.started_at
                .map(|s| (s - ready).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Posts `n` feedback requests over the LoRAs, round-robin over the APIs, from `CLIENTS`
/// concurrent clients; returns the statuses that were not 202.
async fn post_all(bases: &[String], n: usize) -> Vec<u16> {
    let next = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (next, bad, bases) = (next.clone(), bad.clone(), bases.to_vec());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let body = feedback(&format!("fleet/l{}", i % LORAS), &format!("round {i}"));
                let status = match http
                    .post(format!("{}/v1/feedback", bases[i % bases.len()]))
                    .header("prefer", "respond-async")
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                if status != 202 {
                    if let Ok(mut b) = bad.lock() {
                        b.push(status);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let b = bad.lock().map(|b| b.clone()).unwrap_or_default();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_workers_and_two_apis_fit_a_default_postgres() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(pg) = ThrowawayPg::start(&["max_connections=100", "fsync=off"]) else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the fleet test: no Postgres server installation found"
        );
        eprintln!("skipped: no Postgres server installation (initdb) found");
        return;
    };
    let complaints = complaints();
    let (apis, bases) = start_apis(&pg.url).await;
    // Each API opens its whole pool at start (database.max_connections, 16): the fleet
    // below cannot take those slots.
    let api_pools = Config::default().database.max_connections as i64 * 2;
    eventually(Duration::from_secs(10), "the APIs' pools to open", || {
        let url = pg.url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
            let open: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where application_name = 'claas'",
            )
            .fetch_one(&mut conn)
            .await
            .ok()?;
            (open >= api_pools).then_some(())
        }
    })
    .await;
    let store = queue::connect(&pg.url, 2).await.expect("store");
    for i in 0..LORAS {
        store
            .create_lora(&lora(&format!("fleet/l{i}")))
            .await
            .expect("lora");
    }
    // The test's own connections, opened before the fleet: one for counting, one watching.
    let counts = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url)
        .await
        .expect("pool");
    let seen = Arc::new(Watch::default());
    let (stop_watch, watch_rx) = watch::channel(false);
    let watcher = tokio::spawn(watch_server(pg.url.clone(), seen.clone(), watch_rx));
    let root = claas_testutil::tempdir("scale");
    let defaults = Config::default().database;
    let started = Instant::now();
    let (stop, workers) = start_workers(&pg.url, WORKERS, defaults.max_listeners, &root).await;

    let bad = post_all(&bases, JOBS).await;
    let posted_s = started.elapsed().as_secs_f64();
    assert!(bad.is_empty(), "requests not accepted: {bad:?}");
    loop {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select status, count(*) from jobs group by status order by 1")
                .fetch_all(&counts)
                .await
                .expect("counts");
        let (said, first) = complaints
            .0
            .lock()
            .map(|v| (v.len(), v.first().cloned()))
            .unwrap_or_default();
        eprintln!(
            "{:>6.1}s {rows:?} peak_connections={} {:?} complaints={said} {first:?}",
            started.elapsed().as_secs_f64(),
            seen.peak_connections.load(Ordering::SeqCst),
            seen.at_peak.lock().map(|v| v.clone()).unwrap_or_default(),
        );
        let finished: i64 = rows
            .iter()
            .filter(|(s, _)| matches!(s.as_str(), "succeeded" | "failed" | "cancelled"))
            .map(|(_, n)| n)
            .sum();
        if finished == i64::try_from(JOBS).unwrap_or(i64::MAX) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the fleet did not burn the queue down in 10 minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    counts.close().await;
    let jobs = all_jobs(&store).await;
    let burn_s = started.elapsed().as_secs_f64();
    // Exactly once: each batch published one version, and versions have no gaps.
    let mut per_lora: HashMap<&str, usize> = HashMap::new();
    for l in jobs.iter().filter(|j| j.trained_by.is_none()) {
        *per_lora.entry(l.lora_id.as_str()).or_default() += 1;
    }
    for (lora_id, batches) in per_lora {
        let versions = store.lora_versions(lora_id).await.expect("versions");
        assert_eq!(
            versions.len(),
            batches + 1,
            "one version per batch of {lora_id}"
        );
        assert!(
            versions.iter().zip(0..).all(|(v, n)| v.version == n),
            "contiguous versions of {lora_id}"
        );
    }

    // An idle fleet: one job at a time, each claimed before the next is sent.
    let http = reqwest::Client::new();
    let mut probes = Vec::new();
    for i in 0..40 {
        let r: serde_json::Value = http
            .post(format!("{}/v1/feedback", bases[i % 2]))
            .header("prefer", "respond-async")
            .json(&feedback(&format!("fleet/l{i}"), "probe"))
            .send()
            .await
            .expect("probe")
            .json()
            .await
            .expect("json");
        let id: uuid::Uuid = r["job_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("job id");
        let j = eventually(
            Duration::from_secs(30),
            "the probe to be claimed",
            || async {
                store
                    .get_job(id)
                    .await
                    .expect("get")
                    .filter(|j| j.started_at.is_some())
            },
        )
        .await;
        probes.push(j);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.send(true).expect("stop");
    for w in workers {
        let _ = w.await;
    }
    let _ = stop_watch.send(true);
    let _ = watcher.await;

    let leads: Vec<&Job> = jobs.iter().filter(|j| j.trained_by.is_none()).collect();
    let busy = claim_latency_ms(&leads);
    let idle = claim_latency_ms(&probes.iter().collect::<Vec<_>>());
    let peak = seen.peak_connections.load(Ordering::SeqCst);
    let slow = complaints
        .0
        .lock()
        .map(|v| v.iter().filter(|c| c.contains("slow_acquire")).count())
        .unwrap_or(0);
    println!(
        "fleet: workers={WORKERS} apis=2 loras={LORAS} jobs={JOBS} step_ms={} posted_in_s={posted_s:.1} \
         burned_down_in_s={burn_s:.1} trainings={} peak_server_connections={peak} (max_connections=100) \
         acquires_over_2s={slow} \
         claim_latency_ms busy p50={:.0} p99={:.0} idle p50={:.1} p99={:.1}",
        STEP.as_millis(),
        leads.len(),
        pct(&busy, 0.5),
        pct(&busy, 0.99),
        pct(&idle, 0.5),
        pct(&idle, 0.99),
    );

    let failed: Vec<_> = jobs
        .iter()
        .filter(|j| j.status != JobStatus::Succeeded)
        .map(|j| (j.id, j.status, j.error.clone()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} jobs did not succeed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let retried: Vec<_> = jobs.iter().filter(|j| j.attempt > 1).collect();
    if let Some(j) = retried.first() {
        let events = store.job_events(j.id).await.expect("events");
        panic!(
            "{} jobs needed a retry; the first: {events:?}",
            retried.len()
        );
    }
    let twice = seen
        .two_running
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(twice.is_empty(), "two running jobs for {twice:?}");
    // sqlx's note that a connection took over 2 s to acquire is a sign of a full server,
    // counted and printed above; anything else is a complaint.
    let said: Vec<String> = complaints
        .0
        .lock()
        .map(|v| {
            v.iter()
                .filter(|c| !c.contains("slow_acquire"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    assert!(
        said.is_empty(),
        "the workers complained {} times: {:?}",
        said.len(),
        &said[..said.len().min(10)]
    );
    for mut api in apis {
        assert!(api.is_running(), "{} is up", api.name);
        let log = api.log_text();
        assert!(
            !log.contains(" ERROR "),
            "{} logged errors:\n{log}",
            api.name
        );
    }
    assert!(
        peak <= 100,
        "the server never held more than max_connections: {peak}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_a_listener_claim_by_polling() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(pg) = ThrowawayPg::start(&["max_connections=100", "fsync=off"]) else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the fleet test: no Postgres server installation found"
        );
        eprintln!("skipped: no Postgres server installation (initdb) found");
        return;
    };
    let (_apis, bases) = start_apis(&pg.url).await;
    let store = queue::connect(&pg.url, 2).await.expect("store");
    store.create_lora(&lora("fleet/l0")).await.expect("lora");
    let root = claas_testutil::tempdir("poll");
    let (stop, workers) = start_workers(&pg.url, 2, 0, &root).await;
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/feedback", bases[0]))
        .header("prefer", "respond-async")
        .json(&feedback("fleet/l0", "shorter"))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let id: uuid::Uuid = r["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let done = eventually(Duration::from_secs(30), "the job to finish", || async {
        store
            .get_job(id)
            .await
            .expect("get")
            .filter(|j| j.status.is_terminal())
    })
    .await;
    assert_eq!(done.status, JobStatus::Succeeded, "{:?}", done.error);
    let listening: i64 =
        sqlx::query_scalar("select count(*) from pg_stat_activity where query ilike 'listen%'")
            .fetch_one(&sqlx::PgPool::connect(&pg.url).await.expect("pool"))
            .await
            .expect("count");
    assert_eq!(listening, 0, "no worker listens with max_listeners = 0");
    stop.send(true).expect("stop");
    for w in workers {
        let _ = w.await;
    }
}
