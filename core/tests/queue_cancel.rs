//! The conformance suite, continued (both stores): cancelling queued, running and joined
//! jobs, and a cancel that meets a requeue.

use std::time::Duration;

use claas_core::queue::{CancelOutcome, FailOutcome, LeaseState};
use claas_core::testing::{
    claim, claim_expiring, claim_request, job, lead_and_member, lora, TestDb, FAST_RETRY,
};
use claas_core::types::{JobError, JobStatus, Phase};
use claas_core::Error;

claas_core::both_stores!(
    cancel_queued_is_immediate_and_running_is_requested,
    cancel_of_joined_job_detaches_before_training_only,
    requeue_of_a_cancel_requested_job_cancels_it,
);

async fn cancel_queued_is_immediate_and_running_is_requested(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    let queued = job("a", 1);
    s.enqueue(&queued).await.expect("enqueue");
    match s.cancel(queued.id).await.expect("cancel") {
        CancelOutcome::Cancelled(j) => assert_eq!(j.status, JobStatus::Cancelled),
        other => panic!("expected cancelled, got {other:?}"),
    }
    assert!(s.claim(&claim_request("w")).await.expect("claim").is_none());

    let running = job("b", 1);
    s.enqueue(&running).await.expect("enqueue");
    let c = claim(s, "w").await;
    assert!(matches!(
        s.cancel(running.id).await.expect("cancel"),
        CancelOutcome::Requested(_)
    ));
    assert_eq!(
        s.heartbeat(&c.lease(), Duration::from_secs(60))
            .await
            .expect("hb"),
        LeaseState::Held {
            cancel_requested: true
        }
    );
    assert!(s
        .finish_cancelled(&c.lease(), "cancelled by request")
        .await
        .expect("finish"));
    let j = s.get_job(running.id).await.expect("get").expect("exists");
    assert_eq!(j.status, JobStatus::Cancelled);

    let err = s.cancel(running.id).await.expect_err("already finished");
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let err = s.cancel(uuid::Uuid::now_v7()).await.expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

async fn cancel_of_joined_job_detaches_before_training_only(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 1);
    let early = job("a", 1);
    let late = job("a", 1);
    for j in [&lead, &early, &late] {
        s.enqueue(j).await.expect("enqueue");
    }
    let c = claim(s, "w").await;
    assert_eq!(c.members.len(), 2);
    assert!(matches!(
        s.cancel(early.id).await.expect("cancel"),
        CancelOutcome::Cancelled(_)
    ));
    let attached = s
        .begin_training(&c.lease(), None)
        .await
        .expect("begin")
        .expect("held");
    assert_eq!(attached, [late.id], "the cancelled member is not trained");
    let err = s.cancel(late.id).await.expect_err("too late");
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("being trained")),
        "{err}"
    );
    assert!(s
        .complete(&c.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    let e = s.get_job(early.id).await.expect("get").expect("exists");
    assert_eq!(e.status, JobStatus::Cancelled);
    assert_eq!(e.trained_by, None);
}

async fn requeue_of_a_cancel_requested_job_cancels_it(db: &TestDb) {
    let s = &db.store;
    // A retryable failure after a cancel request ends the job instead of retrying it; the
    // members it carried go back to the queue (nobody cancelled them).
    let (lead, member) = lead_and_member(s, "a").await;
    let c = claim(s, "w").await;
    assert_eq!(c.members.len(), 1);
    assert!(matches!(
        s.cancel(lead.id).await.expect("cancel"),
        CancelOutcome::Requested(_)
    ));
    let err = JobError {
        code: "vllm_unavailable".into(),
        message: "connection refused".into(),
        phase: Some(Phase::Drain),
    };
    assert_eq!(
        s.fail(&c.lease(), &err, true, FAST_RETRY)
            .await
            .expect("fail"),
        FailOutcome::Cancelled
    );
    let l = s.get_job(lead.id).await.expect("get").expect("exists");
    assert_eq!(l.status, JobStatus::Cancelled);
    assert!(l.finished_at.is_some());
    assert_eq!(l.error.as_ref().map(|e| e.code.as_str()), Some("cancelled"));
    let m = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(m.status, JobStatus::Queued);
    assert_eq!(m.trained_by, None);

    // The same when the worker dies (reaper) or hands the job back (release).
    s.create_lora(&lora("b")).await.expect("lora");
    let dead = job("b", 1);
    s.enqueue(&dead).await.expect("enqueue");
    s.cancel(member.id)
        .await
        .expect("cancel the queued member too");
    let c = claim_expiring(s, "w").await;
    assert_eq!(c.job.id, dead.id);
    s.cancel(dead.id).await.expect("cancel");
    let r = s.reap_expired(FAST_RETRY).await.expect("reap");
    assert_eq!((r.requeued, r.failed, r.settled), (0, 0, 1));
    let d = s.get_job(dead.id).await.expect("get").expect("exists");
    assert_eq!(d.status, JobStatus::Cancelled);

    s.create_lora(&lora("c")).await.expect("lora");
    let handed = job("c", 1);
    s.enqueue(&handed).await.expect("enqueue");
    let c = claim(s, "w").await;
    s.cancel(handed.id).await.expect("cancel");
    assert!(s.release(&c.lease()).await.expect("release"));
    let h = s.get_job(handed.id).await.expect("get").expect("exists");
    assert_eq!(h.status, JobStatus::Cancelled);
    assert!(s.claim(&claim_request("w")).await.expect("claim").is_none());
}
