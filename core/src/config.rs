//! Typed configuration, read once at start-up: built-in defaults (the fleet profile), then a
//! YAML profile (`configs/local.yaml` for `claas dev`, `configs/fleet.yaml` otherwise), then
//! an optional `--config` file, then the environment under the names CLaaS users know
//! ([`ENV_NAMES`]). A bad value stops start-up with a message naming the field.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// The embedded profile, compiled in so `claas dev` works from any directory.
pub const LOCAL_PROFILE: &str = include_str!("../../configs/local.yaml");
/// The fleet profile (the seed's defaults).
pub const FLEET_PROFILE: &str = include_str!("../../configs/fleet.yaml");

/// Environment variable → config field. The README's settings table lists the same pairs.
pub const ENV_NAMES: &[(&str, &str)] = &[
    ("CLAAS_DATA_DIR", "data_dir"),
    ("CLAAS_API_HOST", "server.host"),
    ("CLAAS_API_PORT", "server.port"),
    ("CLAAS_MAX_BODY_BYTES", "server.max_body_bytes"),
    (
        "CLAAS_FEEDBACK_DEFAULT_WAIT_S",
        "server.feedback_default_wait_s",
    ),
    ("CLAAS_FEEDBACK_MAX_WAIT_S", "server.feedback_max_wait_s"),
    ("DATABASE_URL", "database.url"),
    ("CLAAS_DB_MAX_CONNECTIONS", "database.max_connections"),
    ("FEEDBACK_LOCK_TIMEOUT_S", "queue.lock_timeout_s"),
    (
        "CLAAS_FEEDBACK_MAX_BATCH_SIZE",
        "queue.feedback_max_batch_size",
    ),
    ("CLAAS_JOB_MAX_ATTEMPTS", "queue.max_attempts"),
    ("CLAAS_JOB_RETENTION_DAYS", "queue.job_retention_days"),
    ("CLAAS_QUEUE_POLL_INTERVAL_MS", "queue.poll_interval_ms"),
    ("CLAAS_RETRY_BASE_S", "queue.retry_base_s"),
    ("CLAAS_RETRY_MAX_S", "queue.retry_max_s"),
    ("CLAAS_WORKER_ID", "worker.id"),
    ("CLAAS_WORKER_BASE_MODELS", "worker.base_models"),
    ("CLAAS_WORKER_EXECUTOR", "worker.executor"),
    ("CLAAS_SIMULATED_STEP_MS", "worker.simulated_step_ms"),
    ("CLAAS_TRAINER_DEVICE", "trainer.device"),
    ("CLAAS_TRAINER_RESIDENCY", "trainer.residency"),
    ("CLAAS_TRAINER_MAX_SEQ_LEN", "trainer.max_seq_len"),
    ("CLAAS_WORKER_SHUTDOWN_GRACE_S", "worker.shutdown_grace_s"),
    ("CLAAS_WORKER_DRAIN_GRACE_MS", "worker.drain_grace_ms"),
    (
        "FEEDBACK_DRAIN_TIMEOUT_S",
        "worker.feedback_drain_timeout_s",
    ),
    (
        "FEEDBACK_MIN_FREE_VRAM_GB",
        "worker.feedback_min_free_vram_gb",
    ),
    (
        "FEEDBACK_SLEEP_VERIFY_TIMEOUT_S",
        "worker.feedback_sleep_verify_timeout_s",
    ),
    (
        "FEEDBACK_WAKE_ON_FAILURE",
        "worker.feedback_wake_on_failure",
    ),
    ("CLAAS_ADMIN_KEY", "server.admin_key"),
    ("CLAAS_METRICS_TOKEN", "server.metrics_token"),
    ("CLAAS_SESSION_SECRET", "server.session_secret"),
    (
        "CLAAS_MAX_QUEUED_JOBS_PER_KEY",
        "server.max_queued_jobs_per_key",
    ),
    ("VLLM_BASE_URL", "vllm.base_url"),
    ("VLLM_API_KEY", "vllm.api_key"),
    ("VLLM_MAX_LORA_RANK", "vllm.max_lora_rank"),
    ("CLAAS_VLLM_SLEEP_MODE", "vllm.sleep_mode"),
    ("CLAAS_VLLM_BACKENDS", "vllm.backends"),
    ("CLAAS_VLLM_UNAVAILABLE_WAIT_S", "vllm.unavailable_wait_s"),
    ("CLAAS_BASE_MODEL_ID", "model.base_model_id"),
    (
        "CLAAS_ALLOWED_INIT_BASE_MODELS",
        "model.allowed_init_base_models",
    ),
    ("CLAAS_STORAGE_BACKEND", "storage.backend"),
    ("CLAAS_LORA_ROOT", "storage.lora_root"),
    ("CLAAS_STORAGE_URL", "storage.url"),
    (
        "CLAAS_ADAPTER_VERSIONS_KEEP",
        "storage.adapter_versions_keep",
    ),
    ("CLAAS_COMPLETION_CACHE_SIZE", "cache.completion_cache_size"),
    (
        "CLAAS_COMPLETION_CACHE_TTL_S",
        "cache.completion_cache_ttl_s",
    ),
    ("REDIS_URL", "cache.redis_url"),
    ("FEEDBACK_LOG_DIR", "telemetry.feedback_log_dir"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
];

/// Names CLaaS documents that have no meaning in claas-rs: accepted, logged once as ignored.
pub const IGNORED_ENV_NAMES: &[(&str, &str)] = &[
    (
        "CLAAS_ATTN_IMPLEMENTATION",
        "the candle trainer has one attention implementation; there is nothing to choose",
    ),
    ("CLAAS_TINKER_API_KEY", "claas-rs has no Tinker engine"),
    ("CLAAS_TINKER_STATE_PATH", "claas-rs has no Tinker engine"),
    (
        "CLAAS_CONFIG_NAME",
        "profiles are chosen by the subcommand and --config",
    ),
];

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the embedded default keeps its database, adapters and model. Default `./data`.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub trainer: TrainerConfig,
    pub vllm: VllmConfig,
    pub model: ModelConfig,
    pub storage: StorageConfig,
    pub cache: CacheConfig,
    pub telemetry: TelemetryConfig,
}

