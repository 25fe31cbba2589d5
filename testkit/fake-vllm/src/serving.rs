//! Serving: models, chat and text completions (streamed or not), tokenize, detokenize.

use crate::model::*;
use crate::*;

pub(crate) fn permission() -> Value {
    json!([{"id": "modelperm-5d3e9a0b71c24f86", "object": "model_permission", "created": 0,
        "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
        "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
        "organization": "*", "group": null, "is_blocking": false}])
}

pub(crate) async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    let base = &s.opts.served_model_name;
    let mut data = vec![
        json!({"id": base, "object": "model", "created": 0, "owned_by": "vllm",
        "root": format!("/models/{base}"), "parent": null, "max_model_len": 32768, "permission": permission()}),
    ];
    for (name, path) in s.engine().loras.iter() {
        data.push(
            json!({"id": name, "object": "model", "created": 0, "owned_by": "vllm",
            "root": path, "parent": base, "max_model_len": null, "permission": permission()}),
        );
    }
    Json(json!({"object": "list", "data": data}))
}

/// Resolves `model`, records the request, and waits out a sleep (0.33) or refuses (0.15).
pub(crate) async fn admit(s: &Shared, body: &Value) -> Result<String, Response> {
    let model = body["model"].as_str().unwrap_or_default();
    let model = if model.is_empty() {
        s.opts.served_model_name.clone()
    } else {
        model.to_owned()
    };
    {
        let mut e = s.engine();
        e.generations += 1;
        e.requests.push_back(body.clone());
        if e.requests.len() > 64 {
            e.requests.pop_front();
        }
        if model != s.opts.served_model_name && !e.loras.iter().any(|(n, _)| *n == model) {
            let msg = match s.opts.version {
                Version::V033 => format!(
                    "The model `{model}` does not exist. Valid aliases: {}.",
                    s.opts.served_model_name
                ),
                Version::V015 => format!("The model `{model}` does not exist."),
            };
            drop(e);
            return Err(openai_error(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                &msg,
                Some("model"),
            ));
        }
    }
    loop {
        let woke = s.woke.notified();
        {
            let mut e = s.engine();
            if e.asleep.is_none() && !e.paused {
                break;
            }
            e.served_asleep += 1;
            if e.paused && s.opts.version == Version::V033 {
                drop(e);
                return Err(openai_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableError",
                    "Generation is paused. Please retry after it resumes.",
                    None,
                ));
            }
            if s.opts.version == Version::V015 {
                drop(e);
                return Err(openai_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    "CUDA error: an illegal memory access was encountered",
                    None,
                ));
            }
        }
        if tokio::time::timeout(Duration::from_secs(30), woke)
            .await
            .is_err()
        {
            return Err(openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "asleep for 30 s",
                None,
            ));
        }
    }
    let latency = s.knobs.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
        let mut e = s.engine();
        if e.asleep.is_some() {
            // Slept with this request in flight: the drain did not wait for it.
            e.served_asleep += 1;
            drop(e);
            return Err(openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "CUDA error: an illegal memory access was encountered (slept mid-request)",
                None,
            ));
        }
    }
    if s.knobs.drop_connection.load(Ordering::SeqCst) {
        let broken = futures::stream::once(async {
            Err::<axum::body::Bytes, _>(std::io::Error::other("connection dropped"))
        });
        return Err(Response::new(Body::from_stream(broken)));
    }
    Ok(model)
}

