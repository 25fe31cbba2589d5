//! LISTEN/NOTIFY wake-ups survive a lost listener connection: with polling slowed to 60 s,
//! a job enqueued while the listener's backend is being killed is still claimed at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claas_core::testing::{database_url, job, lora, TestDb, TEST_BASE_MODEL};
use claas_core::types::JobStatus;
use claas_worker::{SimulatedExecutor, Worker, WorkerOptions};
use sqlx::Connection;
use tokio::sync::watch;

/// Polling slowed to 60 s: only a notification (or the reconnect's re-check) wakes it.
fn options(id: &str) -> WorkerOptions {
    WorkerOptions {
        poll_interval: Duration::from_secs(60),
        lease: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
        ..WorkerOptions::new(id, vec![TEST_BASE_MODEL.into()])
    }
}

async fn claimed_within(db: &TestDb, id: uuid::Uuid, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        let j = db.store.get_job(id).await.expect("get").expect("job");
        if j.status != JobStatus::Queued {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_is_woken_at_once_even_after_its_listener_is_killed() {
    let db = TestDb::postgres().await;
    db.store.create_lora(&lora("a")).await.expect("lora");
    let (stop, rx) = watch::channel(false);
    let root = claas_testutil::tempdir("wakeups");
    let exec = SimulatedExecutor {
        step: Duration::ZERO,
        root: root.to_path_buf(),
    };
    let worker = Worker::new(db.store.clone(), Arc::new(exec), options("listener-test"));
    let handle = tokio::spawn(async move { worker.run(rx).await });

    // Warm up: an enqueue wakes the idle worker long before its 60 s poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = job("a", 1);
    db.store.enqueue(&first).await.expect("enqueue");
    let took = claimed_within(&db, first.id, Duration::from_secs(5)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "woken by NOTIFY: {took:?}"
    );

    // Kill the listener's backend, then enqueue while it reconnects.
    let app = format!(
        "claas-listener-{}",
        db.schema.as_deref().unwrap_or("public")
    );
    let mut admin = sqlx::PgConnection::connect(&database_url())
        .await
        .expect("admin");
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity where application_name = $1",
    )
    .bind(&app)
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    assert_eq!(killed, [true], "exactly one listener connection was killed");
    let second = job("a", 1);
    db.store.enqueue(&second).await.expect("enqueue");
    let took = claimed_within(&db, second.id, Duration::from_secs(5)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "claimed within 1 s: {took:?}"
    );

    // And the new listener delivers notifications again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = job("a", 1);
    db.store.enqueue(&third).await.expect("enqueue");
    let took = claimed_within(&db, third.id, Duration::from_secs(5)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "listening again: {took:?}"
    );

    let _ = stop.send(true);
    handle.await.expect("join").expect("worker ran");
    db.cleanup().await;
}
