//! Test support (feature `testing`): a fresh store per test on the real Postgres
//! (`DATABASE_URL`, default `postgres://postgres@localhost/test`, one schema per test) or
//! on a fresh SQLite file, plus small builders.

use std::sync::Arc;

use sqlx::Connection;
use uuid::Uuid;

use crate::queue::{PgStore, SharedStore, SqliteStore, Store};
use crate::types::{JobPayload, NewJob, NewLora, Rollout, Sample, TrainingConfig};

/// Runs each named `async fn(&TestDb)` twice: on Postgres (its own schema) and on SQLite
/// (its own file), as `postgres::<name>` and `sqlite::<name>`.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = $crate::testing::TestDb::postgres().await;
                super::$name(&db).await;
                db.cleanup().await;
            }
        )* }
        mod sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = $crate::testing::TestDb::sqlite().await;
                super::$name(&db).await;
                db.cleanup().await;
            }
        )* }
    };
}

/// A claim for `worker` on the test base model: a 60 s lease, batches up to 8 samples.
pub fn claim_request(worker: &str) -> crate::queue::ClaimRequest {
    crate::queue::ClaimRequest {
        worker_id: worker.into(),
        base_models: vec![TEST_BASE_MODEL.into()],
        lease: std::time::Duration::from_secs(60),
        max_batch_samples: 8,
    }
}

/// The Postgres the tests use.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@localhost/test".into())
}

/// A store in a schema of its own; dropped by [`TestDb::cleanup`].
pub struct TestDb {
    pub store: SharedStore,
    pub schema: Option<String>,
    pub url: String,
    path: Option<std::path::PathBuf>,
}

impl TestDb {
    pub async fn postgres() -> TestDb {
        let url = database_url();
        let schema = create_schema(&url).await;
        let store = PgStore::connect(&url, Some(&schema), 20)
            .await
            .expect("connect test store");
        store.migrate().await.expect("migrate");
        TestDb {
            store: Arc::new(store),
            url: with_search_path(&url, &schema),
            schema: Some(schema),
            path: None,
        }
    }

    pub async fn sqlite() -> TestDb {
        let path = std::env::temp_dir().join(format!("claas-test-{}.db", Uuid::new_v4().simple()));
        let url = format!("sqlite:{}", path.display());
        let store = SqliteStore::connect(&url).await.expect("open sqlite");
        store.migrate().await.expect("migrate");
        TestDb {
            store: Arc::new(store),
            schema: None,
            url,
            path: Some(path),
        }
    }

