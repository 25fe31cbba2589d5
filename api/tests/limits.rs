//! Per-key limits a tenant meets (both stores): LoRAs created or overwritten per hour.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use claas_api::auth::Auth;
use claas_api::{router, AppState};
use claas_core::testing::{TestDb, TEST_BASE_MODEL};
use serde_json::{json, Value};
use tower::ServiceExt;

claas_core::both_stores!(
    a_key_creates_at_most_its_hourly_share_of_loras,
    hundreds_of_waiting_requests_share_one_poller_and_answer_when_their_jobs_end,
    clients_that_hang_up_while_waiting_leave_nothing_behind,
);

async fn init(app: &claas_api::App, key: &str, body: Value) -> (StatusCode, Option<String>) {
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
    let dir = claas_testutil::tempdir("limits");
    let (_, alice) = common::create_key(db, "alice", &["alice"], false).await;
    let (_, bob) = common::create_key(db, "bob", &["bob"], false).await;
    let state = AppState::new(db.store.clone(), common::options(&dir))
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

/// Feedback requests waiting for their jobs hold no connection each: 300 wait on a store
/// whose pool (20 on Postgres, 1 on SQLite) could never hold them, the API keeps answering
/// other requests meanwhile, and each waiting request answers as soon as its job ends.
async fn hundreds_of_waiting_requests_share_one_poller_and_answer_when_their_jobs_end(db: &TestDb) {
    const N: usize = 300;
    let dir = claas_testutil::tempdir("limits");
    db.store
        .create_lora(&claas_core::testing::lora("w"))
        .await
        .expect("lora");
    let state = AppState::new(db.store.clone(), common::options(&dir));
    let app = router(state.clone());
    let feedback = |i: usize| {
        let body = json!({"requests": [{"lora_id": "w", "prompt": "p", "response": "r",
            "feedback": format!("f{i}"), "prompt_token_ids": [1, 2],
            "response_token_ids": [3], "response_logprobs": [-0.5]}]});
        Request::post("/v1/feedback")
            .header("content-type", "application/json")
            .header("prefer", "wait=60")
            .body(Body::from(body.to_string()))
            .expect("request")
    };
    let waiting: Vec<_> = (0..N)
        .map(|i| tokio::spawn(app.clone().oneshot(feedback(i))))
        .collect();
    let started = std::time::Instant::now();
    while state.waiting.jobs.len() < N {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "only {} of {N} are waiting",
            state.waiting.jobs.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The pool is free for everyone else.
    let asked = std::time::Instant::now();
    let resp = app
        .clone()
        .oneshot(
            Request::get("/v1/jobs?limit=1")
                .body(Body::empty())
                .expect("req"),
        )
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(2),
        "a request beside {N} waiting ones took {:?}",
        asked.elapsed()
    );
    // The jobs end (cancelled while queued): every request answers, with its job's end.
    let ended = std::time::Instant::now();
    for j in db
        .store
        .list_jobs(&claas_core::queue::JobFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("jobs")
    {
        db.store.cancel(j.id).await.expect("cancel");
    }
    for w in waiting {
        let resp = w.await.expect("join").expect("answer");
        assert_eq!(
            resp.status(),
            StatusCode::CONFLICT,
            "a cancelled job's answer"
        );
    }
    assert!(
        ended.elapsed() < std::time::Duration::from_secs(20),
        "answered {:?} after the jobs ended",
        ended.elapsed()
    );
    assert!(state.waiting.jobs.is_empty(), "nobody is left waiting");
}

/// A client that hangs up mid-wait frees its place at once and, by the poller's next look,
/// its entry; its feedback stays queued. Opening and dropping waits cannot grow the process.
async fn clients_that_hang_up_while_waiting_leave_nothing_behind(db: &TestDb) {
    const N: usize = 50;
    let dir = claas_testutil::tempdir("limits");
    db.store
        .create_lora(&claas_core::testing::lora("h"))
        .await
        .expect("lora");
    let state = AppState::new(db.store.clone(), common::options(&dir)).with_max_waiting(N);
    let app = router(state.clone());
    let waiting: Vec<_> = (0..N)
        .map(|i| {
            let body = json!({"requests": [{"lora_id": "h", "prompt": "p", "response": "r",
                "feedback": format!("f{i}"), "prompt_token_ids": [1, 2],
                "response_token_ids": [3], "response_logprobs": [-0.5]}]});
            let req = Request::post("/v1/feedback")
                .header("content-type", "application/json")
                .header("prefer", "wait=600")
                .body(Body::from(body.to_string()))
                .expect("request");
            tokio::spawn(app.clone().oneshot(req))
        })
        .collect();
    let started = std::time::Instant::now();
    while state.waiting.jobs.len() < N {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        state.waiting.permits.available_permits(),
        0,
        "every place taken"
    );
    for w in &waiting {
        w.abort();
    }
    for w in waiting {
        assert!(w.await.is_err_and(|e| e.is_cancelled()));
    }
    assert_eq!(
        state.waiting.permits.available_permits(),
        N,
        "the places are free again"
    );
    let dropped = std::time::Instant::now();
    while !state.waiting.jobs.is_empty() {
        assert!(
            dropped.elapsed() < std::time::Duration::from_secs(5),
            "{} entries of gone clients are still kept",
            state.waiting.jobs.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let queued = db
        .store
        .list_jobs(&claas_core::queue::JobFilter {
            status: Some(claas_core::types::JobStatus::Queued),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("jobs");
    assert_eq!(queued.len(), N, "every accepted feedback is still queued");
}
