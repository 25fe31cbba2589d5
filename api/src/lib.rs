//! claas-api: the stateless HTTP service. Any replica can serve any request: all state
//! lives in the queue store (and, with its issue, the shared completion cache).
//!
//! It imports only `claas-core`. Inference goes through [`inference`] (the vLLM fleet proxy
//! here, the candle engine in `claas-engine`) and base-model files through [`in_process`],
//! so the API depends on neither candle nor the trainer (`make layers`; ARCHITECTURE.md).

pub mod auth;
pub mod cache;
pub mod dashboard;
pub mod deferred;
pub mod error;
pub mod in_process;
pub mod inference;
pub mod metrics;
pub mod open_guard;
pub mod openapi;
pub mod rate;
pub mod routes;
pub mod timeouts;
/// Kept at its old path for the API's handlers and tests.
pub use claas_core::thinking;
pub mod upstream;
pub mod waiters;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use claas_core::adapter_store::AdapterStore;
use claas_core::config::Config;
use claas_core::queue::SharedStore;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::cache::{CacheError, CompletionCache, MemoryCache, RedisCache};
use crate::upstream::{Backends, Upstream};

/// What handlers need from the configuration.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub max_body_bytes: usize,
    pub feedback_default_wait_s: u64,
    pub feedback_max_wait_s: u64,
    pub max_attempts: i32,
    /// Base model of `POST /v1/lora/init` when the request names none.
    pub default_base_model: String,
    pub allowed_init_base_models: Vec<String>,
    /// Where version 0 of a new LoRA is recorded to live.
    pub lora_root: String,
    /// Where random preset models live (`<data_dir>/models/<preset>`).
    pub data_dir: std::path::PathBuf,
    /// The vLLM's `--max-lora-rank` when a vLLM serves the adapters.
    pub max_lora_rank: Option<i32>,
}

impl ApiOptions {
    pub fn from_config(cfg: &Config) -> Self {
        ApiOptions {
            max_body_bytes: cfg.server.max_body_bytes,
            feedback_default_wait_s: cfg.server.feedback_default_wait_s,
            feedback_max_wait_s: cfg.server.feedback_max_wait_s,
            max_attempts: cfg.queue.max_attempts,
            default_base_model: cfg.model.base_model_id.clone(),
            allowed_init_base_models: cfg.model.allowed_init_base_models.clone(),
            lora_root: cfg.storage.lora_root.display().to_string(),
            data_dir: cfg.data_dir.clone(),
            max_lora_rank: cfg.vllm.base_url.as_ref().map(|_| cfg.vllm.max_lora_rank),
        }
    }
}

/// Shared handler state.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub options: Arc<ApiOptions>,
    /// Rollouts of served answers, for feedback.
    pub cache: Arc<dyn CompletionCache>,
    /// The vLLMs inference is proxied to; none in the embedded default.
    pub backends: Option<Arc<Backends>>,
    /// The inference backend over `backends`, built once when they are set.
    proxy: Option<Arc<dyn inference::Inference>>,
    /// In-process inference when no vLLM is configured (`claas dev`).
    pub engine: Option<Arc<dyn inference::Inference>>,
    /// Base-model checkpoints on this machine (version 0 of new LoRAs, intake checks).
    pub base_models: Option<Arc<dyn in_process::BaseModels>>,
    /// This process's HTTP request metrics.
    pub http_metrics: Arc<metrics::HttpMetrics>,
    /// API keys (open when none is configured).
    pub auth: Arc<auth::Auth>,
    /// Where adapter versions are stored (local files or an object store).
    pub adapters: AdapterStore,
    /// Signs dashboard sessions and CSRF tokens.
    pub sessions: Arc<dashboard::session::Sessions>,
    /// Failed dashboard logins per client address.
    pub logins: Arc<dashboard::throttle::LoginThrottle>,
    /// One permit per feedback request this process may hold open while its job runs
    /// (`server.max_waiting_feedback`); past it a waiting request is refused before it
    /// enqueues anything.
    pub waiting: WaitSlots,
    /// The trainer's `max_seq_len`: longer samples are refused at intake.
    pub max_seq_len: usize,
    /// LoRAs one API key may create or overwrite per hour.
    pub lora_inits: Arc<rate::WindowLimit>,
    /// How long a request may take, by route class.
    pub timeouts: timeouts::Timeouts,
}

/// LoRAs one key may create or overwrite per hour by default.
pub const DEFAULT_LORA_INITS_PER_HOUR: usize = 100;

/// The feedback requests a process may hold open, and how many it may.
#[derive(Clone)]
pub struct WaitSlots {
    pub permits: Arc<tokio::sync::Semaphore>,
    pub limit: usize,
    /// Where the waiting requests wait (one poller for all of them).
    pub jobs: Arc<waiters::Waiters>,
}

impl WaitSlots {
    pub fn new(limit: usize, store: SharedStore) -> WaitSlots {
        WaitSlots {
            permits: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
            jobs: waiters::Waiters::new(store),
        }
    }
}

