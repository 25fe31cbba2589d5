//! Retention after publish, with the real candle executor: only the newest
//! `versions_keep` versions keep their files (and version 0); the history keeps every row;
//! what attempts wrote and never published is removed once older than any lease.

use std::time::{Duration, Instant};

use claas_core::adapter_store::AdapterStore;
use claas_core::testing::{job, TestDb, TEST_BASE_MODEL};
use claas_core::types::{JobStatus, NewLora};
use claas_worker::testing::tiny_executor;
use claas_worker::{Worker, WorkerOptions};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_lose_their_files_after_each_publish() {
    let root = claas_testutil::tempdir("retention");
    let (model_dir, lora_root) = (root.join("model"), root.join("loras"));
    let exec = tiny_executor(TEST_BASE_MODEL, &model_dir, lora_root.clone(), 4).await;
    // What a crashed attempt left long ago, and what one is writing now: only the first
    // is an orphan.
    let stale = lora_root.join("r/@v1-deadbeefdeadbeef");
    let fresh = lora_root.join("r/@v2-0123456789abcdef");
    for d in [&stale, &fresh] {
        std::fs::create_dir_all(d).expect("dir");
        std::fs::write(d.join("adapter_model.safetensors"), b"stray").expect("file");
    }
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(&stale)
        .and_then(|f| f.set_modified(long_ago))
        .expect("backdate");
    let db = TestDb::sqlite().await;
    db.store
        .create_lora(&NewLora {
            lora_id: "r".into(),
            base_model: TEST_BASE_MODEL.into(),
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into()],
            initial_uri: format!("file://{}", lora_root.join("r/@v0-init").display()),
            initial_sha256: String::new(),
        })
        .await
        .expect("lora");
    let (stop, rx) = watch::channel(false);
    let worker = Worker::new(
        db.store.clone(),
        exec,
        WorkerOptions {
            poll_interval: Duration::from_millis(20),
            versions_keep: 1,
            store: Some(AdapterStore::local(&lora_root)),
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

    let versions = db.store.lora_versions("r").await.expect("versions");
    assert_eq!(versions.len(), 4, "every version stays in the history");
    let dir = |v: usize| {
        claas_core::types::local_path(&versions[v].storage_uri).expect("a local version")
    };
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
    assert!(!stale.exists(), "an old unpublished write is removed");
    assert!(fresh.exists(), "a write younger than a lease is not");
    let pruned: Vec<i32> = versions
        .iter()
        .filter(|v| v.pruned_at.is_some())
        .map(|v| v.version)
        .collect();
    assert_eq!(pruned, [1, 2]);
    db.cleanup().await;
}
