//! A fake Tinker for tests: an in-memory HTTP server that speaks the wire protocol of the
//! official `tinker` 0.38.0 Python SDK (`docs/tinker-wire.md`) well enough that the real SDK,
//! pointed at it with `TINKER_BASE_URL`, runs every call CLaaS makes (§8, §11), and that can
//! be told to misbehave ([`Knobs`], [`FakeTinker::expire_sessions`]).
//!
//! Its "model" is not a network. Every number is a deterministic function of its inputs
//! ([`model`]): a log-prob is a hash of (weights, token, position), where "weights" is a
//! 64-bit fingerprint that starts as the base model's, and that each `optim_step` after a
//! `forward_backward` folds the gradient, step and learning rate into. So a test can predict
//! every number, and can see that training changed what a later forward pass or sample
//! returns. A later step backs these numbers by a tiny candle model.
//!
//! What it does not model: JWT auth, zstd bodies, `retrieve_futures`, metadata-only polls,
//! chunked forward_backward merging, images, stop strings, and the 0.13.1 SDK's JSON forms
//! (§10). Futures complete at submit time, in arrival order (the SDK submits in `seq_id`
//! order).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

mod brain;
mod futures;
pub mod model;
mod proto;
mod sampling;
mod session;
mod training;

/// The base model the fake serves unless told otherwise (CLaaS's Tinker profile's default).
pub const DEFAULT_BASE_MODEL: &str = "Qwen/Qwen3-30B-A3B";

/// How the server is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The one key accepted in `X-API-Key`; `None` accepts any key that starts with `tml-`
    /// (what the SDK itself requires of a key, §1.2).
    pub api_key: Option<String>,
    /// Base models `create_model` and `create_sampling_session` accept; any other is a 400.
    pub base_models: Vec<String>,
    /// How long `retrieve_future` holds the poll of a pending future before it answers
    /// `try_again`: the SDK polls again at once, so the server must long-poll (§4.3).
    pub long_poll: Duration,
    /// The token ids samples are drawn from (default 1000..2000); a test whose tokenizer
    /// is smaller picks ids it can decode.
    pub sample_vocab: std::ops::Range<i32>,
    /// A Qwen3 checkpoint directory (the tiny one) whose model computes every number:
    /// samples, log-probs, the loss and its gradient, Adam steps (`brain.rs`). `None`: the
    /// hash model (`model.rs`), fast and predictable.
    pub model_dir: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            api_key: None,
            base_models: vec![DEFAULT_BASE_MODEL.into()],
            long_poll: Duration::from_millis(500),
            sample_vocab: 1000..2000,
            model_dir: None,
        }
    }
}

/// Misbehaviour, settable while the server runs.
#[derive(Debug, Default)]
pub struct Knobs {
    /// The next this-many submits (routes that answer a future, and `asample`) answer 503.
    pub submit_errors: AtomicUsize,
    /// The next this-many `retrieve_future` polls answer 500.
    pub poll_errors: AtomicUsize,
    /// Every future created from now on first answers `try_again` to this many polls.
    pub try_again_polls: AtomicUsize,
    /// Futures created while this is set never complete: every poll is held for
    /// [`Options::long_poll`] and then answered `try_again`.
    pub stall_futures: AtomicBool,
    /// The next this-many submits to a route (`optim_step`, …) answer 503; see
    /// [`FakeTinker::fail_route`].
    pub route_errors: Mutex<HashMap<String, usize>>,
    /// While set, `GET /api/v1/healthz` answers 503 (the other routes still work).
    pub unhealthy: AtomicBool,
}

/// Routes that answer an `UntypedAPIFuture` (§4.1); `submit_errors` applies to these.
const SUBMIT_ROUTES: [&str; 7] = [
    "create_model",
    "forward_backward",
    "optim_step",
    "save_weights",
    "save_weights_for_sampler",
    "load_weights",
    "asample",
];

