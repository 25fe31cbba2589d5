//! One conformance suite for both queue stores: every test below runs against Postgres
//! (its own schema) and SQLite (its own file). The rules are DESIGN.md "The queue".

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claas_core::queue::{
    CancelOutcome, Claimed, FailOutcome, JobFilter, LeaseState, RetryPolicy, SharedStore,
};
use claas_core::testing::{
    claim_request, claimed, job, lora, version, TestDb, FAST_RETRY, TEST_BASE_MODEL,
};
use claas_core::types::{JobError, JobStatus, Phase};
use claas_core::Error;

fn fatal(msg: &str) -> JobError {
    JobError {
        code: "invalid_input".into(),
        message: msg.into(),
        phase: Some(Phase::Distill),
    }
}

async fn claim(store: &SharedStore, worker: &str) -> Claimed {
    claimed(store, worker, Duration::from_secs(60)).await
}

/// Claims with a lease that has already run out by the time the call returns.
async fn claim_expiring(store: &SharedStore, worker: &str) -> Claimed {
    let c = claimed(store, worker, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    c
}

claas_core::both_stores!(
    enqueued_job_is_claimed_with_its_payload,
    enqueue_for_unknown_lora_is_not_found,
    claims_by_priority_then_age,
    one_running_job_per_lora,
    worker_claims_only_its_base_models,
    coalescing_joins_same_config_jobs_up_to_max_samples,
    completion_settles_the_whole_batch,
    stale_worker_cannot_write_after_reclaim,
    expired_lease_requeues_then_fails_after_max_attempts,
    members_return_to_queue_when_lead_lease_is_lost,
    retry_after_publish_resumes_without_training_again,
    publish_requires_the_previous_version,
    fatal_failure_fails_at_once_and_retryable_backs_off,
    cancel_queued_is_immediate_and_running_is_requested,
    cancel_of_joined_job_detaches_before_training_only,
    idempotency_key_returns_same_job_or_conflicts,
    release_hands_back_without_spending_an_attempt,
    retention_prunes_old_finished_jobs_only,
    listing_filters_and_paginates_newest_first,
    enqueue_wakes_a_waiting_claimer,
    concurrent_claimers_never_run_one_lora_twice,
    published_job_never_trains_again_nor_joins_a_batch,
    requeue_of_a_cancel_requested_job_cancels_it,
    failure_after_publish_ends_failed_keeping_the_version,
    a_deleted_lora_takes_no_work_and_its_id_starts_afresh_once_its_job_stopped,
    overwrite_starts_afresh_as_a_new_version_and_a_job_trained_before_cannot_publish,
    retention_keeps_the_newest_versions_version_0_pinned_ones_and_shared_files,
);

async fn enqueued_job_is_claimed_with_its_payload(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let new = job("a", 2);
    let enq = s.enqueue(&new).await.expect("enqueue");
    assert!(enq.created);
    assert_eq!(enq.job.status, JobStatus::Queued);
    assert_eq!(enq.job.base_model, TEST_BASE_MODEL);
    let c = claim(s, "w1").await;
    assert_eq!(c.job.id, new.id);
    assert_eq!(c.job.status, JobStatus::Running);
    assert_eq!(c.job.attempt, 1);
    assert_eq!(c.job.worker_id.as_deref(), Some("w1"));
    assert!(c.job.lease_expires_at.is_some());
    assert_eq!(c.payload, new.payload);
    assert!(s
        .claim(&claim_request("w2"))
        .await
        .expect("claim")
        .is_none());
    let events = s.job_events(new.id).await.expect("events");
    let phases: Vec<_> = events.iter().map(|e| e.phase.as_str()).collect();
    assert_eq!(phases, ["queued", "claimed"]);
}

async fn enqueue_for_unknown_lora_is_not_found(db: &TestDb) {
    let err = db
        .store
        .enqueue(&job("missing", 1))
        .await
        .expect_err("no lora");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

async fn claims_by_priority_then_age(db: &TestDb) {
    let s = &db.store;
    for id in ["a", "b", "c"] {
        s.create_lora(&lora(id)).await.expect("lora");
    }
    let old = job("a", 1);
    s.enqueue(&old).await.expect("enqueue");
    let young = job("b", 1);
    s.enqueue(&young).await.expect("enqueue");
    let mut urgent = job("c", 1);
    urgent.priority = 5;
    s.enqueue(&urgent).await.expect("enqueue");
    let order: Vec<_> = [
        claim(s, "w").await,
        claim(s, "w").await,
        claim(s, "w").await,
    ]
    .iter()
    .map(|c| c.job.id)
    .collect();
    assert_eq!(order, [urgent.id, old.id, young.id]);
}

async fn one_running_job_per_lora(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    let mut req = claim_request("w1");
    req.max_batch_samples = 1; // no coalescing: each job is its own batch
    let a1 = job("a", 1);
    let a2 = job("a", 1);
    let b1 = job("b", 1);
    for j in [&a1, &a2, &b1] {
        s.enqueue(j).await.expect("enqueue");
    }
    let first = s.claim(&req).await.expect("claim").expect("job");
    assert_eq!(first.job.id, a1.id);
    // a2 is older than b1 but its LoRA is busy: the claim skips to b1, never blocks.
    let second = s.claim(&req).await.expect("claim").expect("job");
    assert_eq!(second.job.id, b1.id);
    assert!(s.claim(&req).await.expect("claim").is_none());
    assert!(s
        .complete(&first.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    let third = s
        .claim(&req)
        .await
        .expect("claim")
        .expect("a2 after a1 finished");
    assert_eq!(third.job.id, a2.id);
}

async fn worker_claims_only_its_base_models(db: &TestDb) {
    let s = &db.store;
    let mut other = lora("other");
    other.base_model = "other/base".into();
    s.create_lora(&other).await.expect("lora");
    s.enqueue(&job("other", 1)).await.expect("enqueue");
    assert!(s.claim(&claim_request("w")).await.expect("claim").is_none());
    let mut req = claim_request("w");
    req.base_models = vec!["other/base".into()];
    assert!(s.claim(&req).await.expect("claim").is_some());
}

async fn coalescing_joins_same_config_jobs_up_to_max_samples(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 2);
    let j2 = job("a", 3);
    let mut other_config = job("a", 1);
    other_config.payload.training.learning_rate = 1e-4;
    let mut other_caller = job("a", 1);
    other_caller.caller = "key-2".into();
    let j3 = job("a", 2);
    let j4 = job("a", 2); // would exceed 8 samples: 2 + 3 + 2 + 2 = 9
    for j in [&lead, &j2, &other_config, &other_caller, &j3, &j4] {
        s.enqueue(j).await.expect("enqueue");
    }
    let c = claim(s, "w").await;
    assert_eq!(c.job.id, lead.id);
    let member_ids: Vec<_> = c.members.iter().map(|(m, _)| m.id).collect();
    assert_eq!(member_ids, [j2.id, j3.id]);
    assert_eq!(c.samples().count(), 7);
    for (m, _) in &c.members {
        assert_eq!(m.status, JobStatus::Coalesced);
        assert_eq!(m.trained_by, Some(lead.id));
    }
    for id in [other_config.id, other_caller.id, j4.id] {
        let j = s.get_job(id).await.expect("get").expect("exists");
        assert_eq!(j.status, JobStatus::Queued, "{id} must not join");
    }
}

async fn completion_settles_the_whole_batch(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 1);
    let member = job("a", 1);
    s.enqueue(&lead).await.expect("enqueue");
    s.enqueue(&member).await.expect("enqueue");
    let c = claim(s, "w").await;
    assert_eq!(c.members.len(), 1);
    let lease = c.lease();
    assert!(s
        .enter_phase(&lease, Phase::Drain, None)
        .await
        .expect("phase"));
    let attached = s
        .begin_training(&lease, Some((Phase::Drain, 7)))
        .await
        .expect("begin")
        .expect("lease held");
    assert_eq!(attached, [member.id]);
    assert!(s.publish(&lease, &version(1)).await.expect("publish"));
    let result = serde_json::json!({"version": 1});
    assert!(s
        .complete(&lease, &result, Some((Phase::Wake, 3)))
        .await
        .expect("complete"));
    for id in [lead.id, member.id] {
        let j = s.get_job(id).await.expect("get").expect("exists");
        assert_eq!(j.status, JobStatus::Succeeded);
        assert_eq!(j.phase, Phase::Done);
        assert_eq!(j.result.as_ref(), Some(&result));
        assert_eq!(j.published_version, Some(1));
        assert!(j.finished_at.is_some());
    }
    let j = s.get_job(lead.id).await.expect("get").expect("exists");
    assert_eq!(j.timings_ms.get("drain"), Some(&7));
    assert_eq!(j.timings_ms.get("wake"), Some(&3));
    let lora = s.get_lora("a").await.expect("get").expect("exists");
    assert_eq!(lora.current_version, 1);
    let versions = s.lora_versions("a").await.expect("versions");
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1].job_id, Some(lead.id));
}

