//! claas-engine: in-process inference with candle. When no vLLM is configured (`claas dev`),
//! the API answers chat, text completions and score through this engine, from the same base
//! model the trainer holds (one copy of the weights) and the LoRA named by `model` at its
//! current version. Answers have vLLM's shapes (token ids, raw log-probs), so the API's
//! caching and feedback work the same on either path. One generation runs at a time;
//! requests queue fairly (FIFO).
//!
//! It implements `claas_api::in_process` (the API's seam for in-process inference and for
//! base-model files); it may import the API, the core and the trainer, and nothing imports
//! it but the binary and tests.

mod answers;
mod base_models;

pub use base_models::TrainerModels;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::response::Response;
use claas_api::inference::{Chunk, Generation, Inference};
use claas_core::queue::SharedStore;
use claas_core::types::local_path;
use claas_trainer::generate::{generate, Finish, Sampling, Token};
use claas_trainer::{AdapterConfig, ChatTokenizer, LoraAdapter, Message, Qwen3};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};

use claas_api::error::{ApiError, ApiResult};

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

fn engine_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("embedded inference failed: {e}"))
}

fn bad(e: claas_trainer::Error) -> ApiError {
    match e {
        claas_trainer::Error::InvalidInput(m)
        | claas_trainer::Error::InvalidSample { message: m, .. } => ApiError::invalid(m),
        other => engine_error(other),
    }
}

/// The request's sampling settings, validated.
fn sampling(
    body: &Map<String, Value>,
    stop_ids: &[u32],
    default_max: usize,
) -> ApiResult<Sampling> {
    let num = |k: &str| body.get(k).filter(|v| !v.is_null());
    let temperature = match num("temperature") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| ApiError::invalid("temperature must be a number within [0, 2]"))?,
    };
    let top_p = match num("top_p") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| ApiError::invalid("top_p must be within (0, 1]"))?,
    };
    let max_tokens = match num("max_tokens").or_else(|| num("max_completion_tokens")) {
        None => default_max,
        Some(v) => v
            .as_u64()
            .filter(|m| (1..=32_768).contains(m))
            .ok_or_else(|| ApiError::invalid("max_tokens must be an integer within [1, 32768]"))?
            as usize,
    };
    let top_logprobs =
        match num("top_logprobs") {
            None => 0,
            Some(v) => v.as_u64().filter(|k| *k <= 20).ok_or_else(|| {
                ApiError::invalid("top_logprobs must be an integer within [0, 20]")
            })? as usize,
        };
    let seed = match num("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| ApiError::invalid("seed must be a non-negative integer"))?,
        ),
    };
    Ok(Sampling {
        temperature: temperature as f32,
        top_p: top_p as f32,
        max_tokens,
        seed,
        stop_ids: stop_ids.to_vec(),
        top_logprobs,
    })
}

fn stop_strings(body: &Map<String, Value>) -> ApiResult<Vec<String>> {
    match body.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::invalid("stop must be a string or a list of strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::invalid(
            "stop must be a string or a list of strings",
        )),
    }
}

/// Message content as text (a string, or the text parts of a list).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or(p.as_str()))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What one request produces, as it is produced.
pub struct Run {
    pub model: String,
    pub prompt_ids: Vec<u32>,
    /// Token events, then the end.
    pub events: mpsc::Receiver<RunEvent>,
}

impl Run {
    /// The whole answer: its tokens, its text, and why it ended.
    pub async fn collect(&mut self) -> ApiResult<(Vec<Token>, String, Finish)> {
        let (mut tokens, mut text) = (Vec::new(), String::new());
        loop {
            match self.events.recv().await {
                Some(RunEvent::Token { token, text: t }) => {
                    tokens.push(token);
                    text.push_str(&t);
                }
                Some(RunEvent::Done(f, rest)) => {
                    text.push_str(&rest);
                    return Ok((tokens, text, f));
                }
                Some(RunEvent::Failed(e)) => {
                    return Err(ApiError::internal(format!("generation failed: {e}")))
                }
                None => return Err(ApiError::internal("generation stopped unexpectedly")),
            }
        }
    }
}

pub enum RunEvent {
    Token {
        token: Token,
        text: String,
    },
    /// The end, with any text held back because it ended inside a character.
    Done(Finish, String),
    Failed(String),
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
        let stop_ids = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .collect();
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

