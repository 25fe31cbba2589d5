//! The trainer half that trains for real: the candle SDPO trainer on the worker's base
//! model, adapters versioned as PEFT files plus the AdamW state (see `AdapterStore` for the
//! layout). The base model is read from disk once per process and waits between jobs where
//! `trainer.residency` says.
//!
//! [`CandleExecutor`] pairs it with the serving control: [`VllmServing`] when a vLLM runs
//! beside the worker (drain, sleep, reload, wake), nothing when it does not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use candle_core::{DType, Device};
use claas_core::adapter_store::AdapterStore;
use claas_core::config::{Residency, TrainerDevice};
use claas_core::types::{Sample, TrainingConfig};
use claas_trainer::adamw::STATE_FILE;
use claas_trainer::storage;
use claas_trainer::template::ChatTokenizer;
use claas_trainer::{sdpo_step, AdamW, AdapterConfig, LoraAdapter, Qwen3, StepConfig, StepSample};

use crate::executor::{
    AdapterSource, Distilled, Executor, JobContext, NoServing, PhaseError, PhaseResult, Serving,
    StoredAdapter, Trainer,
};
use crate::serving::{VllmOptions, VllmServing};
use crate::vram::{wait_for_free, Nvml, VramProbe};

/// How the executor is set up (from `model`, `storage`, `trainer` and `vllm` config).
#[derive(Debug, Clone)]
pub struct CandleOptions {
    /// The id LoRAs name as their base model (`model.base_model_id`).
    pub base_model_id: String,
    /// The checkpoint directory it resolves to.
    pub model_dir: PathBuf,
    pub lora_root: PathBuf,
    /// An object store the versions are published to (`storage.backend: s3`), with
    /// `lora_root` as its local cache; none: versions stay under `lora_root`.
    pub store: Option<AdapterStore>,
    pub device: TrainerDevice,
    pub residency: Residency,
    pub max_seq_len: usize,
    pub vllm: Option<VllmOptions>,
}

/// The candle trainer with the serving control its configuration asks for; the trainer
/// stays reachable for what embedded inference shares with it.
pub struct CandleExecutor {
    pub trainer: Arc<CandleTrainer>,
    pub serving: Arc<dyn Serving>,
}

impl From<CandleExecutor> for Executor {
    fn from(c: CandleExecutor) -> Self {
        Executor {
            trainer: c.trainer,
            serving: c.serving,
        }
    }
}

pub struct CandleTrainer {
    opts: CandleOptions,
    device: Device,
    dtype: DType,
    tokenizer: Arc<ChatTokenizer>,
    /// The resident copy: on the training device (`gpu`), in host RAM (`host`), or none
    /// (`disk`: read per job).
    resident: Option<Arc<Qwen3>>,
    /// Free GPU memory (training on CUDA only); why it is unreadable otherwise.
    vram: Result<Box<dyn VramProbe>, String>,
}

/// What distill hands to store_adapter.
struct Trained {
    adapter: LoraAdapter,
    optimizer: AdamW,
}

fn trainer_error(e: claas_trainer::Error) -> PhaseError {
    match e {
        claas_trainer::Error::InvalidInput(m) => PhaseError::fatal("invalid_input", m),
        claas_trainer::Error::InvalidSample { index, message } => {
            PhaseError::bad_sample(index, message)
        }
        claas_trainer::Error::Checkpoint(m) => PhaseError::fatal("adapter_unreadable", m),
        claas_trainer::Error::Io(e) => PhaseError::storage(e),
        other => PhaseError::retryable("trainer_error", other.to_string()),
    }
}

fn pick_device(kind: TrainerDevice) -> claas_trainer::Result<Device> {
    Ok(match kind {
        TrainerDevice::Cpu => Device::Cpu,
        TrainerDevice::Cuda => Device::new_cuda(0)?,
        TrainerDevice::Auto if cfg!(feature = "cuda") => {
            Device::cuda_if_available(0).unwrap_or(Device::Cpu)
        }
        TrainerDevice::Auto => Device::Cpu,
    })
}

/// A `file://` URI or a plain path.
fn uri_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

impl CandleExecutor {
    /// The trainer, and beside it the local vLLM's control when one is configured.
    /// Blocking (it loads the model): call it from a blocking context or at start-up.
    pub fn new(opts: CandleOptions) -> claas_trainer::Result<Self> {
        let serving: Arc<dyn Serving> = match &opts.vllm {
            Some(v) => Arc::new(VllmServing::new(v.clone(), opts.store.clone())),
            None => Arc::new(NoServing),
        };
        Ok(CandleExecutor {
            trainer: Arc::new(CandleTrainer::new(opts)?),
            serving,
        })
    }

    /// What embedded inference shares with training: the resident base model (none with
    /// `disk` residency) and the tokenizer.
    pub fn inference_parts(&self) -> (Option<Arc<Qwen3>>, Arc<ChatTokenizer>) {
        (
            self.trainer.resident.clone(),
            self.trainer.tokenizer.clone(),
        )
    }
}

