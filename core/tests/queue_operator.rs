//! What operators do to the queue from the dashboard (retry, delete, audit, listing by
//! worker and time), on both stores.

use std::time::Duration;

use chrono::Utc;
use claas_core::queue::{AuditEntry, FailOutcome, JobFilter, RetryPolicy};
use claas_core::testing::{claim_request, fatal, job, lora, TestDb};
use claas_core::types::JobStatus;
use claas_core::Error;

claas_core::both_stores!(
    a_failed_job_is_retried_with_fresh_attempts_and_trains_again,
    only_failed_jobs_of_live_loras_can_be_retried,
    only_finished_jobs_can_be_deleted_and_their_timeline_goes_with_them,
    jobs_are_listed_by_worker_and_creation_time,
    audit_entries_are_kept_newest_first,
    a_jobs_samples_are_readable,
    adapter_requests_are_taken_once_per_vllm_and_wake_workers,
);

/// Enqueues a job for `lora_id` and fails it for good on `worker`.
async fn failed_job(db: &TestDb, lora_id: &str, worker: &str) -> uuid::Uuid {
    let s = &db.store;
    let j = job(lora_id, 1);
    s.enqueue(&j).await.expect("enqueue");
    let c = s
        .claim(&claim_request(worker))
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(c.job.id, j.id);
    let outcome = s
        .fail(
            &c.lease(),
            &fatal("token id outside the vocabulary"),
            false,
            RetryPolicy::default(),
        )
        .await
        .expect("fail");
    assert_eq!(outcome, FailOutcome::Failed);
    j.id
}

async fn a_failed_job_is_retried_with_fresh_attempts_and_trains_again(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let id = failed_job(db, "a", "w1").await;

    let job = s
        .retry_job(id, "retried from the dashboard by key_1")
        .await
        .expect("retry");
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 0);
    assert!(job.error.is_none() && job.finished_at.is_none());
    let events = s.job_events(id).await.expect("events");
    assert_eq!(
        events.last().map(|e| e.message.as_str()),
        Some("retried from the dashboard by key_1")
    );
    // The failure stays in the timeline.
    assert!(events
        .iter()
        .any(|e| e.message.contains("outside the vocabulary")));

    let again = s
        .claim(&claim_request("w2"))
        .await
        .expect("claim")
        .expect("the retried job");
    assert_eq!((again.job.id, again.job.attempt), (id, 1));
}