/// The HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Bind address. Default `0.0.0.0`. Env `CLAAS_API_HOST`.
    pub host: String,
    /// Port. Default 8080. Env `CLAAS_API_PORT`.
    pub port: u16,
    /// Request bodies over this many bytes get 413. Default 8 MiB. Env `CLAAS_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// Seconds `POST /v1/feedback` waits for the job when the request has no `Prefer`
    /// header; 0 answers 202 at once. Default 0. Env `CLAAS_FEEDBACK_DEFAULT_WAIT_S`.
    pub feedback_default_wait_s: u64,
    /// Upper bound on `Prefer: wait=N`. Default 600. Env `CLAAS_FEEDBACK_MAX_WAIT_S`.
    pub feedback_max_wait_s: u64,
    /// A bootstrap admin API key (for first start, before `claas keys create`). Env
    /// `CLAAS_ADMIN_KEY`. None: keys come from the database only.
    #[serde(default)]
    pub admin_key: Option<String>,
    /// A token that may read `/metrics` when keys are on. Env `CLAAS_METRICS_TOKEN`.
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// Signs dashboard session cookies and CSRF tokens; every API replica needs the same
    /// one. Env `CLAAS_SESSION_SECRET`. None: a random secret per process (sessions then
    /// hold on one replica only, and end when it restarts).
    #[serde(default)]
    pub session_secret: Option<String>,
    /// Queued jobs one API key may have before feedback answers 429 (0: no limit).
    /// Default 1000. Env `CLAAS_MAX_QUEUED_JOBS_PER_KEY`.
    #[serde(default = "default_max_queued")]
    pub max_queued_jobs_per_key: i64,
}

fn default_max_queued() -> i64 {
    1000
}

/// The queue database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite:…`. Env `DATABASE_URL`.
    pub url: String,
    /// Pool size per process (Postgres). Default 16. Env `CLAAS_DB_MAX_CONNECTIONS`.
    pub max_connections: u32,
}

