//! Domain types shared by the API, the worker and the store: jobs, their states and phases,
//! the feedback payload a job trains on, LoRAs and workers.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};

/// A job's lifecycle state (ARCHITECTURE.md "Job states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    /// Joined a running job's batch; `trained_by` names that job.
    Coalesced,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Coalesced,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Coalesced => "coalesced",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl std::str::FromStr for JobStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        JobStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown job status '{s}' (accepted: queued, running, coalesced, succeeded, failed, cancelled)"
                ))
            })
    }
}

/// Where a job is in the worker's pipeline. `claimed` is the moment between claim and the
/// first phase.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Claimed,
    Drain,
    Sleep,
    Vram,
    Distill,
    Publish,
    Reload,
    Wake,
    Done,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Queued,
        Phase::Claimed,
        Phase::Drain,
        Phase::Sleep,
        Phase::Vram,
        Phase::Distill,
        Phase::Publish,
        Phase::Reload,
        Phase::Wake,
        Phase::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Claimed => "claimed",
            Phase::Drain => "drain",
            Phase::Sleep => "sleep",
            Phase::Vram => "vram",
            Phase::Distill => "distill",
            Phase::Publish => "publish",
            Phase::Reload => "reload",
            Phase::Wake => "wake",
            Phase::Done => "done",
        }
    }
}

impl std::str::FromStr for Phase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Phase::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| Error::Corrupt(format!("unknown phase '{s}'")))
    }
}

/// SDPO hyperparameters of one feedback batch (CLaaS's defaults and ranges; unknown fields ignored).
///
/// Fields this trainer does not know are dropped with a log line, as CLaaS (pydantic) does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct TrainingConfig {
    #[schema(exclusive_minimum = 0.0, example = 3e-5)]
    pub learning_rate: f64,
    #[schema(minimum = 0.0, maximum = 1.0, example = 0.5)]
    pub alpha: f64,
    #[schema(minimum = 1.0, maximum = 20.0, example = 5.0)]
    pub is_clip: f64,
    #[schema(minimum = 0.0, example = 1.0)]
    pub max_grad_norm: f64,
    #[schema(minimum = 0.0, maximum = 1.0, example = 0.0)]
    pub kl_reg_weight: f64,
    #[schema(minimum = 10, maximum = 100, example = 100)]
    pub teacher_top_k: u32,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            learning_rate: 3e-5,
            alpha: 0.5,
            is_clip: 5.0,
            max_grad_norm: 1.0,
            kl_reg_weight: 0.0,
            teacher_top_k: 100,
        }
    }
}

impl TrainingConfig {
    /// Every range violation, in CLaaS's words; empty when the config is valid.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let finite = |v: f64| v.is_finite();
        if !(finite(self.learning_rate) && self.learning_rate > 0.0) {
            out.push("learning_rate must be > 0".to_string());
        }
        if !(finite(self.alpha) && (0.0..=1.0).contains(&self.alpha)) {
            out.push("alpha must be within [0, 1]".to_string());
        }
        if !(finite(self.is_clip) && (1.0..=20.0).contains(&self.is_clip)) {
            out.push("is_clip must be within [1, 20]".to_string());
        }
        if !(finite(self.max_grad_norm) && self.max_grad_norm >= 0.0) {
            out.push("max_grad_norm must be >= 0".to_string());
        }
        if !(finite(self.kl_reg_weight) && (0.0..=1.0).contains(&self.kl_reg_weight)) {
            out.push("kl_reg_weight must be within [0, 1]".to_string());
        }
        if !(10..=100).contains(&self.teacher_top_k) {
            out.push("teacher_top_k must be within [10, 100]".to_string());
        }
        out
    }
}

/// How the worker treats its vLLM around the training step (CLaaS `FeedbackOrchestration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Orchestration {
    pub sleep_before: bool,
    pub wake_after: bool,
    pub wake_on_failure: bool,
    /// vLLM's sleep level during training: 1 (weights offloaded to host memory). CLaaS's 2
    /// is refused: it discards the weights, which vLLM with LoRA cannot reload.
    #[schema(minimum = 1, maximum = 1)]
    pub sleep_level: u8,
}

impl Default for Orchestration {
    fn default() -> Self {
        Orchestration {
            sleep_before: true,
            wake_after: true,
            wake_on_failure: true,
            sleep_level: 1,
        }
    }
}

/// What the served model produced for one completion: the tokens the student is trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub prompt_token_ids: Vec<u32>,
    pub response_token_ids: Vec<u32>,
    pub response_logprobs: Vec<f32>,
    #[serde(default)]
    pub system_prompt: String,
}

