//! What a job's timeline and the live counts say about a batch, on both stores: a member's
//! timeline is its own events and then its lead's (no event row per member per phase), and
//! a member sent back to the queue says so and stops following the lead.

use std::collections::HashMap;
use std::time::Duration;

use claas_core::queue::FailOutcome;
use claas_core::queue::SharedStore;
use claas_core::testing::{
    claimed, fatal, job, lead_and_member, lora, version, TestDb, FAST_RETRY,
};
use claas_core::types::{JobEvent, JobStatus, Phase};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(60);

async fn timeline(store: &SharedStore, id: Uuid) -> Vec<JobEvent> {
    store.job_events(id).await.expect("events")
}

fn phases(events: &[JobEvent]) -> Vec<&str> {
    events.iter().map(|e| e.phase.as_str()).collect()
}

claas_core::both_stores!(
    a_members_timeline_follows_its_batch_to_the_end,
    a_member_sent_back_says_so_and_stops_following_its_lead,
    live_counts_show_each_state_of_a_batch,
    a_failed_members_timeline_ends_with_its_batch_and_a_retry_unlinks_it,
    deleting_a_finished_lead_unlinks_its_members,
);

async fn a_members_timeline_follows_its_batch_to_the_end(db: &TestDb) {
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
    let c = claimed(s, "w", LEASE).await;
    assert_eq!(c.job.id, lead.id);
    let joined = &c.members[0].0;
    assert_eq!(joined.id, member.id);
    // The worker is the lead's; a member carries only the job that trains it.
    assert_eq!(joined.worker_id, None);
    assert_eq!(joined.trained_by, Some(lead.id));

    let lease = c.lease();
    assert!(s
        .enter_phase(&lease, Phase::Drain, None)
        .await
        .expect("phase"));
    let attached = s.begin_training(&lease, None).await.expect("begin");
    assert_eq!(attached, Some(vec![member.id]));
    assert!(s.publish(&lease, &version(1)).await.expect("publish"));
    assert!(s
        .complete(&lease, &serde_json::json!({"version": 1}), None)
        .await
        .expect("complete"));

    let lead_events = timeline(s, lead.id).await;
    assert_eq!(
        phases(&lead_events),
        ["queued", "claimed", "drain", "distill", "publish", "done"]
    );
    assert_eq!(
        lead_events[1].message,
        "claimed by w (attempt 1) with 1 coalesced job(s)"
    );

    let member_events = timeline(s, member.id).await;
    assert_eq!(
        phases(&member_events),
        ["queued", "coalesced", "drain", "distill", "publish", "done"],
        "{member_events:?}"
    );
    assert_eq!(
        member_events[1].message,
        format!("joined the batch of job {}", lead.id)
    );
    assert_eq!(
        member_events[5].message,
        format!("batch of job {}: succeeded", lead.id)
    );
    // The lead's events are the member's, at the same times.
    for (m, l) in member_events[2..].iter().zip(&lead_events[2..]) {
        assert_eq!(m.at, l.at);
    }
}

async fn a_member_sent_back_says_so_and_stops_following_its_lead(db: &TestDb) {
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
    claimed(s, "w1", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.reap_expired(FAST_RETRY).await.expect("reap").requeued, 1);

    let events = timeline(s, member.id).await;
    assert_eq!(phases(&events), ["queued", "queued"], "{events:?}");
    assert_eq!(
        events[1].message,
        format!(
            "left the batch of job {} unpublished (its lead is now queued); back in the queue",
            lead.id
        )
    );

    // The member, older in the queue than its old lead's retry, now leads; the old lead's
    // later events no longer show in the member's timeline, and the old lead follows it.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let c = claimed(s, "w2", LEASE).await;
    assert_eq!(c.job.id, member.id);
    assert_eq!(c.members[0].0.id, lead.id);
    let events = timeline(s, member.id).await;
    assert_eq!(phases(&events), ["queued", "queued", "claimed"]);
    let old_lead = timeline(s, lead.id).await;
    assert_eq!(
        phases(&old_lead),
        ["queued", "claimed", "queued", "coalesced"],
        "{old_lead:?}"
    );
    assert_eq!(
        old_lead[3].message,
        format!("joined the batch of job {}", member.id)
    );
}

async fn live_counts_show_each_state_of_a_batch(db: &TestDb) {
    let s = &db.store;
    s.create_lora(&lora("a")).await.expect("lora");
    s.create_lora(&lora("b")).await.expect("lora");
    for l in ["a", "a", "a", "b"] {
        s.enqueue(&job(l, 1)).await.expect("enqueue");
    }
    let c = claimed(s, "w", LEASE).await;
    assert_eq!(c.members.len(), 2);
    let snapshot = s
        .metrics_snapshot(Duration::from_secs(3600))
        .await
        .expect("metrics");
    let live: HashMap<JobStatus, i64> = snapshot.live.into_iter().collect();
    let expected = HashMap::from([
        (JobStatus::Queued, 1),
        (JobStatus::Running, 1),
        (JobStatus::Coalesced, 2),
    ]);
    assert_eq!(live, expected);
    assert!(snapshot.oldest_queued_s.is_some_and(|s| s >= 0.0));

    assert!(s
        .complete(&c.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    let snapshot = s
        .metrics_snapshot(Duration::from_secs(3600))
        .await
        .expect("metrics");
    // No zero counts: a status with no live job is absent, as before.
    assert_eq!(snapshot.live, [(JobStatus::Queued, 1)]);
}

async fn a_failed_members_timeline_ends_with_its_batch_and_a_retry_unlinks_it(db: &TestDb) {
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
    let c = claimed(s, "w1", LEASE).await;
    let bad = fatal("token id 999999 is outside the vocabulary");
    let failed = s.fail(&c.lease(), &bad, false, FAST_RETRY).await;
    assert!(matches!(failed.expect("fail"), FailOutcome::Failed));
    let ended = timeline(s, member.id).await;
    assert_eq!(
        phases(&ended),
        ["queued", "coalesced", "failed"],
        "{ended:?}"
    );

    // An operator retries the lead: its new run is not the member's.
    s.retry_job(lead.id, "retried by an operator")
        .await
        .expect("retry lead");
    let again = claimed(s, "w2", LEASE).await;
    assert_eq!((again.job.id, again.members.len()), (lead.id, 0));
    assert_eq!(timeline(s, member.id).await, ended);

    // Retrying the member takes it out of the failed batch for good, saying so.
    let retried = s
        .retry_job(member.id, "retried by an operator")
        .await
        .expect("retry member");
    assert_eq!(retried.trained_by, None);
    let events = timeline(s, member.id).await;
    assert_eq!(
        phases(&events),
        ["queued", "failed", "queued"],
        "{events:?}"
    );
    assert_eq!(
        events[1].message,
        format!("had failed in the batch of job {}", lead.id)
    );
}

async fn deleting_a_finished_lead_unlinks_its_members(db: &TestDb) {
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
    let c = claimed(s, "w", LEASE).await;
    assert!(s
        .complete(&c.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    s.delete_job(lead.id).await.expect("delete the lead");
    let m = s.get_job(member.id).await.expect("get").expect("member");
    assert_eq!((m.status, m.trained_by), (JobStatus::Succeeded, None));
    assert_eq!(phases(&timeline(s, member.id).await), ["queued"]);
}
