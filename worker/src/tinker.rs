//! The hosted trainer: Tinker (Thinking Machines' LoRA training service) takes the step that
//! CLaaS's Tinker engine takes (`claas/training/engine/tinker/engine.py`, `distill` and
//! `_build_sample_datum`; inventory §4.4), through [`claas_tinker::TinkerClient`].
//!
//! Per job: the LoRA's current version is loaded into a new training model (weights only,
//! as `create_training_client_from_state` does), the base model scores each response after
//! the hindsight teacher prompt (`compute_logprobs`, all samples at once), [`distill_datums`]
//! turns the two log-prob sequences into importance-sampling datums, and one
//! `forward_backward` and one `optim_step` train on them. Unlike CLaaS, both are awaited, so
//! a failed step fails the job here and `tinker_fwd_metrics` is recorded.
//!
//! A version is stored in Tinker, not on disk: its URI is the training-state checkpoint
//! `tinker://<run>/weights/<name>` that the next step loads, and beside it a sampler
//! checkpoint of the same name, `tinker://<run>/sampler_weights/<name>`
//! ([`sampler_path_of`]), that serving samples from. The name is `v<version>-<write_tag>`,
//! unique to the attempt, so an attempt never overwrites another's checkpoints.
//!
//! Retries apply a step at most once: every attempt loads the version the LoRA has *now*
//! into a fresh training model, takes one step, and writes checkpoints of its own; a failed
//! or refused attempt's model and checkpoints are never recorded, and publishing is fenced
//! on that version still being current. Nothing runs on a local GPU, so `wait_vram` waits
//! for nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use claas_core::types::{Sample, TrainingConfig};
use claas_tinker::{
    AdamParams, CheckpointKind, LossFn, SamplerSource, Seq, Sessions, TinkerClient, TinkerPath,
};
use claas_trainer::template::ChatTokenizer;
use futures::future::try_join_all;
use sha2::Digest;

mod datums;

pub use datums::{
    completion_logprobs, distill_datums, sample_datum, BatchStats, SampleStats, ScoredSample,
};

use crate::executor::{
    AdapterSource, Distilled, JobContext, PhaseError, PhaseResult, ServedVersion, Serving,
    StoredAdapter, Trainer,
};

/// The checkpoint name of a LoRA's initial weights (CLaaS's `init_lora`).
const INIT_NAME: &str = "init";
/// How long a healthy answer from Tinker lets the worker claim jobs without asking again.
const HEALTHY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// The trainer half on Tinker. The tokenizer is the base model's (for the teacher prompt);
/// the Tinker session is opened on first use and again after Tinker ends it.
pub struct TinkerTrainer {
    client: TinkerClient,
    base_model: String,
    tokenizer: Arc<ChatTokenizer>,
    sessions: Sessions,
    /// When Tinker last answered its health check.
    healthy_at: std::sync::Mutex<Option<Instant>>,
}

/// What distill hands to store_adapter: the trained model and its next request's seq id.
struct Trained {
    session: String,
    model_id: String,
    next_seq: i32,
}

impl TinkerTrainer {
    /// A trainer on `base_model` (as Tinker names it) that renders teacher prompts with
    /// `tokenizer`, the base model's.
    pub fn new(
        client: TinkerClient,
        base_model: impl Into<String>,
        tokenizer: Arc<ChatTokenizer>,
    ) -> Self {
        TinkerTrainer {
            base_model: base_model.into(),
            tokenizer,
            sessions: Sessions::new(client.clone()),
            client,
            healthy_at: std::sync::Mutex::new(None),
        }
    }

    /// [`Self::new`] with the tokenizer read from a directory holding `tokenizer.json` and
    /// `tokenizer_config.json`. Blocking.
    pub fn from_tokenizer_dir(
        client: TinkerClient,
        base_model: impl Into<String>,
        tokenizer_dir: &Path,
    ) -> claas_trainer::Result<Self> {
        let tokenizer = Arc::new(ChatTokenizer::from_dir(tokenizer_dir)?);
        Ok(Self::new(client, base_model, tokenizer))
    }

    pub fn base_model(&self) -> &str {
        &self.base_model
    }

    /// A new LoRA of `rank` on the base model, saved as its initial version: the training
    /// state's `tinker://…/weights/init` path (a version URI), with sampler weights beside it
    /// ([`sampler_path_of`]). A new LoRA equals the base model until trained.
    pub async fn init_lora(&self, rank: i32) -> PhaseResult<String> {
        let rank = lora_rank(rank)?;
        let (session, seq) = self.reserve(Seq::Model).await?;
        let create = self
            .client
            .create_model(&session, seq, &self.base_model, rank);
        let model_id = self.tinker(&session, create).await?;
        let trained = Trained {
            session,
            model_id,
            next_seq: 1,
        };
        self.save(&trained, INIT_NAME).await
    }

