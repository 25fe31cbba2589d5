//! The OpenAPI contract: the document is snapshot-tested (every change to it is a reviewed
//! diff: `cargo insta review`, or `INSTA_UPDATE=always cargo test -p claas-api --test
//! openapi`), and the router serves exactly the operations it lists.

use std::path::Path;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use claas_api::{router, ApiOptions, AppState};
use claas_core::testing::{TestDb, TEST_BASE_MODEL};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

fn document() -> Value {
    serde_json::to_value(claas_api::openapi::document()).expect("the document serializes")
}

#[test]
fn the_document_is_the_reviewed_one() {
    insta::assert_json_snapshot!("openapi", document());
}

/// Every documented operation, as (METHOD, templated path).
fn operations(doc: &Value) -> Vec<(Method, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if let Ok(m) = method.to_uppercase().parse::<Method>() {
                if m != Method::OPTIONS && m != Method::HEAD {
                    ops.push((m, path.clone()));
                }
            }
        }
    }
    ops
}

/// A concrete URI for a templated path; LoRA ids carry a raw `/`, as clients send them.
fn concrete(path: &str) -> String {
    path.replace("{id}", &uuid::Uuid::now_v7().to_string())
        .replace("{lora_id}", "alice/x")
        .replace("{action}", "cancel")
        .replace("{run}", "run1")
        .replace("{file}", "learning_curves.png")
}

async fn answer(app: &claas_api::App, method: Method, uri: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("router answers");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The API, open (no keys), on `db`, its directories under `dir`.
fn app(db: &TestDb, dir: &Path) -> claas_api::App {
    let opts = ApiOptions {
        max_body_bytes: 64 * 1024,
        feedback_default_wait_s: 0,
        feedback_max_wait_s: 1,
        max_attempts: 3,
        default_base_model: TEST_BASE_MODEL.into(),
        allowed_init_base_models: vec![TEST_BASE_MODEL.into()],
        lora_root: dir.join("loras").display().to_string(),
        data_dir: dir.join("data"),
        max_lora_rank: None,
    };
    router(AppState::new(db.store.clone(), opts))
}

fn routed(status: StatusCode, body: &Value) -> bool {
    let code = body["error"]["code"].as_str().unwrap_or_default();
    !(status == StatusCode::NOT_FOUND && code == "route_not_found"
        || status == StatusCode::METHOD_NOT_ALLOWED && code == "method_not_allowed")
}

#[tokio::test]
async fn the_router_serves_exactly_the_documented_operations() {
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("openapi");
    let app = app(&db, &dir);
    let doc = document();
    let ops = operations(&doc);
    assert!(
        ops.len() >= 30,
        "the document lists {} operations",
        ops.len()
    );

    // Documented → served: each operation reaches a handler (not the 404/405 fallbacks).
    for (method, path) in &ops {
        let (status, body) = answer(&app, method.clone(), &concrete(path)).await;
        assert!(
            routed(status, &body),
            "{method} {path} is documented but not served: {status} {body}"
        );
    }
    // Served → documented: on every documented path, the other methods are not served...
    let all = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ];
    for path in doc["paths"].as_object().expect("paths").keys() {
        for method in &all {
            if ops.iter().any(|(m, p)| m == method && p == path) {
                continue;
            }
            let (status, body) = answer(&app, method.clone(), &concrete(path)).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is served but not documented: {body}"
            );
        }
    }
    // ...and paths next to documented ones are not served at all.
    for uri in [
        "/",
        "/v1",
        "/v1/job",
        "/v1/jobs/x/y",
        "/v1/lora/alice/x",
        "/v1/lora/alice/x/unknown",
        "/v1/keys/a/b",
        "/v1/dashboard/nowhere",
        "/openapi.yaml",
    ] {
        let (status, body) = answer(&app, Method::GET, uri).await;
        assert!(
            !routed(status, &body),
            "GET {uri} is served but not documented: {status} {body}"
        );
    }
    db.cleanup().await;
}

#[tokio::test]
async fn the_document_is_served_at_openapi_json() {
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("openapi");
    let app = app(&db, &dir);
    let (status, body) = answer(&app, Method::GET, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, document());
    assert!(body["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.1")));
    db.cleanup().await;
}
