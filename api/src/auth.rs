//! API keys. Until the first key is created (and with no bootstrap key) the API is open, as
//! the embedded default is; from then on every route but `/v1/health` needs
//! `Authorization: Bearer <secret>` and `/metrics` needs an admin key or the metrics token.
//! Revoking keys never opens it again (the last admin key cannot be revoked); only the
//! explicit setting `server.auth: open` does.
//! Keys live in the database as the SHA-256 of their secret, so every replica agrees; a
//! key limited to LoRA id prefixes acts only on those LoRAs and their jobs.
//!
//! Secrets are 256 random bits: looking one up by its hash through an index leaks nothing
//! an attacker can use, and the configured secrets (bootstrap key, metrics token) are
//! compared in constant time. Secrets never reach logs or errors.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use claas_core::types::ApiKey;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::open_guard::AllowedHosts;
use crate::AppState;

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No key is configured anywhere: the API is open.
    Open,
    Key(ApiKey),
    /// Keys are required and none was given (only `/v1/health` lets it through).
    Anonymous,
}

impl Caller {
    /// May this caller act on `lora_id`?
    pub fn covers(&self, lora_id: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key(k) => k.covers(lora_id),
            Caller::Anonymous => false,
        }
    }

    /// 403 unless this caller may act on `lora_id`.
    pub fn check(&self, lora_id: &str) -> ApiResult<()> {
        if self.covers(lora_id) {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "this API key may not act on LoRA '{lora_id}'"
        )))
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key(k) => k.admin,
            Caller::Anonymous => false,
        }
    }

    /// The id recorded as a job's `caller` ('' when open).
    pub fn id(&self) -> &str {
        match self {
            Caller::Open | Caller::Anonymous => "",
            Caller::Key(k) => &k.id,
        }
    }

    /// The prefixes a listing is limited to; `None` for everything.
    pub fn prefixes(&self) -> Option<Vec<String>> {
        match self {
            Caller::Key(k) if !k.admin => Some(k.prefixes.clone()),
            Caller::Anonymous => Some(Vec::new()),
            _ => None,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Open))
    }
}

/// Auth settings and the cached "was any key ever created" answer.
pub struct Auth {
    bootstrap_admin: Option<String>,
    metrics_token: Option<String>,
    /// Queued jobs one key may have before feedback answers 429 (0: no limit).
    pub max_queued_per_key: i64,
    /// `server.auth: open`: no key is ever asked for.
    open: bool,
    /// The `Host` names (and `Origin`s) an open API answers.
    pub allowed_hosts: AllowedHosts,
    /// When the database last said no key exists yet. Once one does, auth stays on for
    /// good and the database is not asked again.
    enabled: Mutex<Option<(Instant, bool)>>,
}

/// How long "keys exist" is trusted before the database is asked again.
const ENABLED_TTL: Duration = Duration::from_secs(2);

impl Auth {
    pub fn new(
        bootstrap_admin: Option<String>,
        metrics_token: Option<String>,
        max_queued_per_key: i64,
    ) -> Auth {
        Auth {
            bootstrap_admin: bootstrap_admin.filter(|k| !k.is_empty()),
            metrics_token: metrics_token.filter(|k| !k.is_empty()),
            max_queued_per_key,
            open: false,
            allowed_hosts: AllowedHosts::new([]),
            enabled: Mutex::new(None),
        }
    }

    /// `server.auth: open`: every request is let in, keys or not.
    pub fn open() -> Auth {
        Auth {
            open: true,
            ..Auth::new(None, None, 0)
        }
    }

    /// Settings from `server`: `auth`, `admin_key`, `metrics_token`, the queued-jobs cap.
    pub fn from_config(server: &claas_core::config::ServerConfig) -> Auth {
        let hosts = server.allowed_hosts.iter().map(String::as_str);
        Auth {
            open: server.auth == claas_core::config::AuthMode::Open,
            allowed_hosts: AllowedHosts::new(hosts.chain([server.host.as_str()])),
            ..Auth::new(
                server.admin_key.clone(),
                server.metrics_token.clone(),
                server.max_queued_jobs_per_key,
            )
        }
    }

    async fn enabled(&self, state: &AppState) -> ApiResult<bool> {
        if self.open {
            return Ok(false);
        }
        if self.bootstrap_admin.is_some() {
            return Ok(true);
        }
        if let Some((at, on)) = *self.enabled.lock().unwrap_or_else(|e| e.into_inner()) {
            if on || at.elapsed() < ENABLED_TTL {
                return Ok(on);
            }
        }
        let on = state.store.any_api_key_created().await?;
        *self.enabled.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), on));
        Ok(on)
    }
}

/// SHA-256 (hex) of a secret: what the database stores.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new key's id and secret (`claas_` + 64 hex digits).
pub fn new_secret() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let id: [u8; 6] = rand::random();
    (
        format!("key_{}", hex::encode(id)),
        format!("claas_{}", hex::encode(bytes)),
    )
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    // Compare digests so the time depends on neither length nor content.
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

