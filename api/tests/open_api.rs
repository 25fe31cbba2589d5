//! An open API (no key, as `claas dev` runs) is not a target for the web pages its user
//! visits (both stores): JSON bodies must say so (415), only its own host names are answered
//! (DNS rebinding), and changes from another site's page are refused.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use claas_api::auth::Auth;
use claas_api::{router, AppState};
use claas_core::testing::{lora, TestDb};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

claas_core::both_stores!(an_open_api_is_not_a_target_for_other_sites_pages,);

fn feedback(lora_id: &str) -> Value {
    common::inline_feedback(lora_id)
}

/// One request with raw headers; returns the status and the error code, if any.
async fn raw(
    app: &claas_api::App,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = if method == "POST" {
        Body::from(feedback("anyone/a").to_string())
    } else {
        Body::empty()
    };
    let resp = app
        .clone()
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("answer");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

async fn an_open_api_is_not_a_target_for_other_sites_pages(db: &TestDb) {
    let dir = claas_testutil::tempdir("open-api");
    db.store.create_lora(&lora("anyone/a")).await.expect("lora");
    let app = router(AppState::new(db.store.clone(), common::options(&dir)));
    let json = ("content-type", "application/json");
    let local = ("host", "127.0.0.1:8080");
    // A form or a no-cors fetch can only send text/plain, a form encoding or multipart.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (s, code) = raw(&app, "POST", "/v1/feedback", &[local, ("content-type", ct)]).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            "{ct}"
        );
    }
    let (s, code) = raw(&app, "POST", "/v1/feedback", &[local]).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (s, _) = raw(
        &app,
        "POST",
        "/v1/feedback",
        &[local, ("content-type", "application/json; charset=utf-8")],
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // DNS rebinding: the page's own name arrives as Host.
    let (s, code) = raw(
        &app,
        "GET",
        "/v1/dashboard",
        &[("host", "rebind.evil.example:8080")],
    )
    .await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::FORBIDDEN, "host_not_allowed")
    );
    let (s, _) = raw(&app, "GET", "/v1/lora", &[("host", "localhost:8080")]).await;
    assert_eq!(s, StatusCode::OK);
    // Probes ask for health by a pod's address.
    let (s, _) = raw(&app, "GET", "/v1/health", &[("host", "10.1.2.3:8080")]).await;
    assert_eq!(s, StatusCode::OK);
    // A write from another site's page is refused; the API's own pages may write.
    let evil = ("origin", "https://evil.example");
    let (s, code) = raw(&app, "POST", "/v1/feedback", &[local, json, evil]).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::FORBIDDEN, "origin_not_allowed")
    );
    let (s, _) = raw(
        &app,
        "POST",
        "/v1/feedback",
        &[local, json, ("origin", "http://127.0.0.1:8080")],
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _) = raw(&app, "GET", "/v1/lora", &[local, evil]).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "reads without the answer being readable cross-site are harmless"
    );
    // Names added by configuration are answered.
    let mut server = claas_core::config::Config::default().server;
    server.allowed_hosts = vec!["claas.internal".into()];
    let named = router(
        AppState::new(db.store.clone(), common::options(&dir))
            .with_auth(Auth::from_config(&server)),
    );
    let (s, _) = raw(
        &named,
        "GET",
        "/v1/lora",
        &[("host", "claas.internal:8080")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // With keys on, a bearer key is what counts, whatever the Host.
    let (_, secret) = common::create_key(db, "ops", &[], true).await;
    let keyed = router(AppState::new(db.store.clone(), common::options(&dir)));
    let bearer = format!("Bearer {secret}");
    let (s, _) = raw(
        &keyed,
        "GET",
        "/v1/lora",
        &[("host", "api.example.com"), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}
