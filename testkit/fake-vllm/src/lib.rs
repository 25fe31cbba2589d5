//! A fake vLLM for tests: an HTTP server that speaks the wire formats documented in
//! `research/vllm-api.md` (§1–§5) for vLLM 0.33 and, with [`Version::V015`], 0.15, and that
//! can be told to misbehave.
//!
//! Its "model" is deterministic: a character-level tokenizer (id = 1000 + code point, with
//! Qwen3's real special ids), a ChatML template, and a reply derived from the last user
//! message, so tests can predict every token id and log-prob it reports.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

pub const IM_START: u32 = 151644;
pub const IM_END: u32 = 151645;
pub const THINK: u32 = 151667;
pub const END_THINK: u32 = 151668;
const SPECIALS: [(&str, u32); 4] = [
    ("<|im_start|>", IM_START),
    ("<|im_end|>", IM_END),
    ("<think>", THINK),
    ("</think>", END_THINK),
];

/// Which vLLM release the fake answers like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 0.33: JSON sleep/wake bodies, 500 on LoRA load failures, `reasoning`.
    V033,
    /// 0.15.1: empty sleep/wake bodies, 400 on load failures, `reasoning_content`, and a
    /// request to a sleeping engine is an engine error.
    V015,
}

/// How the server is started.
#[derive(Debug, Clone)]
pub struct Options {
    pub version: Version,
    /// `--served-model-name`.
    pub served_model_name: String,
    /// `--api-key`: guards `/v1/*` only, as vLLM does.
    pub api_key: Option<String>,
    pub max_lora_rank: u64,
    pub tokenizer: Tokenizer,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            version: Version::V033,
            served_model_name: "base".into(),
            api_key: None,
            max_lora_rank: 32,
            tokenizer: Tokenizer::Qwen3Like,
        }
    }
}

/// Misbehaviour, settable while the server runs.
#[derive(Debug, Default)]
pub struct Knobs {
    /// `/metrics` reports one running request for this many more polls.
    pub busy_polls: AtomicUsize,
    /// `/sleep` answers 500.
    pub fail_sleep: AtomicBool,
    /// `/v1/load_lora_adapter` fails with an engine error.
    pub fail_load: AtomicBool,
    /// Generation endpoints send headers and then break the connection.
    pub drop_connection: AtomicBool,
    /// Replies start with a `<think>…</think>` block.
    pub think: AtomicBool,
    /// Behave like vLLM before 0.10.2: ignore `return_token_ids`.
    pub no_token_ids: AtomicBool,
    /// Each generation takes this long; an engine put to sleep meanwhile fails it, as a
    /// real one does (0.15) or aborts it (0.17+).
    pub latency_ms: std::sync::atomic::AtomicU64,
    /// Every reply is this text instead of the derived one.
    pub reply: Mutex<Option<String>>,
    /// `/health` answers 503, as vLLM does while its engine is down or still loading.
    pub unhealthy: AtomicBool,
}

#[derive(Debug, Default)]
struct Engine {
    asleep: Option<u8>,
    paused: bool,
    /// Loaded adapters in load order: (name, path).
    loras: Vec<(String, String)>,
    calls: Vec<String>,
    /// Generation requests that arrived while the engine slept or was paused.
    served_asleep: usize,
    generations: usize,
    /// Bodies of generation requests, newest last (at most 64 kept).
    requests: VecDeque<Value>,
}

struct Shared {
    opts: Options,
    /// Generation requests being answered now (`vllm:num_requests_running`).
    running: AtomicUsize,
    knobs: Knobs,
    engine: Mutex<Engine>,
    woke: Notify,
}

impl Shared {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn record(&self, call: String) {
        self.engine().calls.push(call);
    }
}

/// A running fake. Dropping it leaves the server running until the test's runtime ends.
#[derive(Clone)]
pub struct FakeVllm {
    pub url: String,
    shared: Arc<Shared>,
}

impl FakeVllm {
    pub async fn start(opts: Options) -> FakeVllm {
        let shared = Arc::new(Shared {
            opts,
            knobs: Knobs::default(),
            running: AtomicUsize::new(0),
            engine: Mutex::new(Engine::default()),
            woke: Notify::new(),
        });
        let v1 = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/load_lora_adapter", post(load_lora))
            .route("/v1/unload_lora_adapter", post(unload_lora))
            .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
        let app = Router::new()
            .route("/health", get(health))
            .route("/version", get(version))
            .route("/metrics", get(metrics))
            .route("/tokenize", post(tokenize))
            .route("/detokenize", post(detokenize))
            .route("/sleep", post(sleep))
            .route("/wake_up", post(wake_up))
            .route("/is_sleeping", get(is_sleeping))
            .route("/pause", post(pause))
            .route("/resume", post(resume))
            .merge(v1)
            .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake vLLM");
        let addr = listener.local_addr().expect("fake vLLM address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeVllm {
            url: format!("http://{addr}"),
            shared,
        }
    }

