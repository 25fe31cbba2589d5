//! Helpers for end-to-end tests: real `claas` processes against a real database.

#![allow(dead_code)]

pub mod throwaway_pg;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claas_testutil::TempDir;

/// A child process that is killed when dropped; its stderr goes to a log file that is
/// printed if the test fails. Its directories (the log's, and the data directory of
/// [`start_dev`]) are removed after it is killed and its log printed.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    scratch: TempDir,
    data: Option<TempDir>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {}", self.name);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.log_text());
        }
    }
}

/// Starts `claas <args>` with exactly the given environment on top of PATH and RUST_LOG.
pub fn spawn(name: &str, args: &[&str], env: &[(String, String)]) -> Proc {
    let scratch = claas_testutil::tempdir(&format!("e2e-{name}"));
    let log = scratch.join("stderr.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_claas"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,claas_worker=debug")
        // These tests are about the queue and processes, not training: they use the
        // simulated executor unless a test says otherwise.
        .env("CLAAS_WORKER_EXECUTOR", "simulated")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    if !env
        .iter()
        .any(|(k, _)| k == "CLAAS_DATA_DIR" || k == "FEEDBACK_LOG_DIR")
    {
        // Not the working directory's ./data/feedback.
        cmd.env("FEEDBACK_LOG_DIR", scratch.join("feedback"));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn claas");
    Proc {
        name: name.to_string(),
        child,
        log,
        scratch,
        data: None,
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Polls `f` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `GET {base}/v1/health` answers at all.
pub async fn wait_http(base: &str) {
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the API to listen", || {
        let client = client.clone();
        async move {
            client
                .get(format!("{base}/v1/health"))
                .send()
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One feedback item with an inline rollout.
pub fn feedback(lora_id: &str, text: &str) -> serde_json::Value {
    serde_json::json!({"requests": [{
        "lora_id": lora_id,
        "prompt": "Explain recursion",
        "response": "Recursion is when a function calls itself.",
        "feedback": text,
        "prompt_token_ids": [1, 2, 3, 4],
        "response_token_ids": [5, 6, 7],
        "response_logprobs": [-0.5, -0.7, -0.2],
        "system_prompt": "You are a teacher."
    }]})
}

/// Starts `claas dev` (the candle trainer, SQLite and files in a fresh directory) on a
/// free port and waits until it answers; returns the process, its base URL and its data
/// directory (the process owns it: it is removed when the process is dropped).
pub async fn start_dev(name: &str) -> (Proc, String, std::path::PathBuf) {
    let owned = claas_testutil::tempdir(&format!("{name}-e2e"));
    let dir = owned.to_path_buf();
    let port = free_port().to_string();
    let data = dir.display().to_string();
    let mut dev = spawn(
        "dev",
        &["dev"],
        &env(&[
            ("CLAAS_API_PORT", &port),
            ("CLAAS_DATA_DIR", &data),
            ("CLAAS_LORA_ROOT", &format!("{data}/loras")),
            ("DATABASE_URL", &format!("sqlite://{data}/claas.db")),
            ("CLAAS_WORKER_EXECUTOR", "candle"),
        ]),
    );
    dev.data = Some(owned);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;
    (dev, base, dir)
}

/// A fake vLLM 0.15 serving `model_id` with the tiny checkpoint's byte tokenizer.
pub async fn fake_vllm(model_id: &str) -> claas_fake_vllm::FakeVllm {
    claas_fake_vllm::FakeVllm::start(claas_fake_vllm::Options {
        version: claas_fake_vllm::Version::V015,
        served_model_name: model_id.to_owned(),
        tokenizer: claas_fake_vllm::Tokenizer::TinyBytes,
        max_lora_rank: 64,
        ..claas_fake_vllm::Options::default()
    })
    .await
}