/// The trainer's default `max_seq_len` (tokens of prompt + response).
pub const DEFAULT_MAX_SEQ_LEN: usize = 8192;

/// Feedback requests one process holds open by default (`server.max_waiting_feedback`).
pub const DEFAULT_MAX_WAITING: usize = 10_000;

impl AppState {
    /// State with an in-process completion cache and no inference server.
    pub fn new(store: SharedStore, options: ApiOptions) -> AppState {
        let adapters = AdapterStore::local(&options.lora_root);
        let waiting = WaitSlots::new(DEFAULT_MAX_WAITING, store.clone());
        AppState {
            store,
            adapters,
            options: Arc::new(options),
            cache: Arc::new(MemoryCache::new(
                cache::Bounds::new(100, 10_000),
                Duration::from_secs(3600),
            )),
            backends: None,
            proxy: None,
            engine: None,
            base_models: None,
            http_metrics: Arc::new(metrics::HttpMetrics::new()),
            auth: Arc::new(auth::Auth::new(None, None, 0)),
            sessions: Arc::new(dashboard::session::Sessions::new(None)),
            logins: Arc::default(),
            waiting,
            max_seq_len: DEFAULT_MAX_SEQ_LEN,
            lora_inits: Arc::new(rate::WindowLimit::new(
                DEFAULT_LORA_INITS_PER_HOUR,
                Duration::from_secs(3600),
            )),
            timeouts: timeouts::Timeouts::default(),
        }
    }

    /// How long requests may take (see [`timeouts`]).
    pub fn with_timeouts(mut self, t: timeouts::Timeouts) -> AppState {
        self.timeouts = t;
        self
    }

    /// At most `n` LoRA creations or overwrites per API key per hour (0: no limit).
    pub fn with_max_lora_inits_per_hour(mut self, n: usize) -> AppState {
        self.lora_inits = Arc::new(rate::WindowLimit::new(n, Duration::from_secs(3600)));
        self
    }

    /// Samples longer than `n` tokens (prompt + response) are refused at intake.
    pub fn with_max_seq_len(mut self, n: usize) -> AppState {
        self.max_seq_len = n;
        self
    }

    /// At most `n` feedback requests held open at once while their jobs run.
    pub fn with_max_waiting(mut self, n: usize) -> AppState {
        self.waiting = WaitSlots::new(n, self.store.clone());
        self
    }

    /// Dashboard sessions signed with `secret` (every replica needs the same one).
    pub fn with_session_secret(mut self, secret: Option<&str>) -> AppState {
        self.sessions = Arc::new(dashboard::session::Sessions::new(secret));
        self
    }

    pub fn with_adapters(mut self, adapters: AdapterStore) -> AppState {
        self.adapters = adapters;
        self
    }

    pub fn with_auth(mut self, auth: auth::Auth) -> AppState {
        self.auth = Arc::new(auth);
        self
    }

    pub fn with_cache(mut self, cache: Arc<dyn CompletionCache>) -> AppState {
        self.cache = cache;
        self
    }

    /// One vLLM, always available.
    pub fn with_upstream(self, upstream: Option<Upstream>) -> AppState {
        self.with_backends(upstream.map(|u| Backends::new(vec![u], Duration::ZERO)))
    }

    pub fn with_engine(mut self, engine: Option<Arc<dyn inference::Inference>>) -> AppState {
        self.engine = engine;
        self
    }

    /// The inference backend requests go to: the vLLM fleet when one is configured, else
    /// the in-process engine; 503 when there is neither.
    pub fn inference(&self) -> error::ApiResult<Arc<dyn inference::Inference>> {
        (self.proxy.clone())
            .or_else(|| self.engine.clone())
            .ok_or_else(error::ApiError::no_inference_backend)
    }

    pub fn with_base_models(mut self, models: Option<Arc<dyn in_process::BaseModels>>) -> AppState {
        self.base_models = models;
        self
    }

    pub fn with_backends(mut self, backends: Option<Backends>) -> AppState {
        self.backends = backends.map(Arc::new);
        self.proxy = self.backends.clone().map(|b| {
            Arc::new(routes::inference_vllm::VllmProxy::new(
                b,
                self.store.clone(),
                self.options.default_base_model.clone(),
            )) as Arc<dyn inference::Inference>
        });
        self
    }

