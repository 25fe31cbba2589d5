//! A chat answer's rollout, whichever backend produced it: what the client asked to see,
//! the request sent upstream (log-probs and token ids always on), each choice's tokens and
//! log-probs as they arrive, and the entry cached for feedback under the caller and model.

use serde_json::{json, Map, Value};

use crate::cache::CachedCompletion;
use crate::thinking::content_hash;
use crate::upstream::Upstream;
use crate::AppState;

/// What the client asked to see of the answer.
pub(crate) struct ClientWants {
    pub(crate) logprobs: bool,
    pub(crate) token_ids: bool,
}

/// The upstream request: the client's, plus what the cache needs.
pub(crate) fn upstream_chat_body(mut body: Map<String, Value>) -> (Value, ClientWants) {
    let wants = ClientWants {
        logprobs: body
            .get("logprobs")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        token_ids: body
            .get("return_token_ids")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    body.insert("logprobs".into(), json!(true));
    if !wants.logprobs || !body.contains_key("top_logprobs") {
        body.insert("top_logprobs".into(), json!(0));
    }
    body.insert("return_token_ids".into(), json!(true));
    (Value::Object(body), wants)
}

pub(crate) fn ids_of(v: &Value) -> Option<Vec<u32>> {
    v.as_array().map(|a| {
        a.iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect()
    })
}

pub(crate) fn logprobs_of(content: &Value) -> Option<Vec<f32>> {
    let entries = content.as_array()?;
    entries
        .iter()
        .map(|e| e["logprob"].as_f64().map(|l| l as f32))
        .collect()
}

/// One choice's rollout as it arrives.
#[derive(Default)]
pub(crate) struct ChoiceRollout {
    pub(crate) content: String,
    pub(crate) reasoning: String,
    pub(crate) token_ids: Option<Vec<u32>>,
    pub(crate) logprobs: Option<Vec<f32>>,
    /// The `token` string of each log-prob entry (for re-tokenising the stop token).
    pub(crate) last_token: Option<String>,
}

impl ChoiceRollout {
    fn raw_response(&self) -> String {
        if self.reasoning.is_empty() {
            self.content.clone()
        } else {
            format!("<think>{}</think>{}", self.reasoning, self.content)
        }
    }
}

/// Builds the cache entry; asks vLLM's `/tokenize` for ids it did not return (vLLM
/// before 0.10.2), keeping the log-probs only when they align with those ids.
pub(crate) async fn rollout_entry(
    up: Option<&Upstream>,
    request: &Value,
    scope: &str,
    prompt_ids: Option<Vec<u32>>,
    choice: ChoiceRollout,
    system_prompt: &str,
) -> CachedCompletion {
    let raw = choice.raw_response();
    let mut token_source = "server";
    let mut logprobs = choice.logprobs.clone();
    let prompt_ids = match prompt_ids {
        Some(ids) => ids,
        None => {
            token_source = "retokenized";
            let mut t = json!({"model": request["model"], "messages": request["messages"],
                "add_generation_prompt": true});
            if let Some(k) = request.get("chat_template_kwargs") {
                t["chat_template_kwargs"] = k.clone();
            }
            match up {
                Some(up) => up.tokenize(&t).await.unwrap_or_default(),
                None => Vec::new(),
            }
        }
    };
    let response_ids = match choice.token_ids {
        Some(ids) => ids,
        None => {
            token_source = "retokenized";
            let t = json!({"model": request["model"], "prompt": raw, "add_special_tokens": false});
            let Some(up) = up else {
                return CachedCompletion {
                    model: scope.to_owned(),
                    response: raw,
                    prompt_token_ids: prompt_ids,
                    response_token_ids: Vec::new(),
                    response_logprobs: None,
                    system_prompt: system_prompt.to_owned(),
                    token_source: "none".into(),
                    created_at: chrono::Utc::now().timestamp(),
                };
            };
            let mut ids = up.tokenize(&t).await.unwrap_or_default();
            // vLLM's log-probs include the stop token, which the text does not.
            if let (Some(lp), Some(tok)) = (&logprobs, &choice.last_token) {
                if lp.len() == ids.len() + 1 {
                    let t = json!({"model": request["model"], "prompt": tok, "add_special_tokens": false});
                    if let Ok(stop) = up.tokenize(&t).await {
                        if stop.len() == 1 {
                            ids.extend(stop);
                        }
                    }
                }
            }
            ids
        }
    };
    if logprobs
        .as_ref()
        .is_some_and(|l| l.len() != response_ids.len())
    {
        logprobs = None;
    }
    CachedCompletion {
        model: scope.to_owned(),
        response: raw,
        prompt_token_ids: prompt_ids,
        response_token_ids: response_ids,
        response_logprobs: logprobs,
        system_prompt: system_prompt.to_owned(),
        token_source: token_source.to_owned(),
        created_at: chrono::Utc::now().timestamp(),
    }
}

pub(crate) async fn cache_put(ctx: &ChatCtx, visible: &str, entry: &CachedCompletion) {
    let (state, scope) = (&ctx.state, ctx.scope.as_str());
    let hash = content_hash(visible);
    if let Err(e) = state.cache.put(&ctx.owner, scope, &hash, entry).await {
        // The answer is still worth giving; feedback on it will be a clear 404.
        tracing::error!(error = %e, scope, "could not cache a completion");
    }
}

/// What a chat answer is post-processed with, whichever engine produced it.
pub(crate) struct ChatCtx {
    pub(crate) state: AppState,
    /// The vLLM that answered (for `/tokenize` when it returned no ids); none when the
    /// embedded engine did.
    pub(crate) up: Option<Upstream>,
    pub(crate) request: Value,
    pub(crate) wants: ClientWants,
    pub(crate) scope: String,
    /// The caller whose rollout this is (its key's id): only its feedback may use it.
    pub(crate) owner: String,
    pub(crate) system: String,
}