async fn stale_worker_cannot_write_after_reclaim(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.enqueue(&job("a", 1)).await.expect("enqueue");
    let stale = claim_expiring(s, "old").await.lease();
    // Expired but not yet reaped: the stale worker is already fenced out.
    assert_eq!(
        s.heartbeat(&stale, Duration::from_secs(60))
            .await
            .expect("hb"),
        LeaseState::Lost
    );
    let reaped = s.reap_expired(FAST_RETRY).await.expect("reap");
    assert_eq!(reaped.requeued, 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let fresh = claim(s, "new").await;
    assert_eq!(fresh.job.attempt, 2);
    // Every write of the stale worker changes nothing.
    assert_eq!(
        s.heartbeat(&stale, Duration::from_secs(60))
            .await
            .expect("hb"),
        LeaseState::Lost
    );
    assert!(!s
        .enter_phase(&stale, Phase::Sleep, None)
        .await
        .expect("phase"));
    assert!(s
        .begin_training(&stale, None)
        .await
        .expect("begin")
        .is_none());
    assert!(!s.publish(&stale, &version(1)).await.expect("publish"));
    assert!(!s
        .complete(&stale, &serde_json::json!({}), None)
        .await
        .expect("complete"));
    assert_eq!(
        s.fail(&stale, &fatal("x"), false, FAST_RETRY)
            .await
            .expect("fail"),
        FailOutcome::LeaseLost
    );
    assert!(!s.finish_cancelled(&stale, "x").await.expect("cancel"));
    assert!(!s.release(&stale).await.expect("release"));
    let j = s.get_job(fresh.job.id).await.expect("get").expect("exists");
    assert_eq!(j.status, JobStatus::Running);
    assert_eq!(j.worker_id.as_deref(), Some("new"));
    assert_eq!(j.phase, Phase::Claimed);
    assert_eq!(j.published_version, None);
    assert_eq!(
        s.get_lora("a")
            .await
            .expect("get")
            .expect("lora")
            .current_version,
        0
    );
    // The new owner still can.
    assert!(s
        .complete(&fresh.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
}

async fn expired_lease_requeues_then_fails_after_max_attempts(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let mut j = job("a", 1);
    j.max_attempts = 2;
    s.enqueue(&j).await.expect("enqueue");
    claim_expiring(s, "w").await;
    let r = s
        .reap_expired(RetryPolicy {
            base: Duration::from_secs(30),
            max: Duration::from_secs(60),
        })
        .await
        .expect("reap");
    assert_eq!(r.requeued, 1);
    let back = s.get_job(j.id).await.expect("get").expect("exists");
    assert_eq!(back.status, JobStatus::Queued);
    assert_eq!(
        back.error.as_ref().map(|e| e.code.as_str()),
        Some("lease_expired")
    );
    let wait = back.run_at - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::seconds(10),
        "backoff applied: {wait}"
    );
    assert!(
        s.claim(&claim_request("w")).await.expect("claim").is_none(),
        "not before run_at"
    );

    // Second attempt also expires: attempts exhausted, the job fails visibly.
    let mut k = job("a", 1);
    k.max_attempts = 1;
    s.create_lora(&lora("b")).await.expect("lora");
    k.lora_id = "b".into();
    s.enqueue(&k).await.expect("enqueue");
    claim_expiring(s, "w").await;
    let r = s.reap_expired(FAST_RETRY).await.expect("reap");
    assert_eq!(r.failed, 1);
    let dead = s.get_job(k.id).await.expect("get").expect("exists");
    assert_eq!(dead.status, JobStatus::Failed);
    assert!(dead.finished_at.is_some());
}

async fn members_return_to_queue_when_lead_lease_is_lost(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 1);
    let member = job("a", 1);
    s.enqueue(&lead).await.expect("enqueue");
    s.enqueue(&member).await.expect("enqueue");
    let c = claim_expiring(s, "w").await;
    assert_eq!(c.members.len(), 1);
    s.reap_expired(FAST_RETRY).await.expect("reap");
    let m = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(m.status, JobStatus::Queued);
    assert_eq!(m.trained_by, None);
}

async fn retry_after_publish_resumes_without_training_again(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 1);
    let member = job("a", 1);
    s.enqueue(&lead).await.expect("enqueue");
    s.enqueue(&member).await.expect("enqueue");
    let mut req = claim_request("w1");
    req.lease = Duration::from_millis(400);
    let c = s.claim(&req).await.expect("claim").expect("job");
    assert!(s
        .begin_training(&c.lease(), None)
        .await
        .expect("begin")
        .is_some());
    assert!(s.publish(&c.lease(), &version(1)).await.expect("publish"));
    // The worker dies after publish, before completing.
    tokio::time::sleep(Duration::from_millis(450)).await;
    s.reap_expired(FAST_RETRY).await.expect("reap");
    let m = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(
        m.status,
        JobStatus::Coalesced,
        "a published member stays with its batch"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let again = claim(s, "w2").await;
    assert_eq!(again.job.id, lead.id);
    assert_eq!(
        again.job.published_version,
        Some(1),
        "the retry knows it is trained"
    );
    assert!(again.members.is_empty());
    assert!(s
        .complete(&again.lease(), &serde_json::json!({"version": 1}), None)
        .await
        .expect("complete"));
    assert_eq!(
        s.lora_versions("a").await.expect("versions").len(),
        2,
        "exactly one new version"
    );
    let m = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(m.status, JobStatus::Succeeded);
}

async fn publish_requires_the_previous_version(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.enqueue(&job("a", 1)).await.expect("enqueue");
    let c = claim(s, "w").await;
    assert!(
        !s.publish(&c.lease(), &version(2)).await.expect("publish"),
        "gap in versions"
    );
    assert!(s.publish(&c.lease(), &version(1)).await.expect("publish"));
    assert!(
        !s.publish(&c.lease(), &version(2)).await.expect("publish"),
        "one version per job"
    );
}

async fn fatal_failure_fails_at_once_and_retryable_backs_off(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    let bad = job("a", 1);
    s.enqueue(&bad).await.expect("enqueue");
    let c = claim(s, "w").await;
    assert_eq!(
        s.fail(
            &c.lease(),
            &fatal("token id 999999 outside the vocabulary"),
            false,
            FAST_RETRY
        )
        .await
        .expect("fail"),
        FailOutcome::Failed
    );
    let j = s.get_job(bad.id).await.expect("get").expect("exists");
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.attempt, 1);
    assert_eq!(
        j.error.as_ref().map(|e| e.code.as_str()),
        Some("invalid_input")
    );

    let flaky = job("b", 1);
    s.enqueue(&flaky).await.expect("enqueue");
    let c = claim(s, "w").await;
    let err = JobError {
        code: "vllm_unavailable".into(),
        message: "connection refused".into(),
        phase: Some(Phase::Sleep),
    };
    let slow = RetryPolicy {
        base: Duration::from_secs(20),
        max: Duration::from_secs(60),
    };
    assert_eq!(
        s.fail(&c.lease(), &err, true, slow).await.expect("fail"),
        FailOutcome::Retrying
    );
    let j = s.get_job(flaky.id).await.expect("get").expect("exists");
    assert_eq!(j.status, JobStatus::Queued);
    assert!(j.run_at > chrono::Utc::now() + chrono::Duration::seconds(5));
    assert!(j.finished_at.is_none());
}

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