    pub fn knobs(&self) -> &Knobs {
        &self.shared.knobs
    }
    /// Control calls in order (`metrics`, `sleep level=1`, `load a /path inplace=false`, …).
    pub fn calls(&self) -> Vec<String> {
        self.shared.engine().calls.clone()
    }
    pub fn clear_calls(&self) {
        self.shared.engine().calls.clear();
    }
    /// Loaded adapters (name, path) in load order.
    pub fn loras(&self) -> Vec<(String, String)> {
        self.shared.engine().loras.clone()
    }
    pub fn is_asleep(&self) -> bool {
        self.shared.engine().asleep.is_some()
    }
    /// Generation requests that reached the engine while it slept or was paused.
    pub fn served_while_asleep(&self) -> usize {
        self.shared.engine().served_asleep
    }
    /// Generation requests received (answered or not).
    pub fn generations(&self) -> usize {
        self.shared.engine().generations
    }

    /// The last generation request body received.
    pub fn last_request(&self) -> Option<Value> {
        self.shared.engine().requests.back().cloned()
    }
    pub fn set_reply(&self, reply: Option<&str>) {
        *self
            .shared
            .knobs
            .reply
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reply.map(str::to_owned);
    }
    /// The reply the fake gives to `user` (before any thinking block and the stop token).
    pub fn reply_for(&self, model: &str, user: &str) -> String {
        reply_text(&self.shared, model, user)
    }
}

// ---- the "model" ----

/// Character-level tokenizer with Qwen3's special ids.
pub fn encode(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = text;
    'outer: while let Some(c) = rest.chars().next() {
        for (s, id) in SPECIALS {
            if let Some(r) = rest.strip_prefix(s) {
                ids.push(id);
                rest = r;
                continue 'outer;
            }
        }
        let cp = c as u32;
        ids.push(1000 + if cp < 150_000 { cp } else { 0xFFFD });
        rest = &rest[c.len_utf8()..];
    }
    ids
}

pub fn decode_one(id: u32) -> String {
    if let Some((s, _)) = SPECIALS.iter().find(|(_, i)| *i == id) {
        return (*s).to_owned();
    }
    id.checked_sub(1000)
        .and_then(char::from_u32)
        .map(String::from)
        .unwrap_or_else(|| "\u{FFFD}".into())
}

pub fn decode(ids: &[u32]) -> String {
    ids.iter().map(|i| decode_one(*i)).collect()
}

/// Tiny preset ids (`claas model random tiny`): bytes 0..=255, then its special tokens.
const TINY_SPECIALS: [(&str, u32); 4] = [
    ("<|im_start|>", 257),
    ("<|im_end|>", 258),
    ("<think>", 259),
    ("</think>", 260),
];

/// The fake model's tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tokenizer {
    /// One token per character (id = 1000 + code point) and Qwen3's real special ids.
    #[default]
    Qwen3Like,
    /// One token per byte with the tiny random preset's special ids, so its rollouts train
    /// the tiny model (vocabulary 512).
    TinyBytes,
}

