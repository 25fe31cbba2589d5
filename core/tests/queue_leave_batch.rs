//! The conformance suite, continued (both stores): one member's bad sample fails only that
//! member, and a lead that fails for its own sample sends its members back to the queue.

use claas_core::queue::FailOutcome;
use claas_core::testing::{claim, claim_expiring, fatal, job, lora, version, TestDb, FAST_RETRY};
use claas_core::types::JobStatus;

claas_core::both_stores!(
    a_member_with_a_bad_sample_fails_alone_and_the_batch_trains_without_it,
    a_lead_failing_for_its_own_sample_sends_its_members_back_to_the_queue,
    only_the_leads_live_lease_takes_a_member_out_of_its_batch,
);

async fn a_member_with_a_bad_sample_fails_alone_and_the_batch_trains_without_it(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let (lead, bad, good) = (job("a", 1), job("a", 1), job("a", 1));
    for j in [&lead, &bad, &good] {
        s.enqueue(j).await.expect("enqueue");
    }
    let c = claim(s, "w").await;
    assert_eq!(c.members.len(), 2);
    let lease = c.lease();
    s.begin_training(&lease, None)
        .await
        .expect("begin")
        .expect("held");
    assert!(s
        .leave_batch(
            &lease,
            bad.id,
            Some(&fatal("sample 1: token id 4000000000"))
        )
        .await
        .expect("leave"));
    let b = s.get_job(bad.id).await.expect("get").expect("exists");
    assert_eq!(b.status, JobStatus::Failed);
    assert_eq!(b.trained_by, None);
    let error = b.error.expect("its own error");
    assert!(error.message.contains("4000000000"), "{}", error.message);
    // A second try names a job that is no longer a member.
    assert!(!s.leave_batch(&lease, bad.id, None).await.expect("again"));
    assert!(s.publish(&lease, &version(1)).await.expect("publish"));
    assert!(s
        .complete(&lease, &serde_json::json!({"version": 1}), None)
        .await
        .expect("complete"));
    for id in [lead.id, good.id] {
        let j = s.get_job(id).await.expect("get").expect("exists");
        assert_eq!(j.status, JobStatus::Succeeded, "{id}");
    }
    let b = s.get_job(bad.id).await.expect("get").expect("exists");
    assert_eq!(
        b.status,
        JobStatus::Failed,
        "the lead's success does not touch it"
    );
}

async fn a_lead_failing_for_its_own_sample_sends_its_members_back_to_the_queue(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let (lead, m1, m2) = (job("a", 1), job("a", 1), job("a", 1));
    for j in [&lead, &m1, &m2] {
        s.enqueue(j).await.expect("enqueue");
    }
    let c = claim(s, "w").await;
    let lease = c.lease();
    s.begin_training(&lease, None)
        .await
        .expect("begin")
        .expect("held");
    for m in [m1.id, m2.id] {
        assert!(s.leave_batch(&lease, m, None).await.expect("leave"));
    }
    assert_eq!(
        s.fail(&lease, &fatal("sample 0: empty prompt"), false, FAST_RETRY)
            .await
            .expect("fail"),
        FailOutcome::Failed
    );
    let l = s.get_job(lead.id).await.expect("get").expect("exists");
    assert_eq!(l.status, JobStatus::Failed);
    for m in [m1.id, m2.id] {
        let j = s.get_job(m).await.expect("get").expect("exists");
        assert_eq!((j.status, j.trained_by), (JobStatus::Queued, None), "{m}");
        assert_eq!(j.error, None);
    }
    // They train in the next batch, led by the older one.
    let next = claim(s, "w2").await;
    assert_eq!(next.job.id, m1.id);
    assert_eq!(next.members.len(), 1);
}

async fn only_the_leads_live_lease_takes_a_member_out_of_its_batch(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    let (lead, member) = (job("a", 1), job("a", 1));
    for j in [&lead, &member] {
        s.enqueue(j).await.expect("enqueue");
    }
    let c = claim_expiring(s, "w").await;
    assert!(!s
        .leave_batch(&c.lease(), member.id, Some(&fatal("late")))
        .await
        .expect("leave"));
    let j = s.get_job(member.id).await.expect("get").expect("exists");
    assert_eq!(
        j.status,
        JobStatus::Coalesced,
        "an expired lease changes nothing"
    );
    assert_eq!(j.trained_by, Some(lead.id));
}
