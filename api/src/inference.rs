//! The inference seam: one trait for "answer chat, completions and score for a model name,
//! with the rollout (token ids, log-probs)", chosen at start-up by mode. The handlers in
//! `routes/inference.rs` sit above it once for every backend.

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::error::ApiResult;
use crate::upstream::Upstream;

/// An answer, and the vLLM that gave it when one did (asked again for token ids an older
/// vLLM did not return).
pub struct Generation<T> {
    pub answer: T,
    pub via: Option<Upstream>,
}

impl<T> Generation<T> {
    /// An answer produced in this process.
    pub fn local(answer: T) -> Generation<T> {
        Generation { answer, via: None }
    }
}

/// A chat answer's chunks as they arrive, from vLLM's SSE stream or an in-process engine,
/// in vLLM's chunk shape.
pub enum Chunk {
    Data(Value),
    /// Not JSON: relayed as it came.
    Raw(String),
    Done,
    Broken(String),
}

/// One inference backend: the vLLM fleet (`routes::inference_vllm`), the in-process candle
/// engine and Tinker's sampler (both `claas-engine`). Answers have vLLM's shapes (with
/// `prompt_token_ids`, each choice's `token_ids` and `logprobs.content`), so the handlers
/// above resolve names, cache rollouts, strip thinking and stream once for every backend.
#[async_trait]
pub trait Inference: Send + Sync {
    /// A chat completion for `request`: vLLM's request body, `model` resolved to a LoRA id
    /// (or the base model), `logprobs` and `return_token_ids` set.
    async fn chat(self: Arc<Self>, request: &Value) -> ApiResult<Generation<Value>>;

    /// The same answer as it is generated, as vLLM's stream chunks.
    async fn chat_stream(
        self: Arc<Self>,
        request: &Value,
    ) -> ApiResult<Generation<mpsc::Receiver<Chunk>>>;

    /// A text completion, answered as the client sees it (streamed when asked; not cached).
    async fn completion(self: Arc<Self>, request: Map<String, Value>) -> ApiResult<Response>;

    /// CLaaS's `/v1/score`: the log-prob of each token of `completion` as the answer to
    /// `messages` under `model` (empty: the base model).
    async fn score(
        self: Arc<Self>,
        model: &str,
        messages: &[Value],
        completion: &str,
    ) -> ApiResult<Value>;

    /// The backend's own model list in OpenAI's shape, when it keeps one (vLLM); `None`:
    /// the handler lists the base model and the LoRAs it knows.
    async fn models(self: Arc<Self>) -> ApiResult<Option<Value>> {
        Ok(None)
    }

    /// Removes a deleted LoRA's version where this backend keeps versions (Tinker's
    /// checkpoints); `Ok(false)` for one the adapter store removes (files, objects).
    async fn remove_version(self: Arc<Self>, _uri: &str) -> ApiResult<bool> {
        Ok(false)
    }

    /// CLaaS's `GET /v1/sampler/status` (`model_path`, `base_model`), when this backend is
    /// Tinker's sampler; `None` otherwise.
    async fn sampler_status(self: Arc<Self>) -> Option<Value> {
        None
    }

    /// CLaaS's `POST /v1/sampler/refresh`: requests naming the base model sample from
    /// `model_path` (the base model again when `None`). `Ok(None)`: this backend has no
    /// sampler.
    async fn sampler_refresh(
        self: Arc<Self>,
        _model_path: Option<String>,
    ) -> ApiResult<Option<Value>> {
        Ok(None)
    }
}