pub(crate) fn bearer(req: &Request) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty())
}

pub(crate) fn unauthorized(message: &str) -> Response {
    ApiError::unauthorized(message).into_response()
}

/// The key a secret names, if any.
pub(crate) async fn resolve(state: &AppState, secret: &str) -> ApiResult<Option<ApiKey>> {
    resolve_hash(state, &secret_hash(secret)).await
}

/// The live key whose secret hashes to `hash` (a dashboard session carries the hash).
pub(crate) async fn resolve_hash(state: &AppState, hash: &str) -> ApiResult<Option<ApiKey>> {
    if let Some(boot) = &state.auth.bootstrap_admin {
        if constant_time_eq(hash, &secret_hash(boot)) {
            return Ok(Some(ApiKey {
                id: "bootstrap".into(),
                name: "bootstrap admin (CLAAS_ADMIN_KEY)".into(),
                prefixes: Vec::new(),
                admin: true,
                created_at: chrono::Utc::now(),
                revoked_at: None,
            }));
        }
    }
    Ok(state.store.find_api_key(hash).await?)
}

/// The live key a dashboard session cookie was issued for, if the cookie still holds.
pub(crate) async fn resolve_session(state: &AppState, cookie: &str) -> ApiResult<Option<ApiKey>> {
    let Some(id) = state.sessions.key_id(cookie) else {
        return Ok(None);
    };
    if let (Some(boot), "bootstrap") = (&state.auth.bootstrap_admin, id) {
        let hash = secret_hash(boot);
        return resolve_hash(state, &hash)
            .await
            .map(|k| k.filter(|_| state.sessions.holds(cookie, &hash)));
    }
    Ok(match state.store.find_api_key_by_id(id).await? {
        Some((key, hash)) if state.sessions.holds(cookie, &hash) => Some(key),
        _ => None,
    })
}

/// What [`keys_on`] decided about a request before any key is looked at.
pub enum Admission {
    /// The API is open (or the database is down and this is health): the caller is set.
    Admitted(Request),
    /// Keys are required: the request goes on to its key check.
    NeedsKey(Request),
    /// Refused as it stands (an open API reached under a foreign name, a database error).
    Refused(Response),
}

/// Whether keys are on for this request: the check every gate starts with, the API's
/// ([`authenticate`]) and the dashboard's.
pub async fn keys_on(state: &AppState, mut req: Request) -> Admission {
    let enabled = match state.auth.enabled(state).await {
        Ok(on) => on,
        // The database is down: health must still say so (and nothing more).
        Err(_) if req.uri().path() == "/v1/health" => {
            req.extensions_mut().insert(Caller::Anonymous);
            return Admission::Admitted(req);
        }
        Err(e) => return Admission::Refused(e.into_response()),
    };
    if enabled {
        return Admission::NeedsKey(req);
    }
    // Health stays reachable under any name: probes ask by a pod's or node's address.
    let refusal = (req.uri().path() != "/v1/health")
        .then(|| {
            state
                .auth
                .allowed_hosts
                .refusal(req.method(), req.headers())
        })
        .flatten();
    if let Some(refusal) = refusal {
        return Admission::Refused(refusal.into_response());
    }
    req.extensions_mut().insert(Caller::Open);
    Admission::Admitted(req)
}

/// Middleware: authenticates an API request and leaves the [`Caller`] for the handlers.
/// (The dashboard's pages have their own gate; the router picks, see `lib.rs`.)
pub async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // The API's description is public: clients generate code from it before they hold a key.
    if req.uri().path() == "/openapi.json" {
        return next.run(req).await;
    }
    let mut req = match keys_on(&state, req).await {
        Admission::Admitted(req) => return next.run(req).await,
        Admission::Refused(resp) => return resp,
        Admission::NeedsKey(req) => req,
    };
    let path = req.uri().path().to_owned();
    let secret = bearer(&req);
    if path == "/metrics" {
        let token_ok = match (&secret, &state.auth.metrics_token) {
            (Some(s), Some(t)) => constant_time_eq(s, t),
            _ => false,
        };
        let admin_ok = match &secret {
            Some(s) if !token_ok => matches!(resolve(&state, s).await, Ok(Some(k)) if k.admin),
            _ => false,
        };
        if !(token_ok || admin_ok) {
            return unauthorized("/metrics needs an admin key or the metrics token");
        }
        return next.run(req).await;
    }
    let key = match &secret {
        Some(s) => match resolve(&state, s).await {
            Ok(k) => k,
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    match key {
        Some(k) => {
            req.extensions_mut().insert(Caller::Key(k));
            next.run(req).await
        }
        // Health stays open, saying only up or down (the handler sees no caller).
        None if path == "/v1/health" => {
            req.extensions_mut().insert(Caller::Anonymous);
            next.run(req).await
        }
        None if secret.is_some() => unauthorized("the API key is not valid (unknown or revoked)"),
        None => unauthorized("this API needs an API key: Authorization: Bearer <key>"),
    }
}
