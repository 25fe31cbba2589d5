//! `/metrics` and the dashboard against a big queue: seeds a Postgres schema with N jobs
//! (90% succeeded, 5% failed, 5% queued or running; over 1,000 LoRAs, 16 workers and 30
//! days, as issue 7 sizes it), prints the EXPLAIN of each query they run (failing on a
//! sequential scan of `jobs`), times `Store::metrics_snapshot` (what `/metrics` reads) cold
//! and warm, then serves the API and times every dashboard page and filter over HTTP: the
//! first request on a fresh connection pool ("cold") and the p95 of the next ones ("warm").
//!
//! cargo bench --bench metrics [-- ROWS]   (default 1,000,000; 20,000 under cargo test)

use std::time::{Duration, Instant};

use claas_core::testing::TestDb;
use sqlx::Connection;

const QUERIES: [(&str, &str); 12] = [
    (
        "live jobs by status",
        "select 'queued' as status, count(*) as n from jobs where status = 'queued'
           union all select 'running', count(*) from jobs where status = 'running'
           union all select 'coalesced', count(*) from jobs where status = 'coalesced'",
    ),
    (
        "oldest queued",
        "select min(created_at) from jobs where status = 'queued'",
    ),
    (
        "finished in the last hour",
        "select status, count(*) from jobs where finished_at > now() - interval '1 hour' group by status",
    ),
    (
        "phase timings, last hour",
        "select timings_ms from jobs where finished_at > now() - interval '1 hour' and status = 'succeeded' limit 10000",
    ),
    (
        "last loss per LoRA",
        "select l.lora_id, (v.metrics->>'total_loss')::float8 from loras l join lora_versions v on v.lora_id = l.lora_id and v.version = l.current_version where l.deleted_at is null and v.metrics ? 'total_loss' order by l.updated_at desc limit 1000",
    ),
    ("dashboard: jobs, newest first", "select * from jobs where true order by id desc limit 50"),
    (
        "dashboard: jobs by status (failed)",
        "select * from jobs where true and status = 'failed' order by id desc limit 50",
    ),
    (
        "dashboard: jobs by status (queued)",
        "select * from jobs where true and status = 'queued' order by id desc limit 50",
    ),
    (
        "dashboard: jobs of a LoRA and status",
        "select * from jobs where true and lora_id = 'bench/7' and status = 'failed' order by id desc limit 50",
    ),
    (
        "dashboard: jobs by worker",
        "select * from jobs where true and worker_id = 'worker-3' order by id desc limit 50",
    ),
    (
        "dashboard: jobs created in a time range (UUIDv7 id bounds)",
        "select * from jobs where true
           and id < (lpad(to_hex((extract(epoch from now() - interval '14 days') * 1000)::bigint), 12, '0') || '70008000000000000000')::uuid
           and id >= (lpad(to_hex((extract(epoch from now() - interval '15 days') * 1000)::bigint), 12, '0') || '70008000000000000000')::uuid
           order by id desc limit 50",
    ),
    (
        "dashboard: one job's timeline",
        "with j as (select id, trained_by, batch_event, finished_at from jobs order by id desc limit 1)
         select at, phase, message from (
           select e.id, e.at, e.phase, e.message from job_events e, j where e.job_id = j.id
           union all
           select e.id, e.at, e.phase, e.message from j join job_events e
             on e.job_id = j.trained_by and e.id >= j.batch_event
             where j.finished_at is null or e.at <= j.finished_at
         ) t order by id",
    ),
];