/// Queue behaviour shared by API and workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Lease of a running job, renewed by heartbeats every third of it. Default 120.
    /// Env `FEEDBACK_LOCK_TIMEOUT_S`.
    pub lock_timeout_s: f64,
    /// Most samples one training batch takes by coalescing queued jobs. Default 8.
    /// Env `CLAAS_FEEDBACK_MAX_BATCH_SIZE`.
    pub feedback_max_batch_size: i32,
    /// Attempts before a job fails for good. Default 3. Env `CLAAS_JOB_MAX_ATTEMPTS`.
    pub max_attempts: i32,
    /// Finished jobs and their events older than this are pruned. Default 30.
    /// Env `CLAAS_JOB_RETENTION_DAYS`.
    pub job_retention_days: f64,
    /// Fallback poll when no notification arrives. Default 2000. Env `CLAAS_QUEUE_POLL_INTERVAL_MS`.
    pub poll_interval_ms: u64,
    /// First retry delay; doubles per attempt with jitter. Default 5. Env `CLAAS_RETRY_BASE_S`.
    pub retry_base_s: f64,
    /// Longest retry delay. Default 600. Env `CLAAS_RETRY_MAX_S`.
    pub retry_max_s: f64,
}

/// Which implementation runs a job's phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// Trains with the candle SDPO trainer on the base model (`model.base_model_id`).
    Candle,
    /// Walks every phase and publishes a version record without touching a GPU, vLLM or a
    /// model: for queue tests and the queue benchmark.
    Simulated,
}

/// Where the trainer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainerDevice {
    /// CUDA device 0 when the binary was built with CUDA and a GPU is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Where the base model waits between jobs (it is read from disk once per process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    /// Stays on the GPU (vLLM must be configured with less memory).
    Gpu,
    /// Kept in host RAM and copied to the GPU when a job starts.
    Host,
    /// Read from disk for every job (the reference CLaaS's behaviour).
    Disk,
}

/// The candle trainer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// `auto`, `cpu` or `cuda`. Default `auto`. Env `CLAAS_TRAINER_DEVICE`.
    pub device: TrainerDevice,
    /// `gpu`, `host` or `disk`. Default `host`. Env `CLAAS_TRAINER_RESIDENCY`.
    pub residency: Residency,
    /// Longest prompt + response a sample may have. Default 8192. Env `CLAAS_TRAINER_MAX_SEQ_LEN`.
    pub max_seq_len: usize,
}

/// The worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Stable id; default `<hostname>-<pid>`. Env `CLAAS_WORKER_ID`.
    pub id: Option<String>,
    /// Base models this worker serves; default `[model.base_model_id]`.
    /// Env `CLAAS_WORKER_BASE_MODELS` (comma-separated).
    #[serde(deserialize_with = "string_or_list")]
    pub base_models: Vec<String>,
    /// `candle` (train) or `simulated`. Default `candle`. Env `CLAAS_WORKER_EXECUTOR`.
    pub executor: ExecutorKind,
    /// How long the simulated executor spends in each phase. Default 50. Env `CLAAS_SIMULATED_STEP_MS`.
    pub simulated_step_ms: u64,
    /// On SIGTERM, how long a running job may take to finish before it is handed back.
    /// Default 30. Env `CLAAS_WORKER_SHUTDOWN_GRACE_S`.
    pub shutdown_grace_s: f64,
    /// Default 30. Env `FEEDBACK_DRAIN_TIMEOUT_S`.
    pub feedback_drain_timeout_s: f64,
    /// After marking itself draining, how long the worker waits before polling vLLM's
    /// queue, so requests the API routed just before it saw the mark have arrived and are
    /// counted. Default 50. Env `CLAAS_WORKER_DRAIN_GRACE_MS`.
    pub drain_grace_ms: u64,
    /// Default 20. Env `FEEDBACK_MIN_FREE_VRAM_GB`.
    pub feedback_min_free_vram_gb: f64,
    /// Default 30. Env `FEEDBACK_SLEEP_VERIFY_TIMEOUT_S`.
    pub feedback_sleep_verify_timeout_s: f64,
    /// Wake vLLM after a failure even when the request said not to. Default true.
    /// Env `FEEDBACK_WAKE_ON_FAILURE`.
    pub feedback_wake_on_failure: bool,
}

