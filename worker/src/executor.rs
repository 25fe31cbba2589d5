//! The seam between the claim loop and what a job's phases actually do (vLLM control, the
//! trainer, adapter storage). Each method is one phase; errors say where they happened and
//! whether a retry can help.

use std::any::Any;

use async_trait::async_trait;
use claas_core::types::{Orchestration, Sample, TrainingConfig};
use uuid::Uuid;

/// What a phase knows about its job.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job_id: Uuid,
    pub lora_id: String,
    pub base_model: String,
    pub attempt: i32,
    pub orchestration: Orchestration,
    /// Unique to this claim (from its lease token): names the location `store_adapter`
    /// writes, so no two attempts ever write the same files.
    pub write_tag: String,
}

/// A published version for `reload` to serve: its recorded location, never a derived one
/// (a rolled-back version's files are an older version's).
#[derive(Debug, Clone)]
pub struct ServedVersion {
    pub version: i32,
    pub uri: String,
    /// The version before it, served again if loading this one fails.
    pub previous_uri: Option<String>,
}

/// The adapter version a job trains from: the LoRA's current version when training starts.
#[derive(Debug, Clone)]
pub struct AdapterSource {
    pub version: i32,
    /// Where that version is stored (`file://` URI or a path).
    pub uri: String,
    /// The sha256 recorded for its weights; empty for an initial version (0, or one
    /// `overwrite` started afresh) whose files the first trainer may create.
    pub sha256: String,
    pub base_model: String,
    pub rank: i32,
    pub alpha: f64,
    pub target_modules: Vec<String>,
}

/// The outcome of the distill phase: metrics for the API and an executor-specific artifact
/// (the new adapter) that [`Executor::store_adapter`] persists.
pub struct Distilled {
    pub metrics: serde_json::Value,
    pub artifact: Box<dyn Any + Send + Sync>,
}

/// Where a version was written.
#[derive(Debug, Clone)]
pub struct StoredAdapter {
    pub uri: String,
    pub sha256: String,
}

/// A failed phase, classified where it happened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PhaseError {
    /// Stable class for clients and dashboards: `invalid_input`, `vllm_unavailable`, ...
    pub code: String,
    pub message: String,
    /// Retrying may help (timeouts, network, vLLM errors); `false` fails the job at once.
    pub retryable: bool,
    /// The batch sample (0-based, in [`claas_core::queue::Claimed::samples`] order) that
    /// alone caused a fatal failure: its job fails and the rest of the batch trains without it.
    pub sample: Option<usize>,
}

impl PhaseError {
    /// Bad input: retrying cannot help.
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        PhaseError {
            code: code.into(),
            message: message.into(),
            retryable: false,
            sample: None,
        }
    }

    /// Bad input in one sample of the batch: that sample's job fails, the others train.
    pub fn bad_sample(index: usize, message: impl Into<String>) -> Self {
        PhaseError {
            sample: Some(index),
            ..PhaseError::fatal("invalid_input", message)
        }
    }

    /// A transient failure: the job goes back to the queue with backoff.
    /// Adapter storage (local files or the object store) failed: retryable.
    pub fn storage(e: impl std::fmt::Display) -> Self {
        Self::retryable("storage_error", e.to_string())
    }

    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        PhaseError {
            code: code.into(),
            message: message.into(),
            retryable: true,
            sample: None,
        }
    }
}

pub type PhaseResult<T> = Result<T, PhaseError>;

/// The phases of one job, in order: drain → sleep → vram → distill → (store) → reload → wake.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Waits until the local vLLM has no running or waiting request.
    async fn drain(&self, job: &JobContext) -> PhaseResult<()>;
    /// Puts the local vLLM to sleep at `orchestration.sleep_level`.
    async fn sleep(&self, job: &JobContext) -> PhaseResult<()>;
    /// Waits until enough GPU memory is free to train.
    async fn wait_vram(&self, job: &JobContext) -> PhaseResult<()>;
    /// One SDPO step on the batch, starting from the LoRA's current version `from`.
    async fn distill(
        &self,
        job: &JobContext,
        from: &AdapterSource,
        samples: &[Sample],
        training: &TrainingConfig,
    ) -> PhaseResult<Distilled>;
    /// Writes the new adapter as `version` to storage (not yet visible to anyone), in a
    /// location named by `job.write_tag` that nothing else writes.
    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        distilled: Distilled,
    ) -> PhaseResult<StoredAdapter>;
    /// Loads the published version `serve` into the local vLLM under the LoRA's stable name.
    async fn reload(&self, job: &JobContext, serve: &ServedVersion) -> PhaseResult<()>;
    /// Wakes the local vLLM (also after failures).
    async fn wake(&self, job: &JobContext) -> PhaseResult<()>;

    /// Whether `sleep` and `wake` reach a vLLM (what a job's result reports as `vllm`).
    fn controls_vllm(&self) -> bool {
        true
    }

    /// Whether a job could run now; the reason when not (the local vLLM is down or still
    /// loading). The worker claims nothing until it is, so no job spends an attempt on a
    /// vLLM that cannot be drained.
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Called once when the worker starts: a vLLM left asleep by a worker that died
    /// mid-job must not stay asleep.
    async fn on_start(&self) -> PhaseResult<()> {
        Ok(())
    }

    /// Adapters the local vLLM serves, as (name, directory); `None` without a vLLM.
    async fn served_adapters(&self) -> PhaseResult<Option<Vec<(String, String)>>> {
        Ok(None)
    }

    /// Swaps adapter `name` to `dir` in the local vLLM without a gap (`load_inplace`).
    async fn serve_adapter(&self, _name: &str, _dir: &str) -> PhaseResult<()> {
        Ok(())
    }
}

