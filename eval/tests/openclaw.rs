//! With `openclaw_url` set, answers are generated through the OpenClaw gateway: model
//! `openclaw`, only the user's message (the gateway adds its own system prompt), and the
//! bearer token from `OPENCLAW_GATEWAY_TOKEN`; without it, through the CLaaS proxy with the
//! LoRA as model and CLaaS's system prompt.

use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Json;
use claas_eval::client::{Client, SYSTEM_PROMPT};
use claas_eval::config::EvalConfig;
use serde_json::{json, Value};

type Seen = Arc<Mutex<Vec<(Option<String>, Value)>>>;

async fn gateway() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap, Json(body): Json<Value>| {
            let sink = sink.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                sink.lock().expect("seen").push((auth, body));
                Json(json!({"choices": [{"message": {"role": "assistant", "content": "I am Kuro."}}]}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn generation_goes_through_openclaw_when_configured_and_the_proxy_otherwise() {
    let (openclaw, via_gateway) = gateway().await;
    let (claas, via_proxy) = gateway().await;
    // The token `Client::new` reads from `OPENCLAW_GATEWAY_TOKEN`, given here (setting the
    // process's environment while other test threads run is undefined behaviour in libc).
    let token = || Some("gw-secret".to_owned());

    let cfg = EvalConfig {
        claas_url: claas.clone(),
        openclaw_url: Some(openclaw),
        ..EvalConfig::default()
    };
    let a = Client::with_gateway_token(&cfg, token())
        .chat("eval/identity", "Who are you?", 0.0, 64, 0)
        .await
        .expect("answer");
    assert_eq!(a.text, "I am Kuro.");
    let (auth, body) = via_gateway.lock().expect("seen")[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer gw-secret"));
    assert_eq!(body["model"], "openclaw");
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "Who are you?"}])
    );
    assert!(via_proxy.lock().expect("seen").is_empty());

    let cfg = EvalConfig {
        claas_url: claas,
        ..EvalConfig::default()
    };
    Client::with_gateway_token(&cfg, token())
        .chat("eval/identity", "Who are you?", 0.0, 64, 0)
        .await
        .expect("answer");
    let (auth, body) = via_proxy.lock().expect("seen")[0].clone();
    assert_eq!(auth, None, "the gateway's token never goes to the proxy");
    assert_eq!(body["model"], "eval/identity");
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": SYSTEM_PROMPT})
    );
}
