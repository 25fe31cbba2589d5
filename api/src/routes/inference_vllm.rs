//! The vLLM fleet as an inference backend: each request goes to a vLLM whose node is not
//! training (`Backends::pick`), an adapter vLLM does not know yet is loaded and the request
//! tried once more (`inference_adapters`), and vLLM's answers pass through in its shapes.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use claas_core::queue::SharedStore;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::inference_adapters::{reconcile_adapter, Reconciled};
use super::inference_stream::sse_chunks;
use crate::error::{ApiError, ApiResult};
use crate::inference::{Chunk, Generation, Inference};
use crate::upstream::{Backends, Upstream, UpstreamError};

/// The fleet's vLLMs, with the store that says which nodes are training.
pub struct VllmProxy {
    backends: Arc<Backends>,
    store: SharedStore,
    /// What an empty `model` means.
    base_model: String,
}

impl VllmProxy {
    pub fn new(backends: Arc<Backends>, store: SharedStore, base_model: String) -> VllmProxy {
        VllmProxy {
            backends,
            store,
            base_model,
        }
    }

    /// A vLLM for `body`'s model whose node is not training.
    async fn pick(&self, body: &Value) -> ApiResult<Upstream> {
        let model = match body["model"].as_str() {
            Some(m) if !m.is_empty() => m,
            _ => &self.base_model,
        };
        self.backends.pick(&self.store, model).await
    }

    /// Sends a generation request; when vLLM does not know the adapter named as `model`
    /// but this service does, loads its current version and tries once more.
    async fn send(&self, up: &Upstream, path: &str, body: &Value) -> ApiResult<reqwest::Response> {
        match up.post(path, body).await {
            Ok(r) => Ok(r),
            Err(UpstreamError::Status(s)) if s.is_unknown_model() => {
                let model = body["model"].as_str().unwrap_or_default();
                match reconcile_adapter(&self.store, up, model).await {
                    Reconciled::Loaded => Ok(up.post(path, body).await?),
                    Reconciled::NotOurs => Err(UpstreamError::Status(s).into()),
                    Reconciled::Pending => {
                        Err(ApiError::adapter_loading(model).with_retry_after(2))
                    }
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn unreadable(what: &str, e: impl std::fmt::Display) -> ApiError {
    UpstreamError::Unreachable(format!("unreadable {what}: {e}")).into()
}

#[async_trait]
impl Inference for VllmProxy {
    async fn chat(self: Arc<Self>, request: &Value) -> ApiResult<Generation<Value>> {
        let up = self.pick(request).await?;
        let resp = self.send(&up, "/v1/chat/completions", request).await?;
        let answer: Value = resp
            .json()
            .await
            .map_err(|e| unreadable("chat completion", e))?;
        Ok(Generation {
            answer,
            via: Some(up),
        })
    }

    async fn chat_stream(
        self: Arc<Self>,
        request: &Value,
    ) -> ApiResult<Generation<mpsc::Receiver<Chunk>>> {
        let up = self.pick(request).await?;
        let resp = self.send(&up, "/v1/chat/completions", request).await?;
        Ok(Generation {
            answer: sse_chunks(resp),
            via: Some(up),
        })
    }

    async fn completion(self: Arc<Self>, request: Map<String, Value>) -> ApiResult<Response> {
        let body = Value::Object(request);
        let up = self.pick(&body).await?;
        let resp = self.send(&up, "/v1/completions", &body).await?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        let stream = resp
            .bytes_stream()
            .map(|r| r.map_err(std::io::Error::other));
        Ok((
            [(header::CONTENT_TYPE, content_type)],
            Body::from_stream(stream),
        )
            .into_response())
    }

    /// vLLM's `/tokenize` for the prompt and for prompt + completion, then one
    /// `prompt_logprobs` request over the whole: the completion's entries are its scores.
    async fn score(
        self: Arc<Self>,
        model: &str,
        messages: &[Value],
        completion: &str,
    ) -> ApiResult<Value> {
        let up = self.pick(&json!({"model": model})).await?;
        let prompt_ids = up
            .tokenize(&json!({"model": model, "messages": messages, "add_generation_prompt": true}))
            .await?;
        let mut full_messages = messages.to_vec();
        full_messages.push(json!({"role": "assistant", "content": completion}));
        let full_ids = up
            .tokenize(
                &json!({"model": model, "messages": full_messages, "add_generation_prompt": false}),
            )
            .await?;
        let completion_ids: Vec<u32> = full_ids
            .get(prompt_ids.len()..)
            .unwrap_or_default()
            .to_vec();
        if completion_ids.is_empty() {
            return Ok(
                json!({"logprobs": [], "tokens": [], "prompt_tokens": prompt_ids.len(),
                "completion_tokens": 0, "logprob_sum": 0.0}),
            );
        }
        let body =
            json!({"model": model, "prompt": full_ids, "max_tokens": 1, "prompt_logprobs": 1});
        let answer: Value = self
            .send(&up, "/v1/completions", &body)
            .await?
            .json()
            .await
            .map_err(|e| unreadable("prompt log-probs", e))?;
        let entries = answer["choices"][0]["prompt_logprobs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut logprobs = Vec::with_capacity(completion_ids.len());
        let mut tokens = Vec::with_capacity(completion_ids.len());
        for (k, id) in completion_ids.iter().enumerate() {
            let entry = entries.get(prompt_ids.len() + k).unwrap_or(&Value::Null);
            let chosen = entry
                .get(id.to_string())
                .or_else(|| entry.as_object().and_then(|o| o.values().next()));
            logprobs.push(chosen.and_then(|c| c["logprob"].as_f64()).unwrap_or(0.0));
            tokens.push(
                chosen
                    .and_then(|c| c["decoded_token"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        let sum: f64 = logprobs.iter().sum();
        Ok(
            json!({"logprobs": logprobs, "tokens": tokens, "prompt_tokens": prompt_ids.len(),
            "completion_tokens": completion_ids.len(), "logprob_sum": sum}),
        )
    }

    async fn models(self: Arc<Self>) -> ApiResult<Option<Value>> {
        let up = self.pick(&json!({})).await?;
        let list = up
            .get("/v1/models")
            .await?
            .json()
            .await
            .map_err(|e| unreadable("model list", e))?;
        Ok(Some(list))
    }
}
