//! The inference proxy: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models` and `POST /v1/score`, forwarded to vLLM.
//!
//! Chat completions always ask vLLM for the sampled token ids (`return_token_ids`) and
//! their log-probs, cache that rollout for feedback, and give the client the answer with
//! thinking stripped and only the fields it asked for. Everything else in the client's
//! request (tools, seed, response_format, …) is passed through untouched.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::inference_schema::{
    ChatCompletionRequest, Completion, CompletionRequest, ModelList, ScoreRequest, ScoreResponse,
    ServerSentEvent,
};
use super::inference_stream::relay_chat;
use super::rollout::{
    cache_put, ids_of, logprobs_of, rollout_entry, upstream_chat_body, ChatCtx, ChoiceRollout,
};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody, Errors, JsonBody};
use crate::thinking::strip_thinking;
use crate::AppState;

/// The scope an answer is cached under: the model that produced it.
fn scope_of(state: &AppState, body: &Value) -> String {
    match body["model"].as_str() {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => state.options.default_base_model.clone(),
    }
}

fn require_object(body: Value) -> ApiResult<Map<String, Value>> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid("the request body must be a JSON object")),
    }
}

/// OpenAI message content as text: a string, or the text parts of a list.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o
                    .get("text")
                    .or_else(|| o.get("content"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Object(o) => o
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn validate_messages(body: &Map<String, Value>) -> ApiResult<&Vec<Value>> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("messages is required and must be an array"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) {
            return Err(ApiError::invalid(format!(
                "messages[{i}].role is required and must be a string"
            )));
        }
    }
    Ok(messages)
}

fn system_prompt(messages: &[Value]) -> String {
    messages
        .iter()
        .filter(|m| m["role"] == "system")
        .map(|m| content_text(&m["content"]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The LoRA (or base model) `model` names, an adapter name or `-latest` alias resolved
/// (see [`crate::routes::lora_id::resolve_alias`]), checked against the caller.
async fn model_for(state: &AppState, caller: &Caller, model: &str) -> ApiResult<String> {
    let resolved = if model.is_empty() {
        String::new()
    } else {
        crate::routes::lora_id::resolve_alias(state, model).await?
    };
    check_model(state, caller, &resolved)?;
    Ok(resolved)
}

/// The body's `model`, if any, replaced by [`model_for`]'s answer.
async fn resolve_model(
    state: &AppState,
    caller: &Caller,
    body: &mut Map<String, Value>,
) -> ApiResult<()> {
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return Ok(());
    };
    let resolved = model_for(state, caller, &model).await?;
    body.insert("model".into(), Value::String(resolved));
    Ok(())
}

/// 403 when `model` names a LoRA the caller may not use (the base model is everyone's).
fn check_model(state: &AppState, caller: &Caller, model: &str) -> ApiResult<()> {
    if model.is_empty() || model == state.options.default_base_model {
        return Ok(());
    }
    caller.check(model)
}

/// Chat through vLLM (or the embedded engine): the answer with thinking stripped; the
/// rollout (token ids and log-probs) is cached for feedback on it.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "inference",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer; `stream: true` answers server-sent events", content(
            (Completion = "application/json"),
            (ServerSentEvent = "text/event-stream"),
        )),
        (status = 502, body = ErrorBody, description = "The inference server failed"),
        Errors,
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body, _): JsonBody<Value>,
) -> ApiResult<Response> {
    let mut body = require_object(body)?;
    let messages = validate_messages(&body)?.clone();
    resolve_model(&state, &caller, &mut body).await?;
    let scope = scope_of(&state, &Value::Object(body.clone()));
    let system = system_prompt(&messages);
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (request, wants) = upstream_chat_body(body);
    let mut ctx = ChatCtx {
        state: state.clone(),
        up: None,
        request,
        wants,
        scope,
        owner: caller.id().to_owned(),
        system,
    };
    let inference = state.inference()?;
    if stream {
        let generated = inference.chat_stream(&ctx.request).await?;
        ctx.up = generated.via;
        return Ok(relay_chat(ctx, generated.answer));
    }
    let generated = inference.chat(&ctx.request).await?;
    ctx.up = generated.via;
    Ok(Json(finish_chat(&ctx, generated.answer).await).into_response())
}