/// The local vLLM a worker orchestrates and the API proxies to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VllmConfig {
    /// None = no vLLM (embedded inference). Env `VLLM_BASE_URL`.
    pub base_url: Option<String>,
    /// Env `VLLM_API_KEY`.
    pub api_key: Option<String>,
    /// The vLLM's `--max-lora-rank`: init refuses a larger `lora_r` when a vLLM is
    /// configured. Default 32 (CLaaS's launch script). Env `VLLM_MAX_LORA_RANK`.
    pub max_lora_rank: i32,
    /// How the worker quiets vLLM for training: `sleep` (`POST /sleep?level=N`, frees GPU
    /// memory) or `pause` (`POST /pause` + `/resume`, what CLaaS calls: stops generation but
    /// frees nothing). Default `sleep`. Env `CLAAS_VLLM_SLEEP_MODE`.
    pub sleep_mode: VllmSleepMode,
    /// The vLLMs the API proxies inference to (one per GPU node, each at the URL its
    /// worker registers as `VLLM_BASE_URL`). Empty = `[base_url]`. Env
    /// `CLAAS_VLLM_BACKENDS` (comma-separated).
    #[serde(deserialize_with = "string_or_list", default)]
    pub backends: Vec<String>,
    /// How long a chat request waits for a backend whose worker is not draining or
    /// sleeping before it gets 503 with `Retry-After`. Default 30. Env
    /// `CLAAS_VLLM_UNAVAILABLE_WAIT_S`.
    pub unavailable_wait_s: f64,
}

impl VllmConfig {
    /// The backends the API proxies to.
    pub fn proxy_backends(&self) -> Vec<String> {
        if self.backends.is_empty() {
            self.base_url.iter().cloned().collect()
        } else {
            self.backends.clone()
        }
    }
}

/// See [`VllmConfig::sleep_mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VllmSleepMode {
    Sleep,
    Pause,
}

/// The base model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Default `Qwen/Qwen3-8B`. Env `CLAAS_BASE_MODEL_ID`.
    pub base_model_id: String,
    /// Base models `POST /v1/lora/init` accepts. Default `[base_model_id]`.
    /// Env `CLAAS_ALLOWED_INIT_BASE_MODELS` (comma-separated).
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_init_base_models: Vec<String>,
}

/// Where adapter versions are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    Local,
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Env `CLAAS_STORAGE_BACKEND` (`local` or `s3`). Default `local`.
    pub backend: StorageBackend,
    /// Root directory of local adapters. Default `/loras`. Env `CLAAS_LORA_ROOT`.
    pub lora_root: PathBuf,
    /// Object store URL for `s3` (e.g. `s3://bucket/prefix`). Env `CLAAS_STORAGE_URL`.
    pub url: Option<String>,
    /// Versions whose files are kept per LoRA (besides version 0 and pinned ones): older
    /// ones' files are removed after each publish. Default 10. Env
    /// `CLAAS_ADAPTER_VERSIONS_KEEP`.
    pub adapter_versions_keep: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Completions kept for feedback. Default 100. Env `CLAAS_COMPLETION_CACHE_SIZE`.
    pub completion_cache_size: usize,
    /// How long a completion stays available for feedback. Default 3600 (CLaaS's fixed
    /// TTL). Env `CLAAS_COMPLETION_CACHE_TTL_S`.
    pub completion_cache_ttl_s: u64,
    /// Redis for the shared completion cache; none = in process. Env `REDIS_URL`.
    pub redis_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Default `./data/feedback`. Env `FEEDBACK_LOG_DIR`.
    pub feedback_log_dir: PathBuf,
    /// OTLP collector; none = traces off. Env `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
}

