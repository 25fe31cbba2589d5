//! Retention after publish, with the real candle executor: only the newest
//! `versions_keep` versions keep their files (and version 0); the history keeps every row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claas_core::config::{Residency, TrainerDevice};
use claas_core::testing::{job, TestDb, TEST_BASE_MODEL};
use claas_core::types::{JobStatus, NewLora};
use claas_trainer::random::{write_checkpoint, Preset};
use claas_worker::{CandleExecutor, CandleOptions, Worker, WorkerOptions};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_lose_their_files_after_each_publish() {
    let root = std::env::temp_dir().join(format!("claas-retention-{}", uuid::Uuid::now_v7()));
    let (model_dir, lora_root) = (root.join("model"), root.join("loras"));
    let m = model_dir.clone();
    tokio::task::spawn_blocking(move || write_checkpoint(Preset::Tiny, &m, 4))
        .await
        .expect("join")
        .expect("checkpoint");
    let exec = CandleExecutor::new(CandleOptions {
        base_model_id: TEST_BASE_MODEL.into(),
        model_dir,
        lora_root: lora_root.clone(),
        store: None,
        device: TrainerDevice::Cpu,
        residency: Residency::Host,
        max_seq_len: 4096,
        vllm: None,
    })
    .expect("executor");
    let db = TestDb::sqlite().await;
    db.store
        .create_lora(&NewLora {
            lora_id: "r".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: format!("file://{}", lora_root.join("r/v0").display()),
            initial_sha256: String::new(),
        })
        .await
        .expect("lora");
    let (stop, rx) = watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        Arc::new(exec),
        WorkerOptions {
            poll_interval: Duration::from_millis(20),
            versions_keep: 1,
            ..WorkerOptions::new("keeper", vec![TEST_BASE_MODEL.into()])
        },
    );
    let handle = tokio::spawn(async move { worker.run(rx).await });
    for _ in 0..3 {
        let j = job("r", 1);
        db.store.enqueue(&j).await.expect("enqueue");
        let started = Instant::now();
        loop {
            let cur = db.store.get_job(j.id).await.expect("get").expect("job");
            if cur.status.is_terminal() {
                assert_eq!(cur.status, JobStatus::Succeeded, "{:?}", cur.error);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "job never ended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.send(true).expect("stop");
    handle.await.expect("join").expect("worker");

    let dir = |v: i32| lora_root.join(format!("r/v{v}"));
    assert!(
        dir(0).join("adapter_model.safetensors").is_file(),
        "version 0 stays"
    );
    assert!(
        dir(3).join("adapter_model.safetensors").is_file(),
        "the newest stays"
    );
    assert!(
        !dir(1).exists() && !dir(2).exists(),
        "older versions' files are gone"
    );
    let versions = db.store.lora_versions("r").await.expect("versions");
    assert_eq!(versions.len(), 4, "every version stays in the history");
    let pruned: Vec<i32> = versions
        .iter()
        .filter(|v| v.pruned_at.is_some())
        .map(|v| v.version)
        .collect();
    assert_eq!(pruned, [1, 2]);
    db.cleanup().await;
    let _ = std::fs::remove_dir_all(&root);
}
