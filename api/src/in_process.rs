//! What a process does itself with a model when no vLLM serves it: answer chat, text
//! completions and score (the embedded engine of `claas dev`), and read or write the files
//! of a base model on this machine (version 0 of a new LoRA, the vocabulary intake checks
//! ids against). `claas-engine` implements both with candle; the API depends on neither
//! candle nor the trainer, and a process without them simply has neither seam set.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use claas_core::types::NewLora;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::error::ApiResult;

/// A chat answer's chunks as they arrive, from vLLM's SSE stream or an in-process engine,
/// in vLLM's chunk shape.
pub enum Chunk {
    Data(Value),
    /// Not JSON: relayed as it came.
    Raw(String),
    Done,
    Broken(String),
}

/// Inference inside this process. Answers have vLLM's shapes (with `prompt_token_ids`,
/// each choice's `token_ids` and `logprobs.content`), so the handlers cache rollouts,
/// strip thinking and stream alike for every backend.
#[async_trait]
pub trait LocalInference: Send + Sync {
    /// The base model's name: what `model` names for no adapter.
    fn base_name(&self) -> &str;

    /// A chat completion for `request`: vLLM's request body, `model` resolved to a LoRA id
    /// (or the base model), `logprobs` and `return_token_ids` set.
    async fn chat(self: Arc<Self>, request: &Value) -> ApiResult<Value>;

    /// The same answer as it is generated, as vLLM's stream chunks.
    async fn chat_stream(self: Arc<Self>, request: &Value) -> ApiResult<mpsc::Receiver<Chunk>>;

    /// A text completion, answered as the client sees it (streamed when asked; not cached).
    async fn completion(self: Arc<Self>, request: Map<String, Value>) -> ApiResult<Response>;

    /// CLaaS's `/v1/score`: the log-prob of each token of `completion` as the answer to
    /// `messages` under `model`.
    async fn score(
        self: Arc<Self>,
        model: &str,
        messages: &[Value],
        completion: &str,
    ) -> ApiResult<Value>;
}

/// The base models whose checkpoints are on this machine.
pub trait BaseModels: Send + Sync {
    /// The vocabulary size of `base_model`, when its checkpoint is here.
    fn vocab_size(&self, base_model: &str) -> Option<u64>;

    /// Writes version 0 of `lora` (PEFT's initialisation, the same bytes in every process)
    /// into `dir` when its base checkpoint is here, and returns the weights' sha256;
    /// `Ok(None)` when it is not (the first worker to train the LoRA writes it).
    fn write_initial_adapter(&self, dir: &Path, lora: &NewLora) -> Result<Option<String>, String>;
}