impl Default for Config {
    /// The fleet profile: the reference CLaaS's defaults.
    fn default() -> Self {
        let base_model = "Qwen/Qwen3-8B".to_string();
        Config {
            data_dir: PathBuf::from("./data"),
            server: ServerConfig {
                host: "0.0.0.0".into(),
                port: 8080,
                max_body_bytes: 8 << 20,
                feedback_default_wait_s: 0,
                feedback_max_wait_s: 600,
                admin_key: None,
                metrics_token: None,
                session_secret: None,
                max_queued_jobs_per_key: 1000,
            },
            database: DatabaseConfig {
                url: "postgres://postgres@localhost/claas".into(),
                max_connections: 16,
            },
            queue: QueueConfig {
                lock_timeout_s: 120.0,
                feedback_max_batch_size: 8,
                max_attempts: 3,
                job_retention_days: 30.0,
                poll_interval_ms: 2000,
                retry_base_s: 5.0,
                retry_max_s: 600.0,
            },
            worker: WorkerConfig {
                id: None,
                base_models: vec![],
                executor: ExecutorKind::Candle,
                simulated_step_ms: 50,
                shutdown_grace_s: 30.0,
                feedback_drain_timeout_s: 30.0,
                drain_grace_ms: 50,
                feedback_min_free_vram_gb: 20.0,
                feedback_sleep_verify_timeout_s: 30.0,
                feedback_wake_on_failure: true,
            },
            trainer: TrainerConfig {
                device: TrainerDevice::Auto,
                residency: Residency::Host,
                max_seq_len: 8192,
            },
            vllm: VllmConfig {
                base_url: Some("http://127.0.0.1:8000".into()),
                api_key: None,
                max_lora_rank: 32,
                sleep_mode: VllmSleepMode::Sleep,
                backends: vec![],
                unavailable_wait_s: 30.0,
            },
            model: ModelConfig {
                base_model_id: base_model,
                allowed_init_base_models: vec![],
            },
            storage: StorageConfig {
                backend: StorageBackend::Local,
                lora_root: PathBuf::from("/loras"),
                url: None,
                adapter_versions_keep: 10,
            },
            cache: CacheConfig {
                completion_cache_size: 100,
                completion_cache_ttl_s: 3600,
                redis_url: None,
            },
            telemetry: TelemetryConfig {
                feedback_log_dir: PathBuf::from("./data/feedback"),
                otlp_endpoint: None,
            },
        }
    }
}

/// Which built-in profile to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `configs/local.yaml`: one machine, SQLite, no vLLM.
    Local,
    /// `configs/fleet.yaml`: Postgres, vLLM, GPU workers.
    Fleet,
}

/// Accepts `[a, b]` or `"a,b"` (environment variables carry lists comma-separated).
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Either::Many(v) => v,
    })
}

impl Config {
    /// Loads the profile, the optional file and the environment, then validates.
    pub fn load(profile: Profile, file: Option<&Path>) -> Result<Config> {
        Self::load_from(profile, file, Env::raw())
    }