impl CandleTrainer {
    /// Loads the tokenizer and (unless `disk`) the base model. Blocking: call it from a
    /// blocking context or at start-up.
    pub fn new(opts: CandleOptions) -> claas_trainer::Result<Self> {
        let device = pick_device(opts.device)?;
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let tokenizer = Arc::new(ChatTokenizer::from_dir(&opts.model_dir)?);
        let started = Instant::now();
        let resident = match opts.residency {
            Residency::Disk => None,
            Residency::Gpu => Some(Arc::new(Qwen3::load(&opts.model_dir, &device, dtype)?)),
            Residency::Host => Some(Arc::new(Qwen3::load(&opts.model_dir, &Device::Cpu, dtype)?)),
        };
        tracing::info!(
            model = %opts.model_dir.display(),
            device = ?device,
            residency = ?opts.residency,
            load_ms = started.elapsed().as_millis() as u64,
            "trainer ready"
        );
        let vram = if device.is_cuda() {
            Nvml::init().map(|p| Box::new(p) as Box<dyn VramProbe>)
        } else {
            Err("no GPU: the trainer runs on the CPU".to_string())
        };
        Ok(CandleTrainer {
            vram,
            opts,
            device,
            dtype,
            tokenizer,
            resident,
        })
    }

    /// The model on the training device, and how long getting it there took (ms) when it
    /// had to be copied or read.
    fn model(&self) -> claas_trainer::Result<(Arc<Qwen3>, Option<u64>)> {
        let started = Instant::now();
        let ms = || Some(started.elapsed().as_millis() as u64);
        match &self.resident {
            Some(m) if m.device().same_device(&self.device) => Ok((m.clone(), None)),
            Some(m) => Ok((Arc::new(m.to_device(&self.device)?), ms())),
            None => Ok((
                Arc::new(Qwen3::load(&self.opts.model_dir, &self.device, self.dtype)?),
                ms(),
            )),
        }
    }

    /// The directory a published version lives in (as `store_adapter` writes it).
    /// Where this attempt writes `version` (see `AdapterStore` for the layout).
    fn version_dir(&self, job: &JobContext, version: i32) -> PathBuf {
        let root = std::path::absolute(&self.opts.lora_root)
            .unwrap_or_else(|_| self.opts.lora_root.clone());
        root.join(&job.lora_id)
            .join(AdapterStore::version_name(version, &job.write_tag))
    }

    /// The trainer's samples, and each one's text as the teacher scores it (its rendered
    /// prompt, then the response: CLaaS's `teacher_scored_texts`).
    fn step_samples(&self, samples: &[Sample]) -> PhaseResult<(Vec<StepSample>, Vec<String>)> {
        samples
            .iter()
            .map(|s| {
                let r = &s.rollout;
                let prompt = self
                    .tokenizer
                    .teacher_prompt_text(&r.system_prompt, &s.prompt, &s.feedback)
                    .map_err(trainer_error)?;
                let teacher = self.tokenizer.encode(&prompt).map_err(trainer_error)?;
                let response = self
                    .tokenizer
                    .decode(&r.response_token_ids)
                    .map_err(trainer_error)?;
                let step = StepSample {
                    prompt_token_ids: r.prompt_token_ids.clone(),
                    response_token_ids: r.response_token_ids.clone(),
                    response_logprobs: r.response_logprobs.clone(),
                    teacher_prompt_token_ids: teacher,
                };
                Ok((step, prompt + &response))
            })
            .collect::<PhaseResult<Vec<_>>>()
            .map(|pairs| pairs.into_iter().unzip())
    }
}

/// Reads the adapter of `from` (creating version 0 on first use when init wrote no files)
/// and its optimizer state.
fn load_adapter(
    model: &Qwen3,
    from: &AdapterSource,
    lora_id: &str,
) -> claas_trainer::Result<(LoraAdapter, AdamW)> {
    let dir = uri_path(&from.uri);
    if !dir.join("adapter_model.safetensors").is_file() {
        // Only an initial version (no recorded weights) may be created here; a trained
        // version whose files are gone is an error, not a reason to start over.
        if from.version != 0 && !from.sha256.is_empty() {
            return Err(claas_trainer::Error::Checkpoint(format!(
                "version {} of {lora_id} has no adapter at {}",
                from.version,
                dir.display()
            )));
        }
        let config = AdapterConfig::for_lora(
            from.rank,
            from.alpha,
            from.target_modules.clone(),
            &from.base_model,
        );
        storage::write_initial_adapter(&dir, lora_id, &model.config, config)?;
    }
    let adapter = LoraAdapter::load(&dir, &model.config, model.device())?;
    let state = dir.join(STATE_FILE);
    let optimizer = if state.is_file() {
        AdamW::load(&state, adapter.params(), model.device())?
    } else {
        AdamW::default()
    };
    Ok((adapter, optimizer))
}

