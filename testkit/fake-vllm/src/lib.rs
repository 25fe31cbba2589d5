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

mod control;
pub mod hub;
mod model;
mod serving;

use control::{
    health, is_sleeping, load_lora, metrics, pause, resume, sleep, unload_lora, version, wake_up,
};
use model::reply_text;
pub use model::{decode, decode_one, encode, logprob, Tokenizer};
use serving::{chat, completions, detokenize, models, tokenize};

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