    /// As [`Config::load`] with an explicit environment source (tests use a fixed one).
    pub fn load_from(profile: Profile, file: Option<&Path>, env: Env) -> Result<Config> {
        let yaml = match profile {
            Profile::Local => LOCAL_PROFILE,
            Profile::Fleet => FLEET_PROFILE,
        };
        let mut fig =
            Figment::from(Serialized::defaults(Config::default())).merge(Yaml::string(yaml));
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Yaml::file(path));
        }
        let env = env
            .filter_map(|key| {
                ENV_NAMES
                    .iter()
                    .find(|(name, _)| key.as_str().eq_ignore_ascii_case(name))
                    .map(|(_, field)| (*field).into())
            })
            .split("__");
        fig = fig.merge(env);
        let mut cfg: Config = fig.extract().map_err(|e| {
            let all: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
            Error::Config(all.join("; "))
        })?;
        cfg.fill_derived();
        cfg.validate()?;
        Ok(cfg)
    }

    fn fill_derived(&mut self) {
        if self.worker.base_models.is_empty() {
            self.worker.base_models = vec![self.model.base_model_id.clone()];
        }
        if self.model.allowed_init_base_models.is_empty() {
            self.model.allowed_init_base_models = vec![self.model.base_model_id.clone()];
        }
        if self.vllm.base_url.as_deref() == Some("") {
            self.vllm.base_url = None;
        }
    }

    /// Range checks serde cannot express; the message names the field and what is accepted.
    pub fn validate(&self) -> Result<()> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                bad.push(msg.to_string());
            }
        };
        let q = &self.queue;
        check(
            q.lock_timeout_s.is_finite() && q.lock_timeout_s >= 1.0,
            "queue.lock_timeout_s (FEEDBACK_LOCK_TIMEOUT_S) must be a number >= 1",
        );
        check((1..=1024).contains(&q.feedback_max_batch_size),
            "queue.feedback_max_batch_size (CLAAS_FEEDBACK_MAX_BATCH_SIZE) must be within [1, 1024]");
        check(
            (1..=100).contains(&q.max_attempts),
            "queue.max_attempts (CLAAS_JOB_MAX_ATTEMPTS) must be within [1, 100]",
        );
        check(
            q.job_retention_days.is_finite() && q.job_retention_days > 0.0,
            "queue.job_retention_days (CLAAS_JOB_RETENTION_DAYS) must be > 0",
        );
        check(
            q.poll_interval_ms >= 10,
            "queue.poll_interval_ms (CLAAS_QUEUE_POLL_INTERVAL_MS) must be >= 10",
        );
        check(
            q.retry_base_s.is_finite() && q.retry_base_s > 0.0 && q.retry_max_s >= q.retry_base_s,
            "queue.retry_base_s must be > 0 and queue.retry_max_s >= queue.retry_base_s",
        );
        let w = &self.worker;
        for (v, name) in [
            (
                w.shutdown_grace_s,
                "worker.shutdown_grace_s (CLAAS_WORKER_SHUTDOWN_GRACE_S)",
            ),
            (
                w.feedback_drain_timeout_s,
                "worker.feedback_drain_timeout_s (FEEDBACK_DRAIN_TIMEOUT_S)",
            ),
            (
                w.feedback_min_free_vram_gb,
                "worker.feedback_min_free_vram_gb (FEEDBACK_MIN_FREE_VRAM_GB)",
            ),
            (
                w.feedback_sleep_verify_timeout_s,
                "worker.feedback_sleep_verify_timeout_s (FEEDBACK_SLEEP_VERIFY_TIMEOUT_S)",
            ),
        ] {
            check(
                v.is_finite() && v >= 0.0,
                &format!("{name} must be a number >= 0"),
            );
        }
        check(
            !w.base_models.is_empty(),
            "worker.base_models must name at least one model",
        );
        check(
            [1, 8, 16, 32, 64, 128, 256, 320, 512].contains(&self.vllm.max_lora_rank),
            "vllm.max_lora_rank (VLLM_MAX_LORA_RANK) must be one of vLLM's ranks: 1, 8, 16, 32, 64, 128, 256, 320, 512",
        );
        check(
            (16..=1_048_576).contains(&self.trainer.max_seq_len),
            "trainer.max_seq_len (CLAAS_TRAINER_MAX_SEQ_LEN) must be within [16, 1048576]",
        );
        check(
            self.server.max_body_bytes >= 1024,
            "server.max_body_bytes (CLAAS_MAX_BODY_BYTES) must be >= 1024",
        );
        check(
            self.database.max_connections >= 1,
            "database.max_connections (CLAAS_DB_MAX_CONNECTIONS) must be >= 1",
        );
        check(
            self.cache.completion_cache_size >= 1,
            "cache.completion_cache_size (CLAAS_COMPLETION_CACHE_SIZE) must be >= 1",
        );
        check(
            self.vllm.unavailable_wait_s.is_finite() && self.vllm.unavailable_wait_s >= 0.0,
            "vllm.unavailable_wait_s (CLAAS_VLLM_UNAVAILABLE_WAIT_S) must be a number of seconds >= 0",
        );
        check(
            self.storage.adapter_versions_keep >= 1,
            "storage.adapter_versions_keep (CLAAS_ADAPTER_VERSIONS_KEEP) must be >= 1",
        );
        check(
            self.cache.completion_cache_ttl_s >= 1,
            "cache.completion_cache_ttl_s (CLAAS_COMPLETION_CACHE_TTL_S) must be >= 1",
        );
        let db = &self.database.url;
        check(
            db.starts_with("postgres://")
                || db.starts_with("postgresql://")
                || db.starts_with("sqlite:"),
            "database.url (DATABASE_URL) must start with postgres://, postgresql:// or sqlite:",
        );
        if self.storage.backend == StorageBackend::S3 {
            check(
                self.storage.url.is_some(),
                "storage.url (CLAAS_STORAGE_URL) is required when storage.backend is s3",
            );
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(bad.join("; ")))
        }
    }

    /// Environment names that are set but mean nothing here, with the reason (for one log line each).
    pub fn ignored_env() -> Vec<(&'static str, &'static str)> {
        IGNORED_ENV_NAMES
            .iter()
            .filter(|(name, _)| std::env::var_os(name).is_some())
            .copied()
            .collect()
    }
}

