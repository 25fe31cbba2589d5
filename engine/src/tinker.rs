//! Inference on Tinker's sampler (`mode: tinker`): the prompt is rendered with the base
//! model's chat template here, Tinker samples the tokens and their log-probs, and the answer
//! leaves in vLLM's shapes, so the completion cache and feedback work as with vLLM.
//!
//! Each LoRA is sampled at its current version's sampler checkpoint (the `sampler_weights`
//! twin of the version's `tinker://…/weights/…` URI), so a new version is served as soon as
//! it is published, by every API process, with no refresh call. A LoRA with no trained
//! version, and a request naming the base model, sample the base model, or the checkpoint
//! `POST /v1/sampler/refresh` chose (CLaaS's one global sampler). Sampling sessions are
//! opened once per LoRA version and kept; sampling settings follow CLaaS's Tinker backend
//! (inventory §3.4: temperature 0.7 and 2048 tokens unless asked, a trailing stop token
//! dropped). Unlike CLaaS's, `top_logprobs` is answered: Tinker's `topk_sample_logprobs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::response::Response;
use claas_api::error::{ApiError, ApiResult};
use claas_api::inference::{Chunk, Generation, Inference};
use claas_core::queue::SharedStore;
use claas_tinker::{
    SamplerSource, SamplingParams, Seq, Sessions, Stop, StopReason, TinkerClient, TinkerPath,
};
use claas_trainer::generate::{Finish, Token};
use claas_trainer::ChatTokenizer;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::answers;
use crate::runner::{self, Run, RunEvent, Runner};

/// CLaaS's Tinker sampling defaults.
const DEFAULT_TEMPERATURE: f64 = 0.7;
const DEFAULT_MAX_TOKENS: usize = 2048;

/// The inference backend on Tinker's sampler.
pub struct TinkerSampler {
    sessions: Sessions,
    /// The base model as Tinker names it, and as `model` names it for no LoRA.
    base_model: String,
    tokenizer: Arc<ChatTokenizer>,
    stop_ids: Vec<u32>,
    store: SharedStore,
    /// The open sampler per LoRA id (`""`: the base model's), with the path it samples.
    open: Mutex<HashMap<String, Arc<Sampler>>>,
    /// `POST /v1/sampler/refresh`'s checkpoint: what the base model's requests sample.
    refreshed: Mutex<Option<String>>,
}

/// An open sampling session and the seq id of its next request.
struct Sampler {
    source: SamplerSource,
    session: String,
    id: String,
    next: AtomicU64,
}

impl TinkerSampler {
    pub fn new(
        client: TinkerClient,
        base_model: impl Into<String>,
        tokenizer: Arc<ChatTokenizer>,
        store: SharedStore,
    ) -> TinkerSampler {
        TinkerSampler {
            sessions: Sessions::new(client),
            base_model: base_model.into(),
            stop_ids: runner::stop_ids(&tokenizer),
            tokenizer,
            store,
            open: Mutex::new(HashMap::new()),
            refreshed: Mutex::new(None),
        }
    }

    fn is_base(&self, model: &str) -> bool {
        model.is_empty() || model == self.base_model
    }

    /// What `model` samples now: its LoRA's current sampler checkpoint, or the base model
    /// (a LoRA never trained, or no LoRA), or the refreshed checkpoint.
    async fn source_of(&self, model: &str) -> ApiResult<SamplerSource> {
        let base = || SamplerSource::BaseModel(self.base_model.clone());
        if self.is_base(model) {
            let refreshed = self.refreshed.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(match refreshed.as_deref().map(str::parse::<TinkerPath>) {
                Some(Ok(path)) => SamplerSource::ModelPath(path),
                _ => base(),
            });
        }
        let lora = self.store.get_lora(model).await?.ok_or_else(|| {
            ApiError::not_found(format!(
                "The model `{model}` does not exist. Valid aliases: {}.",
                self.base_model
            ))
        })?;
        let version = self.store.current_version(&lora).await?;
        let sampler = version
            .and_then(|v| v.storage_uri.parse::<TinkerPath>().ok())
            .and_then(|p| p.sampler_twin());
        Ok(sampler.map_or_else(base, SamplerSource::ModelPath))
    }

