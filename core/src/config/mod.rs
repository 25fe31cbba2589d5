//! Typed configuration, read once at start-up: built-in defaults (the fleet profile), then a
//! YAML profile (`configs/local.yaml` for `claas dev`, `configs/fleet.yaml` otherwise), then
//! one of CLaaS's profiles (`--config-name`), then an optional `--config` file, then the
//! environment under the names CLaaS users know ([`ENV_NAMES`]), then `key=value`
//! arguments. Files and arguments may use CLaaS's flat keys ([`claas`]). A bad value stops
//! start-up with a message naming the field.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

mod areas;
pub mod claas;
mod env;
pub use areas::*;
use env::env_dict;
pub use env::Environment;

/// The embedded profile, compiled in so `claas dev` works from any directory.
pub const LOCAL_PROFILE: &str = include_str!("../../../configs/local.yaml");
/// The fleet profile (the seed's defaults).
pub const FLEET_PROFILE: &str = include_str!("../../../configs/fleet.yaml");

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
    (
        "CLAAS_DB_WORKER_MAX_CONNECTIONS",
        "database.worker_max_connections",
    ),
    ("CLAAS_DB_MAX_LISTENERS", "database.max_listeners"),
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
    ("CLAAS_TINKER_BASE_MODEL", "tinker.base_model"),
    ("TINKER_API_KEY", "tinker.api_key"),
    ("CLAAS_TINKER_API_KEY", "tinker.api_key"),
    ("TINKER_BASE_URL", "tinker.base_url"),
    ("CLAAS_TINKER_STATE_PATH", "tinker.state_path"),
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
    ("CLAAS_API_AUTH", "server.auth"),
    ("CLAAS_ALLOWED_HOSTS", "server.allowed_hosts"),
    ("CLAAS_MAX_WAITING_FEEDBACK", "server.max_waiting_feedback"),
    (
        "CLAAS_MAX_LORA_INITS_PER_KEY_PER_HOUR",
        "server.max_lora_inits_per_key_per_hour",
    ),
    ("CLAAS_REQUEST_TIMEOUT_S", "server.request_timeout_s"),
    (
        "CLAAS_REQUEST_BODY_TIMEOUT_S",
        "server.request_body_timeout_s",
    ),
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
        "CLAAS_COMPLETION_CACHE_TOTAL",
        "cache.completion_cache_total",
    ),
    (
        "CLAAS_COMPLETION_CACHE_TTL_S",
        "cache.completion_cache_ttl_s",
    ),
    ("REDIS_URL", "cache.redis_url"),
    ("FEEDBACK_LOG_DIR", "telemetry.feedback_log_dir"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
];

/// CLaaS's variable choosing its training engine (`local`, `tinker`, `modal`), read as
/// `mode` is.
pub const DISTILL_EXECUTION_MODE: &str = "CLAAS_DISTILL_EXECUTION_MODE";

/// Names CLaaS documents that have no meaning in claas-rs: accepted, logged once as ignored.
pub const IGNORED_ENV_NAMES: &[(&str, &str)] = &[
    (
        "CLAAS_ATTN_IMPLEMENTATION",
        "the candle trainer has one attention implementation; there is nothing to choose",
    ),
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
    /// CLaaS settings that were accepted but mean nothing here, each with the reason: one
    /// log line each at start-up.
    #[serde(skip)]
    pub ignored: Vec<String>,
    /// `local` or `tinker`. Default `local`. Env `CLAAS_DISTILL_EXECUTION_MODE`.
    pub mode: Mode,
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
    pub tinker: TinkerConfig,
}

