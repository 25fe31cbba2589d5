//! What every backend in this crate shares: a [`Runner`] turns a prompt's token ids into a
//! [`Run`] (tokens as they come, then the end) and scores a sequence; the request's
//! sampling settings, the chat prompt, and the visible text of an answer are computed here
//! once, for the candle engine and Tinker's sampler alike.

use std::sync::Arc;

use async_trait::async_trait;
use claas_api::error::{ApiError, ApiResult};
use claas_trainer::generate::{Finish, Sampling, Token};
use claas_trainer::{ChatTokenizer, Message};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

/// A backend that generates token by token in this process's terms.
#[async_trait]
pub(crate) trait Runner: Send + Sync + 'static {
    fn tokenizer(&self) -> &ChatTokenizer;

    /// Starts generating after `prompt_ids` for `model` (a LoRA id, the base model's name,
    /// or empty for the base model) with the request's sampling settings.
    async fn run(
        self: Arc<Self>,
        model: &str,
        prompt_ids: Vec<u32>,
        body: &Map<String, Value>,
    ) -> ApiResult<Run>;

    /// The log-prob of each token of `ids` from `prompt_len` on, under `model`.
    async fn logprobs(
        self: Arc<Self>,
        model: &str,
        ids: Vec<u32>,
        prompt_len: usize,
    ) -> ApiResult<Vec<f32>>;
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

/// The request's sampling settings, validated; `default_temperature` and `default_max`
/// where the request names none.
pub(crate) fn sampling(
    body: &Map<String, Value>,
    stop_ids: &[u32],
    default_temperature: f64,
    default_max: usize,
) -> ApiResult<Sampling> {
    let num = |k: &str| body.get(k).filter(|v| !v.is_null());
    let temperature = match num("temperature") {
        None => default_temperature,
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

pub(crate) fn stop_strings(body: &Map<String, Value>) -> ApiResult<Vec<String>> {
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

pub(crate) fn engine_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("embedded inference failed: {e}"))
}

pub(crate) fn bad(e: claas_trainer::Error) -> ApiError {
    match e {
        claas_trainer::Error::InvalidInput(m)
        | claas_trainer::Error::InvalidSample { message: m, .. } => ApiError::invalid(m),
        other => engine_error(other),
    }
}

/// Token ids of the chat `messages` rendered with the model's template.
pub(crate) fn chat_prompt(
    tokenizer: &ChatTokenizer,
    messages: &[Value],
    add_generation_prompt: bool,
    kwargs: &Map<String, Value>,
) -> ApiResult<Vec<u32>> {
    let msgs: Vec<Message> = messages
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap_or("user"), text_of(&m["content"])))
        .collect();
    let text = tokenizer
        .render(&msgs, add_generation_prompt, kwargs)
        .map_err(bad)?;
    tokenizer.encode(&text).map_err(bad)
}

/// The tokens that end an answer in the Qwen3 family (`<|im_end|>`, `<|endoftext|>`), those
/// the tokenizer has.
pub(crate) fn stop_ids(tokenizer: &ChatTokenizer) -> Vec<u32> {
    ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tokenizer.token_id(t))
        .collect()
}

/// The text of generated `ids` without stop tokens, cut before the first stop string;
/// true when one was found. Decoded over the whole answer, so characters split across
/// tokens come out whole.
pub(crate) fn visible_text(
    tokenizer: &ChatTokenizer,
    stop_ids: &[u32],
    ids: &[u32],
    stops: &[String],
) -> (String, bool) {
    let kept: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| !stop_ids.contains(i))
        .collect();
    let mut text = tokenizer.decode(&kept).unwrap_or_default();
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

fn decode_one(tokenizer: &ChatTokenizer, id: u32) -> String {
    tokenizer.decode(&[id]).unwrap_or_default()
}

/// A vLLM-shaped log-prob entry for `token` (sampled token first in the top list).
pub(crate) fn logprob_entry(tokenizer: &ChatTokenizer, token: &Token, top: usize) -> Value {
    let text = decode_one(tokenizer, token.id);
    let mut tops = vec![json!({"token": text, "logprob": token.logprob, "bytes": text.as_bytes()})];
    for (id, lp) in token
        .top
        .iter()
        .filter(|(id, _)| *id != token.id)
        .take(top.saturating_sub(1))
    {
        let t = decode_one(tokenizer, *id);
        tops.push(json!({"token": t, "logprob": lp, "bytes": t.as_bytes()}));
    }
    tops.truncate(top);
    json!({"token": text, "logprob": token.logprob, "bytes": text.as_bytes(), "top_logprobs": tops})
}

pub(crate) fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// Starts a chat answer for vLLM's request body (`messages`, `model`, sampling).
pub(crate) async fn start_chat<R: Runner>(runner: Arc<R>, request: &Value) -> ApiResult<Run> {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let kwargs = request["chat_template_kwargs"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let prompt = chat_prompt(runner.tokenizer(), &messages, true, &kwargs)?;
    let body = request.as_object().cloned().unwrap_or_default();
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    runner.run(&model, prompt, &body).await
}

/// Log-probs of `completion`'s tokens as the answer to `messages` (CLaaS `/v1/score`).
pub(crate) async fn score<R: Runner>(
    runner: Arc<R>,
    model: &str,
    messages: &[Value],
    completion: &str,
) -> ApiResult<Value> {
    let tokenizer = runner.tokenizer();
    let prompt = chat_prompt(tokenizer, messages, true, &Map::new())?;
    let mut full_messages = messages.to_vec();
    full_messages.push(json!({"role": "assistant", "content": completion}));
    let full = chat_prompt(tokenizer, &full_messages, false, &Map::new())?;
    let completion_ids: Vec<u32> = full.get(prompt.len()..).unwrap_or_default().to_vec();
    if completion_ids.is_empty() {
        return Ok(
            json!({"logprobs": [], "tokens": [], "prompt_tokens": prompt.len(),
            "completion_tokens": 0, "logprob_sum": 0.0}),
        );
    }
    let tokens: Vec<String> = completion_ids
        .iter()
        .map(|i| decode_one(tokenizer, *i))
        .collect();
    let lps = runner.clone().logprobs(model, full, prompt.len()).await?;
    let sum: f64 = lps.iter().map(|l| f64::from(*l)).sum();
    Ok(
        json!({"logprobs": lps, "tokens": tokens, "prompt_tokens": prompt.len(),
        "completion_tokens": completion_ids.len(), "logprob_sum": sum}),
    )
}