    /// The open sampler for `model`, opened now when its source changed (a new version).
    async fn sampler(&self, model: &str) -> ApiResult<Arc<Sampler>> {
        let key = if self.is_base(model) { "" } else { model };
        let source = self.source_of(model).await?;
        if let Some(s) = self.open_sampler(key).filter(|s| s.source == source) {
            return Ok(s);
        }
        let (session, seq) = self.sessions.reserve(Seq::Sampler).await.map_err(failed)?;
        let client = self.sessions.client();
        let id = client
            .create_sampling_session(&session, seq, &source)
            .await
            .map_err(failed)?;
        let sampler = Arc::new(Sampler {
            source,
            session,
            id,
            next: AtomicU64::new(0),
        });
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), sampler.clone());
        Ok(sampler)
    }

    fn open_sampler(&self, key: &str) -> Option<Arc<Sampler>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(key).cloned()
    }

    /// Runs `call` on `model`'s sampler; when Tinker ended the session, forgets it and
    /// tries once more on a new one.
    async fn with_sampler<T, F, Fut>(&self, model: &str, call: F) -> ApiResult<T>
    where
        F: Fn(Arc<Sampler>, u64) -> Fut,
        Fut: std::future::Future<Output = claas_tinker::Result<T>>,
    {
        let mut tried = false;
        loop {
            let sampler = self.sampler(model).await?;
            let seq = sampler.next.fetch_add(1, Ordering::SeqCst);
            match call(sampler.clone(), seq).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_session_expired() && !tried => {
                    tried = true;
                    self.sessions.forget(&sampler.session).await;
                    self.open
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|_, s| s.session != sampler.session);
                }
                Err(e) => return Err(failed(e)),
            }
        }
    }

    /// The sampling settings Tinker takes for this request, its stop strings, and how many
    /// likeliest tokens to report at each position.
    fn params(&self, body: &Map<String, Value>) -> ApiResult<(SamplingParams, Vec<String>, u32)> {
        let s = runner::sampling(
            body,
            &self.stop_ids,
            DEFAULT_TEMPERATURE,
            DEFAULT_MAX_TOKENS,
        )?;
        let stops = runner::stop_strings(body)?;
        let stop = if stops.is_empty() {
            Stop::Tokens(self.stop_ids.iter().map(|&t| t as i32).collect())
        } else {
            // Asked-for strings replace the implicit stop: keep the end-of-turn tokens too.
            let ends = self
                .stop_ids
                .iter()
                .filter_map(|&t| self.tokenizer.decode(&[t]).ok());
            Stop::Strings(stops.iter().cloned().chain(ends).collect())
        };
        let params = SamplingParams {
            max_tokens: Some(s.max_tokens as u32),
            seed: Some(s.seed.map_or(0, |v| v as i64)),
            stop: Some(stop),
            temperature: f64::from(s.temperature),
            top_k: -1,
            top_p: f64::from(s.top_p),
        };
        Ok((params, stops, s.top_logprobs as u32))
    }
}

/// A Tinker failure as the API answers it.
fn failed(e: claas_tinker::Error) -> ApiError {
    ApiError::sampler_failed(e.is_retryable() || e.is_session_expired(), e)
}

fn tinker_ids(ids: &[u32]) -> ApiResult<Vec<i32>> {
    ids.iter()
        .map(|&t| {
            i32::try_from(t).map_err(|_| ApiError::invalid(format!("token id {t} is too large")))
        })
        .collect()
}

