//! API keys and tenancy, through the real router, on both stores: a table of requests by
//! two tenants (`alice`, `bob`), an admin, a revoked key and no key, with the status each
//! must get, including ids that differ from a tenant's only by case or prefix boundary.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use claas_api::auth::Auth;
use claas_api::{router, AppState};
use claas_core::testing::{lora, TestDb, TEST_BASE_MODEL};
use claas_testutil::{tempdir, TempDir};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Keys {
    alice: String,
    bob: String,
    admin: String,
    revoked: String,
    metrics: String,
    /// The API's directories, removed when the test ends.
    _dir: TempDir,
}

async fn setup(db: &TestDb, max_queued: i64) -> (claas_api::App, Keys) {
    for id in ["alice", "alice/x", "alice2/x", "Alice/z", "bob/y"] {
        db.store.create_lora(&lora(id)).await.expect("lora");
    }
    let (_, alice) = common::create_key(db, "alice", &["alice"], false).await;
    let (_, bob) = common::create_key(db, "bob", &["bob"], false).await;
    let (_, admin) = common::create_key(db, "ops", &[], true).await;
    let (revoked_id, revoked) = common::create_key(db, "old", &["alice"], false).await;
    assert!(db.store.revoke_api_key(&revoked_id).await.expect("revoke"));
    let dir = tempdir("auth");
    let state = AppState::new(db.store.clone(), common::options(&dir)).with_auth(Auth::new(
        None,
        Some("scrape-me".into()),
        max_queued,
    ));
    (
        router(state),
        Keys {
            alice,
            bob,
            admin,
            revoked,
            metrics: "scrape-me".into(),
            _dir: dir,
        },
    )
}