#[derive(Debug, Default)]
struct Session {
    expired: bool,
    heartbeats: usize,
}

/// A LoRA training client's model, `<session>:train:<model_seq_id>`.
#[derive(Debug, Clone)]
struct Model {
    session: String,
    base_model: String,
    rank: u32,
    /// The adapter's fingerprint ([`model`]): the base model's until a step changes it.
    weights: u64,
    /// `optim_step`s taken.
    steps: u64,
    /// Gradient accumulated by `forward_backward` since the last `optim_step`.
    grad: Option<u64>,
}

/// A saved checkpoint, by its `tinker://` path.
#[derive(Debug, Clone)]
struct Checkpoint {
    base_model: String,
    rank: u32,
    weights: u64,
}

#[derive(Debug, Clone)]
struct Sampler {
    session: String,
    base_model: String,
    model_path: Option<String>,
    weights: u64,
}

#[derive(Debug, Default)]
struct World {
    sessions: HashMap<String, Session>,
    models: HashMap<String, Model>,
    checkpoints: BTreeMap<String, Checkpoint>,
    samplers: HashMap<String, Sampler>,
    futures: HashMap<String, futures::Future>,
    next_id: u64,
    /// `METHOD /path` of every authenticated request, in arrival order.
    calls: Vec<String>,
}

impl World {
    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
    /// The session `id` if it is live; else 404 (unknown) or 410 (expired).
    fn live_session(&self, id: &str) -> Result<(), Reject> {
        match self.sessions.get(id) {
            None => Err(reject(
                StatusCode::NOT_FOUND,
                format!("session {id} not found"),
            )),
            Some(s) if s.expired => Err(reject(StatusCode::GONE, format!("session {id} expired"))),
            Some(_) => Ok(()),
        }
    }
    /// The model `id` if it exists and its session is live.
    fn live_model(&mut self, id: &str) -> Result<&mut Model, Reject> {
        let not_found = || reject(StatusCode::NOT_FOUND, format!("model {id} not found"));
        let session = self.models.get(id).ok_or_else(not_found)?.session.clone();
        self.live_session(&session)?;
        self.models.get_mut(id).ok_or_else(not_found)
    }
}

struct Shared {
    opts: Options,
    brain: Option<brain::Brain>,
    knobs: Knobs,
    world: Mutex<World>,
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn knows_base_model(&self, base_model: &str) -> bool {
        self.opts.base_models.iter().any(|m| m == base_model)
    }
}

/// A running fake. Dropping it leaves the server running until the test's runtime ends.
#[derive(Clone)]
pub struct FakeTinker {
    /// The base URL to give `TINKER_BASE_URL` (no trailing `/`).
    pub url: String,
    shared: Arc<Shared>,
}

impl FakeTinker {
    pub async fn start(opts: Options) -> FakeTinker {
        let brain = opts.model_dir.as_deref().map(|dir| {
            brain::Brain::load(dir).unwrap_or_else(|e| panic!("fake Tinker's model {dir:?}: {e}"))
        });
        let shared = Arc::new(Shared {
            opts,
            brain,
            knobs: Knobs::default(),
            world: Mutex::new(World::default()),
        });
        let app = Router::new()
            .merge(session::routes())
            .merge(training::routes())
            .merge(sampling::routes())
            .route("/api/v1/retrieve_future", post(futures::retrieve_future))
            .route_layer(middleware::from_fn_with_state(shared.clone(), gate))
            // Outside the key check, as the service's is.
            .route("/api/v1/healthz", get(session::healthz))
            .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Tinker");
        let addr = listener.local_addr().expect("fake Tinker address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeTinker {
            url: format!("http://{addr}"),
            shared,
        }
    }