#[async_trait]
impl Runner for TinkerSampler {
    fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    async fn run(
        self: Arc<Self>,
        model: &str,
        prompt_ids: Vec<u32>,
        body: &Map<String, Value>,
    ) -> ApiResult<Run> {
        let (params, stops, topk) = self.params(body)?;
        let prompt = tinker_ids(&prompt_ids)?;
        let sampled = self
            .with_sampler(model, |s, seq| {
                let (client, prompt, params) = (self.sessions.client(), &prompt, &params);
                async move {
                    match topk {
                        0 => client.sample(&s.id, seq, prompt, 1, params).await,
                        k => client.sample_with_topk(&s.id, seq, prompt, params, k).await,
                    }
                }
            })
            .await?;
        let seq = sampled
            .sequences
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::sampler_failed(false, "asample returned no sequence"))?;
        let logprobs = seq.logprobs.ok_or_else(|| {
            ApiError::sampler_failed(false, "asample returned tokens without log-probs")
        })?;
        let mut top = seq.top.unwrap_or_default().into_iter();
        let mut tokens: Vec<Token> = seq
            .tokens
            .iter()
            .zip(logprobs)
            .map(|(&id, logprob)| Token {
                id: id as u32,
                logprob,
                top: (top.next().unwrap_or_default().into_iter())
                    .map(|(t, lp)| (t as u32, lp))
                    .collect(),
            })
            .collect();
        // As CLaaS: the stop token that ended the answer is not part of it.
        if tokens.last().is_some_and(|t| self.stop_ids.contains(&t.id)) {
            tokens.pop();
        }
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let (text, _) = runner::visible_text(&self.tokenizer, &self.stop_ids, &ids, &stops);
        let finish = match seq.stop_reason {
            StopReason::Length => Finish::Length,
            StopReason::Stop => Finish::Stop,
        };
        // Tinker answers whole: the tokens, then the text at the end.
        let (tx, rx) = mpsc::channel(tokens.len() + 1);
        for token in tokens {
            let _ = tx.try_send(RunEvent::Token {
                token,
                text: String::new(),
            });
        }
        let _ = tx.try_send(RunEvent::Done(finish, text));
        Ok(Run {
            model: if model.is_empty() {
                self.base_model.clone()
            } else {
                model.to_owned()
            },
            prompt_ids,
            events: rx,
        })
    }

    async fn logprobs(
        self: Arc<Self>,
        model: &str,
        ids: Vec<u32>,
        prompt_len: usize,
    ) -> ApiResult<Vec<f32>> {
        let full = tinker_ids(&ids)?;
        let all = self
            .with_sampler(model, |s, seq| {
                let (client, full) = (self.sessions.client(), &full);
                async move { client.compute_logprobs(&s.id, seq, full).await }
            })
            .await?;
        all.get(prompt_len..)
            .unwrap_or_default()
            .iter()
            .map(|lp| {
                lp.ok_or_else(|| {
                    ApiError::sampler_failed(false, "a token came back without a log-prob")
                })
            })
            .collect()
    }
}

#[async_trait]
impl Inference for TinkerSampler {
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
        let model = model.to_owned();
        runner::score(self, &model, messages, completion).await
    }

    /// Deletes a deleted LoRA's checkpoints (training state and sampler weights) on Tinker.
    async fn remove_version(self: Arc<Self>, uri: &str) -> ApiResult<bool> {
        let Ok(state) = uri.parse::<TinkerPath>() else {
            return Ok(false);
        };
        let client = self.sessions.client();
        client
            .delete_checkpoint_and_sampler_twin(&state)
            .await
            .map_err(failed)?;
        Ok(true)
    }

    async fn sampler_status(self: Arc<Self>) -> Option<Value> {
        let path = self
            .refreshed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(json!({"model_path": path, "base_model": self.base_model}))
    }

    /// Opens a sampler on `model_path` (a `tinker://` sampler checkpoint; `None`: the base
    /// model) before switching the base model's requests to it, so a path Tinker cannot
    /// serve changes nothing.
    async fn sampler_refresh(
        self: Arc<Self>,
        model_path: Option<String>,
    ) -> ApiResult<Option<Value>> {
        let path = model_path.filter(|p| !p.trim().is_empty());
        if let Some(p) = &path {
            p.parse::<TinkerPath>()
                .map_err(|e| ApiError::invalid(format!("model_path: {e}")))?;
        }
        let previous = std::mem::replace(
            &mut *self.refreshed.lock().unwrap_or_else(|e| e.into_inner()),
            path.clone(),
        );
        if let Err(e) = self.sampler("").await {
            *self.refreshed.lock().unwrap_or_else(|e| e.into_inner()) = previous;
            return Err(e);
        }
        Ok(Some(json!({"status": "ok", "model_path": path})))
    }
}