    /// Drops the schema (Postgres) or deletes the file (SQLite).
    pub async fn cleanup(self) {
        drop(self.store);
        if let Some(schema) = &self.schema {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await {
                let _ = sqlx::query(&format!("drop schema {schema} cascade"))
                    .execute(&mut conn)
                    .await;
            }
        }
        if let Some(path) = &self.path {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

/// Creates a schema with a fresh name in the test database and returns its name.
pub async fn create_schema(url: &str) -> String {
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("tests need Postgres at {url}: {e}"));
    sqlx::query(&format!("create schema {schema}"))
        .execute(&mut conn)
        .await
        .expect("create test schema");
    conn.close().await.ok();
    schema
}

/// The URL with `options=-c search_path=…`, for child processes that must use the schema.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

pub const TEST_BASE_MODEL: &str = "test/base";

/// A LoRA on [`TEST_BASE_MODEL`].
pub fn lora(id: &str) -> NewLora {
    NewLora {
        lora_id: id.to_string(),
        base_model: TEST_BASE_MODEL.to_string(),
        rank: 8,
        alpha: 16.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        initial_uri: format!("file:///loras/{id}/v0"),
        initial_sha256: "0".repeat(64),
    }
}

/// A small valid sample.
pub fn sample(feedback: &str) -> Sample {
    Sample {
        prompt: "Write a haiku".into(),
        response: "Leaves fall".into(),
        feedback: feedback.into(),
        rollout: Rollout {
            prompt_token_ids: vec![1, 2, 3],
            response_token_ids: vec![4, 5],
            response_logprobs: vec![-0.5, -0.25],
            system_prompt: "You are helpful.".into(),
        },
    }
}

/// A job with `n` samples for `lora_id` and the default training config.
pub fn job(lora_id: &str, n: usize) -> NewJob {
    NewJob::new(
        lora_id,
        JobPayload {
            samples: (0..n).map(|i| sample(&format!("feedback {i}"))).collect(),
            training: TrainingConfig::default(),
        },
    )
}

/// Creates LoRA `lora_id` and enqueues two one-sample jobs on it: the first is claimed as
/// a batch's lead, the second joins it.
pub async fn lead_and_member(store: &SharedStore, lora_id: &str) -> (NewJob, NewJob) {
    store.create_lora(&lora(lora_id)).await.expect("lora");
    let (lead, member) = (job(lora_id, 1), job(lora_id, 1));
    store.enqueue(&lead).await.expect("enqueue");
    store.enqueue(&member).await.expect("enqueue");
    (lead, member)
}

/// Claims for `worker` with a 60 s lease; panics when nothing is claimable.
pub async fn claim(store: &SharedStore, worker: &str) -> crate::queue::Claimed {
    claimed(store, worker, std::time::Duration::from_secs(60)).await
}

/// Claims with a lease that has already run out by the time the call returns.
pub async fn claim_expiring(store: &SharedStore, worker: &str) -> crate::queue::Claimed {
    let c = claimed(store, worker, std::time::Duration::from_millis(1)).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    c
}

/// A failure that no retry can mend (bad input), in the distill phase.
pub fn fatal(msg: &str) -> crate::types::JobError {
    crate::types::JobError {
        code: "invalid_input".into(),
        message: msg.into(),
        phase: Some(crate::types::Phase::Distill),
    }
}

/// Claims for `worker` with a lease of `lease`; panics when nothing is claimable.
pub async fn claimed(
    store: &SharedStore,
    worker: &str,
    lease: std::time::Duration,
) -> crate::queue::Claimed {
    let mut req = claim_request(worker);
    req.lease = lease;
    store
        .claim(&req)
        .await
        .expect("claim")
        .expect("a job to claim")
}

/// Adapter version `v` as a worker publishes it.
pub fn version(v: i32) -> crate::types::NewVersion {
    crate::types::NewVersion {
        version: v,
        storage_uri: format!("file:///loras/x/v{v}"),
        sha256: "ab".repeat(32),
        metrics: serde_json::json!({"total_loss": 0.5}),
    }
}

/// Retries after 1–2 ms, so tests see a requeued job claimable at once.
pub const FAST_RETRY: crate::queue::RetryPolicy = crate::queue::RetryPolicy {
    base: std::time::Duration::from_millis(1),
    max: std::time::Duration::from_millis(2),
};

/// moto's S3-compatible server (`CLAAS_TEST_PYTHON` with `moto[server]`; `make test`
/// provides it), killed on drop, with the AWS environment pointed at it.
pub struct S3Server {
    child: std::process::Child,
    pub url: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Starts one; `None` when `CLAAS_TEST_PYTHON` is not set.
    pub fn start() -> Option<S3Server> {
        let python = std::env::var("CLAAS_TEST_PYTHON").ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut child = std::process::Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..150 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                let url = format!("http://{addr}");
                std::env::set_var("AWS_ACCESS_KEY_ID", "test");
                std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
                std::env::set_var("AWS_REGION", "us-east-1");
                std::env::set_var("AWS_ENDPOINT_URL", &url);
                return Some(S3Server { child, url });
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("moto did not start");
    }

    /// Creates a fresh bucket; returns its name.
    pub fn bucket(&self) -> String {
        use std::io::{Read, Write};
        let name = format!("claas-{}", Uuid::now_v7().simple());
        let addr = self.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "create bucket: {answer}"
        );
        name
    }
}