    /// A seq id from the session's `kind` counter, and the session it belongs to.
    async fn reserve(&self, kind: Seq) -> PhaseResult<(String, u64)> {
        self.sessions.reserve(kind).await.map_err(tinker_error)
    }

    /// Awaits a call made in `session`. When Tinker says the session is over (410) it is
    /// dropped, so that the next attempt opens a new one: retryable.
    async fn tinker<T>(
        &self,
        session: &str,
        call: impl std::future::Future<Output = claas_tinker::Result<T>>,
    ) -> PhaseResult<T> {
        match call.await {
            Ok(v) => Ok(v),
            Err(e) if e.is_session_expired() => {
                self.sessions.forget(session).await;
                Err(PhaseError::retryable(
                    "tinker_error",
                    format!("{e} (the session expired: the next attempt opens a new one)"),
                ))
            }
            Err(e) => Err(tinker_error(e)),
        }
    }

    /// A training model holding `from`'s weights (not its Adam state, as in CLaaS): loaded
    /// from its checkpoint, or a new LoRA when `from` is an initial version that no Tinker
    /// checkpoint holds yet.
    async fn open_student(&self, from: &AdapterSource) -> PhaseResult<Trained> {
        let (session, seq) = self.reserve(Seq::Model).await?;
        let model_id = match from.uri.parse::<TinkerPath>() {
            Ok(path) if path.kind == CheckpointKind::Weights => {
                let load = self.client.load_weights(&session, seq, &path, false);
                self.tinker(&session, load).await?
            }
            _ if from.sha256.is_empty() && !from.uri.starts_with("tinker://") => {
                let rank = lora_rank(from.rank)?;
                let create = self
                    .client
                    .create_model(&session, seq, &self.base_model, rank);
                self.tinker(&session, create).await?
            }
            _ => {
                return Err(PhaseError::fatal(
                    "adapter_unreadable",
                    format!(
                        "version {} is stored at {:?}, not a tinker://<run>/weights/<name> path",
                        from.version, from.uri
                    ),
                ))
            }
        };
        // A model made by create or by load counts its own requests from 1 (wire doc §4.5).
        Ok(Trained {
            session,
            model_id,
            next_seq: 1,
        })
    }

    /// Each sample's prompt and response ids, the teacher's prompt ids and the text the
    /// teacher scores (CLaaS's `teacher_scored_text`), checked before anything is sent.
    fn prepare(&self, samples: &[Sample]) -> PhaseResult<Vec<Prepared>> {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = &s.rollout;
                if r.response_logprobs.len() != r.response_token_ids.len() {
                    return Err(PhaseError::bad_sample(
                        i,
                        format!(
                            "response_logprobs length ({}) != completion_len ({})",
                            r.response_logprobs.len(),
                            r.response_token_ids.len()
                        ),
                    ));
                }
                let tok = |e: claas_trainer::Error| tokenizer_error(i, e);
                let teacher = self
                    .tokenizer
                    .teacher_prompt_ids(&r.system_prompt, &s.prompt, &s.feedback)
                    .map_err(tok)?;
                let full: Vec<u32> = teacher
                    .iter()
                    .chain(&r.response_token_ids)
                    .copied()
                    .collect();
                let scored_text = self.tokenizer.decode(&full).map_err(tok)?;
                Ok(Prepared {
                    prompt_ids: token_ids(i, &r.prompt_token_ids)?,
                    response_ids: token_ids(i, &r.response_token_ids)?,
                    student_logprobs: r.response_logprobs.clone(),
                    teacher_prompt_len: teacher.len(),
                    teacher_full: token_ids(i, &full)?,
                    scored_text,
                })
            })
            .collect()
    }

    /// The base model's log-probs of each response after its teacher prompt, all samples
    /// at once on one sampling session.
    async fn score(&self, prepared: Vec<Prepared>) -> PhaseResult<Vec<ScoredSample>> {
        let (session, seq) = self.reserve(Seq::Sampler).await?;
        let source = SamplerSource::BaseModel(self.base_model.clone());
        let create = self.client.create_sampling_session(&session, seq, &source);
        let teacher = self.tinker(&session, create).await?;
        let scored = prepared.into_iter().enumerate().map(|(i, p)| {
            let (session, teacher) = (&session, &teacher);
            async move {
                let call = self
                    .client
                    .compute_logprobs(teacher, i as u64, &p.teacher_full);
                let full = self.tinker(session, call).await?;
                let completion =
                    completion_logprobs(&full, p.teacher_prompt_len, p.response_ids.len())
                        .map_err(|m| PhaseError::fatal("tinker_error", m))?;
                Ok::<_, PhaseError>(ScoredSample {
                    prompt_ids: p.prompt_ids,
                    response_ids: p.response_ids,
                    student_logprobs: p.student_logprobs,
                    teacher_logprobs: completion,
                })
            }
        });
        try_join_all(scored).await
    }

    /// Saves the training state and the sampler weights of `trained` as `name`: the state's
    /// path, whose sampler twin [`sampler_path_of`] names.
    async fn save(&self, trained: &Trained, name: &str) -> PhaseResult<String> {
        let (session, model) = (&trained.session, &trained.model_id);
        let state = self.client.save_weights(model, trained.next_seq, name);
        let state = self.tinker(session, state).await?.to_string();
        let sampler = self
            .client
            .save_weights_for_sampler(model, trained.next_seq + 1, name);
        let sampler = self.tinker(session, sampler).await?.to_string();
        if sampler_path_of(&state).as_deref() != Some(sampler.as_str()) {
            return Err(PhaseError::fatal(
                "tinker_error",
                format!("Tinker saved {state} and {sampler}: not one run and name"),
            ));
        }
        Ok(state)
    }
}