    /// Token ids of the chat `messages` rendered with the checkpoint's template.
    pub fn chat_prompt(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        kwargs: &Map<String, Value>,
    ) -> ApiResult<Vec<u32>> {
        let msgs: Vec<Message> = messages
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap_or("user"), text_of(&m["content"])))
            .collect();
        let text = self
            .tokenizer
            .render(&msgs, add_generation_prompt, kwargs)
            .map_err(bad)?;
        self.tokenizer.encode(&text).map_err(bad)
    }

    pub fn encode(&self, text: &str) -> ApiResult<Vec<u32>> {
        self.tokenizer.encode(text).map_err(bad)
    }

    pub fn decode_one(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
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
        let sampling = sampling(body, &self.stop_ids, 256)?;
        self.check_context(prompt_ids.len(), sampling.max_tokens)?;
        let stops = stop_strings(body)?;
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

    /// The text of generated `ids` without stop tokens, cut before the first stop string;
    /// true when one was found. Decoded over the whole answer, so characters split across
    /// tokens come out whole.
    fn visible_text(&self, ids: &[u32], stops: &[String]) -> (String, bool) {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|i| !self.stop_ids.contains(i))
            .collect();
        let mut text = self.tokenizer.decode(&kept).unwrap_or_default();
        let cut = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min();
        if let Some(c) = cut {
            text.truncate(c);
        }
        (text, cut.is_some())
    }

    /// Log-probs of `completion`'s tokens as the answer to `messages` (CLaaS `/v1/score`).
    pub async fn score_completion(
        &self,
        model: &str,
        messages: &[Value],
        completion: &str,
    ) -> ApiResult<Value> {
        let prompt = self.chat_prompt(messages, true, &Map::new())?;
        let mut full_messages = messages.to_vec();
        full_messages.push(json!({"role": "assistant", "content": completion}));
        let full = self.chat_prompt(&full_messages, false, &Map::new())?;
        self.check_context(full.len(), 0)?;
        let completion_ids: Vec<u32> = full.get(prompt.len()..).unwrap_or_default().to_vec();
        if completion_ids.is_empty() {
            return Ok(
                json!({"logprobs": [], "tokens": [], "prompt_tokens": prompt.len(),
                "completion_tokens": 0, "logprob_sum": 0.0}),
            );
        }
        let adapter = self.adapter(model).await?;
        let model_arc = self.model.clone();
        let (p, ids) = (prompt.len(), full.clone());
        let _turn = self.turn.acquire().await.map_err(engine_error)?;
        let lps: Vec<f32> = tokio::task::spawn_blocking(move || {
            claas_trainer::generate::token_logprobs(&model_arc, &ids, p, adapter.as_deref())
        })
        .await
        .map_err(engine_error)?
        .map_err(bad)?;
        let tokens: Vec<String> = completion_ids.iter().map(|i| self.decode_one(*i)).collect();
        let sum: f64 = lps.iter().map(|l| f64::from(*l)).sum();
        Ok(
            json!({"logprobs": lps, "tokens": tokens, "prompt_tokens": prompt.len(),
            "completion_tokens": completion_ids.len(), "logprob_sum": sum}),
        )
    }
}

/// A vLLM-shaped log-prob entry for `token` (sampled token first in the top list).
pub fn logprob_entry(engine: &Engine, token: &Token, top: usize) -> Value {
    let text = engine.decode_one(token.id);
    let mut tops = vec![json!({"token": text, "logprob": token.logprob, "bytes": text.as_bytes()})];
    for (id, lp) in token
        .top
        .iter()
        .filter(|(id, _)| *id != token.id)
        .take(top.saturating_sub(1))
    {
        let t = engine.decode_one(*id);
        tops.push(json!({"token": t, "logprob": lp, "bytes": t.as_bytes()}));
    }
    tops.truncate(top);
    json!({"token": text, "logprob": token.logprob, "bytes": text.as_bytes(), "top_logprobs": tops})
}

pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

impl Engine {
    /// Starts a chat answer for vLLM's request body (`messages`, `model`, sampling).
    async fn start_chat(self: &Arc<Self>, request: &Value) -> ApiResult<Run> {
        let messages = request["messages"].as_array().cloned().unwrap_or_default();
        let kwargs = request["chat_template_kwargs"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let prompt = self.chat_prompt(&messages, true, &kwargs)?;
        let body = request.as_object().cloned().unwrap_or_default();
        let model = request["model"].as_str().unwrap_or_default().to_owned();
        self.start(&model, prompt, &body).await
    }
}

#[async_trait]
impl Inference for Engine {
    async fn chat(self: Arc<Self>, request: &Value) -> ApiResult<Generation<Value>> {
        let run = self.start_chat(request).await?;
        let answer = answers::embedded_answer(&self, run, request).await?;
        Ok(Generation::local(answer))
    }

    async fn chat_stream(
        self: Arc<Self>,
        request: &Value,
    ) -> ApiResult<Generation<mpsc::Receiver<Chunk>>> {
        let run = self.start_chat(request).await?;
        let chunks = answers::embedded_chunks(self, run, request.clone());
        Ok(Generation::local(chunks))
    }

    async fn completion(self: Arc<Self>, request: Map<String, Value>) -> ApiResult<Response> {
        answers::embedded_completion(&self, request).await
    }

    async fn score(
        self: Arc<Self>,
        model: &str,
        messages: &[Value],
        completion: &str,
    ) -> ApiResult<Value> {
        // No model named: the base model.
        let model = if model.is_empty() {
            &self.base_name
        } else {
            model
        };
        self.score_completion(model, messages, completion).await
    }
}
