//! The conformance suite, continued (both stores): exactly-once publishing, a job that
//! published never training again, and a LoRA's versions through deletion, overwrite and
//! retention.

use std::time::Duration;

use claas_core::queue::FailOutcome;
use claas_core::testing::{
    claim, claim_request, job, lead_and_member, lora, version, TestDb, FAST_RETRY,
};
use claas_core::types::{JobError, JobStatus, Phase};
use claas_core::Error;

claas_core::both_stores!(
    retry_after_publish_resumes_without_training_again,
    publish_requires_the_previous_version,
    published_job_never_trains_again_nor_joins_a_batch,
    failure_after_publish_ends_failed_keeping_the_version,
    a_deleted_lora_takes_no_work_and_its_id_starts_afresh_once_its_job_stopped,
    overwrite_starts_afresh_as_a_new_version_and_a_job_trained_before_cannot_publish,
    retention_keeps_the_newest_versions_version_0_pinned_ones_and_shared_files,
);

async fn retry_after_publish_resumes_without_training_again(db: &TestDb) {
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
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

async fn failure_after_publish_ends_failed_keeping_the_version(db: &TestDb) {
    let s = &db.store;
    let (lead, member) = lead_and_member(s, "a").await;
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

    s.begin_training(&c.lease(), None).await.expect("begin");
    let token = s.delete_lora("a").await.expect("delete").expect("was live");
    assert!(
        !s.publish(&c.lease(), &version(2)).await.expect("publish"),
        "a job that trained while the delete began publishes nothing: its files would \
         outlive the LoRA"
    );
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
    let mut dropped = s
        .purge_lora("a", token)
        .await
        .expect("purge")
        .expect("not created again");
    dropped.sort();
    assert_eq!(
        dropped,
        ["file:///loras/a/v0", "file:///loras/x/v1"],
        "the purge names every version whose files go"
    );
    assert!(s.lora_versions("a").await.expect("versions").is_empty());

    let again = s
        .create_lora(&lora("a"))
        .await
        .expect("the id starts afresh");
    assert_eq!(again.current_version, 0);
    assert_eq!(s.lora_versions("a").await.expect("versions").len(), 1);
    // A purge from the old deletion no longer touches it.
    assert_eq!(s.purge_lora("a", token).await.expect("stale purge"), None);
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