/// One sample, tokenized and checked, before the teacher scores it.
struct Prepared {
    prompt_ids: Vec<i32>,
    response_ids: Vec<i32>,
    student_logprobs: Vec<f32>,
    teacher_prompt_len: usize,
    teacher_full: Vec<i32>,
    scored_text: String,
}

/// A Tinker failure: `tinker_error`, Tinker's message naming the call, retryable as
/// [`claas_tinker::Error::is_retryable`] says.
fn tinker_error(e: claas_tinker::Error) -> PhaseError {
    PhaseError {
        code: "tinker_error".into(),
        message: e.to_string(),
        retryable: e.is_retryable(),
        sample: None,
    }
}

/// A sample the tokenizer refuses is that sample's fault; a tokenizer that cannot render
/// at all is the worker's.
fn tokenizer_error(index: usize, e: claas_trainer::Error) -> PhaseError {
    match e {
        claas_trainer::Error::InvalidInput(m) => PhaseError::bad_sample(index, m),
        other => PhaseError::fatal("tokenizer_error", other.to_string()),
    }
}

/// Token ids as Tinker takes them (i32).
fn token_ids(index: usize, ids: &[u32]) -> PhaseResult<Vec<i32>> {
    ids.iter()
        .map(|&t| {
            i32::try_from(t)
                .map_err(|_| PhaseError::bad_sample(index, format!("token id {t} is out of range")))
        })
        .collect()
}

fn lora_rank(rank: i32) -> PhaseResult<u32> {
    u32::try_from(rank).ok().filter(|&r| r > 0).ok_or_else(|| {
        PhaseError::fatal("invalid_input", format!("LoRA rank {rank} is not positive"))
    })
}

/// The sampler checkpoint saved beside a version's training state: `tinker://<run>/
/// weights/<name>` → `tinker://<run>/sampler_weights/<name>` (both saves use one name);
/// `None` for anything else.
pub fn sampler_path_of(state_uri: &str) -> Option<String> {
    let path: TinkerPath = state_uri.parse().ok()?;
    path.sampler_twin().map(|p| p.to_string())
}

#[async_trait]
impl Trainer for TinkerTrainer {
    /// Tinker trains on its own hardware: nothing to wait for here.
    async fn wait_vram(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }

    async fn distill(
        &self,
        job: &JobContext,
        from: &AdapterSource,
        samples: &[Sample],
        training: &TrainingConfig,
    ) -> PhaseResult<Distilled> {
        if from.base_model != self.base_model {
            return Err(PhaseError::fatal(
                "wrong_base_model",
                format!(
                    "LoRA {} uses base model {}, this worker trains {} on Tinker",
                    job.lora_id, from.base_model, self.base_model
                ),
            ));
        }
        let started = Instant::now();
        let prepared = self.prepare(samples)?;
        let scored_texts: Vec<String> = prepared.iter().map(|p| p.scored_text.clone()).collect();
        let scored = self.score(prepared).await?;
        let (datums, stats) = distill_datums(&scored, training.alpha)
            .map_err(|(i, m)| PhaseError::bad_sample(i, m))?;
        let mut trained = self.open_student(from).await?;
        let (session, model) = (trained.session.clone(), trained.model_id.clone());
        let loss = LossFn::ImportanceSampling;
        let fwd = self
            .client
            .forward_backward(&model, trained.next_seq, &datums, loss);
        let fwd = self.tinker(&session, fwd).await?;
        let adam = AdamParams {
            learning_rate: training.learning_rate,
            ..AdamParams::default()
        };
        let optim = self.client.optim_step(&model, trained.next_seq + 1, adam);
        let optim = self.tinker(&session, optim).await?;
        trained.next_seq += 2;
        let mut metrics = stats.claas_metadata(from.version + 1, training.learning_rate);
        metrics.insert("teacher_scored_texts".into(), scored_texts.into());
        if !fwd.metrics.is_empty() {
            metrics.insert("tinker_fwd_metrics".into(), serde_json::json!(fwd.metrics));
        }
        if let Some(m) = optim.metrics.filter(|m| !m.is_empty()) {
            metrics.insert("tinker_optim_metrics".into(), serde_json::json!(m));
        }
        metrics.insert("tinker_model_id".into(), model.into());
        metrics.insert(
            "step_ms".into(),
            (started.elapsed().as_millis() as u64).into(),
        );
        Ok(Distilled {
            metrics: metrics.into(),
            artifact: Box::new(trained),
        })
    }