/// A figment error as one line naming the field and, when set from the environment, the
/// variable.
fn describe(e: &figment::Error) -> String {
    let field = e.path.join(".");
    let from_env = ENV_NAMES
        .iter()
        .find(|(_, f)| *f == field)
        .map(|(name, _)| format!(" (env {name})"))
        .unwrap_or_default();
    if field.is_empty() {
        e.kind.to_string()
    } else {
        format!("{field}{from_env}: {}", e.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `profile` with exactly `vars` as the environment.
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn load(profile: Profile, vars: &[(&str, &str)]) -> Result<Config> {
        let mut out = Err(Error::Config("jail did not run".into()));
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Config::load(profile, None);
            Ok(())
        });
        out
    }

    #[test]
    fn fleet_profile_keeps_the_reference_defaults() {
        let cfg = load(Profile::Fleet, &[]).expect("fleet profile loads");
        assert_eq!(cfg.queue.lock_timeout_s, 120.0);
        assert_eq!(cfg.worker.feedback_min_free_vram_gb, 20.0);
        assert_eq!(cfg.worker.feedback_drain_timeout_s, 30.0);
        assert_eq!(cfg.cache.completion_cache_size, 100);
        assert_eq!(cfg.model.base_model_id, "Qwen/Qwen3-8B");
        assert_eq!(cfg.server.port, 8080);
        assert!(cfg.worker.feedback_wake_on_failure);
        assert_eq!(cfg.vllm.base_url.as_deref(), Some("http://127.0.0.1:8000"));
    }

    #[test]
    fn local_profile_needs_no_services() {
        let cfg = load(Profile::Local, &[]).expect("local profile loads");
        assert!(cfg.database.url.starts_with("sqlite:"));
        assert_eq!(cfg.vllm.base_url, None);
        assert_eq!(cfg.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn environment_overrides_with_claas_names() {
        let cfg = load(
            Profile::Fleet,
            &[
                ("FEEDBACK_LOCK_TIMEOUT_S", "45"),
                ("CLAAS_API_PORT", "9000"),
                ("DATABASE_URL", "postgres://x@y/z"),
                ("CLAAS_ALLOWED_INIT_BASE_MODELS", "a/b, c/d"),
                ("FEEDBACK_WAKE_ON_FAILURE", "false"),
                ("CLAAS_FEEDBACK_MAX_BATCH_SIZE", "4"),
            ],
        )
        .expect("loads");
        assert_eq!(cfg.queue.lock_timeout_s, 45.0);
        assert_eq!(cfg.server.port, 9000);
        assert_eq!(cfg.database.url, "postgres://x@y/z");
        assert_eq!(cfg.model.allowed_init_base_models, ["a/b", "c/d"]);
        assert!(!cfg.worker.feedback_wake_on_failure);
        assert_eq!(cfg.queue.feedback_max_batch_size, 4);
    }

    #[test]
    fn a_bad_value_names_the_field_and_the_variable() {
        let err = load(Profile::Fleet, &[("CLAAS_API_PORT", "eighty")]).expect_err("rejected");
        let msg = err.to_string();
        assert!(
            msg.contains("server.port") && msg.contains("CLAAS_API_PORT"),
            "{msg}"
        );

        let err = load(Profile::Fleet, &[("CLAAS_STORAGE_BACKEND", "ftp")]).expect_err("rejected");
        let msg = err.to_string();
        assert!(
            msg.contains("storage.backend") && msg.contains("local") && msg.contains("s3"),
            "{msg}"
        );

        let err =
            load(Profile::Fleet, &[("CLAAS_FEEDBACK_MAX_BATCH_SIZE", "0")]).expect_err("rejected");
        assert!(err.to_string().contains("feedback_max_batch_size"), "{err}");

        let err = load(Profile::Fleet, &[("VLLM_MAX_LORA_RANK", "48")]).expect_err("rejected");
        assert!(
            err.to_string().contains("VLLM_MAX_LORA_RANK") && err.to_string().contains("320"),
            "{err}"
        );
        let err =
            load(Profile::Fleet, &[("CLAAS_TRAINER_RESIDENCY", "attic")]).expect_err("rejected");
        assert!(err.to_string().contains("trainer.residency"), "{err}");
    }
}