async fn only_failed_jobs_of_live_loras_can_be_retried(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("gone")).await.expect("lora");
    let failed = failed_job(db, "gone", "w").await;
    let queued = job("a", 1);
    s.enqueue(&queued).await.expect("enqueue");
    match s.retry_job(queued.id, "retry").await {
        Err(Error::Conflict(m)) => assert!(m.contains("only a failed job"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match s.retry_job(uuid::Uuid::now_v7(), "retry").await {
        Err(Error::NotFound(_)) => {}
        other => panic!("expected not found, got {other:?}"),
    }

    s.delete_lora("gone")
        .await
        .expect("delete")
        .expect("was live");
    match s.retry_job(failed, "retry").await {
        Err(Error::Conflict(m)) => assert!(m.contains("was deleted"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let j = s.get_job(failed).await.expect("get").expect("exists");
    assert_eq!(
        j.status,
        JobStatus::Failed,
        "a refused retry changes nothing"
    );
}

async fn only_finished_jobs_can_be_deleted_and_their_timeline_goes_with_them(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    let failed = failed_job(db, "a", "w").await;
    let queued = job("b", 1);
    s.enqueue(&queued).await.expect("enqueue");

    match s.delete_job(queued.id).await {
        Err(Error::Conflict(m)) => assert!(m.contains("has not finished (queued)"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let deleted = s.delete_job(failed).await.expect("delete");
    assert_eq!(deleted.status, JobStatus::Failed);
    assert!(s.get_job(failed).await.expect("get").is_none());
    assert!(s.job_events(failed).await.expect("events").is_empty());
    match s.delete_job(failed).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("expected not found, got {other:?}"),
    }
    // An event for a job that is gone is dropped, not an error.
    s.add_job_event(failed, "done", "late")
        .await
        .expect("event");
    assert!(s.job_events(failed).await.expect("events").is_empty());
}

async fn jobs_are_listed_by_worker_and_creation_time(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    let by_w1 = failed_job(db, "a", "w1").await;
    let by_w2 = failed_job(db, "b", "w2").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cut = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let later = job("a", 1);
    s.enqueue(&later).await.expect("enqueue");

    let ids =
        |jobs: Vec<claas_core::types::Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let w1 = s
        .list_jobs(&JobFilter {
            worker_id: Some("w1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(w1), [by_w1]);
    let floor = uuid::Builder::from_unix_timestamp_millis(
        u64::try_from(cut.timestamp_millis()).expect("after 1970"),
        &[0; 10],
    )
    .into_uuid();
    let since = s
        .list_jobs(&JobFilter {
            after: Some(floor),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(since), [later.id]);
    let until = s
        .list_jobs(&JobFilter {
            before: Some(floor),
            status: Some(JobStatus::Failed),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(until), [by_w2, by_w1]);
}

async fn audit_entries_are_kept_newest_first(db: &TestDb) {
    let s = &db.store;
    let gone = uuid::Uuid::now_v7();
    for (action, job_id) in [
        ("cancel", Some(gone)),
        ("delete", Some(gone)),
        ("retry", None),
    ] {
        s.record_audit(&AuditEntry {
            at: Utc::now(),
            actor: "key_admin".into(),
            action: action.into(),
            job_id,
            detail: format!("{action} from the dashboard"),
        })
        .await
        .expect("audit");
    }
    let log = s.recent_audit(2).await.expect("audit");
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["retry", "delete"]
    );
    assert_eq!(log[1].job_id, Some(gone));
    assert_eq!(log[1].actor, "key_admin");
}

async fn a_jobs_samples_are_readable(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let j = job("a", 2);
    s.enqueue(&j).await.expect("enqueue");
    let payload = s.job_payload(j.id).await.expect("payload").expect("exists");
    assert_eq!(payload.samples.len(), 2);
    assert_eq!(payload.samples[1].feedback, "feedback 1");
    assert!(s
        .job_payload(uuid::Uuid::now_v7())
        .await
        .expect("payload")
        .is_none());
}

async fn adapter_requests_are_taken_once_per_vllm_and_wake_workers(db: &TestDb) {
    let s = &db.store;
    let mut wake = s.wakeups().await.expect("wakeups");
    // Absorb the wake-up the listener gives when it (re)connects.
    wake.wait(Duration::from_millis(500)).await;
    let (one, two) = ("http://node-1:8000", "http://node-2:8000");
    s.request_adapter(one, "a").await.expect("request");
    assert!(
        wake.wait(Duration::from_secs(5)).await,
        "a request wakes idle workers"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.request_adapter(one, "b").await.expect("request");
    s.request_adapter(one, "a")
        .await
        .expect("asked twice, kept once");
    s.request_adapter(two, "a").await.expect("request");

    assert_eq!(
        s.take_adapter_requests(one).await.expect("take"),
        ["a", "b"]
    );
    assert!(s.take_adapter_requests(one).await.expect("take").is_empty());
    assert_eq!(s.take_adapter_requests(two).await.expect("take"), ["a"]);
}

/// Postgres only (SQLite keeps the foreign key's cascade and has one writer at a time): an
/// event committed while a delete waited for its job's row still goes with the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_written_while_its_job_is_deleted_goes_with_it() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let s = db.store.clone();
    s.create_lora(&lora("a")).await.expect("lora");
    let id = failed_job(&db, "a", "w").await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let mut late = conn.begin().await.expect("begin");
    // What `add_job_event` writes, held open: it locks the job's row.
    sqlx::query(
        "insert into job_events (job_id, phase, message)
         select id, 'failed', 'late' from jobs where id = $1 for key share",
    )
    .bind(id)
    .execute(&mut *late)
    .await
    .expect("event");
    let delete = tokio::spawn(async move { s.delete_job(id).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!delete.is_finished(), "the delete waits for the row lock");
    late.commit().await.expect("commit");
    delete.await.expect("join").expect("delete");
    let left: i64 = sqlx::query_scalar("select count(*) from job_events where job_id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(left, 0, "no event outlives its job");
    drop(conn);
    db.cleanup().await;
}
