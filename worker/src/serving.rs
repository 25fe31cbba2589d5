//! The serving-control half of a job when a vLLM runs beside the worker: drain it, put it
//! to sleep (or pause it) for the step, load the new version under the LoRA's stable name,
//! wake it, also after a failure. The trainer half (`candle.rs`) knows nothing of vLLM.

use std::path::PathBuf;

use async_trait::async_trait;
use claas_core::adapter_store::AdapterStore;

use crate::executor::{JobContext, PhaseError, PhaseResult, ServedVersion, Serving};
use crate::vllm::VllmClient;

/// The local vLLM the worker drives.
#[derive(Debug, Clone)]
pub struct VllmOptions {
    pub url: String,
    pub api_key: Option<String>,
    /// `feedback_drain_timeout_s`.
    pub drain_timeout: std::time::Duration,
    /// How often `/metrics` is polled while draining.
    pub drain_poll: std::time::Duration,
    /// `feedback_min_free_vram_gb`: GPU memory that must be free before training.
    pub min_free_vram_gb: f64,
    /// `feedback_sleep_verify_timeout_s`: how long to wait for it.
    pub vram_timeout: std::time::Duration,
    /// `/pause` + `/resume` instead of sleep and wake (`vllm.sleep_mode: pause`).
    pub pause_instead_of_sleep: bool,
    /// Tries at loading a new version before the job fails (published but not loaded).
    pub reload_attempts: u32,
    /// Pause before the second try; doubled for each further one.
    pub reload_backoff: std::time::Duration,
}

/// The local vLLM, driven around each step.
pub struct VllmServing {
    vllm: VllmClient,
    opts: VllmOptions,
    /// Where remote versions are cached locally for vLLM to read.
    store: Option<AdapterStore>,
}

impl VllmServing {
    pub fn new(opts: VllmOptions, store: Option<AdapterStore>) -> VllmServing {
        VllmServing {
            vllm: VllmClient::new(&opts.url, opts.api_key.clone()),
            opts,
            store,
        }
    }

    fn pauses(&self) -> bool {
        self.opts.pause_instead_of_sleep
    }

    /// Wakes (or resumes) everything.
    async fn wake_all(&self) -> PhaseResult<()> {
        if self.pauses() {
            self.vllm.resume().await
        } else {
            self.vllm.wake(&[]).await
        }
    }

    /// The local directory of a recorded version: its cached copy when it is remote.
    async fn local_version(&self, uri: &str) -> PhaseResult<PathBuf> {
        if let Some(path) = claas_core::types::local_path(uri) {
            return Ok(path);
        }
        match &self.store {
            Some(s) => s.materialize(uri).await.map_err(PhaseError::storage),
            None => Err(PhaseError::fatal(
                "storage_error",
                format!("{uri} is remote but this worker has no object store"),
            )),
        }
    }
}

#[async_trait]
impl Serving for VllmServing {
    fn controls_vllm(&self) -> bool {
        true
    }

    async fn drain(&self, _job: &JobContext) -> PhaseResult<()> {
        let o = &self.opts;
        self.vllm.drain(o.drain_timeout, o.drain_poll).await
    }

    async fn sleep(&self, job: &JobContext) -> PhaseResult<()> {
        if self.pauses() {
            self.vllm.pause().await
        } else {
            self.vllm.sleep(job.orchestration.sleep_level).await
        }
    }

    /// Loads the version's recorded directory under the LoRA's stable name. After a sleep:
    /// wake the weights first (a LoRA loaded into a sleeping weights pool is lost on wake),
    /// then unload and load; the KV cache (and scheduling) wakes only in `wake`, so no
    /// request meets the old adapter. Without a sleep: an in-place swap, so no request for
    /// the LoRA meets a 404 between an unload and a load.
    async fn reload(&self, job: &JobContext, serve: &ServedVersion) -> PhaseResult<()> {
        let v = &self.vllm;
        // Published elsewhere (another node, a resumed job): vLLM reads the local cache.
        let local = self.local_version(&serve.uri).await?;
        let path = local.display().to_string();
        let swap = !job.orchestration.sleep_before;
        if !swap && !self.pauses() {
            v.wake(&["weights"]).await?;
        }
        let (attempts, mut backoff) = (self.opts.reload_attempts.max(1), self.opts.reload_backoff);
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            let loaded = if swap {
                // vLLM kept serving: swap in place, so no request meets a 404.
                v.load_adapter(&job.lora_id, &path, true).await
            } else {
                match v.unload_adapter(&job.lora_id).await {
                    Ok(()) => v.load_adapter(&job.lora_id, &path, false).await,
                    Err(e) => Err(e),
                }
            };
            match loaded {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(attempt = attempt + 1, attempts, error = %e, "adapter reload failed");
                    last = Some(e);
                }
            }
        }
        if let Some(previous) = serve.previous_uri.as_deref().filter(|_| !swap) {
            // Serve the previous version rather than nothing until someone retries.
            let previous = self.local_version(previous).await.ok();
            if let Some(previous) = previous.filter(|p| p.join("adapter_config.json").is_file()) {
                let previous = previous.display().to_string();
                if let Err(e) = v.load_adapter(&job.lora_id, &previous, false).await {
                    tracing::error!(error = %e, "could not restore the previous version in vLLM either");
                }
            }
        }
        Err(last.unwrap_or_else(|| PhaseError::retryable("vllm_error", "adapter reload failed")))
    }

    async fn wake(&self, _job: &JobContext) -> PhaseResult<()> {
        self.wake_all().await
    }

    async fn ready(&self) -> Result<(), String> {
        self.vllm.healthy().await
    }

    async fn served_adapters(&self) -> PhaseResult<Option<Vec<(String, String)>>> {
        self.vllm.adapters().await.map(Some)
    }

    async fn serve_adapter(&self, name: &str, dir: &str) -> PhaseResult<()> {
        self.vllm.load_adapter(name, dir, true).await
    }

    async fn on_start(&self) -> PhaseResult<()> {
        // A vLLM left asleep (or paused) by a worker that died mid-job; a no-op otherwise.
        self.wake_all().await
    }
}