/// Caches each choice's rollout and gives the client the answer without thinking and
/// with only the fields it asked for.
async fn finish_chat(ctx: &ChatCtx, mut answer: Value) -> Value {
    let prompt_ids = ids_of(&answer["prompt_token_ids"]);
    let choices = answer["choices"]
        .as_array_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut shown = Vec::with_capacity(choices.len());
    for mut choice in choices {
        let message = &choice["message"];
        let content = message["content"].as_str().unwrap_or_default().to_owned();
        let reasoning = message["reasoning"]
            .as_str()
            .or(message["reasoning_content"].as_str())
            .unwrap_or_default()
            .to_owned();
        let lp_content = &choice["logprobs"]["content"];
        let rollout = ChoiceRollout {
            content: content.clone(),
            reasoning,
            token_ids: ids_of(&choice["token_ids"]),
            logprobs: logprobs_of(lp_content),
            last_token: lp_content
                .as_array()
                .and_then(|a| a.last())
                .and_then(|e| e["token"].as_str())
                .map(str::to_owned),
        };
        let visible = strip_thinking(&content);
        let entry = rollout_entry(
            ctx.up.as_ref(),
            &ctx.request,
            &ctx.scope,
            prompt_ids.clone(),
            rollout,
            &ctx.system,
        )
        .await;
        cache_put(ctx, &visible, &entry).await;
        choice["message"]["content"] = json!(visible);
        for k in ["reasoning", "reasoning_content"] {
            if let Some(m) = choice["message"].as_object_mut() {
                if m.contains_key(k) {
                    m.insert(k.into(), Value::Null);
                }
            }
        }
        if !ctx.wants.logprobs {
            choice["logprobs"] = Value::Null;
        }
        if !ctx.wants.token_ids {
            choice["token_ids"] = Value::Null;
        }
        shown.push(choice);
    }
    answer["choices"] = Value::Array(shown);
    if !ctx.wants.token_ids {
        answer["prompt_token_ids"] = Value::Null;
    }
    answer
}

/// `POST /v1/completions`: forwarded as is (not cached, as in CLaaS), streaming included.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "inference",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; `stream: true` answers server-sent events", content(
            (Completion = "application/json"),
            (ServerSentEvent = "text/event-stream"),
        )),
        (status = 502, body = ErrorBody, description = "The inference server failed"),
        Errors,
    )
)]
pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body, _): JsonBody<Value>,
) -> ApiResult<Response> {
    let mut body = require_object(body)?;
    resolve_model(&state, &caller, &mut body).await?;
    if !body.contains_key("prompt") {
        return Err(ApiError::invalid("prompt is required"));
    }
    state.inference()?.completion(body).await
}

/// `GET /v1/models`: vLLM's list when one is configured; otherwise the base model and the
/// LoRAs this service knows. Only the LoRAs the caller's key covers.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "inference",
    responses((status = 200, body = ModelList), (status = 502, body = ErrorBody), Errors)
)]
pub async fn models(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    // Without any backend the list is still ours to give (the LoRAs this service knows).
    let listed = match state.inference() {
        Ok(backend) => backend.models().await?,
        Err(_) => None,
    };
    if let Some(mut v) = listed {
        // Base model cards for everyone; adapter cards only for the keys that cover them.
        if let Some(cards) = v["data"].as_array_mut() {
            cards.retain(|c| {
                c["parent"].is_null() || c["id"].as_str().is_some_and(|id| caller.covers(id))
            });
            for card in cards.iter_mut().filter(|c| !c["parent"].is_null()) {
                if let Some(lora_id) = card["id"].as_str().map(str::to_owned) {
                    name_card(card, &lora_id);
                }
            }
        }
        return Ok(Json(v).into_response());
    }
    let base = &state.options.default_base_model;
    let mut data = vec![
        json!({"id": base, "object": "model", "owned_by": "claas", "root": base, "parent": null}),
    ];
    for l in state.store.list_loras("").await? {
        if !caller.covers(&l.lora_id) {
            continue;
        }
        let mut card = json!({"object": "model", "owned_by": "claas",
            "root": l.lora_id, "parent": l.base_model});
        name_card(&mut card, &l.lora_id);
        data.push(card);
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// An adapter's card as CLaaS's vLLM lists it: `id` is the adapter name its clients send
/// as `model` (`eval/no_emoji` → `eval-no_emoji`), with the LoRA id beside it.
fn name_card(card: &mut Value, lora_id: &str) {
    card["id"] = claas_core::types::adapter_name(lora_id).into();
    card["lora_id"] = lora_id.into();
}

/// `POST /v1/score` (CLaaS): the log-prob of each token of `completion` as the answer to
/// `messages` under `model`.
#[utoipa::path(
    post,
    path = "/v1/score",
    tag = "inference",
    request_body = ScoreRequest,
    responses((status = 200, body = ScoreResponse), (status = 502, body = ErrorBody), Errors)
)]
pub async fn score(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(mut req, _): JsonBody<ScoreRequest>,
) -> ApiResult<Response> {
    req.model = model_for(&state, &caller, &req.model).await?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let scored = state
        .inference()?
        .score(&req.model, &req.messages, &req.completion)
        .await?;
    Ok(Json(scored).into_response())
}