pub(crate) fn sse(events: Vec<Value>) -> Response {
    let mut body = String::new();
    for e in events {
        body.push_str(&format!("data: {e}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    (
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        body,
    )
        .into_response()
}

pub(crate) fn usage(s: &Shared, prompt: usize, completion: usize) -> Value {
    let mut u = json!({"prompt_tokens": prompt, "total_tokens": prompt + completion,
        "completion_tokens": completion, "prompt_tokens_details": null});
    if s.opts.version == Version::V033 {
        u["completion_tokens_details"] = Value::Null;
    }
    u
}

/// Counts a generation request as running while it lives.
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) async fn chat(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let _running = InFlight::new(&s.running);
    let model = match admit(&s, &body).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Some(messages) = body["messages"].as_array() else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "1 validation error:\n  messages: Field required",
            Some("messages"),
        );
    };
    let want_lp = body["logprobs"].as_bool().unwrap_or(false);
    let top = body["top_logprobs"].as_u64().unwrap_or(0) as usize;
    if top > 0 && !want_lp {
        return bad_request("when using `top_logprobs`, `logprobs` must be set to true.");
    }
    if top > 20 {
        return bad_request("`top_logprobs` must be <= 20");
    }
    let ids_wanted = body["return_token_ids"].as_bool().unwrap_or(false)
        && !s.knobs.no_token_ids.load(Ordering::SeqCst);
    let thinking = body["chat_template_kwargs"]["enable_thinking"]
        .as_bool()
        .unwrap_or(true);
    let prompt = render_chat(messages, true, thinking);
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default();
    let max_tokens = body["max_tokens"]
        .as_u64()
        .or(body["max_completion_tokens"].as_u64());
    let t = s.opts.tokenizer;
    let g = generate(&s, &model, t.encode(&prompt), &last_user, max_tokens);
    let entries: Vec<Value> = g
        .ids
        .iter()
        .enumerate()
        .map(|(k, id)| token_entry(t, &g.model, *id, k, top))
        .collect();
    let reasoning_key = match s.opts.version {
        Version::V033 => "reasoning",
        Version::V015 => "reasoning_content",
    };
    let id = "chatcmpl-9f1c2b7a04de3356";
    if body["stream"].as_bool().unwrap_or(false) {
        let mut events = Vec::new();
        let mut first = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": g.model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]});
        if ids_wanted {
            first["prompt_token_ids"] = json!(g.prompt_ids);
        }
        events.push(first);
        for (k, tid) in g.ids.iter().enumerate() {
            let last = k + 1 == g.ids.len();
            let mut choice = json!({"index": 0, "delta": {"content": visible(t, &[*tid])},
                "logprobs": if want_lp { json!({"content": [entries[k].clone()]}) } else { Value::Null },
                "finish_reason": if last { json!(g.finish) } else { Value::Null }});
            if ids_wanted {
                choice["token_ids"] = json!([tid]);
            }
            events.push(json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": g.model, "choices": [choice]}));
        }
        if body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false)
        {
            events.push(
                json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": g.model,
                "choices": [], "usage": usage(&s, g.prompt_ids.len(), g.ids.len())}),
            );
        }
        return sse(events);
    }
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert("content".into(), json!(visible(t, &g.ids)));
    message.insert("refusal".into(), Value::Null);
    message.insert("annotations".into(), Value::Null);
    message.insert("audio".into(), Value::Null);
    message.insert("function_call".into(), Value::Null);
    if s.opts.version == Version::V015 {
        message.insert("tool_calls".into(), json!([]));
    }
    message.insert(reasoning_key.into(), Value::Null);
    let mut choice = json!({"index": 0, "message": message,
        "logprobs": if want_lp { json!({"content": entries}) } else { Value::Null },
        "finish_reason": g.finish, "stop_reason": null,
        "token_ids": if ids_wanted { json!(g.ids) } else { Value::Null }});
    let mut resp = json!({"id": id, "object": "chat.completion", "created": 0, "model": g.model,
        "choices": [], "service_tier": null, "system_fingerprint": null,
        "usage": usage(&s, g.prompt_ids.len(), g.ids.len()), "prompt_logprobs": null,
        "prompt_token_ids": if ids_wanted { json!(g.prompt_ids) } else { Value::Null },
        "kv_transfer_params": null});
    if s.opts.version == Version::V033 {
        choice["routed_experts"] = Value::Null;
        choice["weight_versions"] = Value::Null;
        resp["prompt_text"] = Value::Null;
        resp["ec_transfer_params"] = Value::Null;
        resp["metrics"] = Value::Null;
    }
    resp["choices"] = json!([choice]);
    Json(resp).into_response()
}

pub(crate) fn prompt_ids_of(t: Tokenizer, prompt: &Value) -> Option<Vec<u32>> {
    match prompt {
        Value::String(s) => Some(t.encode(s)),
        Value::Array(a) if a.iter().all(Value::is_u64) => Some(
            a.iter()
                .filter_map(Value::as_u64)
                .map(|i| i as u32)
                .collect(),
        ),
        _ => None,
    }
}

