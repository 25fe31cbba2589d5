//! Postgres going away is survivable: on a throwaway cluster this test starts itself
//! (initdb/pg_ctl on its own port, so other tests are undisturbed), the API answers 503
//! quickly while the database is down, both processes stay up, reconnect on their own when
//! it returns, and every accepted feedback still trains.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claas_core::queue::prelude::*;
use claas_core::queue::{PgStore, SharedStore};
use claas_core::testing::{
    claim, claim_request, claimed, job, lora, version, FAST_RETRY, TEST_BASE_MODEL,
};
use claas_core::types::JobStatus;
use common::{env, eventually, feedback, free_port, spawn, wait_http};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A Postgres cluster in a temporary directory, run as the `postgres` user.
struct Cluster {
    dir: claas_testutil::TempDir,
    port: u16,
    /// More server options (`-c name=value ...`).
    options: &'static str,
}

fn as_postgres(program: &str, args: &[&str]) -> bool {
    let bin = Path::new(PG_BIN).join(program);
    assert!(
        bin.exists(),
        "this test needs PostgreSQL 15's server binaries at {PG_BIN}"
    );
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Cluster {
    fn create(options: &'static str) -> Cluster {
        let dir = claas_testutil::tempdir("pg");
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres", dir.to_str().unwrap_or_default()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "chown the cluster dir to postgres");
        let data = dir.join("data");
        let data = data.to_str().unwrap_or_default();
        assert!(
            as_postgres(
                "initdb",
                &["-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]
            ),
            "initdb"
        );
        let cluster = Cluster {
            dir,
            port: free_port(),
            options,
        };
        cluster.start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            self.dir.display(),
            self.options
        );
        let log = self.dir.join("server.log").display().to_string();
        assert!(
            as_postgres(
                "pg_ctl",
                &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"]
            ),
            "pg_ctl start"
        );
    }

    fn stop(&self) {
        assert!(
            as_postgres("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]),
            "pg_ctl stop"
        );
    }

    /// Kills the server as a crash would (what was not written from its WAL buffers is
    /// lost) and starts it again, which replays the WAL.
    fn crash_and_restart(&self) {
        assert!(
            as_postgres(
                "pg_ctl",
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"]
            ),
            "pg_ctl stop -m immediate"
        );
        self.start();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        // `dir` (the cluster's files) goes when the fields drop, after the server stopped.
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_ride_out_a_database_outage() {
    let cluster = Cluster::create("");
    let url = cluster.url();
    let port = free_port().to_string();
    let adapters = cluster.dir.join("adapters");
    let common = [
        ("DATABASE_URL", url.as_str()),
        ("CLAAS_JOB_MAX_ATTEMPTS", "10"),
    ];
    let mut api_env = env(&common);
    api_env.extend(env(&[
        ("CLAAS_API_HOST", "127.0.0.1"),
        ("CLAAS_API_PORT", &port),
    ]));
    let mut api = spawn("api", &["api"], &api_env);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;
    let mut worker_env = env(&common);
    worker_env.extend(env(&[
        ("CLAAS_WORKER_ID", "w-outage"),
        ("CLAAS_WORKER_BASE_MODELS", TEST_BASE_MODEL),
        ("CLAAS_SIMULATED_STEP_MS", "20"),
        ("CLAAS_QUEUE_POLL_INTERVAL_MS", "200"),
        ("FEEDBACK_LOCK_TIMEOUT_S", "3"),
        ("CLAAS_RETRY_BASE_S", "0.2"),
        ("CLAAS_RETRY_MAX_S", "1"),
        ("CLAAS_LORA_ROOT", adapters.to_str().unwrap_or_default()),
    ]));
    let mut worker = spawn("worker", &["worker"], &worker_env);

    let store = PgStore::connect(&url, None, 2).await.expect("store");
    eventually(Duration::from_secs(30), "migrations by the API", || async {
        store.create_lora(&lora("a")).await.ok()
    })
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let post = |text: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let resp = client
                .post(format!("{base}/v1/feedback"))
                .header("prefer", "respond-async")
                .json(&feedback("a", &text))
                .send()
                .await;
            resp.expect("the API answers even while the database is down")
        }
    };
    let mut accepted = Vec::new();
    let resp = post("before".into()).await;
    assert_eq!(resp.status(), 202);
    accepted.push(resp.json::<serde_json::Value>().await.expect("json")["job_id"].clone());

    cluster.stop();
    for i in 0..3 {
        let started = Instant::now();
        let resp = post(format!("during {i}")).await;
        let took = started.elapsed();
        assert_eq!(resp.status(), 503, "database down: 503");
        let body: serde_json::Value = resp.json().await.expect("json envelope");
        assert_eq!(body["error"]["code"], "database_unavailable");
        assert!(took < Duration::from_secs(5), "no hung request: {took:?}");
    }
    let health = client
        .get(format!("{base}/v1/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        api.is_running() && worker.is_running(),
        "both processes survive the outage"
    );

    cluster.start();
    // The API reconnects by itself: the first accepted request after the restart.
    let first_after = eventually(Duration::from_secs(30), "the API to reconnect", || async {
        let resp = post("after 0".into()).await;
        if resp.status() == 202 {
            Some(resp.json::<serde_json::Value>().await.expect("json")["job_id"].clone())
        } else {
            None
        }
    })
    .await;
    accepted.push(first_after);
    for i in 1..3 {
        let resp = post(format!("after {i}")).await;
        assert_eq!(resp.status(), 202);
        accepted.push(resp.json::<serde_json::Value>().await.expect("json")["job_id"].clone());
    }
    // The worker reconnects by itself and every accepted job trains.
    for id in &accepted {
        let id: uuid::Uuid = serde_json::from_value(id.clone()).expect("uuid");
        eventually(
            Duration::from_secs(60),
            "every accepted job to succeed",
            || async {
                let j = store.get_job(id).await.ok()??;
                assert_ne!(j.status, JobStatus::Failed, "{j:?}");
                (j.status == JobStatus::Succeeded).then_some(())
            },
        )
        .await;
    }
    let all = store.status_counts().await.expect("counts");
    assert_eq!(
        all,
        vec![(JobStatus::Succeeded, accepted.len() as i64)],
        "nothing else was enqueued"
    );
    drop(store);
    drop(worker);
    drop(api);
    drop(cluster);
}

/// Claims and completions commit without waiting for their WAL flush: a crash can undo
/// them. An undone claim leaves the job queued, and the worker that went on with it is
/// fenced out at publish; an undone completion leaves the job running until its lease runs
/// out, and the retry resumes after the version it published. Either way the job trains
/// once and yields one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_undone_by_a_crash_still_train_once() {
    // The WAL writer waits 10 s between writes and nothing else commits, so what committed
    // without a flush is still in the WAL buffers when the server is killed.
    let cluster = Cluster::create("-c wal_writer_delay=10s -c autovacuum=off");
    let url = cluster.url();
    let connect = || async {
        let store: SharedStore = Arc::new(PgStore::connect(&url, None, 2).await.expect("store"));
        store
    };
    let store = connect().await;
    store.migrate().await.expect("migrate");
    store.create_lora(&lora("a")).await.expect("lora");
    let j = job("a", 1);
    store.enqueue(&j).await.expect("enqueue");
    let first = claim(&store, "w1").await;
    assert_eq!(first.job.attempt, 1);

    cluster.crash_and_restart();
    let store = connect().await;
    let after = store.get_job(j.id).await.expect("get").expect("job");
    assert_eq!(
        (after.status, after.attempt),
        (JobStatus::Queued, 0),
        "the enqueue waited for its flush and is kept; the claim did not and is undone"
    );
    assert!(
        !store
            .publish(&first.lease(), &version(1))
            .await
            .expect("publish"),
        "the worker of the undone claim cannot publish"
    );
    // Claimed again at the same attempt, even by a process with the same worker id (an old
    // one in its shutdown grace beside a new one): the first lease stays fenced out.
    let second = claimed(&store, "w1", Duration::from_secs(3)).await;
    assert_eq!(second.job.attempt, 1, "the undone attempt is claimed again");
    assert!(!store
        .publish(&first.lease(), &version(1))
        .await
        .expect("publish"));
    assert!(store
        .publish(&second.lease(), &version(1))
        .await
        .expect("publish"));
    assert!(store
        .complete(&second.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));

    cluster.crash_and_restart();
    let store = connect().await;
    let after = store.get_job(j.id).await.expect("get").expect("job");
    assert_eq!(
        (after.status, after.published_version),
        (JobStatus::Running, Some(1)),
        "the publish waited for its flush and is kept; the completion did not and is undone"
    );
    assert!(!store
        .complete(&first.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    // The worker of the undone completion has moved on; its lease runs out.
    eventually(Duration::from_secs(30), "the lease to run out", || async {
        let reaped = store.reap_expired(FAST_RETRY).await.expect("reap");
        (reaped.requeued == 1).then_some(())
    })
    .await;
    let resumed = eventually(Duration::from_secs(5), "the retry", || async {
        store.claim(&claim_request("w3")).await.expect("claim")
    })
    .await;
    assert_eq!(
        resumed.job.published_version,
        Some(1),
        "the retry resumes after the version it published (no second training)"
    );
    assert!(store
        .complete(&resumed.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    let done = store.get_job(j.id).await.expect("get").expect("job");
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(
        store
            .get_lora("a")
            .await
            .expect("lora")
            .map(|l| l.current_version),
        Some(1),
        "one job, one version"
    );

    // On a job's last attempt the completion waits for its flush: undone, it would leave
    // the reaper no attempt to resume with, and a job seen `succeeded` would end `failed`.
    let mut last = job("a", 1);
    last.max_attempts = 1;
    store.enqueue(&last).await.expect("enqueue");
    let only = claim(&store, "w4").await;
    assert!(store
        .publish(&only.lease(), &version(2))
        .await
        .expect("publish"));
    assert!(store
        .complete(&only.lease(), &serde_json::json!({}), None)
        .await
        .expect("complete"));
    cluster.crash_and_restart();
    let store = connect().await;
    let after = store.get_job(last.id).await.expect("get").expect("job");
    assert_eq!(after.status, JobStatus::Succeeded, "kept through the crash");
}