/// The trainer half of a job: room on the device, one step from a batch, the result
/// stored. Candle now; Tinker's hosted training later. It knows nothing of the inference
/// server beside it.
#[async_trait]
pub trait Trainer: Send + Sync + 'static {
    /// Waits until the training device has room for the step.
    async fn wait_vram(&self, job: &JobContext) -> PhaseResult<()>;
    /// One SDPO step on the batch, starting from the LoRA's current version `from`.
    async fn distill(
        &self,
        job: &JobContext,
        from: &AdapterSource,
        samples: &[Sample],
        training: &TrainingConfig,
    ) -> PhaseResult<Distilled>;
    /// Writes the new adapter as `version` (not yet visible to anyone), in a location
    /// named by `job.write_tag` that nothing else writes.
    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        distilled: Distilled,
    ) -> PhaseResult<StoredAdapter>;
}

/// The serving-control half of a job: what the inference server beside the worker needs
/// around a step (drain, sleep, reload, wake for a vLLM; nothing in process).
#[async_trait]
pub trait Serving: Send + Sync + 'static {
    /// Whether `sleep` and `wake` reach a vLLM (what a job's result reports as `vllm`).
    fn controls_vllm(&self) -> bool;
    async fn drain(&self, job: &JobContext) -> PhaseResult<()>;
    async fn sleep(&self, job: &JobContext) -> PhaseResult<()>;
    /// Serves the published version `serve` under the LoRA's stable name.
    async fn reload(&self, job: &JobContext, serve: &ServedVersion) -> PhaseResult<()>;
    async fn wake(&self, job: &JobContext) -> PhaseResult<()>;
    /// Whether a job could run now; the reason when not.
    async fn ready(&self) -> Result<(), String>;
    /// Called once when the worker starts (a vLLM left asleep must not stay asleep).
    async fn on_start(&self) -> PhaseResult<()>;
    /// Adapters the server holds, as (name, directory); `None` without one.
    async fn served_adapters(&self) -> PhaseResult<Option<Vec<(String, String)>>>;
    /// Swaps adapter `name` to `dir` without a gap.
    async fn serve_adapter(&self, name: &str, dir: &str) -> PhaseResult<()>;
}

/// No inference server beside the worker (in process, or nothing serves): every serving
/// phase has nothing to do.
pub struct NoServing;

#[async_trait]
impl Serving for NoServing {
    fn controls_vllm(&self) -> bool {
        false
    }
    async fn drain(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }
    async fn sleep(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }
    async fn reload(&self, _job: &JobContext, _serve: &ServedVersion) -> PhaseResult<()> {
        Ok(())
    }
    async fn wake(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    async fn on_start(&self) -> PhaseResult<()> {
        Ok(())
    }
    async fn served_adapters(&self) -> PhaseResult<Option<Vec<(String, String)>>> {
        Ok(None)
    }
    async fn serve_adapter(&self, _name: &str, _dir: &str) -> PhaseResult<()> {
        Ok(())
    }
}

/// An executor made of a trainer and the serving control beside it, so a job's phases
/// read the same whichever trains and whatever serves.
pub struct Split<T> {
    pub trainer: T,
    pub serving: Box<dyn Serving>,
}

#[async_trait]
impl<T: Trainer> Executor for Split<T> {
    async fn drain(&self, job: &JobContext) -> PhaseResult<()> {
        self.serving.drain(job).await
    }
    async fn sleep(&self, job: &JobContext) -> PhaseResult<()> {
        self.serving.sleep(job).await
    }
    async fn wait_vram(&self, job: &JobContext) -> PhaseResult<()> {
        self.trainer.wait_vram(job).await
    }
    async fn distill(
        &self,
        job: &JobContext,
        from: &AdapterSource,
        samples: &[Sample],
        training: &TrainingConfig,
    ) -> PhaseResult<Distilled> {
        self.trainer.distill(job, from, samples, training).await
    }
    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        distilled: Distilled,
    ) -> PhaseResult<StoredAdapter> {
        self.trainer.store_adapter(job, version, distilled).await
    }
    async fn reload(&self, job: &JobContext, serve: &ServedVersion) -> PhaseResult<()> {
        self.serving.reload(job, serve).await
    }
    async fn wake(&self, job: &JobContext) -> PhaseResult<()> {
        self.serving.wake(job).await
    }
    fn controls_vllm(&self) -> bool {
        self.serving.controls_vllm()
    }
    async fn ready(&self) -> Result<(), String> {
        self.serving.ready().await
    }
    async fn on_start(&self) -> PhaseResult<()> {
        self.serving.on_start().await
    }
    async fn served_adapters(&self) -> PhaseResult<Option<Vec<(String, String)>>> {
        self.serving.served_adapters().await
    }
    async fn serve_adapter(&self, name: &str, dir: &str) -> PhaseResult<()> {
        self.serving.serve_adapter(name, dir).await
    }
}
