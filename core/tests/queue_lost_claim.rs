//! Postgres commits a claim without waiting for its WAL flush, so a crash may undo a claim
//! its worker already saw. That is safe only because such a worker can write nothing: its
//! lease names an attempt the database never recorded. This test undoes a claim by hand
//! (what recovery would leave) and holds the claimer to that.

use std::time::Duration;

use claas_core::queue::{FailOutcome, LeaseState};
use claas_core::testing::{claimed, lead_and_member, version, TestDb, FAST_RETRY};
use claas_core::types::{JobError, JobStatus, Phase};
use sqlx::Connection;

const LEASE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_lost_in_a_crash_leaves_its_claimer_fenced_out() {
    let db = TestDb::postgres().await;
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
    let lost = claimed(s, "w1", LEASE).await;
    assert_eq!(lost.members.len(), 1);

    // What the database holds after a crash took the claim's commit with it.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql(&format!(
        "update jobs set status = 'queued', phase = 'queued', attempt = 0, worker_id = null,
             lease_expires_at = null, started_at = null, trained_by = null, batch_event = null
         where id in ('{}', '{}');
         delete from job_events where phase <> 'queued';",
        lead.id, member.id
    ))
    .execute(&mut conn)
    .await
    .expect("undo the claim");
    conn.close().await.ok();

    let stale = lost.lease();
    let v1 = version(1);
    let error = JobError {
        code: "io".into(),
        message: "late".into(),
        phase: Some(Phase::Distill),
    };
    let fenced_out = |label: &str| format!("{label}: a lost claim must not write");
    // Its first write after the claim (the worker enters `drain` at once) is refused.
    assert!(
        !s.enter_phase(&stale, Phase::Drain, None)
            .await
            .expect("phase"),
        "{}",
        fenced_out("enter_phase")
    );
    assert_eq!(
        s.heartbeat(&stale, LEASE).await.expect("heartbeat"),
        LeaseState::Lost
    );

    // The job is claimed again, at the same attempt number, by another worker.
    let again = claimed(s, "w2", LEASE).await;
    assert_eq!((again.job.id, again.job.attempt), (lead.id, 1));
    assert_eq!(again.members[0].0.id, member.id);

    // Every write of the first claimer is still refused, and changes nothing.
    assert!(!s
        .enter_phase(&stale, Phase::Drain, None)
        .await
        .expect("phase"));
    assert_eq!(s.begin_training(&stale, None).await.expect("begin"), None);
    assert!(!s.publish(&stale, &v1).await.expect("publish"));
    assert!(!s
        .complete(&stale, &serde_json::json!({}), None)
        .await
        .expect("complete"));
    assert!(matches!(
        s.fail(&stale, &error, true, FAST_RETRY)
            .await
            .expect("fail"),
        FailOutcome::LeaseLost
    ));
    let j = s.get_job(lead.id).await.expect("get").expect("job");
    assert_eq!(j.status, JobStatus::Running);
    assert_eq!(j.worker_id.as_deref(), Some("w2"));
    assert_eq!(j.published_version, None);
    let lora_now = s.get_lora("a").await.expect("get").expect("lora");
    assert_eq!(lora_now.current_version, 0);

    // The new claimer's run goes through.
    let lease = again.lease();
    assert_eq!(
        s.begin_training(&lease, None).await.expect("begin"),
        Some(vec![member.id])
    );
    assert!(s.publish(&lease, &v1).await.expect("publish"));
    assert!(s
        .complete(&lease, &serde_json::json!({"version": 1}), None)
        .await
        .expect("complete"));
    for id in [lead.id, member.id] {
        let j = s.get_job(id).await.expect("get").expect("job");
        assert_eq!(
            (j.status, j.published_version),
            (JobStatus::Succeeded, Some(1))
        );
    }
    db.cleanup().await;
}
