//! The seam between the claim loop and what a job's phases actually do (vLLM control, the
//! trainer, adapter storage). Each method is one phase; errors say where they happened and
//! whether a retry can help.

use std::any::Any;
use std::sync::Arc;

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
/// (the new adapter) that [`Trainer::store_adapter`] persists.
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

    /// Removes a stored version that is no longer wanted (pruned, never published), when
    /// it lives where only this trainer reaches (Tinker's checkpoints); `Ok(false)` for a
    /// URI the adapter store removes (files, objects).
    async fn remove_stored(&self, _uri: &str) -> PhaseResult<bool> {
        Ok(false)
    }
}

/// The serving-control half of a job: what the inference server beside the worker needs
/// around a step (drain, sleep, reload, wake for a vLLM; nothing in process).
#[async_trait]
pub trait Serving: Send + Sync + 'static {
    /// Whether `sleep` and `wake` reach a vLLM (what a job's result reports as `vllm`).
    fn controls_vllm(&self) -> bool;
    /// Waits until the server has no running or waiting request.
    async fn drain(&self, job: &JobContext) -> PhaseResult<()>;
    /// Frees the server's GPU memory for the step (`orchestration.sleep_level`).
    async fn sleep(&self, job: &JobContext) -> PhaseResult<()>;
    /// Serves the published version `serve` under the LoRA's stable name.
    async fn reload(&self, job: &JobContext, serve: &ServedVersion) -> PhaseResult<()>;
    /// Wakes the server (also after failures).
    async fn wake(&self, job: &JobContext) -> PhaseResult<()>;

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
    /// Adapters the server holds, as (name, directory); `None` without one.
    async fn served_adapters(&self) -> PhaseResult<Option<Vec<(String, String)>>> {
        Ok(None)
    }
    /// Swaps adapter `name` to `dir` without a gap (`load_inplace`).
    async fn serve_adapter(&self, _name: &str, _dir: &str) -> PhaseResult<()> {
        Ok(())
    }
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
}

/// What runs a job's phases: a trainer and the serving control beside it, so the phases
/// (drain → sleep → vram → distill → store → reload → wake) read the same whichever
/// trains and whatever serves.
#[derive(Clone)]
pub struct Executor {
    pub trainer: Arc<dyn Trainer>,
    pub serving: Arc<dyn Serving>,
}

impl Executor {
    pub fn new(trainer: impl Trainer, serving: impl Serving) -> Self {
        Executor {
            trainer: Arc::new(trainer),
            serving: Arc::new(serving),
        }
    }
}

/// One value that plays both parts (the simulated executor, a test's scripted one).
impl<T: Trainer + Serving> From<Arc<T>> for Executor {
    fn from(both: Arc<T>) -> Self {
        Executor {
            trainer: both.clone(),
            serving: both,
        }
    }
}
