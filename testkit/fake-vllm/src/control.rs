//! The control plane: health, version, metrics, sleep and wake, pause and resume, and
//! loading and unloading LoRA adapters.

use crate::*;

pub(crate) async fn health(State(s): State<Arc<Shared>>) -> StatusCode {
    if s.knobs.unhealthy.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

pub(crate) async fn version(State(s): State<Arc<Shared>>) -> Json<Value> {
    let v = match s.opts.version {
        Version::V033 => "0.33.0",
        Version::V015 => "0.15.1",
    };
    Json(json!({ "version": v }))
}

pub(crate) async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let busy = s
        .knobs
        .busy_polls
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let (level, m) = {
        let mut e = s.engine();
        e.calls.push("metrics".into());
        (e.asleep, s.opts.served_model_name.clone())
    };
    let running = s.running.load(Ordering::SeqCst) + usize::from(busy);
    let (awake, offloaded, discarded) = match level {
        None => (1, 0, 0),
        Some(1) => (0, 1, 0),
        Some(_) => (0, 0, 1),
    };
    let body = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"{m}\"}} {running}.0\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"{m}\"}} 0.0\n\
         # TYPE vllm:num_requests_waiting_by_reason gauge\n\
         vllm:num_requests_waiting_by_reason{{engine=\"0\",model_name=\"{m}\",reason=\"capacity\"}} 3.0\n\
         # TYPE vllm:engine_sleep_state gauge\n\
         vllm:engine_sleep_state{{engine=\"0\",model_name=\"{m}\",sleep_state=\"awake\"}} {awake}.0\n\
         vllm:engine_sleep_state{{engine=\"0\",model_name=\"{m}\",sleep_state=\"weights_offloaded\"}} {offloaded}.0\n\
         vllm:engine_sleep_state{{engine=\"0\",model_name=\"{m}\",sleep_state=\"discard_all\"}} {discarded}.0\n"
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

pub(crate) fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

pub(crate) async fn sleep(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    s.record(format!("sleep {}", q.clone().unwrap_or_default()));
    if s.knobs.fail_sleep.load(Ordering::SeqCst) {
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "Sleep mode is not enabled (start vLLM with --enable-sleep-mode).",
            None,
        );
    }
    let level = query_pairs(&q)
        .into_iter()
        .find(|(k, _)| k == "level")
        .map(|(_, v)| v.parse::<u8>())
        .unwrap_or(Ok(1));
    let Ok(level) = level
        .map_err(|_| ())
        .and_then(|l| if l <= 2 { Ok(l) } else { Err(()) })
    else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "level must be 0, 1 or 2",
            Some("level"),
        );
    };
    s.engine().asleep = Some(level.max(1));
    match s.opts.version {
        Version::V033 => Json(json!({"status": "sleeping", "level": level})).into_response(),
        Version::V015 => StatusCode::OK.into_response(),
    }
}

pub(crate) async fn wake_up(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    s.record(format!("wake_up {}", q.clone().unwrap_or_default()));
    let tags: Vec<String> = query_pairs(&q)
        .into_iter()
        .filter(|(k, _)| k == "tags")
        .map(|(_, v)| v)
        .collect();
    let partial = !tags.is_empty() && !tags.iter().any(|t| t == "kv_cache");
    if !partial {
        s.engine().asleep = None;
        s.woke.notify_waiters();
    }
    match s.opts.version {
        Version::V033 if partial => {
            Json(json!({"status": "sleeping", "tags": tags})).into_response()
        }
        Version::V033 => Json(json!({"status": "awake", "tags": Value::Null})).into_response(),
        Version::V015 => StatusCode::OK.into_response(),
    }
}

pub(crate) async fn is_sleeping(State(s): State<Arc<Shared>>) -> Json<Value> {
    let e = s.engine();
    Json(json!({"is_sleeping": e.asleep.is_some() || e.paused}))
}

pub(crate) async fn pause(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.record("pause".into());
    s.engine().paused = true;
    Json(json!({"status": "paused"}))
}

pub(crate) async fn resume(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.record("resume".into());
    s.engine().paused = false;
    s.woke.notify_waiters();
    Json(json!({"status": "resumed"}))
}

pub(crate) async fn load_lora(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
    let name = b["lora_name"].as_str().unwrap_or_default().to_owned();
    let path = b["lora_path"].as_str().unwrap_or_default().to_owned();
    let inplace = b["load_inplace"].as_bool().unwrap_or(false);
    s.record(format!("load {name} {path} inplace={inplace}"));
    if name.is_empty() || path.is_empty() {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.",
            None,
        );
    }
    if s.knobs.fail_load.load(Ordering::SeqCst) {
        let msg = format!(
            "LoRA rank 64 is greater than max_lora_rank {}.",
            s.opts.max_lora_rank
        );
        return match s.opts.version {
            Version::V033 => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                &msg,
                None,
            ),
            Version::V015 => openai_error(StatusCode::BAD_REQUEST, "BadRequestError", &msg, None),
        };
    }
    let config = std::fs::read(std::path::Path::new(&path).join("adapter_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let Some(config) = config else {
        return openai_error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("Loading lora {name} failed: No adapter found for {path}"),
            None,
        );
    };
    if config["r"].as_u64().unwrap_or(0) > s.opts.max_lora_rank {
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            &format!(
                "LoRA rank {} is greater than max_lora_rank {}.",
                config["r"], s.opts.max_lora_rank
            ),
            None,
        );
    }
    let mut e = s.engine();
    let existing = e.loras.iter().position(|(n, _)| *n == name);
    match (existing, inplace) {
        (Some(_), false) => {
            drop(e);
            return openai_error(
                StatusCode::BAD_REQUEST,
                "InvalidUserInput",
                &format!("The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."),
                None,
            );
        }
        (Some(i), true) => e.loras[i].1 = path,
        (None, _) => e.loras.push((name.clone(), path)),
    }
    drop(e);
    (
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' added successfully."),
    )
        .into_response()
}

pub(crate) async fn unload_lora(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
    let name = b["lora_name"].as_str().unwrap_or_default().to_owned();
    s.record(format!("unload {name}"));
    let mut e = s.engine();
    match e.loras.iter().position(|(n, _)| *n == name) {
        Some(i) => {
            e.loras.remove(i);
            drop(e);
            (
                StatusCode::OK,
                format!("Success: LoRA adapter '{name}' removed successfully."),
            )
                .into_response()
        }
        None => {
            drop(e);
            openai_error(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                &format!("The lora adapter '{name}' cannot be found."),
                None,
            )
        }
    }
}