async fn idempotency_key_returns_same_job_or_conflicts(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let mut first = job("a", 1);
    first.idempotency_key = Some("k1".into());
    first.request_hash = Some("h1".into());
    let a = s.enqueue(&first).await.expect("enqueue");
    let mut replay = job("a", 1);
    replay.idempotency_key = Some("k1".into());
    replay.request_hash = Some("h1".into());
    let b = s.enqueue(&replay).await.expect("replay");
    assert!(!b.created);
    assert_eq!(b.job.id, a.job.id);
    let mut clash = job("a", 1);
    clash.idempotency_key = Some("k1".into());
    clash.request_hash = Some("h2".into());
    assert!(matches!(s.enqueue(&clash).await, Err(Error::Conflict(_))));
    let mut other_caller = replay.clone();
    other_caller.id = uuid::Uuid::now_v7();
    other_caller.caller = "someone-else".into();
    assert!(s.enqueue(&other_caller).await.expect("enqueue").created);
}

async fn release_hands_back_without_spending_an_attempt(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let mut j = job("a", 1);
    j.max_attempts = 1;
    s.enqueue(&j).await.expect("enqueue");
    let c = claim(s, "w").await;
    assert!(s.release(&c.lease()).await.expect("release"));
    let again = claim(s, "w2").await;
    assert_eq!(again.job.attempt, 2);
    assert_eq!(again.job.max_attempts, 2);
    assert!(!s
        .complete(&c.lease(), &serde_json::json!({}), None)
        .await
        .expect("fenced"));
}

