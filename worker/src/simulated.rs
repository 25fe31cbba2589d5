//! An executor that walks every phase without a GPU, vLLM or model. It checks the batch the
//! way the trainer will (non-empty responses, one log-prob per response token), spends a
//! configurable time per phase, and writes a small JSON "adapter" per version so storage
//! and exactly-once publishing are observable. Queue tests, end-to-end tests and the
//! benchmark use it; the embedded default uses it until the trainer lands.
//!
//! Fault injection for tests: a sample whose feedback contains `[simulate:fatal]` is bad
//! input (its job fails; the rest of its batch trains without it); `[simulate:retry]` fails
//! the distill phase as a transient error.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use claas_core::types::{Sample, TrainingConfig};

use crate::executor::{
    AdapterSource, Distilled, JobContext, PhaseError, PhaseResult, ServedVersion, Serving,
    StoredAdapter, Trainer,
};

pub struct SimulatedExecutor {
    /// Time spent in each phase, on average (see `phase_time`).
    pub step: Duration,
    /// Where version files go (`<root>/<lora_id>/@v<version>-<write tag>.json`).
    pub root: PathBuf,
}

/// The checks every trainer applies before it spends GPU time; failures are bad input.
pub fn validate_batch(samples: &[Sample]) -> PhaseResult<()> {
    if samples.is_empty() {
        return Err(PhaseError::fatal(
            "invalid_input",
            "the batch has no samples",
        ));
    }
    for (i, s) in samples.iter().enumerate() {
        let r = &s.rollout;
        if r.response_token_ids.is_empty() {
            return Err(PhaseError::bad_sample(
                i,
                format!("sample {i}: empty response"),
            ));
        }
        if r.response_logprobs.len() != r.response_token_ids.len() {
            return Err(PhaseError::bad_sample(
                i,
                format!(
                    "sample {i}: {} log-probs for {} response tokens",
                    r.response_logprobs.len(),
                    r.response_token_ids.len()
                ),
            ));
        }
        if r.response_logprobs
            .iter()
            .any(|l| !l.is_finite() || *l > 0.0)
        {
            return Err(PhaseError::bad_sample(
                i,
                format!("sample {i}: log-probs must be finite and <= 0"),
            ));
        }
    }
    Ok(())
}

impl SimulatedExecutor {
    /// One phase's time: `step` ± 50 %, drawn each time, so a fleet started together does
    /// not move through its phases (and its database statements) in lockstep.
    fn phase_time(&self) -> Duration {
        self.step.mul_f64(0.5 + rand::random::<f64>())
    }

    async fn pause(&self) {
        if !self.step.is_zero() {
            tokio::time::sleep(self.phase_time()).await;
        }
    }
}

#[async_trait]
impl Trainer for SimulatedExecutor {
    async fn wait_vram(&self, _job: &JobContext) -> PhaseResult<()> {
        self.pause().await;
        Ok(())
    }

    async fn distill(
        &self,
        _job: &JobContext,
        _from: &AdapterSource,
        samples: &[Sample],
        training: &TrainingConfig,
    ) -> PhaseResult<Distilled> {
        validate_batch(samples)?;
        if let Some(i) = samples
            .iter()
            .position(|s| s.feedback.contains("[simulate:fatal]"))
        {
            return Err(PhaseError::bad_sample(
                i,
                format!("sample {i}: simulated bad input"),
            ));
        }
        if samples
            .iter()
            .any(|s| s.feedback.contains("[simulate:retry]"))
        {
            return Err(PhaseError::retryable(
                "simulated_transient",
                "simulated transient failure",
            ));
        }
        self.pause().await;
        let tokens: usize = samples
            .iter()
            .map(|s| s.rollout.response_token_ids.len())
            .sum();
        // A stand-in loss: the mean negative log-prob of the responses, so it moves with input.
        let nll: f64 = samples
            .iter()
            .flat_map(|s| s.rollout.response_logprobs.iter())
            .map(|l| -f64::from(*l))
            .sum::<f64>()
            / tokens.max(1) as f64;
        let metrics = serde_json::json!({
            "simulated": true,
            "total_loss": nll,
            "distill_loss": nll,
            "kl_reg": 0.0,
            "mean_is_ratio": 1.0,
            "clip_fraction": 0.0,
            "grad_norm": 0.0,
            "tokens_processed": tokens,
            "batch_size": samples.len(),
            "learning_rate": training.learning_rate,
        });
        Ok(Distilled {
            artifact: Box::new(metrics.clone()),
            metrics,
        })
    }

    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        distilled: Distilled,
    ) -> PhaseResult<StoredAdapter> {
        let body = serde_json::json!({
            "lora_id": job.lora_id,
            "version": version,
            "job_id": job.job_id,
            "attempt": job.attempt,
            "metrics": distilled.metrics,
        })
        .to_string();
        let root = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        let dir = root.join(&job.lora_id);
        let name = claas_core::adapter_store::AdapterStore::version_name(version, &job.write_tag);
        let path = dir.join(format!("{name}.json"));
        let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let sha256 = digest::digest_hex(body.as_bytes());
        let (step, target) = (self.phase_time(), path.clone());
        // Like the trainer's save: a blocking write that runs to its end even when the job's
        // lease is lost meanwhile (the phase is abandoned, the thread is not). The phase's
        // time is spent between writing and renaming, where a stall hurts most.
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&tmp, body.as_bytes())?;
            std::thread::sleep(step);
            std::fs::rename(&tmp, &target)
        })
        .await
        .map_err(|e| PhaseError::retryable("storage_error", e.to_string()))?
        .map_err(|e| PhaseError::retryable("storage_error", format!("{}: {e}", path.display())))?;
        Ok(StoredAdapter {
            uri: format!("file://{}", path.display()),
            sha256,
        })
    }
}

/// Serving that takes time and reaches nothing: a stand-in for the vLLM phases.
#[async_trait]
impl Serving for SimulatedExecutor {
    fn controls_vllm(&self) -> bool {
        true
    }

    async fn drain(&self, _job: &JobContext) -> PhaseResult<()> {
        self.pause().await;
        Ok(())
    }

    async fn sleep(&self, _job: &JobContext) -> PhaseResult<()> {
        self.pause().await;
        Ok(())
    }

    async fn reload(&self, _job: &JobContext, _serve: &ServedVersion) -> PhaseResult<()> {
        self.pause().await;
        Ok(())
    }

    async fn wake(&self, _job: &JobContext) -> PhaseResult<()> {
        self.pause().await;
        Ok(())
    }
}

mod digest {
    use sha2::{Digest, Sha256};

    pub fn digest_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }
}