/// One feedback item, resolved and self-contained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub response: String,
    pub feedback: String,
    pub rollout: Rollout,
}

/// Everything a worker needs to train a job, with no lookups elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPayload {
    pub samples: Vec<Sample>,
    pub training: TrainingConfig,
}

/// Why a job failed, as stored in `jobs.error` and shown by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// Machine-readable class: `invalid_input`, `lease_expired`, `phase_failed`, ...
    pub code: String,
    pub message: String,
    /// The phase that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub lora_id: String,
    pub caller: String,
    pub payload: JobPayload,
    pub orchestration: Orchestration,
    pub priority: i32,
    pub max_attempts: i32,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request body, compared on idempotent replays.
    pub request_hash: Option<String>,
    pub trace_context: Option<serde_json::Value>,
}

impl NewJob {
    pub fn new(lora_id: impl Into<String>, payload: JobPayload) -> Self {
        NewJob {
            id: Uuid::now_v7(),
            lora_id: lora_id.into(),
            caller: String::new(),
            payload,
            orchestration: Orchestration::default(),
            priority: 0,
            max_attempts: 3,
            idempotency_key: None,
            request_hash: None,
            trace_context: None,
        }
    }

    /// Jobs may share a batch only when this key is equal: same training config, same
    /// orchestration flags, same caller.
    pub fn coalesce_key(&self) -> String {
        let canonical = serde_json::json!({
            "training": self.payload.training,
            "orchestration": self.orchestration,
            "caller": self.caller,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

/// A job as the API and dashboard see it (the payload stays in the store).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub lora_id: String,
    pub base_model: String,
    pub caller: String,
    pub status: JobStatus,
    pub phase: Phase,
    pub sample_count: i32,
    pub orchestration: Orchestration,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    /// The worker running this job, or that ran it last. A member of a batch (`coalesced`,
    /// or finished with its batch) has none: its worker is the one of `trained_by`.
    pub worker_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub idempotency_key: Option<String>,
    pub trace_context: Option<serde_json::Value>,
    pub timings_ms: BTreeMap<String, u64>,
    pub result: Option<serde_json::Value>,
    pub error: Option<JobError>,
    /// The job whose batch this one joined (or trained in); its events continue this
    /// job's timeline from the moment it joined.
    pub trained_by: Option<Uuid>,
    pub published_version: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One line of a job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobEvent {
    pub at: DateTime<Utc>,
    pub phase: String,
    pub message: String,
}

/// A LoRA adapter and its current version.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Lora {
    pub lora_id: String,
    pub base_model: String,
    pub rank: i32,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub current_version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A LoRA to create, with its initial adapter (version 0).
#[derive(Debug, Clone)]
pub struct NewLora {
    pub lora_id: String,
    pub base_model: String,
    pub rank: i32,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub initial_uri: String,
    pub initial_sha256: String,
}

/// A published adapter version.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LoraVersion {
    pub lora_id: String,
    pub version: i32,
    pub storage_uri: String,
    pub sha256: String,
    pub job_id: Option<Uuid>,
    pub metrics: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    /// Kept whatever the retention says.
    pub pinned: bool,
    /// When retention removed its files (the row stays in the history).
    pub pruned_at: Option<DateTime<Utc>>,
}

/// An API key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// LoRA id prefixes it may act on; empty with `admin`.
    pub prefixes: Vec<String>,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether this key may act on `lora_id`: admins on every LoRA; others on ids equal to
    /// one of their prefixes or under it as a path (`alice` covers `alice` and `alice/x`,
    /// not `alice2/x`; `team-` covers `team-a`).
    pub fn covers(&self, lora_id: &str) -> bool {
        self.admin || self.prefixes.iter().any(|p| prefix_covers(p, lora_id))
    }
}

/// See [`ApiKey::covers`]: a prefix ending in `/` or `-` is a plain prefix; any other is
/// an id or a path segment.
pub fn prefix_covers(prefix: &str, lora_id: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    if prefix.ends_with('/') || prefix.ends_with('-') {
        return lora_id.starts_with(prefix);
    }
    lora_id == prefix
        || lora_id
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The local directory a storage URI names (`file:///dir` or a plain path); `None` for
/// remote storage and empty URIs.
pub fn local_path(uri: &str) -> Option<std::path::PathBuf> {
    match uri.strip_prefix("file://") {
        Some(p) if !p.is_empty() => Some(p.into()),
        Some(_) => None,
        None if uri.is_empty() || uri.contains("://") => None,
        None => Some(uri.into()),
    }
}

/// What a worker publishes: the stored adapter of `version` and the step's metrics.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub version: i32,
    pub storage_uri: String,
    pub sha256: String,
    pub metrics: serde_json::Value,
}

/// A worker's state as shown in `workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Training,
    Draining,
    Sleeping,
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Training => "training",
            WorkerState::Draining => "draining",
            WorkerState::Sleeping => "sleeping",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// A worker process registering itself.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub hostname: String,
    pub gpu: Option<String>,
    pub vllm_url: Option<String>,
    pub base_models: Vec<String>,
    pub version: String,
}

/// A registered worker, as the health route and dashboard see it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    pub id: String,
    pub hostname: String,
    pub gpu: Option<String>,
    pub state: String,
    /// The vLLM this worker drives (as it registered it).
    pub vllm_url: Option<String>,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub current_job: Option<Uuid>,
}