async fn retention_prunes_old_finished_jobs_only(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    let done = job("a", 1);
    s.enqueue(&done).await.expect("enqueue");
    let c = claim(s, "w").await;
    s.complete(&c.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete");
    let waiting = job("b", 1);
    s.enqueue(&waiting).await.expect("enqueue");
    assert_eq!(
        s.prune(Duration::from_secs(3600), 100)
            .await
            .expect("prune"),
        0,
        "too young"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.prune(Duration::from_millis(5), 100).await.expect("prune"),
        1
    );
    assert!(s.get_job(done.id).await.expect("get").is_none());
    assert!(s.job_events(done.id).await.expect("events").is_empty());
    assert!(s.get_job(waiting.id).await.expect("get").is_some());
}

async fn listing_filters_and_paginates_newest_first(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("team/a")).await.expect("lora");
    s.create_lora(&lora("other")).await.expect("lora");
    let mut ids = Vec::new();
    for _ in 0..5 {
        let j = job("team/a", 1);
        s.enqueue(&j).await.expect("enqueue");
        ids.push(j.id);
    }
    s.enqueue(&job("other", 1)).await.expect("enqueue");
    let page1 = s
        .list_jobs(&JobFilter {
            lora_id: Some("team/a".into()),
            limit: 3,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page1.iter().map(|j| j.id).collect::<Vec<_>>(),
        [ids[4], ids[3], ids[2]]
    );
    let page2 = s
        .list_jobs(&JobFilter {
            lora_id: Some("team/a".into()),
            limit: 3,
            before: Some(ids[2]),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page2.iter().map(|j| j.id).collect::<Vec<_>>(),
        [ids[1], ids[0]]
    );
    let scoped = s
        .list_jobs(&JobFilter {
            lora_prefixes: Some(vec!["team/".into()]),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(scoped.len(), 5);
    let running = s
        .list_jobs(&JobFilter {
            status: Some(JobStatus::Running),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(running.is_empty());
}

async fn enqueue_wakes_a_waiting_claimer(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let mut wake = s.wakeups().await.expect("wakeups");
    // Absorb the wake-up the listener gives when it (re)connects.
    wake.wait(Duration::from_millis(500)).await;
    let store = s.clone();
    let waiter = tokio::spawn(async move {
        let start = std::time::Instant::now();
        let woke = wake.wait(Duration::from_secs(10)).await;
        (woke, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.enqueue(&job("a", 1)).await.expect("enqueue");
    let (woke, took) = waiter.await.expect("join");
    assert!(woke, "woken by the enqueue, not the timeout");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// The exclusivity proof: 8 claimers race over 1,000 jobs on 40 LoRAs. A LoRA never has two
/// running jobs, nobody stalls behind a busy LoRA, and many LoRAs run at once.
async fn concurrent_claimers_never_run_one_lora_twice(db: &TestDb) {
    const CLAIMERS: usize = 8;
    const LORAS: usize = 40;
    const JOBS: usize = 1000;
    let s = &db.store;
    for l in 0..LORAS {
        s.create_lora(&lora(&format!("l{l}"))).await.expect("lora");
    }
    // Runs of the same LoRA at the head of the queue: the case that blocks naive claims.
    for i in 0..JOBS {
        s.enqueue(&job(&format!("l{}", (i / 5) % LORAS), 1))
            .await
            .expect("enqueue");
    }
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let peak = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..CLAIMERS {
        let (s, running, done) = (s.clone(), running.clone(), done.clone());
        let (peak, in_flight) = (peak.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let mut req = claim_request(&format!("w{w}"));
            req.max_batch_samples = 1;
            let mut idle = 0;
            while idle < 50 {
                let Some(c) = s.claim(&req).await.expect("claim") else {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                idle = 0;
                assert!(
                    running.lock().expect("lock").insert(c.job.lora_id.clone()),
                    "two running jobs for {}",
                    c.job.lora_id
                );
                // Jobs held between claim and completion (an upper bound of what is running).
                let held = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(held, Ordering::SeqCst);
                // Hold the job until every claimer holds one at once (or 500 ms pass): with
                // no global lock this happens early; with one it never does.
                let until = std::time::Instant::now() + Duration::from_millis(500);
                while peak.load(Ordering::SeqCst) < CLAIMERS.min(LORAS)
                    && std::time::Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                running.lock().expect("lock").remove(&c.job.lora_id);
                assert!(s
                    .complete(&c.lease(), &serde_json::json!({}), None)
                    .await
                    .expect("complete"));
                in_flight.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let all = futures_join(tasks);
    tokio::time::timeout(Duration::from_secs(240), all)
        .await
        .expect("burn-down finished in time");
    assert_eq!(done.load(Ordering::SeqCst), JOBS);
    let counts = s.status_counts().await.expect("counts");
    assert_eq!(counts, vec![(JobStatus::Succeeded, JOBS as i64)]);
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak >= CLAIMERS.min(LORAS),
        "no global lock: peak concurrency {peak}"
    );
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.expect("claimer panicked");
    }
}

async fn published_job_never_trains_again_nor_joins_a_batch(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let first = job("a", 1);
    s.enqueue(&first).await.expect("enqueue");
    let mut req = claim_request("w1");
    req.lease = Duration::from_millis(400);
    let c = s.claim(&req).await.expect("claim").expect("job");
    s.begin_training(&c.lease(), None).await.expect("begin");
    assert!(s.publish(&c.lease(), &version(1)).await.expect("publish"));
    let err = s
        .cancel(first.id)
        .await
        .expect_err("published while running");
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("already trained into version 1")),
        "{err}"
    );
    // The worker dies after publish; the reaper puts the job back to finish its reload.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(s.reap_expired(FAST_RETRY).await.expect("reap").requeued, 1);
    let err = s
        .cancel(first.id)
        .await
        .expect_err("published while queued");
    assert!(matches!(err, Error::Conflict(_)), "{err}");

    // A later job of the same LoRA and config leads a batch: the published job must not
    // join it (it would be trained a second time).
    let mut urgent = job("a", 1);
    urgent.priority = 10;
    s.enqueue(&urgent).await.expect("enqueue");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let c2 = claim(s, "w2").await;
    assert_eq!(c2.job.id, urgent.id);
    assert!(c2.members.is_empty(), "a published job joined a batch");
    assert!(s.publish(&c2.lease(), &version(2)).await.expect("publish"));
    assert!(s
        .complete(&c2.lease(), &serde_json::json!({"version": 2}), None)
        .await
        .expect("complete"));

    let resumed = claim(s, "w3").await;
    assert_eq!(resumed.job.id, first.id);
    assert_eq!(resumed.job.published_version, Some(1));
    assert_eq!(
        s.lora_versions("a").await.expect("versions").len(),
        3,
        "versions 0, 1, 2 and no more"
    );
}

async fn requeue_of_a_cancel_requested_job_cancels_it(db: &TestDb) {
    let s = &db.store;
    // A retryable failure after a cancel request ends the job instead of retrying it; the
    // members it carried go back to the queue (nobody cancelled them).
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 1);
    let member = job("a", 1);
    s.enqueue(&lead).await.expect("enqueue");
    s.enqueue(&member).await.expect("enqueue");
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

async fn failure_after_publish_ends_failed_keeping_the_version(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let lead = job("a", 1);
    let member = job("a", 1);
    s.enqueue(&lead).await.expect("enqueue");
    s.enqueue(&member).await.expect("enqueue");
    let c = claim(s, "w").await;
    s.begin_training(&c.lease(), None).await.expect("begin");
    assert!(s.publish(&c.lease(), &version(1)).await.expect("publish"));
    let err = JobError {
        code: "reload_failed".into(),
        message: "vLLM refused the adapter".into(),
        phase: Some(Phase::Reload),
    };
    assert_eq!(
        s.fail(&c.lease(), &err, false, FAST_RETRY)
            .await
            .expect("fail"),
        FailOutcome::Failed
    );
    let l = s.get_job(lead.id).await.expect("get").expect("exists");
    assert_eq!(l.status, JobStatus::Failed, "its version is not served");
    assert_eq!(l.published_version, Some(1), "but it exists");
    assert_eq!(
        l.error.as_ref().map(|e| e.code.as_str()),
        Some("reload_failed")
    );
    assert_eq!(
        l.result.as_ref().and_then(|r| r.get("version")),
        Some(&serde_json::json!(1))
    );
    let m = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(m.status, JobStatus::Failed);
    assert_eq!(s.lora_versions("a").await.expect("versions").len(), 2);
    assert!(
        s.claim(&claim_request("w")).await.expect("claim").is_none(),
        "nothing trains it again"
    );
}

async fn a_deleted_lora_takes_no_work_and_its_id_starts_afresh_once_its_job_stopped(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let running = job("a", 1);
    s.enqueue(&running).await.expect("enqueue");
    let c = claim(s, "w").await;
    s.begin_training(&c.lease(), None).await.expect("begin");
    assert!(s.publish(&c.lease(), &version(1)).await.expect("publish"));
    assert!(s
        .complete(&c.lease(), &serde_json::json!({"version": 1}), None)
        .await
        .expect("complete"));
    let busy = job("a", 1);
    s.enqueue(&busy).await.expect("enqueue");
    let c = claim(s, "w").await;

    let token = s.delete_lora("a").await.expect("delete").expect("was live");
    assert_eq!(s.delete_lora("a").await.expect("again"), None, "idempotent");
    assert_eq!(s.get_lora("a").await.expect("get"), None);
    assert!(s.list_loras("").await.expect("list").is_empty());
    assert!(
        matches!(
            s.enqueue(&job("a", 1)).await,
            Err(claas_core::Error::NotFound(_))
        ),
        "nothing new is accepted for a deleted LoRA"
    );
    // While its job still runs, the id cannot be taken again.
    assert!(matches!(
        s.create_lora(&lora("a")).await,
        Err(claas_core::Error::Conflict(_))
    ));
    s.cancel(busy.id).await.expect("cancel requested");
    assert!(s
        .finish_cancelled(&c.lease(), "cancelled")
        .await
        .expect("stopped"));
    assert!(s.purge_lora("a", token).await.expect("purge"));
    assert!(s.lora_versions("a").await.expect("versions").is_empty());

    let again = s
        .create_lora(&lora("a"))
        .await
        .expect("the id starts afresh");
    assert_eq!(again.current_version, 0);
    assert_eq!(s.lora_versions("a").await.expect("versions").len(), 1);
    // A purge from the old deletion no longer touches it.
    assert!(!s.purge_lora("a", token).await.expect("stale purge"));
    assert_eq!(s.lora_versions("a").await.expect("versions").len(), 1);
    // Its old jobs stay in the history.
    assert!(s.get_job(running.id).await.expect("get").is_some());
    // Re-creating without a purge drops what the deleted LoRA left.
    s.delete_lora("a").await.expect("delete").expect("live");
    s.create_lora(&lora("a")).await.expect("again");
    assert_eq!(s.lora_versions("a").await.expect("versions").len(), 1);
}

async fn overwrite_starts_afresh_as_a_new_version_and_a_job_trained_before_cannot_publish(
    db: &TestDb,
) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let j = job("a", 1);
    s.enqueue(&j).await.expect("enqueue");
    let c = claim(s, "w").await;
    s.begin_training(&c.lease(), None).await.expect("begin");

    let mut fresh = lora("a");
    fresh.rank = 16;
    fresh.initial_uri = "file:///loras/a/v1-init-x".into();
    let l = s
        .reinit_lora(&fresh, 0, &serde_json::json!({"reinitialized": true}))
        .await
        .expect("reinit");
    assert_eq!((l.current_version, l.rank), (1, 16));
    let versions = s.lora_versions("a").await.expect("versions");
    assert_eq!(versions.len(), 2, "history kept");
    assert_eq!(versions[1].storage_uri, "file:///loras/a/v1-init-x");
    assert_eq!(versions[1].job_id, None);
    // The job trained from version 0: its version 1 cannot follow.
    assert!(!s.publish(&c.lease(), &version(1)).await.expect("publish"));
    // A second overwrite that still expects version 0 is refused.
    assert!(matches!(
        s.reinit_lora(&fresh, 0, &serde_json::Value::Null).await,
        Err(claas_core::Error::Conflict(_))
    ));
    assert!(matches!(
        s.reinit_lora(&lora("nobody"), 0, &serde_json::Value::Null)
            .await,
        Err(claas_core::Error::NotFound(_))
    ));
}

async fn retention_keeps_the_newest_versions_version_0_pinned_ones_and_shared_files(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    for v in 1..=5 {
        s.enqueue(&job("a", 1)).await.expect("enqueue");
        let c = claim(s, "w").await;
        s.begin_training(&c.lease(), None).await.expect("begin");
        assert!(s.publish(&c.lease(), &version(v)).await.expect("publish"));
        assert!(s
            .complete(&c.lease(), &serde_json::json!({"version": v}), None)
            .await
            .expect("complete"));
    }
    assert!(s.pin_version("a", 2, true).await.expect("pin"));
    assert!(!s.pin_version("a", 42, true).await.expect("no such version"));
    // A rollback to version 1: version 6 points at version 1's files.
    let mut back = lora("a");
    back.initial_uri = version(1).storage_uri;
    back.initial_sha256 = version(1).sha256;
    let l = s
        .reinit_lora(&back, 5, &serde_json::json!({"rollback_of": 1}))
        .await
        .expect("rollback");
    assert_eq!(l.current_version, 6);

    // Keep the newest 2 (5 and 6): 3 and 4 go; 0 stays, 2 is pinned, and 1's files are
    // what the current version 6 serves.
    let gone = s.prune_versions("a", 2).await.expect("prune");
    assert_eq!(gone, [version(3).storage_uri, version(4).storage_uri]);
    let versions = s.lora_versions("a").await.expect("versions");
    let pruned: Vec<i32> = versions
        .iter()
        .filter(|v| v.pruned_at.is_some())
        .map(|v| v.version)
        .collect();
    assert_eq!(pruned, [3, 4]);
    assert!(versions[2].pinned);
    assert_eq!(
        versions[6].metrics,
        Some(serde_json::json!({"rollback_of": 1}))
    );
    assert!(
        s.prune_versions("a", 2).await.expect("again").is_empty(),
        "idempotent"
    );
}