fn p(sorted: &[f64], q: f64) -> f64 {
    sorted[(((sorted.len() - 1) as f64) * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let rows: i64 =
        args.iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(if full { 1_000_000 } else { 20_000 });
    let db = TestDb::postgres().await;
    let schema = db.schema.clone().unwrap_or_default();
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    sqlx::query(&format!("set search_path to {schema}"))
        .execute(&mut conn)
        .await?;
    let seeded = Instant::now();
    sqlx::query(
        "insert into loras (lora_id, base_model, rank, alpha, target_modules, current_version, updated_at)
         select 'bench/' || i, 'base', 8, 16, '[]'::jsonb, 1, now() - (i || ' minutes')::interval
         from generate_series(1, 1000) i",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query(
        "insert into lora_versions (lora_id, version, storage_uri, sha256, metrics)
         select 'bench/' || i, v, 'file:///x', '', jsonb_build_object('total_loss', random())
         from generate_series(1, 1000) i, generate_series(0, 1) v",
    )
    .execute(&mut conn)
    .await?;
    // One running job per LoRA at most (the partial unique index): the running share goes
    // to distinct LoRAs, the rest of the live share is queued.
    sqlx::query(
        "insert into jobs (id, lora_id, base_model, status, phase, payload, sample_count,
                           coalesce_key, orchestration, timings_ms, created_at, finished_at,
                           worker_id)
         select (lpad(to_hex((extract(epoch from t) * 1000)::bigint), 12, '0') || '7'
                 || substr(md5(n::text), 1, 3) || '8' || substr(md5(n::text), 4, 15))::uuid,
                'bench/' || (1 + n % 1000), 'base',
                s, case s when 'succeeded' then 'done' when 'queued' then 'queued' else 'distill' end, $2, 1, 'k', '{}'::jsonb,
                case when s = 'succeeded' then '{\"drain\": 12, \"distill\": 9000, \"publish\": 40}'::jsonb
                     else '{}'::jsonb end,
                t, case when s in ('succeeded', 'failed') then t + interval '20 seconds' end,
                case when s <> 'queued' then 'worker-' || (n % 16) end
         from (select n,
                      now() - (random() * interval '30 days') as t,
                      case when n % 100 < 90 then 'succeeded'
                           when n % 100 < 95 then 'failed'
                           when n < 1000 and n % 100 = 95 then 'running'
                           else 'queued' end as s
               from generate_series(1, $1) n) g",
    )
    .bind(rows)
    .bind(serde_json::to_value(
        &claas_core::testing::job("bench/1", 1).payload,
    )?)
    .execute(&mut conn)
    .await?;
    // Steady state: autovacuum has set the visibility map, so counts over the live-jobs
    // index need not visit the table.
    sqlx::query("vacuum analyze jobs")
        .execute(&mut conn)
        .await?;
    sqlx::query("analyze").execute(&mut conn).await?;
    println!(
        "seeded {rows} jobs over 1,000 LoRAs in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    for (name, q) in QUERIES {
        let plan: Vec<String> = sqlx::query_scalar(&format!("explain analyze {q}"))
            .fetch_all(&mut conn)
            .await?;
        println!("-- {name}\n{}", plan.join("\n"));
        anyhow::ensure!(
            !plan.iter().any(|l| l.contains("Seq Scan on jobs")),
            "{name} scans jobs sequentially"
        );
    }
    let cold = Instant::now();
    db.store.metrics_snapshot(Duration::from_secs(3600)).await?;
    let cold = cold.elapsed().as_secs_f64() * 1000.0;
    let mut warm = Vec::new();
    for _ in 0..if full { 50 } else { 5 } {
        let t = Instant::now();
        let snap = db.store.metrics_snapshot(Duration::from_secs(3600)).await?;
        warm.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(!snap.live.is_empty(), "no live jobs counted");
    }
    warm.sort_by(f64::total_cmp);
    println!(
        "metrics_snapshot over {rows} jobs: cold {cold:.1} ms, warm p50 {:.1} ms, p95 {:.1} ms",
        p(&warm, 0.5),
        p(&warm, 0.95)
    );
    dashboard_pages(&db, &schema, if full { 50 } else { 5 }).await?;
    conn.close().await?;
    db.cleanup().await;
    Ok(())
}

/// Times each dashboard page (and `/metrics`) over HTTP: the first request on a fresh
/// connection pool, then the p50 and p95 of `n` more.
async fn dashboard_pages(db: &TestDb, schema: &str, n: usize) -> anyhow::Result<()> {
    let day = |d: i64| (chrono::Utc::now() - chrono::Duration::days(d)).format("%Y-%m-%dT%H:%M");
    let job_id: String = {
        let jobs = db
            .store
            .list_jobs(&claas_core::queue::JobFilter {
                status: Some(claas_core::types::JobStatus::Failed),
                limit: 1,
                ..Default::default()
            })
            .await?;
        jobs.first().map(|j| j.id.to_string()).unwrap_or_default()
    };
    let pages = [
        ("overview".to_string(), "/v1/dashboard".to_string()),
        ("jobs".into(), "/v1/dashboard/jobs".into()),
        (
            "jobs ?status=failed".into(),
            "/v1/dashboard/jobs?status=failed".into(),
        ),
        (
            "jobs ?status=queued".into(),
            "/v1/dashboard/jobs?status=queued".into(),
        ),
        (
            "jobs ?lora_id".into(),
            "/v1/dashboard/jobs?lora_id=bench/7".into(),
        ),
        (
            "jobs ?lora_id&status".into(),
            "/v1/dashboard/jobs?lora_id=bench/7&status=failed".into(),
        ),
        (
            "jobs ?worker".into(),
            "/v1/dashboard/jobs?worker=worker-3".into(),
        ),
        (
            "jobs ?since&until".into(),
            format!("/v1/dashboard/jobs?since={}&until={}", day(15), day(14)),
        ),
        ("job page".into(), format!("/v1/dashboard/jobs/{job_id}")),
        ("loras".into(), "/v1/dashboard/loras".into()),
        ("lora page".into(), "/v1/dashboard/loras/bench/7".into()),
        ("/metrics".into(), "/metrics".into()),
    ];
    let http = reqwest::Client::new();
    let dir = claas_testutil::tempdir("bench-metrics");
    for (name, path) in pages {
        let store = claas_core::queue::PgStore::connect(&db.url, Some(schema), 4).await?;
        let options = claas_api::ApiOptions {
            max_body_bytes: 1 << 20,
            feedback_default_wait_s: 0,
            feedback_max_wait_s: 5,
            max_attempts: 3,
            default_base_model: "base".into(),
            allowed_init_base_models: vec!["base".into()],
            lora_root: dir.join("loras").display().to_string(),
            data_dir: dir.join("data"),
            max_lora_rank: None,
        };
        let state = claas_api::AppState::new(std::sync::Arc::new(store), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(claas_api::serve(listener, state, async {
            let _ = stopped.await;
        }));
        let get = |url: String| {
            let http = http.clone();
            async move {
                let t = Instant::now();
                let r = http.get(&url).send().await?;
                let status = r.status();
                let body = r.text().await?;
                anyhow::ensure!(status.is_success(), "{url}: {status}: {body}");
                Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1000.0)
            }
        };
        let cold = get(format!("{base}{path}")).await?;
        let mut warm = Vec::new();
        for _ in 0..n {
            warm.push(get(format!("{base}{path}")).await?);
        }
        warm.sort_by(f64::total_cmp);
        println!(
            "page {name:<22} cold {cold:6.1} ms   warm p50 {:6.1} ms   p95 {:6.1} ms",
            p(&warm, 0.5),
            p(&warm, 0.95)
        );
        let _ = stop.send(());
    }
    Ok(())
}
