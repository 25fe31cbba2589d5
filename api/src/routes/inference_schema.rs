//! The wire shapes of the inference routes, as the OpenAPI document describes them: OpenAI's
//! chat and text completion requests and answers (fields not listed pass through to vLLM),
//! the model list, and CLaaS's `/v1/score`.

use serde_json::Value;

/// An OpenAI chat completion request. Fields not listed (tools, seed, response_format, ...)
/// pass through to vLLM untouched.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "model": "demo/assistant",
    "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Say hi."}],
    "max_tokens": 8
}))]
pub struct ChatCompletionRequest {
    /// The base model or a LoRA id (served at its current version); default the base model.
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    pub stream: Option<bool>,
    #[schema(minimum = 1, maximum = 4096)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    pub logprobs: Option<bool>,
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Vec<String>>,
}

/// One chat message; `content` is text or a list of OpenAI content parts.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct ChatMessage {
    #[schema(example = "user")]
    pub role: String,
    #[schema(value_type = MessageContent)]
    pub content: Value,
}

/// Message text, or OpenAI content parts (`{"type": "text", "text": ...}`).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<serde_json::Map<String, Value>>),
}

/// A completion prompt: text, several texts, or token ids.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// An OpenAI-shaped answer (`chat.completion` or `text_completion`), plus the prompt and
/// response token ids when the client asked for them.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Value>,
    pub usage: Option<Value>,
}

/// One server-sent event of a streamed answer: `data` is an OpenAI chunk as JSON, then the
/// literal `[DONE]`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ServerSentEvent {
    pub data: String,
    pub event: Option<String>,
    pub id: Option<String>,
}

/// An OpenAI text completion request; other fields pass through to vLLM.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"model": "demo/assistant", "prompt": "Once upon a time", "max_tokens": 8}))]
pub struct CompletionRequest {
    pub model: Option<String>,
    #[schema(value_type = Prompt)]
    pub prompt: Value,
    pub stream: Option<bool>,
    #[schema(minimum = 1, maximum = 4096)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
}

/// OpenAI's model list.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ModelCard {
    /// A base model's name, or a LoRA's adapter name as CLaaS's vLLM shows it
    /// (`eval/no_emoji` → `eval-no_emoji`), which `model` accepts.
    pub id: String,
    pub object: String,
    pub owned_by: String,
    pub root: Option<String>,
    /// The base model of a LoRA; null for a base model.
    pub parent: Option<String>,
    /// A LoRA's id; absent for a base model.
    pub lora_id: Option<String>,
}

/// `POST /v1/score`'s body.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "model": "demo/assistant",
    "messages": [{"role": "user", "content": "Say hi."}],
    "completion": "Hi!"
}))]
pub struct ScoreRequest {
    pub model: String,
    #[schema(min_items = 1, value_type = Vec<ChatMessage>)]
    pub messages: Vec<Value>,
    pub completion: String,
}

/// The completion's tokens and their log-probs under the model.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ScoreResponse {
    pub logprobs: Vec<f64>,
    pub tokens: Vec<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub logprob_sum: f64,
}
