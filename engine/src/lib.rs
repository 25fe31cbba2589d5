//! claas-engine: in-process inference with candle. When no vLLM is configured (`claas dev`),
//! the API answers chat, text completions and score through this engine, from the same base
//! model the trainer holds (one copy of the weights) and the LoRA named by `model` at its
//! current version. Answers have vLLM's shapes (token ids, raw log-probs), so the API's
//! caching and feedback work the same on either path. One generation runs at a time;
//! requests queue fairly (FIFO). With `mode: tinker`, [`TinkerSampler`] answers instead:
//! the same shapes, from Tinker's sampler (`tinker.rs`); both share `runner.rs`.
//!
//! It implements `claas_api::inference` and `claas_api::in_process` (the API's seams for
//! inference and for base-model files); it may import the API, the core, the trainer and
//! the Tinker client, and nothing imports it but the binary and tests.

mod answers;
mod base_models;
mod runner;
mod tinker;

pub use base_models::TrainerModels;
pub use runner::{Run, RunEvent};
pub use tinker::TinkerSampler;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::response::Response;
use claas_api::inference::{Chunk, Generation, Inference};
use claas_core::queue::SharedStore;
use claas_core::types::local_path;
use claas_trainer::generate::generate;
use claas_trainer::{AdapterConfig, ChatTokenizer, LoraAdapter, Qwen3};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Semaphore};

use claas_api::error::{ApiError, ApiResult};
use runner::{bad, engine_error, Runner};

/// The in-process inference engine.
pub struct Engine {
    model: Arc<Qwen3>,
    tokenizer: Arc<ChatTokenizer>,
    /// The base model's name (`model.base_model_id`): what `model` names for no adapter.
    base_name: String,
    store: SharedStore,
    /// Loaded adapters by LoRA id, with the version they are.
    adapters: Mutex<HashMap<String, (i32, Arc<LoraAdapter>)>>,
    /// One generation at a time, served in arrival order.
    turn: Arc<Semaphore>,
    /// Token ids that end an answer (`<|im_end|>`, `<|endoftext|>`).
    stop_ids: Vec<u32>,
}

/// The most tokens (prompt + answer) one embedded request may span, whatever the model's
/// own context: the trainer's default `max_seq_len`.
pub const MAX_CONTEXT: usize = 8192;

impl Engine {
    pub fn new(
        model: Arc<Qwen3>,
        tokenizer: Arc<ChatTokenizer>,
        base_name: String,
        store: SharedStore,
    ) -> Engine {
        let stop_ids = runner::stop_ids(&tokenizer);
        Engine {
            model,
            tokenizer,
            base_name,
            store,
            adapters: Mutex::new(HashMap::new()),
            turn: Arc::new(Semaphore::new(1)),
            stop_ids,
        }
    }

    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// 422 unless `prompt` tokens plus `max_tokens` fit the model's context, capped at
    /// [`MAX_CONTEXT`]: requests take turns on one CPU, so one very long prompt would hold
    /// everyone else's answers back for minutes.
    fn check_context(&self, prompt: usize, max_tokens: usize) -> ApiResult<()> {
        let limit = self.model.config.max_position_embeddings.min(MAX_CONTEXT);
        if prompt + max_tokens <= limit {
            return Ok(());
        }
        Err(ApiError::invalid(format!(
            "the prompt is {prompt} tokens; with max_tokens {max_tokens} it exceeds the \
             embedded engine's context of {limit} tokens: shorten it or lower max_tokens"
        )))
    }

