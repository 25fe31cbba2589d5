//! One conformance suite for both queue stores: every test below runs against Postgres
//! (its own schema) and SQLite (its own file). The rules are ARCHITECTURE.md "Rules and where they are enforced". This
//! file holds intake, claims, batches, leases and fencing; `queue_versions.rs` holds
//! exactly-once publishing and a LoRA's versions, `queue_cancel.rs` cancellation,
//! `queue_timeline.rs` what a job's timeline says, and `queue_contention.rs` many claimers
//! at once.

use std::time::Duration;

use claas_core::queue::{FailOutcome, JobFilter, LeaseState, RetryPolicy};
use claas_core::testing::{
    claim, claim_expiring, claim_request, fatal, job, lead_and_member, lora, version, TestDb,
    FAST_RETRY, TEST_BASE_MODEL,
};
use claas_core::types::{JobError, JobStatus, Phase};
use claas_core::Error;

claas_core::both_stores!(
    enqueued_job_is_claimed_with_its_payload,
    enqueue_for_unknown_lora_is_not_found,
    claims_by_priority_then_age,
    one_running_job_per_lora,
    worker_claims_only_its_base_models,
    coalescing_joins_same_config_jobs_up_to_max_samples,
    completion_settles_the_whole_batch,
    stale_worker_cannot_write_after_reclaim,
    a_claim_made_again_at_the_same_attempt_does_not_share_its_lease,
    a_job_that_stops_running_keeps_no_lease_token,
    expired_lease_requeues_then_fails_after_max_attempts,
    members_return_to_queue_when_lead_lease_is_lost,
    fatal_failure_fails_at_once_and_retryable_backs_off,
    idempotency_key_returns_same_job_or_conflicts,
    release_hands_back_without_spending_an_attempt,
    retention_prunes_old_finished_jobs_only,
    listing_filters_and_paginates_newest_first,
    enqueue_wakes_a_waiting_claimer,
    database_refuses_impossible_job_states,
    claims_look_past_a_busy_loras_backlog,
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
    let (lead, member) = lead_and_member(s, "a").await;
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
    let (_, member) = lead_and_member(s, "a").await;
    let c = claim_expiring(s, "w").await;
    assert_eq!(c.members.len(), 1);
    s.reap_expired(FAST_RETRY).await.expect("reap");
    let m = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(m.status, JobStatus::Queued);
    assert_eq!(m.trained_by, None);
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
    assert!(matches!(
        s.enqueue(&clash).await,
        Err(Error::IdempotencyKeyReused(_))
    ));
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

/// The store's own checks, not just the code that writes through it: an unknown status,
/// a finished job without `finished_at` and a live job with one are refused, and the row
/// keeps its state.
/// Runs one write with the job id bound as `$1`, behind the store's back: the rows it
/// changed, or `None` when the database refused it.
async fn write_behind_the_store(db: &TestDb, sql: &str, id: &str) -> Option<u64> {
    use sqlx::Connection;
    let done = if db.schema.is_some() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query(&sql.replace("$1", "$1::uuid"))
            .bind(id)
            .execute(&mut conn)
            .await
            .map(|d| d.rows_affected())
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("open");
        sqlx::query(sql)
            .bind(id)
            .execute(&mut conn)
            .await
            .map(|d| d.rows_affected())
    };
    done.ok()
}

/// A claim that a database crash undid (claims commit without waiting for their flush) is
/// made again at the same attempt, here by a process with the same worker id: the first
/// process's lease is fenced out all the same.
async fn a_claim_made_again_at_the_same_attempt_does_not_share_its_lease(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let new = job("a", 1);
    s.enqueue(&new).await.expect("enqueue");
    let first = claim(s, "w").await.lease();
    // What recovery from the crash leaves: the row as it was before the claim.
    let undo = "update jobs set status = 'queued', phase = 'queued', attempt = 0,
        worker_id = null, lease_expires_at = null, lease_token = null, started_at = null
        where id = $1";
    assert_eq!(
        write_behind_the_store(db, undo, &new.id.to_string()).await,
        Some(1)
    );
    let second = claim(s, "w").await.lease();
    assert_eq!(
        (second.attempt, &second.worker_id),
        (first.attempt, &first.worker_id)
    );
    assert_ne!(first, second);
    assert_fenced_out(db, &first).await;
    assert!(s.publish(&second, &version(1)).await.expect("publish"));
    assert!(s
        .complete(&second, &serde_json::json!({}), None)
        .await
        .expect("complete"));
}