impl Default for Config {
    /// The fleet profile: the reference CLaaS's defaults.
    // Long: one struct literal, a field per setting in the README's table order.
    fn default() -> Self {
        let base_model = "Qwen/Qwen3-8B".to_string();
        Config {
            data_dir: PathBuf::from("./data"),
            ignored: vec![],
            mode: Mode::Local,
            server: ServerConfig {
                host: "0.0.0.0".into(),
                port: 8080,
                max_body_bytes: 8 << 20,
                feedback_default_wait_s: 120,
                feedback_max_wait_s: 600,
                admin_key: None,
                metrics_token: None,
                session_secret: None,
                max_queued_jobs_per_key: 1000,
                auth: AuthMode::Auto,
                allowed_hosts: vec![],
                max_waiting_feedback: 10_000,
                max_lora_inits_per_key_per_hour: 100,
                request_timeout_s: 30.0,
                request_body_timeout_s: 30.0,
            },
            database: DatabaseConfig {
                url: "postgres://postgres@localhost/claas".into(),
                max_connections: 16,
                worker_max_connections: 2,
                max_listeners: 8,
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
                completion_cache_total: 10_000,
                completion_cache_ttl_s: 3600,
                redis_url: None,
            },
            telemetry: TelemetryConfig {
                feedback_log_dir: None,
                otlp_endpoint: None,
            },
            tinker: TinkerConfig {
                base_model: "Qwen/Qwen3-30B-A3B".into(),
                api_key: None,
                base_url: None,
                state_path: None,
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

/// Where a process's settings come from besides its built-in profile and the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sources<'a> {
    /// `--config-name`: one of CLaaS's profiles, built in (`local`, `tinker`, `modal`).
    pub name: Option<&'a str>,
    /// `--config FILE`: this configuration's YAML, CLaaS's flat YAML, or both mixed.
    pub file: Option<&'a Path>,
    /// `key=value` arguments (Hydra style), applied last.
    pub overrides: &'a [String],
}

impl Config {
    /// Loads the profile, the optional file and the environment, then validates.
    pub fn load(profile: Profile, file: Option<&Path>) -> Result<Config> {
        let sources = Sources {
            file,
            ..Sources::default()
        };
        Self::load_from(profile, &sources, &Environment::Process)
    }

    /// Loads the profile and `sources` with the process's environment, then validates.
    pub fn load_sources(profile: Profile, sources: &Sources<'_>) -> Result<Config> {
        Self::load_from(profile, sources, &Environment::Process)
    }

    /// As [`Config::load_sources`] with an explicit environment (tests use a fixed one, so
    /// they never change the process's while other threads read it).
    pub fn load_from(profile: Profile, sources: &Sources<'_>, env: &Environment) -> Result<Config> {
        let yaml = match profile {
            Profile::Local => LOCAL_PROFILE,
            Profile::Fleet => FLEET_PROFILE,
        };
        let mut fig =
            Figment::from(Serialized::defaults(Config::default())).merge(Yaml::string(yaml));
        let mut ignored = Vec::new();
        let mut add = |fig: Figment, t: claas::Translated| {
            ignored.extend(t.ignored.into_iter().map(|(k, why)| format!("{k}: {why}")));
            fig.merge(Serialized::globals(t.dict))
        };
        if let Some(name) = sources.name {
            let text = claas::profile(name)?;
            let origin = format!("--config-name {name}");
            fig = add(
                fig,
                claas::translate(read_dict(Yaml::string(text), &origin)?, &origin)?,
            );
        }
        if let Some(path) = sources.file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            let origin = format!("config file {}", path.display());
            fig = add(
                fig,
                claas::translate(read_dict(Yaml::file(path), &origin)?, &origin)?,
            );
        }
        let vars = env.vars();
        let env_mode = match vars
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(DISTILL_EXECUTION_MODE))
        {
            Some((_, mode)) => Some(claas::check_mode(mode, DISTILL_EXECUTION_MODE)?),
            None => None,
        };
        fig = fig.merge(Serialized::defaults(env_dict(&vars)));
        if let Some(mode) = env_mode {
            fig = fig.merge(Serialized::global("mode", mode));
        }
        if !sources.overrides.is_empty() {
            fig = add(fig, claas::overrides(sources.overrides)?);
        }
        let mut cfg: Config = fig.extract().map_err(|e| {
            let all: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
            Error::Config(all.join("; "))
        })?;
        cfg.ignored = ignored;
        cfg.fill_derived();
        cfg.validate()?;
        Ok(cfg)
    }

    fn fill_derived(&mut self) {
        if self.mode == Mode::Tinker {
            // Tinker trains and serves one base model: LoRAs are made on it alone.
            let base = self.tinker.base_model.clone();
            self.model.base_model_id = base.clone();
            self.model.allowed_init_base_models = vec![base.clone()];
            self.worker.base_models = vec![base];
        }
        for value in [&mut self.tinker.api_key, &mut self.tinker.base_url] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
        if self.telemetry.feedback_log_dir.is_none() {
            self.telemetry.feedback_log_dir = Some(self.data_dir.join("feedback"));
        }
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
    // Long: one check per setting, in the README's table order.
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
            self.database.worker_max_connections >= 1,
            "database.worker_max_connections (CLAAS_DB_WORKER_MAX_CONNECTIONS) must be >= 1",
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

/// A YAML source's top-level table.
fn read_dict(source: impl figment::Provider, origin: &str) -> Result<figment::value::Dict> {
    Figment::from(source)
        .extract::<figment::value::Dict>()
        .map_err(|e| Error::Config(format!("{origin}: {e}")))
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
    fn load(profile: Profile, vars: &[(&str, &str)]) -> Result<Config> {
        Config::load_from(profile, &Sources::default(), &Environment::fixed(vars))
    }

    #[test]
    fn a_fixed_environment_sets_sibling_fields_in_any_case() {
        let cfg = load(
            Profile::Fleet,
            &[("claas_api_host", "10.0.0.7"), (" CLAAS_API_PORT", "9001")],
        )
        .expect("loads");
        assert_eq!(cfg.server.host, "10.0.0.7");
        assert_eq!(cfg.server.port, 9001);
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