    /// The adapter `model` names at its current version; `None` for the base model.
    async fn adapter(&self, model: &str) -> ApiResult<Option<Arc<LoraAdapter>>> {
        if model.is_empty() || model == self.base_name {
            return Ok(None);
        }
        let unknown = || {
            ApiError::not_found(format!(
                "The model `{model}` does not exist. Valid aliases: {}.",
                self.base_name
            ))
        };
        let lora = self.store.get_lora(model).await?.ok_or_else(unknown)?;
        if let Some((v, a)) = self
            .adapters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            if *v == lora.current_version {
                return Ok(Some(a.clone()));
            }
        }
        let dir =
            (self.store.current_version(&lora).await?).and_then(|v| local_path(&v.storage_uri));
        let (model_arc, lora_id) = (self.model.clone(), model.to_owned());
        let adapter = tokio::task::spawn_blocking(move || {
            match dir.filter(|d| d.join("adapter_model.safetensors").is_file()) {
                Some(d) => LoraAdapter::load(&d, &model_arc.config, model_arc.device()),
                // Not trained yet and no file written: the initial adapter every process
                // derives alike (its B is zero, so it answers as the base model does).
                None => claas_trainer::storage::initial_adapter(
                    &lora_id,
                    &model_arc.config,
                    AdapterConfig::for_lora(
                        lora.rank,
                        lora.alpha,
                        lora.target_modules.clone(),
                        &lora.base_model,
                    ),
                ),
            }
        })
        .await
        .map_err(engine_error)?
        .map_err(engine_error)?;
        let adapter = Arc::new(adapter);
        self.adapters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_owned(), (lora.current_version, adapter.clone()));
        Ok(Some(adapter))
    }

    /// Starts generating after `prompt_ids` for `model`; tokens arrive on the returned
    /// run's channel as they are sampled (after the requests before it have finished).
    pub async fn start(
        self: &Arc<Self>,
        model: &str,
        prompt_ids: Vec<u32>,
        body: &Map<String, Value>,
    ) -> ApiResult<Run> {
        let adapter = self.adapter(model).await?;
        let sampling = runner::sampling(body, &self.stop_ids, 1.0, 256)?;
        self.check_context(prompt_ids.len(), sampling.max_tokens)?;
        let stops = runner::stop_strings(body)?;
        self.model.check_ids("prompt", &prompt_ids).map_err(bad)?;
        let (tx, rx) = mpsc::channel(64);
        let engine = self.clone();
        let ids = prompt_ids.clone();
        tokio::spawn(async move {
            let Ok(_turn) = engine.turn.clone().acquire_owned().await else {
                return;
            };
            let handle = tokio::task::spawn_blocking(move || {
                let mut produced: Vec<u32> = Vec::new();
                let mut shown = String::new();
                let result = generate(&engine.model, adapter.as_deref(), &ids, &sampling, |t| {
                    produced.push(t.id);
                    // Text is decoded over the whole answer so multi-byte characters
                    // split across tokens come out whole.
                    let (full, stop_hit) = engine.visible_text(&produced, &stops);
                    let whole = stop_hit || !full.ends_with('\u{FFFD}');
                    let delta = if full.starts_with(&shown) && whole {
                        let d = full[shown.len()..].to_owned();
                        shown = full;
                        d
                    } else {
                        String::new()
                    };
                    let sent = tx
                        .blocking_send(RunEvent::Token {
                            token: t.clone(),
                            text: delta,
                        })
                        .is_ok();
                    sent && !stop_hit
                });
                let _ = match result {
                    Ok((tokens, finish)) => {
                        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
                        let (full, _) = engine.visible_text(&ids, &stops);
                        let rest = full.get(shown.len()..).unwrap_or_default().to_owned();
                        tx.blocking_send(RunEvent::Done(finish, rest))
                    }
                    Err(e) => tx.blocking_send(RunEvent::Failed(e.to_string())),
                };
            });
            let _ = handle.await;
        });
        Ok(Run {
            model: if model.is_empty() {
                self.base_name.clone()
            } else {
                model.to_owned()
            },
            prompt_ids,
            events: rx,
        })
    }

    fn visible_text(&self, ids: &[u32], stops: &[String]) -> (String, bool) {
        runner::visible_text(&self.tokenizer, &self.stop_ids, ids, stops)
    }

    /// The log-prob of each token of `ids` from `prompt_len` on, after the requests
    /// before it.
    async fn token_logprobs(
        &self,
        model: &str,
        ids: Vec<u32>,
        prompt_len: usize,
    ) -> ApiResult<Vec<f32>> {
        self.check_context(ids.len(), 0)?;
        let adapter = self.adapter(model).await?;
        let model_arc = self.model.clone();
        let _turn = self.turn.acquire().await.map_err(engine_error)?;
        tokio::task::spawn_blocking(move || {
            claas_trainer::generate::token_logprobs(
                &model_arc,
                &ids,
                prompt_len,
                adapter.as_deref(),
            )
        })
        .await
        .map_err(engine_error)?
        .map_err(bad)
    }
}

#[async_trait]
impl Runner for Engine {
    fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    async fn run(
        self: Arc<Self>,
        model: &str,
        prompt_ids: Vec<u32>,
        body: &Map<String, Value>,
    ) -> ApiResult<Run> {
        self.start(model, prompt_ids, body).await
    }

    async fn logprobs(
        self: Arc<Self>,
        model: &str,
        ids: Vec<u32>,
        prompt_len: usize,
    ) -> ApiResult<Vec<f32>> {
        self.token_logprobs(model, ids, prompt_len).await
    }
}

#[async_trait]
impl Inference for Engine {
    async fn chat(self: Arc<Self>, request: &Value) -> ApiResult<Generation<Value>> {
        answers::chat(self, request).await
    }

    async fn chat_stream(
        self: Arc<Self>,
        request: &Value,
    ) -> ApiResult<Generation<mpsc::Receiver<Chunk>>> {
        answers::chat_stream(self, request).await
    }

    async fn completion(self: Arc<Self>, request: Map<String, Value>) -> ApiResult<Response> {
        answers::completion(self, request).await
    }

    async fn score(
        self: Arc<Self>,
        model: &str,
        messages: &[Value],
        completion: &str,
    ) -> ApiResult<Value> {
        // No model named: the base model.
        let model = if model.is_empty() {
            self.base_name.clone()
        } else {
            model.to_owned()
        };
        runner::score(self, &model, messages, completion).await
    }
}