    /// Saves the step as checkpoints named `v<version>-<write_tag>`. The sha256 recorded is
    /// that of the state path's text: Tinker never hands back the weights' bytes, and a
    /// checkpoint (saved with `overwrite: false` under a name used once) never changes, so
    /// its path is what identifies its contents.
    async fn store_adapter(
        &self,
        job: &JobContext,
        version: i32,
        distilled: Distilled,
    ) -> PhaseResult<StoredAdapter> {
        let trained = distilled
            .artifact
            .downcast::<Trained>()
            .map_err(|_| PhaseError::fatal("trainer_error", "distill produced no Tinker model"))?;
        let name = format!("v{version}-{}", job.write_tag);
        if job.write_tag.is_empty() || name.contains('/') {
            return Err(PhaseError::fatal(
                "invalid_input",
                format!("{name:?} cannot name a Tinker checkpoint"),
            ));
        }
        let uri = self.save(&trained, &name).await?;
        let sha256 = hex::encode(sha2::Sha256::digest(uri.as_bytes()));
        Ok(StoredAdapter { uri, sha256 })
    }

    /// Deletes a version's training state and its sampler weights on Tinker (one already
    /// gone counts as deleted).
    async fn remove_stored(&self, uri: &str) -> PhaseResult<bool> {
        let Ok(state) = uri.parse::<TinkerPath>() else {
            return Ok(false);
        };
        let delete = self.client.delete_checkpoint_and_sampler_twin(&state);
        delete.await.map_err(tinker_error)?;
        Ok(true)
    }
}

/// Serving on Tinker: no local vLLM to drain, sleep or wake. The API samples each LoRA at
/// its current version's sampler checkpoint; `reload` proves that checkpoint serves by
/// opening a sampling session on it, so a version whose sampler weights Tinker cannot load
/// fails the job as published but not served (`reload_failed`).
#[async_trait]
impl Serving for TinkerTrainer {
    fn controls_vllm(&self) -> bool {
        false
    }

    async fn drain(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }

    async fn sleep(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }

    async fn reload(&self, _job: &JobContext, serve: &ServedVersion) -> PhaseResult<()> {
        let sampler = (serve.uri.parse::<TinkerPath>().ok()).and_then(|p| p.sampler_twin());
        let Some(path) = sampler else {
            // An initial version no Tinker checkpoint holds: the base model serves it.
            return Ok(());
        };
        let (session, seq) = self.reserve(Seq::Sampler).await?;
        let source = SamplerSource::ModelPath(path);
        let open = self.client.create_sampling_session(&session, seq, &source);
        self.tinker(&session, open).await.map(|_| ())
    }

    async fn wake(&self, _job: &JobContext) -> PhaseResult<()> {
        Ok(())
    }

    /// Claims wait while Tinker's health check fails, so an outage does not spend jobs'
    /// attempts; a healthy answer holds for [`HEALTHY_FOR`].
    async fn ready(&self) -> Result<(), String> {
        let fresh = |at: &Option<Instant>| at.is_some_and(|t| t.elapsed() < HEALTHY_FOR);
        if fresh(&self.healthy_at.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        self.client.healthz().await.map_err(|e| e.to_string())?;
        *self.healthy_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_path_maps_to_its_sampler_twin() {
        assert_eq!(
            sampler_path_of("tinker://s:train:3/weights/v2-ab12").as_deref(),
            Some("tinker://s:train:3/sampler_weights/v2-ab12")
        );
        assert_eq!(
            sampler_path_of("tinker://s:train:3/sampler_weights/v2"),
            None
        );
        assert_eq!(sampler_path_of("file:///loras/a/v1"), None);
    }
}