    /// State as configured: Redis when `cache.redis_url` is set, the vLLM at
    /// `vllm.base_url` when set; `adapters` is the process's one adapter store, built at
    /// start-up from `cfg.storage`.
    pub async fn from_config(
        cfg: &Config,
        store: SharedStore,
        adapters: AdapterStore,
    ) -> Result<AppState, claas_core::Error> {
        let size = cache::Bounds::new(
            cfg.cache.completion_cache_size,
            cfg.cache.completion_cache_total,
        );
        let ttl = Duration::from_secs(cfg.cache.completion_cache_ttl_s);
        let cache: Arc<dyn CompletionCache> = match &cfg.cache.redis_url {
            Some(url) => Arc::new(
                RedisCache::connect(url, "claas:completions", size, ttl)
                    .await
                    .map_err(|e: CacheError| claas_core::Error::Config(e.to_string()))?,
            ),
            None => Arc::new(MemoryCache::new(size, ttl)),
        };
        let list: Vec<Upstream> = cfg
            .vllm
            .proxy_backends()
            .iter()
            .map(|url| Upstream::new(url, cfg.vllm.api_key.clone(), Duration::from_secs(600)))
            .collect();
        let backends = (!list.is_empty())
            .then(|| Backends::new(list, Duration::from_secs_f64(cfg.vllm.unavailable_wait_s)));
        Ok(AppState::new(store, ApiOptions::from_config(cfg))
            .with_cache(cache)
            .with_backends(backends)
            .with_adapters(adapters)
            .with_session_secret(cfg.server.session_secret.as_deref())
            .with_auth(auth::Auth::from_config(&cfg.server))
            .with_max_waiting(cfg.server.max_waiting_feedback)
            .with_max_seq_len(cfg.trainer.max_seq_len)
            .with_max_lora_inits_per_hour(cfg.server.max_lora_inits_per_key_per_hour)
            .with_timeouts(timeouts::Timeouts {
                default: Duration::from_secs_f64(cfg.server.request_timeout_s),
                body: Duration::from_secs_f64(cfg.server.request_body_timeout_s),
                max_wait: Duration::from_secs(cfg.server.feedback_max_wait_s),
            }))
    }
}

/// Every route, each registered with its OpenAPI operation (see [`openapi`]).
pub fn api_routes() -> OpenApiRouter<AppState> {
    use routes::{
        feedback, health, inference, jobs, keys, lora, lora_delete, lora_versions, sampler,
    };
    OpenApiRouter::with_openapi(openapi::base())
        .routes(utoipa_axum::routes!(feedback::submit))
        .routes(utoipa_axum::routes!(jobs::list))
        .routes(utoipa_axum::routes!(jobs::get))
        .routes(utoipa_axum::routes!(jobs::cancel))
        .routes(utoipa_axum::routes!(lora::list, lora_delete::delete))
        .routes(utoipa_axum::routes!(lora::init))
        .routes(utoipa_axum::routes!(lora::export))
        .routes(utoipa_axum::routes!(lora::versions))
        .routes(utoipa_axum::routes!(lora_versions::rollback))
        .routes(utoipa_axum::routes!(lora_versions::pin))
        .routes(utoipa_axum::routes!(keys::list, keys::create))
        .routes(utoipa_axum::routes!(keys::revoke))
        .routes(utoipa_axum::routes!(health::health))
        .routes(utoipa_axum::routes!(metrics::metrics))
        .routes(utoipa_axum::routes!(openapi::openapi_json))
        .routes(utoipa_axum::routes!(inference::chat_completions))
        .routes(utoipa_axum::routes!(inference::completions))
        .routes(utoipa_axum::routes!(inference::models))
        .routes(utoipa_axum::routes!(inference::score))
        .routes(utoipa_axum::routes!(sampler::status))
        .routes(utoipa_axum::routes!(sampler::refresh))
        .merge(dashboard::routes())
}

/// The whole API as one service: the routes, their layers, and waiting feedback requests
/// taken out of them while they wait ([`deferred`]).
pub type App = deferred::Deferring;

/// The whole API.
pub fn router(state: AppState) -> App {
    let limit = state.options.max_body_bytes;
    let (routes, _) = api_routes().split_for_parts();
    let api = routes
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        // Outside authentication: a database that stops answering its key lookup counts.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            timeouts::deadline,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state.clone());
    // Routing happens inside `api`, after the raw slashes of LoRA ids are encoded.
    let encoded = Router::new()
        .fallback_service(api)
        .layer(axum::middleware::map_request(openapi::encode_lora_ids));
    // Outermost: a waiting feedback request waits outside every layer above.
    deferred::Deferring::new(encoded, state)
}

/// Who may make a request: the dashboard's (and the eval runs') pages admit admin keys and
/// login sessions, everything else API keys. Decided here so neither gate knows the other.
async fn admit(
    state: axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if dashboard::is_gated(req.uri().path()) {
        dashboard::gate(state, req, next).await
    } else {
        auth::authenticate(state, req, next).await
    }
}

/// One span per request, named `METHOD /path`, continuing the caller's trace when the
/// request carries a W3C `traceparent`.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{} {}", req.method(), req.uri().path()),
        method = %req.method(),
        path = %req.uri().path(),
    );
    let headers: Vec<(&str, &str)> = ["traceparent", "tracestate"]
        .iter()
        .filter_map(|h| Some((*h, req.headers().get(*h)?.to_str().ok()?)))
        .collect();
    claas_core::telemetry::set_parent_from_headers(&span, &headers);
    span
}

/// Serves the router on `listener` until `shutdown` resolves, then drains connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The client's address reaches handlers (failed logins are throttled per address).
    let app = axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
        std::net::SocketAddr,
    >(router(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
