//! The candle executor's own promises, called phase by phase: where the base model waits
//! between jobs (`trainer.residency`), version 0 created on first use, versions written
//! where their URI says.

use std::path::PathBuf;

use claas_core::config::Residency;
use claas_core::testing::{sample, TEST_BASE_MODEL};
use claas_core::types::{Orchestration, TrainingConfig};
use claas_testutil::tempdir;
use claas_worker::testing::{cpu_options, tiny_checkpoint};
use claas_worker::{AdapterSource, CandleExecutor, CandleOptions, JobContext, Trainer};

async fn one_step(residency: Residency) -> serde_json::Value {
    let model_dir = tempdir("model");
    let lora_root = tempdir("loras");
    tiny_checkpoint(&model_dir, 9).await;
    let exec = CandleExecutor::new(CandleOptions {
        residency,
        ..cpu_options(TEST_BASE_MODEL, &model_dir, &lora_root)
    })
    .expect("executor");
    let ctx = JobContext {
        job_id: uuid::Uuid::now_v7(),
        lora_id: "u/a".into(),
        base_model: TEST_BASE_MODEL.into(),
        attempt: 1,
        orchestration: Orchestration::default(),
        write_tag: "t1".into(),
    };
    let from = AdapterSource {
        version: 0,
        uri: lora_root.join("u/a/v0").display().to_string(),
        sha256: String::new(),
        base_model: TEST_BASE_MODEL.into(),
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
    };
    let distilled = exec
        .trainer
        .distill(
            &ctx,
            &from,
            &[sample("shorter")],
            &TrainingConfig::default(),
        )
        .await
        .expect("distill");
    let metrics = distilled.metrics.clone();
    assert!(
        lora_root.join("u/a/v0/adapter_model.safetensors").is_file(),
        "version 0 created on first use"
    );
    let stored = exec
        .trainer
        .store_adapter(&ctx, 1, distilled)
        .await
        .expect("store");
    let dir = PathBuf::from(stored.uri.strip_prefix("file://").expect("file uri"));
    assert_eq!(
        dir,
        std::path::absolute(lora_root.join("u/a/@v1-t1")).expect("abs"),
        "each attempt writes a location of its own"
    );
    assert_eq!(
        claas_trainer::storage::adapter_sha256(&dir).expect("sha"),
        stored.sha256
    );
    assert!(dir.join("optimizer_state.safetensors").is_file());

    // Another attempt of the same version (the first lost its lease and a second worker
    // trained it meanwhile, on another batch) writes beside it: whichever publishes, the
    // other's files never change under it.
    let again = JobContext {
        write_tag: "t2".into(),
        attempt: 2,
        ..ctx.clone()
    };
    let other = exec
        .trainer
        .distill(
            &again,
            &from,
            &[sample("longer, please")],
            &TrainingConfig::default(),
        )
        .await
        .expect("distill");
    let second = exec
        .trainer
        .store_adapter(&again, 1, other)
        .await
        .expect("store");
    assert_ne!(second.uri, stored.uri);
    assert_ne!(second.sha256, stored.sha256, "another batch, other weights");
    assert_eq!(
        claas_trainer::storage::adapter_sha256(&dir).expect("sha"),
        stored.sha256,
        "the first attempt's files are untouched"
    );
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_resident_model_is_not_read_again_per_job() {
    let m = one_step(Residency::Host).await;
    assert!(m["total_loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    assert!(m.get("model_load_ms").is_none(), "read once at start: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_resident_model_is_read_for_each_job() {
    let m = one_step(Residency::Disk).await;
    assert!(m["total_loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    assert!(m["model_load_ms"].is_u64(), "read per job and timed: {m}");
}
