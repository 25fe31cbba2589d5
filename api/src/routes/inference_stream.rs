//! Streamed chat answers: vLLM's server-sent events read into [`Chunk`]s, and chunks (from
//! vLLM or the embedded engine) relayed to the client with thinking stripped, while the
//! sampled tokens are collected for the rollout cache.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::rollout::{
    cache_put, ids_of, logprobs_of, rollout_entry, ChatCtx, ChoiceRollout, ClientWants,
};
use crate::thinking::ThinkFilter;

pub(super) use crate::inference::Chunk;

/// vLLM's SSE stream as chunks.
pub(super) fn sse_chunks(resp: reqwest::Response) -> mpsc::Receiver<Chunk> {
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let mut upstream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = upstream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx
                        .send(Chunk::Broken(format!(
                            "the inference server broke off the stream: {e}"
                        )))
                        .await;
                    return;
                }
            };
            buf.extend_from_slice(&chunk);
            while let Some(end) = find_event_end(&buf) {
                let event: Vec<u8> = buf.drain(..end.0 + end.1).collect();
                let text = String::from_utf8_lossy(&event[..end.0]).into_owned();
                let Some(data) = sse_data(&text) else {
                    continue;
                };
                let msg = if data.trim() == "[DONE]" {
                    Chunk::Done
                } else {
                    match serde_json::from_str::<Value>(&data) {
                        Ok(v) => Chunk::Data(v),
                        Err(_) => Chunk::Raw(data),
                    }
                };
                let done = matches!(msg, Chunk::Done);
                if tx.send(msg).await.is_err() || done {
                    return;
                }
            }
        }
        let _ = tx
            .send(Chunk::Broken(
                "the inference server ended the stream early".into(),
            ))
            .await;
    });
    rx
}

/// Relays chunks to the client as SSE, stripping thinking from the deltas and collecting
/// the rollout; caches it when the answer completes.
pub(super) fn relay_chat(ctx: ChatCtx, mut chunks: mpsc::Receiver<Chunk>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    tokio::spawn(async move {
        let mut prompt_ids: Option<Vec<u32>> = None;
        let mut choices: Vec<(ChoiceRollout, ThinkFilter, String)> = Vec::new();
        loop {
            let line = match chunks.recv().await {
                Some(Chunk::Data(mut v)) => {
                    relay_chunk(&mut v, &mut prompt_ids, &mut choices, &ctx.wants);
                    format!("data: {v}\n\n")
                }
                Some(Chunk::Raw(data)) => format!("data: {data}\n\n"),
                Some(Chunk::Done) => break,
                Some(Chunk::Broken(message)) => {
                    let err = json!({"error": {"code": "upstream_error", "message": message}});
                    let _ = tx.send(Ok(Bytes::from(format!("data: {err}\n\n")))).await;
                    return;
                }
                None => {
                    let err = json!({"error": {"code": "upstream_error",
                        "message": "the answer ended early"}});
                    let _ = tx.send(Ok(Bytes::from(format!("data: {err}\n\n")))).await;
                    return;
                }
            };
            if tx.send(Ok(Bytes::from(line))).await.is_err() {
                return; // The client went away; an unfinished answer is not cached.
            }
        }
        for (rollout, _, visible) in choices {
            let visible = visible.trim().to_owned();
            let entry = rollout_entry(
                ctx.up.as_ref(),
                &ctx.request,
                &ctx.scope,
                prompt_ids.clone(),
                rollout,
                &ctx.system,
            )
            .await;
            cache_put(&ctx, &visible, &entry).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Rewrites one chunk for the client and records its tokens.
fn relay_chunk(
    v: &mut Value,
    prompt_ids: &mut Option<Vec<u32>>,
    choices: &mut Vec<(ChoiceRollout, ThinkFilter, String)>,
    wants: &ClientWants,
) {
    if let Some(ids) = ids_of(&v["prompt_token_ids"]) {
        *prompt_ids = Some(ids);
        if !wants.token_ids {
            if let Some(o) = v.as_object_mut() {
                o.remove("prompt_token_ids");
            }
        }
    }
    let Some(cs) = v["choices"].as_array_mut() else {
        return;
    };
    for c in cs {
        let i = c["index"].as_u64().unwrap_or(0) as usize;
        while choices.len() <= i {
            choices.push((ChoiceRollout::default(), ThinkFilter::new(), String::new()));
        }
        let (rollout, filter, visible) = &mut choices[i];
        let delta = &mut c["delta"];
        for k in ["reasoning", "reasoning_content"] {
            if let Some(r) = delta.get(k).and_then(Value::as_str) {
                rollout.reasoning.push_str(r);
            }
            if let Some(d) = delta.as_object_mut() {
                d.remove(k);
            }
        }
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned)
        {
            rollout.content.push_str(&text);
            let mut shown = filter.push(&text);
            if !c["finish_reason"].is_null() {
                shown.push_str(&filter.finish());
            }
            visible.push_str(&shown);
            c["delta"]["content"] = json!(shown);
        } else if !c["finish_reason"].is_null() {
            let rest = filter.finish();
            if !rest.is_empty() {
                visible.push_str(&rest);
                c["delta"]["content"] = json!(rest);
            }
        }
        if let Some(ids) = ids_of(&c["token_ids"]) {
            rollout.token_ids.get_or_insert_with(Vec::new).extend(ids);
        }
        if let Some(entries) = c["logprobs"]["content"].as_array() {
            match logprobs_of(&c["logprobs"]["content"]) {
                Some(lps) => rollout.logprobs.get_or_insert_with(Vec::new).extend(lps),
                None => rollout.logprobs = None,
            }
            if let Some(t) = entries.last().and_then(|e| e["token"].as_str()) {
                rollout.last_token = Some(t.to_owned());
            }
        }
        if !wants.logprobs {
            c["logprobs"] = Value::Null;
        }
        if !wants.token_ids {
            if let Some(o) = c.as_object_mut() {
                o.remove("token_ids");
            }
        }
    }
}

/// End of the first SSE event in `buf`: (length of the event, length of its separator).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The `data:` payload of one SSE event (multi-line data joined by newlines).
fn sse_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}
