//! One struct per area of the configuration, each field with its default and its
//! environment variable; [`super::Config`] holds one of each.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::string_or_list;

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
    /// header, answering CLaaS's 200 body when it finishes (as CLaaS's clients expect) or
    /// 202 past it; 0 answers 202 at once. Default 120 (CLaaS's lock timeout). Env
    /// `CLAAS_FEEDBACK_DEFAULT_WAIT_S`.
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
    /// Whether requests need an API key. Default `auto`. Env `CLAAS_API_AUTH`.
    #[serde(default)]
    pub auth: AuthMode,
    /// While the API is open (no key), the `Host` names it answers besides `localhost`,
    /// `127.0.0.1`, `[::1]` and `server.host`: a web page that rebinds its own name to this
    /// address is refused. Env `CLAAS_ALLOWED_HOSTS` (comma-separated).
    #[serde(deserialize_with = "string_or_list", default)]
    pub allowed_hosts: Vec<String>,
    /// Feedback requests one API process holds open while their jobs run (`Prefer: wait`
    /// or `feedback_default_wait_s`); more get 503 with `Retry-After` and enqueue nothing.
    /// Default 10000. Env `CLAAS_MAX_WAITING_FEEDBACK`.
    #[serde(default = "default_max_waiting")]
    pub max_waiting_feedback: usize,
    /// LoRAs one API key may create or overwrite per hour, per API process (0: no limit;
    /// an open API has no keys and no limit). Default 100.
    /// Env `CLAAS_MAX_LORA_INITS_PER_KEY_PER_HOUR`.
    #[serde(default = "default_lora_inits")]
    pub max_lora_inits_per_key_per_hour: usize,
    /// Seconds a request may take to start its answer, for routes without a class of their
    /// own (feedback and deletion wait `feedback_max_wait_s` + 30; inference and adapter
    /// transfers 600); past it, 504. Default 30. Env `CLAAS_REQUEST_TIMEOUT_S`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: f64,
    /// Seconds a request body may take to arrive; past it, 408. Default 30.
    /// Env `CLAAS_REQUEST_BODY_TIMEOUT_S`.
    #[serde(default = "default_request_timeout")]
    pub request_body_timeout_s: f64,
}

fn default_request_timeout() -> f64 {
    30.0
}

fn default_lora_inits() -> usize {
    100
}

fn default_max_waiting() -> usize {
    10_000
}

/// Whether the API asks for keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Open until the first key is created (or while `CLAAS_ADMIN_KEY` is unset and no key
    /// ever existed); closed from then on, even when every key is revoked.
    #[default]
    Auto,
    /// Open to anyone who can reach it, keys or not (logged as a warning at start-up).
    Open,
}

fn default_cache_total() -> usize {
    10_000
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
    /// Pool size of an API process (Postgres). Default 16. Env `CLAAS_DB_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// Pool size of a worker process (Postgres): its job, its lease heartbeat and its
    /// claim loop share it, and it closes connections idle for 50 ms, so an idle or
    /// training worker holds none. Default 2. Env `CLAAS_DB_WORKER_MAX_CONNECTIONS`.
    pub worker_max_connections: u32,
    /// Workers that keep a `LISTEN` connection for instant wake-ups, fleet-wide (per
    /// database schema); the others poll every `queue.poll_interval_ms`. 0: every worker
    /// polls (for PgBouncer in transaction mode, where `LISTEN` does not work). Default 8.
    /// Env `CLAAS_DB_MAX_LISTENERS`.
    pub max_listeners: u32,
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

/// Where LoRAs are trained and served (CLaaS's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// This fleet's workers train (`worker.executor`), vLLM or the embedded engine serves.
    #[default]
    Local,
    /// Tinker trains and samples (`tinker.*`): workers need no GPU and no model weights,
    /// versions are Tinker checkpoints, chat goes to Tinker's sampler.
    Tinker,
}

/// Tinker, with `mode: tinker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinkerConfig {
    /// The base model as Tinker names it; every LoRA is trained on it, and its
    /// `tokenizer.json` (a directory, a preset, or from the Hub) renders prompts.
    /// Default `Qwen/Qwen3-30B-A3B`. CLaaS key `tinker_base_model`; env `CLAAS_TINKER_BASE_MODEL`.
    pub base_model: String,
    /// Env `TINKER_API_KEY` or `CLAAS_TINKER_API_KEY`; required with `mode: tinker`.
    pub api_key: Option<String>,
    /// Tinker's endpoint; default the SDK's. Env `TINKER_BASE_URL`.
    pub base_url: Option<String>,
    /// A CLaaS `tinker_state.json` for `claas tinker import`. CLaaS key `tinker_state_path`;
    /// env `CLAAS_TINKER_STATE_PATH`.
    pub state_path: Option<PathBuf>,
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
    /// CLaaS calls it `local_fs`.
    #[serde(alias = "local_fs")]
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
    /// Completions kept for feedback per caller (API key; everyone together on an open
    /// API). Default 100. Env `CLAAS_COMPLETION_CACHE_SIZE`.
    pub completion_cache_size: usize,
    /// Completions kept for feedback in all, every caller together. Default 10000.
    /// Env `CLAAS_COMPLETION_CACHE_TOTAL`.
    #[serde(default = "default_cache_total")]
    pub completion_cache_total: usize,
    /// How long a completion stays available for feedback. Default 3600 (CLaaS's fixed
    /// TTL). Env `CLAAS_COMPLETION_CACHE_TTL_S`.
    pub completion_cache_ttl_s: u64,
    /// Redis for the shared completion cache; none = in process. Env `REDIS_URL`.
    pub redis_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where workers write one JSON record per training step (README "Feedback log").
    /// Default `<data_dir>/feedback` (`./data/feedback`, as CLaaS); an empty path writes
    /// none. Env `FEEDBACK_LOG_DIR`.
    pub feedback_log_dir: Option<PathBuf>,
    /// OTLP collector; none = traces off. Env `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
}