#[async_trait]
impl Trainer for CandleTrainer {
    /// Waits for `min_free_vram_gb` on the training GPU; on the CPU there is nothing to
    /// wait for.
    async fn wait_vram(&self, _job: &JobContext) -> PhaseResult<()> {
        let (Some(o), true) = (&self.opts.vllm, self.device.is_cuda()) else {
            tracing::info!("vram: no GPU to wait for (trainer on the CPU or no vLLM)");
            return Ok(());
        };
        match &self.vram {
            Ok(probe) => {
                wait_for_free(
                    probe.as_ref(),
                    o.min_free_vram_gb,
                    o.vram_timeout,
                    std::time::Duration::from_millis(250),
                )
                .await
            }
            Err(why) => Err(PhaseError::retryable("vram_unreadable", why.clone())),
        }
    }

    async fn distill(
        &self,
        job: &JobContext,
        from: &AdapterSource,
        samples: &[Sample],
        training: &TrainingConfig,
    ) -> PhaseResult<Distilled> {
        if from.base_model != self.opts.base_model_id {
            return Err(PhaseError::fatal(
                "wrong_base_model",
                format!(
                    "LoRA {} uses base model {}, this worker trains {}",
                    job.lora_id, from.base_model, self.opts.base_model_id
                ),
            ));
        }
        let (batch, scored_texts) = self.step_samples(samples)?;
        let cfg = StepConfig {
            learning_rate: training.learning_rate,
            alpha: training.alpha,
            is_clip: training.is_clip,
            max_grad_norm: training.max_grad_norm,
            kl_reg_weight: training.kl_reg_weight,
            teacher_top_k: training.teacher_top_k as usize,
            max_seq_len: self.opts.max_seq_len,
            // On a GPU memory is what runs out; on the CPU, time.
            checkpoint: self.device.is_cuda(),
        };
        let (model, copy_in_ms) = self.model().map_err(trainer_error)?;
        let from = match &self.opts.store {
            // A version another node published: read it from the object store's cache.
            Some(s) if s.is_remote() => {
                let dir = s
                    .materialize(&from.uri)
                    .await
                    .map_err(PhaseError::storage)?;
                AdapterSource {
                    uri: dir.display().to_string(),
                    ..from.clone()
                }
            }
            _ => from.clone(),
        };
        let lora_id = job.lora_id.clone();
        let started = Instant::now();
        let (trained, metrics) = tokio::task::spawn_blocking(move || {
            let (adapter, mut optimizer) = load_adapter(&model, &from, &lora_id)?;
            let metrics = sdpo_step(&model, &adapter, &mut optimizer, &batch, &cfg)?;
            Ok::<_, claas_trainer::Error>((Trained { adapter, optimizer }, metrics))
        })
        .await
        .map_err(|e| PhaseError::retryable("trainer_crashed", e.to_string()))?
        .map_err(trainer_error)?;
        let mut metrics = serde_json::to_value(&metrics)
            .map_err(|e| PhaseError::fatal("trainer_error", e.to_string()))?;
        if let Some(m) = metrics.as_object_mut() {
            m.insert(
                "step_ms".into(),
                (started.elapsed().as_millis() as u64).into(),
            );
            if let Some(ms) = copy_in_ms {
                m.insert("model_load_ms".into(), ms.into());
            }
            m.insert("teacher_scored_texts".into(), scored_texts.into());
        }
        Ok(Distilled {
            metrics,
            artifact: Box::new(trained),
        })
    }

    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        distilled: Distilled,
    ) -> PhaseResult<StoredAdapter> {
        let trained = distilled.artifact.downcast::<Trained>().map_err(|_| {
            PhaseError::fatal("trainer_error", "distill produced no candle adapter")
        })?;
        let dir = self.version_dir(job, version);
        let target = dir.clone();
        let sha = tokio::task::spawn_blocking(move || {
            if let Some(parent) = target.parent() {
                let stale = std::time::Duration::from_secs(600);
                match storage::remove_stale_temp_dirs(parent, stale) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "removed files of crashed publishes"),
                    Err(e) => tracing::warn!(error = %e, "could not clean up crashed publishes"),
                }
            }
            // A name no other attempt uses: nothing to replace, and a stalled writer that
            // wakes after losing its lease writes beside the published files, not over them.
            storage::write_dir_atomically(&target, |tmp| {
                trained.adapter.save(tmp)?;
                trained.optimizer.save(&tmp.join(STATE_FILE))
            })?;
            storage::adapter_sha256(&target)
        })
        .await
        .map_err(PhaseError::storage)?
        .map_err(PhaseError::storage)?;
        let uri = match &self.opts.store {
            Some(s) if s.is_remote() => s
                .publish(
                    &job.lora_id,
                    &AdapterStore::version_name(version, &job.write_tag),
                )
                .await
                .map_err(PhaseError::storage)?,
            _ => format!("file://{}", dir.display()),
        };
        Ok(StoredAdapter { uri, sha256: sha })
    }
}
