//! What an eval run measures and writes: per-step metrics (`steps.jsonl`), the baseline,
//! and each preference's line of `summary.json`, in CLaaS's field names. The run loop
//! (`run.rs`) produces them, the plots (`plots.rs`) read them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogprobMargin {
    pub positive_logprob: f64,
    pub negative_logprob: f64,
    pub margin: f64,
    pub margin_delta_from_baseline: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GeneralCapability {
    /// None when the code could not be run here (no python3).
    pub coding_correct: Option<bool>,
    pub coding_has_docstring: bool,
    pub ifeval_pass_rate: f64,
    /// 0.5 coding + 0.5 IFEval; the IFEval rate alone when coding is unavailable.
    pub general_score: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CollapseMetrics {
    pub mean_entropy: f64,
    pub mean_logprob: f64,
    pub entropy_ratio_to_baseline: f64,
    pub self_rouge_l: f64,
    pub mean_logprob_drift: f64,
    pub alert: bool,
}

/// What one measurement found; a metric not enabled (or failed) is null.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub logprob_margin: Option<LogprobMargin>,
    pub preference_compliance: Option<f64>,
    pub general: Option<GeneralCapability>,
    pub collapse: Option<CollapseMetrics>,
}

/// One line of `steps.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub preference: String,
    pub step: u32,
    pub timestamp: String,
    pub feedback_given: String,
    /// The last training step's metrics (loss, KL, IS ratio, grad norm, ...).
    pub sdpo_metrics: Value,
    pub eval: EvalMetrics,
    pub prompt_used: String,
    pub response_text: Option<String>,
    pub timing_s: f64,
    pub sub_step_count: u32,
}

/// One preference's line of `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreferenceSummary {
    pub preference: String,
    pub lora_id: String,
    pub logprob_margin_delta: Option<f64>,
    pub final_compliance: Option<f64>,
    pub capability_ratio: Option<f64>,
}