/// The lease can no longer heartbeat, publish or complete.
async fn assert_fenced_out(db: &TestDb, lease: &claas_core::queue::Lease) {
    let s = &db.store;
    assert_eq!(
        s.heartbeat(lease, Duration::from_secs(60))
            .await
            .expect("hb"),
        LeaseState::Lost
    );
    assert!(!s.publish(lease, &version(1)).await.expect("publish"));
    assert!(!s
        .complete(lease, &serde_json::json!({}), None)
        .await
        .expect("complete"));
}

/// A job that leaves `running` keeps no token, so a later claim that writes none (an older
/// binary during an upgrade fences by attempt) cannot hand a stalled worker's token back
/// to it: that worker stays fenced out.
async fn a_job_that_stops_running_keeps_no_lease_token(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let new = job("a", 1);
    s.enqueue(&new).await.expect("enqueue");
    let id = new.id.to_string();
    let stalled = claim_expiring(s, "w").await.lease();
    assert_eq!(s.reap_expired(FAST_RETRY).await.expect("reap").requeued, 1);
    let no_token = "update jobs set phase = phase where id = $1 and lease_token is null";
    assert_eq!(write_behind_the_store(db, no_token, &id).await, Some(1));
    // An older binary's claim, which sets no token.
    let old_claim = if db.schema.is_some() {
        "update jobs set status = 'running', attempt = attempt + 1, worker_id = 'w',
            lease_expires_at = now() + interval '1 hour' where id = $1"
    } else {
        "update jobs set status = 'running', attempt = attempt + 1, worker_id = 'w',
            lease_expires_at = 32503680000000 where id = $1"
    };
    assert_eq!(write_behind_the_store(db, old_claim, &id).await, Some(1));
    assert_fenced_out(db, &stalled).await;
    if db.schema.is_some() {
        // On Postgres the database clears it too, for writers that do not: an older
        // binary's lease reaper puts a job back as below.
        let back = "update jobs set status = 'queued', worker_id = null,
            lease_expires_at = null where id = $1 and status = 'running'";
        assert_eq!(write_behind_the_store(db, back, &id).await, Some(1));
        let c = claim(s, "w").await;
        assert_eq!(c.job.id, new.id);
        assert_eq!(write_behind_the_store(db, back, &id).await, Some(1));
        assert_eq!(write_behind_the_store(db, no_token, &id).await, Some(1));
    }
}

async fn database_refuses_impossible_job_states(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let new = job("a", 1);
    s.enqueue(&new).await.expect("enqueue");
    let id = new.id.to_string();
    let writes = [
        "update jobs set status = 'paused' where id = $1",
        "update jobs set status = 'succeeded' where id = $1",
        "update jobs set finished_at = current_timestamp where id = $1",
        "update jobs set status = 'running', finished_at = current_timestamp where id = $1",
    ];
    for sql in writes {
        let refused = write_behind_the_store(db, sql, &id).await.is_none();
        assert!(refused, "the store accepted: {sql}");
    }
    let job = s.get_job(new.id).await.expect("job").expect("exists");
    assert_eq!(job.status, JobStatus::Queued);
    assert!(job.finished_at.is_none());
}

/// A busy LoRA's backlog at the head of the queue, longer than a claim's walk in claim
/// order (64 jobs on Postgres): the claim still finds the oldest job of an idle LoRA it
/// may run, skips a LoRA of another base model, and comes back empty only when every queued
/// job belongs to a busy LoRA.
async fn claims_look_past_a_busy_loras_backlog(db: &TestDb) {
    let s = &db.store;
    for id in ["hot", "x", "y"] {
        s.create_lora(&lora(id)).await.expect("lora");
    }
    let mut other = lora("other");
    other.base_model = "other/base".into();
    s.create_lora(&other).await.expect("lora");
    let mut backlog = Vec::new();
    for _ in 0..150 {
        let j = job("hot", 1);
        s.enqueue(&j).await.expect("enqueue");
        backlog.push(j.id);
    }
    let x = job("x", 1);
    s.enqueue(&x).await.expect("enqueue");
    s.enqueue(&job("other", 1)).await.expect("enqueue");
    let y = job("y", 1);
    s.enqueue(&y).await.expect("enqueue");

    let mut req = claim_request("w");
    req.max_batch_samples = 1;
    let next = || s.claim(&req);
    let hot = next().await.expect("claim").expect("the oldest job");
    assert_eq!(hot.job.id, backlog[0]);
    let claimed = next().await.expect("claim").expect("x behind the backlog");
    assert_eq!(claimed.job.id, x.id);
    let claimed = next().await.expect("claim").expect("y, not other's job");
    assert_eq!(claimed.job.id, y.id);
    let claimed = next().await.expect("claim");
    assert!(claimed.is_none(), "only the busy LoRA's jobs are left");
    assert!(s
        .complete(&hot.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    let claimed = next().await.expect("claim").expect("hot is idle again");
    assert_eq!(claimed.job.id, backlog[1]);
}