    pub fn knobs(&self) -> &Knobs {
        &self.shared.knobs
    }
    /// `METHOD /path` of every authenticated request, in arrival order.
    pub fn calls(&self) -> Vec<String> {
        self.shared.world().calls.clone()
    }
    /// How many authenticated requests reached `/api/v1/<route>` (any method).
    pub fn count(&self, route: &str) -> usize {
        let suffix = format!(" /api/v1/{route}");
        self.calls().iter().filter(|c| c.ends_with(&suffix)).count()
    }
    /// The next `n` submits to `route` (one of the routes that answer a future, or
    /// `asample`) answer 503; the other routes are unaffected.
    pub fn fail_route(&self, route: &str, n: usize) {
        let mut errors = self
            .shared
            .knobs
            .route_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        errors.insert(route.to_owned(), n);
    }
    /// Every session created so far is expired: its heartbeat answers 410, and so does
    /// anything that names it or one of its models or samplers.
    pub fn expire_sessions(&self) {
        for s in self.shared.world().sessions.values_mut() {
            s.expired = true;
        }
    }
    /// Heartbeats received for `session_id`.
    pub fn heartbeats(&self, session_id: &str) -> usize {
        self.shared
            .world()
            .sessions
            .get(session_id)
            .map_or(0, |s| s.heartbeats)
    }
    /// `tinker://` paths of the checkpoints that exist now, sorted.
    pub fn checkpoints(&self) -> Vec<String> {
        self.shared.world().checkpoints.keys().cloned().collect()
    }
    /// The adapter fingerprint of a training model ([`model`]), if it exists.
    pub fn weights(&self, model_id: &str) -> Option<u64> {
        self.shared.world().models.get(model_id).map(|m| m.weights)
    }
    /// `optim_step`s a training model has taken, if it exists.
    pub fn steps(&self, model_id: &str) -> Option<u64> {
        self.shared.world().models.get(model_id).map(|m| m.steps)
    }
}

// ---- the gate every authenticated route passes: key, call log, injected 5xx ----

async fn gate(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let accepted = match &s.opts.api_key {
        Some(expected) => key == expected,
        None => key.starts_with("tml-"),
    };
    if !accepted {
        return detail(StatusCode::UNAUTHORIZED, "Invalid API key");
    }
    let path = req.uri().path().to_owned();
    s.world().calls.push(format!("{} {path}", req.method()));
    let route = path.strip_prefix("/api/v1/").unwrap_or_default();
    let injected = if req.method() == Method::POST && SUBMIT_ROUTES.contains(&route) {
        take_one(&s.knobs.submit_errors) || take_route(&s.knobs, route)
    } else if route == "retrieve_future" {
        take_one(&s.knobs.poll_errors)
    } else {
        false
    };
    if injected {
        let status = if route == "retrieve_future" {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return detail(status, &format!("fake Tinker: injected failure of {route}"));
    }
    next.run(req).await
}

/// Takes one from a countdown knob; false once it is at zero.
fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Takes one from `route`'s countdown in [`Knobs::route_errors`].
fn take_route(knobs: &Knobs, route: &str) -> bool {
    let mut errors = knobs.route_errors.lock().unwrap_or_else(|e| e.into_inner());
    match errors.get_mut(route) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

// ---- bodies and errors ----

/// Every error the fake sends: a JSON body, never an empty one (a bare 400 reads to the SDK
/// as a dropped connection, §5.4).
fn detail(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "detail": message }))).into_response()
}

/// An error answer: `status` with `{"detail": message}`.
#[derive(Debug)]
struct Reject(StatusCode, String);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        detail(self.0, &self.1)
    }
}

fn reject(status: StatusCode, message: impl Into<String>) -> Reject {
    Reject(status, message.into())
}

/// What a handler answers.
type Answer = Result<Response, Reject>;

/// A JSON request body, or a 422 naming what is wrong with it.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reject> {
    serde_json::from_slice(body)
        .map_err(|e| reject(StatusCode::UNPROCESSABLE_ENTITY, format!("bad body: {e}")))
}

/// A 200 with a JSON body.
fn ok(body: Value) -> Response {
    Json(body).into_response()
}