pub(crate) async fn completions(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let _running = InFlight::new(&s.running);
    let t = s.opts.tokenizer;
    let model = match admit(&s, &body).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Some(prompt_ids) = prompt_ids_of(t, &body["prompt"]) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "1 validation error:\n  prompt: Input should be a valid string",
            Some("prompt"),
        );
    };
    let ids_wanted = body["return_token_ids"].as_bool().unwrap_or(false)
        && !s.knobs.no_token_ids.load(Ordering::SeqCst);
    let prompt_text = t.decode(&prompt_ids);
    let g = generate(
        &s,
        &model,
        prompt_ids,
        &prompt_text,
        body["max_tokens"].as_u64().or(Some(16)),
    );
    let logprobs = body["logprobs"].as_u64().map(|n| {
        let tokens: Vec<String> = g.ids.iter().map(|i| t.decode_one(*i)).collect();
        let lps: Vec<f64> = g.ids.iter().enumerate().map(|(k, i)| logprob(&g.model, *i, k)).collect();
        let mut offset = 0;
        let offsets: Vec<usize> = tokens.iter().map(|tok| { let o = offset; offset += tok.len(); o }).collect();
        let tops: Vec<Value> = tokens.iter().zip(&lps).map(|(tok, l)| {
            let mut m = Map::new();
            m.insert(tok.clone(), json!(l));
            for k in 1..=n {
                m.insert(t.decode_one(t.alternative(k as usize)), json!(l - k as f64));
            }
            Value::Object(m)
        }).collect();
        json!({"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops})
    });
    let prompt_logprobs = body["prompt_logprobs"].as_u64().map(|_| {
        let mut out = vec![Value::Null];
        for (k, id) in g.prompt_ids.iter().enumerate().skip(1) {
            let mut m = Map::new();
            m.insert(id.to_string(), json!({"logprob": logprob(&g.model, *id, k), "rank": 1 + (id % 3), "decoded_token": t.decode_one(*id)}));
            out.push(Value::Object(m));
        }
        Value::Array(out)
    });
    let text = t.decode(
        &g.ids
            .iter()
            .copied()
            .filter(|i| *i != t.im_end())
            .collect::<Vec<_>>(),
    );
    let choice = json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": g.finish,
        "stop_reason": null, "token_ids": if ids_wanted { json!(g.ids) } else { Value::Null },
        "prompt_logprobs": prompt_logprobs,
        "prompt_token_ids": if ids_wanted { json!(g.prompt_ids) } else { Value::Null }});
    if body["stream"].as_bool().unwrap_or(false) {
        let events = vec![
            json!({"id": "cmpl-4be0a1f29c7d6e13", "object": "text_completion", "created": 0,
            "model": g.model, "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": g.finish}]}),
        ];
        return sse(events);
    }
    Json(json!({"id": "cmpl-4be0a1f29c7d6e13", "object": "text_completion", "created": 0, "model": g.model,
        "choices": [choice], "service_tier": null, "system_fingerprint": null,
        "usage": usage(&s, g.prompt_ids.len(), g.ids.len()), "kv_transfer_params": null}))
    .into_response()
}

pub(crate) async fn tokenize(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let t = s.opts.tokenizer;
    let ids = if let Some(messages) = body["messages"].as_array() {
        let add_gen = body["add_generation_prompt"].as_bool().unwrap_or(true);
        if add_gen && body["continue_final_message"].as_bool().unwrap_or(false) {
            return bad_request(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            );
        }
        let thinking = body["chat_template_kwargs"]["enable_thinking"]
            .as_bool()
            .unwrap_or(true);
        t.encode(&render_chat(messages, add_gen, thinking))
    } else if let Some(ids) = prompt_ids_of(t, &body["prompt"]) {
        ids
    } else {
        return bad_request("either `messages` or `prompt` is required");
    };
    let strs = body["return_token_strs"]
        .as_bool()
        .unwrap_or(false)
        .then(|| ids.iter().map(|i| t.decode_one(*i)).collect::<Vec<_>>());
    Json(json!({"count": ids.len(), "max_model_len": 32768, "tokens": ids, "token_strs": strs}))
        .into_response()
}

pub(crate) async fn detokenize(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let ids: Vec<u32> = body["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|i| i as u32)
                .collect()
        })
        .unwrap_or_default();
    Json(json!({"prompt": s.opts.tokenizer.decode(&ids)})).into_response()
}