async fn call(
    app: &claas_api::App,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = app.clone().oneshot(req).await.expect("answer");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

fn feedback(lora_id: &str) -> Value {
    common::inline_feedback(lora_id)
}

/// method, path, key, body, expected status.
type Case<'a> = (&'a str, String, Option<&'a str>, Option<Value>, StatusCode);

claas_core::both_stores!(
    every_route_answers_401_403_or_200_per_key,
    listings_show_only_the_callers_loras_and_jobs,
    queued_jobs_per_key_are_capped_with_429,
    with_no_key_anywhere_the_api_is_open,
    keys_are_managed_over_http_by_admins,
    revoking_every_key_leaves_the_api_closed,
    the_last_admin_key_cannot_be_revoked,
    an_explicit_open_setting_opens_the_api,
    eval_runs_are_for_admins_only,
    a_tenants_job_pages_are_full_and_the_cursor_continues,
);

async fn every_route_answers_401_403_or_200_per_key(db: &TestDb) {
    let (app, k) = setup(db, 0).await;
    // A job of bob's, for alice to try.
    let (s, bob_job) = call(
        &app,
        "POST",
        "/v1/feedback",
        Some(&k.bob),
        Some(feedback("bob/y")),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{bob_job}");
    let bob_job = bob_job["job_id"].as_str().expect("id").to_owned();
    let (s, alice_job) = call(
        &app,
        "POST",
        "/v1/feedback",
        Some(&k.alice),
        Some(feedback("alice/x")),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{alice_job}");
    let alice_job = alice_job["job_id"].as_str().expect("id").to_owned();

    let (a, b, adm, old) = (
        Some(k.alice.as_str()),
        Some(k.bob.as_str()),
        Some(k.admin.as_str()),
        Some(k.revoked.as_str()),
    );
    let u = StatusCode::UNAUTHORIZED;
    let f = StatusCode::FORBIDDEN;
    let ok = StatusCode::OK;
    let acc = StatusCode::ACCEPTED;
    let cases: Vec<Case> = vec![
        // No key, a revoked key, a made-up key.
        ("GET", "/v1/jobs".into(), None, None, u),
        (
            "POST",
            "/v1/feedback".into(),
            None,
            Some(feedback("alice/x")),
            u,
        ),
        ("GET", "/v1/lora".into(), old, None, u),
        ("GET", "/v1/lora".into(), Some("claas_0000"), None, u),
        ("GET", "/v1/models".into(), None, None, u),
        ("GET", "/metrics".into(), None, None, u),
        // Feedback: own prefix yes; case, boundary and other tenants no.
        (
            "POST",
            "/v1/feedback".into(),
            a,
            Some(feedback("alice")),
            acc,
        ),
        (
            "POST",
            "/v1/feedback".into(),
            a,
            Some(feedback("alice2/x")),
            f,
        ),
        (
            "POST",
            "/v1/feedback".into(),
            a,
            Some(feedback("Alice/z")),
            f,
        ),
        ("POST", "/v1/feedback".into(), a, Some(feedback("bob/y")), f),
        (
            "POST",
            "/v1/feedback".into(),
            a,
            Some(feedback("alice2/x-latest")),
            f,
        ),
        // Jobs of another tenant.
        ("GET", format!("/v1/jobs/{bob_job}"), a, None, f),
        ("POST", format!("/v1/jobs/{bob_job}/cancel"), a, None, f),
        ("GET", format!("/v1/jobs/{alice_job}"), a, None, ok),
        ("GET", "/v1/jobs?lora_id=bob/y".into(), a, None, f),
        ("GET", format!("/v1/jobs/{bob_job}"), adm, None, ok),
        // LoRA routes.
        ("GET", "/v1/lora/alice/x/versions".into(), a, None, ok),
        ("GET", "/v1/lora/alice2/x/versions".into(), a, None, f),
        ("GET", "/v1/lora/bob/y/versions".into(), a, None, f),
        ("GET", "/v1/lora/bob/y/versions".into(), b, None, ok),
        ("GET", "/v1/lora/export?lora_id=bob/y".into(), a, None, f),
        (
            "POST",
            "/v1/lora/init".into(),
            a,
            Some(json!({"lora_id": "bob/new"})),
            f,
        ),
        (
            "POST",
            "/v1/lora/init".into(),
            a,
            Some(json!({"lora_id": "alice/new"})),
            ok,
        ),
        (
            "POST",
            "/v1/lora/bob/y/pin".into(),
            a,
            Some(json!({"version": 0})),
            f,
        ),
        (
            "POST",
            "/v1/lora/bob/y/rollback".into(),
            a,
            Some(json!({"version": 0})),
            f,
        ),
        ("DELETE", "/v1/lora?lora_id=bob/y".into(), a, None, f),
        // Inference with another tenant's LoRA as the model (checked before any backend).
        (
            "POST",
            "/v1/chat/completions".into(),
            a,
            Some(json!({"model": "bob/y", "messages": [{"role": "user", "content": "hi"}]})),
            f,
        ),
        // Metrics: admin or the metrics token, not a tenant.
        ("GET", "/metrics".into(), a, None, u),
        ("GET", "/metrics".into(), adm, None, ok),
        ("GET", "/metrics".into(), Some(k.metrics.as_str()), None, ok),
        // Key management: admins only; the document is public.
        ("GET", "/v1/keys".into(), a, None, f),
        ("GET", "/v1/keys".into(), None, None, u),
        (
            "POST",
            "/v1/keys".into(),
            a,
            Some(json!({"name": "mine", "admin": true})),
            f,
        ),
        ("DELETE", "/v1/keys/bootstrap".into(), a, None, f),
        ("GET", "/v1/keys".into(), adm, None, ok),
        (
            "POST",
            "/v1/keys".into(),
            adm,
            Some(json!({"name": "carol", "prefixes": ["carol"]})),
            StatusCode::CREATED,
        ),
        (
            "POST",
            "/v1/keys".into(),
            adm,
            Some(json!({"name": "nobody"})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/openapi.json".into(), None, None, ok),
        // A tenant may cancel its own job and delete its own LoRA.
        ("POST", format!("/v1/jobs/{alice_job}/cancel"), a, None, ok),
        ("DELETE", "/v1/lora?lora_id=alice/new".into(), a, None, ok),
    ];
    for (method, uri, key, body, want) in cases {
        let (got, body) = call(&app, method, &uri, key, body).await;
        assert_eq!(got, want, "{method} {uri}: {body}");
        if got == u {
            assert!(body["error"]["message"].is_string(), "{body}");
            let text = body.to_string();
            for secret in [&k.alice, &k.bob, &k.admin, &k.revoked] {
                assert!(
                    !text.contains(secret.as_str()),
                    "a secret leaked into an error"
                );
            }
        }
    }
    // Health stays open and, without a key, says only up or down.
    let (s, h) = call(&app, "GET", "/v1/health", None, None).await;
    assert_eq!(s, ok);
    assert_eq!(h, json!({"status": "ok"}));
    let (_, h) = call(&app, "GET", "/v1/health", adm, None).await;
    assert!(h.get("workers").is_some(), "an admin sees the fleet: {h}");
}

async fn listings_show_only_the_callers_loras_and_jobs(db: &TestDb) {
    let (app, k) = setup(db, 0).await;
    for (key, id) in [
        (&k.alice, "alice/x"),
        (&k.bob, "bob/y"),
        (&k.admin, "alice2/x"),
    ] {
        let (s, b) = call(&app, "POST", "/v1/feedback", Some(key), Some(feedback(id))).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    }
    let (_, loras) = call(&app, "GET", "/v1/lora", Some(&k.alice), None).await;
    assert_eq!(loras["loras"], json!(["alice", "alice/x"]));
    let (_, jobs) = call(&app, "GET", "/v1/jobs", Some(&k.alice), None).await;
    let ids: Vec<&str> = jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["lora_id"].as_str())
        .collect();
    assert_eq!(ids, ["alice/x"], "not alice2/x, not bob/y");
    let (_, all) = call(&app, "GET", "/v1/jobs", Some(&k.admin), None).await;
    assert_eq!(all["jobs"].as_array().map(Vec::len), Some(3));
    let (_, models) = call(&app, "GET", "/v1/models", Some(&k.bob), None).await;
    let names: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(names, [TEST_BASE_MODEL, "bob-y"]);
}

async fn queued_jobs_per_key_are_capped_with_429(db: &TestDb) {
    let (app, k) = setup(db, 2).await;
    for _ in 0..2 {
        let (s, b) = call(
            &app,
            "POST",
            "/v1/feedback",
            Some(&k.alice),
            Some(feedback("alice/x")),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    }
    let req = Request::post("/v1/feedback")
        .header("authorization", format!("Bearer {}", k.alice))
        .header("content-type", "application/json")
        .body(Body::from(feedback("alice/x").to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("30")
    );
    // Another tenant is not held back by alice's queue, and nothing accepted was dropped.
    let (s, _) = call(
        &app,
        "POST",
        "/v1/feedback",
        Some(&k.bob),
        Some(feedback("bob/y")),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (_, jobs) = call(
        &app,
        "GET",
        "/v1/jobs?lora_id=alice/x",
        Some(&k.alice),
        None,
    )
    .await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(2));
}

async fn with_no_key_anywhere_the_api_is_open(db: &TestDb) {
    let dir = tempdir("auth");
    db.store.create_lora(&lora("anyone/a")).await.expect("lora");
    let app = router(AppState::new(db.store.clone(), common::options(&dir)));
    let (s, b) = call(
        &app,
        "POST",
        "/v1/feedback",
        None,
        Some(feedback("anyone/a")),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let (s, _) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    // The first key turns auth on for every replica (within the 2 s cache).
    common::create_key(db, "first", &["anyone"], false).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (s, _) = call(&app, "GET", "/v1/jobs", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

async fn keys_are_managed_over_http_by_admins(db: &TestDb) {
    let (app, k) = setup(db, 0).await;
    let adm = Some(k.admin.as_str());
    let (status, created) = call(
        &app,
        "POST",
        "/v1/keys",
        adm,
        Some(json!({"name": "carol", "prefixes": ["carol"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"]
        .as_str()
        .expect("the secret, once")
        .to_owned();
    let id = created["key"]["id"].as_str().expect("id").to_owned();
    // The new key works at once, within its prefixes.
    let (status, _) = call(
        &app,
        "GET",
        "/v1/lora/carol/a/versions",
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "carol's own (missing) LoRA");
    let (status, _) = call(
        &app,
        "GET",
        "/v1/lora/alice/x/versions",
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Listed without its secret.
    let (_, list) = call(&app, "GET", "/v1/keys", adm, None).await;
    assert!(list["keys"]
        .as_array()
        .is_some_and(|ks| ks.iter().any(|x| x["id"] == id.as_str())));
    assert!(!list.to_string().contains(&secret), "a secret is listed");
    // Revoked: it stops working; a second revoke is a 404.
    let (status, _) = call(&app, "DELETE", &format!("/v1/keys/{id}"), adm, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&app, "GET", "/v1/lora", Some(&secret), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&app, "DELETE", &format!("/v1/keys/{id}"), adm, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn revoking_every_key_leaves_the_api_closed(db: &TestDb) {
    let dir = tempdir("auth");
    db.store.create_lora(&lora("anyone/a")).await.expect("lora");
    let app = router(AppState::new(db.store.clone(), common::options(&dir)));
    let (id, _) = common::create_key(db, "only", &["anyone"], false).await;
    let (status, _) = call(&app, "GET", "/v1/jobs", None, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the first key closes the API"
    );
    assert!(db.store.revoke_api_key(&id).await.expect("revoke"));
    // Past the 2 s the "keys exist" answer was trusted for: still closed.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, _) = call(&app, "GET", "/v1/jobs", None, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "no live key must not reopen it"
    );
    let (status, body) = call(
        &app,
        "POST",
        "/v1/keys",
        None,
        Some(json!({"name": "mallory", "admin": true})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "anonymous admin key: {body}"
    );
    // A fresh replica (no cached answer) agrees.
    let fresh = router(AppState::new(db.store.clone(), common::options(&dir)));
    let (status, _) = call(
        &fresh,
        "POST",
        "/v1/feedback",
        None,
        Some(feedback("anyone/a")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn the_last_admin_key_cannot_be_revoked(db: &TestDb) {
    let (app, k) = setup(db, 0).await;
    let adm = Some(k.admin.as_str());
    let (_, list) = call(&app, "GET", "/v1/keys", adm, None).await;
    let admin_id = list["keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|x| x["admin"] == true))
        .and_then(|x| x["id"].as_str())
        .expect("the admin key is listed")
        .to_owned();
    let (status, body) = call(&app, "DELETE", &format!("/v1/keys/{admin_id}"), adm, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("last admin")),
        "{body}"
    );
    let (status, _) = call(&app, "GET", "/v1/keys", adm, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the refused revoke left the key working"
    );
    // With a second admin, the first may go; then the second is the last.
    let (status, created) = call(
        &app,
        "POST",
        "/v1/keys",
        adm,
        Some(json!({"name": "ops2", "admin": true})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let second = created["secret"].as_str().expect("secret").to_owned();
    let second_id = created["key"]["id"].as_str().expect("id").to_owned();
    let (status, _) = call(&app, "DELETE", &format!("/v1/keys/{admin_id}"), adm, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/v1/keys/{second_id}"),
        Some(&second),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // The store refuses it too (the CLI's path).
    assert!(matches!(
        db.store.revoke_api_key(&second_id).await,
        Err(claas_core::Error::Conflict(_))
    ));
}

async fn an_explicit_open_setting_opens_the_api(db: &TestDb) {
    let dir = tempdir("auth");
    db.store.create_lora(&lora("anyone/a")).await.expect("lora");
    common::create_key(db, "ops", &[], true).await;
    let open = AppState::new(db.store.clone(), common::options(&dir)).with_auth(Auth::open());
    let (status, body) = call(
        &router(open),
        "POST",
        "/v1/feedback",
        None,
        Some(feedback("anyone/a")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "server.auth: open, {body}");
    let auto =
        AppState::new(db.store.clone(), common::options(&dir)).with_auth(Auth::new(None, None, 0));
    let (status, _) = call(&router(auto), "GET", "/v1/jobs", None, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "server.auth: auto with a key"
    );
}

async fn eval_runs_are_for_admins_only(db: &TestDb) {
    let (app, k) = setup(db, 0).await;
    for path in ["/v1/eval", "/v1/eval/run/plots/learning_curves.png"] {
        let (status, _) = call(&app, "GET", path, Some(&k.alice), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "a tenant key on {path}");
        let (status, _) = call(&app, "GET", path, None, None).await;
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::SEE_OTHER,
            "no key on {path}: {status}"
        );
    }
    let (status, _) = call(&app, "GET", "/v1/eval", Some(&k.admin), None).await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_tenants_job_pages_are_full_and_the_cursor_continues(db: &TestDb) {
    let (app, k) = setup(db, 0).await;
    let adm = Some(k.admin.as_str());
    // Alice's three jobs, then newer ones of `alice2/x` that her prefix does not cover.
    for lora_id in [
        "alice/x", "alice", "alice/x", "alice2/x", "alice2/x", "alice2/x",
    ] {
        let (status, body) = call(&app, "POST", "/v1/feedback", adm, Some(feedback(lora_id))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, page) = call(&app, "GET", "/v1/jobs?limit=2", Some(&k.alice), None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids = |p: &Value| -> Vec<String> {
        p["jobs"].as_array().map_or(vec![], |js| {
            js.iter()
                .map(|j| j["lora_id"].as_str().unwrap_or("").to_owned())
                .collect()
        })
    };
    assert_eq!(
        ids(&page),
        ["alice/x", "alice"],
        "a full first page: {page}"
    );
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a cursor after a full page")
        .to_owned();
    let uri = format!("/v1/jobs?limit=2&cursor={cursor}");
    let (_, page) = call(&app, "GET", &uri, Some(&k.alice), None).await;
    assert_eq!(ids(&page), ["alice/x"], "{page}");
    assert!(page["next_cursor"].is_null(), "{page}");
}
