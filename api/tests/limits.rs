//! Per-key limits a tenant meets (both stores): LoRAs created or overwritten per hour.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use claas_api::auth::Auth;
use claas_api::{router, AppState};
use claas_core::testing::{TestDb, TEST_BASE_MODEL};
use serde_json::{json, Value};
use tower::ServiceExt;

claas_core::both_stores!(a_key_creates_at_most_its_hourly_share_of_loras,);

async fn init(app: &axum::Router, key: &str, body: Value) -> (StatusCode, Option<String>) {
    let req = Request::post("/v1/lora/init")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("answer");
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (resp.status(), retry)
}

async fn a_key_creates_at_most_its_hourly_share_of_loras(db: &TestDb) {
    let (_, alice) = common::create_key(db, "alice", &["alice"], false).await;
    let (_, bob) = common::create_key(db, "bob", &["bob"], false).await;
    let state = AppState::new(db.store.clone(), common::options("limits"))
        .with_auth(Auth::new(None, None, 0))
        .with_max_lora_inits_per_hour(2);
    let app = router(state);
    let lora = |id: &str| json!({"lora_id": id, "base_model": TEST_BASE_MODEL});
    assert_eq!(init(&app, &alice, lora("alice/a")).await.0, StatusCode::OK);
    // The same parameters again change nothing and cost nothing.
    assert_eq!(init(&app, &alice, lora("alice/a")).await.0, StatusCode::OK);
    let mut again = lora("alice/a");
    again["overwrite"] = json!(true);
    assert_eq!(
        init(&app, &alice, again.clone()).await.0,
        StatusCode::OK,
        "an overwrite counts"
    );
    let (status, retry) = init(&app, &alice, lora("alice/b")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((3500..=3600).contains(&wait), "{wait}");
    assert_eq!(
        init(&app, &alice, again).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert!(
        db.store.get_lora("alice/b").await.expect("get").is_none(),
        "nothing was created"
    );
    assert_eq!(
        init(&app, &bob, lora("bob/a")).await.0,
        StatusCode::OK,
        "bob has his own share"
    );
}
