//! The engine's answers in vLLM's response and stream shapes, so the API's caching and
//! feedback path treats them as it treats vLLM's.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::runner::{finish_reason, logprob_entry, start_chat, Run, RunEvent, Runner};
use claas_api::error::{ApiError, ApiResult};
use claas_api::inference::Chunk;
use claas_api::inference::Generation;
use claas_trainer::ChatTokenizer;

/// `Inference::chat` for any runner: the answer in vLLM's chat completion shape.
pub(crate) async fn chat<R: Runner>(
    runner: Arc<R>,
    request: &Value,
) -> ApiResult<Generation<Value>> {
    let run = start_chat(runner.clone(), request).await?;
    let answer = answer(runner.tokenizer(), run, request).await?;
    Ok(Generation::local(answer))
}

/// `Inference::chat_stream` for any runner: vLLM's stream chunks.
pub(crate) async fn chat_stream<R: Runner>(
    runner: Arc<R>,
    request: &Value,
) -> ApiResult<Generation<mpsc::Receiver<Chunk>>> {
    let run = start_chat(runner.clone(), request).await?;
    Ok(Generation::local(chunks(runner, run, request.clone())))
}

/// A run's answer in vLLM's chat completion shape.
pub(crate) async fn answer(
    tokenizer: &ChatTokenizer,
    mut run: Run,
    request: &Value,
) -> ApiResult<Value> {
    let top = request["top_logprobs"].as_u64().unwrap_or(0) as usize;
    let (tokens, text, finish) = run.collect().await?;
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let entries: Vec<Value> = tokens
        .iter()
        .map(|t| logprob_entry(tokenizer, t, top))
        .collect();
    let (p, c) = (run.prompt_ids.len(), ids.len());
    Ok(json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": run.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "reasoning": null},
            "logprobs": {"content": entries},
            "finish_reason": finish_reason(finish),
            "stop_reason": null,
            "token_ids": ids,
        }],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        "prompt_token_ids": run.prompt_ids,
    }))
}

/// A run's answer as vLLM-shaped stream chunks.
pub(crate) fn chunks<R: Runner>(
    runner: Arc<R>,
    mut run: Run,
    request: Value,
) -> mpsc::Receiver<Chunk> {
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = chrono::Utc::now().timestamp();
        let top = request["top_logprobs"].as_u64().unwrap_or(0) as usize;
        let chunk = |choice: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": run.model, "choices": [choice]})
        };
        let mut first = chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null}),
        );
        first["prompt_token_ids"] = json!(run.prompt_ids);
        if tx.send(Chunk::Data(first)).await.is_err() {
            return;
        }
        let mut n = 0;
        loop {
            let msg = match run.events.recv().await {
                Some(RunEvent::Token { token, text }) => {
                    n += 1;
                    Chunk::Data(chunk(json!({"index": 0, "delta": {"content": text},
                        "logprobs": {"content": [logprob_entry(runner.tokenizer(), &token, top)]},
                        "finish_reason": null, "token_ids": [token.id]})))
                }
                Some(RunEvent::Done(f, rest)) => {
                    let last = chunk(json!({"index": 0, "delta": {"content": rest},
                        "logprobs": null, "finish_reason": finish_reason(f)}));
                    if tx.send(Chunk::Data(last)).await.is_err() {
                        return;
                    }
                    if request["stream_options"]["include_usage"]
                        .as_bool()
                        .unwrap_or(false)
                    {
                        let p = run.prompt_ids.len();
                        let mut usage = chunk(json!(null));
                        usage["choices"] = json!([]);
                        usage["usage"] = json!({"prompt_tokens": p, "completion_tokens": n,
                            "total_tokens": p + n});
                        if tx.send(Chunk::Data(usage)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(Chunk::Done).await;
                    return;
                }
                Some(RunEvent::Failed(e)) => Chunk::Broken(format!("generation failed: {e}")),
                None => Chunk::Broken("generation stopped unexpectedly".into()),
            };
            let broken = matches!(msg, Chunk::Broken(_));
            if tx.send(msg).await.is_err() || broken {
                return;
            }
        }
    });
    rx
}

/// A text completion in vLLM's shape (streamed as SSE when asked). Not cached, as on the
/// vLLM path.
pub(crate) async fn completion<R: Runner>(
    runner: Arc<R>,
    body: Map<String, Value>,
) -> ApiResult<Response> {
    let prompt = match &body["prompt"] {
        Value::String(s) => runner.tokenizer().encode(s).map_err(crate::runner::bad)?,
        Value::Array(a) if a.iter().all(Value::is_u64) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect(),
        _ => {
            return Err(ApiError::invalid(
                "prompt must be a string or a list of token ids",
            ))
        }
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut run = runner.run(&model, prompt, &body).await?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = chrono::Utc::now().timestamp();
    if stream {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
        tokio::spawn(async move {
            let chunk = |text: &str, finish: Value| {
                json!({"id": id, "object": "text_completion", "created": created,
                    "model": run.model, "choices": [{"index": 0, "text": text,
                    "logprobs": null, "finish_reason": finish}]})
            };
            loop {
                let line = match run.events.recv().await {
                    Some(RunEvent::Token { text, .. }) => chunk(&text, Value::Null),
                    Some(RunEvent::Done(f, rest)) => chunk(&rest, json!(finish_reason(f))),
                    Some(RunEvent::Failed(e)) => {
                        json!({"error": {"code": "generation_failed", "message": e}})
                    }
                    None => break,
                };
                if tx
                    .send(Ok(Bytes::from(format!("data: {line}\n\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        });
        let body =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
        return Ok((
            [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
            Body::from_stream(body),
        )
            .into_response());
    }
    let (tokens, text, finish) = run.collect().await?;
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let (p, c) = (run.prompt_ids.len(), ids.len());
    Ok(Json(
        json!({"id": id, "object": "text_completion", "created": created, "model": run.model,
        "choices": [{"index": 0, "text": text, "logprobs": null,
            "finish_reason": finish_reason(finish), "stop_reason": null,
            "token_ids": ids, "prompt_token_ids": run.prompt_ids}],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}),
    )
    .into_response())
}
