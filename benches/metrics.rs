//! `/metrics` against a big queue: seeds a Postgres schema with N jobs (90% succeeded, 5%
//! failed, 5% queued or running; over 1,000 LoRAs and 30 days, as issue 7 sizes it), then
//! times `Store::metrics_snapshot` (what `/metrics` reads) cold and warm, and prints the
//! EXPLAIN of each of its queries.
//!
//! cargo bench --bench metrics [-- ROWS]   (default 1,000,000; 20,000 under cargo test)

use std::time::{Duration, Instant};

use claas_core::testing::TestDb;
use sqlx::Connection;

const QUERIES: [(&str, &str); 5] = [
    (
        "live jobs by status",
        "select status, count(*) from jobs where status in ('queued', 'running', 'coalesced') group by status",
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
                           coalesce_key, orchestration, timings_ms, created_at, finished_at)
         select gen_random_uuid(), 'bench/' || (1 + n % 1000), 'base',
                s, case when s = 'succeeded' then 'done' else s end, '{}'::jsonb, 1, 'k', '{}'::jsonb,
                case when s = 'succeeded' then '{\"drain\": 12, \"distill\": 9000, \"publish\": 40}'::jsonb
                     else '{}'::jsonb end,
                t, case when s in ('succeeded', 'failed') then t + interval '20 seconds' end
         from (select n,
                      now() - (random() * interval '30 days') as t,
                      case when n % 100 < 90 then 'succeeded'
                           when n % 100 < 95 then 'failed'
                           when n < 1000 and n % 100 = 95 then 'running'
                           else 'queued' end as s
               from generate_series(1, $1) n) g",
    )
    .bind(rows)
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
    conn.close().await?;
    db.cleanup().await;
    Ok(())
}