impl Tokenizer {
    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Qwen3Like => encode(text),
            Tokenizer::TinyBytes => {
                let mut ids = Vec::new();
                let mut rest = text;
                'outer: while !rest.is_empty() {
                    for (sp, id) in TINY_SPECIALS {
                        if let Some(r) = rest.strip_prefix(sp) {
                            ids.push(id);
                            rest = r;
                            continue 'outer;
                        }
                    }
                    let c = rest.chars().next().map_or(1, char::len_utf8);
                    ids.extend(rest.as_bytes()[..c].iter().map(|b| u32::from(*b)));
                    rest = &rest[c..];
                }
                ids
            }
        }
    }

    pub fn decode_one(self, id: u32) -> String {
        match self {
            Tokenizer::Qwen3Like => decode_one(id),
            Tokenizer::TinyBytes => match TINY_SPECIALS.iter().find(|(_, i)| *i == id) {
                Some((sp, _)) => (*sp).to_owned(),
                None => u8::try_from(id)
                    .map(|b| String::from_utf8_lossy(&[b]).into_owned())
                    .unwrap_or_else(|_| "\u{FFFD}".into()),
            },
        }
    }

    pub fn decode(self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Qwen3Like => decode(ids),
            Tokenizer::TinyBytes => {
                let mut bytes = Vec::new();
                for id in ids {
                    match u8::try_from(*id) {
                        Ok(b) => bytes.push(b),
                        Err(_) => bytes.extend(self.decode_one(*id).into_bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    pub fn im_start(self) -> u32 {
        match self {
            Tokenizer::Qwen3Like => IM_START,
            Tokenizer::TinyBytes => 257,
        }
    }

    pub fn im_end(self) -> u32 {
        match self {
            Tokenizer::Qwen3Like => IM_END,
            Tokenizer::TinyBytes => 258,
        }
    }

    /// The k-th alternative a top-logprobs list offers.
    fn alternative(self, k: usize) -> u32 {
        match self {
            Tokenizer::Qwen3Like => 1000 + 32 + k as u32,
            Tokenizer::TinyBytes => 64 + k as u32,
        }
    }
}

/// The raw log-prob the fake reports for `id` at `position` under `model`.
pub fn logprob(model: &str, id: u32, position: usize) -> f64 {
    let m = model.bytes().map(u64::from).sum::<u64>() % 5;
    -(((u64::from(id) + position as u64) % 13) as f64 + 1.0 + m as f64) / 32.0
}

fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// ChatML as Qwen3 renders it; `enable_thinking: false` adds the empty think block.
fn render_chat(messages: &[Value], add_generation_prompt: bool, thinking: bool) -> String {
    let mut out = String::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = content_text(m.get("content").unwrap_or(&Value::Null));
        out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
        if !thinking {
            out.push_str("<think>\n\n</think>\n\n");
        }
    }
    out
}

fn reply_text(shared: &Shared, model: &str, user: &str) -> String {
    let fixed = shared
        .knobs
        .reply
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    fixed.unwrap_or_else(|| format!("[{model}] You said: {user}"))
}

struct Generation {
    model: String,
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    finish: &'static str,
}

fn generate(
    shared: &Shared,
    model: &str,
    prompt_ids: Vec<u32>,
    last_user: &str,
    max_tokens: Option<u64>,
) -> Generation {
    let mut text = reply_text(shared, model, last_user);
    if shared.knobs.think.load(Ordering::SeqCst) {
        text = format!("<think>\nThe user wants a reply.\n</think>\n\n{text}");
    }
    let t = shared.opts.tokenizer;
    let mut ids = t.encode(&text);
    ids.push(t.im_end());
    let mut finish = "stop";
    if let Some(max) = max_tokens.and_then(|m| usize::try_from(m).ok()) {
        if ids.len() > max {
            ids.truncate(max);
            finish = "length";
        }
    }
    Generation {
        model: model.to_owned(),
        prompt_ids,
        ids,
        finish,
    }
}

/// Visible text of generated ids: special tokens are skipped, as vLLM's detokenizer does
/// by default (the think tags are ordinary added tokens and stay).
fn visible(t: Tokenizer, ids: &[u32]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| *i != t.im_end() && *i != t.im_start())
        .collect();
    t.decode(&kept)
}

fn token_entry(t: Tokenizer, model: &str, id: u32, pos: usize, top: usize) -> Value {
    let tok = t.decode_one(id);
    let lp = logprob(model, id, pos);
    let mut tops = vec![json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes()})];
    for k in 1..top {
        let alt = t.decode_one(t.alternative(k));
        tops.push(json!({"token": alt, "logprob": lp - k as f64, "bytes": alt.as_bytes()}));
    }
    json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes(), "top_logprobs": tops})
}

// ---- errors ----

fn openai_error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}})),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    openai_error(StatusCode::BAD_REQUEST, "BadRequestError", message, None)
}

async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.opts.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && token == key);
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "Unauthorized"})),
            )
                .into_response();
        }
    }
    next.run(req).await
}

// ---- control plane ----

async fn health(State(s): State<Arc<Shared>>) -> StatusCode {
    if s.knobs.unhealthy.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn version(State(s): State<Arc<Shared>>) -> Json<Value> {
    let v = match s.opts.version {
        Version::V033 => "0.33.0",
        Version::V015 => "0.15.1",
    };
    Json(json!({ "version": v }))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
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

fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
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

async fn sleep(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
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

async fn wake_up(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
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

async fn is_sleeping(State(s): State<Arc<Shared>>) -> Json<Value> {
    let e = s.engine();
    Json(json!({"is_sleeping": e.asleep.is_some() || e.paused}))
}

async fn pause(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.record("pause".into());
    s.engine().paused = true;
    Json(json!({"status": "paused"}))
}

async fn resume(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.record("resume".into());
    s.engine().paused = false;
    s.woke.notify_waiters();
    Json(json!({"status": "resumed"}))
}

async fn load_lora(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
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

async fn unload_lora(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
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

// ---- serving ----

fn permission() -> Value {
    json!([{"id": "modelperm-5d3e9a0b71c24f86", "object": "model_permission", "created": 0,
        "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
        "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
        "organization": "*", "group": null, "is_blocking": false}])
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
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
async fn admit(s: &Shared, body: &Value) -> Result<String, Response> {
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

fn sse(events: Vec<Value>) -> Response {
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

fn usage(s: &Shared, prompt: usize, completion: usize) -> Value {
    let mut u = json!({"prompt_tokens": prompt, "total_tokens": prompt + completion,
        "completion_tokens": completion, "prompt_tokens_details": null});
    if s.opts.version == Version::V033 {
        u["completion_tokens_details"] = Value::Null;
    }
    u
}

/// Counts a generation request as running while it lives.
struct InFlight<'a>(&'a AtomicUsize);

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

async fn chat(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
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

fn prompt_ids_of(t: Tokenizer, prompt: &Value) -> Option<Vec<u32>> {
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

async fn completions(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
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

async fn tokenize(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
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

async fn detokenize(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
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
