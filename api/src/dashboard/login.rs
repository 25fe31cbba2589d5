//! Signing in and out of the dashboard, and the gate in front of its pages.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use minijinja::context;
use serde::Deserialize;

use super::session::{cookie, set_cookie, SESSION_COOKIE, SESSION_TTL_S};
use super::{check_csrf, render, CsrfForm, PageError, PageErrors, PageResult, LOGIN, PREFIX};
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::AppState;

/// Middleware in front of the dashboard's pages (mounted by the router, see `lib.rs`): open
/// when the API is; with keys on, admins only, by bearer key or session cookie, and a
/// browser without either is sent to the login form.
pub async fn gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut req = match auth::keys_on(&state, req).await {
        auth::Admission::Admitted(req) => return next.run(req).await,
        auth::Admission::Refused(resp) => return resp,
        auth::Admission::NeedsKey(req) => req,
    };
    let state = &state;
    let bearer = auth::bearer(&req);
    if req.uri().path() == LOGIN {
        req.extensions_mut().insert(Caller::Anonymous);
        return next.run(req).await;
    }
    let key = match (&bearer, cookie(req.headers(), SESSION_COOKIE)) {
        (Some(secret), _) => auth::resolve(state, secret).await,
        (None, Some(c)) => auth::resolve_session(state, c).await,
        (None, None) => Ok(None),
    };
    match key {
        Ok(Some(k)) if k.admin => {
            req.extensions_mut().insert(Caller::Key(k));
            next.run(req).await
        }
        Ok(Some(_)) => {
            PageError(ApiError::forbidden("the dashboard needs an admin key")).into_response()
        }
        Ok(None) if bearer.is_none() && req.method() == Method::GET => {
            crate::error::see_other(LOGIN)
        }
        Ok(None) => auth::unauthorized("the dashboard needs an admin key: log in first"),
        Err(e) => PageError(e).into_response(),
    }
}

/// A 303 to `to` that sets `cookie`.
fn redirect_setting(to: &str, cookie: HeaderValue) -> Response {
    let mut resp = crate::error::see_other(to);
    resp.headers_mut().append(header::SET_COOKIE, cookie);
    resp
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct LoginForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    csrf: String,
}

/// The login form.
#[utoipa::path(get, path = "/v1/dashboard/login", tags = ["dashboard"], security(()),
    responses((status = 200, description = "The login page", content_type = "text/html", body = String), PageErrors))]
pub(super) async fn login_form(State(state): State<AppState>, headers: HeaderMap) -> PageResult {
    render(
        &state,
        &headers,
        &Caller::Anonymous,
        "login.html",
        context! { error => "" },
    )
}

/// Logs in with an admin key: a signed session cookie, then to the overview.
#[utoipa::path(post, path = "/v1/dashboard/login", tags = ["dashboard"], security(()),
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Logged in: to the overview, with the session cookie",
            headers(("Location" = String), ("Set-Cookie" = String))),
        (status = 415, description = "Not a form", content_type = "text/plain", body = String),
        (status = 422, description = "The form cannot be read", content_type = "text/plain", body = String),
        (status = 429, description = "Too many failed logins from this address; retry later",
            headers(("Retry-After" = u64, description = "Seconds"))),
        PageErrors,
    ))]
pub(super) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    Form(form): Form<LoginForm>,
) -> PageResult {
    check_csrf(&state, &headers, &form.csrf)?;
    let ip = client.map(|Extension(ConnectInfo(addr))| addr.ip());
    if let Some(wait) = ip.and_then(|ip| state.logins.blocked_for(ip)) {
        return Err(ApiError::too_many_login_failures(wait).into());
    }
    let hash = auth::secret_hash(form.key.trim());
    let key = auth::resolve_hash(&state, &hash).await?;
    if let Some(ip) = ip {
        match &key {
            Some(_) => state.logins.succeeded(ip),
            None => state.logins.failed(ip),
        }
    }
    let (status, error) = match key {
        Some(k) if k.admin => {
            tracing::info!(key = %k.id, "dashboard login");
            let session = set_cookie(
                &headers,
                SESSION_COOKIE,
                &state.sessions.issue(&k.id, &hash),
                SESSION_TTL_S,
            );
            return Ok(redirect_setting(PREFIX, session));
        }
        Some(_) => crate::error::login_refused(true),
        None => crate::error::login_refused(false),
    };
    let mut resp = render(
        &state,
        &headers,
        &Caller::Anonymous,
        "login.html",
        context! { error => error },
    )?;
    *resp.status_mut() = status;
    Ok(resp)
}

/// Ends the session.
#[utoipa::path(post, path = "/v1/dashboard/logout", tags = ["dashboard", "admin"],
    request_body(content = CsrfForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "To the login form", headers(("Location" = String))),
        (status = 415, description = "Not a form", content_type = "text/plain", body = String),
        (status = 422, description = "The form cannot be read", content_type = "text/plain", body = String),
        PageErrors,
    ))]
pub(super) async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> PageResult {
    check_csrf(&state, &headers, &form.csrf)?;
    Ok(redirect_setting(
        LOGIN,
        set_cookie(&headers, SESSION_COOKIE, "", 0),
    ))
}
