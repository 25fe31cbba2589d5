//! How the Postgres store uses its connections and notifications (Postgres only). The
//! worker path keeps its connections between statements without sqlx's ping; these tests
//! hold it to what the pool promised before: nobody waits behind a parked connection, and
//! a connection the server dropped is never handed out again. Enqueues wake workers with
//! a few notifications sent after their commits, not one inside each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claas_core::queue::{PgStore, SharedStore};
use claas_core::testing::{claim_request, create_schema, database_url, job, lora};
use sqlx::Connection;

/// A store on a schema of its own with a pool of `connections`; [`drop_schema`] removes it.
async fn store(connections: u32) -> (Arc<PgStore>, String) {
    let url = database_url();
    let schema = create_schema(&url).await;
    let store = PgStore::connect(&url, Some(&schema), connections)
        .await
        .expect("connect");
    claas_core::queue::Store::migrate(&store)
        .await
        .expect("migrate");
    (Arc::new(store), schema)
}

async fn drop_schema(schema: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await {
        let _ = sqlx::query(&format!("drop schema {schema} cascade"))
            .execute(&mut conn)
            .await;
    }
}

#[tokio::test]
async fn parked_worker_connections_do_not_starve_other_callers() {
    let (pg, schema) = store(2).await;
    let s: SharedStore = pg.clone();
    for l in ["a", "b"] {
        s.create_lora(&lora(l)).await.expect("lora");
        s.enqueue(&job(l, 1)).await.expect("enqueue");
    }
    // Two claims at once take both connections, and both stay with the worker path.
    let (w1, w2) = (claim_request("w1"), claim_request("w2"));
    let (a, b) = tokio::join!(s.claim(&w1), s.claim(&w2));
    assert!(a.expect("claim").is_some() && b.expect("claim").is_some());
    assert_eq!(pg.pool().size(), 2);
    assert_eq!(pg.pool().num_idle(), 0, "both connections are parked");

    // Any other caller gets one well within the pool's 3 s acquire timeout.
    let started = Instant::now();
    let counts = s.status_counts().await.expect("not starved");
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    // Left alone, parked connections go back to the pool.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pg.pool().num_idle(), 2);
    drop(s);
    drop(pg);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn other_callers_get_a_connection_while_the_worker_path_keeps_every_one_busy() {
    let (pg, schema) = store(2).await;
    let s: SharedStore = pg.clone();
    let stop = Arc::new(AtomicBool::new(false));
    // Two claimers polling an empty queue back to back hold both connections between them.
    let claimers: Vec<_> = (0..2)
        .map(|w| {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let req = claim_request(&format!("w{w}"));
                while !stop.load(Ordering::Relaxed) {
                    assert!(s.claim(&req).await.expect("claim").is_none());
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let counts = s.status_counts().await;
    let waited = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in claimers {
        c.await.expect("claimer");
    }
    assert!(counts.expect("not starved").is_empty());
    assert!(waited < Duration::from_millis(500), "waited {waited:?}");
    drop(s);
    drop(pg);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn a_connection_the_server_dropped_is_not_handed_out_again() {
    let (pg, schema) = store(1).await;
    let s: SharedStore = pg.clone();
    s.create_lora(&lora("a")).await.expect("lora");
    for _ in 0..2 {
        s.enqueue(&job("a", 1)).await.expect("enqueue");
    }
    let mut req = claim_request("w1");
    req.max_batch_samples = 1;
    let first = s.claim(&req).await.expect("claim").expect("a job");
    assert!(s
        .complete(&first.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));

    // The pool's only connection, once back in the pool, is killed by the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(pg.pool())
        .await
        .expect("pid");
    let mut admin = sqlx::PgConnection::connect(&database_url())
        .await
        .expect("admin connection");
    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .expect("terminate");
    assert!(killed);
    // Idle long enough to be checked before reuse: the worker's next claim just works.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = s.claim(&req).await.expect("claim on a fresh connection");
    assert!(second.is_some());
    let now: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(pg.pool())
        .await
        .expect("pid");
    assert_ne!(now, pid);
    drop(s);
    drop(pg);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn a_burst_of_enqueues_wakes_workers_with_few_notifications_the_last_after_it() {
    let (pg, schema) = store(8).await;
    let s: SharedStore = pg.clone();
    s.create_lora(&lora("a")).await.expect("lora");
    let mut listener = sqlx::postgres::PgListener::connect(&database_url())
        .await
        .expect("listener");
    listener.listen("claas_jobs").await.expect("listen");

    const JOBS: usize = 200;
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..JOBS / 8 {
                    s.enqueue(&job("a", 1)).await.expect("enqueue");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("enqueuer");
    }
    let burst = started.elapsed();
    let mut received = 0usize;
    let mut after_burst = false;
    while let Ok(n) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        n.expect("notification");
        received += 1;
        after_burst |= started.elapsed() > burst;
    }
    assert!(after_burst, "a notification followed the last enqueue");
    // One per 10 ms at most, where a trigger sent one per enqueue.
    let bound = (burst.as_millis() / 10) as usize + 2;
    assert!(
        received <= bound.min(JOBS / 2),
        "{received} notifications for {JOBS} enqueues in {burst:?}"
    );
    drop(s);
    drop(pg);
    drop_schema(&schema).await;
}

/// An API's pool opens all its connections when the process starts, before any request:
/// a fleet of workers starting together then cannot take the server's free slots while
/// requests wait for a connection (the 503s of the 200-worker test).
#[tokio::test]
async fn an_api_pool_opens_every_connection_at_start() {
    let url = database_url();
    let schema = create_schema(&url).await;
    let store = PgStore::connect_with(&url, Some(&schema), claas_core::queue::PoolSettings::api(4))
        .await
        .expect("connect");
    let started = Instant::now();
    while store.pool_size() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} of 4 connections open after 5 s",
            store.pool_size()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Tools and tests open theirs as they need them.
    let tool = PgStore::connect(&url, Some(&schema), 4)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tool.pool_size(), 0);
    drop((store, tool));
    drop_schema(&schema).await;
}