/// The name CLaaS gives a LoRA in vLLM, and by which its clients address it:
/// `re.sub(r"[^a-zA-Z0-9._-]+", "-", lora_id.strip("/")).strip("-") or "lora"`. For an id
/// [`validate_lora_id`] accepts this is the id with each `/` as `-` (`eval/no_emoji` →
/// `eval-no_emoji`); the store looks LoRAs up by that form.
pub fn adapter_name(lora_id: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut out = String::with_capacity(lora_id.len());
    let mut in_run = false;
    for c in lora_id.trim_matches('/').chars() {
        if allowed(c) {
            out.push(c);
        } else if !in_run {
            out.push('-');
        }
        in_run = !allowed(c);
    }
    let out = out.trim_matches('-');
    if out.is_empty() {
        "lora".into()
    } else {
        out.to_owned()
    }
}

/// A LoRA id as the API allows it: path-like segments of `[A-Za-z0-9._-]` each starting
/// with a letter or digit, at most 128 characters. Returns the reason when it is not.
pub fn validate_lora_id(id: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Invalid(format!("invalid lora_id '{id}': {why}")));
    if id.is_empty() || id.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    for segment in id.split('/') {
        let mut chars = segment.chars();
        match chars.next() {
            Some(c) if c.is_ascii_alphanumeric() => {}
            _ => return bad("each '/'-separated segment must start with a letter or digit"),
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return bad("only letters, digits, '.', '_', '-' and '/' are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_follow_claas_formula() {
        // Expected values are what CLaaS's Python gives:
        // re.sub(r"[^a-zA-Z0-9._-]+", "-", s.strip("/")).strip("-") or "lora"
        for (id, name) in [
            ("eval/no_emoji", "eval-no_emoji"),
            ("openclaw/assistant-latest", "openclaw-assistant-latest"),
            ("/a/b/", "a-b"),
            ("a-/b", "a--b"),
            ("a//b", "a-b"),
            ("x y!z", "x-y-z"),
            ("é", "lora"),
            ("///", "lora"),
            ("plain", "plain"),
        ] {
            assert_eq!(adapter_name(id), name, "{id}");
        }
    }

    #[test]
    fn lora_ids_follow_the_design_pattern() {
        for ok in ["a", "user/assistant-1", "A.b_c-d/e9", &"x".repeat(128)] {
            assert!(validate_lora_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            ".a",
            "a b",
            "../x",
            "a/-b",
            &"x".repeat(129),
        ] {
            assert!(validate_lora_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn training_config_reports_every_violation_in_claas_words() {
        let cfg = TrainingConfig {
            alpha: 1.5,
            is_clip: -1.0,
            teacher_top_k: 5,
            ..TrainingConfig::default()
        };
        assert_eq!(
            cfg.violations(),
            [
                "alpha must be within [0, 1]",
                "is_clip must be within [1, 20]",
                "teacher_top_k must be within [10, 100]"
            ]
        );
        assert!(TrainingConfig::default().violations().is_empty());
    }

    #[test]
    fn coalesce_key_separates_configs_and_callers() {
        let payload = JobPayload {
            samples: vec![],
            training: TrainingConfig::default(),
        };
        let a = NewJob::new("l", payload.clone());
        let mut b = NewJob::new("l", payload.clone());
        assert_eq!(a.coalesce_key(), b.coalesce_key());
        b.caller = "other".into();
        assert_ne!(a.coalesce_key(), b.coalesce_key());
        let mut c = NewJob::new("l", payload);
        c.payload.training.alpha = 0.9;
        assert_ne!(a.coalesce_key(), c.coalesce_key());
    }
}
